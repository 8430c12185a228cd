//! Internal snapshots made, applied and deleted, as QEMU's
//! `block/qcow2-snapshot.c` does it.
//!
//! A snapshot is a copy of the active L1 table plus one more reference to
//! every cluster that table reaches (its L2 tables, their data clusters and
//! compressed data): every shared cluster then has a refcount above one and
//! loses `OFLAG_COPIED`, so that the next write to it copies it first.
//!
//! - Create: the L1 copy goes to new clusters; the active tables lose
//!   `OFLAG_COPIED`; the tree's refcounts go up; the new snapshot table is
//!   switched in (see [`snapshot_table`](super::snapshot_table)).
//! - Apply: the snapshot's tree gains a reference, the active L1 table is
//!   overwritten with the snapshot's (after a resize to the snapshot's disk
//!   size), and the old active tree loses its reference.
//! - Delete: the table without the entry is switched in first; then the
//!   snapshot's tree loses its reference, its L1 table is freed, and active
//!   entries owned alone again get `OFLAG_COPIED` back.
//!
//! Crash rule: a crash leaves the old snapshot table or the new one, never
//! a mix, and every cluster a table names keeps a refcount at least as high
//! as its references (leaks allowed). Between the steps, refcounts and
//! `OFLAG_COPIED` flags disagree for a moment (QEMU has the same windows);
//! a version 3 image is therefore marked dirty for the whole operation, so
//! that the next writer (qcow or QEMU) rebuilds its refcounts and flags.

use std::sync::atomic::Ordering;

use qcow_format::header::INCOMPAT_DIRTY;
use qcow_format::limits::MAX_SNAPSHOTS;
use qcow_format::snapshot::Snapshot;
use qcow_format::table::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};

use super::Qcow2Image;
use super::allocator::{Allocation, Owner};
use crate::{Error, Result};

/// What a new snapshot records besides the disk. qemu-img's `snapshot -c`
/// records the name and the time; a VM monitor also records its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewSnapshot {
    /// The snapshot's name (need not be unique, as with QEMU).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation (qemu-img records 0).
    pub icount: u64,
}

impl NewSnapshot {
    /// A snapshot named `name`, taken now, with a guest clock of zero.
    pub fn new(name: &str) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        NewSnapshot {
            name: name.to_owned(),
            // Seconds fit 32 bits until 2106, as the format's field does.
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            icount: 0,
        }
    }

    /// Sets the creation time.
    pub fn date(mut self, sec: u32, nsec: u32) -> Self {
        self.date_sec = sec;
        self.date_nsec = nsec;
        self
    }

    /// Sets the guest clock.
    pub fn vm_clock_nsec(mut self, nsec: u64) -> Self {
        self.vm_clock_nsec = nsec;
        self
    }

    /// Sets the instruction count.
    pub fn icount(mut self, icount: u64) -> Self {
        self.icount = icount;
        self
    }
}

/// Which references an operation adds to or takes from a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delta {
    Add,
    Remove,
}

impl Qcow2Image {
    /// Takes an internal snapshot of the disk as it is now, as qemu-img
    /// `snapshot -c` does; returns its entry. Its ID is one more than the
    /// highest numeric ID so far.
    pub fn create_snapshot(&mut self, new: &NewSnapshot) -> Result<Snapshot> {
        self.check_snapshot_target()?;
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::NoSpace {
                image: self.name.clone(),
                what: "the snapshot table",
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        let next_id = self
            .snapshots
            .iter()
            .map(|s| leading_number(&s.id))
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let mut snapshot = Snapshot {
            l1_table_offset: 0,
            l1_size: u32::try_from(self.l1.len()).unwrap_or(u32::MAX),
            id: next_id.to_string(),
            name: new.name.clone(),
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: 0,
            disk_size: Some(self.virtual_size),
            icount: Some(new.icount),
            extra_data: Vec::new(),
        };
        // The entry must encode before anything changes (a name too long),
        // and every refcount must have room for one more reference.
        snapshot
            .encode(0)
            .map_err(|e| Error::format(&self.name, e))?;
        self.flush()?;
        self.check_room_for_references(&self.active_l1())?;
        self.while_dirty(|image| {
            snapshot.l1_table_offset = image.write_l1_copy()?;
            image.clear_active_copied_flags()?;
            let active = image.active_l1();
            {
                let mut meta = image.lock_meta()?;
                image.change_tree_refcounts(&mut meta, &active, Delta::Add)?;
            }
            image.flush()?;
            let mut snapshots = image.snapshots.clone();
            snapshots.push(snapshot.clone());
            image.write_snapshot_table(snapshots)
        })?;
        Ok(snapshot)
    }

    /// Reverts the disk to the snapshot whose ID, or else whose name, is
    /// `id_or_name` (QEMU's lookup), resizing it to the snapshot's disk
    /// size. What the disk held since is lost, unless another snapshot
    /// keeps it.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.check_snapshot_target()?;
        let index = self.find_snapshot(id_or_name, true)?;
        if !self.bitmaps.is_empty() {
            // QEMU refuses too: the bitmaps would describe another disk.
            return Err(Error::Bitmap {
                image: self.name.clone(),
                reason: "Device has active dirty bitmaps".into(),
            });
        }
        let snapshot = self.snapshots[index].clone();
        let snapshot_l1 = self.read_snapshot_l1(&snapshot)?;
        self.flush()?;
        self.check_room_for_references(&snapshot_l1)?;
        // What only the snapshot kept goes back to the file system, as QEMU
        // passes on the discards of a snapshot's clusters.
        self.punching_freed(|image| {
            image.while_dirty(|image| {
                let disk_size = snapshot.disk_size.unwrap_or(image.virtual_size);
                if disk_size != image.virtual_size {
                    image.resize(disk_size)?;
                }
                let entries = snapshot_l1.len().max(image.l1.len());
                if entries > image.l1.len() {
                    image.grow_l1(entries as u64)?;
                }
                // The snapshot's tables, shared from now on: no entry owns its
                // cluster alone.
                let mut new_l1: Vec<u64> = snapshot_l1.iter().map(|e| e & !OFLAG_COPIED).collect();
                new_l1.resize(image.l1.len(), 0);
                {
                    let mut meta = image.lock_meta()?;
                    image.change_tree_refcounts(&mut meta, &new_l1, Delta::Add)?;
                }
                // The snapshot's own L1 table no longer owns any table
                // alone: its flags say so, as QEMU rewrites them.
                if snapshot_l1.iter().any(|e| e & OFLAG_COPIED != 0) {
                    let bytes: Vec<u8> = snapshot_l1
                        .iter()
                        .flat_map(|e| (e & !OFLAG_COPIED).to_be_bytes())
                        .collect();
                    let at = snapshot.l1_table_offset;
                    image.file.write_at(&bytes, at).map_err(|e| {
                        Error::io(&image.name, "writing a snapshot L1 table", at, e)
                    })?;
                }
                image.flush()?;
                let old_l1 = image.active_l1();
                image.write_active_l1(&new_l1)?;
                for (slot, &entry) in image.l1.iter().zip(&new_l1) {
                    slot.store(entry, Ordering::Release);
                }
                image.l2.clear_clean();
                {
                    let mut meta = image.lock_meta()?;
                    image.change_tree_refcounts(&mut meta, &old_l1, Delta::Remove)?;
                }
                image.flush()?;
                image.set_copied_flags_below(&old_l1)?;
                image.set_active_copied_flags()?;
                image.flush()
            })
        })
    }

    /// Deletes the first snapshot named `name` (qemu-img `snapshot -d`
    /// looks snapshots up by name only); see
    /// [`Qcow2Image::delete_snapshot_by_id`].
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        self.check_snapshot_target()?;
        let index = self.find_snapshot(name, false)?;
        self.delete_snapshot_at(index)
    }

    /// Deletes the snapshot with ID `id`: its entry leaves the table first,
    /// then its clusters lose its references (those only it kept are
    /// freed) and its L1 table is freed.
    pub fn delete_snapshot_by_id(&mut self, id: &str) -> Result<()> {
        self.check_snapshot_target()?;
        let index = self
            .snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: id.to_owned(),
            })?;
        self.delete_snapshot_at(index)
    }

    fn delete_snapshot_at(&mut self, index: usize) -> Result<()> {
        let snapshot = self.snapshots[index].clone();
        let snapshot_l1 = self.read_snapshot_l1(&snapshot)?;
        // What only the snapshot kept goes back to the file system, as QEMU
        // passes on the discards of a snapshot's clusters.
        self.punching_freed(|image| {
            image.while_dirty(|image| {
                let mut snapshots = image.snapshots.clone();
                snapshots.remove(index);
                image.write_snapshot_table(snapshots)?;
                // From here on a failure only leaks clusters.
                let cluster_size = image.header.cluster_size();
                let l1_clusters = (u64::from(snapshot.l1_size) * 8).div_ceil(cluster_size);
                {
                    let mut meta = image.lock_meta()?;
                    image.change_tree_refcounts(&mut meta, &snapshot_l1, Delta::Remove)?;
                    for i in 0..l1_clusters {
                        let cluster = (snapshot.l1_table_offset >> image.header.cluster_bits) + i;
                        meta.change_refcount(cluster, -1)?;
                    }
                }
                image.flush()?;
                image.set_copied_flags_below(&snapshot_l1)?;
                image.set_active_copied_flags()?;
                image.flush()
            })
        })
    }

    /// Refuses snapshot operations where QEMU refuses them.
    fn check_snapshot_target(&self) -> Result<()> {
        self.check_writable()?;
        if self.header.has_data_file() {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "internal snapshots of an image with an external data file".into(),
            });
        }
        if self.snapshot.is_some() {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "snapshot operations on an opened snapshot".into(),
            });
        }
        Ok(())
    }

    /// The index of the snapshot with ID `key` (when `by_id`) or else with
    /// name `key`.
    fn find_snapshot(&self, key: &str, by_id: bool) -> Result<usize> {
        by_id
            .then(|| self.snapshots.iter().position(|s| s.id == key))
            .flatten()
            .or_else(|| self.snapshots.iter().position(|s| s.name == key))
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: key.to_owned(),
            })
    }

    /// Reads a snapshot's L1 table, refusing one that does not fit in the
    /// file or is larger than an L1 table may be (as QEMU validates it).
    pub(super) fn read_snapshot_l1(&self, snapshot: &Snapshot) -> Result<Vec<u64>> {
        self.check_snapshot_l1(snapshot)?;
        super::read_l1(
            &self.name,
            &*self.file,
            snapshot.l1_table_offset,
            snapshot.l1_size,
        )
    }

    /// Runs `op` with a version 3 image marked dirty: a crash or a failure
    /// inside leaves the mark, and the next writer rebuilds the refcounts.
    /// The mark is cleared after success unless it was set before (lazy
    /// refcounts keep it until the image is closed).
    fn while_dirty(&mut self, op: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.flush()?;
        let ws = self.write_state()?;
        let was_dirty = ws.incompatible.load(Ordering::Acquire) & INCOMPAT_DIRTY != 0;
        self.update_incompatible(|bits| bits | INCOMPAT_DIRTY)?;
        let result = op(self);
        let result = self.guard(result);
        match result {
            Ok(()) if !was_dirty => {
                self.flush()?;
                self.update_incompatible(|bits| bits & !INCOMPAT_DIRTY)
            }
            Ok(()) => Ok(()),
            Err(e) => {
                self.write_state()?.keep_dirty();
                Err(e)
            }
        }
    }

    /// The active L1 table's entries.
    fn active_l1(&self) -> Vec<u64> {
        self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect()
    }

    /// Writes a copy of the active L1 table (without `OFLAG_COPIED`: a
    /// snapshot owns nothing alone) to new clusters; returns its offset
    /// (0 for an empty table).
    fn write_l1_copy(&self) -> Result<u64> {
        let entries: Vec<u64> = self.active_l1().iter().map(|e| e & !OFLAG_COPIED).collect();
        if entries.is_empty() {
            return Ok(0);
        }
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let cluster_size = self.header.cluster_size();
        let clusters = (bytes.len() as u64).div_ceil(cluster_size);
        let mut meta = self.lock_meta()?;
        let offset = meta.clusters(clusters)?;
        Owner::metadata_placed(self, offset, clusters * cluster_size);
        if let Err(e) = self.file.write_at(&bytes, offset) {
            meta.give_back(offset, clusters);
            return Err(Error::io(
                &self.name,
                "writing a snapshot L1 table",
                offset,
                e,
            ));
        }
        Ok(offset)
    }

    /// Writes `entries` over the active L1 table on disk, durably.
    fn write_active_l1(&self, entries: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let at = self.header.l1_table_offset;
        self.file
            .write_at(&bytes, at)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))
    }

    /// Refuses, before anything changes, a tree whose clusters cannot all
    /// take one more reference (narrow refcounts, or compressed clusters
    /// packed many to a host cluster): QEMU fails halfway there instead.
    /// Only clusters counted above half the maximum can overflow (a
    /// cluster's count includes the tree's own references to it), so only
    /// those are tallied.
    fn check_room_for_references(&self, l1: &[u64]) -> Result<()> {
        let order = self.header.refcount_order;
        let max = if order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let bits = self.header.cluster_bits;
        let mut tally: std::collections::HashMap<u64, (u64, u64)> = Default::default();
        let meta = self.lock_meta()?;
        let mut count = |cluster: u64| -> Result<()> {
            if let Some((_, n)) = tally.get_mut(&cluster) {
                *n += 1;
                return Ok(());
            }
            let refcount = meta.refcount(cluster)?;
            if refcount > max / 2 {
                tally.insert(cluster, (refcount, 1));
            }
            Ok(())
        };
        self.walk_tree(l1, &mut |host, len| {
            let last = (host + len.max(1) - 1) >> bits;
            (host >> bits..=last).try_for_each(&mut count)
        })?;
        drop(meta);
        match tally
            .iter()
            .find(|(_, (refcount, n))| refcount.checked_add(*n).is_none_or(|total| total > max))
        {
            Some((&cluster, _)) => Err(Error::RefcountOverflow {
                image: self.name.clone(),
                cluster: cluster << bits,
                max,
            }),
            None => Ok(()),
        }
    }

    /// Calls `visit(host, len)` for every host range the L1 table `l1`
    /// reaches: each data cluster and compressed extent of each L2 table,
    /// then the L2 table itself.
    fn walk_tree(&self, l1: &[u64], visit: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let words = self.geometry.l2_entry_words();
        for (index, &entry) in l1.iter().enumerate() {
            let Some(l2_offset) = self
                .geometry
                .l1_entry(index as u64, entry)
                .map_err(|e| Error::format(&self.name, e))?
            else {
                continue;
            };
            let table = self.l2_table(index as u64, l2_offset)?;
            for word in table.iter().step_by(words) {
                let word = word.load(Ordering::Acquire);
                let Some((host, len)) = self.geometry.l2_host_range(word) else {
                    continue;
                };
                if word & OFLAG_COMPRESSED == 0 && host % cluster_size != 0 {
                    return Err(Error::Corrupt {
                        image: self.name.clone(),
                        table: "L2 table",
                        offset: l2_offset,
                        reason: format!("cluster offset {host:#x} is not aligned"),
                    });
                }
                visit(host, len)?;
            }
            visit(l2_offset, cluster_size)?;
        }
        Ok(())
    }

    /// Adds or removes one reference to every cluster the L1 table `l1`
    /// reaches: each L2 table, and once per L2 table each data cluster and
    /// each cluster compressed data touches (as QEMU counts them).
    fn change_tree_refcounts(
        &self,
        meta: &mut Allocation<'_>,
        l1: &[u64],
        delta: Delta,
    ) -> Result<()> {
        let delta = match delta {
            Delta::Add => 1,
            Delta::Remove => -1,
        };
        let bits = self.header.cluster_bits;
        self.walk_tree(l1, &mut |host, len| {
            let last = (host + len.max(1) - 1) >> bits;
            for cluster in host >> bits..=last {
                meta.change_refcount(cluster, delta)?;
            }
            Ok(())
        })
    }

    /// Clears `OFLAG_COPIED` from every active L1 and L2 entry (before a
    /// snapshot shares them all). A crash meanwhile leaves flags clear on
    /// clusters still owned alone: writes copy them needlessly, never
    /// overwrite shared data.
    fn clear_active_copied_flags(&self) -> Result<()> {
        let words = self.geometry.l2_entry_words();
        for index in 0..self.l1.len() as u64 {
            let entry = self.l1_entry(index);
            let Some(l2_offset) = self
                .geometry
                .l1_entry(index, entry)
                .map_err(|e| Error::format(&self.name, e))?
            else {
                continue;
            };
            // Every table, also one already shared: a damaged image may
            // carry OFLAG_COPIED where it should not, and after the
            // snapshot no entry may keep it.
            let table = self.l2_table(index, l2_offset)?;
            let mut changed = false;
            for word in table.iter().step_by(words) {
                if word.fetch_and(!OFLAG_COPIED, Ordering::AcqRel) & OFLAG_COPIED != 0 {
                    changed = true;
                }
            }
            if changed {
                self.l2.mark_dirty(l2_offset, table)?;
            }
        }
        self.l2.flush()?;
        let cleared: Vec<u64> = self.active_l1().iter().map(|e| e & !OFLAG_COPIED).collect();
        self.write_active_l1(&cleared)?;
        for (slot, &entry) in self.l1.iter().zip(&cleared) {
            slot.store(entry, Ordering::Release);
        }
        Ok(())
    }

    /// After `l1`'s tree let go of its references: `OFLAG_COPIED` in the
    /// tables it reached that other trees keep (and that are not active,
    /// see [`Qcow2Image::set_active_copied_flags`]) says again whether each
    /// cluster is referenced once, as QEMU rewrites those flags while it
    /// walks the tree.
    fn set_copied_flags_below(&self, l1: &[u64]) -> Result<()> {
        let words = self.geometry.l2_entry_words();
        let bits = self.header.cluster_bits;
        let active: std::collections::HashSet<u64> =
            self.active_l1().iter().map(|e| e & OFFSET_MASK).collect();
        let mut seen = std::collections::HashSet::new();
        for &entry in l1 {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 || active.contains(&l2_offset) || !seen.insert(l2_offset) {
                continue;
            }
            let meta = self.lock_meta()?;
            if meta.refcount(l2_offset >> bits)? == 0 {
                continue;
            }
            let mut table = self.read_l2_words(l2_offset)?;
            let mut changed = false;
            for word in table.iter_mut().step_by(words) {
                let host = *word & OFFSET_MASK;
                if *word & OFLAG_COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let want = if meta.refcount(host >> bits)? == 1 {
                    *word | OFLAG_COPIED
                } else {
                    *word & !OFLAG_COPIED
                };
                changed |= want != *word;
                *word = want;
            }
            drop(meta);
            if changed {
                let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                self.file
                    .write_at(&bytes, l2_offset)
                    .map_err(|e| Error::io(&self.name, "writing an L2 table", l2_offset, e))?;
                self.l2.forget(l2_offset);
            }
        }
        Ok(())
    }

    /// Makes `OFLAG_COPIED` on every active entry say whether its cluster
    /// is referenced exactly once, as QEMU's check requires after a snapshot
    /// lets go of clusters or an applied snapshot's tables become active
    /// (flags in inactive tables mean nothing and may be stale: a version 2
    /// downgrade, for one, writes them).
    fn set_active_copied_flags(&self) -> Result<()> {
        let words = self.geometry.l2_entry_words();
        let bits = self.header.cluster_bits;
        let mut l1_changed = false;
        let meta = self.lock_meta()?;
        for index in 0..self.l1.len() as u64 {
            let entry = self.l1_entry(index);
            let Some(l2_offset) = self
                .geometry
                .l1_entry(index, entry)
                .map_err(|e| Error::format(&self.name, e))?
            else {
                continue;
            };
            let table = self.l2_table(index, l2_offset)?;
            let mut changed = false;
            for word in table.iter().step_by(words) {
                let value = word.load(Ordering::Acquire);
                let host = value & OFFSET_MASK;
                if value & OFLAG_COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let alone = meta.refcount(host >> bits)? == 1;
                if alone != (value & OFLAG_COPIED != 0) {
                    if alone {
                        word.fetch_or(OFLAG_COPIED, Ordering::AcqRel);
                    } else {
                        word.fetch_and(!OFLAG_COPIED, Ordering::AcqRel);
                    }
                    changed = true;
                }
            }
            if changed {
                self.l2.mark_dirty(l2_offset, table)?;
            }
            let alone = meta.refcount(l2_offset >> bits)? == 1;
            let flagged = if alone {
                entry | OFLAG_COPIED
            } else {
                entry & !OFLAG_COPIED
            };
            if let Some(slot) = self.l1.get(index as usize) {
                slot.store(flagged, Ordering::Release);
                l1_changed |= flagged != entry;
            }
        }
        drop(meta);
        // The refcounts that allow the flags are on disk before them.
        self.flush()?;
        if l1_changed {
            self.write_active_l1(&self.active_l1())?;
        }
        Ok(())
    }
}

/// The number a snapshot ID starts with, as `strtoul` reads it (0 when it
/// starts with none), for choosing the next ID as QEMU does.
fn leading_number(id: &str) -> u64 {
    let digits: &str = &id[..id.find(|c: char| !c.is_ascii_digit()).unwrap_or(id.len())];
    digits
        .parse()
        .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
}

#[cfg(test)]
mod tests {
    use super::leading_number;

    #[test]
    fn ids_are_read_as_strtoul_reads_them() {
        assert_eq!(leading_number("7"), 7);
        assert_eq!(leading_number("12abc"), 12);
        assert_eq!(leading_number("abc"), 0);
        assert_eq!(leading_number(""), 0);
    }
}
