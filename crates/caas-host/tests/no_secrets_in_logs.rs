//! Runs enrollment, attestation, credential activation, seal/unseal and policy decrypt at
//! TRACE level (including the TSS library's own log records) and asserts that canary
//! secrets never appear in the captured output, in raw, hex or base64 form.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use caas_attest::Public;
use caas_attest::client::HttpClient;
use common::{AGENT_TIMEOUT, env};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_never_reach_the_logs() {
    let cap = Capture::default();
    let c2 = cap.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || c2.clone())
        .with_ansi(false)
        .finish()
        .try_init()
        .unwrap();

    let mut e = env(1, 30_000, None, None).await;
    e.hosts.start_agents(AGENT_TIMEOUT).await.unwrap();
    let http = HttpClient::default();
    let v: caas_attest::Verdict = http
        .post(
            &format!("{}/v1/attest/hosts/host-1/attest", e.ks.url),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert!(v.trusted);

    let agent = e.hosts.hosts[0].agent.as_ref().unwrap().agent.clone();
    let canary_cred = *b"CANARY-credential-secret-0123456";
    let canary_sealed = b"CANARY-sealed-data-abcdef".to_vec();
    let canary_bind = b"CANARY-bind-plaintext".to_vec();
    let keys: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.hosts.hosts[0].dir.join("agent-state/tpm-keys.json")).unwrap(),
    )
    .unwrap();
    let b = |k: &str| caas_attest::b64::decode(keys[k].as_str().unwrap()).unwrap();
    let ak = caas_tpm::KeyBlob {
        public: b("ak_public"),
        private: b("ak_private"),
    };
    let bind = caas_tpm::KeyBlob {
        public: b("bind_public"),
        private: b("bind_private"),
    };
    let ek = Public::parse_tpm2b(&agent.tpm().run(|t| t.ek_public()).await.unwrap()).unwrap();
    let akp = Public::parse_tpm2b(&ak.public).unwrap();
    let made = caas_attest::credential::make_credential(&ek, &akp.name(), &canary_cred).unwrap();
    let bp = Public::parse_tpm2b(&bind.public).unwrap();
    let pk = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&bp.spki_der().unwrap()).unwrap();
    let oaep = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(pk).unwrap();
    let mut ct = vec![0u8; oaep.ciphertext_size()];
    let ct = oaep
        .encrypt(
            &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
            &canary_bind,
            &mut ct,
            None,
        )
        .unwrap()
        .to_vec();
    let (cs, bs) = (canary_sealed.clone(), canary_bind.clone());
    agent
        .tpm()
        .run(move |t| {
            let got = t.activate_credential(&ak, &made.credential_blob, &made.encrypted_secret)?;
            assert_eq!(got.as_slice(), &canary_cred);
            let pcrs = [0, 1, 2, 3, 4, 5, 6, 7];
            let sealed = t.seal(caas_tpm::PcrBank::Sha256, &pcrs, &cs)?;
            assert_eq!(
                t.unseal(&sealed, caas_tpm::PcrBank::Sha256, &pcrs)?
                    .as_slice(),
                cs.as_slice()
            );
            assert_eq!(
                t.bind_decrypt(&bind, caas_tpm::PcrBank::Sha256, &pcrs, &ct)?
                    .as_slice(),
                bs.as_slice()
            );
            // A failing operation (policy mismatch) must not leak either.
            t.pcr_extend(caas_tpm::PcrBank::Sha256, 7, &[9; 32])?;
            assert!(t.unseal(&sealed, caas_tpm::PcrBank::Sha256, &pcrs).is_err());
            Ok(())
        })
        .await
        .unwrap();

    let logs = String::from_utf8_lossy(&cap.0.lock().unwrap()).to_string();
    assert!(
        logs.len() > 100,
        "nothing was captured: the test would prove nothing"
    );
    for secret in [&canary_cred[..], &canary_sealed, &canary_bind] {
        for form in [
            String::from_utf8_lossy(secret).to_string(),
            hex::encode(secret),
            caas_attest::b64::encode(secret),
        ] {
            assert!(
                !logs.contains(&form),
                "secret leaked into the logs as {form}"
            );
        }
    }
}
