//! What is served: an [`Export`] (a [`BlockDevice`] with a name and the
//! features it offers) and its metadata contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`), with the block
//! status each reports.

use std::sync::Arc;

use qcow::{Allocation, BlockDevice};

use crate::protocol::{STATE_DIRTY, STATE_HOLE, STATE_ZERO, flag};

/// Longest block status descriptor: 32 bits, kept a multiple of 2 MiB so
/// that descriptors stay aligned to any cluster size.
const MAX_DESCRIPTOR: u32 = u32::MAX - ((1 << 21) - 1);

/// A disk served under a name.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Export {
    /// The name clients ask for (qemu-nbd's `-x`; empty by default).
    pub name: String,
    /// The description NBD_OPT_LIST and INFO give (qemu-nbd's `-D`).
    pub description: String,
    /// The disk.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes (qemu-nbd's `-r`).
    pub read_only: bool,
    /// Pass discards on to the image (qemu-nbd's `--discard=unmap`);
    /// otherwise TRIM succeeds and changes nothing.
    pub discard: bool,
    /// A dirty bitmap to export as `qemu:dirty-bitmap:NAME` (qemu-nbd's
    /// `-B`): its name and where its dirty ranges come from.
    pub bitmap: Option<(String, DirtyRanges)>,
    /// Export `qemu:allocation-depth` (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Turn writes of zeros into zero writes (qemu-nbd's `--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
    /// Advertise that several connections see one consistent disk (a
    /// flush on one makes every acknowledged write durable, as it does
    /// here, where every connection shares one device). qemu-nbd
    /// advertises it when it serves more than one client at once.
    pub multi_conn: bool,
}

impl Export {
    /// An export of `device` named `name`, writable unless the device is
    /// not, with no bitmap or allocation depth.
    pub fn new(name: &str, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.to_owned(),
            description: String::new(),
            read_only: !device.is_writable(),
            device,
            discard: false,
            bitmap: None,
            allocation_depth: false,
            detect_zeroes: DetectZeroes::Off,
            multi_conn: false,
        }
    }

    /// Sets [`Export::description`].
    pub fn description(mut self, description: &str) -> Self {
        self.description = description.to_owned();
        self
    }

    /// Sets [`Export::read_only`] (a device that cannot be written stays
    /// read-only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only || !self.device.is_writable();
        self
    }

    /// Sets [`Export::discard`].
    pub fn discard(mut self, discard: bool) -> Self {
        self.discard = discard;
        self
    }

    /// Sets [`Export::bitmap`].
    pub fn bitmap(mut self, name: &str, dirty: DirtyRanges) -> Self {
        self.bitmap = Some((name.to_owned(), dirty));
        self
    }

    /// Sets [`Export::multi_conn`].
    pub fn multi_conn(mut self, on: bool) -> Self {
        self.multi_conn = on;
        self
    }

    /// Sets [`Export::detect_zeroes`].
    pub fn detect_zeroes(mut self, mode: DetectZeroes) -> Self {
        self.detect_zeroes = mode;
        self
    }

    /// Sets [`Export::allocation_depth`].
    pub fn allocation_depth(mut self, on: bool) -> Self {
        self.allocation_depth = on;
        self
    }

    /// The transmission flags of this export, for a client that has
    /// negotiated extended headers or not.
    pub fn transmission_flags(&self, extended: bool) -> u16 {
        // As qemu-nbd: FUA (a no-op on a read-only export) always.
        let mut flags =
            flag::HAS_FLAGS | flag::SEND_FLUSH | flag::SEND_FUA | flag::SEND_DF | flag::SEND_CACHE;
        if self.read_only {
            flags |= flag::READ_ONLY;
        } else {
            flags |= flag::SEND_TRIM | flag::SEND_WRITE_ZEROES | flag::SEND_FAST_ZERO;
        }
        if self.multi_conn {
            flags |= flag::CAN_MULTI_CONN;
        }
        if extended {
            flags |= flag::BLOCK_STAT_PAYLOAD;
        }
        flags
    }

    /// Every metadata context this export offers, in qemu-nbd's order.
    pub fn contexts(&self) -> Vec<Context> {
        let mut out = vec![Context::Allocation];
        if self.allocation_depth {
            out.push(Context::AllocationDepth);
        }
        if let Some((name, _)) = &self.bitmap {
            out.push(Context::DirtyBitmap(name.clone()));
        }
        out
    }

    /// The contexts a LIST query names: an exact name, or every context of
    /// a namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`).
    pub fn query(&self, query: &str) -> Vec<Context> {
        self.contexts()
            .into_iter()
            .filter(|c| {
                let name = c.name();
                name == query || (query.ends_with(':') && name.starts_with(query))
            })
            .collect()
    }

    /// Block status of `context` from `offset` for at most `len` bytes:
    /// descriptors `(length, flags)`, at least one, at most `max` of them.
    pub fn status(
        &self,
        context: &Context,
        offset: u64,
        len: u64,
        max: usize,
    ) -> qcow::Result<Vec<(u32, u32)>> {
        let end = offset.saturating_add(len).min(self.device.virtual_size());
        // The bitmap's ranges over the request, fetched once.
        let mut dirty: Option<Vec<(u64, u64)>> = None;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max {
            let want = (end - at).min(u64::from(MAX_DESCRIPTOR));
            let (run, flags) = match context {
                Context::Allocation | Context::AllocationDepth => {
                    let extent = self.device.block_status(at, want)?;
                    let flags = if *context == Context::Allocation {
                        allocation_flags(&extent.allocation)
                    } else {
                        allocation_depth(&extent.allocation)
                    };
                    (extent.len.clamp(1, want), flags)
                }
                Context::DirtyBitmap(_) => match self.bitmap.as_ref().map(|(_, s)| s) {
                    Some(DirtyRanges::Fixed(ranges)) => dirty_run(ranges, at, want),
                    Some(DirtyRanges::Live(read)) => {
                        if dirty.is_none() {
                            dirty = Some(read(offset, end - offset)?);
                        }
                        dirty_run(dirty.as_deref().unwrap_or(&[]), at, want)
                    }
                    None => (want, 0),
                },
            };
            // Each run is under 4 GiB; merged runs stay under it too.
            match out.last_mut() {
                Some((l, f)) if *f == flags && u64::from(*l) + run <= u64::from(MAX_DESCRIPTOR) => {
                    *l += run as u32;
                }
                _ => out.push((run as u32, flags)),
            }
            at += run;
        }
        Ok(out)
    }
}

/// The run of `ranges` (sorted dirty ranges) from `at`, at most `want`
/// bytes: its length and whether it is dirty.
fn dirty_run(ranges: &[(u64, u64)], at: u64, want: u64) -> (u64, u32) {
    // The first range ending after `at`.
    let i = ranges.partition_point(|&(s, l)| s + l <= at);
    match ranges.get(i) {
        Some(&(s, l)) if s <= at => ((s + l - at).min(want), STATE_DIRTY),
        Some(&(s, _)) => ((s - at).min(want), 0),
        None => (want, 0),
    }
}

/// Reads a bitmap's dirty ranges over `(offset, len)`.
pub type ReadDirty = dyn Fn(u64, u64) -> qcow::Result<Vec<(u64, u64)>> + Send + Sync;

/// Where an exported bitmap's dirty ranges (`(offset, len)`, sorted) come
/// from.
#[derive(Clone)]
pub enum DirtyRanges {
    /// Ranges read once (a read-only export, or a disabled bitmap).
    Fixed(Vec<(u64, u64)>),
    /// Ranges read for each query over `(offset, len)`: a bitmap that
    /// records the export's own writes.
    Live(Arc<ReadDirty>),
}

impl std::fmt::Debug for DirtyRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyRanges::Fixed(r) => f.debug_tuple("Fixed").field(&r.len()).finish(),
            DirtyRanges::Live(_) => f.write_str("Live"),
        }
    }
}

/// What writes of zeros become (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Written as they come.
    Off,
    /// Written as zero writes that keep the space.
    On,
    /// Written as zero writes that may release the space (with discards
    /// passed on).
    Unmap,
}

/// `base:allocation` flags of an extent.
fn allocation_flags(allocation: &Allocation) -> u32 {
    match allocation {
        Allocation::Data { zero: false, .. } => 0,
        Allocation::Data { zero: true, .. } => STATE_ZERO,
        Allocation::Zero { .. } | Allocation::Unallocated { .. } => STATE_HOLE | STATE_ZERO,
        Allocation::Unknown { .. } => STATE_HOLE,
    }
}

/// `qemu:allocation-depth` of an extent: 0 unallocated, else the layer
/// holding it counted from 1 (the image itself).
fn allocation_depth(allocation: &Allocation) -> u32 {
    match allocation {
        Allocation::Data { depth, .. } | Allocation::Zero { depth, .. } => depth + 1,
        Allocation::Unallocated { .. } | Allocation::Unknown { .. } => 0,
    }
}

/// A metadata context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: holes and zeros.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: dirty ranges of the exported bitmap.
    DirtyBitmap(String),
    /// `qemu:allocation-depth`: which layer of the chain holds each range.
    AllocationDepth,
}

impl Context {
    /// Its name on the wire.
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => "base:allocation".into(),
            Context::DirtyBitmap(name) => format!("qemu:dirty-bitmap:{name}"),
            Context::AllocationDepth => "qemu:allocation-depth".into(),
        }
    }

    /// Its ID on the wire (fixed per kind).
    pub fn id(&self) -> u32 {
        match self {
            Context::Allocation => 0,
            Context::DirtyBitmap(_) => 1,
            Context::AllocationDepth => 2,
        }
    }
}
