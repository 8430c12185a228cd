//! Helpers shared by the xtask subcommands: locating the workspace, running
//! external tools with good error messages, temporary directories, hashing,
//! and a small seeded PRNG for deterministic test data.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// One kibibyte.
pub(crate) const KIB: u64 = 1024;
/// One mebibyte.
pub(crate) const MIB: u64 = 1024 * KIB;
/// One gibibyte.
pub(crate) const GIB: u64 = 1024 * MIB;

/// Finds the workspace root.
///
/// Walks up from the current directory looking for a `Cargo.toml` that
/// declares `[workspace]` next to an `xtask/` package, and falls back to the
/// parent of this crate's manifest directory (fixed at compile time).
pub(crate) fn workspace_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    for dir in cwd.ancestors() {
        let manifest = dir.join("Cargo.toml");
        if dir.join("xtask").join("Cargo.toml").is_file() {
            if let Ok(text) = fs::read_to_string(&manifest) {
                if text.contains("[workspace]") {
                    return Ok(dir.to_path_buf());
                }
            }
        }
    }
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask manifest directory has no parent")?;
    Ok(fallback.to_path_buf())
}

/// Renders a command line for error messages, roughly shell-quoted.
pub(crate) fn describe(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut out = quote(cmd.get_program());
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&quote(arg));
    }
    if let Some(dir) = cmd.get_current_dir() {
        out = format!("(cd {} && {out})", quote(dir.as_os_str()));
    }
    out
}

/// Runs `cmd` to completion with no standard input, capturing its output.
///
/// Fails with the command line and everything it printed if it cannot be
/// started or exits unsuccessfully. Returns standard output on success.
pub(crate) fn run_captured(cmd: &mut Command) -> Result<String> {
    let desc = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{desc}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{desc}` failed ({}):\n{}{}",
            out.status,
            stdout.trim_end(),
            stderr.trim_end()
        );
    }
    Ok(stdout.into_owned())
}

/// Runs `cmd` with its output going straight to the terminal.
pub(crate) fn run_inherited(cmd: &mut Command) -> Result<()> {
    let desc = describe(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("failed to start `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// Checks that an external tool can be started, with an actionable error.
pub(crate) fn require_tool(name: &str, hint: &str) -> Result<()> {
    match Command::new(name)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!("`{name} --version` failed ({status}); {hint}"),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`{name}` was not found in PATH; {hint}")
        }
        Err(e) => Err(e).with_context(|| format!("failed to start `{name}`; {hint}")),
    }
}

/// A uniquely named directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty directory whose name starts with `prefix`.
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{prefix}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path)
            .with_context(|| format!("cannot create temporary directory {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "warning: could not remove temporary directory {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Returns the lowercase hex SHA-256 of a file's contents, read in streaming
/// fashion so large files need little memory.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Finds `"key": <unsigned integer>` among the members of the outermost
/// object of a JSON document (nested objects are skipped).
pub(crate) fn top_level_u64(json: &str, key: &str) -> Option<u64> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if depth == 1 && json.get(start..i) == Some(key) {
                    let rest = json.get(i + 1..)?.trim_start();
                    if let Some(value) = rest.strip_prefix(':') {
                        let value = value.trim_start();
                        let end = value
                            .find(|c: char| !c.is_ascii_digit())
                            .unwrap_or(value.len());
                        return value[..end].parse().ok();
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Formats a byte count with a binary unit, e.g. `1.5 MiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Words used to build compressible, text-like data.
const WORDS: &[&str] = &[
    "the",
    "block",
    "cluster",
    "image",
    "qemu",
    "disk",
    "table",
    "entry",
    "offset",
    "refcount",
    "sector",
    "data",
    "write",
    "read",
    "snapshot",
    "backing",
    "file",
    "guest",
    "host",
    "zero",
    "compressed",
    "header",
    "version",
    "of",
    "and",
    "to",
    "in",
    "is",
    "a",
    "with",
    "for",
    "on",
];

/// A small, fast, seeded pseudo-random generator (xorshift64*).
///
/// Not suitable for anything but generating reproducible test data.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    /// Creates a generator; every seed (including 0) gives a distinct stream.
    pub(crate) fn new(seed: u64) -> Self {
        // splitmix64 scrambles the seed so nearby seeds diverge immediately.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            state: if z == 0 { 0x2545_f491_4f6c_dd1d } else { z },
        }
    }

    /// Returns the next 64 pseudo-random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Returns a value in `0..n` (`n` must be non-zero; slight bias is fine).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with incompressible pseudo-random bytes.
    pub(crate) fn fill_random(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// Fills `buf` with compressible, text-like lines of words and numbers.
    pub(crate) fn fill_text(&mut self, buf: &mut [u8]) {
        let mut pos = 0;
        let mut line_words = 0;
        let mut scratch = [0u8; 24];
        while pos < buf.len() {
            let token: &[u8] = match self.below(16) {
                0 => {
                    // A decimal number, rendered without allocating.
                    let mut n = self.below(100_000);
                    let mut i = scratch.len();
                    loop {
                        i -= 1;
                        scratch[i] = b'0' + (n % 10) as u8;
                        n /= 10;
                        if n == 0 {
                            break;
                        }
                    }
                    &scratch[i..]
                }
                1 if line_words > 6 => b".\n",
                _ => WORDS[self.below(WORDS.len() as u64) as usize].as_bytes(),
            };
            let end_of_line = token == b".\n";
            let sep: &[u8] = if line_words == 0 || end_of_line {
                b""
            } else {
                b" "
            };
            for piece in [sep, token] {
                let n = piece.len().min(buf.len() - pos);
                buf[pos..pos + n].copy_from_slice(&piece[..n]);
                pos += n;
            }
            if end_of_line {
                line_words = 0;
                continue;
            }
            line_words += 1;
        }
    }
}

/// Where a benchmark writes an output it deletes again: memory
/// (`/dev/shm`) when the machine has it, so that the time measured is the
/// tools' and not the disk's write-back; else `work`.
pub(crate) fn scratch_output(work: &std::path::Path, name: &str) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(format!("qcow-bench-{}-{name}", std::process::id()))
    } else {
        work.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_seed_sensitive() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn fills_cover_odd_lengths() {
        let mut rng = Rng::new(1);
        let mut buf = vec![0u8; 1001];
        rng.fill_random(&mut buf);
        assert!(buf[990..].iter().any(|&b| b != 0));
        rng.fill_text(&mut buf);
        assert!(buf.iter().all(|b| b.is_ascii()));
    }

    #[test]
    fn finds_top_level_key_only() {
        let json = r#"{"children": [{"info": {"virtual-size": 1}}], "virtual-size": 4194304,
            "x": "virtual-size"}"#;
        assert_eq!(top_level_u64(json, "virtual-size"), Some(4_194_304));
        assert_eq!(top_level_u64(json, "missing"), None);
    }

    #[test]
    fn describe_quotes_odd_arguments() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-c", "write -P 0x11 0 4k"]);
        assert_eq!(describe(&cmd), "qemu-io -c 'write -P 0x11 0 4k'");
    }
}
