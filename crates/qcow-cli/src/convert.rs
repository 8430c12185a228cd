//! `qcow convert`: copies an image's guest contents into a new raw, qcow2
//! or qcow image with the library's copy engine ([`qcow::copy`]): this
//! module makes the output and reports progress.
//!
//! The output is sparse: ranges that are unallocated or zero in the source,
//! and blocks of data that are all zeros (`-S`, 4 KiB by default), are left
//! as holes. The output is written in guest order, so its clusters follow
//! the disk's order as qemu-img lays them out (`-W` lets workers write out
//! of order).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow::copy::{CopyObserver, CopyOptions, Layers};
use qcow::{BlockDevice, Image, OpenOptions, Qcow2Image, RawImage};
use qcow_io::{FileStorage, Storage};

use crate::create_opts::OptionList;
use crate::open::{OpenFlags, open_image, refuse_overwriting_source};
use crate::progress::Progress;
use crate::size::parse_size;

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
    /// Let workers write out of order (the output's clusters then follow
    /// the order the writes come in, not the disk's).
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
    let sparse = parse_size(&args.sparse_size)?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 16);
    let sync = match args.cache.as_str() {
        "unsafe" => false,
        "writeback" | "writethrough" | "none" | "directsync" => true,
        other => bail!("invalid cache mode {other:?}"),
    };
    let (target, top_only) = match args.output_format.as_str() {
        "raw" => {
            if args.compress {
                bail!("compression is not supported for raw output");
            }
            (raw_output(args, size, sync)?, false)
        }
        "qcow2" => qcow2_output(args, size, sync)?,
        "qcow" => (qcow_output(args, size, sync)?, false),
        other => bail!("output format {other:?} is not supported (raw, qcow2 or qcow)"),
    };
    let options = CopyOptions::default()
        .workers(workers)
        .min_zero_run(sparse)
        .compress(args.compress)
        .layers(if top_only {
            Layers::Top(1)
        } else {
            Layers::All
        })
        .target_is_zero(true)
        .in_order(!args.unordered);
    let progress = args.progress.then(|| Progress::new(size));
    let observer: &dyn CopyObserver = match &progress {
        Some(p) => p,
        None => &(),
    };
    qcow::copy::copy(&source, &target, &options, observer)
        .with_context(|| format!("converting '{}'", args.source.display()))?;
    close(target).with_context(|| format!("could not close '{}'", args.dest.display()))?;
    if let Some(bar) = progress {
        bar.finish();
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes everything written durable (as the cache mode says) and closes
/// the output.
fn close(target: Image) -> qcow::Result<()> {
    match target {
        Image::Qcow2(image) => image.close(),
        other => other.flush(),
    }
}

/// A raw output: a regular file takes the disk's size; a device keeps its
/// own.
fn raw_output(args: &ConvertArgs, size: u64, sync: bool) -> Result<Image> {
    if !args.options.is_empty() {
        bail!("raw output takes no -o options");
    }
    let mut dest = qcow::create_file(&args.dest)?;
    if !sync {
        dest = dest.without_sync();
    }
    let name = args.dest.display().to_string();
    let regular = std::fs::metadata(&args.dest).is_ok_and(|m| m.is_file());
    if regular {
        dest.set_len(size)
            .with_context(|| format!("could not size '{name}'"))?;
        Ok(Image::Raw(RawImage::open(&name, Arc::new(dest))?))
    } else {
        // Flushing a device is left to its owner, as qemu-img leaves it.
        Ok(Image::Raw(RawImage::open_sized(
            &name,
            Arc::new(dest.without_sync()),
            size,
        )))
    }
}

/// A new qcow2 output, and whether only the source's top layer is copied
/// (the output has a backing file).
fn qcow2_output(args: &ConvertArgs, size: u64, sync: bool) -> Result<(Image, bool)> {
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
    Ok((dest, top_only))
}

/// A new qcow (version 1) output.
fn qcow_output(args: &ConvertArgs, size: u64, sync: bool) -> Result<Image> {
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
    Ok(qcow::open(
        &args.dest,
        &OpenOptions {
            writable: true,
            sync,
            format: Some(qcow::ImageFormat::Qcow),
            ..OpenOptions::default()
        },
    )?)
}

/// A new output file whose flushes do not sync (qemu-img's cache=unsafe).
fn unsynced_output(path: &std::path::Path) -> Result<FileStorage> {
    Ok(qcow::create_file(path)?.without_sync())
}
