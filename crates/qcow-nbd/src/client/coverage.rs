//! Which bytes of a READ the reply's chunks have covered. A server must
//! not send chunks that overlap; one that does (two chunks for the first
//! half of a read and none for the second, say) would otherwise leave the
//! caller's buffer partly unwritten while the byte counts add up. Chunks
//! that follow each other merge into one range, so a server sending in
//! order (as qemu-nbd does) costs one range; a server scattering its
//! chunks is refused past [`MAX_RANGES`] separate ranges.

/// Separate ranges a reply may leave before it is refused.
pub(super) const MAX_RANGES: usize = 4096;

/// Why a chunk was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// It covers bytes another chunk covered.
    Overlap,
    /// The chunks so far leave too many separate ranges.
    Scattered,
}

/// The covered bytes, as sorted, separate `start..end` ranges.
#[derive(Debug, Default)]
pub(super) struct Coverage {
    ranges: Vec<(u64, u64)>,
    total: u64,
}

impl Coverage {
    /// Bytes covered.
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// Adds `start..start + len`.
    pub(super) fn add(&mut self, start: u64, len: u64) -> Result<(), Refused> {
        if len == 0 {
            return Ok(());
        }
        let end = start.saturating_add(len);
        // The first range that ends after `start`.
        let at = self.ranges.partition_point(|&(_, e)| e <= start);
        if self.ranges.get(at).is_some_and(|&(s, _)| s < end) {
            return Err(Refused::Overlap);
        }
        let joins_before = at > 0 && self.ranges[at - 1].1 == start;
        let joins_after = self.ranges.get(at).is_some_and(|&(s, _)| s == end);
        match (joins_before, joins_after) {
            (true, true) => {
                self.ranges[at - 1].1 = self.ranges[at].1;
                self.ranges.remove(at);
            }
            (true, false) => self.ranges[at - 1].1 = end,
            (false, true) => self.ranges[at].0 = start,
            (false, false) => {
                if self.ranges.len() >= MAX_RANGES {
                    return Err(Refused::Scattered);
                }
                self.ranges.insert(at, (start, end));
            }
        }
        self.total += len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_any_order_merge_and_overlaps_are_refused() {
        let mut c = Coverage::default();
        c.add(100, 50).unwrap();
        c.add(0, 50).unwrap();
        c.add(50, 50).unwrap();
        assert_eq!(c.ranges, vec![(0, 150)]);
        assert_eq!(c.add(149, 1), Err(Refused::Overlap));
        assert_eq!(c.add(10, 500), Err(Refused::Overlap));
        c.add(200, 10).unwrap();
        assert_eq!(c.add(190, 11), Err(Refused::Overlap));
        c.add(150, 50).unwrap();
        assert_eq!(c.ranges, vec![(0, 210)]);
        assert_eq!(c.total(), 210);
        c.add(300, 0).unwrap();
        assert_eq!(c.total(), 210);
    }

    #[test]
    fn scattered_chunks_are_refused_past_the_limit() {
        let mut c = Coverage::default();
        for i in 0..MAX_RANGES as u64 {
            c.add(i * 2, 1).unwrap();
        }
        assert_eq!(c.add(1 << 20, 1), Err(Refused::Scattered));
        // Filling a gap still works: it merges.
        c.add(1, 1).unwrap();
    }
}
