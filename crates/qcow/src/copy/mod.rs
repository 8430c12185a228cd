//! Copying one disk's contents into another: the engine behind `convert`,
//! `dd`, `commit` and `rebase`, for any [`BlockDevice`] source and target.
//!
//! The source is cut into chunks (page-aligned buffers, [`buffer`]) that
//! worker threads read (decompressing or decrypting as they read), scan
//! for zeros and, for a compressed target, compress ([`plan`]). Where
//! reading is cheap, each worker then writes its chunk in its turn, in
//! guest order ([`turns`]), so that the target allocates its clusters in
//! the disk's order as qemu-img lays them out; where reading or writing
//! works the processor, chunks are handed to one thread that writes them
//! in order, or reserves their space in order for a pool of writers that
//! encrypt ([`pace`] says how many workers read, [`window`] how far ahead
//! of the writing they may go); with
//! [`CopyOptions::in_order`] off (qemu-img's `-W`), each worker writes its
//! own chunks whenever it has them ([`run`]).
//!
//! ```
//! use std::sync::Arc;
//! use qcow::copy::{copy, CopyOptions};
//! use qcow::{BlockDevice, CreateOptions, Qcow2Image, RawImage};
//! use qcow_io::MemStorage;
//!
//! // A 1 MiB raw disk with data in its second half.
//! let mut bytes = vec![0u8; 1 << 20];
//! bytes[1 << 19..].fill(7);
//! let source = RawImage::open("disk.raw", Arc::new(MemStorage::from_bytes(bytes)))?;
//!
//! // A new qcow2 image of the same size.
//! let file = Arc::new(MemStorage::new());
//! Qcow2Image::create(&*file, &CreateOptions::new(1 << 20))?;
//! let target = Qcow2Image::open_writable("disk.qcow2", file, None)?;
//!
//! let options = CopyOptions::default().target_is_zero(true);
//! let stats = copy(&source, &target, &options, &())?;
//! assert_eq!(stats.bytes_written, 1 << 19);
//! let mut back = vec![0u8; 1 << 20];
//! target.read_at(&mut back, 0)?;
//! assert!(back[..1 << 19].iter().all(|&b| b == 0) && back[1 << 19..].iter().all(|&b| b == 7));
//! # Ok::<(), qcow::Error>(())
//! ```

mod buffer;
mod concat;
mod pace;
mod plan;
mod run;
mod sparse;
mod turns;
mod window;

pub use concat::Concat;
pub use plan::is_zero;

use crate::device::BlockDevice;
use crate::{Error, Result};

/// Bytes each worker copies at a time by default (rounded up to whole
/// clusters of the target): qemu-img's unit, so that a target allocates in
/// runs as it does under qemu-img (where a 4 KiB-cluster image's refcount
/// blocks fall), and small enough that the chunks in flight stay in the
/// processor's cache between the read that fills them and the write that
/// empties them (with 4 MiB chunks a raw -> qcow2 copy took longer).
pub const DEFAULT_CHUNK: u64 = 2 << 20;

/// How [`copy`] copies. Build it from [`CopyOptions::default`] with the
/// setters; fields may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyOptions {
    /// Worker threads reading (and compressing); at least one. A target
    /// whose writes encrypt also gets as many writing threads.
    pub workers: usize,
    /// Smallest run of zero bytes left unwritten (qemu-img's `-S`, 4 KiB by
    /// default). A target with clusters looks for whole zero clusters
    /// instead. 0 writes everything, unallocated ranges too, so that the
    /// target allocates the whole disk.
    pub min_zero_run: u64,
    /// Store clusters compressed (the target must support it).
    pub compress: bool,
    /// Which layers of the source's backing chain are copied.
    pub layers: Layers,
    /// The target reads as zeros everywhere before the copy (a new image):
    /// zero ranges need not be written. When false, they are zeroed.
    pub target_is_zero: bool,
    /// Keep going past unreadable ranges of the source: they are read
    /// again 512 bytes at a time, and what cannot be read is written as
    /// zeros and reported to [`CopyObserver::salvaged`] (qemu-img's
    /// `--salvage`).
    pub salvage: bool,
    /// Write the target in guest order (the default), so that it allocates
    /// its clusters in the disk's order; false lets every worker write its
    /// own chunks (qemu-img's `-W`).
    pub in_order: bool,
    /// Where in the source the copy starts.
    pub source_offset: u64,
    /// Bytes to copy (`None`: to the end of the source), written from
    /// offset 0 of the target.
    pub length: Option<u64>,
    /// Bytes a worker copies at a time (rounded up to whole clusters of the
    /// target).
    pub chunk_size: u64,
    /// What [`CopyObserver::progress`] counts.
    pub progress_basis: ProgressBasis,
}

/// What a copy's progress counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressBasis {
    /// Every byte of the range copied, reported after each chunk.
    #[default]
    Range,
    /// Only the bytes read from the source as data (with
    /// [`CopyOptions::min_zero_run`] 0, zero ranges too, since they are
    /// written): what qemu-img's convert counts, so that a sparse disk's
    /// progress moves with the work. The total is found before the copy
    /// starts, from the source's block status. Progress is reported in
    /// guest order, in steps of at most [`PROGRESS_STEP`] bytes (one
    /// cluster for a compressed target) from the start of each run, as
    /// qemu-img reports it.
    Data,
}

/// The largest step of [`ProgressBasis::Data`] progress (qemu-img's
/// convert reads at most this much at a time).
pub const PROGRESS_STEP: u64 = 2 << 20;

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(16)),
            min_zero_run: 4096,
            compress: false,
            layers: Layers::All,
            target_is_zero: false,
            salvage: false,
            in_order: true,
            source_offset: 0,
            length: None,
            chunk_size: DEFAULT_CHUNK,
            progress_basis: ProgressBasis::Range,
        }
    }
}

impl CopyOptions {
    /// Sets [`CopyOptions::workers`].
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Sets [`CopyOptions::min_zero_run`].
    pub fn min_zero_run(mut self, bytes: u64) -> Self {
        self.min_zero_run = bytes;
        self
    }

    /// Sets [`CopyOptions::compress`].
    pub fn compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Sets [`CopyOptions::layers`].
    pub fn layers(mut self, layers: Layers) -> Self {
        self.layers = layers;
        self
    }

    /// Sets [`CopyOptions::target_is_zero`].
    pub fn target_is_zero(mut self, on: bool) -> Self {
        self.target_is_zero = on;
        self
    }

    /// Sets [`CopyOptions::salvage`].
    pub fn salvage(mut self, on: bool) -> Self {
        self.salvage = on;
        self
    }

    /// Sets [`CopyOptions::in_order`].
    pub fn in_order(mut self, on: bool) -> Self {
        self.in_order = on;
        self
    }

    /// Copies `length` bytes from `source_offset` (see the fields).
    pub fn range(mut self, source_offset: u64, length: Option<u64>) -> Self {
        self.source_offset = source_offset;
        self.length = length;
        self
    }

    /// Sets [`CopyOptions::chunk_size`].
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// Sets [`CopyOptions::progress_basis`].
    pub fn progress_basis(mut self, basis: ProgressBasis) -> Self {
        self.progress_basis = basis;
        self
    }
}

/// Which layers of the source's backing chain a copy takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// The whole disk as the source shows it.
    All,
    /// Only what the source's `n` top layers hold (0 is the source image
    /// itself, so `Top(1)` is its own clusters): for a target whose backing
    /// file holds the rest (`convert -B`), or the base of a `commit`.
    /// Ranges those layers leave to lower ones are not written; ranges they
    /// zero are zeroed in the target.
    Top(u32),
    /// Only what the source's top layer leaves to its backing chain (what
    /// `rebase` may have to keep).
    BelowTop,
}

/// Hears how a copy goes, and may cancel it. Every method has a default
/// that does nothing; `()` is the observer that wants nothing.
pub trait CopyObserver: Sync {
    /// `done` of `total` bytes are copied (called after each chunk, from
    /// any thread, with `done` growing; what counts is
    /// [`CopyOptions::progress_basis`]).
    fn progress(&self, done: u64, total: u64) {
        let _ = (done, total);
    }

    /// `len` bytes of the source at `offset` could not be read (`error`)
    /// and were written as zeros ([`CopyOptions::salvage`]).
    fn salvaged(&self, offset: u64, len: u64, error: &Error) {
        let _ = (offset, len, error);
    }

    /// Whether to stop: checked before each chunk; a cancelled copy
    /// returns [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

impl CopyObserver for () {}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyStats {
    /// Bytes of data written to the target (compressed clusters counted
    /// at their guest size).
    pub bytes_written: u64,
    /// Bytes zeroed in the target.
    pub bytes_zeroed: u64,
    /// Bytes of the source that could not be read and were written as
    /// zeros.
    pub bytes_salvaged: u64,
}

/// Copies `source` into `target` as `options` say, telling `observer` how
/// it goes. The target must be writable and large enough for the range
/// copied. On error the target holds part of the copy.
pub fn copy(
    source: &dyn BlockDevice,
    target: &dyn BlockDevice,
    options: &CopyOptions,
    observer: &dyn CopyObserver,
) -> Result<CopyStats> {
    start(source, target, None, options, observer)
}

/// Copies what `source` holds where it differs from `baseline` (which
/// reads as zeros past its end): the rest is left alone, for a target that
/// reads as `baseline` there. This is how `rebase` keeps the guest's view:
/// source and target are the image, the baseline its new backing file,
/// and [`Layers::BelowTop`] limits the copy to what the image leaves to its
/// backing chain. Differences are written as whole clusters of the target.
pub fn copy_differences(
    source: &dyn BlockDevice,
    target: &dyn BlockDevice,
    baseline: &dyn BlockDevice,
    options: &CopyOptions,
    observer: &dyn CopyObserver,
) -> Result<CopyStats> {
    start(source, target, Some(baseline), options, observer)
}

fn start(
    source: &dyn BlockDevice,
    target: &dyn BlockDevice,
    baseline: Option<&dyn BlockDevice>,
    options: &CopyOptions,
    observer: &dyn CopyObserver,
) -> Result<CopyStats> {
    let source_size = source.virtual_size();
    let start = options.source_offset;
    if start > source_size {
        return Err(Error::OutOfRange {
            image: source.name().to_owned(),
            offset: start,
            len: 0,
            size: source_size,
        });
    }
    let len = options.length.unwrap_or(source_size - start);
    if len > source_size - start {
        return Err(Error::OutOfRange {
            image: source.name().to_owned(),
            offset: start,
            len,
            size: source_size,
        });
    }
    let compressor = if options.compress {
        Some(target.compressed_writes().ok_or_else(|| {
            Error::InvalidOptions(format!(
                "{}: the image format does not store compressed clusters",
                target.name()
            ))
        })?)
    } else {
        None
    };
    let cluster = target.cluster_size().unwrap_or(0);
    let subcluster = target.subcluster_size().unwrap_or(cluster);
    let chunk = match cluster {
        0 => options.chunk_size.max(512),
        c => options.chunk_size.max(c).next_multiple_of(c),
    };
    let planner = plan::Planner {
        source,
        source_offset: start,
        compressor,
        cluster,
        subcluster,
        min_zero_run: options.min_zero_run,
        layers: options.layers,
        target_is_zero: options.target_is_zero,
        salvage: options.salvage,
        baseline,
        observer,
    };
    let mut job = run::Job {
        planner,
        target,
        len,
        total: len,
        basis: options.progress_basis,
        // qemu-img compresses a cluster at a time.
        step: match (options.compress, cluster) {
            (true, c) if c > 0 => c,
            _ => PROGRESS_STEP,
        },
        chunk,
        workers: options.workers.max(1),
        observer,
    };
    if options.progress_basis == ProgressBasis::Data {
        job.total = job.data_total()?;
    }
    // In order also into a target without clusters of its own: an NBD
    // export's server may allocate in the order writes come.
    if options.in_order {
        job.run_in_order()
    } else {
        job.run_unordered()
    }
}
