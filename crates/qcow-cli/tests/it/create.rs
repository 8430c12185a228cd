//! `qcow create` beside `qemu-img create`: the "Formatting" line names
//! every option qemu-img names, in its order; raw images are made as
//! qemu-img makes them (length and allocated blocks), refusals alike.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::p;
use super::{qcow, qemu_img, stdout};

#[test]
fn formatting_lines_and_raw_images_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[&str], &str); 12] = [
        ("qcow2", &[], "1M"),
        ("qcow2", &["-o", "preallocation=metadata"], "1M"),
        ("qcow2", &["-o", "data_file=d.raw,data_file_raw=on"], "1M"),
        (
            "qcow2",
            &["-o", "preallocation=off,data_file=d.raw,data_file_raw=off"],
            "1M",
        ),
        ("qcow2", &["-o", "preallocation=full,cluster_size=2M"], "1M"),
        ("raw", &[], "1000"),
        ("raw", &["-o", "preallocation=falloc"], "1M"),
        ("raw", &["-o", "preallocation=full"], "100k"),
        ("raw", &["-o", "preallocation=off"], "1M"),
        ("raw", &["-o", "cluster_size=4k"], "1M"),
        ("raw", &["-o", "preallocation=metadata"], "1M"),
        ("raw", &["-b", "x.raw"], "1M"),
    ];
    for (format, options, size) in cases {
        let ours = dir.path().join("ours.img");
        let theirs = dir.path().join("theirs.img");
        for f in [&ours, &theirs] {
            let _ = std::fs::remove_file(f);
            let _ = std::fs::remove_file(dir.path().join("d.raw"));
        }
        let run = |tool: fn(&[&str]) -> std::process::Output, f: &Path| {
            let args: Vec<&str> = [&["create", "-f", format], options, &[p(f), size]].concat();
            tool(&args)
        };
        let a = run(qcow, &ours);
        let _ = std::fs::remove_file(dir.path().join("d.raw"));
        let b = run(qemu_img, &theirs);
        let what = format!("{format} {options:?} {size}");
        assert_eq!(a.status.code(), b.status.code(), "{what}");
        assert_eq!(
            stdout(&a).replace(p(&ours), "X"),
            stdout(&b).replace(p(&theirs), "X"),
            "{what}"
        );
        assert_eq!(
            String::from_utf8_lossy(&a.stderr)
                .replacen("qcow: ", "", 1)
                .replace(p(&ours), "X"),
            String::from_utf8_lossy(&b.stderr)
                .replacen("qemu-img: ", "", 1)
                .replace(p(&theirs), "X"),
            "{what}"
        );
        if format == "raw" && a.status.success() {
            let (ma, mb) = (
                std::fs::metadata(&ours).expect("ours"),
                std::fs::metadata(&theirs).expect("theirs"),
            );
            assert_eq!((ma.len(), ma.blocks()), (mb.len(), mb.blocks()), "{what}");
        }
    }
}

#[test]
fn backing_files_and_refusals_are_answered_as_qemu_img_answers_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_in = |tool: &str, args: &[&str]| {
        let program = if tool == "qcow" {
            env!("CARGO_BIN_EXE_qcow")
        } else {
            "qemu-img"
        };
        let out = std::process::Command::new(program)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr).replacen(&format!("{tool}: "), "", 1);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    };
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            p(&dir.path().join("base.qcow2")),
            "1M"
        ])
        .status
        .success()
    );
    for args in [
        vec!["-b", "inexistent.qcow2"],
        vec!["-b", "inexistent.qcow2", "-F", "qcow2"],
        vec!["-u", "-b", "inexistent.qcow2", "-F", "qcow2"],
        vec!["-u", "-b", "inexistent.qcow2"],
        vec!["-b", "base.qcow2"],
        vec!["-o", "refcount_bits=3"],
        vec!["-o", "refcount_bits=-1"],
        vec!["-o", "compat=0.10,lazy_refcounts=on"],
        vec!["-o", "cluster_size=4k,extended_l2=on"],
    ] {
        let mut full = vec!["create", "-f", "qcow2"];
        full.extend(&args);
        full.push("new.qcow2");
        if !args.contains(&"base.qcow2") {
            full.push("1M");
        }
        let _ = std::fs::remove_file(dir.path().join("new.qcow2"));
        let ours = run_in("qcow", &full);
        let _ = std::fs::remove_file(dir.path().join("new.qcow2"));
        let theirs = run_in("qemu-img", &full);
        assert_eq!(ours, theirs, "{args:?}");
    }
}

#[test]
fn a_backing_loop_is_named_as_qemu_img_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&a), "1M"])
            .status
            .success()
    );
    // Make the image its own backing file, as iotest 043 does.
    let out = qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&a)]);
    assert!(out.status.success());
    let ours = qcow(&["info", "--backing-chain", p(&a)]);
    let theirs = qemu_img(&["info", "--backing-chain", p(&a)]);
    assert_eq!(ours.status.code(), theirs.status.code());
    let message = format!("Backing file '{}' creates an infinite loop.", p(&a));
    assert!(
        String::from_utf8_lossy(&ours.stderr).contains(&message),
        "{ours:?}"
    );
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains(&message),
        "{theirs:?}"
    );
}
