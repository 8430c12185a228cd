//! Reading the snapshot table of a QCOW2 image: strictly when an image is
//! opened, and tolerantly for `check -r all`, which drops what cannot be
//! kept (extra data past the limit, entries past the table's size limit)
//! as QEMU's `qcow2_do_read_snapshots` does in repair mode.

use qcow_format::FormatError;
use qcow_format::limits::{MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};
use qcow_format::snapshot::{RawSnapshotHeader, SNAPSHOT_HEADER_LEN, Snapshot};
use zerocopy::{FromBytes, IntoBytes};

use super::Qcow2Image;
use crate::{Error, Result};

/// A snapshot table as read.
#[derive(Debug, Default)]
pub(super) struct SnapshotTable {
    /// The entries kept.
    pub(super) snapshots: Vec<Snapshot>,
    /// Bytes from the table's start to the end of the last entry kept,
    /// unknown extra data dropped or not (QEMU's `snapshots_size`).
    pub(super) bytes: u64,
    /// Entries whose extra data was cut to the limit (repair only).
    pub(super) extra_data_dropped: u64,
    /// Entries dropped off the end of a table over the size limit (repair
    /// only).
    pub(super) overhanging: u32,
}

impl Qcow2Image {
    /// Reads the `count` entries of the snapshot table at `offset`. With
    /// `repair`, entries with too much extra data keep the first
    /// [`MAX_SNAPSHOT_EXTRA_DATA`] bytes of it, and a table longer than
    /// [`MAX_SNAPSHOT_TABLE_BYTES`] loses the entries that do not fit, each
    /// announced on `repair`; without, both are refused.
    pub(super) fn read_snapshot_table(
        &self,
        offset: u64,
        count: u32,
        mut repair: Option<&mut dyn FnMut(&str)>,
    ) -> Result<SnapshotTable> {
        let mut table = SnapshotTable::default();
        let mut at = offset;
        // The table's length as QEMU measures it against its limit: the
        // entries before, padded, and this one without its padding.
        let mut measured = 0u64;
        for index in 0..count {
            let entry_start = at.next_multiple_of(8);
            measured = measured.next_multiple_of(8);
            let mut fixed = [0u8; SNAPSHOT_HEADER_LEN];
            self.read_table_bytes(&mut fixed, entry_start)?;
            let raw = RawSnapshotHeader::read_from_bytes(&fixed[..])
                .map_err(|_| self.snapshot_error(index, "entry is truncated".into()))?;
            let mut kept = raw;
            if raw.extra_data_size.get() > MAX_SNAPSHOT_EXTRA_DATA {
                let Some(log) = repair.as_deref_mut() else {
                    return Err(self.snapshot_error(
                        index,
                        format!(
                            "too much extra metadata ({} > {MAX_SNAPSHOT_EXTRA_DATA} bytes); `check -r all` can remove it",
                            raw.extra_data_size.get()
                        ),
                    ));
                };
                log(&format!(
                    "Discarding too much extra metadata in snapshot table entry {index} ({} > {MAX_SNAPSHOT_EXTRA_DATA})",
                    raw.extra_data_size.get()
                ));
                table.extra_data_dropped += 1;
                kept.extra_data_size = MAX_SNAPSHOT_EXTRA_DATA.into();
            }
            let end = entry_start.saturating_add(raw.unpadded_len());
            // A repair reads past the end of the file as zeros, as QEMU
            // reads it; otherwise the entry is refused.
            if end > self.file_len() && repair.is_none() {
                return Err(Error::format(
                    &self.name,
                    FormatError::PastEnd {
                        structure: "snapshot table entry",
                        offset: entry_start,
                        size: raw.unpadded_len(),
                        file_len: self.file_len(),
                    },
                ));
            }
            measured += kept.unpadded_len();
            if measured > MAX_SNAPSHOT_TABLE_BYTES {
                let Some(log) = repair.as_deref_mut() else {
                    return Err(Error::format(
                        &self.name,
                        FormatError::SnapshotTableTooBig {
                            size: measured,
                            limit: MAX_SNAPSHOT_TABLE_BYTES,
                            overhanging: count - index,
                        },
                    ));
                };
                let dropped = count - index;
                log(&format!(
                    "Discarding {dropped} overhanging snapshots (snapshot table is too big)"
                ));
                table.overhanging = dropped;
                break;
            }
            // The entry as kept: fixed part, extra data (cut to the limit),
            // ID and name; at most 40 + 1024 + 2 * 65535 bytes.
            let kept_extra = u64::from(kept.extra_data_size.get());
            let names = u64::from(raw.id_str_size.get()) + u64::from(raw.name_size.get());
            let mut entry = vec![0u8; (SNAPSHOT_HEADER_LEN as u64 + kept_extra + names) as usize];
            entry[..SNAPSHOT_HEADER_LEN].copy_from_slice(kept.as_bytes());
            let (extra, rest) = entry[SNAPSHOT_HEADER_LEN..].split_at_mut(kept_extra as usize);
            self.read_table_bytes(extra, entry_start + SNAPSHOT_HEADER_LEN as u64)?;
            let names_at =
                entry_start + SNAPSHOT_HEADER_LEN as u64 + u64::from(raw.extra_data_size.get());
            self.read_table_bytes(rest, names_at)?;
            let snapshot =
                Snapshot::parse(&entry, index).map_err(|e| Error::format(&self.name, e))?;
            table.snapshots.push(snapshot);
            at = end;
            table.bytes = end - offset;
        }
        Ok(table)
    }

    /// Reads table bytes; those past the end of the file read as zeros
    /// (only a repair gets that far: see [`Qcow2Image::read_snapshot_table`]).
    fn read_table_bytes(&self, buf: &mut [u8], at: u64) -> Result<()> {
        let inside = self.file_len().saturating_sub(at).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        self.file
            .read_at(head, at)
            .map_err(|e| Error::io(&self.name, "reading the snapshot table", at, e))
    }

    fn snapshot_error(&self, index: u32, reason: String) -> Error {
        Error::format(&self.name, FormatError::Snapshot { index, reason })
    }
}
