//! `cargo xtask bench-serve [--runs N] [--qcow PATH] [--only server,client,tls]`: `qcow serve` beside
//! `qemu-nbd` on the same cached 1 GiB qcow2 image, the same client, in the
//! same run, servers alternating: with `qemu-img bench` over `nbd+unix://`
//! (QEMU's own NBD client) sequential 1 MiB reads at queue depth 8, 4 KiB
//! reads and 4 KiB writes at queue depth 32; with fio's nbd engine (when
//! fio is installed) random 4 KiB reads and writes at queue depth 32.
//! Medians and ratios (qemu-nbd time / qcow time: above 1 means qcow
//! serves faster). Then the client side: `qcow` and `qemu-img` reading
//! from one `qemu-nbd` ([`crate::bench_nbd_client`]), and both sides over
//! TLS ([`crate::bench_tls`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::bench::median;
use crate::util::{require_tool, run_captured, workspace_root};

/// One job: the client's arguments, and whether it writes.
struct Job {
    label: &'static str,
    /// `qemu-img bench` arguments, or (first word `fio`) fio's.
    args: &'static [&'static str],
    writes: bool,
}

const JOBS: [Job; 5] = [
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
    Job {
        label: "fio random 4 KiB reads, qd 32",
        args: &["fio", "--rw=randread"],
        writes: false,
    },
    Job {
        label: "fio random 4 KiB writes, qd 32",
        args: &["fio", "--rw=randwrite"],
        writes: true,
    },
];

/// Runs one client job against `uri`; returns its seconds.
fn client(job: &Job, uri: &str) -> Result<f64> {
    let started = Instant::now();
    if job.args.first() == Some(&"fio") {
        let mut fio = Command::new("fio");
        fio.args([
            "--name=nbd",
            "--ioengine=nbd",
            "--bs=4k",
            "--iodepth=32",
            "--size=1G",
        ])
        .args(["--io_size=400M", "--randseed=7", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .args(&job.args[1..]);
        let out = run_captured(&mut fio)?;
        // fio's own figure: I/O time, without its start-up.
        let json: serde_json::Value =
            serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).context("fio's JSON")?;
        let side = if job.writes { "write" } else { "read" };
        let ms = json["jobs"][0][side]["runtime"]
            .as_f64()
            .context("no runtime in fio's JSON")?;
        return Ok(ms / 1000.0);
    }
    let mut bench = Command::new("qemu-img");
    bench.args(["bench", "-f", "raw"]).args(job.args).arg(uri);
    run_captured(&mut bench)?;
    Ok(started.elapsed().as_secs_f64())
}

/// A running server, killed when dropped.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` and waits until it listens on `socket`.
pub(crate) fn start(program: &Path, args: &[&str], socket: &Path) -> Result<Server> {
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
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--qcow" => qcow = it.next().map(PathBuf::from),
            "--only" => {
                only = Some(
                    it.next()
                        .context("--only needs a list: server,client,tls")?
                        .split(',')
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                )
            }
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
    let wanted = |part: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == part));
    if wanted("server") {
        servers(&qcow, &image, &work, runs)?;
    }
    if wanted("client") {
        crate::bench_nbd_client::run(&qcow, &image, &work, runs)?;
    }
    if wanted("tls") {
        crate::bench_tls::run(&qcow, &image, &work, runs)?;
    }
    Ok(())
}

/// The server jobs: `qcow serve` and qemu-nbd under the same clients.
fn servers(qcow: &Path, image: &Path, work: &Path, runs: usize) -> Result<()> {
    let scratch = work.join("serve-scratch.qcow2");
    let socket = work.join("serve.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let qemu_nbd = PathBuf::from("qemu-nbd");
    let mut table = Vec::new();
    let has_fio = Command::new("fio").arg("--version").output().is_ok();
    for job in &JOBS {
        if job.args.first() == Some(&"fio") && !has_fio {
            eprintln!("{}: skipped (fio is not installed)", job.label);
            continue;
        }
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for run in 0..=runs {
            for who in ["qcow", "qemu-nbd"] {
                let served = if job.writes {
                    std::fs::copy(image, &scratch)?;
                    scratch.clone()
                } else {
                    image.to_path_buf()
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
                    start(qcow, &a, &socket)?
                } else {
                    let mut a = vec!["-f", "qcow2"];
                    a.extend(&args);
                    a.push(&served_s);
                    start(&qemu_nbd, &a, &socket)?
                };
                let seconds = client(job, &uri)?;
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
        "(medians; speedup = qemu-nbd time / qcow time; clients: qemu-img bench and fio's nbd engine over nbd+unix)"
    );
    let _ = std::fs::remove_file(&scratch);
    Ok(())
}
