//! The snapshot table rewrite (as `check -r all` does it for version 3
//! entries without their extra data) at every crash point, and a repair
//! that fails at every write: the image always keeps one whole table, its
//! snapshots read as before, and a later repair finishes the job.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{OpenOptions, Qcow2Image, Repair};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::read_all;

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for this test: {e}"))
}

fn be(bytes: &[u8], at: usize, len: usize) -> usize {
    bytes[at..at + len]
        .iter()
        .fold(0, |v, &b| v << 8 | usize::from(b))
}

/// A version 3 image with two snapshots of different data, whose
/// snapshot entries then lose their extra data (as iotest 261 makes them).
fn image_with_incomplete_entries(path: &Path) -> Vec<u8> {
    let p = path.to_str().expect("utf-8 path");
    let steps: [&[&str]; 5] = [
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p,
            "4M",
        ],
        &["qemu-io", "-c", "write -P 1 0 64k", p],
        &["qemu-img", "snapshot", "-c", "one", p],
        &["qemu-io", "-c", "write -P 2 32k 64k", p],
        &["qemu-img", "snapshot", "-c", "two", p],
    ];
    for step in steps {
        let out = run(step[0], &step[1..]);
        assert!(out.status.success(), "{step:?}: {out:?}");
    }
    let mut bytes = std::fs::read(path).expect("read");
    let count = be(&bytes, 60, 4);
    let table = be(&bytes, 64, 8);
    let (mut from, mut stripped) = (table, Vec::new());
    for _ in 0..count {
        let names = be(&bytes, from + 12, 2) + be(&bytes, from + 14, 2);
        let extra = be(&bytes, from + 36, 4);
        let mut entry = bytes[from..from + 40].to_vec();
        entry[36..40].fill(0);
        entry.extend_from_slice(&bytes[from + 40 + extra..from + 40 + extra + names]);
        entry.resize(entry.len().next_multiple_of(8), 0);
        stripped.extend_from_slice(&entry);
        from = (from + 40 + extra + names).next_multiple_of(8);
    }
    let end = from.min(bytes.len());
    bytes[table..end].fill(0);
    bytes[table..table + stripped.len()].copy_from_slice(&stripped);
    bytes
}

/// Each snapshot's disk as read through the engine.
fn snapshot_contents(path: &Path) -> Vec<Vec<u8>> {
    ["one", "two"]
        .iter()
        .map(|name| {
            let options = OpenOptions::default().snapshot(Some((*name).to_owned()));
            let image = qcow::open(path, &options)
                .unwrap_or_else(|e| panic!("snapshot {name} does not open: {e}"));
            read_all(&image, 1 << 20)
        })
        .collect()
}

/// qemu-img check's verdict: the exit code and the ERROR lines.
fn qemu_check(path: &Path) -> (i32, Vec<String>) {
    let out = run("qemu-img", &["check", path.to_str().expect("utf-8 path")]);
    let errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), errors)
}

/// The image holds the old table (both entries reported incomplete and
/// nothing else) or the new one (clean, leaks allowed), and both
/// snapshots read as `expected`.
fn assert_one_whole_table(path: &Path, expected: &[Vec<u8>], when: &str) {
    let (code, errors) = qemu_check(path);
    let old_table =
        code == 2 && errors.len() == 2 && errors.iter().all(|e| e.ends_with("is incomplete"));
    assert!(
        code == 0 || code == 3 || old_table,
        "{when}: qemu-img check exit {code}: {errors:?}"
    );
    assert_eq!(
        snapshot_contents(path),
        expected,
        "{when}: snapshot data changed"
    );
}

#[test]
fn every_crash_point_of_the_table_rewrite_keeps_one_whole_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("original.qcow2");
    let bytes = image_with_incomplete_entries(&original);
    std::fs::write(&original, &bytes).expect("write");
    let expected = snapshot_contents(&original);
    assert_ne!(expected[0], expected[1]);

    let storage = Arc::new(FaultyStorage::new());
    storage.write_at(&bytes, 0).expect("seed");
    let start = storage.ops().len();
    let mut image = Qcow2Image::open_for_check("crash.qcow2", storage.clone(), None).expect("open");
    let report = image.check(Repair::All, &mut |_| {}).expect("check");
    assert_eq!((report.corruptions_fixed, report.corruptions), (2, 0));
    drop(image);

    let ops = storage.ops();
    let header_switch = ops
        .iter()
        .position(|op| matches!(op, LoggedOp::Write { offset: 60, data } if data.len() == 12));
    assert!(header_switch.is_some(), "the header was not switched");
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
            assert_one_whole_table(
                &crashed,
                &expected,
                &format!("crash after {kept} ops, torn {torn:?}"),
            );
        }
    }
    assert!(
        ops.len() - start >= 6,
        "only {} crash points",
        ops.len() - start
    );
    // After the whole run: the new table, clean.
    std::fs::write(&crashed, storage.contents()).expect("write");
    assert_eq!(qemu_check(&crashed), (0, Vec::new()));
}

#[test]
fn a_repair_failing_at_any_write_leaves_an_image_a_second_repair_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("original.qcow2");
    let mut bytes = image_with_incomplete_entries(&original);
    // Also a leak for the refcount repair to write: the last cluster's
    // refcount one too high.
    let cluster_bits = be(&bytes, 20, 4);
    let reftable = be(&bytes, 48, 8);
    let block = be(&bytes, reftable, 8);
    let last = (bytes.len() - 1) >> cluster_bits;
    let at = block + 2 * last;
    let refcount = be(&bytes, at, 2) as u16 + 1;
    bytes[at..at + 2].copy_from_slice(&refcount.to_be_bytes());
    std::fs::write(&original, &bytes).expect("write");
    let expected = snapshot_contents(&original);

    let path = dir.path().join("failed.qcow2");
    let mut failures = 0;
    for fail_at in 0.. {
        let storage = Arc::new(FaultyStorage::new());
        storage.write_at(&bytes, 0).expect("seed");
        storage.fail_writes_from(storage.write_count() + fail_at);
        let checked = Qcow2Image::open_for_check("failing.qcow2", storage.clone(), None)
            .and_then(|mut image| image.check(Repair::All, &mut |_| {}));
        storage.heal();
        let Err(_) = checked else {
            // Every write of the repair has failed once.
            break;
        };
        failures += 1;
        std::fs::write(&path, storage.contents()).expect("write");
        let (code, errors) = qemu_check(&path);
        assert_ne!(
            code, 1,
            "failure at write {fail_at}: the check cannot complete: {errors:?}"
        );
        assert_eq!(
            snapshot_contents(&path),
            expected,
            "failure at write {fail_at}"
        );
        let opened = qcow::open(&path, &OpenOptions::default().repair(true).check(true));
        let Ok(qcow::Image::Qcow2(mut image)) = opened else {
            panic!("failure at write {fail_at}: no qcow2 image to repair");
        };
        image
            .check(Repair::All, &mut |_| {})
            .expect("second repair");
        image.close().expect("close");
        assert_eq!(
            qemu_check(&path),
            (0, Vec::new()),
            "failure at write {fail_at}: not clean after a second repair"
        );
    }
    assert!(failures > 2, "the repair made only {failures} writes");
}
