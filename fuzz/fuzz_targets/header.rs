//! Fuzz target: every header, extension, snapshot, bitmap and table-entry
//! parser of `qcow-format` on arbitrary bytes (see `harness::header`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow_fuzz::harness::header(data));
