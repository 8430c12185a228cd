//! The encryption jobs of `cargo xtask bench`, qcow and qemu-img
//! alternately on the same files:
//!
//! * raw -> LUKS qcow2: `convert -O qcow2 -o encrypt.format=luks` of the
//!   random source (qemu-img with `-W`); both tools calibrate PBKDF2 for
//!   `encrypt.iter-time=10` inside the timed run, as a user's command does;
//! * LUKS qcow2 -> raw: `convert -O raw` of qemu-img's encrypted image.
//!
//! Each output is compared with the source afterwards.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::bench::{Outcome, median, print_table, time_alternately};
use crate::util::{GIB, run_captured};

const SECRET: &str = "secret,id=s,data=bench-password";

/// Times both encryption jobs, `runs` times each.
pub(crate) fn run(work: &Path, qcow: &Path, size: u64, runs: usize) -> Result<Vec<Outcome>> {
    let source = work.join(format!("random-{}g.raw", size / GIB));
    anyhow::ensure!(
        source.is_file(),
        "{} is missing: run the write group first (cargo xtask bench --only write)",
        source.display()
    );
    let ours_out = work.join("luks-qcow.qcow2");
    let theirs_out = work.join("luks-qemu-img.qcow2");
    let encrypt = |program: &Path, extra: &[&str], out: &Path| {
        let mut cmd = Command::new(program);
        cmd.args(["convert", "--object", SECRET, "-f", "raw", "-O", "qcow2"])
            .args(extra)
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            ])
            .arg(&source)
            .arg(out);
        cmd
    };
    let (a, b) = time_alternately(
        "raw -> LUKS qcow2",
        (&mut encrypt(qcow, &[], &ours_out), &ours_out),
        (
            &mut encrypt(Path::new("qemu-img"), &["-W"], &theirs_out),
            &theirs_out,
        ),
        runs,
    )?;
    let mut results = vec![Outcome {
        image: "raw -> LUKS qcow2".into(),
        size,
        ours: median(a),
        theirs: median(b),
        same: same_as_source(&ours_out, &source)?,
    }];
    let ours_raw = work.join("luks-out-qcow.raw");
    let theirs_raw = work.join("luks-out-qemu-img.raw");
    let spec = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s",
        theirs_out.display()
    );
    let decrypt = |program: &Path, extra: &[&str], out: &Path| {
        let mut cmd = Command::new(program);
        cmd.args(["convert", "--object", SECRET, "--image-opts", &spec])
            .args(extra)
            .args(["-O", "raw"])
            .arg(out);
        cmd
    };
    let (a, b) = time_alternately(
        "LUKS qcow2 -> raw",
        (&mut decrypt(qcow, &[], &ours_raw), &ours_raw),
        (
            &mut decrypt(Path::new("qemu-img"), &["-W"], &theirs_raw),
            &theirs_raw,
        ),
        runs,
    )?;
    results.push(Outcome {
        image: "LUKS qcow2 -> raw".into(),
        size,
        ours: median(a),
        theirs: median(b),
        same: run_captured(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "raw"])
                .arg(&ours_raw)
                .arg(&source),
        )
        .is_ok(),
    });
    print_table(&results);
    Ok(results)
}

/// Whether the encrypted image `image` reads as `source` (qemu-img compare).
fn same_as_source(image: &Path, source: &Path) -> Result<bool> {
    let spec = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s",
        image.display()
    );
    let spec_source = format!("driver=raw,file.filename={}", source.display());
    Ok(run_captured(
        Command::new("qemu-img")
            .args(["compare", "-q", "--object", SECRET, "--image-opts"])
            .arg(&spec)
            .arg(&spec_source),
    )
    .is_ok())
}
