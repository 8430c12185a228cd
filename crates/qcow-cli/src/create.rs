//! `qcow create`: a new image, with qemu-img's options and output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use qcow::BlockDevice;

use crate::create_opts::OptionList;
use crate::open::{OpenFlags, open_image};
use crate::size::{image_size, option_size};

/// Arguments of `qcow create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// Image format: qcow2 (the default, but raw when invoked as
    /// qemu-img, as qemu-img's default is), qcow or raw.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Format options, `key=value,...` (qemu-img's names).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Quiet: print nothing.
    #[arg(short = 'q')]
    quiet: bool,
    /// Unsafe: do not open the backing file (its format must be given,
    /// and the size).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    #[command(flatten)]
    open: OpenFlags,
    /// The new image.
    file: PathBuf,
    /// Virtual size (taken from the backing file when omitted).
    size: Option<String>,
}

/// Runs `qcow create`.
pub(crate) fn run(args: &CreateArgs) -> Result<ExitCode> {
    let default = if crate::prog() == "qemu-img" {
        "raw"
    } else {
        "qcow2"
    };
    let format = args.format.as_deref().unwrap_or(default);
    if format == "raw" {
        return create_raw(args);
    }
    if format == "luks" {
        return create_luks(args);
    }
    if format != "qcow2" && format != "qcow" {
        bail!("Unknown file format '{format}'");
    }
    let mut list = OptionList::parse(&args.options)?;
    if let Some(b) = &args.backing {
        list.set("backing_file", b);
    }
    if let Some(f) = &args.backing_format {
        list.set("backing_fmt", f);
    }
    let shown = list.clone();
    let bad_compat = list.take_bad_compat();
    let size = match (&args.size, list.get("size")) {
        (Some(_), Some(s)) => {
            option_size("size", s).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            bail!(
                "{}: The image size must be specified only once",
                args.file.display()
            )
        }
        (Some(s), None) => Some(image_size(s)?),
        (None, Some(s)) => Some(
            option_size("size", s).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?,
        ),
        (None, None) => None,
    };
    let name = args.file.display().to_string();
    let mut options = if format == "qcow" {
        list.qcow_options(size.unwrap_or(0))
    } else {
        list.qcow2_options(size.unwrap_or(0))
    }
    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if let Some(backing) = options.backing_file.clone() {
        if args.unsafe_backing {
            if options.backing_format.is_none() {
                bail!("{name}: Backing file specified without backing format");
            }
            if size.is_none() {
                bail!("{name}: Image creation needs a size parameter");
            }
        } else {
            // As qemu-img: the backing file must open, from the new image's
            // directory, whatever is given.
            let path = qcow::relative_to(&crate::open::file_path(&args.file), &backing);
            // Only its size is read: an encrypted one opens without its
            // password, as QEMU opens it.
            let mut flags = args.open.clone();
            flags.without_key = true;
            let image = open_image(
                &path,
                options.backing_format.as_deref(),
                &flags,
                None,
                true,
                false,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "{name}: {}\nCould not open backing image.",
                    crate::describe_once(&e)
                )
            })?;
            if options.backing_format.is_none() {
                bail!(
                    "{name}: Backing file specified without backing format\nDetected format of {}.",
                    image.format().name()
                );
            }
            if size.is_none() {
                options.size = image.virtual_size();
            }
        }
    } else if size.is_none() {
        bail!("{name}: Image creation needs a size parameter");
    }
    let name = args.file.display().to_string();
    // As qemu-img: the Formatting line comes first, then the format's own
    // checks; all of them before any file is touched.
    if !args.quiet {
        if format == "qcow" {
            let mut line = format!("Formatting '{name}', fmt=qcow size={}", options.size);
            if let Some(b) = &options.backing_file {
                line.push_str(&format!(" backing_file={b}"));
            }
            if let Some(f) = &options.backing_format {
                line.push_str(&format!(" backing_fmt={f}"));
            }
            for key in ["encryption", "encrypt.format", "encrypt.key-secret"] {
                if let Some(value) = shown.get(key) {
                    line.push_str(&format!(" {key}={value}"));
                }
            }
            println!("{line}");
        } else {
            println!("{}", shown.formatting_line(&name, &options));
        }
    }
    if let Some(compat) = bad_compat {
        bail!("{name}: Parameter 'version' does not accept value '{compat}'");
    }
    options.encryption = list
        .encryption(&args.open.object)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if format == "qcow" {
        qcow::QcowImage::validate_create(&options)
    } else {
        options.validate()
    }
    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if let Some(hint) = list.get("extent_size_hint") {
        crate::create_opts::extent_size_hint(hint).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    if format == "qcow" {
        qcow::create_qcow(&crate::open::file_path(&args.file), &options)?;
        return Ok(ExitCode::SUCCESS);
    }
    create_qcow2(&crate::open::file_path(&args.file), &options)?;
    Ok(ExitCode::SUCCESS)
}

/// Creates a qcow2 image at `file`, and its external data file when the
/// options name one (sized to the disk). As QEMU: the image file is made
/// (and locked) first, so nothing touches the data file unless the image
/// can be created; a failure removes the files made for it.
pub(crate) fn create_qcow2(file: &Path, options: &qcow::CreateOptions) -> Result<()> {
    let Some(data_file) = &options.data_file else {
        qcow::create(file, options)?;
        return Ok(());
    };
    let image_file = qcow::create_file(file)?;
    let path = qcow::relative_to(file, data_file);
    let existed = std::fs::symlink_metadata(&path).is_ok();
    let data = qcow::create_file(&path)
        .map_err(anyhow::Error::from)
        .and_then(|data| {
            qcow_io::Storage::set_len(&data, options.rounded_size())
                .with_context(|| format!("could not size '{}'", path.display()))
        });
    drop(image_file);
    let made = data.and_then(|()| Ok(qcow::create(file, options)?));
    if made.is_err() {
        let _ = std::fs::remove_file(file);
        if !existed {
            let _ = std::fs::remove_file(&path);
        }
    }
    made
}

/// `create -f raw`: a file of the size (whole 512-byte sectors), with
/// `preallocation` off, falloc or full.
fn create_raw(args: &CreateArgs) -> Result<ExitCode> {
    let name = args.file.display().to_string();
    if args.backing.is_some() {
        bail!("{name}: Backing file not supported for file format 'raw'");
    }
    let list = OptionList::parse(&args.options)?;
    let mut preallocation = None;
    let mut size = args.size.as_deref().map(image_size).transpose()?;
    for (key, value) in list.pairs() {
        match key.as_str() {
            "preallocation" => preallocation = Some(value.clone()),
            "extent_size_hint" => {
                option_size(key, value)?;
            }
            "size" if size.is_none() => size = Some(option_size("size", value)?),
            "size" => bail!("{name}: The image size must be specified only once"),
            other => bail!("{name}: Invalid parameter '{other}'"),
        }
    }
    let Some(size) = size else {
        bail!("{name}: Image creation needs a size parameter");
    };
    let mode = match preallocation.as_deref() {
        None => qcow::Preallocation::Off,
        Some(p) => qcow::Preallocation::from_name(p)?,
    };
    if !args.quiet {
        let mut line = format!("Formatting '{name}', fmt=raw size={size}");
        if let Some(p) = &preallocation {
            line.push_str(&format!(" preallocation={p}"));
        }
        if let Some(hint) = list.get("extent_size_hint") {
            let hint = option_size("extent_size_hint", hint).unwrap_or(0);
            line.push_str(&format!(" extent_size_hint={hint}"));
        }
        println!("{line}");
    }
    if mode == qcow::Preallocation::Metadata {
        bail!("{name}: Unsupported preallocation mode: metadata");
    }
    if let Some(hint) = list.get("extent_size_hint") {
        crate::create_opts::extent_size_hint(hint).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    let file = qcow::create_file(&crate::open::file_path(&args.file))?;
    let len = size.div_ceil(512) * 512;
    let made = (|| -> Result<()> {
        qcow_io::Storage::set_len(&file, len)?;
        match mode {
            qcow::Preallocation::Falloc => qcow_io::Storage::allocate(&file, 0, len)?,
            qcow::Preallocation::Full => qcow_io::Storage::write_zeroes(&file, 0, len)?,
            _ => {
                // As QEMU: the first block is written, so that the file
                // system has allocated it (and says its alignment).
                let first = len.min(4096) as usize;
                qcow_io::Storage::write_at(&file, &vec![0u8; first], 0)?;
            }
        }
        qcow_io::Storage::flush(&file)?;
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(crate::open::file_path(&args.file));
    }
    made?;
    Ok(ExitCode::SUCCESS)
}

/// `create -f luks`: a LUKS volume (header, key slot 0 from the secret
/// `key-secret` names, then the disk), with `preallocation` off, falloc or
/// full for the disk's part of the file.
fn create_luks(args: &CreateArgs) -> Result<ExitCode> {
    let name = args.file.display().to_string();
    if args.backing.is_some() {
        bail!("{name}: Backing file not supported for file format 'luks'");
    }
    let list = OptionList::parse(&args.options)?;
    let size = match (&args.size, list.get("size")) {
        (Some(_), Some(_)) => bail!("{name}: The image size must be specified only once"),
        (Some(s), None) => image_size(s)?,
        (None, Some(s)) => option_size("size", s)?,
        (None, None) => bail!("{name}: Image creation needs a size parameter"),
    };
    list.check_luks_keys()
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if !args.quiet {
        println!("{}", list.luks_formatting_line(&name, size));
    }
    let luks = list
        .luks_volume(&args.open.object)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let mode = match list.get("preallocation") {
        None => qcow::Preallocation::Off,
        Some(p) => qcow::Preallocation::from_name(p)?,
    };
    if mode == qcow::Preallocation::Metadata {
        bail!("{name}: Unsupported preallocation mode: metadata");
    }
    let path = crate::open::file_path(&args.file);
    let file = qcow::create_file(&path)?;
    let made = (|| -> Result<()> {
        qcow::LuksImage::create(&file, &luks, size)?;
        let len = qcow_io::Storage::len(&file)?;
        let payload = len - size;
        match mode {
            qcow::Preallocation::Falloc => qcow_io::Storage::allocate(&file, payload, size)?,
            qcow::Preallocation::Full => qcow_io::Storage::write_zeroes(&file, payload, size)?,
            _ => {}
        }
        qcow_io::Storage::flush(&file)?;
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made?;
    Ok(ExitCode::SUCCESS)
}
