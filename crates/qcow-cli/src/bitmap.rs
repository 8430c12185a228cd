//! `qcow bitmap`: adds, removes, clears, enables, disables and merges a
//! qcow2 image's persistent dirty bitmaps, as qemu-img bitmap does: the
//! operations run in command-line order, the first failure stops them
//! (`Operation OP on bitmap NAME failed: ...`), and nothing is printed on
//! success. The library does the work ([`qcow::Qcow2Image::add_bitmap`]
//! and its neighbours).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::Image;

use crate::open::OpenFlags;
use crate::size::cvtnum;

/// Arguments of `qcow bitmap`, parsed here in order (the order of the
/// operations matters, which clap's derive does not keep).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct BitmapArgs {
    /// `(--add | --remove | --clear | --enable | --disable | --merge SRC)...
    /// [-g SIZE] [-b FILE [-F FMT]] [-f FMT] FILE BITMAP`
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Parsed {
    ops: Vec<Op>,
    granularity: Option<u64>,
    format: Option<String>,
    source: Option<String>,
    source_format: Option<String>,
    flags: OpenFlags,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut it = args.iter();
    let prog = crate::prog();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => bail!(
                    "{prog} bitmap: option '{name}' requires an argument\nTry '{prog} bitmap --help' for more info"
                ),
            }
        };
        match flag {
            "--add" => parsed.ops.push(Op::Add),
            "--remove" => parsed.ops.push(Op::Remove),
            "--clear" => parsed.ops.push(Op::Clear),
            "--enable" => parsed.ops.push(Op::Enable),
            "--disable" => parsed.ops.push(Op::Disable),
            "--merge" => parsed.ops.push(Op::Merge(value("--merge")?)),
            "-g" | "--granularity" => {
                parsed.granularity = Some(cvtnum("granularity", &value(flag)?)?);
            }
            "-b" => parsed.source = Some(value("-b")?),
            "-F" => parsed.source_format = Some(value("-F")?),
            "-f" => parsed.format = Some(value("-f")?),
            "--object" => parsed.flags.object.push(value("--object")?),
            "--image-opts" => parsed.flags.image_opts = true,
            "--" => parsed.positional.extend(it.by_ref().cloned()),
            other if other.starts_with('-') && other.len() > 1 => bail!(
                "{prog} bitmap: unrecognized option '{other}'\nTry '{prog} bitmap --help' for more info"
            ),
            _ => parsed.positional.push(arg.clone()),
        }
    }
    Ok(parsed)
}

/// Runs `qcow bitmap`.
pub(crate) fn run(args: &BitmapArgs) -> Result<ExitCode> {
    let parsed = parse(&args.args)?;
    if parsed.ops.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if parsed.granularity.is_some() && !parsed.ops.contains(&Op::Add) {
        bail!("granularity only supported with --add");
    }
    if parsed.source_format.is_some() && parsed.source.is_none() {
        bail!("-F only supported with -b");
    }
    if parsed.source.is_some() && !parsed.ops.iter().any(|op| matches!(op, Op::Merge(_))) {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [file, bitmap] = parsed.positional.as_slice() else {
        bail!("Expecting filename and bitmap name");
    };
    let named = crate::open::resolve_name(
        &PathBuf::from(file),
        &parsed.flags,
        parsed.format.as_deref(),
    )?;
    let path = named.path.clone();
    let mut options = named.options(&parsed.flags)?;
    options.writable = true;
    // Bitmaps are about this image alone, as qemu-img opens it.
    options.follow_backing = false;
    let image = crate::open::open(&path, &options)?;
    let Image::Qcow2(mut image) = image else {
        bail!(
            "Operation {} on bitmap {bitmap} failed: Cannot add persistent bitmaps to this image format",
            parsed.ops[0].name()
        );
    };
    let source = match &parsed.source {
        Some(name) => {
            let source_named = crate::open::resolve_name(
                &PathBuf::from(name),
                &parsed.flags,
                parsed.source_format.as_deref(),
            )?;
            let source_path = source_named.path.clone();
            let mut source_options = source_named.options(&parsed.flags)?;
            source_options.follow_backing = false;
            Some(crate::open::open(&source_path, &source_options)?)
        }
        None => None,
    };
    for op in &parsed.ops {
        let done = match op {
            Op::Add => image.add_bitmap(bitmap, parsed.granularity, true),
            Op::Remove => image.remove_bitmap(bitmap),
            Op::Clear => image.clear_bitmap(bitmap),
            Op::Enable => image.set_bitmap_enabled(bitmap, true),
            Op::Disable => image.set_bitmap_enabled(bitmap, false),
            Op::Merge(from) => merge(&mut image, source.as_ref(), bitmap, from),
        };
        if let Err(e) = done {
            let reason = match e {
                qcow::Error::Bitmap { reason, .. } => reason,
                other => crate::describe(&other.into()),
            };
            bail!(
                "Operation {} on bitmap {bitmap} failed: {reason}",
                op.name()
            );
        }
    }
    image.close()?;
    Ok(ExitCode::SUCCESS)
}

/// Merges bitmap `from` (of `source`, or of the image itself) into
/// `target`: the target is looked up first, as QEMU does.
fn merge(
    image: &mut qcow::Qcow2Image,
    source: Option<&Image>,
    target: &str,
    from: &str,
) -> qcow::Result<()> {
    use qcow::BlockDevice;
    let not_found = |image: &dyn BlockDevice, name: &str| qcow::Error::Bitmap {
        image: image.name().to_owned(),
        reason: format!("Dirty bitmap '{name}' not found"),
    };
    if !image.bitmaps().iter().any(|b| b.name == target) {
        return Err(not_found(image, target));
    }
    let ranges = match source {
        Some(Image::Qcow2(other)) => other.bitmap_ranges(from)?,
        Some(other) => return Err(not_found(other, from)),
        None => image.bitmap_ranges(from)?,
    };
    image.merge_into_bitmap(target, &ranges)
}
