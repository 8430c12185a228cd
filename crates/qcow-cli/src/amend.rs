//! `qcow amend`: changes a qcow2 image's options in place, as qemu-img
//! amend does (the library's [`qcow::Qcow2Image::amend`]): `compat`,
//! `lazy_refcounts`, `refcount_bits`, `data_file`, `data_file_raw` and
//! `size`; creation-only options and backing file changes refused with
//! qemu-img's words.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::copy::CopyObserver;
use qcow::crypto::key_slots::{KeySlotChange, SlotState};
use qcow::{AmendOptions, Image};

use crate::create_opts::{OptionList, on_off};
use crate::open::OpenFlags;
use crate::progress::Progress;
use crate::size::option_size;

/// Arguments of `qcow amend`.
#[derive(Debug, clap::Args)]
pub(crate) struct AmendArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// The options to change, `key=value,...`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Let key slot changes overwrite an active slot, erase an inactive or
    /// the last one.
    #[arg(long)]
    force: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Options only `create` takes.
const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
];

/// The key slot options (`encrypt.state`, ... for qcow2, unprefixed for
/// a LUKS volume).
const KEY_SLOT_OPTIONS: [&str; 6] = [
    "state",
    "new-secret",
    "old-secret",
    "keyslot",
    "iter-time",
    "secret",
];

/// The key slot change the options ask for, their secrets looked up among
/// `objects`; `None` when they ask for none.
fn key_slot_change(list: &OptionList, objects: &[String]) -> Result<Option<KeySlotChange>> {
    let get = |key: &str| {
        list.get(&format!("encrypt.{key}"))
            .or_else(|| list.get(key))
    };
    let Some(state) = get("state") else {
        if let Some(key) = KEY_SLOT_OPTIONS.iter().find(|k| get(k).is_some()) {
            bail!("Parameter 'state' is required to change key slots (given: '{key}')");
        }
        return Ok(None);
    };
    let mut change = KeySlotChange::new(match state {
        "active" => SlotState::Active,
        "inactive" => SlotState::Inactive,
        other => bail!("Parameter 'state' does not accept value '{other}'"),
    });
    let secret = |key: &str| {
        get(key)
            .map(|id| crate::secret::find(objects, id))
            .transpose()
    };
    change.new_secret = secret("new-secret")?;
    change.old_secret = secret("old-secret")?;
    change.secret = secret("secret")?;
    if let Some(slot) = get("keyslot") {
        change.keyslot = Some(
            slot.parse()
                .map_err(|_| anyhow::anyhow!("Parameter 'keyslot' expects a number"))?,
        );
    }
    if let Some(ms) = get("iter-time") {
        change.iter_time_ms = Some(
            ms.parse()
                .map_err(|_| anyhow::anyhow!("Parameter 'iter-time' expects a number"))?,
        );
    }
    Ok(Some(change))
}

/// Runs `qcow amend`.
pub(crate) fn run(args: &AmendArgs) -> Result<ExitCode> {
    if args.options.is_empty() {
        bail!("Must specify options (-o)");
    }
    if args.open.force_share {
        bail!("force-share (-U) can only be used with read-only images");
    }
    let list = OptionList::parse(&args.options)?;
    let mut amend = AmendOptions::new();
    let mut backing: (Option<&str>, Option<&str>) = (None, None);
    let key_slots = key_slot_change(&list, &args.open.object)?;
    for (key, value) in list.pairs() {
        if KEY_SLOT_OPTIONS.contains(&key.trim_start_matches("encrypt.")) {
            continue;
        }
        match key.as_str() {
            "compat" => {
                amend.version = Some(match value.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => bail!("Unknown compatibility level {other}"),
                })
            }
            "size" => amend.size = Some(option_size("size", value)?),
            "lazy_refcounts" => amend.lazy_refcounts = Some(on_off(key, value)?),
            "refcount_bits" => {
                amend.refcount_bits = Some(value.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "Parameter 'refcount_bits' expects a non-negative number below 2^64"
                    )
                })?)
            }
            "data_file" => amend.data_file = Some(value.clone()),
            "data_file_raw" => amend.data_file_raw = Some(on_off(key, value)?),
            "backing_file" => backing.0 = Some(value.as_str()),
            "backing_fmt" => backing.1 = Some(value.as_str()),
            other if CREATION_ONLY.contains(&other) => {
                bail!(
                    "Invalid parameter '{other}'\nThis option is only supported for image creation"
                )
            }
            other => bail!("Invalid parameter '{other}'"),
        }
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    options.writable = true;
    let image = crate::open::open(&file, &options)?;
    // qcow2 takes the key slot options as encrypt.*, a LUKS volume bare,
    // as qemu-img takes them.
    if key_slots.is_some() {
        let qcow2 = matches!(image, Image::Qcow2(_));
        for key in KEY_SLOT_OPTIONS {
            let (given, wrong) = if qcow2 {
                (list.get(key).is_some(), key.to_owned())
            } else {
                (
                    list.get(&format!("encrypt.{key}")).is_some(),
                    format!("encrypt.{key}"),
                )
            };
            if given {
                bail!("Invalid parameter '{wrong}'");
            }
        }
    }
    // qemu-img says a key slot change's refusal without the image's name.
    let slot_error = |e: qcow::Error| match e {
        qcow::Error::Crypto { source, .. } => anyhow::anyhow!("{source}"),
        other => other.into(),
    };
    let mut image = match image {
        Image::Qcow2(image) => image,
        Image::Luks(mut volume) => {
            let Some(change) = &key_slots else {
                bail!("Format driver 'luks' does not support option amendment");
            };
            volume
                .change_key_slots(change, args.force)
                .map_err(slot_error)?;
            return Ok(ExitCode::SUCCESS);
        }
        other => {
            let name = match other {
                Image::Raw(_) => "raw",
                _ => "qcow",
            };
            bail!("Format driver '{name}' does not support option amendment");
        }
    };
    if let Some(change) = &key_slots {
        image
            .change_key_slots(change, args.force)
            .map_err(slot_error)?;
    }
    if backing.0.is_some() || backing.1.is_some() {
        let header = image.header();
        if backing.0 != header.backing_file.as_deref() || backing.1 != header.backing_format() {
            bail!("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
        }
    }
    let progress = (args.progress && !args.quiet).then(|| Progress::new(100, 1.0));
    let observer: &dyn CopyObserver = match &progress {
        Some(p) => p,
        None => &(),
    };
    if let Err(e) = image.amend_observed(&amend, observer) {
        // qemu-img's two lines: the table's fault, then the downgrade's.
        if let qcow::Error::SnapshotL1 { problem, .. } = e {
            crate::report!("{problem}");
            bail!(
                "Failed to turn zero into data clusters: {}",
                problem.errno_words()
            );
        }
        return Err(e.into());
    }
    if let Some(p) = progress {
        p.finish();
    }
    image.close()?;
    Ok(ExitCode::SUCCESS)
}
