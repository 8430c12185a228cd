//! Fuzz target: arbitrary bytes opened as a writable qcow2 image in memory,
//! then written, zeroed, discarded and flushed (see `harness::ops`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow_fuzz::harness::ops(data));
