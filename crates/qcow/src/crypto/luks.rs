//! Unlocking a LUKS header with a password: PBKDF2 turns the password into
//! a slot key, which decrypts the slot's key material; the anti-forensic
//! merge of its stripes gives a candidate master key, which is right when
//! its PBKDF2 digest is the header's.

use qcow_format::luks::{
    LUKS_DIGEST_LEN, LUKS_KEY_SLOT_OFFSET, LUKS_KEY_SLOTS, LUKS_SALT_LEN, LUKS_SECTOR_SIZE,
    LUKS_STRIPES, LuksHeader, LuksKeySlot, key_material_sectors,
};

use super::cipher::{CipherMode, CipherSpec, IvGenAlg};
use super::hash::HashAlg;
use zeroize::Zeroizing;

use super::{CryptoError, LuksOptions, random};

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

/// Reads key material: `len` bytes at an offset from the LUKS header's
/// start.
pub type ReadKeyMaterial<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), CryptoError> + 'a;

/// Finds the master key `password` unlocks; `read` reads `len` bytes at
/// an offset from the header's start (the key material).
pub fn unlock(
    header: &LuksHeader,
    password: &[u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), CryptoError>,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    for slot in 0..header.key_slots.len() {
        if let Some(key) = try_slot(header, slot, password, &mut read)? {
            return Ok(key);
        }
    }
    Err(CryptoError::InvalidPassword)
}

/// The master key `password` unlocks in key slot `slot`; `None` when the
/// slot is inactive or holds another password.
pub fn try_slot(
    header: &LuksHeader,
    slot: usize,
    password: &[u8],
    read: &mut ReadKeyMaterial<'_>,
) -> Result<Option<Zeroizing<Vec<u8>>>, CryptoError> {
    let Some(slot) = header.key_slots.get(slot).filter(|s| s.active) else {
        return Ok(None);
    };
    let algorithms = LuksAlgorithms::of(header)?;
    let key_len = header.master_key_len as usize;
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    algorithms
        .hash
        .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
    // Bounded: at most 64 bytes times 4000 stripes.
    let mut material = Zeroizing::new(vec![0u8; key_len * slot.stripes as usize]);
    read(
        u64::from(slot.key_offset_sector) * LUKS_SECTOR_SIZE,
        &mut material,
    )?;
    algorithms
        .cipher
        .build(&slot_key)?
        .decrypt(0, &mut material);
    let candidate = Zeroizing::new(af_merge(algorithms.hash, key_len, &material));
    let mut digest = [0u8; LUKS_DIGEST_LEN];
    algorithms.hash.pbkdf2(
        &candidate,
        &header.master_key_salt,
        header.master_key_iterations,
        &mut digest,
    );
    Ok((digest == header.master_key_digest).then_some(candidate))
}

/// Puts `password` into key slot `slot` of `header` for `master_key`, as
/// QEMU stores a key: a new salt, iterations calibrated to `iter_time_ms`
/// (at least 1000), the key split into the slot's stripes and encrypted
/// with the password's PBKDF2 key. Returns the key material to write at the
/// slot's offset; the slot is marked active.
pub fn fill_slot(
    header: &mut LuksHeader,
    slot: usize,
    password: &[u8],
    master_key: &[u8],
    iter_time_ms: u64,
) -> Result<Vec<u8>, CryptoError> {
    let algorithms = LuksAlgorithms::of(header)?;
    let hash = algorithms.hash;
    let key_len = master_key.len();
    let mut salt = [0u8; LUKS_SALT_LEN];
    random(&mut salt)?;
    let iterations = scaled_iterations(
        hash.iterations_per_second(password.len(), key_len),
        iter_time_ms,
        1,
    )?;
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    hash.pbkdf2(password, &salt, iterations, &mut slot_key);
    let Some(entry) = header.key_slots.get_mut(slot) else {
        return Err(CryptoError::Algorithm {
            name: "key slot".into(),
            key_bytes: slot,
        });
    };
    let mut material = af_split(hash, master_key, entry.stripes as usize, random)?;
    algorithms
        .cipher
        .build(&slot_key)?
        .encrypt(0, &mut material);
    entry.active = true;
    entry.iterations = iterations;
    entry.salt = salt;
    Ok(material)
}

/// Iterations for `iter_time_ms` at `per_second`, divided by `divisor`,
/// at least 1000, as QEMU scales them.
fn scaled_iterations(per_second: u64, iter_time_ms: u64, divisor: u64) -> Result<u32, CryptoError> {
    let iterations = u128::from(per_second) * u128::from(iter_time_ms) / 1000 / u128::from(divisor);
    if iterations > u128::from(u32::MAX) {
        return Err(CryptoError::Iterations(
            iterations.min(u128::from(u64::MAX)) as u64,
        ));
    }
    // No more than a header may ask for when it is read back.
    Ok((iterations as u32).clamp(1000, qcow_format::limits::MAX_LUKS_ITERATIONS))
}

/// A new LUKS header with key slot 0 set to a password, as QEMU makes one.
pub struct FormattedLuks {
    /// The header.
    pub header: LuksHeader,
    /// Slot 0's key material, to be written at its offset.
    pub slot_material: Vec<u8>,
    /// Bytes the header and its eight slots take (the payload offset).
    pub length: u64,
    /// The master key (zeroed when dropped).
    pub master_key: Zeroizing<Vec<u8>>,
}

/// Makes a LUKS header as QEMU does: a random master key, its digest and
/// slot 0's iterations calibrated to `iter_time_ms` on this machine (the
/// digest's an eighth of it, at least 1000 each), eight slots laid out in
/// 4 KiB steps after the first 4 KiB, slot 0 holding the master key split
/// into 4000 stripes and encrypted with the password's PBKDF2 key.
pub fn format(options: &LuksOptions) -> Result<FormattedLuks, CryptoError> {
    let spec = options.cipher;
    let key_len = spec.aes_bits as usize / 8 * if spec.mode == CipherMode::Xts { 2 } else { 1 };
    // Checks the combination (ESSIV's hash) as a header would be checked.
    options.validate()?;
    let mode = match spec.ivgen_hash {
        Some(hash) => format!("{}-{}:{}", spec.mode.name(), spec.ivgen.name(), hash.name()),
        None => format!("{}-{}", spec.mode.name(), spec.ivgen.name()),
    };
    let hash = options.hash;
    let mut master_key = Zeroizing::new(vec![0u8; key_len]);
    random(&mut master_key)?;
    let mut master_key_salt = [0u8; LUKS_SALT_LEN];
    random(&mut master_key_salt)?;
    let master_key_iterations = scaled_iterations(
        hash.iterations_per_second(key_len, LUKS_DIGEST_LEN),
        options.iter_time_ms,
        8,
    )?;
    let mut master_key_digest = [0u8; LUKS_DIGEST_LEN];
    hash.pbkdf2(
        &master_key,
        &master_key_salt,
        master_key_iterations,
        &mut master_key_digest,
    );
    let header_sectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
    let slot_sectors = key_material_sectors(key_len as u32);
    let slot_at = |i: usize| (header_sectors + i as u64 * slot_sectors) as u32;
    let key_slots: [LuksKeySlot; LUKS_KEY_SLOTS] = std::array::from_fn(|i| LuksKeySlot {
        active: false,
        iterations: 0,
        salt: [0; LUKS_SALT_LEN],
        key_offset_sector: slot_at(i),
        stripes: LUKS_STRIPES,
    });
    let payload_sectors = header_sectors + LUKS_KEY_SLOTS as u64 * slot_sectors;
    let mut uuid = [0u8; 16];
    random(&mut uuid)?;
    let mut header = LuksHeader {
        cipher_name: "aes".to_owned(),
        cipher_mode: mode,
        hash_spec: hash.name().to_owned(),
        payload_offset_sector: payload_sectors as u32,
        master_key_len: key_len as u32,
        master_key_digest,
        master_key_salt,
        master_key_iterations,
        uuid: uuid_text(uuid),
        key_slots,
    };
    // Slot 0 takes the password.
    let slot_material = fill_slot(
        &mut header,
        0,
        options.secret.as_bytes(),
        &master_key,
        options.iter_time_ms,
    )?;
    Ok(FormattedLuks {
        header,
        slot_material,
        length: payload_sectors * LUKS_SECTOR_SIZE,
        master_key,
    })
}

impl std::fmt::Debug for FormattedLuks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FormattedLuks")
            .field("header", &self.header)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

/// A random (version 4) UUID as text.
fn uuid_text(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
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
    fn calibrated_counts_stay_within_what_a_header_may_ask() {
        let max = qcow_format::limits::MAX_LUKS_ITERATIONS;
        assert_eq!(scaled_iterations(1 << 28, 2000, 1).unwrap(), max);
        assert_eq!(scaled_iterations(10, 10, 1).unwrap(), 1000);
        assert!(scaled_iterations(u64::MAX, u64::MAX, 1).is_err());
    }

    #[test]
    fn a_formatted_header_unlocks_with_its_password_only() {
        let mut options = LuksOptions::new(super::super::Secret::new("pw"));
        options.iter_time_ms = 1;
        let f = format(&options).unwrap();
        assert_eq!(f.header.cipher_mode, "xts-plain64");
        assert_eq!(f.length, 2068480, "QEMU's payload offset for AES-256-XTS");
        let raw = zerocopy::IntoBytes::as_bytes(&f.header.to_raw()).to_vec();
        let header = LuksHeader::parse(&raw).unwrap();
        let at = u64::from(header.key_slots[0].key_offset_sector) * LUKS_SECTOR_SIZE;
        let read = |offset: u64, buf: &mut [u8]| {
            assert_eq!(offset, at);
            buf.copy_from_slice(&f.slot_material);
            Ok(())
        };
        assert_eq!(unlock(&header, b"pw", read).unwrap(), f.master_key);
        assert_eq!(
            unlock(&header, b"other", read),
            Err(CryptoError::InvalidPassword)
        );
    }

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
