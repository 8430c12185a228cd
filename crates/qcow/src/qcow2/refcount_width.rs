//! A new refcount width (`amend -o refcount_bits=N`), done as QEMU's
//! `qcow2_change_refcount_order` does it, so that the file is qemu-img's
//! byte for byte:
//!
//! 1. Walks over the refcount table find which new refcount blocks hold
//!    anything; each new block gets a cluster from the allocator (counted
//!    in the old structure), and the new table a run of clusters. An
//!    allocation changes the counts walked, so the walks repeat until one
//!    allocates nothing (the new table placed again each time).
//! 2. A last walk writes the new blocks; then the new table is written and
//!    the old structure's counts flushed.
//! 3. The header is switched to the new table and width in one write.
//! 4. The old blocks and table are freed in the new structure.
//!
//! A crash before 3 leaves the old structure, which counts everything
//! taken (leaks at worst); after it, the new one, whose frees may not have
//! happened (leaks at worst).

use qcow_format::table::refcount_set;

use super::Qcow2Image;
use super::amend_progress::{AmendProgress, Operation};
use crate::{Error, Result};

/// The new refcount table being built: one entry (a block's offset, 0
/// while none) per new block, grown in whole clusters.
struct NewTable {
    entries: Vec<u64>,
    /// Entries per cluster of the table.
    per_cluster: u64,
}

/// What a walk does with each new block once its counts are known.
enum WalkMode {
    /// Gives every non-empty block a cluster.
    Allocate,
    /// Writes every block where the table says it goes.
    Write,
}

impl Qcow2Image {
    /// Rewrites the refcount structure with `bits`-bit entries (see the
    /// module documentation); the counts are known to fit.
    pub(super) fn change_refcount_width(
        &mut self,
        bits: u32,
        progress: &mut AmendProgress,
    ) -> Result<()> {
        self.flush()?;
        // The file's room for the new structure is taken first, so that a
        // full disk or a file size limit refuses the change before anything
        // is written; what is left of it is given back afterwards.
        let original_len = self.reserve_for_refcount_width(bits)?;
        let result = self.rewrite_refcounts(bits, progress);
        let end = self
            .lock_meta()
            .map(|meta| meta.end() << self.header.cluster_bits)
            .unwrap_or(original_len)
            .max(original_len);
        if self.file.len().is_ok_and(|len| len > end) {
            // Best effort: the space past `end` holds nothing.
            let _ = self.file.set_len(end);
        }
        result
    }

    /// Reserves, past the end of the file, more than a new refcount
    /// structure of `bits`-bit entries can take (its blocks, its table
    /// placed up to three times, and blocks of the old structure that
    /// count them). Returns the file's length before.
    fn reserve_for_refcount_width(&self, bits: u32) -> Result<u64> {
        let cs = self.header.cluster_size();
        let len = self
            .file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing", 0, e))?;
        let in_use = self.lock_meta()?.end().max(len.div_ceil(cs));
        let per_table_cluster = cs / 8;
        let new_per_block = (cs * 8) >> bits.trailing_zeros();
        let old_per_block = (cs * 8) >> self.header.refcount_order;
        let blocks = (in_use * 2).div_ceil(new_per_block) + 2;
        let table = blocks.div_ceil(per_table_cluster) + 1;
        let new = blocks + 3 * table;
        let old = (in_use + new).div_ceil(old_per_block)
            + 2
            + 2 * u64::from(self.header.refcount_table_clusters);
        let at = len.next_multiple_of(cs);
        let bytes = (new + old) * cs;
        if let Err(e) = self.file.allocate(at, bytes) {
            // Best effort: the error to report is the one that stopped us.
            let _ = self.file.set_len(len);
            return Err(Error::io(
                &self.name,
                "reserving room for the refcount structure",
                at,
                e,
            ));
        }
        Ok(len)
    }

    /// The walks, writes and switch of [`Qcow2Image::change_refcount_width`].
    fn rewrite_refcounts(&mut self, bits: u32, progress: &mut AmendProgress) -> Result<()> {
        let cs = self.header.cluster_size();
        let bit_shift = self.header.cluster_bits;
        let order = bits.trailing_zeros();
        let mut table = NewTable {
            entries: Vec::new(),
            per_cluster: cs / 8,
        };
        let mut table_offset = 0;
        let mut table_clusters = 0;
        let mut walk = 0;
        loop {
            // QEMU expects three walks at least: two allocating, one writing.
            let total = (walk + 2).max(3);
            let allocated = self.refcount_walk(
                &mut table,
                &WalkMode::Allocate,
                order,
                progress,
                walk,
                total,
            )?;
            walk += 1;
            if !allocated {
                break;
            }
            let mut meta = self.lock_meta()?;
            for i in 0..table_clusters {
                meta.change_refcount((table_offset >> bit_shift) + i, -1)?;
            }
            table_clusters = (table.entries.len() as u64).div_ceil(table.per_cluster);
            table_offset = meta.clusters(table_clusters)?;
        }
        self.refcount_walk(
            &mut table,
            &WalkMode::Write,
            order,
            progress,
            walk,
            walk + 1,
        )?;
        let bytes: Vec<u8> = table.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file
            .write_at(&bytes, table_offset)
            .map_err(|e| Error::io(&self.name, "writing the refcount table", table_offset, e))?;
        let (old_blocks, old_table_offset, old_table_clusters) = {
            let meta = self.lock_meta()?;
            meta.flush_refcounts()?;
            let entries = meta.reftable().len() as u64;
            (
                meta.reftable().to_vec(),
                meta.reftable_offset(),
                (entries * 8).div_ceil(cs),
            )
        };
        self.rewrite_header(|h| {
            h.refcount_order = order;
            h.refcount_table_offset = table_offset;
            // At most the old table's size and the blocks the image needs.
            h.refcount_table_clusters = table_clusters as u32;
        })?;
        // The allocator's refcount cache holds the old width.
        self.restart_write_state()?;
        {
            let mut meta = self.lock_meta()?;
            for block in old_blocks.into_iter().filter(|&b| b != 0) {
                meta.change_refcount(block >> bit_shift, -1)?;
            }
            for i in 0..old_table_clusters {
                meta.change_refcount((old_table_offset >> bit_shift) + i, -1)?;
            }
        }
        self.flush()
    }

    /// One walk over the old refcount table (its length read as it grows),
    /// gathering the counts of each new block of `order`-bit entries and
    /// handing the block to `mode`; reports one progress step per table
    /// entry (walk `walk` of `total`). Returns whether a cluster was
    /// allocated.
    fn refcount_walk(
        &mut self,
        table: &mut NewTable,
        mode: &WalkMode,
        order: u32,
        progress: &mut AmendProgress,
        walk: u64,
        total: u64,
    ) -> Result<bool> {
        let cs = self.header.cluster_size();
        let new_per_block = (cs * 8) >> order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let mut block = vec![0u8; cs as usize];
        let (mut index, mut filled, mut empty) = (0u64, 0u64, true);
        let mut allocated = false;
        let mut old_index = 0u64;
        let mut old_len;
        loop {
            let counts = {
                let meta = self.lock_meta()?;
                old_len = meta.reftable().len() as u64;
                if old_index >= old_len {
                    break;
                }
                meta.block_counts(old_index)?
            };
            progress.report(
                Operation::RefcountWidth,
                walk * old_len + old_index,
                total * old_len,
            );
            let old_per_block = (cs * 8) >> self.header.refcount_order;
            for j in 0..old_per_block {
                if filled >= new_per_block {
                    allocated |= self.finish_block(table, mode, index, &block, empty)?;
                    (index, filled, empty) = (index + 1, 0, true);
                    block.fill(0);
                }
                let count = counts.as_ref().map_or(0, |c| c[j as usize]);
                if count > max {
                    let cluster = old_index * old_per_block + j;
                    return Err(Error::RefcountOverflow {
                        image: self.name.clone(),
                        cluster: cluster << self.header.cluster_bits,
                        max,
                    });
                }
                if count > 0 {
                    refcount_set(&mut block, filled, order, count);
                    empty = false;
                }
                filled += 1;
            }
            old_index += 1;
        }
        if filled > 0 {
            allocated |= self.finish_block(table, mode, index, &block, empty)?;
        }
        progress.report(
            Operation::RefcountWidth,
            (walk + 1) * old_len,
            total * old_len,
        );
        Ok(allocated)
    }

    /// New block `index`, holding `block` (`empty`: only zeros), as `mode`
    /// says. Returns whether a cluster was allocated for it.
    fn finish_block(
        &mut self,
        table: &mut NewTable,
        mode: &WalkMode,
        index: u64,
        block: &[u8],
        empty: bool,
    ) -> Result<bool> {
        let slot = index as usize;
        match mode {
            WalkMode::Allocate => {
                if empty {
                    return Ok(false);
                }
                if slot >= table.entries.len() {
                    let len = (index + 1).next_multiple_of(table.per_cluster);
                    table.entries.resize(len as usize, 0);
                }
                if table.entries[slot] != 0 {
                    return Ok(false);
                }
                table.entries[slot] = self.lock_meta()?.clusters(1)?;
                Ok(true)
            }
            WalkMode::Write => match table.entries.get(slot).copied().unwrap_or(0) {
                0 if empty => Ok(false),
                0 => Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "refcount table",
                    offset: self.header.refcount_table_offset,
                    reason: format!("new refcount block {index} changed after it was placed"),
                }),
                at => {
                    self.file
                        .write_at(block, at)
                        .map_err(|e| Error::io(&self.name, "writing a refcount block", at, e))?;
                    Ok(false)
                }
            },
        }
    }
}
