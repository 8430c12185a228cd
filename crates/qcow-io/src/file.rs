//! A [`Storage`] over a file, with positional `pread`/`pwrite`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// The last data or hole run the file system reported.
    extents: ExtentCache,
}

/// Remembers the last run `SEEK_DATA`/`SEEK_HOLE` found, so that asking
/// about each chunk of a long run does not seek again: each `SEEK_HOLE`
/// scans from the chunk to the end of the run, which on tmpfs walks the
/// page cache, so a fully written 1 GiB file asked about 4 MiB at a time
/// cost a second of system time. Any change through this `FileStorage`
/// forgets the run. Changes by other processes are not seen until then;
/// QEMU's locks keep writers away unless the user shares the file.
#[derive(Debug, Default)]
struct ExtentCache {
    /// Bumped after every change to the file through this handle.
    generation: AtomicU64,
    /// The last run, with the generation it was found in.
    last: Mutex<Option<(Run, u64)>>,
}

/// A run of a file: `start..end`, data or hole.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    end: u64,
    data: bool,
}

impl ExtentCache {
    /// The remembered run holding `offset`, if it is still current.
    fn lookup(&self, offset: u64) -> Option<Run> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (run, generation) = last?;
        (generation == self.generation.load(Ordering::Acquire)
            && (run.start..run.end).contains(&offset))
        .then_some(run)
    }

    /// The generation to pass to [`ExtentCache::remember`] for a run about
    /// to be looked up.
    fn current(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Remembers `run`, found in `generation`, unless the file changed since.
    fn remember(&self, run: Run, generation: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if generation == self.generation.load(Ordering::Acquire) {
            *last = Some((run, generation));
        }
    }

    /// Forgets any run: the file changed.
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
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
            extents: ExtentCache::default(),
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
            extents: ExtentCache::default(),
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
            extents: ExtentCache::default(),
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
        let written = self.file.write_all_at(buf, offset);
        self.extents.invalidate();
        written
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let done = self.file.set_len(len);
        self.extents.invalidate();
        done
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
        let done = fallocate(&self.file, FallocateFlags::empty(), offset, len);
        self.extents.invalidate();
        done.map_err(io::Error::from)
    }

    /// Punches a hole (`FALLOC_FL_PUNCH_HOLE`, the length kept). A file
    /// system that cannot punch holes keeps the bytes: a discard is
    /// advice.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let done = fallocate(&self.file, flags, offset, len);
        self.extents.invalidate();
        match done {
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    /// Finds holes with `SEEK_DATA`/`SEEK_HOLE`, remembering the last run
    /// found until the file changes through this handle. The file position
    /// moves, which nothing here depends on (all I/O is positional).
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        let all_data = StorageExtent::data(len);
        if len == 0 {
            return Ok(all_data);
        }
        let run = match self.extents.lookup(offset) {
            Some(run) => run,
            None => {
                let generation = self.extents.current();
                let Some(run) = self.seek_run(offset)? else {
                    return Ok(all_data);
                };
                self.extents.remember(run, generation);
                run
            }
        };
        Ok(StorageExtent {
            data: run.data,
            zero: !run.data,
            len: run.end.saturating_sub(offset).clamp(1, len),
        })
    }
}

impl FileStorage {
    /// Asks the file system for the data or hole run starting at `offset`
    /// (`None`: it cannot tell).
    fn seek_run(&self, offset: u64) -> io::Result<Option<Run>> {
        use rustix::fs::{SeekFrom, seek};
        let data_start = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // Past the last data: a hole to the end.
            Err(rustix::io::Errno::NXIO) => u64::MAX,
            // The file system cannot tell: call it all data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data_start > offset {
            return Ok(Some(Run {
                start: offset,
                end: data_start,
                data: false,
            }));
        }
        let hole_start = match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => u64::MAX,
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Run {
            start: offset,
            end: hole_start.max(offset.saturating_add(1)),
            data: true,
        }))
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
    fn remembered_runs_are_forgotten_on_writes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = FileStorage::create(&dir.path().join("sparse"))?;
        s.set_len(8 << 20)?;
        let before = s.extent(1 << 20, 1 << 20)?;
        // File systems without hole reporting call it all data.
        if !before.data {
            // The run is remembered: asking again further in agrees.
            assert!(!s.extent(2 << 20, 1 << 20)?.data);
            s.write_at(&[7u8; 4096], 3 << 20)?;
            let data = s.extent(3 << 20, 1 << 20)?;
            assert!(data.data, "a write into a remembered hole reads as data");
            assert!(!s.extent(2 << 20, 4 << 20)?.data);
            assert_eq!(s.extent(2 << 20, 4 << 20)?.len, 1 << 20);
            s.set_len(0)?;
            s.set_len(8 << 20)?;
            assert!(!s.extent(3 << 20, 1 << 20)?.data, "truncated away");
        }
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
