//! `qcow convert` on the library's copy engine, beside qemu-img: the output
//! is laid out in guest order (as sequential as qemu-img's), `-S 0`
//! allocates the whole disk as qemu-img's does, and every output reads as
//! qemu-img's and passes its check.

use std::path::Path;

use serde_json::Value;

use super::{assert_check_clean, qcow, qemu_img};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A 24 MiB raw disk with four runs of data (pseudo-random, so that
/// neither zero detection nor compression removes them) between holes.
fn source(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("source.raw");
    let mut bytes = vec![0u8; 24 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (start, len) in [
        (0usize, 3usize << 20),
        (5 << 20, 1 << 20),
        (9 << 20, (7 << 20) + 12345),
        (20 << 20, 4096),
    ] {
        for b in &mut bytes[start..start + len] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
    }
    std::fs::write(&path, bytes).expect("write source");
    path
}

/// The allocated extents of `path` as (guest start, length, host offset).
fn data_extents(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = qemu_img(&["map", "--output=json", p(path)]);
    assert!(out.status.success());
    let map: Value = serde_json::from_slice(&out.stdout).expect("map json");
    map.as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == Value::Bool(true))
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["offset"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn outputs_are_allocated_in_guest_order_as_sequentially_as_qemu_img_lays_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = source(dir.path());
    for args in [
        vec![],
        vec!["-o", "cluster_size=4k"],
        vec!["-c", "-o", "cluster_size=4k"],
        vec!["-S", "0", "-o", "cluster_size=16k"],
        vec!["-m", "1"],
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let run = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
            let mut full = vec!["convert", "-O", "qcow2"];
            full.extend(&args);
            full.extend([p(&source), p(out)]);
            let o = tool(&full);
            assert!(o.status.success(), "{args:?}: {o:?}");
        };
        run(qcow, &ours);
        run(qemu_img, &theirs);
        assert_check_clean(&ours);
        let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
        assert!(cmp.status.success(), "{args:?}: contents differ");
        let (a, b) = (data_extents(&ours), data_extents(&theirs));
        assert!(
            a.len() <= b.len(),
            "{args:?}: {} extents where qemu-img has {}:\n{a:?}\n{b:?}",
            a.len(),
            b.len()
        );
        if !args.contains(&"-c") {
            // Host offsets grow with guest offsets: allocated in order.
            for pair in a.windows(2) {
                assert!(
                    pair[1].2 > pair[0].2,
                    "{args:?}: allocated out of guest order: {pair:?}"
                );
            }
        }
        if args.contains(&"0") {
            // -S 0: the whole disk allocated, as qemu-img allocates it.
            let covered: u64 = a.iter().map(|e| e.1).sum();
            assert_eq!(covered, 24 << 20, "{args:?}: not everything allocated");
            assert_eq!(a, b, "{args:?}: laid out differently from qemu-img");
        }
    }
}

#[test]
fn out_of_order_writes_make_the_same_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = source(dir.path());
    let out = dir.path().join("w.qcow2");
    let o = qcow(&[
        "convert",
        "-W",
        "-m",
        "4",
        "-O",
        "qcow2",
        p(&source),
        p(&out),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_check_clean(&out);
    let cmp = qemu_img(&["compare", p(&source), p(&out)]);
    assert!(cmp.status.success(), "contents differ");
}
