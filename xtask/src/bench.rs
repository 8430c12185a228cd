//! `cargo xtask bench [--size-gib N] [--runs N] [--qcow PATH] [--only
//! GROUPS]`: times `qcow convert -O raw` against `qemu-img convert -O raw`
//! on large images, then the write, check and engine (`bench`) jobs;
//! then the encryption (`crypto`) jobs; `--only read,write,check,engine,crypto`
//! runs some of the groups.
//!
//! The `qcow` binary is built first with `cargo build --release -p qcow-cli`
//! unless `--qcow PATH` names a binary to use instead (anything accepting
//! `convert -O raw IMAGE OUTPUT`; `--qcow qemu-img` benchmarks the harness).
//!
//! The images live in `bench-work/` (gitignored) and are built once, then
//! reused while their virtual size matches `--size-gib`:
//!
//! * `random-<N>g.qcow2`: fully allocated, incompressible PRNG data;
//! * `zlib-<N>g.qcow2` and `zstd-<N>g.qcow2`: compressed clusters of
//!   text-like data with periodic zero runs.
//!
//! For each image the two tools run alternately (`qcow`, `qemu-img`, `qcow`,
//! ...): one untimed warm-up each, then `--runs` timed runs each, each
//! after an untimed `sync`. Each tool writes its own output file, which is
//! overwritten in place by the next run rather than deleted (deleting
//! multi-GiB files is slow). After timing, the two outputs are compared
//! byte for byte so that a fast but wrong result is reported as such.
//!
//! The write jobs then time `convert -f raw -O qcow2` from raw sources
//! (`random-<N>g.raw`, `text-<N>g.raw`): uncompressed from incompressible
//! data, and `-c` with zlib and zstd from text-like data, against
//! `qemu-img convert -W` (out-of-order writes, its fastest mode). Outputs
//! are checked with `qemu-img compare` against the source and their sizes
//! reported.

use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::util::{
    GIB, MIB, Rng, describe, human_size, require_tool, run_captured, run_inherited, top_level_u64,
    workspace_root,
};

/// Parsed command-line options.
#[derive(Debug, Clone)]
struct Options {
    /// Virtual size of each benchmark image, in GiB.
    size_gib: u64,
    /// Timed runs per tool and image.
    runs: usize,
    /// Binary to benchmark instead of building `qcow-cli`.
    qcow: Option<PathBuf>,
    /// Only these groups of jobs (`read`, `write`, `check`, `engine`,
    /// `crypto`);
    /// empty: all.
    only: Vec<String>,
}

impl Options {
    /// Whether the group of jobs `name` runs.
    fn runs_group(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == name)
    }
}

impl Options {
    /// Parses `--size-gib N`, `--runs N` and `--qcow PATH` (also as
    /// `--flag=VALUE`).
    fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Self {
            size_gib: 1,
            runs: 5,
            qcow: None,
            only: Vec::new(),
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value = |flag: &str| -> Result<String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => iter
                        .next()
                        .cloned()
                        .with_context(|| format!("`{flag}` needs a value")),
                }
            };
            match flag {
                "--size-gib" => {
                    let v = value(flag)?;
                    opts.size_gib = v.parse().with_context(|| format!("bad --size-gib `{v}`"))?;
                    ensure!(opts.size_gib >= 1, "--size-gib must be at least 1");
                }
                "--runs" => {
                    let v = value(flag)?;
                    opts.runs = v.parse().with_context(|| format!("bad --runs `{v}`"))?;
                    ensure!(opts.runs >= 1, "--runs must be at least 1");
                }
                "--qcow" => opts.qcow = Some(PathBuf::from(value(flag)?)),
                "--only" => {
                    for group in value(flag)?.split(',') {
                        ensure!(
                            ["read", "write", "check", "engine", "crypto"].contains(&group),
                            "bad --only group `{group}` (read, write, check, engine, crypto)"
                        );
                        opts.only.push(group.to_owned());
                    }
                }
                other => bail!(
                    "unknown argument `{other}` for `bench` \
                     (expected: [--size-gib N] [--runs N] [--qcow PATH] [--only GROUPS])"
                ),
            }
        }
        Ok(opts)
    }
}

/// What a benchmark image is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Incompressible pseudo-random bytes, stored uncompressed.
    Random,
    /// Text-like data with zero runs, stored with this compression type.
    Compressed(&'static str),
}

/// A benchmark image.
#[derive(Debug, Clone)]
struct BenchImage {
    /// File name inside `bench-work/`.
    name: String,
    /// Contents and storage.
    content: Content,
}

/// Entry point of `cargo xtask bench`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    require_tool("qemu-img", "install the qemu-utils package")?;
    let root = workspace_root()?;
    let work = root.join("bench-work");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;

    let qcow = match &opts.qcow {
        Some(path) => path.clone(),
        None => build_qcow(&root)?,
    };
    let size = opts.size_gib * GIB;
    let images = [
        Content::Random,
        Content::Compressed("zlib"),
        Content::Compressed("zstd"),
    ]
    .map(|content| {
        let stem = match content {
            Content::Random => "random",
            Content::Compressed(kind) => kind,
        };
        BenchImage {
            name: format!("{stem}-{}g.qcow2", opts.size_gib),
            content,
        }
    });
    for image in &images {
        ensure_image(&work, image, size)?;
    }

    let out_qcow = work.join("out-qcow.raw");
    let out_qemu = work.join("out-qemu-img.raw");
    let mut results = Vec::new();
    let read_images: &[BenchImage] = if opts.runs_group("read") {
        &images
    } else {
        &[]
    };
    for image in read_images {
        let path = work.join(&image.name);
        let mut ours = convert_command(&qcow, &path, &out_qcow);
        let mut theirs = convert_command(Path::new("qemu-img"), &path, &out_qemu);
        let (ours_times, theirs_times) = time_alternately(
            &image.name,
            (&mut ours, &out_qcow),
            (&mut theirs, &out_qemu),
            opts.runs,
        )?;
        let same = files_equal(&out_qcow, &out_qemu)?;
        if !same {
            eprintln!(
                "warning: {}: `qcow convert` output differs from qemu-img's",
                image.name
            );
        }
        results.push(Outcome {
            image: image.name.clone(),
            size,
            ours: median(ours_times),
            theirs: median(theirs_times),
            same,
        });
    }
    if !results.is_empty() {
        print_table(&results);
    }
    let writes = if opts.runs_group("write") {
        run_write_jobs(&work, &qcow, size, opts.runs)?
    } else {
        Vec::new()
    };
    let checks = if opts.runs_group("check") {
        crate::bench_check::run(&work, &qcow, opts.runs)?
    } else {
        Vec::new()
    };
    if opts.runs_group("engine") {
        crate::bench_engine::run(&work, &qcow, &work.join(&images[0].name), opts.runs)?;
    }
    let crypto = if opts.runs_group("crypto") {
        crate::bench_crypto::run(&work, &qcow, size, opts.runs)?
    } else {
        Vec::new()
    };
    if crypto.iter().any(|r| !r.same) {
        bail!("some encrypted copies read otherwise than their source (see the table)");
    }
    if checks.iter().any(|c| !c.same()) {
        bail!("some `qcow check` reports differ from qemu-img's (see the table)");
    }
    if results.iter().any(|r| !r.same) || writes.iter().any(|r| !r.same) {
        bail!("some `qcow convert` outputs differ from their source (see the tables)");
    }
    Ok(())
}

/// One write job: a raw source, the arguments both tools get, and those
/// qemu-img gets besides (`-W`, where the goal is set against it).
struct WriteJob {
    label: &'static str,
    source: &'static str,
    content: Content,
    args: &'static [&'static str],
    theirs: &'static [&'static str],
}

/// Times `convert -O qcow2` (plain and compressed) from raw sources.
fn run_write_jobs(work: &Path, qcow: &Path, size: u64, runs: usize) -> Result<Vec<Outcome>> {
    let jobs = [
        // Both in guest order (each tool's default), as the goal is set.
        WriteJob {
            label: "raw->qcow2",
            source: "random",
            content: Content::Random,
            args: &[],
            theirs: &[],
        },
        // Against qemu-img writing out of order, which is quicker here.
        WriteJob {
            label: "raw->qcow2 (vs -W)",
            source: "random",
            content: Content::Random,
            args: &[],
            theirs: &["-W"],
        },
        WriteJob {
            label: "raw->qcow2 -c zlib (vs -W)",
            source: "text",
            content: Content::Compressed("zlib"),
            args: &["-c"],
            theirs: &["-W"],
        },
        WriteJob {
            label: "raw->qcow2 -c zstd (vs -W)",
            source: "text",
            content: Content::Compressed("zstd"),
            args: &["-c", "-o", "compression_type=zstd"],
            theirs: &["-W"],
        },
    ];
    let out_qcow = work.join("out-qcow.qcow2");
    let out_qemu = work.join("out-qemu-img.qcow2");
    let mut results = Vec::new();
    for job in &jobs {
        let source = work.join(format!("{}-{}g.raw", job.source, size / GIB));
        if fs::metadata(&source).map(|m| m.len()).ok() != Some(size) {
            eprintln!("generating {}", source.display());
            write_source(&source, job.content, size)?;
        }
        let command = |program: &Path, extra: &[&str], out: &Path| {
            let mut cmd = Command::new(program);
            cmd.args(["convert", "-f", "raw", "-O", "qcow2"])
                .args(job.args)
                .args(extra)
                .arg(&source)
                .arg(out);
            cmd
        };
        let mut ours = command(qcow, &[], &out_qcow);
        let mut theirs = command(Path::new("qemu-img"), job.theirs, &out_qemu);
        let (a, b) = time_alternately(
            job.label,
            (&mut ours, &out_qcow),
            (&mut theirs, &out_qemu),
            runs,
        )?;
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(&source)
            .arg(&out_qcow)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let (ours_len, theirs_len) = (
            fs::metadata(&out_qcow).map(|m| m.len()).unwrap_or(0),
            fs::metadata(&out_qemu).map(|m| m.len()).unwrap_or(0),
        );
        eprintln!(
            "{}: output {} (qcow) vs {} (qemu-img): {:.3}x",
            job.label,
            human_size(ours_len),
            human_size(theirs_len),
            ours_len as f64 / theirs_len.max(1) as f64
        );
        results.push(Outcome {
            image: job.label.to_owned(),
            size,
            ours: median(a),
            theirs: median(b),
            same,
        });
    }
    print_table(&results);
    Ok(results)
}

/// Builds the release CLI and returns the path of the `qcow` binary.
pub(crate) fn build_qcow(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "qcow-cli"]);
    eprintln!("$ {}", describe(&cmd));
    run_inherited(&mut cmd).context("cannot build the qcow CLI")?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let binary = target
        .join("release")
        .join(format!("qcow{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        binary.is_file(),
        "{} does not exist after building qcow-cli",
        binary.display()
    );
    Ok(binary)
}

/// Creates `image` in `work` unless it already exists with virtual size `size`.
fn ensure_image(work: &Path, image: &BenchImage, size: u64) -> Result<()> {
    let path = work.join(&image.name);
    if path.is_file() {
        match image_virtual_size(&path) {
            Ok(existing) if existing == size => {
                eprintln!("reusing {}", path.display());
                return Ok(());
            }
            Ok(existing) => eprintln!(
                "{} has virtual size {existing}, expected {size}: rebuilding",
                path.display()
            ),
            Err(e) => eprintln!("{} is unusable ({e:#}): rebuilding", path.display()),
        }
    }

    let raw = work.join(format!("{}.source.raw", image.name));
    eprintln!(
        "generating {} of source data for {}",
        human_size(size),
        image.name
    );
    write_source(&raw, image.content, size)?;
    // Convert to a temporary name so an interrupted build is never reused.
    let partial = work.join(format!("{}.partial", image.name));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", "qcow2"]);
    if let Content::Compressed(kind) = image.content {
        cmd.args(["-c", "-o", &format!("compression_type={kind}")]);
    }
    cmd.arg(&raw).arg(&partial);
    eprintln!("$ {}", describe(&cmd));
    let started = Instant::now();
    run_captured(&mut cmd)?;
    eprintln!("  took {:.1} s", started.elapsed().as_secs_f64());
    fs::rename(&partial, &path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
    fs::remove_file(&raw).with_context(|| format!("cannot remove {}", raw.display()))?;
    Ok(())
}

/// Reads an image's virtual size with `qemu-img info`.
fn image_virtual_size(path: &Path) -> Result<u64> {
    let json = run_captured(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(path),
    )?;
    top_level_u64(&json, "virtual-size").context("no virtual-size in `qemu-img info` output")
}

/// Writes `size` bytes of benchmark source data to `path`.
///
/// Compressible data is 7 MiB of text followed by 1 MiB of zeros, repeated.
fn write_source(path: &Path, content: Content, size: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(MIB as usize, file);
    let mut rng = Rng::new(match content {
        Content::Random => 0xbe7c_0001,
        Content::Compressed(_) => 0xbe7c_0002,
    });
    let mut buf = vec![0u8; MIB as usize];
    let mut written = 0;
    while written < size {
        let n = (size - written).min(MIB) as usize;
        let chunk = &mut buf[..n];
        match content {
            Content::Random => rng.fill_random(chunk),
            Content::Compressed(_) if (written / MIB) % 8 == 7 => chunk.fill(0),
            Content::Compressed(_) => rng.fill_text(chunk),
        }
        out.write_all(chunk)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += n as u64;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `PROGRAM convert -O raw IMAGE OUTPUT`.
fn convert_command(program: &Path, image: &Path, output: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["convert", "-O", "raw"]).arg(image).arg(output);
    cmd
}

/// Runs the two commands alternately: a warm-up each, then `runs` timed runs
/// each. Each command writes the file paired with it, which is removed
/// before every run (untimed): both tools write a new file, as a user's
/// convert usually does, and neither pays for truncating the last run's.
/// Returns the timings in seconds.
pub(crate) fn time_alternately(
    label: &str,
    ours: (&mut Command, &Path),
    theirs: (&mut Command, &Path),
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (ours, ours_out) = ours;
    let (theirs, theirs_out) = theirs;
    eprintln!("{label}: warm-up");
    time_once(ours, ours_out)?;
    time_once(theirs, theirs_out)?;
    let mut ours_times = Vec::with_capacity(runs);
    let mut theirs_times = Vec::with_capacity(runs);
    for run in 1..=runs {
        let a = time_once(ours, ours_out)?;
        let b = time_once(theirs, theirs_out)?;
        eprintln!("{label}: run {run}/{runs}: qcow {a:.3} s, qemu-img {b:.3} s");
        ours_times.push(a);
        theirs_times.push(b);
    }
    Ok((ours_times, theirs_times))
}

/// Runs a command once and returns its wall-clock time in seconds. Its
/// output file is removed and dirty pages of earlier runs are written back
/// first (`sync`, untimed), so that neither tool pays for the other's
/// writeback.
fn time_once(cmd: &mut Command, output: &Path) -> Result<f64> {
    match fs::remove_file(output) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", output.display()));
        }
        _ => {}
    }
    run_captured(&mut Command::new("sync"))?;
    let started = Instant::now();
    run_captured(cmd)?;
    Ok(started.elapsed().as_secs_f64())
}

/// The median of a non-empty sample (mean of the middle two if even).
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[mid],
        _ => (xs[mid - 1] + xs[mid]) / 2.0,
    }
}

/// Compares two files byte for byte.
fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .with_context(|| format!("cannot stat {}", p.display()))
    };
    if len(&fa, a)? != len(&fb, b)? {
        return Ok(false);
    }
    let mut ba = vec![0u8; 4 * MIB as usize];
    let mut bb = vec![0u8; 4 * MIB as usize];
    loop {
        let n =
            read_full(&mut fa, &mut ba).with_context(|| format!("cannot read {}", a.display()))?;
        let m =
            read_full(&mut fb, &mut bb).with_context(|| format!("cannot read {}", b.display()))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The measurements for one image.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Image file name.
    pub(crate) image: String,
    /// Virtual size in bytes.
    pub(crate) size: u64,
    /// Median seconds for `qcow convert`.
    pub(crate) ours: f64,
    /// Median seconds for `qemu-img convert`.
    pub(crate) theirs: f64,
    /// Whether both tools produced identical output.
    pub(crate) same: bool,
}

/// Prints the results table.
pub(crate) fn print_table(results: &[Outcome]) {
    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>8} {:>11} {:>13} {:>7}",
        "image", "qcow s", "qemu-img s", "ratio", "qcow MB/s", "qemu-img MB/s", "output"
    );
    for r in results {
        let mb = r.size as f64 / 1e6;
        println!(
            "{:<28} {:>10.3} {:>12.3} {:>8.2} {:>11.0} {:>13.0} {:>7}",
            r.image,
            r.ours,
            r.theirs,
            r.ours / r.theirs,
            mb / r.ours,
            mb / r.theirs,
            if r.same { "same" } else { "DIFFERS" }
        );
    }
    println!(
        "(medians; ratio = qcow / qemu-img, lower is better; MB = 10^6 bytes of virtual size)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn parses_options() -> Result<()> {
        let args: Vec<String> = ["--size-gib", "2", "--runs=3", "--qcow", "/bin/q"]
            .map(String::from)
            .into();
        let opts = Options::parse(&args)?;
        assert_eq!((opts.size_gib, opts.runs), (2, 3));
        assert_eq!(opts.qcow, Some(PathBuf::from("/bin/q")));
        assert!(Options::parse(&["--bogus".to_owned()]).is_err());
        assert!(Options::parse(&["--runs".to_owned()]).is_err());
        Ok(())
    }
}
