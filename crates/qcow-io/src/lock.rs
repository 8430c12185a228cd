//! QEMU's image locking protocol, so that qcow and QEMU processes exclude
//! each other as two QEMU processes do.
//!
//! QEMU takes open file description (OFD) read locks on single bytes of an
//! image file. For every permission a user holds (read, write, ...), it
//! locks byte [`PERM_BASE`]` + bit`; for every permission it will not let
//! others hold, byte [`SHARED_BASE`]` + bit`. A new user first takes its own
//! bytes, then tests the other side: each permission it wants must not be
//! unshared by anybody (its "shared" byte unlocked by others), and each
//! permission it unshares must not be held by anybody (its "perm" byte
//! unlocked by others). Locks of the same open file description never
//! conflict with each other, so the test sees only other users.
//!
//! OFD locks belong to the open file description: they are released when
//! the last descriptor of it closes, whatever process holds it. They exist
//! on Linux; elsewhere locking does nothing.

use std::fmt;
use std::fs::File;
use std::io;

/// First byte of the "permission held" range.
pub const PERM_BASE: u64 = 100;
/// First byte of the "permission not shared" range.
pub const SHARED_BASE: u64 = 200;

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reading, with the guarantee that the contents are self-consistent.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// Changing the contents.
    pub const WRITE: Perms = Perms(1 << 1);
    /// Writes that do not change what the contents read as.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// Changing the length.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission QEMU 10 knows.
    pub const ALL: Perms = Perms(0b1111);

    /// Number of permission bits.
    const COUNT: u32 = 4;

    /// The permissions of a user that only reads a file and lets nobody
    /// change it meanwhile (QEMU's read-only qcow2 nodes and backing files,
    /// the sources of qemu-img's convert and dd).
    pub const fn reader() -> (Perms, Perms) {
        (
            Perms::CONSISTENT_READ,
            Perms(Perms::ALL.0 & !(Perms::WRITE.0 | Perms::RESIZE.0)),
        )
    }

    /// The permissions of a user that only reads and lets others do
    /// anything (qemu-img's `-U`, force-share).
    pub const fn shared_reader() -> (Perms, Perms) {
        (Perms::CONSISTENT_READ, Perms::ALL)
    }

    /// The permissions of a user that reads, writes and resizes a file and
    /// lets others only read it (QEMU's writable qcow2 nodes).
    pub const fn writer() -> (Perms, Perms) {
        (
            Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
            Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE_UNCHANGED.0),
        )
    }

    /// The permissions of a user that reads, writes and resizes a raw
    /// file: QEMU's raw format lets others do anything meanwhile.
    pub const fn raw_writer() -> (Perms, Perms) {
        (
            Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
            Perms::ALL,
        )
    }

    /// The permissions of a user of an external data file: like an image,
    /// but resizing is never shared (QEMU's qcow2 data file children).
    pub const fn data_file(writable: bool) -> (Perms, Perms) {
        if writable {
            (
                Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
                Perms(Perms::ALL.0 & !Perms::RESIZE.0),
            )
        } else {
            (
                Perms::CONSISTENT_READ,
                Perms(Perms::ALL.0 & !Perms::RESIZE.0),
            )
        }
    }

    /// The permissions QEMU takes on a file it is about to create or
    /// truncate: write and resize, and nobody else may resize it.
    pub const fn creator() -> (Perms, Perms) {
        (
            Perms(Perms::WRITE.0 | Perms::RESIZE.0),
            Perms(Perms::ALL.0 & !Perms::RESIZE.0),
        )
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The single permissions in this set, lowest bit first.
    fn bits(self) -> impl Iterator<Item = (u32, Perms)> {
        (0..Perms::COUNT)
            .map(|bit| (bit, Perms(1 << bit)))
            .filter(move |(_, p)| self.contains(*p))
    }

    /// The permission's name as QEMU prints it in lock errors.
    pub fn name(self) -> &'static str {
        match self {
            Perms::CONSISTENT_READ => "consistent read",
            Perms::WRITE => "write",
            Perms::WRITE_UNCHANGED => "write unchanged",
            Perms::RESIZE => "resize",
            _ => "permissions",
        }
    }
}

/// Why a file could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another user holds a permission this one refuses to share, or
    /// refuses to share one this one wants.
    Conflict {
        /// The permission in conflict.
        perm: Perms,
        /// `true`: this user refuses to share `perm` and somebody holds it
        /// (QEMU: `Failed to get shared "write" lock`); `false`: this user
        /// wants `perm` and somebody refuses to share it.
        shared: bool,
    },
    /// The lock call itself failed.
    Io(io::Error),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Conflict { perm, shared } => {
                let shared = if *shared { "shared " } else { "" };
                write!(f, "Failed to get {shared}\"{}\" lock", perm.name())
            }
            LockError::Io(e) => write!(f, "Failed to lock byte range: {e}"),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Io(e) => Some(e),
            LockError::Conflict { .. } => None,
        }
    }
}

/// Takes QEMU's locks on `file` for a user that holds `perm` and lets
/// others hold `shared`, then checks that no other user conflicts. On a
/// conflict the bytes just taken are released again and the file is left
/// as it was.
///
/// The locks last as long as the open file description (until every
/// descriptor of `file` is closed). Calling this again on the same file
/// replaces the permissions. File systems that do not support OFD locks
/// are not locked (as QEMU's `locking=auto` does).
pub fn lock_file(file: &File, perm: Perms, shared: Perms) -> Result<(), LockError> {
    let unshared = Perms(Perms::ALL.0 & !shared.0);
    match apply(file, perm, unshared) {
        Ok(()) => {}
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) => return Err(LockError::Io(e)),
    }
    if let Err(e) = check(file, perm, unshared) {
        // Give back what was taken; the conflict is the error to report.
        let _ = apply(file, Perms::NONE, Perms::NONE);
        return Err(e);
    }
    Ok(())
}

/// Releases every lock byte of QEMU's protocol held through `file`.
pub fn unlock_file(file: &File) -> io::Result<()> {
    match apply(file, Perms::NONE, Perms::NONE) {
        Err(e) if !unsupported(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Locks byte `PERM_BASE + bit` for each permission held and `SHARED_BASE
/// + bit` for each one not shared, and unlocks the others.
fn apply(file: &File, perm: Perms, unshared: Perms) -> io::Result<()> {
    for bit in 0..Perms::COUNT {
        let p = Perms(1 << bit);
        sys::set(file, PERM_BASE + u64::from(bit), perm.contains(p))?;
        sys::set(file, SHARED_BASE + u64::from(bit), unshared.contains(p))?;
    }
    Ok(())
}

/// Tests the other users' bytes as QEMU's `raw_check_lock_bytes` does.
fn check(file: &File, perm: Perms, unshared: Perms) -> Result<(), LockError> {
    for (bit, p) in perm.bits() {
        if sys::taken_by_others(file, SHARED_BASE + u64::from(bit)).map_err(LockError::Io)? {
            return Err(LockError::Conflict {
                perm: p,
                shared: false,
            });
        }
    }
    for (bit, p) in unshared.bits() {
        if sys::taken_by_others(file, PERM_BASE + u64::from(bit)).map_err(LockError::Io)? {
            return Err(LockError::Conflict {
                perm: p,
                shared: true,
            });
        }
    }
    Ok(())
}

/// Errors that mean "this file system has no OFD locks".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == libc::ENOTSUP || code == libc::ENOLCK || code == libc::EINVAL
    )
}

#[cfg(target_os = "linux")]
mod sys {
    //! OFD byte locks through `fcntl`.

    use std::fs::File;
    use std::io;

    use nix::fcntl::{FcntlArg, fcntl};

    fn request(kind: libc::c_int, byte: u64) -> io::Result<libc::flock> {
        let start = libc::off_t::try_from(byte).map_err(io::Error::other)?;
        // Lock kinds are small constants that fit the field.
        let kind = libc::c_short::try_from(kind).map_err(io::Error::other)?;
        Ok(libc::flock {
            l_type: kind,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: start,
            l_len: 1,
            l_pid: 0,
        })
    }

    /// Takes (`locked`) or releases a shared lock on one byte.
    pub(super) fn set(file: &File, byte: u64, locked: bool) -> io::Result<()> {
        let kind = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
        let lock = request(kind, byte)?;
        fcntl(file, FcntlArg::F_OFD_SETLK(&lock))?;
        Ok(())
    }

    /// Whether another open file description holds a lock on the byte
    /// (one an exclusive lock here would conflict with).
    pub(super) fn taken_by_others(file: &File, byte: u64) -> io::Result<bool> {
        let mut lock = request(libc::F_WRLCK, byte)?;
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut lock))?;
        Ok(i32::from(lock.l_type) != libc::F_UNLCK)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    //! No OFD locks on this system: nothing is locked.

    use std::fs::File;
    use std::io;

    pub(super) fn set(_file: &File, _byte: u64, _locked: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    pub(super) fn taken_by_others(_file: &File, _byte: u64) -> io::Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open")
    }

    #[test]
    fn writers_exclude_each_other_and_readers() -> Result<(), LockError> {
        let dir = tempfile::tempdir().map_err(LockError::Io)?;
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").map_err(LockError::Io)?;
        let (a, b, c) = (open(&path), open(&path), open(&path));
        let (perm, shared) = Perms::writer();
        lock_file(&a, perm, shared)?;
        match lock_file(&b, perm, shared) {
            Err(LockError::Conflict {
                perm: Perms::WRITE,
                shared: false,
            }) => {}
            other => panic!("second writer: {other:?}"),
        }
        let (rperm, rshared) = Perms::reader();
        let err = lock_file(&c, rperm, rshared).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("Failed to get shared \"write\" lock"));
        // -U readers share everything and get in.
        let (sperm, sshared) = Perms::shared_reader();
        lock_file(&c, sperm, sshared)?;
        // Once the writer is gone, a second writer gets in.
        drop(a);
        unlock_file(&c).map_err(LockError::Io)?;
        lock_file(&b, perm, shared)?;
        Ok(())
    }

    #[test]
    fn readers_share_and_the_same_description_never_conflicts() -> Result<(), LockError> {
        let dir = tempfile::tempdir().map_err(LockError::Io)?;
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").map_err(LockError::Io)?;
        let (a, b) = (open(&path), open(&path));
        let (perm, shared) = Perms::reader();
        lock_file(&a, perm, shared)?;
        lock_file(&b, perm, shared)?;
        // A writer cannot get in while readers refuse to share writes.
        let c = open(&path);
        let (wperm, wshared) = Perms::writer();
        assert!(lock_file(&c, wperm, wshared).is_err());
        // A failed attempt leaves nothing behind: once the readers are
        // gone the writer gets in, then upgrades its own locks freely.
        drop((a, b));
        lock_file(&c, wperm, wshared)?;
        lock_file(&c, perm, shared)?;
        Ok(())
    }
}
