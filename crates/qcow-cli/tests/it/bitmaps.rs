//! `qcow bitmap` beside `qemu-img bitmap` on copies of the same images:
//! each operation's exit code and message, the bitmaps `qemu-img info`
//! lists and the dirty ranges qemu-img reads through qemu-nbd after every
//! step, `qemu-img check` clean; bitmaps made by one tool changed by the
//! other; a bitmap found in use refused as QEMU refuses it.

use std::path::{Path, PathBuf};

use super::{assert_check_clean, p, qcow, qemu_img, qemu_io, stderr, stdout};

fn create(path: &Path, options: &str) {
    let out = qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, p(path), "8M"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `bitmap ARGS` by both tools on their copies, `FILE` standing for each
/// one's image; exit codes and messages must agree.
fn both(ours: &Path, theirs: &Path, args: &[&str]) -> Option<i32> {
    let with = |file: &Path| -> Vec<String> {
        std::iter::once("bitmap".to_owned())
            .chain(args.iter().map(|a| {
                if *a == "FILE" {
                    p(file).to_owned()
                } else {
                    (*a).to_owned()
                }
            }))
            .collect()
    };
    let a_args = with(ours);
    let b_args = with(theirs);
    let a = qcow(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b = qemu_img(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(a.status.code(), b.status.code(), "{args:?}: {}", stderr(&a));
    let ours_said = stderr(&a)
        .replace(p(ours), "FILE")
        .replace("qcow: ", "qemu-img: ")
        .replace("Try 'qcow ", "Try 'qemu-img ")
        .replace("qcow bitmap:", "qemu-img bitmap:");
    assert_eq!(
        without_node(&ours_said),
        without_node(&stderr(&b).replace(p(theirs), "FILE")),
        "{args:?}"
    );
    assert!(a.stdout.is_empty() && b.stdout.is_empty());
    a.status.code()
}

/// A message with the node QEMU names (`in '#block123'`, the image for
/// qcow) left out.
fn without_node(message: &str) -> String {
    match message.find("persistent in '") {
        Some(at) => {
            let rest = &message[at + "persistent in '".len()..];
            let end = rest.find('\'').map_or(rest.len(), |e| e + 1);
            format!("{}persistent{}", &message[..at], &rest[end..])
        }
        None => message.to_owned(),
    }
}

/// `qemu-img info`'s bitmaps of an image.
fn listed(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "-U", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// The dirty ranges of every bitmap, as qemu-img reads them through
/// qemu-nbd (`x-dirty-bitmap`).
fn dirty(path: &Path) -> Vec<(String, String)> {
    let names: Vec<String> = listed(path)
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    names
        .into_iter()
        .filter(|name| !listed(path).as_array().is_some_and(|a| a.iter().any(|b| b["name"] == **name && b["flags"].as_array().is_some_and(|f| f.iter().any(|f| f == "in-use")))))
        .map(|name| {
            let dir = tempfile::tempdir().expect("tempdir");
            let socket = dir.path().join("s");
            let mut child = std::process::Command::new("qemu-nbd")
                .args(["-r", "-f", "qcow2", "-B", &name, "-k", p(&socket), p(path)])
                .spawn()
                .expect("qemu-nbd is required");
            for _ in 0..200 {
                if socket.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let out = qemu_img(&[
                "map",
                "--output=json",
                "--image-opts",
                &format!(
                    "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
                    p(&socket)
                ),
            ]);
            let _ = child.kill();
            let _ = child.wait();
            (name, stdout(&out))
        })
        .collect()
}

fn pair(dir: &Path, options: &str) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    create(&ours, options);
    std::fs::copy(&ours, &theirs).expect("copy");
    (ours, theirs)
}

#[test]
fn bitmap_operations_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.qcow2");
    create(&source, "cluster_size=65536");
    let out = qemu_img(&["bitmap", "--add", "-g", "4096", p(&source), "src"]);
    assert!(out.status.success());
    qemu_io(&source, &["write 3M 8k"]);
    for options in ["cluster_size=65536", "cluster_size=4096,refcount_bits=8"] {
        let (ours, theirs) = pair(dir.path(), options);
        let source_arg = p(&source).to_owned();
        let steps: Vec<Vec<&str>> = vec![
            vec!["--add", "FILE", "b0"],
            vec!["--add", "-g", "4096", "FILE", "b1"],
            vec!["--add", "FILE", "b0"],
            vec!["WRITE"],
            vec!["--add", "--disable", "FILE", "frozen"],
            vec!["WRITE"],
            vec!["--disable", "FILE", "b0"],
            vec!["WRITE"],
            vec!["--enable", "--merge", "b1", "FILE", "b0"],
            vec![
                "--merge",
                "src",
                "-b",
                &source_arg,
                "-F",
                "qcow2",
                "FILE",
                "frozen",
            ],
            vec!["--merge", "nothing", "-b", &source_arg, "FILE", "b0"],
            vec!["--clear", "FILE", "b1"],
            vec!["WRITE"],
            vec!["--remove", "FILE", "b1"],
            vec!["--remove", "FILE", "b1"],
            vec!["--enable", "FILE", "missing"],
            vec!["--add", "-g", "256", "FILE", "b3"],
            vec!["--add", "-g", "4G", "FILE", "b3"],
            vec!["--add", "-g", "3000", "FILE", "b3"],
            vec!["--add", "-g", "1x", "FILE", "b3"],
            vec!["--add", "FILE", ""],
            vec!["-g", "4096", "--remove", "FILE", "b0"],
            vec!["-F", "qcow2", "--add", "FILE", "b3"],
            vec!["-b", &source_arg, "--add", "FILE", "b3"],
            vec!["FILE", "b0"],
            vec!["--add", "FILE"],
            vec!["--add", "--add", "FILE", "b4"],
            vec!["--remove", "--add", "-g", "512", "FILE", "b0"],
            vec!["WRITE"],
        ];
        let mut writes = 0;
        for step in &steps {
            if step == &["WRITE"] {
                writes += 1;
                let at = format!("{}k", writes * 700);
                for path in [&ours, &theirs] {
                    qemu_io(
                        path,
                        &[&format!("write -P {writes} {at} 100k"), "discard 6M 64k"],
                    );
                }
            } else {
                both(&ours, &theirs, step);
            }
            assert_check_clean(&ours);
            assert_eq!(listed(&ours), listed(&theirs), "{options} after {step:?}");
        }
        assert_eq!(dirty(&ours), dirty(&theirs), "{options}");
        assert!(!dirty(&ours).is_empty());
    }
}

#[test]
fn bitmaps_qemu_refuses_are_refused_in_its_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = pair(dir.path(), "compat=0.10");
    both(&ours, &theirs, &["--add", "FILE", "b"]);

    // A bitmap found in use: kept, refused for everything but removal.
    let (ours, theirs) = pair(dir.path(), "compat=1.1");
    for path in [&ours, &theirs] {
        let out = qemu_img(&["bitmap", "--add", p(path), "bad"]);
        assert!(out.status.success());
        let out = qemu_img(&["bitmap", "--add", p(path), "good"]);
        assert!(out.status.success());
        mark_first_bitmap_in_use(path);
    }
    for step in [
        &["--clear", "FILE", "bad"][..],
        &["--enable", "FILE", "bad"][..],
        &["--merge", "bad", "FILE", "good"][..],
    ] {
        both(&ours, &theirs, step);
    }
    let a = qcow(&["resize", p(&ours), "16M"]);
    let b = qemu_img(&["resize", p(&theirs), "16M"]);
    assert_eq!(a.status.code(), b.status.code());
    assert_eq!(stderr(&a).replacen("qcow", "qemu-img", 1), stderr(&b));
    // Writes go on; the bitmap in use stays as it was.
    for path in [&ours, &theirs] {
        let out = qcow(&[
            "bench",
            "-w",
            "-c",
            "4",
            "-s",
            "4k",
            "-o",
            "1M",
            "-t",
            "none",
            p(path),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(listed(&ours), listed(&theirs));
    assert_eq!(dirty(&ours), dirty(&theirs));
    both(&ours, &theirs, &["--remove", "FILE", "bad"]);
    assert_check_clean(&ours);
    assert_eq!(listed(&ours), listed(&theirs));
}

/// A big-endian field of an image's bytes.
fn be(b: &[u8], at: usize, len: usize) -> usize {
    b[at..at + len]
        .iter()
        .fold(0, |v, &x| v << 8 | usize::from(x))
}

/// Where the bitmap directory of an image's bytes starts.
fn bitmap_directory(b: &[u8]) -> usize {
    let mut at = be(b, 100, 4);
    loop {
        let (kind, len) = (be(b, at, 4), be(b, at + 4, 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be(b, at + 8 + 16, 8);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Sets the in-use flag of the first bitmap (as a crash of its writer
/// leaves it).
fn mark_first_bitmap_in_use(path: &Path) {
    let mut b = std::fs::read(path).expect("read");
    let directory = bitmap_directory(&b);
    b[directory + 15] |= 1;
    std::fs::write(path, &b).expect("write");
}

#[test]
fn convert_copies_bitmaps_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.qcow2");
    create(&source, "cluster_size=65536");
    for args in [
        &["--add", "FILE", "a"][..],
        &["--add", "-g", "4096", "--disable", "FILE", "b"][..],
    ] {
        let args: Vec<&str> = std::iter::once("bitmap")
            .chain(
                args.iter()
                    .map(|a| if *a == "FILE" { p(&source) } else { a }),
            )
            .collect();
        assert!(qemu_img(&args).status.success());
    }
    qemu_io(&source, &["write -P 1 1M 100k", "write -z 3M 64k"]);
    let enable = qemu_img(&["bitmap", "--enable", p(&source), "b"]);
    assert!(enable.status.success());
    qemu_io(&source, &["write -P 2 5M 10k"]);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let convert = |extra: &[&str], out: &Path, tool: &str| {
        let mut args = vec!["convert"];
        args.extend(extra);
        args.extend([p(&source), p(out)]);
        if tool == "qcow" {
            qcow(&args)
        } else {
            qemu_img(&args)
        }
    };
    for extra in [
        &["--bitmaps", "-O", "qcow2"][..],
        &["--bitmaps", "-O", "qcow2", "-c"][..],
        &["--bitmaps", "-O", "raw"][..],
        &["--skip-broken-bitmaps", "-O", "qcow2"][..],
    ] {
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        let a = convert(extra, &ours, "qcow");
        let b = convert(extra, &theirs, "qemu-img");
        assert_eq!(
            a.status.code(),
            b.status.code(),
            "{extra:?}: {}",
            stderr(&a)
        );
        assert_eq!(
            stderr(&a).replacen("qcow", "qemu-img", 1),
            stderr(&b),
            "{extra:?}"
        );
        if a.status.success() {
            assert_check_clean(&ours);
            assert_eq!(listed(&ours), listed(&theirs), "{extra:?}");
            assert_eq!(dirty(&ours), dirty(&theirs), "{extra:?}");
            assert_eq!(dirty(&ours).len(), 2);
        }
    }
    // A bitmap found in use stops the copy, or is left out.
    mark_first_bitmap_in_use(&source);
    for extra in [
        &["--bitmaps", "-O", "qcow2"][..],
        &["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"][..],
    ] {
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        let a = convert(extra, &ours, "qcow");
        let b = convert(extra, &theirs, "qemu-img");
        assert_eq!(
            a.status.code(),
            b.status.code(),
            "{extra:?}: {}",
            stderr(&a)
        );
        assert_eq!(
            stderr(&a).replacen("qcow", "qemu-img", 1),
            stderr(&b),
            "{extra:?}"
        );
        if a.status.success() {
            assert_eq!(listed(&ours), listed(&theirs), "{extra:?}");
            assert_eq!(dirty(&ours), dirty(&theirs), "{extra:?}");
        }
    }
}

#[test]
fn check_counts_bitmap_clusters_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, _) = pair(dir.path(), "cluster_size=4096");
    for args in [&["--add", "-g", "512"][..], &["--add", "--disable"][..]] {
        let name = if args.len() == 3 { "fine" } else { "frozen" };
        let mut all = vec!["bitmap"];
        all.extend(args);
        all.extend([p(&ours), name]);
        let out = qcow(&all);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = qcow(&[
        "bench",
        "-w",
        "-c",
        "64",
        "-s",
        "4k",
        "-S",
        "64k",
        "-t",
        "none",
        p(&ours),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = qcow(&["check", "--output=json", p(&ours)]);
    let b = qemu_img(&["check", "--output=json", p(&ours)]);
    assert_eq!(stdout(&a), stdout(&b));
    assert_eq!(a.status.code(), Some(0));
    // A leaked bitmap data cluster (its table entry cleared) is found
    // and repaired as qemu-img finds and repairs it.
    let copy = dir.path().join("leak.qcow2");
    std::fs::copy(&ours, &copy).expect("copy");
    let theirs = dir.path().join("leak2.qcow2");
    clear_first_bitmap_table_entry(&copy);
    std::fs::copy(&copy, &theirs).expect("copy");
    for repair in [&[][..], &["-r", "leaks"][..]] {
        let mut a_args = vec!["check"];
        a_args.extend(repair);
        let mut b_args = a_args.clone();
        a_args.push(p(&copy));
        b_args.push(p(&theirs));
        let a = qcow(&a_args);
        let b = qemu_img(&b_args);
        assert_eq!(a.status.code(), b.status.code(), "{repair:?}");
        assert_eq!(stdout(&a), stdout(&b), "{repair:?}");
    }
    assert_check_clean(&copy);
}

/// Clears the first data cluster entry of the first bitmap's table (its
/// cluster leaks).
fn clear_first_bitmap_table_entry(path: &Path) {
    let mut b = std::fs::read(path).expect("read");
    let directory = bitmap_directory(&b);
    let table = be(&b, directory, 8);
    let size = be(&b, directory + 8, 4);
    let entry = (0..size)
        .map(|i| table + 8 * i)
        .find(|&e| be(&b, e, 8) != 0)
        .expect("a data cluster");
    b[entry..entry + 8].fill(0);
    std::fs::write(path, &b).expect("write");
}

#[test]
fn bitmaps_cross_between_qcow_and_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("mixed.qcow2");
    create(&image, "cluster_size=65536");
    let step = |tool: &str, args: &[&str]| {
        let mut all = vec!["bitmap"];
        all.extend(
            args.iter()
                .map(|a| if *a == "FILE" { p(&image) } else { a }),
        );
        let out = if tool == "qcow" {
            qcow(&all)
        } else {
            qemu_img(&all)
        };
        assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
        assert_check_clean(&image);
    };
    // qcow makes a bitmap; QEMU records into it, merges and disables it.
    step("qcow", &["--add", "-g", "4096", "FILE", "ours"]);
    qemu_io(&image, &["write -P 1 1M 64k"]);
    step("qemu-img", &["--add", "FILE", "theirs"]);
    step("qemu-img", &["--merge", "ours", "FILE", "theirs"]);
    step("qemu-img", &["--disable", "FILE", "ours"]);
    // qcow writes: only the enabled bitmap, made by QEMU, records it.
    let out = qcow(&[
        "bench",
        "-w",
        "-c",
        "1",
        "-s",
        "4k",
        "-o",
        "6M",
        "-t",
        "none",
        p(&image),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ranges = dirty(&image);
    assert_eq!(ranges.len(), 2);
    let holes = |map: &str| {
        map.lines()
            .filter(|l| l.contains("\"data\": false"))
            .count()
    };
    assert_eq!(holes(&ranges[0].1), 1, "ours: {}", ranges[0].1);
    assert_eq!(holes(&ranges[1].1), 2, "theirs: {}", ranges[1].1);
    step("qcow", &["--clear", "--enable", "FILE", "ours"]);
    qemu_io(&image, &["write -P 2 7M 4k"]);
    step("qemu-img", &["--remove", "FILE", "theirs"]);
    let ranges = dirty(&image);
    assert_eq!(ranges.len(), 1);
    assert_eq!(holes(&ranges[0].1), 1);
    assert!(ranges[0].1.contains("\"start\": 7340032"));
    step("qcow", &["--remove", "FILE", "ours"]);
    assert!(listed(&image).is_null());
}

/// QEMU loads every bitmap of the image (and refuses an image whose
/// bitmaps it cannot load): a clear it does through qemu-img.
fn qemu_loads_bitmaps(path: &Path, name: &str) {
    let out = qemu_img(&["bitmap", "--clear", p(path), name]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn header_rewrites_and_refcount_changes_keep_the_bitmaps() {
    // Reproducers from review: a safe rebase stored the bitmaps and then
    // wrote a header naming the freed old directory; a refcount width
    // change dropped the bitmaps before a resize in the same amend.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let other = dir.path().join("other.qcow2");
    let image = dir.path().join("img.qcow2");
    // The two backing files differ: the rebase writes into the image.
    for (path, pattern) in [(&base, "7"), (&other, "8")] {
        create(path, "cluster_size=65536");
        qemu_io(path, &[&format!("write -P {pattern} 0 4M")]);
    }
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&image),
    ]);
    assert!(out.status.success());
    assert!(
        qemu_img(&["bitmap", "--add", p(&image), "b"])
            .status
            .success()
    );
    qemu_io(&image, &["write -P 1 1M 64k"]);
    let out = qcow(&["rebase", "-b", "other.qcow2", "-F", "qcow2", p(&image)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_check_clean(&image);
    qemu_loads_bitmaps(&image, "b");
    assert!(listed(&image).to_string().contains("\"b\""));

    let resized = dir.path().join("resized.qcow2");
    create(&resized, "cluster_size=65536");
    assert!(
        qemu_img(&["bitmap", "--add", p(&resized), "b"])
            .status
            .success()
    );
    qemu_io(&resized, &["write -P 1 0 64k"]);
    let out = qcow(&["amend", "-o", "refcount_bits=32,size=1T", p(&resized)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_check_clean(&resized);
    qemu_loads_bitmaps(&resized, "b");
}

#[test]
fn a_bitmap_too_large_for_qemu_is_refused_before_anything_is_allocated() {
    // A 4 TiB disk with a bitmap of 1 MiB granularity, its granularity
    // then set to 512 bytes: 1 GiB of bits, over QEMU's 512 MiB limit.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "4T"]);
    assert!(out.status.success());
    assert!(
        qemu_img(&["bitmap", "--add", "-g", "1M", p(&path), "b"])
            .status
            .success()
    );
    let mut b = std::fs::read(&path).expect("read");
    let directory = bitmap_directory(&b);
    assert_eq!(b[directory + 17], 20);
    b[directory + 17] = 9;
    std::fs::write(&path, &b).expect("write");
    let started = std::time::Instant::now();
    let out = qcow(&["bench", "-w", "-c", "1", "-t", "none", p(&path)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("bitmap 'b'"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // And a new bitmap that would be as large is refused as QEMU refuses it.
    let fresh = dir.path().join("fresh.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&fresh), "4T"])
            .status
            .success()
    );
    let theirs = dir.path().join("fresh2.qcow2");
    std::fs::copy(&fresh, &theirs).expect("copy");
    let a = qcow(&["bitmap", "--add", "-g", "512", p(&fresh), "big"]);
    let b = qemu_img(&["bitmap", "--add", "-g", "512", p(&theirs), "big"]);
    assert_eq!(a.status.code(), b.status.code());
    assert_eq!(a.status.code(), Some(1));
    assert!(
        stderr(&a).contains("Too much space will be occupied by the bitmap"),
        "{}",
        stderr(&a)
    );
    assert!(
        stderr(&b).contains("Too much space will be occupied by the bitmap"),
        "{}",
        stderr(&b)
    );
}
