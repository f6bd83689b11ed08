//! The transmission phase: request headers, their validation against the export's
//! limits (the one place where malformed or out-of-range requests become NBD errnos),
//! and simple/structured reply encoding; plus the client side for an upstream export.
use crate::{Cursor, Error, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, errno};

/// Length of a (compact) request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Command flags.
pub mod cmdflags {
    /// Force unit access: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail fast if zeroing is not faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload, final.
    pub const NONE: u16 = 0;
    /// Offset plus data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset plus hole size.
    pub const OFFSET_HOLE: u16 = 2;
    /// Error without offset.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Flag: final chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC.
    Disconnect,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// Any other command number (answered with EINVAL).
    Other(u16),
}

impl Command {
    /// The wire number.
    pub fn number(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::Other(n) => n,
        }
    }
    fn from_number(n: u16) -> Self {
        match n {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            n => Command::Other(n),
        }
    }
}

/// The limits a request is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Maximum payload of a READ or WRITE.
    pub max_payload: u32,
    /// Export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated (allows NBD_CMD_FLAG_DF).
    pub structured: bool,
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmdflags`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte request header. A bad magic means the stream is out of sync and
    /// the connection must be closed.
    pub fn parse(buf: &[u8; REQUEST_LEN]) -> Result<Self, Error> {
        let mut c = Cursor::new(buf, "request");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(Error::BadMagic {
                what: "request",
                got: u64::from(magic),
            });
        }
        let flags = c.u16()?;
        let command = Command::from_number(c.u16()?);
        let cookie = c.u64()?;
        let offset = c.u64()?;
        let length = c.u32()?;
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Encodes the header (client side).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.number().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Checks the request against the export: returns the NBD errno to reply with, or
    /// `Ok(())` if the request may be executed. The payload of a rejected WRITE must still
    /// be consumed (or the connection closed) by the caller.
    pub fn validate(&self, lim: &ExportLimits) -> Result<(), u32> {
        use cmdflags::*;
        let allowed = match self.command {
            Command::Read => FUA | if lim.structured { DF } else { 0 },
            Command::Write | Command::Trim | Command::Flush | Command::Cache => FUA,
            Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
            Command::Disconnect => 0,
            Command::Other(_) => return Err(errno::EINVAL),
        };
        if self.flags & !allowed != 0 {
            return Err(errno::EINVAL);
        }
        match self.command {
            Command::Disconnect => return Ok(()),
            Command::Flush => {
                return if self.offset == 0 && self.length == 0 {
                    Ok(())
                } else {
                    Err(errno::EINVAL)
                };
            }
            _ => {}
        }
        let writes = matches!(
            self.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && lim.read_only {
            return Err(errno::EPERM);
        }
        if self.length == 0 {
            return Err(errno::EINVAL);
        }
        if matches!(self.command, Command::Read | Command::Write) && self.length > lim.max_payload {
            return Err(if self.flags & DF != 0 {
                errno::EOVERFLOW
            } else {
                errno::EINVAL
            });
        }
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= lim.size);
        if !in_range {
            return Err(match self.command {
                Command::Write | Command::WriteZeroes => errno::ENOSPC,
                _ => errno::EINVAL,
            });
        }
        let mb = u64::from(lim.min_block.max(1));
        if !self.offset.is_multiple_of(mb) || !u64::from(self.length).is_multiple_of(mb) {
            return Err(errno::EINVAL);
        }
        Ok(())
    }
}

/// Encodes a simple reply header (for READ, followed by the data when `errno == 0`).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured chunk header.
pub fn chunk_header(flags: u16, typ: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&typ.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&length.to_be_bytes());
    out
}

/// Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk carrying `data_len` bytes at `offset`
/// (the data follows). `data_len` must be at most `u32::MAX - 8`.
pub fn read_data_chunk(cookie: u64, offset: u64, data_len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut out = [0u8; CHUNK_HEADER_LEN + 8];
    let len = data_len.saturating_add(8);
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        cookie,
        len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A final NBD_REPLY_TYPE_NONE chunk (success for non-read commands).
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(chunk::FLAG_DONE, chunk::NONE, cookie, 0)
}

/// Appends a final error chunk (NBD_REPLY_TYPE_ERROR_OFFSET when `offset` is given).
pub fn error_chunk(cookie: u64, error: u32, msg: &str, offset: Option<u64>, out: &mut Vec<u8>) {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let extra = if offset.is_some() { 8 } else { 0 };
    let typ = if offset.is_some() {
        chunk::ERROR_OFFSET
    } else {
        chunk::ERROR
    };
    let len = (6 + msg.len() + extra) as u32;
    out.extend_from_slice(&chunk_header(chunk::FLAG_DONE, typ, cookie, len));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

/// A parsed reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// NBD errno (0 on success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl Reply {
    /// Parses a simple reply header.
    pub fn parse_simple(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, Error> {
        let mut c = Cursor::new(buf, "simple reply");
        let magic = c.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(Error::BadMagic {
                what: "simple reply",
                got: u64::from(magic),
            });
        }
        let error = c.u32()?;
        let cookie = c.u64()?;
        Ok(Self { error, cookie })
    }
}

/// A parsed structured chunk header: (flags, type, cookie, length).
pub fn parse_chunk_header(buf: &[u8; CHUNK_HEADER_LEN]) -> Result<(u16, u16, u64, u32), Error> {
    let mut c = Cursor::new(buf, "structured reply");
    let magic = c.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(Error::BadMagic {
            what: "structured reply",
            got: u64::from(magic),
        });
    }
    let flags = c.u16()?;
    let typ = c.u16()?;
    let cookie = c.u64()?;
    let len = c.u32()?;
    let ok = match typ {
        chunk::NONE => len == 0,
        chunk::OFFSET_DATA => len >= 9,
        chunk::OFFSET_HOLE => len == 12,
        chunk::ERROR => len >= 6,
        chunk::ERROR_OFFSET => len >= 14,
        t if t & 0x8000 != 0 => len >= 6,
        _ => false,
    };
    if !ok {
        return Err(Error::BadReply("unknown chunk type or inconsistent length"));
    }
    Ok((flags, typ, cookie, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        min_block: 1,
        max_payload: 32 << 20,
        read_only: false,
        structured: true,
    };

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_known_answer() {
        // magic 25609513, flags 0001 (FUA), type 0001 (WRITE), cookie, offset 0x200, len 0x1000
        let wire = b"\x25\x60\x95\x13\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x2a\
\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x10\x00";
        let r = Request::parse(wire);
        let expect = Request {
            flags: 1,
            command: Command::Write,
            cookie: 42,
            offset: 0x200,
            length: 0x1000,
        };
        assert_eq!(r, Ok(expect));
        assert_eq!(&expect.encode(), wire);
        assert_eq!(expect.payload_len(), 0x1000);
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut wire = req(Command::Read, 0, 0, 1).encode();
        wire[0] ^= 1;
        assert!(matches!(Request::parse(&wire), Err(Error::BadMagic { .. })));
    }

    #[test]
    fn validation_maps_errnos() {
        // (request, limits, expected)
        let ro = ExportLimits {
            read_only: true,
            ..LIM
        };
        let aligned = ExportLimits {
            min_block: 512,
            ..LIM
        };
        let plain = ExportLimits {
            structured: false,
            ..LIM
        };
        let cases: &[(Request, ExportLimits, Result<(), u32>)] = &[
            (req(Command::Read, 0, 0, 4096), LIM, Ok(())),
            (req(Command::Read, 0, (1 << 20) - 1, 1), LIM, Ok(())),
            (
                req(Command::Read, 0, (1 << 20) - 1, 2),
                LIM,
                Err(errno::EINVAL),
            ),
            (req(Command::Read, 0, u64::MAX, 2), LIM, Err(errno::EINVAL)),
            (req(Command::Write, 0, 1 << 20, 1), LIM, Err(errno::ENOSPC)),
            (
                req(Command::WriteZeroes, 0, 1 << 20, 1),
                LIM,
                Err(errno::ENOSPC),
            ),
            (req(Command::Trim, 0, 1 << 20, 1), LIM, Err(errno::EINVAL)),
            (req(Command::Write, 0, 0, 1), ro, Err(errno::EPERM)),
            (req(Command::Read, 0, 0, 1), ro, Ok(())),
            (
                req(Command::Read, 0, 0, (32 << 20) + 1),
                LIM,
                Err(errno::EINVAL),
            ),
            (
                req(Command::Read, cmdflags::DF, 0, (32 << 20) + 1),
                LIM,
                Err(errno::EOVERFLOW),
            ),
            (
                req(Command::Read, cmdflags::DF, 0, 1),
                plain,
                Err(errno::EINVAL),
            ),
            (
                req(Command::Write, cmdflags::NO_HOLE, 0, 1),
                LIM,
                Err(errno::EINVAL),
            ),
            (
                req(
                    Command::WriteZeroes,
                    cmdflags::NO_HOLE | cmdflags::FAST_ZERO | cmdflags::FUA,
                    0,
                    1,
                ),
                LIM,
                Ok(()),
            ),
            (req(Command::Read, 0, 0, 0), LIM, Err(errno::EINVAL)),
            (req(Command::Flush, 0, 0, 0), LIM, Ok(())),
            (req(Command::Flush, 0, 1, 0), LIM, Err(errno::EINVAL)),
            (req(Command::Other(99), 0, 0, 0), LIM, Err(errno::EINVAL)),
            (req(Command::Read, 0, 512, 1024), aligned, Ok(())),
            (req(Command::Read, 0, 1, 512), aligned, Err(errno::EINVAL)),
            (
                req(Command::Write, 0, 512, 100),
                aligned,
                Err(errno::EINVAL),
            ),
            (req(Command::Disconnect, 0, 0, 0), LIM, Ok(())),
        ];
        for (r, lim, expect) in cases {
            assert_eq!(r.validate(lim), *expect, "{r:?}");
        }
    }

    #[test]
    fn reply_known_answers() {
        assert_eq!(
            &simple_reply(5, 0x0102),
            b"\x67\x44\x66\x98\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x01\x02"
        );
        assert_eq!(
            Reply::parse_simple(&simple_reply(5, 9)),
            Ok(Reply {
                error: 5,
                cookie: 9
            })
        );
        let h = read_data_chunk(3, 4096, 512);
        assert_eq!(&h[..8], b"\x66\x8e\x33\xef\x00\x01\x00\x01");
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..], &4096u64.to_be_bytes());
        let mut out = Vec::new();
        error_chunk(3, errno::EIO, "bad", Some(8192), &mut out);
        assert_eq!(out.len(), 20 + 6 + 3 + 8);
        let hdr: [u8; 20] = out[..20].try_into().unwrap_or([0; 20]);
        assert_eq!(
            parse_chunk_header(&hdr),
            Ok((1, chunk::ERROR_OFFSET, 3, 17))
        );
        assert_eq!(
            parse_chunk_header(&none_chunk(4)),
            Ok((1, chunk::NONE, 4, 0))
        );
    }
}
