//! Locking through the library: on by default for images opened by path,
//! off when the options say so, and files that cannot be images refused.

use qcow::{CreateOptions, Error, OpenOptions};

fn writable() -> OpenOptions {
    OpenOptions::default().writable(true)
}

#[test]
fn images_opened_by_path_are_locked_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.qcow2");
    qcow::create(&path, &CreateOptions::new(1 << 20)).expect("create");
    let first = qcow::open(&path, &writable()).expect("first writer");
    match qcow::open(&path, &writable()) {
        Err(Error::Locked { conflict, .. }) => {
            assert_eq!(conflict.to_string(), "Failed to get \"write\" lock");
        }
        other => panic!("a second writer got {other:?}"),
    }
    match qcow::open(&path, &OpenOptions::default()) {
        Err(Error::Locked { conflict, .. }) => {
            assert_eq!(conflict.to_string(), "Failed to get shared \"write\" lock");
        }
        other => panic!("a reader beside a writer got {other:?}"),
    }
    let shared = OpenOptions::default().force_share(true);
    qcow::open(&path, &shared).expect("force-share reads beside a writer");
    // Creating over a file in use is refused before it is truncated.
    let len = std::fs::metadata(&path).expect("metadata").len();
    assert!(matches!(
        qcow::create(&path, &CreateOptions::new(2 << 20)),
        Err(Error::Locked { creating: true, .. })
    ));
    assert_eq!(std::fs::metadata(&path).expect("metadata").len(), len);
    drop(first);
    qcow::open(&path, &writable()).expect("a writer once the first is gone");
}

#[test]
fn locking_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.qcow2");
    qcow::create(&path, &CreateOptions::new(1 << 20)).expect("create");
    let unlocked = writable().lock(false);
    let _first = qcow::open(&path, &unlocked).expect("first");
    let reader = OpenOptions::default().lock(false);
    qcow::open(&path, &reader).expect("an unlocked reader beside an unlocked writer");
    // The unlocked writer holds no lock bytes: a locking writer gets in.
    qcow::open(&path, &writable()).expect("locked writer");
}

#[test]
fn force_share_is_for_read_only_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.qcow2");
    qcow::create(&path, &CreateOptions::new(1 << 20)).expect("create");
    let options = writable().force_share(true);
    assert!(matches!(
        qcow::open(&path, &options),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn directories_are_refused_as_images_and_backing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        qcow::open(dir.path(), &OpenOptions::default()),
        Err(Error::Open { .. })
    ));
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let top = dir.path().join("top.qcow2");
    let mut options = CreateOptions::new(1 << 20);
    options.backing_file = Some("sub".into());
    options.backing_format = Some("raw".into());
    qcow::create(&top, &options).expect("create");
    match qcow::open(&top, &OpenOptions::trusted()) {
        Err(Error::Open { path, source }) => {
            assert_eq!(path, sub);
            assert_eq!(source.kind(), std::io::ErrorKind::IsADirectory);
        }
        other => panic!("a directory as backing file gave {other:?}"),
    }
}
