//! A cache of metadata tables (L2 tables, refcount blocks) keyed by their
//! offset in the image file.
//!
//! The cache is bounded by a byte budget: every table is one cluster, so the
//! budget is a count of tables. The least recently used table is evicted
//! first. Tables are handed out as `Arc`s, so a reader keeps using a table
//! that was evicted under it, and lookups hold a lock only for the map
//! operation, never across data I/O.
//!
//! Writes are cached too. A cache made with [`TableCache::with_write_back`]
//! holds dirty tables until [`Flush::flush`] or until eviction needs their
//! room; a dirty table is written back through its [`WriteBack`] before it
//! leaves the cache, never dropped. Write-back order between caches follows
//! the format's crash rule (refcount blocks reach the disk before the L2
//! tables that use the clusters they count): [`TableCache::set_dependency`]
//! names a cache that is flushed before any table of this one is written.
//!
//! Loading is lock-free: a miss hands out a [`Load`] ticket, the caller
//! reads the table from disk with no lock held, and the ticket's
//! [`Load::insert`] refuses the table when its offset left the cache or was
//! dropped in the meantime (its bytes on disk may then have changed since
//! they were read), so that a stale copy never replaces a newer one.
//!
//! The map is split into shards by offset so that threads looking up
//! different tables rarely wait for each other.

#![deny(missing_docs)]

use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use lru::LruCache;

/// Most shards a cache is split into.
const MAX_SHARDS: usize = 16;

/// Why a table could not be written back: which table, and what the
/// storage said. Carried inside the `io::Error` the cache returns (see
/// [`failed_offset`]).
#[derive(Debug)]
pub struct WriteBackFailed {
    /// Offset of the table that could not be written.
    pub offset: u64,
    /// What the storage said.
    pub source: io::Error,
}

impl std::fmt::Display for WriteBackFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writing back the table at {:#x}: {}",
            self.offset, self.source
        )
    }
}

impl std::error::Error for WriteBackFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The offset of the table whose write-back failed, when `error` came from
/// a cache's write-back.
pub fn failed_offset(error: &io::Error) -> Option<u64> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<WriteBackFailed>())
        .map(|failed| failed.offset)
}

/// Writes one table back to its place in the image, in two steps so that
/// the bytes are taken before the cache's dependency is flushed: whatever
/// they contain is then covered by that flush, even if the table changes
/// meanwhile.
pub trait WriteBack<T>: Send + Sync {
    /// The on-disk bytes of `table` as it is now.
    fn encode(&self, table: &T) -> Vec<u8>;

    /// Writes bytes from [`WriteBack::encode`] to `offset` in the image file.
    fn write(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
}

/// Something that can write all its dirty state back.
pub trait Flush: Send + Sync {
    /// Writes every dirty table back (dependencies first).
    fn flush(&self) -> io::Result<()>;
}

struct Entry<T> {
    table: Arc<T>,
    dirty: bool,
}

/// The tables of one shard, and the offsets being loaded into it.
struct Shard<T> {
    tables: LruCache<u64, Entry<T>>,
    /// Offsets with outstanding [`Load`] tickets.
    loads: HashMap<u64, LoadWatch>,
}

/// Threads loading one offset, and how often the offset left the cache
/// (or was dropped) while they were.
struct LoadWatch {
    loaders: usize,
    departures: u64,
}

impl<T> Shard<T> {
    /// Records that the table at `offset` left the cache or is stale on
    /// disk: loads of it that started before are refused.
    fn departed(&mut self, offset: u64) {
        if let Some(watch) = self.loads.get_mut(&offset) {
            watch.departures += 1;
        }
    }
}

/// The result of [`TableCache::lookup`].
pub enum Lookup<'a, T> {
    /// The table was cached.
    Hit(Arc<T>),
    /// It was not: read it from disk and hand it to the ticket.
    Miss(Load<'a, T>),
}

/// The right to cache a table read from disk after a miss. Dropping it
/// unused is fine.
pub struct Load<'a, T> {
    cache: &'a TableCache<T>,
    offset: u64,
    departures: u64,
}

impl<T> Load<'_, T> {
    /// Caches `table`, read from disk after the miss, unless the offset
    /// left the cache or was dropped since the miss: then `Ok(None)`, and
    /// the caller reads it again. If another thread cached the offset
    /// meanwhile, that table wins and is returned instead. Fails only when
    /// a dirty table had to be written back to make room and could not be.
    pub fn insert(self, table: Arc<T>) -> io::Result<Option<Arc<T>>> {
        let cache = self.cache;
        let mut shard = lock(cache.shard(self.offset));
        let fresh = shard
            .loads
            .get(&self.offset)
            .is_some_and(|w| w.departures == self.departures);
        // The ticket's drop (after the shard lock is released) ends the watch.
        if let Some(existing) = shard.tables.get(&self.offset) {
            return Ok(Some(existing.table.clone()));
        }
        if !fresh {
            return Ok(None);
        }
        cache.make_room(&mut shard)?;
        shard.tables.push(
            self.offset,
            Entry {
                table: table.clone(),
                dirty: false,
            },
        );
        Ok(Some(table))
    }
}

impl<T> Drop for Load<'_, T> {
    fn drop(&mut self) {
        let mut shard = lock(self.cache.shard(self.offset));
        if let Some(watch) = shard.loads.get_mut(&self.offset) {
            watch.loaders -= 1;
            if watch.loaders == 0 {
                shard.loads.remove(&self.offset);
            }
        }
    }
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
    /// Dirty tables written back.
    pub write_backs: u64,
}

/// A byte-budgeted LRU cache of tables of type `T`, keyed by file offset.
pub struct TableCache<T> {
    shards: Vec<Mutex<Shard<T>>>,
    shard_shift: u32,
    table_bytes: u64,
    writer: Option<Arc<dyn WriteBack<T>>>,
    dependency: RwLock<Option<Arc<dyn Flush>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    write_backs: AtomicU64,
    generation: AtomicU64,
}

impl<T> std::fmt::Debug for TableCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableCache")
            .field("capacity", &self.capacity())
            .field("table_bytes", &self.table_bytes)
            .field("writable", &self.writer.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> TableCache<T> {
    /// A read-only cache for tables of `table_bytes` bytes each (one
    /// cluster), holding at most `budget_bytes` of them, and at least one.
    pub fn new(budget_bytes: u64, table_bytes: u64) -> Self {
        Self::build(budget_bytes, table_bytes, None)
    }

    /// A cache that also holds dirty tables and writes them back with `writer`.
    pub fn with_write_back(
        budget_bytes: u64,
        table_bytes: u64,
        writer: Arc<dyn WriteBack<T>>,
    ) -> Self {
        Self::build(budget_bytes, table_bytes, Some(writer))
    }

    fn build(budget_bytes: u64, table_bytes: u64, writer: Option<Arc<dyn WriteBack<T>>>) -> Self {
        let table_bytes = table_bytes.max(1);
        let capacity = usize::try_from(budget_bytes / table_bytes)
            .unwrap_or(usize::MAX)
            .max(1);
        // Shard only when each shard keeps at least 8 tables.
        let mut shards = 1;
        while shards * 2 <= MAX_SHARDS && capacity / (shards * 2) >= 8 {
            shards *= 2;
        }
        let per_shard = NonZeroUsize::new(capacity / shards).unwrap_or(NonZeroUsize::MIN);
        TableCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        tables: LruCache::new(per_shard),
                        loads: HashMap::new(),
                    })
                })
                .collect(),
            shard_shift: shards.trailing_zeros(),
            table_bytes,
            writer,
            dependency: RwLock::new(None),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            write_backs: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// A counter that changes whenever a table may have left the cache or
    /// been replaced by another (eviction, removal, replacement, clearing).
    /// While it stays the same, a table obtained from the cache is still the
    /// one the cache holds for its offset, so callers may keep using it
    /// (for example in a per-thread memo) without looking it up again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Names a cache that must be flushed before any table of this one is
    /// written back (for an L2 cache: the refcount cache).
    pub fn set_dependency(&self, dependency: Arc<dyn Flush>) {
        *self
            .dependency
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(dependency);
    }

    fn shard(&self, offset: u64) -> &Mutex<Shard<T>> {
        // Mix the table number so that neighbouring tables land in
        // different shards.
        let n = (offset / self.table_bytes).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let index = if self.shard_shift == 0 {
            0
        } else {
            // The shift leaves shard_shift (at most 4) bits.
            (n >> (64 - self.shard_shift)) as usize
        };
        &self.shards[index]
    }

    /// How many tables the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(|s| lock(s).tables.cap().get()).sum()
    }

    /// The table at `offset`, if cached; marks it most recently used.
    pub fn get(&self, offset: u64) -> Option<Arc<T>> {
        let mut shard = lock(self.shard(offset));
        match shard.tables.get(&offset) {
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

    /// The table at `offset` if cached (marked most recently used), else a
    /// ticket to cache it once read from disk.
    pub fn lookup(&self, offset: u64) -> Lookup<'_, T> {
        let mut shard = lock(self.shard(offset));
        if let Some(entry) = shard.tables.get(&offset) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(entry.table.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let watch = shard.loads.entry(offset).or_insert(LoadWatch {
            loaders: 0,
            departures: 0,
        });
        watch.loaders += 1;
        Lookup::Miss(Load {
            cache: self,
            offset,
            departures: watch.departures,
        })
    }

    /// Caches a table known to be current (clean): one just written, or
    /// one read while nothing could change it (under the caller's own
    /// lock). If another thread cached the same offset meanwhile, that
    /// table wins and is returned instead. Fails only when a dirty table
    /// had to be written back to make room and could not be.
    pub fn insert_clean(&self, offset: u64, table: Arc<T>) -> io::Result<Arc<T>> {
        let mut shard = lock(self.shard(offset));
        if let Some(existing) = shard.tables.get(&offset) {
            return Ok(existing.table.clone());
        }
        self.make_room(&mut shard)?;
        shard.tables.push(
            offset,
            Entry {
                table: table.clone(),
                dirty: false,
            },
        );
        Ok(table)
    }

    /// Caches a table and marks it dirty, replacing any cached version.
    /// Fails on a read-only cache, or when a dirty table had to be written
    /// back to make room and could not be.
    pub fn insert_dirty(&self, offset: u64, table: Arc<T>) -> io::Result<()> {
        if self.writer.is_none() {
            return Err(io::Error::other("the table cache is read-only"));
        }
        let mut shard = lock(self.shard(offset));
        match shard.tables.peek(&offset) {
            None => self.make_room(&mut shard)?,
            Some(existing) if !Arc::ptr_eq(&existing.table, &table) => self.bump(),
            Some(_) => {}
        }
        shard.tables.push(offset, Entry { table, dirty: true });
        Ok(())
    }

    /// Evicts the least recently used table if the shard is full, writing it
    /// back first when it is dirty. The shard stays locked meanwhile, so
    /// nobody reads a stale copy from disk before the write lands.
    fn make_room(&self, shard: &mut Shard<T>) -> io::Result<()> {
        if shard.tables.len() < shard.tables.cap().get() {
            return Ok(());
        }
        if let Some((&offset, entry)) = shard.tables.peek_lru() {
            if entry.dirty {
                let table = entry.table.clone();
                self.write_one(offset, &table)?;
            }
        }
        if let Some((offset, _)) = shard.tables.pop_lru() {
            shard.departed(offset);
        }
        self.bump();
        self.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes one table back: its bytes are taken first, then the
    /// dependency is flushed (covering everything those bytes refer to),
    /// then the bytes are written.
    fn write_one(&self, offset: u64, table: &T) -> io::Result<()> {
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| io::Error::other("the table cache is read-only"))?;
        let bytes = writer.encode(table);
        let dependency = self
            .dependency
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(dependency) = dependency {
            dependency.flush()?;
        }
        writer
            .write(offset, &bytes)
            .map_err(|source| io::Error::new(source.kind(), WriteBackFailed { offset, source }))?;
        self.write_backs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the table at `offset`, dirty or not: when its cluster is
    /// freed, or after the caller changed it on disk directly. Loads of it
    /// in progress are refused either way, as they may have read it before
    /// the change.
    pub fn remove(&self, offset: u64) -> Option<Arc<T>> {
        let mut shard = lock(self.shard(offset));
        shard.departed(offset);
        let removed = shard.tables.pop(&offset).map(|e| e.table);
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    /// Number of dirty tables.
    pub fn dirty_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).tables.iter().filter(|(_, e)| e.dirty).count())
            .sum()
    }

    /// Drops every clean table (dirty ones stay).
    pub fn clear_clean(&self) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            let clean: Vec<u64> = shard
                .tables
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(k, _)| *k)
                .collect();
            for k in clean {
                shard.tables.pop(&k);
                shard.departed(k);
            }
        }
        self.bump();
    }

    /// Usage counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            write_backs: self.write_backs.load(Ordering::Relaxed),
        }
    }
}

impl<T: Send + Sync> Flush for TableCache<T> {
    /// Writes every dirty table back, in offset order within each shard,
    /// after flushing the dependency. A table whose write fails stays dirty.
    fn flush(&self) -> io::Result<()> {
        if self.dirty_count() == 0 {
            return Ok(());
        }
        for shard in &self.shards {
            let mut shard = lock(shard);
            let mut dirty: Vec<(u64, Arc<T>)> = shard
                .tables
                .iter()
                .filter(|(_, e)| e.dirty)
                .map(|(k, e)| (*k, e.table.clone()))
                .collect();
            dirty.sort_by_key(|(k, _)| *k);
            for (offset, table) in dirty {
                self.write_one(offset, &table)?;
                if let Some(entry) = shard.tables.peek_mut(&offset) {
                    entry.dirty = false;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing;

    impl WriteBack<u32> for Failing {
        fn encode(&self, table: &u32) -> Vec<u8> {
            table.to_be_bytes().to_vec()
        }
        fn write(&self, _offset: u64, _bytes: &[u8]) -> io::Result<()> {
            Err(io::Error::other("no space"))
        }
    }

    #[test]
    fn failed_write_backs_name_their_table() {
        let cache = TableCache::with_write_back(64, 4, Arc::new(Failing));
        let inserted = cache.insert_dirty(0x3000, Arc::new(7u32));
        let error = match inserted.and_then(|()| cache.flush()) {
            Err(e) => e,
            Ok(()) => panic!("the write-back did not fail"),
        };
        assert_eq!(failed_offset(&error), Some(0x3000));
        assert!(error.to_string().contains("0x3000"), "{error}");
        assert_eq!(failed_offset(&io::Error::other("x")), None);
    }

    /// Records every write-back as (cache name, offset, value).
    #[derive(Default)]
    struct Log(Mutex<Vec<(&'static str, u64, u32)>>);

    struct Writer {
        name: &'static str,
        log: Arc<Log>,
        fail: bool,
    }

    impl WriteBack<u32> for Writer {
        fn encode(&self, table: &u32) -> Vec<u8> {
            table.to_be_bytes().to_vec()
        }

        fn write(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let value = u32::from_be_bytes(bytes.try_into().map_err(io::Error::other)?);
            lock(&self.log.0).push((self.name, offset, value));
            Ok(())
        }
    }

    fn writable(name: &'static str, tables: u64, log: &Arc<Log>) -> Arc<TableCache<u32>> {
        let writer = Arc::new(Writer {
            name,
            log: log.clone(),
            fail: false,
        });
        Arc::new(TableCache::with_write_back(tables * 512, 512, writer))
    }

    #[test]
    fn evicts_least_recently_used_and_counts() -> io::Result<()> {
        let cache: TableCache<u32> = TableCache::new(2 * 512, 512);
        assert_eq!(cache.capacity(), 2);
        cache.insert_clean(0, Arc::new(0))?;
        cache.insert_clean(512, Arc::new(1))?;
        assert_eq!(cache.get(0).as_deref(), Some(&0));
        cache.insert_clean(1024, Arc::new(2))?;
        assert!(cache.get(512).is_none(), "512 was least recently used");
        assert!(cache.get(0).is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (2, 1, 1));
        Ok(())
    }

    #[test]
    fn generation_changes_when_tables_leave_or_are_replaced() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let cache = writable("l2", 1, &log);
        let g0 = cache.generation();
        let t = cache.insert_clean(0, Arc::new(1))?;
        cache.insert_dirty(0, t)?;
        assert_eq!(cache.generation(), g0, "same table, same generation");
        cache.insert_dirty(0, Arc::new(2))?;
        let g1 = cache.generation();
        assert_ne!(g1, g0, "replaced");
        cache.insert_clean(512, Arc::new(3))?;
        let g2 = cache.generation();
        assert_ne!(g2, g1, "evicted");
        cache.remove(512);
        assert_ne!(cache.generation(), g2, "removed");
        Ok(())
    }

    #[test]
    fn read_only_cache_refuses_dirty_tables() {
        let cache: TableCache<u32> = TableCache::new(512, 512);
        assert!(cache.insert_dirty(0, Arc::new(1)).is_err());
    }

    #[test]
    fn dirty_tables_are_written_back_on_eviction_never_dropped() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let cache = writable("l2", 1, &log);
        cache.insert_dirty(0, Arc::new(7))?;
        assert_eq!(cache.dirty_count(), 1);
        cache.insert_clean(512, Arc::new(8))?;
        assert_eq!(*lock(&log.0), [("l2", 0, 7)]);
        assert_eq!(cache.stats().write_backs, 1);
        Ok(())
    }

    #[test]
    fn flush_writes_dependencies_first_and_cleans() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let refcounts = writable("refcount", 8, &log);
        let l2 = writable("l2", 8, &log);
        l2.set_dependency(refcounts.clone());
        l2.insert_dirty(1024, Arc::new(2))?;
        l2.insert_dirty(512, Arc::new(1))?;
        refcounts.insert_dirty(4096, Arc::new(9))?;
        l2.flush()?;
        assert_eq!(
            *lock(&log.0),
            [("refcount", 4096, 9), ("l2", 512, 1), ("l2", 1024, 2)]
        );
        assert_eq!(l2.dirty_count() + refcounts.dirty_count(), 0);
        l2.flush()?;
        assert_eq!(lock(&log.0).len(), 3, "a clean cache writes nothing");
        Ok(())
    }

    #[test]
    fn eviction_flushes_the_dependency_first() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let refcounts = writable("refcount", 8, &log);
        let l2 = writable("l2", 1, &log);
        l2.set_dependency(refcounts.clone());
        refcounts.insert_dirty(4096, Arc::new(9))?;
        l2.insert_dirty(0, Arc::new(1))?;
        l2.insert_dirty(512, Arc::new(2))?;
        assert_eq!(*lock(&log.0), [("refcount", 4096, 9), ("l2", 0, 1)]);
        Ok(())
    }

    #[test]
    fn failed_write_back_keeps_the_table_dirty() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let writer = Arc::new(Writer {
            name: "l2",
            log,
            fail: true,
        });
        let cache: TableCache<u32> = TableCache::with_write_back(512, 512, writer);
        cache.insert_dirty(0, Arc::new(1))?;
        assert!(cache.flush().is_err());
        assert!(cache.insert_clean(512, Arc::new(2)).is_err());
        assert_eq!(cache.dirty_count(), 1);
        assert_eq!(cache.get(0).as_deref(), Some(&1));
        Ok(())
    }

    #[test]
    fn insert_clean_keeps_existing_entry() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let cache = writable("l2", 64, &log);
        cache.insert_dirty(0, Arc::new(1))?;
        let t = cache.insert_clean(0, Arc::new(2))?;
        assert_eq!(*t, 1);
        assert_eq!(cache.dirty_count(), 1);
        Ok(())
    }

    fn load<T>(cache: &TableCache<T>, offset: u64) -> io::Result<Load<'_, T>> {
        match cache.lookup(offset) {
            Lookup::Miss(load) => Ok(load),
            Lookup::Hit(_) => Err(io::Error::other(format!("{offset} should not be cached"))),
        }
    }

    #[test]
    fn a_load_with_nothing_in_between_is_cached() -> io::Result<()> {
        let cache: TableCache<u32> = TableCache::new(4 * 512, 512);
        let ticket = load(&cache, 0)?;
        assert_eq!(ticket.insert(Arc::new(5))?.as_deref(), Some(&5));
        assert!(matches!(cache.lookup(0), Lookup::Hit(t) if *t == 5));
        Ok(())
    }

    #[test]
    fn a_load_is_refused_when_its_table_was_dropped_meanwhile() -> io::Result<()> {
        let cache: TableCache<u32> = TableCache::new(4 * 512, 512);
        let ticket = load(&cache, 0)?;
        // Changed on disk by someone else, who drops any cached copy.
        cache.remove(0);
        assert!(
            ticket.insert(Arc::new(5))?.is_none(),
            "read before the change"
        );
        assert!(cache.get(0).is_none());
        // A new miss, after the change, is fine.
        assert!(load(&cache, 0)?.insert(Arc::new(6))?.is_some());
        Ok(())
    }

    #[test]
    fn a_load_is_refused_when_its_table_came_and_went_meanwhile() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let cache = writable("l2", 1, &log);
        let stale = load(&cache, 0)?;
        // Another thread loads it, changes it, and it is evicted (written
        // back) before the first load finishes.
        let other = load(&cache, 0)?;
        let table = other
            .insert(Arc::new(1))?
            .ok_or_else(|| io::Error::other("refused"))?;
        cache.insert_dirty(0, Arc::new(*table + 1))?;
        cache.insert_clean(512, Arc::new(9))?;
        assert_eq!(*lock(&log.0), [("l2", 0, 2)]);
        assert!(
            stale.insert(Arc::new(1))?.is_none(),
            "the stale copy must lose"
        );
        assert!(cache.get(0).is_none());
        Ok(())
    }

    #[test]
    fn a_load_returns_the_table_another_thread_cached() -> io::Result<()> {
        let cache: TableCache<u32> = TableCache::new(4 * 512, 512);
        let first = load(&cache, 0)?;
        let second = load(&cache, 0)?;
        assert_eq!(second.insert(Arc::new(2))?.as_deref(), Some(&2));
        assert_eq!(first.insert(Arc::new(1))?.as_deref(), Some(&2));
        Ok(())
    }

    /// A table whose value a dependency's flush changes, as a concurrent
    /// writer would.
    struct Racing(std::sync::atomic::AtomicU32);

    struct RacingWriter(Arc<Log>);

    impl WriteBack<Racing> for RacingWriter {
        fn encode(&self, table: &Racing) -> Vec<u8> {
            table.0.load(Ordering::SeqCst).to_be_bytes().to_vec()
        }

        fn write(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            let value = u32::from_be_bytes(bytes.try_into().map_err(io::Error::other)?);
            lock(&self.0.0).push(("l2", offset, value));
            Ok(())
        }
    }

    struct ChangesTable(Arc<Racing>);

    impl Flush for ChangesTable {
        fn flush(&self) -> io::Result<()> {
            self.0.0.store(99, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn write_back_takes_the_bytes_before_flushing_the_dependency() -> io::Result<()> {
        let log = Arc::new(Log::default());
        let cache: TableCache<Racing> =
            TableCache::with_write_back(512, 512, Arc::new(RacingWriter(log.clone())));
        let table = Arc::new(Racing(std::sync::atomic::AtomicU32::new(1)));
        cache.set_dependency(Arc::new(ChangesTable(table.clone())));
        cache.insert_dirty(0, table)?;
        cache.flush()?;
        // What changed during the dependency's flush may rely on something
        // that flush did not cover: it must wait for the next write-back.
        assert_eq!(*lock(&log.0), [("l2", 0, 1)]);
        Ok(())
    }

    #[test]
    fn shards_keep_total_capacity_near_budget() -> io::Result<()> {
        let cache: TableCache<u32> = TableCache::new(32 << 20, 64 << 10);
        assert_eq!(cache.capacity(), 512);
        for i in 0..10_000u64 {
            cache.insert_clean(i << 16, Arc::new(0))?;
        }
        let held = (0..10_000u64)
            .filter(|i| cache.get(i << 16).is_some())
            .count();
        assert!(held <= 512 && held > 400, "held {held}");
        Ok(())
    }
}
