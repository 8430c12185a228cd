//! Reserving clusters in guest order for a copy that then writes them in
//! parallel: the clusters a range will hold are allocated and mapped now,
//! in the order the caller asks (so the file is laid out as the disk is),
//! and the data writes that follow go in place, lock-free, from any thread.
//! Should the writes not all happen, the reservation is released: its
//! clusters unmapped and freed, so that the image never maps space that was
//! not written (past the end of the file, or stale data of freed space).

use std::sync::atomic::Ordering;

use qcow_format::table::OFLAG_COPIED;

use super::Qcow2Image;
use super::write::ALL_ALLOCATED;
use crate::Result;
use crate::device::{Reservation, ReservedRun};

impl Qcow2Image {
    /// Allocates and maps the unallocated whole clusters of guest bytes
    /// `offset..offset + len`, which the caller writes next, all of them,
    /// before anything reads them (until then they hold what the file held
    /// there). Clusters the image already maps, partial clusters and
    /// external data files are left to the writes. Returns the clusters
    /// mapped, for [`Qcow2Image::release`] should the writes fail; a
    /// failure here releases what this call had mapped.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<Reservation> {
        self.check_writable()?;
        let mut reserved = Reservation::default();
        let result = self.reserve_range(offset, len, &mut reserved);
        if result.is_err() && !reserved.is_empty() {
            // The error to report is the one that stopped the reservation.
            let _ = self.release(reserved);
            return self.guard(result).map(|()| Reservation::default());
        }
        self.guard(result).map(|()| reserved)
    }

    /// Unmaps the clusters `reservation` mapped that still hold the
    /// reserved mapping, and frees them once the L2 tables are on disk.
    pub fn release(&self, reservation: Reservation) -> Result<()> {
        if reservation.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        let result = self.release_runs(reservation.runs());
        let result = self.guard(result);
        // The tables go to disk, then the clusters are freed.
        result.and_then(|()| self.flush())
    }

    fn release_runs(&self, runs: &[ReservedRun]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let mut meta = self.lock_meta()?;
        for run in runs {
            for i in 0..run.clusters {
                let guest = run.guest + i * cluster_size;
                let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
                let index = self.geometry.l2_index(guest) * self.geometry.l2_entry_words();
                let entry = table.get(index).map_or(0, |e| e.load(Ordering::Acquire));
                if entry == (run.host + i * cluster_size) | OFLAG_COPIED {
                    self.set_l2_words(&mut meta, l2_offset, &table, guest, 0, 0)?;
                }
            }
        }
        Ok(())
    }

    fn reserve_range(&self, offset: u64, len: u64, reserved: &mut Reservation) -> Result<()> {
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
            reserved.push(ReservedRun {
                guest,
                host,
                clusters: n,
            });
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
