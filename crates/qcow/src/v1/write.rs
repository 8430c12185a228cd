//! Creating and writing QCOW version 1 images, laid out as qemu-img lays
//! them out.
//!
//! Version 1 has no refcounts: new L2 tables and data clusters go at the
//! end of the file, aligned to the cluster size, and compressed clusters
//! right after the last byte. Data reaches the file before the L2 entry
//! that points at it, and a new L2 table before its L1 entry, so a crash
//! leaves at worst unused space at the end of the file.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use qcow_format::QCOW_MAGIC;
use qcow_format::header::CompressionType;
use qcow_format::v1::{RawHeaderV1, V1_HEADER_LEN, V1_OFLAG_COMPRESSED, V1Mapping};
use qcow_io::Storage;
use zerocopy::IntoBytes;

use super::QcowImage;
use crate::device::BlockDevice;
use crate::{CreateOptions, Error, Result};

impl QcowImage {
    /// Checks the options of a new version 1 image before any file is
    /// touched. Returns the cluster and L2 orders and the virtual size
    /// (rounded up to whole sectors, as qemu-img rounds it).
    pub fn validate_create(options: &CreateOptions) -> Result<()> {
        Self::check_create(options).map(|_| ())
    }

    fn check_create(options: &CreateOptions) -> Result<(u8, u8, u64)> {
        let backing = options.backing_file.as_deref().unwrap_or("");
        if backing.len() > 1023 {
            return Err(Error::InvalidOptions(
                "backing file name longer than 1023 bytes".into(),
            ));
        }
        let size = options.rounded_size();
        if size == 0 {
            return Err(Error::InvalidOptions(
                "Image size is too small, cannot be zero length".into(),
            ));
        }
        let (cluster_bits, l2_bits) = if backing.is_empty() {
            (12u8, 9u8)
        } else {
            (9, 12)
        };
        let shift = u32::from(cluster_bits) + u32::from(l2_bits);
        // QEMU's qcow driver keeps the L1 size in an int: past that the
        // image it writes cannot be opened. Refuse it instead.
        let l1_size = size.div_ceil(1 << shift);
        if l1_size * 8 > qcow_format::limits::MAX_L1_BYTES {
            return Err(Error::InvalidOptions(
                "The image size is too large for file format 'qcow'".into(),
            ));
        }
        if matches!(
            options.encryption,
            Some(crate::crypto::EncryptionOptions::Luks(_))
        ) {
            return Err(Error::InvalidOptions(
                "Unsupported encryption format".into(),
            ));
        }
        Ok((cluster_bits, l2_bits, size))
    }

    /// Writes a new, empty version 1 image of `options.size` bytes into
    /// `file`, with `options.backing_file` if set. Like qemu-img, images with
    /// a backing file get 512-byte clusters (copy-on-write stays fine
    /// grained) and 4096-entry L2 tables; others 4 KiB clusters and
    /// 512-entry L2 tables.
    pub fn create(file: &dyn Storage, options: &CreateOptions) -> Result<()> {
        let (cluster_bits, l2_bits, size) = Self::check_create(options)?;
        let backing = options.backing_file.as_deref().unwrap_or("");
        let l1_size = size.div_ceil(1 << (u32::from(cluster_bits) + u32::from(l2_bits)));
        let header_size = (V1_HEADER_LEN as u64 + backing.len() as u64).next_multiple_of(8);
        let header = RawHeaderV1 {
            magic: QCOW_MAGIC.into(),
            version: 1.into(),
            backing_file_offset: if backing.is_empty() {
                0
            } else {
                V1_HEADER_LEN as u64
            }
            .into(),
            backing_file_size: (backing.len() as u32).into(),
            mtime: 0.into(),
            size: size.into(),
            cluster_bits,
            l2_bits,
            padding: 0.into(),
            crypt_method: u32::from(options.encryption.is_some()).into(),
            l1_table_offset: header_size.into(),
        };
        let io = |op: &'static str| move |e| Error::io("(new image)", op, 0, e);
        file.set_len(0).map_err(io("truncating"))?;
        file.write_at(header.as_bytes(), 0)
            .map_err(io("writing the header"))?;
        file.write_at(backing.as_bytes(), V1_HEADER_LEN as u64)
            .map_err(io("writing the backing file name"))?;
        // The L1 table, zeroed in whole sectors.
        let l1_bytes = (l1_size * 8).next_multiple_of(512);
        file.set_len(header_size + l1_bytes)
            .map_err(io("sizing the image"))?;
        file.flush().map_err(io("flushing"))
    }

    /// Opens the version 1 image in `file` for reading and writing.
    pub fn open_writable(
        name: &str,
        file: Arc<dyn Storage>,
        cache_bytes: Option<u64>,
    ) -> Result<Self> {
        let mut image = Self::open(name, file, cache_bytes)?;
        image.writer = Some(Mutex::new(()));
        Ok(image)
    }

    fn lock(&self) -> Result<MutexGuard<'_, ()>> {
        self.writer
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
            .ok_or_else(|| Error::ReadOnly {
                image: self.name.clone(),
            })
    }

    /// Reserves `len` bytes at the end of the file, aligned to `align`.
    fn alloc_end(&self, len: u64, align: u64) -> u64 {
        let start = self.file_len().next_multiple_of(align);
        self.file_len.store(start + len, Ordering::Release);
        start
    }

    /// The L2 table for `guest`, allocated (zeroed, then linked from the
    /// L1 table) when missing.
    fn writable_l2(&self, guest: u64) -> Result<u64> {
        let shift = self.header.cluster_bits + self.header.l2_bits;
        let l1_index = guest >> shift;
        let existing = self.l1_entry(l1_index);
        if existing != 0 {
            return Ok(existing);
        }
        let table_bytes = 8u64 << self.header.l2_bits;
        let offset = self.alloc_end(table_bytes, self.header.cluster_size());
        self.file
            .write_at(&vec![0u8; table_bytes as usize], offset)
            .map_err(|e| Error::io(&self.name, "writing an L2 table", offset, e))?;
        let at = self.header.l1_table_offset + l1_index * 8;
        self.file
            .write_at(&offset.to_be_bytes(), at)
            .map_err(|e| Error::io(&self.name, "writing the L1 table", at, e))?;
        let slot = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .ok_or_else(|| Error::OutOfRange {
                image: self.name.clone(),
                offset: guest,
                len: 1,
                size: self.header.virtual_size,
            })?;
        slot.store(offset, Ordering::Release);
        Ok(offset)
    }

    fn set_l2_entry(&self, l2_offset: u64, guest: u64, entry: u64) -> Result<()> {
        let index = (guest >> self.header.cluster_bits) & ((1 << self.header.l2_bits) - 1);
        let at = l2_offset + index * 8;
        self.file
            .write_at(&entry.to_be_bytes(), at)
            .map_err(|e| Error::io(&self.name, "writing an L2 entry", at, e))?;
        self.l2_cache.remove(l2_offset);
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.writer.is_none() {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        crate::check_range(
            &self.name,
            offset,
            buf.len() as u64,
            self.header.virtual_size,
        )?;
        let cluster_size = self.header.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest & (cluster_size - 1);
            let n = (cluster_size - in_cluster).min((buf.len() - done) as u64) as usize;
            self.write_piece(&buf[done..done + n], guest)?;
            done += n;
        }
        Ok(())
    }

    fn write_piece(&self, piece: &[u8], guest: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let in_cluster = guest & (cluster_size - 1);
        if let V1Mapping::Data { host } = self.mapping(guest)? {
            self.check_sector_aligned(host)?;
            return self.write_guest_data(piece, host + in_cluster, guest);
        }
        let _lock = self.lock()?;
        if let V1Mapping::Data { host } = self.mapping(guest)? {
            self.check_sector_aligned(host)?;
            return self.write_guest_data(piece, host + in_cluster, guest);
        }
        let cluster_start = guest - in_cluster;
        let mut cluster = vec![0u8; cluster_size as usize];
        if piece.len() as u64 != cluster_size {
            // Copy-on-write from what the cluster reads as now.
            let visible = (self.header.virtual_size - cluster_start).min(cluster_size);
            self.read_at(&mut cluster[..visible as usize], cluster_start)?;
        }
        let at = in_cluster as usize;
        cluster[at..at + piece.len()].copy_from_slice(piece);
        let l2_offset = self.writable_l2(guest)?;
        let host = self.alloc_end(cluster_size, cluster_size);
        self.write_guest_data(&cluster, host, cluster_start)?;
        self.set_l2_entry(l2_offset, guest, host)
    }

    /// Writes guest data at host offset `host` (guest offset `guest`),
    /// encrypted in an encrypted image ([`crate::crypto::DataCipher::write_sectors`]).
    fn write_guest_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        let Some(cipher) = self.data_cipher()? else {
            return self.write_data(data, host);
        };
        cipher.write_sectors(
            &self.name,
            data,
            host,
            guest,
            |buf, at| self.read_raw(buf, at),
            |buf, at| self.write_data(buf, at),
        )
    }

    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.file
            .write_at(data, host)
            .map_err(|e| Error::io(&self.name, "writing data", host, e))
    }

    /// Writes one whole guest cluster compressed (raw deflate with a 4 KiB
    /// window, as qemu-img does); a cluster that does not shrink is written
    /// uncompressed.
    pub fn write_compressed_cluster(&self, data: &[u8], guest: u64) -> Result<()> {
        self.refuse_compression_if_encrypted()?;
        let cluster_size = self.header.cluster_size();
        if data.len() as u64 != cluster_size
            || guest & (cluster_size - 1) != 0
            || guest >= self.header.virtual_size
        {
            return Err(Error::InvalidOptions(format!(
                "compressed writes take one whole aligned cluster ({cluster_size} bytes)"
            )));
        }
        let visible = (self.header.virtual_size - guest).min(cluster_size) as usize;
        match crate::device::CompressedWrites::compress_cluster(self, data) {
            Some(packed) => self.store_compressed(&packed, guest),
            None => self.write_at(&data[..visible], guest),
        }
    }

    /// Refuses compressed clusters in an encrypted image: they are never
    /// encrypted (QEMU refuses them too).
    fn refuse_compression_if_encrypted(&self) -> Result<()> {
        if self.encrypted {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "compressed writes to an encrypted image".into(),
            });
        }
        Ok(())
    }

    /// Stores `packed`, a compressed cluster, as the guest cluster at
    /// `guest`, at the end of the file.
    fn store_compressed(&self, packed: &[u8], guest: u64) -> Result<()> {
        self.refuse_compression_if_encrypted()?;
        let _lock = self.lock()?;
        let l2_offset = self.writable_l2(guest)?;
        let len = packed.len() as u64;
        let host = self.alloc_end(len, 1);
        self.write_data(packed, host)?;
        let entry = V1_OFLAG_COMPRESSED | (len << (63 - self.header.cluster_bits)) | host;
        self.set_l2_entry(l2_offset, guest, entry)
    }
}

impl crate::device::CompressedWrites for QcowImage {
    /// Raw deflate with a 4 KiB window, as qemu-img writes it.
    fn compress_cluster(&self, cluster: &[u8]) -> Option<Vec<u8>> {
        crate::compress::compress(CompressionType::Zlib, cluster)
            .filter(|p| (p.len() as u64) < self.header.cluster_size())
    }

    fn write_compressed(&self, clusters: &[(u64, &[u8])]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        for &(guest, packed) in clusters {
            if guest & (cluster_size - 1) != 0 || guest >= self.header.virtual_size {
                return Err(Error::InvalidOptions(format!(
                    "compressed writes take one whole aligned cluster ({cluster_size} bytes)"
                )));
            }
            self.store_compressed(packed, guest)?;
        }
        Ok(())
    }
}

impl QcowImage {
    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        self.file
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }
}
