//! Writing the refcount structure `check -r all` rebuilds from its counts
//! (placed as QEMU places it, in clusters nothing uses; see
//! [`super::refcount_placement`]): on disk before the header is switched to
//! it in one write, so a crash leaves the old structure in place. Also the
//! raw reading of L2 tables that repairs rewrite.

use qcow_format::limits::MAX_REFCOUNT_TABLE_BYTES;
use qcow_format::table::refcount_set;
use qcow_io::Storage;

use super::{Qcow2Image, decode_be_words};
use crate::{Error, Result};

impl Qcow2Image {
    /// The L2 table at `offset` as stored, refused when misaligned or past
    /// the end of the file (it is written back where it was read).
    pub(super) fn read_l2_words(&self, offset: u64) -> Result<Vec<u64>> {
        let cs = self.header.cluster_size();
        if offset % cs != 0 || offset.saturating_add(cs) > self.file_len() {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "L2 table",
                offset,
                reason: "misaligned or past the end of the file".into(),
            });
        }
        // One cluster: at most 2 MiB.
        let mut bytes = vec![0u8; cs as usize];
        self.file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.name, "reading an L2 table", offset, e))?;
        Ok(decode_be_words(&bytes))
    }

    /// Points the header at the refcount table at `table_offset`.
    fn point_header_at_refcounts(&mut self, table_offset: u64, table_clusters: u64) -> Result<()> {
        super::allocator::write_reftable_pointer(
            &*self.file,
            &self.name,
            table_offset,
            table_clusters,
        )?;
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(())
    }

    /// Writes the refcount structure `check -r all` rebuilds from its
    /// in-memory counts (one per cluster of the file, every use counted,
    /// the old structure's too), placed as QEMU places it (see
    /// [`super::refcount_placement`]), then points the header at it. The
    /// new blocks and table go where nothing is in use, and are on disk
    /// before the header names them.
    pub(super) fn write_placed_refcounts(&mut self, mut counts: Vec<u32>) -> Result<()> {
        let bits = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        let order = self.header.refcount_order;
        let per_block = (cs * 8) >> order;
        let placed = super::refcount_placement::place(&mut counts, per_block, cs / 8);
        if placed.table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::format(
                &self.name,
                qcow_format::FormatError::TooLarge {
                    structure: "refcount table",
                    size: placed.table_clusters * cs,
                    limit: MAX_REFCOUNT_TABLE_BYTES,
                },
            ));
        }
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let mut end = 0;
        for (index, &block) in placed.blocks.iter().enumerate() {
            if block == 0 {
                continue;
            }
            // One cluster per block.
            let mut bytes = vec![0u8; cs as usize];
            let first = index as u64 * per_block;
            for i in 0..per_block {
                let n = usize::try_from(first + i)
                    .ok()
                    .and_then(|c| counts.get(c))
                    .map_or(0, |&n| u64::from(n));
                if n > max {
                    return Err(Error::RefcountOverflow {
                        image: self.name.clone(),
                        cluster: (first + i) << bits,
                        max,
                    });
                }
                if n > 0 {
                    refcount_set(&mut bytes, i, order, n);
                }
            }
            let at = block << bits;
            self.file
                .write_at(&bytes, at)
                .map_err(|e| Error::io(&self.name, "writing a refcount block", at, e))?;
            end = end.max(at + cs);
        }
        let mut table = vec![0u8; (placed.table_clusters * cs) as usize];
        for (entry, &block) in table.chunks_exact_mut(8).zip(&placed.blocks) {
            entry.copy_from_slice(&(block << bits).to_be_bytes());
        }
        let table_offset = placed.table_start << bits;
        self.file
            .write_at(&table, table_offset)
            .map_err(|e| Error::io(&self.name, "writing the refcount table", table_offset, e))?;
        end = end.max(table_offset + table.len() as u64);
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))?;
        self.file_len
            .fetch_max(end, std::sync::atomic::Ordering::AcqRel);
        self.point_header_at_refcounts(table_offset, placed.table_clusters)
    }
}
