//! Writing a QCOW2 image: in-place overwrites of clusters the image owns
//! alone, and copy-on-write allocation for everything else (preallocation
//! is in [`preallocate`](super::preallocate), flushing and closing in
//! [`flush`](super::flush)).
//!
//! Overwrites of a cluster whose L2 entry carries `OFLAG_COPIED` (refcount
//! one) go straight to the data file with no lock. Everything that
//! allocates takes the allocation lock ([`Meta`]): it allocates, writes the
//! data, then points the L2 entry at it. Metadata follows the crash rule:
//! refcounts reach the disk before the L2 tables that use the clusters they
//! count (the L2 cache depends on the refcount cache), new L2 tables before
//! the L1 entries that point at them, and references are dropped from L2
//! tables on disk before the clusters they named are released.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use qcow_format::header::{AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use qcow_cache::TableCache;
use qcow_format::table::{L2Mapping, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use qcow_io::Storage;

use super::allocator::{Allocation, Allocator, Meta, Owner, RefBlockWriter};
use super::check::Repair;
use super::l2_tables::empty_table;
use super::metadata_map::MetadataMap;
use super::{L2Table, Qcow2Image};
use crate::device::BlockDevice;
use crate::{Error, Result};

/// Extended L2 bitmap: every subcluster allocated.
pub(super) const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zeros.
pub(super) const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// The state a writable image adds.
#[derive(Debug)]
pub(crate) struct WriteState {
    /// Refcounts and allocation, behind the allocation lock.
    pub(super) allocator: Allocator,
    /// Which clusters hold metadata (the overlap guard's fast answer).
    pub(super) metadata: MetadataMap,
    /// The incompatible feature bits as on disk (dirty and corrupt change).
    pub(super) incompatible: AtomicU64,
    /// Serialises changes of the feature bits (readers use the atomic).
    header_lock: Mutex<()>,
    /// Held shared by lock-free data I/O (in-place writes, and reads of a
    /// writable image) from looking up a cluster to the end of the I/O;
    /// held exclusively while freed clusters are released, so that a
    /// cluster is never handed out again while I/O that found it mapped is
    /// still under way in it.
    data_io: RwLock<()>,
    /// An operation failed with the image marked dirty on purpose (its
    /// refcounts may be off): the mark stays when the image is closed.
    dirty_kept: AtomicBool,
    /// The persistent bitmaps (`None` until loaded, and for check's
    /// repairs).
    pub(super) bitmaps: Option<super::dirty_bitmaps::BitmapTracker>,
}

impl WriteState {
    /// Keeps the dirty mark on close (see [`WriteState::dirty_kept`]).
    pub(super) fn keep_dirty(&self) {
        self.dirty_kept.store(true, Ordering::Release);
    }

    /// Whether the dirty mark must stay on close.
    pub(super) fn dirty_kept(&self) -> bool {
        self.dirty_kept.load(Ordering::Acquire)
    }
}

impl Owner for Qcow2Image {
    fn file_len(&self) -> u64 {
        Qcow2Image::file_len(self)
    }

    fn grow_file_len(&self, end: u64) {
        self.file_len.fetch_max(end, Ordering::AcqRel);
    }

    fn file_truncated(&self, len: u64) {
        self.file_len.store(len, Ordering::Release);
    }

    fn metadata_overlap(
        &self,
        reftable_offset: u64,
        reftable: &[u64],
        start: u64,
        len: u64,
    ) -> Option<(&'static str, u64)> {
        if let Some(ws) = &self.writer {
            if ws.metadata.complete() && !ws.metadata.hits(start, len) {
                return None;
            }
        }
        Qcow2Image::metadata_overlap(self, reftable_offset, reftable, start, len)
    }

    fn cluster_freed(&self, host: u64, reftable_offset: u64, reftable: &[u64]) {
        self.l2.forget(host);
        if let Some(ws) = &self.writer {
            let cluster_size = self.header.cluster_size();
            // A structure may still live there (damaged refcounts let its
            // count drop): it stays marked while the walk still finds it.
            let still_used = ws.metadata.hits(host, cluster_size)
                && Qcow2Image::metadata_overlap(
                    self,
                    reftable_offset,
                    reftable,
                    host,
                    cluster_size,
                )
                .is_some();
            if !still_used {
                ws.metadata.unmark_cluster(host);
            }
        }
    }

    fn metadata_placed(&self, start: u64, len: u64) {
        if let Some(ws) = &self.writer {
            ws.metadata.mark(start, len);
        }
    }

    fn wait_for_data_io(&self) {
        if let Some(ws) = &self.writer {
            drop(ws.data_io.write().unwrap_or_else(PoisonError::into_inner));
        }
    }
}

impl Qcow2Image {
    /// Opens the QCOW2 image in `file` for reading and writing.
    ///
    /// A dirty image (lazy refcounts after a crash) gets its refcounts
    /// rebuilt first. Refused: images marked corrupt (repair them with
    /// [`Qcow2Image::check`]), encrypted images, images with persistent
    /// bitmaps (not written yet), and images whose metadata structures
    /// overlap (the corrupt bit is then set, as QEMU sets it). Internal
    /// snapshots are kept; a snapshot cannot be the target.
    pub fn open_writable(
        name: &str,
        file: Arc<dyn Storage>,
        cache_bytes: Option<u64>,
    ) -> Result<Self> {
        let mut image = Self::open(name, file, cache_bytes)?;
        image.enable_writes(cache_bytes)?;
        Ok(image)
    }

    fn enable_writes(&mut self, cache_bytes: Option<u64>) -> Result<()> {
        if self.header.corrupt() {
            return Err(Error::MarkedCorrupt {
                image: self.name.clone(),
            });
        }
        if self.header.dirty() {
            // Refcounts may be stale after a crash with lazy refcounts:
            // repaired by the check, as QEMU repairs them on open. The
            // repair rewrites refcounts and L1 and L2 entries: first make
            // sure no table is another structure in disguise.
            self.check_structures_apart_on_disk()?;
            let mut lines = Vec::new();
            let report = self.check(Repair::All, &mut |line| lines.push(line.to_owned()))?;
            self.open_repairs = lines;
            if report.corruptions > 0 || report.check_errors > 0 || self.header.dirty() {
                return Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "refcount structure",
                    offset: self.header.refcount_table_offset,
                    reason: format!(
                        "could not repair the dirty image ({} corruptions, {} check errors left)",
                        report.corruptions, report.check_errors
                    ),
                });
            }
        }
        self.install_write_state(cache_bytes)?;
        self.clear_unknown_autoclear()?;
        if !self.bitmaps.is_empty() {
            let tracker = self.load_bitmap_tracker()?;
            if let Some(ws) = self.writer.as_mut() {
                ws.bitmaps = Some(tracker);
            }
        }
        // Metadata sharing bytes with other metadata would be overwritten by
        // the first update: refuse to write, and mark the image corrupt as
        // QEMU does when it meets such a write.
        let apart = {
            let meta = self.lock_meta()?;
            self.check_structures_apart(&meta)
        };
        self.guard(apart)
    }

    /// Clears the autoclear feature bits this implementation does not know,
    /// as the specification asks of a writer (and QEMU does when it opens
    /// an image for writing): their extensions may no longer be consistent.
    pub(super) fn clear_unknown_autoclear(&mut self) -> Result<()> {
        let bits = self.header.autoclear_features;
        if self.header.version < 3 || bits & !AUTOCLEAR_KNOWN == 0 {
            return Ok(());
        }
        let known = bits & AUTOCLEAR_KNOWN;
        let at = qcow_format::header::field::AUTOCLEAR_FEATURES;
        self.file
            .write_at(&known.to_be_bytes(), at)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.name, "writing the header", at, e))?;
        self.header.autoclear_features = known;
        Ok(())
    }

    /// Starts the allocation state anew from what is on disk now (after
    /// the refcount structures were replaced), keeping the bitmaps and the
    /// feature bits as they stand.
    pub(super) fn restart_write_state(&mut self) -> Result<()> {
        let ws = self.writer.as_mut().ok_or_else(|| Error::ReadOnly {
            image: self.name.clone(),
        })?;
        let bitmaps = ws.bitmaps.take();
        self.header.incompatible_features = ws.incompatible.load(Ordering::Acquire);
        self.writer = None;
        self.install_write_state(None)?;
        if let Some(ws) = self.writer.as_mut() {
            ws.bitmaps = bitmaps;
        }
        Ok(())
    }

    /// Gives the image its allocation state (refcount cache, allocator,
    /// metadata map), without the refusals of [`Qcow2Image::open_writable`]:
    /// `check` uses it to rewrite the snapshot table of an image it has
    /// just made consistent, where structures that share clusters are
    /// reported, not refused (the table moves out of what it shares).
    pub(super) fn install_write_state(&mut self, cache_bytes: Option<u64>) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let budget = cache_bytes.unwrap_or(crate::DEFAULT_MAX_CACHE_BYTES);
        let refcounts = Arc::new(TableCache::with_write_back(
            (budget / 4).max(4 * cluster_size),
            cluster_size,
            Arc::new(RefBlockWriter(self.file.clone())),
        ));
        self.l2.make_writable(
            budget.max(4 * cluster_size),
            cluster_size,
            refcounts.clone(),
        );
        // Tables remembered by threads came from the old cache.
        self.id = super::fresh_image_id();
        let reftable: Vec<u64> = self
            .stored_reftable()?
            .into_iter()
            .map(|e| e & !0x1ff)
            .collect();
        let end = self.file_len().div_ceil(cluster_size);
        self.writer = Some(WriteState {
            allocator: Allocator::new(
                &self.name,
                self.file.clone(),
                self.header.cluster_bits,
                self.header.refcount_order,
                refcounts,
                Meta {
                    reftable,
                    reftable_offset: self.header.refcount_table_offset,
                    free_hint: 0,
                    end,
                    pending_frees: Vec::new(),
                    compressed_cursor: 0,
                    freed: None,
                    pending_discards: Vec::new(),
                },
            ),
            metadata: MetadataMap::new(self.header.cluster_bits),
            incompatible: AtomicU64::new(self.header.incompatible_features),
            header_lock: Mutex::new(()),
            data_io: RwLock::new(()),
            dirty_kept: AtomicBool::new(false),
            bitmaps: None,
        });
        let meta = self.lock_meta()?;
        self.map_metadata(&meta, &self.write_state()?.metadata);
        Ok(())
    }

    /// Rewrites the incompatible feature bits in the header (version 3) as
    /// `change` makes them from the current ones. Changes are serialised,
    /// and the new bits are visible to other threads only once on disk.
    pub(super) fn update_incompatible(&self, change: impl FnOnce(u64) -> u64) -> Result<()> {
        let ws = self.write_state()?;
        if self.header.version < 3 {
            return Ok(());
        }
        let _header = ws
            .header_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = ws.incompatible.load(Ordering::Acquire);
        let bits = change(old);
        if bits == old {
            return Ok(());
        }
        let at = qcow_format::header::field::INCOMPATIBLE_FEATURES;
        self.file
            .write_at(&bits.to_be_bytes(), at)
            .map_err(|e| Error::io(&self.name, "writing the header", at, e))?;
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        ws.incompatible.store(bits, Ordering::Release);
        Ok(())
    }

    /// With lazy refcounts, sets the dirty bit before the first metadata
    /// change (so a crash makes the next writer rebuild refcounts).
    pub(super) fn mark_dirty(&self) -> Result<()> {
        if !self.header.lazy_refcounts() {
            return Ok(());
        }
        let ws = self.write_state()?;
        if ws.incompatible.load(Ordering::Acquire) & INCOMPAT_DIRTY == 0 {
            self.update_incompatible(|bits| bits | INCOMPAT_DIRTY)?;
        }
        Ok(())
    }

    /// Stops writing after an inconsistency: sets the corrupt bit (as QEMU
    /// does) so that nothing writes the image again before it is repaired.
    pub(super) fn guard<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(Error::Corrupt { .. } | Error::Format { .. } | Error::MetadataOverlap { .. }) =
            &result
        {
            if self.writer.is_some() {
                // Best effort: the original error is what the caller needs.
                let _ = self.update_incompatible(|bits| bits | INCOMPAT_CORRUPT);
            }
        }
        result
    }

    /// For a writable image, a guard to hold over lock-free data I/O (see
    /// `WriteState::data_io`); `None` for a read-only image, where nothing
    /// is ever freed. Must not be taken twice by one thread.
    pub(super) fn data_io_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.writer
            .as_ref()
            .map(|ws| ws.data_io.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Refuses writes once the image was found corrupt.
    pub(super) fn check_writable(&self) -> Result<&WriteState> {
        let ws = self.write_state()?;
        if ws.incompatible.load(Ordering::Acquire) & INCOMPAT_CORRUPT != 0 {
            return Err(Error::MarkedCorrupt {
                image: self.name.clone(),
            });
        }
        Ok(ws)
    }

    pub(super) fn write_state(&self) -> Result<&WriteState> {
        self.writer.as_ref().ok_or_else(|| Error::ReadOnly {
            image: self.name.clone(),
        })
    }

    /// Takes the allocation lock.
    pub(super) fn lock_meta(&self) -> Result<Allocation<'_>> {
        Ok(self.write_state()?.allocator.lock(self))
    }

    /// Runs `op`, then gives the clusters it freed back to the file system
    /// (as QEMU passes on the discards of a snapshot deletion, a shrink or
    /// an emptied image), once they are free on disk. After a failure
    /// nothing is given back.
    pub(super) fn punching_freed<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.lock_meta()?.freed = Some(Vec::new());
        let result = op(self).and_then(|value| {
            self.flush()?;
            Ok(value)
        });
        let freed = self.lock_meta()?.freed.take().unwrap_or_default();
        let value = result?;
        self.lock_meta()?.punch_clusters(freed)?;
        Ok(value)
    }

    /// Writes every dirty refcount block.
    pub(super) fn flush_refcounts(&self) -> Result<()> {
        self.write_state()?.allocator.flush_refcounts()
    }

    /// Where the guest cluster at `guest` can be overwritten in place: its
    /// host offset when the image owns it alone (`OFLAG_COPIED`).
    pub(super) fn in_place_host(&self, guest: u64, meta: Option<&Meta>) -> Result<Option<u64>> {
        let geo = &self.geometry;
        let l1_index = geo.l1_index(guest);
        let l1_entry = self.l1_entry(l1_index);
        if l1_entry & OFLAG_COPIED == 0 {
            return Ok(None);
        }
        let Some(l2_offset) = geo
            .l1_entry(l1_index, l1_entry)
            .map_err(|e| Error::format(&self.name, e))?
        else {
            return Ok(None);
        };
        let index = geo.l2_index(guest);
        let words = geo.l2_entry_words();
        let (entry, bitmap) = self.consistent(|| {
            self.with_l2(l1_index, l2_offset, |table| {
                let word = |i: usize| table.get(i).map_or(0, |e| e.load(Ordering::Acquire));
                let bitmap = if words == 2 { word(index * 2 + 1) } else { 0 };
                (word(index * words), bitmap)
            })
        })?;
        // Decoding validates the entry (alignment, reserved combinations).
        let mapping = geo
            .l2_mapping(index as u64, entry, bitmap, 0)
            .map_err(|e| Error::format(&self.name, e))?;
        // With extended L2, only a cluster whose every subcluster is
        // allocated can take any write in place.
        let whole = words == 1 || bitmap & ALL_ALLOCATED == ALL_ALLOCATED;
        Ok(match mapping {
            L2Mapping::Data { host } if entry & OFLAG_COPIED != 0 && whole => {
                // Not decided without the lock: not written in place here.
                self.check_data_host(index as u64, host, meta)?
                    .then_some(host)
            }
            _ => None,
        })
    }

    /// Refuses to write in place where no data cluster can be: past the end
    /// of the image file (or, for an external data file, which QEMU maps
    /// one to one, past the disk). Reads there just see zeros, but a write
    /// would grow the file to wherever a damaged entry points.
    ///
    /// Returns `false` when only the allocation lock's holder can tell
    /// whether the cluster is metadata (`meta` is `None` and the metadata
    /// map cannot answer): the caller then writes under the lock instead.
    fn check_data_host(&self, index: u64, host: u64, meta: Option<&Meta>) -> Result<bool> {
        let cluster_size = self.header.cluster_size();
        // Guest data written in place must not land on metadata (a damaged
        // entry naming a table): QEMU checks every data write too.
        if !self.header.has_data_file() && !self.check_data_overlap(host, cluster_size, meta)? {
            return Ok(false);
        }
        let limit = if self.header.has_data_file() {
            self.virtual_size.next_multiple_of(cluster_size)
        } else {
            self.file_len().next_multiple_of(cluster_size)
        };
        if host.saturating_add(cluster_size) > limit {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "L2 table",
                offset: host,
                reason: format!("entry {index} points past the end of the data ({limit} bytes)"),
            });
        }
        Ok(true)
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let result = self.recorded(offset, buf.len() as u64, || self.write_range(buf, offset));
        self.guard(result)
    }

    fn write_range(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::check_range(&self.name, offset, buf.len() as u64, self.virtual_size)?;
        let cluster_size = self.header.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = self.geometry.in_cluster(guest);
            let n = (cluster_size - in_cluster).min((buf.len() - done) as u64) as usize;
            let piece = &buf[done..done + n];
            if self.geometry.extended_l2 && n as u64 != cluster_size {
                self.write_subclusters(piece, guest)?;
                done += n;
                continue;
            }
            if in_cluster == 0 && n as u64 == cluster_size {
                // Whole clusters the image owns at consecutive host offsets
                // (as reserved or preallocated) go down in one write.
                let written = self.write_in_place_run(&buf[done..], guest)?;
                if written > 0 {
                    done += written;
                    continue;
                }
            }
            match self.write_in_place(piece, guest)? {
                true => {}
                false if in_cluster == 0 && n as u64 == cluster_size => {
                    // Whole clusters need no copy-on-write: allocate the run
                    // of them together and write it with one call.
                    let written = self.write_new_clusters(&buf[done..], guest)?;
                    done += written;
                    continue;
                }
                false => self.write_allocating(piece, guest)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes the whole clusters at the start of `data` that the image owns
    /// at consecutive host offsets, in place, with one write. Returns the
    /// bytes written (0 when the first cluster is not owned).
    fn write_in_place_run(&self, data: &[u8], guest: u64) -> Result<usize> {
        let cluster_size = self.header.cluster_size();
        let whole = data.len() as u64 / cluster_size;
        let _gate = self.data_io_guard();
        let Some(host) = self.in_place_host(guest, None)? else {
            return Ok(0);
        };
        let mut n = 1;
        while n < whole
            && self.in_place_host(guest + n * cluster_size, None)? == Some(host + n * cluster_size)
        {
            n += 1;
        }
        let len = (n * cluster_size) as usize;
        self.write_data(&data[..len], host, guest)?;
        Ok(len)
    }

    /// Writes `piece` (within one cluster) in place if the image owns the
    /// cluster alone, with no lock but the shared in-place gate, which keeps
    /// the cluster from being released and handed out again until the
    /// write is done. Returns whether it did.
    fn write_in_place(&self, piece: &[u8], guest: u64) -> Result<bool> {
        let _gate = self.data_io_guard();
        match self.in_place_host(guest, None)? {
            Some(host) => {
                self.write_data(piece, host + self.geometry.in_cluster(guest), guest)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Writes the whole clusters at the start of `data` (at least one, all
    /// within one L2 table, none owned by the image) into newly allocated
    /// contiguous clusters. Returns the bytes written.
    fn write_new_clusters(&self, data: &[u8], guest: u64) -> Result<usize> {
        let cluster_size = self.header.cluster_size();
        let mut meta = self.lock_meta()?;
        self.mark_dirty()?;
        let entries = self.header.l2_entries();
        let left_in_table = entries - (guest >> self.header.cluster_bits) % entries;
        let mut count = 0u64;
        let whole = data.len() as u64 / cluster_size;
        while count < whole.min(left_in_table) {
            if self
                .in_place_host(guest + count * cluster_size, Some(&meta))?
                .is_some()
            {
                break;
            }
            count += 1;
        }
        if count == 0 {
            // Allocated by another writer meanwhile: an in-place write, done
            // under the lock (the lock-free path may have declined it).
            let n = cluster_size as usize;
            if let Some(host) = self.in_place_host(guest, Some(&meta))? {
                self.write_data(&data[..n], host, guest)?;
                return Ok(n);
            }
            drop(meta);
            self.write_range(&data[..n], guest)?;
            return Ok(n);
        }
        let (_, table) = self.writable_l2(&mut meta, guest)?;
        // The first free run may be shorter: the rest goes in the next call.
        let (host, count) = if self.header.has_data_file() {
            (self.alloc_data(&mut meta, guest, count)?, count)
        } else {
            meta.run(count)?
        };
        let len = (count * cluster_size) as usize;
        // Whole clusters need no copy-on-write, so the data is written
        // outside the lock (other writers allocate meanwhile); the L2
        // table is looked up again afterwards, as it may have been evicted
        // and reloaded by then.
        drop(meta);
        drop(table);
        let written = self.write_data(&data[..len], host, guest);
        let mut meta = self.lock_meta()?;
        if let Err(e) = written {
            self.give_back_data(&mut meta, host, count);
            return Err(e);
        }
        let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
        // With extended L2 every subcluster of a whole cluster is written.
        let bitmap = if self.geometry.extended_l2 {
            ALL_ALLOCATED
        } else {
            0
        };
        for i in 0..count {
            let entry = (host + i * cluster_size) | OFLAG_COPIED;
            let at = guest + i * cluster_size;
            self.set_l2_words(&mut meta, l2_offset, &table, at, entry, bitmap)?;
        }
        Ok(len)
    }

    /// Writes a piece of one cluster of an image with extended L2 entries:
    /// the subclusters it touches are written (filled from what they read
    /// now where the piece covers them partly) and marked allocated; the
    /// others keep their state. A compressed or shared cluster is copied
    /// whole into a new one.
    fn write_subclusters(&self, piece: &[u8], guest: u64) -> Result<()> {
        let mut meta = self.lock_meta()?;
        self.mark_dirty()?;
        let geo = self.geometry;
        let cluster_size = self.header.cluster_size();
        let sc_bits = geo.subcluster_bits();
        let in_cluster = geo.in_cluster(guest);
        let cluster_start = guest - in_cluster;
        let visible = (self.virtual_size - cluster_start).min(cluster_size);
        let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
        let index = geo.l2_index(guest) * 2;
        let word = |i: usize| table.get(i).map_or(0, |w| w.load(Ordering::Acquire));
        let (entry, bitmap) = (word(index), word(index + 1));
        // Validates the entry (alignment, contradictory bitmaps).
        geo.l2_mapping(index as u64 / 2, entry, bitmap, 0)
            .map_err(|e| Error::format(&self.name, e))?;
        let first = in_cluster >> sc_bits;
        let last = (in_cluster + piece.len() as u64 - 1) >> sc_bits;
        let touched = ((1u64 << (last - first + 1)) - 1) << first;
        let host = entry & OFFSET_MASK;
        let owned = entry & OFLAG_COPIED != 0 && entry & OFLAG_COMPRESSED == 0 && host != 0;
        let fresh = entry & OFLAG_COMPRESSED == 0 && host == 0;
        if owned || fresh {
            // Only the touched subclusters are written, whole: past the end
            // of the disk with zeros, which a later grow shows.
            let span_start = first << sc_bits;
            let span_end = (last + 1) << sc_bits;
            // At most one cluster: 2 MiB.
            let mut span = vec![0u8; (span_end - span_start) as usize];
            let readable = (span_end.min(visible) - span_start) as usize;
            self.read_at(&mut span[..readable], cluster_start + span_start)?;
            let at = (in_cluster - span_start) as usize;
            span[at..at + piece.len()].copy_from_slice(piece);
            let target = if owned {
                self.check_data_host(index as u64 / 2, host, Some(&meta))?;
                host
            } else {
                self.alloc_data(&mut meta, guest, 1)?
            };
            if let Err(e) = self.write_data(&span, target + span_start, cluster_start + span_start)
            {
                if !owned {
                    self.give_back_data(&mut meta, target, 1);
                }
                return Err(e);
            }
            let new_bitmap = (bitmap | touched) & !(touched << 32);
            return self.set_l2_words(
                &mut meta,
                l2_offset,
                &table,
                guest,
                target | OFLAG_COPIED,
                new_bitmap,
            );
        }
        // Compressed, or shared with a snapshot: copy the whole cluster.
        let cluster = self.merged_cluster(piece, guest)?;
        let target = self.alloc_data(&mut meta, guest, 1)?;
        if let Err(e) = self.write_data(&cluster, target, cluster_start) {
            self.give_back_data(&mut meta, target, 1);
            return Err(e);
        }
        self.set_l2_words(
            &mut meta,
            l2_offset,
            &table,
            guest,
            target | OFLAG_COPIED,
            ALL_ALLOCATED,
        )
    }

    /// Writes bytes as they are (compressed clusters) at host offset
    /// `host` of the data file.
    pub(super) fn write_raw_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.data_storage()?
            .write_at(data, host)
            .map_err(|e| Error::io(&self.name, "writing data", host, e))
    }

    /// Gives back data clusters [`Qcow2Image::alloc_data`] handed out for a
    /// write that failed (nothing to give back in an external data file).
    fn give_back_data(&self, meta: &mut Allocation<'_>, host: u64, count: u64) {
        if !self.header.has_data_file() {
            meta.give_back(host, count);
        }
    }

    /// Host space for `count` data clusters starting at guest offset
    /// `guest`: new clusters of the image file, or, with an external data
    /// file, the same offsets there (QEMU maps data files one to one, which
    /// keeps a raw data file valid; they are not refcounted).
    pub(super) fn alloc_data(
        &self,
        meta: &mut Allocation<'_>,
        guest: u64,
        count: u64,
    ) -> Result<u64> {
        if self.header.has_data_file() {
            self.data_storage()?;
            return Ok(guest - self.geometry.in_cluster(guest));
        }
        meta.clusters(count)
    }

    /// Writes one piece of a cluster the image does not own alone: a new
    /// cluster gets the old contents (backing file, zeros, a compressed or
    /// shared cluster) merged with the piece.
    fn write_allocating(&self, piece: &[u8], guest: u64) -> Result<()> {
        let mut meta = self.lock_meta()?;
        self.mark_dirty()?;
        // Another writer may have allocated it meanwhile.
        let in_cluster = self.geometry.in_cluster(guest);
        if let Some(host) = self.in_place_host(guest, Some(&meta))? {
            return self.write_data(piece, host + in_cluster, guest);
        }
        let cluster_size = self.header.cluster_size();
        let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
        let partial = (piece.len() as u64) < cluster_size;
        // A cluster that read as zeros and lands past the end of the file
        // needs only the piece written: the rest of it reads as zeros there
        // (QEMU zeroes the rest without writing it, too).
        let zeros_before = partial && self.reads_as_zeros(guest, &table)?;
        let end_before = Owner::file_len(self);
        let host = self.alloc_data(&mut meta, guest, 1)?;
        let fresh = !self.header.has_data_file() && host >= end_before;
        // Encrypted zeros are not zeros on disk: the whole cluster is
        // written.
        let written = if zeros_before && fresh && self.encryption.is_none() {
            self.write_data(piece, host + in_cluster, guest)
        } else if partial {
            self.merged_cluster(piece, guest)
                .and_then(|merged| self.write_data(&merged, host, guest - in_cluster))
        } else {
            self.write_data(piece, host, guest)
        };
        if let Err(e) = written {
            self.give_back_data(&mut meta, host, 1);
            return Err(e);
        }
        self.set_l2_entry(&mut meta, l2_offset, &table, guest, host | OFLAG_COPIED)
    }

    /// The whole guest cluster holding `guest` as it reads now, with
    /// `piece` written over it at `guest` (zeros past the end of the disk):
    /// the contents of a copy-on-write.
    /// Whether the cluster of `guest` reads as zeros now: unallocated in
    /// `table` (not even a zero cluster with space kept) with nothing of a
    /// backing file beneath it.
    fn reads_as_zeros(&self, guest: u64, table: &L2Table) -> Result<bool> {
        let words = self.geometry.l2_entry_words();
        let index = self.geometry.l2_index(guest) * words;
        let entry = table
            .get(index)
            .map_or(u64::MAX, |e| e.load(Ordering::Acquire));
        // A zero cluster without space kept (version 3) hides any backing
        // file.
        let zero_flag =
            words == 1 && self.header.version >= 3 && entry == qcow_format::table::OFLAG_ZERO;
        if zero_flag {
            return Ok(true);
        }
        if entry != 0 {
            return Ok(false);
        }
        let cluster_start = guest - self.geometry.in_cluster(guest);
        Ok(self
            .backing_device()?
            .is_none_or(|b| b.virtual_size() <= cluster_start))
    }

    fn merged_cluster(&self, piece: &[u8], guest: u64) -> Result<Vec<u8>> {
        let cluster_size = self.header.cluster_size();
        let in_cluster = self.geometry.in_cluster(guest);
        let cluster_start = guest - in_cluster;
        // One cluster: at most 2 MiB.
        let mut cluster = vec![0u8; cluster_size as usize];
        let visible = (self.virtual_size - cluster_start).min(cluster_size) as usize;
        self.read_at(&mut cluster[..visible], cluster_start)?;
        let at = in_cluster as usize;
        cluster[at..at + piece.len()].copy_from_slice(piece);
        Ok(cluster)
    }

    /// Points the L2 entry of `guest` at `entry`, releasing (once the table
    /// is on disk) whatever the old entry held in this image.
    pub(super) fn set_l2_entry(
        &self,
        meta: &mut Allocation<'_>,
        l2_offset: u64,
        table: &Arc<L2Table>,
        guest: u64,
        entry: u64,
    ) -> Result<()> {
        self.set_l2_words(meta, l2_offset, table, guest, entry, 0)
    }

    /// Sets the L2 entry of `guest` (and, with extended L2, its subcluster
    /// bitmap), releasing once the table is on disk whatever host space the
    /// old entry held that the new one does not.
    pub(super) fn set_l2_words(
        &self,
        meta: &mut Allocation<'_>,
        l2_offset: u64,
        table: &Arc<L2Table>,
        guest: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        self.replace_l2_words(meta, l2_offset, table, guest, (entry, bitmap), false)
    }

    /// [`Qcow2Image::set_l2_words`] for a guest range given up (zeroed with
    /// unmap, or discarded): the host space it releases also goes back to
    /// the file system once free, as QEMU passes on such discards.
    pub(super) fn release_l2_words(
        &self,
        meta: &mut Allocation<'_>,
        l2_offset: u64,
        table: &Arc<L2Table>,
        guest: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        self.replace_l2_words(meta, l2_offset, table, guest, (entry, bitmap), true)
    }

    fn replace_l2_words(
        &self,
        meta: &mut Allocation<'_>,
        l2_offset: u64,
        table: &Arc<L2Table>,
        guest: u64,
        (entry, bitmap): (u64, u64),
        discard: bool,
    ) -> Result<()> {
        let words = self.geometry.l2_entry_words();
        let index = self.geometry.l2_index(guest) * words;
        let out_of_range = || Error::Corrupt {
            image: self.name.clone(),
            table: "L2 table",
            offset: l2_offset,
            reason: format!("index {index} out of range"),
        };
        let old = self
            .l2
            .set_words(table, index, entry, bitmap)
            .ok_or_else(out_of_range)?;
        self.l2.mark_dirty(l2_offset, table.clone())?;
        let kept = self.geometry.l2_host_range(entry);
        // Clusters of an external data file are not refcounted.
        if self.header.has_data_file() {
            return Ok(());
        }
        if let Some((host, len)) = self.geometry.l2_host_range(old) {
            if kept.map(|(h, _)| h) == Some(host) {
                return Ok(());
            }
            let bits = self.header.cluster_bits;
            for cluster in (host >> bits)..=((host + len - 1) >> bits) {
                meta.pending_frees.push(cluster << bits);
                if discard {
                    meta.pending_discards.push(cluster);
                }
            }
        }
        Ok(())
    }

    /// The L2 table for `guest`, allocated or copied so that this image
    /// owns it alone.
    pub(super) fn writable_l2(
        &self,
        meta: &mut Allocation<'_>,
        guest: u64,
    ) -> Result<(u64, Arc<L2Table>)> {
        let geo = self.geometry;
        let l1_index = geo.l1_index(guest);
        let l1_entry = self.l1_entry(l1_index);
        let current = geo
            .l1_entry(l1_index, l1_entry)
            .map_err(|e| Error::format(&self.name, e))?;
        if let Some(offset) = current {
            if l1_entry & OFLAG_COPIED != 0 {
                return Ok((offset, self.l2_table(l1_index, offset)?));
            }
        }
        let entries = (self.header.cluster_size() / 8) as usize;
        let new_table: Arc<L2Table> = match current {
            Some(offset) => {
                // Shared with a snapshot: copy it. Its clusters stay shared
                // (their refcounts already count both views).
                // Only entry words carry the flag (not subcluster bitmaps).
                let old = self.l2_table(l1_index, offset)?;
                let words = geo.l2_entry_words();
                Arc::new(
                    old.iter()
                        .enumerate()
                        .map(|(i, e)| {
                            let w = e.load(Ordering::Acquire);
                            AtomicU64::new(if i % words == 0 { w & !OFLAG_COPIED } else { w })
                        })
                        .collect(),
                )
            }
            None => empty_table(entries),
        };
        let new_offset = meta.clusters(1)?;
        // Marked before it is written: no in-place write may land there
        // meanwhile (a give-back unmarks it again).
        Owner::metadata_placed(self, new_offset, self.header.cluster_size());
        // The table and its refcount reach the disk before the L1 entry.
        let new_entry = new_offset | OFLAG_COPIED;
        let at = self.header.l1_table_offset + l1_index * 8;
        let linked = self.l2.write_new(new_offset, new_table).and_then(|table| {
            self.flush_refcounts()?;
            self.file
                .write_at(&new_entry.to_be_bytes(), at)
                .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))?;
            Ok(table)
        });
        let table = match linked {
            Ok(table) => table,
            Err(e) => {
                // The L1 entry on disk still names the old table (or none).
                self.l2.forget(new_offset);
                meta.give_back(new_offset, 1);
                return Err(e);
            }
        };
        let slot = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .ok_or_else(|| Error::OutOfRange {
                image: self.name.clone(),
                offset: guest,
                len: 1,
                size: self.virtual_size,
            })?;
        slot.store(new_entry, Ordering::Release);
        if let Some(old) = current {
            meta.pending_frees.push(old);
        }
        Ok((new_offset, table))
    }
}
