//! Fuzzes the NBD codec on untrusted bytes: request headers and their validation,
//! handshake options, client flags, option/simple/structured reply headers.
#![no_main]
use caas_nbd::handshake as hs;
use caas_nbd::transmission::{self as tx, Command, ExportLimits, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= tx::REQUEST_LEN {
        let mut h = [0u8; tx::REQUEST_LEN];
        h.copy_from_slice(&data[..tx::REQUEST_LEN]);
        if let Ok(r) = Request::parse(&h) {
            assert_eq!(r.encode(), h);
            for structured in [false, true] {
                let lim = ExportLimits { size: 1 << 30, min_block: 512, max_payload: 32 << 20, read_only: false, structured };
                let data_cmd = matches!(r.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes);
                if r.validate(&lim).is_ok() && data_cmd {
                    // A valid data request is non-empty, aligned and inside the export.
                    assert!(r.length > 0 && r.offset % 512 == 0 && u64::from(r.length) % 512 == 0);
                    assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|e| e <= lim.size));
                }
            }
        }
    }
    if data.len() >= 4 {
        let (opt, rest) = data.split_at(4);
        let option = u32::from_be_bytes([opt[0], opt[1], opt[2], opt[3]]) % 16;
        let _ = hs::parse_option(option, rest);
        let _ = hs::parse_client_flags([opt[0], opt[1], opt[2], opt[3]]);
    }
    if data.len() >= hs::OPTION_HEADER_LEN {
        let mut h = [0u8; hs::OPTION_HEADER_LEN];
        h.copy_from_slice(&data[..hs::OPTION_HEADER_LEN]);
        let _ = hs::parse_option_header(&h);
    }
    if data.len() >= hs::OPTION_REPLY_HEADER_LEN {
        let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
        h.copy_from_slice(&data[..hs::OPTION_REPLY_HEADER_LEN]);
        let _ = hs::parse_option_reply_header(&h);
        let _ = tx::parse_chunk_header(&h);
        let _ = hs::parse_info_export(data);
    }
    if data.len() >= tx::SIMPLE_REPLY_LEN {
        let mut h = [0u8; tx::SIMPLE_REPLY_LEN];
        h.copy_from_slice(&data[..tx::SIMPLE_REPLY_LEN]);
        let _ = tx::Reply::parse_simple(&h);
    }
});
