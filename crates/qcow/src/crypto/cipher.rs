//! Sector ciphers: AES in XTS, CBC or ECB mode, with the IV generators
//! LUKS and QEMU use (`plain`, `plain64`, `essiv:HASH`), encrypting and
//! decrypting 512-byte sectors in place.

use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser,
    InnerIvInit, KeyInit, consts::U16, generic_array::GenericArray,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

use super::CryptoError;
use super::hash::HashAlg;

/// The unit of encryption.
pub const SECTOR: usize = 512;

/// Encrypts and decrypts whole sectors in place; `sector` is the number of
/// the first one (which the IV is made of).
pub trait SectorCrypt: Send + Sync + std::fmt::Debug {
    /// Encrypts `data` (whole sectors, or key material's shorter tail).
    fn encrypt(&self, sector: u64, data: &mut [u8]);
    /// Decrypts `data` (whole sectors, or key material's shorter tail).
    fn decrypt(&self, sector: u64, data: &mut [u8]);
}

/// A block cipher mode LUKS names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher block chaining.
    Cbc,
    /// XEX with ciphertext stealing (the key is two keys).
    Xts,
}

impl CipherMode {
    /// The mode LUKS names `name`.
    pub fn from_name(name: &str) -> Result<CipherMode, CryptoError> {
        Ok(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            _ => {
                return Err(CryptoError::NotSupported {
                    what: "Cipher mode",
                    name: name.to_owned(),
                });
            }
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
}

/// How each sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The number's low 32 bits, little-endian.
    Plain,
    /// The number, little-endian.
    Plain64,
    /// `plain64` encrypted with a key hashed from the master key.
    Essiv,
}

impl IvGenAlg {
    /// The IV generator LUKS names `name`.
    pub fn from_name(name: &str) -> Result<IvGenAlg, CryptoError> {
        Ok(match name {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => {
                return Err(CryptoError::NotSupported {
                    what: "IV generator",
                    name: name.to_owned(),
                });
            }
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// What a sector cipher is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// Key bits of the block cipher (AES-128, -192 or -256).
    pub aes_bits: u32,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
    /// ESSIV's hash.
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// The spec for a cipher named `name` (only `aes`) whose key, as
    /// stored, is `key_len` bytes (twice the block cipher's in XTS mode).
    pub fn new(
        name: &str,
        key_len: usize,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
    ) -> Result<CipherSpec, CryptoError> {
        let cipher_key = if mode == CipherMode::Xts {
            key_len / 2
        } else {
            key_len
        };
        let supported = name == "aes"
            && matches!(cipher_key, 16 | 24 | 32)
            && (mode != CipherMode::Xts || key_len % 2 == 0);
        if !supported {
            return Err(CryptoError::Algorithm {
                name: name.to_owned(),
                key_bytes: cipher_key,
            });
        }
        if ivgen == IvGenAlg::Essiv {
            let Some(hash) = ivgen_hash else {
                return Err(CryptoError::MissingIvHash);
            };
            if !matches!(hash.digest_len(), 16 | 24 | 32) {
                return Err(CryptoError::EssivKey(hash.digest_len()));
            }
        }
        Ok(CipherSpec {
            aes_bits: cipher_key as u32 * 8,
            mode,
            ivgen,
            ivgen_hash,
        })
    }

    /// QEMU's name of the block cipher, e.g. `aes-256`.
    pub fn cipher_alg_name(&self) -> String {
        format!("aes-{}", self.aes_bits)
    }

    /// The sector cipher with `key` (as stored: both halves in XTS mode).
    pub fn build(&self, key: &[u8]) -> Result<Box<dyn SectorCrypt>, CryptoError> {
        let essiv = match (self.ivgen, self.ivgen_hash) {
            (IvGenAlg::Essiv, Some(hash)) => Some(Aes::new(&hash.digest(&[key]))?),
            _ => None,
        };
        let iv = IvGen {
            alg: self.ivgen,
            essiv,
        };
        Ok(match self.aes_bits {
            128 => build::<Aes128>(self.mode, key, iv)?,
            192 => build::<Aes192>(self.mode, key, iv)?,
            _ => build::<Aes256>(self.mode, key, iv)?,
        })
    }
}

/// One of the three AES ciphers, keyed (ESSIV's cipher).
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes, CryptoError> {
        let bad = |_| CryptoError::EssivKey(key.len());
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(CryptoError::EssivKey(n)),
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let block = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(block),
            Aes::A192(c) => c.encrypt_block(block),
            Aes::A256(c) => c.encrypt_block(block),
        }
    }
}

/// Makes IVs.
#[derive(Clone)]
struct IvGen {
    alg: IvGenAlg,
    essiv: Option<Aes>,
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.alg {
            IvGenAlg::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGenAlg::Plain64 | IvGenAlg::Essiv => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(essiv) = &self.essiv {
            essiv.encrypt_block(&mut iv);
        }
        iv
    }
}

/// A block cipher with 16-byte blocks, as the modes need it.
trait Block:
    BlockCipher
    + BlockEncrypt
    + BlockDecrypt
    + BlockSizeUser<BlockSize = U16>
    + KeyInit
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<C> Block for C where
    C: BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = U16>
        + KeyInit
        + Clone
        + Send
        + Sync
        + 'static
{
}

fn build<C: Block>(
    mode: CipherMode,
    key: &[u8],
    iv: IvGen,
) -> Result<Box<dyn SectorCrypt>, CryptoError> {
    let bad = |_| CryptoError::Algorithm {
        name: "aes".to_owned(),
        key_bytes: key.len(),
    };
    Ok(match mode {
        CipherMode::Xts => {
            let (k1, k2) = key.split_at(key.len() / 2);
            Box::new(XtsSectors {
                xts: Xts128::new(
                    C::new_from_slice(k1).map_err(bad)?,
                    C::new_from_slice(k2).map_err(bad)?,
                ),
                iv,
            })
        }
        CipherMode::Cbc => Box::new(CbcSectors {
            cipher: C::new_from_slice(key).map_err(bad)?,
            iv,
        }),
        CipherMode::Ecb => Box::new(EcbSectors {
            cipher: C::new_from_slice(key).map_err(bad)?,
        }),
    })
}

/// Runs `f` over each sector of `data` (the last may be shorter) with its
/// number.
fn each_sector(sector: u64, data: &mut [u8], mut f: impl FnMut(u64, &mut [u8])) {
    for (i, chunk) in data.chunks_mut(SECTOR).enumerate() {
        f(sector + i as u64, chunk);
    }
}

/// The blocks of `data`; a tail shorter than a block is left alone (no
/// caller has one: sectors and key material are multiples of 16 bytes).
fn blocks(data: &mut [u8]) -> impl Iterator<Item = &mut GenericArray<u8, U16>> {
    data.chunks_exact_mut(16).map(GenericArray::from_mut_slice)
}

struct XtsSectors<C: Block> {
    xts: Xts128<C>,
    iv: IvGen,
}

impl<C: Block> std::fmt::Debug for XtsSectors<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XtsSectors")
    }
}

impl<C: Block> SectorCrypt for XtsSectors<C> {
    fn encrypt(&self, sector: u64, data: &mut [u8]) {
        each_sector(sector, data, |n, s| {
            if s.len() >= 16 {
                self.xts.encrypt_sector(s, self.iv.iv(n));
            }
        });
    }

    fn decrypt(&self, sector: u64, data: &mut [u8]) {
        each_sector(sector, data, |n, s| {
            if s.len() >= 16 {
                self.xts.decrypt_sector(s, self.iv.iv(n));
            }
        });
    }
}

struct CbcSectors<C: Block> {
    cipher: C,
    iv: IvGen,
}

impl<C: Block> std::fmt::Debug for CbcSectors<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CbcSectors")
    }
}

impl<C: Block> SectorCrypt for CbcSectors<C> {
    fn encrypt(&self, sector: u64, data: &mut [u8]) {
        each_sector(sector, data, |n, s| {
            let iv = self.iv.iv(n);
            let mut cbc = cbc::Encryptor::<C>::inner_iv_init(self.cipher.clone(), &iv.into());
            for block in blocks(s) {
                cbc.encrypt_block_mut(block);
            }
        });
    }

    fn decrypt(&self, sector: u64, data: &mut [u8]) {
        each_sector(sector, data, |n, s| {
            let iv = self.iv.iv(n);
            let mut cbc = cbc::Decryptor::<C>::inner_iv_init(self.cipher.clone(), &iv.into());
            for block in blocks(s) {
                cbc.decrypt_block_mut(block);
            }
        });
    }
}

struct EcbSectors<C: Block> {
    cipher: C,
}

impl<C: Block> std::fmt::Debug for EcbSectors<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EcbSectors")
    }
}

impl<C: Block> SectorCrypt for EcbSectors<C> {
    fn encrypt(&self, _sector: u64, data: &mut [u8]) {
        for block in blocks(data) {
            self.cipher.encrypt_block(block);
        }
    }

    fn decrypt(&self, _sector: u64, data: &mut [u8]) {
        for block in blocks(data) {
            self.cipher.decrypt_block(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector() {
        for (bits, mode, ivgen, hash) in [
            (256, CipherMode::Xts, IvGenAlg::Plain64, None),
            (128, CipherMode::Xts, IvGenAlg::Plain, None),
            (128, CipherMode::Cbc, IvGenAlg::Essiv, Some(HashAlg::Sha256)),
            (192, CipherMode::Cbc, IvGenAlg::Plain64, None),
            (256, CipherMode::Ecb, IvGenAlg::Plain64, None),
        ] {
            let key_len = bits / 8 * if mode == CipherMode::Xts { 2 } else { 1 };
            let spec = CipherSpec::new("aes", key_len, mode, ivgen, hash).unwrap();
            let key: Vec<u8> = (0..key_len as u8).collect();
            let cipher = spec.build(&key).unwrap();
            let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
            let mut data = plain.clone();
            cipher.encrypt(5, &mut data);
            assert_ne!(data, plain);
            let mut other = plain.clone();
            cipher.encrypt(6, &mut other);
            assert_eq!(mode == CipherMode::Ecb, other[..SECTOR] == data[..SECTOR]);
            cipher.decrypt(5, &mut data);
            assert_eq!(data, plain, "{spec:?}");
        }
    }

    #[test]
    fn xts_plain64_matches_ieee_1619_vector_10() {
        // IEEE P1619 XTS-AES-256, vector 10: data unit 0xff, key halves
        // 2718281828... and 3141592653...
        let key = hex(
            "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592",
        );
        let spec = CipherSpec::new("aes", 64, CipherMode::Xts, IvGenAlg::Plain64, None).unwrap();
        let cipher = spec.build(&key).unwrap();
        let mut data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        cipher.encrypt(0xff, &mut data);
        assert_eq!(
            &data[..16],
            &hex("1c3b3a102f770386e4836c99e370cf9b")[..],
            "first block of IEEE 1619 vector 10"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
