//! The TLS part of `cargo xtask bench-serve`: NBD over TLS with QEMU's x509
//! credentials (made here, in `bench-work/tls/`), on Unix sockets with the
//! certificate's name given (`tls-hostname=127.0.0.1`), alternating in one
//! run:
//!
//! - servers: `qemu-img convert -O raw` of the cached 1 GiB image served
//!   by `qcow serve --tls-creds` and by `qemu-nbd --tls-creds` (speedup =
//!   qemu-nbd time / qcow time);
//! - clients: `qcow convert` and `qemu-img convert` of the same
//!   `qemu-nbd --tls-creds` export (ratio = qcow time / qemu-img time).
//!
//! Outputs go to memory (`/dev/shm`) where the machine has it, and are
//! deleted, untimed, before every run; run 0 of each job only warms the
//! caches.

#[allow(dead_code)]
#[path = "../../crates/qcow-nbd/tests/support/certs.rs"]
mod certs;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::bench::median;
use crate::bench_serve::start;
use crate::util::run_captured;

/// Times `program convert` of the TLS export on `socket` into `out`.
fn convert(program: &Path, client_dir: &Path, socket: &Path, out: &Path) -> Result<f64> {
    let _ = std::fs::remove_file(out);
    let mut command = Command::new(program);
    command
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            client_dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,path={},tls-creds=tls0,tls-hostname=127.0.0.1",
            socket.display()
        ))
        .args(["-O", "raw"])
        .arg(out);
    let started = Instant::now();
    run_captured(&mut command)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Starts `qcow serve` (`qcow` given) or qemu-nbd over TLS, read-only.
fn serve(
    qcow: Option<&Path>,
    server_dir: &Path,
    image: &Path,
    socket: &Path,
) -> Result<crate::bench_serve::Server> {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        server_dir.display()
    );
    let (socket_s, image_s) = (
        socket.to_string_lossy().into_owned(),
        image.to_string_lossy().into_owned(),
    );
    let flags = [
        "-t",
        "-r",
        "-f",
        "qcow2",
        "--object",
        &object,
        "--tls-creds",
        "tls0",
        "-k",
        &socket_s,
        &image_s,
    ];
    match qcow {
        Some(qcow) => {
            let mut args = vec!["serve"];
            args.extend(flags);
            start(qcow, &args, socket)
        }
        None => start(Path::new("qemu-nbd"), &flags, socket),
    }
}

/// Runs both comparisons on `image`; prints the table.
pub(crate) fn run(qcow: &Path, image: &Path, work: &Path, runs: usize) -> Result<()> {
    let tls = work.join("tls");
    let _ = std::fs::remove_dir_all(&tls);
    let creds = certs::make(&tls);
    let socket = work.join("tls.sock");
    let out = crate::util::scratch_output(work, "tls-out.raw");
    let qemu_img = Path::new("qemu-img");

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        for (who, server) in [("qcow serve", Some(qcow)), ("qemu-nbd", None)] {
            let _server = serve(server, &creds.server, image, &socket)?;
            let seconds = convert(qemu_img, &creds.client, &socket, &out)?;
            if run > 0 {
                eprintln!("TLS server: run {run}/{runs}: {who} {seconds:.3} s");
                if server.is_some() {
                    ours.push(seconds);
                } else {
                    theirs.push(seconds);
                }
            }
        }
    }
    let servers = (median(ours), median(theirs));

    let _server = serve(None, &creds.server, image, &socket)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        for (who, program) in [("qcow", qcow), ("qemu-img", qemu_img)] {
            let seconds = convert(program, &creds.client, &socket, &out)?;
            if run > 0 {
                eprintln!("TLS client: run {run}/{runs}: {who} {seconds:.3} s");
                if who == "qcow" {
                    ours.push(seconds);
                } else {
                    theirs.push(seconds);
                }
            }
        }
    }
    let clients = (median(ours), median(theirs));
    let _ = std::fs::remove_file(&out);

    println!(
        "\n{:<40} {:>10} {:>12} {:>8}",
        "NBD over TLS, convert -O raw of 1 GiB", "qcow s", "qemu s", "ratio"
    );
    println!(
        "{:<40} {:>10.3} {:>12.3} {:>8.2}",
        "server (qemu-img the client)",
        servers.0,
        servers.1,
        servers.0 / servers.1
    );
    println!(
        "{:<40} {:>10.3} {:>12.3} {:>8.2}",
        "client (qemu-nbd the server)",
        clients.0,
        clients.1,
        clients.0 / clients.1
    );
    println!(
        "(medians; ratio = qcow time / qemu-nbd or qemu-img time: below 1 means qcow is faster)"
    );
    Ok(())
}
