//! The metadata overlap guard through the library: guest data written in
//! place never lands on metadata, whatever a damaged L2 entry says.

use qcow::format::header::field;
use qcow::{Error, OpenOptions};

const L1_AT: usize = field::L1_TABLE_OFFSET as usize;
const REFTABLE_AT: usize = field::REFCOUNT_TABLE_OFFSET as usize;
const FEATURES_AT: usize = field::INCOMPATIBLE_FEATURES as usize;

fn writable() -> OpenOptions {
    OpenOptions::default().writable(true)
}

#[test]
fn in_place_writes_never_land_on_metadata() {
    // An L2 entry (owned, OFLAG_COPIED) names the refcount block: a write
    // to that guest cluster must not overwrite it (QEMU checks every data
    // write); the image is marked corrupt instead.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .status()
        .expect("qemu-img is required");
    assert!(made.success());
    let image = qcow::open(&path, &writable()).expect("open");
    qcow::BlockDevice::write_at(&image, &[1u8; 65536], 0).expect("first write");
    drop(image);
    let mut bytes = std::fs::read(&path).expect("read");
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let l1 = be(&bytes, L1_AT) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let reftable = be(&bytes, REFTABLE_AT) as usize;
    let block = be(&bytes, reftable);
    bytes[l2..l2 + 8].copy_from_slice(&(block | (1 << 63)).to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");

    let image = qcow::open(&path, &writable()).expect("open");
    let result = qcow::BlockDevice::write_at(&image, &[0xeeu8; 4096], 0);
    assert!(
        matches!(
            result,
            Err(Error::MetadataOverlap {
                structure: "refcount block",
                ..
            })
        ),
        "{result:?}"
    );
    drop(image);
    let after = std::fs::read(&path).expect("read");
    let b = block as usize;
    assert!(
        after[b..b + 4096] == bytes[b..b + 4096],
        "the refcount block was overwritten"
    );
    let incompatible = be(&after, FEATURES_AT);
    assert_ne!(incompatible & 2, 0, "the corrupt bit is set");
}

#[test]
fn a_dirty_image_whose_tables_overlap_is_not_rebuilt() {
    // Rebuilding refcounts rewrites L1 and L2 entries: with an L1 entry
    // naming the refcount block, that would rewrite the block as a table.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dirty.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"])
        .arg(&path)
        .arg("16M")
        .status()
        .expect("qemu-img is required");
    assert!(made.success());
    let mut bytes = std::fs::read(&path).expect("read");
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let l1 = be(&bytes, L1_AT) as usize;
    let reftable = be(&bytes, REFTABLE_AT) as usize;
    let block = be(&bytes, reftable);
    bytes[l1..l1 + 8].copy_from_slice(&(block | (1 << 63)).to_be_bytes());
    let incompatible = be(&bytes, FEATURES_AT) | 1;
    bytes[FEATURES_AT..FEATURES_AT + 8].copy_from_slice(&incompatible.to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let result = qcow::open(&path, &writable());
    assert!(
        matches!(result, Err(Error::MetadataOverlap { .. })),
        "{:?}",
        result.err()
    );
    assert!(
        std::fs::read(&path).expect("read") == bytes,
        "the image changed"
    );
}

#[test]
fn metadata_whose_refcount_drops_is_never_handed_out() {
    // An L2 entry without OFLAG_COPIED names the refcount block: a write
    // there copies the cluster and drops that reference, so the block's
    // refcount falls to 0 while it is still the refcount block. It must
    // never be handed out for data.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .status()
        .expect("qemu-img is required");
    assert!(made.success());
    let image = qcow::open(&path, &writable()).expect("open");
    qcow::BlockDevice::write_at(&image, &[0x11u8; 65536], 0).expect("first write");
    drop(image);
    let mut bytes = std::fs::read(&path).expect("read");
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let l1 = be(&bytes, L1_AT) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let reftable = be(&bytes, REFTABLE_AT) as usize;
    let block = be(&bytes, reftable) as usize;
    bytes[l2..l2 + 8].copy_from_slice(&(block as u64).to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");

    let image = qcow::open(&path, &writable()).expect("open");
    let _ = qcow::BlockDevice::write_at(&image, &[0xeeu8; 65536], 0);
    let _ = qcow::BlockDevice::flush(&image);
    let mut written = Vec::new();
    for i in 1..8u64 {
        let data = vec![i as u8; 65536];
        if qcow::BlockDevice::write_at(&image, &data, i << 20).is_ok() {
            written.push(i);
        }
    }
    let _ = qcow::BlockDevice::flush(&image);
    drop(image);
    // Whatever was acknowledged reads back: no cluster was both data and
    // the refcount block (the block's write-back would have replaced it).
    let image = qcow::open(&path, &OpenOptions::default()).expect("reopen");
    for i in written {
        let mut buf = vec![0u8; 65536];
        qcow::BlockDevice::read_at(&image, &mut buf, i << 20).expect("read");
        assert!(
            buf.iter().all(|&b| b == i as u8),
            "the write at {:#x} was lost under the refcount block",
            i << 20
        );
    }
    let after = std::fs::read(&path).expect("read");
    assert!(
        !after[block..block + 65536]
            .windows(512)
            .any(|w| w.iter().all(|&b| b != 0 && b < 8)),
        "guest data was written over the refcount block"
    );
}
