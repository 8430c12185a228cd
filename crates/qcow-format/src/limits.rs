//! Bounds applied to values read from an image.
//!
//! An image is untrusted input: a header can claim tables of any size. Each
//! bound below is generous enough for every image QEMU writes and small enough
//! that honouring it cannot exhaust memory. Most follow QEMU's own limits in
//! `block/qcow2.h`, so an image QEMU opens, we open too.

/// Smallest cluster size exponent the specification allows (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;

/// Largest cluster size exponent QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Largest L1 table, in bytes (QEMU's `QCOW_MAX_L1_SIZE`): 4 Mi entries map
/// 2 PiB with 64 KiB clusters, and the bound caps the memory an open image
/// pins for its L1 table.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;

/// Largest refcount table, in bytes (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;

/// Most internal snapshots an image may list (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65_536;

/// Largest snapshot table, in bytes (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest extra data of one snapshot entry (QEMU's
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;

/// Longest backing file name QEMU writes or reads (its buffer is 1024 bytes
/// including the terminating NUL).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Largest virtual disk size (QEMU's `QCOW_MAX_VIRTUAL_SIZE` is 2^62 - 1 for
/// qcow2, well above any disk; we take 2^61 so that byte arithmetic on guest
/// offsets never overflows).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// Most bitmaps an image may carry (QEMU's `QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65_535;

/// Largest bitmap directory, in bytes (QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;

/// Largest valid host offset: the specification keeps offsets in bits 9..=55.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// Most PBKDF2 iterations a LUKS key slot or master key digest may ask
/// for: unlocking runs them all, and a crafted header could otherwise ask
/// for hours of work (2^32 per slot). QEMU's own headers take a few million
/// for its default two seconds; 2^28 is a minute or two per slot.
pub const MAX_LUKS_ITERATIONS: u32 = 1 << 28;
