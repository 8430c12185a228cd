//! `qcow snapshot`: lists, creates, applies and deletes a qcow2 image's
//! internal snapshots, as qemu-img snapshot does (the library's
//! [`qcow::Qcow2Image::create_snapshot`] and its neighbours), with its
//! output, messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::{Image, NewSnapshot};

use crate::open::OpenFlags;

/// Arguments of `qcow snapshot`.
#[derive(Debug, clap::Args)]
pub(crate) struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply (revert the disk to) the snapshot with ID or name NAME.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// What one call does.
enum Action<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
    /// No option: the image is opened for writing and left as it is.
    Nothing,
}

/// Runs `qcow snapshot`.
pub(crate) fn run(args: &SnapshotArgs) -> Result<ExitCode> {
    let mut actions = Vec::new();
    if args.list {
        actions.push(Action::List);
    }
    if let Some(name) = &args.create {
        actions.push(Action::Create(name));
    }
    if let Some(name) = &args.apply {
        actions.push(Action::Apply(name));
    }
    if let Some(name) = &args.delete {
        actions.push(Action::Delete(name));
    }
    if actions.len() > 1 {
        bail!(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
            crate::prog()
        );
    }
    let action = actions.pop().unwrap_or(Action::Nothing);
    let writable = !matches!(action, Action::List);
    if writable && args.open.force_share {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            args.file.display()
        );
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    options.writable = writable;
    let image = crate::open::open(&file, &options)?;
    let Image::Qcow2(mut image) = image else {
        // Formats without internal snapshots list none, and refuse the
        // rest as qemu-img does.
        return match action {
            Action::List | Action::Nothing => Ok(ExitCode::SUCCESS),
            Action::Create(name) => {
                bail!("Could not create snapshot '{name}': Operation not supported")
            }
            Action::Apply(name) => {
                bail!("Could not apply snapshot '{name}': Block driver does not support snapshots")
            }
            Action::Delete(name) => {
                bail!("Could not delete snapshot '{name}': snapshot not found")
            }
        };
    };
    match action {
        Action::List => {
            let snaps: Vec<serde_json::Value> = image
                .snapshots()
                .iter()
                .map(crate::info::snapshot_json)
                .collect();
            if !snaps.is_empty() {
                let mut out = String::new();
                crate::info::snapshot_list(&mut out, &snaps);
                print!("{out}");
            }
        }
        Action::Create(name) => {
            image
                .create_snapshot(&NewSnapshot::new(name))
                .map_err(|e| {
                    anyhow::anyhow!("Could not create snapshot '{name}': {}", cause(&e))
                })?;
        }
        Action::Apply(name) => {
            image.apply_snapshot(name).map_err(|e| {
                let cause = match &e {
                    // qemu-img's two lines: the table's fault, then errno.
                    qcow::Error::SnapshotL1 { problem, .. } => {
                        crate::report!("{problem}");
                        problem.errno_words().to_owned()
                    }
                    _ => cause(&e),
                };
                anyhow::anyhow!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: {cause}"
                )
            })?;
        }
        Action::Delete(name) => {
            if !image.snapshots().iter().any(|s| s.name == name) {
                bail!("Could not delete snapshot '{name}': snapshot not found");
            }
            image.delete_snapshot(name).map_err(|e| {
                anyhow::anyhow!("Could not delete snapshot '{name}': {}", cause(&e))
            })?;
        }
        Action::Nothing => {}
    }
    image.close()?;
    Ok(ExitCode::SUCCESS)
}

/// An error as qemu-img's snapshot messages end: the system's words for
/// the errors QEMU returns as errno values, the engine's (with their
/// causes) for the rest.
fn cause(error: &qcow::Error) -> String {
    match error {
        qcow::Error::SnapshotNotFound { .. } => "No such file or directory".into(),
        qcow::Error::Unsupported { .. } => "Operation not supported".into(),
        qcow::Error::NoSpace { .. } => "File too large".into(),
        qcow::Error::RefcountOverflow { .. } => "Invalid argument".into(),
        qcow::Error::SnapshotL1 { problem, .. } => problem.to_string(),
        // The system's words alone, as qemu-img gives them.
        qcow::Error::Io { source, .. } => crate::describe(&anyhow::anyhow!("{source}")),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(e) = source {
                text.push_str(": ");
                text.push_str(&e.to_string());
                source = e.source();
            }
            text
        }
    }
}
