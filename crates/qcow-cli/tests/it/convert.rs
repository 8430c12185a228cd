//! `qcow convert` on the library's copy engine, beside qemu-img: the output
//! is laid out in guest order (as sequential as qemu-img's), `-S 0`
//! allocates the whole disk as qemu-img's does, and every output reads as
//! qemu-img's and passes its check.

use std::path::Path;

use serde_json::Value;

use super::{assert_check_clean, qcow, qemu_img};
use super::{p, qemu_io};

/// A 24 MiB raw disk with four runs of data (pseudo-random, so that
/// neither zero detection nor compression removes them) between holes.
fn source(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("source.raw");
    let mut bytes = vec![0u8; 24 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (start, len) in [
        (0usize, 3usize << 20),
        (5 << 20, 1 << 20),
        (9 << 20, (7 << 20) + 12345),
        (20 << 20, 4096),
    ] {
        for b in &mut bytes[start..start + len] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
    }
    std::fs::write(&path, bytes).expect("write source");
    path
}

/// The allocated extents of `path` as (guest start, length, host offset).
fn data_extents(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = qemu_img(&["map", "--output=json", p(path)]);
    assert!(out.status.success());
    let map: Value = serde_json::from_slice(&out.stdout).expect("map json");
    map.as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == Value::Bool(true))
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["offset"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn outputs_are_allocated_in_guest_order_as_sequentially_as_qemu_img_lays_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = source(dir.path());
    for args in [
        vec![],
        vec!["-o", "cluster_size=4k"],
        vec!["-c", "-o", "cluster_size=4k"],
        vec!["-S", "0", "-o", "cluster_size=16k"],
        vec!["-m", "1"],
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let run = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
            let mut full = vec!["convert", "-O", "qcow2"];
            full.extend(&args);
            full.extend([p(&source), p(out)]);
            let o = tool(&full);
            assert!(o.status.success(), "{args:?}: {o:?}");
        };
        run(qcow, &ours);
        run(qemu_img, &theirs);
        assert_check_clean(&ours);
        let cmp = qemu_img(&["compare", p(&ours), p(&theirs)]);
        assert!(cmp.status.success(), "{args:?}: contents differ");
        let (a, b) = (data_extents(&ours), data_extents(&theirs));
        assert!(
            a.len() <= b.len(),
            "{args:?}: {} extents where qemu-img has {}:\n{a:?}\n{b:?}",
            a.len(),
            b.len()
        );
        if !args.contains(&"-c") {
            // Host offsets grow with guest offsets: allocated in order.
            for pair in a.windows(2) {
                assert!(
                    pair[1].2 > pair[0].2,
                    "{args:?}: allocated out of guest order: {pair:?}"
                );
            }
        }
        if args.contains(&"0") {
            // -S 0: the whole disk allocated, as qemu-img allocates it.
            let covered: u64 = a.iter().map(|e| e.1).sum();
            assert_eq!(covered, 24 << 20, "{args:?}: not everything allocated");
            assert_eq!(a, b, "{args:?}: laid out differently from qemu-img");
        }
    }
}

#[test]
fn out_of_order_writes_make_the_same_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = source(dir.path());
    let out = dir.path().join("w.qcow2");
    let o = qcow(&[
        "convert",
        "-W",
        "-m",
        "4",
        "-O",
        "qcow2",
        p(&source),
        p(&out),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_check_clean(&out);
    let cmp = qemu_img(&["compare", p(&source), p(&out)]);
    assert!(cmp.status.success(), "contents differ");
}

fn image(dir: &Path, name: &str, size: &str, writes: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    let out = qemu_img(&["create", "-q", "-f", "qcow2", p(&path), size]);
    assert!(out.status.success());
    if !writes.is_empty() {
        qemu_io(&path, writes);
    }
    path
}

/// Runs the same convert with both tools, each writing its own output, and
/// asserts the same exit code and standard output; returns both outputs.
fn both(
    dir: &Path,
    args: &[&str],
    prepare: impl Fn(&Path),
) -> (std::path::PathBuf, std::path::PathBuf, i32) {
    let ours = dir.join("ours.out");
    let theirs = dir.join("theirs.out");
    for f in [&ours, &theirs] {
        let _ = std::fs::remove_file(f);
        prepare(f);
    }
    let run = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
        let mut full = vec!["convert"];
        full.extend(args);
        full.push(p(out));
        tool(&full)
    };
    let (a, b) = (run(qcow, &ours), run(qemu_img, &theirs));
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    assert_eq!(a.stdout, b.stdout, "{args:?}");
    (ours, theirs, a.status.code().unwrap_or(-1))
}

fn same_disk(a: &Path, b: &Path) {
    let cmp = qemu_img(&["compare", p(a), p(b)]);
    assert!(
        cmp.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn writing_into_existing_outputs_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = image(
        d,
        "src.qcow2",
        "8M",
        &["write -P 1 0 1M", "write -P 2 4M 64k"],
    );
    let src_s = p(&src).to_owned();
    // -n into an image full of other data: the source's zeros are written.
    let fill = |f: &Path| {
        let out = qemu_img(&["create", "-q", "-f", "qcow2", p(f), "8M"]);
        assert!(out.status.success());
        qemu_io(f, &["write -P 9 0 8M"]);
    };
    let (ours, theirs, code) = both(d, &["-n", "-O", "qcow2", &src_s], fill);
    assert_eq!(code, 0);
    same_disk(&ours, &src);
    same_disk(&ours, &theirs);
    assert_check_clean(&ours);
    // --target-is-zero: the caller's word is taken, zeros are skipped.
    let fresh = |f: &Path| {
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(f), "8M"])
                .status
                .success()
        );
    };
    let (ours, theirs, code) = both(d, &["-n", "--target-is-zero", "-O", "qcow2", &src_s], fresh);
    assert_eq!(code, 0);
    same_disk(&ours, &theirs);
    // Refusals.
    let small = |f: &Path| {
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(f), "4M"])
                .status
                .success()
        );
    };
    assert_eq!(both(d, &["-n", "-O", "qcow2", &src_s], small).2, 1);
    assert_eq!(
        both(
            d,
            &["-n", "-o", "cluster_size=4k", "-O", "qcow2", &src_s],
            fresh
        )
        .2,
        1
    );
    assert_eq!(
        both(d, &["--target-is-zero", "-O", "qcow2", &src_s], |_| {}).2,
        1
    );
    for bad in ["1000", "32M", "-1"] {
        assert_eq!(
            both(d, &["-S", bad, "-O", "qcow2", &src_s], |_| {}).2,
            1,
            "-S {bad}"
        );
    }
    // -q: nothing on standard output (checked by both()).
    assert_eq!(both(d, &["-q", "-O", "qcow2", &src_s], |_| {}).2, 0);
}

#[test]
fn several_sources_are_concatenated_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = image(
        d,
        "a.qcow2",
        "3M",
        &["write -P 1 0 1M", "write -P 2 2M 512k"],
    );
    let b = image(d, "b.qcow2", "1536K", &["write -P 3 512k 512k"]);
    let c = d.join("c.raw");
    std::fs::write(&c, vec![4u8; 1 << 20]).expect("raw");
    let sources = [p(&a).to_owned(), p(&b).to_owned(), p(&c).to_owned()];
    for format in ["qcow2", "raw"] {
        let mut args = vec!["-O", format];
        args.extend(sources.iter().map(String::as_str));
        let (ours, theirs, code) = both(d, &args, |_| {});
        assert_eq!(code, 0);
        same_disk(&ours, &theirs);
    }
    // A backing file for a concatenation is refused, as qemu-img refuses it.
    let mut args = vec!["-O", "qcow2", "-B", "a.qcow2", "-F", "qcow2"];
    args.extend(sources.iter().map(String::as_str));
    assert_eq!(both(d, &args, |_| {}).2, 1);
}

#[test]
fn salvage_data_files_backing_names_and_raw_preallocation_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // --salvage past a corrupt compressed cluster.
    let src = image(
        d,
        "bad.qcow2",
        "4M",
        &["write -P 1 0 1M", "write -c -P 2 1M 64k"],
    );
    let mut bytes = std::fs::read(&src).expect("read");
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let host = (be(&bytes, l2 + 8 * 16) & ((1 << 54) - 1)) as usize;
    bytes[host..host + 64].fill(0xff);
    std::fs::write(&src, &bytes).expect("write");
    let src_s = p(&src).to_owned();
    assert_eq!(both(d, &["-O", "qcow2", &src_s], |_| {}).2, 1);
    let (ours, theirs, code) = both(d, &["--salvage", "-O", "qcow2", &src_s], |_| {});
    assert_eq!(code, 0);
    same_disk(&ours, &theirs);
    assert_check_clean(&ours);

    // -o data_file: the data file made beside the output.
    let good = image(d, "good.qcow2", "4M", &["write -P 5 0 1M"]);
    let good_s = p(&good).to_owned();
    let (ours, theirs, code) = both(
        d,
        &["-O", "qcow2", "-o", "data_file=data.raw", &good_s],
        |_| {},
    );
    assert_eq!(code, 0);
    same_disk(&ours, &theirs);
    assert_check_clean(&ours);

    // -B names the backing file from the output's directory.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let out = sub.join("out.qcow2");
    let a = qcow(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "good.qcow2",
        "-F",
        "qcow2",
        &good_s,
        p(&out),
    ]);
    assert_eq!(a.status.code(), Some(1));
    assert!(!out.exists(), "a refused convert left its output");
    let a = qcow(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "../good.qcow2",
        "-F",
        "qcow2",
        &good_s,
        p(&out),
    ]);
    assert!(a.status.success(), "{a:?}");
    same_disk(&out, &good);
    let a = qcow(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "../good.qcow2",
        &good_s,
        p(&out),
    ]);
    assert_eq!(a.status.code(), Some(1), "a backing file needs its format");

    // -O raw with preallocation: every byte allocated.
    for mode in ["falloc", "full"] {
        let opt = format!("preallocation={mode}");
        let (ours, theirs, code) = both(d, &["-O", "raw", "-o", &opt, &good_s], |_| {});
        assert_eq!(code, 0);
        same_disk(&ours, &theirs);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&ours).expect("meta").blocks() * 512;
        assert!(blocks >= 4 << 20, "{mode}: only {blocks} bytes allocated");
    }
}

#[test]
fn progress_lines_are_qemu_img_lines_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = image(dir.path(), "p.qcow2", "16M", &["write -P 1 0 16M"]);
    let parse = |out: &[u8]| -> Vec<f64> {
        let text = String::from_utf8_lossy(out).into_owned();
        assert!(text.ends_with("\r\n"), "{text:?}");
        text.trim_end_matches('\n')
            .split_terminator('\r')
            .map(|line| {
                let inner = line
                    .strip_prefix("    (")
                    .and_then(|l| l.strip_suffix("/100%)"))
                    .unwrap_or_else(|| panic!("not a progress line: {line:?}"));
                assert_eq!(inner.split('.').nth(1).map(str::len), Some(2), "{line:?}");
                inner.parse().expect("a percentage")
            })
            .collect()
    };
    for tool in [qcow as fn(&[&str]) -> std::process::Output, qemu_img] {
        let out_path = dir.path().join("p.raw");
        let out = tool(&["convert", "-p", "-O", "raw", p(&src), p(&out_path)]);
        assert!(out.status.success());
        let steps = parse(&out.stdout);
        assert_eq!(steps.first(), Some(&0.0));
        assert_eq!(steps.last(), Some(&100.0));
        assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    }
}

/// iotest 086: qemu-img's progress counts only what is read as data (and,
/// with `-S 0`, zeros too), so a sparse disk's lines move with the work.
#[test]
fn progress_lines_count_data_as_qemu_img_counts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sparse = image(
        dir.path(),
        "sparse.qcow2",
        "128M",
        &["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
    );
    let full = image(dir.path(), "full.qcow2", "16M", &["write -P 1 0 16M"]);
    let mixed = image(
        dir.path(),
        "mixed.qcow2",
        "64M",
        &[
            "write 0 5M",
            "write -z 8M 3M",
            "write 13M 64k",
            "write 20M 9M",
        ],
    );
    let base_s = p(&mixed).to_owned();
    let top = dir.path().join("top.qcow2");
    let made = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &base_s,
        "-F",
        "qcow2",
        p(&top),
    ]);
    assert!(made.status.success(), "{made:?}");
    qemu_io(
        &top,
        &["write -P 9 4M 3M", "write -z 24M 1M", "write 40M 2M"],
    );
    for (src, extra) in [
        (&sparse, vec!["-O", "qcow2"]),
        (&sparse, vec!["-O", "raw"]),
        (&full, vec!["-O", "qcow2"]),
        (&mixed, vec!["-O", "qcow2"]),
        (&mixed, vec!["-O", "raw", "-S", "0"]),
        (&mixed, vec!["-O", "qcow2", "-c"]),
        (&top, vec!["-O", "qcow2", "-B", &base_s, "-F", "qcow2"]),
        (&top, vec!["-O", "qcow2"]),
    ] {
        let mut outputs = Vec::new();
        for (tool, name) in [
            (qcow as fn(&[&str]) -> std::process::Output, "ours"),
            (qemu_img, "theirs"),
        ] {
            let out_path = dir.path().join(name);
            let _ = std::fs::remove_file(&out_path);
            let args: Vec<&str> =
                [&["convert", "-p"][..], &extra, &[p(src), p(&out_path)]].concat();
            let out = tool(&args);
            assert!(out.status.success(), "{args:?}: {out:?}");
            outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert_eq!(outputs[0], outputs[1], "convert -p {extra:?} {}", p(src));
    }
}

#[test]
fn dd_formats_block_sizes_and_refusals_follow_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = image(
        dir.path(),
        "dd.qcow2",
        "8M",
        &["write -P 3 0 3M", "write -P 4 5M 1M"],
    );
    let src_s = p(&src).to_owned();
    for extra in [
        vec!["-O", "qcow"],
        vec!["bs=1000"],
        vec!["bs=513", "count=3"],
        vec!["bs=4k", "count=300", "skip=1", "-O", "qcow"],
        vec!["-O", "qcow2", "bs=1M", "skip=2"],
        vec!["bs=0"],
        vec!["foo=1"],
        vec!["count=-1"],
        vec!["skip=abc"],
        vec!["bs=3G"],
    ] {
        let ours = dir.path().join("dd-ours");
        let theirs = dir.path().join("dd-theirs");
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        let run = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
            let iff = format!("if={src_s}");
            let of = format!("of={}", p(out));
            let args: Vec<&str> = [&["dd", iff.as_str(), of.as_str()], extra.as_slice()].concat();
            tool(&args)
        };
        let (a, b) = (run(qcow, &ours), run(qemu_img, &theirs));
        assert_eq!(a.status.code(), b.status.code(), "{extra:?}");
        assert_eq!(
            String::from_utf8_lossy(&a.stderr).replacen("qcow: ", "", 1),
            String::from_utf8_lossy(&b.stderr).replacen("qemu-img: ", "", 1),
            "{extra:?}"
        );
        if a.status.success() {
            same_disk(&ours, &theirs);
        }
    }
}

/// Options may come between the file names, as qemu-img takes them (QEMU's
/// iotest 058 gives `-l` after the source); fewer than two names are
/// refused in qemu-img's words.
#[test]
fn options_between_file_names_and_missing_names_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = image(dir.path(), "src.qcow2", "1M", &["write -P 3 0 64k"]);
    let out = qemu_img(&["snapshot", "-c", "sn1", p(&src)]);
    assert!(out.status.success());
    qemu_io(&src, &["write -P 4 0 64k"]);
    let (ours, theirs, code) = both(dir.path(), &[p(&src), "-l", "sn1", "-O", "raw"], |_| {});
    assert_eq!(code, 0);
    same_disk(&ours, &theirs);
    for args in [&["convert", "-O", "raw", p(&src)][..], &["convert"][..]] {
        let (a, b) = (qcow(args), qemu_img(args));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}");
        assert_eq!(
            super::stderr(&a).replacen("qcow", "qemu-img", 1),
            super::stderr(&b),
            "{args:?}"
        );
    }
}

/// `-S` larger than the target's clusters (QEMU's iotest 122): zero runs
/// shorter than the minimum, or cut by its alignment, are written as data,
/// exactly where qemu-img writes them.
#[test]
fn minimum_sparse_runs_larger_than_clusters_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1k",
        p(&src),
        "1M",
    ]);
    assert!(out.status.success());
    qemu_io(
        &src,
        &[
            "write -P 0 0 64k",
            "write 0 1k",
            "write 8k 1k",
            "write 17k 1k",
            "write -P 0 65k 1k",
        ],
    );
    // Allocation as qemu-img map shows it, host offsets left out.
    let layout = |path: &Path| -> Vec<String> {
        let out = qemu_img(&["map", "--output=json", p(path)]);
        let map: Value = serde_json::from_slice(&out.stdout).expect("map json");
        map.as_array()
            .expect("array")
            .iter()
            .map(|e| {
                format!(
                    "{} {} data={} zero={}",
                    e["start"], e["length"], e["data"], e["zero"]
                )
            })
            .collect()
    };
    for sparse in ["4k", "8k", "64k"] {
        for format in ["qcow2", "raw"] {
            let mut args = vec!["-O", format, "-S", sparse];
            if format == "qcow2" {
                args.extend(["-o", "cluster_size=1k"]);
            }
            args.push(p(&src));
            let (ours, theirs, code) = both(dir.path(), &args, |_| {});
            assert_eq!(code, 0, "{args:?}");
            same_disk(&ours, &theirs);
            assert_eq!(layout(&ours), layout(&theirs), "{args:?}");
        }
    }
}

/// QEMU's null driver as a source (iotest 150): a disk of zeros, converted
/// sparse (nothing allocated) or with `-S 0` (everything allocated), as
/// qemu-img converts it.
#[test]
fn null_driver_sources_convert_as_qemu_img_converts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for sparse in ["512", "0"] {
        let (ours, theirs, code) = both(dir.path(), &["-O", "qcow2", "-S", sparse, source], |_| {});
        assert_eq!(code, 0, "-S {sparse}");
        let map = |path: &Path| super::stdout(&qemu_img(&["map", "--output=json", p(path)]));
        assert_eq!(map(&ours), map(&theirs), "-S {sparse}");
        assert_check_clean(&ours);
    }
}

/// `-n` onto an empty image with a backing file (QEMU's iotest 122):
/// version 3 takes the zeros as zero clusters; version 2 must write them,
/// and lays them out in the disk's order as qemu-img does.
#[test]
fn zeros_onto_a_backed_image_are_laid_out_as_qemu_img_lays_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.qcow2");
    let base = dir.path().join("base.qcow2");
    for path in [&source, &base] {
        let out = qemu_img(&["create", "-q", "-f", "qcow2", p(path), "64M"]);
        assert!(out.status.success());
    }
    for compat in ["1.1", "0.10"] {
        let prepare = |path: &Path| {
            let options = format!("compat={compat}");
            let out = qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &options,
                "-b",
                p(&base),
                "-F",
                "qcow2",
                p(path),
                "64M",
            ]);
            assert!(out.status.success());
        };
        let (ours, theirs, code) = both(dir.path(), &["-O", "qcow2", "-n", p(&source)], prepare);
        assert_eq!(code, 0, "compat={compat}");
        let map = |path: &Path| super::stdout(&qemu_img(&["map", "--output=json", p(path)]));
        assert_eq!(map(&ours), map(&theirs), "compat={compat}");
        assert_check_clean(&ours);
    }
}
