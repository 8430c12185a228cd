//! A [`Storage`] for crash and error tests: it keeps every write in a log
//! with the flushes between them, so a test can rebuild what the disk would
//! hold after a crash at any point, and it can fail chosen writes or
//! flushes with an I/O error.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{MemStorage, Storage};

/// One operation in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedOp {
    /// A write of `data` at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// The storage was truncated or extended.
    SetLen(u64),
    /// A successful flush: everything before it is durable.
    Flush,
}

/// Storage that logs writes and flushes and injects I/O errors.
#[derive(Debug)]
pub struct FaultyStorage {
    current: MemStorage,
    log: Mutex<Vec<LoggedOp>>,
    writes: AtomicU64,
    flushes: AtomicU64,
    fail_write: AtomicU64,
    fail_flush: AtomicU64,
}

impl Default for FaultyStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultyStorage {
    /// An empty storage that fails nothing.
    pub fn new() -> Self {
        FaultyStorage {
            current: MemStorage::new(),
            log: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail_write: AtomicU64::new(u64::MAX),
            fail_flush: AtomicU64::new(u64::MAX),
        }
    }

    fn log(&self) -> MutexGuard<'_, Vec<LoggedOp>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes write number `n` (counting from 0, over the storage's life)
    /// and every later one fail.
    pub fn fail_writes_from(&self, n: u64) {
        self.fail_write.store(n, Ordering::SeqCst);
    }

    /// Makes flush number `n` and every later one fail.
    pub fn fail_flushes_from(&self, n: u64) {
        self.fail_flush.store(n, Ordering::SeqCst);
    }

    /// Stops injecting errors.
    pub fn heal(&self) {
        self.fail_writes_from(u64::MAX);
        self.fail_flushes_from(u64::MAX);
    }

    /// Writes so far (successful or not).
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// A copy of the operation log.
    pub fn ops(&self) -> Vec<LoggedOp> {
        self.log().clone()
    }

    /// The current contents, as a reader sees them now.
    pub fn contents(&self) -> Vec<u8> {
        self.current.to_bytes()
    }

    /// What the disk holds after a crash that kept the first `kept`
    /// operations of the log, with the next write torn after `torn` bytes
    /// if given. Keeping everything up to a flush and nothing after is the
    /// "drop every unflushed write" crash.
    pub fn crash_image(&self, kept: usize, torn: Option<usize>) -> Vec<u8> {
        let log = self.log();
        let mut disk = Vec::new();
        let apply = |disk: &mut Vec<u8>, op: &LoggedOp, limit: Option<usize>| match op {
            LoggedOp::Write { offset, data } => {
                let data = &data[..limit.unwrap_or(data.len()).min(data.len())];
                // Logged offsets come from writes that succeeded in memory.
                let start = *offset as usize;
                if disk.len() < start + data.len() {
                    disk.resize(start + data.len(), 0);
                }
                disk[start..start + data.len()].copy_from_slice(data);
            }
            LoggedOp::SetLen(len) => disk.resize(*len as usize, 0),
            LoggedOp::Flush => {}
        };
        for op in log.iter().take(kept) {
            apply(&mut disk, op, None);
        }
        if let (Some(bytes), Some(op)) = (torn, log.get(kept)) {
            apply(&mut disk, op, Some(bytes));
        }
        disk
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.current.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_write.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("injected failure of write {n}")));
        }
        let mut log = self.log();
        self.current.write_at(buf, offset)?;
        log.push(LoggedOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.current.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log();
        self.current.set_len(len)?;
        log.push(LoggedOp::SetLen(len));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let n = self.flushes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_flush.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("injected failure of flush {n}")));
        }
        self.log().push(LoggedOp::Flush);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_images_replay_prefixes_and_tear_writes() -> io::Result<()> {
        let s = FaultyStorage::new();
        s.write_at(b"aaaa", 0)?;
        s.flush()?;
        s.write_at(b"bbbb", 2)?;
        s.set_len(8)?;
        assert_eq!(s.crash_image(2, None), b"aaaa");
        assert_eq!(s.crash_image(2, Some(1)), b"aaba");
        assert_eq!(s.crash_image(4, None), b"aabbbb\0\0");
        assert_eq!(s.contents(), b"aabbbb\0\0");
        Ok(())
    }

    #[test]
    fn injected_failures_fail_and_heal() -> io::Result<()> {
        let s = FaultyStorage::new();
        s.fail_writes_from(1);
        s.write_at(b"x", 0)?;
        assert!(s.write_at(b"y", 1).is_err());
        s.fail_flushes_from(0);
        assert!(s.flush().is_err());
        s.heal();
        s.write_at(b"z", 1)?;
        s.flush()?;
        assert_eq!(s.contents(), b"xz");
        assert_eq!(s.ops().len(), 3);
        Ok(())
    }
}
