//! `qcow dd`: qemu-img dd's operands (`if=`, `of=`, `bs=`, `count=`,
//! `skip=`): copies a range of an image's guest contents into a new image.
//! Like qemu-img dd, the output holds input blocks `skip..count`; the copy
//! is the library's engine ([`qcow::copy`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use qcow::{BlockDevice, OpenOptions};
use qcow_io::Storage;

use crate::open::{OpenFlags, open_image, refuse_overwriting_source};
use crate::size::{cvtnum, parse_size};

/// Arguments of `qcow dd`.
#[derive(Debug, clap::Args)]
pub(crate) struct DdArgs {
    /// Input format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: raw (default), qcow2 or qcow.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    #[command(flatten)]
    open: OpenFlags,
    /// Operands: `if=FILE of=FILE [bs=SIZE] [count=N] [skip=N]`.
    operands: Vec<String>,
}

/// The parsed operands.
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    input: PathBuf,
    output: PathBuf,
    block: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse_operands(operands: &[String]) -> Result<Operands> {
    let (mut input, mut output, mut block, mut count, mut skip) = (None, None, 512, None, 0);
    for operand in operands {
        let Some((key, value)) = operand.split_once('=') else {
            bail!("unrecognized operand {operand}");
        };
        match key {
            "if" => input = Some(PathBuf::from(value)),
            "of" => output = Some(PathBuf::from(value)),
            "bs" => {
                block = parse_size(value)
                    .ok()
                    .filter(|n| (1..=i32::MAX as u64).contains(n))
                    .ok_or_else(|| {
                        anyhow::anyhow!("Invalid bs specified. Must be between 1 and 2147483647.")
                    })?
            }
            "count" => count = Some(cvtnum("count", value)?),
            "skip" => skip = cvtnum("skip", value)?,
            other => bail!("unrecognized operand {other}"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    Ok(Operands {
        input,
        output,
        block,
        count,
        skip,
    })
}

/// Runs `qcow dd`.
pub(crate) fn run(args: &DdArgs) -> Result<ExitCode> {
    let ops = parse_operands(&args.operands)?;
    let source = open_image(
        &ops.input,
        args.format.as_deref(),
        &args.open,
        None,
        true,
        false,
    )?;
    let size = source.virtual_size();
    // Skipping past the end copies nothing, as with qemu-img dd.
    let start = ops
        .skip
        .checked_mul(ops.block)
        .context("skip is too large")?
        .min(size);
    // As qemu-img dd does, `count` blocks are counted from the start of the
    // input, skipped ones included.
    let len = match ops.count {
        Some(n) => n
            .checked_mul(ops.block)
            .context("count is too large")?
            .min(size)
            .saturating_sub(start),
        None => size - start,
    };
    refuse_overwriting_source(&source, &ops.output)?;
    let dest: Box<dyn BlockDevice> = match args.output_format.as_str() {
        "raw" => {
            let file = qcow::create_file(&ops.output)?;
            file.set_len(len)?;
            drop(file);
            Box::new(crate::open::open(
                &ops.output,
                &OpenOptions::default()
                    .writable(true)
                    .format(Some(qcow::ImageFormat::Raw)),
            )?)
        }
        "qcow2" => {
            qcow::create(&ops.output, &qcow::CreateOptions::new(len))?;
            Box::new(crate::open::open(
                &ops.output,
                &OpenOptions::default()
                    .writable(true)
                    .format(Some(qcow::ImageFormat::Qcow2)),
            )?)
        }
        "qcow" => {
            qcow::create_qcow(&ops.output, &qcow::CreateOptions::new(len))?;
            Box::new(crate::open::open(
                &ops.output,
                &OpenOptions::default()
                    .writable(true)
                    .format(Some(qcow::ImageFormat::Qcow)),
            )?)
        }
        other => bail!("Unknown file format '{other}'"),
    };
    let options = qcow::copy::CopyOptions::default()
        .range(start, Some(len))
        .target_is_zero(true);
    qcow::copy::copy(&source, &*dest, &options, &())?;
    dest.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_parse_like_qemu_img() -> Result<()> {
        let ops = parse_operands(&[
            "if=a.qcow2".into(),
            "of=b.raw".into(),
            "bs=1M".into(),
            "count=3".into(),
            "skip=2".into(),
        ])?;
        assert_eq!(ops.block, 1 << 20);
        assert_eq!((ops.count, ops.skip), (Some(3), 2));
        assert!(parse_operands(&["if=a".into()]).is_err());
        assert!(parse_operands(&["if=a".into(), "of=b".into(), "bs=0".into()]).is_err());
        Ok(())
    }
}
