//! `qcow bench` beside `qemu-img bench`: the same announcement for the
//! same flags, the same refusals, and writes that land where and as
//! qemu-img's do (checked with qemu-io and qemu-img check).

use std::path::Path;
use std::process::Command;

use super::p;
use super::{assert_check_clean, qcow, qemu_img, stdout};

fn image(path: &Path) {
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(path), "16M"])
            .status
            .success()
    );
}

#[test]
fn bench_announces_runs_and_refuses_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("b.qcow2");
    image(&img);
    for flags in [
        vec!["-c", "1000"],
        vec![
            "-c", "500", "-d", "8", "-s", "64k", "-o", "1M", "-S", "128k",
        ],
        vec!["-w", "-c", "300", "-d", "4", "--flush-interval", "100"],
        vec![
            "-w",
            "-c",
            "300",
            "--pattern",
            "0x5a",
            "-S",
            "8k",
            "--no-drain",
            "-d",
            "2",
            "--flush-interval",
            "10",
        ],
    ] {
        let args: Vec<&str> = [&["bench"], flags.as_slice(), &[p(&img)]].concat();
        let (a, b) = (qcow(&args), qemu_img(&args));
        assert_eq!(a.status.code(), Some(0), "{flags:?}: {a:?}");
        assert_eq!(b.status.code(), Some(0), "{flags:?}: {b:?}");
        let head = |o: &std::process::Output| {
            let text = stdout(o);
            let lines: Vec<&str> = text.lines().collect();
            assert!(
                lines
                    .last()
                    .is_some_and(|l| l.starts_with("Run completed in ")),
                "{text}"
            );
            lines[..lines.len() - 1].join("\n")
        };
        assert_eq!(head(&a), head(&b), "{flags:?}");
    }
    assert_check_clean(&img);
    for flags in [
        vec!["--flush-interval", "10"],
        vec!["-w", "--flush-interval", "10", "-d", "64"],
        vec!["-c", "abc"],
        vec!["--pattern", "300"],
    ] {
        let args: Vec<&str> = [&["bench"], flags.as_slice(), &[p(&img)]].concat();
        let (a, b) = (qcow(&args), qemu_img(&args));
        assert_eq!(a.status.code(), b.status.code(), "{flags:?}");
        assert_eq!(stdout(&a), stdout(&b), "{flags:?}");
    }
}

#[test]
fn bench_writes_land_where_qemu_img_puts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    image(&ours);
    image(&theirs);
    let flags = [
        "-w",
        "-c",
        "40",
        "-d",
        "4",
        "-s",
        "4k",
        "-S",
        "256k",
        "-o",
        "64k",
        "--pattern",
        "0x5a",
    ];
    let run = |tool: fn(&[&str]) -> std::process::Output, f: &Path| {
        let args: Vec<&str> = [&["bench"], &flags[..], &[p(f)]].concat();
        assert!(tool(&args).status.success());
    };
    run(qcow, &ours);
    run(qemu_img, &theirs);
    assert_check_clean(&ours);
    let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
    assert!(cmp.status.success(), "{}", stdout(&cmp));
    let io = Command::new("qemu-io")
        .args(["-c", "read -P 0x5a 64k 4k", "-c", "read -P 0 68k 252k"])
        .arg(&ours)
        .output()
        .expect("qemu-io is required");
    let out = String::from_utf8_lossy(&io.stdout);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // --random, qcow's own, reads anywhere in the disk.
    let out = qcow(&["bench", "--random", "-c", "1000", p(&ours)]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("random offsets, aligned to 4096"));
}
