//! The NBD fuzz harness: arbitrary bytes played as a client's side of a
//! whole conversation with the server (handshake options, then requests
//! with their payloads) over an in-memory 1 MiB raw disk, read-write and
//! with a dirty bitmap and allocation depth to export; the handshake is
//! also played to a server that requires TLS first. Whatever the
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
    // The same bytes to a server that requires TLS (which this harness
    // cannot start: the rules before STARTTLS are what is played).
    let mut required = Duplex {
        input: Cursor::new(data),
        output: Vec::new(),
    };
    let no_tls = |_: &mut Duplex<'_>| -> Result<(), String> { Err("no TLS here".into()) };
    let _ = qcow_nbd::handshake::handshake_with_tls(
        &mut required,
        std::slice::from_ref(&export),
        Some(&no_tls),
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

/// Plays a hostile NBD server: `data` is everything the server sends
/// (handshake and replies), then it hangs up. The client must fail cleanly
/// or work, whatever the bytes: no panic, no allocation sized by them, no
/// wait past the end of the stream.
///
/// Replies written ahead of their requests are refused by the client (a
/// reply for a request not in flight breaks the connection), so only the
/// first request's reply is parsed in full: the input's last byte says
/// which request goes first (reads, block status, or a write and a flush),
/// so that every kind of reply gets parsed.
pub fn nbd_client(data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let Ok((client_end, mut server_end)) = UnixStream::pair() else {
        return;
    };
    let first = data.last().map_or(0, |b| usize::from(*b % 3));
    let data = data.to_vec();
    let Ok(mut drain) = server_end.try_clone() else {
        return;
    };
    // What the client sends is read and dropped, so that it never blocks.
    let drainer = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
    });
    let feeder = std::thread::spawn(move || {
        let _ = server_end.write_all(&data);
        let _ = server_end.shutdown(std::net::Shutdown::Write);
    });
    let target = qcow_nbd::client::Target {
        address: qcow_nbd::client::Address::Unix(String::new()),
        export: String::new(),
        context: None,
        tls: None,
    };
    if let Ok(client) = qcow_nbd::client::NbdClient::over_stream(client_end, &target) {
        let size = qcow_io::Storage::len(&client).unwrap_or(0);
        let offsets = [0, size / 2, size.saturating_sub(4096)];
        let reads = || {
            let mut buf = vec![0u8; 4096];
            for offset in offsets {
                let len = (size - offset.min(size)).min(4096) as usize;
                let _ = qcow_io::Storage::read_at(&client, &mut buf[..len], offset);
            }
        };
        let extents = || {
            for offset in offsets {
                let _ = qcow_io::Storage::extent(&client, offset, 1 << 20);
            }
        };
        let writes = || {
            let buf = [0u8; 512];
            let _ = qcow_io::Storage::write_at(&client, &buf[..512.min(size as usize)], 0);
            let _ = qcow_io::Storage::flush(&client);
        };
        let kinds: [&dyn Fn(); 3] = [&reads, &extents, &writes];
        for i in 0..kinds.len() {
            kinds[(first + i) % kinds.len()]();
        }
        drop(client);
    }
    let _ = feeder.join();
    let _ = drainer.join();
}
