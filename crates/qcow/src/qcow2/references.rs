//! The reference walk: every host cluster the image's metadata uses, read
//! from disk and reported to a visitor, in QEMU's order. It serves both
//! `check` (which compares the references with the refcounts, and collects
//! fragmentation statistics) and the refcount rebuild of dirty images.
//!
//! Visited: the header cluster, the LUKS header of an encrypted image, the
//! active L1 table, the L2 tables it names
//! and their data and compressed clusters (every cluster a compressed run
//! spans), each snapshot's L1 table with its L2 tables and clusters, the
//! snapshot table, the refcount table, and the bitmap directory with every
//! bitmap's table and data clusters. Refcount blocks are left to the
//! visitor's caller (check validates them, a rebuild replaces them).
//!
//! An L2 table named by several L1 entries is read once and reported with
//! its multiplicity, so the work stays bounded by the file's size however a
//! crafted image shares its tables.

use std::collections::BTreeMap;

use qcow_format::table::{
    L1_RESERVED_MASK, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};

use super::{Qcow2Image, decode_be_words};
use crate::{Error, Result};

/// Reserved bits of a standard (not compressed) L2 entry.
const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a bitmap table entry.
const BITMAP_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Most bytes of L1 tables (active and snapshots) one walk reads: far more
/// than any real image's, and a bound for crafted ones that name the same
/// huge table from thousands of snapshots.
const MAX_L1_BYTES_READ: u64 = 1 << 30;

/// What a reference is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// A metadata structure (header, tables, directories).
    Metadata(&'static str),
    /// An L2 table starts; the entries that follow are its own. `active`:
    /// named by the active L1 table.
    L2Table {
        /// Named by the active L1 table.
        active: bool,
    },
    /// An uncompressed data cluster at `offset` (counted only when the
    /// image keeps its data in itself; reported for statistics either way).
    Data {
        /// Named through the active L1 table.
        active: bool,
        /// Whether its clusters count (not in an external data file).
        counted: bool,
    },
    /// Compressed data.
    Compressed {
        /// Named through the active L1 table.
        active: bool,
    },
}

impl Use {
    /// Whether the reference counts toward a refcount (the marker of a
    /// table's start and clusters of an external data file do not).
    pub(super) fn counted(self) -> bool {
        !matches!(self, Use::Data { counted: false, .. } | Use::L2Table { .. })
    }
}

/// Receives what the walk finds.
pub(super) trait Visitor {
    /// Host bytes `offset..offset + len` are used `times` times by `what`.
    fn used(&mut self, offset: u64, len: u64, times: u64, what: Use) -> Result<()>;

    /// Something in the metadata is wrong (`times` references see it):
    /// QEMU's check counts it as a corruption and prints `message`.
    fn problem(&mut self, times: u64, message: String) -> Result<()>;

    /// Whether the walk may repair what it can (check's `-r all`); the
    /// default is no.
    fn repairs(&self) -> bool {
        false
    }

    /// A problem just reported (`times` references) was repaired.
    fn fixed(&mut self, times: u64) -> Result<()> {
        let _ = times;
        Ok(())
    }

    /// An error kept a repair from completing.
    fn check_error(&mut self, message: String) -> Result<()> {
        Err(Error::Corrupt {
            image: String::new(),
            table: "L2 table",
            offset: 0,
            reason: message,
        })
    }
}

impl Qcow2Image {
    /// Walks every reference of the image (refcount blocks aside), as the
    /// module documentation says.
    pub(super) fn walk_references(&self, visitor: &mut dyn Visitor) -> Result<()> {
        let cs = self.header.cluster_size();
        visitor.used(0, cs, 1, Use::Metadata("header"))?;
        if let Some((offset, length)) = self.encryption_header_area() {
            visitor.used(offset, length, 1, Use::Metadata("encryption header"))?;
        }
        // Which L2 tables are named, how often, and by which kind of L1.
        let mut l2_tables: BTreeMap<(u64, bool), u64> = BTreeMap::new();
        let mut l1_bytes = 0u64;
        let mut tables = vec![(
            self.header.l1_table_offset,
            self.header.l1_size,
            true,
            String::new(),
        )];
        if self.header.has_data_file() && !self.snapshots.is_empty() {
            visitor.problem(
                1,
                format!(
                    "ERROR {} snapshots in image with data file",
                    self.snapshots.len()
                ),
            )?;
        }
        for s in &self.snapshots {
            if s.l1_table_offset % cs != 0 {
                visitor.problem(1, format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_table_offset
                ))?;
                continue;
            }
            if u64::from(s.l1_size) * 8 > qcow_format::limits::MAX_L1_BYTES {
                visitor.problem(1, format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ))?;
                continue;
            }
            tables.push((s.l1_table_offset, s.l1_size, false, s.id.clone()));
        }
        for (l1_offset, l1_size, active, _) in &tables {
            if *l1_size == 0 {
                continue;
            }
            let len = u64::from(*l1_size) * 8;
            visitor.used(*l1_offset, len, 1, Use::Metadata("L1 table"))?;
            l1_bytes += len;
            if l1_bytes > MAX_L1_BYTES_READ {
                return Err(Error::Unsupported {
                    image: self.name.clone(),
                    what: format!("walking more than {MAX_L1_BYTES_READ} bytes of L1 tables"),
                });
            }
            let l1 = super::read_l1(&self.name, &*self.file, *l1_offset, *l1_size)?;
            for &entry in l1.iter().filter(|&&e| e != 0) {
                if entry & L1_RESERVED_MASK != 0 {
                    visitor.problem(
                        1,
                        format!("ERROR found L1 entry with reserved bits set: {entry:x}"),
                    )?;
                }
                let l2 = entry & OFFSET_MASK;
                *l2_tables.entry((l2, *active)).or_insert(0) += 1;
            }
        }
        // Each distinct table once, its references multiplied.
        for (&(l2, active), &times) in &l2_tables {
            visitor.used(l2, cs, times, Use::Metadata("L2 table"))?;
            if l2 % cs != 0 {
                visitor.problem(
                    times,
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    ),
                )?;
            }
            self.walk_l2(l2, active, times, visitor)?;
        }
        visitor.used(
            self.header.snapshots_offset,
            self.snapshot_table_bytes,
            1,
            Use::Metadata("snapshot table"),
        )?;
        let reftable_len = u64::from(self.header.refcount_table_clusters) * cs;
        visitor.used(
            self.header.refcount_table_offset,
            reftable_len,
            1,
            Use::Metadata("refcount table"),
        )?;
        self.walk_bitmaps(visitor)
    }

    /// Reads one L2 table and reports its entries.
    fn walk_l2(&self, l2: u64, active: bool, times: u64, visitor: &mut dyn Visitor) -> Result<()> {
        let cs = self.header.cluster_size();
        visitor.used(l2, 0, times, Use::L2Table { active })?;
        // One cluster: at most 2 MiB.
        let mut bytes = vec![0u8; cs as usize];
        self.file
            .read_at(&mut bytes, l2)
            .map_err(|e| Error::io(&self.name, "reading an L2 table", l2, e))?;
        let words = decode_be_words(&bytes);
        let extended = self.geometry.extended_l2;
        let data_file = self.header.has_data_file();
        for (index, entry) in words.chunks(self.geometry.l2_entry_words()).enumerate() {
            let l2_entry = entry[0];
            let bitmap = if extended { entry[1] } else { 0 };
            let compressed = l2_entry & OFLAG_COMPRESSED != 0;
            if !compressed && l2_entry & L2_RESERVED_MASK != 0 {
                visitor.problem(
                    times,
                    format!("ERROR found l2 entry with reserved bits set: {l2_entry:x}"),
                )?;
            }
            if compressed {
                let mut l2_entry = l2_entry;
                if l2_entry & OFLAG_COPIED != 0 {
                    let (host, _) = self.geometry.compressed_extent(l2_entry);
                    visitor.problem(
                        times,
                        format!(
                            "ERROR: coffset=0x{host:x}: copied flag must never be set for compressed clusters"
                        ),
                    )?;
                    l2_entry &= !OFLAG_COPIED;
                }
                if data_file {
                    visitor.problem(
                        times,
                        format!(
                            "ERROR compressed cluster {index} with data file, entry=0x{l2_entry:x}"
                        ),
                    )?;
                    continue;
                }
                if bitmap != 0 {
                    visitor.problem(times, format!(
                        "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry=0x{l2_entry:x}"
                    ))?;
                    continue;
                }
                let (host, len) = self.geometry.compressed_extent(l2_entry);
                visitor.used(host, len, times, Use::Compressed { active })?;
                continue;
            }
            let offset = l2_entry & OFFSET_MASK;
            let zero_flag = !extended && l2_entry & OFLAG_ZERO != 0;
            let allocated = offset != 0 || (data_file && l2_entry & OFLAG_COPIED != 0);
            if zero_flag && offset == 0 {
                // A plain zero cluster uses nothing.
                continue;
            }
            if !allocated {
                if bitmap & 0xffff_ffff != 0 {
                    visitor.problem(
                        times,
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                    )?;
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                visitor.problem(times, format!(
                    "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ))?;
            }
            if offset % cs != 0 {
                let contains_data = if extended {
                    bitmap & 0xffff_ffff != 0
                } else {
                    !zero_flag
                };
                if contains_data {
                    visitor.problem(times, format!(
                        "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                    ))?;
                } else if visitor.repairs() {
                    // As QEMU: the entry becomes a plain zero cluster (the
                    // space it names is not counted, it reads as zeros).
                    visitor.problem(times, format!(
                        "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                    ))?;
                    let words = self.geometry.l2_entry_words() as u64;
                    let at = l2 + index as u64 * words * 8;
                    let mut new = OFLAG_ZERO.to_be_bytes().to_vec();
                    if extended {
                        let zeros = (bitmap | (bitmap << 32)) & (0xffff_ffff << 32);
                        new = [0u64.to_be_bytes(), zeros.to_be_bytes()].concat();
                    }
                    let clear = self.stored_reftable().ok().is_some_and(|r| {
                        self.l2_rewrite_overlap(at, new.len() as u64, &r).is_none()
                    });
                    let fixed = clear && self.file.write_at(&new, at).is_ok();
                    if fixed {
                        visitor.fixed(times)?;
                        continue;
                    }
                    visitor.check_error("ERROR: Failed to overwrite L2 table entry".into())?;
                } else {
                    visitor.problem(times, format!(
                        "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                    ))?;
                }
            }
            visitor.used(
                offset,
                cs,
                times,
                Use::Data {
                    active,
                    counted: !data_file,
                },
            )?;
        }
        Ok(())
    }

    /// Reports the bitmap directory, tables and data clusters.
    fn walk_bitmaps(&self, visitor: &mut dyn Visitor) -> Result<()> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Ok(());
        }
        let cs = self.header.cluster_size();
        visitor.used(
            ext.directory_offset,
            ext.directory_size,
            1,
            Use::Metadata("bitmap directory"),
        )?;
        for bitmap in &self.bitmaps {
            let len = u64::from(bitmap.table_size) * 8;
            visitor.used(bitmap.table_offset, len, 1, Use::Metadata("bitmap table"))?;
            if len > qcow_format::limits::MAX_L1_BYTES {
                visitor.problem(
                    1,
                    format!("ERROR bitmap {} table is too large", bitmap.name),
                )?;
                continue;
            }
            // Bounded just above.
            let mut bytes = vec![0u8; len as usize];
            self.file
                .read_at(&mut bytes, bitmap.table_offset)
                .map_err(|e| {
                    Error::io(&self.name, "reading a bitmap table", bitmap.table_offset, e)
                })?;
            for entry in decode_be_words(&bytes) {
                let offset = entry & OFFSET_MASK;
                if entry & BITMAP_ENTRY_RESERVED_MASK != 0 || (offset != 0 && entry & 1 != 0) {
                    visitor.problem(
                        1,
                        format!(
                            "ERROR bitmap {} has an invalid table entry {entry:x}",
                            bitmap.name
                        ),
                    )?;
                    continue;
                }
                if offset != 0 {
                    visitor.used(offset, cs, 1, Use::Metadata("bitmap data"))?;
                }
            }
        }
        Ok(())
    }
}
