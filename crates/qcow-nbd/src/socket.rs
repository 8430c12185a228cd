//! A connected NBD socket, Unix or TCP, plain or under TLS, for both sides
//! of the protocol: the server's connections and the client's.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::Session;

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session over one of the others, shared by the handles of the
    /// connection.
    Tls(Arc<Session>),
}

impl Stream {
    /// Another handle on the same connection (one sends while another
    /// receives).
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    /// Shuts the connection down (`how`), errors ignored: it is being
    /// given up.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => {
                s.shutdown(how);
                Ok(())
            }
        };
    }

    /// Bounds how long a read waits (`None`: for ever).
    pub(crate) fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(limit),
            Stream::Unix(s) => s.set_read_timeout(limit),
            Stream::Tls(s) => s.socket().set_read_timeout(limit),
        }
    }

    /// Blocking I/O (an accepted socket inherits the listener's mode), and
    /// no delay for small TCP writes.
    pub(crate) fn set_blocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(false)
            }
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tls(s) => s.socket().set_blocking(),
        }
    }

    /// Reads through a shared handle (plain sockets only; a TLS session
    /// reads through its own).
    pub(crate) fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let read = match self {
                Stream::Tcp(s) => (&*s).read(buf),
                Stream::Unix(s) => (&*s).read(buf),
                Stream::Tls(s) => s.read(buf),
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Sends what of `buf` the socket takes without waiting (best effort:
    /// for a last message before a shutdown).
    pub(crate) fn send_now(&self, buf: &[u8]) {
        let _ = match self {
            Stream::Tcp(s) => rustix::net::send(s, buf, rustix::net::SendFlags::DONTWAIT),
            Stream::Unix(s) => rustix::net::send(s, buf, rustix::net::SendFlags::DONTWAIT),
            Stream::Tls(s) => return s.socket().send_now(buf),
        };
    }

    /// Writes all of `buf` through a shared handle.
    pub(crate) fn write_all_shared(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => (&*s).write_all(buf),
            Stream::Unix(s) => (&*s).write_all(buf),
            Stream::Tls(s) => {
                let mut rest = buf;
                while !rest.is_empty() {
                    let n = s.write(rest)?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    rest = &rest[n..];
                }
                Ok(())
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(_) => Ok(()),
        }
    }
}
