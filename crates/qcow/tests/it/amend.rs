//! `Qcow2Image::amend` at every crash point: a new refcount width and a
//! downgrade to version 2 (zero clusters expanded in active and snapshot
//! tables) leave, wherever they stop, an image qemu-img finds consistent
//! (leaks allowed) that reads as before.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::{AmendOptions, BlockDevice, Qcow2Image};
use qcow_io::{FaultyStorage, LoggedOp, Storage};

use crate::common::qemu_raw;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for this test: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

/// A version 3 image with data, zero clusters of both kinds and a
/// snapshot sharing its clusters, over a backing file.
fn source(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.qcow2");
    let img = dir.join("img.qcow2");
    let (b, i) = (base.to_str().expect("utf-8"), img.to_str().expect("utf-8"));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            b,
            "2M",
        ],
    );
    run("qemu-io", &["-c", "write -P 7 0 2M", b]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            i,
            "2M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "write -P 2 1M 8k",
            "-c",
            "write -z -u 1M 8k",
            i,
        ],
    );
    run("qemu-img", &["snapshot", "-c", "s1", i]);
    run("qemu-io", &["-c", "write -z 1536k 16k", i]);
    std::fs::read(&img).expect("read")
}

fn qemu_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().expect("utf-8")])
        .output()
        .expect("qemu-img is required");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn every_crash_point_of_an_amend_leaves_a_consistent_image_that_reads_as_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = source(dir.path());
    let original = dir.path().join("img.qcow2");
    let view = qemu_raw(&original, &[]);
    let snapshot_view = qemu_raw(&original, &["-l", "s1"]);
    for (label, options) in [
        ("refcount_bits=8", {
            let mut o = AmendOptions::new();
            o.refcount_bits = Some(8);
            o
        }),
        ("compat=0.10", {
            let mut o = AmendOptions::new();
            o.version = Some(2);
            o
        }),
    ] {
        let storage = Arc::new(FaultyStorage::new());
        storage.write_at(&bytes, 0).expect("seed");
        let start = storage.ops().len();
        {
            let mut image =
                Qcow2Image::open_writable("img.qcow2", storage.clone(), None).expect("open");
            // The backing file, opened from where the image lies.
            let base = qcow::open(
                &dir.path().join("base.qcow2"),
                &qcow::OpenOptions::default(),
            )
            .expect("base");
            image.attach_backing(Box::new(base));
            image.amend(&options).expect(label);
            image.close().expect("close");
        }
        let ops = storage.ops();
        assert!(
            ops.len() - start > 3,
            "{label}: only {} writes",
            ops.len() - start
        );
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
                let (code, text) = qemu_check(&crashed);
                assert!(
                    code == 0 || code == 3,
                    "{label}: crash after {kept} ops (torn {torn:?}): exit {code}\n{text}"
                );
                assert!(
                    qemu_raw(&crashed, &[]) == view,
                    "{label}: crash after {kept} ops (torn {torn:?}): the disk changed"
                );
                assert!(
                    qemu_raw(&crashed, &["-l", "s1"]) == snapshot_view,
                    "{label}: crash after {kept} ops (torn {torn:?}): the snapshot changed"
                );
            }
        }
    }
}

/// A read remembers the last L2 table it used (per thread). A refcount
/// width change starts the table cache anew: a later write that fills a
/// new entry of the same table must be seen by the next read, not hidden
/// by the remembered copy of the table from before the change.
#[test]
fn reads_after_a_refcount_width_change_see_later_writes() {
    let file: Arc<dyn Storage> = Arc::new(qcow_io::MemStorage::new());
    let mut image = Qcow2Image::create_writable("mem", file, &qcow::CreateOptions::new(1 << 20))
        .expect("create");
    let cs = image.cluster_size().expect("qcow2 has clusters");
    image.write_at(&vec![1u8; cs as usize], 0).expect("write");
    let mut buf = vec![0u8; cs as usize];
    image.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 1));
    let mut options = AmendOptions::new();
    options.refcount_bits = Some(8);
    image.amend(&options).expect("amend");
    image.write_at(&vec![2u8; cs as usize], cs).expect("write");
    image.read_at(&mut buf, cs).expect("read");
    assert!(
        buf.iter().all(|&b| b == 2),
        "the second cluster reads as {:?}, not as written",
        &buf[..4]
    );
}
