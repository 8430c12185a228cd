//! Consistent lock-free reads of extended L2 entries.
//!
//! An extended L2 entry is two words (the cluster's host offset and its
//! subcluster bitmap) that a writer changes together under the allocation
//! lock, while readers look them up with no lock. Two separate atomic
//! stores can be seen half done: a new bitmap with the old offset. A
//! sequence counter (a seqlock) lets readers notice that and look again:
//! writers make it odd while they change a pair and even again after;
//! a reader whose counter reading was odd, or changed across its lookup,
//! repeats the lookup.

use std::sync::atomic::{AtomicU64, Ordering, fence};

/// Spins before a waiting reader starts yielding its time slice.
const SPINS_BEFORE_YIELD: u32 = 64;

/// The sequence counter of one image's L2 entries.
#[derive(Debug, Default)]
pub(crate) struct EntrySeq(AtomicU64);

impl EntrySeq {
    /// Runs `change` (which stores the words of one or more entries) so
    /// that lock-free readers never act on a half-made change. Writers must
    /// be serialised by the caller (the allocation lock).
    pub(crate) fn write<R>(&self, change: impl FnOnce() -> R) -> R {
        let start = self.0.load(Ordering::Relaxed);
        self.0.store(start.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let result = change();
        self.0.store(start.wrapping_add(2), Ordering::Release);
        result
    }

    /// Runs `lookup` until it ran with no change of entries overlapping it,
    /// and returns that run's result. `lookup` must only read.
    pub(crate) fn read<R>(&self, mut lookup: impl FnMut() -> R) -> R {
        let mut attempts = 0u32;
        loop {
            let before = self.0.load(Ordering::Acquire);
            if before & 1 == 0 {
                let result = lookup();
                fence(Ordering::Acquire);
                if self.0.load(Ordering::Relaxed) == before {
                    return result;
                }
            }
            // A writer is between two stores, which takes nanoseconds
            // unless it was descheduled there.
            attempts += 1;
            if attempts < SPINS_BEFORE_YIELD {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn readers_never_see_half_a_change() {
        // The pair (a, b) always holds b == !a when whole.
        let seq = Arc::new(EntrySeq::default());
        let pair = Arc::new([AtomicU64::new(0), AtomicU64::new(!0)]);
        let writer = {
            let (seq, pair) = (seq.clone(), pair.clone());
            std::thread::spawn(move || {
                for v in 1..200_000u64 {
                    seq.write(|| {
                        pair[1].store(!v, Ordering::Relaxed);
                        pair[0].store(v, Ordering::Relaxed);
                    });
                }
            })
        };
        let mut torn = 0;
        for _ in 0..200_000 {
            let (a, b) = seq.read(|| {
                (
                    pair[0].load(Ordering::Relaxed),
                    pair[1].load(Ordering::Relaxed),
                )
            });
            if b != !a {
                torn += 1;
            }
        }
        assert!(writer.join().is_ok());
        assert_eq!(torn, 0, "a reader saw a half-made change");
    }
}
