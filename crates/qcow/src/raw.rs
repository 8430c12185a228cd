//! Raw images: the virtual disk is the file.

use std::sync::Arc;

use qcow_io::Storage;

use crate::device::{Allocation, BlockDevice, Extent, ImageFormat};
use crate::{Error, Result};

/// A raw image over any storage.
#[derive(Debug)]
pub struct RawImage {
    name: String,
    storage: Arc<dyn Storage>,
    size: u64,
    /// Whether writes are taken (else refused as read-only).
    writable: bool,
}

impl RawImage {
    /// Opens `storage` as a raw disk; `name` is used in messages. The disk
    /// is the file rounded up to whole 512-byte sectors, as QEMU sees it
    /// (the tail past the end of the file reads as zeros).
    pub fn open(name: &str, storage: Arc<dyn Storage>) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io(name, "reading the size", 0, e))?
            .div_ceil(512)
            .saturating_mul(512);
        Ok(RawImage {
            name: name.to_owned(),
            storage,
            size,
            writable: true,
        })
    }

    /// The same image, taking writes or refusing them (writes go to the
    /// storage when taken; by default they are).
    pub fn with_writes(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Uses `storage` as a raw disk of `size` bytes whatever its length
    /// says: for devices (a block device, `/dev/null`) written as outputs.
    pub fn open_sized(name: &str, storage: Arc<dyn Storage>, size: u64) -> Self {
        RawImage {
            name: name.to_owned(),
            storage,
            size,
            writable: true,
        }
    }

    /// [`RawImage::resize`], with the grown part's space reserved
    /// (`falloc`) or written with zeros (`full`).
    pub fn resize_preallocated(&mut self, new_size: u64, mode: crate::Preallocation) -> Result<()> {
        let old = self.size;
        if new_size < old && mode != crate::Preallocation::Off {
            return Err(Error::InvalidOptions(format!(
                "{}: Preallocation can only be used for growing images",
                self.name
            )));
        }
        if mode == crate::Preallocation::Metadata {
            return Err(Error::InvalidOptions(
                "Unsupported preallocation mode: metadata".into(),
            ));
        }
        self.resize(new_size)?;
        let grown = new_size.saturating_sub(old);
        let io = |e| Error::io(&self.name, "preallocating", old, e);
        match mode {
            crate::Preallocation::Falloc if grown > 0 => {
                self.storage.allocate(old, grown).map_err(io)?
            }
            crate::Preallocation::Full if grown > 0 => {
                self.storage.write_zeroes(old, grown).map_err(io)?
            }
            _ => {}
        }
        self.storage
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }

    /// Changes the disk's size to `new_size` bytes, as qemu-img resizes a
    /// raw image (any byte size; new bytes read as zeros).
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.storage
            .set_len(new_size)
            .map_err(|e| Error::io(&self.name, "resizing", new_size, e))?;
        self.storage
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        self.size = new_size;
        Ok(())
    }
}

impl BlockDevice for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(&self.name, "reading data", offset, e))
    }

    /// Holes in the file (where the file system reports them) read as
    /// zeros, as qemu-img reports them.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(&self.name, offset, len, self.size)?;
        let extent = self
            .storage
            .extent(offset, len)
            .map_err(|e| Error::io(&self.name, "looking for holes", offset, e))?;
        let allocation = match (extent.data, extent.zero) {
            (true, zero) => Allocation::Data {
                depth: 0,
                offset: Some(offset),
                compressed: false,
                zero,
            },
            (false, true) => Allocation::Zero {
                depth: 0,
                offset: Some(offset),
            },
            (false, false) => Allocation::Unknown { depth: 0 },
        };
        Ok(Extent {
            len: extent.len.clamp(len.min(1), len),
            allocation,
        })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        crate::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(&self.name, "writing data", offset, e))
    }

    /// Zeros as the storage writes them (an NBD export's WRITE_ZEROES).
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = unmap;
        if !self.writable {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        crate::check_range(&self.name, offset, len, self.size)?;
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io(&self.name, "writing zeros", offset, e))
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }
}
