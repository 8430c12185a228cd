//! Requests in flight on one NBD connection. Any number of threads send
//! requests, each under its own cookie, and wait for their replies; the
//! replies are read by one thread at a time. A thread that reads the
//! header of a reply meant for another hands that thread the stream with
//! the header and wakes it, so that every payload is read straight into
//! the buffer of the thread that asked for it, and no thread waits for a
//! reply that is not its own. When a thread is done with its reply and
//! others still wait, it wakes one of them to read on.
//!
//! Everything the server sends is checked: magic numbers, cookies (a reply
//! for a request not in flight breaks the connection), chunk lengths
//! against what was asked. A connection that broke fails every request
//! waiting on it and every later one.

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::Thread;

use super::coverage::{Coverage, Refused};
use super::{OFFSET_HOLE, Stream, protocol, read_payload, server_error};
use crate::protocol::{
    EXTENDED_REPLY_MAGIC, MAX_OPTION, Request, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk,
    cmd, cmd_flag, read_u16, read_u32, read_u64,
};

/// One request: the command, its range, what it sends and what its reply
/// fills.
pub(super) struct Call<'a> {
    pub(super) kind: u16,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) payload: &'a [u8],
    pub(super) read_into: Option<&'a mut [u8]>,
    pub(super) status: Option<&'a mut Vec<(u64, u64)>>,
}

impl<'a> Call<'a> {
    /// A command on a range, sending and filling nothing.
    pub(super) fn new(kind: u16, offset: u64, len: u64) -> Call<'a> {
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

/// The head of a reply, or of one chunk of a structured reply.
#[derive(Debug, Clone, Copy)]
enum Header {
    Simple {
        errno: u32,
        cookie: u64,
    },
    /// A structured reply chunk, compact or extended (whose 64-bit
    /// length is the payload's).
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u64,
    },
}

impl Header {
    fn cookie(self) -> u64 {
        match self {
            Header::Simple { cookie, .. } | Header::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Bytes of replies read ahead at a time.
const REPLY_BUFFER: usize = 64 << 10;

/// The sending half.
#[derive(Debug)]
struct Sender {
    stream: Stream,
    next_cookie: u64,
}

/// The receiving half and who waits on it.
#[derive(Debug)]
struct Replies {
    /// The stream, buffered (a reply's header, and small replies whole,
    /// come in one read); `None` while a thread reads from it.
    stream: Option<BufReader<Stream>>,
    /// The header of a reply chunk read for another request: its payload
    /// is next on the stream, for that request's thread to read.
    header: Option<Header>,
    /// Requests sent (or being sent) and not answered in full.
    waiting: HashMap<u64, Waiter>,
    /// Why the connection cannot be used any more.
    broken: Option<String>,
}

/// The thread of a request in flight.
#[derive(Debug)]
struct Waiter {
    thread: Thread,
    /// Its request is sent and it waits for the reply (a thread still
    /// sending is not woken to read: the reply it would wait for could be
    /// behind its own unsent bytes).
    ready: bool,
}

/// The reply and request forms the handshake settled on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Headers {
    /// Structured replies.
    pub(super) structured: bool,
    /// Extended headers: 64-bit lengths in requests and replies, every
    /// reply chunk in the extended form.
    pub(super) extended: bool,
}

/// One connection in the transmission phase.
#[derive(Debug)]
pub(super) struct Connection {
    sender: Mutex<Sender>,
    replies: Mutex<Replies>,
    /// The header forms negotiated.
    headers: Headers,
    /// The id of the negotiated metadata context.
    context_id: Option<u32>,
    /// A handle on the socket to shut it down with, whoever holds the
    /// others.
    closer: Stream,
}

/// What a request's reply has brought so far.
struct Progress {
    /// The server's error, if it sent one.
    error: Option<io::Error>,
    /// The bytes of a READ the reply has covered.
    covered: Coverage,
}

impl Progress {
    /// A chunk filled `start..start + len` of the READ's buffer.
    fn cover(&mut self, start: u64, len: u64) -> io::Result<()> {
        self.covered
            .add(start, len)
            .map_err(|refused| match refused {
                Refused::Overlap => protocol("reply chunks that overlap"),
                Refused::Scattered => protocol("a reply scattered in too many chunks"),
            })
    }
}

impl Connection {
    /// A connection over `stream`, past the handshake.
    pub(super) fn new(
        stream: Stream,
        headers: Headers,
        context_id: Option<u32>,
    ) -> io::Result<Connection> {
        let reading = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Connection {
            sender: Mutex::new(Sender {
                stream,
                next_cookie: 1,
            }),
            replies: Mutex::new(Replies {
                stream: Some(BufReader::with_capacity(REPLY_BUFFER, reading)),
                header: None,
                waiting: HashMap::new(),
                broken: None,
            }),
            headers,
            context_id,
            closer,
        })
    }

    /// Whether extended headers were negotiated (requests may then ask
    /// about more than 4 GiB).
    pub(super) fn extended(&self) -> bool {
        self.headers.extended
    }

    fn replies(&self) -> MutexGuard<'_, Replies> {
        self.replies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one request and waits for its reply: data into `read_into`
    /// for a READ, block status descriptors into `status` for
    /// BLOCK_STATUS. An error the server answers with leaves the
    /// connection as it was; a broken stream or protocol fails it.
    pub(super) fn request(&self, call: Call<'_>) -> io::Result<()> {
        let cookie = self.send(&call)?;
        self.wait_for_reply(cookie, call)
    }

    /// Sends `call`'s request under a new cookie, its thread registered as
    /// waiting first (so that no reply can come for a cookie not known).
    fn send(&self, call: &Call<'_>) -> io::Result<u64> {
        if !self.headers.extended && call.len > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a request longer than 4 GiB needs extended headers",
            ));
        }
        let mut sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let cookie = sender.next_cookie;
        sender.next_cookie += 1;
        {
            let mut replies = self.replies();
            if replies.broken.is_some() {
                return Err(protocol("the connection to the server failed earlier"));
            }
            replies.waiting.insert(
                cookie,
                Waiter {
                    thread: std::thread::current(),
                    ready: false,
                },
            );
        }
        let request = Request {
            flags: self.request_flags(call.kind),
            kind: call.kind,
            cookie,
            offset: call.offset,
            len: call.len,
        };
        let sent = write_request(&mut sender.stream, &request, self.headers).and_then(|()| {
            match call.payload {
                [] => Ok(()),
                payload => sender.stream.write_all(payload),
            }
        });
        if let Err(e) = sent {
            // Half a request may be on the wire: nothing after it can be
            // trusted.
            self.abandon(cookie, &e.to_string());
            return Err(e);
        }
        Ok(cookie)
    }

    /// The flags a request of `kind` goes with: block status asks for one
    /// descriptor (only the first is used; without the flag a server may
    /// describe a fragmented disk in more descriptors than a chunk may
    /// bring), and a write under extended headers says its length is its
    /// payload's, as the spec requires.
    fn request_flags(&self, kind: u16) -> u16 {
        match kind {
            cmd::BLOCK_STATUS => cmd_flag::REQ_ONE,
            cmd::WRITE if self.headers.extended => cmd_flag::PAYLOAD_LEN,
            _ => 0,
        }
    }

    /// The connection broke (`why`): every thread waiting wakes to fail.
    /// The socket is shut down too, so that a thread blocked writing a
    /// request or reading a reply fails at once instead of waiting for a
    /// server that nobody reads from any more.
    fn break_connection(&self, why: &str) {
        let mut replies = self.replies();
        if replies.broken.is_none() {
            replies.broken = Some(why.to_owned());
            self.closer.shutdown(std::net::Shutdown::Both);
        }
        replies.header = None;
        for waiter in replies.waiting.values() {
            waiter.thread.unpark();
        }
    }

    /// The connection broke (`why`) while `cookie`'s thread was at it: it
    /// waits no more.
    fn abandon(&self, cookie: u64, why: &str) {
        self.break_connection(why);
        self.replies().waiting.remove(&cookie);
    }

    /// Gives the stream back after a thread's turn at it: with `next`, a
    /// header read for another request, whose thread is woken to read its
    /// payload; without, one thread waiting is woken to read on. `finished`
    /// names a request whose reply is whole. An error when `next` is for no
    /// request in flight (the caller breaks the connection).
    fn give_back(
        &self,
        stream: BufReader<Stream>,
        next: Option<Header>,
        finished: Option<u64>,
    ) -> io::Result<()> {
        let mut replies = self.replies();
        if let Some(cookie) = finished {
            replies.waiting.remove(&cookie);
        }
        let wake = match next {
            Some(next) => {
                let owner = replies
                    .waiting
                    .get(&next.cookie())
                    .ok_or_else(|| protocol("a reply for a request not in flight"))?;
                Some(owner.thread.clone())
            }
            None => replies
                .waiting
                .values()
                .find(|w| w.ready)
                .map(|w| w.thread.clone()),
        };
        replies.header = next;
        replies.stream = Some(stream);
        // Woken once the lock is free, so that it need not wait for it.
        drop(replies);
        if let Some(thread) = wake {
            thread.unpark();
        }
        Ok(())
    }

    /// Waits until this thread may read from the stream with its cookie:
    /// the stream is free, with no header read or one for `cookie`.
    fn wait_for_reply(&self, cookie: u64, mut call: Call<'_>) -> io::Result<()> {
        let mut progress = Progress {
            error: None,
            covered: Coverage::default(),
        };
        loop {
            let (stream, header) = {
                let mut replies = self.replies();
                if let Some(waiter) = replies.waiting.get_mut(&cookie) {
                    waiter.ready = true;
                }
                loop {
                    if replies.broken.is_some() {
                        replies.waiting.remove(&cookie);
                        return Err(protocol("the connection to the server failed earlier"));
                    }
                    let mine = match replies.header {
                        None => true,
                        Some(header) => header.cookie() == cookie,
                    };
                    if mine {
                        if let Some(stream) = replies.stream.take() {
                            break (stream, replies.header.take());
                        }
                    }
                    drop(replies);
                    std::thread::park();
                    replies = self.replies();
                }
            };
            // A thread that panics while it holds the stream takes it
            // along: the connection breaks, so that nobody waits for it.
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.read_replies(stream, header, cookie, &mut call, &mut progress)
            }));
            let read = match read {
                Ok(read) => read,
                Err(panic) => {
                    self.abandon(cookie, "a thread reading a reply panicked");
                    std::panic::resume_unwind(panic);
                }
            };
            match read {
                Ok(Turn::Done(mut stream, answer)) => {
                    // The next reply's header, when it is already here,
                    // goes straight to its thread; otherwise a thread
                    // waiting reads on. This reply stands either way.
                    let next = if header_buffered(&stream) {
                        self.read_header(&mut stream).map(Some)
                    } else {
                        Ok(None)
                    };
                    if let Err(e) = next.and_then(|next| self.give_back(stream, next, Some(cookie)))
                    {
                        self.abandon(cookie, &e.to_string());
                    }
                    return answer;
                }
                Ok(Turn::HandedOver) => {}
                Err(e) => {
                    self.abandon(cookie, &e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// Reads reply chunks from `stream` (after `header`, already read)
    /// until this request's reply is whole or a chunk for another request
    /// comes, which is handed to that request's thread with the stream.
    fn read_replies(
        &self,
        mut stream: BufReader<Stream>,
        mut header: Option<Header>,
        cookie: u64,
        call: &mut Call<'_>,
        progress: &mut Progress,
    ) -> io::Result<Turn> {
        loop {
            let next = match header.take() {
                Some(header) => header,
                None => self.read_header(&mut stream)?,
            };
            if next.cookie() != cookie {
                self.give_back(stream, Some(next), None)?;
                return Ok(Turn::HandedOver);
            }
            if let Some(answer) = self.read_chunk(&mut stream, next, call, progress)? {
                return Ok(Turn::Done(stream, answer));
            }
        }
    }

    /// Reads the head of a reply or of a structured reply's chunk.
    fn read_header(&self, stream: &mut impl io::Read) -> io::Result<Header> {
        let magic = read_u32(stream)?;
        if self.headers.extended {
            // Every reply chunk comes in the extended form.
            if magic != EXTENDED_REPLY_MAGIC {
                return Err(protocol(format!("bad reply magic {magic:#x}")));
            }
            let flags = read_u16(stream)?;
            let kind = read_u16(stream)?;
            let cookie = read_u64(stream)?;
            let _offset = read_u64(stream)?;
            let len = read_u64(stream)?;
            return Ok(Header::Chunk {
                flags,
                kind,
                cookie,
                len,
            });
        }
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = read_u32(stream)?;
            let cookie = read_u64(stream)?;
            return Ok(Header::Simple { errno, cookie });
        }
        if magic != STRUCTURED_REPLY_MAGIC || !self.headers.structured {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        let flags = read_u16(stream)?;
        let kind = read_u16(stream)?;
        let cookie = read_u64(stream)?;
        let len = u64::from(read_u32(stream)?);
        Ok(Header::Chunk {
            flags,
            kind,
            cookie,
            len,
        })
    }

    /// Reads the payload `header` announced for `call`. The reply's answer
    /// once it is whole (the server's error, or success), `None` while
    /// more chunks are to come. An outer error: the stream failed or the
    /// server broke the protocol.
    fn read_chunk(
        &self,
        stream: &mut impl io::Read,
        header: Header,
        call: &mut Call<'_>,
        progress: &mut Progress,
    ) -> io::Result<Option<io::Result<()>>> {
        let (flags, kind, len) = match header {
            Header::Simple { errno, .. } => {
                if errno != 0 {
                    return Ok(Some(Err(server_error(
                        errno,
                        "the server failed the request",
                    ))));
                }
                if let Some(buf) = call.read_into.as_deref_mut() {
                    io::Read::read_exact(stream, buf)?;
                }
                return Ok(Some(Ok(())));
            }
            Header::Chunk {
                flags, kind, len, ..
            } => (flags, kind, len),
        };
        let offset = call.offset;
        match kind {
            chunk::NONE if len == 0 => {}
            chunk::OFFSET_DATA => {
                let buf = call
                    .read_into
                    .as_deref_mut()
                    .ok_or_else(|| protocol("data for a request that reads none"))?;
                if len < 8 {
                    return Err(protocol("a data chunk without its offset"));
                }
                let at = read_u64(stream)?;
                let n = len - 8;
                let start = at
                    .checked_sub(offset)
                    .filter(|s| s.checked_add(n).is_some_and(|end| end <= buf.len() as u64))
                    .ok_or_else(|| protocol("a data chunk outside the request"))?;
                io::Read::read_exact(stream, &mut buf[start as usize..(start + n) as usize])?;
                progress.cover(start, n)?;
            }
            OFFSET_HOLE => {
                let buf = call
                    .read_into
                    .as_deref_mut()
                    .ok_or_else(|| protocol("a hole for a request that reads none"))?;
                if len != 12 {
                    return Err(protocol("a hole chunk of the wrong length"));
                }
                let at = read_u64(stream)?;
                let n = u64::from(read_u32(stream)?);
                let start = at
                    .checked_sub(offset)
                    .filter(|s| s.checked_add(n).is_some_and(|end| end <= buf.len() as u64))
                    .ok_or_else(|| protocol("a hole chunk outside the request"))?;
                buf[start as usize..(start + n) as usize].fill(0);
                progress.cover(start, n)?;
            }
            chunk::BLOCK_STATUS => {
                let list = call
                    .status
                    .as_deref_mut()
                    .ok_or_else(|| protocol("block status for another request"))?;
                // Compact chunks may come under extended headers too.
                if len < 4 || (len - 4) % 8 != 0 {
                    return Err(protocol("a block status chunk of the wrong length"));
                }
                let data = read_payload(stream, len, MAX_OPTION)?;
                let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                // The first descriptor is all that is used: keeping only it
                // bounds what an endless reply can cost.
                if Some(id) == self.context_id && list.is_empty() {
                    if let Some(d) = data[4..].chunks_exact(8).next() {
                        list.push((
                            u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]])),
                            u64::from(u32::from_be_bytes([d[4], d[5], d[6], d[7]])),
                        ));
                    }
                }
            }
            chunk::BLOCK_STATUS_EXT => {
                let list = call
                    .status
                    .as_deref_mut()
                    .ok_or_else(|| protocol("block status for another request"))?;
                if !self.headers.extended || len < 8 || (len - 8) % 16 != 0 {
                    return Err(protocol("a block status chunk of the wrong length"));
                }
                let data = read_payload(stream, len, MAX_OPTION)?;
                let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                // After the context and the descriptor count, 64-bit
                // lengths and flags; the first is all that is used.
                if Some(id) == self.context_id && list.is_empty() {
                    if let Some(d) = data[8..].chunks_exact(16).next() {
                        let word = |at: usize| {
                            let mut bytes = [0u8; 8];
                            bytes.copy_from_slice(&d[at..at + 8]);
                            u64::from_be_bytes(bytes)
                        };
                        list.push((word(0), word(8)));
                    }
                }
            }
            kind if kind & (1 << 15) != 0 => {
                if len < 6 {
                    return Err(protocol("an error chunk of the wrong length"));
                }
                let data = read_payload(stream, len, MAX_OPTION)?;
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
                progress.error.get_or_insert(server_error(errno, &what));
            }
            _ => {
                // Unknown chunks are skipped (bounded).
                read_payload(stream, len, MAX_OPTION)?;
            }
        }
        if flags & chunk::FLAG_DONE == 0 {
            return Ok(None);
        }
        if let Some(e) = progress.error.take() {
            return Ok(Some(Err(e)));
        }
        // A READ's chunks must have covered all it asked for.
        let covered = progress.covered.total();
        if call.read_into.is_some() && covered < call.len {
            return Err(protocol(format!(
                "the server's reply left {} of {} bytes unread",
                call.len - covered,
                call.len
            )));
        }
        Ok(Some(Ok(())))
    }

    /// Says goodbye (NBD_CMD_DISC); the server closes the connection.
    pub(super) fn disconnect(&mut self) {
        let sender = self
            .sender
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let request = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let _ = write_request(&mut sender.stream, &request, self.headers);
        // Nothing follows (under TLS, the session's close_notify).
        sender.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Writes `request`'s header in the form `headers` says.
fn write_request(stream: &mut Stream, request: &Request, headers: Headers) -> io::Result<()> {
    if headers.extended {
        stream.write_all(&request.encode_extended())
    } else {
        stream.write_all(&request.encode())
    }
}

/// Whether a whole reply header waits in `stream`'s buffer (so reading it
/// costs no system call and cannot block).
fn header_buffered(stream: &BufReader<Stream>) -> bool {
    let buffered = stream.buffer();
    match buffered.get(..4) {
        Some(magic) if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() => buffered.len() >= 16,
        Some(magic) if magic == STRUCTURED_REPLY_MAGIC.to_be_bytes() => buffered.len() >= 20,
        Some(magic) if magic == EXTENDED_REPLY_MAGIC.to_be_bytes() => buffered.len() >= 32,
        // Anything else is read (and refused) by the next reader.
        _ => false,
    }
}

/// How a thread's turn at the stream ended.
enum Turn {
    /// Its reply is whole: the stream to give back, and the answer.
    Done(BufReader<Stream>, io::Result<()>),
    /// A chunk for another request came; that request's thread has the
    /// stream now.
    HandedOver,
}
