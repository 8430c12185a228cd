//! An NBD client: one export of a server (over a Unix socket or TCP) as a
//! [`qcow_io::Storage`], so that a raw image over it is a disk the engine
//! reads, maps and writes like any other (qemu-img's `nbd://` and
//! `nbd+unix://` names and its `driver=nbd` options).
//!
//! The handshake is fixed newstyle: structured replies when the server has
//! them, one metadata context for block status (`base:allocation`, or the
//! one named, as QEMU's `x-dirty-bitmap` names one), then `NBD_OPT_GO`.
//! Requests go one at a time over the connection. Everything the server
//! sends is checked: magic numbers, cookies, chunk lengths against what was
//! asked; a server that breaks the protocol gets an error, never a panic or
//! an allocation it sized.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};

use qcow_io::{Storage, StorageExtent};

use crate::protocol::{
    IHAVEOPT, MAX_BUFFER, MAX_OPTION, NBD_MAGIC, OPTION_REPLY_MAGIC, Request, SIMPLE_REPLY_MAGIC,
    STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC, chunk, cmd, flag, info, opt, read_u16,
    read_u32, read_u64, rep,
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
}

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

/// The connection's stream.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A connection in the transmission phase.
#[derive(Debug)]
struct Connection {
    stream: Stream,
    next_cookie: u64,
    /// A reply was left half read (or a request half sent): the stream
    /// cannot be trusted any more.
    broken: bool,
}

/// One export of an NBD server, as storage.
#[derive(Debug)]
pub struct NbdClient {
    name: String,
    connection: Mutex<Connection>,
    size: u64,
    flags: u16,
    structured: bool,
    /// The id of the negotiated metadata context.
    context_id: Option<u32>,
}

/// A protocol violation or a refusal, as an I/O error.
fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads `len` bytes the server announced, refusing more than `max`.
fn read_payload(stream: &mut impl Read, len: u32, max: u32) -> io::Result<Vec<u8>> {
    if len > max {
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

/// One request: the command, its range, what it sends and what its reply
/// fills.
struct Call<'a> {
    kind: u16,
    offset: u64,
    len: u32,
    payload: &'a [u8],
    read_into: Option<&'a mut [u8]>,
    status: Option<&'a mut Vec<(u32, u32)>>,
}

impl<'a> Call<'a> {
    /// A command on a range, sending and filling nothing.
    fn new(kind: u16, offset: u64, len: u32) -> Call<'a> {
        Call {
            kind,
            offset,
            len,
            payload: &[],
            read_into: None,
            status: None,
        }
    }
}

/// One option reply.
struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

impl NbdClient {
    /// Connects to `target` and negotiates its export.
    pub fn connect(target: &Target) -> io::Result<NbdClient> {
        let stream = match &target.address {
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Address::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port))?;
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

        // Structured replies, when the server has them.
        send_option(&mut stream, opt::STRUCTURED_REPLY, &[])?;
        let reply = read_option_reply(&mut stream, opt::STRUCTURED_REPLY)?;
        let structured = reply.kind == rep::ACK;

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
            connection: Mutex::new(Connection {
                stream,
                next_cookie: 1,
                broken: false,
            }),
            size,
            flags,
            structured,
            context_id,
        })
    }

    /// The export's name for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & flag::READ_ONLY != 0
    }

    /// Sends one request and reads its reply: data into `read_into` for a
    /// READ, block status descriptors into `status` for BLOCK_STATUS.
    fn request(&self, call: Call<'_>) -> io::Result<()> {
        let mut guard = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.broken {
            return Err(protocol("the connection to the server failed earlier"));
        }
        guard.broken = true;
        match self.exchange(&mut guard, call) {
            // The reply was read whole: the stream is still in step.
            Ok(answer) => {
                guard.broken = false;
                answer
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one request and reads its whole reply. The outer error: the
    /// stream failed or the server broke the protocol; the inner one: the
    /// server answered with an error.
    fn exchange(&self, conn: &mut Connection, call: Call<'_>) -> io::Result<io::Result<()>> {
        let Call {
            kind,
            offset,
            len,
            payload,
            mut read_into,
            mut status,
        } = call;
        let flags = 0;
        let cookie = conn.next_cookie;
        conn.next_cookie += 1;
        let request = Request {
            flags,
            kind,
            cookie,
            offset,
            len: u64::from(len),
        };
        conn.stream.write_all(&request.encode())?;
        if !payload.is_empty() {
            conn.stream.write_all(payload)?;
        }
        let stream = &mut conn.stream;
        let mut error = None;
        let mut covered = 0u64;
        loop {
            let magic = read_u32(stream)?;
            if magic == SIMPLE_REPLY_MAGIC {
                let errno = read_u32(stream)?;
                if read_u64(stream)? != cookie {
                    return Err(protocol("a reply for another request"));
                }
                if errno != 0 {
                    return Ok(Err(server_error(errno, "the server failed the request")));
                }
                if let Some(buf) = read_into.as_deref_mut() {
                    stream.read_exact(buf)?;
                }
                return Ok(Ok(()));
            }
            if magic != STRUCTURED_REPLY_MAGIC || !self.structured {
                return Err(protocol(format!("bad reply magic {magic:#x}")));
            }
            let chunk_flags = read_u16(stream)?;
            let chunk_kind = read_u16(stream)?;
            if read_u64(stream)? != cookie {
                return Err(protocol("a reply chunk for another request"));
            }
            let chunk_len = read_u32(stream)?;
            match chunk_kind {
                chunk::NONE if chunk_len == 0 => {}
                chunk::OFFSET_DATA => {
                    let buf = read_into
                        .as_deref_mut()
                        .ok_or_else(|| protocol("data for a request that reads none"))?;
                    if chunk_len < 8 {
                        return Err(protocol("a data chunk without its offset"));
                    }
                    let at = read_u64(stream)?;
                    let n = u64::from(chunk_len - 8);
                    let start = at
                        .checked_sub(offset)
                        .filter(|s| s.checked_add(n).is_some_and(|end| end <= buf.len() as u64))
                        .ok_or_else(|| protocol("a data chunk outside the request"))?;
                    stream.read_exact(&mut buf[start as usize..(start + n) as usize])?;
                    covered += n;
                }
                OFFSET_HOLE => {
                    let buf = read_into
                        .as_deref_mut()
                        .ok_or_else(|| protocol("a hole for a request that reads none"))?;
                    if chunk_len != 12 {
                        return Err(protocol("a hole chunk of the wrong length"));
                    }
                    let at = read_u64(stream)?;
                    let n = u64::from(read_u32(stream)?);
                    let start = at
                        .checked_sub(offset)
                        .filter(|s| s.checked_add(n).is_some_and(|end| end <= buf.len() as u64))
                        .ok_or_else(|| protocol("a hole chunk outside the request"))?;
                    buf[start as usize..(start + n) as usize].fill(0);
                    covered += n;
                }
                chunk::BLOCK_STATUS => {
                    let list = status
                        .as_deref_mut()
                        .ok_or_else(|| protocol("block status for another request"))?;
                    if chunk_len < 4 || (chunk_len - 4) % 8 != 0 {
                        return Err(protocol("a block status chunk of the wrong length"));
                    }
                    let data = read_payload(stream, chunk_len, MAX_OPTION)?;
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    // The first descriptor is all that is used: keeping
                    // only it bounds what an endless reply can cost.
                    if Some(id) == self.context_id && list.is_empty() {
                        if let Some(d) = data[4..].chunks_exact(8).next() {
                            list.push((
                                u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                                u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                            ));
                        }
                    }
                }
                kind if kind & (1 << 15) != 0 => {
                    if chunk_len < 6 {
                        return Err(protocol("an error chunk of the wrong length"));
                    }
                    let data = read_payload(stream, chunk_len, MAX_OPTION)?;
                    let errno = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let message_len = usize::from(u16::from_be_bytes([data[4], data[5]]));
                    let message = data
                        .get(6..6 + message_len)
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    let what = if message.is_empty() {
                        "the server failed the request".to_owned()
                    } else {
                        message
                    };
                    error.get_or_insert(server_error(errno, &what));
                }
                _ => {
                    // Unknown chunks are skipped (bounded).
                    read_payload(stream, chunk_len, MAX_OPTION)?;
                }
            }
            if chunk_flags & chunk::FLAG_DONE != 0 {
                if let Some(e) = error {
                    return Ok(Err(e));
                }
                // A READ's chunks must have covered all it asked for.
                if read_into.is_some() && covered < u64::from(len) {
                    return Err(protocol(format!(
                        "the server's reply left {} of {len} bytes unread",
                        u64::from(len) - covered
                    )));
                }
                return Ok(Ok(()));
            }
        }
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

fn read_option_reply(stream: &mut impl Read, option: u32) -> io::Result<OptionReply> {
    if read_u64(stream)? != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    if read_u32(stream)? != option {
        return Err(protocol("a reply to another option"));
    }
    let kind = read_u32(stream)?;
    let len = read_u32(stream)?;
    let data = read_payload(stream, len, MAX_OPTION)?;
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
                ..Call::new(cmd::READ, at, len as u32)
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
            self.request(Call {
                payload: piece,
                ..Call::new(cmd::WRITE, at, len as u32)
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
            self.request(Call::new(cmd::TRIM, at, n as u32))?;
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
            self.request(Call::new(cmd::WRITE_ZEROES, at, n as u32))?;
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
        let mut status = Vec::new();
        let asked = len.min(u64::from(MAX_BUFFER)) as u32;
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
        Ok(StorageExtent {
            data: flags & STATE_HOLE == 0,
            zero: flags & STATE_ZERO != 0,
            len: u64::from(run).min(len),
        })
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // A polite goodbye; the server closes the connection.
        let conn = self
            .connection
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let request = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let _ = conn.stream.write_all(&request.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's handshake: structured replies, base:allocation as
    /// context 1, an export of `size` bytes that takes flushes.
    fn handshake(size: u64) -> Vec<u8> {
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
        out.extend(reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
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
        let mut script = handshake(1 << 20);
        let mut error = 5u32.to_be_bytes().to_vec();
        error.extend_from_slice(&0u16.to_be_bytes());
        script.extend(chunk(chunk::FLAG_DONE, chunk::ERROR, 1, &error));
        let mut data = 512u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9u8; 512]);
        script.extend(chunk(
            0,
            OFFSET_HOLE,
            2,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0],
        ));
        script.extend(chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, 2, &data));
        let client = scripted(script);
        let mut buf = [1u8; 1024];
        assert!(client.read_at(&mut buf, 0).is_err());
        client.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..512], &[0u8; 512][..]);
        assert_eq!(&buf[512..], &[9u8; 512][..]);
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
