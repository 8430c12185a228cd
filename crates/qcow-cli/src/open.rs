//! Opening images the way qemu-img's command line does.

use std::path::Path;

use anyhow::Result;
use qcow::{Image, ImageFormat, OpenOptions};

/// Options shared by the subcommands that open images.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct OpenFlags {
    /// Refuse to open any file an image names (backing or data files).
    #[arg(long)]
    pub(crate) untrusted: bool,
    /// Format to assume for a backing file whose format is not recorded in
    /// the image (never probed).
    #[arg(long, value_name = "FMT")]
    pub(crate) assume_backing_format: Option<String>,
}

/// Opens `path` with an optional format name, following backing files and
/// data files unless `flags.untrusted` says not to.
pub(crate) fn open_image(
    path: &Path,
    format: Option<&str>,
    flags: &OpenFlags,
    snapshot: Option<&str>,
    follow: bool,
) -> Result<Image> {
    let mut options = if flags.untrusted || !follow {
        OpenOptions::default()
    } else {
        OpenOptions::trusted()
    };
    options.format = format.map(ImageFormat::from_name).transpose()?;
    options.assume_backing_format = flags
        .assume_backing_format
        .as_deref()
        .map(ImageFormat::from_name)
        .transpose()?;
    options.snapshot = snapshot.map(str::to_owned);
    Ok(qcow::open(path, &options)?)
}
