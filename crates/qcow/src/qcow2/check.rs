//! `check` and repair, as QEMU's `qcow2_check_refcounts` does them.
//!
//! The reference walk counts every use of every cluster into an in-memory
//! refcount table; each cluster's count is then compared with the refcount
//! the image stores. More stored than used is a leak, fewer is a corruption
//! (the cluster could be handed out again while in use). Alongside:
//! alignment and reserved bits of every entry, refcount blocks inside the
//! file and counted once, `OFLAG_COPIED` exactly on entries whose cluster
//! has refcount one, and fragmentation statistics.
//!
//! Repairs: [`Repair::Leaks`] lowers refcounts that are too high;
//! [`Repair::All`] also raises those that are too low, fixes `OFLAG_COPIED`,
//! grows the file over refcount blocks past its end, rebuilds the refcount
//! structure when blocks are missing or broken, and then clears the dirty
//! and corrupt bits once the image is consistent.

use qcow_format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow_format::table::{
    OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, refcount_get, refcount_set,
};

use super::references::{Use, Visitor};
use super::{Qcow2Image, decode_be_words};
use crate::{Error, Result};

/// Most clusters a checked file may have (QEMU's bound, `INT_MAX`).
const MAX_CLUSTERS: u64 = i32::MAX as u64;

/// What `check` may repair (qemu-img's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Nothing: only report.
    #[default]
    None,
    /// Leaked clusters (`-r leaks`).
    Leaks,
    /// Everything it can (`-r all`).
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }

    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// Memory a check's in-memory refcount table may take by default: 1 GiB,
/// the whole of a 16 TiB file of 64 KiB clusters at once.
pub const DEFAULT_CHECK_MEMORY: u64 = 1 << 30;

/// How [`Qcow2Image::check_with`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOptions {
    /// What to repair.
    pub repair: Repair,
    /// Most bytes the in-memory refcount table may take (4 per cluster of
    /// the file). A larger file is counted a window at a time, walking the
    /// references once per window; only rebuilding the refcount structure
    /// needs the whole file counted at once, and is refused beyond it.
    pub max_memory: u64,
}

impl CheckOptions {
    /// Options that repair as `repair` says, within
    /// [`DEFAULT_CHECK_MEMORY`].
    pub fn new(repair: Repair) -> Self {
        CheckOptions {
            repair,
            max_memory: DEFAULT_CHECK_MEMORY,
        }
    }

    /// The same options with another memory bound.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = bytes;
        self
    }
}

/// What `check` found, in qemu-img's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that may harm data (left after repairs).
    pub corruptions: u64,
    /// Clusters counted as used that nothing uses (left after repairs).
    pub leaks: u64,
    /// Errors that kept the check from completing (I/O errors and such).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use, in bytes.
    pub image_end_offset: u64,
    /// Clusters the virtual disk spans.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active layer.
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
}

/// One counting pass over one window of clusters.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The window's first cluster.
    base: u64,
    /// Clusters in the window.
    window: u64,
    reporting: Reporting,
    /// What the walk may repair.
    repair: Repair,
}

/// What a counting pass reports besides the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reporting {
    /// Everything: the walk's problems and statistics, overflows (the
    /// first window of the first pass).
    All,
    /// Only refcount overflows, which belong to the window's clusters
    /// (later windows of the first pass).
    Overflows,
    /// Nothing: the counts only (a pass that repairs what the first found).
    Nothing,
}

/// The in-memory refcount table the walk fills, for one window of
/// clusters, with the statistics and problems found on the way.
struct Counter<'a> {
    /// Counts of clusters `base..base + window`, grown as they are met.
    counts: Vec<u32>,
    /// The first cluster counted.
    base: u64,
    /// Most clusters counted in one pass (the memory bound).
    window: u64,
    reporting: Reporting,
    cluster_bits: u32,
    file_len: u64,
    /// The image's largest refcount (or `u32::MAX`, this table's own).
    max: u64,
    report: CheckReport,
    /// What the walk may repair.
    repair: Repair,
    next_contiguous: u64,
    log: &'a mut dyn FnMut(&str),
}

impl Counter<'_> {
    fn count(&self, cluster: u64) -> u64 {
        cluster
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.counts.get(i))
            .map_or(0, |&c| u64::from(c))
    }

    /// Whether the walk's problems and statistics are reported.
    fn walk_reported(&self) -> bool {
        self.reporting == Reporting::All
    }

    /// Counts `offset..offset + len` `times` times (QEMU's
    /// `qcow2_inc_refcounts_imrt`), for the clusters in the window.
    fn add(&mut self, offset: u64, len: u64, times: u64) {
        if len == 0 {
            return;
        }
        let cs = 1u64 << self.cluster_bits;
        if offset.saturating_add(len).saturating_sub(self.file_len) >= cs {
            if self.walk_reported() {
                (self.log)(&format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{len:x}"
                ));
                self.report.corruptions += times;
            }
            return;
        }
        let first = (offset >> self.cluster_bits).max(self.base);
        let last = ((offset + len - 1) >> self.cluster_bits).min(self.base + self.window - 1);
        for cluster in first..=last {
            // Inside the file and the window (both checked above), so it
            // fits in memory's index and the memory bound.
            let index = (cluster - self.base) as usize;
            if index >= self.counts.len() {
                self.counts.resize(index + 1, 0);
            }
            // As QEMU, one reference at a time: counted up to the largest
            // refcount, each one past it an overflow.
            let count = u64::from(self.counts[index]);
            let added = times.min(self.max.saturating_sub(count));
            // At most self.max, which fits.
            self.counts[index] = (count + added) as u32;
            if self.reporting == Reporting::Nothing {
                continue;
            }
            for _ in added..times {
                (self.log)(&format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    cluster << self.cluster_bits
                ));
                (self.log)(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
                );
                self.report.corruptions += 1;
            }
        }
    }
}

impl Visitor for Counter<'_> {
    fn used(&mut self, offset: u64, len: u64, times: u64, what: Use) -> Result<()> {
        if self.walk_reported() {
            match what {
                Use::L2Table { .. } => self.next_contiguous = 0,
                Use::Compressed { active } => {
                    if active {
                        self.report.allocated_clusters += times;
                        self.report.compressed_clusters += times;
                        self.report.fragmented_clusters += times;
                    }
                }
                Use::Data { active, .. } => {
                    if active {
                        self.report.allocated_clusters += times;
                        if self.next_contiguous != 0 && offset != self.next_contiguous {
                            self.report.fragmented_clusters += times;
                        }
                        self.next_contiguous = offset + (1 << self.cluster_bits);
                    }
                }
                Use::Metadata(_) => {}
            }
        }
        if what.counted() {
            self.add(offset, len, times);
        }
        Ok(())
    }

    fn problem(&mut self, times: u64, message: String) -> Result<()> {
        if self.walk_reported() {
            (self.log)(&message);
            self.report.corruptions += times;
        }
        Ok(())
    }

    fn repairs(&self) -> bool {
        self.walk_reported() && self.repair.errors()
    }

    fn fixed(&mut self, times: u64) -> Result<()> {
        if self.walk_reported() {
            self.report.corruptions -= times;
            self.report.corruptions_fixed += times;
        }
        Ok(())
    }

    fn check_error(&mut self, message: String) -> Result<()> {
        if self.walk_reported() {
            (self.log)(&message);
            self.report.check_errors += 1;
        }
        Ok(())
    }
}

/// The image's stored refcounts, read block by block.
struct Stored {
    reftable: Vec<u64>,
    block_offset: u64,
    block: Vec<u8>,
    dirty: bool,
}

impl Qcow2Image {
    /// Checks the image's metadata and, as `repair` allows, repairs it; what
    /// QEMU prints along the way goes to `log` line by line. The image must
    /// have been opened for checking (its file writable when repairing).
    pub fn check(&mut self, repair: Repair, log: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        self.check_with(&CheckOptions::new(repair), log)
    }

    /// [`Qcow2Image::check`] with options beyond the repair mode.
    pub fn check_with(
        &mut self,
        options: &CheckOptions,
        log: &mut dyn FnMut(&str),
    ) -> Result<CheckReport> {
        let repair = options.repair;
        if repair != Repair::None {
            // A repair writes the image: as any writer, it clears the
            // autoclear bits it does not know first.
            self.clear_unknown_autoclear()?;
        }
        let window = options.max_memory / size_of::<u32>() as u64;
        let mut snapshot_report = CheckReport::default();
        let pending = self.check_read_snapshot_table(repair, log, &mut snapshot_report)?;
        let mut report = self.check_refcounts(repair, log, window)?;
        self.check_fix_snapshot_table(pending, repair, log, &mut snapshot_report)?;
        report.corruptions += snapshot_report.corruptions;
        report.corruptions_fixed += snapshot_report.corruptions_fixed;
        report.check_errors += snapshot_report.check_errors;
        if repair != Repair::None && report.check_errors == 0 && report.corruptions == 0 {
            let bits = self.header.incompatible_features;
            let clean = bits & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
            if clean != bits && self.header.version >= 3 {
                let at = qcow_format::header::field::INCOMPATIBLE_FEATURES;
                self.file
                    .write_at(&clean.to_be_bytes(), at)
                    .map_err(|e| Error::io(&self.name, "writing the header", at, e))?;
                self.file
                    .flush()
                    .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
                self.header.incompatible_features = clean;
            }
        }
        report.total_clusters = self.virtual_size.div_ceil(self.header.cluster_size());
        Ok(report)
    }

    fn file_length(&self) -> Result<u64> {
        self.file
            .len()
            .map_err(|e| Error::io(&self.name, "sizing the file", 0, e))
    }

    fn refcount_max(&self) -> u64 {
        let order = self.header.refcount_order;
        let width_max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        width_max.min(u64::from(u32::MAX))
    }

    /// The clusters the check counts: the file's, refused past QEMU's
    /// bound.
    fn clusters_to_check(&self) -> Result<u64> {
        let clusters = self.file_length()?.div_ceil(self.header.cluster_size());
        if clusters > MAX_CLUSTERS {
            // As QEMU: files of more than 2^31 - 1 clusters are not checked.
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: format!(
                    "checking a file of more than {MAX_CLUSTERS} clusters (File too large)"
                ),
            });
        }
        Ok(clusters)
    }

    /// Fills the in-memory refcount table of one window of clusters: every
    /// reference, then the refcount blocks (QEMU's `calculate_refcounts`).
    /// Returns it and whether the refcount structure must be rebuilt.
    fn calculate<'a>(
        &self,
        pass: Pass,
        log: &'a mut dyn FnMut(&str),
        report: CheckReport,
    ) -> Result<(Counter<'a>, bool)> {
        let cs = self.header.cluster_size();
        let file_len = self.file_length()?;
        let mut counts = Vec::new();
        // Fallible: a refusal, never an abort.
        let window_len = pass
            .window
            .min(file_len.div_ceil(cs).saturating_sub(pass.base));
        counts
            .try_reserve_exact(window_len as usize)
            .map_err(|_| Error::Unsupported {
                image: self.name.clone(),
                what: format!("checking {window_len} clusters at once (out of memory)"),
            })?;
        let mut counter = Counter {
            counts,
            base: pass.base,
            window: pass.window,
            reporting: pass.reporting,
            cluster_bits: self.header.cluster_bits,
            file_len,
            max: self.refcount_max(),
            report,
            repair: pass.repair,
            next_contiguous: 0,
            log,
        };
        let repair = pass.repair;
        let reported = pass.reporting == Reporting::All;
        self.walk_references(&mut counter)?;
        let mut rebuild = false;
        let reftable = self.stored_reftable()?;
        for (i, &entry) in reftable.iter().enumerate() {
            let offset = entry & !0x1ff;
            if entry & 0x1ff != 0 {
                if reported {
                    (counter.log)(&format!(
                        "ERROR refcount table entry {i} has reserved bits set"
                    ));
                    counter.report.corruptions += 1;
                }
                rebuild = true;
                continue;
            }
            if offset % cs != 0 {
                if reported {
                    (counter.log)(&format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                    ));
                    counter.report.corruptions += 1;
                }
                rebuild = true;
                continue;
            }
            let cluster = offset >> self.header.cluster_bits;
            if cluster >= counter.file_len.div_ceil(cs) {
                if !reported {
                    // Reported (and the file grown over it) by the first
                    // window.
                    continue;
                }
                counter.report.corruptions += 1;
                let verb = if repair.errors() {
                    "Repairing"
                } else {
                    "ERROR"
                };
                (counter.log)(&format!("{verb} refcount block {i} is outside image"));
                if repair.errors() {
                    // Grow the file over the block (it reads as zeros).
                    let grown = offset.checked_add(cs).ok_or_else(|| Error::Corrupt {
                        image: self.name.clone(),
                        table: "refcount table",
                        offset: self.header.refcount_table_offset,
                        reason: format!("refcount block offset {offset:#x} overflows"),
                    });
                    let grown = grown.and_then(|end| {
                        if end > qcow_format::limits::MAX_HOST_OFFSET
                            || end >> self.header.cluster_bits > MAX_CLUSTERS
                        {
                            return Err(Error::NoSpace {
                                image: self.name.clone(),
                                what: "the image file",
                                limit: qcow_format::limits::MAX_HOST_OFFSET,
                            });
                        }
                        self.file
                            .set_len(end)
                            .map_err(|e| Error::io(&self.name, "growing the file", end, e))
                    });
                    match grown {
                        Ok(()) => {
                            counter.file_len = offset + cs;
                            counter.report.corruptions -= 1;
                            counter.report.corruptions_fixed += 1;
                            counter.add(offset, cs, 1);
                        }
                        Err(e) => {
                            rebuild = true;
                            (counter.log)(&format!("ERROR could not resize image: {e}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                counter.add(offset, cs, 1);
                let in_window = cluster >= pass.base && cluster - pass.base < pass.window;
                let count = counter.count(cluster);
                if in_window && count != 1 {
                    if pass.reporting != Reporting::Nothing {
                        (counter.log)(&format!("ERROR refcount block {i} refcount={count}"));
                        counter.report.corruptions += 1;
                    }
                    rebuild = true;
                }
            }
        }
        Ok((counter, rebuild))
    }

    /// The stored refcount of cluster number `cluster`.
    fn stored_refcount(&self, stored: &mut Stored, cluster: u64) -> Result<u64> {
        let shift = self.header.cluster_bits + 3 - self.header.refcount_order;
        let index = cluster >> shift;
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| stored.reftable.get(i))
            .copied()
            .unwrap_or(0);
        // As QEMU: reserved bits are ignored here (check reports them).
        let offset = entry & !0x1ff;
        if offset == 0 {
            return Ok(0);
        }
        if offset % self.header.cluster_size() != 0 {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "refcount table",
                offset: self.header.refcount_table_offset,
                reason: format!("refcount block offset {entry:#x} is invalid"),
            });
        }
        if stored.block_offset != offset {
            self.write_back(stored)?;
            stored.block.resize(self.header.cluster_size() as usize, 0);
            self.file
                .read_at(&mut stored.block, offset)
                .map_err(|e| Error::io(&self.name, "reading a refcount block", offset, e))?;
            stored.block_offset = offset;
        }
        let within = cluster & ((1 << shift) - 1);
        refcount_get(&stored.block, within, self.header.refcount_order).ok_or_else(|| {
            Error::Corrupt {
                image: self.name.clone(),
                table: "refcount block",
                offset,
                reason: "index out of range".into(),
            }
        })
    }

    /// Writes the refcount block in `stored` back when it was changed.
    fn write_back(&self, stored: &mut Stored) -> Result<()> {
        if stored.dirty {
            let offset = stored.block_offset;
            self.file
                .write_at(&stored.block, offset)
                .map_err(|e| Error::io(&self.name, "writing a refcount block", offset, e))?;
            stored.dirty = false;
        }
        Ok(())
    }

    /// Compares every cluster's stored refcount with its references and
    /// repairs what `repair` allows (QEMU's `compare_refcounts`). Returns
    /// the highest cluster in use and whether a rebuild is needed.
    fn compare(&self, counter: &mut Counter<'_>, repair: Repair) -> Result<(u64, bool)> {
        let mut stored = Stored {
            reftable: self.stored_reftable()?,
            block_offset: u64::MAX,
            block: Vec::new(),
            dirty: false,
        };
        let shift = self.header.cluster_bits + 3 - self.header.refcount_order;
        let mut highest = 0;
        let mut rebuild = false;
        let file_clusters = counter.file_len.div_ceil(self.header.cluster_size());
        let end = (counter.base + counter.counts.len() as u64)
            .max(file_clusters.min(counter.base.saturating_add(counter.window)));
        // Clusters whose leak is repaired to nothing: given back to the file
        // system afterwards, as QEMU discards them.
        let mut freed: Vec<u64> = Vec::new();
        for cluster in counter.base..end {
            let on_disk = match self.stored_refcount(&mut stored, cluster) {
                Ok(n) => n,
                Err(e) => {
                    (counter.log)(&format!("Can't get refcount for cluster {cluster}: {e}"));
                    counter.report.check_errors += 1;
                    continue;
                }
            };
            let used = counter.count(cluster);
            if on_disk > 0 || used > 0 {
                highest = cluster;
            }
            if on_disk == used {
                continue;
            }
            let fixable = if on_disk == 0 {
                rebuild = true;
                false
            } else if on_disk > used {
                repair.leaks()
            } else {
                repair.errors()
            };
            let verb = if fixable {
                "Repairing"
            } else if on_disk < used {
                "ERROR"
            } else {
                "Leaked"
            };
            (counter.log)(&format!(
                "{verb} cluster {cluster} refcount={on_disk} reference={used}"
            ));
            if fixable {
                let within = cluster & ((1 << shift) - 1);
                let set = refcount_set(&mut stored.block, within, self.header.refcount_order, used);
                if set.is_some() {
                    stored.dirty = true;
                    if used == 0 {
                        freed.push(cluster);
                    }
                    if on_disk > used {
                        counter.report.leaks_fixed += 1;
                    } else {
                        counter.report.corruptions_fixed += 1;
                    }
                    continue;
                }
            }
            if on_disk < used {
                counter.report.corruptions += 1;
            } else {
                counter.report.leaks += 1;
            }
        }
        self.write_back(&mut stored)?;
        if repair != Repair::None {
            self.file
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
            self.discard_clusters(&freed);
        }
        Ok((highest, rebuild))
    }

    /// Gives the clusters `freed` (in order) back to the file system, in
    /// runs; best effort, as a discard is advice (their refcounts are
    /// already zero on disk).
    fn discard_clusters(&self, freed: &[u64]) {
        let _ =
            super::allocator::discard_cluster_runs(&*self.file, self.header.cluster_bits, freed);
    }

    /// QEMU's `qcow2_check_refcounts`: count, compare, repair or rebuild,
    /// then `OFLAG_COPIED`. Clusters are counted `window` at a time (the
    /// memory bound), the references walked once per window.
    fn check_refcounts(
        &mut self,
        repair: Repair,
        log: &mut dyn FnMut(&str),
        window: u64,
    ) -> Result<CheckReport> {
        let window = window.max(1);
        self.clusters_to_check()?;
        let mut report = CheckReport::default();
        // What the comparisons added, taken back before repairing.
        let mut compared = CheckReport::default();
        let mut highest = 0;
        let mut rebuild = false;
        // The counts, when one window covered the whole file.
        let mut whole = None;
        let mut base = 0;
        loop {
            let pass = Pass {
                base,
                window,
                reporting: if base == 0 {
                    Reporting::All
                } else {
                    Reporting::Overflows
                },
                repair,
            };
            let (mut counter, needs) = self.calculate(pass, &mut *log, report)?;
            rebuild |= needs;
            let before = counter.report.clone();
            let (h, needs) = self.compare(&mut counter, Repair::None)?;
            rebuild |= needs;
            highest = highest.max(h);
            compared.corruptions += counter.report.corruptions - before.corruptions;
            compared.leaks += counter.report.leaks - before.leaks;
            compared.check_errors += counter.report.check_errors - before.check_errors;
            report = std::mem::take(&mut counter.report);
            let end = counter.file_len.div_ceil(self.header.cluster_size());
            base += window;
            if base >= end {
                if pass.base == 0 {
                    whole = Some(std::mem::take(&mut counter.counts));
                }
                break;
            }
        }
        if rebuild && repair.errors() {
            let Some(counts) = whole else {
                log(
                    "ERROR rebuilding the refcount structure needs the whole image counted at once: allow the check more memory",
                );
                return Err(Error::Unsupported {
                    image: self.name.clone(),
                    what: "rebuilding the refcount structure within the check's memory limit"
                        .into(),
                });
            };
            let old = report.clone();
            log("Rebuilding refcount structure");
            self.write_placed_refcounts(counts)?;
            let all = Pass {
                base: 0,
                window: u64::MAX,
                reporting: Reporting::All,
                repair: Repair::None,
            };
            let (mut again, _) = self.calculate(all, &mut *log, CheckReport::default())?;
            // The walk's findings count; the comparison only frees what
            // the rebuild left over (the old structure).
            let walked = again.report.clone();
            let (h, still_broken) = self.compare(&mut again, Repair::Leaks)?;
            if still_broken {
                (again.log)("ERROR rebuilt refcount structure is still broken");
            }
            highest = h;
            let fresh_leaks = again.report.leaks;
            report = old.clone();
            report.corruptions = walked.corruptions;
            report.leaks = 0;
            if report.corruptions < old.corruptions {
                report.corruptions_fixed += old.corruptions - report.corruptions;
            }
            if report.leaks < old.leaks {
                report.leaks_fixed += old.leaks - report.leaks;
            }
            report.leaks += fresh_leaks;
        } else if repair != Repair::None {
            if rebuild {
                log("ERROR need to rebuild refcount structures");
                return Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "refcount structure",
                    offset: self.header.refcount_table_offset,
                    reason: "it must be rebuilt (-r all)".into(),
                });
            }
            if report.leaks > 0 || report.corruptions > 0 {
                report.corruptions -= compared.corruptions;
                report.leaks -= compared.leaks;
                report.check_errors -= compared.check_errors;
                highest = 0;
                let mut base = 0;
                loop {
                    let pass = Pass {
                        base,
                        window,
                        reporting: Reporting::Nothing,
                        repair: Repair::None,
                    };
                    let (mut counter, _) = self.calculate(pass, &mut *log, report)?;
                    let (h, _) = self.compare(&mut counter, repair)?;
                    highest = highest.max(h);
                    report = std::mem::take(&mut counter.report);
                    let end = counter.file_len.div_ceil(self.header.cluster_size());
                    base += window;
                    if base >= end {
                        break;
                    }
                }
            }
        }
        self.check_copied_flags(&mut report, log, repair)?;
        report.image_end_offset = (highest + 1) << self.header.cluster_bits;
        Ok(report)
    }

    /// `OFLAG_COPIED` on every active L1 and L2 entry must say whether the
    /// cluster's stored refcount is one (QEMU's `check_oflag_copied`).
    fn check_copied_flags(
        &mut self,
        report: &mut CheckReport,
        log: &mut dyn FnMut(&str),
        repair: Repair,
    ) -> Result<()> {
        let fix = match repair {
            Repair::All => true,
            Repair::Leaks => {
                let r = &*report;
                r.check_errors == 0 && r.corruptions == 0 && r.leaks == 0
            }
            Repair::None => false,
        };
        let verb = if fix { "Repairing" } else { "ERROR" };
        let mut stored = Stored {
            reftable: self.stored_reftable()?,
            block_offset: u64::MAX,
            block: Vec::new(),
            dirty: false,
        };
        let cs = self.header.cluster_size();
        let l1_offset = self.header.l1_table_offset;
        let l1 = super::read_l1(&self.name, &*self.file, l1_offset, self.header.l1_size)?;
        let data_file = self.header.has_data_file();
        let words = self.geometry.l2_entry_words();
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2 = l1_entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Ok(refcount) = self.stored_refcount(&mut stored, l2 >> self.header.cluster_bits)
            else {
                continue;
            };
            if (refcount == 1) != (l1_entry & OFLAG_COPIED != 0) {
                report.corruptions += 1;
                log(&format!(
                    "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                ));
                if fix {
                    let new = if refcount == 1 {
                        l1_entry | OFLAG_COPIED
                    } else {
                        l1_entry & !OFLAG_COPIED
                    };
                    let at = l1_offset + i as u64 * 8;
                    self.file
                        .write_at(&new.to_be_bytes(), at)
                        .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))?;
                    if let Some(slot) = self.l1.get(i) {
                        slot.store(new, std::sync::atomic::Ordering::Release);
                    }
                    report.corruptions -= 1;
                    report.corruptions_fixed += 1;
                }
            }
            let mut bytes = vec![0u8; cs as usize];
            self.file
                .read_at(&mut bytes, l2)
                .map_err(|e| Error::io(&self.name, "reading an L2 table", l2, e))?;
            let mut table = decode_be_words(&bytes);
            let mut dirty = 0u64;
            for word in table.iter_mut().step_by(words) {
                let entry = *word;
                let offset = entry & OFFSET_MASK;
                let zero_plain = words == 1 && entry & OFLAG_ZERO != 0 && offset == 0;
                let normal = entry & OFLAG_COMPRESSED == 0
                    && !zero_plain
                    && (offset != 0 || (data_file && entry & OFLAG_COPIED != 0));
                if !normal {
                    continue;
                }
                let refcount = if data_file {
                    1
                } else {
                    match self.stored_refcount(&mut stored, offset >> self.header.cluster_bits) {
                        Ok(n) => n,
                        Err(_) => continue,
                    }
                };
                if (refcount == 1) != (entry & OFLAG_COPIED != 0) {
                    report.corruptions += 1;
                    log(&format!(
                        "{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                    ));
                    if fix {
                        *word = if refcount == 1 {
                            entry | OFLAG_COPIED
                        } else {
                            entry & !OFLAG_COPIED
                        };
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                let meta = self.l2_rewrite_overlap(l2, cs, &stored.reftable);
                if let Some((structure, at)) = meta {
                    log(&format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: the {structure} at {at:#x}"
                    ));
                    report.check_errors += 1;
                    return Ok(());
                }
                let out: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                self.file
                    .write_at(&out, l2)
                    .map_err(|e| Error::io(&self.name, "writing an L2 table", l2, e))?;
                self.l2.forget(l2);
                report.corruptions -= dirty;
                report.corruptions_fixed += dirty;
            }
        }
        if fix {
            self.file
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        }
        Ok(())
    }
}
