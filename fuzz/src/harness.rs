//! The fuzzing harness: plain functions that drive the engine with arbitrary
//! bytes, shared by the cargo-fuzz targets (`fuzz_targets/`) and by the
//! `fuzz_seeds` integration test of the `qcow` crate, which includes this
//! file with `#[path]` and replays every seed in `fuzz/seeds/` on stable.
//!
//! Rules this file keeps so that it works in both places and finds only
//! real bugs:
//! - it uses nothing but `std`, `qcow`, `qcow_format` and `qcow_io`;
//! - it never allocates by a size read from the input: every buffer it
//!   makes has a size bounded by its own constants, and all reads are capped
//!   ([`MAX_READ_BYTES`] in all per image layer), whatever the virtual size
//!   says;
//! - it panics only through the library, or through an assertion of a
//!   documented guarantee of the library (a returned extent is never empty,
//!   a parsed header's tables lie inside the file, a range reported as
//!   zeros reads as zeros, what was written to an image that passes
//!   `check` reads back, ...). Every panic is therefore a bug to report.

use std::sync::Arc;

use qcow::{Allocation, BlockDevice, Qcow2Image, QcowImage, Repair};
use qcow_format::bitmap::parse_directory;
use qcow_format::extension::parse_extensions;
use qcow_format::header::{Header, header_cluster_size};
use qcow_format::limits::{
    MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use qcow_format::snapshot::Snapshot;
use qcow_format::table::{Geometry, L2Mapping, refcount_get, refcount_set};
use qcow_format::v1::{HeaderV1, V1Mapping};
use qcow_io::{MemStorage, Storage};

/// L2 cache budget of the images [`open_read`] opens: small, so that the
/// eviction paths run too (the cache always holds at least one table).
pub const CACHE_BYTES: u64 = 64 * 1024;

/// Longest single read [`open_read`] makes.
pub const READ_CHUNK: usize = 64 * 1024;

/// Most bytes [`open_read`] reads from one image layer (the active layer or
/// one snapshot), whatever its virtual size.
pub const MAX_READ_BYTES: usize = 1024 * 1024;

/// Most extents [`open_read`] asks `block_status` for in one walk.
const MAX_EXTENTS: usize = 32;

/// Most snapshots [`open_read`] switches to.
const MAX_SNAPSHOTS_VISITED: usize = 4;

/// Most 64-bit words [`header`] decodes as table entries.
const MAX_TABLE_WORDS: usize = 64;

/// Feeds `data` to every parser of `qcow-format` that takes bytes:
/// [`header_cluster_size`] and [`Header::parse`] (with the input's own length
/// as the file length and with a few others), [`HeaderV1::parse`], the header
/// extension parser, [`Snapshot::parse`], [`parse_directory`] and the L1, L2
/// and refcount entry decoders.
pub fn header(data: &[u8]) {
    let len = data.len() as u64;

    // As the engine does it: the claimed cluster size first, then the header
    // cluster (or the whole input when it is shorter).
    if let Ok(cluster_size) = header_cluster_size(data) {
        assert!(
            ((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cluster_size)
                && cluster_size.is_power_of_two(),
            "header_cluster_size returned {cluster_size}"
        );
        let end = usize::try_from(cluster_size).map_or(data.len(), |c| c.min(data.len()));
        qcow2_header(&data[..end], len);
    }
    for file_len in [len, 0, len / 2, len.saturating_mul(4), 1 << 40, u64::MAX] {
        qcow2_header(data, file_len);
    }

    for file_len in [len, 0, 1 << 40, u64::MAX] {
        v1_header(data, file_len);
    }

    for start in [0, 48, 72, 104, 112] {
        let _ = parse_extensions(data, start, len);
        let _ = parse_extensions(data, start, len.saturating_add(64));
    }

    snapshot_table(data);

    // LUKS headers: at the start (a LUKS volume) and wherever the magic is.
    let _ = qcow_format::luks::LuksHeader::parse(data);
    if let Some(at) = data
        .windows(6)
        .position(|w| w == qcow_format::luks::LUKS_MAGIC)
    {
        let _ = qcow_format::luks::LuksHeader::parse(&data[at..]);
    }

    let first = data.first().copied().map_or(0, u32::from);
    for count in [0, 1, 2, 17, first, 65_535, 65_536, u32::MAX] {
        if let Ok(entries) = parse_directory(data, count) {
            assert_eq!(entries.len() as u64, u64::from(count));
            for entry in &entries {
                assert!(entry.granularity_bits <= 63);
                let _ = entry.granularity();
            }
        }
    }

    table_entries(data);
}

/// [`Header::parse`] of `cluster` with a file of `file_len` bytes, and the
/// guarantees of a header that parsed.
fn qcow2_header(cluster: &[u8], file_len: u64) {
    let Ok(h) = Header::parse(cluster, file_len) else {
        return;
    };
    assert!(h.version == 2 || h.version == 3, "version {}", h.version);
    assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
    assert!(h.refcount_order <= 6);
    assert!(h.virtual_size <= MAX_VIRTUAL_SIZE);
    let cluster_size = h.cluster_size();
    let l1_bytes = u64::from(h.l1_size) * 8;
    assert!(l1_bytes <= MAX_L1_BYTES);
    assert!(u64::from(h.l1_size) >= h.virtual_size.div_ceil(h.bytes_per_l2_table()));
    if l1_bytes > 0 {
        assert_eq!(h.l1_table_offset % cluster_size, 0, "L1 table misaligned");
        assert!(
            h.l1_table_offset
                .checked_add(l1_bytes)
                .is_some_and(|end| end <= file_len),
            "L1 table outside the file"
        );
    }
    assert!(h.refcount_table_clusters > 0);
    assert_eq!(h.refcount_table_offset % cluster_size, 0);
    if let Some(name) = &h.backing_file {
        assert!(name.len() <= MAX_BACKING_NAME as usize);
    }
    let _ = (h.extended_l2(), h.dirty(), h.corrupt(), h.lazy_refcounts());
    let _ = (h.has_data_file(), h.data_file_raw(), h.refcount_bits());
    let _ = (h.l2_entry_size(), h.l2_entries(), h.backing_format());
    let _ = (h.data_file_name(), h.bitmaps(), h.feature_names().count());
    let _ = (h.encryption.name(), h.compression_type.name());
    let geometry = Geometry::of(&h);
    let _ = (geometry.l2_bits(), geometry.subcluster_bits());
}

/// [`HeaderV1::parse`] of `data` with a file of `file_len` bytes, and the
/// guarantees of a header that parsed.
fn v1_header(data: &[u8], file_len: u64) {
    let Ok(h) = HeaderV1::parse(data, file_len) else {
        return;
    };
    assert!((9..=16).contains(&h.cluster_bits));
    assert!((6..=13).contains(&h.l2_bits));
    assert!(h.virtual_size <= MAX_VIRTUAL_SIZE);
    assert!(h.l1_size.saturating_mul(8) <= MAX_L1_BYTES);
    if let Some(name) = &h.backing_file {
        assert!(name.len() <= MAX_BACKING_NAME as usize);
    }
    for entry in words(data).chain([u64::MAX, 1 << 63]) {
        if let V1Mapping::Compressed { len, .. } = h.l2_mapping(entry) {
            assert!(len < h.cluster_size());
        }
    }
}

/// Walks `data` as a snapshot table of at most 8 entries.
fn snapshot_table(data: &[u8]) {
    let mut rest = data;
    for index in 0..8 {
        let Ok(s) = Snapshot::parse(rest, index) else {
            return;
        };
        let entry_len = (40 + s.extra_data.len() + s.id.len() + s.name.len()).next_multiple_of(8);
        rest = rest.get(entry_len..).unwrap_or(&[]);
    }
}

/// Decodes the first words of `data` as L1, L2 and refcount entries under
/// a few geometries.
fn table_entries(data: &[u8]) {
    let entries: Vec<u64> = words(data).take(MAX_TABLE_WORDS).collect();
    for cluster_bits in [9, 12, 14, 16, 21] {
        for extended_l2 in [false, true] {
            for external_data in [false, true] {
                let geo = Geometry {
                    cluster_bits,
                    extended_l2,
                    external_data,
                };
                let unit = 1u64 << geo.subcluster_bits();
                for (i, pair) in entries.windows(2).enumerate() {
                    let (entry, bitmap) = (pair[0], pair[1]);
                    let _ = geo.l1_entry(i as u64, entry);
                    let sub = (entry as u32) % 32;
                    match geo.l2_mapping(i as u64, entry, bitmap, sub) {
                        Ok(L2Mapping::Data { host }) => {
                            assert_eq!(host % unit, 0, "data offset not (sub)cluster aligned");
                        }
                        Ok(L2Mapping::Compressed { len, .. }) => {
                            assert!(len > 0 && len <= 2 * geo.cluster_size());
                        }
                        _ => {}
                    }
                    let _ = geo.compressed_extent(entry);
                    let _ = (geo.l1_index(entry), geo.l2_index(entry));
                    let _ = geo.subcluster_index(entry);
                }
            }
        }
    }

    let first_word = entries.first().copied().unwrap_or(0);
    let mut block = [0u8; 4096];
    let n = data.len().min(block.len());
    block[..n].copy_from_slice(&data[..n]);
    for order in 0..=6 {
        for index in [0, 1, 7, 63, 4095, 32_767, first_word, u64::MAX] {
            let value = refcount_get(&block, index, order);
            if let Some(v) = value {
                assert!(order == 6 || v >> (1u32 << order) == 0);
            }
            if refcount_set(&mut block, index, order, first_word).is_some() {
                assert_eq!(refcount_get(&block, index, order), Some(first_word));
            }
        }
    }
}

/// The big-endian 64-bit words of `data`.
fn words(data: &[u8]) -> impl Iterator<Item = u64> + '_ {
    data.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_be_bytes(w)
    })
}

/// Opens `data` in memory as a qcow2 and as a qcow version 1 image with a
/// small cache, and if it opens, reads capped windows of it, maps it with
/// `block_status`, and checks that what it maps reads back accordingly.
/// Internal snapshots of a qcow2 image are selected and read the same way.
pub fn open_read(data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(data.to_vec()));

    if let Ok(mut image) = Qcow2Image::open("fuzz.qcow2", storage.clone(), Some(CACHE_BYTES)) {
        assert_eq!(image.file_len(), data.len() as u64);
        // The seeds' encrypted images use the password "abc"; a header
        // asking for much work is not unlocked (each try runs it all).
        let cheap = match image.encryption() {
            Some(qcow::crypto::EncryptionInfo::Luks { header, .. }) => cheap_to_unlock(header),
            _ => true,
        };
        if cheap {
            let _ = image.unlock(&qcow::crypto::Secret::new("abc"));
        }
        assert_eq!(image.virtual_size(), image.header().virtual_size);
        for bitmap in image.bitmaps() {
            let _ = bitmap.granularity();
        }
        let _ = image.cache_stats();
        exercise(&image, data);
        let names: Vec<String> = image
            .snapshots()
            .iter()
            .take(MAX_SNAPSHOTS_VISITED)
            .map(|s| s.name.clone())
            .collect();
        for name in names {
            if image.select_snapshot(&name).is_ok() {
                exercise(&image, data);
            }
        }
    }

    if let Ok(image) = QcowImage::open("fuzz.qcow", storage.clone(), Some(CACHE_BYTES)) {
        assert_eq!(image.file_len(), data.len() as u64);
        exercise(&image, data);
    }

    // A LUKS volume: locked (reads fail cleanly), then unlocked.
    if let Ok(image) = qcow::LuksImage::open("fuzz.luks", storage.clone(), None) {
        exercise(&image, data);
        if cheap_to_unlock(image.header()) {
            let secret = qcow::crypto::Secret::new("abc");
            if let Ok(image) = qcow::LuksImage::open("fuzz.luks", storage, Some(&secret)) {
                exercise(&image, data);
            }
        }
    }
}

/// Whether trying a password on `header` is quick: few PBKDF2 iterations.
fn cheap_to_unlock(header: &qcow_format::luks::LuksHeader) -> bool {
    header.master_key_iterations <= 20_000
        && header
            .key_slots
            .iter()
            .all(|s| !s.active || s.iterations <= 20_000)
}

/// Reads and maps an open image whose file holds `file`, never more than
/// [`MAX_READ_BYTES`] in all.
fn exercise(dev: &dyn BlockDevice, file: &[u8]) {
    let size = dev.virtual_size();
    let _ = (dev.format(), dev.name());
    assert!(dev.backing().is_none(), "no backing file was attached");
    let mut buf = vec![0u8; READ_CHUNK];
    let mut budget = MAX_READ_BYTES;

    // Nothing may be read or mapped past the end of the disk.
    assert!(
        dev.read_at(&mut buf[..1], size).is_err(),
        "read past the end"
    );
    assert!(dev.block_status(size, 1).is_err(), "status past the end");
    assert!(
        dev.read_at(&mut buf[..0], size).is_ok(),
        "empty read at the end"
    );

    // Fixed windows: the start, sector and cluster straddles, the middle,
    // the end.
    let half = size / 2;
    let windows: [(u64, usize); 8] = [
        (0, 4096),
        (0, READ_CHUNK),
        (511, 1026),
        (65_536 - 100, 300),
        (half & !0xffff, READ_CHUNK),
        (half.saturating_sub(7), 4099),
        (size.saturating_sub(READ_CHUNK as u64), READ_CHUNK),
        (size.saturating_sub(1), 1),
    ];
    for (offset, len) in windows {
        if offset >= size {
            continue;
        }
        let len = len.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
        if len > budget {
            break;
        }
        budget -= len;
        let _ = dev.read_at(&mut buf[..len], offset);
    }

    // Reading the same bytes twice (the second time through the cache)
    // gives the same result.
    let len = READ_CHUNK.min(usize::try_from(size).unwrap_or(usize::MAX));
    if 2 * len <= budget {
        budget -= 2 * len;
        let mut again = vec![0u8; READ_CHUNK];
        let first = dev.read_at(&mut buf[..len], 0);
        let second = dev.read_at(&mut again[..len], 0);
        assert_eq!(
            first.is_ok(),
            second.is_ok(),
            "repeated read changed outcome"
        );
        if first.is_ok() {
            assert!(buf[..len] == again[..len], "repeated read changed the data");
        }
    }

    // Map the disk from the start and from the middle, and check what each
    // extent says against what it reads.
    for start in [0, half] {
        let mut offset = start;
        for _ in 0..MAX_EXTENTS {
            if offset >= size {
                break;
            }
            let want = size - offset;
            let Ok(extent) = dev.block_status(offset, want) else {
                break;
            };
            assert!(
                extent.len >= 1 && extent.len <= want,
                "extent of {} bytes for a query of {want} at {offset}",
                extent.len
            );
            let len = usize::try_from(extent.len).unwrap_or(usize::MAX).min(4096);
            if len <= budget {
                budget -= len;
                check_extent(dev, file, offset, extent.allocation, &mut buf[..len]);
            }
            offset += extent.len;
        }
    }
}

/// Reads `out.len()` bytes at `offset`, which `block_status` said are stored
/// as `allocation`, and checks that they match.
fn check_extent(
    dev: &dyn BlockDevice,
    file: &[u8],
    offset: u64,
    allocation: Allocation,
    out: &mut [u8],
) {
    if dev.read_at(out, offset).is_err() {
        // Reading may fail where mapping did not (a compressed cluster that
        // does not inflate, a backing or data file that is not open).
        return;
    }
    match allocation {
        Allocation::Zero { depth, .. } | Allocation::Unallocated { depth, .. } => {
            assert_eq!(depth, 0, "no backing file was attached");
            assert!(
                out.iter().all(|&b| b == 0),
                "{allocation:?} at {offset} does not read as zeros"
            );
        }
        Allocation::Data {
            depth,
            offset: Some(host),
            compressed: false,
            ..
        } => {
            assert_eq!(depth, 0, "no backing file was attached");
            // The read succeeded, so the data is in the image file itself
            // (an external data file is never attached here); bytes past
            // its end read as zeros.
            let mut expected = [0u8; 4096];
            let expected = &mut expected[..out.len()];
            if let Some(avail) = usize::try_from(host).ok().and_then(|h| file.get(h..)) {
                let n = avail.len().min(expected.len());
                expected[..n].copy_from_slice(&avail[..n]);
            }
            assert!(
                *out == *expected,
                "data at guest {offset} does not match host offset {host}"
            );
        }
        Allocation::Data { .. } | Allocation::Unknown { .. } => {}
    }
}

/// Most operations [`ops`] runs on one image.
const MAX_OPS: usize = 16;

/// Longest write [`ops`] makes.
const MAX_WRITE: u64 = 64 * 1024;

/// Bytes at the end of an [`ops`] input that choose the operations.
const SCRIPT_BYTES: usize = MAX_OPS * 10;

/// Bytes around each range [`ops`] changes that its model watches too:
/// nothing outside the range may change.
const MODEL_MARGIN: u64 = 4096;

/// Bytes [`ops`] reads at a time when it fills and checks its model.
const MODEL_CHUNK: u64 = 4096;

/// Where a chunk does not read, [`ops`] reads it again sector by sector
/// (a sector lies in one cluster), so that one unreadable cluster hides
/// no more than itself. Windows start and end on sector boundaries.
const SECTOR: u64 = 512;

/// One operation of an [`ops`] script.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        fill: u8,
    },
    Zeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    /// One whole cluster at `offset` (aligned), `len` bytes of it inside
    /// the disk.
    Compressed {
        offset: u64,
        len: u64,
        fill: u8,
    },
}

impl Op {
    /// The operations `script` chooses on a disk of `size` bytes (not 0)
    /// with clusters of `cluster` bytes.
    fn parse(script: &[u8], size: u64, cluster: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        for op in script.chunks(10).take(MAX_OPS) {
            let mut word = [0u8; 8];
            word[..op.len().min(8)].copy_from_slice(&op[..op.len().min(8)]);
            let offset = u64::from_le_bytes(word) % size;
            let len = (u64::from(op.get(8).copied().unwrap_or(1)) * 257 + 1)
                .min(MAX_WRITE)
                .min(size - offset);
            let fill = op.get(9).copied().unwrap_or(0);
            ops.push(match op.first().copied().unwrap_or(0) % 5 {
                0 | 1 => Op::Write { offset, len, fill },
                2 => Op::Zeroes {
                    offset,
                    len,
                    unmap: fill % 2 == 0,
                },
                3 => Op::Discard { offset, len },
                _ => {
                    if cluster > MAX_WRITE {
                        continue;
                    }
                    let at = offset - offset % cluster;
                    Op::Compressed {
                        offset: at,
                        len: cluster.min(size - at),
                        fill,
                    }
                }
            });
        }
        ops
    }

    /// The guest range the operation may change.
    fn range(self) -> (u64, u64) {
        match self {
            Op::Write { offset, len, .. }
            | Op::Zeroes { offset, len, .. }
            | Op::Discard { offset, len }
            | Op::Compressed { offset, len, .. } => (offset, len),
        }
    }
}

/// What a byte of the disk may read as, in [`ops`]'s model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Unknown: it did not read before the operations.
    Any,
    /// Exactly this value.
    Is(u8),
    /// This value or zero: it was discarded.
    IsOrZero(u8),
}

impl Expect {
    fn allows(self, byte: u8) -> bool {
        match self {
            Expect::Any => true,
            Expect::Is(v) => byte == v,
            Expect::IsOrZero(v) => byte == v || byte == 0,
        }
    }
}

/// The expected contents of the parts of a disk that [`ops`] changes (and
/// a margin around each): disjoint windows, sorted, one [`Expect`] a byte.
/// Its size is bounded by the script ([`MAX_OPS`] ranges of at most
/// [`MAX_WRITE`] bytes), never by the image.
#[derive(Debug)]
struct Model {
    windows: Vec<(u64, Vec<Expect>)>,
}

impl Model {
    /// The model of `dev` around `ops`, filled with what it reads now.
    fn new(dev: &dyn BlockDevice, ops: &[Op]) -> Model {
        let size = dev.virtual_size();
        let mut ranges: Vec<(u64, u64)> = ops
            .iter()
            .map(|op| {
                let (offset, len) = op.range();
                let start = offset.saturating_sub(MODEL_MARGIN);
                let end = (offset + len).saturating_add(MODEL_MARGIN);
                (
                    start - start % SECTOR,
                    end.checked_next_multiple_of(SECTOR)
                        .unwrap_or(end)
                        .min(size),
                )
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let mut buf = [0u8; MODEL_CHUNK as usize];
        let windows = merged
            .into_iter()
            .map(|(start, end)| {
                // end - start <= MAX_OPS * (MAX_WRITE + 2 * MODEL_MARGIN + 2 * SECTOR).
                let mut bytes = vec![Expect::Any; (end - start) as usize];
                for (i, expect) in bytes.chunks_mut(MODEL_CHUNK as usize).enumerate() {
                    let at = start + i as u64 * MODEL_CHUNK;
                    read_sectors(dev, at, &mut buf[..expect.len()], |j, read| {
                        if let Some(byte) = read {
                            expect[j] = Expect::Is(byte);
                        }
                    });
                }
                (start, bytes)
            })
            .collect();
        Model { windows }
    }

    /// The model's bytes for a range an operation changes.
    fn span(&mut self, offset: u64, len: u64) -> &mut [Expect] {
        let (start, bytes) = self
            .windows
            .iter_mut()
            .find(|(start, bytes)| *start <= offset && offset - *start < bytes.len() as u64)
            .expect("every operation's range lies in one window");
        // Inside the window, which is in memory.
        let from = (offset - *start) as usize;
        &mut bytes[from..from + len as usize]
    }

    /// Records the effect of `op`, which succeeded.
    fn apply(&mut self, op: Op) {
        match op {
            Op::Write { offset, len, fill } | Op::Compressed { offset, len, fill } => {
                self.span(offset, len).fill(Expect::Is(fill));
            }
            Op::Zeroes { offset, len, .. } => self.span(offset, len).fill(Expect::Is(0)),
            Op::Discard { offset, len } => {
                for byte in self.span(offset, len) {
                    if let Expect::Is(v) = *byte {
                        *byte = Expect::IsOrZero(v);
                    }
                }
            }
        }
    }

    /// Reads every window back from `dev` and panics at the first byte the
    /// model does not allow, or that does not read although it was known
    /// (it read before, or an operation on it succeeded).
    fn check(&self, dev: &dyn BlockDevice, when: &str) {
        let mut buf = [0u8; MODEL_CHUNK as usize];
        for (start, bytes) in &self.windows {
            for (i, expected) in bytes.chunks(MODEL_CHUNK as usize).enumerate() {
                let at = start + i as u64 * MODEL_CHUNK;
                read_sectors(dev, at, &mut buf[..expected.len()], |j, read| {
                    let byte = at + j as u64;
                    match read {
                        Some(got) => assert!(
                            expected[j].allows(got),
                            "{when}: guest byte {byte} reads {got:#04x}, expected {:?}",
                            expected[j]
                        ),
                        None => assert!(
                            expected[j] == Expect::Any,
                            "{when}: guest byte {byte} does not read, expected {:?}",
                            expected[j]
                        ),
                    }
                });
            }
        }
    }
}

/// Reads `buf.len()` bytes of `dev` at `at` (a sector boundary) and hands
/// each byte to `each` with its index: `None` for the bytes of sectors that
/// do not read.
fn read_sectors(
    dev: &dyn BlockDevice,
    at: u64,
    buf: &mut [u8],
    mut each: impl FnMut(usize, Option<u8>),
) {
    if dev.read_at(buf, at).is_ok() {
        for (j, &byte) in buf.iter().enumerate() {
            each(j, Some(byte));
        }
        return;
    }
    for (k, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let base = k * SECTOR as usize;
        let ok = dev.read_at(sector, at + base as u64).is_ok();
        for (j, &byte) in sector.iter().enumerate() {
            each(base + j, ok.then_some(byte));
        }
    }
}

/// Most bytes the in-memory image of [`ops`] may grow to.
const STORAGE_CAP: u64 = 64 << 20;

/// Memory that refuses to grow past [`STORAGE_CAP`]: a damaged image can
/// map a cluster anywhere in the file, and a write there would otherwise
/// allocate memory by an offset read from the input (a file would just
/// grow sparse).
#[derive(Debug)]
struct CappedStorage(MemStorage);

impl CappedStorage {
    fn refuse_past_cap(end: Option<u64>) -> std::io::Result<()> {
        if end.is_none_or(|end| end > STORAGE_CAP) {
            return Err(std::io::Error::other("past the harness's storage cap"));
        }
        Ok(())
    }
}

impl Storage for CappedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        Self::refuse_past_cap(offset.checked_add(buf.len() as u64))?;
        self.0.write_at(buf, offset)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        Self::refuse_past_cap(Some(len))?;
        self.0.set_len(len)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Whether the image in `bytes` passes `check` with no corruption (leaks
/// are fine): only then do its refcounts say truly which clusters are free
/// and which are shared, so that writes cannot land on data in use.
fn consistent(bytes: Vec<u8>) -> bool {
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    Qcow2Image::open("fuzz.qcow2", storage, Some(CACHE_BYTES))
        .and_then(|mut image| image.check(Repair::None, &mut |_| {}))
        .is_ok_and(|report| report.corruptions == 0 && report.check_errors == 0)
}

/// Opens `data` as a writable qcow2 image in memory (all but the last
/// [`SCRIPT_BYTES`] bytes are the image; those drive the operations) and
/// runs writes, zero writes, discards, compressed writes and flushes at
/// offsets the input chooses. When the image was consistent (see
/// [`consistent`]) and every operation succeeded, what the changed ranges
/// and a margin around them read back must match a model of the disk:
/// written bytes, zeros where zeros were written, the old bytes or zeros
/// where a range was discarded, the old bytes elsewhere; and the same once
/// the image is closed and opened again. Errors are fine (the model is
/// then not checked); panics, hangs and unbounded allocations are bugs.
pub fn ops(data: &[u8]) {
    let split = data.len().saturating_sub(SCRIPT_BYTES);
    let (image_bytes, script) = data.split_at(split);
    let storage = Arc::new(CappedStorage(MemStorage::from_bytes(image_bytes.to_vec())));
    let Ok(image) = Qcow2Image::open_writable("fuzz.qcow2", storage.clone(), Some(CACHE_BYTES))
    else {
        return;
    };
    let size = image.virtual_size();
    if size == 0 {
        return;
    }
    // As opened for writing: a dirty image's refcounts are rebuilt by now.
    let checked = consistent(storage.0.to_bytes());
    let cluster = image.header().cluster_size();
    let script = Op::parse(script, size, cluster);
    let mut model = Model::new(&image, &script);
    let mut all_ok = true;
    for &op in &script {
        let result = match op {
            Op::Write { offset, len, fill } => image.write_at(&vec![fill; len as usize], offset),
            Op::Zeroes { offset, len, unmap } => image.write_zeroes(offset, len, unmap),
            Op::Discard { offset, len } => image.discard(offset, len),
            Op::Compressed { offset, fill, .. } => {
                image.write_compressed_cluster(&vec![fill; cluster as usize], offset)
            }
        };
        match result {
            Ok(()) => model.apply(op),
            // A failed operation may have changed part of its range.
            Err(_) => all_ok = false,
        }
        // Bound the memory the image may grow to: writes allocate clusters.
        if storage.len().unwrap_or(0) > STORAGE_CAP {
            all_ok = false;
            break;
        }
    }
    all_ok &= image.flush().is_ok();
    // On a damaged image a write may land on data in use: what it does to
    // other ranges is not modelled, only that nothing panics.
    let all_ok = all_ok && checked;
    if all_ok {
        model.check(&image, "after the operations");
    }
    if image.close().is_ok() && all_ok {
        if let Ok(reopened) = Qcow2Image::open("fuzz.qcow2", storage, Some(CACHE_BYTES)) {
            model.check(&reopened, "reopened");
        }
    }
}
