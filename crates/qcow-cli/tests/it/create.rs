//! `qcow create` beside `qemu-img create`: the "Formatting" line names
//! every option qemu-img names, in its order; raw images are made as
//! qemu-img makes them (length and allocated blocks), refusals alike.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{qcow, qemu_img, stdout};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

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
