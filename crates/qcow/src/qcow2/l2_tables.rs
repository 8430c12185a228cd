//! The L2 tables of an open image: their cache, the sequence lock that
//! keeps two-word (extended) entries whole, and entry updates.
//!
//! Tables are decoded to atomics, so that a writer holding the allocation
//! lock changes entries in place while readers look them up without a lock.
//! A table read from the file is cached only if it did not leave the cache
//! meanwhile (a writer may have changed it and written it back after the
//! read). A writable image's cache writes changed tables back, after the
//! refcount blocks they depend on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow_cache::{Flush, Lookup, TableCache, WriteBack};
use qcow_io::Storage;

use super::L2Table;
use super::entry_seq::EntrySeq;
use crate::{Error, Result};

/// Writes L2 tables back to the image file.
#[derive(Debug)]
struct L2Writer {
    file: Arc<dyn Storage>,
    /// Two-word entries are copied whole, never half changed: a table can
    /// be written back (evicted) while a writer changes it.
    seq: Arc<EntrySeq>,
}

impl WriteBack<L2Table> for L2Writer {
    fn encode(&self, table: &L2Table) -> Vec<u8> {
        self.seq.read(|| {
            table
                .iter()
                .flat_map(|e| e.load(Ordering::Acquire).to_be_bytes())
                .collect()
        })
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_at(bytes, offset)
    }
}

/// The L2 tables of an image.
#[derive(Debug)]
pub(crate) struct L2Tables {
    name: String,
    file: Arc<dyn Storage>,
    cache: TableCache<L2Table>,
    seq: Arc<EntrySeq>,
    /// Entries are two words (entry and subcluster bitmap).
    extended: bool,
}

impl L2Tables {
    /// A read-only cache of `budget` bytes of tables of `table_bytes`.
    pub(super) fn new(
        name: &str,
        file: Arc<dyn Storage>,
        budget: u64,
        table_bytes: u64,
        extended: bool,
    ) -> Self {
        L2Tables {
            name: name.to_owned(),
            file,
            cache: TableCache::new(budget, table_bytes),
            seq: Arc::default(),
            extended,
        }
    }

    /// Makes the cache write changed tables back (`budget` bytes), each
    /// only after `dependency` (the refcount blocks) is flushed.
    pub(super) fn make_writable(
        &mut self,
        budget: u64,
        table_bytes: u64,
        dependency: Arc<dyn Flush>,
    ) {
        let cache = TableCache::with_write_back(
            budget,
            table_bytes,
            Arc::new(L2Writer {
                file: self.file.clone(),
                seq: self.seq.clone(),
            }),
        );
        cache.set_dependency(dependency);
        self.cache = cache;
    }

    /// The table at `offset`, from the cache or from `read` (which reads
    /// and validates it), read again when it left the cache meanwhile.
    pub(super) fn get(
        &self,
        offset: u64,
        mut read: impl FnMut() -> Result<L2Table>,
    ) -> Result<Arc<L2Table>> {
        loop {
            let load = match self.cache.lookup(offset) {
                Lookup::Hit(table) => return Ok(table),
                Lookup::Miss(load) => load,
            };
            let table = Arc::new(read()?);
            // A freshly read table is clean: nothing evicted for it was
            // dirtied by this path.
            let cached = load.insert(table).map_err(|e| {
                Error::cache_io(&self.name, "writing back an evicted table", offset, e)
            })?;
            if let Some(table) = cached {
                return Ok(table);
            }
        }
    }

    /// Changes whenever a table is evicted or replaced (keys memos).
    pub(super) fn generation(&self) -> u64 {
        self.cache.generation()
    }

    /// Runs a lock-free lookup of entries so that it sees each two-word
    /// entry whole, never half changed by a writer.
    pub(super) fn consistent<R>(&self, lookup: impl FnMut() -> R) -> R {
        let mut lookup = lookup;
        if self.extended {
            self.seq.read(lookup)
        } else {
            lookup()
        }
    }

    /// Sets entry word `index` of `table` to `entry` (and, for two-word
    /// entries, the next word to `bitmap`, atomically for readers).
    /// Returns the old entry word. `None`: the index is out of range.
    pub(super) fn set_words(
        &self,
        table: &L2Table,
        index: usize,
        entry: u64,
        bitmap: u64,
    ) -> Option<u64> {
        let slot = table.get(index)?;
        if self.extended {
            let bitmap_slot = table.get(index + 1)?;
            Some(self.seq.write(|| {
                bitmap_slot.store(bitmap, Ordering::Release);
                slot.swap(entry, Ordering::AcqRel)
            }))
        } else {
            Some(slot.swap(entry, Ordering::AcqRel))
        }
    }

    /// Records that the table at `offset` changed (written back later).
    pub(super) fn mark_dirty(&self, offset: u64, table: Arc<L2Table>) -> Result<()> {
        self.cache
            .insert_dirty(offset, table)
            .map_err(|e| Error::cache_io(&self.name, "writing back an L2 table", offset, e))
    }

    /// Writes a new table to the file at `offset` now (before anything
    /// points at it), then caches it.
    pub(super) fn write_new(&self, offset: u64, table: Arc<L2Table>) -> Result<Arc<L2Table>> {
        let writer = L2Writer {
            file: self.file.clone(),
            seq: self.seq.clone(),
        };
        writer
            .write(offset, &writer.encode(&table))
            .map_err(|e| Error::io(&self.name, "writing an L2 table", offset, e))?;
        self.cache
            .insert_clean(offset, table)
            .map_err(|e| Error::cache_io(&self.name, "caching an L2 table", offset, e))
    }

    /// Drops the table at `offset` from the cache (its cluster was freed,
    /// or it was rewritten on disk behind the cache).
    pub(super) fn forget(&self, offset: u64) {
        self.cache.remove(offset);
    }

    /// Drops every clean table (the active table set changed).
    pub(super) fn clear_clean(&self) {
        self.cache.clear_clean();
    }

    /// Writes every changed table back.
    pub(super) fn flush(&self) -> Result<()> {
        self.cache
            .flush()
            .map_err(|e| Error::cache_io(&self.name, "writing L2 tables", 0, e))
    }

    /// Cache counters.
    pub(super) fn stats(&self) -> qcow_cache::CacheStats {
        self.cache.stats()
    }
}

/// A table of `entries` zero words.
pub(super) fn empty_table(words: usize) -> Arc<L2Table> {
    Arc::new((0..words).map(|_| AtomicU64::new(0)).collect())
}
