//! `qcow`: qemu-img's everyday jobs on QCOW and QCOW2 images, in
//! qemu-img's syntax.
//!
//! Each subcommand lives in its own module; this file parses arguments and
//! turns errors into one line and an exit code.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod create_opts;
mod dd;
mod human;
mod info;
mod map;
mod measure;
mod open;
mod progress;
mod qemu_words;
mod rebase;
mod resize;
mod secret;
mod serve;
mod size;
mod snapshot;
mod tls_creds;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "qcow",
    version,
    about = "Inspect and convert QCOW and QCOW2 disk images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show information about an image.
    Info(info::InfoArgs),
    /// Check an image's metadata for consistency, and repair it.
    Check(check::CheckArgs),
    /// Create a new image.
    Create(create::CreateArgs),
    /// Convert an image to another format.
    Convert(convert::ConvertArgs),
    /// Show how the image's guest ranges are stored.
    Map(map::MapArgs),
    /// Compare the contents of two images.
    Compare(compare::CompareArgs),
    /// Copy a range of an image into a new image, with dd's operands.
    Dd(dd::DdArgs),
    /// Grow an image.
    Resize(resize::ResizeArgs),
    /// Give an image another backing file, keeping what the guest sees.
    Rebase(rebase::RebaseArgs),
    /// Write an image's contents into its backing file.
    Commit(commit::CommitArgs),
    /// Say how large a new image would be.
    Measure(measure::MeasureArgs),
    /// Change an image's options in place.
    Amend(amend::AmendArgs),
    /// Time reads or writes of an image, as qemu-img bench does.
    Bench(bench::BenchArgs),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Add, remove, clear, enable, disable or merge persistent bitmaps.
    Bitmap(bitmap::BitmapArgs),
    /// Serve an image over NBD, as qemu-nbd does.
    Serve(serve::ServeArgs),
}

/// The name the program was invoked by (`qcow`, or `qemu-img` through a
/// link of that name): messages and usage start with it.
pub(crate) fn prog() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "qcow".to_owned())
    })
}

/// `text` (QEMU's words) with its hints naming this program where they
/// name qemu-img ("... with qemu-img check -r all").
pub(crate) fn in_own_name(text: &str) -> String {
    text.replace("qemu-img check", &format!("{} check", prog()))
}

/// Prints a message on standard error after the program's name.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        eprintln!("{}: {}", $crate::prog(), format!($($arg)*))
    };
}

/// An error and its causes on one line, as qemu-img words system errors
/// ("No such file or directory", without Rust's "(os error 2)").
pub(crate) fn describe(error: &anyhow::Error) -> String {
    describe_as(error, true)
}

/// [`describe`], naming a file that cannot be opened once (qemu-img's
/// words for a backing file named in a message of its own).
pub(crate) fn describe_once(error: &anyhow::Error) -> String {
    describe_as(error, false)
}

fn describe_as(error: &anyhow::Error, double_open: bool) -> String {
    let mut text = qemu_worded(error).unwrap_or_else(|| format!("{error:#}"));
    // qemu-img names an image it cannot open twice (the image layer, then
    // the file layer); not a backing file named in a message of its own.
    if let (true, Some(qcow::Error::Open { path, .. })) = (
        double_open,
        error
            .chain()
            .next()
            .and_then(|e| e.downcast_ref::<qcow::Error>()),
    ) {
        let once = format!("Could not open '{}': ", path.display());
        text = text.replacen(&once, &format!("{once}{once}"), 1);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find(" (os error ") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match rest.find(')') {
            Some(end) => rest = &rest[end + 1..],
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The error's chain as `{:#}` shows it, with the first failure to open an
/// image that qemu-img has words for in those words (its causes then go
/// unsaid, as qemu-img says none).
fn qemu_worded(error: &anyhow::Error) -> Option<String> {
    let mut parts = Vec::new();
    for cause in error.chain() {
        // A snapshot opened to be read (convert -l, -s).
        if let Some(qcow::Error::SnapshotL1 { problem, .. }) = cause.downcast_ref::<qcow::Error>() {
            return Some(format!("Failed to load snapshot: {problem}"));
        }
        if let Some(words) = cause
            .downcast_ref::<qcow::Error>()
            .and_then(qemu_words::open_failure)
        {
            // Hints name the program, as qemu-img's name qemu-img.
            parts.push(in_own_name(&words));
            return Some(parts.join(": "));
        }
        parts.push(cause.to_string());
    }
    None
}

fn main() -> ExitCode {
    // Usage errors exit 1, as qemu-img's do (2 means "corruptions found"
    // to scripts that run check).
    let parsed = Cli::command()
        .name(prog())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
            // Printing help or a usage error can only fail on a closed stream.
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Create(args) => create::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Map(args) => map::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Dd(args) => dd::run(&args),
        Command::Resize(args) => resize::run(&args),
        Command::Rebase(args) => rebase::run(&args),
        Command::Commit(args) => commit::run(&args),
        Command::Measure(args) => measure::run(&args),
        Command::Amend(args) => amend::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Bitmap(args) => bitmap::run(&args),
        Command::Serve(args) => serve::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            report!("{}", describe(&error));
            ExitCode::FAILURE
        }
    }
}
