//! `qcow map` beyond the fixtures: images whose map has hundreds of
//! thousands of runs are mapped in bounded memory (the map is streamed, not
//! collected), and an empty image maps as qemu-img maps it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qcow::format::header::field;

use super::p;
use super::{qemu_img, stdout};

fn be32(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn put64(bytes: &mut [u8], at: u64, value: u64) {
    let at = at as usize;
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// A hostile qcow2 image (512-byte clusters, so an L2 table maps 64
/// clusters and an L1 entry 32 KiB): every one of its `l1_entries` L1
/// entries points at the same L2 table, whose entries alternate between
/// zero clusters and unallocated ones after one data cluster. No two
/// neighbouring runs merge, so its map has 64 runs per L1 entry.
fn shared_l2_image(dir: &Path, l1_entries: u64) -> PathBuf {
    let path = dir.join("shared-l2.qcow2");
    let size = (l1_entries * 32768).to_string();
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&path),
        &size,
    ]);
    assert!(out.status.success(), "{out:?}");
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 512"])
        .arg(&path)
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success(), "{io:?}");

    let mut bytes = std::fs::read(&path).expect("image");
    let l1_size = u64::from(be32(&bytes, field::L1_SIZE));
    let l1 = be64(&bytes, field::L1_TABLE_OFFSET);
    assert_eq!(l1_size, l1_entries);
    let first = be64(&bytes, l1);
    let l2 = first & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "qemu-io wrote no L2 table");
    for i in (1..64).step_by(2) {
        put64(&mut bytes, l2 + 8 * i, 1); // a zero cluster
    }
    for i in 0..l1_size {
        put64(&mut bytes, l1 + 8 * i, first);
    }
    std::fs::write(&path, bytes).expect("write image");
    path
}

/// Runs `qcow` with its address space limited to `limit_mib` MiB.
fn qcow_limited(limit_mib: u64, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {}; exec \"$0\" \"$@\"",
            limit_mib * 1024
        ))
        .arg(env!("CARGO_BIN_EXE_qcow"))
        .args(args)
        .output()
        .expect("sh")
}

#[test]
fn map_of_a_shared_l2_table_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 262,144 runs: about 30 MB of JSON, which collecting the runs before
    // printing them took over 64 MiB to hold. A streamed map needs a few.
    let image = shared_l2_image(dir.path(), 4096);
    for output in ["json", "human"] {
        let ours = qcow_limited(48, &["map", "--output", output, p(&image)]);
        assert_eq!(
            ours.status.code(),
            Some(0),
            "map --output {output} under 48 MiB: {} {}",
            ours.status,
            String::from_utf8_lossy(&ours.stderr)
        );
        let theirs = qemu_img(&["map", "--output", output, p(&image)]);
        assert!(theirs.status.success(), "qemu-img map: {theirs:?}");
        assert!(
            ours.stdout == theirs.stdout,
            "map --output {output}: {} bytes, qemu-img's {} bytes",
            ours.stdout.len(),
            theirs.stdout.len()
        );
    }
}

#[test]
fn map_of_an_empty_image_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qcow2 = dir.path().join("empty.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&qcow2), "0"])
            .status
            .success()
    );
    let raw = dir.path().join("empty.raw");
    std::fs::write(&raw, b"").expect("raw");
    for (image, format) in [(&qcow2, "qcow2"), (&raw, "raw")] {
        for output in ["json", "human"] {
            let args = ["map", "-f", format, "--output", output, p(image)];
            let ours = super::qcow(&args);
            let theirs = qemu_img(&args);
            assert!(ours.status.success(), "{args:?}: {ours:?}");
            assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
        }
    }
}

#[test]
fn map_ranges_and_their_refusals_follow_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("r.qcow2");
    let img_s = img.to_str().expect("utf-8");
    assert!(
        super::qemu_img(&["create", "-q", "-f", "qcow2", img_s, "64M"])
            .status
            .success()
    );
    let io = std::process::Command::new("qemu-io")
        .args(["-c", "write 0 8M", "-c", "write -z 10M 1M", img_s])
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success());
    for args in [
        vec!["--start-offset", "1M", "--max-length", "2M"],
        vec!["--start-offset", "100M"],
        vec![
            "--start-offset=1000",
            "--max-length",
            "5000",
            "--output=json",
        ],
        vec!["--start-offset", "100M", "--output=json"],
        vec![
            "--start-offset",
            "9M",
            "--max-length",
            "3M",
            "--output=json",
        ],
        vec![
            "--start-offset",
            "1000",
            "--max-length",
            "0",
            "--output=json",
        ],
        vec!["--max-length", "1G", "--output=json"],
        vec!["--start-offset", "-5"],
        vec!["--max-length", "abc"],
    ] {
        let full: Vec<&str> = [&["map"], args.as_slice(), &[img_s]].concat();
        let (a, b) = (super::qcow(&full), super::qemu_img(&full));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}");
        assert_eq!(super::stdout(&a), super::stdout(&b), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&a.stderr).replacen("qcow:", "", 1),
            String::from_utf8_lossy(&b.stderr).replacen("qemu-img:", "", 1),
            "{args:?}"
        );
    }
}
