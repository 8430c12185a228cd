//! Emptying the whole image after a commit, as QEMU's `make_empty` does.
//!
//! A version 3 image without snapshots, bitmaps or an external data file
//! whose L1 table fits beside three clusters in one refcount block is
//! rebuilt from scratch: the header cluster stays, then come a one-cluster
//! refcount table, its one refcount block and an empty L1 table, and the
//! file ends there. Any other image has every cluster deallocated in place.
//!
//! The rebuild runs with the image marked dirty: a crash anywhere inside
//! leaves an image the next writer (qcow or QEMU) repairs by counting
//! references again, and the guest data of the image reads as before or
//! as empty, never as anything else (its L1 table is emptied first).

use std::sync::atomic::Ordering;

use qcow_format::header::{INCOMPAT_DIRTY, field};
use qcow_format::table::{OFFSET_MASK, refcount_set};

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Empties the image: every cluster becomes unallocated (the backing
    /// file shows through again) and its space is released, as QEMU's
    /// `make_empty` does after a commit. Where QEMU rebuilds the image from
    /// scratch (see the module documentation), so does this, and the file
    /// shrinks to the four clusters or so the empty image needs.
    pub fn make_empty(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.can_rebuild_empty() {
            self.rebuild_empty()
        } else {
            // The freed space goes back to the file system, as with QEMU.
            self.punching_freed(|image| image.deallocate_everything())
        }
    }

    /// Clusters the L1 table takes.
    fn l1_clusters(&self) -> u64 {
        (self.l1.len() as u64 * 8).div_ceil(self.header.cluster_size())
    }

    /// Whether the image can be rebuilt empty: QEMU's conditions.
    fn can_rebuild_empty(&self) -> bool {
        let per_block = (self.header.cluster_size() * 8) >> self.header.refcount_order;
        self.header.version >= 3
            && self.snapshots.is_empty()
            && self.bitmaps.is_empty()
            && !self.header.has_data_file()
            // The new layout would drop the LUKS header's clusters (QEMU
            // empties such images cluster by cluster, too).
            && self.encryption_header_area().is_none()
            && 3 + self.l1_clusters() <= per_block
    }

    /// Every allocated cluster made unallocated, table by table.
    fn deallocate_everything(&self) -> Result<()> {
        let per_table = self.header.bytes_per_l2_table();
        let result = (0..self.l1.len() as u64)
            .filter(|&i| self.l1_entry(i) & OFFSET_MASK != 0)
            .try_for_each(|i| {
                let start = i * per_table;
                if start >= self.virtual_size {
                    return Ok(());
                }
                let len = per_table.min(self.virtual_size - start);
                self.recorded(start, len, || {
                    self.for_cluster_spans(start, len, |guest, _, _| self.deallocate(guest))
                })
            })
            .and_then(|()| self.flush_metadata());
        self.guard(result)
    }

    /// The image rebuilt empty (see the module documentation).
    fn rebuild_empty(&mut self) -> Result<()> {
        // Nothing cached may be written back over the new layout later.
        self.flush()?;
        self.update_incompatible(|bits| bits | INCOMPAT_DIRTY)?;
        let result = self.write_empty_layout();
        if result.is_err() {
            // The refcounts on disk may be anything now: leave the mark so
            // that the next writer counts again.
            self.write_state()?.keep_dirty();
            return result;
        }
        // The refcounts are exact: the mark goes, even with lazy refcounts
        // (QEMU clears it too).
        self.update_incompatible(|bits| bits & !INCOMPAT_DIRTY)
    }

    /// Writes the empty layout: L1 table zeroed in place, then the new
    /// refcount table (cluster 1), refcount block (cluster 2) and L1 table
    /// (cluster 3 on), the header pointed at them; the in-memory state
    /// follows.
    fn write_empty_layout(&mut self) -> Result<()> {
        let cs = self.header.cluster_size();
        let l1_clusters = self.l1_clusters();
        let zero_cluster = vec![0u8; cs as usize];
        let (file, name) = (self.file.clone(), self.name.clone());
        let write = |bytes: &[u8], at: u64, what: &'static str| {
            file.write_at(bytes, at)
                .map_err(|e| Error::io(&name, what, at, e))
        };
        let flush = || file.flush().map_err(|e| Error::io(&name, "flushing", 0, e));
        // First the guest's view goes: an empty L1 table where it is now.
        for i in 0..l1_clusters {
            write(
                &zero_cluster,
                self.header.l1_table_offset + i * cs,
                "emptying the L1 table",
            )?;
        }
        flush()?;
        for entry in &self.l1 {
            entry.store(0, Ordering::Release);
        }
        // Whatever the new structures overwrite is no longer referenced.
        for cluster in 1..3 + l1_clusters {
            write(&zero_cluster, cluster * cs, "clearing the new metadata")?;
        }
        let mut fields = [0u8; 20];
        fields[..8].copy_from_slice(&(3 * cs).to_be_bytes());
        fields[8..16].copy_from_slice(&cs.to_be_bytes());
        fields[16..].copy_from_slice(&1u32.to_be_bytes());
        write(&fields, field::L1_TABLE_OFFSET, "writing the header")?;
        flush()?;
        self.header.l1_table_offset = 3 * cs;
        self.header.refcount_table_offset = cs;
        self.header.refcount_table_clusters = 1;
        write(&(2 * cs).to_be_bytes(), cs, "writing the refcount table")?;
        flush()?;
        let mut block = zero_cluster;
        for cluster in 0..3 + l1_clusters {
            refcount_set(&mut block, cluster, self.header.refcount_order, 1);
        }
        write(&block, 2 * cs, "writing a refcount block")?;
        flush()?;
        // The file ends after the new structures (still under the dirty
        // mark), so that allocation starts over from there.
        let end = (3 + l1_clusters) * cs;
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.name, "truncating the file", end, e))?;
        self.file_len.store(end, Ordering::Release);
        // Allocation, caches and the overlap guard start over from the new
        // layout (with a new memo key: no thread may use an old table).
        self.restart_write_state()?;
        self.sparse_file = std::sync::OnceLock::new();
        Ok(())
    }
}
