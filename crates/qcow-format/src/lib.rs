//! On-disk layouts of QCOW (version 1) and QCOW2 (versions 2 and 3) images.
//!
//! This crate knows the bytes and nothing of files: it holds big-endian
//! `zerocopy` structs for every fixed layout the specification
//! (`docs/interop/qcow2.txt` in QEMU's repository) defines, and parse
//! functions that turn them into validated, native values. Everything that
//! comes from an image is treated as hostile: every value is checked, every
//! size is bounded before anything is allocated, and every failure is a typed
//! [`FormatError`] naming the structure and the offending value.
//!
//! Modules:
//! - [`header`]: the QCOW2 header (versions 2 and 3) and its validation;
//! - [`extension`]: header extensions (backing format, feature names, ...);
//! - [`table`]: L1, L2 (standard and extended) and refcount table entries;
//! - [`snapshot`]: the snapshot table;
//! - [`bitmap`]: the bitmap directory;
//! - [`v1`]: the QCOW version 1 header and L2 entries;
//! - [`luks`]: the LUKS header of an encrypted QCOW2 image;
//! - [`limits`]: the bounds applied to values read from an image.

#![deny(missing_docs)]

pub mod bitmap;
mod error;
pub mod extension;
pub mod header;
pub mod limits;
pub mod luks;
mod qemu_words;
pub mod snapshot;
pub mod table;
pub mod v1;

pub use error::FormatError;

/// The magic number that starts every QCOW and QCOW2 image: `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Size of a sector, the unit of compressed cluster sizes.
pub const SECTOR_SIZE: u64 = 512;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A QCOW image of the given version (1, 2 or 3 are known; others are
    /// reported as found so the caller can refuse them by name).
    Qcow {
        /// The version field of the header.
        version: u32,
    },
    /// No QCOW magic: the bytes could be a raw image.
    NotQcow,
}

/// Looks at the first bytes of a file and says whether it carries the QCOW magic.
///
/// Needs at least 8 bytes to recognize an image; fewer bytes probe as
/// [`Probe::NotQcow`].
pub fn probe(prefix: &[u8]) -> Probe {
    match prefix {
        [a, b, c, d, e, f, g, h, ..] if u32::from_be_bytes([*a, *b, *c, *d]) == QCOW_MAGIC => {
            Probe::Qcow {
                version: u32::from_be_bytes([*e, *f, *g, *h]),
            }
        }
        _ => Probe::NotQcow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_recognizes_magic_and_version() {
        let mut bytes = vec![0u8; 16];
        bytes[..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(probe(&bytes), Probe::Qcow { version: 3 });
        assert_eq!(probe(&bytes[..7]), Probe::NotQcow);
        bytes[0] = 0;
        assert_eq!(probe(&bytes), Probe::NotQcow);
    }
}
