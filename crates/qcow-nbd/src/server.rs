//! Accepting clients on a TCP or Unix socket and serving each on its own
//! thread, as qemu-nbd does: at most `shared` clients at once, and (unless
//! `persistent`) the server ends when its last client leaves. A stop
//! request (SIGTERM and SIGINT in the CLI) stops accepting, ends every
//! connection after the requests in flight, and returns, so that the
//! caller can flush and close the image.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::export::Export;
use crate::handshake::{HandshakeError, StartTls, handshake_with_tls};
use crate::socket::Stream;
use crate::tls::TlsServer;
use crate::transmission::transmission;

/// Time a client has for its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Where clients connect.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket.
    Unix(UnixListener),
}

/// How the server treats its clients.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Clients served at once (qemu-nbd's `-e`, 1 by default).
    pub shared: usize,
    /// Keep serving after the last client leaves (qemu-nbd's `-t`).
    pub persistent: bool,
    /// TLS credentials: with them every client must start TLS before
    /// anything else (qemu-nbd's `--tls-creds`).
    pub tls: Option<TlsServer>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            shared: 1,
            persistent: false,
            tls: None,
        }
    }
}

impl ServerOptions {
    /// Sets [`ServerOptions::shared`] (at least 1).
    pub fn shared(mut self, n: usize) -> Self {
        self.shared = n.max(1);
        self
    }

    /// Sets [`ServerOptions::persistent`].
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = on;
        self
    }

    /// Sets [`ServerOptions::tls`].
    pub fn tls(mut self, credentials: Option<TlsServer>) -> Self {
        self.tls = credentials;
        self
    }
}

/// Serves `exports` to clients of `listener` until `stop` is set, or
/// (unless persistent) until the last client has left. Connection errors
/// end that connection only; `log` hears about them.
pub fn serve(
    listener: Listener,
    exports: Vec<Arc<Export>>,
    options: &ServerOptions,
    stop: &AtomicBool,
    log: &(dyn Fn(&str) + Sync),
) -> io::Result<()> {
    match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true)?,
        Listener::Unix(l) => l.set_nonblocking(true)?,
    }
    let active = AtomicUsize::new(0);
    let served = AtomicBool::new(false);
    // The connections open now, to end them on a stop.
    let open: Mutex<HashMap<u64, Stream>> = Mutex::new(HashMap::new());
    let mut next_id = 0u64;
    std::thread::scope(|scope| -> io::Result<()> {
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if !options.persistent
                && served.load(Ordering::Acquire)
                && active.load(Ordering::Acquire) == 0
            {
                break;
            }
            if active.load(Ordering::Acquire) >= options.shared {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            stream.set_blocking()?;
            let id = next_id;
            next_id += 1;
            if let Ok(copy) = stream.try_clone() {
                open.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, copy);
            }
            active.fetch_add(1, Ordering::AcqRel);
            served.store(true, Ordering::Release);
            let (exports, active, open) = (&exports, &active, &open);
            let tls = options.tls.as_ref();
            scope.spawn(move || {
                if let Err(e) = serve_client(stream, exports, tls) {
                    log(&e);
                }
                open.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
        // Stop: end every connection once its requests in flight are done
        // (the reader fails, the workers finish what they took).
        for s in open.lock().unwrap_or_else(PoisonError::into_inner).values() {
            s.shutdown(Shutdown::Read);
        }
        Ok(())
    })
}

/// One client: the handshake, then requests until it leaves.
fn serve_client(
    mut stream: Stream,
    exports: &[Arc<Export>],
    tls: Option<&TlsServer>,
) -> Result<(), String> {
    // A client gets 10 seconds for the handshake, as with qemu-nbd.
    stream
        .set_read_timeout(Some(HANDSHAKE_LIMIT))
        .map_err(|e| e.to_string())?;
    let start_tls = |stream: &mut Stream| -> Result<(), String> {
        let Some(tls) = tls else {
            return Err("TLS not configured".into());
        };
        let net = stream.try_clone().map_err(|e| e.to_string())?;
        *stream = tls.accept(net)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_LIMIT))
            .map_err(|e| e.to_string())
    };
    let handshake = handshake_with_tls(
        &mut stream,
        exports,
        tls.is_some().then_some(&start_tls as StartTls<'_, Stream>),
    );
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let negotiated = match handshake {
        Ok(n) => n,
        Err(HandshakeError::Aborted) => return Ok(()),
        // A client that leaves during the handshake (qemu-nbd --list does
        // after its ABORT) is no error.
        Err(HandshakeError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
            ) =>
        {
            stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        Err(e) => {
            stream.shutdown(Shutdown::Both);
            return Err(e.to_string());
        }
    };
    let writer = stream.try_clone().map_err(|e| e.to_string())?;
    // Request headers come buffered: a client that sends many at once
    // costs one read, not one per header.
    let mut reader =
        io::BufReader::with_capacity(256 << 10, stream.try_clone().map_err(|e| e.to_string())?);
    let end = transmission(&mut reader, writer, &negotiated);
    stream.shutdown(Shutdown::Both);
    match end {
        crate::transmission::ConnectionEnd::Disconnect => Ok(()),
        crate::transmission::ConnectionEnd::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        other => Err(other.to_string()),
    }
}
