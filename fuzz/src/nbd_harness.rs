//! The NBD fuzz harness: arbitrary bytes played as a client's side of a
//! whole conversation with the server (handshake options, then requests
//! with their payloads) over an in-memory 1 MiB raw disk, read-write and
//! with a dirty bitmap and allocation depth to export. Whatever the
//! bytes, the server must answer or hang up: never panic, never loop, never
//! allocate more than the protocol's bounds. Shared by the `nbd` fuzz
//! target and the `qcow-nbd` crate's seed replay test.

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use qcow::{BlockDevice, RawImage};
use qcow_io::MemStorage;
use qcow_nbd::Export;

/// The client's bytes in, the server's bytes out.
struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded: the server's replies to a bounded input.
        if self.output.len() > 64 << 20 {
            return Err(io::Error::other("too much output"));
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Plays `data` as a client.
pub fn nbd(data: &[u8]) {
    let storage = Arc::new(MemStorage::from_bytes(vec![0u8; 1 << 20]));
    let disk = RawImage::open_sized("fuzz.raw", storage, 1 << 20).with_writes(true);
    let device: Arc<dyn BlockDevice> = Arc::new(disk);
    let export = Arc::new(
        Export::new("", device)
            .description("fuzzed")
            .discard(true)
            .bitmap(
                "b",
                qcow_nbd::DirtyRanges::Fixed(vec![(4096, 8192), (65536, 512)]),
            )
            .allocation_depth(true)
            .multi_conn(true),
    );
    let mut stream = Duplex {
        input: Cursor::new(data),
        output: Vec::new(),
    };
    let Ok(negotiated) = qcow_nbd::handshake::handshake(&mut stream, &[export]) else {
        return;
    };
    let mut sink = Vec::new();
    let _ = qcow_nbd::transmission::transmission(&mut stream.input, &mut sink, &negotiated);
}
