//! Fuzzes the volume header parser (untrusted: it comes from the storage host), both
//! format versions. A header that parses must re-encode to exactly the same bytes (the
//! parser is strict, so the tag and the state MAC cover every byte that matters), and
//! verifying it and its state sector under some key must fail cleanly, never panic.
#![no_main]
use caas_crypto::SecretKey;
use caas_volume::{HEADER_SIZE, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, state)) = Header::decode(data) {
        assert_eq!(&h.encode(&state)[..], &data[..HEADER_SIZE]);
        if let Ok(c) = h.cipher(&SecretKey::from_bytes([7; 32])) {
            let _ = h.verify(&c);
            let _ = h.verify_state(&c, &state);
        }
    }
});
