//! The bitmap directory ("Bitmaps extension" and "Bitmap directory" in the
//! specification).
//!
//! The directory lists persistent dirty bitmaps. Entries are a 24-byte fixed
//! part ([`RawBitmapDirectoryEntry`]), extra data and the name, padded to a
//! multiple of 8 bytes.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::FormatError;
use crate::limits::MAX_BITMAPS;

/// Bitmap flag bit 0: the bitmap was in use and may be inconsistent.
pub const BITMAP_IN_USE: u32 = 1 << 0;
/// Bitmap flag bit 1: the bitmap tracks writes automatically.
pub const BITMAP_AUTO: u32 = 1 << 1;
/// Bitmap flag bit 2: the bitmap has extra data that must be kept.
pub const BITMAP_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The only bitmap type: a dirty tracking bitmap.
pub const BITMAP_KIND_DIRTY: u8 = 1;
/// Smallest granularity QEMU accepts, as a power of two (512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity QEMU accepts, as a power of two (2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name (QEMU's `BME_MAX_NAME_SIZE`).
pub const MAX_NAME_BYTES: usize = 1023;
/// Most entries a bitmap table may have (QEMU's `BME_MAX_TABLE_SIZE`).
pub const MAX_TABLE_ENTRIES: u64 = 0x0800_0000;
/// Bitmap table entry: the host offset of a data cluster.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry without a data cluster: every bit of it is set.
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;
/// Bitmap table entry bits that must be zero.
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// The fixed part of a bitmap directory entry.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBitmapDirectoryEntry {
    /// Offset of the bitmap table.
    pub bitmap_table_offset: U64,
    /// Entries in the bitmap table.
    pub bitmap_table_size: U32,
    /// Flag bits.
    pub flags: U32,
    /// 1: dirty tracking bitmap.
    pub kind: u8,
    /// log2 of the bytes each bit covers.
    pub granularity_bits: u8,
    /// Length of the name.
    pub name_size: U16,
    /// Length of the extra data.
    pub extra_data_size: U32,
}

const _: () = assert!(size_of::<RawBitmapDirectoryEntry>() == 24);

/// A decoded bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// The bitmap's name.
    pub name: String,
    /// log2 of the bytes each bit covers.
    pub granularity_bits: u8,
    /// Flag bits.
    pub flags: u32,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// The bitmap type (1: dirty tracking).
    pub kind: u8,
    /// The extra data, kept to be written back.
    pub extra_data: Vec<u8>,
}

impl BitmapEntry {
    /// Bytes each bit of the bitmap covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    /// Whether the bitmap was in use when the image was last closed (it may
    /// miss writes: QEMU calls it inconsistent).
    pub fn in_use(&self) -> bool {
        self.flags & BITMAP_IN_USE != 0
    }

    /// Whether the bitmap records writes (QEMU's "enabled").
    pub fn auto(&self) -> bool {
        self.flags & BITMAP_AUTO != 0
    }

    /// The entry's length in the directory, padding included.
    pub fn encoded_len(&self) -> usize {
        (24 + self.extra_data.len() + self.name.len()).next_multiple_of(8)
    }

    /// The entry as stored in the directory, padding included.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawBitmapDirectoryEntry {
            bitmap_table_offset: U64::new(self.table_offset),
            bitmap_table_size: U32::new(self.table_size),
            flags: U32::new(self.flags),
            kind: self.kind,
            granularity_bits: self.granularity_bits,
            // Names are at most MAX_NAME_BYTES (checked by writers) and
            // extra data at most what a directory entry could hold.
            name_size: U16::new(u16::try_from(self.name.len()).unwrap_or(u16::MAX)),
            extra_data_size: U32::new(u32::try_from(self.extra_data.len()).unwrap_or(u32::MAX)),
        };
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(self.encoded_len(), 0);
        out
    }

    /// Bits the bitmap has for a disk of `disk_size` bytes.
    pub fn bits_for(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.granularity())
    }
}

/// A whole directory as stored.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    entries.iter().flat_map(BitmapEntry::encode).collect()
}

/// Entries a bitmap table needs for `bits` bits in clusters of
/// `cluster_size` bytes.
pub fn table_entries(bits: u64, cluster_size: u64) -> u64 {
    bits.div_ceil(8).div_ceil(cluster_size)
}

/// Parses a bitmap directory of `count` entries.
pub fn parse_directory(bytes: &[u8], count: u32) -> Result<Vec<BitmapEntry>, FormatError> {
    if count > MAX_BITMAPS {
        return Err(FormatError::TooLarge {
            structure: "bitmap directory (entries)",
            size: u64::from(count),
            limit: u64::from(MAX_BITMAPS),
        });
    }
    let mut entries = Vec::new();
    let mut rest = bytes;
    for index in 0..count {
        let bad = |reason: &str| FormatError::Bitmap {
            index,
            reason: reason.into(),
        };
        let (raw, tail) = RawBitmapDirectoryEntry::read_from_prefix(rest)
            .map_err(|_| bad("entry is truncated"))?;
        let name_len = usize::from(raw.name_size.get());
        let extra_len = usize::try_from(raw.extra_data_size.get())
            .map_err(|_| bad("extra data size is too large"))?;
        let name = tail
            .get(extra_len..extra_len.saturating_add(name_len))
            .ok_or_else(|| bad("entry is truncated"))?;
        if raw.granularity_bits > 63 {
            return Err(bad("granularity_bits is above 63"));
        }
        entries.push(BitmapEntry {
            name: String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8"))?,
            granularity_bits: raw.granularity_bits,
            flags: raw.flags.get(),
            table_offset: raw.bitmap_table_offset.get(),
            table_size: raw.bitmap_table_size.get(),
            kind: raw.kind,
            extra_data: tail[..extra_len].to_vec(),
        });
        let len = (24 + extra_len + name_len).next_multiple_of(8);
        rest = bytes_after(rest, len);
    }
    Ok(entries)
}

fn bytes_after(bytes: &[u8], len: usize) -> &[u8] {
    bytes.get(len..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_as_they_parse() {
        let entries = vec![
            BitmapEntry {
                name: "b0".into(),
                granularity_bits: 16,
                flags: BITMAP_AUTO,
                table_offset: 0x30000,
                table_size: 1,
                kind: BITMAP_KIND_DIRTY,
                extra_data: Vec::new(),
            },
            BitmapEntry {
                name: "a longer name".into(),
                granularity_bits: 9,
                flags: BITMAP_IN_USE,
                table_offset: 0x50000,
                table_size: 3,
                kind: BITMAP_KIND_DIRTY,
                extra_data: vec![1, 2, 3],
            },
        ];
        let bytes = encode_directory(&entries);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(parse_directory(&bytes, 2).expect("parse"), entries);
        assert_eq!(table_entries(1, 65536), 1);
        assert_eq!(table_entries(65536 * 8 + 1, 65536), 2);
    }
}
