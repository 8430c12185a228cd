//! An encrypted QCOW2 image: its encryption found on open (the LUKS header
//! read and checked, no key needed, as `info` shows it), unlocked with a
//! secret, and its data clusters decrypted as they are read.

use qcow_format::extension::HeaderExtension;
use qcow_format::header::{Encryption, Header};
use qcow_format::luks::{LuksHeader, RawLuksHeader};
use qcow_io::Storage;

use super::Qcow2Image;
use crate::crypto::{CryptoError, DataCipher, EncryptionInfo, Secret, cipher::SECTOR, luks};
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
        Ok(())
    }

    /// Reads `out` from host offset `host` of the data file, guest offset
    /// `guest`, decrypting it in an encrypted image (whole sectors are
    /// read and decrypted; the caller's part copied out).
    pub(super) fn read_data(&self, out: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let storage = self.data_storage()?;
        let read = |buf: &mut [u8], at: u64| {
            storage
                .read_at(buf, at)
                .map_err(|e| Error::io(&self.name, "reading data", at, e))
        };
        if self.encryption.is_none() {
            return read(out, host);
        }
        let cipher = self.cipher.as_ref().ok_or_else(|| Error::Crypto {
            image: self.name.clone(),
            source: CryptoError::KeyRequired,
        })?;
        let sector = SECTOR as u64;
        let head = host % sector;
        let len = out.len() as u64;
        if head == 0 && len % sector == 0 {
            read(out, host)?;
            cipher.decrypt(host, guest, out);
            return Ok(());
        }
        let start = host - head;
        // At most one run of a read: bounded by the caller's buffer plus
        // two sectors.
        let mut sectors = vec![0u8; ((host + len).next_multiple_of(sector) - start) as usize];
        read(&mut sectors, start)?;
        cipher.decrypt(start, guest - head, &mut sectors);
        out.copy_from_slice(&sectors[head as usize..(head + len) as usize]);
        Ok(())
    }
}
