//! One thread per TLS connection that moves bytes between the network
//! socket (ciphertext) and a local socket pair (plaintext), so that the
//! code above it keeps a plain [`Stream`] whose reader and writer work
//! independently, as without TLS. A rustls session cannot be read on one
//! thread while it is written on another; this thread owns it alone and
//! never blocks on one direction while the other has work (it polls both
//! sockets).
//!
//! Memory stays bounded: at most [`CHUNK`] bytes of plaintext wait in
//! each direction, and rustls keeps its own output within its buffer
//! limit; a side that does not read stops the pump from reading the other.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use rustix::event::{PollFd, PollFlags, poll};

use crate::socket::Stream;

/// Plaintext read or delivered at once, in each direction.
const CHUNK: usize = 256 << 10;

/// Completes the TLS handshake of `session` over `net` (blocking, within
/// `net`'s read timeout), then starts the thread that carries the session
/// and returns the plaintext end the protocol code uses.
pub(crate) fn start(
    mut session: rustls::Connection,
    mut net: Stream,
) -> Result<Stream, HandshakeFailure> {
    while session.is_handshaking() {
        if let Err(e) = session.complete_io(&mut net) {
            // Tell the peer why, when rustls has an alert queued.
            let _ = session.write_tls(&mut net);
            net.shutdown(Shutdown::Both);
            return Err(HandshakeFailure(e));
        }
    }
    // Room for a large write's records at once.
    session.set_buffer_limit(Some(CHUNK));
    let (app, pump_end) = UnixStream::pair().map_err(HandshakeFailure)?;
    net.set_nonblocking(true).map_err(HandshakeFailure)?;
    pump_end.set_nonblocking(true).map_err(HandshakeFailure)?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            let mut pump = Pump {
                session,
                net,
                app: pump_end,
                from_net: Buffer::default(),
                to_app: Buffer::default(),
                from_app: Buffer::default(),
                net_eof: false,
                net_done: false,
                app_done: false,
                app_write_shut: false,
            };
            if pump.run().is_err() {
                // The connection is broken: both sides learn it at once.
                pump.net.shutdown(Shutdown::Both);
                let _ = pump.app.shutdown(Shutdown::Both);
            }
        })
        .map_err(HandshakeFailure)?;
    Ok(Stream::Unix(app))
}

/// Why a TLS handshake failed (rustls's error inside, when it was
/// rustls's).
#[derive(Debug)]
pub(crate) struct HandshakeFailure(pub(crate) io::Error);

/// Bytes waiting to go on, up to [`CHUNK`], in memory allocated (and
/// zeroed) once.
struct Buffer {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer {
            data: vec![0u8; CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Buffer {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether more fits.
    fn has_room(&self) -> bool {
        self.end < self.data.len()
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.is_empty() {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends what `read` gives into the room left; its result (`Ok(0)`
    /// at the end of the source).
    fn append(&mut self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        let n = read(&mut self.data[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// The session and its two sockets.
struct Pump {
    session: rustls::Connection,
    net: Stream,
    app: UnixStream,
    /// Ciphertext from the network, not yet given to the session (read in
    /// large pieces: the session takes a few KiB at a time).
    from_net: Buffer,
    /// Plaintext from the peer, for the application.
    to_app: Buffer,
    /// Plaintext from the application, not yet taken by the session.
    from_app: Buffer,
    /// The network socket has reached its end.
    net_eof: bool,
    /// The peer has ended its side (close_notify or end of stream).
    net_done: bool,
    /// The application has ended its side.
    app_done: bool,
    /// The application has been told the peer ended.
    app_write_shut: bool,
}

/// Whether an I/O result means "try later".
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    /// Carries bytes both ways until the application closes its end (its
    /// last plaintext sent and a close_notify after it) or a side fails.
    fn run(&mut self) -> io::Result<()> {
        loop {
            while self.step()? {}
            if self.app_done && !self.session.wants_write() {
                self.net.shutdown(Shutdown::Write);
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// Does every transfer that can go on without blocking; whether any
    /// did.
    fn step(&mut self) -> io::Result<bool> {
        let mut moved = false;
        // Application -> session.
        if !self.from_app.is_empty() {
            let n = self.session.writer().write(self.from_app.pending())?;
            if n > 0 {
                self.from_app.consume(n);
                moved = true;
            }
        }
        if self.from_app.is_empty() && !self.app_done && !self.session.wants_write() {
            let app = &mut self.app;
            match self.from_app.append(|buf| app.read(buf)) {
                Ok(0) => {
                    self.app_done = true;
                    self.session.send_close_notify();
                    moved = true;
                }
                Ok(_) => moved = true,
                Err(e) if would_block(&e) => {}
                // The application's end is gone: as good as closed.
                Err(_) => {
                    self.app_done = true;
                    self.session.send_close_notify();
                    moved = true;
                }
            }
        }
        // Session -> network.
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.net) {
                Ok(_) => moved = true,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        // Network -> ciphertext buffer, in one large read.
        if self.from_net.is_empty() && !self.net_eof {
            let net = &mut self.net;
            match self.from_net.append(|buf| net.read(buf)) {
                Ok(0) => {
                    self.net_eof = true;
                    // Tells the session the stream ended.
                    self.session.read_tls(&mut io::empty())?;
                    moved = true;
                }
                Ok(_) => moved = true,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // Ciphertext -> session -> plaintext for the application.
        while !self.net_done && self.to_app.has_room() {
            let session = &mut self.session;
            match self.to_app.append(|buf| session.reader().read(buf)) {
                // close_notify: the peer sends no more.
                Ok(0) => {
                    self.net_done = true;
                    moved = true;
                    break;
                }
                Ok(_) => {
                    moved = true;
                    continue;
                }
                Err(e) if would_block(&e) => {}
                // The stream ended without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.net_done = true;
                    moved = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            if self.from_net.is_empty() || !self.session.wants_read() {
                break;
            }
            let taken = self.session.read_tls(&mut self.from_net.pending())?;
            self.from_net.consume(taken);
            self.session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            moved = true;
        }
        if !self.to_app.is_empty() {
            match self.app.write(self.to_app.pending()) {
                Ok(n) => {
                    self.to_app.consume(n);
                    moved = true;
                }
                Err(e) if would_block(&e) => {}
                // The application stopped reading: drop what it would
                // have read.
                Err(_) => {
                    self.to_app.consume(self.to_app.pending().len());
                    self.app_write_shut = true;
                    moved = true;
                }
            }
        }
        if self.net_done && self.to_app.is_empty() && !self.app_write_shut {
            let _ = self.app.shutdown(Shutdown::Write);
            self.app_write_shut = true;
            moved = true;
        }
        Ok(moved)
    }

    /// Sleeps until a socket can do what the pump waits for.
    fn wait(&mut self) -> io::Result<()> {
        let mut net = PollFlags::empty();
        if self.session.wants_write() {
            net |= PollFlags::OUT;
        }
        if !self.net_eof && self.from_net.is_empty() {
            net |= PollFlags::IN;
        }
        let mut app = PollFlags::empty();
        if !self.to_app.is_empty() {
            app |= PollFlags::OUT;
        }
        if self.from_app.is_empty() && !self.app_done && !self.session.wants_write() {
            app |= PollFlags::IN;
        }
        if net.is_empty() && app.is_empty() {
            // Nothing can move again: both sides are finished.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection has nothing left to carry",
            ));
        }
        let mut fds = [PollFd::new(&self.net, net), PollFd::new(&self.app, app)];
        match poll(&mut fds, None) {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
