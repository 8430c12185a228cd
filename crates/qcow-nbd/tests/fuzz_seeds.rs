//! Replays the committed NBD fuzz seeds (`fuzz/seeds/nbd/`, and
//! `fuzz/seeds/nbd_client/` for the client) through the
//! fuzz harness on stable: every conversation a fuzzer once found
//! interesting, run by `cargo test` without a fuzzer.

#[allow(unreachable_pub, dead_code)]
#[path = "../../../fuzz/src/nbd_harness.rs"]
mod nbd_harness;

/// Runs `run` on every seed of `fuzz/seeds/<target>/`, naming the seed
/// that panics, and fails with fewer than `at_least` seeds.
fn replay(target: &str, at_least: usize, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= at_least,
        "too few seeds in {}",
        dir.display()
    );
    for seed in &seeds {
        let data = std::fs::read(seed).expect("seed");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "seed {} panicked", seed.display());
    }
}

#[test]
fn nbd_seeds() {
    replay("nbd", 5, nbd_harness::nbd);
}

#[test]
fn nbd_client_seeds() {
    replay("nbd_client", 4, nbd_harness::nbd_client);
}
