//! Tests of the `qcow` binary: its output against qemu-img's on every
//! fixture, exit codes, and insta snapshots of `info`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod amend;
mod bench;
mod bitmaps;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dropin;
mod encryption;
mod encryption_guards;
mod guards;
mod halfway;
mod internal_snapshots;
mod locking;
mod map;
mod measure;
mod nbd_client;
mod rebase;
mod serve;
mod shrink;
mod tidy;
mod tls;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn run(program: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        // Snapshot dates print in local time; both tools must agree.
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("{program} could not be run (qemu-utils is required): {e}"))
}

fn qcow(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_qcow"), args, &testdata())
}

fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args, &testdata())
}

/// A path as the `&str` the command lines take.
fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Standard error as text.
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs qemu-io's `commands` on `path`, failing the test (and saying so)
/// if qemu-io is missing or a command fails.
fn qemu_io(path: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().expect("qemu-io is required");
    assert!(
        out.status.success(),
        "qemu-io {commands:?}: {}",
        stderr(&out)
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The fixtures' file names (images only).
fn fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(testdata())
        .expect("testdata")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2") || n.ends_with(".qcow") || n.ends_with(".img"))
        .collect();
    names.sort();
    assert!(names.len() >= 20, "fixtures are missing: {names:?}");
    names
}

fn encrypted(name: &str) -> bool {
    name == "luks.qcow2" || name == "aes.qcow2"
}

#[test]
fn info_matches_qemu_img_on_every_fixture() {
    for name in fixtures() {
        for output in ["json", "human"] {
            // Encrypted images too: info needs no password.
            let ours = qcow(&["info", "--output", output, &name]);
            let theirs = qemu_img(&["info", "--output", output, &name]);
            assert!(theirs.status.success(), "qemu-img info {name} failed");
            assert!(ours.status.success(), "qcow info {name}: {:?}", ours);
            assert_eq!(
                stdout(&ours),
                stdout(&theirs),
                "info --output {output} {name}"
            );
        }
    }
}

#[test]
fn info_backing_chain_lists_every_layer() {
    let ours = qcow(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        "chain-top.qcow2",
    ]);
    let theirs = qemu_img(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        "chain-top.qcow2",
    ]);
    assert!(ours.status.success());
    assert_eq!(stdout(&ours), stdout(&theirs));
}

#[test]
fn map_matches_qemu_img_on_every_fixture() {
    // Encrypted images fail in both without their password.
    for name in fixtures() {
        for output in ["json", "human"] {
            let ours = qcow(&["map", "--output", output, &name]);
            let theirs = qemu_img(&["map", "--output", output, &name]);
            assert_eq!(
                ours.status.success(),
                theirs.status.success(),
                "map --output {output} {name}: exit status"
            );
            assert_eq!(
                stdout(&ours),
                stdout(&theirs),
                "map --output {output} {name}"
            );
        }
    }
}

#[test]
fn convert_to_raw_matches_qemu_img_and_is_sparse() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in fixtures() {
        if encrypted(&name) {
            continue;
        }
        let ours = dir.path().join("ours.raw");
        let theirs = dir.path().join("theirs.raw");
        let o = qcow(&["convert", "-O", "raw", &name, ours.to_str().expect("path")]);
        assert!(o.status.success(), "convert {name}: {o:?}");
        let t = qemu_img(&[
            "convert",
            "-O",
            "raw",
            &name,
            theirs.to_str().expect("path"),
        ]);
        assert!(t.status.success());
        let (a, b) = (
            std::fs::read(&ours).expect("ours"),
            std::fs::read(&theirs).expect("theirs"),
        );
        assert!(a == b, "convert {name}: output differs from qemu-img's");
        // Zero and unallocated ranges stay holes: no more blocks than qemu-img.
        let (ma, mb) = (
            std::fs::metadata(&ours).expect("m"),
            std::fs::metadata(&theirs).expect("m"),
        );
        assert!(
            ma.blocks() <= mb.blocks() + 8,
            "convert {name}: {} blocks, qemu-img {}",
            ma.blocks(),
            mb.blocks()
        );
    }
}

#[test]
fn convert_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    for snap in ["first", "second"] {
        let ours = dir.path().join("ours.raw");
        let theirs = dir.path().join("theirs.raw");
        let l = format!("snapshot.name={snap}");
        let o = qcow(&[
            "convert",
            "-l",
            &l,
            "-O",
            "raw",
            "snapshots.qcow2",
            ours.to_str().expect("p"),
        ]);
        assert!(o.status.success(), "{o:?}");
        let t = qemu_img(&[
            "convert",
            "-l",
            &l,
            "-O",
            "raw",
            "snapshots.qcow2",
            theirs.to_str().expect("p"),
        ]);
        assert!(t.status.success());
        assert!(
            std::fs::read(&ours).ok() == std::fs::read(&theirs).ok(),
            "snapshot {snap}"
        );
    }
}

#[test]
fn compare_messages_and_exit_codes_follow_qemu_img() {
    let cases: &[&[&str]] = &[
        &["compare", "sample.qcow2", "sample.qcow2"],
        &["compare", "v3-64k.qcow2", "v2-64k.qcow2"],
        &["compare", "zlib.qcow2", "zstd.qcow2"],
        &["compare", "chain-mid.qcow2", "chain-top.qcow2"],
        &["compare", "-s", "chain-mid.qcow2", "chain-top.qcow2"],
        &["compare", "chain-base.raw", "chain-mid.qcow2"],
        &["compare", "-s", "v3-64k.qcow2", "v3-64k.qcow2"],
    ];
    for args in cases {
        let ours = qcow(args);
        let theirs = qemu_img(args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
    }
    let missing = qcow(&["compare", "sample.qcow2", "no-such-file"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn errors_are_one_line_and_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("bad.qcow2");
    let mut bytes = std::fs::read(testdata().join("sample.qcow2")).expect("sample");
    let at = qcow::format::header::field::CLUSTER_BITS as usize;
    bytes[at..at + 4].copy_from_slice(&40u32.to_be_bytes());
    std::fs::write(&garbage, bytes).expect("write");
    for args in [
        vec!["info", "no-such-file.qcow2"],
        vec!["info", garbage.to_str().expect("p")],
        vec![
            "convert",
            "-O",
            "raw",
            garbage.to_str().expect("p"),
            "/dev/null",
        ],
        vec!["map", garbage.to_str().expect("p")],
    ] {
        let out = qcow(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("qcow: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // In qemu-img's words, which name the bad value.
    let out = qcow(&["info", garbage.to_str().expect("p")]);
    let theirs = qemu_img(&["info", garbage.to_str().expect("p")]);
    assert_eq!(
        stderr(&out).replacen("qcow", "qemu-img", 1),
        stderr(&theirs),
        "qcow's message, then qemu-img's"
    );
    assert!(stderr(&out).contains("2^40"));
}

#[test]
fn untrusted_refuses_named_files() {
    let out = qcow(&[
        "convert",
        "--untrusted",
        "-O",
        "raw",
        "chain-top.qcow2",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing file"));
}

/// `info` output with the file system's allocation (which varies between
/// machines) taken out.
fn info_for_snapshot(name: &str, output: &str) -> String {
    let out = qcow(&["info", "--output", output, name]);
    assert!(out.status.success(), "{out:?}");
    stdout(&out)
        .lines()
        .map(|l| {
            if l.contains("\"actual-size\"") {
                let indent = &l[..l.len() - l.trim_start().len()];
                let comma = if l.ends_with(',') { "," } else { "" };
                format!("{indent}\"actual-size\": \"[redacted]\"{comma}")
            } else if l.trim_start().starts_with("disk size:") {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}disk size: [redacted]")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn info_snapshots() {
    for name in [
        "sample.qcow2",
        "v2-64k.qcow2",
        "snapshots.qcow2",
        "bitmaps.qcow2",
        "chain-top.qcow2",
        "extl2.qcow2",
        "datafile-raw.qcow2",
        "zstd.qcow2",
        "lazy-dirty.qcow2",
        "v1.qcow",
        "raw.img",
    ] {
        let key = name.replace('.', "_");
        insta::assert_snapshot!(
            format!("info_human_{key}"),
            info_for_snapshot(name, "human")
        );
        insta::assert_snapshot!(format!("info_json_{key}"), info_for_snapshot(name, "json"));
    }
}

#[test]
fn map_of_a_sparse_raw_file_reports_holes_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sparse.raw");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(8 << 20).expect("size");
    std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 65536], 3 << 20).expect("write");
    drop(file);
    let p = path.to_str().expect("path");
    for output in ["json", "human"] {
        let ours = qcow(&["map", "-f", "raw", "--output", output, p]);
        let theirs = qemu_img(&["map", "-f", "raw", "--output", output, p]);
        assert!(ours.status.success());
        assert_eq!(stdout(&ours), stdout(&theirs), "map --output {output}");
    }
}

/// The virtual size qemu-img reports for the image.
fn virtual_size(path: &Path) -> u64 {
    let out = qemu_img(&["info", "--output", "json", path.to_str().expect("path")]);
    assert!(out.status.success(), "qemu-img info {}", path.display());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    info["virtual-size"].as_u64().expect("virtual-size")
}

/// `qemu-img check` exits 0 (no corruption, no leaks).
fn assert_check_clean(path: &Path) {
    let out = qemu_img(&["check", path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn create_prints_what_qemu_img_prints_and_passes_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "{}", "1G"],
        &["-f", "qcow2", "-o", "compat=0.10", "{}", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=64,lazy_refcounts=on,compression_type=zstd",
            "{}",
            "100M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,extended_l2=on",
            "{}",
            "3G",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "../../../testdata/sample.qcow2",
            "-F",
            "qcow2",
            "{}",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("ours{i}.qcow2"));
        let theirs = dir.path().join(format!("theirs{i}.qcow2"));
        let with = |p: &Path| -> Vec<String> {
            let mut v = vec!["create".to_owned()];
            v.extend(
                case.iter()
                    .map(|a| a.replace("{}", p.to_str().expect("path"))),
            );
            v
        };
        let a = with(&ours);
        let b = with(&theirs);
        // Relative backing names resolve against the image's directory.
        let backing_case = case.contains(&"-b");
        if backing_case {
            let base = testdata().join("sample.qcow2");
            let base = base.to_str().expect("path");
            let a: Vec<String> = a
                .iter()
                .map(|x| x.replace("../../../testdata/sample.qcow2", base))
                .collect();
            let b: Vec<String> = b
                .iter()
                .map(|x| x.replace("../../../testdata/sample.qcow2", base))
                .collect();
            let o = qcow(&a.iter().map(String::as_str).collect::<Vec<_>>());
            let t = qemu_img(&b.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{o:?}");
            assert_eq!(
                stdout(&o).replace("ours", "X"),
                stdout(&t).replace("theirs", "X")
            );
        } else {
            let o = qcow(&a.iter().map(String::as_str).collect::<Vec<_>>());
            let t = qemu_img(&b.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{o:?}");
            assert_eq!(
                stdout(&o).replace("ours", "X"),
                stdout(&t).replace("theirs", "X"),
                "{case:?}"
            );
        }
        assert_check_clean(&ours);
        let info = |p: &Path| {
            let out = qemu_img(&["info", "--output", "json", p.to_str().expect("path")]);
            stdout(&out)
                .lines()
                .filter(|l| !l.starts_with("                "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let (io, it) = (info(&ours), info(&theirs));
        let pick = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|l| {
                    [
                        "\"virtual-size\"",
                        "cluster-size",
                        "compat",
                        "compression-type",
                        "lazy-refcounts",
                        "refcount-bits",
                        "extended-l2",
                        "backing-filename-format",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .cloned()
                .collect()
        };
        assert_eq!(pick(&io), pick(&it), "{case:?}");
    }
}

#[test]
fn convert_to_qcow2_passes_check_and_compare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.qcow2");
    let o = out.to_str().expect("path");
    for name in [
        "sample.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "chain-top.qcow2",
        "extl2-backed.qcow2",
        "v1-compressed.qcow",
        "v3-64k.qcow2",
        "raw.img",
    ] {
        for opts in [
            vec![],
            vec!["-c"],
            vec!["-c", "-o", "compression_type=zstd,cluster_size=4k"],
            vec!["-o", "compat=0.10,cluster_size=512,refcount_bits=16"],
            vec!["-S", "0", "-o", "refcount_bits=1,cluster_size=16k"],
        ] {
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(opts.iter().copied());
            args.extend([name, o]);
            let r = qcow(&args);
            assert!(r.status.success(), "{args:?}: {r:?}");
            assert_check_clean(&out);
            let cmp = qemu_img(&["compare", name, o]);
            assert!(cmp.status.success(), "{args:?}: {}", stdout(&cmp));
            if opts.contains(&"-c") && name == "sample.qcow2" {
                let map = qemu_img(&["map", "--output", "json", o]);
                assert!(stdout(&map).contains("\"compressed\": true"), "{args:?}");
            }
        }
    }
}

#[test]
fn dd_copies_what_qemu_img_dd_copies() {
    let dir = tempfile::tempdir().expect("tempdir");
    for operands in [
        vec!["bs=64k", "count=5", "skip=2"],
        vec!["bs=4096"],
        vec!["bs=1M", "skip=3"],
        vec!["bs=512", "count=9000"],
    ] {
        for name in ["sample.qcow2", "zlib.qcow2"] {
            let ours = dir.path().join("ours.raw");
            let theirs = dir.path().join("theirs.raw");
            let run_dd = |tool: fn(&[&str]) -> Output, out: &Path| {
                let i = format!("if={name}");
                let o = format!("of={}", out.to_str().expect("path"));
                let mut args = vec!["dd", "-O", "raw", i.as_str(), o.as_str()];
                args.extend(operands.iter().copied());
                let r = tool(&args);
                assert!(r.status.success(), "{args:?}: {r:?}");
            };
            run_dd(qcow, &ours);
            run_dd(qemu_img, &theirs);
            assert!(
                std::fs::read(&ours).ok() == std::fs::read(&theirs).ok(),
                "dd {operands:?} of {name} differs from qemu-img's"
            );
        }
    }
    let out = dir.path().join("dd.qcow2");
    let o = format!("of={}", out.to_str().expect("path"));
    let r = qcow(&[
        "dd",
        "-O",
        "qcow2",
        "if=sample.qcow2",
        o.as_str(),
        "bs=1M",
        "count=4",
    ]);
    assert!(r.status.success(), "{r:?}");
    assert_check_clean(&out);
}

#[test]
fn map_looks_through_holes_in_the_image_file_like_qemu_img() {
    // A checkout may store the images sparsely: data clusters that are
    // holes in the file read as zeros, and qemu-img map says so.
    let dir = tempfile::tempdir().expect("tempdir");
    for name in [
        "v2-64k.qcow2",
        "v3-64k.qcow2",
        "sample.qcow2",
        "chain-mid.qcow2",
        "chain-base.raw",
    ] {
        let copy = dir.path().join(name);
        let status = Command::new("cp")
            .args(["--sparse=always"])
            .arg(testdata().join(name))
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(status.success());
    }
    for name in [
        "v2-64k.qcow2",
        "v3-64k.qcow2",
        "sample.qcow2",
        "chain-mid.qcow2",
    ] {
        let p = dir.path().join(name);
        let p = p.to_str().expect("path");
        for output in ["json", "human"] {
            let ours = qcow(&["map", "--output", output, p]);
            let theirs = qemu_img(&["map", "--output", output, p]);
            assert_eq!(
                stdout(&ours),
                stdout(&theirs),
                "map --output {output} {name}"
            );
        }
        let out = dir.path().join("out.raw");
        let o = out.to_str().expect("path");
        assert!(qcow(&["convert", "-O", "raw", p, o]).status.success());
        assert!(qemu_img(&["compare", p, o]).status.success(), "{name}");
    }
}

#[test]
fn qcow_version_1_create_and_convert_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = dir.path().join("ours.qcow");
    let theirs = dir.path().join("theirs.qcow");
    let (o, t) = (ours.to_str().expect("p"), theirs.to_str().expect("p"));
    let a = qcow(&["create", "-f", "qcow", o, "5M"]);
    let b = qemu_img(&["create", "-f", "qcow", t, "5M"]);
    assert_eq!(stdout(&a).replace(o, "X"), stdout(&b).replace(t, "X"));
    assert!(
        std::fs::read(&ours).ok() == std::fs::read(&theirs).ok(),
        "same bytes"
    );
    for name in [
        "sample.qcow2",
        "zlib.qcow2",
        "v1-compressed.qcow",
        "chain-top.qcow2",
    ] {
        for opts in [vec![], vec!["-c"]] {
            let mut args = vec!["convert", "-O", "qcow"];
            args.extend(opts.iter().copied());
            args.extend([name, o]);
            let r = qcow(&args);
            assert!(r.status.success(), "{args:?}: {r:?}");
            let cmp = qemu_img(&["compare", name, o]);
            assert!(cmp.status.success(), "{args:?}: {}", stdout(&cmp));
        }
    }
}

#[test]
fn convert_onto_a_backing_file_copies_only_the_top_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n).to_str().expect("path").to_owned();
    let run_ok = |tool: fn(&[&str]) -> Output, args: &[&str]| {
        let r = tool(args);
        assert!(r.status.success(), "{args:?}: {r:?}");
        r
    };
    run_ok(
        qemu_img,
        &["convert", "-O", "qcow2", "sample.qcow2", &d("base.qcow2")],
    );
    run_ok(
        qemu_img,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &d("base.qcow2"),
            "-F",
            "qcow2",
            &d("top.qcow2"),
        ],
    );
    let io = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 9 1M 300k",
            "-c",
            "write -z 3M 128k",
            "-c",
            "write -P 7 6M 64k",
            &d("top.qcow2"),
        ])
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success());
    for extra in [vec![], vec!["-c"]] {
        let out = d("out.qcow2");
        let mut args = vec!["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
        args.extend(extra.iter().copied());
        let top = d("top.qcow2");
        args.extend([top.as_str(), out.as_str()]);
        // Relative backing names resolve against the output's directory.
        let r = run(env!("CARGO_BIN_EXE_qcow"), &args, dir.path());
        assert!(r.status.success(), "{r:?}");
        assert_check_clean(Path::new(&out));
        let cmp = qemu_img(&["compare", &top, &out]);
        assert!(cmp.status.success(), "{}", stdout(&cmp));
        let info = stdout(&qemu_img(&["info", "--output", "json", &out]));
        assert!(
            info.contains("\"backing-filename\": \"base.qcow2\""),
            "{info}"
        );
        // Only the top layer's data was copied.
        let size = std::fs::metadata(&out).expect("out").len();
        assert!(size < 1 << 20, "output holds {size} bytes");
    }
}

#[test]
fn resize_grows_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, size) in ["+3G", "5G", "+0"].iter().enumerate() {
        let ours = dir.path().join(format!("ours{i}.qcow2"));
        let theirs = dir.path().join(format!("theirs{i}.qcow2"));
        let (o, t) = (ours.to_str().expect("p"), theirs.to_str().expect("p"));
        for (path, p) in [(&ours, o), (&theirs, t)] {
            let r = qemu_img(&[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "sample.qcow2",
                p,
            ]);
            assert!(r.status.success(), "{path:?}");
        }
        let a = qcow(&["resize", o, size]);
        let b = qemu_img(&["resize", t, size]);
        assert!(a.status.success(), "{a:?}");
        assert_eq!(stdout(&a), stdout(&b));
        assert_check_clean(&ours);
        let cmp = qemu_img(&["compare", "-s", o, t]);
        assert!(cmp.status.success(), "{size}: {}", stdout(&cmp));
    }
    let tiny = dir.path().join("tiny.qcow2");
    let t = tiny.to_str().expect("p");
    assert!(
        qcow(&["create", "-q", "-f", "qcow2", t, "1M"])
            .status
            .success()
    );
    let shrink = qcow(&["resize", t, "-512k"]);
    assert_eq!(shrink.status.code(), Some(1));
}
