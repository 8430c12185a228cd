//! LUKS volumes (qemu-img's `luks` format): a LUKS header, its key slots,
//! then the encrypted disk, each sector encrypted with its offset in the
//! disk as IV. Opened with the password that unlocks a key slot; without
//! it, for its metadata only.

use std::sync::Arc;

use qcow_format::luks::{LuksHeader, RawLuksHeader};
use qcow_io::Storage;

use crate::crypto::key_slots::{KeySlotChange, change_key_slots};
use crate::crypto::{CryptoError, DataCipher, LuksOptions, Secret, luks};
use crate::device::{Allocation, BlockDevice, Extent, ImageFormat};
use crate::{Error, Result};

/// An open LUKS volume.
#[derive(Debug)]
pub struct LuksImage {
    name: String,
    storage: Arc<dyn Storage>,
    header: LuksHeader,
    /// The data cipher, once unlocked.
    cipher: Option<DataCipher>,
    /// The password that unlocked it.
    secret: Option<Secret>,
    /// Where the disk starts in the file.
    payload_offset: u64,
    size: u64,
    writable: bool,
}

impl LuksImage {
    /// Opens the LUKS volume in `storage`, unlocked with `secret` when
    /// one is given (its data cannot be read or written otherwise).
    pub fn open(name: &str, storage: Arc<dyn Storage>, secret: Option<&Secret>) -> Result<Self> {
        let crypto = |source: CryptoError| Error::Crypto {
            image: name.to_owned(),
            source,
        };
        let mut bytes = [0u8; size_of::<RawLuksHeader>()];
        storage
            .read_at(&mut bytes, 0)
            .map_err(|e| Error::io(name, "reading the LUKS header", 0, e))?;
        let header = LuksHeader::parse(&bytes).map_err(|e| crypto(CryptoError::Header(e)))?;
        luks::LuksAlgorithms::of(&header).map_err(crypto)?;
        let payload_offset = header.payload_offset();
        let len = storage
            .len()
            .map_err(|e| Error::io(name, "reading the file size", 0, e))?;
        let cipher = match secret {
            Some(secret) => {
                let master = luks::unlock(&header, secret.as_bytes(), |at, buf| {
                    storage
                        .read_at(buf, at)
                        .map_err(|e| CryptoError::Read(e.to_string()))
                })
                .map_err(crypto)?;
                Some(DataCipher::luks_volume(&header, &master).map_err(crypto)?)
            }
            None => None,
        };
        Ok(LuksImage {
            name: name.to_owned(),
            storage,
            header,
            cipher,
            secret: secret.cloned(),
            payload_offset,
            size: len.saturating_sub(payload_offset),
            writable: false,
        })
    }

    /// The same volume, taking writes or refusing them.
    pub fn with_writes(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Writes a new LUKS volume of `size` bytes into
    /// `storage`, as qemu-img creates one: the header and key slot 0 from
    /// `options`, the disk after them left unwritten.
    pub fn create(storage: &dyn Storage, options: &LuksOptions, size: u64) -> Result<()> {
        let name = "(new image)";
        let formatted = luks::format(options).map_err(|source| Error::Crypto {
            image: name.to_owned(),
            source,
        })?;
        let io = |op: &'static str, at: u64| move |e| Error::io(name, op, at, e);
        storage.set_len(0).map_err(io("truncating", 0))?;
        storage
            .write_at(zerocopy::IntoBytes::as_bytes(&formatted.header.to_raw()), 0)
            .map_err(io("writing the LUKS header", 0))?;
        let slot_at = u64::from(formatted.header.key_slots[0].key_offset_sector)
            * qcow_format::luks::LUKS_SECTOR_SIZE;
        storage
            .write_at(&formatted.slot_material, slot_at)
            .map_err(io("writing the key material", slot_at))?;
        let end = formatted.length + size;
        storage.set_len(end).map_err(io("sizing the volume", end))?;
        storage.flush().map_err(io("flushing", 0))
    }

    /// The LUKS header.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// Adds or erases key slots (`qemu-img amend -o state=...`; `force`:
    /// its `--force`), in QEMU's order.
    pub fn change_key_slots(&mut self, change: &KeySlotChange, force: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        let storage = self.storage.clone();
        let mut header = self.header.clone();
        let writes = change_key_slots(
            &mut header,
            change,
            force,
            self.secret.as_ref(),
            &mut |at, buf| {
                storage
                    .read_at(buf, at)
                    .map_err(|e| CryptoError::Read(e.to_string()))
            },
        )
        .map_err(|source| Error::Crypto {
            image: self.name.clone(),
            source,
        })?;
        for write in &writes {
            self.storage
                .write_at(&write.bytes, write.offset)
                .and_then(|()| self.storage.flush())
                .map_err(|e| Error::io(&self.name, "writing the LUKS header", write.offset, e))?;
        }
        self.header = header;
        Ok(())
    }

    fn cipher(&self) -> Result<&DataCipher> {
        self.cipher.as_ref().ok_or_else(|| Error::Crypto {
            image: self.name.clone(),
            source: CryptoError::VolumeKeyRequired,
        })
    }

    /// Reads the encrypted bytes at disk offset `offset`.
    fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.payload_offset + offset;
        self.storage
            .read_at(buf, at)
            .map_err(|e| Error::io(&self.name, "reading data", at, e))
    }

    /// Writes encrypted bytes at disk offset `offset`.
    fn write_raw(&self, buf: &[u8], offset: u64) -> Result<()> {
        let at = self.payload_offset + offset;
        self.storage
            .write_at(buf, at)
            .map_err(|e| Error::io(&self.name, "writing data", at, e))
    }
}

impl BlockDevice for LuksImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Luks
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        // The disk's offsets serve as both: the cipher's IVs are the
        // disk's sectors.
        self.cipher()?
            .read_sectors(&self.name, buf, offset, offset, |buf, at| {
                self.read_raw(buf, at)
            })
    }

    /// All data: a LUKS volume has no holes the disk can see, and no
    /// offset QEMU would show (its bytes are encrypted).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(&self.name, offset, len, self.size)?;
        Ok(Extent {
            len,
            allocation: Allocation::Data {
                depth: 0,
                offset: None,
                compressed: false,
                zero: false,
            },
        })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn reads_use_cpu(&self) -> bool {
        true
    }

    fn writes_use_cpu(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        crate::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.cipher()?.write_sectors(
            &self.name,
            buf,
            offset,
            offset,
            |buf, at| self.read_raw(buf, at),
            |buf, at| self.write_raw(buf, at),
        )
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(&self.name, "flushing", 0, e))
    }
}
