//! Shared code of the qcow fuzz targets.
//!
//! The targets in `fuzz_targets/` are one-liners that hand libFuzzer's bytes
//! to [`harness`]. The same harness file is included with `#[path]` by the
//! `fuzz_seeds` integration test of the `qcow` crate, so that a plain
//! `cargo test` replays every committed seed in `seeds/` without a fuzzer.

pub mod harness;
pub mod nbd_harness;
