//! Unlocking a LUKS header with a password: PBKDF2 turns the password into
//! a slot key, which decrypts the slot's key material; the anti-forensic
//! merge of its stripes gives a candidate master key, which is right when
//! its PBKDF2 digest is the header's.

use qcow_format::luks::{LUKS_DIGEST_LEN, LuksHeader};

use super::CryptoError;
use super::cipher::{CipherMode, CipherSpec, IvGenAlg};
use super::hash::HashAlg;

/// The algorithms a LUKS header names, looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksAlgorithms {
    /// The payload's (and key material's) cipher.
    pub cipher: CipherSpec,
    /// PBKDF2's and the splitter's hash.
    pub hash: HashAlg,
}

impl LuksAlgorithms {
    /// Looks up what `header` names, as QEMU parses it
    /// (`MODE-IVGEN[:IVHASH]`).
    pub fn of(header: &LuksHeader) -> Result<LuksAlgorithms, CryptoError> {
        let Some((mode, ivgen)) = header.cipher_mode.split_once('-') else {
            return Err(CryptoError::ModeFormat(header.cipher_mode.clone()));
        };
        let (ivgen, ivhash) = match ivgen.split_once(':') {
            Some((ivgen, hash)) => (ivgen, Some(HashAlg::from_name(hash)?)),
            None => (ivgen, None),
        };
        let mode = CipherMode::from_name(mode)?;
        let hash = HashAlg::from_name(&header.hash_spec)?;
        let ivgen = IvGenAlg::from_name(ivgen)?;
        let cipher = CipherSpec::new(
            &header.cipher_name,
            header.master_key_len as usize,
            mode,
            ivgen,
            ivhash,
        )?;
        Ok(LuksAlgorithms { cipher, hash })
    }
}

/// Finds the master key `password` unlocks; `read` reads `len` bytes at
/// an offset from the header's start (the key material).
pub fn unlock(
    header: &LuksHeader,
    password: &[u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), CryptoError>,
) -> Result<Vec<u8>, CryptoError> {
    let algorithms = LuksAlgorithms::of(header)?;
    let key_len = header.master_key_len as usize;
    for slot in header.key_slots.iter().filter(|s| s.active) {
        let mut slot_key = vec![0u8; key_len];
        algorithms
            .hash
            .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        // Bounded: at most 64 bytes times 4000 stripes.
        let mut material = vec![0u8; key_len * slot.stripes as usize];
        read(
            u64::from(slot.key_offset_sector) * qcow_format::luks::LUKS_SECTOR_SIZE,
            &mut material,
        )?;
        algorithms
            .cipher
            .build(&slot_key)?
            .decrypt(0, &mut material);
        let candidate = af_merge(algorithms.hash, key_len, &material);
        let mut digest = [0u8; LUKS_DIGEST_LEN];
        algorithms.hash.pbkdf2(
            &candidate,
            &header.master_key_salt,
            header.master_key_iterations,
            &mut digest,
        );
        if digest == header.master_key_digest {
            return Ok(candidate);
        }
    }
    Err(CryptoError::InvalidPassword)
}

/// The anti-forensic merge: the stripes folded through the diffuser.
fn af_merge(hash: HashAlg, key_len: usize, stripes: &[u8]) -> Vec<u8> {
    let mut block = vec![0u8; key_len];
    let mut chunks = stripes.chunks_exact(key_len).peekable();
    while let Some(stripe) = chunks.next() {
        xor(&mut block, stripe);
        if chunks.peek().is_some() {
            diffuse(hash, &mut block);
        }
    }
    block
}

/// Splits `key` into `stripes` anti-forensic stripes, the last making the
/// merge give `key` back; `random` fills the others.
pub fn af_split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: impl FnOnce(&mut [u8]) -> Result<(), CryptoError>,
) -> Result<Vec<u8>, CryptoError> {
    let key_len = key.len();
    let mut out = vec![0u8; key_len * stripes];
    let last = key_len * (stripes - 1);
    random(&mut out[..last])?;
    let mut block = vec![0u8; key_len];
    for stripe in out[..last].chunks_exact(key_len) {
        xor(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    xor(&mut block, key);
    out[last..].copy_from_slice(&block);
    Ok(out)
}

fn xor(block: &mut [u8], other: &[u8]) {
    for (a, b) in block.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// LUKS's diffuser: each digest-sized piece replaced by the hash of its
/// index (big-endian) and itself.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let digest_len = hash.digest_len();
    for (i, piece) in block.chunks_mut(digest_len).enumerate() {
        let digest = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let len = piece.len();
        piece.copy_from_slice(&digest[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..48u8).collect();
            let split = af_split(hash, &key, 4000, |out| {
                for (i, b) in out.iter_mut().enumerate() {
                    *b = (i * 31 % 251) as u8;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(af_merge(hash, key.len(), &split), key);
        }
    }
}
