//! `qcow resize`: grows an image, as qemu-img resize does.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::{BlockDevice, Image, ImageFormat, OpenOptions};

use crate::open::OpenFlags;
use crate::size::parse_size;

/// Arguments of `qcow resize`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResizeArgs {
    /// Allow shrinking (not supported yet).
    #[arg(long)]
    shrink: bool,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
    /// New size: `SIZE`, `+SIZE` or `-SIZE`.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Runs `qcow resize`.
pub(crate) fn run(args: &ResizeArgs) -> Result<ExitCode> {
    if args.open.force_share {
        bail!("force-share (-U) can only be used with read-only images");
    }
    let mut options = if args.open.untrusted {
        OpenOptions::default()
    } else {
        OpenOptions::trusted()
    };
    options.writable = true;
    options.format = args
        .format
        .as_deref()
        .map(ImageFormat::from_name)
        .transpose()?;
    options.assume_backing_format = args
        .open
        .assume_backing_format
        .as_deref()
        .map(ImageFormat::from_name)
        .transpose()?;
    let image = qcow::open(&args.file, &options)?;
    let current = image.virtual_size();
    let new_size = if let Some(delta) = args.size.strip_prefix('+') {
        current.saturating_add(parse_size(delta)?)
    } else if let Some(delta) = args.size.strip_prefix('-') {
        current.saturating_sub(parse_size(delta)?)
    } else {
        parse_size(&args.size)?
    };
    if new_size < current {
        if !args.shrink {
            eprintln!(
                "qcow: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
            );
            bail!("Use the --shrink option to perform a shrink operation.");
        }
        bail!("shrinking images is not supported yet");
    }
    match image {
        Image::Qcow2(mut image) => {
            image.resize(new_size)?;
            image.close()?;
        }
        _ => bail!("resizing is supported for qcow2 images only"),
    }
    println!("Image resized.");
    Ok(ExitCode::SUCCESS)
}
