//! Flushing and closing a writable image: refcounts reach the disk before
//! the L2 tables that use them, clusters those tables stopped using are
//! released only after that, and closing clears the dirty bit of a lazy
//! refcounts image.

use std::sync::atomic::Ordering;

use qcow_format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow_io::Storage;

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Makes everything written so far durable: refcounts, then L2 tables,
    /// then the release of clusters they stopped using, then the file; then
    /// the persistent bitmaps that changed are stored and their in-use marks
    /// cleared (see [`dirty_bitmaps`](super::dirty_bitmaps)).
    pub fn flush(&self) -> Result<()> {
        self.flush_metadata()?;
        self.store_bitmaps()
    }

    /// [`Qcow2Image::flush`] without storing the bitmaps.
    pub(super) fn flush_metadata(&self) -> Result<()> {
        let Some(ws) = &self.writer else {
            return Ok(());
        };
        let mut meta = ws.allocator.lock(self);
        // Data first (an external data file), then the metadata using it.
        if let (true, Some(data)) = (self.header.has_data_file(), &self.data) {
            data.flush()
                .map_err(|e| Error::io(&self.name, "flushing the data file", 0, e))?;
        }
        self.flush_refcounts()?;
        self.l2.flush()?;
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        if !meta.pending_frees.is_empty() {
            meta.release_pending()?;
            self.flush_refcounts()?;
            self.file
                .flush()
                .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        }
        Ok(())
    }

    /// Flushes and closes the image, clearing the dirty bit of a lazy
    /// refcounts image, and reports any error (dropping the image does the
    /// same, but cannot report).
    pub fn close(self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&self) -> Result<()> {
        let Some(ws) = &self.writer else {
            return Ok(());
        };
        self.flush()?;
        if ws.incompatible.load(Ordering::Acquire) & INCOMPAT_DIRTY != 0 && !ws.dirty_kept() {
            self.update_incompatible(|bits| {
                if bits & INCOMPAT_CORRUPT == 0 {
                    bits & !INCOMPAT_DIRTY
                } else {
                    bits
                }
            })?;
        }
        Ok(())
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // Best effort: an error here has nowhere to go; close() reports it.
        let _ = self.shut_down();
    }
}
