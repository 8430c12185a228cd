//! Model-based property tests: random sequences of write, write_zeroes,
//! discard, compressed writes, flush, reopen, and internal snapshots made,
//! applied and deleted, on random image options, compared with a plain
//! `Vec<u8>` (and a copy of it per snapshot) after every step; after each
//! sequence `qemu-img check` finds nothing and qemu-img reads what the
//! model holds, on the disk and in every snapshot.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use qcow::format::header::CompressionType;
use qcow::{CreateOptions, OpenOptions, Qcow2Image};
use qcow_io::FileStorage;

use crate::common::{qemu, qemu_raw, read_all};
use crate::write::assert_check_clean;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zeroes { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
    Compressed { cluster: u64, seed: u8 },
    Flush,
    Reopen,
    Snapshot,
    Apply { pick: usize },
    Delete { pick: usize },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1u64..200_000).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => (range(), any::<bool>()).prop_map(|((offset, len), unmap)| Op::Zeroes { offset, len, unmap }),
        1 => range().prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => (0u64..64, any::<u8>()).prop_map(|(cluster, seed)| Op::Compressed { cluster, seed }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(|pick| Op::Apply { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
    ]
}

#[derive(Debug, Clone)]
struct Config {
    cluster_bits: u32,
    version: u32,
    refcount_bits: u32,
    backing: bool,
    zstd: bool,
    extended_l2: bool,
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop_oneof![Just(9u32), Just(12), Just(14), Just(16)],
        prop_oneof![Just(2u32), Just(3)],
        prop_oneof![Just(1u32), Just(8), Just(16), Just(64)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(cluster_bits, version, refcount_bits, backing, zstd, extended)| Config {
                cluster_bits,
                version,
                refcount_bits: if version == 2 { 16 } else { refcount_bits },
                backing,
                zstd: zstd && version == 3,
                extended_l2: extended && version == 3 && cluster_bits >= 14,
            },
        )
}

fn pattern(seed: u8, len: usize, at: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (at + i as u64).wrapping_mul(2_654_435_761) >> 7;
            // Half the seeds give compressible text-like bytes.
            if seed % 2 == 0 {
                b"model text "[(x % 11) as usize]
            } else {
                (x as u8) ^ seed
            }
        })
        .collect()
}

fn open(path: &Path) -> Qcow2Image {
    let file = Arc::new(FileStorage::open(path, true).expect("open file"));
    let mut image = Qcow2Image::open_writable("model.qcow2", file, None).expect("open");
    if let Some(name) = image.header().backing_file.clone() {
        let backing = qcow::open(
            &qcow::relative_to(path, &name),
            &OpenOptions::default().format(Some(qcow::ImageFormat::Raw)),
        )
        .expect("backing");
        image.attach_backing(Box::new(backing));
    }
    image
}

fn run(config: &Config, ops: &[Op]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.qcow2");
    let cluster_size = 1u64 << config.cluster_bits;
    let mut model = vec![0u8; SIZE as usize];
    let mut options = CreateOptions::new(SIZE);
    options.cluster_size = cluster_size;
    options.version = config.version;
    options.refcount_bits = config.refcount_bits;
    if config.zstd {
        options.compression_type = CompressionType::Zstd;
    }
    options.extended_l2 = config.extended_l2;
    if config.backing {
        let base = dir.path().join("base.raw");
        model = pattern(1, SIZE as usize, 0);
        std::fs::write(&base, &model).expect("base");
        options.backing_file = Some("base.raw".into());
        options.backing_format = Some("raw".into());
    }
    qcow::create(&path, &options).expect("create");
    let mut image = open(&path);
    // Snapshots taken so far: name and the disk it kept.
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    let mut taken = 0;
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, len as usize, offset);
                image.write_at(&data, offset).expect("write");
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Zeroes { offset, len, unmap } => {
                image
                    .write_zeroes(offset, len, unmap)
                    .expect("write_zeroes");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard { offset, len } => {
                image.discard(offset, len).expect("discard");
                if config.version >= 3 || !config.backing {
                    // Whole clusters inside the range now read as zeros.
                    let first = offset.next_multiple_of(cluster_size);
                    let end = offset + len;
                    let last = if end == SIZE {
                        end
                    } else {
                        end / cluster_size * cluster_size
                    };
                    if last > first {
                        model[first as usize..last as usize].fill(0);
                    }
                }
            }
            Op::Compressed { cluster, seed } => {
                let guest = (cluster * cluster_size) % SIZE;
                let data = pattern(seed, cluster_size as usize, guest);
                image
                    .write_compressed_cluster(&data, guest)
                    .expect("compressed");
                model[guest as usize..(guest + cluster_size) as usize].copy_from_slice(&data);
            }
            Op::Flush => image.flush().expect("flush"),
            Op::Reopen => {
                image.close().expect("close");
                image = open(&path);
            }
            Op::Snapshot => {
                taken += 1;
                let name = format!("s{taken}");
                match image.create_snapshot(&qcow::NewSnapshot::new(&name)) {
                    Ok(_) => snapshots.push((name, model.clone())),
                    // Narrow refcounts cannot take one more reference;
                    // refused before anything changed.
                    Err(e) if e.kind() == qcow::ErrorKind::Limit => {
                        assert!(config.refcount_bits < 16, "{config:?}: {e}");
                    }
                    Err(e) => panic!("{config:?}: snapshot: {e}"),
                }
            }
            Op::Apply { pick } => {
                if !snapshots.is_empty() {
                    let (name, kept) = &snapshots[pick % snapshots.len()];
                    match image.apply_snapshot(name) {
                        Ok(()) => model.clone_from(kept),
                        Err(e) if e.kind() == qcow::ErrorKind::Limit => {
                            assert!(config.refcount_bits < 16, "{config:?}: {e}");
                        }
                        Err(e) => panic!("{config:?}: apply: {e}"),
                    }
                }
            }
            Op::Delete { pick } => {
                if !snapshots.is_empty() {
                    let (name, _) = snapshots.remove(pick % snapshots.len());
                    image.delete_snapshot(&name).expect("delete");
                }
            }
        }
        let ours = read_all(&image, 1 << 20);
        assert!(ours == model, "{config:?}: contents differ after {op:?}");
    }
    image.close().expect("close");
    assert_check_clean(&path);
    let extra: Vec<&str> = Vec::new();
    assert!(
        qemu_raw(&path, &extra) == model,
        "{config:?}: qemu-img reads other contents"
    );
    for (name, kept) in &snapshots {
        assert!(
            qemu_raw(&path, &["-l", name]) == *kept,
            "{config:?}: qemu-img reads other contents in snapshot {name}"
        );
    }
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).expect("model raw");
    qemu(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().expect("p"),
            path.to_str().expect("p"),
        ],
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_match_the_model(
        config in config(),
        ops in proptest::collection::vec(op(), 1..25),
    ) {
        run(&config, &ops);
    }
}
