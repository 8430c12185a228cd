//! The progress `amend` reports, counted as QEMU counts it, so that
//! `qemu-img amend -p` users see the same lines: each operation (a version
//! change, a new refcount width) reports its own position and work size,
//! and the whole is projected from the operations done so far (an
//! operation that finds more work than projected makes the fraction go
//! back).
//!
//! - An upgrade reports 0, 1 and 2 of 2 steps: before, after the snapshot
//!   table, after the header.
//! - A new refcount width reports its walks over the refcount table (one
//!   step per table entry; see [`super::refcount_width`]).
//! - A downgrade reports one step per L1 entry of the active and every
//!   snapshot's L1 table.

use crate::copy::CopyObserver;

/// An amend operation that reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    Upgrade,
    RefcountWidth,
    Downgrade,
}

/// Progress over the operations of one amend.
pub(super) struct AmendProgress<'a> {
    observer: &'a dyn CopyObserver,
    /// Operations the amend performs.
    operations: u64,
    /// Operations finished.
    completed: u64,
    /// The work of the operations finished.
    offset_completed: u64,
    /// The operation that reported last, and its work size.
    last: Option<(Operation, u64)>,
}

impl<'a> AmendProgress<'a> {
    /// Progress over `operations` operations.
    pub(super) fn new(observer: &'a dyn CopyObserver, operations: u64) -> Self {
        AmendProgress {
            observer,
            operations,
            completed: 0,
            offset_completed: 0,
            last: None,
        }
    }

    /// `operation` is at `offset` of its `work`.
    pub(super) fn report(&mut self, operation: Operation, offset: u64, work: u64) {
        match self.last {
            Some((previous, size)) if previous != operation => {
                self.offset_completed += size;
                self.completed += 1;
            }
            _ => {}
        }
        self.last = Some((operation, work));
        let current = self.offset_completed + work;
        let remaining = self.operations.saturating_sub(self.completed + 1);
        let projected = current.saturating_mul(remaining) / (self.completed + 1);
        self.observer
            .progress(self.offset_completed + offset, current + projected);
    }
}
