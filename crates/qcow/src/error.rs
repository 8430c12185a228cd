//! The engine's error type.

use std::io;
use std::path::PathBuf;

use qcow_format::FormatError;
use thiserror::Error;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an engine operation failed. Every variant names the image it concerns.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened.
    #[error("Could not open '{}'", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Another process (QEMU or qcow) uses the file in a way that excludes
    /// this use, as QEMU's locks say.
    #[error(
        "{}{conflict}\nIs another process using the image [{}]?",
        if *creating { format!("{}: ", path.display()) } else { format!("Could not open '{}': ", path.display()) },
        path.display()
    )]
    Locked {
        /// The file.
        path: PathBuf,
        /// Which permission is in conflict.
        conflict: qcow_io::LockError,
        /// Whether the file was being created (nothing was changed).
        creating: bool,
    },
    /// An I/O operation on an image failed.
    #[error("{image}: {op} at offset {offset:#x} failed")]
    Io {
        /// The image.
        image: String,
        /// What was being done.
        op: &'static str,
        /// Where.
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image's metadata is malformed.
    #[error("{image}")]
    Format {
        /// The image.
        image: String,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// The image is encrypted, which is not supported yet.
    #[error("{image}: encrypted images are not supported (encryption method: {method})")]
    Encrypted {
        /// The image.
        image: String,
        /// The method's name.
        method: String,
    },
    /// An encrypted image cannot be unlocked or used: no key or a wrong
    /// one, an algorithm this engine lacks, a damaged LUKS header.
    #[error("{image}: {source}")]
    Crypto {
        /// The image.
        image: String,
        /// What is wrong.
        #[source]
        source: crate::crypto::CryptoError,
    },
    /// The file has the qcow magic but a version this engine does not know.
    #[error("{image}: unsupported qcow version {version}")]
    UnsupportedVersion {
        /// The image.
        image: String,
        /// Its version.
        version: u32,
    },
    /// A metadata table points somewhere it must not.
    #[error("{image}: {table} at {offset:#x} is invalid: {reason}")]
    Corrupt {
        /// The image.
        image: String,
        /// Which table.
        table: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot's L1 table cannot be used (checked when the snapshot is
    /// used, as QEMU checks it): the rest of the image is unaffected.
    #[error("{image}: the L1 table of snapshot {id} at {offset:#x}: {problem}")]
    SnapshotL1 {
        /// The image.
        image: String,
        /// The snapshot's ID.
        id: String,
        /// The table's offset in the file.
        offset: u64,
        /// What is wrong.
        problem: SnapshotL1Problem,
    },
    /// Clusters about to be written hold live metadata: the image's
    /// refcounts are wrong. Nothing was written; the corrupt bit is set.
    #[error(
        "{image}: refusing to write {what} at {at:#x}: it would overwrite the {structure} at {offset:#x} (the refcounts are corrupt; the image is marked corrupt)"
    )]
    MetadataOverlap {
        /// The image.
        image: String,
        /// What was about to be written.
        what: &'static str,
        /// Where.
        at: u64,
        /// The metadata structure found there.
        structure: &'static str,
        /// Where that structure starts.
        offset: u64,
    },
    /// A compressed cluster could not be decompressed.
    #[error(
        "{image}: compressed cluster at host offset {host:#x} ({len} bytes) is corrupt: {reason}"
    )]
    Decompress {
        /// The image.
        image: String,
        /// Host offset of the compressed data.
        host: u64,
        /// Its length.
        len: u64,
        /// What the decoder said.
        reason: String,
    },
    /// A read or write beyond the virtual disk.
    #[error("{image}: range {offset:#x}+{len:#x} is beyond the disk size {size:#x}")]
    OutOfRange {
        /// The image.
        image: String,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The virtual size.
        size: u64,
    },
    /// The image names a backing file whose format it does not say.
    #[error(
        "{image}: backing file {backing} has no format recorded; name one (e.g. raw or qcow2) to open it"
    )]
    BackingFormatUnknown {
        /// The image.
        image: String,
        /// The backing file's name.
        backing: String,
    },
    /// A format name the engine does not know.
    #[error("unknown image format {0:?}")]
    UnknownFormat(String),
    /// The backing chain refers back to an image already in it.
    #[error("{image}: backing chain loops back to {backing}")]
    BackingLoop {
        /// The image naming the backing file.
        image: String,
        /// The file it names.
        backing: String,
    },
    /// The backing chain is deeper than allowed.
    #[error("{image}: backing chain is deeper than {limit}")]
    BackingTooDeep {
        /// The image at the limit.
        image: String,
        /// The limit.
        limit: usize,
    },
    /// The image needs a file it names, which the open options did not allow.
    #[error(
        "{image}: needs {what} {name}, which was not opened (the open options do not allow it)"
    )]
    NotOpened {
        /// The image.
        image: String,
        /// What kind of file (backing file, external data file).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// No snapshot with this name or ID.
    #[error("{image}: no snapshot named {name:?}")]
    SnapshotNotFound {
        /// The image.
        image: String,
        /// The name or ID asked for.
        name: String,
    },
    /// The operation or image feature is not supported yet.
    #[error("{image}: {what} is not supported yet")]
    Unsupported {
        /// The image.
        image: String,
        /// What is not supported.
        what: String,
    },
    /// The image's corrupt bit is set: it may be read but not written.
    #[error("{image}: the image is marked corrupt; repair it before writing")]
    MarkedCorrupt {
        /// The image.
        image: String,
    },
    /// A refcount would exceed the image's refcount width.
    #[error("{image}: refcount of cluster {cluster:#x} would exceed {max}")]
    RefcountOverflow {
        /// The image.
        image: String,
        /// Host offset of the cluster.
        cluster: u64,
        /// The largest refcount the image can hold.
        max: u64,
    },
    /// The image cannot grow any further: a format limit (the largest
    /// refcount table, the largest host offset an entry can hold) was hit.
    #[error("{image}: no room left: {what} would exceed {limit:#x}")]
    NoSpace {
        /// The image.
        image: String,
        /// What would have grown past its limit.
        what: &'static str,
        /// The limit, in bytes.
        limit: u64,
    },
    /// Invalid creation options.
    #[error("{0}")]
    InvalidOptions(String),
    /// A persistent bitmap operation was refused (`reason` in QEMU's
    /// words: a missing or inconsistent bitmap, a name or granularity
    /// QEMU would not take).
    #[error("{image}: {reason}")]
    Bitmap {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// The image was opened read-only.
    #[error("{image}: image is read-only")]
    ReadOnly {
        /// The image.
        image: String,
    },
    /// The caller cancelled the operation (see
    /// [`crate::copy::CopyObserver::cancelled`]).
    #[error("cancelled")]
    Cancelled,
}

/// What kind of failure an [`Error`] is, for callers that act on the kind
/// rather than the details (see [`Error::kind`]). Kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be opened, read, written or flushed.
    Io,
    /// Another process holds a file in a way that excludes this use.
    Locked,
    /// The image's bytes are not a valid image (header, tables, entries).
    Malformed,
    /// The image's metadata is inconsistent, or it is marked corrupt:
    /// `check -r` may repair it.
    Corrupt,
    /// Compressed data could not be decompressed.
    Decompress,
    /// The image uses something the engine does not do (a version,
    /// encryption, a feature not written yet).
    Unsupported,
    /// A file the image names is missing, not allowed to be opened, loops
    /// or nests too deep.
    Chain,
    /// A request or option the caller gave is invalid (a range past the
    /// disk, options that cannot go together, a missing snapshot).
    InvalidInput,
    /// A format limit was reached (refcount width, table sizes, offsets).
    Limit,
    /// The image was opened read-only.
    ReadOnly,
    /// The caller cancelled the operation.
    Cancelled,
    /// An encrypted image's password is missing or wrong.
    Key,
}

/// What is wrong with a snapshot's L1 table ([`Error::SnapshotL1`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotL1Problem {
    /// More entries than an L1 table may have.
    #[error("Snapshot L1 table too large")]
    TooLarge,
    /// Not on a cluster boundary.
    #[error("Snapshot L1 table offset invalid")]
    OffsetInvalid,
    /// Runs past the end of the file.
    #[error("Snapshot L1 table runs past the end of the file")]
    PastEnd,
}

impl SnapshotL1Problem {
    /// The system error QEMU reports for it (`File too large` for a table
    /// too large, else `Invalid argument`).
    pub fn errno_words(self) -> &'static str {
        match self {
            SnapshotL1Problem::TooLarge => "File too large",
            _ => "Invalid argument",
        }
    }
}

impl Error {
    /// The kind of failure, to match on without the details.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Open { .. } | Error::Io { .. } => ErrorKind::Io,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Format { .. } | Error::UnknownFormat(_) => ErrorKind::Malformed,
            Error::Corrupt { .. }
            | Error::SnapshotL1 { .. }
            | Error::MetadataOverlap { .. }
            | Error::MarkedCorrupt { .. } => ErrorKind::Corrupt,
            Error::Decompress { .. } => ErrorKind::Decompress,
            Error::Crypto { source, .. } => source.kind(),
            Error::Encrypted { .. }
            | Error::UnsupportedVersion { .. }
            | Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::BackingFormatUnknown { .. }
            | Error::BackingLoop { .. }
            | Error::BackingTooDeep { .. }
            | Error::NotOpened { .. } => ErrorKind::Chain,
            Error::OutOfRange { .. }
            | Error::SnapshotNotFound { .. }
            | Error::Bitmap { .. }
            | Error::InvalidOptions(_) => ErrorKind::InvalidInput,
            Error::RefcountOverflow { .. } | Error::NoSpace { .. } => ErrorKind::Limit,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::Cancelled => ErrorKind::Cancelled,
        }
    }

    pub(crate) fn io(image: &str, op: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            image: image.to_owned(),
            op,
            offset,
            source,
        }
    }

    /// An I/O error from a metadata cache: at the offset of the table
    /// whose write-back failed when the cache says which, else `offset`.
    pub(crate) fn cache_io(image: &str, op: &'static str, offset: u64, source: io::Error) -> Self {
        let offset = qcow_cache::failed_offset(&source).unwrap_or(offset);
        Self::io(image, op, offset, source)
    }

    pub(crate) fn format(image: &str, source: FormatError) -> Self {
        Error::Format {
            image: image.to_owned(),
            source,
        }
    }
}
