//! Crash consistency: a workload that allocates L2 tables, refcount blocks
//! and grows the refcount table runs on storage that logs every write; for
//! every crash point (every prefix of the log, and the next write torn
//! between two sectors, which disks write atomically) the
//! disk image must pass `qemu-img check` with no corruption (leaks are
//! allowed) and every byte written before the last completed flush must
//! read back. Injected I/O errors must surface as errors, never panics.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{BlockDevice, CreateOptions, OpenOptions, Qcow2Image};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::{Rng, read_all};

/// A flush the workload completed: the log length then and the disk's
/// contents as written up to it.
struct Checkpoint {
    log_len: usize,
    model: Vec<u8>,
}

/// `qemu-img check` exit code: 0 clean, 3 leaks only, 2 corruption.
fn check_code(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().expect("path")])
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for the crash tests: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A write the workload issued: the log length before it, offset, length.
type IssuedWrite = (usize, u64, u64);

/// Runs the workload and returns the storage with its log, the
/// checkpoints, and every write range issued (with the log length before it).
fn workload(
    options: &CreateOptions,
    seed: u64,
    writes: usize,
    max_len: u64,
) -> (Arc<FaultyStorage>, Vec<Checkpoint>, Vec<IssuedWrite>) {
    let storage = Arc::new(FaultyStorage::new());
    Qcow2Image::create(&*storage, options).expect("create");
    let image =
        Qcow2Image::open_writable("crash.qcow2", storage.clone(), Some(64 << 10)).expect("open");
    let size = options.size;
    let mut model = vec![0u8; size as usize];
    let mut checkpoints = vec![Checkpoint {
        log_len: storage.ops().len(),
        model: model.clone(),
    }];
    let mut ranges = Vec::new();
    let mut rng = Rng::new(seed);
    for i in 0..writes {
        let len = 1 + rng.below(max_len);
        let off = rng.below(size - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        ranges.push((storage.ops().len(), off, len));
        image.write_at(&data, off).expect("write");
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if i % 7 == 6 {
            image.flush().expect("flush");
            checkpoints.push(Checkpoint {
                log_len: storage.ops().len(),
                model: model.clone(),
            });
        }
    }
    image.close().expect("close");
    checkpoints.push(Checkpoint {
        log_len: storage.ops().len(),
        model,
    });
    (storage, checkpoints, ranges)
}

fn verify_crash_point(
    dir: &Path,
    storage: &FaultyStorage,
    checkpoints: &[Checkpoint],
    ranges: &[IssuedWrite],
    kept: usize,
    torn: Option<usize>,
) {
    let disk = storage.crash_image(kept, torn);
    let path = dir.join("crashed.qcow2");
    std::fs::write(&path, &disk).expect("write crash image");
    let (code, text) = check_code(&path);
    assert!(
        code == 0 || code == 3,
        "crash after {kept} ops (torn {torn:?}): qemu-img check exit {code}\n{text}"
    );
    // The last completed flush at or before the crash point.
    let Some(last) = checkpoints.iter().rev().find(|c| c.log_len <= kept) else {
        return;
    };
    let image = qcow::open(&path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("crash after {kept} ops: reopen failed: {e}"));
    let read = read_all(&image, 1 << 20);
    // Bytes written after that flush may hold old or new data.
    let mut settled = vec![true; read.len()];
    for &(at, off, len) in ranges {
        if at >= last.log_len {
            settled[off as usize..(off + len) as usize].fill(false);
        }
    }
    for (i, ok) in settled.iter().enumerate() {
        if *ok && read[i] != last.model[i] {
            panic!("crash after {kept} ops (torn {torn:?}): byte {i} lost after a flush");
        }
    }
}

/// Whether a logged operation is a plain write of one data cluster (as
/// opposed to metadata, a flush or a resize).
fn is_data_write(op: Option<&LoggedOp>, cluster_size: u64) -> bool {
    matches!(op, Some(LoggedOp::Write { data, .. }) if data.len() as u64 == cluster_size)
}

fn crash_everywhere(options: &CreateOptions, seed: u64, writes: usize, max_len: u64) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, checkpoints, ranges) = workload(options, seed, writes, max_len);
    let ops = storage.ops();
    let first = checkpoints[0].log_len;
    let mut points = 0;
    for kept in first..=ops.len() {
        // Every point next to metadata, a flush or a resize; runs of
        // plain data-cluster writes are sampled.
        let cs = options.cluster_size;
        let plain =
            is_data_write(ops.get(kept), cs) && kept > 0 && is_data_write(ops.get(kept - 1), cs);
        if plain && kept % 64 != 0 {
            continue;
        }
        verify_crash_point(dir.path(), &storage, &checkpoints, &ranges, kept, None);
        // Disks write whole sectors atomically: tear only between sectors.
        if let Some(LoggedOp::Write { data, .. }) = ops.get(kept) {
            if data.len() > 512 {
                let torn = (data.len() / 2).next_multiple_of(512).min(data.len() - 1) / 512 * 512;
                verify_crash_point(
                    dir.path(),
                    &storage,
                    &checkpoints,
                    &ranges,
                    kept,
                    Some(torn.max(512)),
                );
            }
        }
        points += 1;
    }
    points
}

#[test]
fn every_crash_point_leaves_a_consistent_image_small_clusters() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64
    // clusters and a table cluster 64 blocks, so the workload allocates L2
    // tables and refcount blocks and moves the refcount table.
    let mut options = CreateOptions::new(4 << 20);
    options.cluster_size = 512;
    options.refcount_bits = 64;
    let points = crash_everywhere(&options, 11, 60, 120_000);
    assert!(points > 100, "only {points} crash points");
}

#[test]
fn the_small_cluster_workload_moves_the_refcount_table() {
    let mut options = CreateOptions::new(4 << 20);
    options.cluster_size = 512;
    options.refcount_bits = 64;
    let (storage, _, _) = workload(&options, 11, 60, 120_000);
    let image = Qcow2Image::open("after", storage, None).expect("open");
    assert!(image.header().refcount_table_clusters > 1);
    assert_ne!(image.header().refcount_table_offset, 512);
}

#[test]
fn every_crash_point_leaves_a_consistent_image_4k_clusters() {
    let mut options = CreateOptions::new(8 << 20);
    options.cluster_size = 4096;
    options.refcount_bits = 8;
    let points = crash_everywhere(&options, 12, 30, 3 * 4096);
    assert!(points > 20, "only {points} crash points");
}

#[test]
fn injected_io_errors_surface_and_leave_the_image_openable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = CreateOptions::new(1 << 20);
    options.cluster_size = 512;
    options.refcount_bits = 16;
    for fail_at in (0..60).step_by(3) {
        for fail_flush in [false, true] {
            let storage = Arc::new(FaultyStorage::new());
            Qcow2Image::create(&*storage, &options).expect("create");
            let image =
                Qcow2Image::open_writable("err.qcow2", storage.clone(), None).expect("open");
            let base = storage.write_count();
            if fail_flush {
                storage.fail_flushes_from(fail_at / 10 + 1);
            } else {
                storage.fail_writes_from(base + fail_at);
            }
            let mut rng = Rng::new(fail_at);
            let mut failed = false;
            for _ in 0..40 {
                let len = 1 + rng.below(4000);
                let off = rng.below((1 << 20) - len);
                if image.write_at(&vec![7u8; len as usize], off).is_err() {
                    failed = true;
                    break;
                }
                if rng.below(4) == 0 && image.flush().is_err() {
                    failed = true;
                    break;
                }
            }
            let close = image.close();
            assert!(
                failed || close.is_err() || fail_flush,
                "no error surfaced at {fail_at}"
            );
            // What reached the storage is an openable, uncorrupted image.
            storage.heal();
            let path = dir.path().join("after-error.qcow2");
            std::fs::write(&path, storage.contents()).expect("write");
            let (code, text) = check_code(&path);
            assert!(code == 0 || code == 3, "after error at {fail_at}: {text}");
            let reopened = qcow::open(&path, &OpenOptions::default()).expect("reopen");
            let mut buf = vec![0u8; 4096];
            reopened.read_at(&mut buf, 0).expect("read");
            assert_eq!(storage.len().ok(), Some(storage.contents().len() as u64));
        }
    }
}

#[test]
fn failed_allocations_give_their_clusters_back() {
    // One write fails (as ENOSPC would), the process goes on and closes
    // the image: qemu-img check finds no leak, whichever write failed.
    let dir = tempfile::tempdir().expect("tempdir");
    for extended in [false, true] {
        let mut options = CreateOptions::new(64 << 20);
        options.extended_l2 = extended;
        for (step, write) in [
            // A whole new cluster in a new L2 table (the table write fails
            // first), then in an existing one (the data write fails).
            (0u64, (0u64, 65536usize)),
            (1, (65536, 65536)),
            (2, (65536, 65536)),
            // A partial cluster: copy-on-write into a new cluster.
            (1, (3 * 65536 + 100, 1000)),
            // A multi-cluster run.
            (1, (8 * 65536, 4 * 65536)),
        ] {
            let storage = Arc::new(FaultyStorage::new());
            Qcow2Image::create(&*storage, &options).expect("create");
            let image =
                Qcow2Image::open_writable("leak.qcow2", storage.clone(), None).expect("open");
            // Clusters so that the L2 table exists, and freed ones inside
            // the file: a leak there is visible (past the end of the file
            // it would show only once the file grows over it).
            image
                .write_at(&vec![1u8; 16 * 65536], 2 << 20)
                .expect("first write");
            image.flush().expect("flush");
            image.discard(2 << 20, 15 * 65536).expect("discard");
            image.flush().expect("flush");
            storage.fail_writes_from(storage.write_count() + step);
            let failed = image.write_at(&vec![9u8; write.1], write.0).is_err();
            storage.heal();
            image.close().expect("close after the failure");
            let path = dir.path().join("leak.qcow2");
            std::fs::write(&path, storage.contents()).expect("write");
            let (code, text) = check_code(&path);
            assert_eq!(
                code, 0,
                "extended {extended}, failing write {step} of {write:?} (failed: {failed}): {text}"
            );
        }
    }
    // Growing the L1 table: the new table's write fails.
    for step in 0..3 {
        let storage = Arc::new(FaultyStorage::new());
        let mut options = CreateOptions::new(1 << 30);
        options.cluster_size = 512;
        Qcow2Image::create(&*storage, &options).expect("create");
        let mut image =
            Qcow2Image::open_writable("grow.qcow2", storage.clone(), None).expect("open");
        storage.fail_writes_from(storage.write_count() + step);
        let grown = image.resize(64 << 30);
        storage.heal();
        image.close().expect("close");
        let path = dir.path().join("grow.qcow2");
        std::fs::write(&path, storage.contents()).expect("write");
        let (code, text) = check_code(&path);
        assert_eq!(
            code, 0,
            "resize failing at write {step} ({grown:?}): {text}"
        );
    }
}
