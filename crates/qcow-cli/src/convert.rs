//! `qcow convert`: copies an image's guest contents into a new raw, qcow2
//! or qcow image with the library's copy engine ([`qcow::copy`]): this
//! module makes the output and reports progress.
//!
//! The output is sparse: ranges that are unallocated or zero in the source,
//! and blocks of data that are all zeros (`-S`, 4 KiB by default), are left
//! as holes. The output is written in guest order, so its clusters follow
//! the disk's order as qemu-img lays them out (`-W` lets workers write out
//! of order).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow::copy::{CopyObserver, CopyOptions, Layers, ProgressBasis};
use qcow::{BlockDevice, Image, OpenOptions, Qcow2Image, RawImage};
use qcow_io::{FileStorage, Storage};

use crate::create_opts::OptionList;
use crate::open::{OpenFlags, open_image, open_options, refuse_overwriting_source};
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
    /// Source cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 'T', value_name = "CACHE")]
    source_cache: Option<String>,
    /// Write into an existing output instead of creating it (it must be
    /// at least as large as the source).
    #[arg(short = 'n')]
    no_create: bool,
    /// The existing output (-n) reads as zeros: zeros need not be written.
    #[arg(long)]
    target_is_zero: bool,
    /// The output's name is a list of image options (`driver=qcow2,
    /// file.filename=FILE,encrypt.key-secret=ID`), as qemu-img's
    /// `--target-image-opts`; only with -n.
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Keep going past unreadable source sectors: they are written as
    /// zeros, each with a warning.
    #[arg(long)]
    salvage: bool,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2).
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps: leave out bitmaps found in use, with a warning.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Rate limit (accepted for compatibility with qemu-img; not applied).
    #[arg(short = 'r', value_name = "RATE")]
    rate: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// Source images (several are concatenated), then the output file
    /// (options may come between them, as with qemu-img).
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// Largest `-S`, as qemu-img bounds it (its largest buffer).
const MAX_SPARSE: u64 = 16 << 20;

/// Runs `qcow convert`.
pub(crate) fn run(args: &ConvertArgs) -> Result<ExitCode> {
    let (dest, sources) = args
        .files
        .split_last()
        .filter(|(_, sources)| !sources.is_empty())
        .context("Must specify image file name")?;
    let sparse = parse_size(&args.sparse_size)
        .ok()
        .filter(|&n| n % 512 == 0 && n <= MAX_SPARSE)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
            )
        })?;
    if args.no_create && !args.options.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if args.target_image_opts && !args.no_create {
        bail!("--target-image-opts requires use of -n flag");
    }
    // An output named by options: the file it names, and how to open it.
    let target_flags = target_flags(args);
    let target_is_nbd = crate::open::nbd_kind(dest, &target_flags).is_some();
    let target_named = if args.target_image_opts && !target_is_nbd {
        Some(crate::open::resolve_name(dest, &target_flags, None)?)
    } else {
        None
    };
    let dest: &Path = match &target_named {
        Some(named) => &named.path,
        None => dest,
    };
    let has_backing = args.backing.is_some()
        || OptionList::parse(&args.options)?
            .get("backing_file")
            .is_some();
    if args.target_is_zero && has_backing {
        bail!("Cannot use --target-is-zero when the destination image has a backing file");
    }
    if sources.len() > 1 && has_backing {
        bail!(
            "Having a backing file for the target makes no sense when concatenating multiple input images"
        );
    }
    let snapshot = args.snapshot.as_deref().map(|s| {
        s.strip_prefix("snapshot.name=")
            .or_else(|| s.strip_prefix("snapshot.id="))
            .unwrap_or(s)
    });
    if snapshot.is_some() && sources.len() > 1 {
        bail!("No support for concatenating multiple snapshot");
    }
    if args.skip_broken_bitmaps && !args.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if args.bitmaps && sources.len() > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    let mut opened = Vec::with_capacity(sources.len());
    for path in sources {
        let source = open_image(
            path,
            args.format.as_deref(),
            &args.open,
            snapshot,
            true,
            true,
        )?;
        refuse_overwriting_source(&source, dest)?;
        opened.push(source);
    }
    let bitmaps = match (&opened[..], args.bitmaps) {
        (_, false) => Vec::new(),
        ([source], true) => source_bitmaps(source, args.skip_broken_bitmaps, args.quiet)?,
        _ => Vec::new(),
    };
    if args.bitmaps && args.output_format != "qcow2" {
        bail!(
            "Format driver '{}' does not support bitmaps",
            args.output_format
        );
    }
    let source: Box<dyn BlockDevice> = if opened.len() == 1 {
        Box::new(opened.remove(0))
    } else {
        Box::new(qcow::copy::Concat::new(
            opened
                .into_iter()
                .map(|i| Box::new(i) as Box<dyn BlockDevice>)
                .collect(),
        )?)
    };
    let size = source.virtual_size();
    // Requests to an NBD server wait on the network more than on the
    // processor: keep as many in flight as qemu-img's 8 coroutines do.
    let over_nbd = target_is_nbd
        || sources
            .iter()
            .any(|s| crate::open::nbd_kind(s, &args.open).is_some());
    let workers = args
        .workers
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            if over_nbd { cores.max(8) } else { cores }
        })
        .clamp(1, 16);
    let sync = match args.cache.as_str() {
        "unsafe" => false,
        "writeback" | "writethrough" | "none" | "directsync" => true,
        other => bail!("Invalid cache option: {other}"),
    };
    // An NBD export cannot be created: qemu-img writes into it as into an
    // existing output.
    let into_existing = args.no_create || target_is_nbd;
    let (target, top_only, new_reads_zero) = if into_existing {
        (
            existing_output(args, target_named.as_ref(), dest, size, sync)?,
            false,
            false,
        )
    } else {
        match args.output_format.as_str() {
            "raw" => (raw_output(args, dest, size, sync)?, false, true),
            "qcow2" => qcow2_output(args, dest, size, sync)?,
            "qcow" => (qcow_output(args, dest, size, sync)?, false, true),
            // An unwritten LUKS disk reads as decrypted zeros: every zero
            // is written, as qemu-img writes it.
            "luks" => (luks_output(args, dest, size, sync)?, false, false),
            other => bail!("Unknown file format '{other}'"),
        }
    };
    if args.compress && target.compressed_writes().is_none() {
        bail!("Compression not supported for this file format");
    }
    let mut options = CopyOptions::default()
        .workers(workers)
        .min_zero_run(sparse)
        .compress(args.compress)
        .layers(if top_only {
            Layers::Top(1)
        } else {
            Layers::All
        })
        .target_is_zero((!into_existing && new_reads_zero) || args.target_is_zero)
        .salvage(args.salvage)
        .in_order(!args.unordered);
    let progress = (args.progress && !args.quiet).then(|| Progress::new(size, 1.0));
    // qemu-img's progress counts what is read as data (a walk over the
    // source's metadata before the copy, only when it is shown).
    if progress.is_some() {
        options = options.progress_basis(ProgressBasis::Data);
    }
    let warner = Warner {
        progress: progress.as_ref(),
        quiet: args.quiet,
    };
    qcow::copy::copy(&*source, &target, &options, &warner)
        .with_context(|| format!("converting '{}'", sources[0].display()))?;
    let mut target = target;
    copy_bitmaps(&mut target, &bitmaps)?;
    close(target).with_context(|| format!("could not close '{}'", dest.display()))?;
    if let Some(bar) = progress {
        bar.finish();
    }
    Ok(ExitCode::SUCCESS)
}

/// A source bitmap to copy: name, granularity, enabled, dirty ranges.
type SourceBitmap = (String, u64, bool, Vec<(u64, u64)>);

/// The persistent bitmaps of `source` for `--bitmaps`, refusing one found
/// in use unless `skip_broken` (then it is left out with a warning), as
/// qemu-img does before it copies anything.
fn source_bitmaps(source: &Image, skip_broken: bool, quiet: bool) -> Result<Vec<SourceBitmap>> {
    let Image::Qcow2(image) = source else {
        bail!("Source lacks bitmap support");
    };
    let mut out = Vec::new();
    // QEMU goes through an image's bitmaps last to first.
    for entry in image.bitmaps().iter().rev() {
        if entry.in_use() {
            if skip_broken {
                if !quiet {
                    crate::report!("warning: Skipping inconsistent bitmap '{}'", entry.name);
                }
                continue;
            }
            bail!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                entry.name
            );
        }
        let ranges = image.bitmap_ranges(&entry.name)?;
        out.push((
            entry.name.clone(),
            entry.granularity(),
            entry.auto(),
            ranges,
        ));
    }
    // Added to the output in the source's order, as qemu-img's end up.
    out.reverse();
    Ok(out)
}

/// Adds each source bitmap to the output and sets its bits, as qemu-img
/// convert --bitmaps does once the data is copied.
fn copy_bitmaps(target: &mut Image, bitmaps: &[SourceBitmap]) -> Result<()> {
    if bitmaps.is_empty() {
        return Ok(());
    }
    let Image::Qcow2(image) = target else {
        bail!("Format driver does not support bitmaps");
    };
    let reason = |e: qcow::Error| match e {
        qcow::Error::Bitmap { reason, .. } => reason,
        other => crate::describe(&other.into()),
    };
    for (name, granularity, enabled, ranges) in bitmaps {
        image
            .add_bitmap(name, Some(*granularity), *enabled)
            .map_err(|e| anyhow::anyhow!("Failed to create bitmap {name}: {}", reason(e)))?;
        if let Err(e) = image.merge_into_bitmap(name, ranges) {
            let _ = image.remove_bitmap(name);
            bail!("Failed to populate bitmap {name}: {}", reason(e));
        }
    }
    Ok(())
}

/// Progress, and qemu-img's warning for each salvaged sector.
struct Warner<'a> {
    progress: Option<&'a Progress>,
    quiet: bool,
}

impl CopyObserver for Warner<'_> {
    fn progress(&self, done: u64, total: u64) {
        if let Some(p) = self.progress {
            p.progress(done, total);
        }
    }

    fn salvaged(&self, offset: u64, _len: u64, error: &qcow::Error) {
        if !self.quiet {
            let cause = match error {
                qcow::Error::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            crate::report!("warning: error while reading offset {offset}: {cause}");
        }
    }
}

/// The existing output of `-n`, opened for writing in the format `-O`
/// names; it must hold the whole source.
fn existing_output(
    args: &ConvertArgs,
    named: Option<&crate::open::Named>,
    dest: &Path,
    size: u64,
    sync: bool,
) -> Result<Image> {
    if let Some(target) = crate::open::nbd_image(dest, &target_flags(args), None, true)? {
        if target.virtual_size() < size {
            bail!("output file is smaller than input file");
        }
        return Ok(target);
    }
    let options = match named {
        // Named by options: their driver and secrets.
        Some(named) => named.options(&args.open)?,
        None => {
            let format = qcow::ImageFormat::from_name(&args.output_format)
                .map_err(|_| anyhow::anyhow!("Unknown file format '{}'", args.output_format))?;
            open_options(&args.open, None)?.format(Some(format))
        }
    };
    let target = crate::open::open(dest, &options.writable(true).sync(sync))?;
    if target.virtual_size() < size {
        bail!("output file is smaller than input file");
    }
    Ok(target)
}

/// The open flags of the output: the output's name is options with
/// `--target-image-opts`.
fn target_flags(args: &ConvertArgs) -> OpenFlags {
    let mut flags = args.open.clone();
    flags.image_opts = args.target_image_opts;
    flags
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
fn raw_output(args: &ConvertArgs, dest_path: &Path, size: u64, sync: bool) -> Result<Image> {
    let list = OptionList::parse(&args.options)?;
    let mut preallocation = qcow::Preallocation::Off;
    for (key, value) in list.pairs() {
        match key.as_str() {
            "preallocation" => preallocation = qcow::Preallocation::from_name(value)?,
            "extent_size_hint" => {
                crate::create_opts::extent_size_hint(value)?;
            }
            "size" => {}
            other => {
                crate::report!("Invalid parameter '{other}'");
                bail!("Invalid options for file format 'raw'");
            }
        }
    }
    if preallocation == qcow::Preallocation::Metadata {
        bail!("Invalid parameter 'preallocation': metadata preallocation is not supported for raw");
    }
    let mut dest = qcow::create_file(dest_path)?;
    if !sync {
        dest = dest.without_sync();
    }
    let name = dest_path.display().to_string();
    let regular = std::fs::metadata(dest_path).is_ok_and(|m| m.is_file());
    if regular {
        dest.set_len(size)
            .with_context(|| format!("could not size '{name}'"))?;
        match preallocation {
            qcow::Preallocation::Falloc => dest
                .allocate(0, size)
                .with_context(|| format!("could not preallocate '{name}'"))?,
            qcow::Preallocation::Full => dest
                .write_zeroes(0, size)
                .with_context(|| format!("could not preallocate '{name}'"))?,
            _ => {}
        }
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
/// A new qcow2 output, whether it takes only the top layer of the source
/// (it has a backing file), and whether it reads as zeros.
fn qcow2_output(
    args: &ConvertArgs,
    dest: &Path,
    size: u64,
    sync: bool,
) -> Result<(Image, bool, bool)> {
    let mut list = OptionList::parse(&args.options)?;
    if let Some(b) = &args.backing {
        list.set("backing_file", b);
    }
    if let Some(f) = &args.backing_format {
        list.set("backing_fmt", f);
    }
    let mut options = list.qcow2_options(size)?;
    options.encryption = list.encryption(&args.open.object)?;
    if let Some(backing) = &options.backing_file {
        let Some(format) = &options.backing_format else {
            bail!("Use of backing file requires explicit backing format");
        };
        // The backing file must open from where the output will be, as
        // qemu-img finds out once it has made the output: here, before.
        let path = qcow::relative_to(dest, backing);
        let mut backing_options = open_options(&args.open, Some(format))?;
        backing_options.force_share = true;
        backing_options.without_key = true;
        if let Err(e) = crate::open::open(&path, &backing_options) {
            let cause = match &e {
                qcow::Error::Open { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            bail!(
                "Could not open '{}': Could not open backing file: Could not open '{}': {cause}",
                dest.display(),
                path.display()
            );
        }
    }
    let top_only = options.backing_file.is_some();
    options.validate()?;
    if options.data_file.is_some() {
        crate::create::create_qcow2(dest, &options)?;
    } else if sync
        || options.preallocation != qcow::Preallocation::Off
        || options.encryption.is_some()
    {
        qcow::create(dest, &options)?;
    } else {
        // cache=unsafe: no sync while creating either (a sync right after
        // truncating a large old output waits for its write-back).
        let file = unsynced_output(dest)?;
        Qcow2Image::create(&file, &options)?;
    }
    let secret = match &options.encryption {
        Some(qcow::crypto::EncryptionOptions::Luks(luks)) => Some(luks.secret.clone()),
        Some(qcow::crypto::EncryptionOptions::Aes { secret }) => Some(secret.clone()),
        _ => None,
    };
    // Preallocated clusters of an encrypted image read as decrypted zeros,
    // not zeros: qemu-img then writes the zeros too.
    let reads_zero =
        options.encryption.is_none() || options.preallocation == qcow::Preallocation::Off;
    let dest = crate::open::open(
        dest,
        &OpenOptions::default()
            .writable(true)
            .sync(sync)
            .format(Some(qcow::ImageFormat::Qcow2))
            .open_data_file(options.data_file.is_some())
            .key_secret(secret),
    )?;
    Ok((dest, top_only, reads_zero))
}

/// A new LUKS volume output (`-o key-secret=ID` and the algorithms).
fn luks_output(args: &ConvertArgs, dest: &Path, size: u64, sync: bool) -> Result<Image> {
    let list = OptionList::parse(&args.options)?;
    let luks = list.luks_volume(&args.open.object)?;
    let secret = luks.secret.clone();
    let mut file = qcow::create_file(dest)?;
    if !sync {
        file = file.without_sync();
    }
    qcow::LuksImage::create(&file, &luks, size)?;
    drop(file);
    Ok(crate::open::open(
        dest,
        &OpenOptions::default()
            .writable(true)
            .sync(sync)
            .format(Some(qcow::ImageFormat::Luks))
            .key_secret(Some(secret)),
    )?)
}

/// A new qcow (version 1) output.
fn qcow_output(args: &ConvertArgs, dest: &Path, size: u64, sync: bool) -> Result<Image> {
    let list = OptionList::parse(&args.options)?;
    let mut options = list.qcow_options(size)?;
    options.encryption = list.encryption(&args.open.object)?;
    let secret = match &options.encryption {
        Some(qcow::crypto::EncryptionOptions::Aes { secret }) => Some(secret.clone()),
        _ => None,
    };
    if options.backing_file.is_some() {
        bail!("converting onto a backing file is not supported yet");
    }
    qcow::QcowImage::validate_create(&options)?;
    if sync {
        qcow::create_qcow(dest, &options)?;
    } else {
        qcow::QcowImage::create(&unsynced_output(dest)?, &options)?;
    }
    Ok(crate::open::open(
        dest,
        &OpenOptions::default()
            .writable(true)
            .sync(sync)
            .format(Some(qcow::ImageFormat::Qcow))
            .key_secret(secret),
    )?)
}

/// A new output file whose flushes do not sync (qemu-img's cache=unsafe).
fn unsynced_output(path: &std::path::Path) -> Result<FileStorage> {
    Ok(qcow::create_file(path)?.without_sync())
}
