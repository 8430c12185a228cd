//! L1, L2 and refcount table entries ("Cluster mapping", "Extended L2
//! Entries" and "Host cluster management" in the specification).
//!
//! Tables are stored as arrays of big-endian integers. This module decodes a
//! raw entry into what it means ([`L2Mapping`]); it never touches the data
//! the entry points at.

use crate::FormatError;
use crate::header::Header;

/// Bits 9..=55 of L1 and L2 entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of L1 and standard L2 entries: the refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (version 3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Bits of L1 entries the specification reserves (must be zero).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Subclusters in a cluster of an image with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;

/// The facts about an image that decoding its table entries depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// L2 entries carry a 64-bit subcluster bitmap.
    pub extended_l2: bool,
    /// Guest data lives in an external data file (host offset 0 is valid).
    pub external_data: bool,
}

impl Geometry {
    /// The geometry of a parsed header.
    pub fn of(header: &Header) -> Self {
        Geometry {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            external_data: header.has_data_file(),
        }
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// 64-bit words per L2 entry (1, or 2 with extended L2).
    pub fn l2_entry_words(&self) -> usize {
        if self.extended_l2 { 2 } else { 1 }
    }

    /// log2 of the number of L2 entries per table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// The L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits())
    }

    /// The L2 index of a guest offset within its table.
    pub fn l2_index(&self, guest: u64) -> usize {
        // The mask keeps the value below 2^18, so the cast cannot truncate.
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits()) - 1)) as usize
    }

    /// The offset of a guest byte within its cluster.
    pub fn in_cluster(&self, guest: u64) -> u64 {
        guest & (self.cluster_size() - 1)
    }

    /// log2 of the subcluster size (the cluster size without extended L2).
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// The subcluster index of a guest offset within its cluster.
    pub fn subcluster_index(&self, guest: u64) -> u32 {
        // Below 32 by construction.
        (self.in_cluster(guest) >> self.subcluster_bits()) as u32
    }

    /// Where an L1 entry says the L2 table is, or `None` when unallocated.
    pub fn l1_entry(&self, index: u64, entry: u64) -> Result<Option<u64>, FormatError> {
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(FormatError::BadEntry {
                table: "L1",
                index,
                entry,
                reason: "L2 table offset is not cluster aligned",
            });
        }
        Ok(Some(offset))
    }

    /// What an L2 entry maps, for the subcluster `subcluster` of its cluster
    /// (ignored without extended L2). `bitmap` is the extended entry's
    /// subcluster bitmap, 0 for standard entries.
    pub fn l2_mapping(
        &self,
        index: u64,
        entry: u64,
        bitmap: u64,
        subcluster: u32,
    ) -> Result<L2Mapping, FormatError> {
        let bad = |reason| FormatError::BadEntry {
            table: "L2",
            index,
            entry,
            reason,
        };
        if entry & OFLAG_COMPRESSED != 0 {
            if self.extended_l2 && bitmap != 0 {
                return Err(bad("compressed cluster with a subcluster bitmap"));
            }
            let (host, len) = self.compressed_extent(entry);
            return Ok(L2Mapping::Compressed { host, len });
        }
        let offset = entry & OFFSET_MASK;
        let allocated = offset != 0 || (self.external_data && entry & OFLAG_COPIED != 0);
        if !self.extended_l2 {
            if entry & OFLAG_ZERO != 0 {
                if allocated && offset & (self.cluster_size() - 1) != 0 {
                    return Err(bad(
                        "preallocated zero cluster offset is not cluster aligned",
                    ));
                }
                return Ok(L2Mapping::Zero {
                    host: allocated.then_some(offset),
                });
            }
            if !allocated {
                return Ok(L2Mapping::Unallocated { host: None });
            }
            if offset & (self.cluster_size() - 1) != 0 {
                return Err(bad("data cluster offset is not cluster aligned"));
            }
            return Ok(L2Mapping::Data { host: offset });
        }
        let alloc_bit = (bitmap >> subcluster) & 1 != 0;
        let zero_bit = (bitmap >> (subcluster + 32)) & 1 != 0;
        if !allocated {
            if bitmap & 0xffff_ffff != 0 {
                return Err(bad("unallocated cluster with allocated subclusters"));
            }
            return Ok(if zero_bit {
                L2Mapping::Zero { host: None }
            } else {
                L2Mapping::Unallocated { host: None }
            });
        }
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(bad("data cluster offset is not cluster aligned"));
        }
        if (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
            return Err(bad("subcluster both allocated and zero"));
        }
        let host = offset + (u64::from(subcluster) << self.subcluster_bits());
        Ok(if alloc_bit {
            L2Mapping::Data { host }
        } else if zero_bit {
            L2Mapping::Zero { host: Some(host) }
        } else {
            L2Mapping::Unallocated { host: Some(host) }
        })
    }

    /// The host bytes an L2 entry keeps in use, whatever its subclusters
    /// say: a compressed cluster's data, or an allocated cluster (also one
    /// that reads as zeros but keeps its space). `None` when it holds none.
    pub fn l2_host_range(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Some(self.compressed_extent(entry));
        }
        let offset = entry & OFFSET_MASK;
        let allocated = offset != 0 || (self.external_data && entry & OFLAG_COPIED != 0);
        allocated.then_some((offset, self.cluster_size()))
    }

    /// The host offset and length of the compressed data of a compressed
    /// L2 entry (the "x = 62 - (cluster_bits - 8)" split).
    pub fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let shift = 62 - (self.cluster_bits - 8);
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (host, sectors * 512 - (host & 511))
    }
}

/// What one guest cluster (or subcluster) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// Not allocated here: read from the backing file, or zeros. `host` is
    /// set for an unallocated subcluster of an allocated cluster.
    Unallocated {
        /// Host offset reserved for the (sub)cluster, if any.
        host: Option<u64>,
    },
    /// Reads as zeros. `host` is set when space stays allocated for it.
    Zero {
        /// Host offset reserved for the (sub)cluster, if any.
        host: Option<u64>,
    },
    /// Stored uncompressed at this host offset (of the data file, when the
    /// image has an external one), pointing at the start of the (sub)cluster.
    Data {
        /// Host offset of the (sub)cluster's first byte.
        host: u64,
    },
    /// Stored compressed.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Upper bound of the compressed data's length (whole sectors).
        len: u64,
    },
}

/// Reads refcount `index` from a refcount block whose entries are
/// `1 << order` bits wide.
///
/// Entries narrower than a byte are packed from the least significant bit;
/// wider ones are big-endian. Returns `None` when `index` is past the block.
pub fn refcount_get(block: &[u8], index: u64, order: u32) -> Option<u64> {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = *block.get(usize::try_from(index / per_byte).ok()?)?;
        let shift = (index % per_byte) * bits;
        Some((u64::from(byte) >> shift) & ((1 << bits) - 1))
    } else {
        let width = usize::try_from(bits / 8).ok()?;
        let start = usize::try_from(index).ok()?.checked_mul(width)?;
        let bytes = block.get(start..start.checked_add(width)?)?;
        Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// Writes refcount `index` into a refcount block of `1 << order`-bit entries.
///
/// Returns `None` when `index` is past the block or `value` does not fit.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> Option<()> {
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return None;
    }
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block.get_mut(usize::try_from(index / per_byte).ok()?)?;
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        // The masked value fits in a byte.
        *byte = ((u64::from(*byte) & !mask) | (value << shift)) as u8;
    } else {
        let width = usize::try_from(bits / 8).ok()?;
        let start = usize::try_from(index).ok()?.checked_mul(width)?;
        let bytes = block.get_mut(start..start.checked_add(width)?)?;
        for (i, b) in bytes.iter_mut().rev().enumerate() {
            *b = (value >> (8 * i)) as u8;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits,
            extended_l2,
            external_data: false,
        }
    }

    #[test]
    fn compressed_split_follows_cluster_bits() {
        // 64 KiB clusters: x = 62 - 8 = 54.
        let g = geometry(16, false);
        let entry = OFLAG_COMPRESSED | (3u64 << 54) | 0x1234_5600 | 0x10;
        let (host, len) = g.compressed_extent(entry);
        assert_eq!(host, 0x1234_5610);
        assert_eq!(len, 4 * 512 - 0x10);
    }

    #[test]
    fn standard_entries_decode() {
        let g = geometry(16, false);
        assert_eq!(
            g.l2_mapping(0, 0, 0, 0).ok(),
            Some(L2Mapping::Unallocated { host: None })
        );
        assert_eq!(
            g.l2_mapping(0, 1, 0, 0).ok(),
            Some(L2Mapping::Zero { host: None })
        );
        assert_eq!(
            g.l2_mapping(0, 0x50001, 0, 0).ok(),
            Some(L2Mapping::Zero {
                host: Some(0x50000)
            })
        );
        assert_eq!(
            g.l2_mapping(0, OFLAG_COPIED | 0x30000, 0, 0).ok(),
            Some(L2Mapping::Data { host: 0x30000 })
        );
        assert!(g.l2_mapping(0, 0x30200, 0, 0).is_err());
    }

    #[test]
    fn extended_entries_decode_per_subcluster() {
        let g = geometry(16, true);
        let bitmap = 0b01 | (0b10 << 32);
        let entry = 0x40000;
        assert_eq!(
            g.l2_mapping(0, entry, bitmap, 0).ok(),
            Some(L2Mapping::Data { host: 0x40000 })
        );
        assert_eq!(
            g.l2_mapping(0, entry, bitmap, 1).ok(),
            Some(L2Mapping::Zero {
                host: Some(0x40800)
            })
        );
        assert_eq!(
            g.l2_mapping(0, entry, bitmap, 2).ok(),
            Some(L2Mapping::Unallocated {
                host: Some(0x41000)
            })
        );
        assert!(g.l2_mapping(0, entry, 1 | (1 << 32), 0).is_err());
        assert!(g.l2_mapping(0, 0, 1, 0).is_err());
        assert_eq!(
            g.l2_mapping(0, 0, 1 << 33, 1).ok(),
            Some(L2Mapping::Zero { host: None })
        );
    }

    #[test]
    fn external_data_offset_zero_is_allocated_when_copied() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            external_data: true,
        };
        assert_eq!(
            g.l2_mapping(0, OFLAG_COPIED, 0, 0).ok(),
            Some(L2Mapping::Data { host: 0 })
        );
        assert_eq!(
            g.l2_mapping(0, 0, 0, 0).ok(),
            Some(L2Mapping::Unallocated { host: None })
        );
    }

    proptest! {
        #[test]
        fn refcounts_round_trip(order in 0u32..=6, index in 0u64..512, value: u64) {
            let mut block = vec![0u8; 8192];
            let bits = 1u32 << order;
            let value = if bits == 64 { value } else { value & ((1 << bits) - 1) };
            prop_assert!(refcount_set(&mut block, index, order, value).is_some());
            prop_assert_eq!(refcount_get(&block, index, order), Some(value));
            // Neighbours are untouched.
            prop_assert_eq!(refcount_get(&block, index + 1, order), Some(0));
        }

        #[test]
        fn index_math_recomposes(cluster_bits in 9u32..=21, ext: bool, guest in 0u64..(1 << 50)) {
            let g = geometry(cluster_bits, ext);
            let back = (g.l1_index(guest) << (cluster_bits + g.l2_bits()))
                | ((g.l2_index(guest) as u64) << cluster_bits)
                | g.in_cluster(guest);
            prop_assert_eq!(back, guest);
        }
    }
}
