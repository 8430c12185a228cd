//! QCOW version 1: the 48-byte header and its L2 entries.
//!
//! Version 1 predates refcounts: the header names a cluster size and an L2
//! table size directly, the L1 table follows the header, and a compressed L2
//! entry keeps its size in bytes above bit `63 - cluster_bits`.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::header::Encryption;
use crate::limits::{MAX_BACKING_NAME, MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use crate::{FormatError, QCOW_MAGIC};

/// Bit 63 of a version 1 L2 entry: the cluster is compressed.
pub const V1_OFLAG_COMPRESSED: u64 = 1 << 63;
/// Smallest cluster_bits QEMU accepts for version 1.
pub const V1_MIN_CLUSTER_BITS: u8 = 9;
/// Largest cluster_bits QEMU accepts for version 1.
pub const V1_MAX_CLUSTER_BITS: u8 = 16;
/// Length of the version 1 header.
pub const V1_HEADER_LEN: usize = 48;

/// The version 1 header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV1 {
    /// `QFI\xfb`.
    pub magic: U32,
    /// 1.
    pub version: U32,
    /// Offset of the backing file name, or 0.
    pub backing_file_offset: U64,
    /// Length of the backing file name.
    pub backing_file_size: U32,
    /// Modification time of the backing file (unused).
    pub mtime: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the entries per L2 table.
    pub l2_bits: u8,
    /// Padding.
    pub padding: U16,
    /// 0: none, 1: AES.
    pub crypt_method: U32,
    /// Offset of the L1 table.
    pub l1_table_offset: U64,
}

const _: () = assert!(size_of::<RawHeaderV1>() == V1_HEADER_LEN);

/// A validated version 1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderV1 {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the entries per L2 table.
    pub l2_bits: u32,
    /// Encryption method.
    pub encryption: Encryption,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Entries in the L1 table (derived from the size).
    pub l1_size: u64,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

/// What a version 1 L2 entry maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Mapping {
    /// Not allocated: the backing file, or zeros.
    Unallocated,
    /// Uncompressed at this host offset.
    Data {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Compressed.
    Compressed {
        /// Host offset of the compressed bytes.
        host: u64,
        /// Their exact length.
        len: u64,
    },
}

impl HeaderV1 {
    /// Parses and validates a version 1 header. `bytes` holds the start of the
    /// file (enough for the backing file name), `file_len` its length.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<HeaderV1, FormatError> {
        let (raw, _) =
            RawHeaderV1::read_from_prefix(bytes).map_err(|_| FormatError::Truncated {
                structure: "qcow header",
                needed: V1_HEADER_LEN as u64,
                available: bytes.len() as u64,
            })?;
        if raw.magic.get() != QCOW_MAGIC {
            return Err(FormatError::BadMagic {
                found: raw.magic.get(),
                expected: QCOW_MAGIC,
            });
        }
        if raw.version.get() != 1 {
            return Err(FormatError::UnsupportedVersion(raw.version.get()));
        }
        let cluster_bits = raw.cluster_bits;
        if !(V1_MIN_CLUSTER_BITS..=V1_MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(u32::from(cluster_bits)));
        }
        // An L2 table is at most one 64 KiB cluster of 8-byte entries.
        if !(6..=13).contains(&raw.l2_bits) {
            return Err(FormatError::L2Bits {
                l2_bits: u32::from(raw.l2_bits),
                cluster_bits: u32::from(cluster_bits),
            });
        }
        let virtual_size = raw.size.get();
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(FormatError::VirtualSize(virtual_size));
        }
        let shift = u32::from(cluster_bits) + u32::from(raw.l2_bits);
        let l1_size = virtual_size.div_ceil(1 << shift);
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(FormatError::TooLarge {
                structure: "L1 table",
                size: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let l1_table_offset = raw.l1_table_offset.get();
        match l1_table_offset.checked_add(l1_bytes) {
            Some(end) if end <= file_len => {}
            _ if l1_bytes == 0 => {}
            _ => {
                return Err(FormatError::PastEnd {
                    structure: "L1 table",
                    offset: l1_table_offset,
                    size: l1_bytes,
                    file_len,
                });
            }
        }
        if l1_bytes > 0 && l1_table_offset < V1_HEADER_LEN as u64 {
            return Err(FormatError::Overlap {
                first: "header",
                first_offset: 0,
                second: "L1 table",
                second_offset: l1_table_offset,
            });
        }
        let backing_offset = raw.backing_file_offset.get();
        let backing_file = if backing_offset != 0 {
            let size = raw.backing_file_size.get();
            let err = FormatError::BackingName {
                offset: backing_offset,
                size,
            };
            if size > MAX_BACKING_NAME {
                return Err(err);
            }
            let start = usize::try_from(backing_offset).map_err(|_| err.clone())?;
            let name = bytes
                .get(start..start.saturating_add(size as usize))
                .ok_or(err)?;
            Some(
                String::from_utf8(name.to_vec()).map_err(|_| FormatError::NotUtf8 {
                    structure: "backing file name",
                })?,
            )
        } else {
            None
        };
        Ok(HeaderV1 {
            virtual_size,
            cluster_bits: u32::from(cluster_bits),
            l2_bits: u32::from(raw.l2_bits),
            encryption: match raw.crypt_method.get() {
                0 => Encryption::None,
                1 => Encryption::Aes,
                other => Encryption::Unknown(other),
            },
            l1_table_offset,
            l1_size,
            backing_file,
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Decodes an L2 entry.
    pub fn l2_mapping(&self, entry: u64) -> V1Mapping {
        if entry & V1_OFLAG_COMPRESSED != 0 {
            let shift = 63 - self.cluster_bits;
            V1Mapping::Compressed {
                host: entry & ((1u64 << shift) - 1),
                len: (entry >> shift) & (self.cluster_size() - 1),
            }
        } else if entry == 0 {
            V1Mapping::Unallocated
        } else {
            V1Mapping::Data { host: entry }
        }
    }
}
