//! Managing persistent dirty bitmaps, as qemu-img bitmap does: add,
//! remove, clear, enable, disable and merge, each stored at once (new
//! tables and a new directory, switched in crash-safely; see
//! [`dirty_bitmaps`](super::dirty_bitmaps)). Refusals use QEMU's words.

use std::sync::atomic::{AtomicBool, Ordering};

use qcow_format::bitmap::{
    BITMAP_AUTO, BITMAP_KIND_DIRTY, BitmapEntry, MAX_GRANULARITY_BITS, MAX_NAME_BYTES,
    MIN_GRANULARITY_BITS,
};
use qcow_format::limits::MAX_BITMAPS;

use super::Qcow2Image;
use super::dirty_bitmaps::{Bitmap, BitmapSet, BitmapTracker, Bits};
use crate::{Error, Result};

impl Qcow2Image {
    /// The granularity QEMU gives a bitmap added without one: the cluster
    /// size, at least 4 KiB and at most 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.header.cluster_size().clamp(4096, 65536)
    }

    /// Adds an empty persistent bitmap named `name` that records writes
    /// (`enabled`) or not, of `granularity` bytes per bit (default:
    /// [`Qcow2Image::default_bitmap_granularity`]).
    pub fn add_bitmap(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        self.check_writable()?;
        let granularity = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        let refuse = |reason: &str| Err(self.bitmap_error(reason.to_owned()));
        if name.is_empty() {
            return refuse("Bitmap name cannot be empty");
        }
        let persistent = |why: &str| {
            Err(self.bitmap_error(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.name
            )))
        };
        if self.header.version < 3 {
            return persistent("Cannot store dirty bitmaps in qcow2 v2 files");
        }
        if !granularity.is_power_of_two()
            || !(1 << MIN_GRANULARITY_BITS..=1 << MAX_GRANULARITY_BITS).contains(&granularity)
        {
            return refuse("Granularity must be power of 2 and at least 512");
        }
        if name.len() > MAX_NAME_BYTES {
            return persistent(&format!(
                "Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
            ));
        }
        if !super::dirty_bitmaps::bitmap_fits(self.virtual_size.div_ceil(granularity)) {
            return persistent(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            );
        }
        let granularity_bits = granularity.trailing_zeros() as u8;
        // Bounded just above.
        let bits = Bits::new(self.virtual_size, granularity_bits);
        self.flush()?;
        self.ensure_bitmap_tracker();
        let result = self.change_bitmaps(|set| {
            if set.find(name).is_some() {
                return Err(format!("Bitmap already exists: {name}"));
            }
            if set.bitmaps.len() >= MAX_BITMAPS as usize {
                return Err(format!(
                    "Can't make bitmap '{name}' persistent in '{}': Maximum number of persistent bitmaps is already reached",
                    self.name
                ));
            }
            set.bitmaps.push(Bitmap {
                entry: BitmapEntry {
                    name: name.to_owned(),
                    granularity_bits,
                    flags: if enabled { BITMAP_AUTO } else { 0 },
                    table_offset: 0,
                    table_size: 0,
                    kind: BITMAP_KIND_DIRTY,
                    extra_data: Vec::new(),
                },
                enabled,
                bits: Some(bits),
                changed: AtomicBool::new(true),
            });
            Ok(None)
        });
        self.sync_bitmaps();
        result
    }

    /// Removes the bitmap named `name` (also one found in use), freeing
    /// its clusters.
    pub fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let result = self.change_bitmaps(|set| {
            let index = set.find(name).ok_or_else(|| not_found(name))?;
            Ok(Some(set.bitmaps.remove(index).entry))
        });
        self.sync_bitmaps();
        result
    }

    /// Clears every bit of the bitmap named `name`.
    pub fn clear_bitmap(&mut self, name: &str) -> Result<()> {
        self.change_usable_bitmap(name, |bitmap| {
            if let Some(bits) = &bitmap.bits {
                bits.clear();
            }
        })
    }

    /// Makes the bitmap named `name` record writes, or stop recording.
    pub fn set_bitmap_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        self.change_usable_bitmap(name, |bitmap| bitmap.enabled = enabled)
    }

    /// Sets the bits of the bitmap named `name` that cover each of the
    /// guest `ranges` (`(offset, len)`): merging another bitmap's dirty
    /// ranges ([`Qcow2Image::bitmap_ranges`]) into it.
    pub fn merge_into_bitmap(&mut self, name: &str, ranges: &[(u64, u64)]) -> Result<()> {
        self.change_usable_bitmap(name, |bitmap| {
            if let Some(bits) = &bitmap.bits {
                for &(offset, len) in ranges {
                    bits.set_range(offset, len);
                }
            }
        })
    }

    /// The guest ranges (`(offset, len)`, merged) whose bits are set in
    /// the bitmap named `name`, as stored or, on a writable image, as
    /// recorded so far. Refused for a bitmap found in use.
    pub fn bitmap_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        if let Some(tracker) = self.bitmap_tracker() {
            let set = tracker.read();
            let index = set
                .find(name)
                .ok_or_else(|| self.bitmap_error(not_found(name)))?;
            return match &set.bitmaps[index].bits {
                Some(bits) => bits
                    .ranges(self.virtual_size)
                    .ok_or_else(|| self.bitmap_error(too_many(name))),
                None => Err(self.bitmap_error(inconsistent(name))),
            };
        }
        let entry = self
            .bitmaps
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| self.bitmap_error(not_found(name)))?;
        if entry.in_use() {
            return Err(self.bitmap_error(inconsistent(name)));
        }
        self.read_bitmap_bits(entry)?
            .ranges(self.virtual_size)
            .ok_or_else(|| self.bitmap_error(too_many(name)))
    }

    /// [`Qcow2Image::bitmap_ranges`] for guest bytes `offset..offset + len`
    /// only (whole granules: ranges may reach outside): on a writable image
    /// from the bits recorded so far, without reading the whole bitmap.
    pub fn bitmap_ranges_in(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if let Some(tracker) = self.bitmap_tracker() {
            let set = tracker.read();
            let index = set
                .find(name)
                .ok_or_else(|| self.bitmap_error(not_found(name)))?;
            return match &set.bitmaps[index].bits {
                Some(bits) => bits
                    .ranges_in(offset, len, self.virtual_size)
                    .ok_or_else(|| self.bitmap_error(too_many(name))),
                None => Err(self.bitmap_error(inconsistent(name))),
            };
        }
        let end = offset.saturating_add(len);
        Ok(self
            .bitmap_ranges(name)?
            .into_iter()
            .filter(|&(s, l)| s < end && offset < s + l)
            .collect())
    }

    /// Refuses a disk size some bitmap could not be stored for (more than
    /// QEMU's limit of bits).
    pub(super) fn check_bitmaps_fit(&self, disk_size: u64) -> Result<()> {
        match self
            .bitmaps
            .iter()
            .find(|b| !super::dirty_bitmaps::bitmap_fits(disk_size.div_ceil(b.granularity())))
        {
            Some(b) => Err(self.bitmap_error(format!(
                "Bitmap '{}': Too much space will be occupied by the bitmap. Use larger granularity",
                b.name
            ))),
            None => Ok(()),
        }
    }

    /// Refuses an operation on a bitmap found in use (QEMU's words).
    pub(super) fn check_bitmaps_usable(&self) -> Result<()> {
        match self.bitmaps.iter().find(|b| b.in_use()) {
            Some(b) => Err(self.bitmap_error(inconsistent(&b.name))),
            None => Ok(()),
        }
    }

    /// Resizes every bitmap's bits to the disk's new size (after a resize):
    /// they are stored at the next flush.
    pub(super) fn resize_bitmaps(&self) {
        let Some(tracker) = self.bitmap_tracker() else {
            return;
        };
        let mut set = tracker.write();
        for bitmap in &mut set.bitmaps {
            if let Some(bits) = &bitmap.bits {
                bitmap.bits = Some(bits.resized(self.virtual_size));
                bitmap.changed.store(true, Ordering::Release);
            }
        }
    }

    fn change_usable_bitmap(&mut self, name: &str, change: impl FnOnce(&mut Bitmap)) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let result = self.change_bitmaps(|set| {
            let index = set.find(name).ok_or_else(|| not_found(name))?;
            let bitmap = &mut set.bitmaps[index];
            if bitmap.bits.is_none() {
                return Err(inconsistent(name));
            }
            change(bitmap);
            bitmap.changed.store(true, Ordering::Release);
            Ok(None)
        });
        self.sync_bitmaps();
        result
    }

    /// Applies `change` to the bitmaps (it may drop one, returned to free
    /// its clusters) and stores them; a refusal (`Err` with QEMU's words)
    /// changes nothing.
    fn change_bitmaps(
        &self,
        change: impl FnOnce(&mut BitmapSet) -> std::result::Result<Option<BitmapEntry>, String>,
    ) -> Result<()> {
        let Some(tracker) = self.bitmap_tracker() else {
            return Err(self.bitmap_error("no bitmaps".into()));
        };
        let mut set = tracker.write();
        let before = set.bitmaps.len();
        let dropped = change(&mut set).map_err(|reason| self.bitmap_error(reason))?;
        tracker.update_recording(&set);
        let result = self.write_bitmaps(tracker, &mut set, dropped.into_iter().collect());
        if result.is_err() && set.bitmaps.len() > before {
            // An added bitmap that could not be stored is not added.
            set.bitmaps.truncate(before);
            tracker.update_recording(&set);
        }
        self.guard(result)
    }

    /// Gives a writable image without bitmaps an empty tracker, for its
    /// first one.
    fn ensure_bitmap_tracker(&mut self) {
        if let Some(ws) = self.writer.as_mut() {
            if ws.bitmaps.is_none() {
                ws.bitmaps = Some(BitmapTracker::new(
                    Vec::new(),
                    self.header.bitmaps().copied(),
                ));
            }
        }
    }

    fn bitmap_error(&self, reason: String) -> Error {
        Error::Bitmap {
            image: self.name.clone(),
            reason,
        }
    }
}

fn not_found(name: &str) -> String {
    format!("Dirty bitmap '{name}' not found")
}

fn too_many(name: &str) -> String {
    format!(
        "Bitmap '{name}' has more than {} dirty ranges",
        super::dirty_bitmaps::MAX_RANGES
    )
}

fn inconsistent(name: &str) -> String {
    format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    )
}
