//! The fixed newstyle handshake: the server's greeting, the client's flags,
//! then options until the client picks an export (NBD_OPT_EXPORT_NAME or
//! NBD_OPT_GO) or gives up. Every malformed option gets an error reply (or,
//! when the stream cannot be trusted, the connection ends); nothing a
//! client sends makes the server allocate more than [`MAX_OPTION`] bytes.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::export::{Context, Export};
use crate::protocol::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_BUFFER, MAX_NAME, MAX_OPTION, NBD_MAGIC,
    info, opt, read_u32, read_u64, rep, write_option_reply,
};

/// What the handshake settled.
#[derive(Debug)]
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Whether replies are structured.
    pub structured: bool,
    /// Whether requests and replies use extended headers (64-bit lengths;
    /// replies are then structured).
    pub extended: bool,
    /// The metadata contexts selected for BLOCK_STATUS.
    pub contexts: Vec<Context>,
}

/// How the handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed or closed.
    #[error("handshake: {0}")]
    Io(#[from] io::Error),
    /// The client sent something that ends the conversation.
    #[error("handshake: {0}")]
    Protocol(String),
    /// The client aborted.
    #[error("the client aborted the handshake")]
    Aborted,
    /// The TLS handshake after NBD_OPT_STARTTLS failed.
    #[error("{0}")]
    Tls(String),
}

/// Turns the handshake's stream into the plaintext stream of a TLS
/// session with the client (after NBD_OPT_STARTTLS is acknowledged).
pub type StartTls<'a, S> = &'a dyn Fn(&mut S) -> Result<(), String>;

/// Runs the server side of the handshake over `stream` for `exports`,
/// without TLS.
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    exports: &[Arc<Export>],
) -> Result<Negotiated, HandshakeError> {
    handshake_with_tls(stream, exports, None)
}

/// Runs the server side of the handshake over `stream` for `exports`. With
/// `start_tls`, TLS is required, as qemu-nbd requires it when it has TLS
/// credentials: until NBD_OPT_STARTTLS every option but ABORT is refused
/// (NBD_OPT_EXPORT_NAME, which has no error reply, ends the connection).
pub fn handshake_with_tls<S: Read + Write>(
    stream: &mut S,
    exports: &[Arc<Export>],
    start_tls: Option<StartTls<'_, S>>,
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    let client_flags = read_u32(stream)?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(HandshakeError::Protocol(
            "the client does not speak fixed newstyle".into(),
        ));
    }
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<Context> = Vec::new();
    let mut tls_pending = start_tls.is_some();
    loop {
        let magic = read_u64(stream)?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION {
            // Too long to read: skip it if it is not absurd, else stop.
            if len > MAX_BUFFER {
                return Err(HandshakeError::Protocol(format!(
                    "option {option} of {len} bytes"
                )));
            }
            io::copy(
                &mut Read::by_ref(stream).take(u64::from(len)),
                &mut io::sink(),
            )?;
            write_option_reply(stream, option, rep::ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        if let (true, Some(start_tls)) = (tls_pending, start_tls) {
            let refusal = format!("Option {option:#x} not permitted before TLS");
            match option {
                opt::STARTTLS if !data.is_empty() => {
                    // A client that cannot start TLS right is told why,
                    // then dropped, as qemu-nbd does.
                    let why = "option 'starttls' has unexpected length";
                    let _ = write_option_reply(stream, option, rep::ERR_INVALID, why.as_bytes());
                    return Err(HandshakeError::Protocol(why.into()));
                }
                opt::STARTTLS => {
                    write_option_reply(stream, option, rep::ACK, &[])?;
                    stream.flush()?;
                    start_tls(stream).map_err(HandshakeError::Tls)?;
                    tls_pending = false;
                }
                opt::EXPORT_NAME => return Err(HandshakeError::Protocol(refusal)),
                opt::ABORT => {
                    // The spec asks for an ACK; qemu-nbd answers
                    // ERR_TLS_REQD, and clients written against it expect
                    // that (either way the connection ends). The client
                    // may already be gone.
                    let _ =
                        write_option_reply(stream, option, rep::ERR_TLS_REQD, refusal.as_bytes());
                    return Err(HandshakeError::Aborted);
                }
                _ => write_option_reply(stream, option, rep::ERR_TLS_REQD, refusal.as_bytes())?,
            }
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.iter().find(|e| e.name == name) else {
                    // No error reply exists for this option: hang up.
                    return Err(HandshakeError::Protocol(format!(
                        "no export named '{name}'"
                    )));
                };
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.device.virtual_size().to_be_bytes());
                reply.extend_from_slice(&export.transmission_flags(extended).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply)?;
                return Ok(Negotiated {
                    export: export.clone(),
                    structured,
                    extended,
                    contexts,
                });
            }
            opt::ABORT => {
                write_option_reply(stream, option, rep::ACK, &[])?;
                return Err(HandshakeError::Aborted);
            }
            opt::LIST => {
                if !data.is_empty() {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for export in exports {
                    let mut entry = Vec::new();
                    entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(export.name.as_bytes());
                    entry.extend_from_slice(export.description.as_bytes());
                    write_option_reply(stream, option, rep::SERVER, &entry)?;
                }
                write_option_reply(stream, option, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let Some(export) = exports.iter().find(|e| e.name == name) else {
                    write_option_reply(
                        stream,
                        option,
                        rep::ERR_UNKNOWN,
                        format!("export '{name}' not present").as_bytes(),
                    )?;
                    continue;
                };
                send_info(stream, option, export, &requests, extended)?;
                write_option_reply(stream, option, rep::ACK, &[])?;
                if option == opt::GO {
                    // Contexts chosen for another export do not carry over.
                    contexts.retain(|c| export.contexts().contains(c));
                    return Ok(Negotiated {
                        export: export.clone(),
                        structured,
                        extended,
                        contexts,
                    });
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"no data expected")?;
                } else {
                    structured = true;
                    write_option_reply(stream, option, rep::ACK, &[])?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set && !structured {
                    write_option_reply(
                        stream,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies first",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let Some(export) = exports.iter().find(|e| e.name == name) else {
                    write_option_reply(
                        stream,
                        option,
                        rep::ERR_UNKNOWN,
                        format!("export '{name}' not present").as_bytes(),
                    )?;
                    continue;
                };
                let chosen: Vec<Context> = if queries.is_empty() {
                    if set { Vec::new() } else { export.contexts() }
                } else if set {
                    export
                        .contexts()
                        .into_iter()
                        .filter(|c| queries.iter().any(|q| *q == c.name()))
                        .collect()
                } else {
                    let mut all: Vec<Context> = Vec::new();
                    for q in &queries {
                        for c in export.query(q) {
                            if !all.contains(&c) {
                                all.push(c);
                            }
                        }
                    }
                    all
                };
                for c in &chosen {
                    let mut reply = Vec::new();
                    reply.extend_from_slice(&c.id().to_be_bytes());
                    reply.extend_from_slice(c.name().as_bytes());
                    write_option_reply(stream, option, rep::META_CONTEXT, &reply)?;
                }
                write_option_reply(stream, option, rep::ACK, &[])?;
                if set {
                    contexts = chosen;
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"no data expected")?;
                } else if extended {
                    write_option_reply(
                        stream,
                        option,
                        rep::ERR_INVALID,
                        b"extended headers already negotiated",
                    )?;
                } else {
                    // Extended headers bring structured replies with them.
                    extended = true;
                    structured = true;
                    write_option_reply(stream, option, rep::ACK, &[])?;
                }
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"no data expected")?;
                } else if start_tls.is_some() {
                    write_option_reply(stream, option, rep::ERR_INVALID, b"TLS already enabled")?;
                } else {
                    write_option_reply(stream, option, rep::ERR_POLICY, b"TLS not configured")?;
                }
            }
            _ => {
                write_option_reply(stream, option, rep::ERR_UNSUP, b"option not supported")?;
            }
        }
    }
}

/// Sends the NBD_REP_INFO replies for INFO or GO: the export's size and
/// flags always, its name, description and block sizes when asked (block
/// sizes always, as qemu-nbd does).
fn send_info(
    stream: &mut impl Write,
    option: u32,
    export: &Export,
    requests: &[u16],
    extended: bool,
) -> io::Result<()> {
    let mut data = Vec::new();
    data.extend_from_slice(&info::EXPORT.to_be_bytes());
    data.extend_from_slice(&export.device.virtual_size().to_be_bytes());
    data.extend_from_slice(&export.transmission_flags(extended).to_be_bytes());
    write_option_reply(stream, option, rep::INFO, &data)?;
    if requests.contains(&info::NAME) {
        let mut data = info::NAME.to_be_bytes().to_vec();
        data.extend_from_slice(export.name.as_bytes());
        write_option_reply(stream, option, rep::INFO, &data)?;
    }
    if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
        let mut data = info::DESCRIPTION.to_be_bytes().to_vec();
        data.extend_from_slice(export.description.as_bytes());
        write_option_reply(stream, option, rep::INFO, &data)?;
    }
    let mut data = info::BLOCK_SIZE.to_be_bytes().to_vec();
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&4096u32.to_be_bytes());
    data.extend_from_slice(&MAX_BUFFER.to_be_bytes());
    write_option_reply(stream, option, rep::INFO, &data)
}

/// An INFO or GO request: the export name and the information asked for.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = name_prefixed(data)?;
    let count = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

/// A LIST or SET_META_CONTEXT request: the export name and the queries.
pub fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut rest) = name_prefixed(data)?;
    let count = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let (query, tail) = name_prefixed_u32(rest)?;
        queries.push(query);
        rest = tail;
    }
    rest.is_empty().then_some((name, queries))
}

/// A name with a 32-bit length before it.
fn name_prefixed(data: &[u8]) -> Option<(String, &[u8])> {
    name_prefixed_u32(data)
}

fn name_prefixed_u32(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_NAME {
        return None;
    }
    let name = data.get(4..4 + len)?;
    Some((String::from_utf8(name.to_vec()).ok()?, &data[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_payloads_parse_and_malformed_ones_are_refused() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"abc");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&go),
            Some(("abc".to_owned(), vec![info::BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&go[..go.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff; 4]), None);
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:"] {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_meta_request(&meta),
            Some((
                String::new(),
                vec!["base:allocation".into(), "qemu:".into()]
            ))
        );
        meta.push(0);
        assert_eq!(parse_meta_request(&meta), None);
    }
}
