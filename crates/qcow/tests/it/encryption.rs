//! Encrypted images made by qemu-img and written by qemu-io read back as
//! qemu-img reads them, for every cipher setup QEMU creates; a wrong or
//! missing password is refused as QEMU refuses it.

use std::path::Path;

use qcow::crypto::{CryptoError, EncryptionInfo, Secret};
use qcow::{Allocation, BlockDevice, Error, ErrorKind, Image, OpenOptions};

use crate::common::{qemu, read_all};

const PASSWORD: &str = "s3cr3t pass";

/// `--object` and `--image-opts` arguments that open `image` with
/// `password` in QEMU's tools.
fn qemu_open_args(image: &Path, password: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=sec0,data={password}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            image.display()
        ),
    ]
}

/// Creates an encrypted image with `options` and writes a pattern of
/// pieces (unaligned, across clusters, zeroed) with qemu-io.
fn make(dir: &Path, name: &str, options: &str, cluster: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    let object = format!("secret,id=sec0,data={PASSWORD}");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &object,
            "-o",
            &format!("{options},encrypt.key-secret=sec0,cluster_size={cluster}"),
            p,
            "4M",
        ],
    );
    let mut args = qemu_open_args(&path, PASSWORD);
    for command in [
        "write -P 0x5a 0 4096",
        "write -P 0xa5 70001 100000",
        "write -P 0x11 1048576 65536",
        "write -z 1060000 3000",
        "write -P 0x77 4193792 512",
    ] {
        args.push("-c".into());
        args.push(command.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu("qemu-io", &args);
    path
}

/// What qemu-img reads from the encrypted `image`.
fn qemu_plain(image: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.raw");
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(qemu_open_args(image, PASSWORD));
    args.extend(["-O".into(), "raw".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu("qemu-img", &args);
    std::fs::read(out).unwrap()
}

fn qcow2_of(image: &Image) -> &qcow::Qcow2Image {
    match image {
        Image::Qcow2(image) => image,
        other => panic!("not a qcow2 image: {other:?}"),
    }
}

fn open_with(path: &Path, password: Option<&str>) -> qcow::Result<Image> {
    qcow::open(
        path,
        &OpenOptions::default().key_secret(password.map(Secret::new)),
    )
}

#[test]
fn every_cipher_qemu_creates_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (options, cluster)) in [
        ("encrypt.format=luks,encrypt.iter-time=10", "65536"),
        ("encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128", "4096"),
        (
            "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
            "65536",
        ),
        (
            "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
            "2048",
        ),
        (
            "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb,encrypt.hash-alg=sha384",
            "65536",
        ),
        ("encrypt.format=aes", "65536"),
        ("encrypt.format=aes", "512"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = make(dir.path(), &format!("e{i}.qcow2"), options, cluster);
        let expected = qemu_plain(&path);
        let image = open_with(&path, Some(PASSWORD)).unwrap_or_else(|e| panic!("{options}: {e}"));
        assert!(qcow2_of(&image).encryption().is_some());
        // A copy spreads its reads and writes over threads for it.
        assert!(image.reads_use_cpu() && image.writes_use_cpu(), "{options}");
        assert!(
            read_all(&image, 4096) == expected,
            "{options} ({cluster}): reads differ from qemu-img's"
        );
        // Pieces that start and end inside sectors.
        let mut piece = vec![0u8; 1001];
        image.read_at(&mut piece, 70000).unwrap();
        assert_eq!(piece, expected[70000..71001], "{options}: unaligned read");
    }
}

#[test]
fn the_committed_luks_fixture_reads_as_qemu_reads_it() {
    let path = crate::common::testdata().join("luks.qcow2");
    let image = open_with(&path, Some("abc")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.raw");
    qemu(
        "qemu-img",
        &[
            "convert",
            "--object",
            "secret,id=sec0,data=abc",
            "--image-opts",
            &format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                path.display()
            ),
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert!(read_all(&image, 65536) == std::fs::read(out).unwrap());
}

#[test]
fn a_wrong_or_missing_password_is_refused_as_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
        "65536",
    );
    let wrong = open_with(&path, Some("not it")).unwrap_err();
    assert_eq!(wrong.kind(), ErrorKind::Key);
    assert!(matches!(
        wrong,
        Error::Crypto {
            source: CryptoError::InvalidPassword,
            ..
        }
    ));
    assert!(
        wrong
            .to_string()
            .ends_with("Invalid password, cannot unlock any keyslot")
    );
    let missing = open_with(&path, None).unwrap_err();
    assert!(matches!(
        missing,
        Error::Crypto {
            source: CryptoError::KeyRequired,
            ..
        }
    ));
    assert!(
        missing
            .to_string()
            .ends_with("Parameter 'encrypt.key-secret' is required for cipher")
    );
}

#[test]
fn without_the_key_the_metadata_opens_and_the_data_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
        "65536",
    );
    let image = qcow::open(&path, &OpenOptions::default().without_key(true)).unwrap();
    let qcow2 = qcow2_of(&image);
    match qcow2.encryption() {
        Some(EncryptionInfo::Luks { header, .. }) => {
            assert_eq!(header.cipher_name, "aes");
            assert_eq!(header.cipher_mode, "xts-plain64");
            assert_eq!(header.hash_spec, "sha256");
            assert_eq!(header.master_key_len, 64);
            assert_eq!(header.key_slots.iter().filter(|s| s.active).count(), 1);
        }
        other => panic!("expected LUKS, got {other:?}"),
    }
    let mut buf = vec![0u8; 4096];
    let err = image.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    // Unallocated space needs no key; allocated data shows no host offset
    // (QEMU gives none for encrypted data).
    image.read_at(&mut buf, 2 << 20).unwrap();
    assert_eq!(buf, vec![0u8; 4096]);
    let extent = image.block_status(0, 4096).unwrap();
    assert!(matches!(
        extent.allocation,
        Allocation::Data { offset: None, .. }
    ));
}

/// Writes through qcow into encrypted images (unaligned pieces, partial
/// sectors and clusters, zeros, discards, whole clusters) read back in
/// QEMU as in a plain model of the disk, and qemu-img check finds the
/// image clean.
#[test]
fn writes_read_back_in_qemu_as_written() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (options, cluster)) in [
        ("encrypt.format=luks,encrypt.iter-time=10", "65536"),
        (
            "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            "4096",
        ),
        ("encrypt.format=luks,encrypt.iter-time=10,extended_l2=on", "65536"),
        ("encrypt.format=aes", "65536"),
        ("encrypt.format=aes,compat=0.10", "4096"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = make(dir.path(), &format!("w{i}.qcow2"), options, cluster);
        let mut model = qemu_plain(&path);
        let image = qcow::open(
            &path,
            &OpenOptions::default()
                .writable(true)
                .key_secret(Some(Secret::new(PASSWORD))),
        )
        .unwrap_or_else(|e| panic!("{options}: {e}"));
        let mut rng = crate::common::Rng::new(i as u64 + 7);
        for round in 0..40 {
            let len = 1 + rng.below(200_000) as usize;
            let at = rng.below(model.len() as u64 - len as u64) as usize;
            match round % 5 {
                3 => {
                    image.write_zeroes(at as u64, len as u64, round % 2 == 0).unwrap();
                    model[at..at + len].fill(0);
                }
                _ => {
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    image.write_at(&data, at as u64).unwrap();
                    model[at..at + len].copy_from_slice(&data);
                }
            }
        }
        assert!(read_all(&image, 65536) == model, "{options}: qcow's own reads");
        image.close().unwrap();
        assert!(qemu_plain(&path) == model, "{options}: QEMU reads otherwise");
        let mut args = vec!["check".to_owned()];
        args.extend(qemu_open_args(&path, PASSWORD));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let report = qemu("qemu-img", &args);
        assert!(report.contains("No errors"), "{options}: {report}");
    }
}

/// An image made encrypted by the library, written and closed, opens in
/// QEMU with its password and reads what was written.
#[test]
fn an_image_created_encrypted_is_written_and_read_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.qcow2");
    let mut options = qcow::CreateOptions::new(8 << 20);
    let mut luks = qcow::crypto::LuksOptions::new(Secret::new(PASSWORD));
    luks.iter_time_ms = 10;
    options.encryption = Some(qcow::crypto::EncryptionOptions::Luks(luks));
    let file = std::sync::Arc::new(qcow::FileStorage::create(&path).unwrap());
    let image = qcow::Qcow2Image::create_writable("new.qcow2", file, &options).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    image.write_at(&data, 12345).unwrap();
    image.close().unwrap();
    let plain = qemu_plain(&path);
    assert_eq!(&plain[12345..12345 + data.len()], &data[..]);
    assert!(plain[..12345].iter().all(|&b| b == 0));
}

/// A qcow version 1 image with AES encryption takes writes (unaligned
/// pieces, new clusters, in place) that QEMU reads back.
#[test]
fn qcow_version_1_aes_writes_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.qcow");
    let object = format!("secret,id=sec0,data={PASSWORD}");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow",
            "--object",
            &object,
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            path.to_str().unwrap(),
            "2M",
        ],
    );
    let image = qcow::open(
        &path,
        &OpenOptions::default()
            .writable(true)
            .key_secret(Some(Secret::new(PASSWORD))),
    )
    .unwrap();
    let mut model = vec![0u8; 2 << 20];
    let mut rng = crate::common::Rng::new(99);
    for _ in 0..30 {
        let len = 1 + rng.below(20_000) as usize;
        let at = rng.below(model.len() as u64 - len as u64) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        image.write_at(&data, at as u64).unwrap();
        model[at..at + len].copy_from_slice(&data);
    }
    assert!(read_all(&image, 65536) == model);
    image.close().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let out = dir2.path().join("plain.raw");
    qemu(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &format!(
                "driver=qcow,file.filename={},encrypt.key-secret=sec0",
                path.display()
            ),
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(out).unwrap() == model);
}

/// Compressed clusters are never encrypted: compressed writes into an
/// encrypted image are refused through every entry point (QEMU refuses
/// them too), and `Qcow2Image::create`, which cannot set encryption up,
/// refuses encryption options rather than make a plain image.
#[test]
fn compressed_writes_and_plain_creation_refuse_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "c.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
        "65536",
    );
    let before = std::fs::read(&path).unwrap();
    let image = qcow::open(
        &path,
        &OpenOptions::default()
            .writable(true)
            .key_secret(Some(Secret::new(PASSWORD))),
    )
    .unwrap();
    let qcow2 = qcow2_of(&image);
    let cluster = vec![0x42u8; 65536];
    assert!(image.compressed_writes().is_none());
    assert!(qcow2.write_compressed_cluster(&cluster, 0).is_err());
    assert!(qcow2.write_packed_cluster(&[1, 2, 3], 0).is_err());
    drop(image);
    assert!(std::fs::read(&path).unwrap() == before, "the image changed");
    let v1 = dir.path().join("c.qcow");
    let object = format!("secret,id=sec0,data={PASSWORD}");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow",
            "--object",
            &object,
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            v1.to_str().unwrap(),
            "1M",
        ],
    );
    let image = qcow::open(
        &v1,
        &OpenOptions::default()
            .writable(true)
            .key_secret(Some(Secret::new(PASSWORD))),
    )
    .unwrap();
    let Image::Qcow(v1_image) = &image else {
        panic!("not a qcow image");
    };
    assert!(image.compressed_writes().is_none());
    assert!(
        v1_image
            .write_compressed_cluster(&vec![0x42u8; 4096], 0)
            .is_err()
    );
    let mut options = qcow::CreateOptions::new(1 << 20);
    options.encryption = Some(qcow::crypto::EncryptionOptions::Aes {
        secret: Secret::new(PASSWORD),
    });
    let storage = qcow::MemStorage::new();
    assert!(matches!(
        qcow::Qcow2Image::create(&storage, &options),
        Err(Error::InvalidOptions(_))
    ));
}

/// A qcow version 1 image whose L2 entry points inside a cluster, off a
/// sector boundary, is refused where its data is read or written, as
/// qemu-img refuses it (an I/O error there), instead of read with sectors
/// the IVs do not match; the rest of the disk still reads.
#[test]
fn an_unaligned_qcow_version_1_entry_is_refused_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.qcow");
    let object = format!("secret,id=sec0,data={PASSWORD}");
    let spec = format!(
        "driver=qcow,file.filename={},encrypt.key-secret=sec0",
        path.display()
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow",
            "--object",
            &object,
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            path.to_str().unwrap(),
            "1M",
        ],
    );
    qemu(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &spec,
            "-c",
            "write -P 0x33 0 12288",
        ],
    );
    // L1 at the header's offset, its first L2 table, its first entry
    // moved 100 bytes into its cluster.
    let mut file = std::fs::read(&path).unwrap();
    let word = |f: &[u8], at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
    let l1 = word(&file, 40) as usize;
    let l2 = word(&file, l1) as usize;
    let entry = word(&file, l2);
    file[l2..l2 + 8].copy_from_slice(&(entry + 100).to_be_bytes());
    std::fs::write(&path, &file).unwrap();
    let theirs = std::process::Command::new("qemu-io")
        .args([
            "--object",
            &object,
            "--image-opts",
            &spec,
            "-c",
            "read 0 512",
        ])
        .output()
        .expect("qemu-io is required");
    let said = String::from_utf8_lossy(&theirs.stdout).into_owned()
        + &String::from_utf8_lossy(&theirs.stderr);
    assert!(said.contains("Input/output error"), "{said}");
    let image = qcow::open(
        &path,
        &OpenOptions::default()
            .writable(true)
            .key_secret(Some(Secret::new(PASSWORD))),
    )
    .unwrap();
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        image.read_at(&mut buf, 0),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        image.write_at(&buf, 0),
        Err(Error::Corrupt { .. })
    ));
    image.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, vec![0x33u8; 512]);
}

/// A key slot change whose writes would leave the space the image gives
/// its LUKS header (a damaged extension length) is refused before any of
/// them is made: erasing a slot there neither deactivates it in the header
/// nor wipes anything.
#[test]
fn a_key_slot_change_outside_the_header_space_changes_nothing() {
    use qcow::crypto::key_slots::{KeySlotChange, SlotState};
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "k.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
        "65536",
    );
    let open = |path: &Path| {
        qcow::open(
            path,
            &OpenOptions::default()
                .writable(true)
                .key_secret(Some(Secret::new(PASSWORD))),
        )
        .unwrap()
    };
    // A second password in slot 1.
    let mut image = open(&path);
    let Image::Qcow2(qcow2) = &mut image else {
        panic!("not a qcow2 image");
    };
    let mut add = KeySlotChange::new(SlotState::Active);
    add.new_secret = Some(Secret::new("another"));
    add.iter_time_ms = Some(10);
    add.keyslot = Some(1);
    qcow2.change_key_slots(&add, false).unwrap();
    image.close().unwrap();
    // The encryption header extension (0x0537be77): offset, then length;
    // cut the length to the header and slot 0 (4096 + 256000 bytes).
    let mut file = std::fs::read(&path).unwrap();
    let at = file
        .windows(4)
        .position(|w| w == [0x05, 0x37, 0xbe, 0x77])
        .expect("the encryption header extension");
    let length_at = at + 8 + 8;
    file[length_at..length_at + 8].copy_from_slice(&(4096u64 + 256_000).to_be_bytes());
    std::fs::write(&path, &file).unwrap();
    let mut image = open(&path);
    let Image::Qcow2(qcow2) = &mut image else {
        panic!("not a qcow2 image");
    };
    let mut erase = KeySlotChange::new(SlotState::Inactive);
    erase.keyslot = Some(1);
    let err = qcow2.change_key_slots(&erase, true).unwrap_err();
    assert!(
        err.to_string().contains("outside of extension header"),
        "{err}"
    );
    drop(image);
    assert!(std::fs::read(&path).unwrap() == file, "the file changed");
}
