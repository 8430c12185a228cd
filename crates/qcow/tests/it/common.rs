//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow::BlockDevice;
use sha2::{Digest, Sha256};

/// The workspace's testdata directory.
pub(crate) fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// Reads a whole disk in pieces of `piece` bytes.
pub(crate) fn read_all(disk: &dyn BlockDevice, piece: usize) -> Vec<u8> {
    let size = usize::try_from(disk.virtual_size()).expect("test disks fit in memory");
    let mut out = vec![0u8; size];
    for (i, chunk) in out.chunks_mut(piece).enumerate() {
        disk.read_at(chunk, (i * piece) as u64)
            .unwrap_or_else(|e| panic!("reading {} at {}: {e}", disk.name(), i * piece));
    }
    out
}

/// SHA-256 in lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a qemu tool and fails the test, saying so, if it is missing or fails.
pub(crate) fn qemu(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for the oracle tests but could not be run: {e}")
    });
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The raw contents of an image according to qemu-img.
pub(crate) fn qemu_raw(image: &Path, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.raw");
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    let image_s = image.to_str().expect("utf-8 path");
    let out_s = out.to_str().expect("utf-8 path");
    args.extend_from_slice(&["-O", "raw", image_s, out_s]);
    qemu("qemu-img", &args);
    std::fs::read(&out).expect("read converted raw")
}

/// A small deterministic pseudo-random generator (xorshift64*).
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Fills a buffer with random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
