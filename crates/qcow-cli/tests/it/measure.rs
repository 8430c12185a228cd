//! `qcow measure` against `qemu-img measure`: the same output and exit code
//! for empty disks and for sources of every kind, over the options that
//! change the answer.

use super::{p, qemu_io};
use super::{qcow, qemu_img, stdout};

fn make(args: &[&str]) {
    let out = qemu_img(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

#[test]
fn measures_match_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name);
    // Sources: data, zeros and bitmaps; a backing chain; version 2; a
    // compressed image; a sparse raw file; an empty image.
    make(&["create", "-q", "-f", "qcow2", p(&d("data.qcow2")), "100M"]);
    qemu_io(
        &d("data.qcow2"),
        &[
            "write -P 1 0 3M",
            "write -z 8M 1M",
            "write -P 2 50M 100k",
            "write -P 3 99M 4k",
        ],
    );
    make(&["bitmap", "--add", p(&d("data.qcow2")), "b0"]);
    make(&[
        "bitmap",
        "--add",
        "-g",
        "1M",
        p(&d("data.qcow2")),
        "a-longer-bitmap-name",
    ]);
    make(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "data.qcow2",
        "-F",
        "qcow2",
        p(&d("top.qcow2")),
    ]);
    qemu_io(&d("top.qcow2"), &["write -P 4 20M 1M"]);
    make(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        p(&d("v2.qcow2")),
        "30M",
    ]);
    qemu_io(&d("v2.qcow2"), &["write -P 5 1M 2M"]);
    make(&["create", "-q", "-f", "qcow2", p(&d("c.qcow2")), "20M"]);
    qemu_io(&d("c.qcow2"), &["write -c -P 6 0 1M"]);
    std::fs::File::create(d("sparse.raw"))
        .and_then(|f| f.set_len(40 << 20))
        .expect("raw");
    qemu_io(&d("sparse.raw"), &["write -P 7 5M 3M"]);
    make(&["create", "-q", "-f", "qcow2", p(&d("empty.qcow2")), "1M"]);

    let sources: Vec<Vec<String>> = [
        "data.qcow2",
        "top.qcow2",
        "v2.qcow2",
        "c.qcow2",
        "sparse.raw",
        "empty.qcow2",
    ]
    .iter()
    .map(|n| vec![p(&d(n)).to_owned()])
    .chain(
        ["0", "1G", "10G", "1000000", "1P"]
            .iter()
            .map(|s| vec!["--size".to_owned(), (*s).to_owned()]),
    )
    .collect();
    let option_sets = [
        "",
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=8",
        "refcount_bits=64",
        "compat=0.10",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "backing_file=elsewhere.qcow2",
    ];
    let mut failures = Vec::new();
    let mut runs = 0;
    for source in &sources {
        for (format, options) in
            std::iter::once(("raw", "")).chain(option_sets.iter().map(|o| ("qcow2", *o)))
        {
            for output in ["human", "json"] {
                let mut args = vec!["measure", "--output", output, "-O", format];
                if !options.is_empty() {
                    args.extend(["-o", options]);
                }
                args.extend(source.iter().map(String::as_str));
                let (a, b) = (qcow(&args), qemu_img(&args));
                runs += 1;
                if a.status.code() != b.status.code() || stdout(&a) != stdout(&b) {
                    failures.push(format!(
                        "{args:?}: qcow {:?} {:?} {}, qemu-img {:?} {:?}",
                        a.status.code(),
                        stdout(&a),
                        String::from_utf8_lossy(&a.stderr),
                        b.status.code(),
                        stdout(&b)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn measure_refusals_follow_qemu_img() {
    for args in [
        vec!["measure"],
        vec!["measure", "--size", "abc"],
        vec!["measure", "--size", "-5"],
        vec!["measure", "-f", "qcow2", "--size", "1G"],
        vec!["measure", "-O", "foo", "--size", "1G"],
        vec!["measure", "-O", "qcow", "--size", "1G"],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "--size",
            "1G",
        ],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "--size",
            "1G",
        ],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        vec!["measure", "--output", "xml", "--size", "1G"],
        vec!["measure", "--size", "1G", "no-such-file.qcow2"],
    ] {
        let (a, b) = (qcow(&args), qemu_img(&args));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}");
        assert_eq!(stdout(&a), stdout(&b), "{args:?}");
    }
}
