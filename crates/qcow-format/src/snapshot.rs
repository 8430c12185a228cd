//! The snapshot table ("Snapshots" in the specification).
//!
//! Each entry is a 40-byte fixed part ([`RawSnapshotHeader`]), extra data,
//! the unique ID string and the name, padded to a multiple of 8 bytes. The
//! engine reads the fixed part, asks [`RawSnapshotHeader::entry_len`] how long
//! the whole entry is, reads it and hands it to [`Snapshot::parse`].

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::FormatError;
use crate::limits::MAX_SNAPSHOT_EXTRA_DATA;

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
    pub fn parse(entry: &[u8], index: u32) -> Result<Snapshot, FormatError> {
        let bad = |reason: String| FormatError::Snapshot { index, reason };
        let (raw, rest) = RawSnapshotHeader::read_from_prefix(entry)
            .map_err(|_| bad("entry is truncated".into()))?;
        let extra_len = raw.extra_data_size.get();
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(bad(format!(
                "extra data size {extra_len} exceeds {MAX_SNAPSHOT_EXTRA_DATA}"
            )));
        }
        // The L1 table's offset and size are checked where the table is
        // used, as QEMU checks them: an image with one damaged snapshot
        // entry still opens, and its other snapshots and its active layer
        // read.
        let l1_size = raw.l1_size.get();
        let l1_table_offset = raw.l1_table_offset.get();
        let id_len = usize::from(raw.id_str_size.get());
        let name_len = usize::from(raw.name_size.get());
        let extra_len = extra_len as usize;
        if rest.len() < extra_len + id_len + name_len {
            return Err(bad("entry is truncated".into()));
        }
        let (extra, rest) = rest.split_at(extra_len);
        let (id, rest) = rest.split_at(id_len);
        let name = &rest[..name_len];
        // QEMU keeps both as C strings: they end at the first zero byte.
        let c_string = |b: &[u8]| b.split(|&c| c == 0).next().unwrap_or_default().to_vec();
        let (id, name) = (c_string(id), c_string(name));
        let word = |i: usize| -> Option<u64> {
            let bytes = extra.get(i * 8..i * 8 + 8)?;
            U64::read_from_bytes(bytes).ok().map(|v| v.get())
        };
        let vm_state_size = word(0).unwrap_or(u64::from(raw.vm_state_size.get()));
        Ok(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8(id).map_err(|_| bad("ID is not UTF-8".into()))?,
            name: String::from_utf8(name).map_err(|_| bad("name is not UTF-8".into()))?,
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

/// Bytes of extra data every entry written here carries: the VM state
/// size, the disk size and the instruction count (QEMU writes the same).
pub const KNOWN_EXTRA_DATA_LEN: usize = 24;

impl Snapshot {
    /// The entry as stored, padded to a multiple of 8 bytes: the fixed
    /// part, at least [`KNOWN_EXTRA_DATA_LEN`] bytes of extra data (the
    /// known fields from this struct, then any unknown extra data kept
    /// from the image), the ID and the name. `disk_size` must be known
    /// (version 3 requires it); `index` names the entry in errors.
    pub fn encode(&self, index: u32) -> Result<Vec<u8>, FormatError> {
        let bad = |reason: String| FormatError::Snapshot { index, reason };
        let disk_size = self
            .disk_size
            .ok_or_else(|| bad("the disk size is not known".into()))?;
        let id_len = u16::try_from(self.id.len()).map_err(|_| bad("the ID is too long".into()))?;
        let name_len =
            u16::try_from(self.name.len()).map_err(|_| bad("the name is too long".into()))?;
        let unknown = self.extra_data.get(KNOWN_EXTRA_DATA_LEN..).unwrap_or(&[]);
        let extra_len = KNOWN_EXTRA_DATA_LEN + unknown.len();
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA as usize {
            return Err(bad(format!(
                "extra data size {extra_len} exceeds {MAX_SNAPSHOT_EXTRA_DATA}"
            )));
        }
        let raw = RawSnapshotHeader {
            l1_table_offset: U64::new(self.l1_table_offset),
            l1_size: U32::new(self.l1_size),
            id_str_size: U16::new(id_len),
            name_size: U16::new(name_len),
            date_sec: U32::new(self.date_sec),
            date_nsec: U32::new(self.date_nsec),
            vm_clock_nsec: U64::new(self.vm_clock_nsec),
            // A state too large for 32 bits reads as none to readers that
            // do not know the extra data, rather than as a truncated one.
            vm_state_size: U32::new(u32::try_from(self.vm_state_size).unwrap_or(0)),
            // At most MAX_SNAPSHOT_EXTRA_DATA (checked above).
            extra_data_size: U32::new(extra_len as u32),
        };
        let mut out = Vec::with_capacity(raw.entry_len() as usize);
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&disk_size.to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(unknown);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            l1_table_offset: 0x30000,
            l1_size: 2,
            id: "7".into(),
            name: "before upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 9,
            vm_state_size: 1 << 33,
            disk_size: Some(1 << 30),
            icount: None,
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn encoded_entries_parse_back_with_all_known_extra_data() {
        let snapshot = sample();
        let bytes = snapshot.encode(0).expect("encode");
        assert_eq!(bytes.len() % 8, 0);
        let parsed = Snapshot::parse(&bytes, 0).expect("parse");
        assert_eq!(parsed.extra_data.len(), KNOWN_EXTRA_DATA_LEN);
        let raw = RawSnapshotHeader::read_from_prefix(&bytes[..])
            .expect("header")
            .0;
        // Too large for the 32-bit field: written as no state there.
        assert_eq!(raw.vm_state_size.get(), 0);
        assert_eq!(raw.entry_len(), bytes.len() as u64);
        assert_eq!(
            Snapshot {
                extra_data: Vec::new(),
                ..parsed
            },
            snapshot
        );
    }

    #[test]
    fn unknown_extra_data_is_kept_and_short_extra_data_is_completed() {
        let mut snapshot = sample();
        snapshot.extra_data = (0..40u8).collect();
        let parsed = Snapshot::parse(&snapshot.encode(1).expect("encode"), 1).expect("parse");
        assert_eq!(parsed.extra_data[24..], snapshot.extra_data[24..]);
        snapshot.extra_data = vec![0; 8];
        let parsed = Snapshot::parse(&snapshot.encode(1).expect("encode"), 1).expect("parse");
        assert_eq!(parsed.extra_data.len(), 24);
        assert_eq!(parsed.disk_size, Some(1 << 30));
    }

    #[test]
    fn entries_that_cannot_be_stored_are_refused() {
        let mut snapshot = sample();
        snapshot.disk_size = None;
        assert!(snapshot.encode(0).is_err());
        let mut snapshot = sample();
        snapshot.name = "n".repeat(70_000);
        assert!(snapshot.encode(0).is_err());
        let mut snapshot = sample();
        snapshot.extra_data = vec![0; 2000];
        assert!(snapshot.encode(0).is_err());
    }

    #[test]
    fn ids_and_names_end_at_their_first_zero_byte_as_qemu_reads_them() {
        let mut snapshot = sample();
        snapshot.id = "7\0junk".into();
        snapshot.name = "\0\0\0".into();
        let mut bytes = snapshot.encode(0).expect("encode");
        // Bytes after the zero need not be UTF-8.
        let at = bytes
            .windows(4)
            .position(|w| w == b"junk")
            .expect("the ID's bytes");
        bytes[at] = 0xff;
        let parsed = Snapshot::parse(&bytes, 0).expect("parse");
        assert_eq!(parsed.id, "7");
        assert_eq!(parsed.name, "");
    }
}
