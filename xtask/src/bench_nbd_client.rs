//! The NBD client side of `cargo xtask bench-serve`: `qcow` and `qemu-img`
//! as clients of the same `qemu-nbd` export (the cached 1 GiB qcow2 image,
//! read-only, over a Unix socket), alternating in one run: `bench` reads
//! of 4 KiB at queue depth 32 and of 1 MiB at depth 8, and `convert -O raw`
//! of the whole export (its output in memory, `/dev/shm`, where the
//! machine has it, deleted, untimed, before every run).
//! Medians and ratios (qcow time / qemu-img time: below 1 means qcow is
//! faster).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::bench::median;
use crate::util::run_captured;

/// One job: its label and the arguments both tools get (`{uri}` and
/// `{out}` replaced).
const JOBS: [(&str, &[&str]); 3] = [
    (
        "bench 4 KiB reads, qd 32",
        &[
            "bench", "-f", "raw", "-c", "100000", "-d", "32", "-s", "4k", "-S", "4k", "{uri}",
        ],
    ),
    (
        "bench 1 MiB reads, qd 8",
        &[
            "bench", "-f", "raw", "-c", "2048", "-d", "8", "-s", "1M", "{uri}",
        ],
    ),
    (
        "convert -O raw",
        &["convert", "-O", "raw", "{uri}", "{out}"],
    ),
];

/// Runs the client jobs against `qemu-nbd` serving `image`; prints the
/// table.
pub(crate) fn run(qcow: &Path, image: &Path, work: &Path, runs: usize) -> Result<()> {
    let socket = work.join("client.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = crate::util::scratch_output(work, "client-out.raw");
    let image_s = image.to_string_lossy().into_owned();
    let socket_s = socket.to_string_lossy().into_owned();
    let _server = crate::bench_serve::start(
        Path::new("qemu-nbd"),
        &["-t", "-r", "-f", "qcow2", "-k", &socket_s, &image_s],
        &socket,
    )?;
    let mut table = Vec::new();
    for (label, args) in JOBS {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("{uri}", &uri)
                    .replace("{out}", &out.to_string_lossy())
            })
            .collect();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        // Run 0 warms the server's cache for both.
        for run in 0..=runs {
            for (who, program) in [("qcow", qcow), ("qemu-img", Path::new("qemu-img"))] {
                let _ = std::fs::remove_file(&out);
                let mut command = Command::new(program);
                command.args(&args);
                let started = Instant::now();
                run_captured(&mut command)?;
                let seconds = started.elapsed().as_secs_f64();
                if run > 0 {
                    eprintln!("client {label}: run {run}/{runs}: {who} {seconds:.3} s");
                    if who == "qcow" {
                        ours.push(seconds);
                    } else {
                        theirs.push(seconds);
                    }
                }
            }
        }
        table.push((label, median(ours), median(theirs)));
    }
    let _ = std::fs::remove_file(&out);
    println!(
        "\n{:<32} {:>10} {:>12} {:>8}",
        "NBD client job", "qcow s", "qemu-img s", "ratio"
    );
    for (label, ours, theirs) in table {
        println!(
            "{label:<32} {ours:>10.3} {theirs:>12.3} {:>8.2}",
            ours / theirs
        );
    }
    println!(
        "(medians; ratio = qcow time / qemu-img time; both clients of one qemu-nbd over nbd+unix)"
    );
    Ok(())
}
