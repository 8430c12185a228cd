//! `qcow` invoked as `qemu-img` (through a link of that name, as a drop-in
//! installs it): messages start with the name it was invoked by, and the
//! messages scripts match on read as qemu-img's.

use std::process::Command;

use super::qemu_img;

#[test]
fn messages_carry_the_invoked_name_and_qemu_img_wording() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qcow"), &link).expect("symlink");
    let missing = dir.path().join("nothere.qcow2");
    let missing = missing.to_str().expect("utf-8");
    let ours = Command::new(&link)
        .args(["info", missing])
        .output()
        .expect("run through the link");
    let theirs = qemu_img(&["info", missing]);
    assert_eq!(ours.status.code(), theirs.status.code());
    let ours_err = String::from_utf8_lossy(&ours.stderr);
    let expected = format!("qemu-img: Could not open '{missing}': ");
    assert!(ours_err.starts_with(&expected), "{ours_err}");
    assert!(
        ours_err.trim_end().ends_with("No such file or directory"),
        "{ours_err}"
    );
    assert!(String::from_utf8_lossy(&theirs.stderr).starts_with(&expected));
    // Usage errors name it too, and exit 1.
    let usage = Command::new(&link)
        .args(["info", "--bogus"])
        .output()
        .expect("run through the link");
    assert_eq!(usage.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("qemu-img info"));
}

#[test]
fn json_names_and_image_opts_open_what_qemu_img_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("j.qcow2");
    let path = img.to_str().expect("utf-8");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", path, "4M"])
            .status
            .success()
    );
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 3 0 1M", path])
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success());
    let json =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{path}"}}}}"#);
    let opts = format!("driver=qcow2,file.filename={path}");
    let raw = format!("driver=file,filename={path}");
    for args in [
        vec!["info", json.as_str()],
        vec!["info", "--output=json", json.as_str()],
        vec!["map", "--output=json", json.as_str()],
        vec!["check", json.as_str()],
        vec!["check", "--output=json", json.as_str()],
        vec!["info", "--image-opts", opts.as_str()],
        vec!["map", "--image-opts", opts.as_str()],
        vec!["check", "--image-opts", opts.as_str()],
        vec!["measure", "-O", "qcow2", "--image-opts", opts.as_str()],
        vec!["compare", "--image-opts", opts.as_str(), opts.as_str()],
        vec!["map", "--image-opts", raw.as_str()],
        vec!["info", "--object", "secret,id=sec0,data=123456", path],
    ] {
        let (a, b) = (super::qcow(&args), qemu_img(&args));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {a:?}");
        assert_eq!(super::stdout(&a), super::stdout(&b), "{args:?}");
    }
    for args in [
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=x,bogus=1",
        ],
        vec![
            "info",
            r#"json:{"driver":"vmdk","file":{"driver":"file","filename":"x"}}"#,
        ],
        vec!["info", "--image-opts", "-f", "qcow2", opts.as_str()],
    ] {
        let (a, b) = (super::qcow(&args), qemu_img(&args));
        assert_eq!(a.status.code(), Some(1), "{args:?}");
        assert_eq!(b.status.code(), Some(1), "{args:?}");
    }
    // A convert from a JSON name reads the same disk.
    let out = dir.path().join("out.raw");
    let a = super::qcow(&[
        "convert",
        "-O",
        "raw",
        json.as_str(),
        out.to_str().expect("utf-8"),
    ]);
    assert!(a.status.success(), "{a:?}");
    let cmp = qemu_img(&["compare", path, out.to_str().expect("utf-8")]);
    assert!(cmp.status.success());
}

/// iotest 061: an image whose header names a data file that is not there
/// opens with `data-file.filename` given in `--image-opts` (no driver: the
/// format is probed), reads through it, and `amend -o data_file=` through
/// it clears the name, as with qemu-img.
#[test]
fn a_data_file_given_with_the_name_replaces_the_one_the_image_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_both = |args: &[&str]| {
        let (a, b) = (super::qcow(args), qemu_img(args));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {a:?} {b:?}");
        assert_eq!(super::stdout(&a), super::stdout(&b), "{args:?}");
    };
    let mut images = Vec::new();
    for who in ["ours", "theirs"] {
        let img = dir.path().join(format!("{who}.qcow2"));
        let data = dir.path().join(format!("{who}.data"));
        let (img_s, data_s) = (img.to_str().expect("utf-8"), data.to_str().expect("utf-8"));
        let opt = format!("data_file={data_s}");
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, img_s, "4M"])
                .status
                .success()
        );
        let io = Command::new("qemu-io")
            .args(["-c", "write -P 5 0 1M", img_s])
            .output()
            .expect("qemu-io is required");
        assert!(io.status.success());
        assert!(
            qemu_img(&["amend", "-o", "data_file=foo", img_s])
                .status
                .success()
        );
        images.push((img, data));
    }
    let tool = |who: usize| if who == 0 { super::qcow } else { qemu_img };
    for (who, (img, data)) in images.iter().enumerate() {
        let opts = format!(
            "data-file.filename={},file.filename={}",
            data.display(),
            img.display()
        );
        // Reads through the data file given.
        let out = dir.path().join(format!("out{who}.raw"));
        let conv = tool(who)(&[
            "convert",
            "-O",
            "raw",
            "--image-opts",
            &opts,
            out.to_str().expect("utf-8"),
        ]);
        assert!(conv.status.success(), "{conv:?}");
        let bytes = std::fs::read(&out).expect("read");
        assert!(
            bytes[..1 << 20].iter().all(|&b| b == 5) && bytes[1 << 20..].iter().all(|&b| b == 0)
        );
        let amend = tool(who)(&["amend", "-o", "data_file=", "--image-opts", &opts]);
        assert!(amend.status.success(), "{amend:?}");
    }
    let (ours, theirs) = (&images[0], &images[1]);
    assert!(
        std::fs::read(&ours.0).expect("read") == std::fs::read(&theirs.0).expect("read"),
        "the amended images differ"
    );
    let opts = format!(
        "data-file.filename={},file.filename={}",
        ours.1.display(),
        ours.0.display()
    );
    run_both(&["info", "--image-opts", &opts]);
    run_both(&["map", "--output=json", "--image-opts", &opts]);
    // A data file given for an image without one is refused.
    let plain = dir.path().join("plain.qcow2");
    let plain_s = plain.to_str().expect("utf-8");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", plain_s, "1M"])
            .status
            .success()
    );
    let wrong = format!(
        "data-file.filename={},file.filename={plain_s}",
        ours.1.display()
    );
    let (a, b) = (
        super::qcow(&["map", "--image-opts", &wrong]),
        qemu_img(&["map", "--image-opts", &wrong]),
    );
    assert_eq!((a.status.code(), b.status.code()), (Some(1), Some(1)));
    assert!(
        super::stderr(&a)
            .contains("'data-file' can only be set for images with an external data file"),
        "{a:?}"
    );
}

#[test]
fn create_without_a_format_makes_what_the_invoked_name_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qcow"), &link).expect("symlink");
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    let a = Command::new(&link)
        .args(["create", ours.to_str().expect("utf-8"), "1M"])
        .output()
        .expect("run through the link");
    let b = qemu_img(&["create", theirs.to_str().expect("utf-8"), "1M"]);
    assert!(a.status.success() && b.status.success());
    assert_eq!(
        super::stdout(&a).replace("ours", "X"),
        super::stdout(&b).replace("theirs", "X")
    );
    assert_eq!(std::fs::metadata(&ours).expect("ours").len(), 1 << 20);
    // As qcow, the default stays qcow2.
    let q = dir.path().join("q.img");
    let c = super::qcow(&["create", q.to_str().expect("utf-8"), "1M"]);
    assert!(super::stdout(&c).contains("fmt=qcow2"), "{c:?}");
}

/// Headers qemu-img refuses to open (after QEMU's iotests 036, 054 and
/// 080): `qcow info` fails with qemu-img's exit code and, word for word,
/// its message (the program's name aside).
#[test]
fn refused_headers_are_reported_in_qemu_img_s_words() {
    use qcow::format::header::field;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.qcow2");
    let name = path.to_str().expect("utf-8");
    let put = |bytes: &mut Vec<u8>, at: u64, value: &[u8]| {
        let at = at as usize;
        bytes[at..at + value.len()].copy_from_slice(value);
    };
    // A feature name table (header extension 0x6803f857) at the first
    // extension's place, `entries` bytes long, then the end marker.
    let table = |bytes: &mut Vec<u8>, entries: &[u8]| {
        let at = 104;
        let mut ext = 0x6803_f857u32.to_be_bytes().to_vec();
        ext.extend((entries.len() as u32).to_be_bytes());
        ext.extend(entries);
        ext.resize(8 + entries.len().next_multiple_of(8) + 8, 0);
        bytes[at..at + ext.len()].copy_from_slice(&ext);
    };
    let entry = |kind: u8, bit: u8, name: &str| {
        let mut e = vec![kind, bit];
        e.extend(name.as_bytes());
        e.resize(48, 0);
        e
    };
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Damage)> = vec![
        ("magic", Box::new(move |b| put(b, 0, b"QFI\0"))),
        ("version", Box::new(move |b| put(b, 4, &4u32.to_be_bytes()))),
        (
            "refcount order",
            Box::new(move |b| put(b, 96, &7u32.to_be_bytes())),
        ),
        (
            "l1 size",
            Box::new(move |b| put(b, field::L1_SIZE, &0u32.to_be_bytes())),
        ),
        (
            "size",
            Box::new(move |b| put(b, 24, &(1u64 << 60).to_be_bytes())),
        ),
        (
            "unknown feature, no table",
            Box::new(move |b| {
                put(b, 72, &(1u64 << 63).to_be_bytes());
                table(b, &[]);
            }),
        ),
        (
            "unknown feature, a short table entry",
            Box::new(move |b| {
                put(b, 72, &(1u64 << 63).to_be_bytes());
                table(b, b"\x00\x3fTest feature");
            }),
        ),
        (
            "unknown features, some named",
            Box::new(move |b| {
                put(b, 72, &(7u64 << 61).to_be_bytes());
                let mut entries = entry(1, 61, "test1");
                entries.extend(entry(0, 62, "test2"));
                entries.extend(entry(2, 63, "test3"));
                entries.extend(entry(0, 60, "test4"));
                table(b, &entries);
            }),
        ),
    ];
    for (what, damage) in &damages {
        let out = super::qemu_img(&["create", "-q", "-f", "qcow2", name, "64M"]);
        assert!(out.status.success(), "{}", super::stderr(&out));
        let mut bytes = std::fs::read(&path).expect("read");
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let ours = super::qcow(&["info", "-f", "qcow2", name]);
        let theirs = qemu_img(&["info", "-f", "qcow2", name]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{what}");
        assert_eq!(
            super::stderr(&ours).replacen("qcow", "qemu-img", 1),
            super::stderr(&theirs),
            "{what}: qcow's message, then qemu-img's"
        );
    }
}

/// `create -o` values qemu-img accepts or refuses (iotest 243's
/// `extent_size_hint` among them): the same exit code, Formatting line and
/// message, in the same order.
#[test]
fn create_options_are_taken_and_refused_as_qemu_img_takes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str); 12] = [
        ("qcow2", "extent_size_hint=0"),
        (
            "qcow2",
            "preallocation=metadata,extent_size_hint=1M,compat=0.10",
        ),
        ("qcow2", "extent_size_hint=5G"),
        ("qcow2", "extent_size_hint=abc"),
        ("qcow2", "compat=9"),
        ("qcow2", "bogus=1"),
        ("qcow2", "cluster_size=abc"),
        ("qcow2", "lazy_refcounts=maybe"),
        ("qcow2", "size=abc"),
        ("raw", "preallocation=falloc,extent_size_hint=1M"),
        ("raw", "extent_size_hint=5G"),
        ("raw", "bogus=1"),
    ];
    for (format, options) in cases {
        let run = |tool: &str| {
            let path = dir.path().join(format!("{tool}.img"));
            let _ = std::fs::remove_file(&path);
            let args = ["create", "-f", format, "-o", options, super::p(&path), "1M"];
            let out = if tool == "qcow" {
                super::qcow(&args)
            } else {
                qemu_img(&args)
            };
            let text = |bytes: &[u8]| {
                String::from_utf8_lossy(bytes)
                    .replace(super::p(&path), "IMAGE")
                    .replacen("qcow:", "qemu-img:", 1)
            };
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        };
        assert_eq!(run("qcow"), run("qemu-img"), "-f {format} -o {options}");
    }
}

/// `create` makes, byte for byte, the file qemu-img makes (the file ends
/// with the L1 table's last entry; no feature name table with clusters of
/// 4 KiB and smaller, as iotest 243 sees in the file's length).
#[test]
fn created_images_are_byte_for_byte_qemu_img_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str); 9] = [
        ("", "64M"),
        ("", "1T"),
        ("cluster_size=512", "100M"),
        ("refcount_bits=1,cluster_size=4k", "1G"),
        ("cluster_size=4k,compat=0.10", "1G"),
        ("compat=0.10", "5G"),
        ("extended_l2=on", "3G"),
        ("cluster_size=2M", "2T"),
        ("preallocation=off,cluster_size=8k,lazy_refcounts=on", "1G"),
    ];
    for (options, size) in cases {
        let bytes = |tool: &str| {
            let path = dir.path().join(format!("{tool}.qcow2"));
            let _ = std::fs::remove_file(&path);
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            args.extend([super::p(&path), size]);
            let out = if tool == "qcow" {
                super::qcow(&args)
            } else {
                qemu_img(&args)
            };
            assert!(out.status.success(), "{tool} {args:?}");
            std::fs::read(&path).expect("read")
        };
        let (ours, theirs) = (bytes("qcow"), bytes("qemu-img"));
        assert!(
            ours == theirs,
            "-o {options} {size}: {} bytes, qemu-img's {}",
            ours.len(),
            theirs.len()
        );
    }
}

/// A `file:` prefix names the file protocol explicitly, colons in the rest
/// being part of the name (QEMU's iotest 126): `create` and `info` take and
/// show such names as qemu-img does.
#[test]
fn file_protocol_prefixes_name_files_with_colons_as_qemu_img() {
    let mut outputs = Vec::new();
    for tool in ["qcow", "qemu-img"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &[&str]| {
            let program = if tool == "qcow" {
                env!("CARGO_BIN_EXE_qcow")
            } else {
                "qemu-img"
            };
            let out = Command::new(program)
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run");
            assert!(out.status.success(), "{tool} {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let absolute = format!("file:{}/a:b.qcow2", dir.path().display());
        let mut text = run(&["create", "-f", "qcow2", &absolute, "64M"]);
        assert!(dir.path().join("a:b.qcow2").is_file(), "{tool}");
        run(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "file:image:top.qcow2",
        ]);
        text += &run(&["info", "file:image:top.qcow2"]);
        outputs.push(
            text.lines()
                .filter(|l| !l.trim_start().starts_with("disk size"))
                .map(|l| l.replace(&dir.path().display().to_string(), "DIR"))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(outputs[0], outputs[1]);
}
