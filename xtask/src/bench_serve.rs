//! `cargo xtask bench-serve [--runs N] [--qcow PATH]`: `qcow serve` beside
//! `qemu-nbd` on the same cached 1 GiB qcow2 image, the same client
//! (`qemu-img bench` over `nbd+unix://`, QEMU's own NBD client), in the same
//! run, servers alternating: sequential 1 MiB reads at queue depth 8, 4 KiB
//! reads and 4 KiB writes at queue depth 32. Medians and ratios
//! (qemu-nbd time / qcow time: above 1 means qcow serves faster).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::bench::median;
use crate::util::{require_tool, run_captured, workspace_root};

/// One job: `qemu-img bench` arguments, and whether it writes.
struct Job {
    label: &'static str,
    args: &'static [&'static str],
    writes: bool,
}

const JOBS: [Job; 3] = [
    Job {
        label: "sequential reads, 1 MiB, qd 8",
        args: &["-c", "1024", "-d", "8", "-s", "1M"],
        writes: false,
    },
    Job {
        label: "4 KiB reads, qd 32",
        args: &["-c", "200000", "-d", "32", "-s", "4k", "-S", "4k"],
        writes: false,
    },
    Job {
        label: "4 KiB writes, qd 32",
        args: &["-w", "-c", "100000", "-d", "32", "-s", "4k", "-S", "4k"],
        writes: true,
    },
];

/// A running server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &Path, args: &[&str], socket: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not listen",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(server)
}

/// Runs the comparison.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut runs = 3usize;
    let mut qcow: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--qcow" => qcow = it.next().map(PathBuf::from),
            other => bail!("unknown option {other}"),
        }
    }
    require_tool("qemu-img", "install the qemu-utils package")?;
    require_tool("qemu-nbd", "install the qemu-utils package")?;
    let root = workspace_root()?;
    let qcow = match qcow {
        Some(q) => q,
        None => crate::bench::build_qcow(&root)?,
    };
    let work = root.join("bench-work");
    std::fs::create_dir_all(&work)?;
    let image = work.join("serve-1g.qcow2");
    if !image.is_file() {
        let mut create = Command::new("qemu-img");
        create
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1G");
        run_captured(&mut create)?;
        let mut fill = Command::new("qemu-io");
        fill.args(["-c", "write -P 7 0 1G"]).arg(&image);
        run_captured(&mut fill)?;
    }
    let scratch = work.join("serve-scratch.qcow2");
    let socket = work.join("serve.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let qemu_nbd = PathBuf::from("qemu-nbd");
    let mut table = Vec::new();
    for job in &JOBS {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for run in 0..=runs {
            for who in ["qcow", "qemu-nbd"] {
                let served = if job.writes {
                    std::fs::copy(&image, &scratch)?;
                    scratch.clone()
                } else {
                    image.clone()
                };
                let served_s = served.to_string_lossy().into_owned();
                let socket_s = socket.to_string_lossy().into_owned();
                let mut args = vec!["-t", "-k", socket_s.as_str()];
                if !job.writes {
                    args.push("-r");
                }
                let _server = if who == "qcow" {
                    let mut a = vec!["serve"];
                    a.extend(&args);
                    a.push(&served_s);
                    start(&qcow, &a, &socket)?
                } else {
                    let mut a = vec!["-f", "qcow2"];
                    a.extend(&args);
                    a.push(&served_s);
                    start(&qemu_nbd, &a, &socket)?
                };
                let mut bench = Command::new("qemu-img");
                bench.args(["bench", "-f", "raw"]).args(job.args).arg(&uri);
                let started = Instant::now();
                run_captured(&mut bench)?;
                let seconds = started.elapsed().as_secs_f64();
                // Run 0 warms the cache for both.
                if run > 0 {
                    eprintln!("{}: run {run}/{runs}: {who} {seconds:.3} s", job.label);
                    if who == "qcow" {
                        ours.push(seconds);
                    } else {
                        theirs.push(seconds);
                    }
                }
            }
        }
        table.push((job.label, median(ours), median(theirs)));
    }
    println!(
        "\n{:<32} {:>10} {:>12} {:>8}",
        "job", "qcow s", "qemu-nbd s", "speedup"
    );
    for (label, ours, theirs) in table {
        println!(
            "{label:<32} {ours:>10.3} {theirs:>12.3} {:>7.2}x",
            theirs / ours
        );
    }
    println!(
        "(medians; speedup = qemu-nbd time / qcow time; client: qemu-img bench over nbd+unix)"
    );
    let _ = std::fs::remove_file(&scratch);
    Ok(())
}
