//! Encrypted images: QCOW2's LUKS encryption (`encrypt.format=luks`, the
//! LUKS header in clusters of the image, each data sector encrypted with
//! its host offset as IV) and the legacy AES scheme of QCOW and QCOW2
//! (`encrypt.format=aes`: AES-128-CBC keyed by the password itself, each
//! sector encrypted with its guest offset as IV).
//!
//! - [`hash`]: the hashes, PBKDF2 over them;
//! - [`cipher`]: sector ciphers (AES in XTS, CBC or ECB mode; IV
//!   generators `plain`, `plain64` and `essiv`);
//! - [`luks`]: unlocking a LUKS header with a password, making one;
//! - [`key_slots`]: adding and erasing key slots;
//! - [`sectors`]: any byte range of an image's data read or written
//!   through its cipher in whole sectors.

pub mod cipher;
pub mod hash;
pub mod key_slots;
pub mod luks;
mod sectors;

use qcow_format::FormatError;
use qcow_format::luks::LuksHeader;

use cipher::{CipherMode, CipherSpec, IvGenAlg, SECTOR, SectorCrypt};

/// The password (QEMU's secret) that unlocks an encrypted image.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why an encrypted image cannot be unlocked or used (worded as QEMU words
/// it).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// A named algorithm is not one this engine has.
    #[error("{what} '{name}' not supported")]
    NotSupported {
        /// What kind of algorithm (`Hash`, `Cipher mode`, `IV generator`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The cipher with this key size is not one this engine has.
    #[error("Algorithm '{name}' with key size {key_bytes} bytes not supported")]
    Algorithm {
        /// The cipher's name.
        name: String,
        /// The block cipher's key size.
        key_bytes: usize,
    },
    /// The cipher mode is not `MODE-IVGEN[:HASH]`.
    #[error("Unexpected cipher mode string format '{0}'")]
    ModeFormat(String),
    /// ESSIV without a hash.
    #[error("Missing IV generator hash specification")]
    MissingIvHash,
    /// ESSIV's hash gives no AES key size.
    #[error("No AES cipher with key size {0} available")]
    EssivKey(usize),
    /// No key slot opens with the password given.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// The image is encrypted and no password was given.
    #[error("Parameter 'encrypt.key-secret' is required for cipher")]
    KeyRequired,
    /// A LUKS volume was opened without its password.
    #[error("Parameter 'key-secret' is required for cipher")]
    VolumeKeyRequired,
    /// The LUKS header is damaged.
    #[error("{0}")]
    Header(FormatError),
    /// The LUKS header or its key material lies outside the space the
    /// image's encryption header extension gives it.
    #[error("Request for data outside of extension header")]
    OutsideHeader,
    /// The image has LUKS encryption but no encryption header extension.
    #[error("Missing CRYPTO header for crypt method 2")]
    MissingHeader,
    /// Reading the encryption header failed.
    #[error("Could not read encryption header: {0}")]
    Read(String),
    /// Key material that would not fill whole sectors (AES-192 outside
    /// XTS mode): QEMU aborts on such headers, so none is made.
    #[error(
        "Key material of {0}-byte keys does not fill whole sectors, which QEMU cannot read (use XTS mode or another key size)"
    )]
    UnalignedKeyMaterial(usize),
    /// A key slot change is refused.
    #[error("{0}")]
    KeySlots(key_slots::KeySlotProblem),
    /// PBKDF2 would need more iterations than LUKS can record.
    #[error("PBKDF iterations {0} larger than 4294967295")]
    Iterations(u64),
    /// The system gave no random numbers.
    #[error("Unable to read random bytes: {0}")]
    Random(String),
}

impl CryptoError {
    /// The kind of failure.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            CryptoError::InvalidPassword
            | CryptoError::KeyRequired
            | CryptoError::VolumeKeyRequired => ErrorKind::Key,
            CryptoError::Header(_) | CryptoError::OutsideHeader | CryptoError::MissingHeader => {
                ErrorKind::Malformed
            }
            CryptoError::Read(_) => ErrorKind::Io,
            CryptoError::KeySlots(_) => ErrorKind::InvalidInput,
            _ => ErrorKind::Unsupported,
        }
    }
}

/// How a new image is encrypted (qemu-img's `encrypt.*` options).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncryptionOptions {
    /// The legacy AES scheme (`encrypt.format=aes`), keyed by `secret`.
    Aes {
        /// The password.
        secret: Secret,
    },
    /// LUKS (`encrypt.format=luks`).
    Luks(LuksOptions),
}

impl EncryptionOptions {
    /// The name qemu-img gives the format (`aes` or `luks`).
    pub fn format_name(&self) -> &'static str {
        match self {
            EncryptionOptions::Aes { .. } => "aes",
            EncryptionOptions::Luks(_) => "luks",
        }
    }
}

/// A new LUKS header's algorithms and password.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LuksOptions {
    /// The password of key slot 0.
    pub secret: Secret,
    /// The payload's cipher (`encrypt.cipher-alg`, `cipher-mode`,
    /// `ivgen-alg`, `ivgen-hash-alg`).
    pub cipher: CipherSpec,
    /// PBKDF2's and the splitter's hash (`encrypt.hash-alg`).
    pub hash: hash::HashAlg,
    /// Milliseconds PBKDF2 should take to unlock (`encrypt.iter-time`).
    pub iter_time_ms: u64,
}

impl LuksOptions {
    /// QEMU's defaults: AES-256 in XTS mode with `plain64` IVs, SHA-256,
    /// two seconds of PBKDF2.
    pub fn new(secret: Secret) -> LuksOptions {
        LuksOptions {
            secret,
            cipher: CipherSpec {
                aes_bits: 256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: hash::HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

impl LuksOptions {
    /// Bytes of master key: the block cipher's key, twice in XTS mode.
    pub fn key_len(&self) -> usize {
        self.cipher.aes_bits as usize / 8
            * if self.cipher.mode == CipherMode::Xts {
                2
            } else {
                1
            }
    }

    /// Checks that the algorithms make a header QEMU reads: the cipher
    /// exists with this key size, and the key material fills whole sectors.
    pub fn validate(&self) -> Result<(), CryptoError> {
        let c = self.cipher;
        CipherSpec::new("aes", self.key_len(), c.mode, c.ivgen, c.ivgen_hash)?;
        if self.key_len() * qcow_format::luks::LUKS_STRIPES as usize % SECTOR != 0 {
            return Err(CryptoError::UnalignedKeyMaterial(self.key_len()));
        }
        Ok(())
    }

    /// Bytes the LUKS header and its eight key slots take (QEMU's payload
    /// offset), as [`luks::format`] lays them out.
    pub fn header_len(&self) -> u64 {
        use qcow_format::luks::{
            LUKS_KEY_SLOT_OFFSET, LUKS_KEY_SLOTS, LUKS_SECTOR_SIZE, key_material_sectors,
        };
        let header_sectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
        let slots = LUKS_KEY_SLOTS as u64 * key_material_sectors(self.key_len() as u32);
        (header_sectors + slots) * LUKS_SECTOR_SIZE
    }
}

/// Fills `buf` with random bytes from the system.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// What an image's encryption is, for `info` (known without the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// The legacy AES scheme.
    Aes,
    /// LUKS, with its header and the algorithms it names.
    Luks {
        /// The header.
        header: Box<LuksHeader>,
        /// Where it lives in the image file.
        offset: u64,
        /// Bytes the image gives it there.
        length: u64,
    },
}

/// An unlocked image's data cipher.
#[derive(Debug)]
pub struct DataCipher {
    cipher: Box<dyn SectorCrypt>,
    /// IVs from host offsets (LUKS) or guest offsets (legacy AES).
    physical: bool,
    /// Held while a write merges into a sector it covers partly (read,
    /// decrypt, merge, encrypt, write), so that two such writes into one
    /// sector do not undo each other.
    merge: std::sync::Mutex<()>,
}

impl DataCipher {
    /// The legacy AES cipher QEMU derives from a password: its first 16
    /// bytes (zero-padded), AES-128-CBC with `plain64` IVs of guest
    /// offsets.
    pub fn legacy_aes(password: &[u8]) -> Result<DataCipher, CryptoError> {
        let mut key = [0u8; 16];
        let len = password.len().min(16);
        key[..len].copy_from_slice(&password[..len]);
        let spec = CipherSpec::new("aes", 16, CipherMode::Cbc, IvGenAlg::Plain64, None)?;
        Ok(DataCipher {
            cipher: spec.build(&key)?,
            physical: false,
            merge: std::sync::Mutex::new(()),
        })
    }

    /// The LUKS cipher of `header` with its master key.
    pub fn luks(header: &LuksHeader, master_key: &[u8]) -> Result<DataCipher, CryptoError> {
        let algorithms = luks::LuksAlgorithms::of(header)?;
        Ok(DataCipher {
            cipher: algorithms.cipher.build(master_key)?,
            physical: true,
            merge: std::sync::Mutex::new(()),
        })
    }

    /// The lock a write holds while it merges into a partly covered
    /// sector.
    pub fn merge_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.merge
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cipher of a LUKS volume (QEMU's `luks` format) with its master
    /// key: IVs from offsets in the disk.
    pub fn luks_volume(header: &LuksHeader, master_key: &[u8]) -> Result<DataCipher, CryptoError> {
        let mut cipher = DataCipher::luks(header, master_key)?;
        cipher.physical = false;
        Ok(cipher)
    }

    /// Whether IVs come from host offsets.
    pub fn physical(&self) -> bool {
        self.physical
    }

    /// Decrypts `data` (whole sectors) that lives at host offset `host`
    /// and guest offset `guest`.
    pub fn decrypt(&self, host: u64, guest: u64, data: &mut [u8]) {
        let at = if self.physical { host } else { guest };
        self.cipher.decrypt(at / SECTOR as u64, data);
    }

    /// Encrypts `data` (whole sectors) for host offset `host` and guest
    /// offset `guest`.
    pub fn encrypt(&self, host: u64, guest: u64, data: &mut [u8]) {
        let at = if self.physical { host } else { guest };
        self.cipher.encrypt(at / SECTOR as u64, data);
    }
}
