//! `qcow snapshot` beside `qemu-img snapshot` on copies of the same images:
//! exit codes, messages, `-l` listings, the disks after `-a`, and
//! `qemu-img check` after every step; snapshots made by one tool applied
//! and deleted by the other.

use std::path::{Path, PathBuf};

use super::{assert_check_clean, p, qcow, qemu_img, qemu_io, stderr, stdout};

fn create(path: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend(args);
    all.insert(all.len() - 1, p(path));
    let out = qemu_img(&all);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `snapshot ARGS` with both tools, on their own copies; the outcomes must
/// agree (exit code, standard error with the program's name replaced).
fn both(ours: &Path, theirs: &Path, args: &[&str]) -> String {
    let mut a_args = vec!["snapshot"];
    a_args.extend(args);
    let mut b_args = a_args.clone();
    a_args.push(p(ours));
    b_args.push(p(theirs));
    let a = qcow(&a_args);
    let b = qemu_img(&b_args);
    assert_eq!(a.status.code(), b.status.code(), "{args:?}: {}", stderr(&a));
    assert_eq!(
        stderr(&a)
            .replace(p(ours), "IMAGE")
            .replacen("qcow", "qemu-img", 2),
        stderr(&b).replace(p(theirs), "IMAGE"),
        "{args:?}"
    );
    stdout(&a)
}

/// A `-l` listing without its dates (the two tools ran at other moments).
fn undated(listing: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .map(|line| {
            let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            // ID TAG VM_SIZE(2 words) DATE(2 words) VM_CLOCK ICOUNT
            if fields.len() == 8 && fields[4].len() == 10 && fields[4].contains('-') {
                [&fields[..4], &fields[6..]].concat()
            } else {
                fields
            }
        })
        .collect()
}

fn list(path: &Path) -> String {
    stdout(&qemu_img(&["snapshot", "-l", "-U", p(path)]))
}

fn identical(a: &Path, b: &Path) -> bool {
    qemu_img(&["compare", "-q", "-U", p(a), p(b)])
        .status
        .success()
}

fn snapshot_raw(path: &Path, name: &str) -> Vec<u8> {
    let raw = path.with_extension(format!("{name}.raw"));
    let out = qemu_img(&["convert", "-U", "-l", name, "-O", "raw", p(path), p(&raw)]);
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    let bytes = std::fs::read(&raw).expect("raw");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn pair(dir: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    create(&ours, args);
    std::fs::copy(&ours, &theirs).expect("copy");
    (ours, theirs)
}

#[test]
fn create_list_apply_delete_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for options in [
        &["-o", "compat=1.1", "4M"][..],
        &["-o", "compat=0.10", "4M"][..],
        &["-o", "cluster_size=4096,refcount_bits=8", "4M"][..],
        &["-o", "extended_l2=on,lazy_refcounts=on", "4M"][..],
    ] {
        let (ours, theirs) = pair(dir.path(), options);
        let write = |commands: &[&str]| {
            qemu_io(&ours, commands);
            qemu_io(&theirs, commands);
        };
        write(&["write -P 1 0 1M", "write -c -P 5 2M 64k"]);
        both(&ours, &theirs, &["-c", "one"]);
        assert_check_clean(&ours);
        write(&["write -P 2 512k 1M", "write -z 2M 64k"]);
        both(&ours, &theirs, &["-c", "two"]);
        both(&ours, &theirs, &["-c", "one"]);
        write(&["discard 0 256k", "write -P 3 3M 4k"]);
        assert_check_clean(&ours);
        assert_eq!(
            undated(&both(&ours, &theirs, &["-l"])),
            undated(&list(&theirs)),
            "{options:?}"
        );
        assert_eq!(
            undated(&list(&ours)),
            undated(&list(&theirs)),
            "{options:?}"
        );
        for name in ["one", "two"] {
            assert!(
                snapshot_raw(&ours, name) == snapshot_raw(&theirs, name),
                "{options:?} {name}"
            );
        }
        // By ID (2), then by name; then the duplicate name "one" (ID 1).
        for target in ["2", "one"] {
            both(&ours, &theirs, &["-a", target]);
            assert_check_clean(&ours);
            assert!(identical(&ours, &theirs), "{options:?}: after -a {target}");
            write(&["write -P 4 1M 128k"]);
        }
        for gone in ["one", "two", "nothing"] {
            both(&ours, &theirs, &["-d", gone]);
            assert_check_clean(&ours);
            assert_eq!(undated(&list(&ours)), undated(&list(&theirs)), "-d {gone}");
        }
        assert!(
            snapshot_raw(&ours, "one") == snapshot_raw(&theirs, "one"),
            "{options:?}: the second 'one'"
        );
        both(&ours, &theirs, &["-d", "one"]);
        assert!(list(&ours).is_empty());
        assert!(identical(&ours, &theirs), "{options:?}");
        // Every cluster a snapshot kept is free again.
        let info = |path: &Path| {
            let out = qemu_img(&["check", "--output=json", p(path)]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            v["allocated-clusters"].as_u64()
        };
        assert_eq!(info(&ours), info(&theirs), "{options:?}");
        // And their space went back to the file system, as with qemu-img.
        let used = |path: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).expect("metadata").blocks() * 512
        };
        assert!(
            used(&ours).abs_diff(used(&theirs)) <= 64 << 10,
            "{options:?}: {} bytes used, qemu-img's image {}",
            used(&ours),
            used(&theirs)
        );
    }
}

#[test]
fn refusals_and_messages_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), &["4M"]);
    both(&ours, &theirs, &["-c", "one"]);
    for args in [
        &["-a", "missing"][..],
        &["-d", "missing"][..],
        &["-d", "1"][..],
        &["-l", "-c", "x"][..],
        &["-c", "x", "-d", "y"][..],
        &["-U", "-c", "x"][..],
        &[][..],
    ] {
        both(&ours, &theirs, args);
    }
    assert_check_clean(&ours);
    assert_eq!(undated(&list(&ours)), undated(&list(&theirs)));

    // Refcounts too narrow for one more reference: refused, as by
    // qemu-img, but before anything changes (qemu-img leaks the new L1
    // table). Two-bit refcounts take the active disk and two snapshots.
    for (bits, allowed) in [("1", 0), ("2", 2)] {
        let (ours, theirs) = pair(
            dir.path(),
            &[
                "-o",
                &format!("cluster_size=4096,refcount_bits={bits}"),
                "4M",
            ],
        );
        qemu_io(&ours, &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
        std::fs::copy(&ours, &theirs).expect("copy");
        for n in 0..allowed {
            both(&ours, &theirs, &["-c", &format!("s{n}")]);
        }
        let before = std::fs::read(&ours).expect("read");
        both(&ours, &theirs, &["-c", "one too many"]);
        assert!(
            std::fs::read(&ours).expect("read") == before,
            "{bits} bits: the image changed"
        );
        assert_check_clean(&ours);
    }

    // An external data file: no internal snapshots, as QEMU refuses them.
    let data = dir.path().join("data.raw");
    let (ours, theirs) = pair(
        dir.path(),
        &["-o", &format!("data_file={}", p(&data)), "4M"],
    );
    for args in [
        &["-c", "x"][..],
        &["-a", "x"][..],
        &["-d", "x"][..],
        &["-l"][..],
    ] {
        both(&ours, &theirs, args);
    }
}

#[test]
fn applying_a_snapshot_of_another_disk_size_resizes_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), &["4M"]);
    for (path, tool) in [(&ours, "qcow"), (&theirs, "qemu-img")] {
        let run = |args: &[&str]| {
            let out = if tool == "qcow" {
                qcow(args)
            } else {
                qemu_img(args)
            };
            assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
        };
        qemu_io(path, &["write -P 1 0 4M"]);
        run(&["snapshot", "-c", "small", p(path)]);
        run(&["resize", p(path), "64M"]);
        qemu_io(path, &["write -P 2 60M 1M"]);
        run(&["snapshot", "-c", "large", p(path)]);
        run(&["resize", "--shrink", p(path), "2M"]);
        run(&["snapshot", "-a", "small", p(path)]);
        assert_check_clean(path);
    }
    assert!(identical(&ours, &theirs));
    for (ours_name, theirs_path) in [("large", &theirs), ("small", &theirs)] {
        assert!(snapshot_raw(&ours, ours_name) == snapshot_raw(theirs_path, ours_name));
    }
    both(&ours, &theirs, &["-a", "large"]);
    assert!(identical(&ours, &theirs));
    assert_check_clean(&ours);
}

#[test]
fn snapshots_cross_between_qemu_img_and_qcow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("mixed.qcow2");
    create(&image, &["8M"]);
    let step = |tool: &str, args: &[&str]| {
        let mut all = vec!["snapshot"];
        all.extend(args);
        all.push(p(&image));
        let out = if tool == "qcow" {
            qcow(&all)
        } else {
            qemu_img(&all)
        };
        assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
        assert_check_clean(&image);
    };
    qemu_io(&image, &["write -P 1 0 2M"]);
    step("qemu-img", &["-c", "a"]);
    qemu_io(&image, &["write -P 2 1M 2M"]);
    step("qcow", &["-c", "b"]);
    qemu_io(&image, &["write -P 3 0 512k"]);
    let a = snapshot_raw(&image, "a");
    let b = snapshot_raw(&image, "b");
    step("qcow", &["-a", "a"]);
    assert!(snapshot_raw(&image, "a") == a);
    step("qemu-img", &["-a", "b"]);
    let current = dir.path().join("current.raw");
    let out = qemu_img(&["convert", "-O", "raw", p(&image), p(&current)]);
    assert!(out.status.success());
    assert!(std::fs::read(&current).expect("read") == b);
    step("qcow", &["-d", "a"]);
    step("qemu-img", &["-c", "c"]);
    step("qcow", &["-d", "b"]);
    step("qemu-img", &["-d", "c"]);
    assert!(list(&image).is_empty());
    let out = qemu_img(&["convert", "-O", "raw", p(&image), p(&current)]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(&current).expect("read"),
        b,
        "the disk changed"
    );
}

#[test]
fn resizing_an_image_with_snapshots_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for compat in ["0.10", "1.1"] {
        let (ours, theirs) = pair(dir.path(), &["-o", &format!("compat={compat}"), "4M"]);
        for path in [&ours, &theirs] {
            qemu_io(path, &["write -P 1 0 4M"]);
        }
        both(&ours, &theirs, &["-c", "s"]);
        for args in [
            &["8M"][..],
            &["--shrink", "2M"][..],
            &["--preallocation=full", "--shrink", "1M"][..],
        ] {
            let run = |tool: &str, path: &Path| {
                let mut all = vec!["resize"];
                all.extend(&args[..args.len() - 1]);
                all.push(p(path));
                all.push(args[args.len() - 1]);
                if tool == "qcow" {
                    qcow(&all)
                } else {
                    qemu_img(&all)
                }
            };
            let a = run("qcow", &ours);
            let b = run("qemu-img", &theirs);
            assert_eq!(
                a.status.code(),
                b.status.code(),
                "{compat} {args:?}: {}",
                stderr(&a)
            );
            assert_eq!(
                stderr(&a).replacen("qcow", "qemu-img", 1),
                stderr(&b),
                "{compat} {args:?}"
            );
            assert_eq!(stdout(&a), stdout(&b));
            assert_check_clean(&ours);
            assert!(identical(&ours, &theirs), "{compat} {args:?}");
            assert!(
                snapshot_raw(&ours, "s") == snapshot_raw(&theirs, "s"),
                "{compat} {args:?}: the snapshot reads otherwise"
            );
        }
    }
}

/// QEMU's iotest 112: a data cluster whose 64-bit refcount is at its
/// maximum cannot take a snapshot's reference. The snapshot is refused in
/// qemu-img's words before anything changes: no corruption, no new leak.
#[test]
fn a_snapshot_a_full_64_bit_refcount_cannot_take_is_refused_before_any_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut outcomes = Vec::new();
    for tool in ["qcow", "qemu-img"] {
        let path = dir.path().join(format!("{tool}.qcow2"));
        create(&path, &["-o", "refcount_bits=64", "64M"]);
        qemu_io(&path, &["write 0 512"]);
        let mut bytes = std::fs::read(&path).expect("read");
        // The data cluster's refcount (cluster 5, block at 0x20000) at its
        // maximum, and OFLAG_COPIED cleared in its L2 entry.
        bytes[0x20028..0x20030].fill(0xff);
        bytes[0x40000..0x40008].copy_from_slice(&0x5_0000u64.to_be_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let out = if tool == "qcow" {
            qcow(&["snapshot", "-c", "foo", p(&path)])
        } else {
            qemu_img(&["snapshot", "-c", "foo", p(&path)])
        };
        let check = qemu_img(&["check", "--output=json", p(&path)]);
        let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("json");
        outcomes.push((
            out.status.code(),
            stderr(&out)
                .replace(p(&path), "IMAGE")
                .replacen("qcow", "qemu-img", 1),
            // qemu-img leaves out counts of zero.
            report["corruptions"].as_u64().unwrap_or(0),
            report["leaks"].as_u64().unwrap_or(0),
        ));
    }
    let (ours, theirs) = (&outcomes[0], &outcomes[1]);
    assert_eq!(
        (&ours.0, &ours.1),
        (&theirs.0, &theirs.1),
        "exit and message"
    );
    assert_eq!(ours.2, 0, "qcow's image has corruptions");
    // qemu-img leaks the L1 table it copied; qcow copies nothing.
    assert_eq!(ours.3, 1, "the one leak is the poked refcount");
}

/// QEMU's iotest 061, "zero expansion on backed inactive clusters": a
/// downgrade to version 2 gives a snapshot's zero cluster a data cluster
/// (its entry flagged as owned alone); applying the snapshot shares it, and
/// the flag must go. Every step beside qemu-img: check clean, same disk.
#[test]
fn applying_a_snapshot_after_a_downgrade_leaves_exact_copied_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut disks = Vec::new();
    for tool in ["qcow", "qemu-img"] {
        let run = |args: &[&str]| {
            let out = if tool == "qcow" {
                qcow(args)
            } else {
                qemu_img(args)
            };
            assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
        };
        let base = dir.path().join(format!("{tool}-base.qcow2"));
        let top = dir.path().join(format!("{tool}.qcow2"));
        create(&base, &["64M"]);
        qemu_io(&base, &["write -P 0x2a 0 128k"]);
        let backing = base.file_name().and_then(|n| n.to_str()).expect("name");
        create(&top, &["-b", backing, "-F", "qcow2", "64M"]);
        qemu_io(&top, &["write -z 0 64k"]);
        run(&["snapshot", "-c", "foo", p(&top)]);
        qemu_io(&top, &["write -P 0x42 0 128k"]);
        run(&["amend", "-o", "compat=0.10", p(&top)]);
        assert_check_clean(&top);
        run(&["snapshot", "-a", "foo", p(&top)]);
        assert_check_clean(&top);
        disks.push(top);
    }
    assert!(identical(&disks[0], &disks[1]));
}

/// iotest 080: a snapshot entry whose L1 table is misaligned or too large
/// is found when that snapshot is used, as QEMU finds it: the image opens,
/// its active layer reads and takes writes, and only the operations on that
/// snapshot are refused, before anything changes and without marking the
/// image corrupt.
#[test]
fn a_damaged_snapshot_entry_spoils_only_that_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first entry's L1 offset (misaligned) or L1 size (too large).
    for (within, bytes) in [
        (0usize, &[0, 0, 0, 0, 0, 0x40, 2, 0][..]),
        (8, &[0x10, 0, 0, 0][..]),
    ] {
        let img = dir.path().join("damaged.qcow2");
        create(&img, &["64M"]);
        qemu_io(&img, &["write -P 7 0 512", "write -P 9 1M 64k"]);
        assert!(
            qemu_img(&["snapshot", "-c", "test", p(&img)])
                .status
                .success()
        );
        let mut raw = std::fs::read(&img).expect("read");
        let table = u64::from_be_bytes(raw[64..72].try_into().expect("8 bytes"));
        let field = table as usize + within;
        raw[field..field + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&img, &raw).expect("write");
        let what = format!("field {field:#x}");

        // Reads as qemu-img reads it.
        let (ours, theirs) = (dir.path().join("o.raw"), dir.path().join("t.raw"));
        assert!(
            qcow(&["convert", "-O", "raw", p(&img), p(&ours)])
                .status
                .success(),
            "{what}"
        );
        assert!(
            qemu_img(&["convert", "-O", "raw", p(&img), p(&theirs)])
                .status
                .success()
        );
        assert!(
            std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
            "{what}"
        );
        let list = |tool: fn(&[&str]) -> std::process::Output| {
            undated(&stdout(&tool(&["snapshot", "-l", p(&img)])))
        };
        assert_eq!(list(qcow), list(qemu_img), "{what}");

        // Operations on the damaged snapshot: refused as qemu-img refuses
        // them, the file untouched.
        for args in [
            vec!["snapshot", "-d", "test", p(&img)],
            vec!["snapshot", "-a", "test", p(&img)],
            vec!["amend", "-o", "compat=0.10", p(&img)],
            vec!["convert", "-l", "test", "-O", "raw", p(&img), p(&ours)],
        ] {
            let before = std::fs::read(&img).expect("read");
            let a = qcow(&args);
            assert_eq!(a.status.code(), Some(1), "{what} {args:?}: {a:?}");
            assert!(
                std::fs::read(&img).expect("read") == before,
                "{what} {args:?}: the image changed"
            );
            // qemu-img's words, on a copy (it may change the image first).
            let copy = dir.path().join("copy.qcow2");
            std::fs::write(&copy, &before).expect("copy");
            let theirs_args: Vec<&str> = args
                .iter()
                .map(|&a| if a == p(&img) { p(&copy) } else { a })
                .collect();
            let b = qemu_img(&theirs_args);
            assert_eq!(b.status.code(), Some(1), "{what} {args:?}");
            assert_eq!(
                stderr(&a).replace("qcow: ", "qemu-img: "),
                stderr(&b).replace(p(&copy), p(&img)),
                "{what} {args:?}"
            );
        }

        // The active layer takes writes; qemu-img check then finds only the
        // damaged entry, as after qemu-img's own write.
        let copy = dir.path().join("theirs.qcow2");
        std::fs::copy(&img, &copy).expect("copy");
        assert!(qcow(&["resize", p(&img), "+1M"]).status.success(), "{what}");
        assert!(qemu_img(&["resize", p(&copy), "+1M"]).status.success());
        let errors = |path: &Path| {
            let out = qemu_img(&["check", p(path)]);
            (
                out.status.code(),
                stderr(&out)
                    .lines()
                    .filter(|l| l.starts_with("ERROR"))
                    .count(),
            )
        };
        assert_eq!(errors(&img), errors(&copy), "{what}");
        assert_eq!(errors(&img).1, 1, "{what}");
    }
}

/// Applying and deleting a snapshot leave qemu-img's file byte for byte:
/// the snapshot table written to its unpadded length, the applied
/// snapshot's L1 flags rewritten, freed clusters given back (the snapshots
/// themselves made by qemu-img, whose dates differ from run to run).
#[test]
fn apply_and_delete_leave_qemu_img_s_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for options in [
        vec!["64M"],
        vec!["-o", "cluster_size=4k", "64M"],
        vec!["-o", "compat=0.10", "64M"],
    ] {
        let base = dir.path().join("base.qcow2");
        let _ = std::fs::remove_file(&base);
        create(&base, &options);
        qemu_io(&base, &["write -P 1 0 4M"]);
        assert!(
            qemu_img(&["snapshot", "-c", "s1", p(&base)])
                .status
                .success()
        );
        qemu_io(&base, &["write -P 2 0 2M"]);
        assert!(
            qemu_img(&["snapshot", "-c", "s2", p(&base)])
                .status
                .success()
        );
        qemu_io(&base, &["write -P 3 1M 2M"]);
        for op in [["-d", "s1"], ["-a", "s2"], ["-a", "s1"], ["-d", "s2"]] {
            let (ours, theirs) = (
                dir.path().join("ours.qcow2"),
                dir.path().join("theirs.qcow2"),
            );
            std::fs::copy(&base, &ours).expect("copy");
            std::fs::copy(&base, &theirs).expect("copy");
            let out = both(&ours, &theirs, &op);
            assert!(out.is_empty(), "{out}");
            assert_check_clean(&ours);
            assert!(
                std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
                "{options:?} {op:?}: the files differ"
            );
        }
    }
}
