//! The QCOW2 header, versions 2 and 3 ("Header" in the specification).
//!
//! [`RawHeaderV2`] and [`RawHeaderV3`] are the bytes as they sit at offset 0
//! of an image; [`Header::parse`] validates them, together with the header
//! extensions and the backing file name that follow, into a [`Header`] of
//! native values that the engine can trust.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::extension::{self, FeatureKind, HeaderExtension};
use crate::limits::{
    MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS,
    MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use crate::{FormatError, QCOW_MAGIC};

/// Incompatible feature bit 0: the refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible feature bit this implementation understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// Compatible feature bit 0: lazy refcounts are enabled.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear feature bit this implementation knows; a writer clears
/// the others (the specification's rule for autoclear bits).
pub const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without the compression type field.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header as QEMU writes it (with compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// The version 2 header: the first 72 bytes of every QCOW2 image.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV2 {
    /// `QFI\xfb`.
    pub magic: U32,
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name, or 0.
    pub backing_file_offset: U64,
    /// Length of the backing file name in bytes (no terminating NUL).
    pub backing_file_size: U32,
    /// log2 of the cluster size.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: U32,
    /// Number of entries in the active L1 table.
    pub l1_size: U32,
    /// Offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Number of clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Number of internal snapshots.
    pub nb_snapshots: U32,
    /// Offset of the snapshot table.
    pub snapshots_offset: U64,
}

/// The fields version 3 adds after the version 2 header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV3 {
    /// Incompatible feature bits.
    pub incompatible_features: U64,
    /// Compatible feature bits.
    pub compatible_features: U64,
    /// Autoclear feature bits.
    pub autoclear_features: U64,
    /// log2 of the refcount width in bits.
    pub refcount_order: U32,
    /// Length of the header structure.
    pub header_length: U32,
}

/// Byte offsets of the header fields an engine rewrites in place, derived
/// from the layout structs above (never typed twice).
pub mod field {
    use core::mem::offset_of;

    use super::{RawHeaderV2, RawHeaderV3, V2_HEADER_LEN};

    /// `cluster_bits` (4 bytes).
    pub const CLUSTER_BITS: u64 = offset_of!(RawHeaderV2, cluster_bits) as u64;
    /// The virtual disk size (`size`, 8 bytes).
    pub const SIZE: u64 = offset_of!(RawHeaderV2, size) as u64;
    /// `l1_size` (4 bytes), directly followed by `l1_table_offset`.
    pub const L1_SIZE: u64 = offset_of!(RawHeaderV2, l1_size) as u64;
    /// `l1_table_offset` (8 bytes).
    pub const L1_TABLE_OFFSET: u64 = offset_of!(RawHeaderV2, l1_table_offset) as u64;
    /// `refcount_table_offset` (8 bytes), directly followed by
    /// `refcount_table_clusters`.
    pub const REFCOUNT_TABLE_OFFSET: u64 = offset_of!(RawHeaderV2, refcount_table_offset) as u64;
    /// `refcount_table_clusters` (4 bytes).
    pub const REFCOUNT_TABLE_CLUSTERS: u64 =
        offset_of!(RawHeaderV2, refcount_table_clusters) as u64;
    /// `nb_snapshots` (4 bytes), directly followed by `snapshots_offset`.
    pub const NB_SNAPSHOTS: u64 = offset_of!(RawHeaderV2, nb_snapshots) as u64;
    /// `snapshots_offset` (8 bytes).
    pub const SNAPSHOTS_OFFSET: u64 = offset_of!(RawHeaderV2, snapshots_offset) as u64;
    /// The version 3 incompatible feature bits (8 bytes).
    pub const INCOMPATIBLE_FEATURES: u64 =
        V2_HEADER_LEN as u64 + offset_of!(RawHeaderV3, incompatible_features) as u64;
    /// The version 3 compatible feature bits (8 bytes).
    pub const COMPATIBLE_FEATURES: u64 =
        V2_HEADER_LEN as u64 + offset_of!(RawHeaderV3, compatible_features) as u64;
    /// The version 3 autoclear feature bits (8 bytes).
    pub const AUTOCLEAR_FEATURES: u64 =
        V2_HEADER_LEN as u64 + offset_of!(RawHeaderV3, autoclear_features) as u64;

    /// The version 3 header's length (4 bytes).
    pub const HEADER_LENGTH: u64 =
        V2_HEADER_LEN as u64 + offset_of!(RawHeaderV3, header_length) as u64;

    const _: () = assert!(L1_TABLE_OFFSET == L1_SIZE + 4);
    const _: () = assert!(REFCOUNT_TABLE_CLUSTERS == REFCOUNT_TABLE_OFFSET + 8);
    const _: () = assert!(SNAPSHOTS_OFFSET == NB_SNAPSHOTS + 4);
}

const _: () = assert!(size_of::<RawHeaderV2>() == V2_HEADER_LEN as usize);
const _: () = assert!(size_of::<RawHeaderV3>() == (V3_MIN_HEADER_LEN - V2_HEADER_LEN) as usize);

/// How the image's data is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Not encrypted.
    None,
    /// Legacy AES-CBC (`crypt_method` 1).
    Aes,
    /// LUKS (`crypt_method` 2).
    Luks,
    /// A method number the specification does not define.
    Unknown(u32),
}

impl Encryption {
    fn from_raw(method: u32) -> Self {
        match method {
            0 => Self::None,
            1 => Self::Aes,
            2 => Self::Luks,
            other => Self::Unknown(other),
        }
    }

    /// The method's name as qemu-img prints it.
    pub fn name(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Aes => "aes".into(),
            Self::Luks => "luks".into(),
            Self::Unknown(n) => format!("unknown method {n}"),
        }
    }
}

/// The algorithm compressed clusters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window.
    Zlib,
    /// A zstd frame.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// A validated QCOW2 header with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, in 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Encryption method.
    pub encryption: Encryption,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table (cluster aligned, inside the file).
    pub l1_table_offset: u64,
    /// Offset of the refcount table (cluster aligned, inside the file).
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (all known).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// Compression algorithm of compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Header extensions in the order they appear.
    pub extensions: Vec<HeaderExtension>,
}

/// Reads the cluster size a header claims, so the caller knows how many bytes
/// [`Header::parse`] needs (the header cluster). Validates only the magic and
/// the range of `cluster_bits`.
pub fn header_cluster_size(prefix: &[u8]) -> Result<u64, FormatError> {
    let (raw, _) = RawHeaderV2::read_from_prefix(prefix).map_err(|_| FormatError::Truncated {
        structure: "qcow2 header",
        needed: u64::from(V2_HEADER_LEN),
        available: prefix.len() as u64,
    })?;
    check_magic(raw.magic.get())?;
    let bits = raw.cluster_bits.get();
    check_cluster_bits(bits)?;
    Ok(1 << bits)
}

fn check_magic(magic: u32) -> Result<(), FormatError> {
    if magic != QCOW_MAGIC {
        return Err(FormatError::BadMagic {
            found: magic,
            expected: QCOW_MAGIC,
        });
    }
    Ok(())
}

fn check_cluster_bits(bits: u32) -> Result<(), FormatError> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(FormatError::ClusterBits(bits));
    }
    Ok(())
}

/// Refuses regions that share bytes, naming the first pair found.
fn check_apart(regions: &[&Region]) -> Result<(), FormatError> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.overlaps(b) {
                return Err(FormatError::Overlap {
                    first: a.name,
                    first_offset: a.offset,
                    second: b.name,
                    second_offset: b.offset,
                });
            }
        }
    }
    Ok(())
}

/// A byte range of metadata, for alignment, bounds and overlap checks.
struct Region {
    name: &'static str,
    offset: u64,
    len: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.len > 0 && other.len > 0 && self.offset < other.end() && other.offset < self.end()
    }

    fn check(&self, cluster_size: u64, file_len: u64) -> Result<(), FormatError> {
        if self.offset % cluster_size != 0 {
            return Err(FormatError::Misaligned {
                structure: self.name,
                offset: self.offset,
                cluster_size,
            });
        }
        match self.offset.checked_add(self.len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(FormatError::PastEnd {
                structure: self.name,
                offset: self.offset,
                size: self.len,
                file_len,
            }),
        }
    }
}

impl Header {
    /// Encodes the header, its extensions and the backing file name into the
    /// bytes of the header cluster (`backing_file` is placed after the
    /// extensions; the offsets in the result say where). Fails when they do
    /// not fit in one cluster.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let cluster_size = self.cluster_size();
        let v3 = self.version >= 3;
        let header_length = if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN };
        let mut out = vec![0u8; header_length as usize];
        out.extend_from_slice(&extension::encode_extensions(&self.extensions));
        let (backing_offset, backing_size) = match &self.backing_file {
            Some(name) => {
                let offset = out.len() as u64;
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(FormatError::BackingName {
                        offset,
                        size: u32::try_from(name.len()).unwrap_or(u32::MAX),
                    });
                }
                out.extend_from_slice(name.as_bytes());
                (offset, name.len() as u32)
            }
            None => (0, 0),
        };
        if out.len() as u64 > cluster_size {
            return Err(FormatError::TooLarge {
                structure: "header with extensions and backing file name",
                size: out.len() as u64,
                limit: cluster_size,
            });
        }
        let v2 = RawHeaderV2 {
            magic: QCOW_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: backing_offset.into(),
            backing_file_size: backing_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.virtual_size.into(),
            crypt_method: match self.encryption {
                Encryption::None => 0,
                Encryption::Aes => 1,
                Encryption::Luks => 2,
                Encryption::Unknown(n) => n,
            }
            .into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        out[..V2_HEADER_LEN as usize].copy_from_slice(v2.as_bytes());
        if v3 {
            let v3 = RawHeaderV3 {
                incompatible_features: self.incompatible_features.into(),
                compatible_features: self.compatible_features.into(),
                autoclear_features: self.autoclear_features.into(),
                refcount_order: self.refcount_order.into(),
                header_length: header_length.into(),
            };
            out[V2_HEADER_LEN as usize..V3_MIN_HEADER_LEN as usize].copy_from_slice(v3.as_bytes());
            out[V3_MIN_HEADER_LEN as usize] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
        }
        Ok(out)
    }

    /// Parses and validates the header cluster of a QCOW2 image.
    ///
    /// `cluster` holds the first bytes of the image: the whole header cluster
    /// (see [`header_cluster_size`]) or the whole file if it is shorter.
    /// `file_len` is the image file's length, used to check that tables fit.
    /// The snapshot table's place is not checked: `check` reads the table
    /// itself, tolerating damage (QEMU skips it when opening for a check);
    /// [`Header::parse`] checks it too.
    pub fn parse_for_check(cluster: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let (v2, rest) =
            RawHeaderV2::read_from_prefix(cluster).map_err(|_| FormatError::Truncated {
                structure: "qcow2 header",
                needed: u64::from(V2_HEADER_LEN),
                available: cluster.len() as u64,
            })?;
        check_magic(v2.magic.get())?;
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let cluster_bits = v2.cluster_bits.get();
        check_cluster_bits(cluster_bits)?;
        let cluster_size = 1u64 << cluster_bits;

        let mut header = Header {
            version,
            cluster_bits,
            virtual_size: v2.size.get(),
            encryption: Encryption::from_raw(v2.crypt_method.get()),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            extensions: Vec::new(),
        };

        if version == 3 {
            let (v3, _) =
                RawHeaderV3::read_from_prefix(rest).map_err(|_| FormatError::Truncated {
                    structure: "qcow2 version 3 header",
                    needed: u64::from(V3_MIN_HEADER_LEN),
                    available: cluster.len() as u64,
                })?;
            header.incompatible_features = v3.incompatible_features.get();
            header.compatible_features = v3.compatible_features.get();
            header.autoclear_features = v3.autoclear_features.get();
            header.refcount_order = v3.refcount_order.get();
            header.header_length = v3.header_length.get();
            if header.header_length < V3_MIN_HEADER_LEN
                || u64::from(header.header_length) > cluster_size
            {
                return Err(FormatError::HeaderLength {
                    length: header.header_length,
                    min: V3_MIN_HEADER_LEN,
                    cluster_size,
                });
            }
            if header.refcount_order > 6 {
                return Err(FormatError::RefcountOrder(header.refcount_order));
            }
            let raw_type = if header.header_length > V3_MIN_HEADER_LEN {
                // Bytes past the end of a short file read as zero.
                cluster
                    .get(V3_MIN_HEADER_LEN as usize)
                    .copied()
                    .unwrap_or(0)
            } else {
                0
            };
            header.compression_type = match raw_type {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => return Err(FormatError::CompressionType(other)),
            };
            let bit_set = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if bit_set != (raw_type != 0) {
                return Err(FormatError::CompressionTypeBit {
                    compression_type: raw_type,
                    bit_set,
                });
            }
        }

        // Extensions live between the header and the backing file name (or
        // the end of the header cluster).
        let backing_offset = v2.backing_file_offset.get();
        let ext_end = if backing_offset != 0 {
            backing_offset.min(cluster_size)
        } else {
            cluster_size
        };
        header.extensions =
            extension::parse_extensions(cluster, u64::from(header.header_length), ext_end)?;

        let unknown = header.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            // Names in the table's order, each bit named once, up to the
            // first entry without a name (as QEMU reports them).
            let mut unnamed = unknown;
            let mut names = Vec::new();
            for f in header.feature_names() {
                if f.name.is_empty() {
                    break;
                }
                let bit = 1u64.checked_shl(u32::from(f.bit)).unwrap_or(0);
                if f.kind == FeatureKind::Incompatible && unnamed & bit != 0 {
                    names.push(f.name.clone());
                    unnamed &= !bit;
                }
            }
            return Err(FormatError::UnknownIncompatibleFeatures {
                bits: unknown,
                names,
                unnamed,
            });
        }

        if backing_offset != 0 {
            header.backing_file = Some(parse_backing_name(
                cluster,
                backing_offset,
                v2.backing_file_size.get(),
                cluster_size,
            )?);
        }

        header.validate_extensions()?;
        header.validate_tables(file_len)?;
        Ok(header)
    }

    /// Parses and validates the header as [`Header::parse_for_check`] does,
    /// and also the snapshot table's place: at most [`MAX_SNAPSHOTS`]
    /// entries, inside the file, apart from the other structures.
    pub fn parse(cluster: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let header = Self::parse_for_check(cluster, file_len)?;
        header.validate_snapshot_table(file_len)?;
        Ok(header)
    }

    /// Refuses the extensions QEMU refuses an image for (its
    /// `qcow2_read_extensions`): a bitmaps extension in use with a reserved
    /// field set, no bitmaps, too many, a misaligned or oversized
    /// directory; an encryption header extension without LUKS encryption,
    /// or misaligned.
    fn validate_extensions(&self) -> Result<(), FormatError> {
        let cluster_size = self.cluster_size();
        if let Some(b) = self.bitmaps() {
            let bad = |reason: String| {
                Err(FormatError::Extension {
                    extension: "bitmaps",
                    reason,
                })
            };
            if b.reserved != 0 {
                return bad("reserved field is not zero".into());
            }
            if b.nb_bitmaps > crate::limits::MAX_BITMAPS {
                return bad(format!(
                    "{} bitmaps exceed the maximum of {}",
                    b.nb_bitmaps,
                    crate::limits::MAX_BITMAPS
                ));
            }
            if b.nb_bitmaps == 0 {
                return bad("no bitmaps".into());
            }
            if b.directory_offset % cluster_size != 0 {
                return bad(format!(
                    "bitmap directory offset {:#x} is not cluster aligned",
                    b.directory_offset
                ));
            }
            if b.directory_size > crate::limits::MAX_BITMAP_DIRECTORY_BYTES {
                return bad(format!(
                    "bitmap directory size {} exceeds {}",
                    b.directory_size,
                    crate::limits::MAX_BITMAP_DIRECTORY_BYTES
                ));
            }
        }
        for e in &self.extensions {
            if let HeaderExtension::FullDiskEncryption { offset, .. } = e {
                let bad = |reason: String| {
                    Err(FormatError::Extension {
                        extension: "encryption header",
                        reason,
                    })
                };
                if self.encryption != Encryption::Luks {
                    return bad("only expected with LUKS encryption".into());
                }
                if offset % cluster_size != 0 {
                    return bad(format!("offset {offset:#x} is not cluster aligned"));
                }
            }
        }
        Ok(())
    }

    fn validate_tables(&self, file_len: u64) -> Result<(), FormatError> {
        let cluster_size = self.cluster_size();
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(FormatError::VirtualSize(self.virtual_size));
        }

        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(FormatError::TooLarge {
                structure: "L1 table",
                size: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let needed = self.virtual_size.div_ceil(self.bytes_per_l2_table());
        if u64::from(self.l1_size) < needed {
            return Err(FormatError::L1TooSmall {
                l1_size: self.l1_size,
                virtual_size: self.virtual_size,
                needed,
            });
        }
        let header_region = Region {
            name: "header",
            offset: 0,
            len: cluster_size,
        };
        let l1 = Region {
            name: "L1 table",
            offset: self.l1_table_offset,
            len: l1_bytes,
        };
        if l1.len > 0 {
            l1.check(cluster_size, file_len)?;
        }

        if self.refcount_table_clusters == 0 {
            return Err(FormatError::NoRefcountTable);
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if reftable_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(FormatError::TooLarge {
                structure: "refcount table",
                size: reftable_bytes,
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let reftable = Region {
            name: "refcount table",
            offset: self.refcount_table_offset,
            len: reftable_bytes,
        };
        reftable.check(cluster_size, file_len)?;

        let regions = [&header_region, &l1, &reftable];
        check_apart(&regions)
    }

    /// Checks where the snapshot table lies (the part of the header a
    /// `check` reads for itself, tolerating damage): at most
    /// [`MAX_SNAPSHOTS`] entries, inside the file, apart from the header,
    /// the active L1 table and the refcount table.
    pub fn validate_snapshot_table(&self, file_len: u64) -> Result<(), FormatError> {
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::TooManySnapshots {
                count: self.nb_snapshots,
                limit: MAX_SNAPSHOTS,
            });
        }
        let cluster_size = self.cluster_size();
        let snapshots = Region {
            name: "snapshot table",
            offset: self.snapshots_offset,
            // Each entry takes at least 40 bytes; the exact length is known
            // only once the entries are read.
            len: u64::from(self.nb_snapshots) * 40,
        };
        if snapshots.len == 0 {
            // An empty table is not read, but QEMU refuses a misaligned
            // offset all the same.
            return snapshots.check(cluster_size, u64::MAX);
        }
        snapshots.check(cluster_size, file_len)?;
        let header_region = Region {
            name: "header",
            offset: 0,
            len: cluster_size,
        };
        let l1 = Region {
            name: "L1 table",
            offset: self.l1_table_offset,
            len: u64::from(self.l1_size) * 8,
        };
        let reftable = Region {
            name: "refcount table",
            offset: self.refcount_table_offset,
            len: u64::from(self.refcount_table_clusters) << self.cluster_bits,
        };
        check_apart(&[&header_region, &l1, &reftable, &snapshots])
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128-bit extended entries with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is a valid raw image by itself.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Bytes of an L2 entry (8, or 16 for extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L2 table maps.
    pub fn bytes_per_l2_table(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// The backing format from the backing-format extension, if present
    /// (the last one, where a header has several, as QEMU reads them).
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The external data file name from its extension, if present (the
    /// last one, as for [`Header::backing_format`]).
    pub fn data_file_name(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            HeaderExtension::ExternalDataFile(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The bitmaps extension, if present and marked consistent by its
    /// autoclear bit (QEMU ignores it otherwise).
    pub fn bitmaps(&self) -> Option<&extension::BitmapsExtension> {
        if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }

    /// The entries of the feature-name table extension, if present.
    pub fn feature_names(&self) -> impl Iterator<Item = &extension::FeatureName> {
        self.extensions
            .iter()
            .filter_map(|e| match e {
                HeaderExtension::FeatureNames(names) => Some(names.iter()),
                _ => None,
            })
            .flatten()
    }
}

fn parse_backing_name(
    cluster: &[u8],
    offset: u64,
    size: u32,
    cluster_size: u64,
) -> Result<String, FormatError> {
    let err = FormatError::BackingName { offset, size };
    if size > MAX_BACKING_NAME {
        return Err(err);
    }
    let end = offset.checked_add(u64::from(size)).ok_or(err.clone())?;
    if end > cluster_size {
        return Err(err);
    }
    // The name may sit past the end of a short file: those bytes read as zero.
    let mut name = vec![0u8; size as usize];
    if let Ok(start) = usize::try_from(offset) {
        if let Some(avail) = cluster.get(start..) {
            let n = avail.len().min(name.len());
            name[..n].copy_from_slice(&avail[..n]);
        }
    }
    String::from_utf8(name).map_err(|_| FormatError::NotUtf8 {
        structure: "backing file name",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::standard_feature_names;

    #[test]
    fn encode_then_parse_round_trips() -> Result<(), FormatError> {
        let header = Header {
            version: 3,
            cluster_bits: 16,
            virtual_size: 1 << 30,
            encryption: Encryption::None,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: INCOMPAT_COMPRESSION,
            compatible_features: COMPAT_LAZY_REFCOUNTS,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zstd,
            backing_file: Some("base.qcow2".into()),
            extensions: vec![
                HeaderExtension::BackingFormat("qcow2".into()),
                HeaderExtension::FeatureNames(standard_feature_names()),
            ],
        };
        let mut bytes = header.encode()?;
        bytes.resize(4 << 16, 0);
        let parsed = Header::parse(&bytes, 4 << 16)?;
        assert_eq!(parsed, header);
        // Of two backing format extensions the last counts, as in QEMU
        // (iotest 114 appends one).
        let mut twice = parsed;
        twice
            .extensions
            .push(HeaderExtension::BackingFormat("foo".into()));
        let mut bytes = twice.encode()?;
        bytes.resize(4 << 16, 0);
        assert_eq!(
            Header::parse(&bytes, 4 << 16)?.backing_format(),
            Some("foo")
        );
        Ok(())
    }
}
