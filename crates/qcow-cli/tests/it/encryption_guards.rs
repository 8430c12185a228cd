//! Encrypted images under the guards plain ones have, beside qemu-img: a
//! qemu-io process holding one locks out the commands that would write it
//! (or read it while it is written), with qemu-img's exit codes and words,
//! and the image keeps its bytes; a convert between encrypted images that
//! fails halfway (`ulimit -f`) keeps its source and leaves an output that
//! passes `qemu-img check` and holds, cluster by cluster, the source's
//! data or nothing.

use std::path::Path;

use super::encryption::{SECRET, opts};
use super::halfway::Limited;
use super::locking::Holder;
use super::{p, qcow, qemu_img, stderr, stdout};

const CLUSTER: usize = 64 << 10;

/// A LUKS-encrypted image of `size` that qemu-img creates and qemu-io
/// writes with `writes`.
fn encrypted(path: &Path, size: &str, writes: &[&str]) {
    let luks = "encrypt.format=luks,encrypt.iter-time=10";
    super::encryption::encrypted(path, luks, size, writes);
}

/// What qemu-img reads from the encrypted `image`.
fn plain(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("plain.raw");
    let out = qemu_img(&[
        "convert",
        "-U",
        "--object",
        SECRET,
        "--image-opts",
        &opts(image),
        "-O",
        "raw",
        p(&raw),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&raw).expect("raw");
    let _ = std::fs::remove_file(&raw);
    bytes
}

/// `qemu-img check` of the encrypted `image` (with its password, which
/// QEMU asks for) finds neither corruption nor leak.
fn assert_check_clean(image: &Path) {
    let out = qemu_img(&["check", "--object", SECRET, "--image-opts", &opts(image)]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn an_encrypted_image_held_by_qemu_io_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("e.qcow2");
    encrypted(&image, "8M", &["write -P 0x3c 0 1M"]);
    let source = dir.path().join("s.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&source), "8M"])
            .status
            .success()
    );
    let before = std::fs::read(&image).expect("read");
    let spec = opts(&image);
    let holder = Holder::qemu_io(Path::new(&spec), &["--object", SECRET, "--image-opts"]);
    let with_secret = ["--object", SECRET, "--image-opts"];
    let commands: [Vec<&str>; 5] = [
        [&["info"][..], &with_secret, &[spec.as_str()]].concat(),
        [&["resize"][..], &with_secret, &[spec.as_str(), "+1M"]].concat(),
        [&["snapshot", "-c", "s"][..], &with_secret, &[spec.as_str()]].concat(),
        [&["check", "-r", "all"][..], &with_secret, &[spec.as_str()]].concat(),
        vec![
            "convert",
            "-n",
            "--object",
            SECRET,
            "--target-image-opts",
            p(&source),
            spec.as_str(),
        ],
    ];
    for args in &commands {
        let (ours, theirs) = (qcow(args), qemu_img(args));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_ne!(ours.status.code(), Some(0), "{args:?}: not refused");
        assert_eq!(
            stderr(&ours).replace("qcow: ", ""),
            stderr(&theirs).replace("qemu-img: ", ""),
            "{args:?}"
        );
    }
    drop(holder);
    assert!(
        std::fs::read(&image).expect("read") == before,
        "the held image changed"
    );
}

#[test]
fn an_encrypted_convert_failing_halfway_keeps_its_source_and_a_consistent_output() {
    let setup = |d: &Path| {
        encrypted(&d.join("src.qcow2"), "32M", &["write -P 3 0 32M"]);
        std::fs::copy(d.join("src.qcow2"), d.join("pristine.qcow2")).expect("copy");
    };
    let source_spec = "driver=qcow2,file.filename=src.qcow2,encrypt.key-secret=sec0";
    let args = [
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        source_spec,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=sec0",
        "out.qcow2",
    ];
    // 8 MiB: past the LUKS header (about 3 MiB) and two 2 MiB chunks.
    let run = Limited::run(16384, setup, &args);
    // The source is as qemu-io left it, byte for byte.
    assert!(
        std::fs::read(run.ours("src.qcow2")).expect("read")
            == std::fs::read(run.ours("pristine.qcow2")).expect("read"),
        "the source changed"
    );
    // The output: consistent, and every cluster the source's or nothing.
    let out = run.ours("out.qcow2");
    assert_check_clean(&out);
    let data = plain(&out);
    assert_eq!(data.len(), 32 << 20);
    let mut copied = 0;
    for (i, cluster) in data.chunks(CLUSTER).enumerate() {
        if cluster.iter().all(|&b| b == 3) {
            copied += 1;
        } else {
            assert!(
                cluster.iter().all(|&b| b == 0),
                "output cluster {i} holds something else"
            );
        }
    }
    assert!(copied > 0, "nothing was copied before the limit");
}
