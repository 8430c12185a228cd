//! Growing a QCOW2 image, and with it the L1 table.
//!
//! A larger disk may need more L1 entries than the table has. The new,
//! larger table is written to new clusters (counted before anything points
//! at them), then the header is switched to it and to the new size in one
//! write of its contiguous fields, and the old table's clusters are released
//! once that is on disk. Where a longer backing file lies beneath the new
//! part, it is given the zero flag before the size changes. Shrinking has
//! its own module ([`shrink`](super::shrink)).

use std::sync::atomic::AtomicU64;

use qcow_format::header::field;
use qcow_format::limits::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Changes the virtual disk to `new_size` bytes. Growing grows the L1
    /// table when the new size needs more entries; the new part reads as
    /// zeros, also where a longer backing file lies beneath it (those
    /// clusters get the zero flag, as QEMU gives them). Shrinking releases
    /// what lay past the new end and cuts the file where it can (see
    /// [`shrink`](super::shrink)); what lay there is lost.
    ///
    /// Every limit is checked before anything changes; the size in the
    /// header changes last, so a failure leaves the old disk as it was.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.resize_preallocated(new_size, super::Preallocation::Off)
    }

    /// [`Qcow2Image::resize`], with the grown part preallocated as `mode`
    /// says (see [`Qcow2Image::preallocate`]); refused for a shrink, as
    /// QEMU refuses it.
    pub fn resize_preallocated(&mut self, new_size: u64, mode: super::Preallocation) -> Result<()> {
        let old_size = self.virtual_size;
        if new_size < old_size && mode != super::Preallocation::Off {
            return Err(Error::InvalidOptions(format!(
                "{}: Preallocation can only be used for growing images",
                self.name
            )));
        }
        // The file's new space is taken before anything changes, so that a
        // full disk or a file size limit refuses the resize as it was.
        let zeroed_from = self.take_space_for_preallocation(old_size, new_size, mode)?;
        let result = match self.change_size(new_size) {
            Ok(()) => self.preallocate_range(old_size, new_size, mode, zeroed_from),
            Err(e) => {
                // Nothing points into the space taken: give it back.
                if let Some(eof) = zeroed_from {
                    let _ = self.file.set_len(eof);
                }
                Err(e)
            }
        };
        self.guard(result)
    }

    fn change_size(&mut self, new_size: u64) -> Result<()> {
        let invalid = |what: String| Error::InvalidOptions(format!("{}: {what}", self.name));
        if new_size % 512 != 0 {
            return Err(invalid("The new size must be a multiple of 512".into()));
        }
        // Snapshots record their own disk size only from version 3 on.
        if !self.snapshots.is_empty() && self.header.version < 3 {
            return Err(invalid(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        // Bitmaps found in use cannot be resized (QEMU refuses too), nor
        // ones the new size would make too large.
        self.check_bitmaps_usable()?;
        self.check_bitmaps_fit(new_size)?;
        // Every bitmap stays marked in use until its bits have the new size
        // (a crash meanwhile leaves bitmaps in use, not of the wrong size).
        self.begin_bitmap_resize()?;
        let result = self.change_size_unheld(new_size);
        if result.is_ok() {
            self.resize_bitmaps();
        }
        self.end_bitmap_resize();
        result.and_then(|()| self.flush())
    }

    fn change_size_unheld(&mut self, new_size: u64) -> Result<()> {
        let invalid = |what: String| Error::InvalidOptions(format!("{}: {what}", self.name));
        let old_size = self.virtual_size;
        if new_size < old_size {
            self.check_writable()?;
            return self.shrink(new_size);
        }
        let needed = new_size.div_ceil(self.header.bytes_per_l2_table());
        if new_size > MAX_VIRTUAL_SIZE || needed > MAX_L1_BYTES / 8 {
            return Err(invalid(
                "Failed to grow the L1 table: File too large (the size needs more L1 entries than an image may have; try a larger cluster size)".into(),
            ));
        }
        self.check_writable()?;
        // What a longer backing file would show in the new part must be
        // zeroed; version 2 has no zero flag to do it with (QEMU refuses too).
        // As QEMU, the whole new part is zeroed once the backing file
        // reaches into it, so the layout matches qemu-img's.
        let backing_len = self.backing.as_ref().map_or(0, |b| b.virtual_size());
        let zero_end = if backing_len > old_size {
            new_size
        } else {
            old_size
        };
        if zero_end > old_size && self.header.version < 3 {
            return Err(invalid(
                "Failed to zero out new clusters: Operation not supported (compat=0.10 images cannot hide a longer backing file)".into(),
            ));
        }
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        if zero_end > old_size {
            // Zero entries past the on-disk size are harmless if the size
            // change never lands.
            self.virtual_size = new_size;
            let zeroed = self
                .write_zeroes(old_size, zero_end - old_size, false)
                .and_then(|()| self.flush());
            if let Err(e) = zeroed {
                self.virtual_size = old_size;
                return Err(e);
            }
        }
        let at = field::SIZE;
        let written = self
            .file
            .write_at(&new_size.to_be_bytes(), at)
            .map_err(|e| Error::io(&self.name, "writing the header", at, e));
        if let Err(e) = written {
            self.virtual_size = old_size;
            return Err(e);
        }
        self.header.virtual_size = new_size;
        self.virtual_size = new_size;
        self.flush()
    }

    /// Moves the L1 table to a new one of at least `entries` entries.
    pub(super) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        // Exactly as many entries as the size needs, as QEMU's resize makes
        // the table, and only they are written: the file's length comes out
        // as qemu-img's.
        let entries = entries.min(MAX_L1_BYTES / 8);
        let bytes = entries * 8;
        let old_offset = self.header.l1_table_offset;
        let old_clusters = (u64::from(self.header.l1_size) * 8).div_ceil(cluster_size);
        let new_offset = {
            let mut meta = self.lock_meta()?;
            let clusters = bytes.div_ceil(cluster_size);
            let offset = meta.clusters(clusters)?;
            // Marked before it is written (a give-back unmarks it again).
            super::allocator::Owner::metadata_placed(self, offset, clusters * cluster_size);
            let table: Vec<u8> = (0..entries)
                .flat_map(|i| self.l1_entry(i).to_be_bytes())
                .collect();
            let mut fields = [0u8; 12];
            // Bounded by MAX_L1_BYTES / 8 above.
            fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
            fields[4..].copy_from_slice(&offset.to_be_bytes());
            // The new table and its refcounts are on disk before the header
            // points at them.
            let switched = self
                .file
                .write_at(&table, offset)
                .map_err(|e| Error::io(&self.name, "writing the L1 table", offset, e))
                .and_then(|()| self.flush_refcounts())
                .and_then(|()| {
                    self.file
                        .flush()
                        .map_err(|e| Error::io(&self.name, "flushing", 0, e))
                })
                .and_then(|()| {
                    self.file
                        .write_at(&fields, field::L1_SIZE)
                        .map_err(|e| Error::io(&self.name, "writing the header", field::L1_SIZE, e))
                });
            if let Err(e) = switched {
                // The header still names the old table.
                meta.give_back(offset, clusters);
                return Err(e);
            }
            for i in 0..old_clusters {
                meta.pending_frees.push(old_offset + i * cluster_size);
            }
            offset
        };
        let mut l1: Vec<AtomicU64> = std::mem::take(&mut self.l1);
        l1.resize_with(entries as usize, || AtomicU64::new(0));
        self.l1 = l1;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = new_offset;
        Ok(())
    }
}
