//! `qcow resize`: grows or (with `--shrink`) shrinks an image, as qemu-img
//! resize does.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::{BlockDevice, Image};

use crate::open::OpenFlags;
use crate::size::option_size;

/// Arguments of `qcow resize`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResizeArgs {
    /// Allow shrinking: what lies past the new end is lost.
    #[arg(long)]
    shrink: bool,
    /// Preallocate the grown part: off, metadata (qcow2), falloc or full.
    #[arg(long, value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
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
    let mode = match args.preallocation.as_deref() {
        None => qcow::Preallocation::Off,
        Some(name) => qcow::Preallocation::from_name(name)
            .map_err(|_| anyhow::anyhow!("Invalid preallocation mode '{name}'"))?,
    };
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    options.writable = true;
    // As qemu-img: one leading sign is relative, the rest is an option
    // value (checked before the image is opened), and the result must be
    // a positive 64-bit signed size.
    let (sign, value) = match args.size.as_bytes().first() {
        Some(b'+') => (1i128, &args.size[1..]),
        Some(b'-') => (-1, &args.size[1..]),
        _ => (0, args.size.as_str()),
    };
    let n = i128::from(option_size("size", value)?);
    let image = crate::open::open(&file, &options)?;
    let current = image.virtual_size();
    let total = match sign {
        0 => n,
        s => i128::from(current) + s * n,
    };
    let new_size = match u64::try_from(total) {
        Ok(size) if size > 0 && i64::try_from(size).is_ok() => size,
        _ => bail!("New image size must be positive"),
    };
    if new_size < current && !args.shrink {
        crate::report!("Use the --shrink option to perform a shrink operation.");
        crate::report!(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
        );
        return Ok(ExitCode::FAILURE);
    }
    match image {
        Image::Qcow2(mut image) => {
            image
                .resize_preallocated(new_size, mode)
                .map_err(|e| as_qemu_img_says(e, &file))?;
            image.close()?;
        }
        Image::Qcow(_) | Image::Luks(_) => bail!("Image format driver does not support resize"),
        Image::Raw(mut image) => image
            .resize_preallocated(new_size, mode)
            .map_err(|e| as_qemu_img_says(e, &file))?,
    }
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(ExitCode::SUCCESS)
}

/// A refusal worded as qemu-img words it: without the image's name.
fn as_qemu_img_says(error: qcow::Error, file: &std::path::Path) -> anyhow::Error {
    match error {
        qcow::Error::InvalidOptions(m) => {
            let prefix = format!("{}: ", file.display());
            anyhow::anyhow!("{}", m.strip_prefix(&prefix).unwrap_or(&m))
        }
        qcow::Error::Bitmap { reason, .. } => anyhow::anyhow!("{reason}"),
        other => other.into(),
    }
}
