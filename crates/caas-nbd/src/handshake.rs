//! The handshake and option-haggling phase (fixed newstyle): the server greeting, client
//! flags, option requests and option replies, for both sides.
use crate::{Cursor, Error, IHAVEOPT, MAX_OPTION_LEN, NBD_MAGIC, REPLY_MAGIC, cflags, hflags};
use crate::{info, opt, parse_string, rep};

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The 18-byte greeting a fixed-newstyle server sends first.
pub fn server_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES).to_be_bytes());
    out
}

/// Client side: checks the greeting and returns the server's handshake flags.
pub fn parse_server_greeting(buf: &[u8; GREETING_LEN]) -> Result<u16, Error> {
    let mut c = Cursor::new(buf, "greeting");
    let m = c.u64()?;
    if m != NBD_MAGIC {
        return Err(Error::BadMagic {
            what: "NBDMAGIC",
            got: m,
        });
    }
    let m = c.u64()?;
    if m != IHAVEOPT {
        return Err(Error::BadMagic {
            what: "IHAVEOPT (oldstyle servers are not supported)",
            got: m,
        });
    }
    let flags = c.u16()?;
    if flags & hflags::FIXED_NEWSTYLE == 0 {
        return Err(Error::ClientFlags(u32::from(flags)));
    }
    Ok(flags)
}

/// Server side: validates the client's 32-bit flags; returns whether the client asked to
/// omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub fn parse_client_flags(buf: [u8; 4]) -> Result<bool, Error> {
    let flags = u32::from_be_bytes(buf);
    let known = cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES;
    if flags & cflags::FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(Error::ClientFlags(flags));
    }
    Ok(flags & cflags::NO_ZEROES != 0)
}

/// Server side: parses an option header; returns (option, payload length).
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), Error> {
    let mut c = Cursor::new(buf, "option header");
    let m = c.u64()?;
    if m != IHAVEOPT {
        return Err(Error::BadMagic {
            what: "option",
            got: m,
        });
    }
    let option = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(Error::OptionTooLong {
            len,
            max: MAX_OPTION_LEN,
        });
    }
    Ok((option, len))
}

/// Which information items the client asked for in NBD_OPT_INFO/GO.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name ("" selects the default export).
    pub name: String,
    /// Requested information types (unknown ones are ignored per the specification).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// True if the client asked for NBD_INFO_BLOCK_SIZE (so it honours block sizes).
    pub fn wants_block_size(&self) -> bool {
        self.requests.contains(&info::BLOCK_SIZE)
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO.
    Info(InfoRequest),
    /// NBD_OPT_GO.
    Go(InfoRequest),
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// Any other option (answered with NBD_REP_ERR_UNSUP).
    Unsupported(u32),
}

/// Server side: decodes an option's payload. An `Err` means the option is malformed and
/// must be answered with NBD_REP_ERR_INVALID (except EXPORT_NAME, which has no error reply).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, Error> {
    let no_data = |o: ClientOption| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(Error::Malformed {
                what: "option without payload has payload",
            })
        }
    };
    match option {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data, "export name")?)),
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List),
        opt::STARTTLS => no_data(ClientOption::StartTls),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        opt::INFO | opt::GO => {
            let mut c = Cursor::new(data, "NBD_OPT_INFO/GO payload");
            let name_len = c.u32()? as usize;
            let name = parse_string(c.take(name_len)?, "export name")?;
            let n = c.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            if !c.is_empty() {
                return Err(Error::Malformed {
                    what: "NBD_OPT_INFO/GO trailing bytes",
                });
            }
            let r = InfoRequest { name, requests };
            Ok(if option == opt::GO {
                ClientOption::Go(r)
            } else {
                ClientOption::Info(r)
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// An option reply the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// NBD_REP_ACK.
    Ack,
    /// NBD_REP_SERVER with an export name.
    Server(&'a str),
    /// NBD_REP_INFO / NBD_INFO_EXPORT.
    InfoExport {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// NBD_REP_INFO / NBD_INFO_NAME.
    InfoName(&'a str),
    /// NBD_REP_INFO / NBD_INFO_DESCRIPTION.
    InfoDescription(&'a str),
    /// NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
    InfoBlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An error reply (`rep::ERR_*`) with a human-readable message.
    Error(u32, &'a str),
}

/// Server side: encodes an option reply for `option` and appends it to `out`.
pub fn encode_option_reply(option: u32, reply: &OptionReply<'_>, out: &mut Vec<u8>) {
    let mut payload: Vec<u8> = Vec::new();
    let typ = match reply {
        OptionReply::Ack => rep::ACK,
        OptionReply::Server(name) => {
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            rep::SERVER
        }
        OptionReply::InfoExport { size, flags } => {
            payload.extend_from_slice(&info::EXPORT.to_be_bytes());
            payload.extend_from_slice(&size.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
            rep::INFO
        }
        OptionReply::InfoName(name) => {
            payload.extend_from_slice(&info::NAME.to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            rep::INFO
        }
        OptionReply::InfoDescription(d) => {
            payload.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
            payload.extend_from_slice(d.as_bytes());
            rep::INFO
        }
        OptionReply::InfoBlockSize {
            min,
            preferred,
            max,
        } => {
            payload.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
            payload.extend_from_slice(&min.to_be_bytes());
            payload.extend_from_slice(&preferred.to_be_bytes());
            payload.extend_from_slice(&max.to_be_bytes());
            rep::INFO
        }
        OptionReply::Error(code, msg) => {
            payload.extend_from_slice(msg.as_bytes());
            *code
        }
    };
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
}

/// Server side: the reply to NBD_OPT_EXPORT_NAME (size, flags, and 124 zero bytes unless
/// the client negotiated NO_ZEROES).
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Client side: encodes an option request.
pub fn encode_option(option: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Client side: the payload of NBD_OPT_GO/INFO for `name` asking for `requests`.
pub fn encode_go_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// Client side: parses an option reply header; returns (option, reply type, length).
pub fn parse_option_reply_header(
    buf: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<(u32, u32, u32), Error> {
    let mut c = Cursor::new(buf, "option reply header");
    let m = c.u64()?;
    if m != REPLY_MAGIC {
        return Err(Error::BadMagic {
            what: "option reply",
            got: m,
        });
    }
    let option = c.u32()?;
    let typ = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(Error::OptionTooLong {
            len,
            max: MAX_OPTION_LEN,
        });
    }
    Ok((option, typ, len))
}

/// Client side: decodes an NBD_REP_INFO payload into (size, flags) if it is NBD_INFO_EXPORT.
pub fn parse_info_export(data: &[u8]) -> Result<Option<(u64, u16)>, Error> {
    let mut c = Cursor::new(data, "NBD_REP_INFO");
    if c.u16()? != info::EXPORT {
        return Ok(None);
    }
    let size = c.u64()?;
    let flags = c.u16()?;
    if !c.is_empty() {
        return Err(Error::Malformed {
            what: "NBD_INFO_EXPORT length",
        });
    }
    Ok(Some((size, flags)))
}

/// Client flags a client built on this crate sends.
pub fn client_flags() -> [u8; 4] {
    (cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_known_answer() {
        // "NBDMAGIC" "IHAVEOPT" then flags 0x0003.
        assert_eq!(&server_greeting()[..], b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(parse_server_greeting(&server_greeting()), Ok(3));
    }

    #[test]
    fn client_flags_require_fixed_newstyle() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(false));
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 0, 5]).is_err());
    }

    #[test]
    fn go_option_roundtrip() {
        let payload = encode_go_payload("disk", &[info::BLOCK_SIZE, info::NAME]);
        let mut wire = Vec::new();
        encode_option(opt::GO, &payload, &mut wire);
        let hdr: [u8; 16] = wire[..16].try_into().unwrap_or([0; 16]);
        let (o, len) = parse_option_header(&hdr).unwrap_or((0, 0));
        assert_eq!((o, len as usize), (opt::GO, payload.len()));
        let parsed = parse_option(o, &wire[16..]);
        let expect = InfoRequest {
            name: "disk".into(),
            requests: vec![info::BLOCK_SIZE, info::NAME],
        };
        assert_eq!(parsed, Ok(ClientOption::Go(expect.clone())));
        assert!(expect.wants_block_size());
    }

    #[test]
    fn malformed_options_are_rejected() {
        // name length larger than payload
        assert!(parse_option(opt::GO, &[0, 0, 0, 9, b'a', 0, 0]).is_err());
        // trailing byte
        assert!(parse_option(opt::INFO, &[0, 0, 0, 0, 0, 0, 7]).is_err());
        // NUL in name
        assert!(parse_option(opt::EXPORT_NAME, b"a\0b").is_err());
        // payload on LIST
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert_eq!(parse_option(42, b"x"), Ok(ClientOption::Unsupported(42)));
        let mut hdr = [0u8; 16];
        hdr[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        hdr[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&hdr),
            Err(Error::OptionTooLong { .. })
        ));
    }

    #[test]
    fn info_export_reply_known_answer() {
        let mut out = Vec::new();
        encode_option_reply(
            opt::GO,
            &OptionReply::InfoExport {
                size: 0x1000,
                flags: 0x0101,
            },
            &mut out,
        );
        let mut expect = Vec::new();
        expect.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0x00, 0x01, 0x01]);
        assert_eq!(out, expect);
        let hdr: [u8; 20] = out[..20].try_into().unwrap_or([0; 20]);
        assert_eq!(
            parse_option_reply_header(&hdr),
            Ok((opt::GO, rep::INFO, 12))
        );
        assert_eq!(parse_info_export(&out[20..]), Ok(Some((0x1000, 0x0101))));
    }
}
