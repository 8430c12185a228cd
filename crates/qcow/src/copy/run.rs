//! Running a copy on worker threads: chunks are handed out in order and
//! each worker plans its chunk ([`super::plan`]). In guest order (the
//! target allocates in the disk's order) the workers then write by turns,
//! or hand their chunks to one thread that writes them or reserves their
//! space for a pool of writers that encrypt; out of order, every worker
//! writes its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Mutex, PoisonError};

use crate::device::{BlockDevice, Reservation};
use crate::{Error, Result};

use super::buffer::ChunkBuffer;
use super::pace::{IDLE_READER_NAP, Pace};
use super::plan::{Chunk, Piece, Planner};
use super::turns::Turns;
use super::window::{AHEAD_PER_WORKER, Window};
use super::{CopyObserver, CopyStats, ProgressBasis};

/// One copy, ready to run.
pub(super) struct Job<'a> {
    pub(super) planner: Planner<'a>,
    pub(super) target: &'a dyn BlockDevice,
    /// Bytes to copy (target offsets `0..len`).
    pub(super) len: u64,
    /// The progress total (see [`ProgressBasis`]).
    pub(super) total: u64,
    pub(super) basis: ProgressBasis,
    /// The largest step of [`ProgressBasis::Data`] progress.
    pub(super) step: u64,
    /// Bytes per chunk.
    pub(super) chunk: u64,
    pub(super) workers: usize,
    pub(super) observer: &'a dyn CopyObserver,
}

/// Counters the threads share.
#[derive(Default)]
struct Counters {
    written: AtomicU64,
    zeroed: AtomicU64,
    salvaged: AtomicU64,
    progress: Mutex<Reported>,
}

/// Progress reported so far. Chunks are written in any order, but
/// progress is reported in guest order, under the lock, as far as every
/// chunk before is written, so that the observer hears the copy go forward
/// as qemu-img's sequential one does.
#[derive(Default)]
struct Reported {
    /// Bytes of progress reported.
    done: u64,
    /// The first chunk not yet written.
    next: u64,
    /// Chunks written after chunks before them still pending.
    waiting: BTreeSet<u64>,
    /// [`ProgressBasis::Data`]: where the walk over the source's runs
    /// stands.
    pos: u64,
}

impl Counters {
    fn stats(&self) -> CopyStats {
        CopyStats {
            bytes_written: self.written.load(Ordering::Relaxed),
            bytes_zeroed: self.zeroed.load(Ordering::Relaxed),
            bytes_salvaged: self.salvaged.load(Ordering::Relaxed),
        }
    }
}

impl Job<'_> {
    fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk)
    }

    fn bounds(&self, index: u64) -> (u64, u64) {
        let start = index * self.chunk;
        (start, (start + self.chunk).min(self.len))
    }

    /// Writes what `chunk` needs, counting it.
    fn write(&self, chunk: &Chunk, counters: &Counters) -> Result<()> {
        // Runs of compressed clusters go down together.
        let mut packed: Vec<(u64, &[u8])> = Vec::new();
        let store = |packed: &mut Vec<(u64, &[u8])>| -> Result<()> {
            if let (false, Some(compressor)) = (packed.is_empty(), self.planner.compressor) {
                compressor.write_compressed(packed)?;
                let cluster = self.planner.cluster;
                let bytes: u64 = packed
                    .iter()
                    .map(|(at, _)| cluster.min(self.len - at))
                    .sum();
                counters.written.fetch_add(bytes, Ordering::Relaxed);
                packed.clear();
            }
            Ok(())
        };
        for piece in &chunk.pieces {
            if let Piece::Packed { at, bytes } = piece {
                packed.push((*at, bytes));
                continue;
            }
            store(&mut packed)?;
            match piece {
                Piece::Data { at, start, end } => {
                    self.target.write_at(&chunk.buf[*start..*end], *at)?;
                    counters
                        .written
                        .fetch_add((end - start) as u64, Ordering::Relaxed);
                }
                Piece::Zero { at, len } => {
                    self.target.write_zeroes(*at, *len, true)?;
                    counters.zeroed.fetch_add(*len, Ordering::Relaxed);
                }
                Piece::Packed { .. } => {}
            }
        }
        store(&mut packed)?;
        counters
            .salvaged
            .fetch_add(chunk.salvaged, Ordering::Relaxed);
        Ok(())
    }

    /// The progress total of [`ProgressBasis::Data`]: the bytes of every
    /// run read as data.
    pub(super) fn data_total(&self) -> Result<u64> {
        let mut total = 0;
        let mut pos = 0;
        while pos < self.len {
            let (len, counted) = self.planner.data_run(pos, self.len)?;
            if counted {
                total += len;
            }
            pos += len;
        }
        Ok(total)
    }

    /// Chunk `index` is written: reports the progress every chunk up to
    /// the first one still pending makes.
    fn advance(&self, counters: &Counters, index: u64) {
        let mut reported = counters
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        reported.waiting.insert(index);
        loop {
            let next = reported.next;
            if !reported.waiting.remove(&next) {
                break;
            }
            reported.next += 1;
            if self.basis == ProgressBasis::Range {
                reported.done = self.bounds(reported.next - 1).1;
                self.observer.progress(reported.done, self.total);
            }
        }
        if self.basis == ProgressBasis::Data {
            let written = (reported.next * self.chunk).min(self.len);
            self.report_data(&mut reported, written);
        }
    }

    /// Walks the source's runs up to `written`, reporting each run read
    /// as data in steps of at most `self.step` from its start.
    fn report_data(&self, reported: &mut Reported, written: u64) {
        while reported.pos < written {
            let (len, counted) = match self.planner.data_run(reported.pos, self.len) {
                Ok(run) => run,
                // The copy reports the error; progress stops here.
                Err(_) => {
                    reported.pos = self.len;
                    return;
                }
            };
            if !counted {
                reported.pos += len;
                continue;
            }
            let step = len.min(self.step);
            if reported.pos + step > written {
                return;
            }
            reported.pos += step;
            reported.done += step;
            self.observer.progress(reported.done, self.total);
        }
    }

    /// Writes the target in guest order, so that it allocates its clusters
    /// (or an NBD server its space) in the disk's order. Where reading is
    /// cheap next to writing, the workers write in turns
    /// ([`Job::run_in_turns`]). Where it is not (the copy compresses, the
    /// source decrypts) or the target's writes encrypt, they hand their
    /// chunks to this thread ([`Job::run_collected`]), so that none waits
    /// for its turn with work it could be doing.
    pub(super) fn run_in_order(&self) -> Result<CopyStats> {
        // A target without clusters (a LUKS volume) reserves nothing; its
        // pool of writers still shares the encryption.
        let reserving = self.planner.compressor.is_none() && self.target.writes_use_cpu();
        if reserving || self.planner.reads_use_cpu() {
            self.run_collected(reserving)
        } else {
            self.run_in_turns()
        }
    }

    /// Every worker reads a chunk (compressing it for a compressed target)
    /// and writes it in its turn ([`Turns`]): while one writes, the others
    /// read, and each chunk is written from the cache of the processor that
    /// read it. (With a reader apart from the writer, a raw -> qcow2 copy
    /// took a sixth longer; with one to a raw file, half as long again.)
    fn run_in_turns(&self) -> Result<CopyStats> {
        let chunks = self.chunks();
        let counters = Counters::default();
        let next = AtomicU64::new(0);
        let turns = Turns::default();
        std::thread::scope(|scope| {
            for _ in 0..self.workers {
                let (next, turns, counters) = (&next, &turns, &counters);
                scope.spawn(move || {
                    turns.failing_on_panic(|| self.write_in_turns(next, chunks, turns, counters))
                });
            }
        });
        match turns.into_failure() {
            Some(e) => Err(e),
            None => Ok(counters.stats()),
        }
    }

    /// One worker of [`Job::run_in_turns`]: reads chunks and writes each in
    /// its turn, until none is left or the copy failed.
    fn write_in_turns(&self, next: &AtomicU64, chunks: u64, turns: &Turns, counters: &Counters) {
        let mut buf = ChunkBuffer::new(self.chunk as usize);
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= chunks {
                return;
            }
            let (start, end) = self.bounds(index);
            let planned = if self.observer.cancelled() {
                Err(Error::Cancelled)
            } else {
                self.planner.plan(start, end, buf)
            };
            // A chunk that failed fails the copy in its turn:
            // all before it is written, as a sequential copy
            // would have written it.
            if !turns.wait_for(index) {
                return;
            }
            let written = planned.and_then(|chunk| {
                if self.observer.cancelled() {
                    return Err(Error::Cancelled);
                }
                self.write(&chunk, counters)?;
                Ok(chunk)
            });
            match written {
                Ok(chunk) => {
                    self.advance(counters, index);
                    turns.done(index);
                    buf = chunk.buf;
                }
                Err(e) => {
                    turns.fail(e);
                    return;
                }
            }
        }
    }

    /// Workers plan chunks (one, or all where reading works the processor:
    /// [`Pace`]); this thread takes them in guest order. A target gets them
    /// written here (compressed clusters packed in order); with `reserve`,
    /// each chunk's space is reserved here, in order, and a pool of writers
    /// encrypts and writes them in parallel.
    fn run_collected(&self, reserve: bool) -> Result<CopyStats> {
        let chunks = self.chunks();
        let counters = Counters::default();
        let (tx, rx) = sync_channel::<(u64, Result<Chunk>)>(self.workers * 2);
        // Buffers go back to the planners, so no chunk is copied and no
        // fresh memory is touched per chunk.
        let pool: Mutex<Vec<ChunkBuffer>> = Mutex::new(Vec::new());
        let next = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let pace = Pace::new(self.planner.reads_use_cpu());
        let window = Window::new(AHEAD_PER_WORKER * self.workers as u64);
        // Chunks whose space is reserved, on their way to the writers.
        let (wtx, wrx) = sync_channel::<(u64, Chunk, Reservation)>(self.workers * 2);
        let wrx = Mutex::new(wrx);
        let fail = |e: Error| {
            stop.store(true, Ordering::Relaxed);
            failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(e);
        };
        std::thread::scope(|scope| -> Result<()> {
            // However this thread leaves (a panic too), readers waiting to
            // be wanted stop.
            let _stop_readers = StopOnDrop(&stop);
            for reader in 0..self.workers {
                let tx = tx.clone();
                let (next, stop, pool, pace, window) = (&next, &stop, &pool, &pace, &window);
                scope.spawn(move || {
                    // A reader that panics stops the others (those waiting
                    // to be wanted would wait for it forever); the panic
                    // goes on.
                    let read = std::panic::AssertUnwindSafe(|| {
                        loop {
                            if next.load(Ordering::Relaxed) >= chunks
                                || stop.load(Ordering::Relaxed)
                            {
                                return;
                            }
                            if reader >= pace.readers_wanted(self.workers) {
                                std::thread::sleep(IDLE_READER_NAP);
                                continue;
                            }
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= chunks || !window.wait_for(index, stop) {
                                return;
                            }
                            let buf = pool
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .pop()
                                .unwrap_or_else(|| ChunkBuffer::new(self.chunk as usize));
                            let (start, end) = self.bounds(index);
                            let chunk = self.planner.plan(start, end, buf);
                            if let Ok(chunk) = &chunk {
                                pace.chunk_read(chunk.decompressed);
                            }
                            if tx.send((index, chunk)).is_err() {
                                return;
                            }
                        }
                    });
                    if let Err(panic) = std::panic::catch_unwind(read) {
                        stop.store(true, Ordering::Relaxed);
                        std::panic::resume_unwind(panic);
                    }
                });
            }
            drop(tx);
            if !reserve {
                drop(wtx);
                let result = self.take_in_order(rx, chunks, &window, |index, chunk| {
                    self.write(&chunk, &counters)?;
                    self.recycle(&pool, chunk.buf);
                    self.advance(&counters, index);
                    Ok(())
                });
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                return result;
            }
            for _ in 0..self.workers {
                let (wrx, pool, counters, fail, stop) = (&wrx, &pool, &counters, &fail, &stop);
                scope.spawn(move || {
                    let receive = || wrx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let write = std::panic::AssertUnwindSafe(|| {
                        while let Ok((index, chunk, reserved)) = receive() {
                            // Every chunk handed on is written, also after a
                            // failure: all before it is then on disk.
                            match self.write(&chunk, counters) {
                                Ok(()) => {
                                    self.recycle(pool, chunk.buf);
                                    self.advance(counters, index);
                                }
                                Err(e) => {
                                    // Nothing may stay mapped to space that
                                    // was not written.
                                    fail(e);
                                    if let Err(e) = self.target.release(reserved) {
                                        fail(e);
                                    }
                                }
                            }
                        }
                    });
                    // A writer that panics stops the copy, and takes what
                    // is still handed on (giving its space back) until the
                    // reserving thread sees the stop, so that it does not
                    // wait for writers that are gone; the panic goes on.
                    if let Err(panic) = std::panic::catch_unwind(write) {
                        stop.store(true, Ordering::Relaxed);
                        while let Ok((_, _, reserved)) = receive() {
                            let _ = self.target.release(reserved);
                        }
                        std::panic::resume_unwind(panic);
                    }
                });
            }
            let result = self.take_in_order(rx, chunks, &window, |index, chunk| {
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let mut reserved = Reservation::default();
                let zeros_allocate = self.target.zeroing_allocates();
                for piece in &chunk.pieces {
                    let range = match piece {
                        Piece::Data { at, start, end } => Some((*at, (end - start) as u64)),
                        // Zeros written as data take their clusters in
                        // order too.
                        Piece::Zero { at, len } if zeros_allocate => Some((*at, *len)),
                        _ => None,
                    };
                    if let Some((at, len)) = range {
                        match self.target.reserve(at, len) {
                            Ok(more) => reserved.append(more),
                            Err(e) => {
                                // Best effort: the reservation's error is
                                // the one to report.
                                let _ = self.target.release(reserved);
                                return Err(e);
                            }
                        }
                    }
                }
                wtx.send((index, chunk, reserved)).map_err(|e| {
                    let (_, _, reserved) = e.0;
                    let _ = self.target.release(reserved);
                    Error::Cancelled
                })
            });
            drop(wtx);
            if let Err(e) = result {
                fail(e);
            }
            Ok(())
        })?;
        // A writer's failure comes first: the reserving loop stopped for it.
        match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(counters.stats()),
        }
    }

    fn recycle(&self, pool: &Mutex<Vec<ChunkBuffer>>, buf: ChunkBuffer) {
        pool.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
    }

    /// Hands the planned chunks to `take` in guest order, as they come in,
    /// moving the readers' `window` on. A chunk that failed fails the copy
    /// in its turn, so that all before it is handed on, as a sequential
    /// copy would have handed it.
    fn take_in_order(
        &self,
        rx: Receiver<(u64, Result<Chunk>)>,
        chunks: u64,
        window: &Window,
        mut take: impl FnMut(u64, Chunk) -> Result<()>,
    ) -> Result<()> {
        let mut waiting: BTreeMap<u64, Result<Chunk>> = BTreeMap::new();
        let mut expected = 0u64;
        while expected < chunks {
            if self.observer.cancelled() {
                return Err(Error::Cancelled);
            }
            let Ok((index, chunk)) = rx.recv() else {
                return Err(Error::Cancelled);
            };
            waiting.insert(index, chunk);
            while let Some(chunk) = waiting.remove(&expected) {
                take(expected, chunk?)?;
                expected += 1;
                window.taken(expected);
            }
        }
        Ok(())
    }

    /// Every worker plans and writes its own chunks.
    pub(super) fn run_unordered(&self) -> Result<CopyStats> {
        let chunks = self.chunks();
        let counters = Counters::default();
        let next = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..self.workers)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        let mut buf = ChunkBuffer::new(self.chunk as usize);
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= chunks || failed.load(Ordering::Relaxed) {
                                return Ok(());
                            }
                            let (start, end) = self.bounds(index);
                            let result = if self.observer.cancelled() {
                                Err(Error::Cancelled)
                            } else {
                                self.planner.plan(start, end, buf).and_then(|chunk| {
                                    self.write(&chunk, &counters)?;
                                    Ok(chunk)
                                })
                            };
                            match result {
                                Ok(chunk) => {
                                    self.advance(&counters, index);
                                    buf = chunk.buf;
                                }
                                Err(e) => {
                                    failed.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                    })
                })
                .collect();
            let mut first = Ok(());
            for handle in handles {
                let result = handle.join().unwrap_or(Err(Error::Cancelled));
                if first.is_ok() {
                    first = result;
                }
            }
            first
        })?;
        Ok(counters.stats())
    }
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
