//! `qcow check` against `qemu-img check` on a corpus of damaged images
//! (made with qemu-img and qemu-io, then byte pokes, after QEMU's iotests
//! 060, 080, 108, 138 and 261): the same exit code and the same output,
//! and after `qcow check -r all` an image `qemu-img check` finds clean and
//! `qemu-img compare` finds identical to qemu-img's own repair.

use std::path::{Path, PathBuf};
use std::process::Output;

use qcow::format::header::field;

use super::{assert_check_clean, qcow, qemu_img, stdout};
use super::{p, qemu_io, stderr};

/// An image file's bytes with helpers to find and poke its structures.
struct Bytes {
    path: PathBuf,
    b: Vec<u8>,
}

impl Bytes {
    fn load(path: &Path) -> Bytes {
        Bytes {
            path: path.to_owned(),
            b: std::fs::read(path).expect("read image"),
        }
    }
    fn u64_at(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_be_bytes(self.b[at..at + 8].try_into().expect("8 bytes"))
    }
    fn set_u64(&mut self, at: u64, v: u64) {
        let at = at as usize;
        self.b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn cluster_bits(&self) -> u32 {
        let at = field::CLUSTER_BITS as usize;
        u32::from_be_bytes(self.b[at..at + 4].try_into().expect("4 bytes"))
    }
    fn l1(&self) -> u64 {
        self.u64_at(field::L1_TABLE_OFFSET)
    }
    fn reftable(&self) -> u64 {
        self.u64_at(field::REFCOUNT_TABLE_OFFSET)
    }
    /// Offset of L1 entry `i`'s L2 table.
    fn l2(&self, i: u64) -> u64 {
        self.u64_at(self.l1() + 8 * i) & 0x00ff_ffff_ffff_fe00
    }
    /// Where the (16-bit) refcount of the cluster at `offset` is stored.
    fn refcount_at(&self, offset: u64) -> u64 {
        let bits = self.cluster_bits();
        let cluster = offset >> bits;
        let per_block = (1u64 << bits) / 2;
        let block = self.u64_at(self.reftable() + 8 * (cluster / per_block));
        block + 2 * (cluster % per_block)
    }
    fn set_refcount(&mut self, offset: u64, n: u16) {
        let at = self.refcount_at(offset) as usize;
        self.b[at..at + 2].copy_from_slice(&n.to_be_bytes());
    }
    fn save(&self) {
        std::fs::write(&self.path, &self.b).expect("write image");
    }
}

/// A 64 MiB image with data in two L2 tables' worth of guest space, one
/// compressed cluster and one zero cluster.
fn base(path: &Path, options: &str) {
    let out = qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, p(path), "64M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    qemu_io(
        path,
        &[
            "write -P 1 0 192k",
            "write -c -P 2 1M 64k",
            "write -z 2M 64k",
            "write -P 3 40M 64k",
        ],
    );
}

type Damage = fn(&Path);

/// The extra data length of the snapshot entry at `at`.
fn snapshot_extra_len(b: &Bytes, at: usize) -> usize {
    u32::from_be_bytes(b.b[at + 36..at + 40].try_into().expect("4 bytes")) as usize
}

/// The snapshot entry at `at`: its fixed part and its ID and name.
fn snapshot_entry(b: &Bytes, at: usize) -> (Vec<u8>, Vec<u8>) {
    let u16_at = |i: usize| u16::from_be_bytes([b.b[i], b.b[i + 1]]) as usize;
    let names = u16_at(at + 12) + u16_at(at + 14);
    let start = at + 40 + snapshot_extra_len(b, at);
    (
        b.b[at..at + 40].to_vec(),
        b.b[start..start + names].to_vec(),
    )
}

fn cases() -> Vec<(&'static str, &'static str, Damage)> {
    let plain = "cluster_size=65536";
    vec![
        ("clean", plain, |_| {}),
        ("leaked cluster past the data", plain, |path| {
            // Grow the file by a cluster and count it.
            let mut b = Bytes::load(path);
            let end = (b.b.len() as u64).next_multiple_of(65536);
            b.b.resize(end as usize + 65536, 0);
            b.set_refcount(end, 1);
            b.save();
        }),
        ("refcount too high", plain, |path| {
            let mut b = Bytes::load(path);
            let data = b.u64_at(b.l2(0)) & 0x00ff_ffff_ffff_fe00;
            b.set_refcount(data, 2);
            b.save();
        }),
        ("refcount of a data cluster zero", plain, |path| {
            let mut b = Bytes::load(path);
            let data = b.u64_at(b.l2(0) + 8) & 0x00ff_ffff_ffff_fe00;
            b.set_refcount(data, 0);
            b.save();
        }),
        ("refcount of an L2 table zero", plain, |path| {
            let mut b = Bytes::load(path);
            let l2 = b.l2(0);
            b.set_refcount(l2, 0);
            b.save();
        }),
        ("refcount of the L1 table too high", plain, |path| {
            let mut b = Bytes::load(path);
            let l1 = b.l1();
            b.set_refcount(l1, 3);
            b.save();
        }),
        ("refcount of the compressed cluster zero", plain, |path| {
            let mut b = Bytes::load(path);
            let entry = b.u64_at(b.l2(0) + 8 * 16);
            let host = entry & ((1 << 54) - 1);
            b.set_refcount(host, 0);
            b.save();
        }),
        ("L1 entry without OFLAG_COPIED", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l1();
            let e = b.u64_at(at);
            b.set_u64(at, e & !(1 << 63));
            b.save();
        }),
        ("L2 entry without OFLAG_COPIED", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l2(0);
            let e = b.u64_at(at);
            b.set_u64(at, e & !(1 << 63));
            b.save();
        }),
        ("compressed entry with OFLAG_COPIED", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l2(0) + 8 * 16;
            let e = b.u64_at(at);
            b.set_u64(at, e | (1 << 63));
            b.save();
        }),
        ("L1 entry with reserved bits", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l1();
            let e = b.u64_at(at);
            b.set_u64(at, e | (1 << 60));
            b.save();
        }),
        ("L2 entry with reserved bits", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l2(0);
            let e = b.u64_at(at);
            b.set_u64(at, e | 0x100);
            b.save();
        }),
        ("two L2 entries name one cluster", plain, |path| {
            let mut b = Bytes::load(path);
            let l2 = b.l2(0);
            let e = b.u64_at(l2);
            b.set_u64(l2 + 8, e);
            b.save();
        }),
        ("L2 entry past the end of the file", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l2(0) + 8;
            b.set_u64(at, (1 << 63) | (1 << 40));
            b.save();
        }),
        ("refcount table entry with reserved bits", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.reftable();
            let e = b.u64_at(at);
            b.set_u64(at, e | 1);
            b.save();
        }),
        ("refcount block outside the image", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.reftable() + 8;
            let past = (b.b.len() as u64).next_multiple_of(65536) + 4 * 65536;
            b.set_u64(at, past);
            b.save();
        }),
        ("refcount block's own refcount zero", plain, |path| {
            let mut b = Bytes::load(path);
            let block = b.u64_at(b.reftable());
            b.set_refcount(block, 0);
            b.save();
        }),
        ("refcount block on the L1 table", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.reftable();
            let l1 = b.l1();
            b.set_u64(at, l1);
            b.save();
        }),
        ("corrupt bit on a consistent image", plain, |path| {
            let mut b = Bytes::load(path);
            let at = field::INCOMPATIBLE_FEATURES;
            let e = b.u64_at(at);
            b.set_u64(at, e | 2);
            b.save();
        }),
        (
            "dirty image with stale refcounts",
            "lazy_refcounts=on",
            |path| {
                let mut b = Bytes::load(path);
                let data = b.u64_at(b.l2(0) + 16) & 0x00ff_ffff_ffff_fe00;
                b.set_refcount(data, 0);
                let at = field::INCOMPATIBLE_FEATURES;
                let e = b.u64_at(at);
                b.set_u64(at, e | 1);
                b.save();
            },
        ),
        (
            "extended L2: allocated and zero subcluster",
            "extended_l2=on",
            |path| {
                let mut b = Bytes::load(path);
                let at = b.l2(0) + 8;
                let bitmap = b.u64_at(at);
                b.set_u64(at, bitmap | (1 << 32));
                b.save();
            },
        ),
        (
            "extended L2: unallocated with allocated subclusters",
            "extended_l2=on",
            |path| {
                let mut b = Bytes::load(path);
                // Entry 5 is unallocated: give it allocation bits.
                let at = b.l2(0) + 16 * 5 + 8;
                b.set_u64(at, 0xff);
                b.save();
            },
        ),
        (
            "snapshot shares clusters, refcount lowered",
            plain,
            |path| {
                let out = qemu_img(&["snapshot", "-c", "snap", p(path)]);
                assert!(out.status.success());
                let mut b = Bytes::load(path);
                let data = b.u64_at(b.l2(0)) & 0x00ff_ffff_ffff_fe00;
                b.set_refcount(data, 1);
                b.save();
            },
        ),
        ("misaligned preallocated zero cluster", plain, |path| {
            let mut b = Bytes::load(path);
            let at = b.l2(0) + 8 * 2;
            let e = b.u64_at(at);
            b.set_u64(at, (e + 0x200) | 1);
            b.save();
        }),
        (
            "version 3 snapshot entries without extra data",
            plain,
            |path| {
                for name in ["one", "two"] {
                    let out = qemu_img(&["snapshot", "-c", name, p(path)]);
                    assert!(out.status.success());
                }
                // Rewrite both entries without their extra data.
                let mut b = Bytes::load(path);
                let table = b.u64_at(field::SNAPSHOTS_OFFSET) as usize;
                let (mut from, mut to) = (table, table);
                let mut rewritten = Vec::new();
                for _ in 0..2 {
                    let (fixed, names) = snapshot_entry(&b, from);
                    from = (from + 40 + snapshot_extra_len(&b, from) + names.len())
                        .next_multiple_of(8);
                    let mut entry = fixed;
                    entry[36..40].copy_from_slice(&0u32.to_be_bytes());
                    entry.extend_from_slice(&names);
                    entry.resize(entry.len().next_multiple_of(8), 0);
                    rewritten.extend_from_slice(&entry);
                }
                b.b[to..to + rewritten.len()].copy_from_slice(&rewritten);
                to += rewritten.len();
                let end = from.min(b.b.len());
                b.b[to..end].fill(0);
                b.save();
            },
        ),
        ("snapshot entry with too much extra data", plain, |path| {
            let out = qemu_img(&["snapshot", "-c", "snap", p(path)]);
            assert!(out.status.success());
            // Data after the table, for the extra data to spill over.
            qemu_io(path, &["write -P 5 50M 256k"]);
            let mut b = Bytes::load(path);
            let table = b.u64_at(field::SNAPSHOTS_OFFSET) as usize;
            b.b[table + 36..table + 40].copy_from_slice(&0x1_0000u32.to_be_bytes());
            b.save();
        }),
        ("more snapshots than allowed", "compat=0.10", |path| {
            // After iotest 261: 2^17 all-zero entries (valid in version 2)
            // at 1 MiB, the file grown over them.
            let mut b = Bytes::load(path);
            b.b.resize(1 << 20, 0);
            let at = field::NB_SNAPSHOTS as usize;
            b.b[at..at + 4].copy_from_slice(&0x2_0000u32.to_be_bytes());
            b.set_u64(field::SNAPSHOTS_OFFSET, 1 << 20);
            b.b.resize((1 << 20) + 40 * 0x2_0000, 0);
            b.save();
        }),
        (
            "1-bit refcounts, two L1 entries name one L2 table",
            "cluster_size=4096,refcount_bits=1",
            |path| {
                let mut b = Bytes::load(path);
                let l1 = b.l1();
                let first = b.u64_at(l1);
                b.set_u64(l1 + 8, first);
                b.save();
            },
        ),
        (
            "version 2 image, refcount too high",
            "compat=0.10",
            |path| {
                let mut b = Bytes::load(path);
                let data = b.u64_at(b.l2(0)) & 0x00ff_ffff_ffff_fe00;
                b.set_refcount(data, 5);
                b.save();
            },
        ),
    ]
}

fn make(dir: &Path, name: &str, options: &str, damage: Damage) -> PathBuf {
    let path = dir.join(name);
    base(&path, options);
    damage(&path);
    path
}

/// How qcow's check (`a`, on `images.0`) and qemu-img's (`b`, on
/// `images.1`) differ: exit code, standard output, and messages with the
/// program's name aside (their lines in any order with `any_order`).
fn difference(
    what: &str,
    a: &Output,
    b: &Output,
    images: (&Path, &Path),
    any_order: bool,
) -> Option<String> {
    let (ours, theirs) = images;
    let theirs_out = stdout(b).replace(p(theirs), p(ours));
    let lines = |text: String| {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if any_order {
            lines.sort();
        }
        lines
    };
    let ours_err = lines(
        stderr(a)
            .replace("qcow: ", "qemu-img: ")
            .replace("qcow check", "qemu-img check"),
    );
    let theirs_err = lines(stderr(b).replace(p(theirs), p(ours)));
    let same =
        a.status.code() == b.status.code() && stdout(a) == theirs_out && ours_err == theirs_err;
    (!same).then(|| {
        format!(
            "{what}: qcow exit {:?}, qemu-img exit {:?}\n--- qcow:\n{}{}--- qemu-img:\n{}{}",
            a.status.code(),
            b.status.code(),
            stdout(a),
            stderr(a),
            theirs_out,
            stderr(b)
        )
    })
}

#[test]
fn check_reports_what_qemu_img_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (i, (name, options, damage)) in cases().into_iter().enumerate() {
        let ours = make(dir.path(), &format!("o{i}.qcow2"), options, damage);
        let theirs = dir.path().join(format!("t{i}.qcow2"));
        std::fs::copy(&ours, &theirs).expect("copy");
        let consistent = matches!(name, "clean" | "corrupt bit on a consistent image");
        let oracle = qemu_img(&["check", p(&theirs)]);
        assert_eq!(
            oracle.status.success(),
            consistent,
            "{name}: the damage is not what qemu-img sees: {}",
            stdout(&oracle)
        );
        for output in ["human", "json"] {
            let a = qcow(&["check", "--output", output, p(&ours)]);
            let b = qemu_img(&["check", "--output", output, p(&theirs)]);
            let what = format!("{name} ({output})");
            failures.extend(difference(&what, &a, &b, (&ours, &theirs), false));
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn checks_in_windows_of_four_clusters_report_and_repair_as_qemu_img() {
    // Counted four clusters at a time (16 bytes of counts), every damage
    // reads as it does counted whole; repairs too, except that a refcount
    // rebuild, which needs the whole file counted, is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (i, (name, options, damage)) in cases().into_iter().enumerate() {
        for mode in [None, Some("leaks"), Some("all")] {
            let ours = make(dir.path(), &format!("w{i}.qcow2"), options, damage);
            let theirs = dir.path().join(format!("t{i}.qcow2"));
            std::fs::copy(&ours, &theirs).expect("copy");
            let mut args = vec!["check", "--max-memory", "16"];
            let mut oracle = vec!["check"];
            if let Some(mode) = mode {
                args.extend(["-r", mode]);
                oracle.extend(["-r", mode]);
            }
            let a = qcow(&[args.as_slice(), &[p(&ours)]].concat());
            let b = qemu_img(&[oracle.as_slice(), &[p(&theirs)]].concat());
            if stderr(&b).contains("Rebuilding refcount structure") {
                if a.status.code() != Some(1) || !stderr(&a).contains("more memory") {
                    failures.push(format!(
                        "{name} {mode:?}: a rebuild in windows was not refused: {}",
                        stderr(&a)
                    ));
                }
                continue;
            }
            // Counted in windows, errors may come in another order.
            let what = format!("{name} {mode:?}");
            failures.extend(difference(&what, &a, &b, (&ours, &theirs), true));
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn repairs_leave_images_qemu_img_finds_clean_and_identical_to_its_own_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (i, (name, options, damage)) in cases().into_iter().enumerate() {
        for mode in ["leaks", "all"] {
            let ours = make(dir.path(), &format!("o{i}{mode}.qcow2"), options, damage);
            let theirs = dir.path().join(format!("t{i}{mode}.qcow2"));
            std::fs::copy(&ours, &theirs).expect("copy");
            let a = qcow(&["check", "-r", mode, p(&ours)]);
            let b = qemu_img(&["check", "-r", mode, p(&theirs)]);
            // Where qemu-img's own repair fails (it refuses to write a
            // rebuilt refcount block over what it takes for metadata), a
            // repair that succeeds must leave a clean image.
            let qemu_failed_ours_repaired =
                mode == "all" && b.status.code() == Some(1) && a.status.success();
            if qemu_failed_ours_repaired {
                let check = qemu_img(&["check", p(&ours)]);
                if !check.status.success() {
                    failures.push(format!(
                        "{name}: not clean after qcow's repair: {}",
                        stdout(&check)
                    ));
                }
                continue;
            }
            if a.status.code() != b.status.code() {
                failures.push(format!(
                    "{name} -r {mode}: qcow exit {:?}, qemu-img exit {:?}\n--- qcow:\n{}{}--- qemu-img:\n{}{}",
                    a.status.code(),
                    b.status.code(),
                    stdout(&a),
                    stderr(&a),
                    stdout(&b),
                    stderr(&b)
                ));
                continue;
            }
            if stdout(&a) != stdout(&b) {
                failures.push(format!(
                    "{name} -r {mode}: output differs\n--- qcow:\n{}{}--- qemu-img:\n{}{}",
                    stdout(&a),
                    stderr(&a),
                    stdout(&b),
                    stderr(&b)
                ));
            }
            if mode == "all" && b.status.success() {
                let check = qemu_img(&["check", p(&ours)]);
                if !check.status.success() {
                    failures.push(format!(
                        "{name}: qemu-img check after qcow check -r all: {}{}",
                        stdout(&check),
                        stderr(&check)
                    ));
                }
                let cmp = qemu_img(&["compare", "-U", p(&ours), p(&theirs)]);
                if !cmp.status.success() {
                    failures.push(format!(
                        "{name}: compare with qemu-img's repair: {}",
                        stdout(&cmp)
                    ));
                }
            }
            // The repaired file itself is qemu-img's, byte for byte. One
            // difference is ours: where the repair fails (corruptions
            // left), qemu-img still clears the dirty bit when it closes the
            // image; qcow keeps it, so that the next writer repairs the
            // refcounts.
            let (mut ours_bytes, mut theirs_bytes) = (
                std::fs::read(&ours).expect("read"),
                std::fs::read(&theirs).expect("read"),
            );
            let dirty_byte = field::INCOMPATIBLE_FEATURES as usize + 7;
            if !b.status.success() && ours_bytes[dirty_byte] & 1 == 1 {
                ours_bytes[dirty_byte] &= !1;
                theirs_bytes[dirty_byte] &= !1;
            }
            if ours_bytes != theirs_bytes {
                failures.push(format!("{name} -r {mode}: the repaired files differ"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn formats_without_checks_exit_63() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["raw", "qcow"] {
        let path = dir.path().join(format!("x.{format}"));
        assert!(
            qemu_img(&["create", "-q", "-f", format, p(&path), "1M"])
                .status
                .success()
        );
        let a = qcow(&["check", p(&path)]);
        let b = qemu_img(&["check", "-f", format, p(&path)]);
        assert_eq!(a.status.code(), Some(63), "{format}: {}", stderr(&a));
        assert_eq!(b.status.code(), Some(63));
        assert_eq!(
            stderr(&a),
            stderr(&b).replace("qemu-img: ", "qcow: "),
            "{format}"
        );
    }
}

#[test]
fn clean_images_of_every_kind_report_what_qemu_img_reports() {
    // Every committed fixture (cluster sizes, compat levels, refcount
    // widths, zstd, extended L2, data files, snapshots, bitmaps, dirty
    // images, qcow version 1 and raw).
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in super::fixtures() {
        if name == "luks.qcow2" || name == "aes.qcow2" {
            continue;
        }
        for output in ["human", "json"] {
            let a = qcow(&["check", "--output", output, &name]);
            let b = qemu_img(&["check", "--output", output, &name]);
            checked += 1;
            if a.status.code() != b.status.code() || stdout(&a) != stdout(&b) {
                failures.push(format!(
                    "{name} ({output}): qcow exit {:?}, qemu-img exit {:?}\n--- qcow:\n{}{}--- qemu-img:\n{}{}",
                    a.status.code(),
                    b.status.code(),
                    stdout(&a),
                    stderr(&a),
                    stdout(&b),
                    stderr(&b)
                ));
            }
        }
    }
    assert!(checked >= 40, "fixtures are missing");
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// An autoclear bit qcow does not know (bit 63, as QEMU's iotest 036 sets
/// it) is cleared by every command that writes the image, as qemu-img
/// clears it, and kept by commands that only read.
#[test]
fn writers_clear_unknown_autoclear_bits_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commands: [&[&str]; 4] = [
        &["check", "-r", "all"],
        &["resize", "-q"],
        &["info"],
        &["check"],
    ];
    for args in commands {
        let mut bits = Vec::new();
        for tool in ["qcow", "qemu-img"] {
            let path = dir.path().join(format!("{tool}.qcow2"));
            let out = qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "1M"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let mut image = Bytes::load(&path);
            let autoclear = image.u64_at(field::AUTOCLEAR_FEATURES);
            image.set_u64(field::AUTOCLEAR_FEATURES, autoclear | 1 << 63);
            std::fs::write(&path, &image.b).expect("write");
            let mut all = args.to_vec();
            all.push(p(&path));
            if args[0] == "resize" {
                all.push("2M");
            }
            let out = if tool == "qcow" {
                qcow(&all)
            } else {
                qemu_img(&all)
            };
            assert!(out.status.success(), "{tool} {args:?}: {}", stderr(&out));
            bits.push(Bytes::load(&path).u64_at(field::AUTOCLEAR_FEATURES));
        }
        assert_eq!(bits[0], bits[1], "{args:?}: qcow's bits, then qemu-img's");
        let writes = args[0] == "resize" || args.contains(&"-r");
        assert_eq!(bits[0] & 1 << 63 == 0, writes, "{args:?}");
    }
}

/// An image a writer left dirty (lazy refcounts, killed after a flush):
/// the refcounts of its new clusters were never written.
fn killed_writer_image(path: &Path) {
    let made = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(path),
        "64M",
    ]);
    assert!(made.status.success());
    let out = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x2a 0 128k",
            "-c",
            "flush",
            "-c",
            "sigraise 9",
            p(path),
        ])
        .output()
        .expect("qemu-io is required");
    assert!(!out.status.success(), "qemu-io was not killed");
}

/// iotest 061: opening a dirty image for writing repairs it with the
/// check, whose lines qemu-img prints on standard error; the repaired
/// file is qemu-img's, and the command then does its work on it.
#[test]
fn dirty_images_are_repaired_on_open_as_qemu_img_repairs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["amend", "-o", "compat=0.10"][..],
        &["resize"],
        &["snapshot", "-c", "snap"],
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        killed_writer_image(&ours);
        std::fs::copy(&ours, &theirs).expect("copy");
        let run = |tool: fn(&[&str]) -> Output, path: &Path| {
            let size: &[&str] = if args[0] == "resize" { &["+1M"] } else { &[] };
            tool(&[args, &[p(path)], size].concat())
        };
        let (a, b) = (run(qcow, &ours), run(qemu_img, &theirs));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {}", stderr(&a));
        assert!(
            stderr(&b).contains("Rebuilding refcount structure"),
            "{args:?}: qemu-img repaired nothing: {}",
            stderr(&b)
        );
        assert_eq!(stderr(&a), stderr(&b), "{args:?}");
        assert_eq!(stdout(&a), stdout(&b), "{args:?}");
        assert_check_clean(&ours);
        if args[0] != "snapshot" {
            // A snapshot's date differs; the rest is byte for byte.
            assert!(
                std::fs::read(&ours).expect("read") == std::fs::read(&theirs).expect("read"),
                "{args:?}: the files differ"
            );
        }
    }
}
