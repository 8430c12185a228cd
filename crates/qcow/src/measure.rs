//! How large a new image would be (qemu-img measure): the bytes its file
//! needs for a given disk or source image, and fully allocated, as QEMU's
//! `qcow2_measure` and raw's measure compute them.

use qcow_format::bitmap::BitmapEntry;
use qcow_format::limits::MAX_L1_BYTES;

use crate::device::{Allocation, BlockDevice};
use crate::qcow2::{CreateOptions, Preallocation};
use crate::{Error, Result};

/// What a new image would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the file needs for the source's data (or an empty disk).
    pub required: u64,
    /// Bytes the file takes with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent bitmaps would take, when both the
    /// source and the new image can hold them.
    pub bitmaps: Option<u64>,
}

/// Measures a new qcow2 image made with `options` (its size is
/// `options.size` without a source), holding what `source` holds. The
/// source's persistent `bitmaps` are counted for a version 3 target: pass
/// them (even none) for a source that can hold bitmaps (a version 3 qcow2
/// image), `None` otherwise.
///
/// ```
/// use qcow::CreateOptions;
/// use qcow::measure::measure_qcow2;
/// let m = measure_qcow2(&CreateOptions::new(1 << 30), None, None)?;
/// // qemu-img measure --size 1G -O qcow2 says the same.
/// assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
/// # Ok::<(), qcow::Error>(())
/// ```
pub fn measure_qcow2(
    options: &CreateOptions,
    source: Option<&dyn BlockDevice>,
    bitmaps: Option<&[BitmapEntry]>,
) -> Result<Measurement> {
    check_options(options)?;
    let cluster = options.cluster_size;
    let l2_entry = if options.extended_l2 { 16 } else { 8 };
    let size = source.map_or(options.size, |s| s.virtual_size());
    let virtual_size = size.next_multiple_of(cluster);
    let l2_tables = (virtual_size / cluster).div_ceil(cluster / l2_entry);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(Error::InvalidOptions(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let mut required = 0;
    if let Some(source) = source {
        if options.backing_file.is_some() {
            // The new backing file may share nothing with the source.
            required = virtual_size;
        } else {
            required = data_bytes(source, size, cluster)?;
        }
    }
    if matches!(
        options.preallocation,
        Preallocation::Full | Preallocation::Falloc
    ) {
        required = virtual_size;
    }
    // A LUKS header takes its clusters too.
    let luks = match &options.encryption {
        Some(crate::crypto::EncryptionOptions::Luks(luks)) => {
            luks.validate()
                .map_err(|e| Error::InvalidOptions(e.to_string()))?;
            luks.header_len().next_multiple_of(cluster)
        }
        _ => 0,
    };
    let fully_allocated = luks + prealloc_size(virtual_size, cluster, options, l2_entry);
    let bitmaps = match (bitmaps, options.version >= 3, source) {
        (Some(list), true, Some(source)) => {
            Some(bitmaps_size(list, source.virtual_size(), cluster))
        }
        _ => None,
    };
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// The options measuring reads, refused as QEMU refuses them.
fn check_options(options: &CreateOptions) -> Result<()> {
    let bad = |m: &str| Err(Error::InvalidOptions(m.to_owned()));
    let cluster = options.cluster_size;
    if !cluster.is_power_of_two() || !(512..=2 << 20).contains(&cluster) {
        return bad("Cluster size must be a power of two between 512 and 2048k");
    }
    if options.extended_l2 && cluster < 16384 {
        return bad(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        );
    }
    let bits = options.refcount_bits;
    if !bits.is_power_of_two() || bits > 64 {
        return bad("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if options.version < 3 && bits != 16 {
        return bad(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        );
    }
    Ok(())
}

/// Measures a new raw image of `size` bytes (whole 512-byte sectors, as
/// QEMU makes it), or of `source`'s size: every byte is needed.
pub fn measure_raw(size: u64, source: Option<&dyn BlockDevice>) -> Measurement {
    let size = source
        .map_or(size, |s| s.virtual_size())
        .div_ceil(512)
        .saturating_mul(512);
    Measurement {
        required: size,
        fully_allocated: size,
        bitmaps: None,
    }
}

/// Bytes of whole clusters holding data in `source` (zeros and what the
/// chain does not allocate need none), counted as QEMU counts them.
fn data_bytes(source: &dyn BlockDevice, size: u64, cluster: u64) -> Result<u64> {
    let mut required = 0;
    let mut offset = 0;
    while offset < size {
        let extent = source.block_status(offset, size - offset)?;
        let mut n = extent.len.max(1).min(size - offset);
        if let Allocation::Data { zero: false, .. } | Allocation::Unknown { .. } = extent.allocation
        {
            // To the end of the cluster; counted from its start.
            n = (offset + n).next_multiple_of(cluster) - offset;
            required += offset % cluster + n;
        }
        offset += n;
    }
    Ok(required)
}

/// The file of a fully allocated image: header, L2 and L1 tables, refcount
/// structure and data (QEMU's `qcow2_calc_prealloc_size`).
fn prealloc_size(virtual_size: u64, cluster: u64, options: &CreateOptions, l2_entry: u64) -> u64 {
    let mut meta = cluster;
    let l2_entries = (virtual_size / cluster).next_multiple_of(cluster / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries = (l2_entries * l2_entry / cluster).next_multiple_of(cluster / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size(
        (meta + virtual_size) / cluster,
        cluster,
        options.refcount_bits.trailing_zeros(),
    );
    meta + virtual_size
}

/// Bytes of refcount blocks and table that count `clusters` clusters and
/// themselves: the fixed point QEMU's `qcow2_refcount_metadata_size` finds.
pub(crate) fn refcount_metadata_size(clusters: u64, cluster: u64, refcount_order: u32) -> u64 {
    let (blocks, table) = refcount_structure_clusters(clusters, cluster, refcount_order);
    (blocks + table) * cluster
}

/// The refcount blocks and table clusters that count `clusters` clusters
/// and themselves (QEMU's fixed point, exact size).
pub(crate) fn refcount_structure_clusters(
    clusters: u64,
    cluster: u64,
    refcount_order: u32,
) -> (u64, u64) {
    let per_table_cluster = cluster / 8;
    let per_block = (cluster * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks, table);
        }
    }
}

/// Bytes the bitmaps would take: each bitmap's data and table, whole
/// clusters each, and the directory.
fn bitmaps_size(bitmaps: &[BitmapEntry], disk_size: u64, cluster: u64) -> u64 {
    let mut size = 0;
    let mut directory = 0;
    for bitmap in bitmaps {
        let bits = disk_size.div_ceil(bitmap.granularity());
        let clusters = bits.div_ceil(8).div_ceil(cluster);
        size += clusters * cluster;
        size += (clusters * 8).next_multiple_of(cluster);
        directory += (24 + bitmap.name.len() as u64).next_multiple_of(8);
    }
    size + directory.next_multiple_of(cluster)
}
