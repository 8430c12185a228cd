//! A cache of metadata tables (L2 tables, refcount blocks) keyed by their
//! offset in the image file.
//!
//! The cache is bounded by a byte budget: every table is one cluster, so the
//! budget is a count of tables. The least recently used table is evicted
//! first. Tables are handed out as `Arc`s, so a reader keeps using a table
//! that was evicted under it, and lookups hold a lock only for the map
//! operation, never across I/O.
//!
//! Writes are cached too: a table marked dirty is never dropped on eviction.
//! [`TableCache::insert`] returns the dirty tables it pushed out so the
//! caller writes them back, and [`TableCache::take_dirty`] hands over every
//! dirty table for a flush. Ordering between caches (refcount blocks must
//! reach the disk before the L2 tables that rely on them) is the caller's:
//! flush the cache a table depends on first. [`TableCache::flush_order`]
//! records such a dependency so the engine can ask which cache goes first.
//!
//! The map is split into shards by offset so that threads looking up
//! different tables rarely wait for each other.

#![deny(missing_docs)]

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

/// Most shards a cache is split into.
const MAX_SHARDS: usize = 16;

struct Entry<T> {
    table: Arc<T>,
    dirty: bool,
}

/// Counters describing how a cache has been used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found their table.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Tables evicted to make room.
    pub evictions: u64,
}

/// A byte-budgeted LRU cache of tables of type `T`, keyed by file offset.
pub struct TableCache<T> {
    shards: Vec<Mutex<LruCache<u64, Entry<T>>>>,
    shard_shift: u32,
    table_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl<T> std::fmt::Debug for TableCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableCache")
            .field("capacity", &self.capacity())
            .field("table_bytes", &self.table_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<T> TableCache<T> {
    /// A cache for tables of `table_bytes` bytes each (one cluster), holding
    /// at most `budget_bytes` of them, and at least one table.
    pub fn new(budget_bytes: u64, table_bytes: u64) -> Self {
        let table_bytes = table_bytes.max(1);
        let capacity = usize::try_from(budget_bytes / table_bytes)
            .unwrap_or(usize::MAX)
            .max(1);
        // Shards only when each keeps a useful share of the budget.
        let shards = (capacity / 8).clamp(1, MAX_SHARDS).next_power_of_two();
        let shards = if shards > capacity / 8 && shards > 1 {
            shards / 2
        } else {
            shards
        };
        let per_shard = NonZeroUsize::new(capacity / shards).unwrap_or(NonZeroUsize::MIN);
        TableCache {
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            shard_shift: shards.trailing_zeros(),
            table_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, offset: u64) -> &Mutex<LruCache<u64, Entry<T>>> {
        // Tables are table_bytes apart; mix the table number so that
        // neighbouring tables land in different shards.
        let n = offset / self.table_bytes;
        let mixed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let index = if self.shard_shift == 0 {
            0
        } else {
            (mixed >> (64 - self.shard_shift)) as usize
        };
        &self.shards[index]
    }

    /// How many tables the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).cap().get())
            .sum()
    }

    /// The table at `offset`, if cached; marks it most recently used.
    pub fn get(&self, offset: u64) -> Option<Arc<T>> {
        let mut shard = self
            .shard(offset)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.get(&offset) {
            Some(entry) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.table.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Caches a table read from disk (clean). If another thread cached the
    /// same offset meanwhile, that table wins and is returned instead.
    /// Returns the table to use and any dirty table evicted to make room,
    /// which the caller must write back.
    pub fn insert_clean(&self, offset: u64, table: Arc<T>) -> (Arc<T>, Option<(u64, Arc<T>)>) {
        let mut shard = self
            .shard(offset)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = shard.get(&offset) {
            return (existing.table.clone(), None);
        }
        let evicted = self.push(&mut shard, offset, table.clone(), false);
        (table, evicted)
    }

    /// Caches a table and marks it dirty, replacing any cached version.
    /// Returns a dirty table evicted to make room, which the caller must
    /// write back.
    pub fn insert_dirty(&self, offset: u64, table: Arc<T>) -> Option<(u64, Arc<T>)> {
        let mut shard = self
            .shard(offset)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.push(&mut shard, offset, table, true)
    }

    fn push(
        &self,
        shard: &mut LruCache<u64, Entry<T>>,
        offset: u64,
        table: Arc<T>,
        dirty: bool,
    ) -> Option<(u64, Arc<T>)> {
        let was_dirty = shard.peek(&offset).is_some_and(|e| e.dirty);
        let entry = Entry {
            table,
            dirty: dirty || was_dirty,
        };
        match shard.push(offset, entry) {
            Some((old_offset, old)) if old_offset != offset => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                old.dirty.then_some((old_offset, old.table))
            }
            _ => None,
        }
    }

    /// Drops the table at `offset` (for example when its cluster is freed),
    /// dirty or not.
    pub fn remove(&self, offset: u64) -> Option<Arc<T>> {
        self.shard(offset)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop(&offset)
            .map(|e| e.table)
    }

    /// Hands over every dirty table, marking them clean. The caller writes
    /// them back; if that fails it must re-insert them with
    /// [`TableCache::insert_dirty`].
    pub fn take_dirty(&self) -> Vec<(u64, Arc<T>)> {
        let mut dirty = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (offset, entry) in shard.iter_mut() {
                if entry.dirty {
                    entry.dirty = false;
                    dirty.push((*offset, entry.table.clone()));
                }
            }
        }
        dirty.sort_by_key(|(offset, _)| *offset);
        dirty
    }

    /// Number of dirty tables.
    pub fn dirty_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|(_, e)| e.dirty)
                    .count()
            })
            .sum()
    }

    /// Drops every clean table (dirty ones stay).
    pub fn clear_clean(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let clean: Vec<u64> = shard
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(k, _)| *k)
                .collect();
            for k in clean {
                shard.pop(&k);
            }
        }
    }

    /// Usage counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

/// Which of two caches must reach the disk first when both hold dirty
/// tables: the one whose tables the other's entries point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOrder {
    /// Refcount blocks before the L2 tables that use the clusters they count.
    RefcountsBeforeL2,
}

impl<T> TableCache<T> {
    /// The write-back order between the refcount cache and the L2 cache,
    /// stated once here so the engine's flush follows it.
    pub fn flush_order() -> FlushOrder {
        FlushOrder::RefcountsBeforeL2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_counts() {
        let cache: TableCache<u32> = TableCache::new(2 * 512, 512);
        assert_eq!(cache.capacity(), 2);
        cache.insert_clean(0, Arc::new(0));
        cache.insert_clean(512, Arc::new(1));
        assert_eq!(cache.get(0).as_deref(), Some(&0));
        cache.insert_clean(1024, Arc::new(2));
        assert!(cache.get(512).is_none(), "512 was least recently used");
        assert!(cache.get(0).is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (2, 1, 1));
    }

    #[test]
    fn dirty_tables_are_returned_on_eviction_and_flush() {
        let cache: TableCache<u32> = TableCache::new(512, 512);
        assert!(cache.insert_dirty(0, Arc::new(7)).is_none());
        assert_eq!(cache.dirty_count(), 1);
        let evicted = cache.insert_clean(512, Arc::new(8)).1;
        assert_eq!(evicted.map(|(o, t)| (o, *t)), Some((0, 7)));
        cache.insert_dirty(1024, Arc::new(9));
        let dirty = cache.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(cache.dirty_count(), 0);
    }

    #[test]
    fn insert_clean_keeps_existing_entry() {
        let cache: TableCache<u32> = TableCache::new(1 << 20, 512);
        cache.insert_dirty(0, Arc::new(1));
        let (t, _) = cache.insert_clean(0, Arc::new(2));
        assert_eq!(*t, 1);
        assert_eq!(cache.dirty_count(), 1);
    }

    #[test]
    fn shards_keep_total_capacity_near_budget() {
        let cache: TableCache<u32> = TableCache::new(32 << 20, 64 << 10);
        assert_eq!(cache.capacity(), 512);
        for i in 0..10_000u64 {
            cache.insert_clean(i << 16, Arc::new(0));
        }
        let held: usize = (0..10_000u64)
            .filter(|i| cache.get(i << 16).is_some())
            .count();
        assert!(held <= 512);
    }
}
