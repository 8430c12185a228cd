//! Persistent dirty bitmaps, kept while an image is writable.
//!
//! When an image opens for writing, every bitmap of its directory is read
//! into memory, except those found marked in use: they were open when their
//! writer stopped, may miss writes, and are kept on disk exactly as found
//! (QEMU calls them inconsistent; they can only be removed).
//!
//! - Before the first guest write (after opening, or after the bitmaps were
//!   last stored), every enabled bitmap is marked in use in the directory,
//!   on disk and flushed, so that a crash from then on leaves it marked.
//! - Every guest range written, zeroed or discarded sets the bits of every
//!   enabled bitmap that cover it. Writers hold the set shared from the
//!   in-use check to the recording; storing holds it exclusively, so no
//!   write slips between a store and its recording.
//! - On flush and close, bitmaps that changed get new data clusters and a
//!   new table, then a new directory (with the in-use flags cleared) is
//!   written to new clusters and the header switched to it in one write of
//!   the extension's fields, and only then are the old directory, tables
//!   and data clusters freed: a crash leaves the old directory or the new.
//!
//! The directory's location lives here (the header's copy is updated by
//! the `&mut` operations only); the overlap guard and every header rewrite
//! take it from here.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use qcow_format::bitmap::{
    BITMAP_AUTO, BITMAP_IN_USE, BitmapEntry, TABLE_ENTRY_ALL_ONES, TABLE_ENTRY_OFFSET_MASK,
    TABLE_ENTRY_RESERVED_MASK, encode_directory, table_entries,
};
use qcow_format::extension::{BitmapsExtension, HeaderExtension};
use qcow_format::header::{AUTOCLEAR_BITMAPS, Header};
use qcow_format::limits::MAX_BITMAP_DIRECTORY_BYTES;

use super::Qcow2Image;
use super::allocator::Owner;
use crate::{Error, Result};

/// The bitmaps of a writable image.
#[derive(Debug)]
pub(crate) struct BitmapTracker {
    /// The bitmaps, in directory order.
    pub(super) set: RwLock<BitmapSet>,
    /// Whether any bitmap records writes (the write path's quick test).
    recording: AtomicBool,
    /// Stores wait (a resize is under way: every bitmap stays marked in
    /// use until the bits have the new size).
    hold: AtomicBool,
    /// The directory as on disk (`None`: no bitmaps extension).
    directory: Mutex<Option<BitmapsExtension>>,
}

/// The bitmaps and whether the recording ones are marked in use on disk.
#[derive(Debug)]
pub(crate) struct BitmapSet {
    pub(super) bitmaps: Vec<Bitmap>,
    marked_in_use: bool,
}

/// One bitmap.
#[derive(Debug)]
pub(crate) struct Bitmap {
    /// The entry as on disk (its table, and the flags last stored).
    pub(super) entry: BitmapEntry,
    /// Whether it records writes.
    pub(super) enabled: bool,
    /// Its bits; `None` for a bitmap found in use (kept as it is).
    pub(super) bits: Option<Bits>,
    /// Whether the bits, size or flags differ from what is stored.
    pub(super) changed: AtomicBool,
}

/// A bitmap's bits: bit `i` covers guest bytes `i * granularity` up to the
/// next bit's, stored as on disk (bit `i` is bit `i % 8` of byte `i / 8`).
#[derive(Debug)]
pub(crate) struct Bits {
    words: Vec<AtomicU64>,
    len: u64,
    granularity_bits: u8,
}

thread_local! {
    /// Nesting of recorded writes on this thread: inner calls (a discard
    /// zeroing clusters, a compressed write falling back to a plain one)
    /// are covered by the outer one.
    static RECORDING: Cell<u32> = const { Cell::new(0) };
}

impl Bits {
    /// All clear, for a disk of `disk_size` bytes.
    pub(super) fn new(disk_size: u64, granularity_bits: u8) -> Self {
        let len = disk_size.div_ceil(1 << granularity_bits);
        Bits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
            granularity_bits,
        }
    }

    /// Sets the bits covering guest bytes `offset..offset + len`.
    pub(super) fn set_range(&self, offset: u64, len: u64) {
        if len == 0 || self.len == 0 {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (offset.saturating_add(len - 1) >> self.granularity_bits).min(self.len - 1);
        if first > last {
            return;
        }
        self.set_bits(first, last);
    }

    /// Sets bits `first..=last`.
    fn set_bits(&self, first: u64, last: u64) {
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if let Some(word) = self.words.get(w as usize) {
                word.fetch_or(mask, Ordering::AcqRel);
            }
        }
    }

    /// Whether bit `i` is set.
    #[cfg(test)]
    pub(super) fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (i % 64) & 1 != 0)
    }

    /// Clears every bit.
    pub(super) fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Bytes each bit covers.
    pub(super) fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Guest ranges whose bits are set, as `(offset, len)`, merged, within
    /// a disk of `disk_size` bytes; `None` past [`MAX_RANGES`] of them.
    pub(super) fn ranges(&self, disk_size: u64) -> Option<Vec<(u64, u64)>> {
        self.ranges_in(0, disk_size, disk_size)
    }

    /// [`Bits::ranges`] of the bits covering guest bytes `offset..offset +
    /// len` only (whole bits: ranges may reach outside).
    pub(super) fn ranges_in(
        &self,
        offset: u64,
        len: u64,
        disk_size: u64,
    ) -> Option<Vec<(u64, u64)>> {
        let g = self.granularity();
        let mut out: Vec<(u64, u64)> = Vec::new();
        if len == 0 {
            return Some(out);
        }
        let first_word = (offset / g / 64) as usize;
        let last_word = (offset.saturating_add(len - 1) / g / 64) as usize;
        let words = self
            .words
            .iter()
            .enumerate()
            .skip(first_word)
            .take(last_word + 1 - first_word);
        for (w, word) in words {
            let mut v = word.load(Ordering::Acquire);
            while v != 0 {
                let b = u64::from(v.trailing_zeros());
                v &= v - 1;
                let bit = w as u64 * 64 + b;
                if bit >= self.len {
                    break;
                }
                let start = bit * g;
                let end = ((bit + 1) * g).min(disk_size);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l = end - *s,
                    _ => {
                        if out.len() == MAX_RANGES {
                            return None;
                        }
                        out.push((start, end - start));
                    }
                }
            }
        }
        Some(out)
    }

    /// The bits for a disk of `disk_size` bytes: bits past the old end
    /// clear, bits past the new end dropped.
    pub(super) fn resized(&self, disk_size: u64) -> Bits {
        let new = Bits::new(disk_size, self.granularity_bits);
        for (w, word) in new.words.iter().enumerate() {
            if let Some(old) = self.words.get(w) {
                word.store(old.load(Ordering::Acquire), Ordering::Release);
            }
        }
        // Clear the tail of the last word.
        if new.len % 64 != 0 {
            if let Some(last) = new.words.last() {
                last.fetch_and(u64::MAX >> (64 - new.len % 64), Ordering::AcqRel);
            }
        }
        new
    }

    /// Bitmap data bytes `chunk * cluster_size..` (one cluster's worth,
    /// zero past the end).
    fn chunk_bytes(&self, chunk: u64, cluster_size: u64) -> Vec<u8> {
        let words_per_chunk = (cluster_size / 8) as usize;
        let start = chunk as usize * words_per_chunk;
        let mut out = Vec::with_capacity(cluster_size as usize);
        for i in start..start + words_per_chunk {
            let w = self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire));
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Loads bitmap data bytes into chunk `chunk`.
    fn load_chunk(&self, chunk: u64, cluster_size: u64, bytes: &[u8]) {
        let start = chunk as usize * (cluster_size / 8) as usize;
        for (i, word) in bytes.chunks_exact(8).enumerate() {
            if let Some(slot) = self.words.get(start + i) {
                let mut b = [0u8; 8];
                b.copy_from_slice(word);
                slot.store(u64::from_le_bytes(b), Ordering::Release);
            }
        }
        self.clear_tail();
    }

    /// Sets every bit of chunk `chunk` (a table entry saying all ones).
    fn fill_chunk(&self, chunk: u64, cluster_size: u64) {
        let bits_per_chunk = cluster_size * 8;
        let first = chunk * bits_per_chunk;
        if first < self.len {
            self.set_bits(first, (first + bits_per_chunk - 1).min(self.len - 1));
        }
    }

    /// Clears bits past the end (the disk's last bit) in the last word.
    fn clear_tail(&self) {
        if self.len % 64 != 0 {
            if let Some(last) = self.words.get((self.len / 64) as usize) {
                last.fetch_and(u64::MAX >> (64 - self.len % 64), Ordering::AcqRel);
            }
        }
        for w in self.words.iter().skip(self.len.div_ceil(64) as usize) {
            w.store(0, Ordering::Release);
        }
    }
}

impl BitmapTracker {
    /// A tracker of `bitmaps`, whose directory is `directory` on disk.
    pub(super) fn new(bitmaps: Vec<Bitmap>, directory: Option<BitmapsExtension>) -> Self {
        let set = BitmapSet {
            bitmaps,
            marked_in_use: false,
        };
        let tracker = BitmapTracker {
            recording: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            directory: Mutex::new(directory),
            set: RwLock::new(BitmapSet {
                bitmaps: Vec::new(),
                marked_in_use: false,
            }),
        };
        tracker.update_recording(&set);
        *tracker.write() = set;
        tracker
    }

    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, BitmapSet> {
        self.set.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, BitmapSet> {
        self.set.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory as on disk.
    pub(super) fn directory(&self) -> Option<BitmapsExtension> {
        *self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Recomputes whether any bitmap records writes.
    pub(super) fn update_recording(&self, set: &BitmapSet) {
        let recording = set.bitmaps.iter().any(|b| b.enabled && b.bits.is_some());
        self.recording.store(recording, Ordering::Release);
    }
}

impl BitmapSet {
    /// The bitmap named `name`.
    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.bitmaps.iter().position(|b| b.entry.name == name)
    }

    /// The directory entries with the flags the bitmaps have now (in use
    /// where `in_use` says so).
    fn entries(&self, in_use: impl Fn(&Bitmap) -> bool) -> Vec<BitmapEntry> {
        self.bitmaps
            .iter()
            .map(|b| {
                let mut entry = b.entry.clone();
                if b.bits.is_some() {
                    entry.flags &= !(BITMAP_IN_USE | BITMAP_AUTO);
                    if b.enabled {
                        entry.flags |= BITMAP_AUTO;
                    }
                    if in_use(b) {
                        entry.flags |= BITMAP_IN_USE;
                    }
                }
                entry
            })
            .collect()
    }
}

impl Qcow2Image {
    /// Reads the bitmaps for writing (see the module documentation).
    /// Bitmaps QEMU could not load either (extra data, another type) are
    /// refused.
    pub(super) fn load_bitmap_tracker(&self) -> Result<BitmapTracker> {
        let mut bitmaps = Vec::new();
        for entry in &self.bitmaps {
            let unsupported = |what: String| Error::Unsupported {
                image: self.name.clone(),
                what,
            };
            if !entry.extra_data.is_empty() {
                return Err(unsupported(format!(
                    "writing an image whose bitmap '{}' has extra data",
                    entry.name
                )));
            }
            if entry.kind != qcow_format::bitmap::BITMAP_KIND_DIRTY {
                return Err(unsupported(format!(
                    "writing an image whose bitmap '{}' has type {}",
                    entry.name, entry.kind
                )));
            }
            // Every entry, also one found in use (its table is freed when
            // it is removed): nothing is trusted before it is checked.
            self.check_bitmap_entry(entry)?;
            let bits = if entry.in_use() {
                None
            } else {
                Some(self.read_bitmap_bits(entry)?)
            };
            bitmaps.push(Bitmap {
                enabled: entry.auto(),
                entry: entry.clone(),
                bits,
                changed: AtomicBool::new(false),
            });
        }
        Ok(BitmapTracker::new(bitmaps, self.header.bitmaps().copied()))
    }

    /// Reads a bitmap's bits from its table and data clusters, refusing a
    /// table that does not fit the disk, the file or the format.
    pub(super) fn read_bitmap_bits(&self, entry: &BitmapEntry) -> Result<Bits> {
        self.check_bitmap_entry(entry)?;
        let cluster_size = self.header.cluster_size();
        // Bounded by the checks above (at most MAX_BITMAP_BYTES of bits).
        let bits = Bits::new(self.virtual_size, entry.granularity_bits);
        let mut data = vec![0u8; cluster_size as usize];
        for (chunk, value) in self.read_bitmap_table(entry)?.into_iter().enumerate() {
            let Some(host) = self.bitmap_data_cluster(value) else {
                return Err(self.bitmap_corrupt(
                    entry,
                    format!("its table entry {chunk} ({value:#x}) is invalid"),
                ));
            };
            if host != 0 {
                self.file
                    .read_at(&mut data, host)
                    .map_err(|e| Error::io(&self.name, "reading bitmap data", host, e))?;
                bits.load_chunk(chunk as u64, cluster_size, &data);
            } else if value & TABLE_ENTRY_ALL_ONES != 0 {
                bits.fill_chunk(chunk as u64, cluster_size);
            }
        }
        Ok(bits)
    }

    /// The table of `entry` (its place checked by the caller: at most
    /// [`MAX_BITMAP_BYTES`] of bits, so a bounded number of entries).
    fn read_bitmap_table(&self, entry: &BitmapEntry) -> Result<Vec<u64>> {
        let mut table = vec![0u8; entry.table_size as usize * 8];
        self.file
            .read_at(&mut table, entry.table_offset)
            .map_err(|e| Error::io(&self.name, "reading a bitmap table", entry.table_offset, e))?;
        Ok(super::decode_be_words(&table))
    }

    /// The data cluster a bitmap table entry names (0: none, the chunk is
    /// all zeros or, with the all-ones flag, all ones); `None` for an
    /// entry that cannot be one of this image's.
    fn bitmap_data_cluster(&self, value: u64) -> Option<u64> {
        let cluster_size = self.header.cluster_size();
        let host = value & TABLE_ENTRY_OFFSET_MASK;
        let valid = value & TABLE_ENTRY_RESERVED_MASK == 0
            && (host == 0 || value & TABLE_ENTRY_ALL_ONES == 0)
            && host % cluster_size == 0
            && host.saturating_add(cluster_size) <= self.file_len().next_multiple_of(cluster_size);
        valid.then_some(host)
    }

    /// Refuses a directory entry QEMU would not load (its
    /// `check_dir_entry`), before anything is allocated for it: a
    /// granularity out of range, a name too long, more than
    /// [`MAX_BITMAP_BYTES`] of bits for the disk, a table whose size does
    /// not match the disk, or that is misaligned or outside the file.
    pub(super) fn check_bitmap_entry(&self, entry: &BitmapEntry) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        if !(qcow_format::bitmap::MIN_GRANULARITY_BITS..=qcow_format::bitmap::MAX_GRANULARITY_BITS)
            .contains(&entry.granularity_bits)
        {
            return Err(self.bitmap_corrupt(entry, "its granularity is out of range".into()));
        }
        if entry.name.is_empty() || entry.name.len() > qcow_format::bitmap::MAX_NAME_BYTES {
            return Err(self.bitmap_corrupt(entry, "its name is empty or too long".into()));
        }
        let bits = self.virtual_size.div_ceil(entry.granularity());
        if !bitmap_fits(bits) {
            return Err(self.bitmap_corrupt(
                entry,
                format!("its {bits} bits take more than {MAX_BITMAP_BYTES} bytes"),
            ));
        }
        let expected = table_entries(bits, cluster_size);
        if u64::from(entry.table_size) != expected {
            return Err(self.bitmap_corrupt(
                entry,
                format!(
                    "its table has {} entries where the disk needs {expected}",
                    entry.table_size
                ),
            ));
        }
        if expected > 0
            && (entry.table_offset == 0
                || entry.table_offset % cluster_size != 0
                || entry.table_offset.saturating_add(expected * 8) > self.file_len())
        {
            return Err(self.bitmap_corrupt(entry, "its table does not fit in the file".into()));
        }
        Ok(())
    }

    fn bitmap_corrupt(&self, entry: &BitmapEntry, reason: String) -> Error {
        Error::Corrupt {
            image: self.name.clone(),
            table: "bitmap table",
            offset: entry.table_offset,
            reason: format!("bitmap '{}': {reason}", entry.name),
        }
    }

    /// Before a resize: every bitmap marked in use on disk, and stores held
    /// until [`Qcow2Image::end_bitmap_resize`], so that a crash meanwhile
    /// leaves bitmaps in use, never ones of the wrong size.
    pub(super) fn begin_bitmap_resize(&self) -> Result<()> {
        let Some(tracker) = self.bitmap_tracker() else {
            return Ok(());
        };
        if tracker.read().bitmaps.is_empty() {
            return Ok(());
        }
        self.flush()?;
        self.mark_in_use(tracker, true)?;
        tracker.hold.store(true, Ordering::Release);
        Ok(())
    }

    /// After a resize (done or failed): stores may run again.
    pub(super) fn end_bitmap_resize(&self) {
        if let Some(tracker) = self.bitmap_tracker() {
            tracker.hold.store(false, Ordering::Release);
        }
    }

    /// The tracker of a writable image's bitmaps.
    pub(super) fn bitmap_tracker(&self) -> Option<&BitmapTracker> {
        self.writer.as_ref().and_then(|w| w.bitmaps.as_ref())
    }

    /// The bitmap directory's location as on disk now.
    pub(super) fn bitmap_directory(&self) -> Option<BitmapsExtension> {
        match self.bitmap_tracker() {
            Some(tracker) => tracker.directory(),
            None => self.header.bitmaps().copied(),
        }
    }

    /// Runs the guest write `op` of `offset..offset + len`, recording it
    /// in every enabled bitmap (marking them in use first when needed).
    pub(super) fn recorded<T>(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let Some(tracker) = self.bitmap_tracker() else {
            return op();
        };
        if len == 0
            || !tracker.recording.load(Ordering::Acquire)
            || RECORDING.with(|depth| depth.get() > 0)
        {
            return op();
        }
        loop {
            let set = tracker.read();
            if set.marked_in_use {
                RECORDING.with(|depth| depth.set(depth.get() + 1));
                let result = op();
                RECORDING.with(|depth| depth.set(depth.get() - 1));
                // Also after a failure: part of the range may have landed.
                for bitmap in set.bitmaps.iter().filter(|b| b.enabled) {
                    if let Some(bits) = &bitmap.bits {
                        bits.set_range(offset, len);
                        bitmap.changed.store(true, Ordering::Release);
                    }
                }
                return result;
            }
            drop(set);
            self.mark_bitmaps_in_use(tracker)?;
        }
    }

    /// Marks the enabled bitmaps in use in the directory, in place (only
    /// their flag words change, so a torn write leaves each entry whole),
    /// and flushes, before the first write they must record.
    fn mark_bitmaps_in_use(&self, tracker: &BitmapTracker) -> Result<()> {
        self.mark_in_use(tracker, false)
    }

    /// Marks the enabled bitmaps (with `all`, every bitmap) in use on disk,
    /// in place and flushed.
    fn mark_in_use(&self, tracker: &BitmapTracker, all: bool) -> Result<()> {
        let mut set = tracker.write();
        if set.marked_in_use && !all {
            return Ok(());
        }
        let Some(directory) = tracker.directory() else {
            // Nothing on disk yet: the first store writes the directory.
            set.marked_in_use = true;
            return Ok(());
        };
        let entries = set.entries(|b| all || b.enabled || b.entry.in_use());
        let bytes = encode_directory(&entries);
        if bytes.len() as u64 != directory.directory_size {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "bitmap directory",
                offset: directory.directory_offset,
                reason: "its size does not match its entries".into(),
            });
        }
        self.file
            .write_at(&bytes, directory.directory_offset)
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                Error::io(
                    &self.name,
                    "marking bitmaps in use",
                    directory.directory_offset,
                    e,
                )
            })?;
        for (bitmap, entry) in set.bitmaps.iter_mut().zip(entries) {
            bitmap.entry.flags = entry.flags;
        }
        set.marked_in_use = true;
        Ok(())
    }

    /// Stores the bitmaps that changed and clears the in-use marks (see
    /// the module documentation). Called by every flush.
    pub(super) fn store_bitmaps(&self) -> Result<()> {
        let Some(tracker) = self.bitmap_tracker() else {
            return Ok(());
        };
        // A flush inside a recorded write leaves the store to a flush of
        // its own (the write holds the bitmaps shared); a resize holds the
        // store until the bits have its size; an image marked corrupt gets
        // no new metadata (its bitmaps stay marked in use).
        if RECORDING.with(|depth| depth.get() > 0) || tracker.hold.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.write_state()?.incompatible.load(Ordering::Acquire)
            & qcow_format::header::INCOMPAT_CORRUPT
            != 0
        {
            return Ok(());
        }
        let mut set = tracker.write();
        let changed = set
            .bitmaps
            .iter()
            .any(|b| b.changed.load(Ordering::Acquire));
        if !changed && !set.marked_in_use {
            return Ok(());
        }
        self.write_bitmaps(tracker, &mut set, Vec::new())
    }

    /// Writes the tables of changed bitmaps and a new directory of `set`,
    /// then frees what the old directory alone used, with the tables in
    /// `dropped` (bitmaps removed from the set).
    pub(super) fn write_bitmaps(
        &self,
        tracker: &BitmapTracker,
        set: &mut BitmapSet,
        dropped: Vec<BitmapEntry>,
    ) -> Result<()> {
        let mut old_tables = dropped;
        let mut entries = set.entries(|b| b.bits.is_none() && b.entry.in_use());
        for (bitmap, entry) in set.bitmaps.iter().zip(entries.iter_mut()) {
            let Some(bits) = &bitmap.bits else {
                continue;
            };
            if bitmap.changed.load(Ordering::Acquire) {
                let (offset, size) = self.write_bitmap_table(bits)?;
                if bitmap.entry.table_size > 0 {
                    old_tables.push(bitmap.entry.clone());
                }
                entry.table_offset = offset;
                entry.table_size = size;
            }
        }
        // Everything the new directory names is on disk before it.
        self.flush_metadata()?;
        self.switch_bitmap_directory(tracker, &entries)?;
        // The new directory is the one on disk: memory follows at once.
        for (bitmap, entry) in set.bitmaps.iter_mut().zip(entries) {
            bitmap.entry = entry;
            bitmap.changed.store(false, Ordering::Release);
        }
        set.marked_in_use = false;
        tracker.update_recording(set);
        // From here on a failure only leaks clusters: the old tables are
        // referenced by nothing any more.
        let _ = self.free_bitmap_tables(&old_tables);
        self.flush_metadata()
    }

    /// Writes `bits` to new data clusters (all-zero clusters get none) and
    /// a new table; returns the table's offset and entries.
    fn write_bitmap_table(&self, bits: &Bits) -> Result<(u64, u32)> {
        let cluster_size = self.header.cluster_size();
        let entries = table_entries(bits.len, cluster_size);
        let mut table = Vec::with_capacity(entries as usize * 8);
        for chunk in 0..entries {
            let bytes = bits.chunk_bytes(chunk, cluster_size);
            let host = if bytes.iter().all(|&b| b == 0) {
                0
            } else {
                let host = self.lock_meta()?.clusters(1)?;
                self.file
                    .write_at(&bytes, host)
                    .map_err(|e| Error::io(&self.name, "writing bitmap data", host, e))?;
                host
            };
            table.extend_from_slice(&host.to_be_bytes());
        }
        if table.is_empty() {
            return Ok((0, 0));
        }
        let clusters = (table.len() as u64).div_ceil(cluster_size);
        let offset = self.lock_meta()?.clusters(clusters)?;
        self.file
            .write_at(&table, offset)
            .map_err(|e| Error::io(&self.name, "writing a bitmap table", offset, e))?;
        // At most MAX_TABLE_ENTRIES (checked when the bitmap was made).
        Ok((offset, u32::try_from(entries).unwrap_or(u32::MAX)))
    }

    /// Frees the tables and data clusters of `entries` (stored, then
    /// replaced or removed).
    fn free_bitmap_tables(&self, entries: &[BitmapEntry]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let bits = self.header.cluster_bits;
        for entry in entries {
            let len = u64::from(entry.table_size) * 8;
            if len == 0 || entry.table_offset == 0 {
                continue;
            }
            if entry.table_offset % cluster_size != 0
                || entry.table_offset.saturating_add(len) > self.file_len()
            {
                continue;
            }
            // Bounded: tables were validated when loaded or written here.
            let table = self.read_bitmap_table(entry)?;
            let mut meta = self.lock_meta()?;
            // An entry that cannot be a data cluster of this image is left
            // alone: leaking is the safe side.
            for host in table
                .into_iter()
                .filter_map(|v| self.bitmap_data_cluster(v))
            {
                if host != 0 {
                    meta.change_refcount(host >> bits, -1)?;
                }
            }
            for i in 0..len.div_ceil(cluster_size) {
                meta.change_refcount((entry.table_offset >> bits) + i, -1)?;
            }
        }
        Ok(())
    }

    /// Writes `entries` as the new directory to new clusters, switches the
    /// header to it and frees the old directory. No entries: the bitmaps
    /// extension goes (and its autoclear bit).
    fn switch_bitmap_directory(
        &self,
        tracker: &BitmapTracker,
        entries: &[BitmapEntry],
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let bytes = encode_directory(entries);
        if bytes.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::NoSpace {
                image: self.name.clone(),
                what: "the bitmap directory",
                limit: MAX_BITMAP_DIRECTORY_BYTES,
            });
        }
        let new = if entries.is_empty() {
            None
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cluster_size);
            let offset = {
                let mut meta = self.lock_meta()?;
                let offset = meta.clusters(clusters)?;
                Owner::metadata_placed(self, offset, clusters * cluster_size);
                offset
            };
            self.file
                .write_at(&bytes, offset)
                .map_err(|e| Error::io(&self.name, "writing the bitmap directory", offset, e))?;
            self.flush_refcounts()?;
            self.sync()?;
            Some(BitmapsExtension {
                // At most MAX_BITMAPS entries (checked when added).
                nb_bitmaps: u32::try_from(entries.len()).unwrap_or(u32::MAX),
                directory_size: bytes.len() as u64,
                directory_offset: offset,
                reserved: 0,
            })
        };
        let old = tracker.directory();
        self.write_bitmaps_extension(old, new)?;
        {
            let mut meta = self.lock_meta()?;
            *tracker
                .directory
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = new;
            if let Some(old) = old {
                let start = old.directory_offset - old.directory_offset % cluster_size;
                let end = old.directory_offset + old.directory_size;
                let mut at = start;
                while at < end {
                    meta.pending_frees.push(at);
                    at += cluster_size;
                }
            }
        }
        Ok(())
    }

    /// Writes the header with bitmaps extension `new` where it had `old`:
    /// only the extension's changed bytes when both exist (one small
    /// write), else the whole header (the extension and its autoclear bit
    /// come or go).
    fn write_bitmaps_extension(
        &self,
        old: Option<BitmapsExtension>,
        new: Option<BitmapsExtension>,
    ) -> Result<()> {
        let with = |ext: Option<BitmapsExtension>| -> Result<Vec<u8>> {
            let header = self.header_with_bitmaps(ext);
            header.encode().map_err(|e| Error::format(&self.name, e))
        };
        let (before, after) = (with(old)?, with(new)?);
        let at;
        let bytes: Vec<u8>;
        if old.is_some() && new.is_some() && before.len() == after.len() {
            let first = before.iter().zip(&after).position(|(a, b)| a != b);
            let Some(first) = first else {
                return Ok(());
            };
            let last = before
                .iter()
                .zip(&after)
                .rposition(|(a, b)| a != b)
                .unwrap_or(first);
            at = first as u64;
            bytes = after[first..=last].to_vec();
        } else {
            if after.len() as u64 > self.header.cluster_size() {
                return Err(Error::NoSpace {
                    image: self.name.clone(),
                    what: "the header cluster",
                    limit: self.header.cluster_size(),
                });
            }
            let mut cluster = after;
            cluster.resize(self.header.cluster_size() as usize, 0);
            at = 0;
            bytes = cluster;
        }
        self.file
            .write_at(&bytes, at)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.name, "writing the header", at, e))
    }

    /// The header as it must be written now: the feature bits as on disk
    /// and the bitmaps extension `ext` (with its autoclear bit).
    pub(super) fn header_with_bitmaps(&self, ext: Option<BitmapsExtension>) -> Header {
        let mut header = self.header.clone();
        if let Some(ws) = &self.writer {
            header.incompatible_features = ws.incompatible.load(Ordering::Acquire);
        }
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::Bitmaps(_)));
        match ext {
            Some(ext) => {
                header.extensions.push(HeaderExtension::Bitmaps(ext));
                header.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
            None => header.autoclear_features &= !AUTOCLEAR_BITMAPS,
        }
        header
    }

    /// The header as it must be written now (see
    /// [`Qcow2Image::header_with_bitmaps`]), with the directory as on disk.
    pub(super) fn current_header(&self) -> Header {
        match self.bitmap_tracker() {
            Some(tracker) => self.header_with_bitmaps(tracker.directory()),
            None => self.header.clone(),
        }
    }

    /// Brings the header's copy of the bitmaps extension and the bitmap
    /// list up to date (after an operation that changed them).
    pub(super) fn sync_bitmaps(&mut self) {
        let Some(tracker) = self.bitmap_tracker() else {
            return;
        };
        let directory = tracker.directory();
        let entries: Vec<BitmapEntry> = {
            let set = tracker.read();
            set.bitmaps.iter().map(|b| b.entry.clone()).collect()
        };
        let header = self.header_with_bitmaps(directory);
        self.header.extensions = header.extensions;
        self.header.autoclear_features = header.autoclear_features;
        self.bitmaps = entries;
    }

    fn sync(&self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }
}

/// Most bytes of bits a bitmap may have (QEMU's `BME_MAX_PHYS_SIZE`).
pub(super) const MAX_BITMAP_BYTES: u64 = 0x2000_0000;

/// Most dirty ranges a bitmap's ranges are listed as (16 bytes each).
pub(super) const MAX_RANGES: usize = 1 << 24;

/// Whether a bitmap of `bits` bits stays within [`MAX_BITMAP_BYTES`].
pub(super) fn bitmap_fits(bits: u64) -> bool {
    bits.div_ceil(8) <= MAX_BITMAP_BYTES
}

#[cfg(test)]
mod tests {
    use super::Bits;

    #[test]
    fn ranges_set_and_read_back() {
        let bits = Bits::new(1 << 20, 16);
        assert_eq!(bits.len, 16);
        bits.set_range(70_000, 1);
        bits.set_range(0, 65_536);
        bits.set_range(1_000_000, 100_000);
        assert!(bits.get(0) && bits.get(1) && !bits.get(2) && bits.get(15));
        assert_eq!(
            bits.ranges(1 << 20),
            Some(vec![(0, 131_072), (983_040, 65_536)])
        );
        let big = Bits::new(1 << 30, 9);
        big.set_range(512 * 60, 512 * 10);
        assert_eq!(big.ranges(1 << 30), Some(vec![(512 * 60, 512 * 10)]));
        let small = big.resized(512 * 65);
        assert_eq!(small.ranges(512 * 65), Some(vec![(512 * 60, 512 * 5)]));
    }

    #[test]
    fn chunks_round_trip_least_significant_bit_first() {
        let bits = Bits::new(1 << 24, 9);
        bits.set_range(0, 512);
        bits.set_range(512 * 9, 512);
        let bytes = bits.chunk_bytes(0, 4096);
        assert_eq!(&bytes[..2], &[0b0000_0001, 0b0000_0010]);
        let copy = Bits::new(1 << 24, 9);
        copy.load_chunk(0, 4096, &bytes);
        assert_eq!(copy.ranges(1 << 24), bits.ranges(1 << 24));
    }
}
