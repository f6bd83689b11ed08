//! In-process throughput of the block engine (no NBD, no sockets): sequential writes and
//! reads of 256 KiB requests over a 256 MiB volume in /dev/shm, best of 5 passes.
//! `cargo run --release -p caas-sdp --example engine_speed` (the same file builds against
//! the format v1 engine: used for the v1/v2 comparison in `bench/sdp-bench.sh`).
#![allow(clippy::unwrap_used)]
use caas_sdp::Store;
use caas_sdp::engine::{self, KeyInput, Volume};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let size: u64 = 256 << 20;
        let dir = std::path::PathBuf::from(format!("/dev/shm/vv2-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v");
        let key = KeyInput::Raw(Arc::new(caas_crypto::SecretKey::from_bytes([5; 32])));
        let layout = caas_volume::Layout::new(size).unwrap();
        let store = Store::open_file(&path, true, Some(layout.store_len())).unwrap();
        engine::create(&store, &key, size, Default::default(), false)
            .await
            .unwrap();
        drop(store);
        let (vol, _) = Volume::open(Store::open_file(&path, true, None).unwrap(), &key, true)
            .await
            .unwrap();
        let req = 256 << 10;
        let mut buf = vec![7u8; req];
        let (mut bw, mut br) = (0f64, 0f64);
        for _ in 0..5 {
            let t = Instant::now();
            let mut off = 0;
            while off < size {
                buf.fill(off as u8 | 1);
                vol.write(off, &mut buf, false).await.unwrap();
                off += req as u64;
            }
            vol.flush().await.unwrap();
            bw = bw.max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
            let t = Instant::now();
            let mut off = 0;
            while off < size {
                vol.read(off, &mut buf).await.unwrap();
                off += req as u64;
            }
            br = br.max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        vol.close().await.unwrap();
        println!("write {bw:.0} MB/s  read {br:.0} MB/s");
        std::fs::remove_dir_all(&dir).unwrap();
    });
}
