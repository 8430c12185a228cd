//! `qcow info`: what qemu-img info prints, in its human and JSON shapes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use qcow::crypto::EncryptionInfo;
use qcow::crypto::cipher::IvGenAlg;
use qcow::crypto::luks::LuksAlgorithms;
use qcow::format::bitmap::{BITMAP_AUTO, BITMAP_IN_USE};
use qcow::format::snapshot::Snapshot;
use qcow::{BlockDevice, Image};
use serde_json::{Map, Value, json};

use crate::human::size_to_str;
use crate::open::{OpenFlags, open_image};

/// Arguments of `qcow info`.
#[derive(Debug, clap::Args)]
pub(crate) struct InfoArgs {
    /// Output format.
    #[arg(long, value_name = "human|json", default_value = "human")]
    output: String,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// Runs `qcow info`.
pub(crate) fn run(args: &InfoArgs) -> Result<ExitCode> {
    let json_output = match args.output.as_str() {
        "json" => true,
        "human" => false,
        other => anyhow::bail!("--output must be human or json, not {other:?}"),
    };
    let mut infos = Vec::new();
    let (mut path, mut format, mut shown) =
        if crate::open::nbd_kind(&args.file, &args.open).is_some() {
            // An NBD export: opened by its name as given.
            (args.file.clone(), args.format.clone(), None)
        } else {
            let named = crate::open::resolve_name(&args.file, &args.open, args.format.as_deref())?;
            // An image given with a password is named by its options, as QEMU
            // names it.
            let shown = named.options_name();
            (named.path, named.format, shown)
        };
    // Backing files are plain names: options apply to the named image only.
    let mut flags = args.open.clone();
    flags.image_opts = crate::open::nbd_kind(&args.file, &args.open) == Some(true);
    flags.without_key = true;
    let mut seen = std::collections::HashSet::new();
    loop {
        if let Ok(canonical) = path.canonicalize() {
            if !seen.insert(canonical) {
                anyhow::bail!(
                    "Backing file '{}' creates an infinite loop.",
                    path.display()
                );
            }
        }
        // info reports names of files an image refers to but opens none.
        let image = open_image(&path, format.as_deref(), &flags, None, false, false)?;
        let info = match crate::open::nbd_kind(&path, &flags) {
            Some(by_options) => nbd_info(&image, by_options),
            None => image_info(&path, shown.take().as_deref(), &image)?,
        };
        let next = if args.backing_chain && !args.open.untrusted {
            backing_of(&path, &image)
        } else {
            None
        };
        infos.push(info);
        match next {
            Some((p, f)) => {
                if infos.len() > qcow::DEFAULT_MAX_CHAIN_DEPTH {
                    anyhow::bail!("backing chain of '{}' is too deep", args.file.display());
                }
                path = p;
                format = f.or_else(|| args.open.assume_backing_format.clone());
                if format.is_none() {
                    anyhow::bail!(
                        "'{}' has no backing format recorded; pass --assume-backing-format",
                        path.display()
                    );
                }
            }
            None => break,
        }
    }
    if json_output {
        let value = if args.backing_chain {
            Value::Array(infos)
        } else {
            infos.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", to_qemu_json(&value)?);
    } else {
        let texts: Vec<String> = infos.iter().map(human).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

/// The backing file of an image and its recorded format, if any.
fn backing_of(path: &Path, image: &Image) -> Option<(PathBuf, Option<String>)> {
    match image {
        Image::Qcow2(q) => q.header().backing_file.as_ref().map(|b| {
            (
                qcow::relative_to(path, b),
                q.header().backing_format().map(str::to_owned),
            )
        }),
        Image::Qcow(q) => q
            .header()
            .backing_file
            .as_ref()
            .map(|b| (qcow::relative_to(path, b), None)),
        Image::Raw(_) | Image::Luks(_) => None,
    }
}

/// JSON laid out as qemu-img lays it out: four-space indentation, and
/// empty arrays and objects still broken over two lines.
pub(crate) fn to_qemu_json(value: &Value) -> Result<String> {
    let mut out = String::new();
    write_json(&mut out, value, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, level: usize) -> Result<()> {
    let pad = |n: usize| "    ".repeat(n);
    match value {
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad(level + 1));
                write_json(out, item, level + 1)?;
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            out.push_str(&pad(level));
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str("{\n");
            for (i, (k, v)) in map.iter().enumerate() {
                out.push_str(&pad(level + 1));
                out.push_str(&serde_json::to_string(k)?);
                out.push_str(": ");
                write_json(out, v, level + 1)?;
                out.push_str(if i + 1 < map.len() { ",\n" } else { "\n" });
            }
            out.push_str(&pad(level));
            out.push('}');
        }
        scalar => out.push_str(&serde_json::to_string(scalar)?),
    }
    Ok(())
}

/// What qemu-img shows of an NBD export: a raw disk over the `nbd`
/// protocol named by a URI, or (`by_options`, `driver=nbd`) the protocol
/// node itself; no disk size.
fn nbd_info(image: &Image, by_options: bool) -> Value {
    let size = image.virtual_size();
    let name = image.name();
    if by_options {
        return json!({"children": [], "virtual-size": size, "filename": name, "format": "nbd"});
    }
    json!({
        "children": [{
            "name": "file",
            "info": {"children": [], "virtual-size": size, "filename": name, "format": "nbd"}
        }],
        "virtual-size": size,
        "filename": name,
        "format": "raw"
    })
}

fn image_info(path: &Path, shown: Option<&str>, image: &Image) -> Result<Value> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat '{}'", path.display()))?;
    let file_name = path.display().to_string();
    let filename = shown.map_or_else(|| file_name.clone(), str::to_owned);
    let actual = meta.blocks() * 512;
    let mut info = Map::new();
    info.insert(
        "children".into(),
        json!([{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": meta.len().next_multiple_of(512),
                "filename": file_name,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }]),
    );
    let (backing, backing_format) = match image {
        Image::Qcow2(q) => (
            q.header().backing_file.clone(),
            q.header().backing_format().map(str::to_owned),
        ),
        Image::Qcow(q) => (q.header().backing_file.clone(), None),
        Image::Raw(_) | Image::Luks(_) => (None, None),
    };
    if let Some(f) = &backing_format {
        info.insert("backing-filename-format".into(), json!(f));
    }
    if let Image::Qcow2(q) = image {
        if !q.snapshots().is_empty() {
            let list: Vec<Value> = q.snapshots().iter().map(snapshot_json).collect();
            info.insert("snapshots".into(), Value::Array(list));
        }
    }
    info.insert("virtual-size".into(), json!(image.virtual_size()));
    info.insert("filename".into(), json!(filename));
    match image {
        Image::Qcow2(q) => {
            info.insert("cluster-size".into(), json!(q.header().cluster_size()));
        }
        Image::Qcow(q) => {
            info.insert("cluster-size".into(), json!(q.header().cluster_size()));
        }
        Image::Raw(_) | Image::Luks(_) => {}
    }
    info.insert("format".into(), json!(image.format().name()));
    info.insert("actual-size".into(), json!(actual));
    match image {
        Image::Qcow2(q) => {
            info.insert("format-specific".into(), qcow2_specific(q));
        }
        Image::Luks(l) => {
            info.insert(
                "format-specific".into(),
                json!({"type": "luks", "data": luks_info(l.header(), false)}),
            );
        }
        _ => {}
    }
    if let Some(b) = &backing {
        let full = qcow::relative_to(path, b);
        info.insert(
            "full-backing-filename".into(),
            json!(full.display().to_string()),
        );
        info.insert("backing-filename".into(), json!(b));
    }
    let encrypted = match image {
        Image::Qcow2(q) => q.encryption().is_some(),
        Image::Qcow(q) => q.is_encrypted(),
        Image::Luks(_) => true,
        Image::Raw(_) => false,
    };
    if encrypted {
        info.insert("encrypted".into(), json!(true));
    }
    let dirty = matches!(image, Image::Qcow2(q) if q.header().dirty());
    info.insert("dirty-flag".into(), json!(dirty));
    Ok(Value::Object(info))
}

/// qemu-img's snapshot table (`info`, and `snapshot -l`): a title line, a
/// header, one row per snapshot (values as [`snapshot_json`] makes them).
pub(crate) fn snapshot_list(out: &mut String, snaps: &[Value]) {
    use std::fmt::Write;
    let _ = writeln!(out, "Snapshot list:");
    let _ = writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for snap in snaps {
        let sn = |k: &str| snap.get(k).and_then(Value::as_u64).unwrap_or(0);
        let secs = sn("vm-clock-sec");
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            sn("vm-clock-nsec") / 1_000_000
        );
        let icount = snap
            .get("icount")
            .and_then(Value::as_u64)
            .map_or(String::new(), |i| i.to_string());
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            snap.get("id").and_then(Value::as_str).unwrap_or(""),
            snap.get("name").and_then(Value::as_str).unwrap_or(""),
            size_to_str(sn("vm-state-size")),
            format_date(sn("date-sec")),
            clock,
            icount
        );
    }
}

/// A snapshot as `info --output json` shows it.
pub(crate) fn snapshot_json(s: &Snapshot) -> Value {
    let mut v = Map::new();
    if let Some(icount) = s.icount {
        v.insert("icount".into(), json!(icount));
    }
    v.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    v.insert("name".into(), json!(s.name));
    v.insert("date-sec".into(), json!(s.date_sec));
    v.insert("date-nsec".into(), json!(s.date_nsec));
    v.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    v.insert("id".into(), json!(s.id));
    v.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(v)
}

fn qcow2_specific(q: &qcow::Qcow2Image) -> Value {
    let h = q.header();
    let mut data = Map::new();
    data.insert(
        "compat".into(),
        json!(if h.version == 2 { "0.10" } else { "1.1" }),
    );
    data.insert("compression-type".into(), json!(h.compression_type.name()));
    if h.version >= 3 {
        data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        if !q.bitmaps().is_empty() {
            let bitmaps: Vec<Value> = q
                .bitmaps()
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & BITMAP_IN_USE != 0 {
                        flags.push("in-use");
                    }
                    if b.flags & BITMAP_AUTO != 0 {
                        flags.push("auto");
                    }
                    json!({"flags": flags, "name": b.name, "granularity": b.granularity()})
                })
                .collect();
            data.insert("bitmaps".into(), Value::Array(bitmaps));
        }
    }
    data.insert("refcount-bits".into(), json!(h.refcount_bits()));
    if let Some(encryption) = q.encryption() {
        data.insert("encrypt".into(), encrypt_info(encryption));
    }
    if h.version >= 3 {
        if let Some(name) = h.data_file_name() {
            data.insert("data-file".into(), json!(name));
        }
        if h.has_data_file() {
            data.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        data.insert("corrupt".into(), json!(h.corrupt()));
        data.insert("extended-l2".into(), json!(h.extended_l2()));
    }
    json!({"type": "qcow2", "data": data})
}

/// QEMU's `encrypt` object of an encrypted image, fields in its order.
fn encrypt_info(encryption: &EncryptionInfo) -> Value {
    match encryption {
        EncryptionInfo::Aes => json!({"format": "aes"}),
        EncryptionInfo::Luks { header, .. } => luks_info(header, true),
    }
}

/// QEMU's description of a LUKS header (`with_format`: as a qcow2 image's
/// `encrypt` object, which names the format).
fn luks_info(header: &qcow::format::luks::LuksHeader, with_format: bool) -> Value {
    // The header's algorithms were looked up when the image was opened.
    let algorithms = LuksAlgorithms::of(header).ok();
    let sector = qcow::format::luks::LUKS_SECTOR_SIZE;
    let mut data = Map::new();
    if let Some(a) = &algorithms {
        data.insert("ivgen-alg".into(), json!(a.cipher.ivgen.name()));
    }
    data.insert("detached-header".into(), json!(false));
    if let Some(a) = &algorithms {
        data.insert("hash-alg".into(), json!(a.hash.name()));
        data.insert("cipher-alg".into(), json!(a.cipher.cipher_alg_name()));
    }
    data.insert("uuid".into(), json!(header.uuid));
    // QEMU names the IV hash of ESSIV only.
    if let Some(hash) = algorithms
        .as_ref()
        .filter(|a| a.cipher.ivgen == IvGenAlg::Essiv)
        .and_then(|a| a.cipher.ivgen_hash)
    {
        data.insert("ivgen-hash-alg".into(), json!(hash.name()));
    }
    if with_format {
        data.insert("format".into(), json!("luks"));
    }
    if let Some(a) = &algorithms {
        data.insert("cipher-mode".into(), json!(a.cipher.mode.name()));
    }
    let slots: Vec<Value> = header
        .key_slots
        .iter()
        .map(|slot| {
            let key_offset = u64::from(slot.key_offset_sector) * sector;
            if slot.active {
                json!({
                    "active": true,
                    "iters": slot.iterations,
                    "key-offset": key_offset,
                    "stripes": slot.stripes
                })
            } else {
                json!({"active": false, "key-offset": key_offset})
            }
        })
        .collect();
    data.insert("slots".into(), Value::Array(slots));
    data.insert("payload-offset".into(), json!(header.payload_offset()));
    data.insert(
        "master-key-iters".into(),
        json!(header.master_key_iterations),
    );
    Value::Object(data)
}

/// The human shape of one image's info value.
fn human(info: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let get = |k: &str| info.get(k);
    let s = |k: &str| get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let n = |k: &str| get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(out, "image: {}", s("filename"));
    let _ = writeln!(out, "file format: {}", s("format"));
    let size = n("virtual-size");
    let _ = writeln!(out, "virtual size: {} ({size} bytes)", size_to_str(size));
    match get("actual-size").and_then(Value::as_u64) {
        Some(actual) => {
            let _ = writeln!(out, "disk size: {}", size_to_str(actual));
        }
        None => {
            let _ = writeln!(out, "disk size: unavailable");
        }
    }
    if get("encrypted").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(out, "encrypted: yes");
    }
    if let Some(cs) = get("cluster-size").and_then(Value::as_u64) {
        let _ = writeln!(out, "cluster_size: {cs}");
    }
    if get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(out, "cleanly shut down: no");
    }
    if let Some(b) = get("backing-filename").and_then(Value::as_str) {
        let full = s("full-backing-filename");
        if full == b {
            let _ = writeln!(out, "backing file: {b}");
        } else {
            let _ = writeln!(out, "backing file: {b} (actual path: {full})");
        }
    }
    if let Some(f) = get("backing-filename-format").and_then(Value::as_str) {
        let _ = writeln!(out, "backing file format: {f}");
    }
    if let Some(Value::Array(snaps)) = get("snapshots") {
        snapshot_list(&mut out, snaps);
    }
    if let Some(data) = get("format-specific").and_then(|f| f.get("data")) {
        let _ = writeln!(out, "Format specific information:");
        if let Value::Object(map) = data {
            for (k, v) in map {
                human_field(&mut out, 1, k, v);
            }
        }
    }
    if let Some(child) = get("children")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("info"))
    {
        let _ = writeln!(out, "Child node '/file':");
        let cs = |k: &str| child.get(k).and_then(Value::as_str).unwrap_or("");
        let cn = |k: &str| child.get(k).and_then(Value::as_u64).unwrap_or(0);
        let _ = writeln!(out, "    filename: {}", cs("filename"));
        let protocol = match cs("format") {
            "nbd" => "nbd",
            _ => "file",
        };
        let _ = writeln!(out, "    protocol type: {protocol}");
        let len = cn("virtual-size");
        let _ = writeln!(out, "    file length: {} ({len} bytes)", size_to_str(len));
        match child.get("actual-size").and_then(Value::as_u64) {
            Some(actual) => {
                let _ = writeln!(out, "    disk size: {}", size_to_str(actual));
            }
            None => {
                let _ = writeln!(out, "    disk size: unavailable");
            }
        }
    }
    out
}

/// One field of "Format specific information", nested as qemu-img nests it.
fn human_field(out: &mut String, level: usize, key: &str, value: &Value) {
    use std::fmt::Write;
    let indent = "    ".repeat(level);
    let key = key.replace('-', " ");
    match value {
        Value::Array(items) => {
            let _ = writeln!(out, "{indent}{key}:");
            for (i, item) in items.iter().enumerate() {
                human_field(out, level + 1, &format!("[{i}]"), item);
            }
        }
        Value::Object(map) => {
            let _ = writeln!(out, "{indent}{key}:");
            for (k, v) in map {
                human_field(out, level + 1, k, v);
            }
        }
        Value::String(s) => {
            let _ = writeln!(out, "{indent}{key}: {s}");
        }
        other => {
            let _ = writeln!(out, "{indent}{key}: {other}");
        }
    }
}

/// Formats seconds since the epoch as local-agnostic UTC "YYYY-MM-DD HH:MM:SS".
fn format_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_date;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_576_014), "2026-11-25 03:06:54");
        assert_eq!(format_date(951_782_400), "2000-02-29 00:00:00");
    }
}
