//! Shrinking a QCOW2 image, as QEMU's `qcow2_co_truncate` does: the whole
//! clusters past the new end are released, the L1 entries past it are
//! cleared on disk before their L2 tables are freed (the table keeps its
//! size), refcount blocks left counting nothing are dropped, the file is
//! cut after its last cluster in use (free clusters before it become
//! holes), and the header's size changes last.

use std::sync::atomic::Ordering;

use qcow_format::header::field;
use qcow_format::table::OFFSET_MASK;

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Shrinks the virtual disk to `new_size` bytes (a multiple of 512,
    /// smaller than the current size). What lay past the new end is lost.
    pub(super) fn shrink(&mut self, new_size: u64) -> Result<()> {
        // Freed space short of the end goes back too, as QEMU always passes
        // on the discards of a shrink.
        self.punching_freed(|image| image.shrink_unpunched(new_size))
    }

    fn shrink_unpunched(&mut self, new_size: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let old_size = self.virtual_size;
        let per_table = self.header.bytes_per_l2_table();
        // 1. The whole clusters past the new end.
        let from = new_size.next_multiple_of(cluster_size);
        if from < old_size {
            let first_table = from / per_table;
            for i in first_table..self.l1.len() as u64 {
                if self.l1_entry(i) & OFFSET_MASK == 0 {
                    continue;
                }
                let start = (i * per_table).max(from);
                let end = ((i + 1) * per_table).min(old_size);
                if start < end {
                    self.for_each_cluster(start, end, |guest| self.deallocate(guest))?;
                }
            }
        }
        self.flush()?;
        // 2. The L1 entries past the new end, cleared on disk first.
        let keep = new_size.div_ceil(per_table);
        let dropped: Vec<(u64, u64)> = (keep..self.l1.len() as u64)
            .map(|i| (i, self.l1_entry(i) & OFFSET_MASK))
            .filter(|&(_, l2)| l2 != 0)
            .collect();
        if !dropped.is_empty() {
            let table = self.header.l1_table_offset;
            let zeros = vec![0u8; (self.l1.len() as u64 - keep) as usize * 8];
            let at = table + keep * 8;
            self.file
                .write_at(&zeros, at)
                .and_then(|()| self.file.flush())
                .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))?;
            let mut meta = self.lock_meta()?;
            for (i, l2) in dropped {
                if let Some(slot) = self.l1.get(i as usize) {
                    slot.store(0, Ordering::Release);
                }
                meta.pending_frees.push(l2);
            }
        }
        self.flush()?;
        // 3. Refcount blocks that count nothing now, then the file's tail.
        {
            let mut meta = self.lock_meta()?;
            meta.drop_empty_refblocks()?;
        }
        self.flush()?;
        {
            let mut meta = self.lock_meta()?;
            let clusters = self.file_len().div_ceil(cluster_size);
            let Some(last) = meta.last_used_cluster(clusters)? else {
                return Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "refcount table",
                    offset: self.header.refcount_table_offset,
                    reason: "there are no references in the refcount table".into(),
                });
            };
            if last + 1 < clusters {
                meta.truncate_file(last + 1)?;
            }
        }
        // 4. The size, last.
        let at = field::SIZE;
        self.file
            .write_at(&new_size.to_be_bytes(), at)
            .map_err(|e| Error::io(&self.name, "writing the header", at, e))?;
        self.header.virtual_size = new_size;
        self.virtual_size = new_size;
        self.flush()
    }

    /// Calls `f` with the guest offset of each cluster of `start..end`.
    fn for_each_cluster(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let mut guest = start - start % cluster_size;
        while guest < end {
            f(guest)?;
            guest += cluster_size;
        }
        Ok(())
    }
}
