//! `check -r all` rebuilding the refcount structure (QEMU's placement: new
//! blocks in clusters nothing uses, the table after them) as a crash would
//! cut it: at every crash point, and at every failing write, the image
//! keeps its data, holds no damage beyond what it had, and a second repair
//! leaves it clean.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{Qcow2Image, Repair};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::qemu_raw;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for the rebuild tests: {e}"))
}

fn be(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// An image by qemu-img with data in two places, whose refcount for the
/// first data cluster is then zeroed: a check must rebuild the refcount
/// structure (QEMU: "ERROR cluster N refcount=0 reference=1").
fn image_needing_a_rebuild(path: &Path) -> Vec<u8> {
    let p = path.to_str().expect("utf-8 path");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"])
            .status
            .success()
    );
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 7 0 192k", "-c", "write -P 9 40M 64k", p])
        .output()
        .expect("qemu-io is required");
    assert!(out.status.success());
    let mut bytes = std::fs::read(path).expect("read");
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = be(&bytes, l2) & 0x00ff_ffff_ffff_fe00;
    let reftable = be(&bytes, 48) as usize;
    let block = be(&bytes, reftable) as usize;
    let entry = block + 2 * (data >> 16) as usize;
    bytes[entry..entry + 2].copy_from_slice(&[0, 0]);
    std::fs::write(path, &bytes).expect("write");
    bytes
}

/// qemu-img check's exit code and its count of corruptions.
fn corruptions(path: &Path) -> (i32, usize) {
    let out = qemu_img(&["check", path.to_str().expect("utf-8 path")]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors = text.lines().filter(|l| l.starts_with("ERROR")).count();
    (out.status.code().unwrap_or(-1), errors)
}

/// The crashed or failed image at `path`: no more damage than `before`,
/// the guest's data as `expected`, and clean after a second repair.
fn assert_recoverable(path: &Path, before: usize, expected: &[u8], when: &str) {
    let (code, errors) = corruptions(path);
    assert!(
        matches!(code, 0 | 2 | 3) && errors <= before,
        "{when}: qemu-img check exit {code}, {errors} errors (before: {before})"
    );
    assert!(qemu_raw(path, &[]) == expected, "{when}: the data changed");
    let storage = Arc::new(qcow_io::FileStorage::open(path, true).expect("open"));
    let mut image = Qcow2Image::open_for_check("again.qcow2", storage, None).expect("open");
    image
        .check(Repair::All, &mut |_| {})
        .expect("second repair");
    drop(image);
    assert_eq!(
        corruptions(path),
        (0, 0),
        "{when}: not clean after a second repair"
    );
    assert!(qemu_raw(path, &[]) == expected, "{when}: the data changed");
}

#[test]
fn every_crash_point_of_a_rebuild_keeps_the_image_recoverable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("original.qcow2");
    let bytes = image_needing_a_rebuild(&original);
    let (code, before) = corruptions(&original);
    assert_eq!(code, 2, "the damage is not what qemu-img sees");
    let expected = qemu_raw(&original, &[]);

    let storage = Arc::new(FaultyStorage::new());
    storage.write_at(&bytes, 0).expect("seed");
    let start = storage.ops().len();
    let mut image = Qcow2Image::open_for_check("crash.qcow2", storage.clone(), None).expect("open");
    let mut log = Vec::new();
    let report = image
        .check(Repair::All, &mut |line| log.push(line.to_owned()))
        .expect("check");
    assert!(
        log.iter().any(|l| l == "Rebuilding refcount structure"),
        "{log:?}"
    );
    assert_eq!(report.corruptions, 0);
    drop(image);

    let ops = storage.ops();
    let crashed = dir.path().join("crashed.qcow2");
    for kept in start..=ops.len() {
        let mut tears = vec![None];
        if let Some(LoggedOp::Write { data, .. }) = ops.get(kept) {
            if data.len() > 512 {
                tears.push(Some(512));
            }
        }
        for torn in tears {
            std::fs::write(&crashed, storage.crash_image(kept, torn)).expect("write");
            assert_recoverable(
                &crashed,
                before,
                &expected,
                &format!(
                    "crash after {} of {} operations (torn {torn:?})",
                    kept - start,
                    ops.len() - start
                ),
            );
        }
    }
}

#[test]
fn a_rebuild_failing_at_any_write_keeps_the_image_recoverable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("original.qcow2");
    let bytes = image_needing_a_rebuild(&original);
    let (_, before) = corruptions(&original);
    let expected = qemu_raw(&original, &[]);
    let failed = dir.path().join("failed.qcow2");
    let mut failures = 0;
    for fail_at in 0.. {
        let storage = Arc::new(FaultyStorage::new());
        storage.write_at(&bytes, 0).expect("seed");
        storage.fail_writes_from(storage.write_count() + fail_at);
        let checked = Qcow2Image::open_for_check("failing.qcow2", storage.clone(), None)
            .and_then(|mut image| image.check(Repair::All, &mut |_| {}));
        storage.heal();
        if checked.is_ok() {
            break;
        }
        failures += 1;
        std::fs::write(&failed, storage.contents()).expect("write");
        assert_recoverable(
            &failed,
            before,
            &expected,
            &format!("failure at write {fail_at}"),
        );
    }
    assert!(failures >= 3, "only {failures} writes failed");
}
