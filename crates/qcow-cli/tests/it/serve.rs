//! `qcow serve` with real clients: qemu-img and qemu-io over `nbd+unix://`
//! and `nbd://127.0.0.1`, block status beside qemu-nbd's on the same
//! image, hostile clients written here, and a clean stop on SIGTERM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{fixtures, p, qemu_img, qemu_io, stderr, stdout, testdata};

/// A server process, stopped (SIGTERM, then waited for) when dropped.
pub(super) struct Server {
    child: Option<Child>,
    socket: Option<PathBuf>,
}

impl Server {
    /// Starts `program args` and waits until `socket` exists or `port`
    /// accepts connections.
    pub(super) fn start(
        program: &str,
        args: &[&str],
        socket: Option<&Path>,
        port: Option<u16>,
    ) -> Server {
        // A socket file a refused server left behind is no sign of life.
        if let Some(s) = socket {
            let _ = std::fs::remove_file(s);
        }
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} could not be started (it is required): {e}"));
        let mut server = Server {
            child: Some(child),
            socket: socket.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = match (socket, port) {
                (Some(s), _) => s.exists(),
                (None, Some(port)) => std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(drop)
                    .is_ok(),
                _ => true,
            };
            if ready {
                break;
            }
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let mut err = String::new();
                if let Some(mut e) = server.child.as_mut().and_then(|c| c.stderr.take()) {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{program} {args:?} exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// `qcow serve ARGS`.
    pub(super) fn qcow(args: &[&str], socket: Option<&Path>, port: Option<u16>) -> Server {
        Server::start(env!("CARGO_BIN_EXE_qcow"), args, socket, port)
    }

    /// `qcow serve FLAGS IMAGE`, or `qemu-nbd -f qcow2 FLAGS IMAGE`, on the
    /// Unix socket `socket` (which `flags` name).
    fn either(program: &str, flags: &[&str], image: &Path, socket: &Path) -> Server {
        let mut args = if program == "qemu-nbd" {
            vec!["-f", "qcow2"]
        } else {
            vec!["serve"]
        };
        args.extend(flags);
        args.push(p(image));
        if program == "qemu-nbd" {
            Server::start("qemu-nbd", &args, Some(socket), None)
        } else {
            Server::qcow(&args, Some(socket), None)
        }
    }

    /// Sends SIGTERM and waits; returns the exit code and standard error.
    pub(super) fn stop(&mut self) -> (Option<i32>, String) {
        let Some(mut child) = self.child.take() else {
            return (None, String::new());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), err)
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            p(self.socket.as_ref().expect("a unix socket"))
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port free on the loopback address (for a moment).
pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn raw_of(source: &[&str], out: &Path) -> Vec<u8> {
    let mut args = vec!["convert"];
    args.extend(source);
    args.extend(["-O", "raw", p(out)]);
    let o = qemu_img(&args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    std::fs::read(out).expect("raw")
}

#[test]
fn every_fixture_reads_over_nbd_as_it_reads_locally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s");
    let mut served = 0;
    for name in fixtures() {
        if super::encrypted(&name) {
            continue;
        }
        let path = testdata().join(&name);
        let mut server = Server::qcow(
            &["serve", "-r", "-k", p(&socket), p(&path)],
            Some(&socket),
            None,
        );
        let remote = raw_of(
            &["-f", "raw", &server.uri()],
            &dir.path().join("remote.raw"),
        );
        let local = raw_of(&[p(&path)], &dir.path().join("local.raw"));
        assert!(remote == local, "{name}: the served disk differs");
        let (code, err) = server.stop();
        assert_eq!(code, Some(0), "{name}: {err}");
        assert!(!socket.exists(), "{name}: the socket stayed");
        served += 1;
    }
    assert!(served >= 10, "only {served} fixtures");
}

#[test]
fn writes_over_nbd_land_as_qemu_io_writes_them_locally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commands = [
        "write -P 1 0 1M",
        "write -P 2 3M 12k",
        "write -z 512k 64k",
        "write -z -u 2M 128k",
        "discard 3M 4k",
        "write -P 3 16773120 4096",
        "flush",
        "write -P 4 100 1000",
        "write -z 5M 7",
    ];
    for (transport, discard) in [("unix", "unmap"), ("tcp", "ignore")] {
        let served = dir.path().join(format!("{transport}.qcow2"));
        let local = dir.path().join(format!("{transport}.local.qcow2"));
        let o = qemu_img(&["create", "-q", "-f", "qcow2", p(&served), "16M"]);
        assert!(o.status.success());
        std::fs::copy(&served, &local).expect("copy");
        let socket = dir.path().join("w.sock");
        let port = free_port();
        let port_text = port.to_string();
        let discard_flag = format!("--discard={discard}");
        let (mut server, uri) = if transport == "unix" {
            let s = Server::qcow(
                &["serve", "-k", p(&socket), &discard_flag, p(&served)],
                Some(&socket),
                None,
            );
            let uri = s.uri();
            (s, uri)
        } else {
            let s = Server::qcow(
                &[
                    "serve",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port_text,
                    &discard_flag,
                    p(&served),
                ],
                None,
                Some(port),
            );
            // The readiness probe took the one client a non-persistent
            // server serves: start again, persistent.
            drop(s);
            let s = Server::qcow(
                &[
                    "serve",
                    "-t",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port_text,
                    &discard_flag,
                    p(&served),
                ],
                None,
                Some(port),
            );
            (s, format!("nbd://127.0.0.1:{port}"))
        };
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.into());
        }
        args.push(uri.clone());
        let out = Command::new("qemu-io")
            .args(&args)
            .output()
            .expect("qemu-io is required");
        assert!(
            out.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("error"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let (code, err) = server.stop();
        assert_eq!(code, Some(0), "{transport}: {err}");
        qemu_io(&local, &commands);
        super::assert_check_clean(&served);
        let cmp = qemu_img(&["compare", p(&served), p(&local)]);
        assert!(cmp.status.success(), "{transport}: {}", stdout(&cmp));
        let info = stdout(&qemu_img(&["info", "--output=json", p(&served)]));
        assert!(info.contains("\"dirty-flag\": false"), "{info}");
    }
}

/// `qemu-img map` of the export `uri`, through the metadata context
/// `context` when given (qemu's x-dirty-bitmap), offsets left out (they
/// are the export's own).
fn map(uri: &str, context: Option<&str>) -> String {
    let spec = match context {
        None => uri.to_owned(),
        Some(c) => {
            let socket = uri.split("socket=").nth(1).expect("unix uri");
            format!("driver=nbd,server.type=unix,server.path={socket},x-dirty-bitmap={c}")
        }
    };
    let o = if context.is_some() {
        qemu_img(&["map", "--output=json", "--image-opts", &spec])
    } else {
        qemu_img(&["map", "--output=json", "-f", "raw", &spec])
    };
    assert!(o.status.success(), "{spec}: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn block_status_and_metadata_contexts_match_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "8M"])
            .status
            .success()
    );
    qemu_io(&base, &["write -P 1 0 2M", "write -c -P 2 4M 64k"]);
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top)
        ])
        .status
        .success()
    );
    assert!(
        qemu_img(&["bitmap", "--add", p(&top), "b"])
            .status
            .success()
    );
    qemu_io(
        &top,
        &[
            "write -P 3 1M 128k",
            "write -z 6M 64k",
            "write -z 1536k 64k",
        ],
    );
    let ours_sock = dir.path().join("ours");
    let theirs_sock = dir.path().join("theirs");
    let flags = ["-r", "-t", "-A", "-B", "b"];
    let mut ours_args = vec!["serve", "-k", p(&ours_sock)];
    ours_args.extend(flags);
    ours_args.push(p(&top));
    let mut theirs_args = vec!["-k", p(&theirs_sock), "-f", "qcow2"];
    theirs_args.extend(flags);
    theirs_args.push(p(&top));
    let mut ours = Server::qcow(&ours_args, Some(&ours_sock), None);
    let mut theirs = Server::start("qemu-nbd", &theirs_args, Some(&theirs_sock), None);
    for context in [
        None,
        Some("qemu:dirty-bitmap:b"),
        Some("qemu:allocation-depth"),
    ] {
        assert_eq!(
            map(&ours.uri(), context),
            map(&theirs.uri(), context),
            "{context:?}"
        );
    }
    // The export list, as nbd clients see it through qemu-img info.
    let a = stdout(&qemu_img(&["info", "-f", "raw", &ours.uri()]));
    let b = stdout(&qemu_img(&["info", "-f", "raw", &theirs.uri()]));
    assert_eq!(
        a.replace(p(&ours_sock), "S"),
        b.replace(p(&theirs_sock), "S")
    );
    assert_eq!(ours.stop().0, Some(0));
    theirs.stop();
}

/// A client that speaks just enough NBD to misbehave.
struct RawClient(UnixStream);

impl RawClient {
    /// Connects and selects the default export with NBD_OPT_GO (simple
    /// replies).
    fn connect(socket: &Path) -> RawClient {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut go = Vec::new();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&go).expect("go");
        loop {
            let mut header = [0u8; 20];
            s.read_exact(&mut header).expect("option reply");
            let kind = u32::from_be_bytes(header[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(header[16..20].try_into().expect("4"));
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).expect("option data");
            if kind == 1 {
                break;
            }
            assert!(kind < 1 << 31, "GO refused: {kind:#x}");
        }
        RawClient(s)
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r).expect("request");
    }

    /// The error of a simple reply (reading `data` bytes after it).
    fn reply(&mut self, data: usize) -> u32 {
        let mut header = [0u8; 16];
        self.0.read_exact(&mut header).expect("reply");
        assert_eq!(&header[..4], &0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(header[4..8].try_into().expect("4"));
        if error == 0 && data > 0 {
            let mut buf = vec![0u8; data];
            self.0.read_exact(&mut buf).expect("data");
        }
        error
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_clients_get_errors_and_the_server_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("h.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "4M"])
            .status
            .success()
    );
    let socket = dir.path().join("h.sock");
    let mut server = Server::qcow(
        &["serve", "-t", "-e", "8", "-k", p(&socket), p(&image)],
        Some(&socket),
        None,
    );
    const EINVAL: u32 = 22;
    // Garbage instead of the client's flags: the server hangs up.
    {
        let mut s = UnixStream::connect(&socket).expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        s.write_all(b"garbage garbage garbage").expect("write");
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    // Requests past the end, too large, unknown, with unknown flags.
    let mut c = RawClient::connect(&socket);
    c.request(0, 0, 4 << 20, 512, &[]);
    assert_eq!(c.reply(512), EINVAL);
    c.request(0, 0, u64::MAX - 10, 512, &[]);
    assert_eq!(c.reply(512), EINVAL);
    c.request(0, 0, 0, 64 << 20, &[]);
    assert_eq!(c.reply(64 << 20), EINVAL);
    c.request(42, 0, 0, 512, &[]);
    assert_eq!(c.reply(0), EINVAL);
    c.request(0, 1 << 9, 0, 512, &[]);
    assert_eq!(c.reply(512), EINVAL);
    // A write past the end has no space (qemu-nbd's answer).
    c.request(1, 0, 4 << 20, 4, &[1, 2, 3, 4]);
    assert_eq!(c.reply(0), 28);
    // Block status without structured replies.
    c.request(7, 0, 0, 4096, &[]);
    assert_eq!(c.reply(0), EINVAL);
    // Still serving on this connection.
    c.request(1, 1, 4096, 4, &[9, 9, 9, 9]);
    assert_eq!(c.reply(0), 0);
    c.request(0, 0, 4096, 4, &[]);
    assert_eq!(c.reply(4), 0);
    // A bad magic: the connection ends.
    c.0.write_all(&[0u8; 28]).expect("write");
    assert!(c.closed());
    // A write far too large to skip: an error, then the connection ends.
    let mut c = RawClient::connect(&socket);
    c.request(1, 0, 0, u32::MAX, &[]);
    assert_eq!(c.reply(0), EINVAL);
    assert!(c.closed());
    // Disconnects in the middle of a request and of a payload.
    for cut in [10usize, 28 + 100] {
        let mut c = RawClient::connect(&socket);
        let mut r = Vec::new();
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&1u64.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&4096u32.to_be_bytes());
        r.resize(28 + 4096, 5);
        c.0.write_all(&r[..cut]).expect("partial");
    }
    // Many clients at once, coming and going.
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket);
                c.request(1, 0, i * 4096, 4096, &[i as u8; 4096]);
                assert_eq!(c.reply(0), 0);
                c.request(2, 0, 0, 0, &[]);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    // The server still serves, and the image is whole.
    let o = qemu_img(&["info", "-f", "raw", &server.uri()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (code, err) = server.stop();
    assert_eq!(code, Some(0), "{err}");
    super::assert_check_clean(&image);
    let raw = raw_of(&[p(&image)], &dir.path().join("h.raw"));
    // The clients' writes came after the single one above.
    for i in 0..32usize {
        assert!(
            raw[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "client {i}"
        );
    }
}

#[test]
fn sigterm_stores_bitmaps_and_clears_the_dirty_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("t.qcow2");
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&image),
            "8M"
        ])
        .status
        .success()
    );
    assert!(
        qemu_img(&["bitmap", "--add", p(&image), "b"])
            .status
            .success()
    );
    let socket = dir.path().join("t.sock");
    let mut server = Server::qcow(
        &["serve", "-t", "-k", p(&socket), p(&image)],
        Some(&socket),
        None,
    );
    let uri = server.uri();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 2M 64k", &uri])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    // While served, the image is locked against other writers.
    let o = Command::new("qemu-io")
        .args(["-c", "write 0 512", p(&image)])
        .output()
        .expect("qemu-io");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lock"));
    let (code, err) = server.stop();
    assert_eq!(code, Some(0), "{err}");
    let info = stdout(&qemu_img(&["info", "--output=json", p(&image)]));
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    assert!(!info.contains("in-use"), "{info}");
    super::assert_check_clean(&image);
    let sock = dir.path().join("check.sock");
    let mut check = Server::start(
        "qemu-nbd",
        &["-r", "-f", "qcow2", "-B", "b", "-k", p(&sock), p(&image)],
        Some(&sock),
        None,
    );
    let dirty = map(&check.uri(), Some("qemu:dirty-bitmap:b"));
    assert!(
        dirty.contains("\"start\": 2097152, \"length\": 65536, \"depth\": 0, \"present\": false"),
        "{dirty}"
    );
    check.stop();
}

#[test]
fn exports_list_as_qemu_nbd_lists_its_own() {
    // qemu-nbd --list negotiates extended headers and lists the export:
    // name, description, size, flags, block sizes, metadata contexts.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("l.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "4M"])
            .status
            .success()
    );
    assert!(
        qemu_img(&["bitmap", "--add", p(&image), "bm"])
            .status
            .success()
    );
    let socket = dir.path().join("l.sock");
    for extra in [
        &["-r", "-e", "1"][..],
        &[
            "-r",
            "-e",
            "3",
            "-x",
            "exp",
            "-D",
            "a description",
            "-A",
            "-B",
            "bm",
        ][..],
        &["-x", "writable"][..],
    ] {
        let list = |program: &str| {
            let mut flags = vec!["-t", "-k", p(&socket)];
            flags.extend(extra);
            let mut server = Server::either(program, &flags, &image, &socket);
            let out = Command::new("qemu-nbd")
                .args(["-L", "-k", p(&socket)])
                .output()
                .expect("qemu-nbd");
            let (code, err) = server.stop();
            assert!(err.is_empty(), "{program} {extra:?}: {err}");
            assert!(program == "qemu-nbd" || code == Some(0));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let ours = list("qcow");
        assert!(ours.contains("exports available: 1"), "{ours}");
        assert_eq!(ours, list("qemu-nbd"), "{extra:?}");
    }
}

/// Runs `tool args` (a libnbd tool: libnbd-bin), failing the test, and
/// saying so, when it is missing.
pub(super) fn libnbd(tool: &str, args: &[&str]) -> String {
    // nbdsh runs the system's python3, which has libnbd's module
    // (python3-libnbd); another python3 first on PATH would not.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new(tool)
        .args(args)
        .env("PATH", path)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (Debian package libnbd-bin): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The same script of flag queries, good and bad requests, through nbdsh.
const NBDSH_SCRIPT: &str = r#"
print("size", h.get_size(), "ro", h.is_read_only(), "trim", h.can_trim(),
      "zero", h.can_zero(), "fua", h.can_fua(), "flush", h.can_flush(),
      "multi", h.can_multi_conn(), "cache", h.can_cache(), "df", h.can_df(),
      "fast_zero", h.can_fast_zero(), "structured", h.get_structured_replies_negotiated())
tests = [("read past end", lambda: h.pread(512, h.get_size())),
         ("read across the end", lambda: h.pread(8192, h.get_size() - 4096)),
         ("write", lambda: h.pwrite(b"a" * 512, 4096)),
         ("write fua", lambda: h.pwrite(b"b" * 512, 8192, nbd.CMD_FLAG_FUA)),
         ("zero", lambda: h.zero(4096, 0)),
         ("zero no hole", lambda: h.zero(4096, 65536, nbd.CMD_FLAG_NO_HOLE)),
         ("trim", lambda: h.trim(4096, 65536)),
         ("cache", lambda: h.cache(4096, 0)),
         ("flush", lambda: h.flush()),
         ("read back", lambda: h.pread(512, 4096)),
         ("write past end", lambda: h.pwrite(b"c" * 512, h.get_size()))]
for name, f in tests:
    try:
        r = f()
        print(name, "ok", r if isinstance(r, (bytes, bytearray)) else "")
    except nbd.Error as e:
        print(name, "error", e.errno)
"#;

#[test]
fn libnbd_clients_see_what_they_see_of_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "8M"])
            .status
            .success()
    );
    qemu_io(&base, &["write -P 1 0 2M"]);
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top)
        ])
        .status
        .success()
    );
    assert!(
        qemu_img(&["bitmap", "--add", p(&top), "bm"])
            .status
            .success()
    );
    qemu_io(&top, &["write -P 2 1M 128k", "write -z 6M 64k"]);
    let socket = dir.path().join("n.sock");
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    // Reading: nbdinfo's description and maps of every context.
    let view = |program: &str| -> Vec<String> {
        let flags = ["-r", "-t", "-A", "-B", "bm", "-k", p(&socket)];
        let mut server = Server::either(program, &flags, &top, &socket);
        let mut seen = vec![
            libnbd("nbdinfo", &[&uri]),
            libnbd("nbdinfo", &["--list", &uri]),
        ];
        for map in [
            "--map",
            "--map=qemu:allocation-depth",
            "--map=qemu:dirty-bitmap:bm",
        ] {
            seen.push(libnbd("nbdinfo", &[map, &uri]));
        }
        let copy = dir.path().join(format!("{program}.raw"));
        libnbd("nbdcopy", &[&uri, p(&copy)]);
        seen.push(format!(
            "{:?}",
            std::fs::read(&copy)
                .expect("copy")
                .iter()
                .map(|&b| b as u64)
                .sum::<u64>()
        ));
        server.stop();
        seen
    };
    let ours = view("qcow");
    assert_eq!(ours, view("qemu-nbd"));
    assert!(ours[2].contains("data"), "{}", ours[2]);
    // Writing: the same nbdsh script against each server, on copies.
    let script = |program: &str| -> (String, PathBuf) {
        let image = dir.path().join(format!("{program}.qcow2"));
        std::fs::copy(&top, &image).expect("copy");
        let flags = ["-t", "--discard=unmap", "-k", p(&socket)];
        let mut server = Server::either(program, &flags, &image, &socket);
        let out = libnbd("nbdsh", &["-u", &uri, "-c", NBDSH_SCRIPT]);
        // nbdcopy into the export: a raw file's bytes land at offset 0.
        let source = dir.path().join("source.raw");
        std::fs::write(&source, vec![9u8; 3 << 20]).expect("write");
        libnbd("nbdcopy", &[p(&source), &uri]);
        let (code, err) = server.stop();
        assert!(program == "qemu-nbd" || code == Some(0), "{err}");
        (out, image)
    };
    let (ours, our_image) = script("qcow");
    let (theirs, their_image) = script("qemu-nbd");
    assert_eq!(ours, theirs);
    assert!(ours.contains("read past end error"), "{ours}");
    super::assert_check_clean(&our_image);
    let cmp = qemu_img(&["compare", p(&our_image), p(&their_image)]);
    assert!(cmp.status.success(), "{}", stdout(&cmp));
}

#[test]
fn a_writable_export_shows_its_bitmap_as_it_changes_as_qemu_nbd_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("live.sock");
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    let mut seen = Vec::new();
    for program in ["qcow", "qemu-nbd"] {
        let image = dir.path().join(format!("{program}.qcow2"));
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "8M"])
                .status
                .success()
        );
        assert!(
            qemu_img(&["bitmap", "--add", p(&image), "live"])
                .status
                .success()
        );
        let flags = ["-t", "-B", "live", "-k", p(&socket)];
        let mut server = Server::either(program, &flags, &image, &socket);
        let before = libnbd("nbdinfo", &["--map=qemu:dirty-bitmap:live", &uri]);
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 1 1M 4k",
                "-c",
                "write -z 5M 64k",
                &uri,
            ])
            .output()
            .expect("qemu-io");
        assert!(out.status.success());
        let after = libnbd("nbdinfo", &["--map=qemu:dirty-bitmap:live", &uri]);
        server.stop();
        assert_ne!(before, after, "{program}: the bitmap did not move");
        seen.push((before, after));
    }
    assert_eq!(seen[0], seen[1]);
}

#[test]
fn snapshots_names_and_server_lifetimes_as_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("s.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "4M"])
            .status
            .success()
    );
    qemu_io(&image, &["write -P 1 0 1M"]);
    assert!(
        qemu_img(&["snapshot", "-c", "snap", p(&image)])
            .status
            .success()
    );
    qemu_io(&image, &["write -P 2 0 1M"]);
    let socket = dir.path().join("s.sock");
    // Refusals, in qemu-nbd's words.
    for args in [&["-l", "nosuch"][..], &["-r", "-B", "nosuch"][..]] {
        let mut ours = vec!["serve", "-k", p(&socket)];
        ours.extend(args);
        ours.push(p(&image));
        let a = super::qcow(&ours);
        let mut theirs = vec!["-f", "qcow2", "-k", p(&socket)];
        theirs.extend(args);
        theirs.push(p(&image));
        let b = Command::new("qemu-nbd")
            .args(&theirs)
            .output()
            .expect("qemu-nbd");
        assert_eq!(a.status.code(), b.status.code(), "{args:?}");
        assert_eq!(
            stderr(&a).replacen("qcow", "qemu-nbd", 1),
            String::from_utf8_lossy(&b.stderr),
            "{args:?}"
        );
    }
    // A snapshot served read-only: its data, not the disk's.
    let mut server = Server::qcow(
        &["serve", "-t", "-l", "snap", "-k", p(&socket), p(&image)],
        Some(&socket),
        None,
    );
    let snap = raw_of(&["-f", "raw", &server.uri()], &dir.path().join("snap.raw"));
    assert!(snap[..1 << 20].iter().all(|&b| b == 1));
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &server.uri()])
        .output()
        .expect("qemu-io");
    // The export is read-only: writers are refused.
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
    server.stop();
    // An export name: only that name is served.
    let mut server = Server::qcow(
        &[
            "serve",
            "-t",
            "-r",
            "-x",
            "disk",
            "-k",
            p(&socket),
            p(&image),
        ],
        Some(&socket),
        None,
    );
    let named = format!("nbd+unix:///disk?socket={}", p(&socket));
    assert!(qemu_img(&["info", "-f", "raw", &named]).status.success());
    assert!(
        !qemu_img(&["info", "-f", "raw", &server.uri()])
            .status
            .success()
    );
    server.stop();
    // Not persistent: the server ends when its client leaves.
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcow"))
        .args(["serve", "-r", "-k", p(&socket), p(&image)])
        .spawn()
        .expect("qcow");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    assert!(qemu_img(&["info", "-f", "raw", &uri]).status.success());
    let status = child.wait().expect("wait");
    assert!(status.success());
    assert!(!socket.exists());
    // --fork returns once it listens; --pid-file names the server.
    let _ = std::fs::remove_file(&socket);
    let pid_file = dir.path().join("pid");
    let fork = super::qcow(&[
        "serve",
        "--fork",
        "-t",
        "-r",
        "--pid-file",
        p(&pid_file),
        "-k",
        p(&socket),
        p(&image),
    ]);
    assert!(fork.status.success(), "{}", stderr(&fork));
    assert!(socket.exists());
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    assert!(qemu_img(&["info", "-f", "raw", &uri]).status.success());
    let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while socket.exists() || pid_file.exists() {
        assert!(Instant::now() < deadline, "the forked server did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn detect_zeroes_lays_out_writes_of_zeros_as_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("z.sock");
    for mode in ["off", "on", "unmap"] {
        let mut maps = Vec::new();
        for program in ["qcow", "qemu-nbd"] {
            let image = dir.path().join(format!("{program}-{mode}.qcow2"));
            assert!(
                qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "4M"])
                    .status
                    .success()
            );
            qemu_io(&image, &["write -P 5 0 1M"]);
            let detect = format!("--detect-zeroes={mode}");
            let flags = ["-t", "--discard=unmap", detect.as_str(), "-k", p(&socket)];
            let mut server = Server::either(program, &flags, &image, &socket);
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0 0 512k",
                    "-c",
                    "write -P 0 2M 256k",
                ])
                .arg(server.uri())
                .output()
                .expect("qemu-io");
            assert!(out.status.success());
            server.stop();
            super::assert_check_clean(&image);
            let map = stdout(&qemu_img(&["map", "--output=json", p(&image)]));
            // Host offsets are each writer's own.
            let layout: Vec<String> = map
                .lines()
                .map(|l| l.split("\"offset\"").next().unwrap_or(l).to_owned())
                .collect();
            maps.push(layout);
        }
        assert_eq!(maps[0], maps[1], "--detect-zeroes={mode}");
    }
}
