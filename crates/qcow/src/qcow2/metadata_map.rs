//! Which clusters of a writable image's file hold metadata: one bit per
//! cluster, so that the overlap guard answers "is this metadata?" in
//! constant time for every allocation and every in-place data write (QEMU
//! checks each write too, by walking its structures).
//!
//! Built when the image is opened for writing from every structure the
//! guard knows, then kept up to date: new refcount blocks, refcount tables,
//! L1 and L2 tables are marked when placed, and a cluster is unmarked when
//! its refcount drops to zero. A map that cannot cover every structure (one
//! lies past the end of the file, or the file has too many clusters for the
//! map's memory bound) says so, and the guard then walks the structures
//! itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

/// Most 64-bit words the map may hold (32 MiB, a 16 TiB file of 64 KiB
/// clusters); past that the guard walks the structures.
const MAX_WORDS: u64 = 4 << 20;

/// One bit per cluster of the image file: set where metadata lives.
#[derive(Debug)]
pub(crate) struct MetadataMap {
    words: RwLock<Vec<u64>>,
    cluster_bits: u32,
    /// Some structure is not in the map: the map's "no" cannot be trusted.
    incomplete: AtomicBool,
}

impl MetadataMap {
    /// An empty map for clusters of `1 << cluster_bits` bytes.
    pub(super) fn new(cluster_bits: u32) -> Self {
        MetadataMap {
            words: RwLock::new(Vec::new()),
            cluster_bits,
            incomplete: AtomicBool::new(false),
        }
    }

    /// The clusters `start..start + len` covers (`len` > 0).
    fn clusters(&self, start: u64, len: u64) -> (u64, u64) {
        let first = start >> self.cluster_bits;
        let last = start.saturating_add(len - 1) >> self.cluster_bits;
        (first, last)
    }

    /// Marks `start..start + len` as metadata.
    pub(super) fn mark(&self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = self.clusters(start, len);
        let needed = last / 64 + 1;
        if needed > MAX_WORDS {
            self.incomplete.store(true, Ordering::Release);
            return;
        }
        let mut words = self.words.write().unwrap_or_else(PoisonError::into_inner);
        // Bounded by MAX_WORDS just above.
        if words.len() < needed as usize {
            words.resize(needed as usize, 0);
        }
        for c in first..=last {
            words[(c / 64) as usize] |= 1 << (c % 64);
        }
    }

    /// Unmarks the cluster holding byte `start` (its refcount dropped to
    /// zero: nothing uses it any more).
    pub(super) fn unmark_cluster(&self, start: u64) {
        let c = start >> self.cluster_bits;
        let mut words = self.words.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(word) = usize::try_from(c / 64).ok().and_then(|i| words.get_mut(i)) {
            *word &= !(1 << (c % 64));
        }
    }

    /// Records that a structure could not be marked (it lies where the map
    /// does not reach).
    pub(super) fn set_incomplete(&self) {
        self.incomplete.store(true, Ordering::Release);
    }

    /// Whether the map's answer can be trusted on its own.
    pub(super) fn complete(&self) -> bool {
        !self.incomplete.load(Ordering::Acquire)
    }

    /// Whether any cluster of `start..start + len` is marked.
    pub(super) fn hits(&self, start: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let (first, last) = self.clusters(start, len);
        let words = self.words.read().unwrap_or_else(PoisonError::into_inner);
        let end = (words.len() as u64 * 64).min(last.saturating_add(1));
        (first..end).any(|c| words[(c / 64) as usize] & (1 << (c % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::MetadataMap;

    #[test]
    fn marks_unmarks_and_answers_ranges() {
        let map = MetadataMap::new(16);
        assert!(!map.hits(0, 1 << 20));
        map.mark(0, 1);
        map.mark(5 << 16, 3 << 16);
        assert!(map.hits(0, 1));
        assert!(!map.hits(1 << 16, 4 << 16));
        assert!(map.hits(4 << 16, (1 << 16) + 1));
        assert!(map.hits(7 << 16, 1));
        assert!(!map.hits(8 << 16, 1 << 30));
        map.unmark_cluster(6 << 16);
        assert!(!map.hits(6 << 16, 1 << 16));
        assert!(map.hits(6 << 16, 2 << 16));
        assert!(map.complete());
        // Too far for the map's bound: it says it cannot be trusted.
        map.mark(u64::MAX - 1, 1);
        assert!(!map.complete());
    }
}
