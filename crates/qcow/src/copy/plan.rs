//! Reading one chunk of the source and saying what the target needs
//! written for it: runs of data from the chunk's buffer, compressed
//! clusters, and ranges to zero. Block status decides what is read at all;
//! data read is then scanned for zeros at the target's granularity.

use crate::Result;
use crate::device::{Allocation, BlockDevice, CompressedWrites};

use super::buffer::ChunkBuffer;
use super::{CopyObserver, Layers};

/// What the writer must do for one part of a chunk (offsets in the
/// target).
#[derive(Debug)]
pub(super) enum Piece {
    /// Bytes `start..end` of the chunk's buffer, at `at`.
    Data { at: u64, start: usize, end: usize },
    /// One compressed cluster at `at`.
    Packed { at: u64, bytes: Vec<u8> },
    /// A range to make read as zeros.
    Zero { at: u64, len: u64 },
}

/// A chunk read by a worker: its buffer and what to write from it.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) buf: ChunkBuffer,
    pub(super) pieces: Vec<Piece>,
    /// Source bytes that could not be read and are written as zeros.
    pub(super) salvaged: u64,
    /// Whether planning it worked the processor: compressed clusters were
    /// read (see [`Planner::reads_use_cpu`] for the rest).
    pub(super) decompressed: bool,
}

/// How chunks are planned (see [`super::CopyOptions`]).
pub(super) struct Planner<'a> {
    pub(super) source: &'a dyn BlockDevice,
    pub(super) source_offset: u64,
    pub(super) compressor: Option<&'a dyn CompressedWrites>,
    /// The target's cluster size (0: none).
    pub(super) cluster: u64,
    /// The smallest unit a write to the target allocates (0: none).
    pub(super) subcluster: u64,
    pub(super) min_zero_run: u64,
    pub(super) layers: Layers,
    pub(super) target_is_zero: bool,
    pub(super) salvage: bool,
    /// Only what differs from this disk is written.
    pub(super) baseline: Option<&'a dyn BlockDevice>,
    pub(super) observer: &'a dyn CopyObserver,
}

impl Planner<'_> {
    /// The granularity of zero detection in data read: whole clusters of a
    /// target that has them, else the minimum zero run (0: none).
    fn zero_block(&self) -> usize {
        match (self.min_zero_run, self.cluster) {
            (0, _) => 0,
            (_, 0) => self.min_zero_run as usize,
            (_, c) => c as usize,
        }
    }

    /// Whether zeros need not be written: the target reads as zeros and
    /// has no backing file to show through.
    fn zeros_read_back(&self) -> bool {
        self.target_is_zero && self.layers == Layers::All
    }

    /// Reads target range `start..end` (at most the buffer's length) and
    /// plans its writes.
    pub(super) fn plan(&self, start: u64, end: u64, mut buf: ChunkBuffer) -> Result<Chunk> {
        let mut chunk = Chunk {
            buf: ChunkBuffer::default(),
            pieces: Vec::new(),
            salvaged: 0,
            decompressed: false,
        };
        let mut pos = start;
        while pos < end {
            let (len, what, compressed) = self.next_run(pos, end)?;
            chunk.decompressed |= compressed && what == What::Data;
            match what {
                What::Skip => pos += len,
                What::Zero => {
                    chunk.pieces.push(Piece::Zero { at: pos, len });
                    pos += len;
                }
                What::Data => {
                    let (from, to) = self.data_span(start, end, pos, len);
                    let (a, b) = ((from - start) as usize, (to - start) as usize);
                    chunk.salvaged += self.read(&mut buf[a..b], from)?;
                    match self.baseline {
                        Some(baseline) => {
                            self.plan_differences(baseline, &buf, start, a, b, &mut chunk.pieces)?
                        }
                        None => self.plan_data(&buf, start, a, b, &mut chunk.pieces),
                    }
                    pos = to;
                }
            }
        }
        chunk.buf = buf;
        Ok(chunk)
    }

    /// The run of the source at target offset `pos` (up to `end`) as
    /// [`super::ProgressBasis::Data`] sees it: its length, and whether it
    /// is read as data (and so counted).
    pub(super) fn data_run(&self, pos: u64, end: u64) -> Result<(u64, bool)> {
        let (len, what, _) = self.next_run(pos, end)?;
        Ok((len, what == What::Data))
    }

    /// Whether reading and planning chunks works the processor more than
    /// writing them: the source decrypts, the copy compresses, or compares
    /// with a baseline. Workers then read and hand their chunks on, rather
    /// than wait for their turn to write (a chunk with compressed clusters
    /// also sets every worker reading where chunks are handed on).
    pub(super) fn reads_use_cpu(&self) -> bool {
        self.compressor.is_some() || self.baseline.is_some() || self.source.reads_use_cpu()
    }

    /// The run of the source at target offset `pos` (within a chunk
    /// ending at `end`): its length, what to do with it, and whether it is
    /// stored compressed.
    fn next_run(&self, pos: u64, end: u64) -> Result<(u64, What, bool)> {
        match self
            .source
            .block_status(self.source_offset + pos, end - pos)
        {
            Ok(e) => {
                let compressed = matches!(
                    e.allocation,
                    Allocation::Data {
                        compressed: true,
                        ..
                    }
                );
                Ok((
                    e.len.max(1).min(end - pos),
                    self.classify(e.allocation),
                    compressed,
                ))
            }
            // Read it: the read says what is wrong, or salvages it.
            Err(_) if self.salvage => Ok((end - pos, What::Data, false)),
            Err(e) => Err(e),
        }
    }

    /// The range read for data at `pos..pos + len` in the chunk
    /// `start..end`: whole target clusters around it, so that each is
    /// written once.
    fn data_span(&self, start: u64, end: u64, pos: u64, len: u64) -> (u64, u64) {
        match self.cluster {
            0 => (pos, pos + len),
            cluster => (
                pos - (pos - start) % cluster,
                (pos + len).next_multiple_of(cluster).min(end),
            ),
        }
    }

    /// What to do with a run stored as `allocation`.
    fn classify(&self, allocation: Allocation) -> What {
        let depth = match allocation {
            Allocation::Data { depth, .. }
            | Allocation::Zero { depth, .. }
            | Allocation::Unknown { depth } => Some(depth),
            Allocation::Unallocated { .. } => None,
        };
        // What is not known to be zeros is read.
        let reads_zero = !matches!(
            allocation,
            Allocation::Data { zero: false, .. } | Allocation::Unknown { .. }
        );
        match self.layers {
            Layers::Top(n) => match depth {
                Some(d) if d < n && reads_zero => What::Zero,
                Some(d) if d < n => What::Data,
                _ => What::Skip,
            },
            // Compared with the baseline (or copied whole) where the top
            // layer does not hold it.
            Layers::BelowTop => match depth {
                Some(0) => What::Skip,
                _ => What::Data,
            },
            Layers::All if self.baseline.is_some() => What::Data,
            Layers::All => match allocation {
                Allocation::Data { zero: false, .. } | Allocation::Unknown { .. } => What::Data,
                // Everything is written: the target allocates the whole disk.
                _ if self.min_zero_run == 0 => What::Data,
                _ if self.target_is_zero => What::Skip,
                _ => What::Zero,
            },
        }
    }

    /// Reads `buf.len()` bytes of the source at target offset `at`; with
    /// salvage, what cannot be read becomes zeros. Returns the bytes
    /// salvaged.
    fn read(&self, buf: &mut [u8], at: u64) -> Result<u64> {
        let offset = self.source_offset + at;
        match self.source.read_at(buf, offset) {
            Ok(()) => Ok(0),
            Err(_) if self.salvage => Ok(self.read_salvaging(buf, offset)),
            Err(e) => Err(e),
        }
    }

    fn read_salvaging(&self, buf: &mut [u8], offset: u64) -> u64 {
        let mut salvaged = 0;
        for (i, sector) in buf.chunks_mut(512).enumerate() {
            let at = offset + (i * 512) as u64;
            if let Err(e) = self.source.read_at(sector, at) {
                sector.fill(0);
                self.observer.salvaged(at, sector.len() as u64, &e);
                salvaged += sector.len() as u64;
            }
        }
        salvaged
    }

    /// Plans writes of the blocks of `buf[a..b]` (data read for target
    /// offset `start + a`) that differ from `baseline`, block by block of
    /// the target's clusters (512 bytes without).
    fn plan_differences(
        &self,
        baseline: &dyn BlockDevice,
        buf: &[u8],
        start: u64,
        a: usize,
        b: usize,
        pieces: &mut Vec<Piece>,
    ) -> Result<()> {
        let from = self.source_offset + start + a as u64;
        let mut other = vec![0u8; b - a];
        let inside = baseline
            .virtual_size()
            .saturating_sub(from)
            .min(other.len() as u64);
        if inside > 0 {
            // At most b - a.
            baseline.read_at(&mut other[..inside as usize], from)?;
        }
        // Compressed clusters are written whole; otherwise what differs,
        // unit by unit of allocation, as qemu-img's rebase writes it.
        let block = match (self.cluster, self.compressor) {
            (0, _) => 512,
            (c, Some(_)) => c as usize,
            _ => self.subcluster.max(512) as usize,
        };
        // Past the end of the old backing chain the source reads zeros it
        // holds nowhere: they are written as zeros, as qemu-img's rebase
        // writes them (elsewhere the old data is copied).
        let old_end = self.source.backing().map_or(0, |b| b.virtual_size());
        let mut i = 0;
        while i < b - a {
            let end = (i + block).min(b - a);
            if buf[a + i..a + end] == other[i..end] {
                i = end;
                continue;
            }
            let at = start + (a + i) as u64;
            if self.source_offset + at >= old_end && is_zero(&buf[a + i..a + end]) {
                pieces.push(Piece::Zero {
                    at,
                    len: (end - i) as u64,
                });
                i = end;
                continue;
            }
            let packed = self.compressor.and_then(|c| {
                let mut whole = buf[a + i..a + end].to_vec();
                whole.resize(block, 0);
                c.compress_cluster(&whole)
            });
            if let Some(bytes) = packed {
                pieces.push(Piece::Packed {
                    at: start + (a + i) as u64,
                    bytes,
                });
            } else {
                match pieces.last_mut() {
                    Some(Piece::Data { end: last, .. }) if *last == a + i => *last = a + end,
                    _ => pieces.push(Piece::Data {
                        at: start + (a + i) as u64,
                        start: a + i,
                        end: a + end,
                    }),
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Plans the writes of `buf[a..b]`, data read for target offset
    /// `start + a`.
    fn plan_data(&self, buf: &[u8], start: u64, a: usize, b: usize, pieces: &mut Vec<Piece>) {
        let block = self.zero_block();
        if let Some(compressor) = self.compressor {
            let cluster = self.cluster as usize;
            let mut padded = Vec::new();
            for c in (a..b).step_by(cluster) {
                let data = &buf[c..(c + cluster).min(b)];
                let at = start + c as u64;
                if block > 0 && is_zero(data) {
                    if !self.zeros_read_back() {
                        pieces.push(Piece::Zero {
                            at,
                            len: data.len() as u64,
                        });
                    }
                    continue;
                }
                let packed = if data.len() == cluster {
                    compressor.compress_cluster(data)
                } else {
                    // The disk's last, partial cluster: padded with zeros.
                    padded.clear();
                    padded.extend_from_slice(data);
                    padded.resize(cluster, 0);
                    compressor.compress_cluster(&padded)
                };
                pieces.push(match packed {
                    Some(bytes) => Piece::Packed { at, bytes },
                    None => Piece::Data {
                        at,
                        start: c,
                        end: c + data.len(),
                    },
                });
            }
            return;
        }
        let min_sectors = (self.min_zero_run / 512) as usize;
        let runs = if block > 0 && self.min_zero_run > self.cluster {
            // Clusters smaller than the minimum (or none): qemu-img's rule.
            let alignment = 1usize << min_sectors.max(1).ilog2();
            let first_sector = (start + a as u64) / 512;
            super::sparse::sparse_runs(&buf[a..b], first_sector, min_sectors, alignment)
        } else {
            runs(&buf[a..b], block)
        };
        for (offset, len, zero) in runs {
            let at = start + (a + offset) as u64;
            if !zero {
                pieces.push(Piece::Data {
                    at,
                    start: a + offset,
                    end: a + offset + len,
                });
            } else if !self.zeros_read_back() {
                pieces.push(Piece::Zero {
                    at,
                    len: len as u64,
                });
            }
        }
    }
}

/// What a run of the source needs.
#[derive(PartialEq, Eq)]
enum What {
    /// Nothing (the target already reads the same).
    Skip,
    /// Zeroing.
    Zero,
    /// Reading and writing.
    Data,
}

/// `data` cut into runs of data and runs of whole zero blocks of `block`
/// bytes, as (offset, length, zero). A block size of 0 finds no zeros.
pub(super) fn runs(data: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    if block == 0 {
        return vec![(0, data.len(), false)];
    }
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let end = (i + block).min(data.len());
        let zero = is_zero(&data[i..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += end - i,
            _ => runs.push((i, end - i, zero)),
        }
        i = end;
    }
    runs
}

/// Whether every byte is zero: 64-byte blocks (which the compiler
/// vectorizes), stopping at the first one that is not.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn zero_blocks_split_runs() {
        let mut data = vec![0u8; 16];
        data[0] = 1;
        data[9] = 2;
        assert_eq!(
            runs(&data, 4),
            vec![(0, 4, false), (4, 4, true), (8, 4, false), (12, 4, true)]
        );
        assert_eq!(runs(&data, 0), vec![(0, 16, false)]);
        assert_eq!(runs(&[0u8; 8], 4), vec![(0, 8, true)]);
        assert_eq!(runs(&[0u8; 6], 4), vec![(0, 6, true)]);
    }
}
