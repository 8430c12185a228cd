//! Loading the snapshot table of a QCOW2 image.

use qcow_format::limits::MAX_SNAPSHOT_TABLE_BYTES;
use qcow_format::snapshot::{RawSnapshotHeader, SNAPSHOT_HEADER_LEN, Snapshot};
use zerocopy::FromBytes;

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Reads every entry of the snapshot table.
    pub(super) fn load_snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut snapshots = Vec::new();
        let mut offset = self.header.snapshots_offset;
        let mut total = 0u64;
        for index in 0..self.header.nb_snapshots {
            let mut fixed = [0u8; SNAPSHOT_HEADER_LEN];
            self.file
                .read_at(&mut fixed, offset)
                .map_err(|e| Error::io(&self.name, "reading the snapshot table", offset, e))?;
            let raw = RawSnapshotHeader::read_from_bytes(&fixed[..]).map_err(|_| {
                Error::format(
                    &self.name,
                    qcow_format::FormatError::Snapshot {
                        index,
                        reason: "entry is truncated".into(),
                    },
                )
            })?;
            raw.validate(index)
                .map_err(|e| Error::format(&self.name, e))?;
            let len = raw.entry_len();
            total += len;
            if total > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(Error::format(
                    &self.name,
                    qcow_format::FormatError::TooLarge {
                        structure: "snapshot table",
                        size: total,
                        limit: MAX_SNAPSHOT_TABLE_BYTES,
                    },
                ));
            }
            if offset.saturating_add(raw.unpadded_len()) > self.file_len() {
                return Err(Error::format(
                    &self.name,
                    qcow_format::FormatError::PastEnd {
                        structure: "snapshot table entry",
                        offset,
                        size: len,
                        file_len: self.file_len(),
                    },
                ));
            }
            // Bounded just above by MAX_SNAPSHOT_TABLE_BYTES.
            let mut entry = vec![0u8; len as usize];
            self.file
                .read_at(&mut entry, offset)
                .map_err(|e| Error::io(&self.name, "reading the snapshot table", offset, e))?;
            let snapshot = Snapshot::parse(&entry, index, self.header.cluster_size())
                .map_err(|e| Error::format(&self.name, e))?;
            snapshots.push(snapshot);
            offset += len;
        }
        Ok(snapshots)
    }
}
