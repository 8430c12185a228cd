//! NBD over TLS beside QEMU, with QEMU's x509 credential directories (made
//! as iotest 233 makes them): qemu-img and qemu-io (GnuTLS) as clients of
//! `qcow serve --tls-creds`, and qcow as a client of
//! `qemu-nbd --tls-creds` beside qemu-img; what is refused, refused in
//! qemu-img's words.

#[allow(dead_code, unreachable_pub)]
#[path = "../../../qcow-nbd/tests/support/certs.rs"]
mod certs;

use std::path::Path;
use std::process::{Command, Output};

use super::serve::{Server, free_port};
use super::{p, qcow, qemu_img, stderr, stdout};

/// The `--object` of credentials in `dir` for `endpoint`.
fn object(dir: &Path, endpoint: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint={endpoint}", p(dir))
}

/// `driver=nbd` options for a TLS connection to `host:port`.
fn nbd_opts(host: &str, port: u16) -> String {
    format!("driver=nbd,host={host},port={port},tls-creds=tls0")
}

/// qemu-io's `commands` on an image named by options.
fn qemu_io_opts(object: &str, opts: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--object", object, "--image-opts"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(opts).output().expect("qemu-io is required")
}

/// `qcow serve` (`program` "qcow") or qemu-nbd, persistent, serving `img`
/// over TLS with the credentials in `server_dir` on a free loopback port,
/// with `extra` flags: the server and its port.
fn serve_tls(program: &str, server_dir: &Path, img: &Path, extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let port_text = port.to_string();
    let object = object(server_dir, "server");
    let mut args: Vec<&str> = if program == "qcow" {
        vec!["serve"]
    } else {
        Vec::new()
    };
    args.extend([
        "-t",
        "-f",
        "qcow2",
        "-b",
        "127.0.0.1",
        "-p",
        &port_text,
        "--object",
        &object,
        "--tls-creds",
        "tls0",
    ]);
    args.extend(extra);
    args.push(p(img));
    let server = if program == "qcow" {
        Server::qcow(&args, None, Some(port))
    } else {
        Server::start(program, &args, None, Some(port))
    };
    (server, port)
}

/// A 64 MiB qcow2 image with 0x11 in its second MiB.
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    let o = qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    super::qemu_io(&img, &["write -q -P 0x11 1M 1M"]);
    img
}

/// Standard error with the program's name taken off each line's start.
fn message(o: &Output) -> String {
    stderr(o)
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("qemu-nbd: "))
                .or_else(|| l.strip_prefix("qcow: "))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn qemu_clients_use_a_tls_qcow_server() {
    let dir = tempfile::tempdir().unwrap();
    let creds = certs::make(dir.path());
    let img = image(dir.path());
    let (mut server, port) = serve_tls("qcow", &creds.server, &img, &[]);
    let client = object(&creds.client, "client");
    let opts = nbd_opts("127.0.0.1", port);

    let info = qemu_img(&["info", "--object", &client, "--image-opts", &opts]);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(
        stdout(&info).contains("virtual size: 64 MiB (67108864 bytes)"),
        "{}",
        stdout(&info)
    );
    let io = qemu_io_opts(
        &client,
        &opts,
        &[
            "read -P 0x11 1M 1M",
            "write -P 0x22 1M 1M",
            "read -P 0x22 1M 1M",
        ],
    );
    assert!(
        io.status.success() && !stdout(&io).contains("verification failed"),
        "{}{}",
        stdout(&io),
        stderr(&io)
    );
    // qcow as a client of its own server, beside qemu-img.
    let ours = qcow(&["info", "--object", &client, "--image-opts", &opts]);
    let theirs = qemu_img(&["info", "--object", &client, "--image-opts", &opts]);
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert_eq!(stdout(&ours), stdout(&theirs));

    // Refused: a plain client, a wrong host name, a stranger's authority.
    let plain = qemu_img(&["info", &format!("nbd://127.0.0.1:{port}")]);
    assert!(!plain.status.success());
    assert!(
        message(&plain).contains(
            "TLS negotiation required before option 7 (go)\nDid you forget a valid tls-creds?\n\
             server reported: Option 0x7 not permitted before TLS"
        ),
        "{}",
        stderr(&plain)
    );
    let misnamed = qemu_img(&[
        "info",
        "--object",
        &client,
        "--image-opts",
        &nbd_opts("localhost", port),
    ]);
    assert!(
        message(&misnamed).contains("Certificate does not match the hostname localhost"),
        "{}",
        stderr(&misnamed)
    );
    let stranger = object(&creds.stranger, "client");
    let unknown = qemu_img(&["info", "--object", &stranger, "--image-opts", &opts]);
    assert!(!unknown.status.success(), "{}", stdout(&unknown));

    // The server still serves, and its image is sound when it stops.
    let again = qemu_img(&["info", "--object", &client, "--image-opts", &opts]);
    assert!(again.status.success(), "{}", stderr(&again));
    let (code, err) = server.stop();
    assert_eq!(code, Some(0), "{err}");
    let check = qemu_img(&["check", p(&img)]);
    assert!(check.status.success(), "{}", stdout(&check));
    super::qemu_io(&img, &["read -q -P 0x22 1M 1M"]);
}

#[test]
fn qcow_reads_and_writes_a_tls_qemu_nbd_export_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let creds = certs::make(dir.path());
    let img = image(dir.path());
    let (_server, port) = serve_tls("qemu-nbd", &creds.server, &img, &["-e", "4"]);
    let client = object(&creds.client, "client");
    let opts = nbd_opts("127.0.0.1", port);

    for args in [
        vec!["info", "--object", &client, "--image-opts", &opts],
        vec!["map", "--object", &client, "--image-opts", &opts],
    ] {
        let (ours, theirs) = (qcow(&args), qemu_img(&args));
        assert!(ours.status.success(), "{args:?}: {}", stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
    }
    // A copy out, byte for byte qemu-img's.
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    for (tool, out) in [("qcow", &a), ("qemu-img", &b)] {
        let args = [
            "convert",
            "--object",
            &client,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            p(out),
        ];
        let o = if tool == "qcow" {
            qcow(&args)
        } else {
            qemu_img(&args)
        };
        assert!(o.status.success(), "{tool}: {}", stderr(&o));
    }
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    // A copy in: the export then compares equal to the source.
    let source = dir.path().join("source.raw");
    std::fs::write(&source, vec![0x5au8; 64 << 20]).unwrap();
    let into = qcow(&[
        "convert",
        "-n",
        "--object",
        &client,
        "-f",
        "raw",
        p(&source),
        "--target-image-opts",
        &opts,
    ]);
    assert!(into.status.success(), "{}", stderr(&into));
    let compare = qemu_img(&[
        "compare",
        "--object",
        &client,
        "--image-opts",
        &opts,
        &format!("driver=raw,file.filename={}", p(&source)),
    ]);
    assert!(compare.status.success(), "{}", stdout(&compare));

    // Refusals, in qemu-img's words and exit codes.
    let stranger = object(&creds.stranger, "client");
    for args in [
        vec!["info".to_owned(), format!("nbd://127.0.0.1:{port}")],
        vec![
            "info".to_owned(),
            "--object".to_owned(),
            client.clone(),
            "--image-opts".to_owned(),
            nbd_opts("localhost", port),
        ],
        vec![
            "info".to_owned(),
            "--object".to_owned(),
            stranger.clone(),
            "--image-opts".to_owned(),
            opts.clone(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ours, theirs) = (qcow(&args), qemu_img(&args));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(message(&ours), message(&theirs), "{args:?}");
    }
}

#[test]
fn a_tls_client_of_a_plain_server_is_told_so_as_qemu_img_is() {
    let dir = tempfile::tempdir().unwrap();
    let creds = certs::make(dir.path());
    let img = image(dir.path());
    let port = free_port();
    let port_text = port.to_string();
    let _server = Server::start(
        "qemu-nbd",
        &[
            "-t",
            "-f",
            "qcow2",
            "-b",
            "127.0.0.1",
            "-p",
            &port_text,
            p(&img),
        ],
        None,
        Some(port),
    );
    let client = object(&creds.client, "client");
    let args = [
        "info",
        "--object",
        &client,
        "--image-opts",
        &nbd_opts("127.0.0.1", port),
    ];
    let (ours, theirs) = (qcow(&args), qemu_img(&args));
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(message(&ours), message(&theirs));
    assert!(message(&ours).contains("server reported: TLS not configured"));
}

#[test]
fn credentials_missing_or_unusable_are_refused_before_serving_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let before = std::fs::read(&img).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let socket = dir.path().join("sock");
    let empty_server = object(&empty, "server");
    let empty_client = object(&empty, "client");
    for flags in [
        vec!["--tls-creds", "tls0"],
        vec!["--object", "secret,id=tls0,data=x", "--tls-creds", "tls0"],
        vec!["--object", &empty_server, "--tls-creds", "tls0"],
    ] {
        let mut args = flags.clone();
        args.extend(["-k", p(&socket), "-f", "qcow2", p(&img)]);
        let theirs = Command::new("qemu-nbd")
            .args(&args)
            .output()
            .expect("qemu-nbd is required");
        let mut serve = vec!["serve"];
        serve.extend(&args);
        let ours = qcow(&serve);
        assert_eq!(ours.status.code(), theirs.status.code(), "{flags:?}");
        assert_eq!(ours.status.code(), Some(1), "{flags:?}");
        assert_eq!(message(&ours), message(&theirs), "{flags:?}");
        assert!(!socket.exists(), "{flags:?}: a socket was left behind");
    }
    for (flags, opts) in [
        (vec![], "driver=nbd,host=127.0.0.1,port=1,tls-creds=tls9"),
        (
            vec!["--object", &empty_client],
            "driver=nbd,host=127.0.0.1,port=1,tls-creds=tls0",
        ),
    ] {
        let mut args = vec!["info"];
        args.extend(&flags);
        args.extend(["--image-opts", opts]);
        let (ours, theirs) = (qcow(&args), qemu_img(&args));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(message(&ours), message(&theirs), "{args:?}");
    }
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

#[test]
fn nbdcopy_writes_and_reads_a_tls_qcow_server_over_several_connections() {
    let dir = tempfile::tempdir().unwrap();
    let creds = certs::make(dir.path());
    let img = image(dir.path());
    // Data that is not the same from one MiB to the next.
    let source = dir.path().join("source.raw");
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &data).unwrap();
    let (mut server, port) = serve_tls("qcow", &creds.server, &img, &["-e", "4"]);
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        p(&creds.client)
    );
    // nbdcopy: four connections (the export allows them), many requests
    // in flight on each.
    super::serve::libnbd("nbdcopy", &["-C", "4", p(&source), &uri]);
    let back = dir.path().join("back.raw");
    super::serve::libnbd("nbdcopy", &["-C", "4", &uri, p(&back)]);
    assert!(std::fs::read(&back).unwrap() == data, "read back differs");
    let (code, err) = server.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "the server complained: {err}");
    let check = qemu_img(&["check", p(&img)]);
    assert!(check.status.success(), "{}", stdout(&check));
    let compare = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(&img), p(&source)]);
    assert!(compare.status.success(), "{}", stdout(&compare));
}

#[test]
fn tls_authz_lets_in_the_clients_qemu_nbd_lets_in() {
    let dir = tempfile::tempdir().unwrap();
    let creds = certs::make(dir.path());
    let img = image(dir.path());
    // Each client's name as GnuTLS writes it (the other's country in
    // hex), commas doubled for QEMU's option syntax: both servers let in
    // the client named and no other.
    for (named, serial) in [
        ("client", certs::CLIENT_SERIAL),
        ("other", certs::OTHER_SERIAL),
    ] {
        let identity = certs::identity("client", serial).replace(',', ",,");
        let authz = format!("authz-simple,id=authz0,identity={identity}");
        let flags = ["--object", authz.as_str(), "--tls-authz", "authz0"];
        for program in ["qemu-nbd", "qcow"] {
            let (mut server, port) = serve_tls(program, &creds.server, &img, &flags);
            let opts = nbd_opts("127.0.0.1", port);
            for (who, dir) in [("client", &creds.client), ("other", &creds.other)] {
                let object = object(dir, "client");
                let o = qemu_img(&["info", "--object", &object, "--image-opts", &opts]);
                if o.status.success() != (who == named) {
                    let (_, log) = server.stop();
                    panic!(
                        "{program} naming {named}, {who} connecting: {}{log}",
                        stderr(&o)
                    );
                }
            }
            drop(server.stop());
        }
    }
    // Refused before serving: authorization without TLS, or by an object
    // that is not there.
    let server_object = object(&creds.server, "server");
    for (args, refusal) in [
        (
            vec!["serve", "--tls-authz", "authz0", p(&img)],
            "--tls-authz is not permitted without --tls-creds",
        ),
        (
            vec![
                "serve",
                "--object",
                &server_object,
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "authz9",
                p(&img),
            ],
            "No authorization object with id 'authz9'",
        ),
    ] {
        let o = qcow(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(message(&o).contains(refusal), "{args:?}: {}", stderr(&o));
    }
}
