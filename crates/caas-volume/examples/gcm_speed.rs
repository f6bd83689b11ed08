//! Throughput of the per-block AEAD paths: seal in place under the session key, and open
//! from the ciphertext buffer into another buffer (the read path, which looks the session
//! key up by the slot's session id). `cargo run --release --example gcm_speed`.
use caas_crypto::SecretKey;
use caas_volume::VolumeCipher;
use std::time::Instant;

fn main() {
    let c = VolumeCipher::new_v2(&SecretKey::from_bytes([1; 32]), [2; 16], [3; 32])
        .unwrap_or_else(|e| panic!("{e}"));
    let s = c.new_session(1).unwrap_or_else(|e| panic!("{e}"));
    let n = 100_000u64;
    let mut buf = vec![7u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        c.seal_block(&s, i, i + 1, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "seal: {:.0} MB/s",
        (n * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6
    );
    let slot = c
        .seal_block(&s, 5, n + 1, &mut buf)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        c.open_block(5, &slot, &buf, &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "open: {:.0} MB/s",
        (n * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}
