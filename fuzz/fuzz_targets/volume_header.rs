//! Fuzzes the volume header parser (untrusted: it comes from the storage host). A header
//! that parses must re-encode to exactly the same bytes (the parser is strict, so the tag
//! covers every byte that matters).
#![no_main]
use caas_volume::{HEADER_SIZE, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, state)) = Header::decode(data) {
        assert_eq!(&h.encode(&state)[..], &data[..HEADER_SIZE]);
    }
});
