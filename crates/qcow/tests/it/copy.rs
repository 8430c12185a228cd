//! The library's copy engine (`qcow::copy`) as an embedder calls it: in
//! memory, in order and out of order, with progress, cancellation, salvage
//! of unreadable ranges, sub-ranges, compressed targets, and targets that
//! hold data before the copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qcow::copy::{CopyObserver, CopyOptions, Layers, ProgressBasis, copy};
use qcow::{BlockDevice, CreateOptions, Error, Extent, ImageFormat, Qcow2Image, RawImage};
use qcow_io::MemStorage;

use crate::common::{Rng, read_all};

const SIZE: u64 = 12 << 20;

/// A raw disk with pseudo-random data in a few runs and zeros elsewhere.
fn source() -> (RawImage, Vec<u8>) {
    let mut bytes = vec![0u8; SIZE as usize];
    let mut rng = Rng::new(7);
    for (start, len) in [(0usize, 100_000usize), (3 << 20, 5 << 20), (11 << 20, 4096)] {
        rng.fill(&mut bytes[start..start + len]);
    }
    let disk = RawImage::open(
        "source.raw",
        Arc::new(MemStorage::from_bytes(bytes.clone())),
    )
    .expect("raw");
    (disk, bytes)
}

fn qcow2_target(size: u64, cluster_size: u64) -> Qcow2Image {
    let file = Arc::new(MemStorage::new());
    let mut options = CreateOptions::new(size);
    options.cluster_size = cluster_size;
    Qcow2Image::create(&*file, &options).expect("create");
    Qcow2Image::open_writable("target.qcow2", file, None).expect("open")
}

#[test]
fn copies_read_back_in_order_and_out_of_order() {
    let (source, bytes) = source();
    for in_order in [true, false] {
        for workers in [1, 3] {
            let target = qcow2_target(SIZE, 65536);
            let options = CopyOptions::default()
                .workers(workers)
                .in_order(in_order)
                .target_is_zero(true)
                .chunk_size(1 << 20);
            // Plain images: one worker reads (the rest wait), one writes.
            assert!(!source.reads_use_cpu() && !target.writes_use_cpu());
            let stats = copy(&source, &target, &options, &()).expect("copy");
            assert!(read_all(&target, 1 << 20) == bytes, "{in_order} {workers}");
            // Whole clusters around the data, nothing else.
            assert!(stats.bytes_written >= 100_000 + (5 << 20) + 4096);
            assert!(stats.bytes_written <= 2 * 65536 + (5 << 20) + 65536);
            assert_eq!(stats.bytes_zeroed, 0);
        }
    }
}

/// Counts progress, and cancels after `cancel_after` reports.
struct Watcher {
    reports: Mutex<Vec<(u64, u64)>>,
    cancel_after: usize,
}

impl CopyObserver for Watcher {
    fn progress(&self, done: u64, total: u64) {
        self.reports.lock().expect("lock").push((done, total));
    }
    fn cancelled(&self) -> bool {
        self.reports.lock().expect("lock").len() >= self.cancel_after
    }
}

#[test]
fn progress_grows_to_the_total_and_a_cancelled_copy_stops() {
    let (source, _) = source();
    let target = qcow2_target(SIZE, 65536);
    let watcher = Watcher {
        reports: Mutex::new(Vec::new()),
        cancel_after: usize::MAX,
    };
    let options = CopyOptions::default()
        .chunk_size(1 << 20)
        .target_is_zero(true);
    copy(&source, &target, &options, &watcher).expect("copy");
    let reports = watcher.reports.into_inner().expect("lock");
    assert_eq!(reports.len(), 12);
    assert!(reports.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(reports.last(), Some(&(SIZE, SIZE)));

    for in_order in [true, false] {
        let target = qcow2_target(SIZE, 65536);
        let watcher = Watcher {
            reports: Mutex::new(Vec::new()),
            cancel_after: 2,
        };
        let options = CopyOptions::default()
            .chunk_size(1 << 20)
            .workers(1)
            .in_order(in_order);
        let result = copy(&source, &target, &options, &watcher);
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        assert!(watcher.reports.lock().expect("lock").len() < 12);
    }
}

/// `ProgressBasis::Data` counts only the runs read as data, reported in
/// guest order in steps of at most 2 MiB from each run's start (as
/// qemu-img's convert counts them), whatever order the chunks are written
/// in.
#[test]
fn data_progress_counts_allocated_runs_in_guest_order() {
    let (raw, bytes) = source();
    let sparse = qcow2_target(SIZE, 65536);
    copy(
        &raw,
        &sparse,
        &CopyOptions::default().target_is_zero(true),
        &(),
    )
    .expect("copy");
    let mib = 1u64 << 20;
    // Clusters 0-1, 3 MiB..8 MiB, and the cluster at 11 MiB.
    let total = 2 * 65536 + 5 * mib + 65536;
    let expected: Vec<(u64, u64)> = [
        131072,
        131072 + 2 * mib,
        131072 + 4 * mib,
        131072 + 5 * mib,
        total,
    ]
    .into_iter()
    .map(|done| (done, total))
    .collect();
    for (in_order, workers) in [(true, 1), (true, 3), (false, 3)] {
        let target = qcow2_target(SIZE, 65536);
        let watcher = Watcher {
            reports: Mutex::new(Vec::new()),
            cancel_after: usize::MAX,
        };
        let options = CopyOptions::default()
            .chunk_size(1 << 20)
            .workers(workers)
            .in_order(in_order)
            .target_is_zero(true)
            .progress_basis(ProgressBasis::Data);
        copy(&sparse, &target, &options, &watcher).expect("copy");
        assert_eq!(
            watcher.reports.into_inner().expect("lock"),
            expected,
            "in order {in_order}, {workers} workers"
        );
        assert!(read_all(&target, 1 << 20) == bytes);
    }
}

/// A disk whose reads fail in one range.
#[derive(Debug)]
struct Failing {
    inner: RawImage,
    bad: std::ops::Range<u64>,
}

impl BlockDevice for Failing {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && end > self.bad.start {
            return Err(Error::Io {
                image: "failing".into(),
                op: "reading data",
                offset,
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.read_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> qcow::Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn name(&self) -> &str {
        "failing"
    }
}

/// Hears what was salvaged.
#[derive(Default)]
struct Salvage(AtomicU64, Mutex<Vec<u64>>);

impl CopyObserver for Salvage {
    fn salvaged(&self, offset: u64, len: u64, _error: &Error) {
        self.0.fetch_add(len, Ordering::Relaxed);
        self.1.lock().expect("lock").push(offset);
    }
}

#[test]
fn salvage_writes_zeros_for_what_cannot_be_read_and_says_where() {
    let (inner, mut bytes) = source();
    let bad = (4 << 20) + 1000..(4 << 20) + 3000;
    let source = Failing {
        inner,
        bad: bad.clone(),
    };
    let strict = CopyOptions::default().target_is_zero(true);
    for workers in [1, 2, 4] {
        let target = qcow2_target(SIZE, 65536);
        let options = strict.clone().workers(workers).chunk_size(1 << 20);
        assert!(copy(&source, &target, &options, &()).is_err());
        // In order, the copy stops as a sequential one would: every chunk
        // before the failing one (4 MiB..5 MiB) is written, none after it.
        let back = read_all(&target, 1 << 20);
        assert!(back[..4 << 20] == bytes[..4 << 20], "{workers} workers");
        assert!(back[4 << 20..].iter().all(|&b| b == 0), "{workers} workers");
    }

    let target = qcow2_target(SIZE, 65536);
    let observer = Salvage::default();
    let options = strict.salvage(true);
    let stats = copy(&source, &target, &options, &observer).expect("salvaging copy");
    // The sectors holding the bad bytes: 512-byte units from 4 MiB + 512.
    let (first, last) = (bad.start / 512 * 512, bad.end.div_ceil(512) * 512);
    assert_eq!(stats.bytes_salvaged, last - first);
    assert_eq!(observer.0.load(Ordering::Relaxed), last - first);
    assert_eq!(observer.1.lock().expect("lock")[0], first);
    bytes[first as usize..last as usize].fill(0);
    assert!(read_all(&target, 1 << 20) == bytes);
}

#[test]
fn ranges_compressed_targets_and_targets_holding_data() {
    let (source, bytes) = source();
    // A sub-range lands at the target's start.
    let target = qcow2_target(6 << 20, 65536);
    let options = CopyOptions::default()
        .range(3 << 20, Some(6 << 20))
        .target_is_zero(true);
    copy(&source, &target, &options, &()).expect("range");
    assert!(read_all(&target, 1 << 20) == bytes[3 << 20..9 << 20]);
    // Past the source's end is refused.
    let options = CopyOptions::default().range(8 << 20, Some(6 << 20));
    assert!(matches!(
        copy(&source, &target, &options, &()),
        Err(Error::OutOfRange { .. })
    ));

    // Compressed: every data cluster stored compressed where it shrinks.
    let mut compressible = bytes.clone();
    compressible[3 << 20..8 << 20]
        .iter_mut()
        .for_each(|b| *b &= 0x3);
    let source2 = RawImage::open(
        "c.raw",
        Arc::new(MemStorage::from_bytes(compressible.clone())),
    )
    .expect("raw");
    let target = qcow2_target(SIZE, 65536);
    let options = CopyOptions::default().compress(true).target_is_zero(true);
    copy(&source2, &target, &options, &()).expect("compressed");
    assert!(read_all(&target, 1 << 20) == compressible);
    let extent = target.block_status(4 << 20, 65536).expect("status");
    assert!(
        matches!(
            extent.allocation,
            qcow::Allocation::Data {
                compressed: true,
                ..
            }
        ),
        "{extent:?}"
    );
    // A raw target cannot store compressed clusters.
    let raw = RawImage::open(
        "t.raw",
        Arc::new(MemStorage::from_bytes(vec![0; SIZE as usize])),
    )
    .expect("raw");
    assert!(matches!(
        copy(&source, &raw, &options, &()),
        Err(Error::InvalidOptions(_))
    ));

    // A target full of other data reads as the source afterwards: the
    // source's zeros are written too.
    let target = qcow2_target(SIZE, 65536);
    target
        .write_at(&vec![0xee; SIZE as usize], 0)
        .expect("fill");
    let options = CopyOptions::default();
    let stats = copy(&source, &target, &options, &()).expect("copy");
    assert!(stats.bytes_zeroed > 0);
    assert!(read_all(&target, 1 << 20) == bytes);
    // Layers::Top(1) of a disk without backing is the whole disk.
    let target = qcow2_target(SIZE, 65536);
    let options = CopyOptions::default()
        .layers(Layers::Top(1))
        .target_is_zero(true);
    copy(&source, &target, &options, &()).expect("top");
    assert!(read_all(&target, 1 << 20) == bytes);
}

/// A raw disk whose writes say they use the processor (as an encrypting
/// target's do), so that a copy writes it from a pool of writers.
#[derive(Debug)]
struct Encrypting(RawImage);

impl BlockDevice for Encrypting {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> qcow::Result<Extent> {
        self.0.block_status(offset, len)
    }
    fn name(&self) -> &str {
        "encrypting"
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn is_writable(&self) -> bool {
        true
    }
    fn writes_use_cpu(&self) -> bool {
        true
    }
}

/// Panics in `progress` or `cancelled` once it has been asked `after`
/// times (a bug in an embedder's callback).
struct Panicking {
    calls: AtomicU64,
    after: u64,
    in_progress: bool,
}

impl Panicking {
    fn count(&self, here: bool) {
        if here && self.calls.fetch_add(1, Ordering::Relaxed) >= self.after {
            panic!("the observer's bug");
        }
    }
}

impl CopyObserver for Panicking {
    fn progress(&self, _done: u64, _total: u64) {
        self.count(self.in_progress);
    }
    fn cancelled(&self) -> bool {
        self.count(!self.in_progress);
        false
    }
}

#[test]
fn a_panic_in_any_thread_of_a_copy_ends_it_instead_of_hanging_it() {
    for (workers, in_progress) in [(1, true), (4, true), (4, false), (2, false)] {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (source, _) = source();
            let target = Encrypting(
                RawImage::open(
                    "target.raw",
                    Arc::new(MemStorage::from_bytes(vec![0; SIZE as usize])),
                )
                .expect("raw")
                .with_writes(true),
            );
            assert!(!source.reads_use_cpu());
            let observer = Panicking {
                calls: AtomicU64::new(0),
                after: 3,
                in_progress,
            };
            let options = CopyOptions::default().workers(workers).chunk_size(1 << 20);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                copy(&source, &target, &options, &observer)
            }));
            let _ = tx.send(outcome.is_err());
        });
        // Writers (a panic in progress) and the reserving thread (in
        // cancelled) each get their turn to panic.
        let panicked = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{workers} workers, progress {in_progress}: the copy hung"));
        assert!(
            panicked,
            "{workers} workers, progress {in_progress}: no panic"
        );
    }
}

/// A disk whose reads say they use the processor (so that a copy hands
/// chunks to one collecting thread) and whose first chunk is slow: its
/// read waits until every other chunk was read, or a second has passed,
/// and counts the chunks read meanwhile.
#[derive(Debug)]
struct Stalling {
    inner: RawImage,
    chunk: u64,
    read: Mutex<std::collections::BTreeSet<u64>>,
    read_during_stall: AtomicU64,
}

impl BlockDevice for Stalling {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow::Result<()> {
        let index = offset / self.chunk;
        let others = self.virtual_size() / self.chunk - 1;
        if index == 0 {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while std::time::Instant::now() < until
                && (self.read.lock().expect("lock").len() as u64) < others
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let read = self.read.lock().expect("lock").len() as u64;
            self.read_during_stall.fetch_max(read, Ordering::Relaxed);
        } else {
            self.read.lock().expect("lock").insert(index);
        }
        self.inner.read_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> qcow::Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn name(&self) -> &str {
        "stalling"
    }
    fn reads_use_cpu(&self) -> bool {
        true
    }
}

#[test]
fn a_slow_chunk_does_not_let_the_other_readers_fill_memory() {
    let chunk = 128 << 10;
    let chunks = SIZE / chunk;
    for (workers, compress) in [(2, false), (4, false), (2, true)] {
        let (inner, bytes) = source();
        let source = Stalling {
            inner,
            chunk,
            read: Mutex::default(),
            read_during_stall: AtomicU64::new(0),
        };
        let target = qcow2_target(SIZE, 65536);
        let options = CopyOptions::default()
            .workers(workers)
            .compress(compress)
            .target_is_zero(true)
            .chunk_size(chunk);
        copy(&source, &target, &options, &()).expect("copy");
        assert!(read_all(&target, 1 << 20) == bytes, "{workers} {compress}");
        // The others read a few chunks each while the first one stalls,
        // not the rest of the disk (which would all wait in memory).
        let ahead = source.read_during_stall.load(Ordering::Relaxed);
        assert!(
            ahead >= 1 && ahead <= 8 * workers as u64,
            "{workers} workers, compress {compress}: {ahead} of {chunks} chunks read during the stall"
        );
    }
}
