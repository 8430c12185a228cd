//! Every committed fixture reads back exactly as qemu-img read it when the
//! fixture was made (the SHA-256 in testdata/manifest.tsv).

use qcow::{BlockDevice, Error, ImageFormat, OpenOptions};

use crate::common::{read_all, sha256_hex, testdata};

struct Row {
    name: String,
    format: String,
    size: u64,
    sha: String,
    snapshot: Option<String>,
}

fn manifest() -> Vec<Row> {
    let text = std::fs::read_to_string(testdata().join("manifest.tsv")).expect("manifest.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "bad manifest line {l:?}");
            Row {
                name: f[0].into(),
                format: f[1].into(),
                size: f[2].parse().expect("size"),
                sha: f[3].into(),
                snapshot: (f[4] != "-").then(|| f[4].to_owned()),
            }
        })
        .collect()
}

fn options(row: &Row) -> OpenOptions {
    OpenOptions::trusted().snapshot(row.snapshot.clone())
}

#[test]
fn manifest_lists_many_fixtures() {
    assert!(manifest().len() >= 20);
}

#[test]
fn every_fixture_reads_like_qemu() {
    let mut checked = 0;
    for row in manifest() {
        if row.sha == "-" {
            continue;
        }
        let path = testdata().join(&row.name);
        let image = qcow::open(&path, &options(&row))
            .unwrap_or_else(|e| panic!("opening {}: {e}", row.name));
        assert_eq!(
            image.format(),
            ImageFormat::from_name(&row.format).expect("format")
        );
        assert_eq!(image.virtual_size(), row.size, "{}", row.name);
        // Whole-disk reads, and odd-sized pieces that straddle clusters.
        for piece in [1 << 20, 4096 * 3 + 511] {
            let bytes = read_all(&image, piece);
            assert_eq!(
                sha256_hex(&bytes),
                row.sha,
                "{} snapshot {:?} read in pieces of {piece}",
                row.name,
                row.snapshot
            );
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} fixtures checked");
}

#[test]
fn encrypted_fixtures_need_their_password() {
    for name in ["luks.qcow2", "aes.qcow2"] {
        let path = testdata().join(name);
        match qcow::open(&path, &OpenOptions::default()).map(|_| ()) {
            Err(Error::Crypto { source, .. }) => {
                assert_eq!(source, qcow::crypto::CryptoError::KeyRequired, "{name}")
            }
            other => panic!("{name}: expected the key to be required, got {other:?}"),
        }
    }
}

#[test]
fn backing_files_are_not_opened_by_default() {
    let path = testdata().join("chain-top.qcow2");
    let image = qcow::open(&path, &OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; image.virtual_size() as usize];
    match image.read_at(&mut buf, 0) {
        Err(Error::NotOpened { what, .. }) => assert_eq!(what, "backing file"),
        other => panic!("expected NotOpened, got {other:?}"),
    }
}

#[test]
fn data_files_are_not_opened_by_default() {
    let path = testdata().join("datafile.qcow2");
    let image = qcow::open(&path, &OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; image.virtual_size() as usize];
    match image.read_at(&mut buf, 0) {
        Err(Error::NotOpened { what, .. }) => assert_eq!(what, "external data file"),
        other => panic!("expected NotOpened, got {other:?}"),
    }
}

#[test]
fn reads_past_the_end_are_refused() {
    let image =
        qcow::open(&testdata().join("sample.qcow2"), &OpenOptions::default()).expect("open");
    let mut buf = [0u8; 2];
    let end = image.virtual_size() - 1;
    assert!(matches!(
        image.read_at(&mut buf, end),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn snapshots_are_listed_and_unknown_ones_refused() {
    let path = testdata().join("snapshots.qcow2");
    let image = qcow::open(&path, &OpenOptions::default()).expect("open");
    let qcow::Image::Qcow2(q) = &image else {
        panic!("snapshots.qcow2 is qcow2")
    };
    let names: Vec<&str> = q.snapshots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    let by_id = OpenOptions::default().snapshot(Some(q.snapshots()[0].id.clone()));
    assert!(qcow::open(&path, &by_id).is_ok());
    let missing = OpenOptions::default().snapshot(Some("nope".into()));
    assert!(matches!(
        qcow::open(&path, &missing),
        Err(Error::SnapshotNotFound { .. })
    ));
}

#[test]
fn concurrent_readers_see_the_same_bytes() {
    let path = testdata().join("zlib.qcow2");
    let image = qcow::open(&path, &OpenOptions::default()).expect("open");
    let whole = read_all(&image, 1 << 20);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (image, whole) = (&image, &whole);
            s.spawn(move || {
                let mut rng = crate::common::Rng::new(t + 1);
                for _ in 0..200 {
                    let len = 1 + rng.below(100_000);
                    let off = rng.below(image.virtual_size() - len);
                    let mut buf = vec![0u8; len as usize];
                    image.read_at(&mut buf, off).expect("read");
                    assert_eq!(buf, whole[off as usize..(off + len) as usize]);
                }
            });
        }
    });
}
