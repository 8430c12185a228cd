//! Replays the committed NBD fuzz seeds (`fuzz/seeds/nbd/`, and
//! `fuzz/seeds/nbd_client/` for the client) through the
//! fuzz harness on stable: every conversation a fuzzer once found
//! interesting, run by `cargo test` without a fuzzer.

#[allow(unreachable_pub, dead_code)]
#[path = "../../../fuzz/src/nbd_harness.rs"]
mod nbd_harness;

#[test]
fn nbd_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/nbd");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "too few seeds in {}", dir.display());
    for seed in &seeds {
        let data = std::fs::read(seed).expect("seed");
        let outcome = std::panic::catch_unwind(|| nbd_harness::nbd(&data));
        assert!(outcome.is_ok(), "seed {} panicked", seed.display());
    }
}

#[test]
fn nbd_client_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/nbd_client");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 4, "too few seeds in {}", dir.display());
    for seed in &seeds {
        let data = std::fs::read(seed).expect("seed");
        let outcome = std::panic::catch_unwind(|| nbd_harness::nbd_client(&data));
        assert!(outcome.is_ok(), "seed {} panicked", seed.display());
    }
}
