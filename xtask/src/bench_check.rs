//! The check jobs of `cargo xtask bench`: `qcow check` against
//! `qemu-img check` on the same images, alternately, with wall time and peak
//! memory (maximum resident set, from `/usr/bin/time`).
//!
//! Images (built once in `bench-work/`, then reused):
//!
//! * `check-4g.qcow2`: 4 GiB fully allocated with incompressible data
//!   (64 KiB clusters);
//! * `check-frag.qcow2`: 1 GiB with 512-byte clusters where every other
//!   cluster holds data: a million allocated clusters, a million extents.
//!
//! The million-extent image is also checked by qcow within a 1 MiB memory
//! bound (`--max-memory`), in several passes.
//!
//! Both tools' outputs are compared (they must be byte-identical: both
//! images are consistent).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{GIB, MIB, Rng, run_captured};

/// One measured check job.
pub(crate) struct CheckOutcome {
    label: &'static str,
    ours: f64,
    theirs: f64,
    ours_kib: u64,
    theirs_kib: u64,
    same: bool,
}

/// Builds the images if needed and times both tools on each.
pub(crate) fn run(work: &Path, qcow: &Path, runs: usize) -> Result<Vec<CheckOutcome>> {
    if !Path::new("/usr/bin/time").is_file() {
        bail!("the check jobs need /usr/bin/time (Debian package `time`)");
    }
    let allocated = work.join("check-4g.qcow2");
    if !allocated.is_file() {
        let raw = work.join("check-4g.raw");
        write_random(&raw, 4 * GIB)?;
        convert(&raw, &allocated, &["-o", "cluster_size=64k"])?;
        fs::remove_file(&raw).ok();
    }
    let fragmented = work.join("check-frag.qcow2");
    if !fragmented.is_file() {
        let raw = work.join("check-frag.raw");
        write_every_other_sector(&raw, GIB)?;
        convert(&raw, &fragmented, &["-o", "cluster_size=512", "-S", "512"])?;
        fs::remove_file(&raw).ok();
    }
    let mut outcomes = Vec::new();
    for (label, image, bound) in [
        ("check 4 GiB allocated", &allocated, None),
        ("check 1M extents", &fragmented, None),
        // qcow counts the file in windows of 256 Ki clusters (9 walks).
        ("check 1M extents, 1M mem", &fragmented, Some("1M")),
    ] {
        let extra: Vec<&str> = bound.map(|b| vec!["--max-memory", b]).unwrap_or_default();
        let ours_out = run_captured(Command::new(qcow).arg("check").args(&extra).arg(image))?;
        let theirs_out = run_captured(Command::new("qemu-img").arg("check").arg(image))?;
        let same = ours_out == theirs_out;
        if !same {
            eprintln!("warning: {label}: outputs differ:\n{ours_out}---\n{theirs_out}");
        }
        let (mut a, mut b, mut am, mut bm) = (Vec::new(), Vec::new(), 0, 0);
        for run in 1..=runs {
            let (t, m) = timed(qcow, &extra, image)?;
            let (u, n) = timed(Path::new("qemu-img"), &[], image)?;
            eprintln!("{label}: run {run}/{runs}: qcow {t:.3} s, qemu-img {u:.3} s");
            a.push(t);
            b.push(u);
            am = am.max(m);
            bm = bm.max(n);
        }
        outcomes.push(CheckOutcome {
            label,
            ours: crate::bench::median(a),
            theirs: crate::bench::median(b),
            ours_kib: am,
            theirs_kib: bm,
            same,
        });
    }
    println!();
    println!(
        "{:<24} {:>10} {:>12} {:>8} {:>14} {:>16} {:>7}",
        "job", "qcow s", "qemu-img s", "ratio", "qcow max KiB", "qemu-img max KiB", "output"
    );
    for o in &outcomes {
        println!(
            "{:<24} {:>10.3} {:>12.3} {:>8.2} {:>14} {:>16} {:>7}",
            o.label,
            o.ours,
            o.theirs,
            o.ours / o.theirs,
            o.ours_kib,
            o.theirs_kib,
            if o.same { "same" } else { "DIFFERS" }
        );
    }
    println!("(medians; ratio = qcow / qemu-img, lower is better; memory = peak resident set)");
    Ok(outcomes)
}

impl CheckOutcome {
    /// Whether both tools printed the same report.
    pub(crate) fn same(&self) -> bool {
        self.same
    }
}

/// Runs `PROGRAM check IMAGE` under `/usr/bin/time`: wall seconds (timed
/// here: `time` rounds to 10 ms) and peak KiB.
fn timed(program: &Path, extra: &[&str], image: &Path) -> Result<(f64, u64)> {
    let started = std::time::Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M"])
        .arg(program)
        .arg("check")
        .args(extra)
        .arg(image)
        .output()
        .context("cannot run /usr/bin/time")?;
    if !out.status.success() {
        bail!("{} check {} failed", program.display(), image.display());
    }
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let mut fields = last.split_whitespace();
    fields.next().context("no time from /usr/bin/time")?;
    let kib: u64 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .context("no memory from /usr/bin/time")?;
    Ok((secs, kib))
}

fn convert(raw: &Path, out: &Path, args: &[&str]) -> Result<()> {
    eprintln!("building {}", out.display());
    run_captured(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(args)
            .arg(raw)
            .arg(out),
    )?;
    Ok(())
}

fn write_random(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut rng = Rng::new(0xc4ec_0001);
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        rng.fill_random(&mut buf);
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(())
}

fn write_every_other_sector(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let pattern: Vec<u8> = (0..MIB as usize)
        .map(|i| if (i / 512) % 2 == 0 { 0xab } else { 0 })
        .collect();
    for _ in 0..size / MIB {
        out.write_all(&pattern)?;
    }
    out.flush()?;
    Ok(())
}
