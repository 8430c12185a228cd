//! Reading a QCOW2 image: guest ranges resolved into runs of clusters
//! through the L1 and L2 tables, then data read outside any lock.
//!
//! A run is a stretch of (sub)clusters with the same kind of mapping and,
//! for data, consecutive host offsets, so that contiguous clusters are read
//! with one call.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow_format::table::L2Mapping;

use super::{L2Table, Qcow2Image, decode_be_words};
use crate::compress;
use crate::device::{Allocation, BlockDevice, Extent, ImageFormat};
use crate::{Error, Result};

thread_local! {
    /// The L2 table this thread used last, so that a run of lookups in one
    /// table touches no shared state but one atomic load.
    static LAST_L2: RefCell<Option<LastTable>> = const { RefCell::new(None) };
}

/// A memo of one L2 table, valid while its image's cache generation holds.
struct LastTable {
    image: u64,
    generation: u64,
    offset: u64,
    table: Arc<L2Table>,
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy)]
struct Run {
    mapping: L2Mapping,
    len: u64,
}

impl Qcow2Image {
    /// The L2 table at `offset`, from the cache or the file.
    ///
    /// A table read from the file is cached only if it did not leave the
    /// cache meanwhile (a writer may have changed it and written it back
    /// after this read); otherwise it is read again.
    pub(super) fn l2_table(&self, l1_index: u64, offset: u64) -> Result<Arc<L2Table>> {
        self.l2.get(offset, || self.read_l2_table(l1_index, offset))
    }

    /// Reads and decodes the L2 table at `offset` from the file.
    fn read_l2_table(&self, l1_index: u64, offset: u64) -> Result<L2Table> {
        let cluster_size = self.header.cluster_size();
        if offset.saturating_add(cluster_size) > self.file_len() {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "L2 table",
                offset,
                reason: format!(
                    "L1 entry {l1_index} points past the end of the file ({} bytes)",
                    self.file_len()
                ),
            });
        }
        // One cluster: at most 2 MiB.
        let mut bytes = vec![0u8; cluster_size as usize];
        self.file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.name, "reading an L2 table", offset, e))?;
        Ok(decode_be_words(&bytes)
            .into_iter()
            .map(AtomicU64::new)
            .collect())
    }

    /// Calls `f` with the L2 table at `offset`, from this thread's memo when
    /// the cache has not changed since, else from the cache or the file.
    pub(super) fn with_l2<R>(
        &self,
        l1_index: u64,
        offset: u64,
        f: impl FnOnce(&L2Table) -> R,
    ) -> Result<R> {
        // Read before the lookup: a change during it invalidates the memo.
        let generation = self.l2.generation();
        LAST_L2.with(|cell| {
            if let Some(last) = cell.borrow().as_ref() {
                if last.image == self.id && last.generation == generation && last.offset == offset {
                    return Ok(f(&last.table));
                }
            }
            let table = self.l2_table(l1_index, offset)?;
            let result = f(&table);
            *cell.borrow_mut() = Some(LastTable {
                image: self.id,
                generation,
                offset,
                table,
            });
            Ok(result)
        })
    }

    /// Whether data clusters may be holes in the file (metadata
    /// preallocation), so that block status must look through to the file.
    /// Decided once, as qemu-img decides it: when more clusters are
    /// refcounted than the file really occupies (with a 10% margin).
    fn looks_preallocated(&self) -> Result<bool> {
        if let Some(&known) = self.sparse_file.get() {
            return Ok(known);
        }
        let answer = self.count_preallocation()?;
        Ok(*self.sparse_file.get_or_init(|| answer))
    }

    fn count_preallocation(&self) -> Result<bool> {
        let Some(real) = self
            .file
            .allocated_size()
            .map_err(|e| Error::io(&self.name, "reading the file's allocation", 0, e))?
        else {
            return Ok(false);
        };
        let cluster_size = self.header.cluster_size();
        let real_clusters = real / cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cluster_size);
        let order = self.header.refcount_order;
        let per_block = (cluster_size * 8) >> order;
        let table_offset = self.header.refcount_table_offset;
        let table_len = u64::from(self.header.refcount_table_clusters) * cluster_size;
        // Bounded by the header checks (MAX_REFCOUNT_TABLE_BYTES).
        let mut table = vec![0u8; table_len as usize];
        self.file
            .read_at(&mut table, table_offset)
            .map_err(|e| Error::io(&self.name, "reading the refcount table", table_offset, e))?;
        let mut block = vec![0u8; cluster_size as usize];
        let mut allocated = 0u64;
        for (i, entry) in decode_be_words(&table).into_iter().enumerate() {
            let first = i as u64 * per_block;
            if first >= end_cluster {
                break;
            }
            let offset = entry & !0x1ff;
            if offset == 0 {
                continue;
            }
            self.file
                .read_at(&mut block, offset)
                .map_err(|e| Error::io(&self.name, "reading a refcount block", offset, e))?;
            for index in 0..per_block.min(end_cluster - first) {
                if qcow_format::table::refcount_get(&block, index, order).unwrap_or(0) > 0 {
                    allocated += 1;
                    if allocated > threshold {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Resolves the run starting at guest offset `guest`, at most `max` bytes.
    fn run_at(&self, guest: u64, max: u64) -> Result<Run> {
        let geo = &self.geometry;
        let table_span = self.header.bytes_per_l2_table();
        let to_table_end = table_span - (guest & (table_span - 1));
        let l1_index = geo.l1_index(guest);
        let l1_entry = self.l1_entry(l1_index);
        let l2_offset = geo
            .l1_entry(l1_index, l1_entry)
            .map_err(|e| Error::format(&self.name, e))?;
        let Some(l2_offset) = l2_offset else {
            return Ok(Run {
                mapping: L2Mapping::Unallocated { host: None },
                len: max.min(to_table_end),
            });
        };
        self.consistent(|| {
            self.with_l2(l1_index, l2_offset, |table| {
                self.run_in_table(table, guest, max)
            })?
        })
    }

    /// The run at `guest` within one L2 table.
    fn run_in_table(&self, table: &L2Table, guest: u64, max: u64) -> Result<Run> {
        let geo = &self.geometry;
        let table_span = self.header.bytes_per_l2_table();
        let unit_bits = geo.subcluster_bits();
        let unit = 1u64 << unit_bits;
        let words = geo.l2_entry_words();
        let units_per_cluster = 1u64 << (geo.cluster_bits - unit_bits);
        let first_unit = (guest & (table_span - 1)) >> unit_bits;
        let total_units = table_span >> unit_bits;

        let mapping_of = |u: u64| -> Result<L2Mapping> {
            let index = u / units_per_cluster;
            // index < entries per table, which the table holds.
            let i = index as usize * words;
            let word = |i: usize| table.get(i).map_or(0, |e| e.load(Ordering::Acquire));
            let entry = word(i);
            let bitmap = if words == 2 { word(i + 1) } else { 0 };
            geo.l2_mapping(index, entry, bitmap, (u % units_per_cluster) as u32)
                .map_err(|e| Error::format(&self.name, e))
        };

        let first = mapping_of(first_unit)?;
        let mut len = unit - (guest & (unit - 1));
        if let L2Mapping::Compressed { .. } = first {
            // A compressed cluster stands alone: the run ends with it.
            let len = self.header.cluster_size() - geo.in_cluster(guest);
            return Ok(Run {
                mapping: first,
                len: len.min(max),
            });
        }
        let mut u = first_unit + 1;
        while len < max && u < total_units {
            let next = mapping_of(u)?;
            let delta = (u - first_unit) << unit_bits;
            let follows = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => b == a + delta,
                _ => false,
            };
            let continues = match (first, next) {
                (L2Mapping::Zero { host: a }, L2Mapping::Zero { host: b }) => follows(a, b),
                (L2Mapping::Unallocated { host: a }, L2Mapping::Unallocated { host: b }) => {
                    follows(a, b)
                }
                (L2Mapping::Data { host: a }, L2Mapping::Data { host: b }) => b == a + delta,
                _ => false,
            };
            if !continues {
                break;
            }
            len += unit;
            u += 1;
        }
        Ok(Run {
            mapping: first,
            len: len.min(max),
        })
    }

    fn read_compressed(&self, host: u64, len: u64, guest: u64, out: &mut [u8]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let decompress_err = |reason: String| Error::Decompress {
            image: self.name.clone(),
            host,
            len,
            reason,
        };
        if host.saturating_add(len) > self.file_len().saturating_add(511) {
            return Err(decompress_err(format!(
                "data ends past the end of the file ({} bytes)",
                self.file_len()
            )));
        }
        // At most one cluster plus a sector.
        let mut packed = vec![0u8; len as usize];
        self.file
            .read_at(&mut packed, host)
            .map_err(|e| Error::io(&self.name, "reading a compressed cluster", host, e))?;
        let kind = self.header.compression_type;
        let start = self.geometry.in_cluster(guest) as usize;
        if start == 0 && out.len() as u64 == cluster_size {
            return compress::decompress(kind, &packed, out).map_err(decompress_err);
        }
        let mut cluster = vec![0u8; cluster_size as usize];
        compress::decompress(kind, &packed, &mut cluster).map_err(decompress_err)?;
        out.copy_from_slice(&cluster[start..start + out.len()]);
        Ok(())
    }

    /// The backing image, `None` when the image has none, and an error when
    /// it names one that was not opened.
    pub(super) fn backing_device(&self) -> Result<Option<&dyn BlockDevice>> {
        crate::backing_layer(
            &self.name,
            self.backing.as_deref(),
            self.header.backing_file.as_deref(),
        )
    }

    fn read_backing(&self, out: &mut [u8], guest: u64) -> Result<()> {
        crate::read_backing(self.backing_device()?, out, guest)
    }

    pub(super) fn data_storage(&self) -> Result<&dyn qcow_io::Storage> {
        self.data.as_deref().ok_or_else(|| Error::NotOpened {
            image: self.name.clone(),
            what: "external data file",
            name: self
                .header
                .data_file_name()
                .unwrap_or("(unnamed)")
                .to_owned(),
        })
    }
}

impl BlockDevice for Qcow2Image {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn repairs_on_open(&self) -> &[String] {
        &self.open_repairs
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }

    fn zeroing_allocates(&self) -> bool {
        self.header.data_file_raw()
            || (self.header.version < 3 && self.header.backing_file.is_some())
    }

    fn subcluster_size(&self) -> Option<u64> {
        let subclusters = if self.geometry.extended_l2 { 32 } else { 1 };
        Some(self.header.cluster_size() / subclusters)
    }

    fn compressed_writes(&self) -> Option<&dyn crate::device::CompressedWrites> {
        // QEMU compresses no encrypted image either.
        (self.writer.is_some() && self.encryption.is_none()).then_some(self)
    }

    fn reads_use_cpu(&self) -> bool {
        self.encryption.is_some() || self.backing.as_deref().is_some_and(|b| b.reads_use_cpu())
    }

    fn writes_use_cpu(&self) -> bool {
        self.encryption.is_some()
    }

    fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<crate::Reservation> {
        Qcow2Image::reserve(self, offset, len)
    }

    fn release(&self, reservation: crate::Reservation) -> Result<()> {
        Qcow2Image::release(self, reservation)
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::check_range(&self.name, offset, buf.len() as u64, self.virtual_size)?;
        // In a writable image, no cluster found mapped below is released
        // and handed out again before its data is read.
        let _data_io = self.data_io_guard();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let run = self.run_at(guest, (buf.len() - done) as u64)?;
            // run.len <= the remaining length of buf.
            let out = &mut buf[done..done + run.len as usize];
            match run.mapping {
                L2Mapping::Data { host } => {
                    let host = host + (guest & ((1 << self.geometry.subcluster_bits()) - 1));
                    self.read_data(out, host, guest)?;
                }
                L2Mapping::Zero { .. } => out.fill(0),
                L2Mapping::Unallocated { .. } => self.read_backing(out, guest)?,
                L2Mapping::Compressed { host, len } => {
                    self.read_compressed(host, len, guest, out)?;
                }
            }
            done += out.len();
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(&self.name, offset, len, self.virtual_size)?;
        let run = self.run_at(offset, len)?;
        let in_unit = offset & ((1 << self.geometry.subcluster_bits()) - 1);
        let mut len = run.len;
        let allocation = match run.mapping {
            L2Mapping::Data { host } => {
                // Like qemu-img, look through to the image file (not an
                // external data file): a hole there reads as zeros.
                let host = host + in_unit;
                // Encrypted zeros are not zeros: a hole in the file is
                // data like any other.
                let extent = if self.header.has_data_file()
                    || self.encryption.is_some()
                    || !self.looks_preallocated()?
                {
                    qcow_io::StorageExtent::data(run.len)
                } else {
                    self.file
                        .extent(host, run.len)
                        .map_err(|e| Error::io(&self.name, "looking for holes", host, e))?
                };
                len = extent.len.clamp(1, run.len);
                Allocation::Data {
                    depth: 0,
                    // QEMU gives no host offset for encrypted data.
                    offset: Some(host).filter(|_| self.encryption.is_none()),
                    compressed: false,
                    zero: !extent.data,
                }
            }
            L2Mapping::Compressed { .. } => Allocation::Data {
                depth: 0,
                offset: None,
                compressed: true,
                zero: false,
            },
            L2Mapping::Zero { host } => Allocation::Zero {
                depth: 0,
                offset: host
                    .map(|h| h + in_unit)
                    .filter(|_| self.encryption.is_none()),
            },
            L2Mapping::Unallocated { host } => {
                return crate::backing_status(
                    self.backing_device()?,
                    offset,
                    run.len,
                    host.map(|h| h + in_unit)
                        .filter(|_| self.encryption.is_none()),
                );
            }
        };
        Ok(Extent { len, allocation })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn data_name(&self) -> &str {
        self.data_name.as_deref().unwrap_or(&self.name)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Qcow2Image::write_at(self, buf, offset)
    }

    fn flush(&self) -> Result<()> {
        Qcow2Image::flush(self)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        Qcow2Image::write_zeroes(self, offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Qcow2Image::discard(self, offset, len)
    }
}
