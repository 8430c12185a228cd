//! How many workers read at once when chunks are handed on to be written
//! elsewhere (to the collecting thread, or a pool of writers that
//! encrypt). A source that costs little to read (a raw file, plain
//! clusters) needs one reader to keep the writers busy: a second only takes
//! the processor from them (a raw -> qcow2 copy took a fifth longer with
//! two when its writes went that way). Where reading works the processor
//! (decrypting, decompressing, compressing on the way, comparing with a
//! baseline), every worker reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether reading has been found to work the processor.
#[derive(Debug, Default)]
pub(super) struct Pace {
    busy: AtomicBool,
}

/// How long a reader that is not wanted waits before it looks again.
pub(super) const IDLE_READER_NAP: Duration = Duration::from_millis(1);

impl Pace {
    /// A pace for a copy whose reading is known up front to work the
    /// processor (`busy`) or not yet.
    pub(super) fn new(busy: bool) -> Self {
        Self {
            busy: AtomicBool::new(busy),
        }
    }

    /// A chunk was read; `busy` if that took work on the processor
    /// (compressed clusters). From then on every worker reads.
    pub(super) fn chunk_read(&self, busy: bool) {
        if busy {
            self.busy.store(true, Ordering::Relaxed);
        }
    }

    /// How many of `workers` should read now.
    pub(super) fn readers_wanted(&self, workers: usize) -> usize {
        if self.busy.load(Ordering::Relaxed) {
            workers.max(1)
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reader_until_reading_works_the_processor() {
        let pace = Pace::new(false);
        assert_eq!(pace.readers_wanted(4), 1);
        pace.chunk_read(false);
        assert_eq!(pace.readers_wanted(4), 1);
        pace.chunk_read(true);
        assert_eq!(pace.readers_wanted(4), 4);
        // It stays so: one chunk of plain clusters does not take it back.
        pace.chunk_read(false);
        assert_eq!(pace.readers_wanted(4), 4);
    }

    #[test]
    fn every_worker_reads_where_reading_is_known_to_be_busy() {
        assert_eq!(Pace::new(true).readers_wanted(3), 3);
        assert_eq!(Pace::new(true).readers_wanted(0), 1);
        assert_eq!(Pace::new(false).readers_wanted(0), 1);
    }
}
