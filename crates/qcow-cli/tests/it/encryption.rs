//! Encrypted images at the command line, beside qemu-img: `info` without
//! the password, `convert`, `map`, `compare` and `check` with it (a secret
//! `--object` and `encrypt.key-secret` in `--image-opts` or a `json:`
//! name), and a wrong or missing password refused as qemu-img refuses it.

use std::path::Path;
use std::process::Command;

use super::{p, qcow, qemu_img, stderr, stdout};

pub(super) const SECRET: &str = "secret,id=sec0,data=hunter2";

/// `--image-opts` naming `image` and the secret.
pub(super) fn opts(image: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p(image)
    )
}

/// An image qemu-img encrypts with `options`, written by qemu-io.
fn make(dir: &Path, name: &str, options: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let writes = [
        "write -P 0x3c 0 1M",
        "write -P 0x4d 3000000 70000",
        "write -z 5M 1M",
    ];
    encrypted(&path, options, "8M", &writes);
    path
}

/// An image of `size` that qemu-img encrypts with `options` (and the
/// secret), written by qemu-io with `writes`.
pub(super) fn encrypted(path: &Path, options: &str, size: &str, writes: &[&str]) {
    let created = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        &format!("{options},encrypt.key-secret=sec0"),
        p(path),
        size,
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let mut io = Command::new("qemu-io");
    io.args(["--object", SECRET, "--image-opts", &opts(path)]);
    for write in writes {
        io.args(["-c", write]);
    }
    let out = io.output().expect("qemu-io is required");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn info_shows_the_encryption_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    for (i, options) in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "encrypt.format=aes",
        "encrypt.format=aes,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let path = make(dir.path(), &format!("e{i}.qcow2"), options);
        for output in ["human", "json"] {
            let flag = format!("--output={output}");
            let ours = qcow(&["info", &flag, p(&path)]);
            let theirs = qemu_img(&["info", &flag, p(&path)]);
            assert!(ours.status.success(), "{options}: {}", stderr(&ours));
            assert_eq!(stdout(&ours), stdout(&theirs), "{options} ({output})");
        }
    }
}

#[test]
fn convert_map_compare_and_check_with_the_password_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let ours_raw = dir.path().join("ours.raw");
    let theirs_raw = dir.path().join("theirs.raw");
    let image_opts = opts(&path);
    let convert = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
        tool(&[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &image_opts,
            "-O",
            "raw",
            p(out),
        ])
    };
    let ours = convert(qcow, &ours_raw);
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(convert(qemu_img, &theirs_raw).status.success());
    assert!(std::fs::read(&ours_raw).unwrap() == std::fs::read(&theirs_raw).unwrap());
    // A json: name with the secret, as scripts pass it.
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"encrypt":{{"key-secret":"sec0"}}}}"#,
        p(&path)
    );
    for args in [
        vec![
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            image_opts.as_str(),
        ],
        vec!["map", "--object", SECRET, json.as_str()],
    ] {
        // The human map fails on encrypted data in both, as in qemu-img.
        let ours = qcow(&args);
        let theirs = qemu_img(&args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
        let words =
            |o: &std::process::Output| stderr(o).split_once(": ").map(|(_, w)| w.to_owned());
        assert_eq!(words(&ours), words(&theirs), "{args:?}");
    }
    let compare = qcow(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &image_opts,
        &format!("driver=raw,file.filename={}", p(&theirs_raw)),
    ]);
    assert_eq!(compare.status.code(), Some(0), "{}", stderr(&compare));
    assert_eq!(stdout(&compare), "Images are identical.\n");
    // check counts the LUKS header's clusters; a repair keeps them.
    for args in [
        vec!["check", p(&path)],
        vec!["check", "-r", "all", p(&path)],
    ] {
        let ours = qcow(&args);
        assert_eq!(ours.status.code(), Some(0), "{args:?}: {}", stdout(&ours));
        assert!(stdout(&ours).contains("No errors were found on the image."));
    }
    let theirs = qemu_img(&["check", "--object", SECRET, "--image-opts", &image_opts]);
    assert!(theirs.status.success(), "{}", stdout(&theirs));
    assert!(convert(qemu_img, &theirs_raw).status.success());
    assert!(std::fs::read(&ours_raw).unwrap() == std::fs::read(&theirs_raw).unwrap());
}

#[test]
fn a_wrong_or_missing_password_fails_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = make(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let out = dir.path().join("out.raw");
    let wrong = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=bad",
        p(&path)
    );
    for (objects, name, words) in [
        (
            vec!["--object", "secret,id=bad,data=nope"],
            wrong.as_str(),
            "Invalid password, cannot unlock any keyslot",
        ),
        (vec![], wrong.as_str(), "No secret with id 'bad'"),
        (
            vec![],
            p(&path),
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
    ] {
        let mut args = vec!["convert"];
        args.extend(&objects);
        if name.starts_with("driver=") {
            args.push("--image-opts");
        }
        args.extend([name, "-O", "raw", p(&out)]);
        let ours = qcow(&args);
        let theirs = qemu_img(&args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(ours.status.code(), Some(1));
        assert!(stderr(&ours).contains(words), "{args:?}: {}", stderr(&ours));
        assert!(stderr(&theirs).contains(words), "{}", stderr(&theirs));
        assert!(!out.exists(), "{args:?} left an output behind");
    }
}

/// `create` with every kind of encryption option: the Formatting line and
/// the errors are qemu-img's; the image is laid out as qemu-img's (its
/// header cluster byte for byte, the LUKS header where qemu-img puts it;
/// a legacy AES image byte for byte), QEMU unlocks it with the password,
/// writes and reads it, and qemu-img check finds it clean.
#[test]
fn create_encrypts_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    for options in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.iter-time=10,encrypt.hash-alg=sha1,encrypt.ivgen-alg=essiv,encrypt.cipher-mode=cbc,encrypt.cipher-alg=aes-128,encrypt.key-secret=sec0,encrypt.format=luks,cluster_size=4k",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,compat=0.10",
        "encryption=on,encrypt.key-secret=sec0",
        "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=2M",
        // Refused after the Formatting line, nothing left behind.
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
    ] {
        let run = |tool: fn(&[&str]) -> std::process::Output, path: &Path| {
            let _ = std::fs::remove_file(path);
            let out = tool(&[
                "create",
                "-f",
                "qcow2",
                "--object",
                SECRET,
                "-o",
                options,
                p(path),
                "1G",
            ]);
            let text = format!("{}{}", stdout(&out), stderr(&out))
                .replace(p(path), "IMAGE")
                .replace("qemu-img: ", "")
                .replace("qcow: ", "");
            (out.status.code(), text)
        };
        assert_eq!(run(qcow, &ours), run(qemu_img, &theirs), "{options}");
        if !theirs.exists() {
            assert!(!ours.exists(), "{options}: a refused image was left behind");
            continue;
        }
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert_eq!(a.len(), b.len(), "{options}: file length");
        if options.contains("luks") {
            // Only the LUKS header's random parts differ.
            assert_eq!(a[..512], b[..512], "{options}: header");
        } else {
            assert!(a == b, "{options}: not byte for byte qemu-img's");
        }
        let io = Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &opts(&ours)])
            .args([
                "-c",
                "write -P 0x61 65000 200000",
                "-c",
                "read -P 0x61 65000 200000",
            ])
            .output()
            .expect("qemu-io is required");
        assert!(io.status.success(), "{options}: {}", stderr(&io));
        let check = qemu_img(&["check", "--object", SECRET, "--image-opts", &opts(&ours)]);
        assert!(check.status.success(), "{options}: {}", stdout(&check));
        let info = |path: &Path| {
            stdout(&qemu_img(&["info", p(path)]))
                .lines()
                .filter(|l| !l.contains("uuid") && !l.contains("iters") && !l.contains(".qcow2"))
                .filter(|l| !l.contains("disk size"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        qemu_io_write_same(&theirs);
        assert_eq!(info(&ours), info(&theirs), "{options}");
    }
}

/// The write `create_encrypts_as_qemu_img_does` makes, on qemu-img's
/// image, so that both are compared in the same state.
fn qemu_io_write_same(path: &Path) {
    let io = Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &opts(path)])
        .args(["-c", "write -P 0x61 65000 200000"])
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success(), "{}", stderr(&io));
}

/// `convert` into an encrypted image (with preallocated metadata, whose
/// clusters would read as decrypted zeros: the zeros are written too, as
/// qemu-img writes them), then compared, checked and mapped beside
/// qemu-img's output (iotest 188's last step).
#[test]
fn convert_into_an_encrypted_image_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let source = make(
        dir.path(),
        "src.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let plain = dir.path().join("plain.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&plain), "8M"])
            .status
            .success()
    );
    for (input, extra) in [
        (opts(&source), vec!["--image-opts"]),
        (p(&plain).to_owned(), vec![]),
    ] {
        for options in [
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation=metadata",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4k",
            "encrypt.format=aes,encrypt.key-secret=sec0",
        ] {
            let ours = dir.path().join("ours.qcow2");
            let theirs = dir.path().join("theirs.qcow2");
            let convert = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
                let mut args = vec!["convert", "-O", "qcow2", "--object", SECRET];
                args.extend(&extra);
                args.extend(["-o", options, input.as_str(), p(out)]);
                tool(&args)
            };
            let o = convert(qcow, &ours);
            assert!(o.status.success(), "{options}: {}", stderr(&o));
            assert!(convert(qemu_img, &theirs).status.success());
            let ours_spec = opts(&ours);
            let theirs_spec = opts(&theirs);
            let compare = qemu_img(&[
                "compare",
                "--object",
                SECRET,
                "--image-opts",
                &ours_spec,
                &theirs_spec,
            ]);
            assert!(compare.status.success(), "{options}: {}", stdout(&compare));
            let check = qemu_img(&["check", "--object", SECRET, "--image-opts", &ours_spec]);
            assert!(check.status.success(), "{options}: {}", stdout(&check));
            let map = |spec: &str| {
                stdout(&qemu_img(&[
                    "map",
                    "--output=json",
                    "--object",
                    SECRET,
                    "--image-opts",
                    spec,
                ]))
            };
            assert_eq!(map(&ours_spec), map(&theirs_spec), "{options}");
        }
    }
}

/// A chain of two images encrypted with different passwords (iotests 189
/// and 198): the overlay is created over the encrypted base without the
/// base's password (only its size is read), both are opened with
/// `backing.encrypt.key-secret`, and `commit` writes the overlay's data
/// into the base, which QEMU then reads back.
#[test]
fn a_chain_with_two_passwords_is_read_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let s0 = "secret,id=sec0,data=astrochicken";
    let s1 = "secret,id=sec1,data=furby";
    let made = qcow(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        s0,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        p(&base),
        "8M",
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let base_spec = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p(&base)
    );
    let io = |objects: &[&str], spec: &str, command: &str| {
        let mut cmd = Command::new("qemu-io");
        for o in objects {
            cmd.args(["--object", o]);
        }
        let out = cmd
            .args(["-c", command, "--image-opts", spec])
            .output()
            .expect("qemu-io is required");
        assert!(out.status.success(), "{command}: {}", stderr(&out));
        stdout(&out)
    };
    io(&[s0], &base_spec, "write -P 0xa 0 8M");
    let made = qcow(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        s1,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec1,encrypt.iter-time=10",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&top),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let spec = format!(
        "driver=qcow2,file.filename={},backing.driver=qcow2,backing.file.filename={},backing.encrypt.key-secret=sec0,encrypt.key-secret=sec1",
        p(&top),
        p(&base)
    );
    io(&[s0, s1], &spec, "write -P 0xe 0 1024");
    // qcow reads the chain as QEMU does.
    let ours = dir.path().join("ours.raw");
    let converted = qcow(&[
        "convert",
        "--object",
        s0,
        "--object",
        s1,
        "--image-opts",
        &spec,
        "-O",
        "raw",
        p(&ours),
    ]);
    assert!(converted.status.success(), "{}", stderr(&converted));
    let data = std::fs::read(&ours).unwrap();
    assert!(data[..1024].iter().all(|&b| b == 0xe));
    assert!(data[1024..].iter().all(|&b| b == 0xa));
    // Without the base's password the chain does not open.
    let refused = qcow(&[
        "convert",
        "--object",
        s1,
        "--image-opts",
        &format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec1",
            p(&top)
        ),
        "-O",
        "raw",
        p(&ours),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("Parameter 'encrypt.key-secret' is required"));
    let committed = qcow(&[
        "commit",
        "--object",
        s0,
        "--object",
        s1,
        "--image-opts",
        &spec,
    ]);
    assert!(committed.status.success(), "{}", stderr(&committed));
    assert_eq!(stdout(&committed), "Image committed.\n");
    let read = io(&[s0], &base_spec, "read -P 0xe 0 1024");
    assert!(read.contains("read 1024/1024"), "{read}");
    io(&[s0], &base_spec, "read -P 0xa 1024 64512");
    let check = qemu_img(&["check", "--object", s0, "--image-opts", &base_spec]);
    assert!(check.status.success(), "{}", stdout(&check));
}

/// qemu-img's `luks` format (a LUKS volume): `create -f luks` prints and
/// refuses as qemu-img does, `info` shows what qemu-img shows, what QEMU
/// writes reads back in qcow, and `convert -O luks` makes a volume QEMU
/// reads, laid out as qemu-img's.
#[test]
fn luks_volumes_are_made_read_and_written_as_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.luks");
    let theirs = dir.path().join("theirs.luks");
    for options in [
        "key-secret=sec0,iter-time=10",
        "iter-time=10,hash-alg=sha1,ivgen-alg=essiv,cipher-mode=cbc,cipher-alg=aes-128,key-secret=sec0",
        "iter-time=10",
        "key-secret=sec0,cluster_size=4k",
    ] {
        let run = |tool: fn(&[&str]) -> std::process::Output, path: &Path| {
            let _ = std::fs::remove_file(path);
            let out = tool(&[
                "create",
                "-f",
                "luks",
                "--object",
                SECRET,
                "-o",
                options,
                p(path),
                "3M",
            ]);
            let text = format!("{}{}", stdout(&out), stderr(&out))
                .replace(p(path), "IMAGE")
                .replace("qemu-img: ", "")
                .replace("qcow: ", "");
            (out.status.code(), text)
        };
        assert_eq!(run(qcow, &ours), run(qemu_img, &theirs), "{options}");
        if !theirs.exists() {
            assert!(!ours.exists());
            continue;
        }
        assert_eq!(
            std::fs::metadata(&ours).unwrap().len(),
            std::fs::metadata(&theirs).unwrap().len()
        );
        let strip = |o: std::process::Output| {
            stdout(&o)
                .lines()
                .filter(|l| !l.contains("uuid") && !l.contains("iters") && !l.contains(".luks"))
                .filter(|l| !l.contains("actual-size") && !l.contains("disk size"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        for output in ["--output=human", "--output=json"] {
            assert_eq!(
                strip(qcow(&["info", output, p(&ours)])),
                strip(qemu_img(&["info", output, p(&theirs)])),
                "{options}"
            );
        }
        let spec = format!("driver=luks,file.filename={},key-secret=sec0", p(&ours));
        let io = Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &spec])
            .args(["-c", "write -P 0x21 1000 300000", "-c", "write -z 2M 4096"])
            .output()
            .expect("qemu-io is required");
        assert!(io.status.success(), "{}", stderr(&io));
        let read = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
            let o = tool(&[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                "-O",
                "raw",
                p(out),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            std::fs::read(out).unwrap()
        };
        let a = read(qcow, &dir.path().join("a.raw"));
        assert!(a == read(qemu_img, &dir.path().join("b.raw")), "{options}");
        // Without the password: refused as qemu-img refuses it.
        let check = qcow(&["check", p(&ours)]);
        assert_eq!(
            check.status.code(),
            qemu_img(&["check", p(&ours)]).status.code()
        );
        assert!(stderr(&check).contains("Parameter 'key-secret' is required for cipher"));
    }
    // convert -O luks: QEMU reads the copy; the file is laid out as
    // qemu-img lays out its own.
    let source = dir.path().join("src.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&source), "4M"])
            .status
            .success()
    );
    super::qemu_io(&source, &["write -P 5 1000 300000", "write -P 6 3M 100k"]);
    for (tool, out) in [(qcow as fn(&[&str]) -> _, &ours), (qemu_img, &theirs)] {
        let _ = std::fs::remove_file(out);
        let o = tool(&[
            "convert",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&source),
            p(out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let spec = format!("driver=luks,file.filename={},key-secret=sec0", p(&ours));
    let compare = qemu_img(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &spec,
        &format!("driver=qcow2,file.filename={}", p(&source)),
    ]);
    assert!(compare.status.success(), "{}", stdout(&compare));
    let map = |path: &Path| stdout(&qemu_img(&["map", "--output=json", "-f", "raw", p(path)]));
    assert_eq!(map(&ours), map(&theirs));
}

/// Key slots changed by `amend` (iotest 293's steps, both formats): QEMU
/// opens the image with exactly the passwords the slots hold afterwards,
/// and the refusals read as qemu-img's.
#[test]
fn amend_adds_and_erases_key_slots_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let secrets: Vec<String> = (0..5)
        .map(|i| format!("secret,id=sec{i},data=hunter{i}"))
        .collect();
    for (format, prefix) in [("qcow2", "encrypt."), ("luks", "")] {
        let path = dir.path().join(format!("slots.{format}"));
        let mut create = vec!["create", "-q", "-f", format, "--object", &secrets[0]];
        let options = if format == "qcow2" {
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_owned()
        } else {
            "key-secret=sec0,iter-time=10".to_owned()
        };
        create.extend(["-o", options.as_str(), p(&path), "4M"]);
        let made = qcow(&create);
        assert!(made.status.success(), "{}", stderr(&made));
        let spec = |id: usize| {
            format!(
                "driver={format},file.filename={},{prefix}key-secret=sec{id}",
                p(&path)
            )
        };
        let amend = |id: usize, options: &str, force: bool| {
            let mut args = vec!["amend".to_owned()];
            for s in &secrets {
                args.extend(["--object".to_owned(), s.clone()]);
            }
            args.extend(["--image-opts".to_owned(), spec(id), "-o".to_owned()]);
            args.push(options.replace("P.", prefix));
            if force {
                args.push("--force".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = qcow(&args);
            (out.status.code(), stderr(&out))
        };
        let opens = |id: usize| {
            let mut cmd = Command::new("qemu-io");
            for s in &secrets {
                cmd.args(["--object", s]);
            }
            cmd.args(["-c", "read 0 4096", "--image-opts", &spec(id)])
                .output()
                .expect("qemu-io is required")
                .status
                .success()
        };
        let ok = (Some(0), String::new());
        assert_eq!(
            amend(
                0,
                "P.state=active,P.new-secret=sec4,P.iter-time=10,P.keyslot=4",
                false
            ),
            ok
        );
        assert_eq!(
            amend(0, "P.state=active,P.new-secret=sec1,P.iter-time=10", false),
            ok
        );
        assert_eq!(
            amend(1, "P.state=active,P.new-secret=sec2,P.iter-time=10", false),
            ok
        );
        assert!((0..5).filter(|&i| i != 3).all(opens), "{format}");
        assert!(!opens(3));
        assert_eq!(amend(1, "P.state=inactive,P.keyslot=4", false), ok);
        assert_eq!(amend(1, "P.state=inactive,P.old-secret=sec0", false), ok);
        assert!(!opens(0) && !opens(4) && opens(1) && opens(2), "{format}");
        let refused = |(code, text): (Option<i32>, String), words: &str| {
            assert_eq!(code, Some(1), "{words}");
            assert!(text.starts_with("qcow: ") && text.contains(words), "{text}");
        };
        refused(
            amend(1, "P.state=active,P.new-secret=sec3,P.keyslot=1", false),
            "Refusing to overwrite active keyslot 1 - please erase it first",
        );
        assert_eq!(amend(2, "P.state=inactive,P.old-secret=sec2", false), ok);
        refused(
            amend(1, "P.state=inactive,P.old-secret=sec1", false),
            "All the active keyslots match the (old) password",
        );
        refused(
            amend(1, "P.state=inactive,P.keyslot=1", false),
            "Attempt to erase the only active keyslot 1",
        );
        refused(
            amend(1, "P.state=inactive,P.old-secret=sec3", true),
            "No keyslots match given (old) password for erase operation",
        );
        assert!(opens(1) && !opens(2));
        // The other format's spelling of the options is refused, as
        // qemu-img refuses it.
        let other = if prefix.is_empty() { "encrypt." } else { "" };
        let spelled = amend(1, &format!("{other}state=inactive,{other}keyslot=3"), true);
        assert_eq!(spelled.0, Some(1), "{format}");
        assert!(spelled.1.contains("Invalid parameter"), "{}", spelled.1);
        // With --force the last slot goes, and nothing opens the image.
        assert_eq!(amend(1, "P.state=inactive,P.keyslot=1", true), ok);
        assert!((0..5).all(|i| !opens(i)), "{format}");
    }
}

/// `measure` counts a LUKS header's clusters as qemu-img does, needs the
/// secret as qemu-img does, and refuses AES-192 outside XTS mode (whose
/// key material does not fill whole sectors: qemu-img aborts on it).
#[test]
fn measure_counts_the_luks_header_as_qemu_img_does() {
    for options in [
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,cluster_size=2M",
        "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=512,preallocation=full",
        "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=4k",
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
    ] {
        // qemu-img calibrates PBKDF2 for every LUKS measure (seconds): JSON
        // once.
        let outputs: &[&str] = if options.ends_with("sec0") {
            &["--output=human", "--output=json"]
        } else {
            &["--output=human"]
        };
        for &output in outputs {
            let args = [
                "measure", output, "--object", SECRET, "-O", "qcow2", "-o", options, "--size", "1G",
            ];
            let (ours, theirs) = (qcow(&args), qemu_img(&args));
            assert_eq!(ours.status.code(), theirs.status.code(), "{options}");
            assert_eq!(stdout(&ours), stdout(&theirs), "{options}");
            assert_eq!(
                stderr(&ours).replace("qcow: ", ""),
                stderr(&theirs).replace("qemu-img: ", ""),
                "{options}"
            );
        }
    }
    let refused = qcow(&[
        "measure",
        "--object",
        SECRET,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc",
        "--size",
        "1G",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("does not fill whole sectors"));
}

/// `convert -n --target-image-opts` writes into an existing encrypted
/// image named with its secret (and refuses the flag without -n, as
/// qemu-img does).
#[test]
fn convert_into_an_existing_encrypted_target_named_by_options() {
    let dir = tempfile::tempdir().unwrap();
    let target = make(
        dir.path(),
        "t.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let source = dir.path().join("s.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&source), "8M"])
            .status
            .success()
    );
    super::qemu_io(&source, &["write -P 3 0 1M", "write -P 4 5M 64k"]);
    let spec = opts(&target);
    let args = [
        "convert",
        "-n",
        "--object",
        SECRET,
        "--target-image-opts",
        p(&source),
        spec.as_str(),
    ];
    let ours = qcow(&args);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let compare = qemu_img(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &format!("driver=qcow2,file.filename={}", p(&source)),
        &spec,
    ]);
    assert!(compare.status.success(), "{}", stdout(&compare));
    let without_n = [
        "convert",
        "--object",
        SECRET,
        "--target-image-opts",
        p(&source),
        spec.as_str(),
    ];
    let (ours, theirs) = (qcow(&without_n), qemu_img(&without_n));
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        stderr(&ours).replace("qcow: ", ""),
        stderr(&theirs).replace("qemu-img: ", "")
    );
}

/// qcow version 1 images with AES encryption: created and converted byte
/// for byte as qemu-img makes them, what QEMU writes reads back, `info`
/// as qemu-img shows it, LUKS refused as qemu-img refuses it.
#[test]
fn qcow_version_1_aes_images_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow");
    let theirs = dir.path().join("theirs.qcow");
    // The last one leaves the image the rest of the test uses.
    for options in [
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "encryption=on",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "encryption=on,encrypt.key-secret=sec0",
    ] {
        let run = |tool: fn(&[&str]) -> std::process::Output, path: &Path| {
            let _ = std::fs::remove_file(path);
            let out = tool(&[
                "create",
                "-f",
                "qcow",
                "--object",
                SECRET,
                "-o",
                options,
                p(path),
                "4M",
            ]);
            let text = format!("{}{}", stdout(&out), stderr(&out))
                .replace(p(path), "IMAGE")
                .replace("qemu-img: ", "")
                .replace("qcow: ", "");
            (out.status.code(), text)
        };
        let (code, text) = run(qcow, &ours);
        assert_eq!((code, text), run(qemu_img, &theirs), "{options}");
        if code == Some(0) {
            assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
        } else {
            // qemu-img leaves an empty file behind; qcow leaves none.
            assert!(!ours.exists(), "{options}");
        }
    }
    let spec = format!(
        "driver=qcow,file.filename={},encrypt.key-secret=sec0",
        p(&ours)
    );
    let io = Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &spec])
        .args(["-c", "write -P 5 100 5000", "-c", "write -P 6 1M 70000"])
        .output()
        .expect("qemu-io is required");
    assert!(io.status.success(), "{}", stderr(&io));
    for output in ["--output=human", "--output=json"] {
        assert_eq!(
            stdout(&qcow(&["info", output, p(&ours)])),
            stdout(&qemu_img(&["info", output, p(&ours)]))
        );
    }
    let read = |tool: fn(&[&str]) -> std::process::Output, out: &Path| {
        let o = tool(&[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &spec,
            "-O",
            "raw",
            p(out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    let plain = dir.path().join("plain.raw");
    let data = read(qcow, &plain);
    assert!(data == read(qemu_img, &dir.path().join("b.raw")));
    for (tool, out) in [(qcow as fn(&[&str]) -> _, &ours), (qemu_img, &theirs)] {
        let _ = std::fs::remove_file(out);
        let o = tool(&[
            "convert",
            "--object",
            SECRET,
            "-O",
            "qcow",
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            p(&plain),
            p(out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
}
