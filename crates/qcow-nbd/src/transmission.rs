//! The transmission phase: requests are read in order, run by a few
//! workers at once (several in flight per connection), and answered as
//! they complete. Every bad request gets an NBD error; only a stream that
//! cannot be trusted any more (a bad magic, a write payload too large to
//! skip, a closed connection) ends the connection.

use std::io::{self, Read, Write};
use std::sync::{Mutex, PoisonError};

use qcow::ErrorKind;

use crate::export::{Context, DetectZeroes};
use crate::handshake::Negotiated;
use crate::protocol::{
    MAX_BUFFER, Request, RequestError, chunk, chunk_header, cmd, cmd_flag, errno, extended_header,
    simple_reply,
};

/// Requests run at once per connection: as many as there are processors,
/// at least 2 (a slow request must not stall the others) and at most 8
/// (beyond the processors, workers only contend for the reader).
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}
/// Block status descriptors per context in one reply, at most.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Largest BLOCK_STATUS payload read (a length and context IDs).
const MAX_STATUS_PAYLOAD: u64 = 64 << 10;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    /// The client sent NBD_CMD_DISC.
    #[error("the client disconnected")]
    Disconnect,
    /// The connection closed or failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Serves requests from `reader`, replying on `writer`, until the client
/// disconnects or the stream fails. Requests in flight are finished first.
///
/// Each worker takes the reader in turn, reads one request (and its
/// payload), lets go of the reader and runs the request: the next request
/// is read by the next free worker, with no hand-over between threads.
pub fn transmission(
    reader: &mut (impl Read + Send),
    writer: impl Write + Send,
    negotiated: &Negotiated,
) -> ConnectionEnd {
    let writer = Mutex::new(writer);
    let reader = Mutex::new(reader);
    let ended: Mutex<Option<ConnectionEnd>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers() {
            let (reader, writer, ended) = (&reader, &writer, &ended);
            scope.spawn(move || {
                loop {
                    let next = {
                        let mut reader = reader.lock().unwrap_or_else(PoisonError::into_inner);
                        if ended
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .is_some()
                        {
                            return;
                        }
                        let next = read_request(&mut **reader, negotiated, writer);
                        if let Err(end) = &next {
                            let mut slot = ended.lock().unwrap_or_else(PoisonError::into_inner);
                            if slot.is_none() {
                                *slot = Some(match end {
                                    ConnectionEnd::Disconnect => ConnectionEnd::Disconnect,
                                    ConnectionEnd::Io(e) => {
                                        ConnectionEnd::Io(io::Error::new(e.kind(), e.to_string()))
                                    }
                                    ConnectionEnd::Protocol(m) => {
                                        ConnectionEnd::Protocol(m.clone())
                                    }
                                });
                            }
                        }
                        next
                    };
                    let Ok((request, payload)) = next else {
                        return;
                    };
                    // A reply that cannot be sent ends the connection: the
                    // next read fails.
                    let _ = answer(negotiated, &request, &payload, writer);
                }
            });
        }
    });
    ended
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or(ConnectionEnd::Disconnect)
}

/// Reads one request and its payload.
fn read_request(
    reader: &mut impl Read,
    negotiated: &Negotiated,
    writer: &Mutex<impl Write>,
) -> Result<(Request, Vec<u8>), ConnectionEnd> {
    let request = match Request::read_from(reader, negotiated.extended) {
        Ok(r) => r,
        Err(RequestError::Io(e)) => return Err(ConnectionEnd::Io(e)),
        Err(RequestError::Magic(m)) => {
            return Err(ConnectionEnd::Protocol(format!("bad request magic {m:#x}")));
        }
    };
    let mut payload = Vec::new();
    if request.kind == cmd::WRITE {
        if request.len > u64::from(MAX_BUFFER) {
            // The payload cannot be skipped safely: answer, then hang up.
            let _ = send_error(
                negotiated,
                &request,
                errno::EINVAL,
                "request too large",
                writer,
            );
            return Err(ConnectionEnd::Protocol(format!(
                "write of {} bytes",
                request.len
            )));
        }
        payload = vec![0u8; request.len as usize];
        reader.read_exact(&mut payload)?;
    } else if negotiated.extended
        && request.kind != cmd::BLOCK_STATUS
        && request.flags & cmd_flag::PAYLOAD_LEN != 0
    {
        // A payload no other command takes: read past it, then refuse the
        // request (a payload too large to skip ends the connection).
        if request.len > u64::from(MAX_BUFFER) {
            let _ = send_error(
                negotiated,
                &request,
                errno::EINVAL,
                "payload too large",
                writer,
            );
            return Err(ConnectionEnd::Protocol(format!(
                "payload of {} bytes",
                request.len
            )));
        }
        io::copy(&mut Read::by_ref(reader).take(request.len), &mut io::sink())?;
        let mut refused = request;
        refused.kind = u16::MAX;
        return Ok((refused, Vec::new()));
    } else if negotiated.extended
        && request.kind == cmd::BLOCK_STATUS
        && request.flags & cmd_flag::PAYLOAD_LEN != 0
    {
        // The contexts to report: a length and a few context IDs.
        if request.len > MAX_STATUS_PAYLOAD {
            let _ = send_error(
                negotiated,
                &request,
                errno::EINVAL,
                "payload too large",
                writer,
            );
            return Err(ConnectionEnd::Protocol(format!(
                "block status payload of {} bytes",
                request.len
            )));
        }
        payload = vec![0u8; request.len as usize];
        reader.read_exact(&mut payload)?;
    }
    if request.kind == cmd::DISC {
        return Err(ConnectionEnd::Disconnect);
    }
    Ok((request, payload))
}

/// Whether `data` is all zeros.
fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// The NBD error for an engine error.
fn errno_of(error: &qcow::Error) -> u32 {
    match error.kind() {
        ErrorKind::InvalidInput => errno::EINVAL,
        ErrorKind::ReadOnly => errno::EPERM,
        ErrorKind::Limit => errno::ENOSPC,
        ErrorKind::Unsupported => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

/// Runs one request and sends its reply.
fn answer(
    negotiated: &Negotiated,
    request: &Request,
    payload: &[u8],
    writer: &Mutex<impl Write>,
) -> io::Result<()> {
    let export = &negotiated.export;
    let device = &*export.device;
    let size = device.virtual_size();
    // A BLOCK_STATUS payload says the length and which contexts.
    let mut contexts: Vec<Context> = negotiated.contexts.clone();
    let mut request = *request;
    if request.kind == cmd::BLOCK_STATUS && !payload.is_empty() {
        let ids: Vec<u32> = payload
            .get(8..)
            .unwrap_or(&[])
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let well_formed = payload.len() >= 12 && (payload.len() - 8) % 4 == 0;
        let known = ids
            .iter()
            .all(|id| negotiated.contexts.iter().any(|c| c.id() == *id));
        if !well_formed || !known {
            return send_error(
                negotiated,
                &request,
                errno::EINVAL,
                "bad block status payload",
                writer,
            );
        }
        let mut effect = [0u8; 8];
        effect.copy_from_slice(&payload[..8]);
        request.len = u64::from_be_bytes(effect);
        contexts.retain(|c| ids.contains(&c.id()));
    }
    let request = &request;
    let len = request.len;
    let in_range = request
        .offset
        .checked_add(len)
        .is_some_and(|end| end <= size);
    let fail = |code: u32, why: &str| send_error(negotiated, request, code, why, writer);
    let known_flags = cmd_flag::FUA
        | cmd_flag::NO_HOLE
        | cmd_flag::DF
        | cmd_flag::REQ_ONE
        | cmd_flag::FAST_ZERO
        | cmd_flag::PAYLOAD_LEN;
    if request.flags & !known_flags != 0 {
        return fail(errno::EINVAL, "unknown command flags");
    }
    let writes = matches!(request.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && export.read_only {
        return fail(errno::EPERM, "the export is read-only");
    }
    let needs_range = matches!(
        request.kind,
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::BLOCK_STATUS
    );
    if needs_range && !in_range {
        // As qemu-nbd: writes past the end have no space, the rest are
        // invalid.
        let code = if matches!(request.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return fail(code, "request past the end of the export");
    }
    let fua = |done: qcow::Result<()>| {
        done.and_then(|()| {
            if request.flags & cmd_flag::FUA != 0 {
                device.flush()
            } else {
                Ok(())
            }
        })
    };
    let done = match request.kind {
        cmd::READ => {
            if request.len > u64::from(MAX_BUFFER) {
                return fail(errno::EINVAL, "request too large");
            }
            let mut data = vec![0u8; request.len as usize];
            return match device.read_at(&mut data, request.offset) {
                Ok(()) => send_data(negotiated, request, &data, writer),
                Err(e) => fail(errno_of(&e), &e.to_string()),
            };
        }
        cmd::WRITE if export.detect_zeroes != DetectZeroes::Off && is_zero(payload) => {
            let unmap = export.detect_zeroes == DetectZeroes::Unmap && export.discard;
            fua(device.write_zeroes(request.offset, len, unmap))
        }
        cmd::WRITE => fua(device.write_at(payload, request.offset)),
        cmd::FLUSH => device.flush(),
        cmd::TRIM => {
            if export.discard {
                fua(device.discard(request.offset, len))
            } else {
                Ok(())
            }
        }
        cmd::WRITE_ZEROES => {
            // FAST_ZERO: only whole clusters are zeroed fast (in their
            // entries); anything else would write zeros, so refuse it.
            let fast = device.cluster_size().is_some_and(|cs| {
                request.offset % cs == 0 && (len % cs == 0 || request.offset + len == size)
            });
            if request.flags & cmd_flag::FAST_ZERO != 0 && !fast {
                return fail(errno::ENOTSUP, "zeroing this range would not be fast");
            }
            let unmap = request.flags & cmd_flag::NO_HOLE == 0 && export.discard;
            fua(device.write_zeroes(request.offset, len, unmap))
        }
        cmd::CACHE => Ok(()),
        cmd::BLOCK_STATUS => {
            if !negotiated.structured || negotiated.contexts.is_empty() {
                return fail(errno::EINVAL, "no metadata context was selected");
            }
            if len == 0 {
                return fail(errno::EINVAL, "empty block status request");
            }
            return send_status(negotiated, &contexts, request, writer);
        }
        _ => return fail(errno::EINVAL, "unknown command"),
    };
    match done {
        Ok(()) => send_ok(negotiated, request, writer),
        Err(e) => fail(errno_of(&e), &e.to_string()),
    }
}

/// Sends one reply's parts with as few system calls as the socket takes
/// (one `writev` in the usual case), under the writer's lock so that
/// replies never interleave.
fn send(writer: &Mutex<impl Write>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

/// The header of a reply chunk: compact, or extended (with the request's
/// offset and a 64-bit length) when extended headers were negotiated.
fn header(
    negotiated: &Negotiated,
    flags: u16,
    kind: u16,
    request: &Request,
    len: usize,
) -> Vec<u8> {
    if negotiated.extended {
        extended_header(flags, kind, request.cookie, request.offset, len as u64).to_vec()
    } else {
        // Payloads are bounded well under 4 GiB (MAX_BUFFER of data, or
        // MAX_DESCRIPTORS descriptors).
        chunk_header(flags, kind, request.cookie, len as u32).to_vec()
    }
}

fn send_ok(
    negotiated: &Negotiated,
    request: &Request,
    writer: &Mutex<impl Write>,
) -> io::Result<()> {
    if negotiated.structured {
        send(
            writer,
            &[&header(
                negotiated,
                chunk::FLAG_DONE,
                chunk::NONE,
                request,
                0,
            )],
        )
    } else {
        send(writer, &[&simple_reply(0, request.cookie)])
    }
}

fn send_data(
    negotiated: &Negotiated,
    request: &Request,
    data: &[u8],
    writer: &Mutex<impl Write>,
) -> io::Result<()> {
    if negotiated.structured {
        let header = header(
            negotiated,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            request,
            8 + data.len(),
        );
        send(writer, &[&header, &request.offset.to_be_bytes(), data])
    } else {
        send(writer, &[&simple_reply(0, request.cookie), data])
    }
}

fn send_error(
    negotiated: &Negotiated,
    request: &Request,
    code: u32,
    message: &str,
    writer: &Mutex<impl Write>,
) -> io::Result<()> {
    if negotiated.structured {
        let message = &message.as_bytes()[..message.len().min(4096)];
        let mut payload = Vec::with_capacity(6 + message.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message);
        let header = header(
            negotiated,
            chunk::FLAG_DONE,
            chunk::ERROR,
            request,
            payload.len(),
        );
        send(writer, &[&header, &payload])
    } else {
        send(writer, &[&simple_reply(code, request.cookie)])
    }
}

/// One BLOCK_STATUS chunk per selected context (BLOCK_STATUS_EXT with 64-bit
/// descriptors under extended headers), the last one marked done.
fn send_status(
    negotiated: &Negotiated,
    contexts: &[Context],
    request: &Request,
    writer: &Mutex<impl Write>,
) -> io::Result<()> {
    let max = if request.flags & cmd_flag::REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for context in contexts {
        let descriptors = match status(negotiated, context, request, max) {
            Ok(d) => d,
            Err(e) => {
                return send_error(negotiated, request, errno_of(&e), &e.to_string(), writer);
            }
        };
        let mut payload = Vec::with_capacity(8 + 16 * descriptors.len());
        payload.extend_from_slice(&context.id().to_be_bytes());
        if negotiated.extended {
            // At most MAX_DESCRIPTORS.
            payload.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
            for (len, flags) in descriptors {
                payload.extend_from_slice(&u64::from(len).to_be_bytes());
                payload.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
        } else {
            for (len, flags) in descriptors {
                payload.extend_from_slice(&len.to_be_bytes());
                payload.extend_from_slice(&flags.to_be_bytes());
            }
        }
        chunks.push(payload);
    }
    let kind = if negotiated.extended {
        chunk::BLOCK_STATUS_EXT
    } else {
        chunk::BLOCK_STATUS
    };
    let count = chunks.len();
    let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
    for (i, payload) in chunks.iter().enumerate() {
        let flags = if i + 1 == count { chunk::FLAG_DONE } else { 0 };
        w.write_all(&header(negotiated, flags, kind, request, payload.len()))?;
        w.write_all(payload)?;
    }
    w.flush()
}

fn status(
    negotiated: &Negotiated,
    context: &Context,
    request: &Request,
    max: usize,
) -> qcow::Result<Vec<(u32, u32)>> {
    negotiated
        .export
        .status(context, request.offset, request.len, max)
}
