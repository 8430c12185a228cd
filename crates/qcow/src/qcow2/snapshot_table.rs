//! Writing the snapshot table, as QEMU's `qcow2_write_snapshots` does: the
//! whole table goes to newly allocated clusters, the header is switched to
//! it in one write once the table and its refcounts are on disk, and only
//! then are the old table's clusters freed. A crash at any point leaves the
//! old table or the new one, never a mix (at worst leaked clusters).

use qcow_format::header::field;
use qcow_format::limits::{MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS};
use qcow_format::snapshot::{RawSnapshotHeader, Snapshot};
use zerocopy::FromBytes;

use super::Qcow2Image;
use super::allocator::Owner;
use crate::{Error, Result};

impl Qcow2Image {
    /// Replaces the snapshot table with `snapshots`. Entries without a
    /// recorded disk size get the image's current one (what QEMU assumes
    /// for them). Needs the write state (an image opened for writing, or
    /// one [`Qcow2Image::check`] repairs).
    pub(super) fn write_snapshot_table(&mut self, snapshots: Vec<Snapshot>) -> Result<()> {
        let count = u32::try_from(snapshots.len())
            .ok()
            .filter(|&n| n <= MAX_SNAPSHOTS)
            .ok_or_else(|| {
                Error::format(
                    &self.name,
                    qcow_format::FormatError::TooManySnapshots {
                        count: u32::try_from(snapshots.len()).unwrap_or(u32::MAX),
                        limit: MAX_SNAPSHOTS,
                    },
                )
            })?;
        let mut table = Vec::new();
        let mut unpadded = 0;
        for (index, snapshot) in snapshots.iter().enumerate() {
            let mut snapshot = snapshot.clone();
            snapshot.disk_size.get_or_insert(self.header.virtual_size);
            // At most MAX_SNAPSHOTS entries (checked above).
            let entry = snapshot
                .encode(index as u32)
                .map_err(|e| Error::format(&self.name, e))?;
            unpadded = table.len() as u64 + snapshot_entry_unpadded(&entry);
            if unpadded > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(Error::format(
                    &self.name,
                    qcow_format::FormatError::TooLarge {
                        structure: "snapshot table",
                        size: unpadded,
                        limit: MAX_SNAPSHOT_TABLE_BYTES,
                    },
                ));
            }
            table.extend_from_slice(&entry);
        }
        let cluster_size = self.header.cluster_size();
        let old_offset = self.header.snapshots_offset;
        let old_clusters = if self.snapshot_table_bytes == 0 {
            0
        } else {
            (old_offset % cluster_size + self.snapshot_table_bytes).div_ceil(cluster_size)
        };
        let old_start = old_offset - old_offset % cluster_size;
        let new_offset = {
            let mut meta = self.guard(self.lock_meta())?;
            let clusters = (table.len() as u64).div_ceil(cluster_size);
            let offset = if clusters == 0 {
                0
            } else {
                let offset = self.guard(meta.clusters(clusters))?;
                // Marked before it is written (a give-back unmarks it).
                Owner::metadata_placed(self, offset, clusters * cluster_size);
                offset
            };
            let mut fields = [0u8; 12];
            fields[..4].copy_from_slice(&count.to_be_bytes());
            fields[4..].copy_from_slice(&offset.to_be_bytes());
            // The new table and its refcounts are on disk before the header
            // names them; the header is on disk before the old table goes.
            let switched = self
                .file
                .write_at(&table[..unpadded as usize], offset)
                .map_err(|e| Error::io(&self.name, "writing the snapshot table", offset, e))
                .and_then(|()| self.flush_refcounts())
                .and_then(|()| self.sync_file())
                .and_then(|()| {
                    self.file
                        .write_at(&fields, field::NB_SNAPSHOTS)
                        .map_err(|e| {
                            Error::io(&self.name, "writing the header", field::NB_SNAPSHOTS, e)
                        })
                })
                .and_then(|()| self.sync_file());
            if let Err(e) = switched {
                // The header may name either table; only a table it cannot
                // name may be given back. Leaking is the safe side.
                if clusters > 0 && !self.header_names_table(offset) {
                    meta.give_back(offset, clusters);
                }
                return Err(e);
            }
            for i in 0..old_clusters {
                meta.pending_frees.push(old_start + i * cluster_size);
            }
            offset
        };
        self.header.nb_snapshots = count;
        self.header.snapshots_offset = new_offset;
        self.snapshot_table_bytes = unpadded;
        self.snapshots = self.read_snapshot_table(new_offset, count, None)?.snapshots;
        self.flush()?;
        // The old table's clusters go back to the file system once free,
        // as QEMU discards them (a damaged table may share a cluster).
        // Advice only: the clusters are already free.
        let first = old_start >> self.header.cluster_bits;
        let _ = self
            .lock_meta()?
            .punch_clusters((first..first + old_clusters).collect());
        Ok(())
    }

    fn sync_file(&self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }

    /// Whether the header on disk names the snapshot table at `offset`
    /// (a failed header write may still have landed).
    fn header_names_table(&self, offset: u64) -> bool {
        let mut stored = [0u8; 8];
        match self.file.read_at(&mut stored, field::SNAPSHOTS_OFFSET) {
            Ok(()) => u64::from_be_bytes(stored) == offset,
            Err(_) => true,
        }
    }
}

/// The length of an encoded entry without its padding.
fn snapshot_entry_unpadded(entry: &[u8]) -> u64 {
    RawSnapshotHeader::read_from_prefix(entry)
        .map_or(entry.len() as u64, |(raw, _)| raw.unpadded_len())
}
