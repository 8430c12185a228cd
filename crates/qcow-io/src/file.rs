//! A [`Storage`] over a file, with positional `pread`/`pwrite`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::{LockError, Perms, lock_file, unlock_file};
use crate::{Storage, StorageExtent};

/// A file used as storage. Positional I/O keeps no cursor, so one
/// `FileStorage` serves many threads at once.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
    /// Whether `flush` reaches stable storage (`false`: qemu-img's
    /// `cache=unsafe`, for scratch outputs).
    durable: bool,
    /// Whether QEMU's lock bytes were taken through this file.
    locked: AtomicBool,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileStorage {
            file,
            writable,
            durable: true,
            locked: AtomicBool::new(false),
        })
    }

    /// Creates (or truncates) a file for reading and writing, locked as
    /// QEMU locks a file it creates ([`Perms::creator`]): a file another
    /// QEMU or qcow process uses is refused before it is truncated.
    ///
    /// The file is truncated through one handle and written through a
    /// second: file systems such as ext4 flush a file that was truncated to
    /// zero and rewritten when the truncating handle closes (to protect
    /// replace-by-truncate patterns), which would stall the close of a
    /// freshly written multi-GiB output.
    pub fn create(path: &Path) -> Result<Self, CreateError> {
        Self::create_with(path, true)
    }

    /// [`FileStorage::create`], with QEMU's locking (`lock`) or without.
    pub fn create_with(path: &Path, lock: bool) -> Result<Self, CreateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(CreateError::Io)?;
        if lock {
            let (perm, shared) = Perms::creator();
            lock_file(&file, perm, shared).map_err(CreateError::Lock)?;
        }
        let locked = AtomicBool::new(lock);
        // Devices (and /dev/null) cannot be truncated and keep their size.
        if file.metadata().map_err(CreateError::Io)?.is_file() {
            // A second description of the very file locked above (not of
            // whatever the path names by now); without /proc, the locked
            // handle itself.
            use std::os::fd::AsRawFd;
            let same_file = format!("/proc/self/fd/{}", file.as_raw_fd());
            match OpenOptions::new().write(true).open(same_file) {
                Ok(second) => second.set_len(0),
                Err(_) => file.set_len(0),
            }
            .map_err(CreateError::Io)?;
        }
        Ok(FileStorage {
            file,
            writable: true,
            durable: true,
            locked,
        })
    }

    /// Takes QEMU's locks on the file for a user holding `perm` that lets
    /// others hold `shared` (see [`lock_file`]), replacing any it held.
    pub fn lock(&self, perm: Perms, shared: Perms) -> Result<(), LockError> {
        self.locked.store(true, Ordering::Release);
        lock_file(&self.file, perm, shared)
    }

    /// Wraps an open file.
    pub fn from_file(file: File, writable: bool) -> Self {
        FileStorage {
            file,
            writable,
            durable: true,
            locked: AtomicBool::new(false),
        }
    }

    /// Makes `flush` a no-op, as qemu-img's `cache=unsafe` does for convert
    /// outputs: data reaches the page cache, and the disk when the system
    /// writes it back. For files whose loss on a crash does not matter.
    pub fn without_sync(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // End of file: the rest reads as zero.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // write_all_at loops on short writes and EINTR.
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        if self.durable {
            self.file.sync_all()
        } else {
            Ok(())
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        fallocate(&self.file, FallocateFlags::empty(), offset, len).map_err(io::Error::from)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    /// Finds holes with `SEEK_DATA`/`SEEK_HOLE`. The file position moves,
    /// which nothing here depends on (all I/O is positional).
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        use rustix::fs::{SeekFrom, seek};
        let all_data = StorageExtent { data: true, len };
        if len == 0 {
            return Ok(all_data);
        }
        let data_start = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // Past the last data: a hole to the end.
            Err(rustix::io::Errno::NXIO) => u64::MAX,
            // The file system cannot tell: call it all data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(all_data),
            Err(e) => return Err(e.into()),
        };
        if data_start > offset {
            return Ok(StorageExtent {
                data: false,
                len: (data_start - offset).min(len),
            });
        }
        let hole_start = match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => u64::MAX,
            Err(e) => return Err(e.into()),
        };
        Ok(StorageExtent {
            data: true,
            len: hole_start.saturating_sub(offset).clamp(1, len),
        })
    }
}

impl Drop for FileStorage {
    /// Releases QEMU's lock bytes explicitly: a child process forked
    /// meanwhile may share this open file description until it execs, and
    /// would otherwise keep the locks alive after this file is closed.
    fn drop(&mut self) {
        if self.locked.load(Ordering::Acquire) {
            let _ = unlock_file(&self.file);
        }
    }
}

/// Why [`FileStorage::create`] failed.
#[derive(Debug)]
pub enum CreateError {
    /// The file could not be opened or truncated.
    Io(io::Error),
    /// Another user holds the file (nothing was changed).
    Lock(LockError),
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Io(e) => e.fmt(f),
            CreateError::Lock(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CreateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CreateError::Io(e) => Some(e),
            CreateError::Lock(e) => Some(e),
        }
    }
}

impl From<CreateError> for io::Error {
    fn from(e: CreateError) -> io::Error {
        match e {
            CreateError::Io(e) => e,
            CreateError::Lock(e) => io::Error::new(io::ErrorKind::WouldBlock, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_as_zero_and_writes_positionally() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let s = FileStorage::create(&path)?;
        s.write_at(b"hello", 10)?;
        assert_eq!(s.len()?, 15);
        let mut buf = [0xffu8; 20];
        s.read_at(&mut buf, 5)?;
        assert_eq!(&buf[..5], &[0; 5]);
        assert_eq!(&buf[5..10], b"hello");
        assert_eq!(&buf[10..], &[0; 10]);
        s.set_len(12)?;
        assert_eq!(s.len()?, 12);
        s.write_zeroes(10, 2)?;
        s.read_at(&mut buf[..2], 10)?;
        assert_eq!(&buf[..2], &[0, 0]);
        s.flush()?;
        drop(s);
        let ro = FileStorage::open(&path, false)?;
        assert!(ro.write_at(b"x", 0).is_err());
        Ok(())
    }

    #[test]
    fn extents_report_holes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = FileStorage::create(&dir.path().join("sparse"))?;
        s.set_len(4 << 20)?;
        s.write_at(&[1u8; 4096], 2 << 20)?;
        let first = s.extent(0, 4 << 20)?;
        // File systems without hole reporting call it all data.
        if !first.data {
            assert_eq!(first.len, 2 << 20);
            let data = s.extent(2 << 20, 2 << 20)?;
            assert!(data.data);
            assert!(data.len >= 4096 && data.len < 2 << 20);
            assert!(!s.extent((2 << 20) + data.len, 1 << 20)?.data);
        }
        assert_eq!(s.extent(0, 0)?.len, 0);
        Ok(())
    }

    #[test]
    fn shared_across_threads() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = std::sync::Arc::new(FileStorage::create(&dir.path().join("f"))?);
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.write_at(&[i; 100], u64::from(i) * 100))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| io::Error::other("thread panicked"))??;
        }
        let mut buf = [0u8; 400];
        s.read_at(&mut buf, 0)?;
        for i in 0..4usize {
            assert!(buf[i * 100..(i + 1) * 100].iter().all(|&b| b == i as u8));
        }
        Ok(())
    }
}
