//! qemu-img's `-o key=value,...` creation options, turned into the
//! engine's [`CreateOptions`].

use anyhow::{Result, bail};
use qcow::crypto::cipher::{CipherMode, IvGenAlg};
use qcow::crypto::hash::HashAlg;
use qcow::crypto::{EncryptionOptions, LuksOptions};
use qcow::format::header::CompressionType;
use qcow::{CreateOptions, Preallocation};

use crate::size::option_size;

/// The `-o` options as given, kept to print qemu-img's "Formatting" line.
#[derive(Debug, Default, Clone)]
pub(crate) struct OptionList {
    pairs: Vec<(String, String)>,
}

impl OptionList {
    /// Parses `-o` arguments (each a comma-separated list; `,,` is a comma).
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut pairs = Vec::new();
        for arg in args {
            for item in split_options(arg) {
                if item.is_empty() {
                    continue;
                }
                let (k, v) = match item.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    // A bare flag means "on", as qemu accepts.
                    None => (item.clone(), "on".to_owned()),
                };
                pairs.push((k, v));
            }
        }
        Ok(OptionList { pairs })
    }

    /// Every `(key, value)` as given.
    pub(crate) fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The value of `key`, if given.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A `compat` value that names no version, taken out of the list: QEMU
    /// refuses it only after its Formatting line, which shows it.
    pub(crate) fn take_bad_compat(&mut self) -> Option<String> {
        let value = self.get("compat")?.to_owned();
        if matches!(value.as_str(), "0.10" | "v2" | "1.1" | "v3") {
            return None;
        }
        self.pairs.retain(|(k, _)| k != "compat");
        Some(value)
    }

    /// Sets `key` (used for -b / -F, which are `backing_file` / `backing_fmt`).
    pub(crate) fn set(&mut self, key: &str, value: &str) {
        self.pairs.retain(|(k, _)| k != key);
        self.pairs.push((key.to_owned(), value.to_owned()));
    }

    /// Builds qcow2 creation options for a disk of `size` bytes.
    pub(crate) fn qcow2_options(&self, size: u64) -> Result<CreateOptions> {
        let mut o = CreateOptions::new(size);
        for (key, value) in &self.pairs {
            match key.as_str() {
                "size" => o.size = option_size("size", value)?,
                "cluster_size" => o.cluster_size = option_size("cluster_size", value)?,
                "compat" => {
                    o.version = match value.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        other => bail!("Parameter 'version' does not accept value '{other}'"),
                    }
                }
                // A width that is no number is refused with the others, as
                // QEMU refuses it (after its Formatting line).
                "refcount_bits" => o.refcount_bits = value.parse().unwrap_or(0),
                "lazy_refcounts" => o.lazy_refcounts = on_off(key, value)?,
                "extended_l2" => o.extended_l2 = on_off(key, value)?,
                "data_file_raw" => o.data_file_raw = on_off(key, value)?,
                "compression_type" => {
                    o.compression_type = match value.as_str() {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        other => bail!("invalid compression_type {other:?} (zlib or zstd)"),
                    }
                }
                "preallocation" => o.preallocation = Preallocation::from_name(value)?,
                "backing_file" => o.backing_file = Some(value.clone()),
                "backing_fmt" => o.backing_format = Some(value.clone()),
                "data_file" => o.data_file = Some(value.clone()),
                // Its bound is checked after the Formatting line, as QEMU
                // checks it (see `extent_size_hint`).
                "extent_size_hint" => {
                    option_size(key, value)?;
                }
                // Taken by `encryption`, which needs the secrets.
                k if ENCRYPTION_KEYS.contains(&k) => {}
                other => bail!("Invalid parameter '{other}'"),
            }
        }
        Ok(o)
    }

    /// The encryption the options ask for (`encryption=on`,
    /// `encrypt.format=luks|aes` and LUKS's `encrypt.*` choices), its
    /// password the secret among `objects` that `encrypt.key-secret`
    /// names; `None` without encryption.
    pub(crate) fn encryption(&self, objects: &[String]) -> Result<Option<EncryptionOptions>> {
        let format = match (self.get("encrypt.format"), self.get("encryption")) {
            (Some(format), _) => format,
            (None, Some(on)) if on_off("encryption", on)? => "aes",
            _ => return Ok(None),
        };
        if !matches!(format, "luks" | "aes") {
            bail!("Parameter 'encrypt.format' does not accept value '{format}'");
        }
        let Some(id) = self.get("encrypt.key-secret") else {
            bail!("Parameter 'encrypt.key-secret' is required for cipher");
        };
        let secret = crate::secret::find(objects, id)?;
        if format == "aes" {
            return Ok(Some(EncryptionOptions::Aes { secret }));
        }
        Ok(Some(EncryptionOptions::Luks(
            self.luks_choices("encrypt.", secret)?,
        )))
    }

    /// A LUKS volume's options (qemu-img's `luks` format: `key-secret`
    /// and the algorithms, unprefixed), its password the secret among
    /// `objects` that `key-secret` names.
    pub(crate) fn luks_volume(&self, objects: &[String]) -> Result<LuksOptions> {
        self.check_luks_keys()?;
        let Some(id) = self.get("key-secret") else {
            bail!("Parameter 'key-secret' is required for cipher");
        };
        let secret = crate::secret::find(objects, id)?;
        self.luks_choices("", secret)
    }

    /// Refuses an option a LUKS volume does not take (before the
    /// Formatting line, as qemu-img refuses it).
    pub(crate) fn check_luks_keys(&self) -> Result<()> {
        for (key, _) in &self.pairs {
            let known = key == "size"
                || key == "preallocation"
                || ENCRYPTION_KEYS
                    .iter()
                    .filter_map(|k| k.strip_prefix("encrypt."))
                    .any(|k| k == key && k != "format");
            if !known {
                bail!("Invalid parameter '{key}'");
            }
        }
        Ok(())
    }

    /// The LUKS algorithms and iteration time the options (with keys
    /// starting with `prefix`) choose, QEMU's defaults for the others.
    fn luks_choices(&self, prefix: &str, secret: qcow::crypto::Secret) -> Result<LuksOptions> {
        let mut luks = LuksOptions::new(secret);
        let refuse = |key: &str, value: &str| {
            anyhow::anyhow!("Parameter '{prefix}{key}' does not accept value '{value}'")
        };
        let option = |key: &str| self.get(&format!("{prefix}{key}"));
        if let Some(alg) = option("cipher-alg") {
            luks.cipher.aes_bits = match alg {
                "aes-128" => 128,
                "aes-192" => 192,
                "aes-256" => 256,
                "cast5-128" | "serpent-128" | "serpent-192" | "serpent-256" | "twofish-128"
                | "twofish-192" | "twofish-256" | "sm4" | "des" | "3des" => {
                    bail!("Algorithm '{alg}' not supported")
                }
                other => return Err(refuse("cipher-alg", other)),
            };
        }
        if let Some(mode) = option("cipher-mode") {
            luks.cipher.mode = match mode {
                "ctr" => bail!("Cipher mode 'ctr' not supported"),
                other => CipherMode::from_name(other).map_err(|_| refuse("cipher-mode", other))?,
            };
        }
        if let Some(ivgen) = option("ivgen-alg") {
            luks.cipher.ivgen =
                IvGenAlg::from_name(ivgen).map_err(|_| refuse("ivgen-alg", ivgen))?;
        }
        let hash = |key: &str, name: &str| match name {
            "md5" | "ripemd160" | "sm3" => bail!("Hash '{name}' not supported"),
            other => HashAlg::from_name(other).map_err(|_| refuse(key, other)),
        };
        if let Some(name) = option("ivgen-hash-alg") {
            luks.cipher.ivgen_hash = Some(hash("ivgen-hash-alg", name)?);
        } else if luks.cipher.ivgen == IvGenAlg::Essiv {
            luks.cipher.ivgen_hash = Some(HashAlg::Sha256);
        }
        if let Some(name) = option("hash-alg") {
            luks.hash = hash("hash-alg", name)?;
        }
        if let Some(ms) = option("iter-time") {
            luks.iter_time_ms = ms
                .parse()
                .map_err(|_| anyhow::anyhow!("Parameter '{prefix}iter-time' expects a number"))?;
        }
        Ok(luks)
    }

    /// qemu-img's "Formatting ..." line for a LUKS volume.
    pub(crate) fn luks_formatting_line(&self, file: &str, size: u64) -> String {
        let mut line = format!("Formatting '{file}', fmt=luks size={size}");
        let keys = ENCRYPTION_KEYS
            .iter()
            .filter_map(|k| k.strip_prefix("encrypt."))
            .filter(|k| *k != "format")
            .chain(["preallocation"]);
        for key in keys {
            if let Some(value) = self.get(key) {
                line.push_str(&format!(" {key}={value}"));
            }
        }
        line
    }

    /// Builds qcow (version 1) creation options: only `size`,
    /// `backing_file` and `backing_fmt` apply.
    pub(crate) fn qcow_options(&self, size: u64) -> Result<CreateOptions> {
        let mut o = CreateOptions::new(size);
        for (key, value) in &self.pairs {
            match key.as_str() {
                "size" => o.size = option_size("size", value)?,
                "backing_file" => o.backing_file = Some(value.clone()),
                "backing_fmt" => o.backing_format = Some(value.clone()),
                // Taken by `encryption`, which needs the secrets.
                "encryption" | "encrypt.format" | "encrypt.key-secret" => {}
                other => bail!("Invalid parameter '{other}'"),
            }
        }
        Ok(o)
    }

    /// qemu-img's "Formatting ..." line for a qcow2 image.
    pub(crate) fn formatting_line(&self, file: &str, o: &CreateOptions) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut line = format!("Formatting '{file}', fmt=qcow2");
        // The encryption options as given, in qemu-img's order.
        for key in ENCRYPTION_KEYS {
            if let Some(value) = self.get(key) {
                line.push_str(&format!(" {key}={value}"));
            }
        }
        line.push_str(&format!(
            " cluster_size={} extended_l2={}",
            o.cluster_size,
            on(o.extended_l2),
        ));
        // Shown when given, where qemu-img shows it.
        if let Some(p) = self.get("preallocation") {
            line.push_str(&format!(" preallocation={p}"));
        }
        line.push_str(&format!(
            " compression_type={} size={}",
            o.compression_type.name(),
            o.size
        ));
        if let Some(b) = &o.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = &o.backing_format {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        if let Some(d) = &o.data_file {
            line.push_str(&format!(" data_file={d}"));
        }
        if self.get("data_file_raw").is_some() {
            line.push_str(&format!(" data_file_raw={}", on(o.data_file_raw)));
        }
        if let Some(c) = self.get("compat") {
            line.push_str(&format!(" compat={c}"));
        }
        // The width as given (qemu-img shows what it was told).
        let refcount_bits = self
            .get("refcount_bits")
            .map_or_else(|| o.refcount_bits.to_string(), str::to_owned);
        line.push_str(&format!(
            " lazy_refcounts={} refcount_bits={refcount_bits}",
            on(o.lazy_refcounts),
        ));
        if let Some(hint) = self.get("extent_size_hint") {
            line.push_str(&format!(
                " extent_size_hint={}",
                option_size("extent_size_hint", hint).unwrap_or(0)
            ));
        }
        line
    }
}

/// The encryption options qemu-img takes, in the order its Formatting
/// line shows them.
const ENCRYPTION_KEYS: [&str; 9] = [
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// The file's extent size hint (`extent_size_hint`), checked as QEMU's
/// file driver checks it. The hint asks a file system that allocates in
/// extents (XFS) for larger ones; it is accepted for compatibility and not
/// passed on (QEMU's own attempt fails silently on other file systems).
pub(crate) fn extent_size_hint(value: &str) -> Result<u64> {
    let hint = option_size("extent_size_hint", value)?;
    if hint > u64::from(u32::MAX) {
        bail!("Extent size hint is too large");
    }
    Ok(hint)
}

/// A boolean option's value, refused with QEMU's words.
pub(crate) fn on_off(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

/// Splits on commas, where `,,` stands for a literal comma.
fn split_options(arg: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = items.last_mut() {
                    last.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(last) = items.last_mut() {
            last.push(c);
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_options() -> Result<()> {
        let list = OptionList::parse(&[
            "cluster_size=4k,compat=0.10".into(),
            "lazy_refcounts=off,backing_file=a,,b.qcow2".into(),
        ])?;
        let o = list.qcow2_options(1 << 20)?;
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.version, 2);
        assert_eq!(o.backing_file.as_deref(), Some("a,b.qcow2"));
        assert!(
            OptionList::parse(&["bogus=1".into()])?
                .qcow2_options(1)
                .is_err()
        );
        Ok(())
    }
}
