//! Positional storage for disk images.
//!
//! [`Storage`] is the one interface the engine does all its I/O through:
//! `&self` methods at explicit offsets, so one storage is shared by many
//! threads with no seek state. [`FileStorage`] wraps a file, [`MemStorage`]
//! a growable buffer, and [`FaultyStorage`] logs writes and flushes to
//! replay crashes and injects I/O errors in tests. This crate knows nothing
//! of qcow.

#![deny(missing_docs)]

mod fault;
mod file;
mod lock;
mod memory;
mod null;

use std::io;

pub use fault::{FaultyStorage, LoggedOp};
pub use file::{CreateError, FileStorage};
pub use lock::{LockError, PERM_BASE, Perms, SHARED_BASE, lock_file, unlock_file};
pub use memory::MemStorage;
pub use null::NullStorage;

/// Positional, thread-safe storage for an image file.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills all of `buf` from `offset`. Bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends the storage to `len` bytes (new bytes read as zero).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Says the range's contents are no longer needed. The range may read
    /// back as anything; the default does nothing.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Whether the bytes from `offset` hold data or are a hole, and for how
    /// many bytes (at most `len`, at least 1 when `len` is not 0). The
    /// default says everything is data.
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        let _ = offset;
        Ok(StorageExtent::data(len))
    }

    /// Reserves space for the range so that later writes to it cannot fail
    /// for lack of space (`posix_fallocate`). The default does nothing.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Bytes the storage really occupies (a sparse file's allocated
    /// blocks), when known. The default does not know.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Makes the range read as zeros. The default writes zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            // n <= CHUNK, which fits in usize.
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

/// A run of storage that is all data or all hole (reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageExtent {
    /// Whether the run holds data (`false`: a hole).
    pub data: bool,
    /// Whether the run reads as zeros (a file's holes do; an NBD export
    /// says so with its zero flag, for holes and data alike).
    pub zero: bool,
    /// Length of the run in bytes.
    pub len: u64,
}

impl StorageExtent {
    /// A run of data (not known to be zeros).
    pub fn data(len: u64) -> StorageExtent {
        StorageExtent {
            data: true,
            zero: false,
            len,
        }
    }

    /// A hole that reads as zeros.
    pub fn hole(len: u64) -> StorageExtent {
        StorageExtent {
            data: false,
            zero: true,
            len,
        }
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        (**self).extent(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        (**self).allocated_size()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
}
