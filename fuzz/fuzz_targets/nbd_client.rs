//! Fuzz target: a hostile NBD server, as the client sees it (see
//! `nbd_harness::nbd_client`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow_fuzz::nbd_harness::nbd_client(data));
