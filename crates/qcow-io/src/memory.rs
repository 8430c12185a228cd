//! A [`Storage`] in memory, for tests and scratch images.

use std::io;
use std::sync::{PoisonError, RwLock};

use crate::Storage;

/// A growable buffer used as storage.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn index(offset: u64) -> io::Result<usize> {
    usize::try_from(offset).map_err(|_| io::Error::other("offset beyond addressable memory"))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(PoisonError::into_inner);
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if let Some(avail) = bytes.get(start..) {
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = index(offset)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("write past addressable memory"))?;
        let mut bytes = self.bytes.write().unwrap_or_else(PoisonError::into_inner);
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self
            .bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = index(len)?;
        self.bytes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_write_and_reads_zero_past_end() -> io::Result<()> {
        let s = MemStorage::new();
        s.write_at(b"abc", 4)?;
        assert_eq!(s.to_bytes(), b"\0\0\0\0abc");
        let mut buf = [9u8; 6];
        s.read_at(&mut buf, 5)?;
        assert_eq!(&buf, b"bc\0\0\0\0");
        s.set_len(2)?;
        assert_eq!(s.len()?, 2);
        s.write_zeroes(0, 2)?;
        assert_eq!(s.to_bytes(), b"\0\0");
        Ok(())
    }
}
