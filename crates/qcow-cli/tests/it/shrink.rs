//! `qcow resize --shrink` of qcow2 images beside `qemu-img resize
//! --shrink`: the same disk, map and file length, a clean check, for
//! cluster sizes, refcount widths, extended L2, compressed clusters,
//! snapshots and shrinks inside one L2 table or across many.

use std::path::Path;
use std::process::Command;

use super::p;
use super::{assert_check_clean, qcow, qemu_img, stdout};

fn prepare(path: &Path, options: &str, snapshot: bool) {
    let out = qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, p(path), "64M"]);
    assert!(out.status.success(), "{out:?}");
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 1 0 3M", "-c", "write -P 2 10M 5M"])
        .args(["-c", "write -P 3 40M 20M", "-c", "write -c -P 4 62M 64k"])
        .arg(path)
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success());
    if snapshot {
        assert!(
            qemu_img(&["snapshot", "-c", "before", p(path)])
                .status
                .success()
        );
        let io = Command::new("qemu-io")
            .args(["-c", "write -P 5 41M 1M"])
            .arg(path)
            .output()
            .expect("qemu-io");
        assert!(io.status.success());
    }
}

#[test]
fn shrinks_leave_what_qemu_img_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut runs = 0;
    for (options, snapshot) in [
        ("cluster_size=65536", false),
        ("cluster_size=4k", false),
        ("cluster_size=512", false),
        ("cluster_size=4k,refcount_bits=1", false),
        ("cluster_size=64k,extended_l2=on", false),
        ("cluster_size=4k", true),
    ] {
        for size in ["12M", "-50M", "41M", "1M", "63M", "63488K"] {
            let ours = dir.path().join("ours.qcow2");
            let theirs = dir.path().join("theirs.qcow2");
            prepare(&ours, options, snapshot);
            std::fs::copy(&ours, &theirs).expect("copy");
            let a = qcow(&["resize", "--shrink", p(&ours), size]);
            let b = qemu_img(&["resize", "--shrink", p(&theirs), size]);
            let what = format!("{options} snapshot={snapshot} {size}");
            assert_eq!(a.status.code(), b.status.code(), "{what}: {a:?}");
            assert_eq!(stdout(&a), stdout(&b), "{what}");
            assert_check_clean(&ours);
            let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
            assert!(cmp.status.success(), "{what}: {}", stdout(&cmp));
            let map = |f: &Path| stdout(&qemu_img(&["map", "--output=json", p(f)]));
            assert_eq!(map(&ours), map(&theirs), "{what}");
            let len = |f: &Path| std::fs::metadata(f).expect("meta").len();
            assert_eq!(len(&ours), len(&theirs), "{what}: file lengths differ");
            // Every cluster free after the shrink is a hole (qemu-img
            // punches those it frees): at most what qemu-img's file takes.
            assert!(
                used(&ours) <= used(&theirs) + (64 << 10),
                "{what}: {} bytes used, qemu-img's image {}",
                used(&ours),
                used(&theirs)
            );
            if snapshot {
                // The snapshot still reads as it was taken.
                let read = |f: &Path| {
                    stdout(&qemu_img(&[
                        "convert",
                        "-l",
                        "before",
                        "-O",
                        "raw",
                        p(f),
                        "/dev/stdout",
                    ]))
                };
                assert!(read(&ours) == read(&theirs), "{what}: snapshot differs");
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 36);
}

/// Bytes a file occupies on disk.
fn used(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// QEMU's iotest 250: data whose clusters were reallocated low in the file
/// is shrunk away; its space goes back to the file system as with qemu-img,
/// though the file cannot be cut.
#[test]
fn a_shrink_gives_freed_space_back_as_qemu_img_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut freed = Vec::new();
    for tool in ["qcow", "qemu-img"] {
        let path = dir.path().join(format!("{tool}.qcow2"));
        let out = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1M,preallocation=metadata",
            p(&path),
            "210M",
        ]);
        assert!(out.status.success());
        let io = Command::new("qemu-io")
            .args(["-c", "discard 0 10M", "-c", "discard 200M 10M"])
            .args(["-c", "write 200M 10M", "-c", "write 0 10M"])
            .arg(&path)
            .output()
            .expect("qemu-io is required");
        assert!(io.status.success());
        let before = used(&path);
        let out = if tool == "qcow" {
            qcow(&["resize", "--shrink", p(&path), "5M"])
        } else {
            qemu_img(&["resize", "--shrink", p(&path), "5M"])
        };
        assert!(out.status.success(), "{tool}: {out:?}");
        assert_check_clean(&path);
        freed.push(before - used(&path));
    }
    assert!(
        freed[0] + (64 << 10) >= freed[1],
        "qcow freed {} bytes, qemu-img {}",
        freed[0],
        freed[1]
    );
}

#[test]
fn shrinking_needs_the_flag_and_then_grows_back_as_zeros() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img.qcow2");
    prepare(&img, "cluster_size=65536", false);
    let before = std::fs::read(&img).expect("read");
    let a = qcow(&["resize", p(&img), "12M"]);
    let b = qemu_img(&["resize", p(&img), "12M"]);
    assert_eq!((a.status.code(), b.status.code()), (Some(1), Some(1)));
    assert!(
        std::fs::read(&img).expect("read") == before,
        "refused shrink changed the image"
    );
    assert!(
        qcow(&["resize", "--shrink", p(&img), "12M"])
            .status
            .success()
    );
    assert!(qcow(&["resize", p(&img), "64M"]).status.success());
    assert_check_clean(&img);
    let io = Command::new("qemu-io")
        .args(["-c", "read -P 0 12M 52M", "-c", "read -P 2 10M 2M"])
        .arg(&img)
        .output()
        .expect("qemu-io");
    let out = String::from_utf8_lossy(&io.stdout);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn growing_with_preallocation_lays_out_what_qemu_img_lays_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in ["off", "metadata", "falloc", "full"] {
        for options in ["cluster_size=65536", "cluster_size=4k,extended_l2=off"] {
            let ours = dir.path().join("ours.qcow2");
            let theirs = dir.path().join("theirs.qcow2");
            for f in [&ours, &theirs] {
                let out = qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, p(f), "1M"]);
                assert!(out.status.success());
                let io = Command::new("qemu-io")
                    .args(["-c", "write -P 1 0 700k"])
                    .arg(f)
                    .output()
                    .expect("qemu-io");
                assert!(io.status.success());
            }
            let flag = format!("--preallocation={mode}");
            let a = qcow(&["resize", &flag, p(&ours), "8M"]);
            let b = qemu_img(&["resize", &flag, p(&theirs), "8M"]);
            assert_eq!(a.status.code(), b.status.code(), "{mode} {options}: {a:?}");
            assert_check_clean(&ours);
            let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
            assert!(cmp.status.success(), "{mode} {options}");
            // Every mode lays the file out as qemu-img does (falloc and
            // full: refcount structures for the new clusters first, then
            // the data in one run, then the L2 tables), byte for byte.
            assert!(
                std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
                "{mode} {options}: the files differ"
            );
            if mode == "falloc" || mode == "full" {
                use std::os::unix::fs::MetadataExt;
                let blocks = std::fs::metadata(&ours).expect("meta").blocks() * 512;
                assert!(
                    blocks >= 7 << 20,
                    "{mode} {options}: {blocks} bytes allocated"
                );
            }
        }
    }
    // Not for a shrink.
    let img = dir.path().join("s.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "8M"])
            .status
            .success()
    );
    let a = qcow(&["resize", "--shrink", "--preallocation=full", p(&img), "4M"]);
    let b = qemu_img(&["resize", "--shrink", "--preallocation=full", p(&img), "4M"]);
    assert_eq!((a.status.code(), b.status.code()), (Some(1), Some(1)));
}

#[test]
fn preallocation_over_a_backing_file_keeps_what_it_shows() {
    // iotest 271: with extended L2, preallocating over a backing file sets
    // host clusters aside but leaves the backing file showing; without
    // extended L2, qemu-img refuses to create such an image.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).expect("base");
    for (label, create, resize) in [
        (
            "create metadata",
            vec!["-o", "extended_l2=on,preallocation=metadata"],
            None,
        ),
        (
            "create falloc",
            vec!["-o", "extended_l2=on,preallocation=falloc"],
            None,
        ),
        (
            "resize metadata",
            vec!["-o", "extended_l2=on"],
            Some("metadata"),
        ),
        ("resize full", vec!["-o", "extended_l2=on"], Some("full")),
        ("resize metadata, no subclusters", vec![], Some("metadata")),
        ("refused", vec!["-o", "preallocation=metadata"], None),
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let size = if resize.is_some() { "503k" } else { "512k" };
        let mut codes = Vec::new();
        for (tool, f) in [
            (qcow as fn(&[&str]) -> std::process::Output, &ours),
            (qemu_img, &theirs),
        ] {
            let _ = std::fs::remove_file(f);
            let args: Vec<&str> = [
                &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw"],
                create.as_slice(),
                &[p(f), size],
            ]
            .concat();
            let mut code = tool(&args).status.code();
            if let (Some(mode), Some(0)) = (resize, code) {
                let flag = format!("--preallocation={mode}");
                code = tool(&["resize", "-q", &flag, p(f), "1013k"]).status.code();
            }
            codes.push(code);
        }
        assert_eq!(codes[0], codes[1], "{label}");
        if codes[0] != Some(0) {
            continue;
        }
        assert_check_clean(&ours);
        let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
        assert!(cmp.status.success(), "{label}: {}", stdout(&cmp));
    }
}

/// QEMU's iotest 125: after `resize --preallocation=falloc|full`, writing
/// the grown part takes no more space on the host, also where it begins
/// inside a cluster metadata preallocation gave no space in the file.
#[test]
fn grown_parts_preallocated_need_no_more_space_when_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grow.qcow2");
    let created = (2 << 20) - (48 << 10);
    for growth in ["16K", "48K", "80K"] {
        for mode in ["falloc", "full"] {
            let _ = std::fs::remove_file(&path);
            // Made by qcow, as the iotest makes it with the tool under test.
            let out = qcow(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata,cluster_size=64k",
                p(&path),
                &created.to_string(),
            ]);
            assert!(out.status.success());
            let grow = format!("+{growth}");
            let preallocation = format!("--preallocation={mode}");
            let out = qcow(&["resize", "-q", &preallocation, p(&path), &grow]);
            assert!(out.status.success(), "{mode} {growth}: {out:?}");
            let io = |command: String| {
                let out = Command::new("qemu-io")
                    .args(["-c", &command])
                    .arg(&path)
                    .output()
                    .expect("qemu-io is required");
                assert!(out.status.success(), "{command}: {out:?}");
            };
            io(format!("write 0 {created}"));
            let before = used(&path);
            io(format!("write {created} {growth}"));
            // One block of the file system's own (an extent tree split
            // when preallocated space is first written) is not the image's.
            assert!(
                used(&path) <= before + 4096,
                "{mode} {growth}: the host size grew from {before} to {}",
                used(&path)
            );
            assert_check_clean(&path);
        }
    }
}
