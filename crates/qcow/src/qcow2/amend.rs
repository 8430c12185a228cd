//! Changing an image's creation options in place (qemu-img amend), in
//! QEMU's order: upgrade to version 3, refcount width, data file fields,
//! lazy refcounts, size, downgrade to version 2. Everything that can refuse
//! the change is asked before the image is touched.
//!
//! - Upgrading completes snapshot entries that lack the version 3 extra
//!   data (a new snapshot table), then rewrites the header.
//! - A new refcount width is a new refcount structure, written past the
//!   end of the file and flushed before the header names it; the old one's
//!   clusters are then free.
//! - Downgrading turns zero clusters into data clusters of zeros (or, with
//!   no backing file, into unallocated ones) in the active and snapshot L2
//!   tables, then rewrites the header as version 2.
//!
//! The header is rewritten whole, in one write of its cluster, as QEMU
//! rewrites it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use qcow_format::extension::{HeaderExtension, standard_feature_names};
use qcow_format::header::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, CompressionType, Header,
    INCOMPAT_COMPRESSION, INCOMPAT_DIRTY, V2_HEADER_LEN, V3_HEADER_LEN,
};
use qcow_format::table::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, refcount_get};

use super::Qcow2Image;
use super::amend_progress::{AmendProgress, Operation};
use crate::{Error, Result};

/// What [`Qcow2Image::amend`] changes; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmendOptions {
    /// Format version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: Option<u32>,
    /// Lazy refcounts (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// Whether the external data file is a valid raw image (can only be
    /// cleared on an existing image).
    pub data_file_raw: Option<bool>,
    /// The external data file's name (only for images that have one).
    pub data_file: Option<String>,
    /// New virtual size (see [`Qcow2Image::resize`]).
    pub size: Option<u64>,
}

impl AmendOptions {
    /// Nothing changed.
    pub fn new() -> Self {
        Self::default()
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidOptions(message)
}

impl Qcow2Image {
    /// Changes the image's options as `options` say (see the module
    /// documentation). The image must be open for writing.
    pub fn amend(&mut self, options: &AmendOptions) -> Result<()> {
        self.amend_observed(options, &())
    }

    /// [`Qcow2Image::amend`], telling `observer` how far the version
    /// change and the new refcount width are, counted as QEMU counts them
    /// (see [`super::amend_progress`]), so that `amend -p` prints
    /// qemu-img's lines. Checks come first and report nothing; an amend
    /// without either operation reports nothing.
    pub fn amend_observed(
        &mut self,
        options: &AmendOptions,
        observer: &dyn crate::copy::CopyObserver,
    ) -> Result<()> {
        self.check_writable()?;
        let old_version = self.header.version;
        let version = options.version.unwrap_or(old_version);
        if version != 2 && version != 3 {
            return Err(invalid(format!("Unknown compatibility level {version}")));
        }
        let refcount_bits = options.refcount_bits.unwrap_or(self.header.refcount_bits());
        if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if version < 3 && refcount_bits != 16 && refcount_bits != self.header.refcount_bits() {
            return Err(invalid(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if options.data_file.is_some() && !self.header.has_data_file() {
            return Err(invalid(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if options.data_file_raw == Some(true) && !self.header.data_file_raw() {
            return Err(invalid(
                "data-file-raw cannot be set on existing images".into(),
            ));
        }
        if options.lazy_refcounts == Some(true) && version < 3 {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if version < old_version {
            // The downgrade reads every snapshot's L1 table: refused here,
            // before anything changes, when one cannot be read.
            for snapshot in &self.snapshots {
                self.check_snapshot_l1(snapshot)?;
            }
            self.check_downgrade(options.size, refcount_bits)?;
        }
        if refcount_bits < self.header.refcount_bits() {
            self.check_refcounts_fit(refcount_bits)?;
        }
        let result = self.apply_amend(options, version, refcount_bits, observer);
        self.guard(result)
    }

    fn apply_amend(
        &mut self,
        options: &AmendOptions,
        version: u32,
        bits: u32,
        observer: &dyn crate::copy::CopyObserver,
    ) -> Result<()> {
        // Upgrade, refcount width, header fields, size, downgrade.
        let mut progress = AmendProgress::new(
            observer,
            u64::from(version != self.header.version)
                + u64::from(bits != self.header.refcount_bits()),
        );
        if version > self.header.version {
            self.upgrade(&mut progress)?;
        }
        if bits != self.header.refcount_bits() {
            self.change_refcount_width(bits, &mut progress)?;
        }
        let data_file_raw = options.data_file_raw;
        let data_file = options.data_file.clone();
        if data_file_raw.is_some() || data_file.is_some() {
            self.rewrite_header(|h| {
                if data_file_raw == Some(false) {
                    h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
                }
                if let Some(name) = &data_file {
                    h.extensions
                        .retain(|e| !matches!(e, HeaderExtension::ExternalDataFile(_)));
                    if !name.is_empty() {
                        h.extensions
                            .push(HeaderExtension::ExternalDataFile(name.clone()));
                    }
                }
            })?;
        }
        if let Some(lazy) = options.lazy_refcounts {
            if lazy != self.header.lazy_refcounts() {
                if !lazy {
                    self.mark_clean()?;
                }
                self.rewrite_header(|h| {
                    if lazy {
                        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                    } else {
                        h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                    }
                })?;
            }
        }
        if let Some(size) = options.size {
            if size != self.virtual_size {
                self.resize(size)?;
            }
        }
        if version < self.header.version {
            self.downgrade(&mut progress)?;
        }
        Ok(())
    }

    /// Rewrites the header cluster with the header `change` makes from the
    /// current one (its feature bits as they are now), after everything
    /// written so far is on disk.
    pub(super) fn rewrite_header(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        // The flush may store bitmaps and move their directory: the header
        // is built after it, and names the directory as it is then (also
        // when `change` started from an older copy).
        self.flush()?;
        let mut header = self.current_header();
        change(&mut header);
        if self.bitmap_tracker().is_some() {
            let live = self.current_header();
            header
                .extensions
                .retain(|e| !matches!(e, HeaderExtension::Bitmaps(_)));
            header.extensions.extend(
                live.extensions
                    .into_iter()
                    .filter(|e| matches!(e, HeaderExtension::Bitmaps(_))),
            );
            header.autoclear_features = (header.autoclear_features & !AUTOCLEAR_BITMAPS)
                | (live.autoclear_features & AUTOCLEAR_BITMAPS);
        }
        let bytes = header.encode().map_err(|e| Error::format(&self.name, e))?;
        let mut cluster = vec![0u8; self.header.cluster_size() as usize];
        cluster[..bytes.len()].copy_from_slice(&bytes);
        self.file
            .write_at(&cluster, 0)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.name, "writing the header", 0, e))?;
        if let Some(ws) = &self.writer {
            ws.incompatible
                .store(header.incompatible_features, Ordering::Release);
        }
        self.header = header;
        Ok(())
    }

    /// Clears the dirty bit once everything is on disk.
    fn mark_clean(&mut self) -> Result<()> {
        self.flush()?;
        if self.write_state()?.incompatible.load(Ordering::Acquire) & INCOMPAT_DIRTY != 0 {
            self.update_incompatible(|bits| bits & !INCOMPAT_DIRTY)?;
        }
        Ok(())
    }

    /// Version 2 to 3: snapshot entries get the extra data version 3
    /// requires, then the header (with the feature name table, as QEMU
    /// writes it).
    fn upgrade(&mut self, progress: &mut AmendProgress) -> Result<()> {
        progress.report(Operation::Upgrade, 0, 2);
        if self.snapshots.iter().any(|s| s.extra_data.len() < 16) {
            let snapshots = self.snapshots.clone();
            self.write_snapshot_table(snapshots)?;
        }
        progress.report(Operation::Upgrade, 1, 2);
        self.rewrite_header(|h| {
            h.version = 3;
            h.header_length = V3_HEADER_LEN;
            // As at creation: none with clusters of 4 KiB and smaller.
            if h.cluster_size() > 4096
                && !h
                    .extensions
                    .iter()
                    .any(|e| matches!(e, HeaderExtension::FeatureNames(_)))
            {
                h.extensions
                    .push(HeaderExtension::FeatureNames(standard_feature_names()));
            }
        })?;
        progress.report(Operation::Upgrade, 2, 2);
        Ok(())
    }

    /// Refuses a downgrade to version 2 the image cannot take.
    fn check_downgrade(&self, new_size: Option<u64>, refcount_bits: u32) -> Result<()> {
        if refcount_bits != 16 {
            return Err(invalid("compat=0.10 requires refcount_bits=16".into()));
        }
        if self.header.has_data_file() {
            return Err(invalid("Cannot downgrade an image with a data file".into()));
        }
        let size = new_size.unwrap_or(self.virtual_size);
        let snapshots_fit = self
            .snapshots
            .iter()
            .all(|s| s.vm_state_size <= u64::from(u32::MAX) && s.disk_size.unwrap_or(size) == size);
        if !snapshots_fit {
            return Err(invalid(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        let bits = self.write_state()?.incompatible.load(Ordering::Acquire);
        let blocking = bits & !(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY);
        if blocking != 0 {
            return Err(invalid(format!(
                "Cannot downgrade an image with incompatible features 0x{blocking:x} set"
            )));
        }
        if bits & INCOMPAT_COMPRESSION != 0 && self.has_compressed_clusters()? {
            return Err(invalid(
                "Cannot downgrade an image with zstd compression type and existing compressed clusters"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Every L1 table of the image: the active one and each snapshot's.
    fn all_l1_tables(&self) -> Result<Vec<Vec<u64>>> {
        let mut tables = vec![
            (0..self.l1.len() as u64)
                .map(|i| self.l1_entry(i))
                .collect(),
        ];
        for snapshot in &self.snapshots {
            tables.push(self.read_snapshot_l1(snapshot)?);
        }
        Ok(tables)
    }

    /// Whether any L2 table (active or a snapshot's) maps a compressed
    /// cluster.
    fn has_compressed_clusters(&self) -> Result<bool> {
        let words = self.geometry.l2_entry_words();
        let mut seen = HashSet::new();
        for l1 in self.all_l1_tables()? {
            for l2 in l1.into_iter().map(|e| e & OFFSET_MASK).filter(|&o| o != 0) {
                if !seen.insert(l2) {
                    continue;
                }
                let table = self.read_l2_words(l2)?;
                if table
                    .iter()
                    .step_by(words)
                    .any(|&e| e & OFLAG_COMPRESSED != 0)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Version 3 to 2 (checked beforehand): zero clusters become clusters
    /// of zeros, then the header loses what version 2 cannot hold.
    fn downgrade(&mut self, progress: &mut AmendProgress) -> Result<()> {
        self.mark_clean()?;
        self.expand_zero_clusters(progress)?;
        // Version 2 cannot keep bitmaps: their clusters leak, as with QEMU
        // (check -r leaks frees them), and writes record nothing. Stored
        // first, then let go, so the header rewrite drops the extension.
        self.flush()?;
        if let Some(ws) = self.writer.as_mut() {
            ws.bitmaps = None;
        }
        self.bitmaps.clear();
        self.rewrite_header(|h| {
            h.version = 2;
            h.header_length = V2_HEADER_LEN;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.incompatible_features = 0;
            h.compression_type = CompressionType::Zlib;
            h.extensions.retain(|e| {
                !matches!(
                    e,
                    HeaderExtension::FeatureNames(_) | HeaderExtension::Bitmaps(_)
                )
            });
        })?;
        Ok(())
    }

    /// Turns every zero cluster (active and snapshot L2 tables alike) into
    /// a cluster of zeros: its own cluster when it kept one, a new one
    /// otherwise, or none without a backing file (unallocated reads as
    /// zeros there), as QEMU's `qcow2_expand_zero_clusters` does. A table
    /// shared by several L1 tables is changed once, for all of them.
    fn expand_zero_clusters(&mut self, progress: &mut AmendProgress) -> Result<()> {
        self.flush()?;
        let cs = self.header.cluster_size();
        let has_backing = self.header.backing_file.is_some();
        let zeros = vec![0u8; cs as usize];
        let mut seen = HashSet::new();
        let tables = self.all_l1_tables()?;
        // One step per L1 entry, as QEMU counts it.
        let entries: u64 = tables.iter().map(|t| t.len() as u64).sum();
        let mut visited = 0;
        for l2 in tables.into_iter().flatten().map(|e| e & OFFSET_MASK) {
            visited += 1;
            if l2 != 0 && seen.insert(l2) {
                self.expand_zero_clusters_in(l2, &zeros, has_backing)?;
            }
            progress.report(Operation::Downgrade, visited, entries);
        }
        self.flush()
    }

    /// [`Qcow2Image::expand_zero_clusters`] in the L2 table at `l2`.
    fn expand_zero_clusters_in(&mut self, l2: u64, zeros: &[u8], has_backing: bool) -> Result<()> {
        let mut table = self.read_l2_words(l2)?;
        let mut changed = false;
        let mut meta = self.lock_meta()?;
        let l2_refcount = meta.refcount(l2 >> self.header.cluster_bits)?;
        for word in table.iter_mut() {
            let entry = *word;
            if entry & OFLAG_COMPRESSED != 0 || entry & OFLAG_ZERO == 0 {
                continue;
            }
            let host = entry & OFFSET_MASK;
            let new = if host != 0 {
                self.write_zero_cluster(zeros, host)?;
                host | (entry & OFLAG_COPIED)
            } else if !has_backing {
                0
            } else {
                let host = meta.clusters(1)?;
                if l2_refcount > 1 {
                    // Every L1 table sharing the table references it.
                    let cluster = host >> self.header.cluster_bits;
                    meta.change_refcount(cluster, (l2_refcount - 1) as i64)?;
                }
                self.write_zero_cluster(zeros, host)?;
                if l2_refcount == 1 {
                    host | OFLAG_COPIED
                } else {
                    host
                }
            };
            *word = new;
            changed = true;
        }
        if changed {
            // The new clusters are counted and zeroed before the
            // table names them.
            meta.flush_refcounts()?;
            self.file
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
            let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
            self.file
                .write_at(&bytes, l2)
                .map_err(|e| Error::io(&self.name, "writing an L2 table", l2, e))?;
            self.l2.forget(l2);
        }
        Ok(())
    }

    fn write_zero_cluster(&self, zeros: &[u8], host: u64) -> Result<()> {
        match self.encryption() {
            None => self
                .file
                .write_at(zeros, host)
                .map_err(|e| Error::io(&self.name, "writing zeros", host, e)),
            // LUKS encrypts by host offset: zeros as the guest reads them.
            Some(crate::crypto::EncryptionInfo::Luks { .. }) => self.write_data(zeros, host, 0),
            // Legacy AES encrypts by guest offset, which this walk over
            // the tables does not know.
            Some(crate::crypto::EncryptionInfo::Aes) => Err(Error::Unsupported {
                image: self.name.clone(),
                what: "expanding zero clusters of an image with legacy AES encryption".into(),
            }),
        }
    }

    /// Refuses a narrower refcount width some cluster's count does not fit.
    fn check_refcounts_fit(&self, bits: u32) -> Result<()> {
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let counts = self.stored_refcounts()?;
        if let Some((cluster, &n)) = counts.iter().enumerate().find(|&(_, &n)| n > max) {
            return Err(invalid(format!(
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {n}",
                (cluster as u64) << self.header.cluster_bits
            )));
        }
        Ok(())
    }

    /// Every cluster's stored refcount, for the clusters of the file (the
    /// cached refcount blocks written first).
    fn stored_refcounts(&self) -> Result<Vec<u64>> {
        self.flush_refcounts()?;
        let cs = self.header.cluster_size();
        let order = self.header.refcount_order;
        let per_block = (cs * 8) >> order;
        let clusters = self.file_len().div_ceil(cs);
        let mut counts = vec![0u64; clusters as usize];
        for (i, entry) in self.stored_reftable()?.into_iter().enumerate() {
            let block = entry & !0x1ff;
            if block == 0 {
                continue;
            }
            if block % cs != 0 || block.saturating_add(cs) > self.file_len() {
                return Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "refcount table",
                    offset: self.header.refcount_table_offset,
                    reason: format!("refcount block {block:#x} is invalid"),
                });
            }
            // One cluster: at most 2 MiB.
            let mut raw = vec![0u8; cs as usize];
            self.file
                .read_at(&mut raw, block)
                .map_err(|e| Error::io(&self.name, "reading a refcount block", block, e))?;
            for j in 0..per_block {
                let cluster = i as u64 * per_block + j;
                if cluster >= clusters {
                    break;
                }
                counts[cluster as usize] = refcount_get(&raw, j, order).unwrap_or(0);
            }
        }
        Ok(counts)
    }
}
