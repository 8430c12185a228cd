//! Rebuilding refcounts from the metadata that references clusters, for
//! images left dirty by a crash with lazy refcounts ("Dirty bit" in the
//! specification: "refcounts may be inconsistent").
//!
//! Every reference is counted: the header, the active and snapshot L1
//! tables, the L2 tables they name, data clusters (compressed ones by every
//! cluster their sectors touch) and the snapshot table. New refcount blocks
//! and a new refcount table are written past everything else, then the
//! header is switched to them in one write, so a crash during the rebuild
//! leaves the old (dirty) state in place. `OFLAG_COPIED` is then set exactly
//! on the entries whose cluster is referenced once.

use std::collections::HashMap;

use qcow_format::header::INCOMPAT_DIRTY;
use qcow_format::limits::MAX_REFCOUNT_TABLE_BYTES;
use qcow_format::table::{OFFSET_MASK, OFLAG_COPIED, refcount_set};
use qcow_io::Storage;

use super::references::{Use, Visitor};
use super::{Qcow2Image, decode_be_words};
use crate::{Error, Result};

/// Reference counts by cluster number.
type Counts = HashMap<u64, u64>;

/// Counts the references of the walk; any problem stops the rebuild (a
/// damaged image is left for `check -r all`).
struct RebuildCounter<'a> {
    image: &'a str,
    cluster_bits: u32,
    file_end: u64,
    counts: Counts,
}

impl Visitor for RebuildCounter<'_> {
    fn used(&mut self, offset: u64, len: u64, times: u64, what: Use) -> Result<()> {
        // The old refcount table is replaced, not kept: not counted.
        let counted = what.counted() && what != Use::Metadata("refcount table");
        if !counted || len == 0 {
            return Ok(());
        }
        // Every reference must lie inside the file: a damaged entry must
        // not make the rebuild place refcount blocks at its offset.
        if offset.saturating_add(len) > self.file_end {
            return Err(Error::Corrupt {
                image: self.image.to_owned(),
                table: "metadata",
                offset,
                reason: format!("a reference of {len} bytes lies past the end of the file"),
            });
        }
        for c in (offset >> self.cluster_bits)..=((offset + len - 1) >> self.cluster_bits) {
            *self.counts.entry(c).or_insert(0) += times;
        }
        Ok(())
    }

    fn problem(&mut self, _times: u64, message: String) -> Result<()> {
        Err(Error::Corrupt {
            image: self.image.to_owned(),
            table: "metadata",
            offset: 0,
            reason: message,
        })
    }
}

impl Qcow2Image {
    /// Recomputes every refcount of a dirty image and clears its dirty bit.
    pub(super) fn rebuild_refcounts(&mut self) -> Result<()> {
        let cs = self.header.cluster_size();
        let mut counter = RebuildCounter {
            image: &self.name,
            cluster_bits: self.header.cluster_bits,
            file_end: self.file_len().next_multiple_of(cs),
            counts: Counts::new(),
        };
        self.walk_references(&mut counter)?;
        let counts = counter.counts;
        let used_end = counts.keys().max().map_or(1, |m| m + 1);
        self.write_rebuilt_refcounts(used_end, &|c| counts.get(&c).copied().unwrap_or(0))?;
        self.fix_copied_flags(&counts)?;
        // The refcounts are consistent again: clear the dirty bit.
        self.header.incompatible_features &= !INCOMPAT_DIRTY;
        if self.header.version >= 3 {
            let at = qcow_format::header::field::INCOMPATIBLE_FEATURES;
            self.file
                .write_at(&self.header.incompatible_features.to_be_bytes(), at)
                .map_err(|e| Error::io(&self.name, "clearing the dirty bit", at, e))?;
        }
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }

    /// The L2 table at `offset` as stored, refused when misaligned or past
    /// the end of the file (it is written back where it was read).
    pub(super) fn read_l2_words(&self, offset: u64) -> Result<Vec<u64>> {
        let cs = self.header.cluster_size();
        if offset % cs != 0 || offset.saturating_add(cs) > self.file_len() {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "L2 table",
                offset,
                reason: "misaligned or past the end of the file".into(),
            });
        }
        // One cluster: at most 2 MiB.
        let mut bytes = vec![0u8; cs as usize];
        self.file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.name, "reading an L2 table", offset, e))?;
        Ok(decode_be_words(&bytes))
    }

    /// Writes refcount blocks and a table holding `count(cluster)` for
    /// every cluster below `used_end` (plus their own clusters) past the
    /// last referenced cluster, then points the header at them.
    pub(super) fn write_rebuilt_refcounts(
        &mut self,
        used_end: u64,
        count: &dyn Fn(u64) -> u64,
    ) -> Result<()> {
        let (table_offset, table_clusters) =
            self.write_refcount_structure(used_end, self.header.refcount_order, count)?;
        self.point_header_at_refcounts(table_offset, table_clusters)
    }

    /// Points the header at the refcount table at `table_offset`.
    fn point_header_at_refcounts(&mut self, table_offset: u64, table_clusters: u64) -> Result<()> {
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        // Bounded by MAX_REFCOUNT_TABLE_BYTES.
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.file
            .write_at(&fields, qcow_format::header::field::REFCOUNT_TABLE_OFFSET)
            .map_err(|e| {
                Error::io(
                    &self.name,
                    "writing the header",
                    qcow_format::header::field::REFCOUNT_TABLE_OFFSET,
                    e,
                )
            })?;
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(())
    }

    /// Writes refcount blocks of width `2^order` bits and a table holding
    /// `count(cluster)` for every cluster below `used_end` (plus their own
    /// clusters) past the end of the file, and flushes them; nothing points
    /// at them yet. Returns the table's offset and clusters.
    pub(super) fn write_refcount_structure(
        &mut self,
        used_end: u64,
        order: u32,
        count: &dyn Fn(u64) -> u64,
    ) -> Result<(u64, u64)> {
        let bits = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        let per_block = cs * 8 / (1u64 << order);
        let start = used_end.max(1).max(self.file_len().div_ceil(cs));
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let end = start + table_clusters + blocks;
            let b = end.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::format(
                &self.name,
                qcow_format::FormatError::TooLarge {
                    structure: "refcount table",
                    size: table_clusters * cs,
                    limit: MAX_REFCOUNT_TABLE_BYTES,
                },
            ));
        }
        let table_start = start;
        let blocks_start = start + table_clusters;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        for block in 0..blocks {
            // One cluster per block.
            let mut bytes = vec![0u8; cs as usize];
            for i in 0..per_block {
                let c = block * per_block + i;
                let own = u64::from(c >= table_start && c < blocks_start + blocks);
                let n = if c < used_end { count(c) } else { 0 } + own;
                if n > max {
                    return Err(Error::RefcountOverflow {
                        image: self.name.clone(),
                        cluster: c << bits,
                        max,
                    });
                }
                if n > 0 {
                    refcount_set(&mut bytes, i, order, n);
                }
            }
            let at = (blocks_start + block) << bits;
            self.file
                .write_at(&bytes, at)
                .map_err(|e| Error::io(&self.name, "writing a refcount block", at, e))?;
        }
        let table: Vec<u8> = (0..blocks)
            .flat_map(|b| ((blocks_start + b) << bits).to_be_bytes())
            .collect();
        let table_offset = table_start << bits;
        self.file
            .write_at(&table, table_offset)
            .map_err(|e| Error::io(&self.name, "writing the refcount table", table_offset, e))?;
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        let end = (blocks_start + blocks) << bits;
        self.file
            .set_len(end.max(self.file_len()))
            .map_err(|e| Error::io(&self.name, "sizing the file", end, e))?;
        self.file_len
            .fetch_max(end, std::sync::atomic::Ordering::AcqRel);
        Ok((table_offset, table_clusters))
    }

    /// Writes the refcount structure `check -r all` rebuilds from its
    /// in-memory counts (one per cluster of the file, every use counted,
    /// the old structure's too), placed as QEMU places it (see
    /// [`super::refcount_placement`]), then points the header at it. The
    /// new blocks and table go where nothing is in use, and are on disk
    /// before the header names them.
    pub(super) fn write_placed_refcounts(&mut self, mut counts: Vec<u32>) -> Result<()> {
        let bits = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        let order = self.header.refcount_order;
        let per_block = (cs * 8) >> order;
        let placed = super::refcount_placement::place(&mut counts, per_block, cs / 8);
        if placed.table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::format(
                &self.name,
                qcow_format::FormatError::TooLarge {
                    structure: "refcount table",
                    size: placed.table_clusters * cs,
                    limit: MAX_REFCOUNT_TABLE_BYTES,
                },
            ));
        }
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let mut end = 0;
        for (index, &block) in placed.blocks.iter().enumerate() {
            if block == 0 {
                continue;
            }
            // One cluster per block.
            let mut bytes = vec![0u8; cs as usize];
            let first = index as u64 * per_block;
            for i in 0..per_block {
                let n = usize::try_from(first + i)
                    .ok()
                    .and_then(|c| counts.get(c))
                    .map_or(0, |&n| u64::from(n));
                if n > max {
                    return Err(Error::RefcountOverflow {
                        image: self.name.clone(),
                        cluster: (first + i) << bits,
                        max,
                    });
                }
                if n > 0 {
                    refcount_set(&mut bytes, i, order, n);
                }
            }
            let at = block << bits;
            self.file
                .write_at(&bytes, at)
                .map_err(|e| Error::io(&self.name, "writing a refcount block", at, e))?;
            end = end.max(at + cs);
        }
        let mut table = vec![0u8; (placed.table_clusters * cs) as usize];
        for (entry, &block) in table.chunks_exact_mut(8).zip(&placed.blocks) {
            entry.copy_from_slice(&(block << bits).to_be_bytes());
        }
        let table_offset = placed.table_start << bits;
        self.file
            .write_at(&table, table_offset)
            .map_err(|e| Error::io(&self.name, "writing the refcount table", table_offset, e))?;
        end = end.max(table_offset + table.len() as u64);
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        self.file_len
            .fetch_max(end, std::sync::atomic::Ordering::AcqRel);
        self.point_header_at_refcounts(table_offset, placed.table_clusters)
    }

    /// Sets `OFLAG_COPIED` on active L1 and L2 entries exactly when their
    /// cluster is referenced once.
    fn fix_copied_flags(&mut self, counts: &Counts) -> Result<()> {
        let bits = self.header.cluster_bits;
        let copied = |offset: u64| counts.get(&(offset >> bits)).copied() == Some(1);
        let l1_offset = self.header.l1_table_offset;
        for i in 0..self.l1.len() {
            let entry = self.l1_entry(i as u64);
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let mut table = self.read_l2_words(l2_offset)?;
            let mut changed = false;
            let words = self.geometry.l2_entry_words();
            for word in table.iter_mut().step_by(words) {
                let host = *word & OFFSET_MASK;
                let compressed = *word & qcow_format::table::OFLAG_COMPRESSED != 0;
                if host == 0 || compressed {
                    continue;
                }
                // Clusters of an external data file count as referenced once.
                let data_file = self.header.has_data_file();
                let want = if data_file || copied(host) {
                    OFLAG_COPIED
                } else {
                    0
                };
                if *word & OFLAG_COPIED != want {
                    *word = (*word & !OFLAG_COPIED) | want;
                    changed = true;
                }
            }
            if changed {
                let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                self.file
                    .write_at(&bytes, l2_offset)
                    .map_err(|e| Error::io(&self.name, "writing an L2 table", l2_offset, e))?;
                self.l2.forget(l2_offset);
            }
            let want = if copied(l2_offset) { OFLAG_COPIED } else { 0 };
            if entry & OFLAG_COPIED != want {
                let new = (entry & !OFLAG_COPIED) | want;
                let at = l1_offset + i as u64 * 8;
                self.file
                    .write_at(&new.to_be_bytes(), at)
                    .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))?;
                self.l1[i].store(new, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(())
    }
}
