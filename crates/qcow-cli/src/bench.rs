//! `qcow bench`: qemu-img bench's flags and output, timing the engine's
//! reads or writes of one image. `depth` threads each keep one request
//! going (qemu-img keeps `depth` asynchronous requests in flight); offsets
//! advance by the step from the start offset and wrap at the end of the
//! disk as qemu-img's do, or, with `--random` (qcow's own), are drawn at
//! random, aligned to the buffer size.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use qcow::BlockDevice;

use crate::open::OpenFlags;
use crate::size::parse_size;

/// Bytes of a memory page, which request buffers are aligned to.
const PAGE: usize = 4096;

/// Arguments of `qcow bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Requests to send.
    #[arg(short = 'c', value_name = "COUNT", default_value = "75000")]
    count: String,
    /// Requests in flight at once.
    #[arg(short = 'd', value_name = "DEPTH", default_value = "64")]
    depth: String,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// No host cache (accepted for compatibility with qemu-img).
    #[arg(short = 'n')]
    nocache: bool,
    /// AIO mode (accepted for compatibility with qemu-img).
    #[arg(short = 'i', value_name = "AIO")]
    aio: Option<String>,
    /// First offset.
    #[arg(short = 'o', value_name = "OFFSET", default_value = "0")]
    offset: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Bytes per request.
    #[arg(short = 's', value_name = "BUFFER_SIZE", default_value = "4096")]
    buffer_size: String,
    /// Bytes between the offsets of consecutive requests (default: the
    /// buffer size).
    #[arg(short = 'S', value_name = "STEP_SIZE")]
    step: Option<String>,
    /// Cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Write instead of reading.
    #[arg(short = 'w')]
    write: bool,
    /// The byte written (write tests).
    #[arg(long, value_name = "PATTERN", default_value = "0")]
    pattern: String,
    /// Flush after every N requests (write tests).
    #[arg(long = "flush-interval", value_name = "N")]
    flush_interval: Option<String>,
    /// Do not wait for requests in flight before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Random offsets, aligned to the buffer size (qcow's own).
    #[arg(long)]
    random: bool,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

fn number(text: &str, what: &str, max: u64) -> Result<u64> {
    let value = if let Some(hex) = text.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        text.parse::<u64>().ok()
    };
    match value {
        Some(n) if n <= max => Ok(n),
        _ => bail!("Invalid {what} specified"),
    }
}

/// Runs `qcow bench`.
pub(crate) fn run(args: &BenchArgs) -> Result<ExitCode> {
    let count = number(&args.count, "request count", i32::MAX as u64)?;
    let depth = number(&args.depth, "queue depth", i32::MAX as u64)?;
    if depth == 0 {
        bail!("Invalid queue depth specified");
    }
    let offset = parse_size(&args.offset)
        .ok()
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| anyhow::anyhow!("Invalid offset specified"))?;
    let size_of = |text: &str, what: &str| -> Result<u64> {
        parse_size(text)
            .ok()
            .filter(|&n| n <= i32::MAX as u64)
            .ok_or_else(|| anyhow::anyhow!("Invalid {what} specified"))
    };
    let bufsize = size_of(&args.buffer_size, "buffer size")?;
    let step = match &args.step {
        Some(s) => size_of(s, "step size")?,
        None => 0,
    };
    let step = if step == 0 { bufsize } else { step };
    let pattern = u8::try_from(number(&args.pattern, "pattern byte", 0xff)?)?;
    let flush_interval = match &args.flush_interval {
        Some(n) => number(n, "flush interval", i32::MAX as u64)?,
        None => 0,
    };
    if !args.write && flush_interval > 0 {
        bail!("--flush-interval is only available in write tests");
    }
    if flush_interval > 0 && flush_interval < depth {
        bail!("Flush interval can't be smaller than depth");
    }
    let format = args.format.as_deref();
    let export = crate::open::nbd_image(&args.file, &args.open, format, args.write)?;
    // An export's requests wait on the server, not the processor: one
    // thread per request in flight keeps `depth` of them going, as
    // qemu-img's client does.
    let waits_on_server = export.is_some();
    let image = match export {
        Some(export) => export,
        None => {
            let named = crate::open::resolve_name(&args.file, &args.open, format)?;
            let mut options = named.options(&args.open)?;
            options.writable = args.write;
            crate::open::open(&named.path, &options)?
        }
    };
    let image_size = image.virtual_size();
    // Threads beyond the cores only switch: each keeps one request going.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let threads = if waits_on_server { depth } else { cores };
    let workers = depth.min(count.max(1)).min(threads) as usize;
    if !args.quiet {
        let placement = if args.random {
            format!("random offsets, aligned to {bufsize}")
        } else {
            format!("starting at offset {offset}, step size {step}")
        };
        println!(
            "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel ({placement})",
            if args.write { "write" } else { "read" }
        );
        if flush_interval > 0 {
            println!("Sending flush every {flush_interval} requests");
        }
    }
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let failed: std::sync::Mutex<Option<qcow::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (next, image, failed) = (&next, &image, &failed);
            scope.spawn(move || {
                // Page-aligned, as qemu-img's buffers are: the kernel
                // copies into memory off a page boundary at half the speed.
                let mut memory = vec![pattern; bufsize as usize + PAGE];
                let start = memory.as_ptr().align_offset(PAGE).min(PAGE);
                let buf = &mut memory[start..start + bufsize as usize];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (worker as u64 + 1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let at = if args.random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let slots = (image_size / bufsize.max(1)).max(1);
                        (rng % slots) * bufsize
                    } else if image_size == 0 {
                        0
                    } else {
                        // As qemu-img: each offset is the previous one plus
                        // the step, wrapped at the end of the disk.
                        ((u128::from(offset) + u128::from(i) * u128::from(step))
                            % u128::from(image_size)) as u64
                    };
                    let done = if args.write {
                        image.write_at(buf, at)
                    } else {
                        image.read_at(buf, at)
                    };
                    let done = done.and_then(|()| {
                        if flush_interval > 0 && (count - i - 1) % flush_interval == 0 {
                            image.flush()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = done {
                        let mut slot = failed.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                        next.store(count, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        bail!("Failed request: {e}");
    }
    image.flush()?;
    let secs = started.elapsed().as_secs_f64();
    if !args.quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    Ok(ExitCode::SUCCESS)
}
