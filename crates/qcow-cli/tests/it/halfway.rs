//! Commands that fail halfway, beside qemu-img failing the same way: an
//! unreadable compressed cluster in what they read, or a file size limit
//! (`ulimit -f`) on what they write. The user's files survive: what was
//! only read is unchanged, an image a command failed to change keeps its
//! bytes or its guest view, and everything written passes `qemu-img check`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qcow::format::header::field;

use super::guards::{be64, guest_data};
use super::{assert_check_clean, p, qcow, qemu_img, qemu_io, stderr};

const CLUSTER: usize = 64 << 10;

/// Makes the compressed cluster that maps guest byte `guest` of a small
/// qcow2 image (64 KiB clusters, one L2 table) unreadable. Returns the
/// file's bytes afterwards.
fn break_compressed_cluster(path: &Path, guest: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read");
    let l1 = be64(&bytes, field::L1_TABLE_OFFSET);
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&bytes, l2 + 8 * (guest / CLUSTER as u64));
    assert_ne!(
        entry & (1 << 62),
        0,
        "the cluster at {guest} is not compressed"
    );
    let host = (entry & ((1 << 54) - 1)) as usize;
    bytes[host..host + 64].fill(0xff);
    std::fs::write(path, &bytes).expect("write");
    bytes
}

fn create(path: &Path, size: &str, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([p(path), size]);
    let out = qemu_img(&args);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn backing_name(path: &Path) -> String {
    let out = qemu_img(&["info", "-U", "--output", "json", p(path)]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    info["backing-filename"].as_str().unwrap_or("").to_owned()
}

fn identical(a: &Path, b: &Path) -> bool {
    qemu_img(&["compare", "-q", "-U", p(a), p(b)])
        .status
        .success()
}

#[test]
fn convert_and_dd_failing_halfway_keep_the_source_and_leave_a_consistent_output() {
    // The source's compressed cluster at 4 MiB is unreadable: the copy
    // fails there, as qemu-img's does. The source is untouched and what
    // was written of the output is a consistent image holding the data
    // copied before the failure.
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.qcow2");
    create(&source, "16M", None);
    qemu_io(
        &source,
        &[
            "write -P 1 0 4M",
            "write -c -P 2 4M 64k",
            "write -P 3 8M 4M",
        ],
    );
    let bytes = break_compressed_cluster(&source, 4 << 20);

    let out = dir.path().join("out.qcow2");
    let oracle = dir.path().join("oracle.qcow2");
    let convert = qcow(&["convert", "-O", "qcow2", p(&source), p(&out)]);
    let qemu = qemu_img(&["convert", "-O", "qcow2", p(&source), p(&oracle)]);
    assert_eq!(convert.status.code(), qemu.status.code());
    assert_eq!(convert.status.code(), Some(1), "{}", stderr(&convert));
    let dd_out = dir.path().join("dd.qcow2");
    let dd = qcow(&[
        "dd",
        "-O",
        "qcow2",
        "bs=1M",
        &format!("if={}", p(&source)),
        &format!("of={}", p(&dd_out)),
    ]);
    assert_eq!(dd.status.code(), Some(1), "{}", stderr(&dd));
    assert_eq!(std::fs::read(&source).expect("read"), bytes);
    for written in [&out, &dd_out] {
        assert_check_clean(written);
        let data = guest_data(written);
        assert!(
            data[..4 << 20].iter().all(|&b| b == 1),
            "{}: the data copied before the failure is not there",
            written.display()
        );
    }
}

#[test]
fn commit_and_rebase_failing_on_an_unreadable_cluster_keep_the_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    create(&base, "16M", None);
    qemu_io(&base, &["write -P 1 0 16M"]);
    let pristine_base = std::fs::read(&base).expect("read");

    // commit: the top's compressed cluster at 4 MiB cannot be read. The
    // top is left as it was; the base holds, cluster by cluster, its own
    // data or the top's, and passes check.
    let top = dir.path().join("top.qcow2");
    create(&top, "16M", Some("base.qcow2"));
    qemu_io(&top, &["write -P 2 0 1M", "write -c -P 2 4M 64k"]);
    let top_bytes = break_compressed_cluster(&top, 4 << 20);
    for tool in ["qemu-img", "qcow"] {
        std::fs::write(&base, &pristine_base).expect("reset");
        let out = match tool {
            "qcow" => qcow(&["commit", p(&top)]),
            _ => qemu_img(&["commit", p(&top)]),
        };
        assert_eq!(
            out.status.code(),
            Some(1),
            "{tool} commit: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("Block job failed: "),
            "{tool}: {}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(&top).expect("read"), top_bytes, "{tool}");
        assert_check_clean(&base);
        for (i, cluster) in guest_data(&base).chunks(CLUSTER).enumerate() {
            assert!(
                cluster.iter().all(|&b| b == 1) || cluster.iter().all(|&b| b == 2),
                "{tool}: base cluster {i} holds neither its data nor the top's"
            );
        }
    }

    // rebase: the new backing file's compressed cluster at 4 MiB cannot be
    // read. The image keeps its old backing file and its guest view.
    std::fs::write(&base, &pristine_base).expect("reset");
    let new_backing = dir.path().join("new.qcow2");
    create(&new_backing, "16M", None);
    qemu_io(
        &new_backing,
        &[
            "write -P 7 0 4M",
            "write -c -P 8 4M 64k",
            "write -P 7 8M 8M",
        ],
    );
    break_compressed_cluster(&new_backing, 4 << 20);
    let image = dir.path().join("image.qcow2");
    let pristine = dir.path().join("pristine.qcow2");
    create(&pristine, "16M", Some("base.qcow2"));
    qemu_io(&pristine, &["write -P 2 0 1M"]);
    for tool in ["qemu-img", "qcow"] {
        std::fs::copy(&pristine, &image).expect("copy");
        let args = ["rebase", "-b", "new.qcow2", "-F", "qcow2", p(&image)];
        let out = match tool {
            "qcow" => qcow(&args),
            _ => qemu_img(&args),
        };
        assert_eq!(
            out.status.code(),
            Some(1),
            "{tool} rebase: {}",
            stderr(&out)
        );
        assert_eq!(backing_name(&image), "base.qcow2", "{tool}");
        assert_check_clean(&image);
        assert!(
            identical(&image, &pristine),
            "{tool}: the guest view changed"
        );
    }
}

/// Runs `program args` in `cwd` with files limited to `blocks` blocks of 512
/// bytes (what `ulimit -f` counts in `sh`); SIGXFSZ is ignored, so that a
/// write past the limit fails (EFBIG) rather than killing the process.
fn limited(program: &str, blocks: u64, args: &[&str], cwd: &Path) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\""
        ))
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("sh")
}

/// One command run by both tools, each in its own copy of a directory
/// that `setup` fills, under a file size limit.
pub(super) struct Limited {
    pub(super) dirs: [PathBuf; 2],
    _root: tempfile::TempDir,
}

impl Limited {
    /// Runs `args` with qemu-img and with qcow, under a limit of `blocks`
    /// blocks of 512 bytes; both must fail with exit code 1.
    pub(super) fn run(blocks: u64, setup: impl Fn(&Path), args: &[&str]) -> Limited {
        let root = tempfile::tempdir().expect("tempdir");
        let dirs = [root.path().join("qemu-img"), root.path().join("qcow")];
        for (dir, program) in dirs.iter().zip(["qemu-img", env!("CARGO_BIN_EXE_qcow")]) {
            std::fs::create_dir(dir).expect("mkdir");
            setup(dir);
            let out = limited(program, blocks, args, dir);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{program} {args:?} under a limit of {blocks} blocks: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains("File too large"),
                "{program} {args:?}: {}",
                stderr(&out)
            );
        }
        Limited { dirs, _root: root }
    }

    pub(super) fn ours(&self, name: &str) -> PathBuf {
        self.dirs[1].join(name)
    }
}

/// A 32 MiB image full of data.
fn full_image(dir: &Path, name: &str) {
    let path = dir.join(name);
    create(&path, "32M", None);
    qemu_io(&path, &["write -P 3 0 32M"]);
}

#[test]
fn a_file_size_limit_fails_writes_as_it_fails_qemu_img_and_harms_nothing() {
    // convert, in guest order and with -W: the output holds, cluster by
    // cluster, the source's data or nothing, and passes check.
    for extra in [&[][..], &["-W"][..]] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(extra);
        args.extend(["src.qcow2", "out.qcow2"]);
        let run = Limited::run(8192, |d| full_image(d, "src.qcow2"), &args);
        assert_check_clean(&run.ours("out.qcow2"));
        let data = guest_data(&run.ours("out.qcow2"));
        for (i, cluster) in data.chunks(CLUSTER).enumerate() {
            assert!(
                cluster.iter().all(|&b| b == 3) || cluster.iter().all(|&b| b == 0),
                "{args:?}: output cluster {i} holds something else"
            );
        }
    }

    // resize with preallocation and amend of the refcount width: refused
    // with the image unchanged, byte for byte.
    for args in [
        &["resize", "--preallocation=full", "img.qcow2", "+64M"][..],
        &["resize", "--preallocation=falloc", "img.qcow2", "+64M"][..],
        &["amend", "-o", "refcount_bits=64", "img.qcow2"][..],
    ] {
        let run = Limited::run(32 << 10, |d| full_image(d, "img.qcow2"), args);
        let before = run.dirs[1].join("before.qcow2");
        full_image(&run.dirs[1], "before.qcow2");
        assert_eq!(
            std::fs::read(run.ours("img.qcow2")).expect("read"),
            std::fs::read(&before).expect("read"),
            "{args:?}: the image changed"
        );
    }

    // A snapshot or a bitmap that cannot be stored: refused as qemu-img
    // refuses it, the image clean and without it.
    for args in [
        &["snapshot", "-c", "s", "img.qcow2"][..],
        &["bitmap", "--add", "img.qcow2", "b"][..],
    ] {
        let run = Limited::run(32 << 10, |d| full_image(d, "img.qcow2"), args);
        assert_check_clean(&run.ours("img.qcow2"));
        let info = qemu_img(&["info", "--output=json", p(&run.ours("img.qcow2"))]);
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            !text.contains("\"snapshots\"") && !text.contains("\"bitmaps\""),
            "{args:?}: {text}"
        );
    }

    // rebase onto an empty image: FILE must take in all of its old backing
    // file's data, and cannot. It keeps its backing file and guest view.
    let chain = |d: &Path| {
        full_image(d, "base.qcow2");
        create(&d.join("top.qcow2"), "32M", Some("base.qcow2"));
        qemu_io(&d.join("top.qcow2"), &["write -P 2 0 1M"]);
        std::fs::copy(d.join("top.qcow2"), d.join("pristine.qcow2")).expect("copy");
        create(&d.join("empty.qcow2"), "32M", None);
    };
    let args = ["rebase", "-b", "empty.qcow2", "-F", "qcow2", "top.qcow2"];
    let run = Limited::run(8192, chain, &args);
    assert_eq!(backing_name(&run.ours("top.qcow2")), "base.qcow2");
    assert_check_clean(&run.ours("top.qcow2"));
    assert!(identical(
        &run.ours("top.qcow2"),
        &run.ours("pristine.qcow2")
    ));

    // commit into an empty base: the top is unchanged, the base passes
    // check and holds, cluster by cluster, the top's data or nothing.
    let chain = |d: &Path| {
        create(&d.join("base.qcow2"), "32M", None);
        create(&d.join("top.qcow2"), "32M", Some("base.qcow2"));
        qemu_io(&d.join("top.qcow2"), &["write -P 5 0 32M"]);
        std::fs::copy(d.join("top.qcow2"), d.join("pristine.qcow2")).expect("copy");
    };
    let run = Limited::run(8192, chain, &["commit", "top.qcow2"]);
    assert_eq!(
        std::fs::read(run.ours("top.qcow2")).expect("read"),
        std::fs::read(run.ours("pristine.qcow2")).expect("read"),
    );
    assert_check_clean(&run.ours("base.qcow2"));
    for (i, cluster) in guest_data(&run.ours("base.qcow2"))
        .chunks(CLUSTER)
        .enumerate()
    {
        assert!(
            cluster.iter().all(|&b| b == 5) || cluster.iter().all(|&b| b == 0),
            "base cluster {i} holds something else"
        );
    }
}
