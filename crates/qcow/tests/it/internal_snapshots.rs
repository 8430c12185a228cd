//! Internal snapshots made, applied and deleted through the library, with
//! a crash at every point of each operation: the image holds the old
//! snapshot table or the new one, never a mix; every snapshot it lists
//! reads as it did; the disk reads as before or after the operation; and
//! `qemu-img check` finds no corruption, or (a version 3 image, marked
//! dirty for the operation) none once the next writer has rebuilt the
//! refcounts, as QEMU's and this engine's writable opens do. Version 2 has
//! no dirty mark: there a crash may leave entries without `OFLAG_COPIED`
//! on clusters owned alone (harmless: they are copied before a write),
//! which `check -r all` repairs. The same holds when an operation fails at
//! any of its writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{NewSnapshot, OpenOptions, Qcow2Image};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::{qemu, read_all};

/// The disk and every snapshot, by name, as the engine reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    disk: Vec<u8>,
    snapshots: BTreeMap<String, Vec<u8>>,
}

fn view(path: &Path) -> View {
    let image = qcow::open(path, &OpenOptions::default()).expect("open");
    let names: Vec<String> = match &image {
        qcow::Image::Qcow2(q) => q.snapshots().iter().map(|s| s.name.clone()).collect(),
        _ => panic!("not qcow2"),
    };
    let disk = read_all(&image, 1 << 20);
    drop(image);
    let snapshots = names
        .into_iter()
        .map(|name| {
            let options = OpenOptions::default().snapshot(Some(name.clone()));
            let snap = qcow::open(path, &options)
                .unwrap_or_else(|e| panic!("snapshot {name} does not open: {e}"));
            let data = read_all(&snap, 1 << 20);
            (name, data)
        })
        .collect();
    View { disk, snapshots }
}

/// qemu-img check's exit code (0 clean, 3 leaks only, 2 corruptions).
fn check_code(path: &Path) -> i32 {
    check(path, &[]).0
}

/// qemu-img check (with `extra` options): the exit code and ERROR lines.
fn check(path: &Path, extra: &[&str]) -> (i32, Vec<String>) {
    let out = Command::new("qemu-img")
        .arg("check")
        .args(extra)
        .arg(path)
        .output()
        .expect("qemu-img is required");
    let errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), errors)
}

fn dirty(bytes: &[u8]) -> bool {
    // Version 3 header: incompatible features at 72, dirty is bit 0.
    u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")) >= 3 && bytes[79] & 1 != 0
}

/// An image (version `compat`) of 4 KiB clusters, so that its 8 MiB take
/// several L2 tables, holding data, zeros, a compressed cluster and a
/// snapshot "old" whose data the disk has since partly overwritten.
fn image(dir: &Path, compat: &str) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let p = path.to_str().expect("utf-8 path");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size=4096,compat={compat}"),
            p,
            "8M",
        ],
    );
    qemu(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -c -P 2 512k 8k",
            "-c",
            "write -P 4 5M 64k",
            p,
        ],
    );
    qemu("qemu-img", &["snapshot", "-c", "old", p]);
    qemu(
        "qemu-io",
        &[
            "-c",
            "write -P 3 128k 256k",
            "-c",
            "write -z 512k 4k",
            "-c",
            "write -P 5 6M 4k",
            p,
        ],
    );
    std::fs::read(&path).expect("read")
}

type Operation = fn(&mut Qcow2Image) -> qcow::Result<()>;

fn operations() -> Vec<(&'static str, Operation)> {
    vec![
        ("create", |image| {
            image
                .create_snapshot(&NewSnapshot::new("new").date(1, 2))
                .map(drop)
        }),
        ("apply", |image| image.apply_snapshot("old")),
        ("delete", |image| image.delete_snapshot("old")),
    ]
}

fn every_crash_point(compat: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = image(dir.path(), compat);
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, &bytes).expect("write");
    let before = view(&path);
    for (name, operation) in operations() {
        let storage = Arc::new(FaultyStorage::new());
        storage.write_at(&bytes, 0).expect("seed");
        let start = storage.ops().len();
        let mut image =
            Qcow2Image::open_writable("crash.qcow2", storage.clone(), None).expect("open");
        operation(&mut image).expect(name);
        image.close().expect("close");
        std::fs::write(&path, storage.contents()).expect("write");
        let after = view(&path);
        assert_ne!(before, after, "{name} changed nothing");
        assert_eq!(check_code(&path), 0, "{name}: the finished image");

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
                let when = format!("{compat} {name}: crash after {kept} ops, torn {torn:?}");
                let crashed = storage.crash_image(kept, torn);
                std::fs::write(&path, &crashed).expect("write");
                verify(&path, &crashed, compat, &before, &after, &when);
            }
        }
        assert!(points >= 8, "{name}: only {points} crash points");
    }
}

/// What a crash (or a failure) left at `path` (`bytes`): see the module
/// documentation.
fn verify(path: &Path, bytes: &[u8], compat: &str, before: &View, after: &View, when: &str) {
    let crashed = bytes;
    let seen = view(path);
    for (snapshot, data) in &seen.snapshots {
        let expected = before
            .snapshots
            .get(snapshot)
            .or_else(|| after.snapshots.get(snapshot));
        assert_eq!(Some(data), expected, "{when}: snapshot {snapshot}");
    }
    let names = |v: &View| v.snapshots.keys().cloned().collect::<Vec<_>>();
    assert!(
        names(&seen) == names(before) || names(&seen) == names(after),
        "{when}: snapshots {:?}",
        names(&seen)
    );
    assert!(
        seen.disk == before.disk || seen.disk == after.disk,
        "{when}: the disk is neither the old nor the new one"
    );
    let (code, errors) = check(path, &[]);
    if code == 0 || code == 3 {
        return;
    }
    if dirty(crashed) {
        // The next writer rebuilds the refcounts.
        let storage: Arc<dyn Storage> =
            Arc::new(qcow_io::FileStorage::open(path, true).expect("open the file"));
        let image = Qcow2Image::open_writable("crashed", storage, None)
            .unwrap_or_else(|e| panic!("{when}: reopening: {e}"));
        image.close().expect("close");
    } else {
        // Version 2 has no dirty mark: the only disagreement a
        // crash may leave is a cluster owned alone whose entry
        // lacks OFLAG_COPIED (it is copied before a write,
        // never overwritten in place), which a repair fixes.
        assert_eq!(compat, "0.10", "{when}: check exit {code}, not dirty");
        for error in &errors {
            assert!(
                error.starts_with("ERROR OFLAG_COPIED") && error.ends_with("refcount=1"),
                "{when}: {error}"
            );
        }
        check(path, &["-r", "all"]);
    }
    assert_eq!(check_code(path), 0, "{when}: after the repair");
    assert_eq!(view(path), seen, "{when}: the repair changed data");
}

#[test]
fn every_crash_point_of_snapshot_operations_keeps_the_image_whole() {
    every_crash_point("1.1");
}

#[test]
fn every_crash_point_of_snapshot_operations_on_version_2() {
    every_crash_point("0.10");
}

/// Each operation failing at each of its writes (the storage refusing that
/// write and every later one): the image left behind is whole, as after a
/// crash.
fn every_failing_write(compat: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = image(dir.path(), compat);
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, &bytes).expect("write");
    let before = view(&path);
    for (name, operation) in operations() {
        let finished = Arc::new(FaultyStorage::new());
        finished.write_at(&bytes, 0).expect("seed");
        let mut image =
            Qcow2Image::open_writable("done.qcow2", finished.clone(), None).expect("open");
        operation(&mut image).expect(name);
        image.close().expect("close");
        std::fs::write(&path, finished.contents()).expect("write");
        let after = view(&path);
        let mut failures = 0;
        for fail_at in 0.. {
            let storage = Arc::new(FaultyStorage::new());
            storage.write_at(&bytes, 0).expect("seed");
            storage.fail_writes_from(storage.write_count() + fail_at);
            let outcome = Qcow2Image::open_writable("failing.qcow2", storage.clone(), None)
                .and_then(|mut image| {
                    operation(&mut image)?;
                    image.close()
                });
            storage.heal();
            if outcome.is_ok() {
                // Every write of the operation has failed once.
                break;
            }
            failures += 1;
            let left = storage.contents();
            std::fs::write(&path, &left).expect("write");
            let when = format!("{compat} {name}: write {fail_at} failed");
            verify(&path, &left, compat, &before, &after, &when);
        }
        assert!(failures >= 3, "{name}: only {failures} writes");
    }
}

#[test]
fn snapshot_operations_failing_at_any_write_leave_the_image_whole() {
    every_failing_write("1.1");
    every_failing_write("0.10");
}
