//! An NBD server over any [`qcow::BlockDevice`], and a client: the protocol of
//! `doc/proto.md` in the NetworkBlockDevice/nbd repository (fixed newstyle
//! handshake, structured replies, metadata contexts), with no knowledge of
//! terminals or command lines; `qcow serve` wraps it.
//!
//! - [`protocol`]: the numbers and wire formats;
//! - [`export`]: what is served, and the block status of its metadata
//!   contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`,
//!   `qemu:allocation-depth`);
//! - [`handshake`]: option haggling up to the choice of an export;
//! - [`transmission`]: requests, several in flight, answered as they
//!   complete;
//! - [`server`]: sockets, clients, and stopping cleanly;
//! - [`tls`]: TLS sessions (NBD_OPT_STARTTLS) with QEMU's x509
//!   credentials;
//! - [`client`]: the other side, an export of any server as storage.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::sync::atomic::AtomicBool;
//! use qcow_nbd::{Export, Listener, ServerOptions, serve};
//!
//! let image = qcow::open("disk.qcow2".as_ref(), &qcow::OpenOptions::default())?;
//! let export = Arc::new(Export::new("", Arc::new(image)));
//! let listener = Listener::Unix(std::os::unix::net::UnixListener::bind("/tmp/nbd.sock")?);
//! let stop = AtomicBool::new(false);
//! serve(listener, vec![export], &ServerOptions::default(), &stop, &|e| eprintln!("{e}"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod export;
pub mod handshake;
pub mod protocol;
pub mod server;
mod socket;
pub mod tls;
pub mod transmission;

pub use export::{Context, DetectZeroes, DirtyRanges, Export};
pub use server::{Listener, ServerOptions, serve};
pub use tls::{TlsClient, TlsError, TlsServer};
