//! Adding and erasing LUKS key slots, as `qemu-img amend -o
//! encrypt.state=active|inactive,...` does: a new password goes into a
//! free slot (or the one named) for the master key an existing password
//! unlocks; a slot is erased by its index or by the password it holds,
//! never the last active one unless forced. The changes are returned as
//! writes relative to the header's start, in the order QEMU makes them
//! (key material before the header that activates it; the header that
//! deactivates a slot before the garbage over its material).

use qcow_format::luks::{LUKS_KEY_SLOTS, LUKS_SALT_LEN, LUKS_SECTOR_SIZE, LuksHeader};

use super::luks::{ReadKeyMaterial, fill_slot, try_slot};
use super::{CryptoError, Secret, random};

/// Times an erased slot's key material is overwritten with random bytes.
const ERASE_PASSES: usize = 4;

/// What a key slot change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Put a new password into a slot (`state=active`).
    Active,
    /// Erase slots (`state=inactive`).
    Inactive,
}

/// A key slot change (qemu-img's `encrypt.state`, `new-secret`,
/// `old-secret`, `keyslot`, `iter-time` and `secret` options).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySlotChange {
    /// Add or erase.
    pub state: SlotState,
    /// The password to add.
    pub new_secret: Option<Secret>,
    /// The password whose slots are erased (or that the named slot must
    /// hold).
    pub old_secret: Option<Secret>,
    /// The slot, as given (checked to be 0 to 7).
    pub keyslot: Option<i64>,
    /// PBKDF2 time for the new slot (QEMU's default: 2000 ms).
    pub iter_time_ms: Option<u64>,
    /// The password that finds the master key, instead of the one the
    /// image was opened with.
    pub secret: Option<Secret>,
}

impl KeySlotChange {
    /// A change of `state` with nothing else given.
    pub fn new(state: SlotState) -> KeySlotChange {
        KeySlotChange {
            state,
            new_secret: None,
            old_secret: None,
            keyslot: None,
            iter_time_ms: None,
            secret: None,
        }
    }
}

/// Why a key slot change is refused (QEMU's words).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySlotProblem {
    /// Adding needs a new password.
    #[error("'new-secret' is required to activate a keyslot")]
    NewSecretRequired,
    /// An old password when adding.
    #[error("'old-secret' must not be given when activating keyslots")]
    OldSecretWhenActivating,
    /// A slot index outside 0..=7.
    #[error("Invalid keyslot {0} specified, must be between 0 and 7")]
    InvalidSlot(i64),
    /// No free slot.
    #[error("Can't add a keyslot - all keyslots are in use")]
    AllSlotsInUse,
    /// The slot named is active (and not forced).
    #[error("Refusing to overwrite active keyslot {0} - please erase it first")]
    SlotActive(usize),
    /// A new password when erasing.
    #[error("'new-secret' must not be given when erasing keyslots")]
    NewSecretWhenErasing,
    /// An iteration time when erasing.
    #[error("'iter-time' must not be given when erasing keyslots")]
    IterTimeWhenErasing,
    /// An unlocking password when erasing.
    #[error("'secret' must not be given when erasing keyslots")]
    SecretWhenErasing,
    /// The slot named does not hold the old password.
    #[error("Given keyslot {0} doesn't contain the given old password for erase operation")]
    SlotLacksOldPassword(usize),
    /// The slot named is already inactive (and not forced).
    #[error("Given keyslot {0} is already erased (inactive) ")]
    SlotInactive(usize),
    /// The slot named is the only active one (and not forced).
    #[error(
        "Attempt to erase the only active keyslot {0} which will erase all the data in the image irreversibly - refusing operation"
    )]
    OnlyActiveSlot(usize),
    /// No slot holds the old password.
    #[error("No keyslots match given (old) password for erase operation")]
    NoSlotMatches,
    /// Every active slot holds the old password (and not forced).
    #[error(
        "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"
    )]
    AllSlotsMatch,
    /// Neither a slot nor a password says what to erase.
    #[error(
        "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given"
    )]
    NothingToErase,
}

/// One write of a change: bytes at an offset from the header's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWrite {
    /// Offset from the LUKS header's start.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Applies `change` to `header` (`force`: qemu-img's `--force`), with
/// `open_secret` the password the image was opened with and `read`
/// reading key material. Returns the writes to make, in order; `header`
/// is changed to match them.
pub fn change_key_slots(
    header: &mut LuksHeader,
    change: &KeySlotChange,
    force: bool,
    open_secret: Option<&Secret>,
    read: &mut ReadKeyMaterial<'_>,
) -> Result<Vec<SlotWrite>, CryptoError> {
    let bad = |p: KeySlotProblem| Err(CryptoError::KeySlots(p));
    let slot_index = |given: i64| match usize::try_from(given) {
        Ok(i) if i < LUKS_KEY_SLOTS => Ok(i),
        _ => Err(CryptoError::KeySlots(KeySlotProblem::InvalidSlot(given))),
    };
    match change.state {
        SlotState::Active => {
            let Some(new_secret) = &change.new_secret else {
                return bad(KeySlotProblem::NewSecretRequired);
            };
            if change.old_secret.is_some() {
                return bad(KeySlotProblem::OldSecretWhenActivating);
            }
            let slot = match change.keyslot {
                Some(given) => slot_index(given)?,
                None => match header.key_slots.iter().position(|s| !s.active) {
                    Some(free) => free,
                    None => return bad(KeySlotProblem::AllSlotsInUse),
                },
            };
            if !force && header.key_slots[slot].active {
                return bad(KeySlotProblem::SlotActive(slot));
            }
            let secret = change
                .secret
                .as_ref()
                .or(open_secret)
                .ok_or(CryptoError::KeyRequired)?;
            let master_key = super::luks::unlock(header, secret.as_bytes(), &mut *read)?;
            let material = fill_slot(
                header,
                slot,
                new_secret.as_bytes(),
                &master_key,
                change.iter_time_ms.unwrap_or(2000),
            )?;
            Ok(vec![
                SlotWrite {
                    offset: slot_offset(header, slot),
                    bytes: material,
                },
                header_write(header),
            ])
        }
        SlotState::Inactive => {
            if change.new_secret.is_some() {
                return bad(KeySlotProblem::NewSecretWhenErasing);
            }
            if change.iter_time_ms.is_some() {
                return bad(KeySlotProblem::IterTimeWhenErasing);
            }
            if change.secret.is_some() {
                return bad(KeySlotProblem::SecretWhenErasing);
            }
            let active = header.key_slots.iter().filter(|s| s.active).count();
            let to_erase: Vec<usize> = match (change.keyslot, &change.old_secret) {
                (Some(given), old) => {
                    let slot = slot_index(given)?;
                    if let Some(old) = old {
                        if try_slot(header, slot, old.as_bytes(), read)?.is_none() {
                            return bad(KeySlotProblem::SlotLacksOldPassword(slot));
                        }
                    }
                    if !force && !header.key_slots[slot].active {
                        return bad(KeySlotProblem::SlotInactive(slot));
                    }
                    if !force && active == 1 {
                        return bad(KeySlotProblem::OnlyActiveSlot(slot));
                    }
                    vec![slot]
                }
                (None, Some(old)) => {
                    let mut matching = Vec::new();
                    for slot in 0..LUKS_KEY_SLOTS {
                        if try_slot(header, slot, old.as_bytes(), read)?.is_some() {
                            matching.push(slot);
                        }
                    }
                    if matching.is_empty() {
                        return bad(KeySlotProblem::NoSlotMatches);
                    }
                    if !force && matching.len() == active {
                        return bad(KeySlotProblem::AllSlotsMatch);
                    }
                    matching
                }
                (None, None) => return bad(KeySlotProblem::NothingToErase),
            };
            let mut writes = Vec::new();
            let material_len =
                header.master_key_len as usize * qcow_format::luks::LUKS_STRIPES as usize;
            for slot in to_erase {
                let entry = &mut header.key_slots[slot];
                entry.active = false;
                entry.iterations = 0;
                entry.salt = [0; LUKS_SALT_LEN];
                writes.push(header_write(header));
                for _ in 0..ERASE_PASSES {
                    let mut garbage = vec![0u8; material_len];
                    random(&mut garbage)?;
                    writes.push(SlotWrite {
                        offset: slot_offset(header, slot),
                        bytes: garbage,
                    });
                }
            }
            Ok(writes)
        }
    }
}

fn slot_offset(header: &LuksHeader, slot: usize) -> u64 {
    u64::from(header.key_slots[slot].key_offset_sector) * LUKS_SECTOR_SIZE
}

fn header_write(header: &LuksHeader) -> SlotWrite {
    SlotWrite {
        offset: 0,
        bytes: zerocopy::IntoBytes::as_bytes(&header.to_raw()).to_vec(),
    }
}
