//! Replays the committed fuzz seeds (`fuzz/seeds/<target>/`) through the
//! fuzzing harness on stable, so that CI runs every seed, and every input a
//! fuzzer once found interesting, without a fuzzer.

use std::fs;
use std::path::{Path, PathBuf};

#[allow(unreachable_pub)]
#[path = "../../../../fuzz/src/harness.rs"]
mod harness;

/// The seed directory of fuzz target `target`.
fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// Runs `run` on every file of the seed directory of `target`, naming the
/// seed if it panics, and fails if there is none.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = seed_dir(target);
    let mut seeds: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    seeds.sort();
    assert!(
        !seeds.is_empty(),
        "no seeds in {}: the replay would pass vacuously",
        dir.display()
    );
    for seed in &seeds {
        let data = fs::read(seed).unwrap_or_else(|e| panic!("reading {}: {e}", seed.display()));
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "seed {} panicked", seed.display());
    }
}

#[test]
fn header_seeds() {
    replay("header", harness::header);
}

#[test]
fn open_read_seeds() {
    replay("open_read", harness::open_read);
}

#[test]
fn ops_seeds() {
    replay("ops", harness::ops);
}
