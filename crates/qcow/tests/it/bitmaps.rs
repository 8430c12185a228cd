//! Persistent dirty bitmaps against QEMU's own view: after writes, zeroes,
//! discards and compressed writes through the engine, the dirty ranges
//! qemu-nbd exports for each bitmap (`-B NAME`, read with qemu-img map's
//! `x-dirty-bitmap`) equal the ranges written, rounded to the bitmap's
//! granularity; a disabled bitmap does not move; `qemu-img info` shows no
//! in-use flag after a clean close and shows it after a crash; and at every
//! crash point a bitmap is either marked in use or records every change.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use qcow::{BlockDevice, OpenOptions, Qcow2Image};
use qcow_io::{FaultyStorage, FileStorage, Storage};

use crate::common::{Rng, qemu, read_all};

const SIZE: u64 = 16 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Bits `floor(o / g)..=floor((o + len - 1) / g)` of every range, as
/// merged byte ranges within the disk.
fn rounded(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let bits = size.div_ceil(granularity) as usize;
    let mut set = vec![false; bits];
    for &(offset, len) in ranges {
        if len == 0 {
            continue;
        }
        let first = (offset / granularity) as usize;
        let last = ((offset + len - 1) / granularity) as usize;
        for bit in set.iter_mut().take(last + 1).skip(first) {
            *bit = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &on) in set.iter().enumerate() {
        if !on {
            continue;
        }
        let start = i as u64 * granularity;
        let end = (start + granularity).min(size);
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l = end - *s,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Kills the qemu-nbd server when the test is done with it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The dirty ranges of bitmap `name` as qemu-nbd exports them.
fn qemu_dirty_ranges(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k", p(&socket), p(path)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd is required for this test");
    let _server = Server(child);
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(socket.exists(), "qemu-nbd did not start");
    let json = qemu(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
                p(&socket)
            ),
        ],
    );
    let entries: serde_json::Value = serde_json::from_str(&json).expect("map json");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in entries.as_array().expect("array") {
        // Dirty areas read as holes through x-dirty-bitmap.
        if e["data"].as_bool() == Some(false) {
            let start = e["start"].as_u64().expect("start");
            let len = e["length"].as_u64().expect("length");
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
    }
    out
}

/// `qemu-img info`'s bitmaps: (name, flags, granularity).
fn qemu_bitmaps(path: &Path) -> Vec<(String, Vec<String>, u64)> {
    let json = qemu("qemu-img", &["info", "-U", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("info json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| {
                    (
                        b["name"].as_str().expect("name").to_owned(),
                        b["flags"]
                            .as_array()
                            .expect("flags")
                            .iter()
                            .map(|f| f.as_str().expect("flag").to_owned())
                            .collect(),
                        b["granularity"].as_u64().expect("granularity"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn check_exit(path: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", p(path)])
        .output()
        .expect("qemu-img")
        .status
        .code()
        .unwrap_or(-1)
}

fn open(path: &Path) -> Qcow2Image {
    let file = Arc::new(FileStorage::open(path, true).expect("open"));
    Qcow2Image::open_writable("bitmaps.qcow2", file, None).expect("open writable")
}

/// The ranges a bitmap holds, read through the engine (read-only).
fn engine_ranges(path: &Path, name: &str) -> Vec<(u64, u64)> {
    match qcow::open(path, &OpenOptions::default()).expect("open") {
        qcow::Image::Qcow2(q) => q.bitmap_ranges(name).expect("ranges"),
        _ => panic!("not qcow2"),
    }
}

/// Random guest changes through the engine; returns the ranges touched.
fn random_changes(image: &Qcow2Image, rng: &mut Rng, count: usize) -> Vec<(u64, u64)> {
    let cluster = image.header().cluster_size();
    let mut touched = Vec::new();
    for _ in 0..count {
        let offset = rng.below(SIZE - 1);
        let len = (1 + rng.below(300_000)).min(SIZE - offset);
        match rng.below(5) {
            0 | 1 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                image.write_at(&data, offset).expect("write");
            }
            2 => image
                .write_zeroes(offset, len, rng.below(2) == 0)
                .expect("zeroes"),
            3 => image.discard(offset, len).expect("discard"),
            _ => {
                let guest = offset / cluster * cluster;
                let data = vec![b'z'; cluster as usize];
                image
                    .write_compressed_cluster(&data, guest)
                    .expect("compressed");
                touched.push((guest, cluster));
                continue;
            }
        }
        touched.push((offset, len));
    }
    touched
}

#[test]
fn bitmaps_record_what_the_engine_writes_as_qemu_nbd_exports_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (seed, cluster) in [(1u64, "65536"), (2, "4096")] {
        let path = dir.path().join(format!("b{seed}.qcow2"));
        qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                p(&path),
                "16M",
            ],
        );
        qemu("qemu-img", &["bitmap", "--add", p(&path), "big"]);
        qemu(
            "qemu-img",
            &["bitmap", "--add", "-g", "512", p(&path), "small"],
        );
        qemu(
            "qemu-img",
            &["bitmap", "--add", "--disable", p(&path), "frozen"],
        );
        // QEMU records this write in the enabled bitmaps.
        qemu("qemu-io", &["-c", "write -P 7 5M 100k", p(&path)]);
        let mut touched = vec![(5 << 20, 100 << 10)];
        let mut rng = Rng::new(seed);
        let mut image = open(&path);
        for round in 0..3 {
            touched.extend(random_changes(&image, &mut rng, 15));
            if round == 1 {
                image.flush().expect("flush");
            } else {
                image.close().expect("close");
                image = open(&path);
            }
        }
        image.close().expect("close");
        assert_eq!(check_exit(&path), 0, "{cluster}: qemu-img check");
        let listed = qemu_bitmaps(&path);
        let default = cluster.parse::<u64>().expect("n").clamp(4096, 65536);
        assert_eq!(
            listed,
            vec![
                ("big".to_owned(), vec!["auto".to_owned()], default),
                ("small".to_owned(), vec!["auto".to_owned()], 512),
                ("frozen".to_owned(), vec![], default),
            ],
            "{cluster}: no bitmap may stay in use after a clean close"
        );
        for (name, granularity) in [("big", default), ("small", 512)] {
            let expected = rounded(&touched, granularity, SIZE);
            assert_eq!(qemu_dirty_ranges(&path, name), expected, "{cluster} {name}");
            assert_eq!(engine_ranges(&path, name), expected, "{cluster} {name}");
        }
        assert!(qemu_dirty_ranges(&path, "frozen").is_empty());
    }
}

#[test]
fn a_crash_leaves_each_bitmap_in_use_or_recording_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&path),
            "16M",
        ],
    );
    qemu(
        "qemu-img",
        &["bitmap", "--add", "-g", "4096", p(&path), "b"],
    );
    qemu("qemu-io", &["-c", "write -P 1 0 1M", p(&path)]);
    let original = std::fs::read(&path).expect("read");
    let original_disk = read_all(
        &qcow::open(&path, &OpenOptions::default()).expect("open"),
        1 << 20,
    );
    let storage = Arc::new(FaultyStorage::new());
    storage.write_at(&original, 0).expect("seed");
    let start = storage.ops().len();
    let image = Qcow2Image::open_writable("crash.qcow2", storage.clone(), None).expect("open");
    let mut rng = Rng::new(9);
    random_changes(&image, &mut rng, 6);
    image.flush().expect("flush");
    random_changes(&image, &mut rng, 4);
    // A crash before the close: the bitmap is in use on disk.
    std::fs::write(&path, storage.crash_image(storage.ops().len(), None)).expect("write");
    assert_eq!(qemu_bitmaps(&path)[0].1, vec!["in-use", "auto"]);
    image.close().expect("close");

    let ops = storage.ops();
    for kept in start..=ops.len() {
        let crashed = storage.crash_image(kept, None);
        std::fs::write(&path, &crashed).expect("write");
        let when = format!("crash after {kept} of {} ops", ops.len());
        let code = check_exit(&path);
        assert!(code == 0 || code == 3, "{when}: qemu-img check exit {code}");
        let flags = &qemu_bitmaps(&path)[0].1;
        if flags.iter().any(|f| f == "in-use") {
            continue;
        }
        // Every 4 KiB block that changed is recorded.
        let disk = read_all(
            &qcow::open(&path, &OpenOptions::default()).expect("open"),
            1 << 20,
        );
        let recorded = engine_ranges(&path, "b");
        for (block, (a, b)) in disk
            .chunks(4096)
            .zip(original_disk.chunks(4096))
            .enumerate()
        {
            let at = block as u64 * 4096;
            if a != b {
                assert!(
                    recorded.iter().any(|&(s, l)| s <= at && at < s + l),
                    "{when}: block {at:#x} changed but is not recorded"
                );
            }
        }
    }
}

#[test]
fn bitmaps_follow_a_resize_and_refuse_a_snapshot_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resize.qcow2");
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&path), "16M"],
    );
    qemu("qemu-img", &["snapshot", "-c", "s", p(&path)]);
    qemu("qemu-img", &["bitmap", "--add", p(&path), "b"]);
    let mut image = open(&path);
    image.write_at(&[1u8; 4096], 15 << 20).expect("write");
    image.resize(32 << 20).expect("grow");
    image.write_at(&[2u8; 4096], 30 << 20).expect("write");
    assert!(image.apply_snapshot("s").is_err(), "apply with bitmaps");
    image.resize(8 << 20).expect("shrink");
    image.write_at(&[3u8; 4096], 1 << 20).expect("write");
    image.close().expect("close");
    assert_eq!(check_exit(&path), 0);
    let expected = vec![(1 << 20, 65536)];
    assert_eq!(qemu_dirty_ranges(&path, "b"), expected);
    assert_eq!(engine_ranges(&path, "b"), expected);
    let image = open(&path);
    assert_eq!(image.virtual_size(), 8 << 20);
}
