//! qemu-img convert's `-S` rule, sector by sector: a run of zero sectors
//! is left sparse only when it is at least the minimum long, and runs are
//! trimmed or stretched to the alignment (the largest power of two in the
//! minimum) so that writes do not start or end inside an aligned block.
//! Used where the target's clusters are smaller than the minimum (or it has
//! none); with larger clusters, whole clusters are judged instead, which
//! lays a cluster-aligned target out the same.

use super::plan::is_zero;

const SECTOR: usize = 512;

/// `data` (target sectors from `first_sector` on) cut into runs as
/// (offset, length, zero), zero runs at least `min_sectors` long.
pub(super) fn sparse_runs(
    data: &[u8],
    first_sector: u64,
    min_sectors: usize,
    alignment: usize,
) -> Vec<(usize, usize, bool)> {
    let sectors = Sectors { data };
    let count = data.len().div_ceil(SECTOR);
    let mut runs = Vec::new();
    let mut s = 0;
    while s < count {
        let (data_run, n) =
            sectors.allocated_min(s, count - s, min_sectors, first_sector, alignment);
        let (from, to) = (s * SECTOR, ((s + n) * SECTOR).min(data.len()));
        match runs.last_mut() {
            Some((_, len, zero)) if *zero != data_run => *len += to - from,
            _ => runs.push((from, to - from, !data_run)),
        }
        s += n;
    }
    runs
}

/// A buffer seen as sectors (the last one may be short).
struct Sectors<'a> {
    data: &'a [u8],
}

impl Sectors<'_> {
    fn zero(&self, s: usize) -> bool {
        let end = ((s + 1) * SECTOR).min(self.data.len());
        is_zero(&self.data[s * SECTOR..end])
    }

    /// Whether sectors from `s` (`n` of them, the first at target sector
    /// `first + s`) start with data, and how many share that state,
    /// aligned as qemu-img aligns them.
    fn allocated(&self, s: usize, n: usize, first: u64, alignment: usize) -> (bool, usize) {
        let mut zero = self.zero(s);
        let mut i = 1;
        while i < n && self.zero(s + i) == zero {
            i += 1;
        }
        if i == n {
            return (!zero, i);
        }
        // Alignment is a power of two.
        let tail = ((first + (s + i) as u64) % alignment as u64) as usize;
        if tail != 0 {
            if zero && i <= tail {
                // Data follows within this block: it is written whole.
                zero = false;
            }
            if zero {
                i -= tail;
            } else {
                i = (i + alignment - tail).min(n);
            }
        }
        (!zero, i)
    }

    /// As [`Sectors::allocated`], but a data run goes on over zero runs
    /// shorter than `min` sectors.
    fn allocated_min(
        &self,
        s: usize,
        n: usize,
        min: usize,
        first: u64,
        alignment: usize,
    ) -> (bool, usize) {
        let min = min.min(n);
        let (data, count) = self.allocated(s, n, first, alignment);
        if !data {
            return (false, count);
        }
        let (mut used, mut checked) = (count, count);
        while checked < n {
            let (data, count) = self.allocated(s + checked, n - checked, first, alignment);
            checked += count;
            if data {
                used = checked;
            } else if count >= min {
                break;
            }
        }
        (true, used)
    }
}

#[cfg(test)]
mod tests {
    use super::sparse_runs;

    /// QEMU's iotest 122: 1 KiB written at 0, 8 KiB and 17 KiB of an
    /// otherwise zero buffer.
    fn buffer() -> Vec<u8> {
        let mut data = vec![0u8; 128 << 10];
        for at in [0usize, 8 << 10, 17 << 10] {
            data[at..at + 1024].fill(0xcd);
        }
        data
    }

    fn data_runs(runs: &[(usize, usize, bool)]) -> Vec<(usize, usize)> {
        runs.iter()
            .filter(|r| !r.2)
            .map(|&(at, len, _)| (at, len))
            .collect()
    }

    #[test]
    fn minimum_4k_keeps_aligned_4k_blocks_as_qemu_img_does() {
        let runs = sparse_runs(&buffer(), 0, 8, 8);
        assert_eq!(data_runs(&runs), [(0, 4096), (8192, 4096), (16384, 4096)]);
    }

    #[test]
    fn minimum_8k_bridges_shorter_zero_runs() {
        let runs = sparse_runs(&buffer(), 0, 16, 16);
        assert_eq!(data_runs(&runs), [(0, 24576)]);
    }

    #[test]
    fn runs_cover_the_buffer_and_a_short_last_sector() {
        let mut data = buffer();
        data.truncate(100_000);
        let runs = sparse_runs(&data, 3, 8, 8);
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), data.len());
        assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
    }
}
