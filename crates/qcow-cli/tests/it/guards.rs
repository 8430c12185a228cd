//! Reproducers from "never harm an image": limits refused before anything
//! changes, metadata never overwritten, and the grown part of an image over
//! a longer backing file reading as zeros — each against qemu-img on the
//! same input.

use std::path::{Path, PathBuf};

use qcow::format::header::field;

use super::{assert_check_clean, qcow, qemu_img, stdout};
use super::{p, stderr};

/// A 1 GiB qcow2 image (64 KiB clusters, 16-bit refcounts) with data in
/// its first cluster, so that it has one L2 table.
fn image_with_data(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "1G"])
            .status
            .success()
    );
    let io = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 128k"])
        .arg(&path)
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success());
    path
}

pub(super) fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn guest_data(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("check.raw");
    let out = qemu_img(&["convert", "-U", "-O", "raw", p(path), p(&raw)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&raw).expect("raw");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn corrupt_bit(path: &Path) -> bool {
    let out = qemu_img(&["info", "-U", "--output", "json", p(path)]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    info["format-specific"]["data"]["corrupt"] == serde_json::Value::Bool(true)
}

#[test]
fn an_allocation_over_a_live_l2_table_is_refused_and_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image_with_data(dir.path(), "l2.qcow2");
    let mut bytes = std::fs::read(&path).expect("read");
    let l1 = be64(&bytes, field::L1_TABLE_OFFSET);
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let reftable = be64(&bytes, field::REFCOUNT_TABLE_OFFSET);
    let block = be64(&bytes, reftable) as usize;
    let index = (l2 >> 16) as usize;
    // The L2 table's refcount (16 bits) drops to 0: it looks free.
    bytes[block + index * 2..block + index * 2 + 2].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let before = guest_data(&path);

    let out = qcow(&["resize", p(&path), "100G"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("active L2 table"),
        "the error names the structure: {}",
        stderr(&out)
    );
    assert!(corrupt_bit(&path), "the corrupt bit is set");
    assert_eq!(super::virtual_size(&path), 1 << 30, "size unchanged");
    assert!(guest_data(&path) == before, "guest data unchanged");
    // qemu-img refuses to write it too, now.
    assert_eq!(
        qemu_img(&["resize", p(&path), "100G"]).status.code(),
        Some(1)
    );
}

#[test]
fn a_refcount_block_on_the_l1_table_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image_with_data(dir.path(), "reft.qcow2");
    let mut bytes = std::fs::read(&path).expect("read");
    let l1 = be64(&bytes, field::L1_TABLE_OFFSET);
    let reftable = be64(&bytes, field::REFCOUNT_TABLE_OFFSET) as usize;
    bytes[reftable..reftable + 8].copy_from_slice(&l1.to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let before = guest_data(&path);

    let out = qcow(&["resize", p(&path), "64T"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("active L1 table"), "{}", stderr(&out));
    assert_eq!(super::virtual_size(&path), 1 << 30, "size unchanged");
    assert!(guest_data(&path) == before, "guest data unchanged");
    assert!(corrupt_bit(&path));
}

#[test]
fn growing_past_the_l1_limit_is_refused_like_qemu_img_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (cluster, size) in [("65536", "3P"), ("512", "16T"), ("65536", "+7E")] {
        let ours = dir.path().join(format!("o-{cluster}-{size}.qcow2"));
        let theirs = dir.path().join(format!("t-{cluster}-{size}.qcow2"));
        for path in [&ours, &theirs] {
            let o = format!("cluster_size={cluster}");
            let made = qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p(path), "1G"]);
            assert!(made.status.success());
        }
        let before = std::fs::read(&ours).expect("read");
        let a = qcow(&["resize", p(&ours), size]);
        let b = qemu_img(&["resize", p(&theirs), size]);
        assert_eq!(b.status.code(), Some(1));
        assert_eq!(a.status.code(), Some(1), "{size}: {}", stderr(&a));
        assert!(
            stderr(&a).contains("Failed to grow the L1 table"),
            "{}",
            stderr(&a)
        );
        assert!(std::fs::read(&ours).expect("read") == before, "{size}");
        let info = qcow(&["info", p(&ours)]);
        assert!(info.status.success(), "the image still opens");
    }
}

#[test]
fn resize_rounding_and_refusals_follow_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for size in ["+1", "1073742000", "100000000", "+0", "2147484160"] {
        let ours = dir.path().join("o.qcow2");
        let theirs = dir.path().join("t.qcow2");
        for path in [&ours, &theirs] {
            let _ = std::fs::remove_file(path);
            assert!(
                qemu_img(&["create", "-q", "-f", "qcow2", p(path), "1G"])
                    .status
                    .success()
            );
        }
        let a = qcow(&["resize", p(&ours), size]);
        let b = qemu_img(&["resize", p(&theirs), size]);
        assert_eq!(a.status.code(), b.status.code(), "resize {size}");
        assert_eq!(stdout(&a), stdout(&b), "resize {size}");
        assert_eq!(
            super::virtual_size(&ours),
            super::virtual_size(&theirs),
            "resize {size}"
        );
        assert_check_clean(&ours);
    }
}

#[test]
fn raw_images_of_partial_sectors_are_seen_as_qemu_sees_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("r1000.raw");
    std::fs::write(&raw, vec![0x5au8; 1000]).expect("write");
    let ours = qcow(&["info", "--output", "json", "-f", "raw", p(&raw)]);
    let theirs = qemu_img(&["info", "--output", "json", "-f", "raw", p(&raw)]);
    assert_eq!(stdout(&ours), stdout(&theirs));
    for (tool, out) in [("qcow", "a.raw"), ("qemu-img", "b.raw")] {
        let path = dir.path().join(out);
        let args = ["convert", "-f", "raw", "-O", "raw", p(&raw), p(&path)];
        let o = if tool == "qcow" {
            qcow(&args)
        } else {
            qemu_img(&args)
        };
        assert!(o.status.success(), "{tool}: {}", stderr(&o));
    }
    let a = std::fs::read(dir.path().join("a.raw")).expect("read");
    let b = std::fs::read(dir.path().join("b.raw")).expect("read");
    assert_eq!(a.len(), 1024);
    assert!(a == b, "convert output differs from qemu-img's");
}

#[test]
fn raw_images_resize_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (size, shrink) in [
        ("+100001", false),
        ("3M", false),
        ("-1M", false),
        ("-1M", true),
    ] {
        let ours = dir.path().join("o.raw");
        let theirs = dir.path().join("t.raw");
        for path in [&ours, &theirs] {
            let _ = std::fs::remove_file(path);
            assert!(
                qemu_img(&["create", "-q", "-f", "raw", p(path), "2M"])
                    .status
                    .success()
            );
        }
        let args = |path: &Path| {
            let mut a = vec!["resize".to_owned(), "-f".into(), "raw".into()];
            if shrink {
                a.push("--shrink".into());
            }
            a.push(p(path).to_owned());
            a.push(size.to_owned());
            a
        };
        let o = args(&ours);
        let t = args(&theirs);
        let a = qcow(&o.iter().map(String::as_str).collect::<Vec<_>>());
        let b = qemu_img(&t.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            a.status.code(),
            b.status.code(),
            "{size} {shrink}: {}",
            stderr(&a)
        );
        assert_eq!(stdout(&a), stdout(&b));
        let len = |path: &Path| std::fs::metadata(path).expect("metadata").len();
        assert_eq!(len(&ours), len(&theirs), "{size} {shrink}");
    }
}

#[test]
fn the_grown_part_over_a_longer_backing_file_reads_as_zeros() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    assert!(
        qemu_img(&["create", "-q", "-f", "raw", p(&base), "4M"])
            .status
            .success()
    );
    let io = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 0 4M"])
        .arg(&base)
        .output()
        .expect("qemu-io");
    assert!(io.status.success());
    // Aligned and unaligned old sizes, version 3; version 2 is refused.
    for (compat, old, new) in [
        ("1.1", "1M", "3M"),
        ("1.1", "1049088", "3M"),
        ("1.1", "1M", "8M"),
        ("0.10", "1M", "3M"),
        ("0.10", "4M", "5M"),
    ] {
        let ours = dir.path().join("o.qcow2");
        let theirs = dir.path().join("t.qcow2");
        for path in [&ours, &theirs] {
            let _ = std::fs::remove_file(path);
            let o = format!("compat={compat}");
            let made = qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                "-b",
                p(&base),
                "-F",
                "raw",
                p(path),
                old,
            ]);
            assert!(made.status.success(), "{}", stderr(&made));
        }
        let before = std::fs::read(&ours).expect("read");
        let a = qcow(&["resize", p(&ours), new]);
        let b = qemu_img(&["resize", p(&theirs), new]);
        let case = format!("compat={compat} {old} -> {new}");
        assert_eq!(a.status.code(), b.status.code(), "{case}: {}", stderr(&a));
        if !b.status.success() {
            assert!(
                std::fs::read(&ours).expect("read") == before,
                "{case}: refused, unchanged"
            );
            continue;
        }
        assert_check_clean(&ours);
        let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
        assert!(cmp.status.success(), "{case}: {}", stdout(&cmp));
        let map = |path: &Path| {
            let out = qemu_img(&["map", "--output", "json", p(path)]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            // Host offsets differ between the two writers; the layout must not.
            v.as_array()
                .expect("array")
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64(),
                        e["length"].as_u64(),
                        e["depth"].as_u64(),
                        e["zero"].as_bool(),
                        e["data"].as_bool(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(map(&ours), map(&theirs), "{case}");
    }
}

#[test]
fn refused_creates_leave_an_existing_file_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&good), "1M"])
            .status
            .success()
    );
    let original = std::fs::read(&good).expect("read");
    let ours = dir.path().join("k.qcow2");
    let theirs = dir.path().join("t.qcow2");
    for extra in [
        &["8E"][..],
        &["-o", "cluster_size=3000", "1M"][..],
        &["3P"][..],
        &["-o", "cluster_size=512", "1T"][..],
        &["1.5"][..],
        &["1x"][..],
        &["-o", "size=1.5"][..],
        &["99999999999999999999"][..],
    ] {
        std::fs::write(&ours, &original).expect("copy");
        std::fs::write(&theirs, &original).expect("copy");
        fn args<'a>(file: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
            let mut args = vec!["create", "-q", "-f", "qcow2", p(file)];
            // Options before the file name, sizes after it.
            let mut at = 4;
            for &a in extra {
                if a.starts_with('-') && a != "--" || a.contains('=') {
                    args.insert(at, a);
                    at += 1;
                } else {
                    args.push(a);
                }
            }
            args
        }
        let ours_args = args(&ours, extra);
        let a = qcow(&ours_args);
        let b = qemu_img(&args(&theirs, extra));
        assert_eq!(a.status.code(), Some(1), "{ours_args:?}: {}", stderr(&a));
        assert_eq!(b.status.code(), Some(1), "qemu-img {extra:?}");
        let theirs_msg = stderr(&b).replace(p(&theirs), p(&ours));
        assert_eq!(
            stderr(&a),
            theirs_msg.replace("qemu-img: ", "qcow: "),
            "{extra:?}"
        );
        // qemu-img deletes or keeps the file depending on where it failed;
        // qcow refuses before touching it.
        assert!(
            std::fs::read(&ours).expect("still there") == original,
            "{extra:?}: the existing file changed"
        );
    }
}

#[test]
fn create_sizes_round_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["qcow2", "qcow"] {
        for size in ["1000", "1", "1.5k", "1.1M", "513", "0", "0x1000"] {
            let ours = dir.path().join(format!("o.{format}"));
            let theirs = dir.path().join(format!("t.{format}"));
            for path in [&ours, &theirs] {
                let _ = std::fs::remove_file(path);
            }
            let a = qcow(&["create", "-q", "-f", format, p(&ours), size]);
            let b = qemu_img(&["create", "-q", "-f", format, p(&theirs), size]);
            assert_eq!(a.status.code(), b.status.code(), "{format} {size}");
            if b.status.success() {
                assert_eq!(
                    super::virtual_size(&ours),
                    super::virtual_size(&theirs),
                    "{format} {size}"
                );
            } else {
                let expected = stderr(&b).replace(p(&theirs), p(&ours));
                assert_eq!(stderr(&a), expected.replace("qemu-img: ", "qcow: "));
            }
        }
    }
}

/// Offset of the data of the first header extension of type `magic`.
fn extension_data(bytes: &[u8], magic: u32) -> usize {
    let at = field::HEADER_LENGTH as usize;
    let header_len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let mut at = header_len;
    loop {
        let kind = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        assert!(kind != 0, "extension {magic:#x} not found");
        if kind == magic {
            return at + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn header_extensions_qemu_refuses_are_refused() {
    const BITMAPS: u32 = 0x2385_2875;
    const FEATURES: u32 = 0x6803_f857;
    const CRYPTO: u32 = 0x0537_be77;
    let dir = tempfile::tempdir().expect("tempdir");
    type Poke = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Poke)> = vec![
        ("bitmaps reserved field", |b| {
            let at = extension_data(b, BITMAPS);
            b[at + 4..at + 8].copy_from_slice(&1u32.to_be_bytes());
        }),
        ("no bitmaps", |b| {
            let at = extension_data(b, BITMAPS);
            b[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
        }),
        ("too many bitmaps", |b| {
            let at = extension_data(b, BITMAPS);
            b[at..at + 4].copy_from_slice(&70_000u32.to_be_bytes());
        }),
        ("misaligned directory", |b| {
            let at = extension_data(b, BITMAPS) + 16;
            let offset = u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
            b[at..at + 8].copy_from_slice(&(offset + 512).to_be_bytes());
        }),
        ("oversized directory", |b| {
            let at = extension_data(b, BITMAPS) + 8;
            b[at..at + 8].copy_from_slice(&(128u64 << 20).to_be_bytes());
        }),
        ("bitmaps not in use (autoclear bit clear)", |b| {
            let at = extension_data(b, BITMAPS);
            b[at + 4..at + 8].copy_from_slice(&1u32.to_be_bytes());
            let autoclear = field::AUTOCLEAR_FEATURES as usize;
            b[autoclear + 7] &= !1;
        }),
        ("encryption header without encryption", |b| {
            let at = extension_data(b, FEATURES) - 8;
            b[at..at + 4].copy_from_slice(&CRYPTO.to_be_bytes());
        }),
    ];
    for (name, damage) in cases {
        let path = dir.path().join("ext.qcow2");
        let _ = std::fs::remove_file(&path);
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "64M"])
                .status
                .success()
        );
        let added = qemu_img(&["bitmap", "--add", p(&path), "b0"]);
        assert!(added.status.success(), "{}", stderr(&added));
        let mut bytes = std::fs::read(&path).expect("read");
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let theirs = qemu_img(&["info", p(&path)]);
        let ours = qcow(&["info", p(&path)]);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{name}: qcow {}, qemu-img {}",
            stderr(&ours),
            stderr(&theirs)
        );
    }
}
