//! qcow as an NBD client, beside qemu-img, against qemu-nbd: exports named
//! by `nbd+unix://` URIs and by `driver=nbd` options read, map and show as
//! in qemu-img (also a metadata context other than `base:allocation`, as
//! iotest nbd-qemu-allocation reads it), and `convert` writes into them.

use std::path::Path;
use std::time::Duration;

use super::serve::Server;
use super::{p, qcow, qemu_img, qemu_io, stderr, stdout};

/// A qemu-nbd serving `image` in `format` on the Unix socket `socket`
/// (persistent, `-t`), with `extra` flags; stopped when dropped.
fn qemu_nbd(format: &str, image: &Path, socket: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["-t", "-f", format];
    args.extend(extra);
    args.extend(["-k", p(socket), p(image)]);
    Server::start("qemu-nbd", &args, Some(socket), None)
}

/// Runs `args` in both tools and asserts the same exit code and output.
fn same(args: &[&str]) -> String {
    let (ours, theirs) = (qcow(args), qemu_img(args));
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{args:?}: {}",
        stderr(&ours)
    );
    assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
    stdout(&ours)
}

#[test]
fn exports_read_and_map_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"])
            .status
            .success()
    );
    qemu_io(&base, &["write 0 2M"]);
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            "4M"
        ])
        .status
        .success()
    );
    qemu_io(&top, &["write -P 7 1M 2M", "write -z 3584k 256k"]);
    let socket = dir.path().join("s");
    let _server = qemu_nbd("qcow2", &top, &socket, &["-r", "-A"]);
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    let opts = format!("driver=nbd,server.type=unix,server.path={}", p(&socket));
    for output in ["--output=human", "--output=json"] {
        same(&["info", output, &uri]);
        same(&["info", output, "--image-opts", &opts]);
        same(&["map", output, &uri]);
    }
    same(&["map", "--output=json", "--image-opts", &opts]);
    // Another context's flags read as base:allocation's (QEMU's
    // x-dirty-bitmap): here the allocation depth.
    let depth = format!("{opts},x-dirty-bitmap=qemu:allocation-depth");
    let map = same(&["map", "--output=json", "--image-opts", &depth]);
    // Unallocated (depth 0), local (1, a hole without zeros: not present)
    // and backing (2, zeros) data, as iotest nbd-qemu-allocation reads them.
    assert!(
        map.contains("\"present\": false, \"zero\": false, \"data\": false"),
        "{map}"
    );
    assert!(map.contains("\"zero\": true, \"data\": true"), "{map}");
    // The disk as qemu-img reads it.
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    let o = qcow(&["convert", "-O", "raw", &uri, p(&ours)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        qemu_img(&["convert", "-O", "raw", &uri, p(&theirs)])
            .status
            .success()
    );
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    same(&["compare", &uri, p(&theirs)]);
    // A missing export and a missing server fail as in qemu-img.
    let missing = format!("nbd+unix:///nosuch?socket={}", p(&socket));
    let gone = format!("nbd+unix:///?socket={}", p(&dir.path().join("none")));
    for name in [&missing, &gone] {
        let (ours, theirs) = (qcow(&["info", name]), qemu_img(&["info", name]));
        assert_eq!(ours.status.code(), theirs.status.code(), "{name}");
        assert_eq!(ours.status.code(), Some(1));
    }
}

#[test]
fn convert_writes_into_an_export_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&source), "8M"])
            .status
            .success()
    );
    qemu_io(&source, &["write -P 3 1M 2M", "write -P 4 6M 64k"]);
    for (i, target_args) in [
        vec!["-O", "raw"],
        vec!["-n", "-O", "raw"],
        vec!["-n", "--target-image-opts"],
    ]
    .into_iter()
    .enumerate()
    {
        let mut maps = Vec::new();
        for tool in [qcow as fn(&[&str]) -> std::process::Output, qemu_img] {
            let target = dir.path().join(format!("t{i}.qcow2"));
            let _ = std::fs::remove_file(&target);
            assert!(
                qemu_img(&["create", "-q", "-f", "qcow2", p(&target), "8M"])
                    .status
                    .success()
            );
            let socket = dir.path().join(format!("t{i}.sock"));
            let _ = std::fs::remove_file(&socket);
            let server = qemu_nbd("qcow2", &target, &socket, &[]);
            let name = if target_args.contains(&"--target-image-opts") {
                format!("driver=nbd,server.type=unix,server.path={}", p(&socket))
            } else {
                format!("nbd+unix:///?socket={}", p(&socket))
            };
            let mut args = vec!["convert"];
            args.extend(&target_args);
            args.extend([p(&source), name.as_str()]);
            let o = tool(&args);
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            drop(server);
            let compare = qemu_img(&["compare", p(&source), p(&target)]);
            assert!(compare.status.success(), "{args:?}: {}", stdout(&compare));
            let check = qemu_img(&["check", p(&target)]);
            assert!(check.status.success(), "{}", stdout(&check));
            // What is allocated, and as what; where the server put it is
            // the server's business (it follows the order requests come).
            let map = stdout(&qemu_img(&["map", "--output=json", p(&target)]));
            let without_offsets: Vec<String> = map
                .lines()
                .map(|l| l.split(", \"offset\"").next().unwrap_or(l).to_owned())
                .collect();
            maps.push(without_offsets);
        }
        assert_eq!(maps[0], maps[1], "{target_args:?}: allocation differs");
    }
}

#[test]
fn check_bench_and_read_only_exports_answer_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let raw = dir.path().join("small.raw");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "4M"])
            .status
            .success()
    );
    assert!(
        qemu_img(&["create", "-q", "-f", "raw", p(&raw), "1M"])
            .status
            .success()
    );
    qemu_io(&image, &["write -P 9 0 1M"]);
    let socket = dir.path().join("s");
    let _server = qemu_nbd("qcow2", &image, &socket, &["-r"]);
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    // check: an export is a raw disk, which has no checks (exit 63).
    let (ours, theirs) = (qcow(&["check", &uri]), qemu_img(&["check", &uri]));
    assert_eq!(ours.status.code(), Some(63), "{}", stderr(&ours));
    assert_eq!(theirs.status.code(), Some(63));
    assert!(stderr(&ours).contains("This image format does not support checks"));
    // bench reads the export, with qemu-img's first line.
    let read = [
        "bench", "-f", "raw", "-c", "2000", "-d", "8", "-s", "4k", &uri,
    ];
    let (ours, theirs) = (qcow(&read), qemu_img(&read));
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(theirs.status.success());
    let first = |s: String| s.lines().next().unwrap_or_default().to_owned();
    assert_eq!(first(stdout(&ours)), first(stdout(&theirs)));
    // Writing into a read-only export is refused when it is opened.
    let write = ["bench", "-w", "-f", "raw", "-c", "10", &uri];
    let into = ["convert", "-n", "-O", "raw", p(&raw), &uri];
    for args in [&write[..], &into[..]] {
        let (ours, theirs) = (qcow(args), qemu_img(args));
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert_eq!(theirs.status.code(), Some(1), "{args:?}");
        let words = format!("Could not open '{uri}': Could not open image: Permission denied");
        assert!(
            stderr(&ours).contains(&words),
            "{args:?}: {}",
            stderr(&ours)
        );
        assert!(
            stderr(&theirs).contains(&words),
            "{args:?}: {}",
            stderr(&theirs)
        );
    }
    // Nothing was written.
    same(&["compare", "-f", "raw", "-F", "qcow2", &uri, p(&image)]);
}

#[test]
fn a_large_sparse_export_maps_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "16G"])
            .status
            .success()
    );
    // Data past the first 2 GiB span of a block status request, and
    // across the end of one.
    qemu_io(
        &image,
        &["write 5G 1M", "write 4095M 2M", "write -z 12G 64k"],
    );
    let socket = dir.path().join("s");
    let _server = qemu_nbd("qcow2", &image, &socket, &["-r"]);
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    for output in ["--output=human", "--output=json"] {
        let map = same(&["map", output, &uri]);
        assert!(
            map.contains("0x140000000") || map.contains("5368709120"),
            "{map}"
        );
    }
}

#[test]
fn the_client_says_goodbye_in_the_form_it_negotiated() {
    // qemu-nbd negotiates extended headers with qcow: the disconnect must
    // come in the extended form too, or qemu-nbd complains that the
    // client left in the middle of a request.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "1G"])
            .status
            .success()
    );
    let socket = dir.path().join("s");
    let mut server = qemu_nbd("qcow2", &image, &socket, &["-r"]);
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    for args in [&["info", &uri][..], &["map", &uri][..]] {
        let o = qcow(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (_, said) = server.stop();
    assert!(!said.contains("Disconnect client"), "qemu-nbd: {said}");
}

#[test]
fn a_fragmented_export_maps_and_copies_as_in_qemu_img() {
    // 16384 extents: more descriptors than one block status chunk may
    // bring, unless the client asks for one (REQ_ONE, as QEMU does).
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("holes.raw");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(64 << 20).unwrap();
        for block in 0..(64 << 20) / 8192u64 {
            file.write_all_at(&[(block % 251) as u8 + 1; 4096], block * 8192)
                .unwrap();
        }
    }
    let socket = dir.path().join("s");
    let _server = qemu_nbd("raw", &image, &socket, &["-r"]);
    let uri = format!("nbd+unix:///?socket={}", p(&socket));
    let map = same(&["map", "--output=json", &uri]);
    assert!(
        map.lines().count() >= 16384,
        "{} extents",
        map.lines().count()
    );
    let copy = dir.path().join("copy.raw");
    let o = qcow(&["convert", "-O", "raw", &uri, p(&copy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());
}
