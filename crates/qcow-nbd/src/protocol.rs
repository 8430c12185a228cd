//! The NBD protocol's numbers and wire formats (`doc/proto.md` in the
//! NetworkBlockDevice/nbd repository): the fixed newstyle handshake, option
//! haggling, and the transmission phase's requests and replies (simple and
//! structured). Everything is big-endian on the wire.

use std::io::{self, Read, Write};

/// "NBDMAGIC", the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The prefix of a request with extended headers.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// The prefix of a reply chunk with extended headers.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 bytes of zeros after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Options.
pub mod opt {
    /// Selects the export and ends the handshake (no reply).
    pub const EXPORT_NAME: u32 = 1;
    /// Ends the handshake without an export.
    pub const ABORT: u32 = 2;
    /// Lists the exports.
    pub const LIST: u32 = 3;
    /// Asks for TLS.
    pub const STARTTLS: u32 = 5;
    /// Describes an export.
    pub const INFO: u32 = 6;
    /// Describes an export and ends the handshake with it.
    pub const GO: u32 = 7;
    /// Asks for structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// Lists metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Selects metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Asks for extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of information of INFO or GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// The option is not known.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// The option is forbidden here.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// The option's data is malformed.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The option is too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
    /// The option needs TLS first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
}

/// Information types of NBD_REP_INFO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// The export's description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod flag {
    /// The flags field is meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF flag of READ is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS may carry a payload naming its contexts (extended
    /// headers only).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeros.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not leave holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ in one chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one descriptor is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// The length is the payload's (BLOCK_STATUS with a payload).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload (the last chunk of a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status descriptors with 64-bit lengths (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// The chunk is the reply's last.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// Error values on the wire (errno numbers, as the spec fixes them).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (out of range, bad flags).
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Largest READ or WRITE (qemu-nbd's `NBD_MAX_BUFFER_SIZE`).
pub const MAX_BUFFER: u32 = 32 << 20;
/// Largest option payload read (names, queries).
pub const MAX_OPTION: u32 = 64 << 10;
/// Longest export or context name (the spec's limit).
pub const MAX_NAME: usize = 4096;

/// One request of the transmission phase (28 bytes on the wire, 32 with
/// extended headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (32 bits unless extended headers were negotiated).
    pub len: u64,
}

/// Why a request header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection failed or closed.
    #[error("reading a request: {0}")]
    Io(#[from] io::Error),
    /// The magic number is wrong: the stream cannot be trusted any more.
    #[error("bad request magic {0:#x}")]
    Magic(u32),
}

impl Request {
    /// Parses a request header.
    pub fn parse(bytes: &[u8; 28]) -> Result<Request, RequestError> {
        let len = u64::from(u32::from_be_bytes(array(&bytes[24..28])));
        Request::parse_fields(bytes, REQUEST_MAGIC, len)
    }

    /// Parses an extended request header.
    pub fn parse_extended(bytes: &[u8; 32]) -> Result<Request, RequestError> {
        let len = u64::from_be_bytes(array(&bytes[24..32]));
        Request::parse_fields(bytes, EXTENDED_REQUEST_MAGIC, len)
    }

    /// The fields both header forms share, after a magic of `magic`.
    fn parse_fields(bytes: &[u8], magic: u32, len: u64) -> Result<Request, RequestError> {
        let found = u32::from_be_bytes(array(&bytes[0..4]));
        if found != magic {
            return Err(RequestError::Magic(found));
        }
        Ok(Request {
            flags: u16::from_be_bytes(array(&bytes[4..6])),
            kind: u16::from_be_bytes(array(&bytes[6..8])),
            cookie: u64::from_be_bytes(array(&bytes[8..16])),
            offset: u64::from_be_bytes(array(&bytes[16..24])),
            len,
        })
    }

    /// Reads one request header, extended or not.
    pub fn read_from(stream: &mut impl Read, extended: bool) -> Result<Request, RequestError> {
        if extended {
            let mut bytes = [0u8; 32];
            stream.read_exact(&mut bytes)?;
            Request::parse_extended(&bytes)
        } else {
            let mut bytes = [0u8; 28];
            stream.read_exact(&mut bytes)?;
            Request::parse(&bytes)
        }
    }

    /// The extended header as sent (64 bits of length).
    pub fn encode_extended(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.encode_fields(EXTENDED_REQUEST_MAGIC, &mut out);
        out[24..32].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The header as sent (for clients and tests).
    pub fn encode(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        self.encode_fields(REQUEST_MAGIC, &mut out);
        // Compact headers carry 32 bits of length.
        out[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        out
    }

    /// The first 24 bytes both header forms share, after `magic`.
    fn encode_fields(&self, magic: u32, out: &mut [u8]) {
        out[0..4].copy_from_slice(&magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }
}

/// The first bytes of `bytes` as an array (the callers slice exactly).
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// A simple reply header: error and cookie (data follows for a READ).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header (the payload of `len` bytes follows).
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A reply chunk header with extended headers: the request's offset and a
/// 64-bit payload length.
pub fn extended_header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..32].copy_from_slice(&len.to_be_bytes());
    out
}

/// Writes an option reply.
pub fn write_option_reply(
    stream: &mut impl Write,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option reply too long"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)
}

/// Reads a big-endian `u16` (both sides of the protocol read them).
pub(crate) fn read_u16(stream: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    stream.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian `u32`.
pub(crate) fn read_u32(stream: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian `u64`.
pub(crate) fn read_u64(stream: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::parse(&r.encode()).expect("parse"), r);
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad), Err(RequestError::Magic(_))));
    }
}
