//! Criterion benchmarks of the read path: cached random 4 KiB reads on one
//! and two threads, and sequential 1 MiB reads, each beside plain `pread`
//! on the raw file holding the same data, so the engine's overhead shows.
//!
//! Needs qemu-img to build the image (a fully allocated qcow2 of 256 MiB).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_main};
use qcow::{BlockDevice, OpenOptions};

const SIZE: u64 = 256 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    raw: File,
    image: qcow::Image,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw_path = dir.path().join("data.raw");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = vec![0u8; SIZE as usize];
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&raw_path, &bytes).expect("write raw");
    let image_path = dir.path().join("data.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_path)
        .arg(&image_path)
        .status()
        .expect("qemu-img is required to build the benchmark image");
    assert!(status.success());
    let image = qcow::open(&image_path, &OpenOptions::default()).expect("open");
    let raw = File::open(&raw_path).expect("open raw");
    // Warm the page cache for both.
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(1 << 20) {
        image.read_at(&mut buf, off).expect("read");
        raw.read_exact_at(&mut buf, off).expect("pread");
    }
    Fixture {
        _dir: dir,
        raw,
        image,
    }
}

fn random_offsets(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 20) % (SIZE / 4096)) * 4096
        })
        .collect()
}

/// Runs `iters` reads split across `threads` threads; returns the wall time.
fn timed(threads: usize, iters: u64, read: &(dyn Fn(&mut [u8], u64) + Sync)) -> Duration {
    let per_thread = (iters as usize).div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let offsets = random_offsets(per_thread, t as u64 + 1);
                let mut buf = vec![0u8; 4096];
                for off in offsets {
                    read(&mut buf, off);
                }
            });
        }
    });
    start.elapsed()
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let mut group = c.benchmark_group("random_4k");
    group.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        group.bench_function(BenchmarkId::new("engine", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|buf, off| {
                    f.image.read_at(buf, off).expect("read");
                })
            })
        });
        group.bench_function(BenchmarkId::new("pread", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|buf, off| {
                    f.raw.read_exact_at(buf, off).expect("pread");
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("sequential_1m");
    group.throughput(Throughput::Bytes(1 << 20));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    group.bench_function("engine", |b| {
        b.iter(|| {
            f.image.read_at(&mut buf, off).expect("read");
            off = (off + (1 << 20)) % SIZE;
        })
    });
    group.bench_function("pread", |b| {
        b.iter(|| {
            f.raw.read_exact_at(&mut buf, off).expect("pread");
            off = (off + (1 << 20)) % SIZE;
        })
    });
    group.finish();
}

/// The benchmark group (criterion's macro makes an undocumented `pub fn`).
mod group {
    #![allow(missing_docs, unreachable_pub)]
    criterion::criterion_group!(read, super::benches);
}

criterion_main!(group::read);
