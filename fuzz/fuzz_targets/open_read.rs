//! Fuzz target: arbitrary bytes opened as a qcow2 and as a qcow version 1
//! image in memory, then read and mapped (see `harness::open_read`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow_fuzz::harness::open_read(data));
