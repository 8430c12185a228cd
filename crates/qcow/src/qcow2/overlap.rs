//! The metadata overlap guard: before clusters are handed out for writing,
//! they are checked against every structure the image's metadata uses, as
//! QEMU's `qcow2_check_metadata_overlap` does.
//!
//! Refcounts say which clusters are free. When they lie (a damaged or
//! hostile image counts an L2 table's cluster as free), an allocation would
//! write data or new metadata over live metadata and destroy guest data.
//! The guard catches that: it refuses the allocation, sets the corrupt bit
//! and names both structures. It checks the header cluster, the active L1
//! table and every L2 table it points at, the refcount table and its
//! blocks, the snapshot table and each snapshot's L1 table, and the bitmap
//! directory (QEMU's default "cached" set: snapshot L2 tables and bitmap
//! tables are not walked).

use std::sync::atomic::Ordering;

use qcow_format::table::OFFSET_MASK;

use super::Qcow2Image;
use super::allocator::Meta;
use super::metadata_map::MetadataMap;
use crate::{Error, Result};

/// One metadata structure: what it is, where it starts, how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Structure {
    start: u64,
    len: u64,
    kind: &'static str,
}

impl Qcow2Image {
    /// The first metadata structure of the image for which `found` says
    /// yes (in no particular order), given the refcount table, visiting
    /// each without allocating.
    fn find_structure(
        &self,
        reftable_offset: u64,
        reftable: &[u64],
        mut found: impl FnMut(&Structure) -> bool,
    ) -> Option<Structure> {
        let cluster_size = self.header.cluster_size();
        let mut test = |start: u64, len: u64, kind: &'static str| {
            let s = Structure { start, len, kind };
            (len > 0 && found(&s)).then_some(s)
        };
        let fixed = [
            (0, cluster_size, "header"),
            (
                self.header.l1_table_offset,
                self.l1.len() as u64 * 8,
                "active L1 table",
            ),
            (reftable_offset, reftable.len() as u64 * 8, "refcount table"),
            (
                self.header.snapshots_offset,
                self.snapshot_table_bytes,
                "snapshot table",
            ),
        ];
        let encryption = self
            .encryption_header_area()
            .map(|(start, len)| (start, len, "encryption header"));
        for (start, len, kind) in fixed.into_iter().chain(encryption) {
            if let Some(s) = test(start, len, kind) {
                return Some(s);
            }
        }
        for &block in reftable.iter().filter(|&&b| b != 0) {
            if let Some(s) = test(block, cluster_size, "refcount block") {
                return Some(s);
            }
        }
        for entry in &self.l1 {
            let l2 = entry.load(Ordering::Acquire) & OFFSET_MASK;
            if l2 != 0 {
                if let Some(s) = test(l2, cluster_size, "active L2 table") {
                    return Some(s);
                }
            }
        }
        // A snapshot whose L1 table cannot be read is never used here.
        for snapshot in self
            .snapshots
            .iter()
            .filter(|s| self.check_snapshot_l1(s).is_ok())
        {
            let len = u64::from(snapshot.l1_size) * 8;
            if let Some(s) = test(snapshot.l1_table_offset, len, "inactive L1 table") {
                return Some(s);
            }
        }
        let ext = self.bitmap_directory()?;
        test(ext.directory_offset, ext.directory_size, "bitmap directory")
    }

    /// Every metadata structure of the image, given the refcount table.
    fn structures(&self, reftable_offset: u64, reftable: &[u64]) -> Vec<Structure> {
        let mut all = Vec::new();
        self.find_structure(reftable_offset, reftable, |s| {
            all.push(*s);
            false
        });
        all
    }

    /// The first metadata structure that overlaps host bytes
    /// `start..start + len`, with its offset: `None` when the range is free
    /// of metadata.
    pub(super) fn metadata_overlap(
        &self,
        reftable_offset: u64,
        reftable: &[u64],
        start: u64,
        len: u64,
    ) -> Option<(&'static str, u64)> {
        let end = start.saturating_add(len);
        self.find_structure(reftable_offset, reftable, |s| {
            s.start < end && start < s.start.saturating_add(s.len)
        })
        .map(|s| (s.kind, s.start))
    }

    /// The metadata structure other than an active L2 table that overlaps
    /// `start..start + len`, for rewriting an active L2 table in place
    /// without the allocation state (check's repairs), given the refcount
    /// table as stored.
    pub(super) fn l2_rewrite_overlap(
        &self,
        start: u64,
        len: u64,
        stored_reftable: &[u64],
    ) -> Option<(&'static str, u64)> {
        let reftable: Vec<u64> = stored_reftable.iter().map(|e| e & OFFSET_MASK).collect();
        let end = start.saturating_add(len);
        self.find_structure(self.header.refcount_table_offset, &reftable, |s| {
            s.kind != "active L2 table" && s.start < end && start < s.start.saturating_add(s.len)
        })
        .map(|s| (s.kind, s.start))
    }

    /// [`Qcow2Image::check_structures_apart`] with the refcount table as
    /// stored (before the allocation state exists).
    pub(super) fn check_structures_apart_on_disk(&self) -> Result<()> {
        let reftable: Vec<u64> = self
            .stored_reftable()?
            .into_iter()
            .map(|e| e & OFFSET_MASK)
            .collect();
        self.check_apart(self.header.refcount_table_offset, &reftable)
    }

    /// Marks every metadata structure in `map`; one past the end of the
    /// file (which the map does not cover) leaves the map incomplete.
    pub(super) fn map_metadata(&self, meta: &Meta, map: &MetadataMap) {
        let file_end = self.file_len().next_multiple_of(self.header.cluster_size());
        for s in self.structures(meta.reftable_offset, &meta.reftable) {
            if s.start.saturating_add(s.len) > file_end {
                map.set_incomplete();
            } else {
                map.mark(s.start, s.len);
            }
        }
    }

    /// Refuses guest data written in place at `host..host + len` where
    /// metadata lives (a damaged L2 entry naming a table). `meta`: the
    /// allocation state when the caller holds the lock. Returns `false`,
    /// without deciding, when the map cannot answer and the lock is not
    /// held: taking it here could deadlock with a flush waiting for
    /// in-flight data I/O.
    pub(super) fn check_data_overlap(
        &self,
        host: u64,
        len: u64,
        meta: Option<&Meta>,
    ) -> Result<bool> {
        let Some(ws) = &self.writer else {
            return Ok(true);
        };
        if ws.metadata.complete() && !ws.metadata.hits(host, len) {
            return Ok(true);
        }
        let Some(meta) = meta else {
            return Ok(false);
        };
        match self.metadata_overlap(meta.reftable_offset, &meta.reftable, host, len) {
            None => Ok(true),
            Some((structure, offset)) => Err(Error::MetadataOverlap {
                image: self.name.clone(),
                what: "guest data",
                at: host,
                structure,
                offset,
            }),
        }
    }

    /// Checks that no two metadata structures share bytes (a refcount
    /// block that is really the L1 table would have every refcount update
    /// overwrite guest mappings). Sorts once, so it costs O(n log n) in the
    /// number of tables. The same table named twice (two L1 entries naming
    /// one L2 table) is left to `check`.
    pub(super) fn check_structures_apart(&self, meta: &Meta) -> Result<()> {
        self.check_apart(meta.reftable_offset, &meta.reftable)
    }

    fn check_apart(&self, reftable_offset: u64, reftable: &[u64]) -> Result<()> {
        let mut all = self.structures(reftable_offset, reftable);
        all.sort_unstable();
        all.dedup();
        let mut reach: Option<Structure> = None;
        for s in all {
            if let Some(prev) = reach {
                let prev_end = prev.start.saturating_add(prev.len);
                if s.start < prev_end && !(s.start == prev.start && s.kind == prev.kind) {
                    return Err(Error::MetadataOverlap {
                        image: self.name.clone(),
                        what: s.kind,
                        at: s.start,
                        structure: prev.kind,
                        offset: prev.start,
                    });
                }
                if s.start.saturating_add(s.len) <= prev_end {
                    continue;
                }
            }
            reach = Some(s);
        }
        Ok(())
    }
}
