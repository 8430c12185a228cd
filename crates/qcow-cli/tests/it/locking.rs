//! Locking: `qcow` and real QEMU processes (qemu-io, qemu-nbd) holding the
//! same image exclude each other as two QEMU processes do, and outputs that
//! are the source are refused before anything is touched.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{p, stderr};
use super::{qcow, qemu_img, stdout};

/// A QEMU process that holds an image open until dropped.
pub(super) struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    /// `qemu-io` with the image open (`-r`: read-only), answering commands
    /// on its standard input; returns once the image is open.
    pub(super) fn qemu_io(path: &Path, extra: &[&str]) -> Holder {
        let mut child = Command::new("qemu-io")
            .args(extra)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-io is required for the lock tests: {e}"));
        let mut holder = Holder {
            stdin: child.stdin.take(),
            child,
        };
        // A read answers only once the image is open (and locked).
        holder.command("read 0 512", "read 512/512 bytes");
        holder
    }

    /// Sends one qemu-io command and waits for a line containing `expect`.
    fn command(&mut self, command: &str, expect: &str) {
        let stdin = self.stdin.as_mut().expect("qemu-io stdin");
        writeln!(stdin, "{command}").expect("qemu-io command");
        stdin.flush().expect("flush");
        let out = self.child.stdout.as_mut().expect("qemu-io stdout");
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("qemu-io output");
            assert!(n > 0, "qemu-io exited before answering {command:?}");
            if line.contains(expect) {
                return;
            }
        }
    }

    /// `qemu-nbd` serving the image on a Unix socket; returns once it
    /// listens (it locks the image before that).
    fn qemu_nbd(path: &Path, socket: &Path, extra: &[&str]) -> Holder {
        let child = Command::new("qemu-nbd")
            .args(extra)
            .arg("-k")
            .arg(socket)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-nbd is required for the lock tests: {e}"));
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Holder { child, stdin: None }
    }

    /// Ends the process: qemu-io by quitting (so its writes are flushed).
    pub(super) fn finish(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample_copy(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let out = qemu_img(&["convert", "-O", "qcow2", "sample.qcow2", p(&path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    path
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).expect("read");
    format!("{:x}", Sha256::digest(bytes))
}

/// Asserts a refusal as qemu-img gives it: exit 1, the lock message and
/// the hint naming the file.
fn assert_lock_refused(out: &std::process::Output, message: &str, file: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(message), "expected {message:?}: {err}");
    assert!(
        err.contains(&format!(
            "Is another process using the image [{}]?",
            file.display()
        )),
        "{err}"
    );
}

#[test]
fn qcow_refuses_images_qemu_io_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sample_copy(dir.path(), "held.qcow2");
    let size_before = super::virtual_size(&img);
    let mut holder = Holder::qemu_io(&img, &["-f", "qcow2"]);
    holder.command("write -P 7 0 64k", "wrote 65536/65536 bytes");

    let resize = qcow(&["resize", p(&img), "+1G"]);
    assert_lock_refused(&resize, "Failed to get \"write\" lock", &img);
    let repair = qcow(&["check", "-r", "all", p(&img)]);
    assert_lock_refused(&repair, "Failed to get \"write\" lock", &img);
    let rebase = qcow(&["rebase", "-b", "", p(&img)]);
    assert_lock_refused(&rebase, "Failed to get \"write\" lock", &img);
    let amend = qcow(&["amend", "-o", "lazy_refcounts=on", p(&img)]);
    assert_lock_refused(&amend, "Failed to get \"write\" lock", &img);
    let bench = qcow(&["bench", "-w", "-c", "10", p(&img)]);
    assert_lock_refused(&bench, "Failed to get \"write\" lock", &img);
    // The commands of snapshots, bitmaps and serving write too.
    let socket = dir.path().join("held.sock");
    for args in [
        vec!["snapshot", "-c", "s", p(&img)],
        vec!["snapshot", "-d", "s", p(&img)],
        vec!["bitmap", "--add", p(&img), "b"],
        vec!["serve", "-k", p(&socket), p(&img)],
    ] {
        let out = qcow(&args);
        assert_lock_refused(&out, "Failed to get \"write\" lock", &img);
    }
    assert!(!socket.exists(), "serve listened on a held image");
    for args in [
        vec!["check", p(&img)],
        vec!["info", p(&img)],
        vec!["map", p(&img)],
        vec!["convert", "-O", "raw", p(&img), "/dev/null"],
    ] {
        let out = qcow(&args);
        assert_lock_refused(&out, "Failed to get shared \"write\" lock", &img);
    }
    // -U shares: the read-only commands run beside the writer.
    for args in [
        vec!["check", "-U", p(&img)],
        vec!["info", "-U", p(&img)],
        vec!["map", "-U", p(&img)],
        vec!["convert", "-U", "-O", "raw", p(&img), "/dev/null"],
    ] {
        let out = qcow(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    // The writer goes on undisturbed; nothing qcow did harmed the image.
    holder.command("write -P 8 1M 64k", "wrote 65536/65536 bytes");
    holder.finish();
    super::assert_check_clean(&img);
    assert_eq!(super::virtual_size(&img), size_before);
    let read = Command::new("qemu-io")
        .args(["-r", "-c", "read -P 7 0 64k", "-c", "read -P 8 1M 64k"])
        .arg(&img)
        .output()
        .expect("qemu-io");
    assert!(
        !stdout(&read).contains("verification failed"),
        "{}",
        stdout(&read)
    );
}

#[test]
fn qcow_reads_beside_a_read_only_qemu_io_but_does_not_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sample_copy(dir.path(), "ro.qcow2");
    let holder = Holder::qemu_io(&img, &["-r", "-f", "qcow2"]);
    let info = qcow(&["info", p(&img)]);
    assert!(info.status.success(), "{}", stderr(&info));
    let resize = qcow(&["resize", p(&img), "+1G"]);
    assert_lock_refused(&resize, "Failed to get \"write\" lock", &img);
    drop(holder);
    let resize = qcow(&["resize", p(&img), "+1G"]);
    assert!(resize.status.success(), "{}", stderr(&resize));
}

#[test]
fn outputs_served_by_qemu_nbd_are_never_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = sample_copy(dir.path(), "served.qcow2");
    let raw = dir.path().join("served.raw");
    assert!(
        qemu_img(&["convert", "-O", "raw", "sample.qcow2", p(&raw)])
            .status
            .success()
    );
    let before = (sha(&served), sha(&raw));
    let _qcow2 = Holder::qemu_nbd(&served, &dir.path().join("a.sock"), &["-f", "qcow2"]);
    let _raw = Holder::qemu_nbd(&raw, &dir.path().join("b.sock"), &["-f", "raw"]);
    for args in [
        vec!["convert", "-O", "qcow2", "sample.qcow2", p(&served)],
        vec!["convert", "-O", "raw", "sample.qcow2", p(&raw)],
        vec!["dd", "if=sample.qcow2", &format!("of={}", p(&served))],
        vec!["dd", "if=sample.qcow2", &format!("of={}", p(&raw))],
        vec!["create", "-q", "-f", "qcow2", p(&served), "1G"],
        vec!["resize", p(&served), "+1G"],
        vec!["resize", "-f", "raw", p(&raw), "+1G"],
    ] {
        // The same refusal, for the same permission, as qemu-img's.
        let ours = qcow(&args);
        let theirs = qemu_img(&args);
        assert_eq!(theirs.status.code(), Some(1), "qemu-img {args:?}");
        let reason = |o: &std::process::Output| {
            stderr(o)
                .lines()
                .find_map(|l| l.find("Failed to get").map(|i| l[i..].to_owned()))
        };
        let expected = reason(&theirs).expect("qemu-img names the lock");
        assert_eq!(
            reason(&ours).as_ref(),
            Some(&expected),
            "{args:?}: {}",
            stderr(&ours)
        );
        let target = if args.iter().any(|a| a.contains("raw")) {
            &raw
        } else {
            &served
        };
        assert_lock_refused(&ours, &expected, target);
    }
    assert_eq!((sha(&served), sha(&raw)), before, "a served file changed");
}

#[test]
fn qemu_tools_are_refused_while_qcow_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sample_copy(dir.path(), "ours.qcow2");
    let options = qcow::OpenOptions::default().writable(true);
    let image = qcow::open(&img, &options).expect("open for writing");
    let io = Command::new("qemu-io")
        .args(["-c", "write 0 4k"])
        .arg(&img)
        .output()
        .expect("qemu-io");
    let err = stderr(&io);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let info = qemu_img(&["info", p(&img)]);
    assert!(
        stderr(&info).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&info)
    );
    let nbd = Command::new("qemu-nbd")
        .args(["-r", "-k"])
        .arg(dir.path().join("n.sock"))
        .arg(&img)
        .output()
        .expect("qemu-nbd");
    assert_eq!(nbd.status.code(), Some(1));
    assert!(
        stderr(&nbd).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&nbd)
    );
    // A second qcow process is refused the same way.
    let second = qcow(&["resize", p(&img), "+1G"]);
    assert_lock_refused(&second, "Failed to get \"write\" lock", &img);
    drop(image);
    let info = qemu_img(&["info", "-U", p(&img)]);
    assert!(info.status.success());
    let io = Command::new("qemu-io")
        .args(["-c", "write 0 4k"])
        .arg(&img)
        .output()
        .expect("qemu-io");
    assert!(io.status.success(), "{}", stderr(&io));
}

#[test]
fn concurrent_resizes_never_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..6 {
        let img = sample_copy(dir.path(), &format!("r{round}.qcow2"));
        let before = super::virtual_size(&img);
        let spawn = |delta: &str| {
            Command::new(env!("CARGO_BIN_EXE_qcow"))
                .args(["resize", p(&img), delta])
                .output()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| spawn("+1G"));
            let b = s.spawn(|| spawn("+2G"));
            (
                a.join().expect("thread").expect("qcow"),
                b.join().expect("thread").expect("qcow"),
            )
        });
        let mut expected = before;
        for (out, grow) in [(&a, 1u64 << 30), (&b, 2 << 30)] {
            if out.status.success() {
                expected += grow;
            } else {
                assert_lock_refused(out, "lock", &img);
            }
        }
        super::assert_check_clean(&img);
        assert_eq!(super::virtual_size(&img), expected, "round {round}");
    }
}

#[test]
fn converting_onto_the_source_is_refused_by_any_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sample_copy(dir.path(), "s.qcow2");
    let link = dir.path().join("sym.qcow2");
    let hard = dir.path().join("hard.qcow2");
    std::os::unix::fs::symlink(&img, &link).expect("symlink");
    std::fs::hard_link(&img, &hard).expect("hard link");
    let before = sha(&img);
    for target in [&img, &link, &hard] {
        for extra in [&[][..], &["-U"][..]] {
            for format in ["qcow2", "raw"] {
                let mut args = vec!["convert"];
                args.extend_from_slice(extra);
                args.extend_from_slice(&["-O", format, p(&img), p(target)]);
                let out = qcow(&args);
                assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
            }
            let of = format!("of={}", p(target));
            let mut args = vec!["dd"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-O", "qcow2", &of]);
            let input = format!("if={}", p(&img));
            args.push(&input);
            let out = qcow(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        }
    }
    assert_eq!(sha(&img), before, "the source changed");
    super::assert_check_clean(&img);
    // The source's backing file is protected too.
    let top = dir.path().join("top.qcow2");
    let made = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&img),
        "-F",
        "qcow2",
        p(&top),
    ]);
    assert!(made.status.success());
    let out = qcow(&["convert", "-U", "-O", "raw", p(&top), p(&hard)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(sha(&img), before, "the backing file changed");
}

#[test]
fn usage_errors_exit_1_like_qemu_img() {
    for args in [
        vec!["bogus"],
        vec!["info"],
        vec!["resize", "--no-such-flag", "x", "1G"],
    ] {
        let out = qcow(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    let theirs = qemu_img(&["info"]);
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(qcow(&["--help"]).status.code(), Some(0));
}

#[test]
fn raw_images_share_writes_except_as_copy_sources_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("vm.raw");
    assert!(
        qemu_img(&["create", "-q", "-f", "raw", p(&raw), "4M"])
            .status
            .success()
    );
    let out = dir.path().join("copy.raw");
    let holder = Holder::qemu_io(&raw, &["-f", "raw"]);
    for args in [
        vec!["info", "-f", "raw", p(&raw)],
        vec!["map", "-f", "raw", p(&raw)],
        vec!["compare", "-f", "raw", "-F", "raw", p(&raw), p(&raw)],
        vec!["convert", "-f", "raw", "-O", "raw", p(&raw), p(&out)],
        vec![
            "dd",
            "-f",
            "raw",
            &format!("if={}", p(&raw)),
            &format!("of={}", p(&out)),
        ],
    ] {
        let ours = qcow(&args);
        let theirs = qemu_img(&args);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{args:?}: qcow {}, qemu-img {}",
            stderr(&ours),
            stderr(&theirs)
        );
    }
    drop(holder);
}

#[test]
fn create_with_a_data_file_touches_nothing_while_the_image_is_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sample_copy(dir.path(), "busy.qcow2");
    let data = dir.path().join("data.raw");
    std::fs::write(&data, b"precious").expect("write");
    let holder = Holder::qemu_io(&img, &["-f", "qcow2"]);
    let out = qcow(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&data)),
        p(&img),
        "1M",
    ]);
    assert_lock_refused(&out, "Failed to get \"write\" lock", &img);
    assert_eq!(std::fs::read(&data).expect("read"), b"precious");
    drop(holder);
    // A creation that fails after making its data file removes it.
    let fresh = dir.path().join("fresh.raw");
    let out = qcow(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},cluster_size=4096", p(&fresh)),
        p(&dir.path().join("no-such-dir/x.qcow2")),
        "1M",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!fresh.exists(), "the data file made for it is left behind");
}
