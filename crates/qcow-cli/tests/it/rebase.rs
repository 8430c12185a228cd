//! `qcow rebase` beside `qemu-img rebase` on the same chains: the guest's
//! view is kept (safe mode), the images are laid out as qemu-img lays them
//! out, the header names what qemu-img's names, and refusals change
//! nothing.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::{assert_check_clean, qcow, qemu_img, stdout};
use super::{p, qemu_io, stderr};

fn create(path: &Path, backing: Option<&str>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([p(path), size]);
    let out = qemu_img(&args);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// base <- mid <- top, each layer writing over the one below, with a
/// zeroed range in mid and another image, other, with different data.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let other = dir.join("other.qcow2");
    create(&base, None, "8M");
    qemu_io(&base, &["write -P 1 0 4M", "write -P 4 6M 64k"]);
    create(&mid, Some("base.qcow2"), "8M");
    qemu_io(&mid, &["write -P 2 1M 1M", "write -z 3M 64k"]);
    create(&top, Some("mid.qcow2"), "8M");
    qemu_io(&top, &["write -P 3 2M 512k"]);
    create(&other, None, "6M");
    qemu_io(&other, &["write -P 1 0 2M", "write -P 9 5M 1M"]);
    (base, mid, top, other)
}

fn raw_view(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("view.raw");
    let out = qemu_img(&["convert", "-U", "-O", "raw", p(path), p(&raw)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&raw).expect("raw");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn map(path: &Path) -> String {
    stdout(&qemu_img(&["map", "-U", "--output=json", p(path)]))
}

/// qemu-img info without what names the directory or counts the file's
/// blocks.
fn info(path: &Path) -> String {
    let dir = path.parent().expect("dir").display().to_string();
    stdout(&qemu_img(&["info", "-U", p(path)]))
        .replace(&dir, "DIR")
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("image:") && !l.starts_with("disk size") && !l.starts_with("filename")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn safe_rebases_keep_the_view_and_match_qemu_img() {
    for (label, args) in [
        ("onto the base", vec!["-b", "base.qcow2", "-F", "qcow2"]),
        (
            "onto another image",
            vec!["-b", "other.qcow2", "-F", "qcow2"],
        ),
        ("flattened", vec!["-b", ""]),
        ("compressed", vec!["-c", "-b", "other.qcow2", "-F", "qcow2"]),
    ] {
        let ours = tempfile::tempdir().expect("tempdir");
        let theirs = tempfile::tempdir().expect("tempdir");
        let (_, _, top, _) = chain(ours.path());
        let (_, _, their_top, _) = chain(theirs.path());
        let before = raw_view(&top);
        let a = qcow(&[&["rebase"], args.as_slice(), &[p(&top)]].concat());
        let b = qemu_img(&[&["rebase"], args.as_slice(), &[p(&their_top)]].concat());
        assert_eq!(a.status.code(), Some(0), "{label}: {}", stderr(&a));
        assert_eq!(b.status.code(), Some(0), "{label}: {}", stderr(&b));
        assert_eq!(
            (stdout(&a), stderr(&a)),
            (stdout(&b), stderr(&b)),
            "{label}"
        );
        assert!(
            raw_view(&top) == before,
            "{label}: the guest's view changed"
        );
        assert_check_clean(&top);
        assert_eq!(info(&top), info(&their_top), "{label}: headers differ");
        if !args.contains(&"-c") {
            assert_eq!(map(&top), map(&their_top), "{label}: laid out differently");
        }
    }
}

#[test]
fn unsafe_rebase_changes_the_header_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, top, _) = chain(dir.path());
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&top, &theirs).expect("copy");
    let a = qcow(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", p(&top)]);
    let b = qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&theirs),
    ]);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    assert_eq!(info(&top), info(&theirs));
    assert_eq!(map(&top), map(&theirs));
    assert_check_clean(&top);
    // The old backing file need not exist.
    std::fs::remove_file(dir.path().join("mid.qcow2")).expect("remove");
    let a = qcow(&["rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", p(&top)]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(info(&top).contains("backing file: other.qcow2"));
}

#[test]
fn relative_backing_names_resolve_from_the_image_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, top, _) = chain(dir.path());
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let moved = sub.join("top.qcow2");
    std::fs::rename(&top, &moved).expect("move");
    // The old backing name no longer resolves from sub/: unsafe mode fixes
    // it, then a safe rebase reads the chain through the new name.
    let a = qcow(&[
        "rebase",
        "-u",
        "-b",
        "../mid.qcow2",
        "-F",
        "qcow2",
        p(&moved),
    ]);
    assert!(a.status.success(), "{}", stderr(&a));
    let before = raw_view(&moved);
    let a = qcow(&["rebase", "-b", "../base.qcow2", "-F", "qcow2", p(&moved)]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(raw_view(&moved) == before);
    assert_check_clean(&moved);
}

#[test]
fn refused_rebases_change_nothing_and_exit_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, top, _) = chain(dir.path());
    let bytes = std::fs::read(&top).expect("read");
    for args in [
        vec![],
        vec!["-b", "base.qcow2"],
        vec!["-b", "base.qcow2", "-F", "nosuchformat"],
        vec!["-b", "missing.qcow2", "-F", "qcow2"],
    ] {
        let a = qcow(&[&["rebase"], args.as_slice(), &[p(&top)]].concat());
        let copy = dir.path().join("copy.qcow2");
        std::fs::write(&copy, &bytes).expect("copy");
        let b = qemu_img(&[&["rebase"], args.as_slice(), &[p(&copy)]].concat());
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {}", stderr(&a));
        assert_eq!(a.status.code(), Some(1), "{args:?}");
        assert!(
            std::fs::read(&top).expect("read") == bytes,
            "{args:?}: the image changed"
        );
        let _ = std::fs::remove_file(&copy);
    }
    // A backing name too long for a 512-byte header cluster.
    let small = dir.path().join("small.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&small),
        "8M",
    ]);
    assert!(out.status.success());
    let long = format!("{}.qcow2", "x".repeat(600));
    let small_bytes = std::fs::read(&small).expect("read");
    let a = qcow(&["rebase", "-u", "-b", &long, "-F", "qcow2", p(&small)]);
    assert_eq!(a.status.code(), Some(1));
    assert!(
        stderr(&a).contains("No space left in the file header"),
        "{}",
        stderr(&a)
    );
    assert!(std::fs::read(&small).expect("read") == small_bytes);
}

#[test]
fn zeros_past_the_old_chain_become_zero_clusters_as_in_qemu_img() {
    // iotest 252: rebasing an image without a backing file onto one that
    // has data where the image reads zeros writes zero clusters there.
    let strip = |path: &Path| {
        map(path)
            .split(", \"offset\"")
            .map(|part| {
                part.split_once('}')
                    .map_or(part.to_owned(), |(_, rest)| format!("}}{rest}"))
            })
            .collect::<String>()
    };
    let mut maps = Vec::new();
    for tool in [qcow as fn(&[&str]) -> Output, qemu_img] {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img.qcow2");
        let new = dir.path().join("new.qcow2");
        create(&img, None, "384k");
        create(&new, None, "384k");
        qemu_io(&img, &["write -P 0x22 0 128k", "write -P 0x11 128k 128k"]);
        qemu_io(
            &new,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x11 128k 64k",
                "write -P 0x11 256k 64k",
            ],
        );
        assert!(tool(&["rebase", "-b", "", p(&img)]).status.success());
        let out = tool(&["rebase", "-b", "new.qcow2", "-F", "qcow2", p(&img)]);
        assert!(out.status.success(), "{out:?}");
        assert_check_clean(&img);
        maps.push(strip(&img));
    }
    assert_eq!(maps[0], maps[1]);
}

/// QEMU's iotest 271: images with subclusters are rebased subcluster by
/// subcluster (only what differs is allocated), and with `-c` each cluster
/// holding a difference becomes one compressed cluster, its L2 table laid
/// out before it: the same map, host offsets included, as qemu-img's.
#[test]
fn images_with_subclusters_rebase_as_qemu_img_rebases_them() {
    for compress in [false, true] {
        let mut maps = Vec::new();
        for tool in ["qcow", "qemu-img"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (base, mid, top) = (
                dir.path().join("base.qcow2"),
                dir.path().join("mid.qcow2"),
                dir.path().join("top.qcow2"),
            );
            for (path, backing) in [
                (&base, None),
                (&mid, Some("base.qcow2")),
                (&top, Some("mid.qcow2")),
            ] {
                let mut args = vec![
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=1M,extended_l2=on",
                ];
                if let Some(b) = backing {
                    args.extend(["-b", b, "-F", "qcow2"]);
                }
                args.extend([p(path), "3M"]);
                // Made by the tool under test, as the iotest makes them.
                let out = if tool == "qcow" {
                    qcow(&args)
                } else {
                    qemu_img(&args)
                };
                assert!(out.status.success(), "{}", stderr(&out));
            }
            qemu_io(&base, &["write -P 0x11 1M 1M"]);
            qemu_io(&mid, &["write -P 0x22 992k 32k", "write -P 0x33 2M 32k"]);
            let before = raw_view(&top);
            let mut args = vec!["rebase"];
            if compress {
                args.push("-c");
            }
            args.extend(["-b", "base.qcow2", "-F", "qcow2", p(&top)]);
            let out = if tool == "qcow" {
                qcow(&args)
            } else {
                qemu_img(&args)
            };
            assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
            assert!(
                raw_view(&top) == before,
                "{tool} -c={compress}: the view changed"
            );
            assert_check_clean(&top);
            maps.push((map(&top), std::fs::read(&top).expect("top")));
        }
        assert_eq!(
            maps[0].0, maps[1].0,
            "-c={compress}: qcow's map, then qemu-img's"
        );
        // Tables and compressed data where qemu-img puts them.
        assert!(maps[0].1 == maps[1].1, "-c={compress}: the files differ");
    }
}

/// `rebase -c` on a format without compressed clusters is refused first,
/// in qemu-img's words (iotest 314).
#[test]
fn compression_on_a_raw_image_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut outcomes = Vec::new();
    for tool in ["qcow", "qemu-img"] {
        let path = dir.path().join(format!("{tool}.raw"));
        std::fs::write(&path, vec![7u8; 1 << 20]).expect("write");
        let args = ["rebase", "-c", "-f", "raw", "-b", "", p(&path)];
        let out = if tool == "qcow" {
            qcow(&args)
        } else {
            qemu_img(&args)
        };
        outcomes.push((
            out.status.code(),
            stderr(&out).replacen("qcow", "qemu-img", 1),
        ));
        assert!(
            std::fs::read(&path).expect("read") == vec![7u8; 1 << 20],
            "{tool}"
        );
    }
    assert_eq!(outcomes[0], outcomes[1]);
}

/// `rebase -u -F` with a format QEMU knows and qcow does not read (QEMU's
/// iotest 031 names `host_device`) writes it as qemu-img writes it; a name
/// QEMU does not know is refused in its words.
#[test]
fn unsafe_rebase_names_other_qemu_formats_as_qemu_img_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["host_device", "vmdk", "nonsense"] {
        let mut outcomes = Vec::new();
        for tool in ["qcow", "qemu-img"] {
            let path = dir.path().join(format!("{tool}.qcow2"));
            let _ = std::fs::remove_file(&path);
            create(&path, None, "1M");
            let args = [
                "rebase",
                "-u",
                "-b",
                "/some/backing/file/path",
                "-F",
                format,
                p(&path),
            ];
            let out = if tool == "qcow" {
                qcow(&args)
            } else {
                qemu_img(&args)
            };
            outcomes.push((
                out.status.code(),
                stderr(&out).replacen("qcow", "qemu-img", 1),
                std::fs::read(&path).expect("read"),
            ));
        }
        assert_eq!(outcomes[0].0, outcomes[1].0, "{format}");
        assert_eq!(outcomes[0].1, outcomes[1].1, "{format}");
        assert!(
            outcomes[0].2 == outcomes[1].2,
            "{format}: the images differ"
        );
    }
}
