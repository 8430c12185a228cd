//! `qcow rebase`: gives an image another backing file, as qemu-img rebase
//! does. Safe mode (the default) first writes into the image every range it
//! leaves to its backing chain where the old chain and the new backing file
//! differ (the library's [`qcow::copy::copy_differences`]), so the guest
//! sees the same disk; `-u` changes the header only; `-b ""` flattens.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};
use qcow::copy::{CopyObserver, CopyOptions, Layers};
use qcow::{BlockDevice, Image, ImageFormat, RawImage};

use crate::open::{OpenFlags, open_options};
use crate::progress::Progress;

/// QEMU block drivers that read a file as it is: a backing file named with
/// one of these is opened as raw.
const RAW_LIKE_FORMATS: &[&str] = &["file", "host_device", "host_cdrom"];

/// Other formats QEMU knows and qcow does not read: `-u` writes them into
/// the header as given, as qemu-img does.
const OTHER_QEMU_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
];

/// Arguments of `qcow rebase`.
#[derive(Debug, clap::Args)]
pub(crate) struct RebaseArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// The new backing file, relative to the image's directory; "" for
    /// none (the image then holds the whole disk).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Unsafe: change the header only (the old backing file is not read).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Write the copied clusters compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Cache mode of the image (accepted for compatibility with qemu-img).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the backing files (accepted for compatibility).
    #[arg(short = 'T', value_name = "CACHE")]
    source_cache: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Runs `qcow rebase`.
pub(crate) fn run(args: &RebaseArgs) -> Result<ExitCode> {
    let safe = !args.unsafe_mode;
    let Some(backing) = args
        .backing
        .as_deref()
        .or(if safe { None } else { Some("") })
    else {
        bail!("Must specify backing file (-b) or use unsafe mode (-u)");
    };
    // The format to open the new backing file with (safe mode), and the
    // name written in the header.
    let (backing_format, format_name) = match &args.backing_format {
        Some(name) => match ImageFormat::from_name(name) {
            Ok(format) => (Some(format), Some(format.name().to_owned())),
            Err(_) if RAW_LIKE_FORMATS.contains(&name.as_str()) => {
                (Some(ImageFormat::Raw), Some(name.clone()))
            }
            Err(_) if OTHER_QEMU_FORMATS.contains(&name.as_str()) => (None, Some(name.clone())),
            Err(_) => bail!("Invalid format name: '{name}'"),
        },
        None => (None, None),
    };
    if let (true, Some(name), None) = (safe, &format_name, backing_format) {
        bail!("Could not open new backing file: format '{name}' is not one qcow reads");
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    if args.open.force_share {
        // The image is written; -U applies to the backing files only.
        options.force_share = false;
    }
    options.writable = true;
    options.follow_backing = safe;
    let image = crate::open::open(&file, &options)?;
    // As qemu-img: the format's compression is asked about first.
    if args.compress && image.compressed_writes().is_none() {
        bail!("Compression not supported for this file format");
    }
    let Image::Qcow2(mut image) = image else {
        bail!("Could not change the backing file to '{backing}': Operation not supported");
    };
    // Everything that can refuse the change is asked before the image is
    // written.
    let new = if backing.is_empty() {
        None
    } else {
        let Some(format) = format_name.as_deref() else {
            bail!(
                "Could not change the backing file to '{backing}': backing format must be specified"
            );
        };
        Some((backing, format))
    };
    if let Err(qcow::Error::NoSpace { .. }) = image.header_with_backing(new) {
        bail!("Could not change the backing file to '{backing}': No space left in the file header");
    }
    if safe {
        let baseline: Box<dyn BlockDevice> = match new {
            Some((name, _)) => {
                let mut backing_options = open_options(&args.open, None)?;
                backing_options.format = backing_format;
                let path = qcow::relative_to(&file, name);
                let opened = crate::open::open(&path, &backing_options).map_err(|e| {
                    anyhow::Error::new(e)
                        .context(format!("Could not open new backing file '{name}'"))
                })?;
                Box::new(opened)
            }
            // No backing file: the disk past the image's clusters is zeros.
            None => Box::new(RawImage::open_sized(
                "(zeros)",
                Arc::new(qcow_io::MemStorage::new()),
                0,
            )),
        };
        let copy = CopyOptions::default()
            .layers(Layers::BelowTop)
            .compress(args.compress);
        let progress =
            (args.progress && !args.quiet).then(|| Progress::new(image.virtual_size(), 2.0));
        let observer: &dyn CopyObserver = match &progress {
            Some(p) => p,
            None => &(),
        };
        let image_ref: &dyn BlockDevice = &*image;
        qcow::copy::copy_differences(image_ref, image_ref, &*baseline, &copy, observer)
            .map_err(|e| anyhow::Error::new(e).context("Error while writing to COW image"))?;
        if let Some(p) = progress {
            p.finish();
        }
    }
    image.set_backing_file(new).map_err(|e| {
        anyhow::Error::new(e).context(format!("Could not change the backing file to '{backing}'"))
    })?;
    image.close()?;
    Ok(ExitCode::SUCCESS)
}
