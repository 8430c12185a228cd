//! The client's block status over a real connection to the server: a
//! copy walking a large extent in chunks asks the server once per extent,
//! not once per chunk, and its own writes are seen at once.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use qcow::{Allocation, BlockDevice, Extent, ImageFormat};
use qcow_io::Storage;
use qcow_nbd::client::{Address, NbdClient, Target};
use qcow_nbd::{Export, Listener, ServerOptions};

const SIZE: u64 = 64 << 20;
const CHUNK: u64 = 2 << 20;

/// A disk whose bytes below `data_end` are data and the rest zeros, and
/// which counts the block status questions it answers.
#[derive(Debug)]
struct Counted {
    bytes: Mutex<Vec<u8>>,
    data_end: AtomicU64,
    asked: AtomicUsize,
}

impl BlockDevice for Counted {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        SIZE
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow::Result<()> {
        let bytes = self.bytes.lock().expect("bytes");
        buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> qcow::Result<Extent> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let data_end = self.data_end.load(Ordering::SeqCst);
        Ok(if offset < data_end {
            Extent {
                len: (data_end - offset).min(len),
                allocation: Allocation::Data {
                    depth: 0,
                    offset: Some(offset),
                    compressed: false,
                    zero: false,
                },
            }
        } else {
            Extent {
                len,
                allocation: Allocation::Zero {
                    depth: 0,
                    offset: None,
                },
            }
        })
    }

    fn name(&self) -> &str {
        "counted"
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> qcow::Result<()> {
        let mut bytes = self.bytes.lock().expect("bytes");
        bytes[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        self.data_end
            .fetch_max(offset + buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn is_writable(&self) -> bool {
        true
    }
}

/// Walks the export in chunks as a copy does: each chunk's runs.
fn walk(client: &NbdClient) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < SIZE {
        let end = pos + CHUNK;
        while pos < end {
            let e = client.extent(pos, end - pos).expect("extent");
            match runs.last_mut() {
                Some(last) if last.2 == e.data && last.0 + last.1 == pos => last.1 += e.len,
                _ => runs.push((pos, e.len, e.data)),
            }
            pos += e.len;
        }
    }
    runs
}

#[test]
fn a_chunked_walk_asks_once_per_extent_and_sees_its_own_writes() {
    let device = Arc::new(Counted {
        bytes: Mutex::new(vec![0u8; SIZE as usize]),
        data_end: AtomicU64::new(32 << 20),
        asked: AtomicUsize::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let export = Arc::new(Export::new("", device.clone() as Arc<dyn BlockDevice>));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        qcow_nbd::serve(
            Listener::Tcp(listener),
            vec![export],
            &ServerOptions::default().persistent(true),
            &stop2,
            &|_| {},
        )
    });
    let client = NbdClient::connect(&Target {
        address: Address::Tcp("127.0.0.1".into(), port),
        export: String::new(),
        context: None,
        tls: None,
    })
    .expect("connect");

    let before = device.asked.load(Ordering::SeqCst);
    assert_eq!(
        walk(&client),
        vec![(0, 32 << 20, true), (32 << 20, 32 << 20, false)]
    );
    // 32 chunks, two extents: two questions.
    assert_eq!(device.asked.load(Ordering::SeqCst) - before, 2);

    // A write through the client is seen at once, also inside the zero
    // extent the walk ended in.
    client.write_at(&[1u8; 4096], 40 << 20).expect("write");
    let written = client.extent(40 << 20, CHUNK).expect("extent");
    assert!(written.data, "{written:?}");
    assert_eq!(
        walk(&client),
        vec![
            (0, (40 << 20) + 4096, true),
            ((40 << 20) + 4096, (24 << 20) - 4096, false)
        ]
    );
    drop(client);
    stop.store(true, Ordering::Release);
    server.join().expect("server").expect("serve");
}
