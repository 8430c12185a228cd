//! `Qcow2Image::make_empty` (what a commit does to the image it committed)
//! at every crash point and failing at every write: each cluster of the
//! image reads as before or as unallocated (zeros, with no backing file),
//! never as anything else; and `qemu-img check` finds no corruption, once
//! the next writer has rebuilt the refcounts of an image left marked dirty.
//! A version 3 image is rebuilt from scratch as QEMU rebuilds it (the file
//! ends after header, refcount table, refcount block and L1 table); a
//! version 2 image has its clusters deallocated one by one.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{OpenOptions, Qcow2Image};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::{qemu, read_all};

const CLUSTER: usize = 4096;

/// An image (version `compat`) of 4 KiB clusters whose 8 MiB take four L2
/// tables, holding data, zero clusters and a compressed cluster.
fn image(dir: &Path, compat: &str) -> Vec<u8> {
    let path = dir.join("image.qcow2");
    let p = path.to_str().expect("utf-8");
    let options = format!("compat={compat},cluster_size=4k");
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &options, p, "8M"],
    );
    qemu(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 300k",
            "-c",
            "write -P 2 2M 64k",
            "-c",
            "write -z 2100k 16k",
            "-c",
            "write -c -P 3 5M 4k",
            "-c",
            "write -P 4 8188k 4k",
            p,
        ],
    );
    std::fs::read(&path).expect("read")
}

fn disk(path: &Path) -> Vec<u8> {
    let image = qcow::open(path, &OpenOptions::default()).expect("open");
    read_all(&image, 1 << 20)
}

/// qemu-img check's exit code (0 clean, 3 leaks only, 2 corruptions).
fn check_code(path: &Path) -> i32 {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
        .expect("qemu-img is required");
    out.status.code().unwrap_or(-1)
}

fn dirty(bytes: &[u8]) -> bool {
    // Version 3 header: incompatible features at 72, dirty is bit 0.
    u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")) >= 3 && bytes[79] & 1 != 0
}

/// What a crash or a failure left at `path` (`bytes`).
fn verify(path: &Path, bytes: &[u8], before: &[u8], when: &str) {
    std::fs::write(path, bytes).expect("write");
    let seen = disk(path);
    for (i, (now, was)) in seen.chunks(CLUSTER).zip(before.chunks(CLUSTER)).enumerate() {
        assert!(
            now == was || now.iter().all(|&b| b == 0),
            "{when}: cluster {i} is neither as before nor empty"
        );
    }
    if dirty(bytes) {
        // The next writer rebuilds the refcounts.
        let storage: Arc<dyn Storage> =
            Arc::new(qcow_io::FileStorage::open(path, true).expect("open the file"));
        let image = Qcow2Image::open_writable("crashed", storage, None)
            .unwrap_or_else(|e| panic!("{when}: reopening: {e}"));
        image.close().expect("close");
        assert_eq!(check_code(path), 0, "{when}: after the rebuild");
        assert!(disk(path) == seen, "{when}: the rebuild changed data");
    } else {
        let code = check_code(path);
        assert!(code == 0 || code == 3, "{when}: check exit {code}");
    }
}

fn every_crash_point_and_failure(compat: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = image(dir.path(), compat);
    let path = dir.path().join("image.qcow2");
    let before = disk(&path);
    assert!(before.iter().any(|&b| b != 0));

    let storage = Arc::new(FaultyStorage::new());
    storage.write_at(&bytes, 0).expect("seed");
    let start = storage.ops().len();
    let mut image = Qcow2Image::open_writable("crash.qcow2", storage.clone(), None).expect("open");
    image.make_empty().expect("make_empty");
    image.close().expect("close");
    std::fs::write(&path, storage.contents()).expect("write");
    assert!(disk(&path).iter().all(|&b| b == 0), "{compat}: not empty");
    assert_eq!(check_code(&path), 0, "{compat}: the emptied image");
    let len = storage.contents().len();
    if compat == "1.1" {
        // Header, refcount table, refcount block, one L1 cluster.
        assert_eq!(len, 4 * CLUSTER, "{compat}: the emptied file's length");
    }

    let ops = storage.ops();
    let mut points = 0;
    for kept in start..=ops.len() {
        let mut tears = vec![None];
        if let Some(LoggedOp::Write { data, .. }) = ops.get(kept) {
            if data.len() > 512 {
                tears.push(Some(512));
            }
        }
        for torn in tears {
            points += 1;
            let when = format!("{compat}: crash after {kept} ops, torn {torn:?}");
            verify(&path, &storage.crash_image(kept, torn), &before, &when);
        }
    }
    assert!(points >= 8, "{compat}: only {points} crash points");

    let mut failures = 0;
    for fail_at in 0.. {
        let storage = Arc::new(FaultyStorage::new());
        storage.write_at(&bytes, 0).expect("seed");
        storage.fail_writes_from(storage.write_count() + fail_at);
        let outcome = Qcow2Image::open_writable("failing.qcow2", storage.clone(), None).and_then(
            |mut image| {
                image.make_empty()?;
                image.close()
            },
        );
        storage.heal();
        if outcome.is_ok() {
            // Every write has failed once.
            break;
        }
        failures += 1;
        let when = format!("{compat}: write {fail_at} failed");
        verify(&path, &storage.contents(), &before, &when);
    }
    assert!(failures >= 3, "{compat}: only {failures} writes");
}

#[test]
fn emptying_a_version_3_image_survives_every_crash_and_failure() {
    every_crash_point_and_failure("1.1");
}

#[test]
fn emptying_a_version_2_image_survives_every_crash_and_failure() {
    every_crash_point_and_failure("0.10");
}
