//! Reading a backing chain, as a VMM or a backup tool reads a disk: a base
//! image and an overlay are made in a temporary directory, then the
//! overlay is opened with its chain, each layer listed, and a sector read
//! from each layer's part of the disk.
//!
//! `cargo run -p qcow --example read_chain`

use qcow::{BlockDevice, CreateOptions, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");

    // The base holds 0xbb in its first MiB.
    qcow::create(&base, &CreateOptions::new(4 << 20))?;
    let image = qcow::open(&base, &OpenOptions::default().writable(true))?;
    image.write_at(&vec![0xbb; 1 << 20], 0)?;
    image.close()?;

    // The overlay names the base (relative to its own directory) and holds
    // 0x0e in its second MiB.
    let mut options = CreateOptions::new(4 << 20);
    options.backing_file = Some("base.qcow2".into());
    options.backing_format = Some("qcow2".into());
    qcow::create(&overlay, &options)?;
    let image = qcow::open(&overlay, &OpenOptions::default().writable(true))?;
    image.write_at(&vec![0x0e; 1 << 20], 1 << 20)?;
    image.close()?;

    // Open the chain: trusted() follows the files the image names.
    let disk = qcow::open(&overlay, &OpenOptions::trusted())?;
    let mut layer: Option<&dyn BlockDevice> = Some(&disk);
    let mut depth = 0;
    while let Some(image) = layer {
        println!(
            "layer {depth}: {} ({}, {} bytes)",
            image.name(),
            image.format().name(),
            image.virtual_size()
        );
        layer = image.backing();
        depth += 1;
    }
    let mut sector = [0u8; 512];
    for offset in [0u64, 1 << 20, 3 << 20] {
        disk.read_at(&mut sector, offset)?;
        let status = disk.block_status(offset, 512)?;
        println!(
            "offset {offset:#x}: byte {:#04x}, stored as {:?}",
            sector[0], status.allocation
        );
    }
    assert_eq!(depth, 2);
    Ok(())
}

#[test]
fn runs() {
    main().expect("the example runs");
}
