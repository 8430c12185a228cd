//! Where a rebuilt refcount structure goes, decided as QEMU's
//! `rebuild_refcount_structure` decides it, so that `check -r all` and the
//! repair of a dirty image leave qemu-img's layout.
//!
//! The input is the in-memory refcount table of the check: one count per
//! cluster of the file, every use counted (the old refcount structure
//! too, so that nothing live is overwritten before the header names the
//! new one). Clusters are taken first-fit from the start of the file:
//!
//! 1. For every cluster in use, in order, the refcount block covering it
//!    gets a cluster if it has none, searched from the start of that
//!    block's range (never in a range already passed, whose block would be
//!    stale), the file growing when no cluster is free.
//! 2. The refcount table then gets the first run of free clusters large
//!    enough; the blocks covering it are found as in 1. If that made the
//!    table longer, it is placed again (the first place stays taken, and
//!    a later check frees it).
//!
//! Every new cluster counts once in the table it was taken from, and the
//! blocks hold the final counts.

/// What [`place`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Placement {
    /// The cluster of each refcount block, by block index (0: none).
    pub(super) blocks: Vec<u64>,
    /// The refcount table's first cluster.
    pub(super) table_start: u64,
    /// The refcount table's length in clusters.
    pub(super) table_clusters: u64,
}

/// The in-memory refcounts and the state of the placement.
struct Placer<'a> {
    counts: &'a mut Vec<u32>,
    /// Refcount entries per block.
    per_block: u64,
    /// Table entries per cluster.
    per_table_cluster: u64,
    blocks: Vec<u64>,
}

impl Placer<'_> {
    fn used(&self, cluster: u64) -> bool {
        usize::try_from(cluster)
            .ok()
            .and_then(|i| self.counts.get(i))
            .is_some_and(|&n| n > 0)
    }

    /// Takes `n` free clusters in a row, searched from `*first_free`
    /// (moved to the first free cluster seen), growing the table past its
    /// end when no run is long enough; returns the first.
    fn take(&mut self, n: u64, first_free: &mut u64) -> u64 {
        let len = self.counts.len() as u64;
        let mut cluster = *first_free;
        let mut run = 0;
        let mut first_gap = true;
        while cluster < len && run < n {
            if self.used(cluster) {
                run = 0;
            } else {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            }
            cluster += 1;
        }
        let end = cluster + (n - run);
        if end > len {
            self.counts.resize(end as usize, 0);
        }
        let start = end - n;
        for c in start..end {
            self.counts[c as usize] = 1;
        }
        start
    }

    /// Gives a block to every range with a cluster in use among
    /// `first..end` (`end` grows with blocks taken past it). Returns
    /// whether the table had to grow.
    fn cover(&mut self, first: u64, mut end: u64) -> bool {
        let mut grown = false;
        let mut first_free = 0;
        let mut cluster = first;
        while cluster < end {
            if !self.used(cluster) {
                cluster += 1;
                continue;
            }
            let index = cluster / self.per_block;
            let range_start = index * self.per_block;
            let has_block = self.blocks.get(index as usize).is_some_and(|&b| b != 0);
            if !has_block {
                first_free = first_free.max(range_start);
                let block = self.take(1, &mut first_free);
                if block >= end {
                    end = block + 1;
                }
                if self.blocks.len() as u64 <= index {
                    // Whole clusters of table entries.
                    let entries = (index + 1).next_multiple_of(self.per_table_cluster);
                    self.blocks.resize(entries as usize, 0);
                    grown = true;
                }
                self.blocks[index as usize] = block;
            }
            cluster = range_start + self.per_block;
        }
        grown
    }
}

/// Places a refcount structure of blocks of `per_block` entries and a
/// table of `per_table_cluster` entries per cluster for `counts` (one per
/// cluster of the file), counting the clusters it takes there.
pub(super) fn place(counts: &mut Vec<u32>, per_block: u64, per_table_cluster: u64) -> Placement {
    let mut placer = Placer {
        counts,
        per_block,
        per_table_cluster,
        blocks: Vec::new(),
    };
    let end = placer.counts.len() as u64;
    placer.cover(0, end);
    loop {
        let table_clusters = (placer.blocks.len() as u64)
            .div_ceil(per_table_cluster)
            .max(1);
        let mut first_free = 0;
        let table_start = placer.take(table_clusters, &mut first_free);
        if !placer.cover(table_start, table_start + table_clusters) {
            return Placement {
                blocks: placer.blocks,
                table_start,
                table_clusters,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fill_gaps_then_the_table_follows() {
        // Clusters 0-6 in use except 3: the block takes 3, the table the
        // first cluster past the end.
        let mut counts = vec![1, 1, 1, 0, 1, 1, 1];
        let placed = place(&mut counts, 32768, 8192);
        assert_eq!(placed.blocks[0], 3);
        assert_eq!(placed.blocks.len(), 8192);
        assert_eq!((placed.table_start, placed.table_clusters), (7, 1));
        assert_eq!(counts, vec![1; 8]);
    }

    #[test]
    fn a_block_is_never_placed_in_a_range_already_covered() {
        // Blocks of 4 entries, tables of 2 entries a cluster. Range 0's
        // block takes the gap at 5 (in range 1, not yet passed); range 1's
        // then goes past the end, to 8, which starts range 2, whose block
        // goes to 9; the table (4 entries: 2 clusters) follows.
        let mut counts = vec![1, 1, 1, 1, 1, 0, 1, 1];
        let placed = place(&mut counts, 4, 2);
        assert_eq!(placed.blocks, vec![5, 8, 9, 0]);
        assert_eq!((placed.table_start, placed.table_clusters), (10, 2));
        assert_eq!(counts, vec![1; 12]);
    }

    #[test]
    fn a_table_that_grows_is_placed_again_and_the_first_place_stays_taken() {
        // Blocks of 2 entries, tables of 4 entries a cluster: the blocks
        // covering the first table make it longer.
        let mut counts = vec![1; 7];
        let placed = place(&mut counts, 2, 4);
        // Blocks 7-13 for the clusters in use, then the first table at
        // 14-15, which stays taken when the table is placed again.
        assert_eq!(&placed.blocks[..7], &[7, 8, 9, 10, 11, 12, 13]);
        assert_eq!((counts[14], counts[15]), (1, 1));
        assert!(placed.table_start > 15);
        let table = placed.table_start..placed.table_start + placed.table_clusters;
        assert!(table.clone().all(|c| counts[c as usize] == 1));
        // Every cluster in use has a block, and the table holds them all.
        for c in 0..counts.len() as u64 {
            if counts[c as usize] > 0 {
                assert_ne!(placed.blocks[(c / 2) as usize], 0, "cluster {c}");
            }
        }
        assert_eq!(placed.blocks.len() as u64, placed.table_clusters * 4);
    }
}
