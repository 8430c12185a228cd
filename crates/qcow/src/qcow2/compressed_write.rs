//! Compressed clusters: compressing a whole guest cluster with the
//! image's compression type, and storing compressed clusters packed back
//! to back in host clusters, as QEMU packs them (`qemu-img convert -c`).

use qcow_format::table::OFLAG_COMPRESSED;

use super::Qcow2Image;
use super::allocator::Allocation;
use crate::{Error, Result};

impl Qcow2Image {
    /// Refuses compressed clusters in an encrypted image: they are never
    /// encrypted (QEMU refuses them too).
    fn refuse_compression_if_encrypted(&self) -> Result<()> {
        if self.encryption.is_some() {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "compressed writes to an encrypted image".into(),
            });
        }
        Ok(())
    }

    /// Writes one whole guest cluster compressed (as `qemu-img convert -c`
    /// does). Clusters that do not shrink are written uncompressed. The
    /// cluster must not be allocated yet.
    pub fn write_compressed_cluster(&self, data: &[u8], guest: u64) -> Result<()> {
        self.refuse_compression_if_encrypted()?;
        let cluster_size = self.header.cluster_size();
        if data.len() as u64 != cluster_size
            || self.geometry.in_cluster(guest) != 0
            || guest >= self.virtual_size
        {
            return Err(Error::InvalidOptions(format!(
                "compressed writes take one whole aligned cluster ({cluster_size} bytes)"
            )));
        }
        match self.compress_cluster(data) {
            Some(packed) => self.write_packed_cluster(&packed, guest),
            None => {
                let visible = (self.virtual_size - guest).min(cluster_size) as usize;
                self.write_at(&data[..visible], guest)
            }
        }
    }

    /// Compresses one whole cluster with the image's compression type, as
    /// [`Qcow2Image::write_compressed_cluster`] would; `None` when it does
    /// not shrink. Lets callers compress on many threads and write in order
    /// with [`Qcow2Image::write_packed_cluster`].
    pub fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        if self.header.has_data_file() {
            // Compressed clusters cannot live in an external data file.
            return None;
        }
        crate::compress::compress(self.header.compression_type, data)
            .filter(|p| (p.len() as u64) < self.header.cluster_size())
    }

    /// Stores bytes from [`Qcow2Image::compress_cluster`] as the guest
    /// cluster at `guest`, packed back to back with the previous compressed
    /// cluster.
    pub fn write_packed_cluster(&self, packed: &[u8], guest: u64) -> Result<()> {
        self.write_packed_clusters(&[(guest, packed)])
    }

    /// Stores several compressed clusters, as (guest offset, bytes from
    /// [`Qcow2Image::compress_cluster`]), packed back to back in their
    /// order and written with as few calls as their placement allows.
    pub fn write_packed_clusters(&self, items: &[(u64, &[u8])]) -> Result<()> {
        self.check_writable()?;
        self.refuse_compression_if_encrypted()?;
        // The bitmaps record the span of the clusters (one range: the
        // items are in guest order, and a copy's chunk is contiguous).
        let start = items.iter().map(|(g, _)| *g).min().unwrap_or(0);
        let end = items
            .iter()
            .map(|(g, _)| g + self.header.cluster_size())
            .max()
            .unwrap_or(0)
            .min(self.virtual_size);
        let result = self.recorded(start, end.saturating_sub(start), || {
            self.store_packed(items)
        });
        self.guard(result)
    }

    fn store_packed(&self, items: &[(u64, &[u8])]) -> Result<()> {
        if self.header.has_data_file() {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "compressed clusters with an external data file".into(),
            });
        }
        let cluster_size = self.header.cluster_size();
        for &(guest, packed) in items {
            if packed.is_empty()
                || packed.len() as u64 >= cluster_size
                || self.geometry.in_cluster(guest) != 0
                || guest >= self.virtual_size
            {
                return Err(Error::InvalidOptions(format!(
                    "a packed cluster must be 1 to {} bytes at an aligned offset inside the disk",
                    cluster_size - 1
                )));
            }
        }
        let mut meta = self.lock_meta()?;
        // A compressed entry holds offsets below 2^(70 - cluster_bits);
        // whatever is allocated lands below the end of the file plus what
        // the data needs.
        let offset_bits = 70 - self.header.cluster_bits;
        let needed: u64 = items
            .iter()
            .map(|(_, p)| (p.len() as u64).div_ceil(cluster_size) + 1)
            .sum();
        if meta.end.saturating_add(needed) > (1 << offset_bits) >> self.header.cluster_bits {
            return Err(Error::NoSpace {
                image: self.name.clone(),
                what: "compressed data",
                limit: 1 << offset_bits,
            });
        }
        self.mark_dirty()?;
        // Place every cluster (its L2 table first, allocated where missing,
        // as QEMU lays them out), then write the data (runs that follow each
        // other in one call), then point the L2 entries at it.
        let mut hosts = Vec::with_capacity(items.len());
        for &(guest, packed) in items {
            self.writable_l2(&mut meta, guest)?;
            hosts.push(self.alloc_bytes(&mut meta, packed.len() as u64)?);
        }
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        for (&(_, packed), &host) in items.iter().zip(&hosts) {
            if !run.is_empty() && run_start + run.len() as u64 != host {
                self.write_raw_data(&run, run_start)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = host;
            }
            run.extend_from_slice(packed);
        }
        if !run.is_empty() {
            self.write_raw_data(&run, run_start)?;
        }
        let shift = 62 - (self.header.cluster_bits - 8);
        for (&(guest, packed), &host) in items.iter().zip(&hosts) {
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            let len = packed.len() as u64;
            let sectors = ((host + len - 1) >> 9) - (host >> 9);
            let entry = OFLAG_COMPRESSED | (sectors << shift) | host;
            self.set_l2_entry(&mut meta, l2_offset, &table, guest, entry)?;
        }
        Ok(())
    }

    /// Reserves `len` bytes for compressed data, continuing the cluster the
    /// previous compressed cluster ended in when it fits (each cluster
    /// touched gains one reference).
    fn alloc_bytes(&self, meta: &mut Allocation<'_>, len: u64) -> Result<u64> {
        let bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let cursor = meta.compressed_cursor;
        let fits = cursor != 0 && cursor % cluster_size != 0 && {
            let room = cluster_size - cursor % cluster_size;
            // Spilling into the next cluster is fine when it is the end of
            // the file (it is then allocated contiguously).
            len <= room || ((cursor >> bits) + 1 == meta.end && meta.free_hint >= meta.end)
        };
        let start = if fits {
            let first = cursor >> bits;
            match meta.change_refcount(first, 1) {
                Ok(_) => {}
                // Narrow refcounts fill up: start a new cluster, as QEMU does.
                Err(Error::RefcountOverflow { .. }) => return self.alloc_fresh_bytes(meta, len),
                Err(e) => return Err(e),
            }
            let last = (cursor + len - 1) >> bits;
            if last > first {
                let next = meta.clusters(last - first)?;
                if next >> bits != first + 1 {
                    // Someone took the next cluster: undo and start afresh.
                    for c in 0..(last - first) {
                        meta.pending_frees.push(next + (c << bits));
                    }
                    meta.pending_frees.push(first << bits);
                    return self.alloc_fresh_bytes(meta, len);
                }
            }
            cursor
        } else {
            return self.alloc_fresh_bytes(meta, len);
        };
        meta.compressed_cursor = start + len;
        Ok(start)
    }

    fn alloc_fresh_bytes(&self, meta: &mut Allocation<'_>, len: u64) -> Result<u64> {
        let clusters = len.div_ceil(self.header.cluster_size());
        let start = meta.clusters(clusters)?;
        meta.compressed_cursor = start + len;
        Ok(start)
    }
}

impl crate::device::CompressedWrites for Qcow2Image {
    fn compress_cluster(&self, cluster: &[u8]) -> Option<Vec<u8>> {
        Qcow2Image::compress_cluster(self, cluster)
    }

    fn write_compressed(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        self.write_packed_clusters(clusters)
    }
}
