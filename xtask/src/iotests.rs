//! `cargo xtask iotests --qemu-source DIR [--jobs N] [--qcow PATH]`: runs
//! QEMU's own qcow2 iotests (`DIR/tests/qemu-iotests/check -qcow2`) twice,
//! once with the installed qemu-img and once with `qcow` in its place (the
//! same qemu-io and qemu-nbd both times), and reports how many of the tests
//! that pass with qemu-img here also pass with qcow. A measurement of how
//! much of a drop-in qcow is, not a test: tests that start a VM cannot run
//! (a stand-in "QEMU" that has no machine answers them), for both alike.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A stand-in for qemu-system and qemu-storage-daemon: it lists a default
/// machine (the harness asks) and starts nothing.
const NO_VM: &str = "#!/bin/sh\nif [ \"$2\" = help ]; then echo \"pc Standard PC (default)\"; exit 0; fi\necho \"no VM here\" >&2\nexit 1\n";

/// Runs the comparison.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut source = None;
    let mut jobs = "2".to_owned();
    let mut qcow = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--qemu-source" => source = it.next().map(PathBuf::from),
            "--jobs" => jobs = it.next().context("--jobs needs a number")?.clone(),
            "--qcow" => qcow = it.next().map(PathBuf::from),
            other => bail!("unknown option {other}"),
        }
    }
    let source = source.context("--qemu-source DIR (QEMU's source tree) is required")?;
    let check = source.join("tests/qemu-iotests/check");
    if !check.is_file() {
        bail!("{} not found", check.display());
    }
    let qcow = match qcow {
        Some(p) => p,
        None => {
            let status = Command::new("cargo")
                .args(["build", "--release", "-p", "qcow-cli"])
                .status()
                .context("cannot run cargo")?;
            if !status.success() {
                bail!("building qcow failed");
            }
            Path::new("target/release/qcow").canonicalize()?
        }
    };
    let work = Path::new("iotests-work").canonicalize().or_else(|_| {
        fs::create_dir_all("iotests-work")?;
        Path::new("iotests-work").canonicalize()
    })?;
    let which = |tool: &str| -> Result<PathBuf> {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if path.is_empty() {
            bail!("{tool} is required");
        }
        Ok(PathBuf::from(path))
    };
    let qemu_img = which("qemu-img")?;
    let mut results = BTreeMap::new();
    for (label, img) in [("qemu-img", qemu_img), ("qcow", qcow)] {
        let build = work.join(label);
        let _ = fs::remove_dir_all(&build);
        fs::create_dir_all(build.join("tests/qemu-iotests"))?;
        fs::create_dir_all(build.join("storage-daemon"))?;
        symlink(&img, build.join("qemu-img"))?;
        symlink(which("qemu-io")?, build.join("qemu-io"))?;
        symlink(which("qemu-nbd")?, build.join("qemu-nbd"))?;
        for stand_in in ["qemu-system-x86_64", "storage-daemon/qemu-storage-daemon"] {
            let path = build.join(stand_in);
            fs::write(&path, NO_VM)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
        let runner = build.join("tests/qemu-iotests/check");
        symlink(&check, &runner)?;
        eprintln!(
            "running QEMU's qcow2 iotests with {label} ({})",
            img.display()
        );
        let out = Command::new(&runner)
            .args(["-qcow2", "-j", &jobs])
            .current_dir(build.join("tests/qemu-iotests"))
            .output()
            .context("cannot run QEMU's check")?;
        let log = String::from_utf8_lossy(&out.stdout).into_owned();
        fs::write(work.join(format!("{label}.log")), &log)?;
        results.insert(label, passed(&log));
    }
    let theirs = &results["qemu-img"];
    let ours = &results["qcow"];
    let both: Vec<&String> = theirs.iter().filter(|t| ours.contains(t)).collect();
    let missing: Vec<&String> = theirs.iter().filter(|t| !ours.contains(t)).collect();
    println!(
        "QEMU qcow2 iotests passing here: qemu-img {}, qcow {} ({} of qemu-img's)",
        theirs.len(),
        ours.len(),
        both.len()
    );
    println!(
        "passing with qemu-img only: {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("logs: {}", work.display());
    Ok(())
}

/// The tests a `check` log reports as passed.
fn passed(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            (words.next() == Some("pass")).then(|| name.to_owned())
        })
        .collect()
}
