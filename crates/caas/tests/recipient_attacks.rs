//! Attestation-gated release, AWS's `Recipient` (`docs/recipient.md`), against a real
//! `caas dev --hosts N` (swtpm TPMs, host agents) with the real, unmodified boto3 client
//! passing `Recipient = {KeyEncryptionAlgorithm, AttestationDocument}`.
//!
//! The tenant story: `caas host attestation-document` gets a nonce from the key service and
//! a document from the host's agent (fresh TPM-resident recipient key, certified and quoted
//! by the enrolled AK); boto3 sends it; the secret comes back only as
//! `CiphertextForRecipient`, which only the host's TPM (in the attested PCR state) opens,
//! through `caas host open-recipient`. Attackers: a replayed, stale, tampered, relabelled
//! (another host's AK) or foreign-nonce document; a host whose PCRs changed; a host outside
//! the profile a key policy requires; a caller who is not the document's owner; a plain
//! Decrypt of a key whose policy requires attestation. Each is refused with AWS's error
//! shape and audited.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|_| panic!("not base64: {s}"))
}

struct Cloud {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dev: Dev,
    n: std::cell::Cell<u32>,
}

impl Cloud {
    fn start(hosts: usize) -> Self {
        Self::start_env(hosts, &[])
    }

    fn start_env(hosts: usize, envs: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let n = hosts.to_string();
        let dev = Dev::start_with_env(
            &root.join("dev"),
            "127.0.0.1:0",
            &["--hosts", &n, "--attest-secs", "3600"],
            envs,
        );
        Cloud {
            _tmp: tmp,
            root,
            dev,
            n: std::cell::Cell::new(0),
        }
    }

    fn agent(&self, host: &str) -> String {
        self.dev.agent_url(host)
    }

    fn fresh(&self, what: &str) -> PathBuf {
        self.n.set(self.n.get() + 1);
        self.root.join(format!("{what}-{}", self.n.get()))
    }

    /// `caas <args>` with the dev env; (success, stdout + stderr).
    fn caas(&self, args: &[&str], envs: &[(&str, String)]) -> (bool, String) {
        let out = Command::new(caas_bin())
            .args(args)
            .envs(&self.dev.env)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `caas host attestation-document` for `host`: the document's path.
    fn document(&self, host: &str) -> PathBuf {
        let out = self.fresh("doc");
        let (ok, text) = self.caas(
            &[
                "host",
                "attestation-document",
                "--host",
                host,
                "--agent",
                &self.agent(host),
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert!(ok, "attestation-document failed: {text}");
        out
    }

    /// `caas host open-recipient` on `host`'s agent; the secret or the error text.
    fn open_as(
        &self,
        host: &str,
        doc: &Path,
        ct: &[u8],
        envs: &[(&str, String)],
    ) -> Result<Vec<u8>, String> {
        let ctf = self.fresh("ct");
        std::fs::write(&ctf, ct).unwrap();
        let out = self.fresh("secret");
        let (ok, text) = self.caas(
            &[
                "host",
                "open-recipient",
                "--document",
                doc.to_str().unwrap(),
                "--ciphertext",
                ctf.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--agent",
                &self.agent(host),
            ],
            envs,
        );
        if !ok {
            return Err(text);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the secret file must be private");
        Ok(std::fs::read(&out).unwrap())
    }

    fn open(&self, host: &str, doc: &Path, ct: &[u8]) -> Result<Vec<u8>, String> {
        self.open_as(host, doc, ct, &[])
    }

    /// One boto3 call: the response, or `{"Error": code, "Message"}`.
    fn kms(&self, op: &str, params: Value) -> Value {
        let venv = venv_bin();
        let out = Command::new(venv.join("python"))
            .arg(repo_root().join("tests/python/recipient_client.py"))
            .arg(op)
            .arg(params.to_string())
            .envs(&self.dev.env)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3 {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "boto3 {op} printed: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn recipient(doc: &Path) -> Value {
        json!({
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": format!("file:{}", doc.display()),
        })
    }

    fn recipient_bytes(doc: &[u8]) -> Value {
        json!({
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": format!("b64:{}", b64(doc)),
        })
    }

    /// A symmetric key and a ciphertext of `plain` under it.
    fn key_and_ciphertext(&self, plain: &[u8]) -> (String, String) {
        let k = self.kms("CreateKey", json!({}));
        let key = k["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        let e = self.kms(
            "Encrypt",
            json!({ "KeyId": key, "Plaintext": format!("b64:{}", b64(plain)) }),
        );
        (key, e["CiphertextBlob"].as_str().unwrap().to_string())
    }

    /// Decrypt with a recipient document.
    fn decrypt_for(&self, ct: &str, recipient: Value) -> Value {
        self.kms(
            "Decrypt",
            json!({ "CiphertextBlob": format!("b64:{ct}"), "Recipient": recipient }),
        )
    }

    /// The key service's audit records.
    fn audit(&self) -> Vec<Value> {
        self.dev
            .caas(&["audit", "list", "--limit", "100000"])
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Whether an audit record of `op` with `result` names the recipient refusal `code`.
    fn audited_refusal(&self, op: &str, result: &str, code: &str) -> bool {
        self.audit().iter().any(|r| {
            r["Operation"] == json!(op)
                && r["Result"] == json!(result)
                && r["Detail"]["Recipient"]["Result"] == json!("Refused")
                && r["Detail"]["Recipient"]["Code"] == json!(code)
        })
    }
}

/// `CiphertextForRecipient` is AWS's format: OpenSSL's independent CMS parser reads it as
/// an EnvelopedData with RSAES-OAEP (SHA-256) and AES-256-CBC, and its recipient is the
/// document's TPM key by SubjectKeyIdentifier.
fn assert_aws_cms(root: &Path, cfr: &[u8], doc: &Path) {
    let f = root.join("cfr.der");
    std::fs::write(&f, cfr).unwrap();
    let out = Command::new("openssl")
        .args(["cms", "-cmsout", "-print", "-inform", "DER", "-in"])
        .arg(&f)
        .output()
        .expect("the openssl command is required (apt-get install openssl)");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "openssl cms: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["pkcs7-envelopedData", "rsaesOaep", "sha256", "aes-256-cbc"] {
        assert!(printed.contains(want), "{want} missing: {printed}");
    }
    let d: Value = serde_json::from_slice(&std::fs::read(doc).unwrap()).unwrap();
    let public = unb64(d["recipient"]["public"].as_str().unwrap());
    let spki = caas_tl::recipient::recipient_spki(&public).unwrap();
    let ski = caas_tl::cms::subject_key_identifier(&spki).unwrap();
    let e = caas_tl::cms::parse(cfr).unwrap();
    assert_eq!(e.subject_key_identifier, ski.to_vec());
}

/// A refusal in AWS's shape with the recipient code in the message.
fn assert_refused(v: &Value, error: &str, code: &str, what: &str) {
    assert_eq!(v["Error"], json!(error), "{what}: {v}");
    assert!(
        v["Message"].as_str().unwrap_or("").contains(code),
        "{what}: expected {code}: {v}"
    );
    assert!(v.get("Plaintext").is_none() && v.get("CiphertextForRecipient").is_none());
}

/// The tenant story with boto3: Decrypt, GenerateDataKey, GenerateDataKeyPair,
/// GenerateRandom and DeriveSharedSecret with `Recipient`; each secret only as `CiphertextForRecipient`, opened by
/// the host's TPM, equal to what the plain operation gives; each recipient key opens once
/// and only for the certificate that asked for it; a key policy can require attestation
/// (plain Decrypt refused) and a profile (a host outside it refused).
#[test]
fn recipient_release_end_to_end_with_boto3() {
    let c = Cloud::start(1);
    let secret = b"the tenant's database password".to_vec();
    let (key, ct) = c.key_and_ciphertext(&secret);

    // Decrypt.
    let doc = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert!(r.get("Error").is_none(), "Decrypt with Recipient: {r}");
    assert!(
        r.get("Plaintext").is_none(),
        "no plaintext with Recipient: {r}"
    );
    let cfr = unb64(r["CiphertextForRecipient"].as_str().unwrap());
    assert!(!cfr.windows(secret.len()).any(|w| w == secret.as_slice()));
    assert_aws_cms(&c.root, &cfr, &doc);
    let plain = c.kms("Decrypt", json!({ "CiphertextBlob": format!("b64:{ct}") }));
    assert_eq!(unb64(plain["Plaintext"].as_str().unwrap()), secret);
    // Another operator certificate cannot open it through the agent.
    let pki = caas_tls::pki::DevCa::load_or_create(&c.root.join("dev/pki")).unwrap();
    let other = pki
        .issue("other-operator", &[caas_tls::Role::Operator], &[])
        .unwrap();
    let stolen = c.open_as(
        "host-1",
        &doc,
        &cfr,
        &[
            ("CAAS_OPERATOR_CERT", other.cert.display().to_string()),
            ("CAAS_OPERATOR_KEY", other.key.display().to_string()),
        ],
    );
    assert!(
        stolen
            .as_ref()
            .is_err_and(|e| e.contains("recipient_key_unknown")),
        "another caller opened it: {stolen:?}"
    );
    assert_eq!(c.open("host-1", &doc, &cfr).unwrap(), secret);
    // The recipient key is single use.
    let again = c.open("host-1", &doc, &cfr);
    assert!(again.is_err(), "opened twice");

    // attack: wrong_recipient — a CiphertextForRecipient made for another recipient key
    // (another document) is refused by its recipient identifier, before the TPM is asked;
    // the right document still opens it.
    let doc_a = c.document("host-1");
    let doc_b = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&doc_b));
    let cfr_b = unb64(r["CiphertextForRecipient"].as_str().unwrap());
    let wrong = c.open("host-1", &doc_a, &cfr_b);
    assert!(
        wrong
            .as_ref()
            .is_err_and(|e| e.contains("recipient_key_unknown")),
        "a ciphertext for another recipient key: {wrong:?}"
    );
    assert_eq!(c.open("host-1", &doc_b, &cfr_b).unwrap(), secret);

    // GenerateDataKey: the data key opened by the TPM decrypts like CiphertextBlob does.
    let doc = c.document("host-1");
    let g = c.kms(
        "GenerateDataKey",
        json!({ "KeyId": key, "KeySpec": "AES_256", "Recipient": Cloud::recipient(&doc) }),
    );
    assert!(g.get("Plaintext").is_none(), "{g}");
    let dk = c
        .open(
            "host-1",
            &doc,
            &unb64(g["CiphertextForRecipient"].as_str().unwrap()),
        )
        .unwrap();
    assert_eq!(dk.len(), 32);
    let d = c.kms(
        "Decrypt",
        json!({ "CiphertextBlob": format!("b64:{}", g["CiphertextBlob"].as_str().unwrap()) }),
    );
    assert_eq!(unb64(d["Plaintext"].as_str().unwrap()), dk);

    // GenerateDataKeyPair: the private key opened by the TPM is the one under the KMS key.
    let doc = c.document("host-1");
    let p = c.kms(
        "GenerateDataKeyPair",
        json!({ "KeyId": key, "KeyPairSpec": "ECC_NIST_P256", "Recipient": Cloud::recipient(&doc) }),
    );
    assert!(p.get("PrivateKeyPlaintext").is_none(), "{p}");
    let sk = c
        .open(
            "host-1",
            &doc,
            &unb64(p["CiphertextForRecipient"].as_str().unwrap()),
        )
        .unwrap();
    let d = c.kms(
        "Decrypt",
        json!({ "CiphertextBlob": format!("b64:{}", p["PrivateKeyCiphertextBlob"].as_str().unwrap()) }),
    );
    assert_eq!(unb64(d["Plaintext"].as_str().unwrap()), sk);

    // GenerateRandom.
    let doc = c.document("host-1");
    let g = c.kms(
        "GenerateRandom",
        json!({ "NumberOfBytes": 64, "Recipient": Cloud::recipient(&doc) }),
    );
    assert!(g.get("Plaintext").is_none(), "{g}");
    let rnd = c
        .open(
            "host-1",
            &doc,
            &unb64(g["CiphertextForRecipient"].as_str().unwrap()),
        )
        .unwrap();
    assert_eq!(rnd.len(), 64);

    // DeriveSharedSecret: the ECDH secret opened by the TPM equals the plain answer.
    let agreement_key = |_: ()| {
        let k = c.kms(
            "CreateKey",
            json!({ "KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT" }),
        );
        k["KeyMetadata"]["KeyId"].as_str().unwrap().to_string()
    };
    let (ka, peer) = (agreement_key(()), agreement_key(()));
    let peer_pub = c.kms("GetPublicKey", json!({ "KeyId": peer }))["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let dss = |recipient: Option<Value>| {
        let mut p = json!({ "KeyId": ka, "KeyAgreementAlgorithm": "ECDH",
                            "PublicKey": format!("b64:{peer_pub}") });
        if let Some(r) = recipient {
            p["Recipient"] = r;
        }
        c.kms("DeriveSharedSecret", p)
    };
    let doc = c.document("host-1");
    let s = dss(Some(Cloud::recipient(&doc)));
    assert!(s.get("SharedSecret").is_none(), "{s}");
    let shared = c
        .open(
            "host-1",
            &doc,
            &unb64(s["CiphertextForRecipient"].as_str().unwrap()),
        )
        .unwrap();
    assert_eq!(unb64(dss(None)["SharedSecret"].as_str().unwrap()), shared);

    // A key policy that requires attestation under profile "dev": plain Decrypt refused.
    let account = c.dev.env["CAAS_ACCOUNT_ID"].clone();
    let policy = |profile: &str| {
        json!({
            "Version": "2012-10-17",
            "Statement": [
                { "Sid": "admin", "Effect": "Allow",
                  "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
                  "NotAction": ["kms:Decrypt"], "Resource": "*" },
                { "Sid": "attested-decrypt", "Effect": "Allow",
                  "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
                  "Action": "kms:Decrypt", "Resource": "*",
                  "Condition": { "StringEquals": {
                      "caas:RecipientAttestation:Profile": profile } } }
            ]
        })
        .to_string()
    };
    let put = c.kms(
        "PutKeyPolicy",
        json!({ "KeyId": key, "PolicyName": "default", "Policy": policy("dev") }),
    );
    assert!(put.get("Error").is_none(), "{put}");
    let plain = c.kms("Decrypt", json!({ "CiphertextBlob": format!("b64:{ct}") }));
    assert_eq!(plain["Error"], json!("AccessDeniedException"), "{plain}");
    let doc = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert_eq!(
        c.open(
            "host-1",
            &doc,
            &unb64(r["CiphertextForRecipient"].as_str().unwrap())
        )
        .unwrap(),
        secret,
        "{r}"
    );
    // attack: host_outside_required_profile — the policy wants profile "prod".
    c.kms(
        "PutKeyPolicy",
        json!({ "KeyId": key, "PolicyName": "default", "Policy": policy("prod") }),
    );
    let doc = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert_eq!(r["Error"], json!("AccessDeniedException"), "{r}");
    assert!(r.get("CiphertextForRecipient").is_none());
    let audit = c.audit();
    assert!(
        audit.iter().any(|e| {
            e["Operation"] == json!("Decrypt")
                && e["Result"] == json!("AccessDeniedException")
                && e["Detail"]["Recipient"]["Result"] == json!("Verified")
                && e["Detail"]["Recipient"]["Profile"] == json!("dev")
        }),
        "the refused attested Decrypt is audited with its recipient"
    );
}

/// attack: replayed_document, foreign_nonce, tampered_document, relabelled_document
/// (another host's AK under this host's name), unenrolled_host, wrong algorithm. Each is
/// `ValidationException` naming the check that failed, and audited.
#[test]
fn replayed_tampered_and_unenrolled_documents_are_refused() {
    let c = Cloud::start(2);
    let (_key, ct) = c.key_and_ciphertext(b"secret");

    // A good document works once; its replay is refused (the nonce is single use).
    let doc = c.document("host-1");
    let ok = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert!(ok.get("CiphertextForRecipient").is_some(), "{ok}");
    let replay = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert_refused(
        &replay,
        "ValidationException",
        "nonce_unknown",
        "replayed document",
    );
    assert!(c.audited_refusal("Decrypt", "ValidationException", "nonce_unknown"));

    let fresh = || -> Value {
        serde_json::from_slice(&std::fs::read(c.document("host-1")).unwrap()).unwrap()
    };
    let send = |d: &Value| c.decrypt_for(&ct, Cloud::recipient_bytes(d.to_string().as_bytes()));

    // A nonce the key service never issued.
    let mut d = fresh();
    d["nonce"] = json!(b64(&[7u8; 32]));
    assert_refused(
        &send(&d),
        "ValidationException",
        "nonce_unknown",
        "foreign nonce",
    );

    // Tampered: the quote, the event log, the recipient key (an attacker's own key would
    // need a new certification and quote by the host's AK).
    let mut d = fresh();
    let mut q = unb64(d["evidence"]["quote"].as_str().unwrap());
    let last = q.len() - 1;
    q[last] ^= 1;
    d["evidence"]["quote"] = json!(b64(&q));
    assert_refused(
        &send(&d),
        "ValidationException",
        "attestation_failed",
        "tampered quote",
    );

    let mut d = fresh();
    let other = fresh();
    d["recipient"] = other["recipient"].clone();
    assert_refused(
        &send(&d),
        "ValidationException",
        "attestation_failed",
        "recipient key swapped in",
    );

    let mut d = fresh();
    let mut log = unb64(d["evidence"]["event_log"].as_str().unwrap());
    log.truncate(log.len() - 3);
    d["evidence"]["event_log"] = json!(b64(&log));
    assert_refused(
        &send(&d),
        "ValidationException",
        "attestation_failed",
        "truncated event log",
    );

    // Relabelled: host-2's genuine document presented as host-1's.
    let mut d: Value =
        serde_json::from_slice(&std::fs::read(c.document("host-2")).unwrap()).unwrap();
    d["host"] = json!("host-1");
    assert_refused(
        &send(&d),
        "ValidationException",
        "ak_not_enrolled",
        "another host's AK",
    );

    // An AK the registrar never enrolled, under a name it does not know.
    let mut d = fresh();
    d["host"] = json!("host-9");
    assert_refused(
        &send(&d),
        "ValidationException",
        "host_not_enrolled",
        "unenrolled host",
    );

    // Garbage, and another key encryption algorithm.
    let r = c.decrypt_for(&ct, Cloud::recipient_bytes(b"{\"format\":1}"));
    assert_refused(
        &r,
        "ValidationException",
        "document_malformed",
        "garbage document",
    );
    let doc = c.document("host-1");
    let r = c.decrypt_for(
        &ct,
        json!({ "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1",
                "AttestationDocument": format!("file:{}", doc.display()) }),
    );
    assert_eq!(r["Error"], json!("ValidationException"), "{r}");

    for code in [
        "attestation_failed",
        "ak_not_enrolled",
        "host_not_enrolled",
        "document_malformed",
    ] {
        assert!(
            c.audited_refusal("Decrypt", "ValidationException", code),
            "refusal {code} not audited"
        );
    }
}

/// attack: wrong_pcr_state — a host whose PCR 7 changed gets no document past the key
/// service, and a ciphertext made for its earlier state no longer opens in its TPM.
#[test]
fn host_in_wrong_pcr_state_is_refused_and_cannot_open() {
    let c = Cloud::start(1);
    let (_key, ct) = c.key_and_ciphertext(b"only in the good state");
    let before = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&before));
    let cfr = unb64(r["CiphertextForRecipient"].as_str().expect("released"));
    // The host's boot changes (an unexpected kernel module measured into PCR 7).
    let pki = caas_tls::pki::DevCa::load_or_create(&c.root.join("dev/pki")).unwrap();
    let op = pki.issue("op", &[caas_tls::Role::Operator], &[]).unwrap();
    let http = tls_client(&pki.ca_file(), Some(op));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    http_call(
        &rt,
        &http,
        "POST",
        &format!("{}/v1/agent/dev/measure", c.agent("host-1")),
        Some(&json!({ "pcr": 7, "data": "an unexpected kernel module" })),
    )
    .unwrap();
    let opened = c.open("host-1", &before, &cfr);
    assert!(
        opened
            .as_ref()
            .is_err_and(|e| e.contains("pcr_state_changed")),
        "the TPM must refuse the recipient key in another state: {opened:?}"
    );
    let after = c.document("host-1");
    let r = c.decrypt_for(&ct, Cloud::recipient(&after));
    assert_refused(
        &r,
        "ValidationException",
        "attestation_failed",
        "changed PCR 7",
    );
    assert!(c.audited_refusal("Decrypt", "ValidationException", "attestation_failed"));
}

/// attack: stale_document — a document whose nonce outlived its lifetime (1 s here).
#[test]
fn stale_document_is_refused() {
    let c = Cloud::start_env(1, &[("CAAS_RECIPIENT_NONCE_TTL_SECS", "1")]);
    let (_key, ct) = c.key_and_ciphertext(b"secret");
    let doc = c.document("host-1");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let r = c.decrypt_for(&ct, Cloud::recipient(&doc));
    assert_refused(&r, "ValidationException", "nonce_expired", "stale document");
    let r = c.kms(
        "GenerateRandom",
        json!({ "NumberOfBytes": 16, "Recipient": Cloud::recipient(&doc) }),
    );
    assert_refused(
        &r,
        "ValidationException",
        "nonce_unknown",
        "stale document replayed",
    );
    assert!(c.audited_refusal("Decrypt", "ValidationException", "nonce_expired"));
    assert!(c.audited_refusal("GenerateRandom", "ValidationException", "nonce_unknown"));
}
