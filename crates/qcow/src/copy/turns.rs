//! Writing in guest order by turns: each worker reads its chunk, waits for
//! the chunks before it to be written, then writes its own. The data stays
//! in the cache of the processor that read it, no chunk is handed between
//! threads, and one worker writes while the others read. A failure stops
//! every worker still waiting for its turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use crate::Error;

/// How many times a worker looks for its turn before it sleeps.
const SPINS: u32 = 20_000;

/// Whose turn it is to write, or why the copy stopped.
#[derive(Debug, Default)]
pub(super) struct Turns {
    state: Mutex<State>,
    changed: Condvar,
    /// `state.next`, and `u64::MAX` once the copy failed: read without
    /// the lock by a worker spinning for its turn.
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// The chunk whose turn it is.
    next: u64,
    /// The first failure; no turn comes after it.
    failed: Option<Error>,
}

impl Turns {
    /// Waits until every chunk before `index` is written. False when the
    /// copy failed first: the caller is to stop without writing.
    pub(super) fn wait_for(&self, index: u64) -> bool {
        // The next in line usually gets its turn within a write's time:
        // spinning for it a little saves the sleep and wake-up (tens of
        // microseconds on a virtual machine, per chunk). Workers further
        // back sleep at once, leaving the processors to the others.
        for _ in 0..SPINS {
            match self.next.load(Ordering::Acquire) {
                n if n == index => return true,
                u64::MAX => return false,
                n if n + 1 == index => std::hint::spin_loop(),
                _ => break,
            }
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.next != index && state.failed.is_none() {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.failed.is_none()
    }

    /// Chunk `index` is written (called in its turn): the next one's turn.
    pub(super) fn done(&self, index: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.next = index + 1;
        if state.failed.is_none() {
            self.next.store(index + 1, Ordering::Release);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// The copy failed with `error` (the first failure is kept).
    pub(super) fn fail(&self, error: Error) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.failed.get_or_insert(error);
        self.next.store(u64::MAX, Ordering::Release);
        drop(state);
        self.changed.notify_all();
    }

    /// Runs `work`; if it panics, the copy fails first, so that no worker
    /// waits for a turn that will not come, and the panic goes on.
    pub(super) fn failing_on_panic(&self, work: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
            self.fail(Error::Cancelled);
            std::panic::resume_unwind(panic);
        }
    }

    /// The first failure, if any.
    pub(super) fn into_failure(self) -> Option<Error> {
        self.state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_write_in_order_whatever_order_they_read_in() {
        let turns = Turns::default();
        let written = Mutex::new(Vec::new());
        let next = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for worker in 0..4u64 {
                let (turns, written, next) = (&turns, &written, &next);
                scope.spawn(move || {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= 40 {
                            return;
                        }
                        // Workers finish reading in a scrambled order.
                        std::thread::sleep(std::time::Duration::from_micros(
                            (index * 7 + worker * 13) % 5 * 100,
                        ));
                        assert!(turns.wait_for(index));
                        written.lock().expect("lock").push(index);
                        turns.done(index);
                    }
                });
            }
        });
        assert_eq!(
            written.into_inner().expect("lock"),
            (0..40).collect::<Vec<_>>()
        );
        assert!(turns.into_failure().is_none());
    }

    #[test]
    fn a_failure_ends_every_later_turn_and_keeps_the_first_error() {
        let turns = Turns::default();
        assert!(turns.wait_for(0));
        turns.done(0);
        turns.fail(Error::Cancelled);
        turns.fail(Error::ReadOnly {
            image: "later".into(),
        });
        // Chunk 1's turn came, but the copy has failed: nobody writes.
        assert!(!turns.wait_for(1));
        assert!(!turns.wait_for(5));
        assert!(matches!(turns.into_failure(), Some(Error::Cancelled)));
    }

    #[test]
    fn a_worker_that_panics_ends_the_others_waits() {
        let turns = Turns::default();
        let outcome = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| turns.wait_for(3));
            let panicking = scope.spawn(|| turns.failing_on_panic(|| panic!("a bug")));
            (waiting.join(), panicking.join())
        });
        assert_eq!(outcome.0.ok(), Some(false));
        assert!(outcome.1.is_err());
    }
}
