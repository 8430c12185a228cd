//! `qcow serve`: serves an image over NBD with qemu-nbd's flags (the
//! protocol is the `qcow-nbd` crate's). The image is opened and locked as
//! qemu-nbd opens it (for writing unless `-r`); SIGTERM and SIGINT stop the
//! server cleanly: no new clients, requests in flight finished, the image
//! flushed and closed (dirty bit cleared, bitmaps stored).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use qcow::{BlockDevice, Image};
use qcow_nbd::{DetectZeroes, DirtyRanges, Export, Listener, ServerOptions};

use crate::open::OpenFlags;

/// Set in the child of `--fork`: it says "ready" on standard output once
/// it listens.
const FORKED: &str = "QCOW_SERVE_FORKED";

/// Arguments of `qcow serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Export the image read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// The export's name (default: empty).
    #[arg(
        short = 'x',
        long = "export-name",
        value_name = "NAME",
        default_value = ""
    )]
    export_name: String,
    /// The export's description.
    #[arg(
        short = 'D',
        long = "description",
        value_name = "DESC",
        default_value = ""
    )]
    description: String,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once.
    #[arg(short = 'e', long = "shared", value_name = "N", default_value_t = 1)]
    shared: usize,
    /// Listen on this Unix socket.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP port.
    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        default_value_t = 10809
    )]
    port: u16,
    /// TCP address.
    #[arg(
        short = 'b',
        long = "bind",
        value_name = "ADDR",
        default_value = "0.0.0.0"
    )]
    bind: String,
    /// Export this persistent dirty bitmap as `qemu:dirty-bitmap:NAME`.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmap: Option<String>,
    /// Serve an internal snapshot (read-only): `NAME`, `snapshot.name=NAME`
    /// or `snapshot.id=ID`.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Export `qemu:allocation-depth`.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Return once the server listens, leaving it running.
    #[arg(long)]
    fork: bool,
    /// Write the server's process ID here.
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Cache mode (accepted for compatibility with qemu-nbd).
    #[arg(long, value_name = "MODE")]
    cache: Option<String>,
    /// Discards: `ignore` (default) or `unmap` (passed to the image).
    #[arg(long, value_name = "MODE", default_value = "ignore")]
    discard: String,
    /// Writes of zeros become zero writes: `off` (default), `on`, or
    /// `unmap` (releasing space, with `--discard=unmap`).
    #[arg(long = "detect-zeroes", value_name = "MODE")]
    detect_zeroes: Option<String>,
    /// Require TLS, with the `tls-creds-x509` object of this id (given
    /// with `--object`) as the server's credentials.
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Let in only the TLS clients the `authz-simple` object of this id
    /// (given with `--object authz-simple,id=ID,identity=DN`) names: the
    /// distinguished name of their certificate, most specific part first
    /// (`CN=...,O=...,C=...`), as GnuTLS writes it.
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Runs `qcow serve`.
pub(crate) fn run(args: &ServeArgs) -> Result<ExitCode> {
    // Credentials are checked before anything else, as qemu-nbd does.
    if args.tls_authz.is_some() && args.tls_creds.is_none() {
        bail!("--tls-authz is not permitted without --tls-creds");
    }
    let tls = match &args.tls_creds {
        Some(id) => {
            let credentials = crate::tls_creds::server(&args.open.object, id)?;
            Some(match &args.tls_authz {
                Some(authz) => credentials.authorize_only(&crate::tls_creds::authorized_identity(
                    &args.open.object,
                    authz,
                )?),
                None => credentials,
            })
        }
        None => None,
    };
    if args.fork && std::env::var_os(FORKED).is_none() {
        return fork();
    }
    let discard = match args.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        other => bail!("Invalid discard option '{other}'"),
    };
    let detect_zeroes = match args.detect_zeroes.as_deref() {
        None | Some("off") => DetectZeroes::Off,
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        Some(mode) => bail!("Invalid detect-zeroes option '{mode}'"),
    };
    let snapshot = args.snapshot.as_deref().map(|s| {
        s.strip_prefix("snapshot.name=")
            .or_else(|| s.strip_prefix("snapshot.id="))
            .unwrap_or(s)
            .to_owned()
    });
    let read_only = args.read_only || snapshot.is_some();
    if args.open.force_share && !read_only {
        bail!("--share-rw/-U requires --read-only (-r)");
    }
    let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
    let file = named.path.clone();
    let mut options = named.options(&args.open)?;
    options.writable = !read_only;
    options.snapshot = snapshot;
    let image = crate::open::open(&file, &options).map_err(|e| match e {
        qcow::Error::SnapshotNotFound { .. } => {
            anyhow::anyhow!("Failed to load snapshot: Can't find snapshot")
        }
        other => other.into(),
    })?;
    // Check the bitmap now (qemu-nbd's words when it is missing); a
    // writable export reads it live, as writes through it change it.
    let bitmap_ranges = match &args.bitmap {
        None => None,
        Some(name) => match &image {
            Image::Qcow2(q) => Some(q.bitmap_ranges(name).map_err(|e| match e {
                qcow::Error::Bitmap { reason, .. } if reason.ends_with("not found") => {
                    anyhow::anyhow!("Bitmap '{name}' is not found")
                }
                qcow::Error::Bitmap { reason, .. } => anyhow::anyhow!("{reason}"),
                other => other.into(),
            })?),
            _ => bail!("Bitmap '{name}' is not found"),
        },
    };
    let device: Arc<Image> = Arc::new(image);
    let bitmap = match (&args.bitmap, bitmap_ranges) {
        (Some(name), Some(ranges)) if read_only => Some((name.clone(), DirtyRanges::Fixed(ranges))),
        (Some(name), Some(_)) => {
            let (image, bitmap) = (device.clone(), name.clone());
            let live = move |offset: u64, len: u64| match &*image {
                Image::Qcow2(q) => q.bitmap_ranges_in(&bitmap, offset, len),
                _ => Ok(Vec::new()),
            };
            Some((name.clone(), DirtyRanges::Live(Arc::new(live))))
        }
        _ => None,
    };
    let mut export = Export::new(&args.export_name, device.clone() as Arc<dyn BlockDevice>)
        .description(&args.description)
        .read_only(read_only)
        .discard(discard)
        .allocation_depth(args.allocation_depth)
        .detect_zeroes(detect_zeroes)
        .multi_conn(args.shared > 1);
    if let Some((name, ranges)) = bitmap {
        export = export.bitmap(&name, ranges);
    }
    let listener = match &args.socket {
        Some(path) => Listener::Unix(
            UnixListener::bind(path)
                .with_context(|| format!("Failed to bind socket to {}", path.display()))?,
        ),
        None => Listener::Tcp(
            TcpListener::bind((args.bind.as_str(), args.port))
                .with_context(|| format!("Failed to bind to {}:{}", args.bind, args.port))?,
        ),
    };
    if let Some(path) = &args.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("Failed to write pid file {}", path.display()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    if std::env::var_os(FORKED).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        // The parent is gone from here on: like qemu-nbd, let go of its
        // standard output and error (pipes nobody reads any more).
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
            let _ = rustix::stdio::dup2_stderr(&null);
        }
    }
    let server = ServerOptions::default()
        .shared(args.shared)
        .persistent(args.persistent)
        .tls(tls);
    let served = qcow_nbd::serve(listener, vec![Arc::new(export)], &server, &stop, &|e| {
        crate::report!("{e}");
    });
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(path) = &args.pid_file {
        let _ = std::fs::remove_file(path);
    }
    served.context("serving")?;
    // Every connection is gone: the image is ours alone again.
    let image =
        Arc::try_unwrap(device).map_err(|_| anyhow::anyhow!("the image is still in use"))?;
    image.close()?;
    Ok(ExitCode::SUCCESS)
}

/// `--fork`: runs the server as a child in its own process group and
/// returns once it listens (its "ready" line), as qemu-nbd --fork does.
fn fork() -> Result<ExitCode> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the program")?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--fork").collect();
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .env(FORKED, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting the server")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("waiting for the server")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(1, 255) as u8
    ))
}
