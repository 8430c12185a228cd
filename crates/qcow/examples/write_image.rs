//! Writing a new image, as an image builder does: a qcow2 image is created
//! with chosen options, written (data, zeros, a discard), closed, reopened
//! and checked the way `qemu-img check` checks it.
//!
//! `cargo run -p qcow --example write_image`

use qcow::{BlockDevice, CreateOptions, OpenOptions, Repair};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("new.qcow2");

    let mut options = CreateOptions::new(64 << 20);
    options.cluster_size = 16 << 10;
    options.lazy_refcounts = true;
    qcow::create(&path, &options)?;

    let image = qcow::open(&path, &OpenOptions::default().writable(true))?;
    image.write_at(b"hello, disk", 0)?;
    image.write_at(&vec![0x42; 3 << 20], 8 << 20)?;
    image.write_zeroes(9 << 20, 1 << 20, true)?;
    image.discard(10 << 20, 16 << 10)?;
    image.flush()?;
    image.close()?;

    let image = qcow::open(
        &path,
        &OpenOptions::default()
            .writable(true)
            .check(true)
            .repair(true),
    )?;
    let qcow::Image::Qcow2(mut image) = image else {
        return Err("not a qcow2 image".into());
    };
    let report = image.check(Repair::None, &mut |line| eprintln!("{line}"))?;
    println!(
        "{} clusters allocated, {} corruptions, {} leaks",
        report.allocated_clusters, report.corruptions, report.leaks
    );
    let mut start = [0u8; 11];
    image.read_at(&mut start, 0)?;
    assert_eq!(&start, b"hello, disk");
    assert_eq!((report.corruptions, report.leaks), (0, 0));
    Ok(())
}

#[test]
fn runs() {
    main().expect("the example runs");
}
