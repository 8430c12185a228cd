//! The library as a VMM or backup tool embeds it: images opened from
//! storage it supplies, with backing and data files from its own resolver;
//! closing, resizing and asking about writability without matching on the
//! format; errors matched by kind.

use std::collections::HashMap;
use std::sync::Arc;

use qcow::resolve::{NoFiles, Resolver, open_storage};
use qcow::{
    BlockDevice, CreateOptions, ErrorKind, Image, MemStorage, OpenOptions, Qcow2Image, Storage,
};

/// Files by name, in memory.
struct Files(HashMap<String, Arc<MemStorage>>);

impl Resolver for Files {
    fn resolve(
        &self,
        image: &str,
        name: &str,
        _data: bool,
        _writable: bool,
    ) -> qcow::Result<Arc<dyn Storage>> {
        match self.0.get(name) {
            Some(file) => Ok(file.clone()),
            None => NoFiles.resolve(image, name, false, false),
        }
    }
}

fn qcow2(options: &CreateOptions) -> Arc<MemStorage> {
    let file = Arc::new(MemStorage::new());
    Qcow2Image::create(&*file, options).expect("create");
    file
}

#[test]
fn chains_open_from_caller_storage_through_its_resolver() {
    let base = qcow2(&CreateOptions::new(1 << 20));
    {
        let image = Qcow2Image::open_writable("base", base.clone(), None).expect("base");
        image.write_at(&[1; 4096], 0).expect("write");
        image.close().expect("close");
    }
    let mut options = CreateOptions::new(1 << 20);
    options.backing_file = Some("base".into());
    options.backing_format = Some("qcow2".into());
    let top = qcow2(&options);
    let files = Files(HashMap::from([("base".to_owned(), base)]));

    // The default policy follows nothing: reading the backing part fails.
    let alone = open_storage("top", top.clone(), &OpenOptions::default(), &files).expect("open");
    let mut buf = [0u8; 4096];
    assert_eq!(
        alone.read_at(&mut buf, 0).map_err(|e| e.kind()),
        Err(ErrorKind::Chain)
    );

    let image = open_storage(
        "top",
        top.clone(),
        &OpenOptions::trusted().writable(true),
        &files,
    )
    .expect("open the chain");
    assert!(image.is_writable());
    assert!(image.backing().is_some_and(|b| !b.is_writable()));
    image.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, [1; 4096]);
    image.write_at(&[2; 512], 512).expect("write");
    let mut image = image;
    image
        .resize(2 << 20)
        .expect("resize without matching on the format");
    assert_eq!(image.virtual_size(), 2 << 20);
    image.close().expect("close");

    // A resolver without the file: the chain is refused, by kind.
    let err = open_storage("top", top, &OpenOptions::trusted(), &NoFiles).expect_err("no base");
    assert_eq!(err.kind(), ErrorKind::Chain);
}

#[test]
fn errors_match_by_kind() {
    let file = qcow2(&CreateOptions::new(1 << 20));
    let image = open_storage("ro", file.clone(), &OpenOptions::default(), &NoFiles).expect("open");
    assert!(!image.is_writable());
    assert_eq!(
        image.write_at(&[0; 512], 0).map_err(|e| e.kind()),
        Err(ErrorKind::ReadOnly)
    );
    let mut buf = [0u8; 512];
    assert_eq!(
        image.read_at(&mut buf, 1 << 20).map_err(|e| e.kind()),
        Err(ErrorKind::InvalidInput)
    );
    let garbage = Arc::new(MemStorage::from_bytes(
        b"QFI\xfb\x00\x00\x00\x09".repeat(64),
    ));
    let err = open_storage("bad", garbage, &OpenOptions::default(), &NoFiles).expect_err("bad");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let mut raw = Image::Raw(
        qcow::RawImage::open("r", Arc::new(MemStorage::from_bytes(vec![0; 4096]))).expect("raw"),
    );
    raw.resize(8192).expect("raw resize");
    assert_eq!(raw.virtual_size(), 8192);

    // Locked by another user of the same file.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("locked.qcow2");
    qcow::create(&path, &CreateOptions::new(1 << 20)).expect("create");
    let holder = qcow::open(&path, &OpenOptions::default().writable(true)).expect("first");
    let second = qcow::open(&path, &OpenOptions::default().writable(true)).expect_err("second");
    assert_eq!(second.kind(), ErrorKind::Locked);
    holder.close().expect("close");
}
