//! QCOW2 images (versions 2 and 3): opening, and the state an open image
//! keeps. Reading lives in [`read`](self::read), writing in
//! [`write`](self::write) (compressed clusters in
//! [`compressed_write`](self::compressed_write), zeroing in
//! [`zeroes`](self::zeroes), preallocation in
//! [`preallocate`](self::preallocate), flushing in [`flush`](self::flush))
//! over the [`allocator`](self::allocator) and the
//! [`l2_tables`](self::l2_tables), with the metadata
//! [`overlap`](self::overlap) guard; creation in [`create`](self::create),
//! growing in [`resize`](self::resize). One walk of every reference
//! ([`references`](self::references)) serves [`check`](self::check) and
//! the refcount [`rebuild`](self::rebuild); the snapshot table's part of
//! the check is [`check_snapshots`](self::check_snapshots). The snapshot
//! table is read in [`snapshots`](self::snapshots) and written in
//! [`snapshot_table`](self::snapshot_table); snapshots are made, applied
//! and deleted in [`internal_snapshots`](self::internal_snapshots). The
//! bitmap directory is read in [`bitmaps`](self::bitmaps), bitmaps are kept
//! while writing in [`dirty_bitmaps`](self::dirty_bitmaps) and managed in
//! [`bitmap_ops`](self::bitmap_ops).

mod allocator;
mod amend;
mod amend_progress;
mod backing_file;
mod bitmap_ops;
mod bitmaps;
mod check;
mod check_snapshots;
mod compressed_write;
mod create;
mod dirty_bitmaps;
mod emptying;
mod encryption;
mod entry_seq;
mod flush;
mod internal_snapshots;
mod l2_tables;
mod metadata_map;
mod overlap;
mod preallocate;
mod read;
mod rebuild;
mod refcount_placement;
mod refcount_width;
mod references;
mod reserve;
mod resize;
mod shrink;
mod snapshot_table;
mod snapshots;
mod write;
mod zeroes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use amend::AmendOptions;
pub use check::{CheckOptions, CheckReport, DEFAULT_CHECK_MEMORY, Repair};
pub use create::{CreateOptions, Preallocation};
pub use internal_snapshots::NewSnapshot;

use qcow_format::bitmap::BitmapEntry;
use qcow_format::header::{Header, header_cluster_size};
use qcow_format::snapshot::Snapshot;
use qcow_format::table::Geometry;
use qcow_io::Storage;

use crate::device::BlockDevice;
use crate::options::DEFAULT_MAX_CACHE_BYTES;
use crate::{Error, Result};

/// An L2 table decoded to native integers (two words per entry with
/// extended L2). Entries are atomics so that a writer (holding the
/// allocation lock) updates them in place while readers look them up.
pub(crate) type L2Table = Box<[AtomicU64]>;

/// An open QCOW2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    /// Unique among the images of this process (keys per-thread memos).
    id: u64,
    name: String,
    file: Arc<dyn Storage>,
    /// Where guest data lives: the image file, the external data file, or
    /// `None` when the external data file was not opened.
    data: Option<Arc<dyn Storage>>,
    /// The external data file's name, once attached.
    data_name: Option<String>,
    header: Header,
    geometry: Geometry,
    virtual_size: u64,
    l1: Vec<AtomicU64>,
    l2: l2_tables::L2Tables,
    /// Allocation state; `None` for a read-only image.
    writer: Option<write::WriteState>,
    backing: Option<Box<dyn BlockDevice>>,
    snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table from its start to the end of the last
    /// entry's name, as read (QEMU's `snapshots_size`).
    snapshot_table_bytes: u64,
    /// What the repair of a dirty image reported when it was opened for
    /// writing (QEMU's check lines).
    open_repairs: Vec<String>,
    bitmaps: Vec<BitmapEntry>,
    /// The image file's length; grows as clusters are allocated.
    file_len: AtomicU64,
    /// Whether clusters look preallocated (the file is much sparser than
    /// its refcounts say), decided on the first block status query.
    sparse_file: std::sync::OnceLock<bool>,
    snapshot: Option<String>,
    /// The image's encryption (`None`: not encrypted).
    encryption: Option<crate::crypto::EncryptionInfo>,
    /// The data cipher, once [`Qcow2Image::unlock`] found the key.
    cipher: Option<crate::crypto::DataCipher>,
    /// The password that unlocked it (key slot changes find the master
    /// key with it).
    secret: Option<crate::crypto::Secret>,
}

/// A number no other image of this process has had: the key of per-thread
/// memos of an image's tables, renewed whenever its table cache is replaced
/// (a new cache counts its generations from the start again).
pub(super) fn fresh_image_id() -> u64 {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl Qcow2Image {
    /// Opens the QCOW2 image in `file`; `name` is used in messages.
    ///
    /// Backing and external data files are not opened here: see
    /// [`Qcow2Image::attach_backing`] and [`Qcow2Image::attach_data_file`]
    /// (or [`crate::open`], which does both under an [`crate::OpenOptions`]).
    /// `cache_bytes` bounds the L2 cache (`None`: the default).
    pub fn open(name: &str, file: Arc<dyn Storage>, cache_bytes: Option<u64>) -> Result<Self> {
        let mut image = Self::open_without_snapshots(name, file, cache_bytes, false)?;
        let table = image.read_snapshot_table(
            image.header.snapshots_offset,
            image.header.nb_snapshots,
            None,
        )?;
        image.snapshots = table.snapshots;
        image.snapshot_table_bytes = table.bytes;
        Ok(image)
    }

    /// Opens the QCOW2 image in `file` for [`Qcow2Image::check`], as
    /// [`Qcow2Image::open`] does but without reading the snapshot table:
    /// the check reads it itself, reporting (and repairing) damage that
    /// would make the image refused otherwise.
    pub fn open_for_check(
        name: &str,
        file: Arc<dyn Storage>,
        cache_bytes: Option<u64>,
    ) -> Result<Self> {
        Self::open_without_snapshots(name, file, cache_bytes, true)
    }

    fn open_without_snapshots(
        name: &str,
        file: Arc<dyn Storage>,
        cache_bytes: Option<u64>,
        for_check: bool,
    ) -> Result<Self> {
        let file_len = file
            .len()
            .map_err(|e| Error::io(name, "reading the file size", 0, e))?;
        let mut prefix = [0u8; 112];
        file.read_at(&mut prefix, 0)
            .map_err(|e| Error::io(name, "reading the header", 0, e))?;
        let cluster_size = header_cluster_size(&prefix).map_err(|e| Error::format(name, e))?;
        // The header cluster is at most 2 MiB (cluster_bits <= 21).
        let mut cluster = vec![0u8; cluster_size.min(file_len.max(112)) as usize];
        file.read_at(&mut cluster, 0)
            .map_err(|e| Error::io(name, "reading the header cluster", 0, e))?;
        let header = if for_check {
            Header::parse_for_check(&cluster, file_len)
        } else {
            Header::parse(&cluster, file_len)
        };
        let header = header.map_err(|e| Error::format(name, e))?;
        let encryption = encryption::load(name, &*file, &header)?;
        let geometry = Geometry::of(&header);
        let l1 = read_l1(name, &*file, header.l1_table_offset, header.l1_size)?;
        let allocated_tables = l1.iter().filter(|&&e| e != 0).count() as u64;
        let l1 = l1.into_iter().map(AtomicU64::new).collect();
        let budget = cache_bytes.unwrap_or_else(|| {
            (allocated_tables.max(1) << header.cluster_bits).min(DEFAULT_MAX_CACHE_BYTES)
        });
        let data = (!header.has_data_file()).then(|| file.clone());
        let mut image = Qcow2Image {
            id: fresh_image_id(),
            name: name.to_owned(),
            virtual_size: header.virtual_size,
            l2: l2_tables::L2Tables::new(
                name,
                file.clone(),
                budget,
                header.cluster_size(),
                geometry.extended_l2,
            ),
            file,
            data,
            data_name: None,
            geometry,
            l1,
            writer: None,
            backing: None,
            snapshots: Vec::new(),
            snapshot_table_bytes: 0,
            open_repairs: Vec::new(),
            bitmaps: Vec::new(),
            file_len: AtomicU64::new(file_len),
            sparse_file: std::sync::OnceLock::new(),
            snapshot: None,
            encryption,
            cipher: None,
            secret: None,
            header,
        };
        image.bitmaps = image.load_bitmaps()?;
        Ok(image)
    }

    /// Uses `backing` for clusters this image does not allocate.
    pub fn attach_backing(&mut self, backing: Box<dyn BlockDevice>) {
        self.backing = Some(backing);
    }

    /// Uses `data` as the external data file the image names; `name` is
    /// how messages and maps refer to it.
    pub fn attach_data_file(&mut self, data: Arc<dyn Storage>, name: String) {
        self.data = Some(data);
        self.data_name = Some(name);
    }

    /// Switches to the internal snapshot named `name` (or with that ID):
    /// reads then see the disk as it was when the snapshot was taken.
    pub fn select_snapshot(&mut self, name: &str) -> Result<()> {
        let snapshot = self
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .or_else(|| self.snapshots.iter().find(|s| s.id == name))
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                image: self.name.clone(),
                name: name.to_owned(),
            })?;
        self.check_snapshot_l1(&snapshot)?;
        let virtual_size = snapshot.disk_size.unwrap_or(self.header.virtual_size);
        let needed = virtual_size.div_ceil(self.header.bytes_per_l2_table());
        if u64::from(snapshot.l1_size) < needed {
            return Err(Error::Corrupt {
                image: self.name.clone(),
                table: "snapshot L1 table",
                offset: snapshot.l1_table_offset,
                reason: format!(
                    "{} entries cannot map the snapshot's disk size {virtual_size}",
                    snapshot.l1_size
                ),
            });
        }
        if self.writer.is_some() {
            return Err(Error::Unsupported {
                image: self.name.clone(),
                what: "writing to an internal snapshot".into(),
            });
        }
        self.l1 = read_l1(
            &self.name,
            &*self.file,
            snapshot.l1_table_offset,
            snapshot.l1_size,
        )?
        .into_iter()
        .map(AtomicU64::new)
        .collect();
        self.virtual_size = virtual_size;
        self.l2.clear_clean();
        self.snapshot = Some(snapshot.name);
        Ok(())
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The persistent bitmaps.
    pub fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps
    }

    /// The image file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// The active L1 entry at `index` (0 past the end of the table).
    pub(crate) fn l1_entry(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Runs a lock-free lookup of L2 entries so that it sees each
    /// two-word (extended) entry whole, never half changed by a writer.
    pub(crate) fn consistent<R>(&self, lookup: impl FnMut() -> R) -> R {
        self.l2.consistent(lookup)
    }

    /// L2 cache counters.
    pub fn cache_stats(&self) -> qcow_cache::CacheStats {
        self.l2.stats()
    }
}

impl Qcow2Image {
    /// The refcount table as stored (entries as they are, reserved bits
    /// included).
    /// Refuses a snapshot whose L1 table is too large, misaligned or past
    /// the end of the file, in QEMU's words where it has them (checked
    /// when the table is used, as QEMU checks it, not when the image
    /// opens).
    pub(super) fn check_snapshot_l1(&self, snapshot: &Snapshot) -> Result<()> {
        use crate::SnapshotL1Problem;
        let bytes = u64::from(snapshot.l1_size) * 8;
        let problem = if bytes > qcow_format::limits::MAX_L1_BYTES {
            SnapshotL1Problem::TooLarge
        } else if snapshot.l1_table_offset % self.header.cluster_size() != 0 {
            SnapshotL1Problem::OffsetInvalid
        } else if snapshot.l1_table_offset.saturating_add(bytes) > self.file_len() {
            SnapshotL1Problem::PastEnd
        } else {
            return Ok(());
        };
        Err(Error::SnapshotL1 {
            image: self.name.clone(),
            id: snapshot.id.clone(),
            offset: snapshot.l1_table_offset,
            problem,
        })
    }

    pub(super) fn stored_reftable(&self) -> Result<Vec<u64>> {
        let offset = self.header.refcount_table_offset;
        let len = u64::from(self.header.refcount_table_clusters) * self.header.cluster_size();
        // Bounded by the header checks (MAX_REFCOUNT_TABLE_BYTES).
        let mut bytes = vec![0u8; len as usize];
        self.file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.name, "reading the refcount table", offset, e))?;
        Ok(decode_be_words(&bytes))
    }
}

/// Reads an L1 table of `entries` entries at `offset`.
pub(super) fn read_l1(
    name: &str,
    file: &dyn Storage,
    offset: u64,
    entries: u32,
) -> Result<Vec<u64>> {
    if u64::from(entries) * 8 > qcow_format::limits::MAX_L1_BYTES {
        return Err(Error::Corrupt {
            image: name.to_owned(),
            table: "L1 table",
            offset,
            reason: format!("{entries} entries: the L1 table is too large"),
        });
    }
    let mut bytes = vec![0u8; entries as usize * 8];
    file.read_at(&mut bytes, offset)
        .map_err(|e| Error::io(name, "reading the L1 table", offset, e))?;
    Ok(decode_be_words(&bytes))
}

/// Decodes big-endian 64-bit words.
pub(crate) fn decode_be_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_be_bytes(w)
        })
        .collect()
}
