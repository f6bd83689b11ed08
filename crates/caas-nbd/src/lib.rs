//! A sans-IO codec for the Network Block Device protocol (the `doc/proto.md` specification
//! of the NetworkBlockDevice project): the fixed newstyle handshake, the option haggling
//! phase and the transmission phase (simple and structured replies), for both the server
//! and the client side. Nothing here touches a socket: callers read fixed-size headers,
//! hand them to the parsers and write the encoded bytes themselves, so every parser can be
//! unit-tested and fuzzed on plain byte slices.
//!
//! Limits enforced here protect the server from hostile clients: option payloads are
//! capped at [`MAX_OPTION_LEN`], strings at 4096 bytes, and request validation
//! ([`Request::validate`]) maps every malformed or out-of-range request to the NBD errno
//! the specification prescribes, so the glue layer maps errors in exactly one place.
mod error;
pub mod handshake;
pub mod transmission;

pub use error::Error;
pub use handshake::{ClientOption, InfoRequest, OptionReply};
pub use transmission::{Command, Reply, Request};

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub mod hflags {
    /// Fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// No 124 zero bytes after NBD_OPT_EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits).
pub mod cflags {
    /// Client understands fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits), sent with the export size.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational media hint.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see a consistent view (flush on one covers all).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_CMD_CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// Select export by name, old style (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Query an export.
    pub const INFO: u32 = 6;
    /// Select an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Option acknowledged.
    pub const ACK: u32 = 1;
    /// One export (reply to LIST).
    pub const SERVER: u32 = 2;
    /// One information item (reply to INFO/GO).
    pub const INFO: u32 = 3;
    /// Option unknown or unsupported.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// Export unknown.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types in NBD_OPT_INFO/GO.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// Export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission errno values (the NBD wire values, not the host's).
pub mod errno {
    /// Operation not permitted (e.g. write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error (including authentication failure of a block).
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (bad flags, out-of-range read, misaligned request).
    pub const EINVAL: u32 = 22;
    /// No space (write beyond the end of the export).
    pub const ENOSPC: u32 = 28;
    /// Value too large (unfragmented read too big).
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (e.g. FAST_ZERO that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest option payload accepted (a 4096-byte name plus framing).
pub const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Longest string (export name, description) accepted, per the specification.
pub const MAX_STRING_LEN: usize = 4096;

/// Checks an NBD string: valid UTF-8, no NUL, at most 4096 bytes.
pub(crate) fn parse_string(bytes: &[u8], what: &'static str) -> Result<String, Error> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(Error::BadString { what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::BadString { what })
}

/// Big-endian readers over a slice that fail instead of panicking.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Malformed { what: self.what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
