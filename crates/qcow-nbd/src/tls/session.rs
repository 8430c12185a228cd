//! A TLS session over a connected socket that the threads of one NBD
//! connection share the way they share a plain socket: one reads while
//! others write. The rustls session is locked only to encrypt or decrypt,
//! never while a thread waits on the socket, so a reader blocked for the
//! next reply does not hold up a writer, and a writer blocked on a full
//! socket does not hold up the reader.
//!
//! Order on the wire: a writer takes the send lock, then the session lock
//! to seal, and lets the session go before it sends, so records leave in
//! the order they were sealed. Records the reader's side makes (a key
//! update's answer, an alert) go out only when the send lock is free at
//! once, and otherwise with the next write, so that the reader never
//! waits on a writer.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::socket::Stream;

/// Ciphertext read from the socket at once.
const READ_AHEAD: usize = 256 << 10;

/// Plaintext sealed at once by one write (a larger write is taken in
/// pieces by `write_all`, so that its ciphertext is not all in memory).
const SEAL_AT_ONCE: usize = 1 << 20;

/// A TLS session and its socket.
#[derive(Debug)]
pub(crate) struct Session {
    /// The socket (blocking).
    net: Stream,
    /// The rustls session.
    state: Mutex<rustls::Connection>,
    /// The reading side: ciphertext received and not yet given to the
    /// session.
    incoming: Mutex<Incoming>,
    /// Held while ciphertext is sealed into it and goes out (taken
    /// before the session lock; the reader only ever tries it).
    sending: Mutex<Vec<u8>>,
}

/// Ciphertext waiting for the session.
#[derive(Debug)]
struct Incoming {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Why a TLS handshake failed (rustls's error inside, when it was
/// rustls's).
#[derive(Debug)]
pub(crate) struct HandshakeFailure(pub(crate) io::Error);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything the session has sealed and not yet sent, into `out`
/// (emptied first).
fn seal_into(state: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    while state.wants_write() {
        state.write_tls(out)?;
    }
    Ok(())
}

impl Session {
    /// Completes the TLS handshake of `state` over `net` (blocking, within
    /// `net`'s read timeout) and returns the stream of the session.
    pub(crate) fn start(
        mut state: rustls::Connection,
        mut net: Stream,
    ) -> Result<Stream, HandshakeFailure> {
        while state.is_handshaking() {
            if let Err(e) = state.complete_io(&mut net) {
                // Tell the peer why, when rustls has an alert queued.
                let _ = state.write_tls(&mut net);
                net.shutdown(Shutdown::Both);
                return Err(HandshakeFailure(e));
            }
        }
        // Sealed records are taken out at once: no limit needed.
        state.set_buffer_limit(None);
        let mut pending = Vec::new();
        seal_into(&mut state, &mut pending).map_err(HandshakeFailure)?;
        net.write_all(&pending).map_err(HandshakeFailure)?;
        Ok(Stream::Tls(std::sync::Arc::new(Session {
            net,
            state: Mutex::new(state),
            incoming: Mutex::new(Incoming {
                buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            sending: Mutex::new(pending),
        })))
    }

    /// The distinguished name of the peer's certificate, if it showed one
    /// that parses.
    pub(crate) fn peer_name(&self) -> Option<String> {
        let state = lock(&self.state);
        let der = state.peer_certificates()?.first()?.to_vec();
        drop(state);
        super::identity::distinguished_name(&der)
    }

    /// The socket under the session.
    pub(crate) fn socket(&self) -> &Stream {
        &self.net
    }

    /// Reads plaintext: what the session holds, else what the socket
    /// brings next. `Ok(0)` once the peer has closed the session.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut incoming = lock(&self.incoming);
        loop {
            {
                let mut state = lock(&self.state);
                match state.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if incoming.start < incoming.end {
                    if !state.wants_read() {
                        return Err(io::Error::other("the TLS session takes no more input"));
                    }
                    let Incoming {
                        buf: cipher,
                        start,
                        end,
                    } = &mut *incoming;
                    let taken = state.read_tls(&mut &cipher[*start..*end])?;
                    *start += taken;
                    let processed = state.process_new_packets().map(drop);
                    // What the session answers (a key update, an alert)
                    // goes out now if the socket is free, else with the
                    // next write.
                    if state.wants_write() {
                        if let Ok(mut out) = self.sending.try_lock() {
                            seal_into(&mut state, &mut out)?;
                            drop(state);
                            self.net.write_all_shared(&out)?;
                        }
                    }
                    processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            // Nothing buffered: wait for the socket, the session free.
            let n = self.net.read_shared(&mut incoming.buf)?;
            incoming.start = 0;
            incoming.end = n;
            if n == 0 {
                // The stream ended: the session says whether cleanly.
                lock(&self.state).read_tls(&mut io::empty())?;
            }
        }
    }

    /// Seals and sends up to [`SEAL_AT_ONCE`] bytes of `buf`.
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    /// Seals the slices in order, up to [`SEAL_AT_ONCE`] bytes in all, and
    /// sends them with one write.
    pub(crate) fn write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.sending);
        let mut state = lock(&self.state);
        let mut taken = 0;
        for buf in bufs {
            let room = SEAL_AT_ONCE - taken;
            let n = state.writer().write(&buf[..buf.len().min(room)])?;
            taken += n;
            if n < buf.len() || taken == SEAL_AT_ONCE {
                break;
            }
        }
        seal_into(&mut state, &mut out)?;
        drop(state);
        self.net.write_all_shared(&out)?;
        // A large buffer is not kept for the next small write.
        if out.capacity() > 2 * SEAL_AT_ONCE {
            *out = Vec::new();
        }
        Ok(taken)
    }

    /// Ends the session: a close_notify when the socket is free to take
    /// it at once (never waiting: neither for a thread blocked sending nor
    /// for a peer that stopped reading), then the socket's shutdown.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            if let Ok(mut out) = self.sending.try_lock() {
                // Nobody holds the session across I/O: this wait is short.
                let mut state = lock(&self.state);
                state.send_close_notify();
                if seal_into(&mut state, &mut out).is_ok() {
                    drop(state);
                    self.net.send_now(&out);
                }
            }
        }
        self.net.shutdown(how);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::tls::{TlsClient, TlsServer, test_certs as certs};

    #[test]
    fn shutdown_does_not_wait_for_a_peer_that_stopped_reading() {
        let dir = tempfile::tempdir().unwrap();
        let creds = certs::make(dir.path());
        let server_creds = TlsServer::from_x509_dir(&creds.server, true).unwrap();
        let client_creds = TlsClient::from_x509_dir(&creds.client, true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let (release, held) = mpsc::channel::<()>();
        let (ready, accepted) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let stream = server_creds.accept(Stream::Tcp(socket)).unwrap();
            ready.send(()).unwrap();
            // Never reads; keeps the connection until released.
            let _ = held.recv();
            drop(stream);
        });
        let raw = TcpStream::connect(address).unwrap();
        let filler = raw.try_clone().unwrap();
        let stream = client_creds.connect(Stream::Tcp(raw), "127.0.0.1").unwrap();
        accepted.recv().unwrap();
        // Fill the socket with bytes nobody will read, until it takes no
        // more.
        filler.set_nonblocking(true).unwrap();
        let junk = [0u8; 65536];
        loop {
            match (&filler).write(&junk) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }
        filler.set_nonblocking(false).unwrap();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            stream.shutdown(Shutdown::Both);
            let _ = done.send(());
        });
        let returned = finished.recv_timeout(Duration::from_secs(10)).is_ok();
        let _ = release.send(());
        server.join().unwrap();
        assert!(returned, "shutdown waited for a peer that does not read");
    }
}
