//! `qcow convert`: copies an image's guest contents into a new image.
//!
//! The output is sparse: ranges that are unallocated or zero in the source,
//! and blocks of data that are all zeros, are left as holes. Chunks are
//! copied by several threads at once; each reads through the engine (which
//! decompresses compressed clusters on the thread that reads them) and
//! writes at the chunk's own offset.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use qcow::{Allocation, BlockDevice};
use qcow_io::{FileStorage, Storage};

use crate::open::{OpenFlags, open_image};

/// Bytes each worker copies at a time.
const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection in data (qemu-img's default `-S 4k`).
const ZERO_BLOCK: usize = 4096;

/// Arguments of `qcow convert`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format (only raw so far).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Source snapshot: `snapshot.name=NAME`, `snapshot.id=ID` or a name.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Number of parallel workers.
    #[arg(short = 'm', value_name = "N")]
    workers: Option<usize>,
    #[command(flatten)]
    open: OpenFlags,
    /// Source image.
    source: PathBuf,
    /// Output file.
    dest: PathBuf,
}

/// Runs `qcow convert`.
pub(crate) fn run(args: &ConvertArgs) -> Result<ExitCode> {
    if args.output_format != "raw" {
        bail!(
            "output format {:?} is not supported yet (only raw)",
            args.output_format
        );
    }
    let snapshot = args.snapshot.as_deref().map(|s| {
        s.strip_prefix("snapshot.name=")
            .or_else(|| s.strip_prefix("snapshot.id="))
            .unwrap_or(s)
    });
    let source = open_image(
        &args.source,
        args.format.as_deref(),
        &args.open,
        snapshot,
        true,
    )?;
    let size = source.virtual_size();
    let dest = FileStorage::create(&args.dest)
        .with_context(|| format!("could not create '{}'", args.dest.display()))?;
    // Devices (and /dev/null) keep their size; regular files take the disk's.
    let regular = std::fs::metadata(&args.dest).is_ok_and(|m| m.is_file());
    if regular {
        dest.set_len(size)
            .with_context(|| format!("could not size '{}'", args.dest.display()))?;
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 16);
    let progress = args.progress.then(|| progress_bar(size));
    copy_sparse(&source, &dest, workers, progress.as_ref())
        .with_context(|| format!("converting '{}'", args.source.display()))?;
    if regular {
        dest.flush()
            .with_context(|| format!("could not flush '{}'", args.dest.display()))?;
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(size: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Copies every guest byte of `source` that may be non-zero into `dest`.
fn copy_sparse(
    source: &dyn BlockDevice,
    dest: &dyn Storage,
    workers: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    let size = source.virtual_size();
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let done = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; CHUNK as usize];
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if start >= size {
                            return Ok(());
                        }
                        let end = (start + CHUNK).min(size);
                        let result = copy_range(source, dest, start, end, &mut buf);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return result;
                        }
                        done.fetch_add(end - start, Ordering::Relaxed);
                        if let Some(bar) = progress {
                            bar.set_position(done.load(Ordering::Relaxed));
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(result) => result?,
                Err(_) => bail!("a copy worker panicked"),
            }
        }
        Ok(())
    })
}

fn copy_range(
    source: &dyn BlockDevice,
    dest: &dyn Storage,
    start: u64,
    end: u64,
    buf: &mut [u8],
) -> Result<()> {
    let mut pos = start;
    while pos < end {
        let extent = source.block_status(pos, end - pos)?;
        let len = extent.len.max(1).min(end - pos);
        if let Allocation::Data { .. } = extent.allocation {
            // len <= CHUNK == buf.len().
            let data = &mut buf[..len as usize];
            source.read_at(data, pos)?;
            write_nonzero(dest, data, pos)?;
        }
        pos += len;
    }
    Ok(())
}

/// Writes the blocks of `data` that are not all zeros.
fn write_nonzero(dest: &dyn Storage, data: &[u8], offset: u64) -> Result<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let block = &data[i..(i + ZERO_BLOCK).min(data.len())];
        let zero = is_zero(block);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                dest.write_at(&data[s..i], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        i += block.len();
    }
    if let Some(s) = run_start {
        dest.write_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Whether every byte is zero (word at a time, which the compiler vectorizes).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let all_words = words.by_ref().fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    });
    all_words == 0 && words.remainder().iter().all(|&b| b == 0)
}
