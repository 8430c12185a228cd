//! Opening images the way qemu-img's command line does.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use qcow::{BlockDevice, Image, ImageFormat, OpenOptions};

/// Options shared by the subcommands that open images.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct OpenFlags {
    /// Refuse to open any file an image names (backing or data files).
    #[arg(long)]
    pub(crate) untrusted: bool,
    /// Format to assume for a backing file whose format is not recorded in
    /// the image (never probed).
    #[arg(long, value_name = "FMT")]
    pub(crate) assume_backing_format: Option<String>,
    /// Open read-only images even while another process writes them
    /// (qemu-img's force-share): what is read may be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// The file name is a list of image options (`driver=qcow2,
    /// file.filename=FILE`), as qemu-img's --image-opts.
    #[arg(long = "image-opts")]
    pub(crate) image_opts: bool,
    /// QEMU objects: secrets (`secret,id=ID,data=PASSWORD` or
    /// `file=PATH`, `format=raw|base64`) that unlock encrypted images named
    /// with `encrypt.key-secret=ID`, and TLS credentials
    /// (`tls-creds-x509,id=ID,dir=DIR,endpoint=client|server`) that NBD
    /// images (`tls-creds=ID`) and `serve --tls-creds ID` use; other
    /// objects are accepted and unused.
    #[arg(long = "object", value_name = "OBJECT")]
    pub(crate) object: Vec<String>,
    /// Open encrypted images without their password, for their metadata
    /// only (set by `info`, which reads no data).
    #[arg(skip)]
    pub(crate) without_key: bool,
}

/// Drivers an image name may ask for.
const DRIVERS: [&str; 5] = ["qcow2", "qcow", "raw", "file", "luks"];

/// The file and format an image name on the command line means: a path,
/// a `json:{...}` name, or (with `--image-opts`) an option list, for the
/// drivers qcow2, qcow, raw and file. A `json:` name found inside an image
/// is never followed; this is only for names the user gives.
/// The file a name given on the command line names: a `file:` prefix (the
/// file protocol, named explicitly) is taken off, the rest being the name
/// however many colons it holds; a relative name that would read as
/// another protocol's then starts with `./`, as QEMU names it.
pub(crate) fn file_path(arg: &Path) -> PathBuf {
    let text = arg.to_string_lossy();
    let Some(path) = text.strip_prefix("file:") else {
        return arg.to_owned();
    };
    let first = path.split('/').next().unwrap_or_default();
    if !path.starts_with('/') && first.contains(':') {
        PathBuf::from(format!("./{path}"))
    } else {
        PathBuf::from(path)
    }
}

/// The options a name given as `json:{...}` or with `--image-opts` holds,
/// as flat `key=value` pairs; `None` for a plain file name.
fn named_options(
    arg: &Path,
    flags: &OpenFlags,
    format: Option<&str>,
) -> Result<Option<Vec<(String, String)>>> {
    let text = arg.to_string_lossy();
    Ok(Some(if flags.image_opts {
        if format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        crate::create_opts::OptionList::parse(&[text.to_string()])?
            .pairs()
            .to_vec()
    } else if let Some(json) = text.strip_prefix("json:") {
        // QEMU's JSON parser also takes single-quoted strings.
        let value: serde_json::Value = serde_json::from_str(json)
            .or_else(|_| serde_json::from_str(&json.replace('\'', "\"")))
            .map_err(|e| {
                anyhow::anyhow!("Could not open '{text}': Could not parse the JSON options: {e}")
            })?;
        let mut pairs = Vec::new();
        flatten("", &value, &mut pairs)
            .map_err(|m| anyhow::anyhow!("Could not open '{text}': {m}"))?;
        pairs
    } else {
        return Ok(None);
    }))
}

/// The value `options` give `key` last (a later value wins, as in QEMU).
fn option<'a>(options: &'a [(String, String)], key: &str) -> Option<&'a str> {
    options
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// QEMU's null block driver (`null-co`, `null-aio`) named by `json:{...}`
/// or `--image-opts`: a raw disk of `size` bytes that reads as zeros
/// (`read-zeroes` off leaves QEMU's buffer as it was; here it is zeros
/// too) and keeps nothing written to it. `None` for any other name.
fn null_image(arg: &Path, options: &[(String, String)]) -> Result<Option<Image>> {
    let get = |key: &str| option(options, key);
    if !matches!(get("driver"), Some("null-co" | "null-aio")) {
        return Ok(None);
    }
    let text = arg.to_string_lossy();
    let size = match get("size") {
        Some(size) => crate::size::option_size("size", size)
            .map_err(|e| anyhow::anyhow!("Could not open '{text}': {e}"))?,
        None => 1 << 30,
    };
    let storage = std::sync::Arc::new(qcow_io::NullStorage::new(size));
    Ok(Some(Image::Raw(
        qcow::RawImage::open_sized(&text, storage, size).with_writes(false),
    )))
}

/// Whether `arg` names an NBD export: `Some(false)` by a URI, `Some(true)`
/// by options (`driver=nbd`); `None` otherwise.
pub(crate) fn nbd_kind(arg: &Path, flags: &OpenFlags) -> Option<bool> {
    let text = arg.to_string_lossy();
    if qcow_nbd::client::Target::from_uri(&text).is_some() {
        return Some(false);
    }
    let options = named_options(arg, flags, None).ok()??;
    options
        .iter()
        .any(|(k, v)| k == "driver" && v == "nbd")
        .then_some(true)
}

/// An NBD export named by a URI (`nbd://HOST[:PORT]/EXPORT`,
/// `nbd+unix:///EXPORT?socket=PATH`) or by options (`driver=nbd,
/// server.type=unix|inet,server.path=...|server.host=...,server.port=...`
/// or the older `path=...|host=...,port=...`, and `export=...,
/// x-dirty-bitmap=CONTEXT,tls-creds=ID,tls-hostname=NAME`): a raw disk
/// over the connection (over TLS with `tls-creds`),
/// refused as qemu-img refuses it when the caller is to `write` and the
/// server exports it read-only. `None` for any other name.
pub(crate) fn nbd_image(
    arg: &Path,
    flags: &OpenFlags,
    format: Option<&str>,
    write: bool,
) -> Result<Option<Image>> {
    let text = arg.to_string_lossy();
    let target = match qcow_nbd::client::Target::from_uri(&text) {
        Some(target) => target.map_err(|e| anyhow::anyhow!("Could not open '{text}': {e}"))?,
        None => {
            let Some(options) = named_options(arg, flags, None)? else {
                return Ok(None);
            };
            let get = |key: &str| option(&options, key).map(str::to_owned);
            if get("driver").as_deref() != Some("nbd") {
                return Ok(None);
            }
            let required = |key: &str| {
                get(key).ok_or_else(|| {
                    anyhow::anyhow!("Could not open '{text}': The option '{key}' is required")
                })
            };
            let port = |key: &str| -> Result<u16> {
                let port = get(key).unwrap_or_else(|| "10809".into());
                port.parse()
                    .map_err(|_| anyhow::anyhow!("Could not open '{text}': bad {key} '{port}'"))
            };
            // QEMU's `server.*` options, or its older `path=` and
            // `host=`/`port=`.
            let address = match get("server.type").as_deref() {
                Some("unix") => qcow_nbd::client::Address::Unix(required("server.path")?),
                Some("inet") => {
                    qcow_nbd::client::Address::Tcp(required("server.host")?, port("server.port")?)
                }
                Some(_) => {
                    bail!("Could not open '{text}': The option 'server.type' must be unix or inet")
                }
                None => match (get("path"), get("host")) {
                    (Some(path), None) => qcow_nbd::client::Address::Unix(path),
                    (None, Some(host)) => qcow_nbd::client::Address::Tcp(host, port("port")?),
                    (Some(_), Some(_)) => bail!(
                        "Could not open '{text}': The options 'path' and 'host' are mutually exclusive"
                    ),
                    (None, None) => bail!(
                        "Could not open '{text}': The option 'server.type' must be unix or inet"
                    ),
                },
            };
            let tls = match get("tls-creds") {
                Some(id) => Some(qcow_nbd::client::TargetTls {
                    credentials: crate::tls_creds::client(&flags.object, &id, &text)?,
                    hostname: get("tls-hostname"),
                }),
                None => None,
            };
            qcow_nbd::client::Target {
                address,
                export: get("export").unwrap_or_default(),
                context: get("x-dirty-bitmap"),
                tls,
            }
        }
    };
    if let Some(f) = format {
        if f != "raw" {
            bail!("Could not open '{text}': Image is not in {f} format");
        }
    }
    let client = qcow_nbd::client::NbdClient::connect(&target)
        .map_err(|e| anyhow::anyhow!("Could not open '{text}': {e}"))?;
    let writable = !client.read_only();
    if write && !writable {
        bail!("Could not open '{text}': Could not open image: Permission denied");
    }
    let size = qcow_io::Storage::len(&client)?;
    let name = client.name().to_owned();
    let raw =
        qcow::RawImage::open_sized(&name, std::sync::Arc::new(client), size).with_writes(writable);
    Ok(Some(Image::Raw(raw)))
}

pub(crate) fn resolve_name(arg: &Path, flags: &OpenFlags, format: Option<&str>) -> Result<Named> {
    match named_options(arg, flags, format)? {
        Some(options) => resolve_options(arg, &options, format),
        None => Ok(Named {
            path: file_path(arg),
            format: format.map(str::to_owned),
            data_file: None,
            key_secret: None,
            backing_key_secrets: Vec::new(),
            backing_files: Vec::new(),
        }),
    }
}

/// What a name given on the command line names.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    /// The image's file.
    pub(crate) path: PathBuf,
    /// Its format, when given (else probed).
    pub(crate) format: Option<String>,
    /// Its external data file, when given (`data-file.filename`), instead
    /// of the one its header names.
    pub(crate) data_file: Option<String>,
    /// The id of the secret that unlocks it (`encrypt.key-secret`).
    pub(crate) key_secret: Option<String>,
    /// The ids of the secrets that unlock its backing layers, by depth
    /// (`backing.encrypt.key-secret`, ...).
    pub(crate) backing_key_secrets: Vec<Option<String>>,
    /// The backing files given by name, by depth (`backing.file.filename`):
    /// they must be the files the images record.
    pub(crate) backing_files: Vec<Option<String>>,
}

impl Named {
    /// Open options for the named image: [`open_options`] and the data
    /// file given with the name.
    pub(crate) fn options(&self, flags: &OpenFlags) -> Result<OpenOptions> {
        let mut options = open_options(flags, self.format.as_deref())?;
        options.data_file = self.data_file.clone();
        if let Some(id) = &self.key_secret {
            options.key_secret = Some(crate::secret::find(&flags.object, id)?);
        }
        options.backing_key_secrets = self
            .backing_key_secrets
            .iter()
            .map(|id| {
                id.as_ref()
                    .map(|id| crate::secret::find(&flags.object, id))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(options)
    }

    /// The `json:` name QEMU gives an image opened with a password (its
    /// options, the password's id among them), `None` for one opened
    /// without.
    pub(crate) fn options_name(&self) -> Option<String> {
        let id = self.key_secret.as_ref()?;
        let driver = self.format.as_deref().unwrap_or("qcow2");
        let key = if driver == "luks" {
            "key-secret"
        } else {
            "encrypt.key-secret"
        };
        // QEMU's order: qcow2 names the secret first, luks last.
        let mut name = serde_json::Map::new();
        if driver != "luks" {
            name.insert(key.into(), id.clone().into());
        }
        name.insert("driver".into(), driver.into());
        name.insert(
            "file".into(),
            serde_json::json!({"driver": "file", "filename": self.path.display().to_string()}),
        );
        if driver == "luks" {
            name.insert(key.into(), id.clone().into());
        }
        let text = serde_json::Value::Object(name).to_string();
        // QEMU's spacing: a space after each colon and comma.
        Some(format!(
            "json:{}",
            text.replace(",\"", ", \"").replace("\":", "\": ")
        ))
    }

    /// Refuses a chain whose backing files are not the ones the name
    /// gave (`backing.file.filename`): qcow opens the files images record.
    pub(crate) fn check_backing_files(&self, image: &dyn BlockDevice) -> Result<()> {
        let mut layer = image.backing();
        for given in &self.backing_files {
            let Some(opened) = layer else {
                break;
            };
            if let Some(given) = given {
                let same = match (
                    std::fs::canonicalize(given),
                    std::fs::canonicalize(opened.name()),
                ) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                };
                if !same {
                    bail!(
                        "backing file '{given}' is not the one '{}' records ('{}'); qcow opens the recorded one only",
                        image.name(),
                        opened.name()
                    );
                }
            }
            layer = opened.backing();
        }
        Ok(())
    }
}

/// [`resolve_name`] for a name that holds `options`. Without a driver,
/// the format of `file.filename` is probed, as QEMU probes it.
fn resolve_options(
    arg: &Path,
    options: &[(String, String)],
    format: Option<&str>,
) -> Result<Named> {
    let text = arg.to_string_lossy();
    let get = |key: &str| option(options, key).map(str::to_owned);
    let driver = match get("driver") {
        Some(driver) => Some(driver),
        None if get("file.filename").is_some() => None,
        None => {
            bail!("Could not open '{text}': A block device must be specified by \"driver\"")
        }
    };
    if let Some(driver) = &driver {
        if !DRIVERS.contains(&driver.as_str()) {
            bail!(
                "Could not open '{text}': driver '{driver}' is not one qcow opens (qcow2, qcow, raw, file, luks)"
            );
        }
        if let Some(f) = format {
            if f != driver && !(driver == "file" && f == "raw") {
                bail!("Could not open '{text}': Cannot use format '{f}' with driver '{driver}'");
            }
        }
    }
    let (path_key, allowed): (&str, &[&str]) = match driver.as_deref() {
        Some("file") => ("filename", &["driver", "filename"]),
        Some("qcow2") | None => (
            "file.filename",
            &[
                "driver",
                "file.filename",
                "file.driver",
                "data-file.filename",
                "data-file.driver",
                "encrypt.key-secret",
                "encrypt.format",
            ],
        ),
        Some("luks") => (
            "file.filename",
            &["driver", "file.filename", "file.driver", "key-secret"],
        ),
        _ => (
            "file.filename",
            &[
                "driver",
                "file.filename",
                "file.driver",
                "encrypt.key-secret",
                "encrypt.format",
            ],
        ),
    };
    // Cache and tuning options change nothing qcow does: taken and ignored.
    let tuning = |k: &str| {
        k.starts_with("cache")
            || k.starts_with("file.cache")
            || k.starts_with("file.aio")
            || k.starts_with("file.locking")
            || matches!(
                k,
                "l2-cache-size"
                    | "l2-cache-entry-size"
                    | "refcount-cache-size"
                    | "cache-clean-interval"
                    | "discard"
                    | "detect-zeroes"
                    | "read-only"
                    | "auto-read-only"
                    | "force-share"
                    | "node-name"
                    | "pass-discard-request"
                    | "pass-discard-snapshot"
                    | "pass-discard-other"
                    | "lazy-refcounts"
                    | "overlap-check"
            )
    };
    let shown = driver.as_deref().unwrap_or("qcow2");
    // Options of backing layers (`backing.encrypt.key-secret`, and the
    // backing file's name and driver, which must be the ones the image
    // records), by depth.
    let mut backing_key_secrets: Vec<Option<String>> = Vec::new();
    let mut backing_files: Vec<Option<String>> = Vec::new();
    for (key, value) in options {
        let Some((depth, rest)) = backing_key(key) else {
            continue;
        };
        let slot = |list: &mut Vec<Option<String>>| {
            if list.len() < depth {
                list.resize(depth, None);
            }
            list[depth - 1] = Some(value.clone());
        };
        match rest {
            "encrypt.key-secret" => slot(&mut backing_key_secrets),
            "file.filename" => slot(&mut backing_files),
            "driver" | "file.driver" | "encrypt.format" => {}
            _ => bail!(
                "Could not open '{text}': Block format '{shown}' does not support the option '{key}'"
            ),
        }
    }
    if let Some((key, _)) = options
        .iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()) && !tuning(k) && backing_key(k).is_none())
    {
        bail!(
            "Could not open '{text}': Block format '{shown}' does not support the option '{key}'"
        );
    }
    for protocol_key in ["file.driver", "data-file.driver"] {
        if let Some(protocol) = get(protocol_key) {
            if protocol != "file" {
                bail!(
                    "Could not open '{text}': protocol '{protocol}' is not one qcow opens (file)"
                );
            }
        }
    }
    let Some(path) = get(path_key) else {
        bail!("Could not open '{text}': The option '{path_key}' is required");
    };
    let format = match driver {
        Some(driver) if driver == "file" => Some("raw".to_owned()),
        Some(driver) => Some(driver),
        None => format.map(str::to_owned),
    };
    remember_given_name(Path::new(&path), &text);
    Ok(Named {
        path: PathBuf::from(path),
        format,
        data_file: get("data-file.filename"),
        key_secret: get("encrypt.key-secret").or_else(|| get("key-secret")),
        backing_key_secrets,
        backing_files,
    })
}

/// Names given on the command line as options (`--image-opts`, `json:`),
/// by the file they name: qemu-img names such an image by the options in
/// its messages.
static GIVEN_NAMES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

fn remember_given_name(path: &Path, given: &str) {
    GIVEN_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((path.to_owned(), given.to_owned()));
}

/// The options an image named `image` was given by on the command line,
/// if it was (see [`GIVEN_NAMES`]).
pub(crate) fn given_name(image: &str) -> Option<String> {
    GIVEN_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .find(|(path, _)| path == Path::new(image))
        .map(|(_, given)| given.clone())
}

/// The depth and the rest of a backing layer's option (`backing.KEY` is
/// depth 1, `backing.backing.KEY` depth 2); `None` for the image's own.
fn backing_key(key: &str) -> Option<(usize, &str)> {
    let mut rest = key;
    let mut depth = 0;
    while let Some(inner) = rest.strip_prefix("backing.") {
        rest = inner;
        depth += 1;
    }
    (depth > 0).then_some((depth, rest))
}

/// JSON options as qemu's dotted keys (`file.filename`).
fn flatten(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, String)>,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
            Ok(())
        }
        Value::String(s) if !prefix.is_empty() => {
            out.push((prefix.to_owned(), s.clone()));
            Ok(())
        }
        Value::Bool(b) if !prefix.is_empty() => {
            out.push((prefix.to_owned(), b.to_string()));
            Ok(())
        }
        Value::Number(n) if !prefix.is_empty() => {
            out.push((prefix.to_owned(), n.to_string()));
            Ok(())
        }
        _ => Err("the options must be a JSON object of strings, numbers and booleans".into()),
    }
}

/// Refuses an output that is one of the files `source` reads (its image
/// file, a backing file or a data file, by any name: the same path, a
/// symbolic or a hard link), before the output is touched.
pub(crate) fn refuse_overwriting_source(source: &dyn BlockDevice, output: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(());
    };
    let mut layer = Some(source);
    while let Some(image) = layer {
        for name in [image.name(), image.data_name()] {
            if let Ok(m) = std::fs::metadata(name) {
                if m.dev() == out.dev() && m.ino() == out.ino() {
                    bail!(
                        "{}: is the same file as '{name}', which the source reads; refusing to overwrite it",
                        output.display()
                    );
                }
            }
        }
        layer = image.backing();
    }
    Ok(())
}

/// Open options from the command line's flags and an optional format name:
/// files the image names are followed unless `flags.untrusted` says not to.
pub(crate) fn open_options(flags: &OpenFlags, format: Option<&str>) -> Result<OpenOptions> {
    let mut options = if flags.untrusted {
        OpenOptions::default()
    } else {
        OpenOptions::trusted()
    };
    options.format = format.map(ImageFormat::from_name).transpose()?;
    options.assume_backing_format = flags
        .assume_backing_format
        .as_deref()
        .map(ImageFormat::from_name)
        .transpose()?;
    options.force_share = flags.force_share;
    options.without_key = flags.without_key;
    Ok(options)
}

/// Opens `path` with an optional format name, following backing files and
/// data files unless `flags.untrusted` says not to; `copy_source`: the
/// image is read to be copied, and nobody may write it meanwhile.
pub(crate) fn open_image(
    path: &Path,
    format: Option<&str>,
    flags: &OpenFlags,
    snapshot: Option<&str>,
    follow: bool,
    copy_source: bool,
) -> Result<Image> {
    if let Some(image) = nbd_image(path, flags, format, false)? {
        return Ok(image);
    }
    let named = match named_options(path, flags, format)? {
        Some(options) => {
            if let Some(image) = null_image(path, &options)? {
                return Ok(image);
            }
            resolve_options(path, &options, format)?
        }
        None => Named {
            path: file_path(path),
            format: format.map(str::to_owned),
            data_file: None,
            key_secret: None,
            backing_key_secrets: Vec::new(),
            backing_files: Vec::new(),
        },
    };
    let mut options = named.options(flags)?;
    if !follow {
        options.follow_backing = false;
        options.open_data_file = false;
    }
    options.snapshot = snapshot.map(str::to_owned);
    options.copy_source = copy_source;
    let image = open(&named.path, &options)?;
    named.check_backing_files(&image)?;
    Ok(image)
}

/// [`qcow::open`], printing on standard error what repairing a dirty image
/// took (QEMU's check lines, which qemu-img prints while it opens one for
/// writing), for every layer.
pub(crate) fn open(path: &Path, options: &OpenOptions) -> qcow::Result<Image> {
    let image = qcow::open(path, options)?;
    let mut layer: Option<&dyn BlockDevice> = Some(&image);
    while let Some(device) = layer {
        for line in device.repairs_on_open() {
            eprintln!("{line}");
        }
        layer = device.backing();
    }
    Ok(image)
}
