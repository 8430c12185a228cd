//! `qcow commit`: writes what an image holds into its backing file (or,
//! with `-b`, through the chain into a base further down), as qemu-img
//! commit does, with the library's copy engine ([`qcow::copy`]); then
//! empties the image unless `-d`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use qcow::copy::{CopyObserver, CopyOptions, Layers};
use qcow::{BlockDevice, Image};

use crate::open::{OpenFlags, open_options};
use crate::progress::Progress;

/// Arguments of `qcow commit`.
#[derive(Debug, clap::Args)]
pub(crate) struct CommitArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// The image of the backing chain to commit into (default: the
    /// image's backing file); named as the chain names it, or by a path.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Keep the image's contents (do not empty it). Implied by `-b`: the
    /// layers between the base and the image no longer hold what they
    /// held, so only the image's own clusters keep its view, as with
    /// qemu-img.
    #[arg(short = 'd')]
    drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Rate limit (accepted for compatibility with qemu-img; not applied).
    #[arg(short = 'r', value_name = "RATE")]
    rate: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Runs `qcow commit`.
pub(crate) fn run(args: &CommitArgs) -> Result<ExitCode> {
    if args.open.force_share {
        bail!("force-share (-U) can only be used with read-only images");
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let options = named.options(&args.open)?;
    let filename = args.file.display().to_string();
    // Find the base's depth in the chain, and its size.
    let (depth, base_path, base_size, size) = {
        let chain = crate::open::open(&file, &options)?;
        let size = chain.virtual_size();
        let mut layer = chain.backing();
        let mut depth = 1;
        let wanted = args.base.as_deref().map(|b| base_candidates(&file, b));
        let found = loop {
            let Some(image) = layer else {
                break None;
            };
            let hit = match &wanted {
                None => true,
                Some(candidates) => same_file(image.name(), candidates),
            };
            if hit {
                break Some((depth, PathBuf::from(image.name()), image.virtual_size()));
            }
            layer = image.backing();
            depth += 1;
        };
        match (found, &args.base) {
            (Some((d, path, base_size)), _) => (d, path, base_size, size),
            (None, Some(base)) => {
                bail!("Did not find '{base}' in the backing chain of '{filename}'")
            }
            (None, None) => bail!("Image does not have a backing file"),
        }
    };
    if base_size < size {
        // The base grows to the image's size first, as QEMU's commit job
        // makes it.
        let mut grow = open_options(&args.open, None)?;
        grow.writable = true;
        grow.follow_backing = false;
        match crate::open::open(&base_path, &grow)? {
            Image::Qcow2(mut base) => {
                base.resize(size)?;
                base.close()?;
            }
            Image::Raw(mut base) => base.resize(size)?,
            Image::Qcow(_) | Image::Luks(_) => {
                bail!("Image format driver does not support resize")
            }
        }
    }
    let keep = args.drop || args.base.is_some();
    let mut chain_options = options.clone();
    chain_options.writable = !keep;
    chain_options.writable_backing = Some(depth);
    let mut chain = crate::open::open(&file, &chain_options)?;
    let mut base: &dyn BlockDevice = &chain;
    for _ in 0..depth {
        base = base.backing().context("the backing chain changed")?;
    }
    let copy = CopyOptions::default().layers(Layers::Top(depth as u32));
    let progress = (args.progress && !args.quiet).then(|| Progress::new(chain.virtual_size(), 1.0));
    let observer: &dyn CopyObserver = match &progress {
        Some(p) => p,
        None => &(),
    };
    qcow::copy::copy(&chain, base, &copy, observer).context("Block job failed")?;
    base.flush()?;
    if !keep {
        // Formats that cannot be emptied keep their data, as with qemu-img.
        if let Image::Qcow2(image) = &mut chain {
            image.make_empty()?;
        }
    }
    match chain {
        Image::Qcow2(image) => image.close()?,
        other => other.flush()?,
    }
    if let Some(p) = progress {
        p.finish();
    }
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(ExitCode::SUCCESS)
}

/// The paths `-b BASE` may mean: as given (from the current directory),
/// and relative to the image's directory (as the chain names files).
fn base_candidates(image: &Path, base: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(base), qcow::relative_to(image, base)];
    out.retain(|p| p.exists());
    out
}

/// Whether `name` is one of `candidates`, by canonical path.
fn same_file(name: &str, candidates: &[PathBuf]) -> bool {
    let Ok(this) = Path::new(name).canonicalize() else {
        return false;
    };
    candidates
        .iter()
        .any(|c| c.canonicalize().is_ok_and(|c| c == this))
}
