//! A pure-Rust engine for QCOW (version 1) and QCOW2 (versions 2 and 3) disk
//! images.
//!
//! Open any image with [`open`] (formats probed by magic, files the image
//! names opened only as [`OpenOptions`] allow, every file locked with
//! QEMU's locking protocol unless the options turn it off), then read and
//! write it through the [`BlockDevice`] trait that every format implements.
//! [`create`] and [`create_qcow`] make new images (checked before any file
//! is touched). The format-specific types ([`Qcow2Image`], [`QcowImage`],
//! [`RawImage`]) expose headers, snapshots and bitmaps, and for QCOW2
//! growing ([`Qcow2Image::resize`]) and checking with repair
//! ([`Qcow2Image::check`]). [`copy::copy`] copies one disk into another,
//! on worker threads, as `convert`, `dd`, `commit` and `rebase` do.
//! Encrypted images (LUKS and the legacy AES scheme, see [`crypto`]) open
//! with their password ([`OpenOptions::key_secret`]); [`LuksImage`] reads
//! and writes LUKS volumes.
//!
//! The specification followed is `docs/interop/qcow2.txt` in QEMU's
//! repository; `qemu-img` is the reference every test compares against.

#![deny(missing_docs)]

mod compress;
pub mod copy;
pub mod crypto;
mod device;
mod error;
mod luks_volume;
pub mod measure;
mod open;
mod options;
mod qcow2;
mod raw;
pub mod resolve;
mod v1;

pub use device::{Allocation, BlockDevice, CompressedWrites, Extent, ImageFormat, Reservation};
pub use error::{Error, ErrorKind, Result, SnapshotL1Problem};
pub use luks_volume::LuksImage;
pub use open::{Image, create, create_file, create_qcow, open, probe, relative_to};
pub use options::{DEFAULT_MAX_CACHE_BYTES, DEFAULT_MAX_CHAIN_DEPTH, OpenOptions};
pub use qcow_format as format;
pub use qcow_io as io;
pub use qcow_io::{FileStorage, MemStorage, Storage};
pub use qcow2::{
    AmendOptions, CheckOptions, CheckReport, CreateOptions, DEFAULT_CHECK_MEMORY, NewSnapshot,
    Preallocation, Qcow2Image, Repair,
};
pub use raw::RawImage;
pub use v1::QcowImage;

/// Fails unless `offset..offset + len` lies within a disk of `size` bytes.
pub(crate) fn check_range(image: &str, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            image: image.to_owned(),
            offset,
            len,
            size,
        }),
    }
}

/// An image's backing layer: `None` when it names none, and an error when
/// it names one that was not opened.
pub(crate) fn backing_layer<'a>(
    image: &str,
    backing: Option<&'a dyn BlockDevice>,
    named: Option<&str>,
) -> Result<Option<&'a dyn BlockDevice>> {
    match (backing, named) {
        (Some(b), _) => Ok(Some(b)),
        (None, Some(name)) => Err(Error::NotOpened {
            image: image.to_owned(),
            what: "backing file",
            name: name.to_owned(),
        }),
        (None, None) => Ok(None),
    }
}

/// Reads a run this layer does not allocate: from the backing image up to
/// its end, zeros past it or when there is no backing image.
pub(crate) fn read_backing(
    backing: Option<&dyn BlockDevice>,
    out: &mut [u8],
    guest: u64,
) -> Result<()> {
    let inside = match backing {
        Some(b) => {
            // Bounded by out.len(), so the cast cannot truncate.
            let inside = b.virtual_size().saturating_sub(guest).min(out.len() as u64) as usize;
            if inside > 0 {
                b.read_at(&mut out[..inside], guest)?;
            }
            inside
        }
        None => 0,
    };
    out[inside..].fill(0);
    Ok(())
}

/// The status of an unallocated run, looked up in the backing image (one
/// level deeper), or unallocated when there is none or the run lies past
/// its end. `reserved` is host space the run keeps in this layer, if any.
pub(crate) fn backing_status(
    backing: Option<&dyn BlockDevice>,
    offset: u64,
    len: u64,
    reserved: Option<u64>,
) -> Result<Extent> {
    if let Some(b) = backing {
        let size = b.virtual_size();
        if offset < size {
            let extent = b.block_status(offset, len.min(size - offset))?;
            let allocation = match extent.allocation {
                Allocation::Data {
                    depth,
                    offset,
                    compressed,
                    zero,
                } => Allocation::Data {
                    depth: depth + 1,
                    offset,
                    compressed,
                    zero,
                },
                Allocation::Zero { depth, offset } => Allocation::Zero {
                    depth: depth + 1,
                    offset,
                },
                Allocation::Unallocated { depth, offset } => Allocation::Unallocated {
                    depth: depth + 1,
                    offset,
                },
                Allocation::Unknown { depth } => Allocation::Unknown { depth: depth + 1 },
            };
            return Ok(Extent {
                len: extent.len,
                allocation,
            });
        }
    }
    Ok(Extent {
        len,
        allocation: Allocation::Unallocated {
            depth: 0,
            offset: reserved,
        },
    })
}
