//! Concurrency: readers and writers on several threads at once, under
//! cache pressure, with requests that overlap. Afterwards every write is
//! there, nothing landed where it did not belong, `qemu-img check` is clean
//! and qemu-img reads what the model says.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qcow::{BlockDevice, CreateOptions, Qcow2Image, QcowImage};
use qcow_io::{FileStorage, Storage};

use crate::common::{Rng, qemu_raw};
use crate::write::{assert_check_clean, incompatible_bits};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

thread_local! {
    /// Whether this thread's I/O through a [`Slow`] file is slowed down.
    static SLOW_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Slows down this thread's I/O through [`Slow`] files.
fn slow_down_this_thread() {
    SLOW_THREAD.with(|slow| slow.set(true));
}

/// A file on which some threads' reads or writes of one length take a
/// while longer, widening the windows between looking something up and
/// using it: a read starts late and returns late (with what the file held
/// when it ran), a write lands late.
#[derive(Debug)]
struct Slow {
    file: FileStorage,
    reads_of: usize,
    writes_of: usize,
    delay: Duration,
}

impl Slow {
    fn pause(&self, len: usize, slowed: usize) {
        if len == slowed && SLOW_THREAD.with(std::cell::Cell::get) {
            std::thread::sleep(self.delay);
        }
    }
}

impl Storage for Slow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.pause(buf.len(), self.reads_of);
        self.file.read_at(buf, offset)?;
        self.pause(buf.len(), self.reads_of);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.pause(buf.len(), self.writes_of);
        self.file.write_at(buf, offset)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Sets a flag when dropped, so that threads waiting for it stop even when
/// the thread that owns it panics.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Creates an image, then opens it again with an L2 cache of `cache_bytes`
/// on a file whose reads of `reads_of` bytes and writes of `writes_of`
/// bytes are slowed down.
fn create_slow(
    path: &Path,
    options: &CreateOptions,
    cache_bytes: u64,
    reads_of: usize,
    writes_of: usize,
    delay: Duration,
) -> Qcow2Image {
    let file = Arc::new(FileStorage::create(path).expect("create file"));
    Qcow2Image::create_writable(s(path), file, options)
        .expect("create image")
        .close()
        .expect("close");
    let file = Arc::new(Slow {
        file: FileStorage::open(path, true).expect("open").without_sync(),
        reads_of,
        writes_of,
        delay,
    });
    Qcow2Image::open_writable(s(path), file, Some(cache_bytes)).expect("open writable")
}

/// Two writers, each owning every other cluster, and two slowed-down
/// readers on `image`; returns what the disk must hold afterwards. No
/// reader may see a byte its cluster's owner did not write. Writers use
/// the first 4 clusters of every `spread` (so that they come back to the
/// same clusters often). With `discards`, every fourth operation discards
/// a whole cluster, so that allocations (and L2 table changes) go on.
fn owners_and_readers(
    image: &dyn BlockDevice,
    cluster: u64,
    spread: u64,
    rounds: u64,
    discards: bool,
) -> Vec<u8> {
    let size = image.virtual_size();
    let slots = size / cluster / spread * 4;
    let done = AtomicBool::new(false);
    let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2u64)
            .map(|owner| {
                let done = &done;
                scope.spawn(move || {
                    let _done = SetOnDrop(done);
                    let mut model = vec![0u8; size as usize];
                    let mut rng = Rng::new(owner + 7);
                    for round in 0..rounds {
                        if round % 1000 == 999 {
                            image.flush().expect("flush");
                        }
                        let slot = rng.below(slots / 2) * 2 + owner;
                        let at_cluster = slot / 4 * spread + slot % 4;
                        let in_cluster = rng.below(cluster);
                        let len = 1 + rng.below(cluster - in_cluster);
                        if discards && round % 4 == 3 {
                            let at = at_cluster * cluster;
                            image.discard(at, cluster).expect("discard");
                            model[at as usize..(at + cluster) as usize].fill(0);
                            continue;
                        }
                        let at = at_cluster * cluster + in_cluster;
                        // Low nibble: the owner; high nibble: the round.
                        let value = ((round % 15 + 1) << 4) as u8 | (owner as u8 + 1);
                        let data = vec![value; len as usize];
                        image.write_at(&data, at).expect("write");
                        model[at as usize..(at + len) as usize].fill(value);
                    }
                    model
                })
            })
            .collect();
        for reader in 0..2u64 {
            let done = &done;
            scope.spawn(move || {
                slow_down_this_thread();
                let mut rng = Rng::new(reader + 70);
                let mut buf = vec![0u8; 4 * cluster as usize];
                while !done.load(Ordering::Acquire) {
                    let at = rng.below(size - buf.len() as u64);
                    image.read_at(&mut buf, at).expect("read");
                    for (i, &b) in buf.iter().enumerate() {
                        let owner = (at + i as u64) / cluster % 2;
                        assert!(
                            b == 0 || u64::from(b & 0x0f) == owner + 1,
                            "byte {} reads {b:#x}, which its owner never wrote",
                            at + i as u64
                        );
                    }
                }
            });
        }
        writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .collect()
    });
    // Merge the two models: each cluster belongs to one owner.
    let mut expected = vec![0u8; size as usize];
    for (c, chunk) in expected.chunks_mut(cluster as usize).enumerate() {
        let range = c * cluster as usize..(c + 1) * cluster as usize;
        chunk.copy_from_slice(&models[c % 2][range]);
    }
    let mut seen = vec![0u8; size as usize];
    image.read_at(&mut seen, 0).expect("read back");
    assert!(seen == expected, "a write was lost before closing");
    expected
}

/// Readers and writers over many more L2 tables than the cache holds:
/// tables are evicted, written back and read again from disk all the time
/// while others change them. A table read before a change and cached
/// after it would lose writes.
#[test]
fn readers_and_writers_under_cache_pressure_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pressure.qcow2");
    const CLUSTER: u64 = 512;
    let mut options = CreateOptions::new(512 << 10);
    options.cluster_size = CLUSTER;
    // 512-byte clusters: an L2 table maps 32 KiB, so the disk has 16 of
    // them and the cache holds 4. Table reads (one cluster) are slowed.
    let image = create_slow(
        &path,
        &options,
        4 * CLUSTER,
        CLUSTER as usize,
        0,
        Duration::from_millis(2),
    );
    let expected = owners_and_readers(&image, CLUSTER, 4, 300_000, true);
    let stats = image.cache_stats();
    assert!(
        stats.evictions > 1000,
        "too little cache pressure: {stats:?}"
    );
    image.close().expect("close");
    assert_check_clean(&path);
    assert!(
        qemu_raw(&path, &[]) == expected,
        "qemu-img reads other data"
    );
}

/// The same on a qcow version 1 image, whose writers change L2 tables on
/// disk and drop them from the cache.
#[test]
fn qcow_v1_readers_and_writers_under_cache_pressure_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pressure.qcow");
    // 4 KiB clusters and 4 KiB L2 tables mapping 2 MiB each: 16 tables,
    // 4 of them cached. Table reads are slowed.
    qcow::create_qcow(&path, &CreateOptions::new(32 << 20)).expect("create");
    let file = Arc::new(Slow {
        file: FileStorage::open(&path, true).expect("open").without_sync(),
        reads_of: 4096,
        writes_of: 0,
        delay: Duration::from_millis(2),
    });
    let image = QcowImage::open_writable(s(&path), file, Some(4 * 4096)).expect("open");
    assert_eq!(image.header().cluster_size(), 4096);
    let expected = owners_and_readers(&image, 4096, 512, 100_000, false);
    image.flush().expect("flush");
    drop(image);
    assert!(
        qemu_raw(&path, &[]) == expected,
        "qemu-img reads other data"
    );
}

/// One thread overwrites a region in place while another discards it (its
/// clusters are freed at each flush) and a third keeps allocating clusters
/// elsewhere, which reuses the freed ones. An in-place write that found a
/// cluster mapped must land before that cluster is handed out again
/// (otherwise it overwrites the third thread's data), and a read must be
/// done before it (otherwise it returns the third thread's data).
#[test]
fn in_place_io_racing_discards_never_touches_reused_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("race.qcow2");
    const CLUSTER: u64 = 4096;
    const REGION: u64 = 32 * CLUSTER;
    let mut options = CreateOptions::new(2 * REGION);
    options.cluster_size = CLUSTER;
    // Region A's in-place writes and reads are slowed down.
    let image = create_slow(
        &path,
        &options,
        1 << 20,
        1024,
        1024,
        Duration::from_millis(5),
    );
    let done = AtomicBool::new(false);
    let expected = std::thread::scope(|scope| {
        let image = &image;
        let done = &done;
        // Overwrites region A, mostly in place.
        scope.spawn(move || {
            slow_down_this_thread();
            let mut rng = Rng::new(3);
            let data = vec![0xaa; 1024];
            while !done.load(Ordering::Acquire) {
                let at = rng.below(REGION / 1024) * 1024;
                image.write_at(&data, at).expect("write A");
            }
        });
        // Reads region A: only its bytes may show there, never region
        // B's from a cluster freed and reused during the read.
        scope.spawn(move || {
            slow_down_this_thread();
            let mut rng = Rng::new(4);
            let mut seen = vec![0u8; 1024];
            while !done.load(Ordering::Acquire) {
                let at = rng.below(REGION / 1024) * 1024;
                image.read_at(&mut seen, at).expect("read A");
                assert!(
                    seen.iter().all(|&b| b == 0 || b == 0xaa),
                    "region A at {at} read another region's data"
                );
            }
        });
        // Discards region A and flushes, freeing its clusters, now and
        // then (so that most writes to it are in place).
        scope.spawn(move || {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(3));
                image.discard(0, REGION).expect("discard A");
                image.flush().expect("flush");
            }
        });
        // Rewrites region B cluster by cluster into new clusters, checking
        // each before it is rewritten.
        let writer = scope.spawn(move || {
            let _done = SetOnDrop(done);
            let mut model = vec![0u8; REGION as usize];
            let mut seen = vec![0u8; CLUSTER as usize];
            for round in 0..3000u64 {
                let cluster = round % 32;
                // Never 0xaa, region A's byte.
                let value = (round % 100 + 1) as u8;
                let at = REGION + cluster * CLUSTER;
                let start = (cluster * CLUSTER) as usize;
                image.read_at(&mut seen, at).expect("read B");
                assert!(
                    seen[..] == model[start..start + CLUSTER as usize],
                    "region B's cluster {cluster} changed (round {round}): {} bytes of 0xaa",
                    seen.iter().filter(|&&b| b == 0xaa).count()
                );
                image.discard(at, CLUSTER).expect("discard B");
                image.flush().expect("flush");
                let data = vec![value; CLUSTER as usize];
                image.write_at(&data, at).expect("write B");
                model[start..start + CLUSTER as usize].fill(value);
            }
            model
        });
        writer.join().expect("writer")
    });
    let mut region_b = vec![0u8; REGION as usize];
    image.read_at(&mut region_b, REGION).expect("read B");
    let stray = region_b.iter().filter(|&&b| b == 0xaa).count();
    assert_eq!(stray, 0, "writes to region A landed in region B's clusters");
    assert!(region_b == expected, "region B lost writes");
    let mut region_a = vec![0u8; REGION as usize];
    image.read_at(&mut region_a, 0).expect("read A");
    assert!(region_a.iter().all(|&b| b == 0 || b == 0xaa));
    image.close().expect("close");
    assert_check_clean(&path);
    let raw = qemu_raw(&path, &[]);
    assert!(
        raw[REGION as usize..] == expected[..],
        "qemu-img reads other data"
    );
}

/// With extended L2 entries (two words each), readers look entries up
/// while a writer allocates subclusters and zeroes clusters: no reader may
/// ever see half of a change (an error, or the image marked corrupt).
#[test]
fn extended_l2_readers_never_see_half_changed_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ext.qcow2");
    const CLUSTER: u64 = 64 << 10;
    // Two clusters, so that readers often look at the entry being changed.
    const SIZE: u64 = 2 * CLUSTER;
    let mut options = CreateOptions::new(SIZE);
    options.cluster_size = CLUSTER;
    options.extended_l2 = true;
    let image = create_slow(&path, &options, 1 << 20, 0, 0, Duration::ZERO);
    let sub = CLUSTER / 32;
    let done = AtomicBool::new(false);
    let expected = std::thread::scope(|scope| {
        let (image, done) = (&image, &done);
        for reader in 0..2u64 {
            scope.spawn(move || {
                let mut rng = Rng::new(reader + 11);
                let mut buf = vec![0u8; sub as usize];
                while !done.load(Ordering::Acquire) {
                    let at = rng.below(SIZE / sub) * sub;
                    image.read_at(&mut buf, at).expect("read");
                    let len = CLUSTER.min(SIZE - at);
                    image.block_status(at, len).expect("block status");
                }
            });
        }
        let writer = scope.spawn(move || {
            let _done = SetOnDrop(done);
            let mut model = vec![0u8; SIZE as usize];
            let mut rng = Rng::new(5);
            for round in 0..20_000u64 {
                let cluster = rng.below(SIZE / CLUSTER);
                if round % 5 == 4 {
                    let at = cluster * CLUSTER;
                    image.write_zeroes(at, CLUSTER, true).expect("zero");
                    model[at as usize..(at + CLUSTER) as usize].fill(0);
                } else {
                    let at = cluster * CLUSTER + rng.below(32) * sub;
                    let value = (round % 250 + 1) as u8;
                    image
                        .write_at(&vec![value; sub as usize], at)
                        .expect("write");
                    model[at as usize..(at + sub) as usize].fill(value);
                }
            }
            model
        });
        writer.join().expect("writer")
    });
    image.close().expect("close");
    assert_eq!(
        incompatible_bits(&path) & 2,
        0,
        "the image was marked corrupt while healthy"
    );
    assert_check_clean(&path);
    assert!(
        qemu_raw(&path, &[]) == expected,
        "qemu-img reads other data"
    );
}
