//! Attestation benchmark (`cargo bench -p caas-host --bench attestation`; env:
//! `BENCH_HOSTS` swtpm hosts (default 8), `BENCH_QUOTES` quotes recorded per host (250),
//! `BENCH_SYNTH_HOSTS` synthetic hosts (1000)).
//!
//! 1. Verifier throughput over a pre-recorded stream: quotes + event logs recorded from
//!    `BENCH_HOSTS` swtpm dev hosts (each answering real verifier challenges), then verified
//!    on both cores: nonce check, AK signature, log replay, profile check and storing the
//!    result. Also a larger stream from `BENCH_SYNTH_HOSTS` software-AK hosts.
//! 2. The reference: `tpm2_checkquote` on the same recorded quotes (seconds/verification).
//! 3. End-to-end attestation latency (challenge → HTTP → agent → swtpm quote → verdict).
//! 4. TPM operation latencies on swtpm: quote, certify, policy decrypt, seal, unseal,
//!    ActivateCredential.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caas_attest::ekcert::EkCaStore;
use caas_attest::registrar::Registrar;
use caas_attest::service::AttestState;
use caas_attest::store::{HostRecord, HostState, MemoryStore, get_host, put_host, put_profile};
use caas_attest::synthetic::SoftAk;
use caas_attest::verifier::{EvidenceSource, Verifier};
use caas_attest::{Evidence, Public, now_ms};
use caas_host::dev::DevHosts;
use caas_tpm::{AkAlg, PcrBank, Tpm};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

type Stream = Vec<(String, Vec<u8>, Evidence)>;

async fn verify_stream(
    verifier: Arc<Verifier<MemoryStore>>,
    stream: Stream,
    workers: usize,
) -> (f64, usize) {
    let n = stream.len();
    let mut chunks: Vec<Stream> = (0..workers).map(|_| Vec::new()).collect();
    for (i, item) in stream.into_iter().enumerate() {
        chunks[i % workers].push(item);
    }
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for chunk in chunks {
        let v = verifier.clone();
        set.spawn(async move {
            let mut ok = 0usize;
            for (host, nonce, ev) in chunk {
                let (verdict, _) = v.verify(&host, &nonce, &ev, now_ms()).await.unwrap();
                ok += usize::from(verdict.trusted);
            }
            ok
        });
    }
    let mut trusted = 0;
    while let Some(r) = set.join_next().await {
        trusted += r.unwrap();
    }
    (n as f64 / start.elapsed().as_secs_f64(), trusted)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let n_hosts = env_usize("BENCH_HOSTS", 8);
    let per_host = env_usize("BENCH_QUOTES", 250);
    let n_synth = env_usize("BENCH_SYNTH_HOSTS", 1000);
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    eprintln!("preparing {n_hosts} swtpm dev hosts ...");
    let mut hosts = DevHosts::prepare(dir.path(), n_hosts, &url, Default::default())
        .await
        .unwrap();
    let mut ca = EkCaStore::new();
    for f in hosts.ca_cert_files() {
        ca.add(&std::fs::read(f).unwrap()).unwrap();
    }
    let store = Arc::new(MemoryStore::new());
    let profile = hosts.profile("dev").unwrap();
    put_profile(&*store, &profile, "bench", "CreateProfile")
        .await
        .unwrap();
    let state = Arc::new(AttestState {
        registrar: Registrar {
            ca,
            enrollment_ttl_ms: 60_000,
            default_profile: Some("dev".into()),
        },
        verifier: Verifier::new(store.clone(), 3_600_000),
        source: hosts.agent_client().unwrap(),
        on_trust_change: None,
    });
    let app = caas_attest::service::router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    hosts.start_agents(Duration::from_secs(120)).await.unwrap();

    // 3. End-to-end latency (also warms up).
    let mut e2e = Vec::new();
    for i in 0..40 {
        let h = &hosts.hosts[i % n_hosts].name;
        let t = Instant::now();
        let v = state.attest(h).await.unwrap();
        e2e.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(v.trusted, "{v:?}");
    }

    // 1a. Record the swtpm stream: real challenges answered by the agents.
    eprintln!("recording {} quotes ...", n_hosts * per_host);
    let verifier = Arc::new(Verifier::new(store.clone(), 3_600_000));
    let t = Instant::now();
    let mut stream: Stream = Vec::new();
    let mut recs = Vec::new();
    for h in &hosts.hosts {
        recs.push(get_host(&*store, &h.name).await.unwrap().unwrap());
    }
    let mut set = tokio::task::JoinSet::new();
    for rec in recs.clone() {
        let v = verifier.clone();
        let src = hosts.agent_client().unwrap();
        set.spawn(async move {
            let mut out = Vec::new();
            for _ in 0..per_host {
                let ch = v.challenge(&rec.name, now_ms()).await.unwrap();
                let ev = src.fetch(&rec, &ch).await.unwrap();
                out.push((rec.name.clone(), ch.nonce, ev));
            }
            out
        });
    }
    while let Some(r) = set.join_next().await {
        stream.extend(r.unwrap());
    }
    let record_s = t.elapsed().as_secs_f64();
    // Interleave hosts as a real stream would.
    stream.sort_by(|a, b| a.1.cmp(&b.1));
    let sample: Stream = stream.iter().take(40).cloned().collect();
    let n_stream = stream.len();
    let (rate_1, trusted) = {
        let mut v1 = stream;
        let s1 = v1.split_off(n_stream / 2);
        let (r1, t1) = verify_stream(verifier.clone(), v1, 1).await;
        let (r2, t2) = verify_stream(verifier.clone(), s1, 2).await;
        ((r1, r2), t1 + t2)
    };
    assert_eq!(trusted, n_stream, "every recorded attestation must verify");

    // 1b. Synthetic hosts (software AKs, the dev hosts' logs) for a longer stream.
    let logs: Vec<Vec<u8>> = hosts
        .hosts
        .iter()
        .map(|h| std::fs::read(&h.event_log_path).unwrap())
        .collect();
    let template = recs[0].clone();
    let mut synth: Stream = Vec::new();
    let per_synth = 20;
    for i in 0..n_synth {
        let ak = SoftAk::generate().unwrap();
        let name = format!("synth-{i}");
        let rec = HostRecord {
            name: name.clone(),
            ak_public: ak.public().to_tpm2b().unwrap(),
            ak_name: hex::encode(ak.public().name()),
            state: HostState::Enrolled,
            ..template.clone()
        };
        put_host(&*store, &rec, None).await.unwrap();
        for _ in 0..per_synth {
            let ch = verifier.challenge(&name, now_ms()).await.unwrap();
            let ev = ak
                .evidence(&ch.nonce, &ch.selection, &logs[i % logs.len()])
                .unwrap();
            synth.push((name.clone(), ch.nonce, ev));
        }
    }
    let n_synth_stream = synth.len();
    let (synth_rate, synth_trusted) = verify_stream(verifier.clone(), synth, 2).await;
    assert_eq!(synth_trusted, n_synth_stream);

    // 2. tpm2_checkquote on the same recorded quotes.
    let qdir = dir.path().join("checkquote");
    std::fs::create_dir_all(&qdir).unwrap();
    let mut cq = Vec::new();
    for (i, (host, nonce, ev)) in sample.iter().enumerate() {
        let rec = recs.iter().find(|r| &r.name == host).unwrap();
        let spki = Public::parse_tpm2b(&rec.ak_public)
            .unwrap()
            .spki_der()
            .unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            caas_attest::b64::encode(&spki)
        );
        std::fs::write(qdir.join(format!("{i}.pem")), pem).unwrap();
        std::fs::write(qdir.join(format!("{i}.msg")), &ev.quote).unwrap();
        std::fs::write(qdir.join(format!("{i}.sig")), &ev.signature).unwrap();
        let t = Instant::now();
        // Spawned directly (not through the fd-closing wrapper) so the timing is the tool alone;
        // it does not connect to a TPM, so inherited TPM sockets only live as long as it runs.
        let out = std::process::Command::new("tpm2_checkquote")
            .args([
                "-u",
                &format!("{i}.pem"),
                "-m",
                &format!("{i}.msg"),
                "-s",
                &format!("{i}.sig"),
                "-q",
                &hex::encode(nonce),
                "-g",
                "sha256",
            ])
            .current_dir(&qdir)
            .env("TSS2_LOG", "all+none")
            .output()
            .expect("tpm2_checkquote (install tpm2-tools)");
        cq.push(t.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 4. TPM operation latencies on the first host's swtpm.
    let tcti = hosts.hosts[0].tcti();
    drop(hosts.hosts[0].agent.take());
    let tpm_lat = tokio::task::spawn_blocking(move || {
        let mut tpm = Tpm::open(&tcti).unwrap();
        let pcrs = [0u32, 1, 2, 3, 4, 5, 6, 7];
        let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
        let bind = tpm.create_bind_key(PcrBank::Sha256, &pcrs).unwrap();
        let bp = Public::parse_tpm2b(&bind.public).unwrap();
        let pk = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&bp.spki_der().unwrap()).unwrap();
        let oaep = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(pk).unwrap();
        let mut ct = vec![0u8; oaep.ciphertext_size()];
        let ct = oaep
            .encrypt(&aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256, b"k", &mut ct, None)
            .unwrap()
            .to_vec();
        let ek = Public::parse_tpm2b(&tpm.ek_public().unwrap()).unwrap();
        let akp = Public::parse_tpm2b(&ak.public).unwrap();
        let sealed = tpm.seal(PcrBank::Sha256, &pcrs, b"secret").unwrap();
        let mut m: Vec<(&str, Vec<f64>)> = Vec::new();
        let mut time = |name: &'static str, f: &mut dyn FnMut()| {
            let mut v = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                f();
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
            m.push((name, v));
        };
        time("quote", &mut || {
            drop(tpm.quote(&ak, b"n", PcrBank::Sha256, &pcrs).unwrap())
        });
        time("certify", &mut || {
            drop(tpm.certify_bind_key(&ak, &bind, b"c").unwrap())
        });
        time("policy decrypt", &mut || {
            drop(
                tpm.bind_decrypt(&bind, PcrBank::Sha256, &pcrs, &ct)
                    .unwrap(),
            )
        });
        time("seal", &mut || {
            drop(tpm.seal(PcrBank::Sha256, &pcrs, b"secret").unwrap())
        });
        time("unseal", &mut || {
            drop(tpm.unseal(&sealed, PcrBank::Sha256, &pcrs).unwrap())
        });
        time("activate credential", &mut || {
            let c = caas_attest::credential::make_credential(&ek, &akp.name(), &[1; 32]).unwrap();
            drop(
                tpm.activate_credential(&ak, &c.credential_blob, &c.encrypted_secret)
                    .unwrap(),
            );
        });
        m
    })
    .await
    .unwrap();

    let cq_mean = cq.iter().sum::<f64>() / cq.len() as f64;
    println!("== caas attestation benchmark ({n_hosts} swtpm hosts, 2 cores) ==");
    println!("recorded {n_stream} swtpm quotes+logs in {record_s:.1} s");
    println!(
        "verifier throughput, swtpm stream, 1 worker : {:>8.0} attestations/s",
        rate_1.0
    );
    println!(
        "verifier throughput, swtpm stream, 2 workers: {:>8.0} attestations/s",
        rate_1.1
    );
    println!(
        "verifier throughput, {n_synth} synthetic hosts ({n_synth_stream} attestations), 2 workers: {synth_rate:>8.0} attestations/s"
    );
    println!(
        "tpm2_checkquote (same quotes, signature+nonce only): {:.4} s/verification = {:.0}/s  -> caas is {:.0}x faster",
        cq_mean,
        1.0 / cq_mean,
        rate_1.1 * cq_mean
    );
    let mut e = e2e.clone();
    println!(
        "end-to-end attestation (challenge -> verdict) over HTTP+swtpm: median {:.1} ms, p95 {:.1} ms",
        pct(&mut e.clone(), 0.5),
        pct(&mut e, 0.95)
    );
    for (name, mut v) in tpm_lat {
        println!(
            "TPM {name:<20} median {:>6.1} ms  p95 {:>6.1} ms",
            pct(&mut v.clone(), 0.5),
            pct(&mut v, 0.95)
        );
    }
}
