//! Refcounts and cluster allocation ("Host cluster management" in the
//! specification).
//!
//! Every host cluster has a reference count in a refcount block; the
//! refcount table lists the blocks. Allocation finds clusters whose count is
//! zero (reusing freed space before growing the file), and grows refcount
//! blocks and the refcount table as the file grows, including the blocks
//! that must count themselves.
//!
//! The [`Allocator`] owns the refcount block cache and the allocation
//! state ([`Meta`]) behind the allocation lock; [`Allocator::lock`] takes
//! the lock and returns an [`Allocation`], through which every allocation,
//! refcount change and refcount structure growth goes. New refcount blocks
//! and tables reach the disk before anything points at them, so that a
//! crash leaves at worst leaked clusters. Before clusters are handed out
//! they are checked against the image's metadata (the [`Owner`]'s overlap
//! guard), so wrong refcounts can never make new data overwrite metadata.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use qcow_cache::{Flush, TableCache, WriteBack};
use qcow_format::limits::{MAX_HOST_OFFSET, MAX_REFCOUNT_TABLE_BYTES};
use qcow_format::table::{refcount_get, refcount_set};
use qcow_io::Storage;

use crate::{Error, Result};

/// A refcount block: one cluster of packed big-endian refcounts. Changed in
/// place under the allocation lock, then marked dirty in the cache.
#[derive(Debug)]
pub(crate) struct RefBlock(Mutex<Box<[u8]>>);

impl RefBlock {
    pub(super) fn new(bytes: Box<[u8]>) -> Self {
        RefBlock(Mutex::new(bytes))
    }

    fn get(&self, index: u64, order: u32) -> Option<u64> {
        refcount_get(
            &self.0.lock().unwrap_or_else(PoisonError::into_inner),
            index,
            order,
        )
    }

    fn set(&self, index: u64, order: u32, value: u64) -> Option<()> {
        refcount_set(
            &mut self.0.lock().unwrap_or_else(PoisonError::into_inner),
            index,
            order,
            value,
        )
    }

    /// Whether every refcount is zero, but for entry `own` (the block's
    /// count of itself) when given.
    fn counts_nothing_but(&self, own: Option<u64>, order: u32) -> bool {
        let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(index) = own else {
            return bytes.iter().all(|&b| b == 0);
        };
        let Some(kept) = refcount_get(&bytes, index, order) else {
            return false;
        };
        let _ = refcount_set(&mut bytes, index, order, 0);
        let empty = bytes.iter().all(|&b| b == 0);
        let _ = refcount_set(&mut bytes, index, order, kept);
        empty
    }
}

/// Writes refcount blocks back to the image file.
#[derive(Debug)]
pub(super) struct RefBlockWriter(pub(super) Arc<dyn Storage>);

impl WriteBack<RefBlock> for RefBlockWriter {
    fn encode(&self, table: &RefBlock) -> Vec<u8> {
        table
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .to_vec()
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_at(bytes, offset)
    }
}

/// The allocation state of a writable image, guarded by its allocation lock.
#[derive(Debug)]
pub(crate) struct Meta {
    /// The refcount table (offsets of refcount blocks).
    pub(super) reftable: Vec<u64>,
    /// Where the refcount table lives.
    pub(super) reftable_offset: u64,
    /// Cluster index from which to look for free clusters.
    pub(super) free_hint: u64,
    /// Cluster index past the last cluster known to be in use.
    pub(super) end: u64,
    /// Clusters (host offsets) to release once the metadata that stopped
    /// using them is on disk.
    pub(super) pending_frees: Vec<u64>,
    /// Host byte offset where the next compressed cluster may be packed
    /// (0: start a new cluster).
    pub(super) compressed_cursor: u64,
    /// While an operation gives freed space back to the file system: the
    /// clusters whose refcount dropped to zero (see
    /// [`Qcow2Image::punching_freed`](super::Qcow2Image::punching_freed)).
    pub(super) freed: Option<Vec<u64>>,
    /// Clusters (numbers) among the pending frees whose space goes back to
    /// the file system once they are free (ranges the guest gave up).
    pub(super) pending_discards: Vec<u64>,
}

/// What the allocator needs from the image it allocates for.
pub(super) trait Owner {
    /// The image file's length as far as allocation has grown it.
    fn file_len(&self) -> u64;
    /// Records that the file now reaches at least `end` bytes.
    fn grow_file_len(&self, end: u64);
    /// Records that the file was cut to `len` bytes.
    fn file_truncated(&self, len: u64);
    /// The metadata structure overlapping host bytes `start..start + len`,
    /// with its offset, given the current refcount table.
    fn metadata_overlap(
        &self,
        reftable_offset: u64,
        reftable: &[u64],
        start: u64,
        len: u64,
    ) -> Option<(&'static str, u64)>;
    /// A cluster's refcount dropped to zero (drop any cached copy of it),
    /// given the current refcount table.
    fn cluster_freed(&self, host: u64, reftable_offset: u64, reftable: &[u64]);
    /// New metadata (a refcount block or table) now lives at
    /// `start..start + len`.
    fn metadata_placed(&self, start: u64, len: u64);
    /// Waits until no lock-free data I/O that may have found freed clusters
    /// mapped is still in flight.
    fn wait_for_data_io(&self);
}

/// Refcounts and allocation of a writable image.
#[derive(Debug)]
pub(crate) struct Allocator {
    name: String,
    file: Arc<dyn Storage>,
    cluster_bits: u32,
    refcount_order: u32,
    /// Cached refcount blocks (the L2 cache depends on this cache).
    pub(super) refcounts: Arc<TableCache<RefBlock>>,
    /// The allocation state, behind the allocation lock.
    meta: Mutex<Meta>,
}

impl Allocator {
    /// An allocator over `file` with the refcount table `meta` describes.
    pub(super) fn new(
        name: &str,
        file: Arc<dyn Storage>,
        cluster_bits: u32,
        refcount_order: u32,
        refcounts: Arc<TableCache<RefBlock>>,
        meta: Meta,
    ) -> Self {
        Allocator {
            name: name.to_owned(),
            file,
            cluster_bits,
            refcount_order,
            refcounts,
            meta: Mutex::new(meta),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Takes the allocation lock for allocations on behalf of `owner`.
    pub(super) fn lock<'a>(&'a self, owner: &'a dyn Owner) -> Allocation<'a> {
        Allocation {
            meta: self.meta.lock().unwrap_or_else(PoisonError::into_inner),
            alloc: self,
            owner,
        }
    }

    /// Writes every dirty refcount block.
    pub(super) fn flush_refcounts(&self) -> Result<()> {
        self.refcounts
            .flush()
            .map_err(|e| Error::cache_io(&self.name, "writing refcount blocks", 0, e))
    }
}

/// The allocation lock held: the allocation state, and the operations that
/// change it.
pub(crate) struct Allocation<'a> {
    meta: MutexGuard<'a, Meta>,
    alloc: &'a Allocator,
    owner: &'a dyn Owner,
}

impl std::fmt::Debug for Allocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.meta.fmt(f)
    }
}

impl Deref for Allocation<'_> {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl DerefMut for Allocation<'_> {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

impl Allocation<'_> {
    /// log2 of the clusters one refcount block covers.
    fn refblock_shift(&self) -> u32 {
        self.alloc.cluster_bits + 3 - self.alloc.refcount_order
    }

    fn corrupt(&self, table: &'static str, offset: u64, reason: String) -> Error {
        Error::Corrupt {
            image: self.alloc.name.clone(),
            table,
            offset,
            reason,
        }
    }

    /// The refcount block at `offset`, from the cache or the file.
    fn refblock(&self, offset: u64) -> Result<Arc<RefBlock>> {
        if let Some(block) = self.alloc.refcounts.get(offset) {
            return Ok(block);
        }
        let cluster_size = self.alloc.cluster_size();
        if offset % cluster_size != 0 || offset.saturating_add(cluster_size) > self.owner.file_len()
        {
            return Err(self.corrupt(
                "refcount block",
                offset,
                "offset is misaligned or past the end of the file".into(),
            ));
        }
        // One cluster: at most 2 MiB.
        let mut bytes = vec![0u8; cluster_size as usize];
        self.alloc
            .file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.alloc.name, "reading a refcount block", offset, e))?;
        self.alloc
            .refcounts
            .insert_clean(offset, Arc::new(RefBlock::new(bytes.into_boxed_slice())))
            .map_err(|e| {
                Error::cache_io(&self.alloc.name, "writing back a refcount block", offset, e)
            })
    }

    /// Adds `delta` to the refcount of cluster number `cluster`, creating
    /// its refcount block if needed. Returns the new count.
    pub(super) fn change_refcount(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        let shift = self.refblock_shift();
        let block_offset = self.ensure_refblock(cluster >> shift)?;
        let block = self.refblock(block_offset)?;
        let order = self.alloc.refcount_order;
        let index = cluster & ((1 << shift) - 1);
        let old = block.get(index, order).ok_or_else(|| {
            self.corrupt("refcount block", block_offset, "index out of range".into())
        })?;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let host = cluster << self.alloc.cluster_bits;
        let new = if delta >= 0 {
            old.checked_add(delta.unsigned_abs())
                .filter(|&v| v <= max)
                .ok_or_else(|| Error::RefcountOverflow {
                    image: self.alloc.name.clone(),
                    cluster: host,
                    max,
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                self.corrupt(
                    "refcount block",
                    block_offset,
                    format!("refcount of cluster {host:#x} would drop below zero"),
                )
            })?
        };
        block.set(index, order, new).ok_or_else(|| {
            self.corrupt("refcount block", block_offset, "index out of range".into())
        })?;
        self.alloc
            .refcounts
            .insert_dirty(block_offset, block)
            .map_err(|e| {
                Error::cache_io(
                    &self.alloc.name,
                    "writing back a refcount block",
                    block_offset,
                    e,
                )
            })?;
        if new == 0 {
            if let Some(freed) = self.meta.freed.as_mut() {
                freed.push(cluster);
            }
            self.meta.free_hint = self.meta.free_hint.min(cluster);
            self.owner
                .cluster_freed(host, self.meta.reftable_offset, &self.meta.reftable);
            // Compressed data must not be packed into a cluster that may be
            // handed out again.
            if self.meta.compressed_cursor >> self.alloc.cluster_bits == cluster {
                self.meta.compressed_cursor = 0;
            }
        }
        Ok(new)
    }

    /// The offset of refcount block `index`, allocating it (and growing the
    /// refcount table) when it does not exist yet.
    fn ensure_refblock(&mut self, index: u64) -> Result<u64> {
        let slot = usize::try_from(index).map_err(|_| {
            self.corrupt(
                "refcount table",
                self.meta.reftable_offset,
                "index overflow".into(),
            )
        })?;
        if slot >= self.meta.reftable.len() {
            self.grow_reftable(index + 1)?;
        }
        let existing = self.meta.reftable[slot];
        if existing != 0 {
            return Ok(existing);
        }
        let shift = self.refblock_shift();
        let cluster_size = self.alloc.cluster_size();
        let cluster = self.meta.end;
        self.check_clusters_end(cluster + 1)?;
        self.check_overlap(cluster, 1, "a new refcount block")?;
        let offset = cluster << self.alloc.cluster_bits;
        self.meta.end += 1;
        // Marked before anything is written there.
        self.owner
            .metadata_placed(offset, self.alloc.cluster_size());
        let block = Arc::new(RefBlock::new(
            vec![0u8; cluster_size as usize].into_boxed_slice(),
        ));
        if cluster >> shift == index {
            // The block counts itself.
            block.set(cluster & ((1 << shift) - 1), self.alloc.refcount_order, 1);
        } else {
            // Counted by a later block, which must be on disk first.
            self.change_refcount(cluster, 1)?;
            self.alloc.flush_refcounts()?;
        }
        self.alloc
            .refcounts
            .insert_dirty(offset, block)
            .map_err(|e| {
                Error::cache_io(&self.alloc.name, "caching a refcount block", offset, e)
            })?;
        self.alloc.flush_refcounts()?;
        self.grow_file_len();
        let entry_at = self.meta.reftable_offset + index * 8;
        self.alloc
            .file
            .write_at(&offset.to_be_bytes(), entry_at)
            .map_err(|e| Error::io(&self.alloc.name, "writing the refcount table", entry_at, e))?;
        self.meta.reftable[slot] = offset;
        Ok(offset)
    }

    /// Moves the refcount table to a larger one of at least `min_entries`
    /// entries at the end of the file, with the refcount blocks that count
    /// the new table's own clusters.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cluster_bits = self.alloc.cluster_bits;
        let per_cluster = self.alloc.cluster_size() / 8;
        let shift = self.refblock_shift();
        let old_len = self.meta.reftable.len() as u64;
        let mut entries = min_entries.max(old_len * 2).next_multiple_of(per_cluster);
        // The new table and its blocks go at the end: make sure the table
        // covers them too.
        loop {
            let table_clusters = entries / per_cluster;
            let worst_end = self.meta.end + 2 * table_clusters + 2;
            let needed = (worst_end >> shift) + 1;
            if needed <= entries {
                break;
            }
            entries = needed.next_multiple_of(per_cluster);
        }
        let bytes = entries * 8;
        if bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::NoSpace {
                image: self.alloc.name.clone(),
                what: "the refcount table",
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let table_clusters = entries / per_cluster;
        // Before anything changes: the table and its blocks end below this.
        self.check_clusters_end(self.meta.end + 2 * table_clusters + 2)?;
        let table_start = self.meta.end;
        self.check_overlap(table_start, 2 * table_clusters + 2, "a new refcount table")?;
        let mut next = table_start + table_clusters;
        // Bounded by MAX_REFCOUNT_TABLE_BYTES.
        let mut table = self.meta.reftable.clone();
        table.resize(entries as usize, 0);
        let mut new_blocks: Vec<(u64, Arc<RefBlock>)> = Vec::new();
        let order = self.alloc.refcount_order;
        let mut cluster = table_start;
        while cluster < next {
            let index = cluster >> shift;
            let slot = index as usize;
            let within = cluster & ((1 << shift) - 1);
            if table[slot] == 0 {
                let block_offset = next << cluster_bits;
                next += 1;
                table[slot] = block_offset;
                let block =
                    RefBlock::new(vec![0u8; self.alloc.cluster_size() as usize].into_boxed_slice());
                new_blocks.push((block_offset, Arc::new(block)));
            }
            let block = match new_blocks.iter().find(|(o, _)| *o == table[slot]) {
                Some((_, b)) => b.clone(),
                None => self.refblock(table[slot])?,
            };
            block.set(within, order, 1).ok_or_else(|| {
                self.corrupt("refcount block", table[slot], "index out of range".into())
            })?;
            self.alloc
                .refcounts
                .insert_dirty(table[slot], block)
                .map_err(|e| {
                    Error::cache_io(&self.alloc.name, "caching a refcount block", table[slot], e)
                })?;
            cluster += 1;
        }
        self.check_clusters_end(next)?;
        self.meta.end = next;
        self.grow_file_len();
        self.owner.metadata_placed(
            table_start << cluster_bits,
            (next - table_start) << cluster_bits,
        );
        // Blocks first, then the table, then the header that points at it.
        self.alloc.flush_refcounts()?;
        let table_offset = table_start << cluster_bits;
        let (old_offset, old_clusters) =
            self.switch_reftable(table, table_offset, table_clusters)?;
        for i in 0..old_clusters {
            self.meta
                .pending_frees
                .push(old_offset + (i << cluster_bits));
        }
        Ok(())
    }

    /// Writes the refcount `table` at `table_offset` and, once it is on
    /// disk, points the header at it (`table_clusters` clusters), synced;
    /// memory follows. Returns the old table's offset and clusters, for
    /// the caller to free.
    fn switch_reftable(
        &mut self,
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
    ) -> Result<(u64, u64)> {
        let name = &self.alloc.name;
        let encoded: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.alloc
            .file
            .write_at(&encoded, table_offset)
            .and_then(|()| self.alloc.file.flush())
            .map_err(|e| Error::io(name, "writing the refcount table", table_offset, e))?;
        write_reftable_pointer(&*self.alloc.file, name, table_offset, table_clusters)?;
        self.alloc
            .file
            .flush()
            .map_err(|e| Error::io(name, "flushing", 0, e))?;
        let old_offset = self.meta.reftable_offset;
        let old_clusters =
            (self.meta.reftable.len() as u64 * 8).div_ceil(self.alloc.cluster_size());
        self.meta.reftable = table;
        self.meta.reftable_offset = table_offset;
        Ok((old_offset, old_clusters))
    }

    /// QEMU's `qcow2_refcount_area` (exact size): refcount blocks for
    /// every block index that `start + additional` clusters and the
    /// blocks and table themselves need, the missing ones placed at
    /// cluster `start` (past everything in use) and a new refcount table
    /// right after them, all counted once; the header is switched to the
    /// table and the old table freed. Returns the cluster after the table,
    /// where the space the caller counted on begins.
    pub(super) fn refcount_area(&mut self, start: u64, additional: u64) -> Result<u64> {
        let bits = self.alloc.cluster_bits;
        let cluster_size = self.alloc.cluster_size();
        let per_block = 1u64 << self.refblock_shift();
        let per_table_cluster = cluster_size / 8;
        let (blocks_total, _) = crate::measure::refcount_structure_clusters(
            start + additional,
            cluster_size,
            self.alloc.refcount_order,
        );
        let table_entries = blocks_total.next_multiple_of(per_table_cluster);
        let table_clusters = table_entries / per_table_cluster;
        if table_entries * 8 > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::NoSpace {
                image: self.alloc.name.clone(),
                what: "the refcount table",
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let area_index = start / per_block;
        let mut table = self.meta.reftable.clone();
        // As QEMU: a table longer than needed loses entries that can only
        // cover space past `start`, where nothing is in use.
        table.resize(table_entries as usize, 0);
        let new_blocks = (area_index..blocks_total)
            .filter(|&i| table[i as usize] == 0)
            .count() as u64;
        let table_start = start + new_blocks;
        let end = table_start + table_clusters;
        self.check_clusters_end(end)?;
        self.check_overlap(start, end - start, "a new refcount area")?;
        let order = self.alloc.refcount_order;
        let mut next_block = start;
        for i in area_index..blocks_total {
            let slot = i as usize;
            let block = if table[slot] == 0 {
                table[slot] = next_block << bits;
                next_block += 1;
                Arc::new(RefBlock::new(
                    vec![0u8; cluster_size as usize].into_boxed_slice(),
                ))
            } else {
                self.refblock(table[slot])?
            };
            let first = i * per_block;
            if first < end {
                for c in first.max(start)..end.min(first + per_block) {
                    block.set(c - first, order, 1).ok_or_else(|| {
                        self.corrupt("refcount block", table[slot], "index out of range".into())
                    })?;
                }
            }
            self.alloc
                .refcounts
                .insert_dirty(table[slot], block)
                .map_err(|e| {
                    Error::cache_io(&self.alloc.name, "caching a refcount block", table[slot], e)
                })?;
        }
        self.meta.end = self.meta.end.max(end);
        self.grow_file_len();
        self.owner
            .metadata_placed(start << bits, (end - start) << bits);
        // Blocks first, then the table, then the header that points at it.
        self.alloc.flush_refcounts()?;
        let (old_offset, old_clusters) =
            self.switch_reftable(table, table_start << bits, table_clusters)?;
        for i in 0..old_clusters {
            self.change_refcount((old_offset >> bits) + i, -1)?;
        }
        Ok(end)
    }

    /// Counts clusters `start..start + n` as used (refcount 1), where the
    /// caller placed them (QEMU's `qcow2_alloc_clusters_at`: the search
    /// for free clusters is not moved).
    pub(super) fn claim_clusters(&mut self, start: u64, n: u64) -> Result<()> {
        let hint = self.meta.free_hint;
        self.take_clusters(start, n)?;
        self.meta.free_hint = hint;
        Ok(())
    }

    /// The refcount of cluster number `cluster` (0 where no block counts it).
    pub(super) fn refcount(&self, cluster: u64) -> Result<u64> {
        let shift = self.refblock_shift();
        let block_offset = usize::try_from(cluster >> shift)
            .ok()
            .and_then(|i| self.meta.reftable.get(i))
            .copied()
            .unwrap_or(0);
        if block_offset == 0 {
            return Ok(0);
        }
        let block = self.refblock(block_offset)?;
        block
            .get(cluster & ((1 << shift) - 1), self.alloc.refcount_order)
            .ok_or_else(|| {
                self.corrupt("refcount block", block_offset, "index out of range".into())
            })
    }

    /// The cluster number past the last cluster known to be in use.
    pub(super) fn end(&self) -> u64 {
        self.meta.end
    }

    /// The refcount table as it stands (block offsets).
    pub(super) fn reftable(&self) -> &[u64] {
        &self.meta.reftable
    }

    /// Where the refcount table lives.
    pub(super) fn reftable_offset(&self) -> u64 {
        self.meta.reftable_offset
    }

    /// Every count of refcount block `index` (the clusters it covers, in
    /// order), or `None` when the table names no block there.
    pub(super) fn block_counts(&self, index: u64) -> Result<Option<Vec<u64>>> {
        let block_offset = usize::try_from(index)
            .ok()
            .and_then(|i| self.meta.reftable.get(i))
            .copied()
            .unwrap_or(0);
        if block_offset == 0 {
            return Ok(None);
        }
        let block = self.refblock(block_offset)?;
        let bytes = block.0.lock().unwrap_or_else(PoisonError::into_inner);
        let order = self.alloc.refcount_order;
        let entries = (bytes.len() as u64 * 8) >> order;
        Ok(Some(
            (0..entries)
                .map(|i| refcount_get(&bytes, i, order).unwrap_or(0))
                .collect(),
        ))
    }

    /// Writes every dirty refcount block.
    pub(super) fn flush_refcounts(&self) -> Result<()> {
        self.alloc.flush_refcounts()
    }

    /// Gives the space of `clusters` (cluster numbers) that are still
    /// free back to the file system, a hole per run, as QEMU passes on the
    /// discards of the clusters an operation frees. Freed clusters still
    /// pending release are not free yet: flush first.
    pub(super) fn punch_clusters(&self, mut clusters: Vec<u64>) -> Result<()> {
        clusters.sort_unstable();
        clusters.dedup();
        // Past the end of the file (cut off since) there is nothing to give.
        let file_clusters = self.owner.file_len().div_ceil(self.alloc.cluster_size());
        let mut free = Vec::with_capacity(clusters.len());
        for cluster in clusters {
            if cluster < file_clusters && self.refcount(cluster)? == 0 {
                free.push(cluster);
            }
        }
        discard_cluster_runs(&*self.alloc.file, self.alloc.cluster_bits, &free)
            .map_err(|(at, e)| Error::io(&self.alloc.name, "discarding freed clusters", at, e))
    }

    /// Drops the refcount blocks that count nothing but themselves (after
    /// a shrink freed what they counted), as QEMU's `qcow2_shrink_reftable`
    /// does: their table entries are cleared on disk first, then they are
    /// freed.
    pub(super) fn drop_empty_refblocks(&mut self) -> Result<()> {
        let bits = self.alloc.cluster_bits;
        let shift = self.refblock_shift();
        let order = self.alloc.refcount_order;
        let mut dropped = Vec::new();
        for (i, &offset) in self.meta.reftable.iter().enumerate() {
            if offset == 0 {
                continue;
            }
            let cluster = offset >> bits;
            let own = (cluster >> shift == i as u64).then_some(cluster & ((1 << shift) - 1));
            if self.refblock(offset)?.counts_nothing_but(own, order) {
                dropped.push((i, offset, own.is_some()));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        self.alloc.flush_refcounts()?;
        for &(i, _, _) in &dropped {
            let at = self.meta.reftable_offset + i as u64 * 8;
            self.alloc
                .file
                .write_at(&[0u8; 8], at)
                .map_err(|e| Error::io(&self.alloc.name, "writing the refcount table", at, e))?;
        }
        self.alloc
            .file
            .flush()
            .map_err(|e| Error::io(&self.alloc.name, "flushing", 0, e))?;
        for (i, offset, counts_itself) in dropped {
            self.meta.reftable[i] = 0;
            self.alloc.refcounts.remove(offset);
            let cluster = offset >> bits;
            if counts_itself {
                // Its count went with it.
                if let Some(freed) = self.meta.freed.as_mut() {
                    freed.push(cluster);
                }
                self.meta.free_hint = self.meta.free_hint.min(cluster);
                self.owner
                    .cluster_freed(offset, self.meta.reftable_offset, &self.meta.reftable);
            } else {
                self.change_refcount(cluster, -1)?;
            }
        }
        Ok(())
    }

    /// The highest cluster below `clusters` with a refcount, if any.
    pub(super) fn last_used_cluster(&self, clusters: u64) -> Result<Option<u64>> {
        let shift = self.refblock_shift();
        let mut cluster = clusters;
        while cluster > 0 {
            let index = (cluster - 1) >> shift;
            let block_offset = usize::try_from(index)
                .ok()
                .and_then(|i| self.meta.reftable.get(i))
                .copied()
                .unwrap_or(0);
            if block_offset == 0 {
                // Nothing counted in this block's range.
                cluster = index << shift;
                continue;
            }
            let block = self.refblock(block_offset)?;
            let c = cluster - 1;
            if block.get(c & ((1 << shift) - 1), self.alloc.refcount_order) != Some(0) {
                return Ok(Some(c));
            }
            cluster = c;
        }
        Ok(None)
    }

    /// Cuts the file after its first `clusters` clusters, which must hold
    /// everything in use.
    pub(super) fn truncate_file(&mut self, clusters: u64) -> Result<()> {
        let len = clusters << self.alloc.cluster_bits;
        self.alloc
            .file
            .set_len(len)
            .map_err(|e| Error::io(&self.alloc.name, "truncating the file", len, e))?;
        self.meta.end = clusters;
        self.meta.free_hint = self.meta.free_hint.min(clusters);
        if self.meta.compressed_cursor >= len {
            self.meta.compressed_cursor = 0;
        }
        self.owner.file_truncated(len);
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcount 1 each), reusing freed
    /// space before growing the file. Returns the first one's host offset.
    pub(super) fn clusters(&mut self, n: u64) -> Result<u64> {
        let start = self.find_free(n)?;
        self.take_clusters(start, n)
    }

    /// Gives back `count` clusters from host offset `host` that were just
    /// allocated and are referenced by nothing (the write they were for
    /// failed), so that a failure leaks nothing. Best effort: the error that
    /// made the caller give them back is the one to report.
    pub(super) fn give_back(&mut self, host: u64, count: u64) {
        for i in 0..count {
            let cluster = (host >> self.alloc.cluster_bits) + i;
            if self.change_refcount(cluster, -1).is_err() {
                return;
            }
        }
    }

    /// Allocates the first free run of clusters at or after the hint, at
    /// most `max` long (and at least one): fragmented free space is used
    /// before the file grows. Returns its host offset and length.
    pub(super) fn run(&mut self, max: u64) -> Result<(u64, u64)> {
        let start = self.find_free(1)?;
        let mut n = 1;
        while n < max && self.cluster_is_free(start + n)? {
            n += 1;
        }
        Ok((self.take_clusters(start, n)?, n))
    }

    fn cluster_is_free(&self, cluster: u64) -> Result<bool> {
        let shift = self.refblock_shift();
        let block_offset = usize::try_from(cluster >> shift)
            .ok()
            .and_then(|i| self.meta.reftable.get(i))
            .copied()
            .unwrap_or(0);
        if block_offset == 0 {
            return Ok(true);
        }
        let block = self.refblock(block_offset)?;
        Ok(block.get(cluster & ((1 << shift) - 1), self.alloc.refcount_order) == Some(0))
    }

    /// Counts `n` clusters from `start` as used (refcount 1).
    fn take_clusters(&mut self, start: u64, n: u64) -> Result<u64> {
        self.check_clusters_end(start.saturating_add(n))?;
        self.check_overlap(start, n, "new clusters")?;
        // As QEMU's search index: past every cluster looked at, so free
        // holes too small for a run stay behind until a free lowers it.
        self.meta.free_hint = start + n;
        self.meta.end = self.meta.end.max(start + n);
        for cluster in start..start + n {
            if let Err(e) = self.change_refcount(cluster, 1) {
                // A refcount block could not be made: leave nothing counted.
                self.give_back(start << self.alloc.cluster_bits, cluster - start);
                return Err(e);
            }
        }
        self.grow_file_len();
        Ok(start << self.alloc.cluster_bits)
    }

    /// The first run of `n` clusters with refcount zero at or after the hint.
    fn find_free(&self, n: u64) -> Result<u64> {
        let shift = self.refblock_shift();
        let order = self.alloc.refcount_order;
        let mut cluster = self.meta.free_hint;
        let mut start = cluster;
        let mut run = 0u64;
        while run < n {
            let index = cluster >> shift;
            let block_offset = usize::try_from(index)
                .ok()
                .and_then(|i| self.meta.reftable.get(i))
                .copied()
                .unwrap_or(0);
            let block_end = (index + 1) << shift;
            if block_offset == 0 {
                // No block: every cluster it would cover is free.
                if run == 0 {
                    start = cluster;
                }
                run += block_end - cluster;
                cluster = block_end;
                continue;
            }
            let block = self.refblock(block_offset)?;
            let bytes = block.0.lock().unwrap_or_else(PoisonError::into_inner);
            while cluster < block_end && run < n {
                let count = refcount_get(&bytes, cluster & ((1 << shift) - 1), order).unwrap_or(1);
                if count == 0 {
                    if run == 0 {
                        start = cluster;
                    }
                    run += 1;
                } else {
                    run = 0;
                }
                cluster += 1;
            }
        }
        Ok(start)
    }

    /// Applies the refcount decrements deferred until the metadata that
    /// dropped the references reached the disk.
    pub(super) fn release_pending(&mut self) -> Result<()> {
        // Wait for lock-free I/O that may have found these clusters mapped
        // before their L2 entries changed (new I/O cannot: the entries no
        // longer name them).
        self.owner.wait_for_data_io();
        let pending = std::mem::take(&mut self.meta.pending_frees);
        for host in pending {
            self.change_refcount(host >> self.alloc.cluster_bits, -1)?;
        }
        let discards = std::mem::take(&mut self.meta.pending_discards);
        if !discards.is_empty() {
            // Their refcounts reach the disk first: a hole never lies under
            // a cluster the image on disk still counts.
            self.alloc.flush_refcounts()?;
            self.punch_clusters(discards)?;
        }
        Ok(())
    }

    /// Refuses to use clusters up to cluster number `end` when they would
    /// reach past the largest host offset an L2 entry can hold.
    fn check_clusters_end(&self, end: u64) -> Result<()> {
        if end > (MAX_HOST_OFFSET >> self.alloc.cluster_bits) + 1 {
            return Err(Error::NoSpace {
                image: self.alloc.name.clone(),
                what: "the image file",
                limit: MAX_HOST_OFFSET,
            });
        }
        Ok(())
    }

    fn grow_file_len(&self) {
        self.owner
            .grow_file_len(self.meta.end << self.alloc.cluster_bits);
    }

    /// Refuses to hand out clusters `first..first + count` (cluster
    /// numbers) for `what` when metadata still lives there: the image's
    /// refcounts are wrong. The caller's guard sets the corrupt bit.
    fn check_overlap(&self, first: u64, count: u64, what: &'static str) -> Result<()> {
        let bits = self.alloc.cluster_bits;
        let start = first << bits;
        let found = self.owner.metadata_overlap(
            self.meta.reftable_offset,
            &self.meta.reftable,
            start,
            count << bits,
        );
        match found {
            None => Ok(()),
            Some((structure, offset)) => Err(Error::MetadataOverlap {
                image: self.alloc.name.clone(),
                what,
                at: start,
                structure,
                offset,
            }),
        }
    }
}

/// Points the header at the refcount table at `offset`, `clusters`
/// clusters long (one write of the two fields; not synced).
pub(super) fn write_reftable_pointer(
    file: &dyn Storage,
    name: &str,
    offset: u64,
    clusters: u64,
) -> Result<()> {
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&offset.to_be_bytes());
    // At most MAX_REFCOUNT_TABLE_BYTES / 512 clusters.
    fields[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
    let at = qcow_format::header::field::REFCOUNT_TABLE_OFFSET;
    file.write_at(&fields, at)
        .map_err(|e| Error::io(name, "writing the header", at, e))
}

/// Discards `clusters` (cluster numbers, ascending), one request per run
/// of consecutive clusters. A failure names the run's host offset.
pub(super) fn discard_cluster_runs(
    file: &dyn Storage,
    cluster_bits: u32,
    clusters: &[u64],
) -> std::result::Result<(), (u64, std::io::Error)> {
    let mut i = 0;
    while i < clusters.len() {
        let mut j = i + 1;
        while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
            j += 1;
        }
        let at = clusters[i] << cluster_bits;
        file.discard(at, ((j - i) as u64) << cluster_bits)
            .map_err(|e| (at, e))?;
        i = j;
    }
    Ok(())
}
