//! Writing: images this engine creates and writes must pass `qemu-img
//! check` with no errors and no leaks, and `qemu-img compare` must find
//! them identical to a plain model of what was written.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow::format::header::CompressionType;
use qcow::{BlockDevice, CreateOptions, OpenOptions, Qcow2Image};
use qcow_io::FileStorage;

use crate::common::{Rng, qemu, qemu_raw};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qemu-img check` finds no corruption and no leaks.
pub(crate) fn assert_check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", s(image)])
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for the oracle tests: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: exit {:?}\n{text}",
        image.display(),
        out.status.code()
    );
}

fn open_rw(path: &Path) -> Qcow2Image {
    let file = Arc::new(FileStorage::open(path, true).expect("open"));
    Qcow2Image::open_writable(s(path), file, None).expect("open writable")
}

fn create(path: &Path, options: &CreateOptions) -> Qcow2Image {
    let file = Arc::new(FileStorage::create(path).expect("create file"));
    Qcow2Image::create_writable(s(path), file, options).expect("create image")
}

#[test]
fn created_images_pass_check_and_match_qemu_img_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cases = Vec::new();
    for cluster_size in [512u64, 4096, 65536, 2 << 20] {
        for version in [2u32, 3] {
            let mut o = CreateOptions::new(1 << 30);
            o.cluster_size = cluster_size;
            o.version = version;
            cases.push(o);
        }
    }
    for refcount_bits in [1u32, 2, 4, 8, 32, 64] {
        let mut o = CreateOptions::new(5 << 30);
        o.refcount_bits = refcount_bits;
        o.cluster_size = 512;
        cases.push(o);
    }
    let mut o = CreateOptions::new(3 << 20);
    o.compression_type = CompressionType::Zstd;
    o.lazy_refcounts = true;
    o.extended_l2 = true;
    cases.push(o);
    // A large disk with small clusters needs several refcount blocks and
    // table clusters at creation.
    let mut o = CreateOptions::new(16 << 30);
    o.cluster_size = 512;
    o.refcount_bits = 64;
    cases.push(o);
    for (i, options) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.qcow2"));
        qcow::create(&path, options).expect("create");
        assert_check_clean(&path);
        let info = qemu("qemu-img", &["info", "--output", "json", s(&path)]);
        let v: serde_json_lite::Value = serde_json_lite::parse(&info);
        assert_eq!(v.num("virtual-size"), options.size, "case {i}");
        assert_eq!(v.num("cluster-size"), options.cluster_size, "case {i}");
        assert!(
            info.contains(if options.version == 2 {
                "\"0.10\""
            } else {
                "\"1.1\""
            }),
            "case {i}: {info}"
        );
        assert!(
            info.contains(&format!("\"refcount-bits\": {}", options.refcount_bits)),
            "case {i}: {info}"
        );
    }
}

/// Just enough JSON reading for qemu-img info's top-level numbers.
mod serde_json_lite {
    pub(crate) struct Value(String);

    pub(crate) fn parse(text: &str) -> Value {
        Value(text.to_owned())
    }

    impl Value {
        pub(crate) fn num(&self, key: &str) -> u64 {
            let needle = format!("\n    \"{key}\": ");
            let at = self
                .0
                .find(&needle)
                .unwrap_or_else(|| panic!("{key} missing"));
            self.0[at + needle.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .expect("number")
        }
    }
}

/// Random writes (partial and whole clusters, across cluster and L2
/// boundaries) against a model; then check, compare and read back.
fn random_writes(image: &Qcow2Image, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let size = model.len() as u64;
    for _ in 0..ops {
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => 512 * (1 + rng.below(16)),
            _ => 1 + rng.below(300_000),
        }
        .min(size);
        let off = rng.below(size - len + 1);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        if rng.below(5) == 0 {
            data.fill(0);
        }
        image.write_at(&data, off).expect("write");
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if rng.below(10) == 0 {
            image.flush().expect("flush");
        }
    }
}

fn verify(path: &Path, model: &[u8], options: &OpenOptions) {
    assert_check_clean(path);
    let raw = qemu_raw(path, &[]);
    assert!(
        raw == model,
        "{}: qemu-img reads other contents",
        path.display()
    );
    let image = qcow::open(path, options).expect("reopen");
    let ours = crate::common::read_all(&image, 1 << 20);
    assert!(ours == model, "{}: we read other contents", path.display());
}

#[test]
fn random_writes_on_new_images_pass_check_and_compare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs: &[(u64, u32, u32)] = &[
        (65536, 3, 16),
        (65536, 2, 16),
        (512, 3, 64),
        (512, 3, 1),
        (4096, 3, 2),
        (4096, 3, 8),
        (16384, 3, 32),
        (2 << 20, 3, 16),
    ];
    for (i, &(cluster_size, version, refcount_bits)) in configs.iter().enumerate() {
        let path = dir.path().join(format!("w{i}.qcow2"));
        let size = if cluster_size == 2 << 20 {
            24 << 20
        } else {
            6 << 20
        };
        let mut options = CreateOptions::new(size);
        options.cluster_size = cluster_size;
        options.version = version;
        options.refcount_bits = refcount_bits;
        let image = create(&path, &options);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(1000 + i as u64);
        random_writes(&image, &mut model, &mut rng, 120);
        image.close().expect("close");
        verify(&path, &model, &OpenOptions::default());
        // Reopen and write more over what is there.
        let image = open_rw(&path);
        random_writes(&image, &mut model, &mut rng, 60);
        image.close().expect("close");
        verify(&path, &model, &OpenOptions::default());
    }
}

#[test]
fn writes_over_qemu_written_images_with_compression_snapshots_and_backing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.raw");
    let mut rng = Rng::new(77);
    let mut model = vec![0u8; 4 << 20];
    for chunk in model.chunks_mut(1 << 16).step_by(3) {
        rng.fill(chunk);
    }
    for chunk in model.chunks_mut(1 << 16).skip(1).step_by(5) {
        chunk
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = b"text "[i % 5]);
    }
    std::fs::write(&base, &model).expect("write base");
    for (i, extra) in [
        vec!["-c"],
        vec!["-c", "-o", "compression_type=zstd,cluster_size=4096"],
        vec!["-o", "compat=0.10"],
    ]
    .into_iter()
    .enumerate()
    {
        let path = d.join(format!("q{i}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(extra);
        args.extend([s(&base), s(&path)]);
        qemu("qemu-img", &args);
        qemu("qemu-img", &["snapshot", "-c", "before", s(&path)]);
        let mut m = model.clone();
        let image = open_rw(&path);
        random_writes(&image, &mut m, &mut rng, 80);
        image.close().expect("close");
        verify(&path, &m, &OpenOptions::default());
        // The snapshot still reads as it was.
        let snap = qemu_raw(&path, &["-l", "snapshot.name=before"]);
        assert!(
            snap == model,
            "snapshot changed by writes to the active layer"
        );
    }
    // Overlays over a qcow2 backing file: partial writes copy from it
    // (per subcluster with extended L2).
    let backing = d.join("q0.qcow2");
    for extended in [false, true] {
        let top = d.join(format!("top-{extended}.qcow2"));
        let mut options = CreateOptions::new(5 << 20);
        options.backing_file = Some("q0.qcow2".into());
        options.backing_format = Some("qcow2".into());
        options.extended_l2 = extended;
        drop(create(&top, &options));
        let mut m = qemu_raw(&backing, &[]);
        m.resize(5 << 20, 0);
        let image = qcow::open(&top, &OpenOptions::trusted().writable(true)).expect("open overlay");
        let mut rng = Rng::new(5);
        for _ in 0..100 {
            let len = 1 + rng.below(100_000);
            let off = rng.below((5 << 20) - len);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            image.write_at(&data, off).expect("write");
            m[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        image.flush().expect("flush");
        drop(image);
        verify(&top, &m, &OpenOptions::trusted());
    }
}

#[test]
fn compressed_writes_pass_check_and_compare() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, kind) in [CompressionType::Zlib, CompressionType::Zstd]
        .into_iter()
        .enumerate()
    {
        for cluster_size in [4096u64, 65536] {
            let path = dir.path().join(format!("z{i}-{cluster_size}.qcow2"));
            let mut options = CreateOptions::new(4 << 20);
            options.cluster_size = cluster_size;
            options.compression_type = kind;
            let image = create(&path, &options);
            let mut model = vec![0u8; 4 << 20];
            let mut rng = Rng::new(9);
            for (n, chunk) in model.chunks_mut(cluster_size as usize).enumerate() {
                match n % 4 {
                    0 => chunk
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = b"compressible "[j % 13]),
                    1 => rng.fill(chunk),
                    2 => chunk
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = (j / 100) as u8),
                    _ => continue,
                }
                image
                    .write_compressed_cluster(chunk, n as u64 * cluster_size)
                    .expect("compressed write");
            }
            // Overwrite a few compressed clusters partially.
            for n in [0u64, 2, 5] {
                let off = n * cluster_size + 100;
                image.write_at(&[0xee; 300], off).expect("write");
                model[off as usize..off as usize + 300].fill(0xee);
            }
            image.close().expect("close");
            verify(&path, &model, &OpenOptions::default());
            let map = qemu("qemu-img", &["map", "--output", "json", s(&path)]);
            assert!(
                map.contains("\"compressed\": true"),
                "no compressed clusters: {map}"
            );
        }
    }
}

#[test]
fn concurrent_writers_to_different_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mt.qcow2");
    let mut options = CreateOptions::new(16 << 20);
    options.cluster_size = 4096;
    let image = create(&path, &options);
    let threads = 4u64;
    let per = (16 << 20) / threads;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let image = &image;
            scope.spawn(move || {
                let mut rng = Rng::new(t + 40);
                for _ in 0..300 {
                    let len = 1 + rng.below(20_000);
                    let off = t * per + rng.below(per - len);
                    let data = vec![(t + 1) as u8; len as usize];
                    image.write_at(&data, off).expect("write");
                }
            });
        }
    });
    image.close().expect("close");
    assert_check_clean(&path);
    // Every byte is 0 or its thread's value.
    let raw = qemu_raw(&path, &[]);
    for (t, part) in raw.chunks(per as usize).enumerate() {
        assert!(part.iter().all(|&b| b == 0 || b == t as u8 + 1));
    }
}

#[test]
fn refcount_table_grows_and_freed_clusters_are_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grow.qcow2");
    let mut options = CreateOptions::new(64 << 20);
    options.cluster_size = 512;
    options.refcount_bits = 64;
    let image = create(&path, &options);
    // 64-bit refcounts in 512-byte clusters: a block counts 64 clusters, a
    // table cluster 64 blocks; 16 MiB of data needs several table moves.
    let mut model = vec![0u8; 64 << 20];
    let mut rng = Rng::new(3);
    let chunk = 1 << 20;
    for i in 0..16u64 {
        let mut data = vec![0u8; chunk];
        rng.fill(&mut data);
        image.write_at(&data, i * 4 * chunk as u64).expect("write");
        let at = (i * 4) as usize * chunk;
        model[at..at + chunk].copy_from_slice(&data);
    }
    image.close().expect("close");
    verify(&path, &model, &OpenOptions::default());
    let header = Qcow2Image::open(
        "grow",
        Arc::new(FileStorage::open(&path, false).expect("o")),
        None,
    )
    .expect("open");
    assert!(header.header().refcount_table_clusters > 1);
}

/// Runs qemu-io commands on an image.
fn qemu_io(path: &Path, commands: &[String]) {
    let mut args: Vec<&str> = Vec::new();
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(s(path));
    qemu("qemu-io", &args);
}

#[test]
fn interop_with_qemu_io_in_both_orders() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (cluster_size, version)) in [(65536u64, 3u32), (4096, 2), (512, 3)]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("i{i}.qcow2"));
        let size = 4u64 << 20;
        let mut options = CreateOptions::new(size);
        options.cluster_size = cluster_size;
        options.version = version;
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(500 + i as u64);
        // qcow writes first.
        let image = create(&path, &options);
        random_writes(&image, &mut model, &mut rng, 40);
        image.close().expect("close");
        assert_check_clean(&path);
        // qemu-io writes over it: patterns, zeroes, discards.
        let mut commands = Vec::new();
        for _ in 0..30 {
            let len = 512 * (1 + rng.below(200));
            let off = 512 * rng.below((size - len) / 512);
            let pattern = 1 + rng.below(250) as u8;
            match rng.below(4) {
                0 if version >= 3 => {
                    commands.push(format!("write -z {off} {len}"));
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    commands.push(format!("write -P {pattern} {off} {len}"));
                    model[off as usize..(off + len) as usize].fill(pattern);
                }
            }
        }
        qemu_io(&path, &commands);
        assert_check_clean(&path);
        verify(&path, &model, &OpenOptions::default());
        // qcow writes again over what qemu-io wrote.
        let image = open_rw(&path);
        random_writes(&image, &mut model, &mut rng, 40);
        image.close().expect("close");
        verify(&path, &model, &OpenOptions::default());
    }
}

pub(crate) fn incompatible_bits(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read");
    let at = qcow::format::header::field::INCOMPATIBLE_FEATURES as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn lazy_refcounts_set_the_dirty_bit_while_writing_and_clear_it_on_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lazy.qcow2");
    let mut options = CreateOptions::new(4 << 20);
    options.lazy_refcounts = true;
    let image = create(&path, &options);
    assert_eq!(
        incompatible_bits(&path) & 1,
        0,
        "clean before the first write"
    );
    image.write_at(&[1u8; 100_000], 12_345).expect("write");
    assert_eq!(incompatible_bits(&path) & 1, 1, "dirty while writing");
    image.close().expect("close");
    assert_eq!(incompatible_bits(&path) & 1, 0, "clean after close");
    assert_check_clean(&path);
}

#[test]
fn opening_a_dirty_image_for_writing_rebuilds_its_refcounts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dirty.qcow2");
    let mut options = CreateOptions::new(4 << 20);
    options.lazy_refcounts = true;
    options.cluster_size = 4096;
    let mut model = vec![0u8; 4 << 20];
    let image = create(&path, &options);
    let mut rng = Rng::new(8);
    random_writes(&image, &mut model, &mut rng, 50);
    image.flush().expect("flush");
    // A crash with lazy refcounts: the dirty bit stays set and the
    // refcounts on disk are stale. Simulate it by zeroing every refcount
    // block and setting the dirty bit by hand.
    drop(image);
    let mut bytes = std::fs::read(&path).expect("read");
    let reftable = u64::from_be_bytes(bytes[48..56].try_into().expect("8")) as usize;
    let first_block =
        u64::from_be_bytes(bytes[reftable..reftable + 8].try_into().expect("8")) as usize;
    bytes[first_block..first_block + 4096].fill(0);
    bytes[79] |= 1;
    std::fs::write(&path, &bytes).expect("write");
    let out = Command::new("qemu-img")
        .args(["check", s(&path)])
        .output()
        .expect("qemu-img");
    assert_ne!(
        out.status.code(),
        Some(0),
        "the damage is visible to qemu-img check"
    );
    // Opening for writing rebuilds them.
    let image = open_rw(&path);
    random_writes(&image, &mut model, &mut rng, 20);
    image.close().expect("close");
    assert_eq!(incompatible_bits(&path) & 1, 0);
    verify(&path, &model, &OpenOptions::default());
}

#[test]
fn the_dirty_fixture_is_rebuilt_and_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lazy-dirty.qcow2");
    std::fs::copy(crate::common::testdata().join("lazy-dirty.qcow2"), &path).expect("copy");
    let mut model = qemu_raw(&path, &[]);
    let image = open_rw(&path);
    let mut rng = Rng::new(10);
    random_writes(&image, &mut model, &mut rng, 30);
    image.close().expect("close");
    verify(&path, &model, &OpenOptions::default());
}

#[test]
fn an_inconsistency_found_while_writing_sets_the_corrupt_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.qcow2");
    let image = create(&path, &CreateOptions::new(4 << 20));
    image.write_at(&[5u8; 65536], 0).expect("write");
    image.close().expect("close");
    // Point the first L2 entry at a misaligned cluster.
    let mut bytes = std::fs::read(&path).expect("read");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8")) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().expect("8")) & 0x00ff_ffff_ffff_fe00)
        as usize;
    bytes[l2..l2 + 8].copy_from_slice(&(0x1234_5600u64 | 1 << 63).to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let image = open_rw(&path);
    assert!(image.write_at(&[1u8; 10], 100).is_err());
    assert!(matches!(
        image.write_at(&[1u8; 10], 1 << 20),
        Err(qcow::Error::MarkedCorrupt { .. })
    ));
    drop(image);
    assert_eq!(incompatible_bits(&path) & 2, 2, "corrupt bit set");
    let file = Arc::new(FileStorage::open(&path, true).expect("open"));
    assert!(matches!(
        Qcow2Image::open_writable("bad", file, None),
        Err(qcow::Error::MarkedCorrupt { .. })
    ));
    // It still reads where it can.
    let image = qcow::open(&path, &OpenOptions::default()).expect("open read-only");
    let mut buf = vec![0u8; 100];
    image.read_at(&mut buf, 1 << 20).expect("read elsewhere");
}

#[test]
fn writes_into_external_data_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    for raw in [false, true] {
        let path = dir.path().join(format!("ext-{raw}.qcow2"));
        let data = dir.path().join(format!("ext-{raw}.data"));
        let size = 4u64 << 20;
        let file = std::fs::File::create(&data).expect("data file");
        file.set_len(if raw { size } else { 0 }).expect("size");
        let mut options = CreateOptions::new(size);
        // Absolute: qemu-img resolves a relative data file name against its
        // working directory, this engine against the image's directory.
        options.data_file = Some(s(&data).into());
        options.data_file_raw = raw;
        qcow::create(&path, &options).expect("create");
        let writable = OpenOptions::trusted().writable(true);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(60 + u64::from(raw));
        for round in 0..2 {
            let image = qcow::open(&path, &writable).expect("open");
            for _ in 0..60 {
                let len = 1 + rng.below(150_000);
                let off = rng.below(size - len);
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                if rng.below(6) == 0 {
                    image.write_zeroes(off, len, true).expect("zeroes");
                    buf.fill(0);
                } else {
                    image.write_at(&buf, off).expect("write");
                }
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            image.flush().expect("flush");
            drop(image);
            verify(&path, &model, &OpenOptions::trusted());
            if raw {
                let bytes = std::fs::read(&data).expect("read data file");
                assert!(
                    bytes == model,
                    "round {round}: the raw data file is not the disk"
                );
            }
        }
    }
}

#[test]
fn preallocation_modes_lay_out_every_cluster_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in ["metadata", "falloc", "full"] {
        for (cluster_size, extended) in [(65536u64, false), (4096, false), (65536, true)] {
            let ours = dir
                .path()
                .join(format!("ours-{mode}-{cluster_size}-{extended}.qcow2"));
            let theirs = dir
                .path()
                .join(format!("theirs-{mode}-{cluster_size}-{extended}.qcow2"));
            let mut options = CreateOptions::new(3 << 20);
            options.cluster_size = cluster_size;
            options.extended_l2 = extended;
            options.preallocation = qcow::Preallocation::from_name(mode).expect("mode");
            qcow::create(&ours, &options).expect("create");
            let o = format!(
                "preallocation={mode},cluster_size={cluster_size},extended_l2={}",
                if extended { "on" } else { "off" }
            );
            qemu(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &o, s(&theirs), "3M"],
            );
            assert_check_clean(&ours);
            // Byte for byte qemu-img's layout.
            assert!(
                std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
                "{o}: the files differ"
            );
            // Every cluster has its host cluster. With extended L2 entries,
            // the subclusters stay unallocated, as QEMU leaves them (they
            // read as zeros).
            let map = qemu("qemu-img", &["map", "--output", "json", s(&ours)]);
            assert!(
                extended || !map.contains("\"data\": false"),
                "{mode}: every cluster is allocated: {map}"
            );
            assert!(qemu_raw(&ours, &[]).iter().all(|&b| b == 0));
            let len = |p: &Path| std::fs::metadata(p).expect("metadata").len();
            assert_eq!(
                len(&ours),
                len(&theirs),
                "{mode} {cluster_size}: file length"
            );
            let blocks = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(p).expect("metadata").blocks()
            };
            if mode != "metadata" {
                assert!(blocks(&ours) * 512 >= 3 << 20, "{mode}: space reserved");
            }
        }
    }
}

#[test]
fn qcow_version_1_create_write_and_compress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let mut base_bytes = vec![0u8; 3 << 20];
    Rng::new(70).fill(&mut base_bytes);
    std::fs::write(&base, &base_bytes).expect("base");
    for with_backing in [false, true] {
        let path = dir.path().join(format!("v1-{with_backing}.qcow"));
        let mut options = CreateOptions::new(3 << 20);
        if with_backing {
            options.backing_file = Some("base.raw".into());
        }
        qcow::create_qcow(&path, &options).expect("create");
        // Byte for byte what qemu-img creates.
        let theirs = dir.path().join(format!("theirs-{with_backing}.qcow"));
        let mut args = vec!["create", "-q", "-f", "qcow"];
        if with_backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([s(&theirs), "3M"]);
        qemu("qemu-img", &args);
        assert!(
            std::fs::read(&path).ok() == std::fs::read(&theirs).ok(),
            "created image differs from qemu-img's"
        );
        let mut model = if with_backing {
            base_bytes.clone()
        } else {
            vec![0u8; 3 << 20]
        };
        let opts = OpenOptions::trusted()
            .writable(true)
            .assume_backing_format(Some(qcow::ImageFormat::Raw));
        let image = qcow::open(&path, &opts).expect("open");
        let qcow::Image::Qcow(v1) = &image else {
            panic!("qcow v1")
        };
        let cluster = v1.header().cluster_size() as usize;
        let mut rng = Rng::new(71);
        for n in (0..(3 << 20) / cluster).step_by(7) {
            let mut data = vec![0u8; cluster];
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = b"v1 text "[i % 8]);
            v1.write_compressed_cluster(&data, (n * cluster) as u64)
                .expect("compressed");
            model[n * cluster..(n + 1) * cluster].copy_from_slice(&data);
        }
        for _ in 0..80 {
            let len = 1 + rng.below(20_000);
            let off = rng.below((3 << 20) - len);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            image.write_at(&data, off).expect("write");
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        image.flush().expect("flush");
        drop(image);
        let raw = qemu_raw(&path, &[]);
        assert!(
            raw == model,
            "qemu-img reads other contents (backing {with_backing})"
        );
        let image = qcow::open(&path, &opts).expect("reopen");
        assert!(crate::common::read_all(&image, 1 << 20) == model);
    }
}

#[test]
fn growing_an_image_grows_its_l1_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (cluster_size, extended) in [(512u64, false), (65536, false), (65536, true)] {
        let path = dir
            .path()
            .join(format!("grow-{cluster_size}-{extended}.qcow2"));
        let mut options = CreateOptions::new(1 << 20);
        options.cluster_size = cluster_size;
        options.extended_l2 = extended;
        let mut image = create(&path, &options);
        let mut model = vec![0u8; 1 << 20];
        let mut rng = Rng::new(90);
        random_writes(&image, &mut model, &mut rng, 20);
        let l1_before = image.header().l1_size;
        // Far enough that more L1 entries are needed.
        let new_size = 64u64 << 30;
        image.resize(new_size).expect("resize");
        assert!(image.header().l1_size > l1_before);
        // Write past the old L1 table's reach.
        let far = new_size - 3 * cluster_size.max(4096) - 17;
        image.write_at(&[0xabu8; 5000], far).expect("write far");
        image.close().expect("close");
        assert_check_clean(&path);
        let info = qemu("qemu-img", &["info", "--output", "json", s(&path)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {new_size}")),
            "{info}"
        );
        let image = qcow::open(&path, &OpenOptions::default()).expect("reopen");
        let mut head = vec![0u8; 1 << 20];
        image.read_at(&mut head, 0).expect("read");
        assert!(head == model, "old contents kept");
        let mut tail = vec![0u8; 5000];
        image.read_at(&mut tail, far).expect("read far");
        assert!(tail.iter().all(|&b| b == 0xab));
        // qemu-io reads the same bytes there (it fails on a mismatch).
        let cmd = format!("read -P 171 {far} 5000");
        let out = qemu("qemu-io", &["-r", "-f", "qcow2", "-c", &cmd, s(&path)]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

#[test]
fn freed_clusters_are_reused_before_the_file_grows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reuse.qcow2");
    let mut options = CreateOptions::new(8 << 20);
    options.cluster_size = 4096;
    let image = create(&path, &options);
    let data = vec![0x11u8; 4 << 20];
    image.write_at(&data, 0).expect("write");
    image.flush().expect("flush");
    let grown = std::fs::metadata(&path).expect("m").len();
    // Release the first half, then write the second half of the disk.
    image.discard(0, 4 << 20).expect("discard");
    image.flush().expect("flush");
    image.write_at(&data, 4 << 20).expect("write");
    image.close().expect("close");
    let after = std::fs::metadata(&path).expect("m").len();
    assert!(
        after <= grown + 2 * 4096,
        "file grew from {grown} to {after} instead of reusing freed clusters"
    );
    assert_check_clean(&path);
}

/// A write into the partial last subcluster of a disk whose size is not a
/// subcluster multiple fills the rest of the subcluster with zeros, even
/// when its cluster is reused from freed data: growing the disk later
/// shows zeros there, as qemu-img reads them too.
#[test]
fn the_tail_of_a_partial_last_subcluster_reads_as_zeros_after_a_grow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tail.qcow2");
    let cluster = 65536u64;
    let sub = cluster / 32;
    // Two clusters, the second ending 1000 bytes into a subcluster.
    let size = cluster + 3 * sub + 1000;
    let mut options = CreateOptions::new(size);
    options.cluster_size = cluster;
    options.extended_l2 = true;
    let mut image = create(&path, &options);
    // Fill the first cluster with non-zero bytes, then free it.
    image
        .write_at(&vec![0x5a; cluster as usize], 0)
        .expect("fill");
    image.flush().expect("flush");
    image.discard(0, cluster).expect("discard");
    image.flush().expect("flush");
    // The last cluster's first write reuses the freed one.
    let at = cluster + 3 * sub;
    image.write_at(&[0x11; 100], at).expect("write tail");
    image.resize(2 * cluster).expect("grow");
    let mut tail = vec![0u8; sub as usize];
    image.read_at(&mut tail, at).expect("read");
    assert!(tail[..100].iter().all(|&b| b == 0x11));
    assert!(
        tail[100..].iter().all(|&b| b == 0),
        "stale bytes past the old end of the disk"
    );
    image.close().expect("close");
    assert_check_clean(&path);
    let raw = qemu_raw(&path, &[]);
    let at = at as usize;
    assert!(raw[at + 100..at + sub as usize].iter().all(|&b| b == 0));
}
