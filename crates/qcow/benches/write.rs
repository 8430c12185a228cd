//! Criterion benchmarks of the write path: random 4 KiB writes into an
//! allocated image (in place) beside plain `pwrite` on a raw file of the
//! same size, and random 4 KiB writes into a new image (allocating).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_main};
use qcow::{CreateOptions, Qcow2Image};
use qcow_io::FileStorage;

const SIZE: u64 = 256 << 20;

fn offsets(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 20) % (SIZE / 4096)) * 4096
        })
        .collect()
}

fn image(dir: &std::path::Path, name: &str) -> Qcow2Image {
    let path = dir.join(name);
    let file = Arc::new(FileStorage::create(&path).expect("create").without_sync());
    Qcow2Image::create_writable(name, file, &CreateOptions::new(SIZE)).expect("image")
}

fn benches(c: &mut Criterion) {
    // In memory (tmpfs) when the machine has it: measures the engine's cost
    // over pwrite without the disk's write-back in the way.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let buf = vec![0x5au8; 4096];
    let mut group = c.benchmark_group("write_4k");
    group.throughput(Throughput::Elements(1));

    // In place: every cluster allocated first.
    let allocated = image(dir.path(), "allocated.qcow2");
    let chunk = vec![1u8; 1 << 20];
    for off in (0..SIZE).step_by(1 << 20) {
        allocated.write_at(&chunk, off).expect("fill");
    }
    let raw = File::create(dir.path().join("raw")).expect("raw");
    raw.set_len(SIZE).expect("size");
    for off in (0..SIZE).step_by(1 << 20) {
        raw.write_all_at(&chunk, off).expect("fill raw");
    }
    // Settle both files, so that write-back of the filling does not weigh
    // on one side's measurement.
    allocated.flush().expect("flush");
    File::open(dir.path().join("allocated.qcow2"))
        .and_then(|f| f.sync_all())
        .expect("sync image");
    raw.sync_all().expect("sync");
    let offs = offsets(1 << 16, 7);
    let mut i = 0;
    group.bench_function(BenchmarkId::new("engine", "overwrite"), |b| {
        b.iter(|| {
            allocated
                .write_at(&buf, offs[i % offs.len()])
                .expect("write");
            i += 1;
        })
    });
    group.bench_function(BenchmarkId::new("pwrite", "overwrite"), |b| {
        b.iter(|| {
            raw.write_all_at(&buf, offs[i % offs.len()])
                .expect("pwrite");
            i += 1;
        })
    });

    // Allocating: a fresh image per batch, so most writes allocate.
    group.bench_function(BenchmarkId::new("engine", "allocating"), |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut left = iters;
            let mut round = 0;
            while left > 0 {
                let n = left.min(2000);
                let img = image(dir.path(), &format!("alloc{round}.qcow2"));
                let offs = offsets(n as usize, round + 1);
                let start = std::time::Instant::now();
                for &off in &offs {
                    img.write_at(&buf, off).expect("write");
                }
                total += start.elapsed();
                drop(img);
                left -= n;
                round += 1;
            }
            total
        })
    });
    group.finish();
}

/// The benchmark group (criterion's macro makes an undocumented `pub fn`).
mod group {
    #![allow(missing_docs, unreachable_pub)]
    criterion::criterion_group!(write, super::benches);
}

criterion_main!(group::write);
