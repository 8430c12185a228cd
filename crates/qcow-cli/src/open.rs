//! Opening images the way qemu-img's command line does.

use std::path::Path;

use anyhow::{Result, bail};
use qcow::{BlockDevice, Image, ImageFormat, OpenOptions};

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
    /// Open read-only images even while another process writes them
    /// (qemu-img's force-share): what is read may be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
}

/// Refuses an output that is one of the files `source` reads (its image
/// file, a backing file or a data file, by any name: the same path, a
/// symbolic or a hard link), before the output is touched.
pub(crate) fn refuse_overwriting_source(source: &dyn BlockDevice, output: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(());
    };
    let mut layer = Some(source);
    while let Some(image) = layer {
        for name in [image.name(), image.data_name()] {
            if let Ok(m) = std::fs::metadata(name) {
                if m.dev() == out.dev() && m.ino() == out.ino() {
                    bail!(
                        "{}: is the same file as '{name}', which the source reads; refusing to overwrite it",
                        output.display()
                    );
                }
            }
        }
        layer = image.backing();
    }
    Ok(())
}

/// Open options from the command line's flags and an optional format name:
/// files the image names are followed unless `flags.untrusted` says not to.
pub(crate) fn open_options(flags: &OpenFlags, format: Option<&str>) -> Result<OpenOptions> {
    let mut options = if flags.untrusted {
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
    options.force_share = flags.force_share;
    Ok(options)
}

/// Opens `path` with an optional format name, following backing files and
/// data files unless `flags.untrusted` says not to; `copy_source`: the
/// image is read to be copied, and nobody may write it meanwhile.
pub(crate) fn open_image(
    path: &Path,
    format: Option<&str>,
    flags: &OpenFlags,
    snapshot: Option<&str>,
    follow: bool,
    copy_source: bool,
) -> Result<Image> {
    let mut options = open_options(flags, format)?;
    if !follow {
        options.follow_backing = false;
        options.open_data_file = false;
    }
    options.snapshot = snapshot.map(str::to_owned);
    options.copy_source = copy_source;
    Ok(qcow::open(path, &options)?)
}
