//! `qcow check`: checks an image's metadata and repairs it, with
//! qemu-img's output and exit codes (0 consistent, 1 check not completed,
//! 2 corruptions, 3 leaks only, 63 no checks for this format).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use qcow::{CheckOptions, CheckReport, Image, Repair};
use serde_json::{Value, json};

use crate::info::to_qemu_json;
use crate::open::OpenFlags;
use crate::size::option_size;

/// Arguments of `qcow check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Repair: `leaks` (leaked clusters) or `all` (everything possible).
    #[arg(short = 'r', value_name = "leaks|all")]
    repair: Option<String>,
    /// Output format: human or json.
    #[arg(long, value_name = "FMT", default_value = "human")]
    output: String,
    /// Quiet: print nothing on standard output.
    #[arg(short = 'q')]
    quiet: bool,
    /// Most memory the in-memory refcount table may take (qcow's own
    /// option; default 1G, 4 bytes per cluster of the file). A larger file
    /// is counted in several passes; a refcount rebuild needs one.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Cache mode (accepted for compatibility with qemu-img).
    #[arg(short = 'T', value_name = "CACHE")]
    cache: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Runs `qcow check`.
pub(crate) fn run(args: &CheckArgs) -> Result<ExitCode> {
    let repair = match args.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => {
            bail!("Unknown option value for -r (expecting 'leaks' or 'all'): {other}")
        }
    };
    let json = match args.output.as_str() {
        "human" => false,
        "json" => true,
        _ => bail!("--output must be used with human or json as argument."),
    };
    let mut check = CheckOptions::new(repair);
    if let Some(text) = &args.max_memory {
        check = check.max_memory(option_size("max-memory", text)?);
    }
    // An NBD export is a raw disk: nothing to check, as qemu-img says.
    if crate::open::nbd_image(&args.file, &args.open, args.format.as_deref(), false)?.is_some() {
        crate::report!("This image format does not support checks");
        return Ok(ExitCode::from(63));
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    options.repair = repair != Repair::None;
    options.check = true;
    let image = crate::open::open(&file, &options).map_err(|e| match e {
        qcow::Error::InvalidOptions(m) => anyhow::anyhow!(
            "Could not open '{}': {}",
            args.file.display(),
            m.rsplit(": ").next().unwrap_or(&m)
        ),
        other => other.into(),
    })?;
    let Image::Qcow2(mut image) = image else {
        crate::report!("This image format does not support checks");
        return Ok(ExitCode::from(63));
    };
    let mut log = |line: &str| eprintln!("{}", as_qemu_img_reports(line));
    let mut stdout = HeldStdout::new();
    let first = match image.check_with(&check, &mut log) {
        Ok(report) => report,
        Err(e) => {
            crate::report!("Check failed: {}", failure_words(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut report = first.clone();
    if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
        if !json && !args.quiet {
            stdout.print(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            ));
        }
        report = match image.check_with(
            &CheckOptions::new(Repair::None).max_memory(check.max_memory),
            &mut log,
        ) {
            Ok(report) => report,
            Err(e) => {
                crate::report!("Check failed: {}", failure_words(&e));
                return Ok(ExitCode::FAILURE);
            }
        };
        report.leaks_fixed = first.leaks_fixed;
        report.corruptions_fixed = first.corruptions_fixed;
    }
    if !args.quiet {
        if json {
            let filename = args.file.display().to_string();
            stdout.print(&format!(
                "{}\n",
                to_qemu_json(&json_report(&report, &filename))?
            ));
        } else {
            stdout.print(&human_report(&report));
        }
    }
    if report.check_errors > 0 {
        crate::report!("Check failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::from(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }))
}

/// Standard output as qemu-img's C library writes it: at once to a
/// terminal, otherwise held until the program ends, so that where it shares
/// a pipe with standard error the lines come in qemu-img's order (its
/// errors first).
struct HeldStdout {
    held: Option<String>,
}

impl HeldStdout {
    fn new() -> Self {
        use std::io::IsTerminal;
        HeldStdout {
            held: (!std::io::stdout().is_terminal()).then(String::new),
        }
    }

    fn print(&mut self, text: &str) {
        match &mut self.held {
            Some(held) => held.push_str(text),
            None => print!("{text}"),
        }
    }
}

impl Drop for HeldStdout {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            print!("{held}");
        }
    }
}

/// The human summary qemu-img prints.
fn human_report(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let allocated = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            allocated * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / allocated,
            r.compressed_clusters as f64 * 100.0 / allocated,
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// The JSON object qemu-img prints: its keys in the order of QEMU's
/// dictionary (by hash), optional counts only when not zero.
fn json_report(r: &CheckReport, filename: &str) -> Value {
    let mut map = serde_json::Map::new();
    let optional = |map: &mut serde_json::Map<String, Value>, key: &str, value: u64| {
        if value != 0 {
            map.insert(key.into(), json!(value));
        }
    };
    optional(&mut map, "image-end-offset", r.image_end_offset);
    optional(&mut map, "compressed-clusters", r.compressed_clusters);
    optional(&mut map, "total-clusters", r.total_clusters);
    optional(&mut map, "corruptions", r.corruptions);
    optional(&mut map, "corruptions-fixed", r.corruptions_fixed);
    map.insert("check-errors".into(), json!(r.check_errors));
    optional(&mut map, "leaks", r.leaks);
    optional(&mut map, "leaks-fixed", r.leaks_fixed);
    optional(&mut map, "allocated-clusters", r.allocated_clusters);
    map.insert("filename".into(), json!(filename));
    map.insert("format".into(), json!("qcow2"));
    optional(&mut map, "fragmented-clusters", r.fragmented_clusters);
    Value::Object(map)
}

/// A line of the check's report as qemu-img prints it: the errors it
/// reports through its error channel carry the program's name, and its
/// hints name the program.
fn as_qemu_img_reports(line: &str) -> String {
    let line = crate::in_own_name(line);
    let reported = [
        "ERROR snapshot table too large",
        "ERROR snapshot table offset invalid",
    ];
    if reported.contains(&line.as_str()) || line.starts_with("ERROR failed to read") {
        format!("{}: {line}", crate::prog())
    } else {
        line
    }
}

/// Why a check could not go on, in qemu-img's words (the system's name for
/// the error it stopped on).
fn failure_words(error: &qcow::Error) -> String {
    use qcow::format::FormatError;
    const TOO_LARGE: &str = "File too large";
    const INVALID: &str = "Invalid argument";
    match error {
        qcow::Error::Format { source, .. } => match source {
            FormatError::TooLarge { .. }
            | FormatError::TooManySnapshots { .. }
            | FormatError::SnapshotTableTooBig { .. } => TOO_LARGE,
            FormatError::Snapshot { reason, .. } if reason.contains("extra metadata") => TOO_LARGE,
            _ => INVALID,
        }
        .to_owned(),
        qcow::Error::Corrupt { table, .. } if *table == "snapshot table" => INVALID.to_owned(),
        // A check that needs a refcount rebuild it may not make, and
        // other damage it cannot get past: QEMU's EIO.
        qcow::Error::Corrupt { .. } => "Input/output error".to_owned(),
        qcow::Error::Io { source, .. } => crate::describe(&anyhow::anyhow!("{source}")),
        other => other.to_string(),
    }
}
