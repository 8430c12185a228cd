//! `qcow compare`: whether two images have the same guest contents, with
//! qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use qcow::{Allocation, BlockDevice};

use crate::convert::is_zero;
use crate::open::{OpenFlags, open_image};

/// Bytes compared at a time.
const CHUNK: u64 = 1 << 20;
/// qemu-img reports mismatches at sector granularity.
const SECTOR: u64 = 512;

/// Arguments of `qcow compare`.
#[derive(Debug, clap::Args)]
pub(crate) struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format1: Option<String>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_name = "FMT")]
    format2: Option<String>,
    /// Strict mode: sizes and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Show a progress bar (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    #[command(flatten)]
    open: OpenFlags,
    /// The first image.
    file1: PathBuf,
    /// The second image.
    file2: PathBuf,
}

/// What the comparison found.
enum Verdict {
    Identical,
    Differs(String),
}

/// Runs `qcow compare`.
pub(crate) fn run(args: &CompareArgs) -> Result<ExitCode> {
    match compare(args) {
        Ok(Verdict::Identical) => {
            println!("Images are identical.");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Verdict::Differs(message)) => {
            println!("{message}");
            Ok(ExitCode::from(1))
        }
        Err(error) => {
            eprintln!("qcow: {error:#}");
            Ok(ExitCode::from(2))
        }
    }
}

fn allocated(a: Allocation) -> bool {
    matches!(a, Allocation::Data { .. })
}

fn compare(args: &CompareArgs) -> Result<Verdict> {
    let a = open_image(&args.file1, args.format1.as_deref(), &args.open, None, true)?;
    let b = open_image(&args.file2, args.format2.as_deref(), &args.open, None, true)?;
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if size_a != size_b && args.strict {
        return Ok(Verdict::Differs("Strict mode: Image size mismatch!".into()));
    }
    let common = size_a.min(size_b);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let ea = a.block_status(pos, (common - pos).min(CHUNK))?;
        let eb = b.block_status(pos, ea.len.max(1))?;
        let len = eb.len.max(1);
        if args.strict && allocated(ea.allocation) != allocated(eb.allocation) {
            return Ok(Verdict::Differs(format!(
                "Strict mode: Offset {pos} block status mismatch!"
            )));
        }
        if allocated(ea.allocation) || allocated(eb.allocation) {
            // len <= CHUNK.
            let (da, db) = (&mut buf_a[..len as usize], &mut buf_b[..len as usize]);
            a.read_at(da, pos)?;
            b.read_at(db, pos)?;
            if let Some(i) = first_difference(da, db) {
                return Ok(Verdict::Differs(format!(
                    "Content mismatch at offset {}!",
                    pos + i
                )));
            }
        }
        pos += len;
    }
    if size_a != size_b {
        println!("Warning: Image size mismatch!");
    }
    let longer: &dyn BlockDevice = if size_a > size_b { &a } else { &b };
    while pos < longer.virtual_size() {
        let e = longer.block_status(pos, (longer.virtual_size() - pos).min(CHUNK))?;
        let len = e.len.max(1);
        if allocated(e.allocation) {
            let data = &mut buf_a[..len as usize];
            longer.read_at(data, pos)?;
            if !is_zero(data) {
                let i = data.iter().position(|&x| x != 0).unwrap_or(0) as u64;
                return Ok(Verdict::Differs(format!(
                    "Content mismatch at offset {}!",
                    pos + i / SECTOR * SECTOR
                )));
            }
        }
        pos += len;
    }
    Ok(Verdict::Identical)
}

/// The offset of the first differing sector, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) as u64;
    Some(i / SECTOR * SECTOR)
}
