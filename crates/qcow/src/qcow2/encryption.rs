//! An encrypted QCOW2 image: its encryption found on open (the LUKS header
//! read and checked, no key needed, as `info` shows it), unlocked with a
//! secret, and its data clusters decrypted as they are read.

use qcow_format::extension::HeaderExtension;
use qcow_format::header::{Encryption, Header};
use qcow_format::luks::{LuksHeader, RawLuksHeader};
use qcow_io::Storage;

use super::Qcow2Image;
use crate::crypto::key_slots::{KeySlotChange, change_key_slots};
use crate::crypto::{CryptoError, DataCipher, EncryptionInfo, EncryptionOptions, Secret, luks};
use crate::{Error, Result};

/// What `header` says of the image's encryption, the LUKS header read
/// from `file`; `None` for an image that is not encrypted.
pub(super) fn load(
    name: &str,
    file: &dyn Storage,
    header: &Header,
) -> Result<Option<EncryptionInfo>> {
    let crypto = |source: CryptoError| Error::Crypto {
        image: name.to_owned(),
        source,
    };
    match header.encryption {
        Encryption::None => Ok(None),
        Encryption::Aes => Ok(Some(EncryptionInfo::Aes)),
        Encryption::Luks => {
            let (offset, length) = header
                .extensions
                .iter()
                .find_map(|e| match e {
                    HeaderExtension::FullDiskEncryption { offset, length } => {
                        Some((*offset, *length))
                    }
                    _ => None,
                })
                .ok_or_else(|| crypto(CryptoError::MissingHeader))?;
            let mut bytes = [0u8; size_of::<RawLuksHeader>()];
            if (bytes.len() as u64) > length {
                return Err(crypto(CryptoError::OutsideHeader));
            }
            file.read_at(&mut bytes, offset)
                .map_err(|e| Error::io(name, "reading the LUKS header", offset, e))?;
            let luks = LuksHeader::parse(&bytes).map_err(|e| crypto(CryptoError::Header(e)))?;
            // The algorithms are looked up now, so that an image naming one
            // this engine lacks says so on open, as QEMU's does.
            luks::LuksAlgorithms::of(&luks).map_err(crypto)?;
            Ok(Some(EncryptionInfo::Luks {
                header: Box::new(luks),
                offset,
                length,
            }))
        }
        Encryption::Unknown(_) => Err(Error::Encrypted {
            image: name.to_owned(),
            method: header.encryption.name(),
        }),
    }
}

impl Qcow2Image {
    /// The image's encryption, if it is encrypted.
    pub fn encryption(&self) -> Option<&EncryptionInfo> {
        self.encryption.as_ref()
    }

    /// Where the LUKS header lives in the image file (offset, length), for
    /// the check's counts and the overlap guard.
    pub(super) fn encryption_header_area(&self) -> Option<(u64, u64)> {
        match &self.encryption {
            Some(EncryptionInfo::Luks { offset, length, .. }) => Some((*offset, *length)),
            _ => None,
        }
    }

    /// Unlocks an encrypted image with the password `secret`: its data
    /// can then be read. Fails with [`CryptoError::InvalidPassword`] when
    /// no key slot opens.
    pub fn unlock(&mut self, secret: &Secret) -> Result<()> {
        let crypto = |source: CryptoError| Error::Crypto {
            image: self.name.clone(),
            source,
        };
        let cipher = match &self.encryption {
            None => return Ok(()),
            Some(EncryptionInfo::Aes) => {
                DataCipher::legacy_aes(secret.as_bytes()).map_err(crypto)?
            }
            Some(EncryptionInfo::Luks {
                header,
                offset,
                length,
            }) => {
                let (offset, length) = (*offset, *length);
                let master = luks::unlock(header, secret.as_bytes(), |at, buf| {
                    if at + buf.len() as u64 > length {
                        return Err(CryptoError::OutsideHeader);
                    }
                    self.file
                        .read_at(buf, offset + at)
                        .map_err(|e| CryptoError::Read(e.to_string()))
                })
                .map_err(crypto)?;
                DataCipher::luks(header, &master).map_err(crypto)?
            }
        };
        self.cipher = Some(cipher);
        self.secret = Some(secret.clone());
        Ok(())
    }

    /// Encrypts a new, empty image as QEMU's creation does, last: the
    /// legacy AES scheme is a header field; LUKS gets its header and key
    /// material in new clusters (zeroed first), then the header names them.
    /// The image is then unlocked with the new key.
    pub(crate) fn set_up_encryption(&mut self, options: &EncryptionOptions) -> Result<()> {
        let crypto = |source: CryptoError| Error::Crypto {
            image: self.name.clone(),
            source,
        };
        match options {
            EncryptionOptions::Aes { secret } => {
                let cipher = DataCipher::legacy_aes(secret.as_bytes()).map_err(crypto)?;
                self.rewrite_header(|h| h.encryption = Encryption::Aes)?;
                self.encryption = Some(EncryptionInfo::Aes);
                self.cipher = Some(cipher);
                self.secret = Some(secret.clone());
            }
            EncryptionOptions::Luks(luks_options) => {
                let formatted = luks::format(luks_options).map_err(crypto)?;
                let cipher =
                    DataCipher::luks(&formatted.header, &formatted.master_key).map_err(crypto)?;
                let cs = self.header.cluster_size();
                let clusters = formatted.length.div_ceil(cs);
                let offset = self.lock_meta()?.clusters(clusters)?;
                let write = |bytes: &[u8], at: u64| {
                    self.file
                        .write_at(bytes, at)
                        .map_err(|e| Error::io(&self.name, "writing the LUKS header", at, e))
                };
                // Zeroed first, as QEMU zeroes them: past the end of the
                // file (a new image's case) by growing it, holes that
                // read as zeros; else written (at most 2 MiB and a
                // cluster).
                let end = offset + clusters * cs;
                let file_len = self
                    .file
                    .len()
                    .map_err(|e| Error::io(&self.name, "reading the file size", 0, e))?;
                if offset >= file_len {
                    self.file
                        .set_len(end)
                        .map_err(|e| Error::io(&self.name, "sizing the image", end, e))?;
                } else {
                    write(&vec![0u8; (clusters * cs) as usize], offset)?;
                }
                let slot = &formatted.header.key_slots[0];
                write(
                    &formatted.slot_material,
                    offset
                        + u64::from(slot.key_offset_sector) * qcow_format::luks::LUKS_SECTOR_SIZE,
                )?;
                write(
                    zerocopy::IntoBytes::as_bytes(&formatted.header.to_raw()),
                    offset,
                )?;
                let length = formatted.length;
                self.rewrite_header(|h| {
                    h.encryption = Encryption::Luks;
                    // QEMU's order: after the backing format and data
                    // file names, before the feature name table.
                    let at = h
                        .extensions
                        .iter()
                        .position(|e| {
                            !matches!(
                                e,
                                HeaderExtension::BackingFormat(_)
                                    | HeaderExtension::ExternalDataFile(_)
                            )
                        })
                        .unwrap_or(h.extensions.len());
                    h.extensions
                        .insert(at, HeaderExtension::FullDiskEncryption { offset, length });
                })?;
                self.encryption = Some(EncryptionInfo::Luks {
                    header: Box::new(formatted.header),
                    offset,
                    length,
                });
                self.cipher = Some(cipher);
                self.secret = Some(luks_options.secret.clone());
            }
        }
        Ok(())
    }

    /// Adds or erases LUKS key slots (`qemu-img amend -o encrypt.state=...`;
    /// `force`: its `--force`), the key material and header written where
    /// the image's encryption header extension says, in QEMU's order.
    pub fn change_key_slots(&mut self, change: &KeySlotChange, force: bool) -> Result<()> {
        self.check_writable()?;
        let crypto = |source: CryptoError| Error::Crypto {
            image: self.name.clone(),
            source,
        };
        let Some(EncryptionInfo::Luks {
            header,
            offset,
            length,
        }) = &self.encryption
        else {
            return Err(Error::InvalidOptions(format!(
                "{}: key slots can only be changed in images with LUKS encryption",
                self.name
            )));
        };
        let (offset, length) = (*offset, *length);
        let mut header = (**header).clone();
        let file = self.file.clone();
        let writes = change_key_slots(
            &mut header,
            change,
            force,
            self.secret.as_ref(),
            &mut |at, buf| {
                if at + buf.len() as u64 > length {
                    return Err(CryptoError::OutsideHeader);
                }
                file.read_at(buf, offset + at)
                    .map_err(|e| CryptoError::Read(e.to_string()))
            },
        )
        .map_err(crypto)?;
        // All inside the header's space, or none is made.
        if writes
            .iter()
            .any(|w| w.offset + w.bytes.len() as u64 > length)
        {
            return Err(crypto(CryptoError::OutsideHeader));
        }
        for write in &writes {
            let at = offset + write.offset;
            self.file
                .write_at(&write.bytes, at)
                .and_then(|()| self.file.flush())
                .map_err(|e| Error::io(&self.name, "writing the LUKS header", at, e))?;
        }
        self.encryption = Some(EncryptionInfo::Luks {
            header: Box::new(header),
            offset,
            length,
        });
        Ok(())
    }

    /// Reads `out` from host offset `host` of the data file, guest offset
    /// `guest`, decrypting it in an encrypted image (whole sectors are
    /// read and decrypted; the caller's part copied out).
    pub(super) fn read_data(&self, out: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let Some(cipher) = self.data_cipher()? else {
            return self.read_raw_data(out, host);
        };
        cipher.read_sectors(&self.name, out, host, guest, |buf, at| {
            self.read_raw_data(buf, at)
        })
    }

    /// Writes guest data `data` at host offset `host` (guest offset
    /// `guest`) of the data file, encrypted in an encrypted image
    /// ([`DataCipher::write_sectors`]).
    pub(super) fn write_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        let Some(cipher) = self.data_cipher()? else {
            return self.write_raw_data(data, host);
        };
        cipher.write_sectors(
            &self.name,
            data,
            host,
            guest,
            |buf, at| self.read_raw_data(buf, at),
            |buf, at| self.write_raw_data(buf, at),
        )
    }

    /// The data cipher of an encrypted image (an error if it is locked),
    /// or `None` for a plain one.
    fn data_cipher(&self) -> Result<Option<&DataCipher>> {
        if self.encryption.is_none() {
            return Ok(None);
        }
        self.cipher.as_ref().map(Some).ok_or_else(|| Error::Crypto {
            image: self.name.clone(),
            source: CryptoError::KeyRequired,
        })
    }

    /// Reads bytes as they are stored at host offset `host` of the data
    /// file.
    fn read_raw_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.data_storage()?
            .read_at(buf, host)
            .map_err(|e| Error::io(&self.name, "reading data", host, e))
    }
}
