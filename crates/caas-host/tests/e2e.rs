//! End-to-end attestation against swtpm: dev hosts (own swtpm, EK certificate from a
//! project-local swtpm_localca, measured boot, host agent) enroll with an in-process key
//! service (registrar + verifier over HTTP) and are attested; every failure case of
//! issue 3's acceptance list has a test here, plus the tpm2-tools cross-checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use caas_attest::client::HttpClient;
use caas_attest::eventlog::EV_IPL;
use caas_attest::registrar::{EnrollChallenge, EnrollFinish, EnrollRequest};
use caas_attest::service::HostView;
use caas_attest::store::get_host;
use caas_attest::verifier::{Challenge, EvidenceSource};
use caas_attest::{EventLog, EventLogWriter, HashAlg, PcrSelection, Public, Verdict};
use caas_host::agent::Agent;
use common::{AGENT_TIMEOUT, codes, env, tpm2};
use std::time::{Duration, Instant};

async fn attest(http: &HttpClient, ks: &str, host: &str) -> Verdict {
    http.post(
        &format!("{ks}/v1/attest/hosts/{host}/attest"),
        &serde_json::json!({}),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_host_is_trusted_until_a_pcr_is_extended_after_boot() {
    let mut e = env(1, 30_000, None, None).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let http = HttpClient::default();
    let view: HostView = http
        .get(&format!("{}/v1/attest/hosts/host-1", e.ks.url))
        .await
        .unwrap();
    assert!(view.has_bind_key, "the AK-certified bind key is recorded");
    assert_eq!(view.profile.as_deref(), Some("dev"));
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert!(v.trusted, "{v:?}");
    assert_eq!(v.pcrs.len(), 8);

    // Someone extends PCR 5 after boot with tpm2-tools.
    let tcti = e.hosts.hosts[0].tcti();
    tpm2(
        &tcti,
        "tpm2_pcrextend",
        &[&format!("5:sha256={}", "ab".repeat(32))],
        e.dir.path(),
    );
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert!(!v.trusted);
    assert_eq!(codes(&v), ["event_log_replay_mismatch"], "{v:?}");
    assert!(
        serde_json::to_string(&v.reasons)
            .unwrap()
            .contains("\"pcr\":5")
    );
    let h = get_host(&*e.ks.store, "host-1").await.unwrap().unwrap();
    assert!(!h.trusted);
    let audit = e.ks.store.audit_trail();
    assert!(
        audit
            .iter()
            .any(|a| a.operation == "EnrollHost" && a.result == "ok")
    );
    assert!(audit.iter().any(|a| a.operation == "HostTrusted"));
    assert!(
        audit
            .iter()
            .any(|a| a.operation == "HostUntrusted" && a.subject == "host-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_logs_nonces_and_selections_fail_with_specific_reasons() {
    let mut e = env(1, 1_000, None, None).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let http = HttpClient::default();
    let host = &e.hosts.hosts[0];
    let rec = get_host(&*e.ks.store, "host-1").await.unwrap().unwrap();
    let verifier = &e.ks.state.verifier;
    let agent = e.hosts.agent_client().unwrap();
    let log_path = host.event_log_path.clone();
    let original = std::fs::read(&log_path).unwrap();

    // Edited, truncated and reordered logs (the agent serves whatever is on disk).
    let edit = |f: &dyn Fn(&mut EventLog)| {
        let mut l = EventLog::parse(&original).unwrap();
        f(&mut l);
        std::fs::write(&log_path, l.to_bytes()).unwrap();
    };
    edit(&|l| l.events[3].digests[0].1[0] ^= 0xff);
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert_eq!(
        codes(&v),
        [
            "event_log_replay_mismatch",
            "event_not_in_profile",
            "expected_event_missing"
        ],
        "edited: {v:?}"
    );
    edit(&|l| l.events.truncate(l.events.len() - 2));
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert_eq!(
        codes(&v),
        ["event_log_replay_mismatch", "expected_event_missing"],
        "truncated: {v:?}"
    );
    std::fs::write(&log_path, &original[..original.len() - 7]).unwrap();
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert_eq!(codes(&v), ["evidence_malformed"], "cut: {v:?}");
    edit(&|l| l.events.swap(2, 3)); // bootloader and kernel, both PCR 4
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert_eq!(codes(&v), ["event_log_replay_mismatch"], "reordered: {v:?}");
    std::fs::write(&log_path, &original).unwrap();
    assert!(attest(&http, &e.ks.url, "host-1").await.trusted);

    // Replayed nonce: the same evidence presented twice.
    let ch = verifier
        .challenge("host-1", caas_attest::now_ms())
        .await
        .unwrap();
    let ev = agent.fetch(&rec, &ch).await.unwrap();
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert!(v.trusted, "{v:?}");
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["nonce_replayed"]);
    // A nonce the verifier never issued.
    let (v, _) = verifier
        .verify("host-1", b"made-up nonce", &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["nonce_unknown"]);
    // Stale nonce: answered after the nonce lifetime (1 s here).
    let ch = verifier
        .challenge("host-1", caas_attest::now_ms())
        .await
        .unwrap();
    let ev = agent.fetch(&rec, &ch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["nonce_expired"]);
    // Evidence for another (old) nonce answering a fresh challenge.
    let old = ev;
    let ch = verifier
        .challenge("host-1", caas_attest::now_ms())
        .await
        .unwrap();
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &old, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["nonce_mismatch"]);
    // The host quotes a different PCR selection than asked for.
    let ch = verifier
        .challenge("host-1", caas_attest::now_ms())
        .await
        .unwrap();
    let other = Challenge {
        nonce: ch.nonce.clone(),
        selection: PcrSelection::new(HashAlg::Sha256, &[0, 1, 2, 3]).unwrap(),
    };
    let ev = agent.fetch(&rec, &other).await.unwrap();
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["pcr_selection_mismatch"]);

    // An extra, correctly logged event that the profile does not know (e.g. an unexpected
    // module loaded): log and PCR agree, the profile check fails.
    let running = host.agent.as_ref().unwrap();
    let mut l = EventLog::parse(&original).unwrap();
    let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
    let d = w.measure(6, EV_IPL, b"unexpected module", b"rogue.ko");
    l.events
        .extend(EventLog::parse(&w.into_bytes()).unwrap().events);
    std::fs::write(&log_path, l.to_bytes()).unwrap();
    let digest = d[0].1.clone();
    running
        .agent
        .tpm()
        .run(move |t| t.pcr_extend(caas_tpm::PcrBank::Sha256, 6, &digest))
        .await
        .unwrap();
    let v = attest(&http, &e.ks.url, "host-1").await;
    assert_eq!(codes(&v), ["event_not_in_profile"], "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_rejects_bad_ek_and_ak_and_another_tpms_quote() {
    let mut e = env(2, 30_000, None, None).await;
    let http = HttpClient::default();
    let cfg1 = caas_host::config::load(&e.hosts.hosts[0].config_path).unwrap();
    let cfg2 = caas_host::config::load(&e.hosts.hosts[1].config_path).unwrap();
    let a1 = Agent::new(cfg1).await.unwrap();
    let a2 = Agent::new(cfg2).await.unwrap();
    let (ek1, cert1) = a1
        .tpm()
        .run(|t| Ok((t.ek_public()?, t.ek_certificate()?)))
        .await
        .unwrap();
    let (ek2, _) = a2
        .tpm()
        .run(|t| Ok((t.ek_public()?, t.ek_certificate()?)))
        .await
        .unwrap();
    let ak1 = a1.status();
    let keys_dir = e.hosts.hosts[1].dir.join("agent-state/tpm-keys.json");
    let k2: serde_json::Value = serde_json::from_slice(&std::fs::read(keys_dir).unwrap()).unwrap();
    let ak2_public = caas_attest::b64::decode(k2["ak_public"].as_str().unwrap()).unwrap();
    let k1: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.hosts.hosts[0].dir.join("agent-state/tpm-keys.json")).unwrap(),
    )
    .unwrap();
    let ak1_public = caas_attest::b64::decode(k1["ak_public"].as_str().unwrap()).unwrap();
    assert_eq!(
        hex::encode(Public::parse_tpm2b(&ak1_public).unwrap().name()),
        ak1.ak_name
    );
    let enroll_url = format!("{}/v1/attest/enroll", e.ks.url);
    let req = |ek: &[u8], cert: &[u8], ak: &[u8]| EnrollRequest {
        name: "mallory".into(),
        agent_url: "http://127.0.0.1:1".into(),
        ek_public: ek.to_vec(),
        ek_cert: cert.to_vec(),
        ak_public: ak.to_vec(),
    };
    let code = |r: Result<EnrollChallenge, caas_attest::Error>| match r {
        Err(caas_attest::Error::Remote { code, status, .. }) => {
            assert_eq!(status, 403);
            code
        }
        other => panic!("expected a refusal, got {other:?}"),
    };

    // EK that does not match its certificate: host 1's certificate with host 2's EK.
    assert_eq!(
        code(
            http.post(&enroll_url, &req(&ek2, &cert1, &ak1_public))
                .await
        ),
        "ek_mismatch"
    );
    // A certificate that is not an X.509 certificate at all.
    assert_eq!(
        code(
            http.post(&enroll_url, &req(&ek1, b"junk", &ak1_public))
                .await
        ),
        "ek_cert_invalid"
    );
    // An AK that fails credential activation: host 1's EK with host 2's AK. The credential
    // is encrypted to host 1's EK and bound to host 2's AK name: neither TPM can open it.
    let ch: EnrollChallenge = http
        .post(&enroll_url, &req(&ek1, &cert1, &ak2_public))
        .await
        .unwrap();
    let cb = ch.credential_blob.clone();
    let es = ch.encrypted_secret.clone();
    let ak2_blob = {
        let p = caas_attest::b64::decode(k2["ak_private"].as_str().unwrap()).unwrap();
        caas_tpm::KeyBlob {
            public: ak2_public.clone(),
            private: p,
        }
    };
    let err = a2
        .tpm()
        .run(move |t| t.activate_credential(&ak2_blob, &cb, &es))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("activate credential"), "{err}");
    let fin = EnrollFinish {
        name: "mallory".into(),
        enrollment_id: ch.enrollment_id,
        secret: vec![0u8; 32],
        bind_key: None,
        tls_binding: None,
    };
    let r: Result<HostView, _> = http
        .post(&format!("{}/v1/attest/enroll/finish", e.ks.url), &fin)
        .await;
    match r {
        Err(caas_attest::Error::Remote { code, .. }) => assert_eq!(code, "ak_activation_failed"),
        other => panic!("{other:?}"),
    }
    assert!(
        e.ks.store
            .audit_trail()
            .iter()
            .any(|a| a.subject == "mallory" && a.result == "ak_activation_failed")
    );
    assert!(
        e.ks.store
            .audit_trail()
            .iter()
            .any(|a| a.subject == "mallory" && a.result == "ek_mismatch")
    );

    // Both hosts enroll properly; then a quote by host 2's AK is presented for host 1.
    drop((a1, a2));
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let verifier = &e.ks.state.verifier;
    let rec2 = get_host(&*e.ks.store, "host-2").await.unwrap().unwrap();
    let ch = verifier
        .challenge("host-1", caas_attest::now_ms())
        .await
        .unwrap();
    let ev = e
        .hosts
        .agent_client()
        .unwrap()
        .fetch(&rec2, &ch)
        .await
        .unwrap();
    let (v, _) = verifier
        .verify("host-1", &ch.nonce, &ev, caas_attest::now_ms())
        .await
        .unwrap();
    assert_eq!(codes(&v), ["signature_invalid"], "{v:?}");
    assert!(attest(&http, &e.ks.url, "host-2").await.trusted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ek_ca_is_rejected() {
    // A key service that trusts a different local CA than the one that issued the EK cert.
    let other_dir = tempfile::tempdir().unwrap();
    let other = caas_tpm::swtpm::LocalCa::create(&other_dir.path().join("ca")).unwrap();
    other.provision(&other_dir.path().join("tpm")).unwrap();
    let e = env(1, 30_000, Some(other.ca_cert_files()), None).await;
    let cfg = caas_host::config::load(&e.hosts.hosts[0].config_path).unwrap();
    let a = Agent::new(cfg).await.unwrap();
    match a.enroll().await {
        Err(caas_host::Error::Attest(caas_attest::Error::Remote { code, message, .. })) => {
            assert_eq!(code, "ek_cert_untrusted", "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!a.is_enrolled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_attestation_flips_host_within_one_interval() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let hook: caas_attest::service::TrustHook = std::sync::Arc::new(move |ev| {
        let _ = tx.send((ev.host.clone(), ev.trusted, Instant::now()));
    });
    let mut e = env(1, 30_000, None, Some(hook)).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let interval = Duration::from_millis(1_000);
    let task = caas_attest::service::spawn_continuous(e.ks.state.clone(), interval);
    let (h, trusted, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((h.as_str(), trusted), ("host-1", true));
    let changed = Instant::now();
    tpm2(
        &e.hosts.hosts[0].tcti(),
        "tpm2_pcrextend",
        &[&format!("0:sha256={}", "cd".repeat(32))],
        e.dir.path(),
    );
    let (h, trusted, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((h.as_str(), trusted), ("host-1", false));
    let took = at - changed;
    // One interval plus the attestation itself (tens of ms on swtpm).
    assert!(
        took <= interval + Duration::from_millis(750),
        "flipped after {took:?}"
    );
    assert!(
        e.ks.store
            .audit_trail()
            .iter()
            .any(|a| a.operation == "HostUntrusted")
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm2_tools_cross_check() {
    let mut e = env(1, 30_000, None, None).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let dir = e.dir.path().join("tpm2");
    std::fs::create_dir_all(&dir).unwrap();
    let tcti = e.hosts.hosts[0].tcti();
    let profile = caas_attest::store::get_profile(&*e.ks.store, "dev")
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read(&e.hosts.hosts[0].event_log_path).unwrap();

    // 1. tpm2_quote (AK made by tpm2_createak) verifies in caas's verifier.
    tpm2(
        &tcti,
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
        &dir,
    );
    tpm2(&tcti, "tpm2_flushcontext", &["-t"], &dir);
    tpm2(
        &tcti,
        "tpm2_createak",
        &[
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u",
            "ak.pub", "-n", "ak.name",
        ],
        &dir,
    );
    tpm2(&tcti, "tpm2_flushcontext", &["-t"], &dir);
    let nonce = "c0ffee0123456789";
    tpm2(
        &tcti,
        "tpm2_quote",
        &[
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,2,3,4,5,6,7",
            "-q",
            nonce,
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-g",
            "sha256",
        ],
        &dir,
    );
    tpm2(&tcti, "tpm2_flushcontext", &["-t"], &dir);
    let ak = Public::parse_tpm2b(&std::fs::read(dir.join("ak.pub")).unwrap()).unwrap();
    let ev = caas_attest::Evidence {
        quote: std::fs::read(dir.join("quote.msg")).unwrap(),
        signature: std::fs::read(dir.join("quote.sig")).unwrap(),
        event_log: log.clone(),
        pcr_values: vec![],
    };
    let v = caas_attest::appraise(&ak, &hex::decode(nonce).unwrap(), &ev, &profile, 0);
    assert!(v.trusted, "tpm2_quote evidence rejected: {v:?}");
    let v = caas_attest::appraise(&ak, b"other", &ev, &profile, 0);
    assert_eq!(codes(&v), ["nonce_mismatch"]);

    // 2. A quote made by caas verifies with tpm2_checkquote.
    let rec = get_host(&*e.ks.store, "host-1").await.unwrap().unwrap();
    let ch = Challenge {
        nonce: b"caas-nonce-42".to_vec(),
        selection: profile.selection(),
    };
    let ev = e
        .hosts
        .agent_client()
        .unwrap()
        .fetch(&rec, &ch)
        .await
        .unwrap();
    std::fs::write(dir.join("caas.msg"), &ev.quote).unwrap();
    std::fs::write(dir.join("caas.sig"), &ev.signature).unwrap();
    let akp = Public::parse_tpm2b(&rec.ak_public).unwrap();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        caas_attest::b64::encode(&akp.spki_der().unwrap())
    );
    std::fs::write(dir.join("caas-ak.pem"), pem).unwrap();
    let out = tpm2(
        &tcti,
        "tpm2_checkquote",
        &[
            "-u",
            "caas-ak.pem",
            "-m",
            "caas.msg",
            "-s",
            "caas.sig",
            "-q",
            &hex::encode(b"caas-nonce-42"),
            "-g",
            "sha256",
        ],
        &dir,
    );
    assert!(out.status.success());
    // And tpm2_checkquote rejects it for another nonce.
    let bad = caas_tpm::swtpm::command_without_inherited_fds("tpm2_checkquote")
        .args([
            "-u",
            "caas-ak.pem",
            "-m",
            "caas.msg",
            "-s",
            "caas.sig",
            "-q",
            "00112233",
            "-g",
            "sha256",
        ])
        .env("TSS2_LOG", "all+none")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_name_cannot_be_taken_by_another_tpm_and_agent_restart_reuses_keys() {
    let mut e = env(2, 30_000, None, None).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let http = HttpClient::default();
    // Host 2's (genuine) TPM tries to enroll under host 1's name.
    let a2 = e.hosts.hosts[1].agent.as_ref().unwrap().agent.clone();
    let (ek2, cert2) = a2
        .tpm()
        .run(|t| Ok((t.ek_public()?, t.ek_certificate()?)))
        .await
        .unwrap();
    let k2: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.hosts.hosts[1].dir.join("agent-state/tpm-keys.json")).unwrap(),
    )
    .unwrap();
    let req = EnrollRequest {
        name: "host-1".into(),
        agent_url: "http://127.0.0.1:1".into(),
        ek_public: ek2,
        ek_cert: cert2,
        ak_public: caas_attest::b64::decode(k2["ak_public"].as_str().unwrap()).unwrap(),
    };
    match http
        .post::<_, EnrollChallenge>(&format!("{}/v1/attest/enroll", e.ks.url), &req)
        .await
    {
        Err(caas_attest::Error::Remote { code, .. }) => assert_eq!(code, "host_name_taken"),
        other => panic!("{other:?}"),
    }
    assert!(
        attest(&http, &e.ks.url, "host-1").await.trusted,
        "host 1 is unaffected"
    );

    // The management API shows status and public material only.
    let url = e.hosts.hosts[0].agent.as_ref().unwrap().url.clone();
    let ops = e.hosts.client(caas_tls::Role::Operator).unwrap();
    let status: serde_json::Value = ops.get(&format!("{url}/v1/agent/status")).await.unwrap();
    assert_eq!(status["enrolled"], true);
    let text = status.to_string();
    let k1: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.hosts.hosts[0].dir.join("agent-state/tpm-keys.json")).unwrap(),
    )
    .unwrap();
    for private in ["ak_private", "bind_private"] {
        assert!(!text.contains(k1[private].as_str().unwrap()));
    }
    let bind: serde_json::Value = ops.get(&format!("{url}/v1/agent/bind-key")).await.unwrap();
    assert!(
        !bind
            .to_string()
            .contains(k1["bind_private"].as_str().unwrap())
    );
    // Only TPM-wrapped blobs are on disk (the AK and bind key, the sealed audit seed), next
    // to the agent's audit log and the (empty) directory of running workloads (pk_TTP is
    // never pinned from a fetch).
    let mut files: Vec<String> = std::fs::read_dir(e.hosts.hosts[0].dir.join("agent-state"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.retain(|f| !matches!(f.as_str(), "audit.jsonl" | "run"));
    files.sort();
    assert_eq!(files, ["audit-key.sealed", "tpm-keys.json"]);

    // Restart host 1's agent: same AK, re-enrolls, still trusted.
    let before = status["ak_name"].as_str().unwrap().to_string();
    drop(e.hosts.hosts[0].agent.take());
    let cfg = caas_host::config::load(&e.hosts.hosts[0].config_path).unwrap();
    let running = caas_host::agent::spawn(cfg).await.unwrap();
    let t = Instant::now();
    while !running.agent.is_enrolled() {
        assert!(t.elapsed() < AGENT_TIMEOUT, "re-enrollment did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.agent.status().ak_name, before);
    assert!(attest(&http, &e.ks.url, "host-1").await.trusted);
}
