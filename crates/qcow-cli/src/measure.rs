//! `qcow measure`: how large a new image would be, for a disk size or for
//! an image's contents, as qemu-img measure computes it (the library's
//! [`qcow::measure`]), with its output and refusals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::measure::{Measurement, measure_qcow2, measure_raw};
use qcow::{BlockDevice, Image};
use serde_json::{Map, Value};

use crate::create_opts::OptionList;
use crate::info::to_qemu_json;
use crate::open::{OpenFlags, open_image};
use crate::size::image_size;

/// Arguments of `qcow measure`.
#[derive(Debug, clap::Args)]
pub(crate) struct MeasureArgs {
    /// Output format: human or json.
    #[arg(long, value_name = "FMT", default_value = "human")]
    output: String,
    /// Format of the new image: raw (the default) or qcow2.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Creation options of the new image, `key=value,...`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Measure this internal snapshot of FILE.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Size of an empty disk to measure (instead of FILE).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image whose contents are measured.
    file: Option<PathBuf>,
}

/// Runs `qcow measure`.
pub(crate) fn run(args: &MeasureArgs) -> Result<ExitCode> {
    let json = match args.output.as_str() {
        "human" => false,
        "json" => true,
        _ => bail!("--output must be used with human or json as argument."),
    };
    let size = args.size.as_deref().map(image_size).transpose()?;
    if args.file.is_none() && (args.format.is_some() || args.snapshot.is_some()) {
        bail!("--image-opts, -f, and -l require a filename argument.");
    }
    if args.file.is_some() && size.is_some() {
        bail!("--size N cannot be used together with a filename.");
    }
    let source = match &args.file {
        Some(path) => {
            let snapshot = args.snapshot.as_deref().map(|s| {
                s.strip_prefix("snapshot.name=")
                    .or_else(|| s.strip_prefix("snapshot.id="))
                    .unwrap_or(s)
            });
            Some(open_image(
                path,
                args.format.as_deref(),
                &args.open,
                snapshot,
                true,
                false,
            )?)
        }
        None if size.is_none() => bail!("Either --size N or one filename must be specified."),
        None => None,
    };
    let device = source.as_ref().map(|s| s as &dyn BlockDevice);
    let list = OptionList::parse(&args.options)?;
    let measured = match args.output_format.as_str() {
        "raw" => {
            if let Some((key, _)) = list.pairs().iter().find(|(k, _)| k != "size") {
                crate::report!("Invalid parameter '{key}'");
                bail!("Invalid options for file format 'raw'");
            }
            measure_raw(list_size(&list, size)?, device)
        }
        "qcow2" => {
            let mut options = list.qcow2_options(list_size(&list, size)?).map_err(|e| {
                crate::report!("{e}");
                anyhow::anyhow!("Invalid options for file format 'qcow2'")
            })?;
            options.encryption = list.encryption(&args.open.object)?;
            // Bitmaps are counted for sources that can hold them.
            let bitmaps = match &source {
                Some(Image::Qcow2(image)) if image.header().version >= 3 => Some(image.bitmaps()),
                _ => None,
            };
            measure_qcow2(&options, device, bitmaps)?
        }
        "qcow" => bail!("Block driver 'qcow' does not support size measurement"),
        other => bail!("Unknown file format '{other}'"),
    };
    print!("{}", report(&measured, json)?);
    Ok(ExitCode::SUCCESS)
}

/// The size given by --size or `-o size=`.
fn list_size(list: &OptionList, size: Option<u64>) -> Result<u64> {
    match list.get("size") {
        Some(text) => crate::size::option_size("size", text),
        None => Ok(size.unwrap_or(0)),
    }
}

/// qemu-img's output.
fn report(m: &Measurement, json: bool) -> Result<String> {
    if json {
        let mut map = Map::new();
        if let Some(b) = m.bitmaps {
            map.insert("bitmaps".into(), b.into());
        }
        map.insert("required".into(), m.required.into());
        map.insert("fully-allocated".into(), m.fully_allocated.into());
        return Ok(to_qemu_json(&Value::Object(map))? + "\n");
    }
    let mut out = format!(
        "required size: {}\nfully allocated size: {}\n",
        m.required, m.fully_allocated
    );
    if let Some(b) = m.bitmaps {
        out += &format!("bitmaps size: {b}\n");
    }
    Ok(out)
}
