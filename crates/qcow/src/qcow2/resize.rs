//! Growing a QCOW2 image, and with it the L1 table.
//!
//! A larger disk may need more L1 entries than the table has. The new,
//! larger table is written to new clusters (counted before anything points
//! at them), then the header is switched to it and to the new size in one
//! write of its contiguous fields, and the old table's clusters are released
//! once that is on disk. Shrinking is not supported yet.

use std::sync::atomic::AtomicU64;

use qcow_format::limits::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};

use super::Qcow2Image;
use crate::{Error, Result};

/// Offset of the header's virtual size.
const SIZE_AT: u64 = 24;
/// Offset of the header's L1 size, followed by the L1 table offset.
const L1_AT: u64 = 36;

impl Qcow2Image {
    /// Grows the virtual disk to `new_size` bytes (the new part reads as
    /// zeros, or from the backing file where it is larger), growing the L1
    /// table when the new size needs more entries.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        let unsupported = |what: &str| Error::Unsupported {
            image: self.name.clone(),
            what: what.to_owned(),
        };
        if new_size < self.virtual_size {
            return Err(unsupported("shrinking an image"));
        }
        if !self.snapshots.is_empty() {
            return Err(unsupported("resizing an image with internal snapshots"));
        }
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidOptions(format!(
                "size {new_size} is too large"
            )));
        }
        self.check_writable()?;
        let needed = new_size.div_ceil(self.header.bytes_per_l2_table());
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.file
            .write_at(&new_size.to_be_bytes(), SIZE_AT)
            .map_err(|e| Error::io(&self.name, "writing the header", SIZE_AT, e))?;
        self.header.virtual_size = new_size;
        self.virtual_size = new_size;
        self.flush()
    }

    /// Moves the L1 table to a new one of at least `entries` entries.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        // Room to grow again without moving each time, as QEMU leaves it.
        let entries = (entries + entries / 2)
            .next_multiple_of(cluster_size / 8)
            .min(MAX_L1_BYTES / 8);
        let bytes = entries * 8;
        let old_offset = self.header.l1_table_offset;
        let old_clusters = (u64::from(self.header.l1_size) * 8).div_ceil(cluster_size);
        let new_offset = {
            let mut meta = self.lock_meta()?;
            let offset = self.alloc_clusters(&mut meta, bytes / cluster_size)?;
            let table: Vec<u8> = (0..entries)
                .flat_map(|i| self.l1_entry(i).to_be_bytes())
                .collect();
            self.file
                .write_at(&table, offset)
                .map_err(|e| Error::io(&self.name, "writing the L1 table", offset, e))?;
            // The new table and its refcounts are on disk before the header
            // points at them.
            self.flush_refcounts()?;
            self.file
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
            let mut fields = [0u8; 12];
            // Bounded by MAX_L1_BYTES / 8 above.
            fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
            fields[4..].copy_from_slice(&offset.to_be_bytes());
            self.file
                .write_at(&fields, L1_AT)
                .map_err(|e| Error::io(&self.name, "writing the header", L1_AT, e))?;
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
