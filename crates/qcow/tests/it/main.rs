//! Integration tests of the engine: committed fixtures, images made by
//! qemu-img at test time, and malformed images.

mod amend;
mod bitmaps;
mod common;
mod concurrency;
mod copy;
mod crash;
mod embedding;
mod emptying;
mod encryption;
mod fixtures;
mod fuzz_seeds;
mod internal_snapshots;
mod locking;
mod malformed;
mod model;
mod oracle;
mod overlap;
mod rebuild_crash;
mod snapshot_table;
mod write;
