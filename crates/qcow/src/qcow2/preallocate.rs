//! Preallocation (qemu-img's `preallocation` option): every cluster of the
//! disk allocated up front, with L2 tables and data clusters (`metadata`),
//! the file's space reserved (`falloc`) or written with zeros (`full`).

use qcow_format::table::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use qcow_io::Storage;

use super::Qcow2Image;
use super::write::ALL_ALLOCATED;
use crate::{Error, Result};

impl Qcow2Image {
    /// Allocates every cluster of the disk, as qemu-img's `preallocation`
    /// does: L2 tables and data clusters (`metadata`), with the file's space
    /// reserved (`falloc`) or written with zeros (`full`).
    pub fn preallocate(&self, mode: super::Preallocation) -> Result<()> {
        self.preallocate_range(0, self.virtual_size, mode)
    }

    /// Allocates every unallocated cluster of guest bytes `start..end` as
    /// [`Qcow2Image::preallocate`] does (after a resize, the grown part).
    pub(super) fn preallocate_range(
        &self,
        start: u64,
        end: u64,
        mode: super::Preallocation,
    ) -> Result<()> {
        use super::Preallocation;
        if mode == Preallocation::Off || start >= end {
            return Ok(());
        }
        let mut meta = self.lock_meta()?;
        let cluster_size = self.header.cluster_size();
        let entries = self.header.l2_entries();
        let extended = self.geometry.extended_l2;
        // With a backing file, subclusters stay as they are (unallocated
        // ones show the backing file, zeroed ones read zeros): only the host
        // cluster is set aside, as QEMU preallocates over a backing file.
        let has_backing = self.header.backing_file.is_some();
        let mut guest = start - start % cluster_size;
        let words = self.geometry.l2_entry_words();
        while guest < end {
            let left = (end - guest).div_ceil(cluster_size);
            let max = (entries - (guest >> self.header.cluster_bits) % entries).min(left);
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            let word = |g: u64, w: usize| {
                table
                    .get(self.geometry.l2_index(g) * words + w)
                    .map_or(0, |e| e.load(std::sync::atomic::Ordering::Acquire))
            };
            // Clusters that have a host cluster (or compressed data) keep it.
            let has_host = |g: u64| word(g, 0) & (OFFSET_MASK | OFLAG_COMPRESSED) != 0;
            if has_host(guest) {
                guest += cluster_size;
                continue;
            }
            let mut n = 1;
            while n < max && !has_host(guest + n * cluster_size) {
                n += 1;
            }
            let host = self.alloc_data(&mut meta, guest, n)?;
            for i in 0..n {
                let entry = (host + i * cluster_size) | OFLAG_COPIED;
                let at = guest + i * cluster_size;
                let bitmap = if !extended {
                    0
                } else if has_backing || at < start {
                    // The cluster's subclusters as they were.
                    word(at, 1)
                } else {
                    ALL_ALLOCATED
                };
                self.set_l2_words(&mut meta, l2_offset, &table, at, entry, bitmap)?;
            }
            let data = self.data_storage()?;
            let bytes = n * cluster_size;
            let io = |e| Error::io(&self.name, "preallocating", host, e);
            match mode {
                Preallocation::Falloc => data.allocate(host, bytes).map_err(io)?,
                Preallocation::Full => data.write_zeroes(host, bytes).map_err(io)?,
                _ => {}
            }
            guest += bytes;
        }
        // The file covers every cluster, allocated on disk or not.
        let end = meta.end << self.header.cluster_bits;
        if self
            .file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing", 0, e))?
            < end
        {
            self.file
                .set_len(end)
                .map_err(|e| Error::io(&self.name, "sizing the image", end, e))?;
        }
        drop(meta);
        self.flush()
    }
}
