//! QCOW version 1 images: opening and reading them (through a backing file
//! where a cluster is unallocated) and mapping them with block status.
//!
//! Version 1 has no refcounts, no snapshots and no zero clusters: an L1
//! table of L2 tables whose entries are a host offset, zero (unallocated) or
//! a compressed descriptor with its size in bytes. Creating images and
//! writing them (partial clusters copied on write from what they read as,
//! whole clusters compressed) lives in [`write`](self::write).

mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qcow_cache::{Lookup, TableCache};
use qcow_format::header::Encryption;
use qcow_format::v1::{HeaderV1, V1_HEADER_LEN, V1Mapping};
use qcow_io::Storage;

use crate::device::{Allocation, BlockDevice, Extent, ImageFormat};
use crate::qcow2::decode_be_words;
use crate::{Error, Result, compress};

/// An open QCOW version 1 image.
#[derive(Debug)]
pub struct QcowImage {
    name: String,
    file: Arc<dyn Storage>,
    header: HeaderV1,
    l1: Vec<AtomicU64>,
    l2_cache: TableCache<Box<[u64]>>,
    backing: Option<Box<dyn BlockDevice>>,
    file_len: AtomicU64,
    /// The allocation lock of a writable image; `None` when read-only.
    writer: Option<Mutex<()>>,
    /// Whether the image is encrypted (legacy AES).
    encrypted: bool,
    /// The data cipher, once [`QcowImage::unlock`] was given the password.
    cipher: Option<crate::crypto::DataCipher>,
}

impl QcowImage {
    /// Opens the version 1 image in `file`; `name` is used in messages.
    pub fn open(name: &str, file: Arc<dyn Storage>, cache_bytes: Option<u64>) -> Result<Self> {
        let file_len = file
            .len()
            .map_err(|e| Error::io(name, "reading the file size", 0, e))?;
        // The header and a backing name of at most 1023 bytes.
        let mut prefix = vec![0u8; (V1_HEADER_LEN + 1024).min(file_len.max(48) as usize)];
        file.read_at(&mut prefix, 0)
            .map_err(|e| Error::io(name, "reading the header", 0, e))?;
        let header = HeaderV1::parse(&prefix, file_len).map_err(|e| Error::format(name, e))?;
        let encrypted = match header.encryption {
            Encryption::None => false,
            Encryption::Aes => true,
            _ => {
                return Err(Error::Encrypted {
                    image: name.to_owned(),
                    method: header.encryption.name(),
                });
            }
        };
        // Bounded by HeaderV1::parse (MAX_L1_BYTES, inside the file).
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut l1_bytes, header.l1_table_offset)
            .map_err(|e| Error::io(name, "reading the L1 table", header.l1_table_offset, e))?;
        let l1: Vec<u64> = decode_be_words(&l1_bytes);
        let table_bytes = 8u64 << header.l2_bits;
        let tables = l1.iter().filter(|&&e| e != 0).count() as u64;
        let budget = cache_bytes
            .unwrap_or_else(|| (tables.max(1) * table_bytes).min(crate::DEFAULT_MAX_CACHE_BYTES));
        Ok(QcowImage {
            name: name.to_owned(),
            file,
            l2_cache: TableCache::new(budget, table_bytes),
            header,
            l1: l1.into_iter().map(AtomicU64::new).collect(),
            backing: None,
            file_len: AtomicU64::new(file_len),
            writer: None,
            encrypted,
            cipher: None,
        })
    }

    /// Whether the image is encrypted (the legacy AES scheme).
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// Unlocks an encrypted image with its password (any password: the
    /// legacy scheme cannot tell a wrong one, whose data reads as noise).
    pub fn unlock(&mut self, secret: &crate::crypto::Secret) -> Result<()> {
        if self.encrypted {
            self.cipher = Some(
                crate::crypto::DataCipher::legacy_aes(secret.as_bytes()).map_err(|source| {
                    Error::Crypto {
                        image: self.name.clone(),
                        source,
                    }
                })?,
            );
        }
        Ok(())
    }

    /// The cipher of an encrypted image (an error while it is locked),
    /// `None` for a plain one.
    fn data_cipher(&self) -> Result<Option<&crate::crypto::DataCipher>> {
        if !self.encrypted {
            return Ok(None);
        }
        self.cipher.as_ref().map(Some).ok_or_else(|| Error::Crypto {
            image: self.name.clone(),
            source: crate::crypto::CryptoError::KeyRequired,
        })
    }

    /// Refuses data at a host offset that is not on a sector boundary, as
    /// QEMU refuses to read or write it (an I/O error there).
    fn check_sector_aligned(&self, host: u64) -> Result<()> {
        if host % 512 != 0 {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "L2 table",
                offset: host,
                reason: format!("data cluster offset {host:#x} is not on a sector boundary"),
            });
        }
        Ok(())
    }

    /// Reads `out` from host offset `host` (guest offset `guest`),
    /// decrypted in an encrypted image (whole sectors read and decrypted).
    fn read_data(&self, out: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let Some(cipher) = self.data_cipher()? else {
            return self.read_raw(out, host);
        };
        cipher.read_sectors(&self.name, out, host, guest, |buf, at| {
            self.read_raw(buf, at)
        })
    }

    /// Reads bytes as they are stored at host offset `host`.
    fn read_raw(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.file
            .read_at(buf, host)
            .map_err(|e| Error::io(&self.name, "reading data", host, e))
    }

    /// The parsed header.
    pub fn header(&self) -> &HeaderV1 {
        &self.header
    }

    /// Uses `backing` for clusters this image does not allocate.
    pub fn attach_backing(&mut self, backing: Box<dyn BlockDevice>) {
        self.backing = Some(backing);
    }

    /// The image file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    fn l1_entry(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// The backing image, `None` when the image has none, and an error when
    /// it names one that was not opened.
    fn backing_device(&self) -> Result<Option<&dyn BlockDevice>> {
        crate::backing_layer(
            &self.name,
            self.backing.as_deref(),
            self.header.backing_file.as_deref(),
        )
    }

    fn mapping(&self, guest: u64) -> Result<V1Mapping> {
        let cluster_bits = self.header.cluster_bits;
        let l2_bits = self.header.l2_bits;
        let l1_index = guest >> (cluster_bits + l2_bits);
        let l2_offset = self.l1_entry(l1_index);
        if l2_offset == 0 {
            return Ok(V1Mapping::Unallocated);
        }
        let table = self.l2_table(l1_index, l2_offset)?;
        let index = ((guest >> cluster_bits) & ((1 << l2_bits) - 1)) as usize;
        let entry = table.get(index).copied().unwrap_or(0);
        Ok(self.header.l2_mapping(entry))
    }

    /// The L2 table at `l2_offset`, from the cache or the file. A table
    /// read from the file is cached only if no writer changed it on disk
    /// meanwhile (writers drop it from the cache); otherwise it is read
    /// again.
    fn l2_table(&self, l1_index: u64, l2_offset: u64) -> Result<Arc<Box<[u64]>>> {
        let table_bytes = 8u64 << self.header.l2_bits;
        loop {
            let load = match self.l2_cache.lookup(l2_offset) {
                Lookup::Hit(table) => return Ok(table),
                Lookup::Miss(load) => load,
            };
            if l2_offset.saturating_add(table_bytes) > self.file_len() {
                return Err(Error::Corrupt {
                    image: self.name.clone(),
                    table: "L2 table",
                    offset: l2_offset,
                    reason: format!("L1 entry {l1_index} points past the end of the file"),
                });
            }
            // At most 64 KiB (l2_bits <= 13).
            let mut bytes = vec![0u8; table_bytes as usize];
            self.file
                .read_at(&mut bytes, l2_offset)
                .map_err(|e| Error::io(&self.name, "reading an L2 table", l2_offset, e))?;
            let table = Arc::new(decode_be_words(&bytes).into_boxed_slice());
            let cached = load.insert(table).map_err(|e| {
                Error::cache_io(&self.name, "writing back an evicted table", l2_offset, e)
            })?;
            if let Some(table) = cached {
                return Ok(table);
            }
        }
    }

    fn read_cluster_part(&self, guest: u64, out: &mut [u8]) -> Result<()> {
        let in_cluster = guest & (self.header.cluster_size() - 1);
        match self.mapping(guest)? {
            V1Mapping::Data { host } => {
                self.check_sector_aligned(host)?;
                self.read_data(out, host + in_cluster, guest)
            }
            V1Mapping::Unallocated => crate::read_backing(self.backing_device()?, out, guest),
            V1Mapping::Compressed { host, len } => {
                // len < cluster size (64 KiB at most).
                let mut packed = vec![0u8; len as usize];
                self.file
                    .read_at(&mut packed, host)
                    .map_err(|e| Error::io(&self.name, "reading a compressed cluster", host, e))?;
                let mut cluster = vec![0u8; self.header.cluster_size() as usize];
                compress::inflate(&packed, &mut cluster).map_err(|reason| Error::Decompress {
                    image: self.name.clone(),
                    host,
                    len,
                    reason,
                })?;
                let start = in_cluster as usize;
                out.copy_from_slice(&cluster[start..start + out.len()]);
                Ok(())
            }
        }
    }
}

impl BlockDevice for QcowImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }

    fn compressed_writes(&self) -> Option<&dyn crate::device::CompressedWrites> {
        (self.writer.is_some() && !self.encrypted).then_some(self)
    }

    fn reads_use_cpu(&self) -> bool {
        self.encrypted || self.backing.as_deref().is_some_and(|b| b.reads_use_cpu())
    }

    fn writes_use_cpu(&self) -> bool {
        self.encrypted
    }

    fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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
            let n = (cluster_size - (guest & (cluster_size - 1))).min((buf.len() - done) as u64);
            self.read_cluster_part(guest, &mut buf[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(&self.name, offset, len, self.header.virtual_size)?;
        let cluster_size = self.header.cluster_size();
        let len = len.min(cluster_size - (offset & (cluster_size - 1)));
        let allocation = match self.mapping(offset)? {
            V1Mapping::Data { host } => Allocation::Data {
                depth: 0,
                offset: Some(host + (offset & (cluster_size - 1))),
                compressed: false,
                zero: false,
            },
            V1Mapping::Compressed { .. } => Allocation::Data {
                depth: 0,
                offset: None,
                compressed: true,
                zero: false,
            },
            V1Mapping::Unallocated => {
                return crate::backing_status(self.backing_device()?, offset, len, None);
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

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        QcowImage::write_at(self, buf, offset)
    }

    fn flush(&self) -> Result<()> {
        QcowImage::flush(self)
    }
}
