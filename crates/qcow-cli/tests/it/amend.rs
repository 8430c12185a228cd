//! `qcow amend` beside `qemu-img amend` on copies of the same images: the
//! same disk, map and header (byte for byte where qemu-img's is
//! deterministic), a clean check, and every refusal alike.

use std::path::{Path, PathBuf};

use super::{assert_check_clean, qcow, qemu_img, stdout};
use super::{p, qemu_io, stderr};

/// Two copies of an image made by `make`: ours and qemu-img's.
fn pair(dir: &Path, make: impl Fn(&Path)) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    make(&ours);
    std::fs::copy(&ours, &theirs).expect("copy");
    (ours, theirs)
}

fn info(path: &Path) -> String {
    stdout(&qemu_img(&["info", "-U", p(path)]))
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("image:")
                && !l.starts_with("filename")
                && !l.contains("disk size")
                && !l.starts_with("file length")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn map(path: &Path) -> String {
    stdout(&qemu_img(&["map", "-U", "--output=json", p(path)]))
}

/// Amends both copies with `options` and compares the outcome.
fn amend_both(ours: &Path, theirs: &Path, options: &str) -> Option<i32> {
    let a = qcow(&["amend", "-o", options, p(ours)]);
    let b = qemu_img(&["amend", "-o", options, p(theirs)]);
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{options}: {}",
        stderr(&a)
    );
    assert_eq!(
        stderr(&a).replacen("qcow: ", "", 1),
        stderr(&b).replacen("qemu-img: ", "", 1),
        "{options}"
    );
    if a.status.success() {
        assert_check_clean(ours);
        let cmp = qemu_img(&["compare", p(ours), p(theirs)]);
        assert!(cmp.status.success(), "{options}: {}", stdout(&cmp));
        assert_eq!(info(ours), info(theirs), "{options}");
    }
    a.status.code()
}

#[test]
fn compat_changes_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An empty version 2 image upgrades to exactly what qemu-img makes.
    let (ours, theirs) = pair(dir.path(), |f| {
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                p(f),
                "1M"
            ])
            .status
            .success()
        );
    });
    assert_eq!(amend_both(&ours, &theirs, "compat=1.1"), Some(0));
    assert!(std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"));

    // Version 2 with data and a snapshot up, and back down with zero
    // clusters of every kind, with and without a backing file.
    for backing in [false, true] {
        let (ours, theirs) = pair(dir.path(), |f| {
            let base = dir.path().join("base.qcow2");
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if backing {
                assert!(
                    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "8M"])
                        .status
                        .success()
                );
                qemu_io(&base, &["write -P 7 0 8M"]);
                args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
            }
            args.extend([p(f), "8M"]);
            assert!(qemu_img(&args).status.success());
            qemu_io(
                f,
                &["write -P 1 0 1M", "write -z 2M 128k", "write -P 2 4M 64k"],
            );
            qemu_io(f, &["write -z -u 4M 64k"]);
            assert!(qemu_img(&["snapshot", "-c", "s1", p(f)]).status.success());
            qemu_io(f, &["write -z 6M 64k"]);
        });
        assert_eq!(
            amend_both(&ours, &theirs, "compat=0.10"),
            Some(0),
            "backing {backing}"
        );
        assert_eq!(map(&ours), map(&theirs), "backing {backing}");
        assert_eq!(
            amend_both(&ours, &theirs, "compat=v3"),
            Some(0),
            "backing {backing}"
        );
    }
}

#[test]
fn refcount_widths_lazy_refcounts_and_size_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), |f| {
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(f), "64M"])
                .status
                .success()
        );
        qemu_io(f, &["write -P 1 0 10M", "write -P 2 30M 1M"]);
        assert!(qemu_img(&["snapshot", "-c", "s1", p(f)]).status.success());
    });
    // A snapshot shares clusters (refcount 2): one bit cannot hold it.
    assert_eq!(amend_both(&ours, &theirs, "refcount_bits=1"), Some(1));
    for bits in ["8", "64", "2", "16"] {
        assert_eq!(
            amend_both(&ours, &theirs, &format!("refcount_bits={bits}")),
            Some(0)
        );
        // The new structure lies where QEMU puts it: the files are the same.
        assert!(
            std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
            "refcount_bits={bits}: the files differ"
        );
    }
    for options in [
        "lazy_refcounts=on",
        "lazy_refcounts=off",
        "lazy_refcounts=on,refcount_bits=32",
        "size=80M",
        "size=64M",
    ] {
        assert_eq!(amend_both(&ours, &theirs, options), Some(0), "{options}");
    }
    // Version 2 needs 16-bit refcounts.
    assert_eq!(amend_both(&ours, &theirs, "compat=0.10"), Some(1));
    let both = "compat=0.10,refcount_bits=16,lazy_refcounts=off";
    assert_eq!(amend_both(&ours, &theirs, both), Some(0));
}

/// iotest 112: a refcount width whose first new block has exactly one free
/// entry needs a fourth walk; the file and the progress (66.67% back to
/// 50.00%) are qemu-img's.
#[test]
fn refcount_width_changes_that_need_more_walks_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), |f| {
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=512",
            p(f),
            "64k",
        ];
        assert!(qemu_img(&args).status.success());
        qemu_io(f, &["write 0 29696"]);
    });
    let a = qcow(&["amend", "-p", "-o", "refcount_bits=64", p(&ours)]);
    let b = qemu_img(&["amend", "-p", "-o", "refcount_bits=64", p(&theirs)]);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    assert!(
        stdout(&a).contains("(66.67/100%)\r    (50.00/100%)"),
        "{}",
        stdout(&a)
    );
    assert!(std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"));
    assert_check_clean(&ours);
}

#[test]
fn refusals_match_qemu_img_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), |f| {
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd",
                p(f),
                "8M"
            ])
            .status
            .success()
        );
        qemu_io(f, &["write -c -P 1 0 64k"]);
    });
    let before = std::fs::read(&ours).expect("read");
    for options in [
        "cluster_size=4k",
        "bogus=1",
        "compat=2",
        "refcount_bits=3",
        "compat=0.10,refcount_bits=8",
        "backing_file=x",
        "data_file=d.raw",
        "data_file_raw=on",
        "compat=0.10",
        "compat=0.10,lazy_refcounts=on",
    ] {
        assert_eq!(amend_both(&ours, &theirs, options), Some(1), "{options}");
        assert!(
            std::fs::read(&ours).expect("read") == before,
            "{options} changed the image"
        );
    }
    let a = qcow(&["amend", p(&ours)]);
    assert_eq!(a.status.code(), Some(1));
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, [0u8; 512]).expect("raw");
    let a = qcow(&["amend", "-f", "raw", "-o", "size=1M", p(&raw)]);
    let b = qemu_img(&["amend", "-f", "raw", "-o", "size=1M", p(&raw)]);
    assert_eq!((a.status.code(), b.status.code()), (Some(1), Some(1)));
}

/// `amend -p` prints qemu-img's lines: the version change and the new
/// refcount width counted as QEMU counts them (two steps of an upgrade,
/// three walks over the refcount table, one step per L1 entry of a
/// downgrade, the whole projected from the operations done), nothing but
/// 0 and 100 for the rest (iotest 061).
#[test]
fn progress_lines_are_qemu_img_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let made = qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4G"]);
    assert!(made.status.success());
    let zeros = [
        "write -z 0 64k",
        "write -z 1G 64k",
        "write -z 2G 64k",
        "write -z 3G 64k",
    ];
    let cases: [(&[&str], &[&str], bool, &str); 9] = [
        (&["64M"], &["write -P 1 0 4M"], false, "lazy_refcounts=on"),
        (&["64M"], &["write -P 1 0 4M"], false, "compat=0.10"),
        (&["64M"], &["write -P 1 0 4M"], false, "refcount_bits=8"),
        (
            &["-o", "compat=0.10", "64M"],
            &["write 0 1M"],
            true,
            "compat=1.1",
        ),
        (
            &["-o", "compat=0.10", "64M"],
            &[],
            false,
            "compat=1.1,refcount_bits=8",
        ),
        (
            &["-o", "refcount_bits=8", "1G"],
            &["write 0 1M"],
            false,
            "refcount_bits=16,compat=0.10",
        ),
        (
            &["-o", "cluster_size=4k", "1G"],
            &["write 0 1M"],
            false,
            "refcount_bits=1",
        ),
        (
            &["-b", p(&base), "-F", "qcow2", "4G"],
            &zeros,
            false,
            "compat=0.10",
        ),
        (
            &["-b", p(&base), "-F", "qcow2", "4G"],
            &zeros,
            true,
            "compat=0.10",
        ),
    ];
    for (create, writes, snapshot, options) in cases {
        let (ours, theirs) = pair(dir.path(), |path| {
            let args = [
                &["create", "-q", "-f", "qcow2"][..],
                &create[..create.len() - 1],
                &[p(path)],
                &create[create.len() - 1..],
            ]
            .concat();
            let out = qemu_img(&args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            if !writes.is_empty() {
                qemu_io(path, writes);
            }
            if snapshot {
                assert!(qemu_img(&["snapshot", "-c", "s", p(path)]).status.success());
            }
        });
        let a = qcow(&["amend", "-p", "-o", options, p(&ours)]);
        let b = qemu_img(&["amend", "-p", "-o", options, p(&theirs)]);
        assert!(a.status.success(), "{options}: {}", stderr(&a));
        assert!(b.status.success(), "{options}: {}", stderr(&b));
        assert_eq!(stdout(&a), stdout(&b), "{create:?} {options}");
        assert_check_clean(&ours);
        let quiet = qcow(&["amend", "-p", "-q", "-o", "lazy_refcounts=off", p(&ours)]);
        assert!(quiet.status.success() && quiet.stdout.is_empty());
    }
}
