//! The LUKS (version 1) header that a QCOW2 image encrypted with
//! `encrypt.format=luks` keeps in the clusters its full disk encryption
//! header extension points at.
//!
//! The layout is LUKS's own (big-endian, 592 bytes, eight key slots);
//! [`LuksHeader::parse`] checks it as QEMU checks it before anything of it
//! is used: magic and version, NUL-terminated names, and key slots that
//! neither overlap each other nor the header or the encrypted payload.
//! Everything about ciphers and keys is the engine's business.

use zerocopy::byteorder::big_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::FormatError;

/// LUKS's magic: `LUKS\xba\xbe`.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";

/// The one LUKS version QEMU and this crate read.
pub const LUKS_VERSION: u16 = 1;

/// Number of key slots in a LUKS header.
pub const LUKS_KEY_SLOTS: usize = 8;

/// A key slot in use.
pub const LUKS_SLOT_ENABLED: u32 = 0x00ac_71f3;

/// A key slot not in use.
pub const LUKS_SLOT_DISABLED: u32 = 0x0000_dead;

/// The number of anti-forensic stripes every key slot has.
pub const LUKS_STRIPES: u32 = 4000;

/// The unit of LUKS offsets and of the encryption itself.
pub const LUKS_SECTOR_SIZE: u64 = 512;

/// Where the first key slot may start: the header's first 4 KiB.
pub const LUKS_KEY_SLOT_OFFSET: u64 = 4096;

/// Length of the master key digest (PBKDF2's output, as SHA-1's).
pub const LUKS_DIGEST_LEN: usize = 20;

/// Length of the salts.
pub const LUKS_SALT_LEN: usize = 32;

/// A key slot as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLuksKeySlot {
    /// [`LUKS_SLOT_ENABLED`] or [`LUKS_SLOT_DISABLED`].
    pub active: U32,
    /// PBKDF2 iterations that turn a password into the slot's key.
    pub iterations: U32,
    /// PBKDF2 salt.
    pub salt: [u8; LUKS_SALT_LEN],
    /// Where the slot's key material starts, in sectors from the header.
    pub key_offset_sector: U32,
    /// Anti-forensic stripes of the key material.
    pub stripes: U32,
}

/// The LUKS header as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLuksHeader {
    /// [`LUKS_MAGIC`].
    pub magic: [u8; 6],
    /// [`LUKS_VERSION`].
    pub version: U16,
    /// Cipher name, e.g. `aes` (NUL-terminated).
    pub cipher_name: [u8; 32],
    /// Cipher mode and IV generator, e.g. `xts-plain64` (NUL-terminated).
    pub cipher_mode: [u8; 32],
    /// Hash of PBKDF2 and of the anti-forensic splitter (NUL-terminated).
    pub hash_spec: [u8; 32],
    /// Where the encrypted payload starts, in sectors.
    pub payload_offset_sector: U32,
    /// Length of the master key in bytes.
    pub master_key_len: U32,
    /// PBKDF2 of the master key, to recognise it.
    pub master_key_digest: [u8; LUKS_DIGEST_LEN],
    /// Salt of that digest.
    pub master_key_salt: [u8; LUKS_SALT_LEN],
    /// Iterations of that digest.
    pub master_key_iterations: U32,
    /// The volume's UUID as text (NUL-terminated).
    pub uuid: [u8; 40],
    /// The key slots.
    pub key_slots: [RawLuksKeySlot; LUKS_KEY_SLOTS],
}

const _: () = assert!(size_of::<RawLuksHeader>() == 592);

/// A key slot, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksKeySlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; LUKS_SALT_LEN],
    /// Where the key material starts, in sectors from the header.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes (always [`LUKS_STRIPES`]).
    pub stripes: u32,
}

/// A LUKS header, checked as QEMU checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name, e.g. `aes`.
    pub cipher_name: String,
    /// Cipher mode and IV generator, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// Hash name, e.g. `sha256`.
    pub hash_spec: String,
    /// Where the payload starts, in sectors.
    pub payload_offset_sector: u32,
    /// Length of the master key in bytes.
    pub master_key_len: u32,
    /// PBKDF2 of the master key.
    pub master_key_digest: [u8; LUKS_DIGEST_LEN],
    /// Salt of that digest.
    pub master_key_salt: [u8; LUKS_SALT_LEN],
    /// Iterations of that digest.
    pub master_key_iterations: u32,
    /// The UUID as text.
    pub uuid: String,
    /// The key slots.
    pub key_slots: [LuksKeySlot; LUKS_KEY_SLOTS],
}

/// Largest master key accepted: two 256-bit keys (AES-256 in XTS mode).
pub const LUKS_MAX_KEY_LEN: u32 = 64;

impl LuksHeader {
    /// Parses and checks the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<LuksHeader, FormatError> {
        let (raw, _) =
            RawLuksHeader::read_from_prefix(bytes).map_err(|_| FormatError::Truncated {
                structure: "LUKS header",
                needed: size_of::<RawLuksHeader>() as u64,
                available: bytes.len() as u64,
            })?;
        let bad = |problem: LuksProblem| FormatError::Luks(problem);
        if raw.magic != LUKS_MAGIC {
            return Err(bad(LuksProblem::Magic));
        }
        if raw.version.get() != LUKS_VERSION {
            return Err(bad(LuksProblem::Version(raw.version.get())));
        }
        let text = |field: &[u8], what: &'static str| {
            let end = field
                .iter()
                .position(|&b| b == 0)
                .ok_or(bad(LuksProblem::NotTerminated(what)))?;
            Ok::<_, FormatError>(String::from_utf8_lossy(&field[..end]).into_owned())
        };
        let cipher_name = text(&raw.cipher_name, "cipher name")?;
        let cipher_mode = text(&raw.cipher_mode, "cipher mode")?;
        let hash_spec = text(&raw.hash_spec, "hash spec")?;
        let uuid = match raw.uuid.iter().position(|&b| b == 0) {
            Some(end) => String::from_utf8_lossy(&raw.uuid[..end]).into_owned(),
            None => String::from_utf8_lossy(&raw.uuid).into_owned(),
        };
        let header_sectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
        let payload = raw.payload_offset_sector.get();
        if u64::from(payload) < header_sectors {
            return Err(bad(LuksProblem::PayloadOverlapsHeader));
        }
        if raw.master_key_iterations.get() == 0 {
            return Err(bad(LuksProblem::MasterKeyIterations));
        }
        let max = crate::limits::MAX_LUKS_ITERATIONS;
        if raw.master_key_iterations.get() > max {
            return Err(bad(LuksProblem::TooManyIterations {
                slot: None,
                iterations: raw.master_key_iterations.get(),
            }));
        }
        let key_len = raw.master_key_len.get();
        if key_len == 0 || key_len > LUKS_MAX_KEY_LEN {
            return Err(bad(LuksProblem::KeyLength(key_len)));
        }
        let mut key_slots = [LuksKeySlot {
            active: false,
            iterations: 0,
            salt: [0; LUKS_SALT_LEN],
            key_offset_sector: 0,
            stripes: 0,
        }; LUKS_KEY_SLOTS];
        for (i, slot) in raw.key_slots.iter().enumerate() {
            let stripes = slot.stripes.get();
            if stripes != LUKS_STRIPES {
                return Err(bad(LuksProblem::Stripes { slot: i, stripes }));
            }
            let active = match slot.active.get() {
                LUKS_SLOT_ENABLED => true,
                LUKS_SLOT_DISABLED => false,
                _ => return Err(bad(LuksProblem::SlotState(i))),
            };
            if active && slot.iterations.get() == 0 {
                return Err(bad(LuksProblem::SlotIterations(i)));
            }
            if active && slot.iterations.get() > max {
                return Err(bad(LuksProblem::TooManyIterations {
                    slot: Some(i),
                    iterations: slot.iterations.get(),
                }));
            }
            let start = u64::from(slot.key_offset_sector.get());
            if start < header_sectors {
                return Err(bad(LuksProblem::SlotOverlapsHeader(i)));
            }
            let len = key_material_sectors(key_len);
            if start + len > u64::from(payload) {
                return Err(bad(LuksProblem::SlotOverlapsPayload(i)));
            }
            for (j, other) in raw.key_slots.iter().enumerate().skip(i + 1) {
                let other_start = u64::from(other.key_offset_sector.get());
                if start < other_start + len && other_start < start + len {
                    return Err(bad(LuksProblem::SlotsOverlap(i, j)));
                }
            }
            key_slots[i] = LuksKeySlot {
                active,
                iterations: slot.iterations.get(),
                salt: slot.salt,
                key_offset_sector: slot.key_offset_sector.get(),
                stripes,
            };
        }
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sector: payload,
            master_key_len: key_len,
            master_key_digest: raw.master_key_digest,
            master_key_salt: raw.master_key_salt,
            master_key_iterations: raw.master_key_iterations.get(),
            uuid,
            key_slots,
        })
    }

    /// Where the encrypted payload would start, in bytes from the header
    /// (in a QCOW2 image the payload is the image's data clusters instead).
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * LUKS_SECTOR_SIZE
    }

    /// The stored form of this header.
    pub fn to_raw(&self) -> RawLuksHeader {
        let mut raw = RawLuksHeader::new_zeroed();
        raw.magic = LUKS_MAGIC;
        raw.version = U16::new(LUKS_VERSION);
        copy_text(&mut raw.cipher_name, &self.cipher_name);
        copy_text(&mut raw.cipher_mode, &self.cipher_mode);
        copy_text(&mut raw.hash_spec, &self.hash_spec);
        raw.payload_offset_sector = U32::new(self.payload_offset_sector);
        raw.master_key_len = U32::new(self.master_key_len);
        raw.master_key_digest = self.master_key_digest;
        raw.master_key_salt = self.master_key_salt;
        raw.master_key_iterations = U32::new(self.master_key_iterations);
        copy_text(&mut raw.uuid, &self.uuid);
        for (raw_slot, slot) in raw.key_slots.iter_mut().zip(&self.key_slots) {
            *raw_slot = RawLuksKeySlot {
                active: U32::new(if slot.active {
                    LUKS_SLOT_ENABLED
                } else {
                    LUKS_SLOT_DISABLED
                }),
                iterations: U32::new(slot.iterations),
                salt: slot.salt,
                key_offset_sector: U32::new(slot.key_offset_sector),
                stripes: U32::new(slot.stripes),
            };
        }
        raw
    }
}

/// Copies `text` into a NUL-padded field, leaving room for the NUL.
fn copy_text(field: &mut [u8], text: &str) {
    let len = text.len().min(field.len() - 1);
    field[..len].copy_from_slice(&text.as_bytes()[..len]);
}

/// Sectors the key material of one slot takes for a master key of
/// `key_len` bytes: its stripes, rounded up to sectors and then to the
/// header's 4 KiB, as QEMU lays slots out.
pub fn key_material_sectors(key_len: u32) -> u64 {
    let header_sectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
    let bytes = u64::from(key_len) * u64::from(LUKS_STRIPES);
    bytes
        .div_ceil(LUKS_SECTOR_SIZE)
        .next_multiple_of(header_sectors)
}

/// What is wrong with a LUKS header (worded as QEMU words it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LuksProblem {
    /// The magic is not [`LUKS_MAGIC`].
    Magic,
    /// The version is not 1.
    Version(u16),
    /// A name field has no NUL.
    NotTerminated(&'static str),
    /// The payload starts inside the header's first 4 KiB.
    PayloadOverlapsHeader,
    /// The master key digest has no iterations.
    MasterKeyIterations,
    /// The master key is empty or longer than [`LUKS_MAX_KEY_LEN`].
    KeyLength(u32),
    /// A key slot's stripe count is not [`LUKS_STRIPES`].
    Stripes {
        /// The slot.
        slot: usize,
        /// Its stripe count.
        stripes: u32,
    },
    /// A key slot is neither enabled nor disabled.
    SlotState(usize),
    /// An enabled key slot has no iterations.
    SlotIterations(usize),
    /// A key slot starts inside the header's first 4 KiB.
    SlotOverlapsHeader(usize),
    /// A key slot reaches into the payload.
    SlotOverlapsPayload(usize),
    /// Two key slots overlap.
    SlotsOverlap(usize, usize),
    /// More PBKDF2 iterations than
    /// [`MAX_LUKS_ITERATIONS`](crate::limits::MAX_LUKS_ITERATIONS).
    TooManyIterations {
        /// The key slot (`None`: the master key digest).
        slot: Option<usize>,
        /// Its iteration count.
        iterations: u32,
    },
}

impl std::fmt::Display for LuksProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LuksProblem::Magic => write!(f, "Volume is not in LUKS format"),
            LuksProblem::Version(v) => write!(f, "LUKS version {v} is not supported"),
            LuksProblem::NotTerminated(what) => {
                write!(f, "LUKS header {what} is not NUL terminated")
            }
            LuksProblem::PayloadOverlapsHeader => {
                write!(f, "LUKS payload is overlapping with the header")
            }
            LuksProblem::MasterKeyIterations => write!(f, "LUKS key iteration count is zero"),
            LuksProblem::KeyLength(len) => {
                write!(f, "LUKS master key length {len} is not supported")
            }
            LuksProblem::Stripes { slot, stripes } => write!(
                f,
                "Keyslot {slot} is corrupted (stripes {stripes} != {LUKS_STRIPES})"
            ),
            LuksProblem::SlotState(i) => {
                write!(f, "Keyslot {i} state (active/disable) is corrupted")
            }
            LuksProblem::SlotIterations(i) => write!(f, "Keyslot {i} iteration count is zero"),
            LuksProblem::SlotOverlapsHeader(i) => {
                write!(f, "Keyslot {i} is overlapping with the LUKS header")
            }
            LuksProblem::SlotOverlapsPayload(i) => {
                write!(f, "Keyslot {i} is overlapping with the encrypted payload")
            }
            LuksProblem::SlotsOverlap(i, j) => {
                write!(f, "Keyslots {i} and {j} are overlapping in the header")
            }
            LuksProblem::TooManyIterations { slot, iterations } => {
                let what = match slot {
                    Some(i) => format!("Keyslot {i}"),
                    None => "The master key digest".to_owned(),
                };
                write!(
                    f,
                    "{what} asks for {iterations} PBKDF2 iterations, more than the {} accepted",
                    crate::limits::MAX_LUKS_ITERATIONS
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LuksHeader {
        let slot = |i: u32, active: bool| LuksKeySlot {
            active,
            iterations: if active { 1000 } else { 0 },
            salt: [i as u8; LUKS_SALT_LEN],
            key_offset_sector: 8 + i * key_material_sectors(64) as u32,
            stripes: LUKS_STRIPES,
        };
        LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset_sector: 8 + 8 * key_material_sectors(64) as u32,
            master_key_len: 64,
            master_key_digest: [7; LUKS_DIGEST_LEN],
            master_key_salt: [9; LUKS_SALT_LEN],
            master_key_iterations: 10,
            uuid: "a9905db8-6d14-4df9-af01-1d04a1cbf976".into(),
            key_slots: std::array::from_fn(|i| slot(i as u32, i == 0)),
        }
    }

    #[test]
    fn a_header_reads_back_as_written() {
        let header = sample();
        let bytes = header.to_raw();
        assert_eq!(LuksHeader::parse(bytes.as_bytes()), Ok(header));
    }

    #[test]
    fn qemu_lays_slots_out_in_4k_steps() {
        // QEMU's default AES-256-XTS header: slots 256000 bytes, rounded to
        // 252 KiB; the first at 4096, the payload after eight.
        assert_eq!(key_material_sectors(64) * LUKS_SECTOR_SIZE, 258048);
    }

    #[test]
    fn damage_is_named_as_qemu_names_it() {
        let damaged = |f: &dyn Fn(&mut RawLuksHeader)| {
            let mut raw = sample().to_raw();
            f(&mut raw);
            LuksHeader::parse(raw.as_bytes()).unwrap_err().to_string()
        };
        assert!(damaged(&|r| r.magic[0] = b'X').contains("Volume is not in LUKS format"));
        assert!(damaged(&|r| r.version = U16::new(2)).contains("LUKS version 2 is not supported"));
        assert!(
            damaged(&|r| r.cipher_mode = [b'x'; 32])
                .contains("LUKS header cipher mode is not NUL terminated")
        );
        assert!(
            damaged(&|r| r.key_slots[3].stripes = U32::new(1))
                .contains("Keyslot 3 is corrupted (stripes 1 != 4000)")
        );
        assert!(
            damaged(&|r| r.key_slots[2].key_offset_sector = r.key_slots[1].key_offset_sector)
                .contains("Keyslots 1 and 2 are overlapping in the header")
        );
        assert!(
            damaged(&|r| r.master_key_len = U32::new(1 << 30))
                .contains("master key length 1073741824")
        );
        assert!(
            damaged(&|r| r.payload_offset_sector = U32::new(100))
                .contains("Keyslot 0 is overlapping with the encrypted payload")
        );
        assert!(
            damaged(&|r| r.key_slots[0].iterations = U32::new(u32::MAX))
                .contains("Keyslot 0 asks for 4294967295 PBKDF2 iterations")
        );
        let short = LuksHeader::parse(&[0; 100]).unwrap_err();
        assert!(matches!(short, FormatError::Truncated { .. }));
    }
}
