//! `qcow commit` beside `qemu-img commit` on the same chains: every file
//! of the chain reads as qemu-img leaves it, with the same guest-level
//! map, and passes its check; the image's view never changes.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{assert_check_clean, qcow, qemu_img, stdout};
use super::{p, qemu_io, stderr};

/// base (8 MiB) <- mid (8 MiB) <- top (12 MiB), each layer writing over
/// the one below, with zeroed ranges, and data in top past the end of the
/// layers below.
fn chain(dir: &Path) {
    let run = |args: &[&str]| {
        let out = qemu_img(args);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(&["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    qemu_io(&base, &["write -P 1 0 4M", "write -P 4 6M 64k"]);
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&mid),
        "8M",
    ]);
    qemu_io(&mid, &["write -P 2 1M 1M", "write -z 3M 64k"]);
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "12M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 3 2M 512k",
            "write -z 6M 64k",
            "write -P 7 10M 64k",
        ],
    );
}

fn view(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("view.raw");
    let out = qemu_img(&["convert", "-U", "-O", "raw", p(path), p(&raw)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&raw).expect("raw");
    let _ = std::fs::remove_file(&raw);
    bytes
}

/// qemu-img map without host offsets, adjacent runs of the same kind
/// merged: how the guest's ranges are stored, whatever the host layout.
fn guest_map(path: &Path) -> Vec<(u64, u64, String)> {
    let out = qemu_img(&["map", "-U", "--output=json", p(path)]);
    let map: Value = serde_json::from_slice(&out.stdout).expect("map json");
    let mut merged: Vec<(u64, u64, String)> = Vec::new();
    for e in map.as_array().expect("array") {
        let kind = format!(
            "depth={} present={} zero={} data={} compressed={}",
            e["depth"], e["present"], e["zero"], e["data"], e["compressed"]
        );
        let (start, len) = (
            e["start"].as_u64().expect("start"),
            e["length"].as_u64().expect("length"),
        );
        match merged.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => merged.push((start, len, kind)),
        }
    }
    merged
}

#[test]
fn commits_leave_every_layer_as_qemu_img_leaves_it() {
    for args in [vec![], vec!["-d"], vec!["-b", "base.qcow2"], vec!["-q"]] {
        let ours = tempfile::tempdir().expect("tempdir");
        let theirs = tempfile::tempdir().expect("tempdir");
        chain(ours.path());
        chain(theirs.path());
        let top = ours.path().join("top.qcow2");
        let before = view(&top);
        // -b names the base as the chain does: from the image's directory.
        let a = Command::new(env!("CARGO_BIN_EXE_qcow"))
            .arg("commit")
            .args(&args)
            .arg("top.qcow2")
            .current_dir(ours.path())
            .output()
            .expect("qcow");
        let b = Command::new("qemu-img")
            .arg("commit")
            .args(&args)
            .arg("top.qcow2")
            .current_dir(theirs.path())
            .output()
            .expect("qemu-img");
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {}", stderr(&a));
        assert_eq!(stdout(&a), stdout(&b), "{args:?}");
        assert!(view(&top) == before, "{args:?}: the image's view changed");
        // The top is emptied (rebuilt from scratch, the file cut to the few
        // clusters an empty image needs) or kept exactly as qemu-img does.
        let their_top = theirs.path().join("top.qcow2");
        assert!(
            std::fs::read(&top).expect("top") == std::fs::read(&their_top).expect("top"),
            "{args:?}: the top differs from qemu-img's ({} bytes, theirs {})",
            std::fs::metadata(&top).expect("top").len(),
            std::fs::metadata(&their_top).expect("top").len()
        );
        for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            let (x, y) = (ours.path().join(name), theirs.path().join(name));
            assert_check_clean(&x);
            assert!(view(&x) == view(&y), "{args:?}: {name} reads differently");
            // Past the end of an intermediate layer the image reads zeros;
            // qemu-img's -b commit writes them into the base explicitly,
            // where qcow's base (grown, with nothing below) reads them as
            // zeros already: the same view, stored differently.
            if !(args.contains(&"-b") && name == "base.qcow2") {
                assert_eq!(
                    guest_map(&x),
                    guest_map(&y),
                    "{args:?}: {name} maps differently"
                );
            }
        }
    }
}

/// A version 2 top cannot be rebuilt empty: its clusters are deallocated in
/// place, and their space goes back to the file system, as with qemu-img.
#[test]
fn a_version_2_top_is_emptied_in_place_as_qemu_img_empties_it() {
    use std::os::unix::fs::MetadataExt;
    let mut used = Vec::new();
    for program in [env!("CARGO_BIN_EXE_qcow"), "qemu-img"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
        for (path, backing) in [(&base, None), (&top, Some("base.qcow2"))] {
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "compat=0.10"];
            if let Some(b) = backing {
                args.extend(["-b", b, "-F", "qcow2"]);
            }
            args.extend([p(path), "64M"]);
            let out = qemu_img(&args);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        qemu_io(&base, &["write -P 1 0 8M"]);
        qemu_io(&top, &["write -P 2 4M 8M", "write -P 3 40M 100k"]);
        let before = view(&top);
        let out = Command::new(program)
            .args(["commit", "-q", p(&top)])
            .output()
            .expect("commit");
        assert!(out.status.success(), "{program}: {}", stderr(&out));
        assert!(view(&top) == before, "{program}: the view changed");
        assert_check_clean(&top);
        let meta = std::fs::metadata(&top).expect("top");
        used.push((meta.len(), meta.blocks() * 512));
    }
    let ((len, ours), (their_len, theirs)) = (used[0], used[1]);
    assert_eq!(len, their_len, "file length");
    assert!(
        ours.abs_diff(theirs) <= 64 << 10,
        "{ours} bytes used by qcow's top, {theirs} by qemu-img's"
    );
}

#[test]
fn commits_qemu_img_refuses_are_refused_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    chain(dir.path());
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let files: Vec<Vec<u8>> = ["base.qcow2", "mid.qcow2", "top.qcow2"]
        .iter()
        .map(|n| std::fs::read(dir.path().join(n)).expect("read"))
        .collect();
    for args in [
        vec!["commit", p(&base)],
        vec!["commit", "-b", "elsewhere.qcow2", p(&top)],
    ] {
        let a = qcow(&args);
        let b = qemu_img(&args);
        assert_eq!(a.status.code(), Some(1), "{args:?}");
        assert_eq!(b.status.code(), Some(1), "{args:?}");
        let theirs = stderr(&b).replacen("qemu-img: ", "qcow: ", 1);
        assert_eq!(stderr(&a), theirs, "{args:?}");
    }
    let after: Vec<Vec<u8>> = ["base.qcow2", "mid.qcow2", "top.qcow2"]
        .iter()
        .map(|n| std::fs::read(dir.path().join(n)).expect("read"))
        .collect();
    assert!(files == after, "a refused commit changed a file");
}

#[test]
fn a_base_another_process_uses_is_not_committed_into() {
    let dir = tempfile::tempdir().expect("tempdir");
    chain(dir.path());
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let before = std::fs::read(&mid).expect("read");
    let holder = super::locking::Holder::qemu_io(&mid, &["-r", "-f", "qcow2"]);
    let a = qcow(&["commit", p(&top)]);
    holder.finish();
    assert_eq!(a.status.code(), Some(1), "{}", stderr(&a));
    assert!(
        stderr(&a).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&a)
    );
    assert!(
        std::fs::read(&mid).expect("read") == before,
        "the base changed"
    );
}

/// A commit through a chain into its base zeroes what the top zeroed; the
/// base's clusters given up go back to the file system, as QEMU discards
/// them, so the base is qemu-img's, byte for byte, and takes the same disk
/// space.
#[test]
fn commit_into_the_base_leaves_qemu_img_s_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    for d in [&ours, &theirs] {
        std::fs::create_dir(d).expect("dir");
        let (base, mid, top) = (
            d.join("base.qcow2"),
            d.join("mid.qcow2"),
            d.join("top.qcow2"),
        );
        // Run in the copy's directory: the names the chain records are
        // then the same in both copies.
        let create = |args: &[&str]| assert!(super::run("qemu-img", args, d).status.success());
        create(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        qemu_io(&base, &["write -P 1 0 4M"]);
        create(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&mid),
        ]);
        qemu_io(&mid, &["write -P 2 1M 1M", "write -z 2M 1M"]);
        create(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&mid),
            "-F",
            "qcow2",
            p(&top),
        ]);
        qemu_io(&top, &["write -P 3 3M 512k", "write -z 0 512k"]);
    }
    let a = qcow(&[
        "commit",
        "-b",
        p(&ours.join("base.qcow2")),
        p(&ours.join("top.qcow2")),
    ]);
    let b = qemu_img(&[
        "commit",
        "-b",
        p(&theirs.join("base.qcow2")),
        p(&theirs.join("top.qcow2")),
    ]);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    use std::os::unix::fs::MetadataExt;
    // The base (the other images record backing files by absolute names,
    // which differ between the copies).
    let name = "base.qcow2";
    let (o, t) = (ours.join(name), theirs.join(name));

    assert!(
        std::fs::read(&o).expect("read") == std::fs::read(&t).expect("read"),
        "{name}: the files differ"
    );
    // The same space taken, within a cluster (the file system may place
    // a partial write's blocks differently); without the discards the
    // base would keep 1.5 MiB more.
    let blocks = |f: &Path| std::fs::metadata(f).expect("meta").blocks() * 512;
    assert!(
        blocks(&o) <= blocks(&t) + 65536,
        "{name}: {} bytes taken, qemu-img's {}",
        blocks(&o),
        blocks(&t)
    );
    assert_check_clean(&ours.join("base.qcow2"));
}
