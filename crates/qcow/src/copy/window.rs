//! How far ahead of the collecting thread the readers may read. Chunks
//! are handed on in guest order; one that is slow to read (a stalled
//! network source, a range being retried sector by sector) would otherwise
//! let the other readers run on through the disk while every chunk they
//! read waits in memory for it. A reader holding chunk `index` waits until
//! the collector has taken every chunk before `index - ahead`, so that at
//! most `ahead` chunks wait at a time, whatever the disk's size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Chunks each worker may read ahead of the one the collector waits for.
pub(super) const AHEAD_PER_WORKER: u64 = 4;

/// How long a waiting reader sleeps before it looks at the stop flag again
/// (the collector wakes it sooner when it moves on).
const STOP_POLL: Duration = Duration::from_millis(10);

/// The first chunk the collector has not taken yet, and how far past it
/// readers may go.
#[derive(Debug)]
pub(super) struct Window {
    taken: Mutex<u64>,
    moved: Condvar,
    ahead: u64,
}

impl Window {
    /// A window of `ahead` chunks (at least one).
    pub(super) fn new(ahead: u64) -> Self {
        Self {
            taken: Mutex::new(0),
            moved: Condvar::new(),
            ahead: ahead.max(1),
        }
    }

    /// Waits until chunk `index` is within the window. False when `stop`
    /// was set first.
    pub(super) fn wait_for(&self, index: u64, stop: &AtomicBool) -> bool {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            if index < taken.saturating_add(self.ahead) {
                return true;
            }
            taken = self
                .moved
                .wait_timeout(taken, STOP_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The collector has taken every chunk before `taken`.
    pub(super) fn taken(&self, taken: u64) {
        *self.taken.lock().unwrap_or_else(PoisonError::into_inner) = taken;
        self.moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_reader_past_the_window_waits_until_the_collector_moves_on() {
        let window = Arc::new(Window::new(2));
        let stop = AtomicBool::new(false);
        assert!(window.wait_for(0, &stop) && window.wait_for(1, &stop));
        let waiter = {
            let window = Arc::clone(&window);
            std::thread::spawn(move || window.wait_for(3, &AtomicBool::new(false)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "chunk 3 ran ahead of the window");
        window.taken(2);
        assert!(waiter.join().expect("waiter"));
    }

    #[test]
    fn a_stop_releases_waiting_readers() {
        let window = Window::new(1);
        let stop = AtomicBool::new(true);
        assert!(!window.wait_for(5, &stop));
        assert!(!window.wait_for(0, &stop));
    }
}
