//! Fuzz target: a whole NBD conversation from the client's side (see
//! `nbd_harness::nbd`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow_fuzz::nbd_harness::nbd(data));
