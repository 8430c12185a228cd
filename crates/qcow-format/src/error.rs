//! The error type of the format layer.

use thiserror::Error;

/// Why bytes read from an image are not a valid image.
///
/// Each variant names the structure and carries the offending value, so that
/// a message can say exactly what is wrong with which field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{structure} is truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// The structure being parsed.
        structure: &'static str,
        /// Bytes the structure needs.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The LUKS header of an encrypted image is damaged.
    #[error("{0}")]
    Luks(crate::luks::LuksProblem),
    /// The magic number is not `QFI\xfb`.
    #[error("bad magic {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// The magic found.
        found: u32,
        /// The magic expected.
        expected: u32,
    },
    /// The header's version is not one this parser reads.
    #[error("unsupported qcow version {0}")]
    UnsupportedVersion(u32),
    /// `cluster_bits` is outside 9..=21 (or the v1 equivalent).
    #[error("cluster_bits {0} is outside {min}..={max}", min = crate::limits::MIN_CLUSTER_BITS, max = crate::limits::MAX_CLUSTER_BITS)]
    ClusterBits(u32),
    /// qcow v1 `l2_bits` is out of range for its cluster size.
    #[error("l2_bits {l2_bits} is invalid for cluster_bits {cluster_bits}")]
    L2Bits {
        /// The header's `l2_bits`.
        l2_bits: u32,
        /// The header's `cluster_bits`.
        cluster_bits: u32,
    },
    /// The virtual size is larger than we accept.
    #[error("virtual size {0} exceeds the maximum {max}", max = crate::limits::MAX_VIRTUAL_SIZE)]
    VirtualSize(u64),
    /// A v3 header's `header_length` is too small or too large.
    #[error(
        "header_length {length} is invalid (must be between {min} and the cluster size {cluster_size})"
    )]
    HeaderLength {
        /// The header's `header_length`.
        length: u32,
        /// The smallest allowed value.
        min: u32,
        /// The cluster size.
        cluster_size: u64,
    },
    /// `refcount_order` is above 6 (64-bit refcounts).
    #[error("refcount_order {0} is above 6")]
    RefcountOrder(u32),
    /// The compression type is neither zlib (0) nor zstd (1).
    #[error("compression type {0} is unknown (0 is zlib, 1 is zstd)")]
    CompressionType(u8),
    /// The compression-type incompatible bit disagrees with the compression
    /// type: it must be set exactly when the type is not zlib.
    #[error(
        "compression type {compression_type} does not match the compression-type feature bit (set: {bit_set})"
    )]
    CompressionTypeBit {
        /// The header's compression type.
        compression_type: u8,
        /// Whether the incompatible bit is set.
        bit_set: bool,
    },
    /// The image has no refcount table.
    #[error("the image has no refcount table (refcount_table_clusters is 0)")]
    NoRefcountTable,
    /// Incompatible feature bits this implementation does not know.
    #[error("unknown incompatible feature bits {bits:#x}{}", names_suffix(names))]
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Their names from the feature-name table, where present, in the
        /// table's order.
        names: Vec<String>,
        /// The bits among them the table does not name.
        unnamed: u64,
    },
    /// A metadata structure's offset is not cluster-aligned.
    #[error("{structure} offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    Misaligned {
        /// The structure.
        structure: &'static str,
        /// Its offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A table would need more memory than the bound allows.
    #[error("{structure} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The structure.
        structure: &'static str,
        /// The size it claims, in bytes (or entries where the name says so).
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// A table ends past the end of the file.
    #[error(
        "{structure} at {offset:#x} ({size} bytes) ends past the end of the file ({file_len} bytes)"
    )]
    PastEnd {
        /// The structure.
        structure: &'static str,
        /// Its offset.
        offset: u64,
        /// Its size in bytes.
        size: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two metadata structures overlap.
    #[error("{first} at {first_offset:#x} overlaps {second} at {second_offset:#x}")]
    Overlap {
        /// The first structure.
        first: &'static str,
        /// Its offset.
        first_offset: u64,
        /// The second structure.
        second: &'static str,
        /// Its offset.
        second_offset: u64,
    },
    /// The L1 table is too small for the virtual size.
    #[error("l1_size {l1_size} is too small for virtual size {virtual_size} (needs {needed})")]
    L1TooSmall {
        /// The header's `l1_size`.
        l1_size: u32,
        /// The virtual size.
        virtual_size: u64,
        /// Entries needed.
        needed: u64,
    },
    /// The backing file name is too long or does not fit in the header cluster.
    #[error(
        "backing file name at {offset:#x} of {size} bytes is too long or outside the header cluster"
    )]
    BackingName {
        /// The name's offset.
        offset: u64,
        /// Its claimed size.
        size: u32,
    },
    /// A name stored in the image is not UTF-8.
    #[error("{structure} is not valid UTF-8")]
    NotUtf8 {
        /// The structure holding the name.
        structure: &'static str,
    },
    /// A header extension runs past the area that holds extensions.
    #[error("header extension {kind:#010x} at {offset:#x} with length {length} runs past {end:#x}")]
    ExtensionPastEnd {
        /// The extension type.
        kind: u32,
        /// The offset of its header.
        offset: u64,
        /// Its claimed data length.
        length: u32,
        /// The end of the extension area.
        end: u64,
    },
    /// A known header extension has a length its type does not allow.
    #[error("{extension} header extension: {reason}")]
    Extension {
        /// Which extension.
        extension: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A header extension's length does not fit its type.
    #[error("header extension {kind:#010x} has invalid length {length}")]
    ExtensionLength {
        /// The extension type.
        kind: u32,
        /// Its length.
        length: u32,
    },
    /// Too many snapshots.
    #[error("{count} snapshots exceed the limit of {limit}")]
    TooManySnapshots {
        /// The count in the header.
        count: u32,
        /// The bound.
        limit: u32,
    },
    /// The snapshot table is longer than the bound (QEMU's 64 MiB).
    #[error(
        "snapshot table of {size} bytes exceeds the limit of {limit} bytes ({overhanging} snapshots do not fit)"
    )]
    SnapshotTableTooBig {
        /// Its length up to the first entry that does not fit.
        size: u64,
        /// The bound.
        limit: u64,
        /// Entries from the first that does not fit to the end.
        overhanging: u32,
    },
    /// A snapshot table entry is malformed.
    #[error("snapshot entry {index}: {reason}")]
    Snapshot {
        /// Index of the entry in the table.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A bitmap directory entry is malformed.
    #[error("bitmap directory entry {index}: {reason}")]
    Bitmap {
        /// Index of the entry in the directory.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A table entry holds an invalid value.
    #[error("{table} entry {index} is invalid: {entry:#018x} ({reason})")]
    BadEntry {
        /// The table.
        table: &'static str,
        /// Index within its table.
        index: u64,
        /// The raw entry.
        entry: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

fn names_suffix(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}
