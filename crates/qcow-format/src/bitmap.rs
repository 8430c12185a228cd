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
}

impl BitmapEntry {
    /// Bytes each bit of the bitmap covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
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
        });
        let len = (24 + extra_len + name_len).next_multiple_of(8);
        rest = bytes_after(rest, len);
    }
    Ok(entries)
}

fn bytes_after(bytes: &[u8], len: usize) -> &[u8] {
    bytes.get(len..).unwrap_or(&[])
}
