//! An NBD client: one export of a server (over a Unix socket or TCP) as a
//! [`qcow_io::Storage`], so that a raw image over it is a disk the engine
//! reads, maps and writes like any other (qemu-img's `nbd://` and
//! `nbd+unix://` names and its `driver=nbd` options).
//!
//! The handshake is fixed newstyle: extended headers (64-bit lengths) or
//! else structured replies when the server has them, one metadata context
//! for block status (`base:allocation`, or the one named, as QEMU's
//! `x-dirty-bitmap` names one), then `NBD_OPT_GO`.
//! Threads share the connection: each request is in flight beside the
//! others', and its reply is read into the buffer of the thread that sent
//! it ([`in_flight`]). Everything the server sends is checked: magic
//! numbers, cookies, chunk lengths against what was asked; a server that
//! breaks the protocol gets an error, never a panic or an allocation it
//! sized.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};

use qcow_io::{Storage, StorageExtent};

mod coverage;
mod in_flight;

use in_flight::{Call, Connection, Headers};

use crate::socket::Stream;
use crate::tls::TlsClient;

use crate::protocol::{
    IHAVEOPT, MAX_OPTION, NBD_MAGIC, OPTION_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, cmd, flag, info,
    opt, read_u16, read_u32, read_u64, rep,
};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix(String),
    /// A TCP host and port.
    Tcp(String, u16),
}

/// What to connect to: the server, the export, the block status context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server.
    pub address: Address,
    /// The export's name (`""`: the default export).
    pub export: String,
    /// The metadata context block status reads (`None`: `base:allocation`).
    /// Another context's flags are read as if they were
    /// `base:allocation`'s, as QEMU's `x-dirty-bitmap` reads them.
    pub context: Option<String>,
    /// TLS, when the connection is to be encrypted (QEMU's `tls-creds`).
    pub tls: Option<TargetTls>,
}

/// TLS for a connection: the client's credentials, and the name the
/// server's certificate must carry.
#[derive(Debug, Clone)]
pub struct TargetTls {
    /// The credentials.
    pub credentials: TlsClient,
    /// The name checked in the server's certificate (QEMU's
    /// `tls-hostname`); `None`: the TCP host connected to. A Unix socket
    /// needs one.
    pub hostname: Option<String>,
}

impl PartialEq for TargetTls {
    fn eq(&self, other: &Self) -> bool {
        self.credentials.same_as(&other.credentials) && self.hostname == other.hostname
    }
}

impl Eq for TargetTls {}

impl Target {
    /// Parses qemu's NBD URIs: `nbd://HOST[:PORT]/EXPORT` and
    /// `nbd+unix:///EXPORT?socket=PATH` (also `nbd+tcp://`). `None` for a
    /// name that is no NBD URI.
    pub fn from_uri(uri: &str) -> Option<Result<Target, String>> {
        let (scheme, rest) = uri.split_once("://")?;
        let bad = |why: &str| Some(Err(format!("invalid NBD URI '{uri}': {why}")));
        let (authority_path, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match authority_path.split_once('/') {
            Some((a, p)) => (a, p),
            None => (authority_path, ""),
        };
        let export = path.to_owned();
        match scheme {
            "nbd" | "nbd+tcp" => {
                if query.is_some() {
                    return bad("no query is allowed");
                }
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, p)) => match p.parse() {
                        Ok(port) => (h, port),
                        Err(_) => return bad("bad port"),
                    },
                    None => (authority, 10809),
                };
                if host.is_empty() {
                    return bad("no host");
                }
                Some(Ok(Target {
                    address: Address::Tcp(host.to_owned(), port),
                    export,
                    context: None,
                    tls: None,
                }))
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return bad("a Unix socket URI has no host");
                }
                let Some(socket) = query.and_then(|q| q.strip_prefix("socket=")) else {
                    return bad("the socket is missing (?socket=PATH)");
                };
                Some(Ok(Target {
                    address: Address::Unix(socket.to_owned()),
                    export,
                    context: None,
                    tls: None,
                }))
            }
            _ => None,
        }
    }

    /// A name for messages, as qemu names NBD exports.
    pub fn display_name(&self) -> String {
        let export = if self.export.is_empty() {
            String::new()
        } else {
            format!("/{}", self.export)
        };
        match &self.address {
            Address::Unix(path) => format!("nbd+unix://{export}?socket={path}"),
            Address::Tcp(host, port) => format!("nbd://{host}:{port}{export}"),
        }
    }
}

/// One export of an NBD server, as storage.
#[derive(Debug)]
pub struct NbdClient {
    name: String,
    connection: Connection,
    size: u64,
    flags: u16,
    /// The id of the negotiated metadata context.
    context_id: Option<u32>,
    /// The last block status descriptor, kept until this client writes.
    status: Mutex<StatusCache>,
}

/// The block status the server last gave, so that a copy walking an
/// extent of gigabytes in chunks asks once, as qemu-img's convert loop
/// remembers where the current extent ends. Writes, zeroes and discards
/// sent through this client forget it; a change another client makes to
/// a shared export is seen at the next extent asked about.
#[derive(Debug, Default)]
struct StatusCache {
    /// Counts this client's changes (each counts twice: when sent and
    /// when done), so that a reply asked for before or during one is not
    /// kept.
    generation: u64,
    /// The extent: start, end, and its data and zero flags.
    extent: Option<(u64, u64, bool, bool)>,
}

/// A protocol violation or a refusal, as an I/O error.
fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads `len` bytes the server announced, refusing more than `max`.
fn read_payload(stream: &mut impl Read, len: u64, max: u32) -> io::Result<Vec<u8>> {
    if len > u64::from(max) {
        return Err(protocol(format!(
            "the server announced {len} bytes where at most {max} fit"
        )));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok(data)
}

/// The message of an errno the server sent.
fn server_error(errno: u32, what: &str) -> io::Error {
    let kind = match errno {
        1 => io::ErrorKind::PermissionDenied,
        22 => io::ErrorKind::InvalidInput,
        95 => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    let text = io::Error::from_raw_os_error(errno as i32).to_string();
    let text = text
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_owned();
    io::Error::new(kind, format!("{what}: {text}"))
}

/// One option reply.
struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

impl NbdClient {
    /// Connects to `target` and negotiates its export.
    pub fn connect(target: &Target) -> io::Result<NbdClient> {
        let failed = |e: io::Error, to: &str| {
            io::Error::new(e.kind(), format!("Failed to connect to '{to}': {e}"))
        };
        let stream = match &target.address {
            Address::Unix(path) => {
                Stream::Unix(UnixStream::connect(path).map_err(|e| failed(e, path))?)
            }
            Address::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| failed(e, &format!("{host}:{port}")))?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
        };
        Self::negotiate(stream, target)
    }

    /// Negotiates `target`'s export over a connected Unix stream (for
    /// servers reached otherwise, and for tests that play the server).
    pub fn over_stream(stream: UnixStream, target: &Target) -> io::Result<NbdClient> {
        Self::negotiate(Stream::Unix(stream), target)
    }

    fn negotiate(stream: Stream, target: &Target) -> io::Result<NbdClient> {
        let mut stream = stream;
        if read_u64(&mut stream)? != NBD_MAGIC {
            return Err(protocol("the server is not an NBD server (bad magic)"));
        }
        if read_u64(&mut stream)? != IHAVEOPT {
            return Err(protocol(
                "the server speaks the old style handshake, which is not supported",
            ));
        }
        let server_flags = read_u16(&mut stream)?;
        if server_flags & crate::protocol::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak fixed newstyle"));
        }
        let no_zeroes = server_flags & crate::protocol::FLAG_NO_ZEROES;
        let client_flags = u32::from(crate::protocol::FLAG_FIXED_NEWSTYLE) | u32::from(no_zeroes);
        stream.write_all(&client_flags.to_be_bytes())?;
        if let Some(tls) = &target.tls {
            stream = start_tls(stream, target, tls)?;
        }

        // Extended headers (64-bit lengths; structured replies with
        // them), else structured replies, when the server has them.
        send_option(&mut stream, opt::EXTENDED_HEADERS, &[])?;
        let reply = read_option_reply(&mut stream, opt::EXTENDED_HEADERS)?;
        let extended = reply.kind == rep::ACK;
        let structured = extended || {
            send_option(&mut stream, opt::STRUCTURED_REPLY, &[])?;
            let reply = read_option_reply(&mut stream, opt::STRUCTURED_REPLY)?;
            reply.kind == rep::ACK
        };

        // One metadata context for block status.
        let mut context_id = None;
        if structured {
            let query = target.context.as_deref().unwrap_or("base:allocation");
            let mut data = Vec::new();
            push_string(&mut data, &target.export);
            data.extend_from_slice(&1u32.to_be_bytes());
            push_string(&mut data, query);
            send_option(&mut stream, opt::SET_META_CONTEXT, &data)?;
            loop {
                let reply = read_option_reply(&mut stream, opt::SET_META_CONTEXT)?;
                match reply.kind {
                    rep::META_CONTEXT if reply.data.len() >= 4 => {
                        let id = u32::from_be_bytes([
                            reply.data[0],
                            reply.data[1],
                            reply.data[2],
                            reply.data[3],
                        ]);
                        if &reply.data[4..] == query.as_bytes() {
                            context_id = Some(id);
                        }
                    }
                    rep::ACK => break,
                    // A server without metadata contexts: data everywhere.
                    kind if kind & (1 << 31) != 0 => break,
                    _ => return Err(protocol("bad NBD_OPT_SET_META_CONTEXT reply")),
                }
            }
            if target.context.is_some() && context_id.is_none() {
                return Err(protocol(format!(
                    "the server has no metadata context '{query}'"
                )));
            }
        }

        // The export.
        let mut data = Vec::new();
        push_string(&mut data, &target.export);
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut stream, opt::GO, &data)?;
        let mut export = None;
        loop {
            let reply = read_option_reply(&mut stream, opt::GO)?;
            match reply.kind {
                rep::INFO if reply.data.len() >= 2 => {
                    let kind = u16::from_be_bytes([reply.data[0], reply.data[1]]);
                    if kind == info::EXPORT && reply.data.len() == 12 {
                        let mut size = [0u8; 8];
                        size.copy_from_slice(&reply.data[2..10]);
                        let flags = u16::from_be_bytes([reply.data[10], reply.data[11]]);
                        export = Some((u64::from_be_bytes(size), flags));
                    }
                }
                rep::ACK => break,
                rep::ERR_UNKNOWN => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("Requested export not available ('{}')", target.export),
                    ));
                }
                rep::ERR_TLS_REQD => {
                    let message = String::from_utf8_lossy(&reply.data).into_owned();
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "TLS negotiation required before option {} (go)\n\
                             Did you forget a valid tls-creds?\nserver reported: {message}",
                            opt::GO
                        ),
                    ));
                }
                kind if kind & (1 << 31) != 0 => {
                    let message = String::from_utf8_lossy(&reply.data).into_owned();
                    return Err(protocol(format!(
                        "the server refused the export: {message} (error {kind:#x})"
                    )));
                }
                _ => return Err(protocol("bad NBD_OPT_GO reply")),
            }
        }
        let (size, flags) = export.ok_or_else(|| protocol("the server sent no export size"))?;
        Ok(NbdClient {
            name: target.display_name(),
            connection: Connection::new(
                stream,
                Headers {
                    structured,
                    extended,
                },
                context_id,
            )?,
            size,
            flags,
            context_id,
            status: Mutex::new(StatusCache::default()),
        })
    }

    /// Forgets the block status kept (this client changes the export).
    fn forget_status(&self) {
        let mut cache = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        cache.generation += 1;
        cache.extent = None;
    }

    /// Runs a request that changes the export, forgetting the block status
    /// kept before and after it.
    fn change(&self, call: Call<'_>) -> io::Result<()> {
        self.forget_status();
        let done = self.request(call);
        self.forget_status();
        done
    }

    /// The export's name for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & flag::READ_ONLY != 0
    }

    /// Sends one request and waits for its reply (others may be in
    /// flight meanwhile).
    fn request(&self, call: Call<'_>) -> io::Result<()> {
        self.connection.request(call)
    }

    /// Splits `offset..offset + len` into requests of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        (0..len.div_ceil(max)).map(move |i| {
            let start = i * max;
            (offset + start, (len - start).min(max))
        })
    }
}

/// A hole chunk (`NBD_REPLY_TYPE_OFFSET_HOLE`).
const OFFSET_HOLE: u16 = 2;

/// Largest range one BLOCK_STATUS request asks about: `i32::MAX` bytes
/// rounded down to whole sectors, as QEMU's client asks.
const BLOCK_STATUS_SPAN: u64 = i32::MAX as u64 & !0x1ff;

/// Largest piece of one READ or WRITE request.
const PIECE: u64 = 8 << 20;

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn send_option(stream: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut header = Vec::with_capacity(16 + data.len());
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&option.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(data);
    stream.write_all(&header)
}

/// Asks the server for TLS (NBD_OPT_STARTTLS) and runs the TLS handshake:
/// the stream the rest of the negotiation and the transmission use.
fn start_tls(mut stream: Stream, target: &Target, tls: &TargetTls) -> io::Result<Stream> {
    let hostname = match (&tls.hostname, &target.address) {
        (Some(name), _) | (None, Address::Tcp(name, _)) => name.clone(),
        // Nothing is checked against it: any name does, as with QEMU.
        (None, Address::Unix(_)) if !tls.credentials.verifies_peer() => "localhost".into(),
        (None, Address::Unix(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "No hostname for certificate validation",
            ));
        }
    };
    send_option(&mut stream, opt::STARTTLS, &[])?;
    let reply = read_option_reply(&mut stream, opt::STARTTLS)?;
    if reply.kind != rep::ACK {
        let message = String::from_utf8_lossy(&reply.data).into_owned();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "Denied by server for option {} (starttls)\nserver reported: {message}",
                opt::STARTTLS
            ),
        ));
    }
    tls.credentials
        .connect(stream, &hostname)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))
}

fn read_option_reply(stream: &mut impl Read, option: u32) -> io::Result<OptionReply> {
    if read_u64(stream)? != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    if read_u32(stream)? != option {
        return Err(protocol("a reply to another option"));
    }
    let kind = read_u32(stream)?;
    let len = read_u32(stream)?;
    let data = read_payload(stream, u64::from(len), MAX_OPTION)?;
    Ok(OptionReply { kind, data })
}

impl Storage for NbdClient {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the export",
            ));
        }
        for (at, len) in Self::pieces(offset, buf.len() as u64, PIECE) {
            let start = (at - offset) as usize;
            let piece = &mut buf[start..start + len as usize];
            self.request(Call {
                read_into: Some(piece),
                ..Call::new(cmd::READ, at, len)
            })?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the export is read-only",
            ));
        }
        for (at, len) in Self::pieces(offset, buf.len() as u64, PIECE) {
            let start = (at - offset) as usize;
            let piece = &buf[start..start + len as usize];
            self.change(Call {
                payload: piece,
                ..Call::new(cmd::WRITE, at, len)
            })?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & flag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(Call::new(cmd::FLUSH, 0, 0))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.flags & flag::SEND_TRIM == 0 {
            return Ok(());
        }
        for (at, n) in Self::pieces(offset, len, u64::from(u32::MAX) & !0xfff) {
            self.change(Call::new(cmd::TRIM, at, n))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.flags & flag::SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; PIECE.min(len) as usize];
            for (at, n) in Self::pieces(offset, len, PIECE) {
                self.write_at(&zeros[..n as usize], at)?;
            }
            return Ok(());
        }
        for (at, n) in Self::pieces(offset, len, u64::from(u32::MAX) & !0xfff) {
            self.change(Call::new(cmd::WRITE_ZEROES, at, n))?;
        }
        Ok(())
    }

    /// The first descriptor of the negotiated context: a hole (or zeros)
    /// is no data; without a context, all is data.
    fn extent(&self, offset: u64, len: u64) -> io::Result<StorageExtent> {
        let len = len.min(self.size.saturating_sub(offset));
        if self.context_id.is_none() || len == 0 {
            return Ok(StorageExtent::data(len));
        }
        let generation = {
            let cache = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((start, end, data, zero)) = cache.extent {
                if (start..end).contains(&offset) {
                    return Ok(StorageExtent {
                        data,
                        zero,
                        len: (end - offset).min(len),
                    });
                }
            }
            cache.generation
        };
        // Block status reads no data: one request spans the rest of the
        // export under extended headers, else up to 2 GiB, as QEMU's
        // client asks (a larger length does not fit the field), whatever
        // the caller asked: the extent found is kept for the next calls.
        let rest = self.size - offset;
        let asked = if self.connection.extended() {
            rest
        } else {
            rest.min(BLOCK_STATUS_SPAN)
        };
        let mut status = Vec::new();
        self.request(Call {
            status: Some(&mut status),
            ..Call::new(cmd::BLOCK_STATUS, offset, asked)
        })?;
        let Some(&(run, flags)) = status.first() else {
            return Err(protocol("a block status reply without descriptors"));
        };
        if run == 0 {
            return Err(protocol("a block status descriptor of length 0"));
        }
        // The flags as QEMU reads them: a hole is no data, and reads as
        // zeros only with the zero flag (base:allocation sets it on every
        // hole qemu-nbd reports); data may read as zeros too.
        let data = flags & u64::from(STATE_HOLE) == 0;
        let zero = flags & u64::from(STATE_ZERO) != 0;
        let run = run.min(asked);
        let mut cache = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.generation == generation {
            cache.extent = Some((offset, offset + run, data, zero));
        }
        Ok(StorageExtent {
            data,
            zero,
            len: run.min(len),
        })
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.connection.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{STRUCTURED_REPLY_MAGIC, chunk};

    /// A server's handshake: structured replies, base:allocation as
    /// context 1, an export of `size` bytes that takes flushes.
    fn handshake(size: u64) -> Vec<u8> {
        handshake_in(size, false)
    }

    /// [`handshake`], with extended headers when `extended`.
    fn handshake_in(size: u64, extended: bool) -> Vec<u8> {
        let reply = |option: u32, kind: u32, data: &[u8]| {
            let mut out = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out
        };
        let mut out = NBD_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&3u16.to_be_bytes());
        if extended {
            out.extend(reply(opt::EXTENDED_HEADERS, rep::ACK, &[]));
        } else {
            // No extended headers: the compact forms.
            out.extend(reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
            out.extend(reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        }
        let mut context = 1u32.to_be_bytes().to_vec();
        context.extend_from_slice(b"base:allocation");
        out.extend(reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &context));
        out.extend(reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        let mut export = info::EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&size.to_be_bytes());
        export.extend_from_slice(&(flag::HAS_FLAGS | flag::SEND_FLUSH).to_be_bytes());
        out.extend(reply(opt::GO, rep::INFO, &export));
        out.extend(reply(opt::GO, rep::ACK, &[]));
        out
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An extended reply chunk header and its payload.
    fn extended_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut out =
            crate::protocol::extended_header(flags, kind, cookie, 0, payload.len() as u64).to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn extended_headers_bring_block_status_past_4_gib() {
        let size = 8 << 30;
        let mut script = handshake_in(size, true);
        let mut status = 1u32.to_be_bytes().to_vec();
        status.extend_from_slice(&1u32.to_be_bytes());
        status.extend_from_slice(&(6u64 << 30).to_be_bytes());
        status.extend_from_slice(&u64::from(STATE_HOLE | STATE_ZERO).to_be_bytes());
        script.extend(extended_chunk(
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS_EXT,
            1,
            &status,
        ));
        let client = scripted(script);
        let extent = client.extent(0, size).unwrap();
        assert_eq!(extent.len, 6 << 30);
        assert!(!extent.data && extent.zero);
    }

    #[test]
    fn an_extended_chunk_announcing_exabytes_is_refused_unread() {
        let mut script = handshake_in(1 << 20, true);
        let mut header =
            crate::protocol::extended_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, 0, 1 << 62)
                .to_vec();
        header.extend_from_slice(&0u64.to_be_bytes());
        script.extend(header);
        let client = scripted(script);
        let mut buf = [0u8; 4096];
        let error = client.read_at(&mut buf, 0).unwrap_err();
        assert!(error.to_string().contains("outside the request"), "{error}");
        // A compact reply where extended ones were agreed breaks it too.
        let mut script = handshake_in(1 << 20, true);
        script.extend(chunk(chunk::FLAG_DONE, chunk::NONE, 1, &[]));
        let client = scripted(script);
        let error = client.flush().unwrap_err();
        assert!(error.to_string().contains("bad reply magic"), "{error}");
    }

    #[test]
    fn under_extended_headers_writes_say_their_payload_and_compact_status_is_read() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            play_handshake_in(&mut theirs, true);
            // A WRITE of 512 bytes, then a BLOCK_STATUS.
            let mut request = [0u8; 32];
            theirs.read_exact(&mut request).unwrap();
            let mut payload = [0u8; 512];
            theirs.read_exact(&mut payload).unwrap();
            tx.send(request).unwrap();
            theirs
                .write_all(&extended_chunk(chunk::FLAG_DONE, chunk::NONE, 1, &[]))
                .unwrap();
            theirs.read_exact(&mut request).unwrap();
            tx.send(request).unwrap();
            // A compact block status chunk: allowed under extended headers.
            let mut status = 1u32.to_be_bytes().to_vec();
            status.extend_from_slice(&4096u32.to_be_bytes());
            status.extend_from_slice(&STATE_HOLE.to_be_bytes());
            theirs
                .write_all(&extended_chunk(
                    chunk::FLAG_DONE,
                    chunk::BLOCK_STATUS,
                    2,
                    &status,
                ))
                .unwrap();
            let mut sink = [0u8; 64];
            while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
        });
        let target = Target {
            address: Address::Unix(String::new()),
            export: String::new(),
            context: None,
            tls: None,
        };
        let client = NbdClient::over_stream(ours, &target).unwrap();
        client.write_at(&[5u8; 512], 0).unwrap();
        let write = rx.recv().unwrap();
        let flags = u16::from_be_bytes([write[4], write[5]]);
        assert_eq!(
            u32::from_be_bytes([write[0], write[1], write[2], write[3]]),
            0x21e4_1c71
        );
        assert_ne!(
            flags & crate::protocol::cmd_flag::PAYLOAD_LEN,
            0,
            "{flags:#x}"
        );
        let extent = client.extent(0, 1 << 20).unwrap();
        let status = rx.recv().unwrap();
        let flags = u16::from_be_bytes([status[4], status[5]]);
        assert_ne!(flags & crate::protocol::cmd_flag::REQ_ONE, 0, "{flags:#x}");
        assert_eq!(extent.len, 4096);
        assert!(!extent.data);
    }

    /// A client of a server that sends `script` (and reads whatever the
    /// client says).
    fn scripted(script: Vec<u8>) -> NbdClient {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut drain = theirs.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
        });
        std::thread::spawn(move || {
            let _ = theirs.write_all(&script);
            let _ = theirs.shutdown(std::net::Shutdown::Write);
        });
        let target = Target {
            address: Address::Unix(String::new()),
            export: String::new(),
            context: None,
            tls: None,
        };
        NbdClient::over_stream(ours, &target).unwrap()
    }

    #[test]
    fn a_read_the_server_leaves_short_fails_and_the_connection_with_it() {
        let mut script = handshake(1 << 20);
        // Cookie 1: a READ of 4096 bytes answered by 1024 bytes and done.
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 1024]);
        script.extend(chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, &data));
        let client = scripted(script);
        let mut buf = [0u8; 4096];
        let short = client.read_at(&mut buf, 0).unwrap_err();
        assert!(
            short.to_string().contains("left 3072 of 4096 bytes unread"),
            "{short}"
        );
        let next = client.flush().unwrap_err();
        assert!(next.to_string().contains("failed earlier"), "{next}");
    }

    #[test]
    fn a_server_error_keeps_the_connection_and_data_arrives() {
        let mut replies = 0;
        let client = reactive(1, move |stream, requests| {
            let cookie = requests[0].0;
            replies += 1;
            if replies == 1 {
                let mut error = 5u32.to_be_bytes().to_vec();
                error.extend_from_slice(&0u16.to_be_bytes());
                stream
                    .write_all(&chunk(chunk::FLAG_DONE, chunk::ERROR, cookie, &error))
                    .unwrap();
                return;
            }
            let mut data = 512u64.to_be_bytes().to_vec();
            data.extend_from_slice(&[9u8; 512]);
            let mut out = chunk(
                0,
                OFFSET_HOLE,
                cookie,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0],
            );
            out.extend(chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, &data));
            stream.write_all(&out).unwrap();
        });
        let mut buf = [1u8; 1024];
        assert!(client.read_at(&mut buf, 0).is_err());
        client.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..512], &[0u8; 512][..]);
        assert_eq!(&buf[512..], &[9u8; 512][..]);
    }

    /// A server that plays the handshake, then waits for `expected`
    /// requests at a time (each batch within five seconds) and hands each
    /// batch to `answer`, which writes the replies, until the client goes.
    fn reactive(
        expected: usize,
        mut answer: impl FnMut(&mut UnixStream, Vec<(u64, u64, u32)>) + Send + 'static,
    ) -> NbdClient {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            play_handshake(&mut theirs);
            theirs
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            loop {
                let mut requests = Vec::new();
                while requests.len() < expected {
                    let mut request = [0u8; 28];
                    // The client went, or never had them all in flight.
                    if theirs.read_exact(&mut request).is_err() {
                        return;
                    }
                    let field = |at: usize| {
                        let mut bytes = [0u8; 8];
                        bytes.copy_from_slice(&request[at..at + 8]);
                        u64::from_be_bytes(bytes)
                    };
                    let len =
                        u32::from_be_bytes([request[24], request[25], request[26], request[27]]);
                    requests.push((field(8), field(16), len));
                }
                answer(&mut theirs, requests);
            }
        });
        let target = Target {
            address: Address::Unix(String::new()),
            export: String::new(),
            context: None,
            tls: None,
        };
        NbdClient::over_stream(ours, &target).unwrap()
    }

    /// Plays a server's side of the handshake on `stream` ([`handshake`]),
    /// reading what the client says.
    fn play_handshake(stream: &mut UnixStream) {
        play_handshake_in(stream, false);
    }

    /// [`play_handshake`], with extended headers when `extended`.
    fn play_handshake_in(stream: &mut UnixStream, extended: bool) {
        stream.write_all(&handshake_in(1 << 20, extended)).unwrap();
        // The client's flags, then its options (STRUCTURED_REPLY too
        // without extended headers).
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).unwrap();
        for _ in 0..if extended { 3 } else { 4 } {
            let mut head = [0u8; 16];
            stream.read_exact(&mut head).unwrap();
            let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).unwrap();
        }
    }

    #[test]
    fn a_broken_connection_frees_a_thread_blocked_sending() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            play_handshake(&mut theirs);
            // The first request (a read), then nothing more is read: a
            // big write after it fills the socket and blocks.
            let mut request = [0u8; 28];
            theirs.read_exact(&mut request).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(500));
            // A reply no client can parse: the connection breaks.
            theirs.write_all(&[0xee; 32]).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(30));
        });
        let target = Target {
            address: Address::Unix(String::new()),
            export: String::new(),
            context: None,
            tls: None,
        };
        let client = std::sync::Arc::new(NbdClient::over_stream(ours, &target).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        for writes in [false, true] {
            let (client, done) = (client.clone(), done.clone());
            std::thread::spawn(move || {
                let failed = if writes {
                    client.write_at(&vec![1u8; 8 << 20], 0).is_err()
                } else {
                    let mut buf = [0u8; 4096];
                    client.read_at(&mut buf, 0).is_err()
                };
                let _ = done.send((writes, failed));
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for _ in 0..2 {
            let (writes, failed) = finished
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("a thread still hangs on the broken connection");
            assert!(
                failed,
                "the {} succeeded",
                if writes { "write" } else { "read" }
            );
        }
    }

    /// The bytes a test export holds at `offset`.
    fn pattern(offset: u64) -> u8 {
        (offset / 512) as u8 ^ 0x5a
    }

    #[test]
    fn requests_of_many_threads_are_in_flight_at_once_and_replies_find_them() {
        const THREADS: usize = 8;
        // The server answers only once all eight reads are in flight: last
        // first, each in two chunks, the chunks of different replies
        // interleaved.
        let client = reactive(THREADS, |stream, requests| {
            let mut chunks = Vec::new();
            for half in 0..2u64 {
                for &(cookie, offset, len) in requests.iter().rev() {
                    let piece = u64::from(len) / 2;
                    let at = offset + half * piece;
                    let mut data = at.to_be_bytes().to_vec();
                    data.extend((at..at + piece).map(pattern));
                    let flags = if half == 1 { chunk::FLAG_DONE } else { 0 };
                    chunks.extend(chunk(flags, chunk::OFFSET_DATA, cookie, &data));
                }
            }
            stream.write_all(&chunks).unwrap();
        });
        std::thread::scope(|scope| {
            for i in 0..THREADS as u64 {
                let client = &client;
                scope.spawn(move || {
                    let offset = i * 4096 + 512;
                    let mut buf = vec![0u8; 2048];
                    client.read_at(&mut buf, offset).unwrap();
                    let expected: Vec<u8> = (offset..offset + 2048).map(pattern).collect();
                    assert!(buf == expected, "thread {i} read another's data");
                });
            }
        });
    }

    #[test]
    fn a_reply_for_no_request_in_flight_fails_every_waiting_thread() {
        let client = reactive(2, |stream, _| {
            let data = [0u8; 8 + 512];
            stream
                .write_all(&chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, 99, &data))
                .unwrap();
        });
        std::thread::scope(|scope| {
            for i in 0..2u64 {
                let client = &client;
                scope.spawn(move || {
                    let mut buf = [0u8; 512];
                    assert!(client.read_at(&mut buf, i * 512).is_err());
                });
            }
        });
        let later = client.flush().unwrap_err();
        assert!(later.to_string().contains("failed earlier"), "{later}");
    }

    #[test]
    fn a_read_answered_twice_for_one_half_and_never_for_the_other_fails() {
        let client = reactive(1, |stream, requests| {
            let (cookie, offset, _) = requests[0];
            let mut data = offset.to_be_bytes().to_vec();
            data.extend_from_slice(&[3u8; 512]);
            let mut out = chunk(0, chunk::OFFSET_DATA, cookie, &data);
            out.extend(chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, &data));
            stream.write_all(&out).unwrap();
        });
        let mut buf = [0u8; 1024];
        let error = client.read_at(&mut buf, 4096).unwrap_err();
        assert!(error.to_string().contains("overlap"), "{error}");
    }

    #[test]
    fn uris_parse_as_qemu_parses_them() {
        let t = Target::from_uri("nbd+unix:///disk?socket=/tmp/s")
            .unwrap()
            .unwrap();
        assert_eq!(t.address, Address::Unix("/tmp/s".into()));
        assert_eq!(t.export, "disk");
        let t = Target::from_uri("nbd://localhost:10810/").unwrap().unwrap();
        assert_eq!(t.address, Address::Tcp("localhost".into(), 10810));
        assert_eq!(t.export, "");
        let t = Target::from_uri("nbd://host/e").unwrap().unwrap();
        assert_eq!(t.address, Address::Tcp("host".into(), 10809));
        assert!(Target::from_uri("nbd+unix:///x").unwrap().is_err());
        assert!(Target::from_uri("/path/file.qcow2").is_none());
        assert!(Target::from_uri("nbd://:1/x").unwrap().is_err());
    }
}
