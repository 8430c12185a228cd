//! Preallocation (qemu-img's `preallocation` option): every cluster of the
//! disk allocated up front, with L2 tables and data clusters (`metadata`),
//! the file's space reserved (`falloc`) or written with zeros (`full`).

use qcow_format::table::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use qcow_io::Storage;

use super::Qcow2Image;
use super::allocator::Allocation;
use crate::{Error, Result};

impl Qcow2Image {
    /// Allocates every cluster of the disk, as qemu-img's `preallocation`
    /// does: L2 tables and data clusters (`metadata`), with the file's space
    /// reserved (`falloc`) or written with zeros (`full`).
    pub fn preallocate(&self, mode: super::Preallocation) -> Result<()> {
        self.preallocate_range(0, self.virtual_size, mode, None)
    }

    /// Before a resize that preallocates `old_size..new_size` as `mode`
    /// (`falloc` or `full`): grows the image file by at least what the
    /// grown part will take (data clusters, L2 tables, refcount blocks and
    /// tables, a larger L1 table), reserved or written with zeros, before
    /// anything refers to it. A full disk or a file size limit then fails
    /// here, with the file cut back and the image as it was, rather than
    /// after the header names the new size (QEMU also grows the file before
    /// it links the new clusters). Returns the old end of the file: the
    /// space past it reads as zeros and is already reserved. `None` when
    /// there is nothing to take (other modes, a shrink, or an external data
    /// file, which holds the data clusters).
    pub(super) fn take_space_for_preallocation(
        &self,
        old_size: u64,
        new_size: u64,
        mode: super::Preallocation,
    ) -> Result<Option<u64>> {
        use super::Preallocation;
        if !matches!(mode, Preallocation::Falloc | Preallocation::Full)
            || new_size <= old_size
            || self.header.has_data_file()
        {
            return Ok(None);
        }
        let cluster_size = self.header.cluster_size();
        let eof = self
            .file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing", 0, e))?
            .next_multiple_of(cluster_size);
        let bytes = preallocation_bound(
            eof,
            old_size,
            new_size,
            cluster_size,
            self.header.l2_entries(),
            u64::from(self.header.refcount_bits()),
        );
        let taken = match mode {
            Preallocation::Falloc => self.file.allocate(eof, bytes),
            _ => self.file.write_zeroes(eof, bytes),
        };
        if let Err(e) = taken {
            // Best effort: the error to report is the one that stopped us.
            let _ = self.file.set_len(eof);
            return Err(Error::io(&self.name, "preallocating", eof, e));
        }
        Ok(Some(eof))
    }

    /// Allocates every unallocated cluster of guest bytes `start..end` as
    /// [`Qcow2Image::preallocate`] does (after a resize, the grown part).
    /// Host bytes from `zeroed_from` on were already reserved and read as
    /// zeros ([`Qcow2Image::take_space_for_preallocation`]): they are not
    /// reserved or written again, and the file is cut after the last
    /// cluster used.
    pub(super) fn preallocate_range(
        &self,
        start: u64,
        end: u64,
        mode: super::Preallocation,
        zeroed_from: Option<u64>,
    ) -> Result<()> {
        use super::Preallocation;
        if mode == Preallocation::Off || start >= end {
            return Ok(());
        }
        if self.encryption.is_some() {
            // Preallocated clusters would read as decrypted zeros.
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "preallocation in an encrypted image".into(),
            });
        }
        let cluster_size = self.header.cluster_size();
        if matches!(mode, Preallocation::Falloc | Preallocation::Full)
            && !self.header.has_data_file()
            && start % cluster_size == 0
            && self.nothing_mapped(start, end)?
        {
            return self.preallocate_area(start, end, mode, zeroed_from);
        }
        let mut meta = self.lock_meta()?;
        let entries = self.header.l2_entries();
        let extended = self.geometry.extended_l2;
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
                // A cluster that has one already (metadata preallocation
                // gave it no space in the file) gets its space for the
                // grown part, as QEMU's falloc and full growth give it.
                let entry = word(guest, 0);
                if entry & OFLAG_COMPRESSED == 0 && guest + cluster_size > start {
                    let skip = start.saturating_sub(guest);
                    let len = cluster_size.min(end.next_multiple_of(cluster_size) - guest) - skip;
                    let at = (entry & OFFSET_MASK) + skip;
                    let data = self.data_storage()?;
                    let io = |e| Error::io(&self.name, "preallocating", at, e);
                    match mode {
                        Preallocation::Falloc => data.allocate(at, len).map_err(io)?,
                        Preallocation::Full => data.write_zeroes(at, len).map_err(io)?,
                        _ => {}
                    }
                }
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
                // With extended L2 entries, the subclusters stay as they
                // were (unallocated ones read as zeros, or show the backing
                // file), as QEMU preallocates them.
                let bitmap = if extended { word(at, 1) } else { 0 };
                self.set_l2_words(&mut meta, l2_offset, &table, at, entry, bitmap)?;
            }
            let data = self.data_storage()?;
            let bytes = n * cluster_size;
            // Only the part below space already taken.
            let todo = zeroed_from.map_or(bytes, |z| z.saturating_sub(host).min(bytes));
            let io = |e| Error::io(&self.name, "preallocating", host, e);
            match mode {
                _ if todo == 0 => {}
                Preallocation::Falloc => data.allocate(host, todo).map_err(io)?,
                Preallocation::Full => data.write_zeroes(host, todo).map_err(io)?,
                _ => {}
            }
            guest += bytes;
        }
        self.end_preallocated_file(&mut meta, zeroed_from)?;
        drop(meta);
        self.flush()
    }
}

impl Qcow2Image {
    /// Whether no cluster of guest bytes `start..end` is mapped in this
    /// image (no host cluster, no compressed data, no zero flag).
    fn nothing_mapped(&self, start: u64, end: u64) -> Result<bool> {
        let cluster_size = self.header.cluster_size();
        let entries = self.header.l2_entries();
        let words = self.geometry.l2_entry_words();
        let mut guest = start - start % cluster_size;
        while guest < end {
            let l1_index = self.geometry.l1_index(guest);
            let span = entries * cluster_size;
            let table_end = (guest - guest % span + span).min(end);
            let l2_offset = self.l1_entry(l1_index) & OFFSET_MASK;
            if l2_offset != 0 {
                let table = self.l2_table(l1_index, l2_offset)?;
                while guest < table_end {
                    let at = self.geometry.l2_index(guest) * words;
                    let mapped = (0..words).any(|w| {
                        table
                            .get(at + w)
                            .is_some_and(|e| e.load(std::sync::atomic::Ordering::Acquire) != 0)
                    });
                    if mapped {
                        return Ok(false);
                    }
                    guest += cluster_size;
                }
            }
            guest = table_end.next_multiple_of(cluster_size).max(guest);
        }
        Ok(true)
    }

    /// `falloc` and `full` preallocation of guest bytes `start..end`
    /// (`start` on a cluster boundary, no external data file), laid out as
    /// QEMU's `qcow2_co_truncate` lays it out: refcount structures that
    /// cover the new clusters placed after the last cluster in use (QEMU's
    /// refcount area, with a new refcount table), then every data cluster
    /// in one run after them, reserved (`falloc`) or written with zeros
    /// (`full`), then the L2 tables wherever the allocator finds room. The
    /// new clusters' L2 entries are set; with extended L2 entries their
    /// subclusters stay as they were (unallocated), as QEMU leaves them.
    /// Host bytes from `zeroed_from` on were reserved beforehand (see
    /// [`Qcow2Image::take_space_for_preallocation`]).
    fn preallocate_area(
        &self,
        start: u64,
        end: u64,
        mode: super::Preallocation,
        zeroed_from: Option<u64>,
    ) -> Result<()> {
        use super::Preallocation;
        let cluster_size = self.header.cluster_size();
        let bits = self.header.cluster_bits;
        let first = start >> bits;
        let data_clusters = end.div_ceil(cluster_size) - first;
        let mut meta = self.lock_meta()?;
        let file_clusters = self
            .file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing", 0, e))?
            .div_ceil(cluster_size);
        let in_use = meta
            .last_used_cluster(meta.end().max(file_clusters))?
            .map_or(file_clusters, |c| c + 1);
        // Room for the L2 tables too (one more for a partial head or tail),
        // so that linking the clusters needs no new refcount block.
        let l2_tables = data_clusters.div_ceil(self.header.l2_entries()) + 1;
        let area_end = meta.refcount_area(in_use, data_clusters + l2_tables)?;
        meta.claim_clusters(area_end, data_clusters)?;
        let host = area_end << bits;
        let bytes = data_clusters << bits;
        // Only the part below space already taken.
        let todo = zeroed_from.map_or(bytes, |z| z.saturating_sub(host).min(bytes));
        let io = |e| Error::io(&self.name, "preallocating", host, e);
        match mode {
            _ if todo == 0 => {}
            Preallocation::Falloc => self.file.allocate(host, todo).map_err(io)?,
            Preallocation::Full => self.file.write_zeroes(host, todo).map_err(io)?,
            _ => {}
        }
        for i in 0..data_clusters {
            let guest = (first + i) << bits;
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            let entry = (host + (i << bits)) | OFLAG_COPIED;
            let words = self.geometry.l2_entry_words();
            // Subclusters as they were (see above).
            let bitmap = match words {
                1 => 0,
                _ => table
                    .get(self.geometry.l2_index(guest) * words + 1)
                    .map_or(0, |w| w.load(std::sync::atomic::Ordering::Acquire)),
            };
            self.set_l2_words(&mut meta, l2_offset, &table, guest, entry, bitmap)?;
        }
        self.end_preallocated_file(&mut meta, zeroed_from)?;
        drop(meta);
        self.flush()
    }

    /// The file covers every cluster in use, allocated on disk or not, and
    /// ends with the last one when space was taken beforehand (from
    /// `zeroed_from`).
    fn end_preallocated_file(
        &self,
        meta: &mut Allocation<'_>,
        zeroed_from: Option<u64>,
    ) -> Result<()> {
        let clusters = meta.end();
        let end = clusters << self.header.cluster_bits;
        let len = self
            .file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing", 0, e))?;
        if len < end {
            self.file
                .set_len(end)
                .map_err(|e| Error::io(&self.name, "sizing the image", end, e))?;
        } else if len > end && zeroed_from.is_some() {
            meta.truncate_file(clusters)?;
        }
        Ok(())
    }
}

/// At most how many bytes preallocating guest bytes `old_size..new_size`
/// adds to a file ending at `eof`: every data cluster of the range, the L2
/// tables over it, a new L1 table, and refcount blocks and a refcount table
/// for all of that, each counted with room to spare (the excess is cut off
/// afterwards).
fn preallocation_bound(
    eof: u64,
    old_size: u64,
    new_size: u64,
    cluster_size: u64,
    l2_entries: u64,
    refcount_bits: u64,
) -> u64 {
    let data = new_size.div_ceil(cluster_size) - old_size / cluster_size + 1;
    let l2_tables = data.div_ceil(l2_entries) + 1;
    let l1_clusters = (new_size.div_ceil(cluster_size * l2_entries) * 8).div_ceil(cluster_size) + 1;
    let refs_per_block = cluster_size * 8 / refcount_bits;
    let counted = eof / cluster_size + data + l2_tables + l1_clusters;
    // Blocks for everything, a table for them, and blocks for those.
    let blocks = counted.div_ceil(refs_per_block) + 1;
    let table = (blocks * 8).div_ceil(cluster_size) + 1;
    let blocks = (counted + blocks + table).div_ceil(refs_per_block) + 2;
    let new_clusters = data + l2_tables + l1_clusters + 2 * (blocks + table);
    new_clusters.saturating_mul(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::preallocation_bound;

    #[test]
    fn the_bound_covers_data_and_metadata() {
        // 1 GiB in 64 KiB clusters: 16384 data clusters, 2 L2 tables.
        let bytes = preallocation_bound(0x50000, 0, 1 << 30, 65536, 8192, 16);
        assert!(bytes >= (16384 + 2 + 1 + 1) * 65536);
        // Not wildly more.
        assert!(bytes < (16384 + 64) * 65536);
        // 1-bit refcounts in 512-byte clusters need many blocks.
        let bytes = preallocation_bound(0, 0, 64 << 20, 512, 64, 1);
        let data = (64 << 20) / 512;
        assert!(bytes / 512 >= data + data / 64 + data / 4096);
    }
}
