//! Copying a disk into a new compressed qcow2 image with the library's
//! copy engine, as a backup tool would: progress reported as it goes, and
//! a flag that can cancel it.
//!
//! `cargo run -p qcow --example copy_with_progress`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use qcow::copy::{CopyObserver, CopyOptions, copy};
use qcow::{BlockDevice, CreateOptions, MemStorage, OpenOptions, RawImage};

/// Prints every tenth of the way, and stops when asked to.
struct Progress {
    shown: AtomicU64,
    stop: AtomicBool,
}

impl CopyObserver for Progress {
    fn progress(&self, done: u64, total: u64) {
        let tenth = done * 10 / total.max(1);
        if self.shown.fetch_max(tenth, Ordering::Relaxed) < tenth {
            println!("{:3}% ({done} of {total} bytes)", tenth * 10);
        }
    }

    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A 32 MiB disk in memory, text-like data in its first half.
    let mut bytes = vec![0u8; 32 << 20];
    for (i, b) in bytes[..16 << 20].iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    let source = RawImage::open("memory", Arc::new(MemStorage::from_bytes(bytes)))?;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("backup.qcow2");
    qcow::create(&path, &CreateOptions::new(source.virtual_size()))?;
    let target = qcow::open(&path, &OpenOptions::default().writable(true))?;

    let progress = Progress {
        shown: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let options = CopyOptions::default().compress(true).target_is_zero(true);
    let stats = copy(&source, &target, &options, &progress)?;
    target.close()?;
    let size = std::fs::metadata(&path)?.len();
    println!(
        "copied {} bytes of data into a {size}-byte file",
        stats.bytes_written
    );
    assert!(size < 4 << 20, "compressed copy is {size} bytes");
    Ok(())
}

#[test]
fn runs() {
    main().expect("the example runs");
}
