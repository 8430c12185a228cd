//! The snapshot table ("Snapshots" in the specification).
//!
//! Each entry is a 40-byte fixed part ([`RawSnapshotHeader`]), extra data,
//! the unique ID string and the name, padded to a multiple of 8 bytes. The
//! engine reads the fixed part, asks [`RawSnapshotHeader::entry_len`] how long
//! the whole entry is, reads it and hands it to [`Snapshot::parse`].

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::FormatError;
use crate::limits::{MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA_DATA};

/// The fixed part of a snapshot table entry.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSnapshotHeader {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: U64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: U32,
    /// Length of the ID string.
    pub id_str_size: U16,
    /// Length of the name.
    pub name_size: U16,
    /// Creation time, seconds since the epoch.
    pub date_sec: U32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: U32,
    /// Guest time at creation, nanoseconds.
    pub vm_clock_nsec: U64,
    /// Size of the saved VM state (0 if none, or see the extra data).
    pub vm_state_size: U32,
    /// Length of the extra data.
    pub extra_data_size: U32,
}

const _: () = assert!(size_of::<RawSnapshotHeader>() == SNAPSHOT_HEADER_LEN);

/// Length of the fixed part of a snapshot entry.
pub const SNAPSHOT_HEADER_LEN: usize = 40;

impl RawSnapshotHeader {
    /// Checks the fixed part alone, before the rest of the entry is read:
    /// the extra data must be within [`MAX_SNAPSHOT_EXTRA_DATA`].
    pub fn validate(&self, index: u32) -> Result<(), FormatError> {
        let extra = self.extra_data_size.get();
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::Snapshot {
                index,
                reason: format!("extra data size {extra} exceeds {MAX_SNAPSHOT_EXTRA_DATA}"),
            });
        }
        Ok(())
    }

    /// The length of the whole entry, padding included.
    pub fn entry_len(&self) -> u64 {
        self.unpadded_len().next_multiple_of(8)
    }

    /// The length of the entry without its padding (the last entry's
    /// padding may lie past the end of the file).
    pub fn unpadded_len(&self) -> u64 {
        SNAPSHOT_HEADER_LEN as u64
            + u64::from(self.extra_data_size.get())
            + u64::from(self.id_str_size.get())
            + u64::from(self.name_size.get())
    }
}

/// A decoded snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The unique ID string.
    pub id: String,
    /// The name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest time at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count at the time of the snapshot, if recorded.
    pub icount: Option<u64>,
    /// The whole extra data, kept so it can be written back.
    pub extra_data: Vec<u8>,
}

impl Snapshot {
    /// Parses entry number `index` from `entry`, which holds the whole entry
    /// (at least [`RawSnapshotHeader::entry_len`] bytes, padding optional).
    pub fn parse(entry: &[u8], index: u32, cluster_size: u64) -> Result<Snapshot, FormatError> {
        let bad = |reason: String| FormatError::Snapshot { index, reason };
        let (raw, rest) = RawSnapshotHeader::read_from_prefix(entry)
            .map_err(|_| bad("entry is truncated".into()))?;
        let extra_len = raw.extra_data_size.get();
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(bad(format!(
                "extra data size {extra_len} exceeds {MAX_SNAPSHOT_EXTRA_DATA}"
            )));
        }
        let l1_size = raw.l1_size.get();
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 size {l1_size} is too large")));
        }
        let l1_table_offset = raw.l1_table_offset.get();
        if l1_table_offset % cluster_size != 0 {
            return Err(bad(format!(
                "L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )));
        }
        let id_len = usize::from(raw.id_str_size.get());
        let name_len = usize::from(raw.name_size.get());
        let extra_len = extra_len as usize;
        if rest.len() < extra_len + id_len + name_len {
            return Err(bad("entry is truncated".into()));
        }
        let (extra, rest) = rest.split_at(extra_len);
        let (id, rest) = rest.split_at(id_len);
        let name = &rest[..name_len];
        let word = |i: usize| -> Option<u64> {
            let bytes = extra.get(i * 8..i * 8 + 8)?;
            U64::read_from_bytes(bytes).ok().map(|v| v.get())
        };
        let vm_state_size = word(0).unwrap_or(u64::from(raw.vm_state_size.get()));
        Ok(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8(id.to_vec()).map_err(|_| bad("ID is not UTF-8".into()))?,
            name: String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8".into()))?,
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            vm_state_size,
            disk_size: word(1),
            icount: word(2).filter(|&v| v != u64::MAX),
            extra_data: extra.to_vec(),
        })
    }
}
