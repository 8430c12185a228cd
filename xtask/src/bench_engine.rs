//! The engine jobs of `cargo xtask bench`: `qcow bench` against
//! `qemu-img bench` with the same flags on the same kind of image,
//! alternately, timed by wall clock (each tool's own "Run completed"
//! figure is not used, so that start-up counts for both):
//!
//! * cached 4 KiB reads: 500 000 reads of `random-<N>g.qcow2`, which the
//!   warm-up run brings into the page cache;
//! * 4 KiB overwrites: 200 000 writes into allocated clusters (a copy of
//!   that image per tool, made once);
//! * allocating 4 KiB writes: 100 000 writes 64 KiB apart, each into a new
//!   cluster of an empty 8 GiB image made (untimed) before every run.
//!
//! Afterwards each tool's written image passes `qemu-img check`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::run_captured;

/// One measured engine job.
pub(crate) struct EngineOutcome {
    label: &'static str,
    ours: f64,
    theirs: f64,
}

/// One job: its label, the `bench` arguments, and the image each run
/// starts from.
struct Job {
    label: &'static str,
    args: &'static [&'static str],
    image: Start,
}

/// What a job's image is before a run.
enum Start {
    /// The shared read-only image.
    Shared,
    /// Each tool's own copy of the shared image, made once.
    Copy,
    /// An empty image made before every run.
    Fresh,
}

/// Times both tools' `bench` on each job, `runs` times each.
pub(crate) fn run(
    work: &Path,
    qcow: &Path,
    shared: &Path,
    runs: usize,
) -> Result<Vec<EngineOutcome>> {
    let jobs = [
        Job {
            label: "bench 4K reads, cached",
            args: &["-c", "500000", "-s", "4096"],
            image: Start::Shared,
        },
        Job {
            label: "bench -w 4K overwrites",
            args: &["-w", "-c", "200000", "-s", "4096"],
            image: Start::Copy,
        },
        Job {
            label: "bench -w 4K allocating",
            args: &["-w", "-c", "100000", "-s", "4096", "-S", "65536"],
            image: Start::Fresh,
        },
    ];
    let mut outcomes = Vec::new();
    for job in &jobs {
        let image_for = |tool: &str| -> Result<PathBuf> {
            Ok(match job.image {
                Start::Shared => shared.to_owned(),
                Start::Copy => {
                    let copy = work.join(format!("overwrite-{tool}.qcow2"));
                    if !copy.is_file() {
                        eprintln!("copying {} for {tool}", shared.display());
                        fs::copy(shared, &copy).context("cannot copy the bench image")?;
                    }
                    copy
                }
                Start::Fresh => work.join(format!("allocating-{tool}.qcow2")),
            })
        };
        let (ours_image, theirs_image) = (image_for("qcow")?, image_for("qemu-img")?);
        let once = |program: &Path, image: &Path| -> Result<f64> {
            if matches!(job.image, Start::Fresh) {
                run_captured(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2"])
                        .arg(image)
                        .arg("8G"),
                )?;
            }
            run_captured(&mut Command::new("sync"))?;
            let started = Instant::now();
            run_captured(
                Command::new(program)
                    .arg("bench")
                    .args(job.args)
                    .args(["-f", "qcow2"])
                    .arg(image),
            )?;
            Ok(started.elapsed().as_secs_f64())
        };
        eprintln!("{}: warm-up", job.label);
        once(qcow, &ours_image)?;
        once(Path::new("qemu-img"), &theirs_image)?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let t = once(qcow, &ours_image)?;
            let u = once(Path::new("qemu-img"), &theirs_image)?;
            eprintln!(
                "{}: run {run}/{runs}: qcow {t:.3} s, qemu-img {u:.3} s",
                job.label
            );
            a.push(t);
            b.push(u);
        }
        for image in [&ours_image, &theirs_image] {
            let check = Command::new("qemu-img")
                .arg("check")
                .arg(image)
                .output()
                .context("cannot run qemu-img check")?;
            if !check.status.success() {
                bail!(
                    "{}: {} does not pass qemu-img check",
                    job.label,
                    image.display()
                );
            }
        }
        outcomes.push(EngineOutcome {
            label: job.label,
            ours: crate::bench::median(a),
            theirs: crate::bench::median(b),
        });
    }
    println!();
    println!(
        "{:<24} {:>10} {:>12} {:>8} {:>9}",
        "job", "qcow s", "qemu-img s", "ratio", "speed-up"
    );
    for o in &outcomes {
        println!(
            "{:<24} {:>10.3} {:>12.3} {:>8.2} {:>8.2}x",
            o.label,
            o.ours,
            o.theirs,
            o.ours / o.theirs,
            o.theirs / o.ours
        );
    }
    println!("(medians of wall time; ratio = qcow / qemu-img, lower is better)");
    Ok(outcomes)
}
