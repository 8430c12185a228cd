//! A [`Storage`] of a fixed length that reads as zeros and keeps nothing
//! written to it, as QEMU's null block driver (`null-co`) behaves.

use std::io;

use crate::{Storage, StorageExtent};

/// Zeros of a fixed length; writes are taken and forgotten.
#[derive(Debug, Clone, Copy)]
pub struct NullStorage {
    len: u64,
}

impl NullStorage {
    /// A storage of `len` bytes.
    pub fn new(len: u64) -> Self {
        NullStorage { len }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the null storage",
            ));
        }
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the null storage has a fixed length",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// All of it is a hole: it holds nothing.
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        let _ = offset;
        Ok(StorageExtent::hole(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_forgets_writes_and_refuses_reads_past_its_end() {
        let null = NullStorage::new(4096);
        null.write_at(&[7; 512], 0).expect("write");
        let mut buf = [1u8; 512];
        null.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        assert!(null.read_at(&mut buf, 4000).is_err());
        assert!(!null.extent(0, 4096).expect("extent").data);
    }
}
