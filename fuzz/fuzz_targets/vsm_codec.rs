//! Fuzz target: the VSM wire codec (caas-vsm-proto), which the crypto domain runs on bytes
//! from the workload and the PKCS#11 module runs on bytes from the domain. Decoding must never
//! panic, and whatever decodes must re-encode to exactly the same bytes (the encoding is
//! canonical, so two peers can never disagree about a message).
#![no_main]

use caas_vsm_proto::{FrameDecoder, Request, Response, from_bytes, to_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = from_bytes::<Request>(data) {
        assert_eq!(to_bytes(&r), data);
    }
    if let Ok(r) = from_bytes::<Response>(data) {
        assert_eq!(to_bytes(&r), data);
    }
    let mut d = FrameDecoder::new();
    d.feed(data);
    while let Ok(Some(frame)) = d.next_frame() {
        let _ = from_bytes::<Request>(&frame);
    }
});
