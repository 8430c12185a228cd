//! Hand-crafted malformed images, after QEMU's and VirtualBox's qcow CVE
//! history and the format's limits: each gives its typed error, never a
//! panic, an unbounded allocation or an endless loop.

use std::sync::Arc;

use qcow::format::FormatError;
use qcow::{BlockDevice, Error, OpenOptions, Qcow2Image};
use qcow_io::MemStorage;

const CLUSTER_BITS: u32 = 12;
const CLUSTER: usize = 1 << CLUSTER_BITS;
const SIZE: u64 = 1 << 20;

/// A valid version 3 image with 4 KiB clusters and 1 MiB of disk, laid out
/// as header, refcount table, refcount block, L1, L2, data cluster.
struct Crafted {
    bytes: Vec<u8>,
}

impl Crafted {
    fn new() -> Self {
        let mut c = Crafted {
            bytes: vec![0u8; 6 * CLUSTER],
        };
        c.put_u32(0, 0x5146_49fb);
        c.put_u32(4, 3);
        c.put_u32(20, CLUSTER_BITS);
        c.put_u64(24, SIZE);
        c.put_u32(36, 1); // l1_size
        c.put_u64(40, 3 * CLUSTER as u64); // l1_table_offset
        c.put_u64(48, CLUSTER as u64); // refcount_table_offset
        c.put_u32(56, 1); // refcount_table_clusters
        c.put_u32(96, 4); // refcount_order
        c.put_u32(100, 112); // header_length
        // Refcount table -> block at cluster 2; every cluster counted once.
        c.put_u64(CLUSTER, 2 * CLUSTER as u64);
        for i in 0..6 {
            c.bytes[2 * CLUSTER + 2 * i + 1] = 1;
        }
        // L1 -> L2 at cluster 4 -> guest cluster 0 at cluster 5.
        c.put_u64(3 * CLUSTER, (1 << 63) | (4 * CLUSTER as u64));
        c.put_u64(4 * CLUSTER, (1 << 63) | (5 * CLUSTER as u64));
        c.bytes[5 * CLUSTER..6 * CLUSTER].fill(0xab);
        c
    }

    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    fn open(&self) -> qcow::Result<Qcow2Image> {
        Qcow2Image::open(
            "crafted.qcow2",
            Arc::new(MemStorage::from_bytes(self.bytes.clone())),
            None,
        )
    }

    /// Opens and reads the whole disk.
    fn open_and_read(&self) -> qcow::Result<Vec<u8>> {
        let image = self.open()?;
        let mut buf = vec![0u8; image.virtual_size() as usize];
        image.read_at(&mut buf, 0)?;
        Ok(buf)
    }
}

fn format_error(result: qcow::Result<impl std::fmt::Debug>) -> FormatError {
    match result {
        Err(Error::Format { source, image }) => {
            assert_eq!(image, "crafted.qcow2", "errors name the image");
            source
        }
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn the_crafted_base_image_is_valid() {
    let bytes = Crafted::new().open_and_read().expect("valid image");
    assert!(bytes[..CLUSTER].iter().all(|&b| b == 0xab));
    assert!(bytes[CLUSTER..].iter().all(|&b| b == 0));
}

#[test]
fn bad_magic() {
    let mut c = Crafted::new();
    c.put_u32(0, 0x1234_5678);
    assert!(matches!(
        format_error(c.open()),
        FormatError::BadMagic {
            found: 0x1234_5678,
            ..
        }
    ));
}

#[test]
fn unknown_versions() {
    for v in [0, 4, u32::MAX] {
        let mut c = Crafted::new();
        c.put_u32(4, v);
        assert_eq!(format_error(c.open()), FormatError::UnsupportedVersion(v));
    }
}

#[test]
fn unknown_version_through_probe_is_an_error_not_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v9.qcow2");
    let mut c = Crafted::new();
    c.put_u32(4, 9);
    std::fs::write(&path, &c.bytes).expect("write");
    assert!(matches!(
        qcow::open(&path, &OpenOptions::default()),
        Err(Error::UnsupportedVersion { version: 9, .. })
    ));
}

#[test]
fn cluster_bits_out_of_range() {
    for bits in [0, 8, 22, 63, u32::MAX] {
        let mut c = Crafted::new();
        c.put_u32(20, bits);
        assert_eq!(format_error(c.open()), FormatError::ClusterBits(bits));
    }
}

#[test]
fn huge_l1_size() {
    let mut c = Crafted::new();
    c.put_u32(36, 0x7fff_ffff);
    assert!(matches!(
        format_error(c.open()),
        FormatError::TooLarge {
            structure: "L1 table",
            ..
        }
    ));
}

#[test]
fn l1_too_small_for_the_disk() {
    let mut c = Crafted::new();
    c.put_u64(24, 1 << 40);
    assert!(matches!(
        format_error(c.open()),
        FormatError::L1TooSmall { l1_size: 1, .. }
    ));
}

#[test]
fn l1_offset_past_end_of_file() {
    let mut c = Crafted::new();
    c.put_u64(40, 1 << 40);
    assert!(matches!(
        format_error(c.open()),
        FormatError::PastEnd {
            structure: "L1 table",
            ..
        }
    ));
}

#[test]
fn l1_offset_misaligned() {
    let mut c = Crafted::new();
    c.put_u64(40, 3 * CLUSTER as u64 + 8);
    assert!(matches!(
        format_error(c.open()),
        FormatError::Misaligned {
            structure: "L1 table",
            ..
        }
    ));
}

#[test]
fn refcount_table_overlapping_the_header() {
    let mut c = Crafted::new();
    c.put_u64(48, 0);
    assert!(matches!(
        format_error(c.open()),
        FormatError::Overlap {
            first: "header",
            ..
        }
    ));
}

#[test]
fn l1_overlapping_the_refcount_table() {
    let mut c = Crafted::new();
    c.put_u64(40, CLUSTER as u64);
    assert!(matches!(
        format_error(c.open()),
        FormatError::Overlap { .. }
    ));
}

#[test]
fn huge_refcount_table() {
    let mut c = Crafted::new();
    c.put_u32(56, u32::MAX);
    assert!(matches!(
        format_error(c.open()),
        FormatError::TooLarge {
            structure: "refcount table",
            ..
        }
    ));
}

#[test]
fn no_refcount_table() {
    let mut c = Crafted::new();
    c.put_u32(56, 0);
    assert_eq!(format_error(c.open()), FormatError::NoRefcountTable);
}

#[test]
fn refcount_order_above_six() {
    let mut c = Crafted::new();
    c.put_u32(96, 7);
    assert_eq!(format_error(c.open()), FormatError::RefcountOrder(7));
}

#[test]
fn header_length_too_small_or_too_large() {
    for len in [0, 72, 103, CLUSTER as u32 + 8] {
        let mut c = Crafted::new();
        c.put_u32(100, len);
        assert!(
            matches!(format_error(c.open()), FormatError::HeaderLength { length, .. } if length == len)
        );
    }
}

#[test]
fn unknown_incompatible_feature_named_from_the_table() {
    let mut c = Crafted::new();
    c.put_u64(72, 1 << 10);
    // Feature name table extension at 112: one entry, incompatible bit 10.
    c.put_u32(112, 0x6803_f857).put_u32(116, 48);
    c.bytes[120] = 0;
    c.bytes[121] = 10;
    c.bytes[122..122 + 11].copy_from_slice(b"time travel");
    match format_error(c.open()) {
        FormatError::UnknownIncompatibleFeatures {
            bits,
            names,
            unnamed,
        } => {
            assert_eq!(bits, 1 << 10);
            assert_eq!(names, ["time travel"]);
            assert_eq!(unnamed, 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_compression_type() {
    let mut c = Crafted::new();
    c.put_u64(72, 1 << 3);
    c.bytes[104] = 2;
    assert_eq!(format_error(c.open()), FormatError::CompressionType(2));
}

#[test]
fn zstd_without_its_feature_bit() {
    let mut c = Crafted::new();
    c.bytes[104] = 1;
    assert!(matches!(
        format_error(c.open()),
        FormatError::CompressionTypeBit {
            compression_type: 1,
            bit_set: false
        }
    ));
}

#[test]
fn extension_length_past_the_cluster() {
    let mut c = Crafted::new();
    c.put_u32(112, 0x1234_5678).put_u32(116, 0xffff_fff0);
    assert!(matches!(
        format_error(c.open()),
        FormatError::ExtensionPastEnd {
            kind: 0x1234_5678,
            ..
        }
    ));
}

#[test]
fn backing_format_extension_too_long() {
    let mut c = Crafted::new();
    c.put_u32(112, 0xe279_2aca).put_u32(116, 64);
    assert!(matches!(
        format_error(c.open()),
        FormatError::ExtensionLength { length: 64, .. }
    ));
}

#[test]
fn backing_name_too_long_or_outside_the_header_cluster() {
    for (offset, size) in [
        (512u64, 2000u32),
        (CLUSTER as u64 - 4, 100),
        (u64::MAX - 2, 10),
    ] {
        let mut c = Crafted::new();
        c.put_u64(8, offset).put_u32(16, size);
        assert!(matches!(
            format_error(c.open()),
            FormatError::BackingName { .. }
        ));
    }
}

#[test]
fn two_to_the_31_snapshots() {
    let mut c = Crafted::new();
    c.put_u32(60, 1 << 31).put_u64(64, 5 * CLUSTER as u64);
    assert!(matches!(
        format_error(c.open()),
        FormatError::TooManySnapshots {
            count: 0x8000_0000,
            ..
        }
    ));
}

#[test]
fn snapshot_table_past_end_of_file() {
    let mut c = Crafted::new();
    c.put_u32(60, 1000).put_u64(64, 5 * CLUSTER as u64);
    assert!(matches!(
        format_error(c.open()),
        FormatError::PastEnd {
            structure: "snapshot table",
            ..
        }
    ));
}

#[test]
fn empty_snapshot_table_at_a_misaligned_offset() {
    // QEMU refuses it though it reads nothing there.
    let mut c = Crafted::new();
    c.put_u64(64, 0x123);
    assert!(matches!(
        format_error(c.open()),
        FormatError::Misaligned {
            structure: "snapshot table",
            offset: 0x123,
            ..
        }
    ));
}

#[test]
fn snapshot_with_oversized_extra_data() {
    let mut c = Crafted::new();
    c.put_u32(60, 1).put_u64(64, 5 * CLUSTER as u64);
    let e = 5 * CLUSTER;
    c.put_u64(e, 3 * CLUSTER as u64).put_u32(e + 8, 1);
    c.put_u32(e + 36, 100_000);
    assert!(matches!(
        format_error(c.open()),
        FormatError::Snapshot { index: 0, .. }
    ));
}

#[test]
fn snapshot_entries_running_past_the_file() {
    let mut c = Crafted::new();
    c.put_u32(60, 2).put_u64(64, 5 * CLUSTER as u64);
    let e = 5 * CLUSTER;
    // A valid first entry whose ID and name lengths run the second one out.
    c.put_u64(e, 3 * CLUSTER as u64).put_u32(e + 8, 1);
    c.bytes[e + 12..e + 14].copy_from_slice(&0xfff0u16.to_be_bytes());
    assert!(c.open().is_err());
}

#[test]
fn virtual_size_beyond_the_limit() {
    let mut c = Crafted::new();
    c.put_u64(24, u64::MAX);
    assert_eq!(format_error(c.open()), FormatError::VirtualSize(u64::MAX));
}

#[test]
fn truncated_header() {
    let image = Qcow2Image::open(
        "crafted.qcow2",
        Arc::new(MemStorage::from_bytes(Crafted::new().bytes[..50].to_vec())),
        None,
    );
    // The header reads as zero past the end of the file: cluster_bits 0.
    assert!(matches!(image, Err(Error::Format { .. })));
}

#[test]
fn unknown_encryption_methods_are_named() {
    let mut c = Crafted::new();
    c.put_u32(32, 7);
    match c.open().map(|_| ()) {
        Err(Error::Encrypted { method, .. }) => assert_eq!(method, "unknown method 7"),
        other => panic!("{other:?}"),
    }
    // LUKS without the extension that says where its header is.
    let mut c = Crafted::new();
    c.put_u32(32, 2);
    match c.open().map(|_| ()) {
        Err(Error::Crypto { source, .. }) => {
            assert_eq!(source, qcow::crypto::CryptoError::MissingHeader)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn l2_table_past_end_of_file() {
    let mut c = Crafted::new();
    c.put_u64(3 * CLUSTER, 1 << 40);
    assert!(matches!(
        c.open_and_read(),
        Err(Error::Corrupt {
            table: "L2 table",
            ..
        })
    ));
}

#[test]
fn misaligned_l2_table_and_data_offsets() {
    let mut c = Crafted::new();
    c.put_u64(3 * CLUSTER, 4 * CLUSTER as u64 + 512);
    assert!(matches!(
        format_error(c.open_and_read()),
        FormatError::BadEntry { table: "L1", .. }
    ));
    let mut c = Crafted::new();
    c.put_u64(4 * CLUSTER, 5 * CLUSTER as u64 + 512);
    assert!(matches!(
        format_error(c.open_and_read()),
        FormatError::BadEntry { table: "L2", .. }
    ));
}

#[test]
fn compressed_descriptor_past_end_of_file() {
    let mut c = Crafted::new();
    // x = 62 - (12 - 8) = 58: offset in bits 0..58, sectors above.
    c.put_u64(4 * CLUSTER, (1 << 62) | (7 << 58) | (1 << 50));
    assert!(matches!(c.open_and_read(), Err(Error::Decompress { .. })));
}

#[test]
fn compressed_garbage() {
    let mut c = Crafted::new();
    c.put_u64(4 * CLUSTER, (1 << 62) | (7 << 58) | (5 * CLUSTER as u64));
    assert!(matches!(c.open_and_read(), Err(Error::Decompress { .. })));
}

#[test]
fn extended_l2_subcluster_both_allocated_and_zero() {
    let mut c = Crafted::new();
    c.put_u64(72, 1 << 4);
    c.put_u64(4 * CLUSTER + 8, 1 | (1 << 32));
    assert!(matches!(
        format_error(c.open_and_read()),
        FormatError::BadEntry { table: "L2", .. }
    ));
}

#[test]
fn bitmap_directory_past_end_of_file() {
    let mut c = Crafted::new();
    c.put_u64(88, 1); // autoclear: bitmaps
    c.put_u32(112, 0x2385_2875).put_u32(116, 24);
    c.put_u32(120, 1)
        .put_u64(128, 1 << 20)
        .put_u64(136, 1 << 40);
    assert!(matches!(
        format_error(c.open()),
        FormatError::PastEnd {
            structure: "bitmap directory",
            ..
        }
    ));
}

/// Writes `bytes` as an image at `path` whose backing file is `backing`.
fn write_with_backing(path: &std::path::Path, backing: &str) {
    let mut c = Crafted::new();
    let name_at = 512;
    c.put_u64(8, name_at as u64)
        .put_u32(16, backing.len() as u32);
    c.bytes[name_at..name_at + backing.len()].copy_from_slice(backing.as_bytes());
    // Backing format extension: qcow2.
    c.put_u32(112, 0xe279_2aca).put_u32(116, 5);
    c.bytes[120..125].copy_from_slice(b"qcow2");
    std::fs::write(path, &c.bytes).expect("write");
}

#[test]
fn self_referencing_backing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("self.qcow2");
    write_with_backing(&path, "self.qcow2");
    assert!(matches!(
        qcow::open(&path, &OpenOptions::trusted()),
        Err(Error::BackingLoop { .. })
    ));
}

#[test]
fn backing_loop_of_two() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_with_backing(&dir.path().join("a.qcow2"), "b.qcow2");
    write_with_backing(&dir.path().join("b.qcow2"), "a.qcow2");
    assert!(matches!(
        qcow::open(&dir.path().join("a.qcow2"), &OpenOptions::trusted()),
        Err(Error::BackingLoop { .. })
    ));
}

#[test]
fn backing_chain_deeper_than_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..10 {
        write_with_backing(
            &dir.path().join(format!("{i}.qcow2")),
            &format!("{}.qcow2", i + 1),
        );
    }
    std::fs::write(dir.path().join("10.qcow2"), Crafted::new().bytes).expect("write");
    let opts = OpenOptions::trusted().max_chain_depth(5);
    assert!(matches!(
        qcow::open(&dir.path().join("0.qcow2"), &opts),
        Err(Error::BackingTooDeep { limit: 5, .. })
    ));
    assert!(qcow::open(&dir.path().join("0.qcow2"), &OpenOptions::trusted()).is_ok());
}

#[test]
fn backing_file_without_a_format_is_never_probed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("top.qcow2");
    let mut c = Crafted::new();
    c.put_u64(8, 512).put_u32(16, 10);
    c.bytes[512..522].copy_from_slice(b"/etc/hosts");
    std::fs::write(&path, &c.bytes).expect("write");
    assert!(matches!(
        qcow::open(&path, &OpenOptions::trusted()),
        Err(Error::BackingFormatUnknown { .. })
    ));
}

/// Version 1 headers.
fn v1(cluster_bits: u8, l2_bits: u8, size: u64, l1_offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
    b[4..8].copy_from_slice(&1u32.to_be_bytes());
    b[24..32].copy_from_slice(&size.to_be_bytes());
    b[32] = cluster_bits;
    b[33] = l2_bits;
    b[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    b
}

fn open_v1(bytes: Vec<u8>) -> qcow::Result<qcow::QcowImage> {
    qcow::QcowImage::open(
        "crafted.qcow",
        Arc::new(MemStorage::from_bytes(bytes)),
        None,
    )
}

#[test]
fn version_1_limits() {
    assert!(open_v1(v1(12, 9, 1 << 20, 48)).is_ok());
    assert!(matches!(
        open_v1(v1(30, 9, 1 << 20, 48)),
        Err(Error::Format {
            source: FormatError::ClusterBits(30),
            ..
        })
    ));
    assert!(matches!(
        open_v1(v1(12, 0, 1 << 20, 48)),
        Err(Error::Format {
            source: FormatError::L2Bits { .. },
            ..
        })
    ));
    assert!(matches!(
        open_v1(v1(9, 6, 1 << 60, 48)),
        Err(Error::Format {
            source: FormatError::TooLarge { .. },
            ..
        })
    ));
    assert!(matches!(
        open_v1(v1(12, 9, 1 << 30, 1 << 40)),
        Err(Error::Format {
            source: FormatError::PastEnd { .. },
            ..
        })
    ));
}

#[test]
fn version_1_compressed_garbage_and_l2_past_end() {
    let mut b = v1(12, 9, 1 << 20, 48);
    b[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let image = open_v1(b).expect("open");
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        image.read_at(&mut buf, 0),
        Err(Error::Corrupt { .. })
    ));

    let mut b = v1(12, 9, 1 << 20, 48);
    b.resize(3 * 4096, 0x5a);
    b[48..56].copy_from_slice(&4096u64.to_be_bytes());
    // L2 entry 0: compressed, 100 bytes at 8192.
    let entry = (1u64 << 63) | (100u64 << (63 - 12)) | 8192;
    b[4096..4104].copy_from_slice(&entry.to_be_bytes());
    b[4104..4112].fill(0);
    b[4096 + 8..8192].fill(0);
    let image = open_v1(b).expect("open");
    assert!(matches!(
        image.read_at(&mut buf, 0),
        Err(Error::Decompress { .. })
    ));
}

#[test]
fn random_corruptions_never_panic() {
    // Flip bytes of the valid image everywhere in its metadata; every
    // outcome is fine except a panic, and every refusal names the image.
    let base = Crafted::new();
    let mut rng = crate::common::Rng::new(42);
    let (mut refused_open, mut refused_later, mut read) = (0, 0, 0);
    let refused = |e: Error| {
        assert!(
            e.to_string().contains("crafted.qcow2"),
            "an error that does not name the image: {e}"
        );
    };
    for _ in 0..3000 {
        let mut c = Crafted {
            bytes: base.bytes.clone(),
        };
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(5 * CLUSTER as u64) as usize;
            c.bytes[at] = rng.next() as u8;
        }
        let image = match c.open() {
            Ok(image) => image,
            Err(e) => {
                refused(e);
                refused_open += 1;
                continue;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        let size = image.virtual_size();
        let read_data = if size >= buf.len() as u64 {
            image.read_at(&mut buf, 0)
        } else {
            Ok(())
        };
        let mapped = image.block_status(0, size.min(1 << 20)).map(|_| ());
        let mut ok = true;
        for e in [read_data, mapped].into_iter().filter_map(Result::err) {
            refused(e);
            ok = false;
        }
        if ok {
            read += 1;
        } else {
            refused_later += 1;
        }
    }
    // The corruptions reached the checks of opening and of reading, and
    // most images (a changed byte of unused space changes nothing) still
    // opened and read.
    assert!(
        refused_open > 0 && refused_later > 0 && read > 1500,
        "refused when opened: {refused_open}, when read: {refused_later}, read: {read}"
    );
}
