//! `qcow compare`: whether two images have the same guest contents, with
//! qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error).
//!
//! Both images are walked together, one run of equal block status at a
//! time, as qemu-img walks them: runs that read as zeros on both sides are
//! skipped, runs allocated on both sides are read and compared, and a run
//! allocated on one side only must read as zeros there. Strict mode (`-s`)
//! also requires equal sizes and, run by run, the same block status on both
//! sides (allocated or not, data or zeros, whether the host offset is known,
//! compressed or not, and whether the run reaches the end of the image),
//! so an image and its copy in another format are not identical.
//! Memory is two read buffers whatever the images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use qcow::{Allocation, BlockDevice};

use qcow::copy::CopyObserver;

use crate::open::{OpenFlags, open_image};
use crate::progress::Progress;
use qcow::copy::is_zero;

/// Bytes read from each image at a time (qemu-img's buffer size).
const CHUNK: u64 = 2 << 20;
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
    /// Strict mode: sizes and block status must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: only the exit code says the verdict.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 'T', value_name = "CACHE")]
    cache: Option<String>,
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
    let mut progress = None;
    let verdict = compare(args, &mut progress);
    let code = match verdict {
        Ok(Verdict::Identical) => {
            if !args.quiet {
                println!("Images are identical.");
            }
            ExitCode::SUCCESS
        }
        Ok(Verdict::Differs(message)) => {
            if !args.quiet {
                println!("{message}");
            }
            ExitCode::from(1)
        }
        Err(error) => {
            crate::report!("{}", crate::describe(&error));
            ExitCode::from(2)
        }
    };
    // As qemu-img: the verdict stands on the last progress line, which
    // ends after it.
    if let Some(p) = progress {
        p.close();
    }
    Ok(code)
}

/// The block status of a run, looking through the whole backing chain, in
/// the terms qemu-img compare uses (its strict mode compares all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    /// Stored in some layer of the chain, or past the end of a shorter
    /// backing file (where it reads as zeros).
    allocated: bool,
    /// Holds data.
    data: bool,
    /// Reads as zeros.
    zero: bool,
    /// Where the run lives in a file is known.
    offset_known: bool,
    /// Stored compressed.
    compressed: bool,
    /// The run ends where the image ends (or, for a run stored nowhere in
    /// the chain, where the bottom layer ends).
    reaches_end: bool,
}

/// The layer at `depth` of `image`'s chain (0 is the image itself).
fn layer(image: &dyn BlockDevice, depth: u32) -> &dyn BlockDevice {
    let mut layer = image;
    for _ in 0..depth {
        match layer.backing() {
            Some(b) => layer = b,
            None => break,
        }
    }
    layer
}

/// The run of `image` that starts at `pos` (before its end): its length
/// and status.
fn status(image: &dyn BlockDevice, pos: u64) -> Result<(u64, Status)> {
    let size = image.virtual_size();
    let extent = image.block_status(pos, size - pos)?;
    let len = extent.len.clamp(1, size - pos);
    let end = pos + len;
    let mut status = Status {
        allocated: true,
        data: false,
        zero: false,
        offset_known: false,
        compressed: false,
        reaches_end: end == size,
    };
    match extent.allocation {
        Allocation::Data {
            offset,
            compressed,
            zero,
            ..
        } => {
            status.data = true;
            status.zero = zero;
            status.offset_known = offset.is_some();
            status.compressed = compressed;
        }
        Allocation::Zero { offset, .. } => {
            status.zero = true;
            status.offset_known = offset.is_some();
        }
        // Not known to be zeros: read it.
        Allocation::Unknown { .. } => status.data = true,
        Allocation::Unallocated { depth, offset } => {
            status.zero = true;
            let last = layer(image, depth);
            // A layer with a backing file stops looking only past the end
            // of a shorter backing file: zeros that count as allocated
            // there. Otherwise the run is stored nowhere in the chain.
            if last.backing().is_none() {
                status.allocated = false;
                status.offset_known = offset.is_some();
                status.reaches_end |= end == last.virtual_size();
            }
        }
    }
    Ok((len, status))
}

fn compare(args: &CompareArgs, progress: &mut Option<Progress>) -> Result<Verdict> {
    let a = open_image(
        &args.file1,
        args.format1.as_deref(),
        &args.open,
        None,
        true,
        false,
    )?;
    let b = open_image(
        &args.file2,
        args.format2.as_deref(),
        &args.open,
        None,
        true,
        false,
    )?;
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if size_a != size_b && args.strict {
        return Ok(Verdict::Differs("Strict mode: Image size mismatch!".into()));
    }
    *progress = (args.progress && !args.quiet).then(|| Progress::new(size_a.max(size_b), 2.0));
    let verdict = compare_contents(args, &a, &b, progress.as_ref());
    if let (Some(p), Ok(Verdict::Identical)) = (progress.as_ref(), &verdict) {
        p.complete();
    }
    verdict
}

/// Compares the disks of `a` and `b`, as qemu-img compare does.
fn compare_contents(
    args: &CompareArgs,
    a: &qcow::Image,
    b: &qcow::Image,
    progress: Option<&Progress>,
) -> Result<Verdict> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let (len_a, status_a) = status(a, pos)?;
        let (len_b, status_b) = status(b, pos)?;
        // Both runs end within their image; one of them within `common`.
        let mut len = len_a.min(len_b);
        if args.strict && status_a != status_b {
            return Ok(Verdict::Differs(format!(
                "Strict mode: Offset {pos} block status mismatch!"
            )));
        }
        if status_a.zero && status_b.zero {
            // Zeros on both sides.
        } else if status_a.allocated == status_b.allocated {
            if status_a.allocated {
                len = len.min(CHUNK);
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
        } else {
            len = len.min(CHUNK);
            let side: &dyn BlockDevice = if status_a.allocated { a } else { b };
            if let Some(verdict) = check_zeros(side, pos, len, &mut buf_a)? {
                return Ok(verdict);
            }
        }
        pos += len;
        if let Some(p) = progress {
            p.progress(pos, total);
        }
    }
    if size_a != size_b && !args.quiet {
        println!("Warning: Image size mismatch!");
    }
    let longer: &dyn BlockDevice = if size_a > size_b { a } else { b };
    while pos < longer.virtual_size() {
        let (mut len, status) = status(longer, pos)?;
        if status.allocated && !status.zero {
            len = len.min(CHUNK);
            if let Some(verdict) = check_zeros(longer, pos, len, &mut buf_a)? {
                return Ok(verdict);
            }
        }
        pos += len;
    }
    Ok(Verdict::Identical)
}

/// Reads `len` (at most [`CHUNK`]) bytes of `image` at `pos` and says where
/// the first sector that is not zero starts, if one is not.
fn check_zeros(
    image: &dyn BlockDevice,
    pos: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<Option<Verdict>> {
    // len <= CHUNK, the buffer's length.
    let data = &mut buf[..len as usize];
    image.read_at(data, pos)?;
    if is_zero(data) {
        return Ok(None);
    }
    let i = data.iter().position(|&x| x != 0).unwrap_or(0) as u64;
    Ok(Some(Verdict::Differs(format!(
        "Content mismatch at offset {}!",
        pos + i / SECTOR * SECTOR
    ))))
}

/// The offset of the first differing sector, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) as u64;
    Some(i / SECTOR * SECTOR)
}
