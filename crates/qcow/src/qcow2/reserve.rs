//! Reserving clusters in guest order for a copy that then writes them in
//! parallel: the clusters a range will hold are allocated and mapped now,
//! in the order the caller asks (so the file is laid out as the disk is),
//! and the data writes that follow go in place, lock-free, from any thread.

use std::sync::atomic::Ordering;

use qcow_format::table::OFLAG_COPIED;

use super::Qcow2Image;
use super::write::ALL_ALLOCATED;
use crate::Result;

impl Qcow2Image {
    /// Allocates and maps the unallocated whole clusters of guest bytes
    /// `offset..offset + len`, which the caller writes next, all of them,
    /// before anything reads them (until then they hold what the file held
    /// there). Clusters the image already maps, partial clusters and
    /// external data files are left to the writes.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let result = self.reserve_range(offset, len);
        self.guard(result)
    }

    fn reserve_range(&self, offset: u64, len: u64) -> Result<()> {
        crate::check_range(&self.name, offset, len, self.virtual_size)?;
        if self.header.has_data_file() {
            return Ok(());
        }
        let cluster_size = self.header.cluster_size();
        let entries = self.header.l2_entries();
        let words = self.geometry.l2_entry_words();
        let bitmap = if self.geometry.extended_l2 {
            ALL_ALLOCATED
        } else {
            0
        };
        let end = offset + len;
        let mut guest = offset.next_multiple_of(cluster_size);
        let stop = end - end % cluster_size;
        if guest >= stop {
            return Ok(());
        }
        let mut meta = self.lock_meta()?;
        self.mark_dirty()?;
        while guest < stop {
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            let left_in_table = entries - (guest >> self.header.cluster_bits) % entries;
            let max = ((stop - guest) / cluster_size).min(left_in_table);
            let unallocated = |g: u64| {
                let index = self.geometry.l2_index(g) * words;
                (0..words).all(|w| {
                    table
                        .get(index + w)
                        .is_some_and(|e| e.load(Ordering::Acquire) == 0)
                })
            };
            let mut n = 0;
            while n < max && unallocated(guest + n * cluster_size) {
                n += 1;
            }
            if n == 0 {
                guest += cluster_size;
                continue;
            }
            let host = meta.clusters(n)?;
            for i in 0..n {
                let entry = (host + i * cluster_size) | OFLAG_COPIED;
                self.set_l2_words(
                    &mut meta,
                    l2_offset,
                    &table,
                    guest + i * cluster_size,
                    entry,
                    bitmap,
                )?;
            }
            guest += n * cluster_size;
        }
        Ok(())
    }
}
