//! KMS benchmark: Encrypt, Decrypt and GenerateDataKey requests per second with SigV4 over
//! HTTP/1.1 keep-alive from 1, 16 and 64 concurrent clients on loopback (p50/p99 latency),
//! Sign/s for ECDSA P-256 and RSA-2048, each printed beside the raw in-process primitive
//! speed measured in the same run, as a ratio. The key service runs in this process on an
//! embedded SQLite store in a temp dir (every request durably audited, as in production).
//!
//! Run: `scripts/bench-kms` (= `cargo run --release -p caas-kms --example kms_bench`);
//! `BENCH_SECS` sets seconds per cell, `BENCH_CLIENTS=16,64` and `BENCH_OPS=Encrypt,Sign` narrow
//! the table.
//! Peer: Cosmian KMS publishes 66.7 µs for a single AES-GCM request (≈ 15,000 req/s); it
//! cannot be run on this network-less machine, so its published figure is printed for
//! comparison.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use base64::Engine as _;
use caas_kms::{Kms, KmsParams, sigv4};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    akid: String,
    secret: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, akid: &str, secret: &[u8]) -> Conn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn {
            sender,
            host: addr.to_string(),
            akid: akid.into(),
            secret: secret.to_vec(),
        }
    }

    async fn call(&mut self, op: &str, body: &Value) -> Value {
        let body = body.to_string().into_bytes();
        let headers = vec![
            (
                "content-type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            ("host".to_string(), self.host.clone()),
            (
                "x-amz-date".to_string(),
                sigv4::format_amz_date(caas_kms::now_ms() / 1000),
            ),
            ("x-amz-target".to_string(), format!("TrentService.{op}")),
        ];
        let sreq = sigv4::Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: &body,
        };
        let auth = sigv4::sign(&sreq, &self.akid, &self.secret, "us-east-1", "kms").unwrap();
        let mut b = hyper::Request::builder().method("POST").uri("/");
        for (n, v) in &headers {
            b = b.header(n, v);
        }
        let req = b
            .header("authorization", auth)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            status.is_success(),
            "{op}: {}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

async fn run_load(
    addr: std::net::SocketAddr,
    akid: &str,
    secret: &[u8],
    clients: usize,
    dur: Duration,
    op: &'static str,
    body: Value,
) -> (f64, f64, f64) {
    let mut tasks = vec![];
    let start = Instant::now();
    for _ in 0..clients {
        let body = body.clone();
        let (akid, secret) = (akid.to_string(), secret.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr, &akid, &secret).await;
            let mut lat = vec![];
            while start.elapsed() < dur {
                let t = Instant::now();
                c.call(op, &body).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let n = all.len() as f64;
    (n / secs, pct(&mut all, 0.5), pct(&mut all, 0.99))
}

fn per_sec(dur: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tmp = tempfile::tempdir().unwrap();
        let params = KmsParams {
            region: "us-east-1".into(),
            database: format!("sqlite:{}", tmp.path().join("kms.sqlite3").display()),
            node_key_file: tmp.path().join("node.key"),
            create_node_key: true,
            domain_key_rotation: None,
            domain: None,
        };
        let kms: Arc<Kms> = Kms::open(&params).await.unwrap();
        let account = kms.create_account("bench").await.unwrap();
        let (akid, secret) = kms.create_access_key(&account, "bench").await.unwrap();
        let secret = secret.expose().to_vec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(caas_kms::server::serve(kms.clone(), listener, None, None, std::future::pending()));
        let mut c = Conn::open(addr, &akid, &secret).await;
        let key = c.call("CreateKey", &json!({})).await["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        let pt = base64::engine::general_purpose::STANDARD.encode([7u8; 256]);
        let ct = c.call("Encrypt", &json!({ "KeyId": key, "Plaintext": pt })).await["CiphertextBlob"].clone();
        let ecc = c.call("CreateKey", &json!({ "KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY" })).await["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        let rsa = c.call("CreateKey", &json!({ "KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY" })).await["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        let msg = base64::engine::general_purpose::STANDARD.encode(b"benchmark message");

        // In-process primitives (same run): the work a request does without HTTP/SigV4/store.
        let hbk = caas_crypto::SecretBytes::new(vec![9u8; 32]);
        let ec = Default::default();
        let raw_seal = per_sec(dur, || {
            let _ = caas_kms::ops::seal_for_bench(&key, 1, &hbk, &ec, &[7u8; 256]);
        });
        let ecc_sk = caas_kms::material::generate(caas_kms::material::KeySpec::EccP256).unwrap();
        let rsa_sk = caas_kms::material::generate(caas_kms::material::KeySpec::Rsa2048).unwrap();
        let d = caas_kms::material::message_digest("ECDSA_SHA_256", b"benchmark message", "RAW").unwrap();
        let raw_ecc = per_sec(dur, || {
            let _ = caas_kms::material::sign(caas_kms::material::KeySpec::EccP256, &ecc_sk, "ECDSA_SHA_256", &d);
        });
        let raw_rsa = per_sec(dur, || {
            let _ = caas_kms::material::sign(caas_kms::material::KeySpec::Rsa2048, &rsa_sk, "RSASSA_PKCS1_V1_5_SHA_256", &d);
        });

        println!("caas KMS benchmark — SigV4, HTTP/1.1 keep-alive, loopback, SQLite store (durable audit per request), {secs} s per cell");
        println!("{:<28} {:>8} {:>12} {:>10} {:>10} {:>14} {:>8}", "operation", "clients", "req/s", "p50 µs", "p99 µs", "in-process/s", "ratio");
        let cases: Vec<(&'static str, Value, f64)> = vec![
            ("Encrypt", json!({ "KeyId": key, "Plaintext": pt }), raw_seal),
            ("Decrypt", json!({ "CiphertextBlob": ct }), raw_seal),
            ("GenerateDataKey", json!({ "KeyId": key, "KeySpec": "AES_256" }), raw_seal),
        ];
        // BENCH_CLIENTS=16,64 and BENCH_OPS=Encrypt,Decrypt narrow the table (profiling,
        // A/B rounds); the default runs every cell.
        let clients_set: Vec<usize> = std::env::var("BENCH_CLIENTS")
            .ok()
            .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 16, 64]);
        let ops_filter = std::env::var("BENCH_OPS").ok();
        let wanted = |op: &str| ops_filter.as_deref().is_none_or(|f| f.split(',').any(|o| o.trim() == op));
        for (op, body, raw) in cases {
            if !wanted(op) {
                continue;
            }
            for &clients in &clients_set {
                let (rps, p50, p99) = run_load(addr, &akid, &secret, clients, dur, op, body.clone()).await;
                println!("{op:<28} {clients:>8} {rps:>12.0} {p50:>10.0} {p99:>10.0} {raw:>14.0} {:>8.3}", rps / raw);
            }
        }
        for (name, key, alg, raw) in [("Sign ECDSA P-256", ecc, "ECDSA_SHA_256", raw_ecc), ("Sign RSA-2048", rsa, "RSASSA_PKCS1_V1_5_SHA_256", raw_rsa)] {
            if !wanted("Sign") {
                continue;
            }
            let (rps, p50, p99) = run_load(addr, &akid, &secret, 16, dur, "Sign", json!({ "KeyId": key, "Message": msg, "SigningAlgorithm": alg })).await;
            println!("{name:<28} {:>8} {rps:>12.0} {p50:>10.0} {p99:>10.0} {raw:>14.0} {:>8.3}", 16, rps / raw);
        }
        println!("peer: Cosmian KMS, published 66.7 µs per single AES-GCM request ≈ {:.0} req/s (not runnable offline; published figure)", 1e6 / 66.7);
    });
}
