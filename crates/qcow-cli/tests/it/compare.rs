//! `qcow compare` against qemu-img compare on pairs that differ in how
//! their contents are stored: strict mode (`-s`) tells an image from its
//! copy in another format, zero clusters from unallocated ones and
//! compressed clusters from plain ones, run by run, as qemu-img does.

use std::path::Path;

use super::qemu_io;
use super::{fixtures, qcow, qemu_img, stdout};

fn qemu_img_ok(args: &[&str]) {
    let out = qemu_img(args);
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

/// Runs `compare` with and without `-s` on `a b` and `b a` with both tools
/// and asserts the same exit code and output; returns the strict verdicts.
fn compare_both_ways(a: &str, b: &str) -> Vec<String> {
    let mut verdicts = Vec::new();
    for (x, y) in [(a, b), (b, a)] {
        for strict in [false, true] {
            let mut args = vec!["compare"];
            if strict {
                args.push("-s");
            }
            args.extend([x, y]);
            let ours = qcow(&args);
            let theirs = qemu_img(&args);
            assert_eq!(
                (ours.status.code(), stdout(&ours)),
                (theirs.status.code(), stdout(&theirs)),
                "{args:?} (qcow, then qemu-img); qcow's stderr: {}",
                String::from_utf8_lossy(&ours.stderr)
            );
            if strict {
                verdicts.push(stdout(&ours));
            }
        }
    }
    verdicts
}

#[test]
fn strict_compare_checks_block_status_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_owned();

    // Data with holes between, and its raw copy (sparse: holes stay holes).
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("holes.qcow2"), "4M"]);
    qemu_io(
        Path::new(&d("holes.qcow2")),
        &["write -P 1 0 64k", "write -P 2 1M 128k"],
    );
    qemu_img_ok(&["convert", "-O", "raw", &d("holes.qcow2"), &d("holes.raw")]);
    // Fully allocated, written backwards (two runs) and forwards (one run
    // that reaches the end of the image), and their raw copies.
    for (name, order) in [
        ("backwards", ["write -P 1 128k 128k", "write -P 2 0 128k"]),
        ("forwards", ["write -P 2 0 128k", "write -P 1 128k 128k"]),
    ] {
        let qcow2 = d(&format!("{name}.qcow2"));
        qemu_img_ok(&["create", "-q", "-f", "qcow2", &qcow2, "256k"]);
        qemu_io(Path::new(&qcow2), &order);
        qemu_img_ok(&["convert", "-O", "raw", &qcow2, &d(&format!("{name}.raw"))]);
    }
    // Zero clusters against unallocated ones, with the same data after.
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("zero.qcow2"), "4M"]);
    qemu_io(
        Path::new(&d("zero.qcow2")),
        &["write -z 0 64k", "write -P 3 1M 64k"],
    );
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("unalloc.qcow2"), "4M"]);
    qemu_io(Path::new(&d("unalloc.qcow2")), &["write -P 3 1M 64k"]);
    // Compressed against plain copies of the same image.
    qemu_img_ok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &d("holes.qcow2"),
        &d("c.qcow2"),
    ]);
    qemu_img_ok(&["convert", "-O", "qcow2", &d("holes.qcow2"), &d("p.qcow2")]);
    qemu_img_ok(&["convert", "-O", "qcow", &d("holes.qcow2"), &d("v1.qcow")]);
    // A shorter image, and a backing file shorter than its overlay.
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("short.qcow2"), "1M"]);
    qemu_io(Path::new(&d("short.qcow2")), &["write -P 1 0 64k"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &d("base.qcow2"), "1M"]);
    qemu_io(Path::new(&d("base.qcow2")), &["write -P 7 0 1M"]);
    let top = d("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &d("base.qcow2"),
        "-F",
        "qcow2",
        &top,
        "4M",
    ]);
    qemu_io(Path::new(&top), &["write -P 8 2M 64k"]);
    qemu_img_ok(&["convert", "-O", "raw", &top, &d("top.raw")]);
    qemu_img_ok(&["convert", "-O", "qcow2", &top, &d("flat.qcow2")]);

    let mismatch =
        |offset: u64| vec![format!("Strict mode: Offset {offset} block status mismatch!\n"); 2];
    let identical = vec!["Images are identical.\n".to_owned(); 2];
    for (a, b, strict) in [
        ("holes.qcow2", "holes.raw", mismatch(65536)),
        // The raw copy is one run to the end, the image two runs.
        ("backwards.qcow2", "backwards.raw", mismatch(0)),
        ("forwards.qcow2", "forwards.raw", identical.clone()),
        ("backwards.qcow2", "forwards.qcow2", mismatch(0)),
        ("zero.qcow2", "unalloc.qcow2", mismatch(0)),
        ("c.qcow2", "p.qcow2", mismatch(0)),
        ("c.qcow2", "holes.qcow2", mismatch(0)),
        ("v1.qcow", "holes.qcow2", mismatch(1179648)),
        ("v1.qcow", "holes.raw", mismatch(65536)),
        (
            "short.qcow2",
            "holes.qcow2",
            vec!["Strict mode: Image size mismatch!\n".to_owned(); 2],
        ),
        ("top.qcow2", "top.raw", mismatch(1048576)),
        ("top.qcow2", "flat.qcow2", mismatch(1048576)),
        ("top.qcow2", "top.qcow2", identical.clone()),
        ("holes.raw", "holes.raw", identical.clone()),
        ("base.qcow2", "short.qcow2", mismatch(0)),
    ] {
        assert_eq!(compare_both_ways(&d(a), &d(b)), strict, "{a} {b}");
    }
}

#[test]
fn strict_compare_of_every_fixture_with_itself_and_its_raw_copy_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("copy.raw");
    let raw = raw.to_str().expect("utf-8");
    let testdata = super::testdata();
    for name in fixtures() {
        if super::encrypted(&name) {
            continue;
        }
        let image = testdata.join(&name);
        let image = image.to_str().expect("utf-8");
        qemu_img_ok(&["convert", "-O", "raw", image, raw]);
        for other in [image, raw] {
            let args = ["compare", "-s", image, other];
            let ours = qcow(&args);
            let theirs = qemu_img(&args);
            assert_eq!(
                (ours.status.code(), stdout(&ours)),
                (theirs.status.code(), stdout(&theirs)),
                "{args:?}"
            );
        }
    }
}

#[test]
fn quiet_and_progress_output_is_qemu_img_output_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let (pa, pb) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
    assert!(
        super::qemu_img(&["create", "-q", "-f", "qcow2", pa, "64M"])
            .status
            .success()
    );
    let io = |path: &str, cmd: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-c", cmd, path])
            .output()
            .expect("qemu-io is required");
        assert!(out.status.success());
    };
    io(pa, "write -P 1 0 40M");
    std::fs::copy(&a, &b).expect("copy");
    for round in ["identical", "different"] {
        if round == "different" {
            io(pb, "write -P 9 30M 4k");
        }
        for flags in [vec!["-q"], vec!["-p"], vec!["-q", "-p"], vec![]] {
            let args: Vec<&str> = [&["compare"], flags.as_slice(), &[pa, pb]].concat();
            let (ours, theirs) = (super::qcow(&args), super::qemu_img(&args));
            assert_eq!(
                ours.status.code(),
                theirs.status.code(),
                "{round} {flags:?}"
            );
            assert!(
                ours.stdout == theirs.stdout,
                "{round} {flags:?}: {:?}",
                String::from_utf8_lossy(&ours.stdout)
            );
        }
    }
}
