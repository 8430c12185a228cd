//! Zeroing and discarding: whole clusters get the zero flag (or become
//! unallocated) and give their space back; partial clusters are written
//! with zeros.

use std::sync::atomic::Ordering;

use qcow_format::table::{OFFSET_MASK, OFLAG_COPIED};

use super::Qcow2Image;
use super::write::ALL_ZERO;
use crate::Result;

impl Qcow2Image {
    /// Makes `len` bytes at `offset` read as zeros. Whole clusters are
    /// marked zero in their L2 entries (version 3, or unallocated when
    /// nothing shows through from a backing file) and their space released;
    /// with `unmap` false a cluster the image owns keeps its space.
    /// Partial clusters are written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        let result = self.recorded(offset, len, || self.zero_range(offset, len, unmap));
        self.guard(result)
    }

    /// Makes the cluster at `guest` unallocated, releasing its space.
    pub(super) fn deallocate(&self, guest: u64) -> Result<()> {
        let mut meta = self.lock_meta()?;
        self.mark_dirty()?;
        let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
        self.release_l2_words(&mut meta, l2_offset, &table, guest, 0, 0)
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        crate::check_range(&self.name, offset, len, self.virtual_size)?;
        // A raw data file must hold the zeros itself; version 2 has no
        // zero flag to hide a backing file with.
        if crate::device::BlockDevice::zeroing_allocates(self) {
            return self.write_zero_bytes(offset, len);
        }
        self.for_cluster_spans(offset, len, |guest, n, whole| {
            if !whole {
                return self.write_zero_bytes(guest, n);
            }
            let mut meta = self.lock_meta()?;
            self.mark_dirty()?;
            if self.geometry.extended_l2 {
                // Every subcluster reads as zeros; the space is released.
                let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
                return self.release_l2_words(&mut meta, l2_offset, &table, guest, 0, ALL_ZERO);
            }
            let owned = self.in_place_host(guest, Some(&meta))?;
            let entry = match owned {
                Some(host) if !unmap && self.header.version >= 3 => host | OFLAG_COPIED | 1,
                _ if self.header.version >= 3 => 1,
                _ => 0,
            };
            if entry & OFFSET_MASK != 0 {
                // Keeps its cluster: only the flag changes.
                let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
                let index = self.geometry.l2_index(guest);
                if let Some(slot) = table.get(index) {
                    slot.store(entry, Ordering::Release);
                }
                return self.l2.mark_dirty(l2_offset, table);
            }
            if entry == 0 && self.l1_entry(self.geometry.l1_index(guest)) & OFFSET_MASK == 0 {
                // No L2 table: already unallocated, and nothing shows through.
                return Ok(());
            }
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            self.release_l2_words(&mut meta, l2_offset, &table, guest, entry, 0)
        })
    }

    /// Says the range's contents are no longer needed: whole clusters are
    /// released and read as zeros afterwards (a zero flag keeps a backing
    /// file from showing through); partial clusters are left as they are,
    /// as are clusters of a version 2 image with a backing file.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        crate::check_range(&self.name, offset, len, self.virtual_size)?;
        if self.header.version < 3 && self.header.backing_file.is_some() {
            return Ok(());
        }
        self.recorded(offset, len, || {
            self.for_cluster_spans(offset, len, |guest, _, whole| {
                if whole {
                    self.write_zeroes(guest, self.header.cluster_size(), true)
                } else {
                    Ok(())
                }
            })
        })
    }

    /// Calls `f(guest, len, whole_cluster)` for each cluster-bounded span of
    /// the range. The disk's last cluster counts as whole when the range
    /// covers it to the end of the disk.
    pub(super) fn for_cluster_spans(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let end = offset + len;
        let mut guest = offset;
        while guest < end {
            let in_cluster = self.geometry.in_cluster(guest);
            let n = (cluster_size - in_cluster).min(end - guest);
            let cluster_end = (guest - in_cluster + cluster_size).min(self.virtual_size);
            let whole = in_cluster == 0 && guest + n >= cluster_end;
            f(guest, n, whole)?;
            guest += n;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}
