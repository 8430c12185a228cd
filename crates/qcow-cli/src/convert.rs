//! `qcow convert`: copies an image's guest contents into a new raw or
//! qcow2 image.
//!
//! The output is sparse: ranges that are unallocated or zero in the source,
//! and blocks of data that are all zeros (`-S`, 4 KiB by default), are left
//! as holes. Several worker threads read (decompressing on the thread that
//! reads) and, for `-c`, compress. A raw output is written by the workers at
//! each chunk's own offset; a qcow2 output is written by one writer in guest
//! order, so its clusters, compressed ones packed back to back, follow the
//! disk's order as qemu-img lays them out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use qcow::{Allocation, BlockDevice, OpenOptions, Qcow2Image};
use qcow_io::{FileStorage, Storage};

use crate::create_opts::OptionList;
use crate::open::{OpenFlags, open_image, refuse_overwriting_source};
use crate::size::parse_size;

/// Bytes each worker copies at a time (a multiple of every cluster size).
const CHUNK: u64 = 4 << 20;

/// Arguments of `qcow convert`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Compress the output's clusters (qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Output format options, `key=value,...` (qemu-img's names).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Smallest run of zeros left as a hole (0: write everything).
    #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
    sparse_size: String,
    /// Source snapshot: `snapshot.name=NAME`, `snapshot.id=ID` or a name.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Backing file of the output (qcow2): only what the source's top
    /// layer holds is copied; the rest comes from this file, which must
    /// hold what the source's backing chain holds.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the output's backing file (probed when omitted, as the
    /// file is named on the command line).
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Number of worker threads.
    #[arg(short = 'm', value_name = "N")]
    workers: Option<usize>,
    /// Accepted for compatibility with qemu-img (out-of-order writes);
    /// qcow2 output is always written in order.
    #[arg(short = 'W')]
    unordered: bool,
    /// Output cache mode: `unsafe` (the default, as qemu-img's convert:
    /// no sync at the end) or `writeback` (sync the output when done).
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe")]
    cache: String,
    #[command(flatten)]
    open: OpenFlags,
    /// Source image.
    source: PathBuf,
    /// Output file.
    dest: PathBuf,
}

/// What the writer must write for one part of a chunk.
enum Piece {
    /// Bytes `start..end` of the chunk's buffer, at guest offset `guest`.
    Range {
        guest: u64,
        start: usize,
        end: usize,
    },
    /// One compressed cluster at guest offset `guest`.
    Packed { guest: u64, bytes: Vec<u8> },
    /// A range that must read as zeros over the output's backing file.
    Zero { guest: u64, len: u64 },
}

/// A chunk read by a worker: its buffer and what to write from it.
struct Chunk {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
}

/// Runs `qcow convert`.
pub(crate) fn run(args: &ConvertArgs) -> Result<ExitCode> {
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
        true,
    )?;
    refuse_overwriting_source(&source, &args.dest)?;
    let size = source.virtual_size();
    let sparse = usize::try_from(parse_size(&args.sparse_size)?)?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 16);
    let progress = args.progress.then(|| progress_bar(size));
    let sync = match args.cache.as_str() {
        "unsafe" => false,
        "writeback" | "writethrough" | "none" | "directsync" => true,
        other => bail!("invalid cache mode {other:?}"),
    };
    match args.output_format.as_str() {
        "raw" => {
            if args.compress {
                bail!("compression is not supported for raw output");
            }
            to_raw(
                args,
                &source,
                size,
                sparse,
                workers,
                progress.as_ref(),
                sync,
            )?;
        }
        "qcow2" => to_qcow2(
            args,
            &source,
            size,
            sparse,
            workers,
            progress.as_ref(),
            sync,
        )?,
        "qcow" => to_qcow(args, &source, size, sparse, progress.as_ref(), sync)?,
        other => bail!("output format {other:?} is not supported (raw, qcow2 or qcow)"),
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    Ok(ExitCode::SUCCESS)
}

fn to_raw(
    args: &ConvertArgs,
    source: &dyn BlockDevice,
    size: u64,
    sparse: usize,
    workers: usize,
    progress: Option<&indicatif::ProgressBar>,
    sync: bool,
) -> Result<()> {
    if !args.options.is_empty() {
        bail!("raw output takes no -o options");
    }
    let mut dest = qcow::create_file(&args.dest)?;
    if !sync {
        dest = dest.without_sync();
    }
    // Devices (and /dev/null) keep their size; regular files take the disk's.
    let regular = std::fs::metadata(&args.dest).is_ok_and(|m| m.is_file());
    if regular {
        dest.set_len(size)
            .with_context(|| format!("could not size '{}'", args.dest.display()))?;
    }
    copy_unordered(source, size, workers, sparse, progress, |run, at| {
        Ok(dest.write_at(run, at)?)
    })
    .with_context(|| format!("converting '{}'", args.source.display()))?;
    if regular {
        dest.flush()
            .with_context(|| format!("could not flush '{}'", args.dest.display()))?;
    }
    Ok(())
}

fn to_qcow2(
    args: &ConvertArgs,
    source: &dyn BlockDevice,
    size: u64,
    sparse: usize,
    workers: usize,
    progress: Option<&indicatif::ProgressBar>,
    sync: bool,
) -> Result<()> {
    let mut list = OptionList::parse(&args.options)?;
    if let Some(b) = &args.backing {
        list.set("backing_file", b);
    }
    if let Some(f) = &args.backing_format {
        list.set("backing_fmt", f);
    }
    let mut options = list.qcow2_options(size)?;
    if let Some(backing) = &options.backing_file {
        if options.backing_format.is_none() {
            let path = qcow::relative_to(&args.dest, backing);
            let format = qcow::probe(&path)
                .with_context(|| format!("could not probe backing file '{}'", path.display()))?;
            options.backing_format = Some(format.name().to_owned());
        }
    }
    let top_only = options.backing_file.is_some();
    options.validate()?;
    if sync || options.preallocation != qcow::Preallocation::Off {
        qcow::create(&args.dest, &options)?;
    } else {
        // cache=unsafe: no sync while creating either (a sync right after
        // truncating a large old output waits for its write-back).
        let file = unsynced_output(&args.dest)?;
        Qcow2Image::create(&file, &options)?;
    }
    let dest = qcow::open(
        &args.dest,
        &OpenOptions {
            writable: true,
            sync,
            format: Some(qcow::ImageFormat::Qcow2),
            ..OpenOptions::default()
        },
    )?;
    let qcow::Image::Qcow2(dest) = dest else {
        bail!("'{}' did not open as qcow2", args.dest.display());
    };
    let cluster_size = options.cluster_size as usize;
    let compress = args.compress;
    if !compress && !top_only {
        // Like qemu-img -W: every worker writes its own chunks; the engine
        // allocates under its lock and writes the data outside it.
        let granularity = if sparse == 0 { 0 } else { cluster_size };
        copy_unordered(source, size, workers, granularity, progress, |run, at| {
            Ok(dest.write_at(run, at)?)
        })
        .with_context(|| format!("converting '{}'", args.source.display()))?;
        dest.close()
            .with_context(|| format!("could not close '{}'", args.dest.display()))?;
        return Ok(());
    }
    let chunks = size.div_ceil(CHUNK);
    let (tx, rx) = sync_channel::<(u64, Result<Chunk>)>(workers * 2);
    // Buffers go back from the writer to the workers, so no chunk is
    // copied and no fresh memory is touched per chunk.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, dest, pool) = (&next, &stop, &*dest, &pool);
            scope.spawn(move || {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= chunks || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let buf = pool
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pop()
                        .unwrap_or_else(|| vec![0u8; CHUNK as usize]);
                    let chunk = read_chunk(
                        source,
                        dest,
                        index * CHUNK,
                        ((index + 1) * CHUNK).min(size),
                        buf,
                        cluster_size,
                        if top_only { 0 } else { sparse },
                        compress,
                        top_only,
                    );
                    if tx.send((index, chunk)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let result = write_in_order(&dest, rx, chunks, progress, size, &pool);
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result
    })
    .with_context(|| format!("converting '{}'", args.source.display()))?;
    dest.close()
        .with_context(|| format!("could not close '{}'", args.dest.display()))?;
    Ok(())
}

/// Converts to a qcow version 1 image, in one thread (a legacy format).
fn to_qcow(
    args: &ConvertArgs,
    source: &dyn BlockDevice,
    size: u64,
    sparse: usize,
    progress: Option<&indicatif::ProgressBar>,
    sync: bool,
) -> Result<()> {
    let options = OptionList::parse(&args.options)?.qcow_options(size)?;
    if options.backing_file.is_some() {
        bail!("converting onto a backing file is not supported yet");
    }
    qcow::QcowImage::validate_create(&options)?;
    if sync {
        qcow::create_qcow(&args.dest, &options)?;
    } else {
        qcow::QcowImage::create(&unsynced_output(&args.dest)?, &options)?;
    }
    let dest = qcow::open(
        &args.dest,
        &OpenOptions {
            writable: true,
            sync,
            format: Some(qcow::ImageFormat::Qcow),
            ..OpenOptions::default()
        },
    )?;
    let qcow::Image::Qcow(dest) = dest else {
        bail!("'{}' did not open as qcow", args.dest.display());
    };
    let cluster_size = dest.header().cluster_size() as usize;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut start = 0;
    while start < size {
        let end = (start + CHUNK).min(size);
        let chunk = &mut buf[..(end - start) as usize];
        source.read_at(chunk, start)?;
        for (i, cluster) in chunk.chunks(cluster_size).enumerate() {
            let guest = start + (i * cluster_size) as u64;
            if sparse > 0 && is_zero(cluster) {
                continue;
            }
            if args.compress {
                let mut whole = cluster.to_vec();
                whole.resize(cluster_size, 0);
                dest.write_compressed_cluster(&whole, guest)?;
            } else {
                dest.write_at(cluster, guest)?;
            }
        }
        start = end;
        if let Some(bar) = progress {
            bar.set_position(start);
        }
    }
    dest.flush()
        .with_context(|| format!("could not flush '{}'", args.dest.display()))?;
    Ok(())
}

/// A new output file whose flushes do not sync (qemu-img's cache=unsafe).
fn unsynced_output(path: &std::path::Path) -> Result<FileStorage> {
    Ok(qcow::create_file(path)?.without_sync())
}

/// Receives chunks from the workers and writes them in guest order.
fn write_in_order(
    dest: &Qcow2Image,
    rx: std::sync::mpsc::Receiver<(u64, Result<Chunk>)>,
    chunks: u64,
    progress: Option<&indicatif::ProgressBar>,
    size: u64,
    pool: &Mutex<Vec<Vec<u8>>>,
) -> Result<()> {
    let mut waiting: BTreeMap<u64, Chunk> = BTreeMap::new();
    let mut expected = 0u64;
    while expected < chunks {
        let Ok((index, chunk)) = rx.recv() else {
            bail!("a convert worker stopped early");
        };
        waiting.insert(index, chunk?);
        while let Some(chunk) = waiting.remove(&expected) {
            // Runs of compressed clusters go down together.
            let mut packed: Vec<(u64, &[u8])> = Vec::new();
            for piece in &chunk.pieces {
                if let Piece::Packed { guest, bytes } = piece {
                    packed.push((*guest, bytes));
                    continue;
                }
                if !packed.is_empty() {
                    dest.write_packed_clusters(&packed)?;
                    packed.clear();
                }
                match piece {
                    Piece::Range { guest, start, end } => {
                        dest.write_at(&chunk.buf[*start..*end], *guest)?
                    }
                    Piece::Zero { guest, len } => dest.write_zeroes(*guest, *len, false)?,
                    Piece::Packed { .. } => {}
                }
            }
            if !packed.is_empty() {
                dest.write_packed_clusters(&packed)?;
            }
            pool.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(chunk.buf);
            expected += 1;
            if let Some(bar) = progress {
                bar.set_position((expected * CHUNK).min(size));
            }
        }
    }
    Ok(())
}

/// Reads one chunk into `buf` and says what the writer must write: runs of
/// non-zero clusters, or compressed clusters.
#[allow(clippy::too_many_arguments)]
fn read_chunk(
    source: &dyn BlockDevice,
    dest: &Qcow2Image,
    start: u64,
    end: u64,
    mut buf: Vec<u8>,
    cluster_size: usize,
    sparse: usize,
    compress: bool,
    top_only: bool,
) -> Result<Chunk> {
    let mut pieces = Vec::new();
    let mut pos = start;
    let mut whole = Vec::new();
    while pos < end {
        let extent = source.block_status(pos, end - pos)?;
        let len = extent.len.max(1).min(end - pos);
        if top_only {
            // Only the source's top layer: the output's backing file holds
            // the rest. Zeros in the top layer must hide the backing file.
            match extent.allocation {
                Allocation::Zero { depth: 0, .. }
                | Allocation::Data {
                    depth: 0,
                    zero: true,
                    ..
                } => {
                    pieces.push(Piece::Zero { guest: pos, len });
                    pos += len;
                    continue;
                }
                Allocation::Data { depth: 0, .. } => {}
                _ => {
                    pos += len;
                    continue;
                }
            }
        }
        if let Allocation::Data { zero: false, .. } = extent.allocation {
            // Whole clusters around the extent, so each is written once.
            let from = pos - (pos - start) % cluster_size as u64;
            let to = (pos + len).next_multiple_of(cluster_size as u64).min(end);
            let (a, b) = ((from - start) as usize, (to - start) as usize);
            source.read_at(&mut buf[a..b], from)?;
            if compress {
                for c in (a..b).step_by(cluster_size) {
                    let cluster = &buf[c..(c + cluster_size).min(b)];
                    let guest = start + c as u64;
                    if sparse > 0 && is_zero(cluster) {
                        continue;
                    }
                    let packed = if cluster.len() == cluster_size {
                        dest.compress_cluster(cluster)
                    } else {
                        // The disk's last, partial cluster: pad with zeros.
                        whole.clear();
                        whole.extend_from_slice(cluster);
                        whole.resize(cluster_size, 0);
                        dest.compress_cluster(&whole)
                    };
                    match packed {
                        Some(bytes) => pieces.push(Piece::Packed { guest, bytes }),
                        None => pieces.push(Piece::Range {
                            guest,
                            start: c,
                            end: c + cluster.len(),
                        }),
                    }
                }
            } else {
                let granularity = if sparse == 0 { 0 } else { cluster_size };
                for (at, run) in nonzero_runs(&buf[a..b], granularity) {
                    pieces.push(Piece::Range {
                        guest: from + at as u64,
                        start: a + at,
                        end: a + at + run.len(),
                    });
                }
            }
            pos = to;
        } else {
            pos += len;
        }
    }
    Ok(Chunk { buf, pieces })
}

/// Copies every run of `source` that may hold non-zero data with
/// `write(bytes, offset)`, chunks on `workers` threads in any order, leaving
/// out blocks of `granularity` bytes that are all zeros (0: none).
fn copy_unordered(
    source: &dyn BlockDevice,
    size: u64,
    workers: usize,
    granularity: usize,
    progress: Option<&indicatif::ProgressBar>,
    write: impl Fn(&[u8], u64) -> Result<()> + Sync,
) -> Result<()> {
    let done = AtomicU64::new(0);
    for_each_chunk(size, workers, |start, end, buf| {
        let mut pos = start;
        while pos < end {
            let extent = source.block_status(pos, end - pos)?;
            let len = extent.len.max(1).min(end - pos);
            if let Allocation::Data { zero: false, .. } = extent.allocation {
                // len <= CHUNK == buf.len().
                let data = &mut buf[..len as usize];
                source.read_at(data, pos)?;
                for (at, run) in nonzero_runs(data, granularity) {
                    write(run, pos + at as u64)?;
                }
            }
            pos += len;
        }
        if let Some(bar) = progress {
            bar.set_position(done.fetch_add(end - start, Ordering::Relaxed) + end - start);
        }
        Ok(())
    })
}

/// Runs `work(start, end, buffer)` over every chunk of a disk of `size`
/// bytes on `workers` threads; stops at the first error.
fn for_each_chunk<F>(size: u64, workers: usize, work: F) -> Result<()>
where
    F: Fn(u64, u64, &mut [u8]) -> Result<()> + Sync,
{
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; CHUNK as usize];
                    loop {
                        let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if start >= size || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let end = (start + CHUNK).min(size);
                        if let Err(e) = work(start, end, &mut buf) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(result) => result?,
                Err(_) => bail!("a convert worker panicked"),
            }
        }
        Ok(())
    })
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

/// The runs of `data` that are not made of all-zero blocks of `block`
/// bytes, as (offset, bytes). A block size of 0 keeps everything.
fn nonzero_runs(data: &[u8], block: usize) -> Vec<(usize, &[u8])> {
    if block == 0 {
        return vec![(0, data)];
    }
    let mut runs = Vec::new();
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + block).min(data.len());
        let zero = is_zero(&data[i..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                runs.push((s, &data[s..i]));
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        runs.push((s, &data[s..]));
    }
    runs
}

/// Whether every byte is zero: 64-byte blocks (which the compiler
/// vectorizes), stopping at the first one that is not.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::nonzero_runs;

    #[test]
    fn zero_blocks_split_runs() {
        let mut data = vec![0u8; 16];
        data[0] = 1;
        data[9] = 2;
        let runs = nonzero_runs(&data, 4);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].0, runs[0].1.len()), (0, 4));
        assert_eq!((runs[1].0, runs[1].1.len()), (8, 4));
        assert_eq!(nonzero_runs(&data, 0).len(), 1);
        assert!(nonzero_runs(&[0u8; 8], 4).is_empty());
    }
}
