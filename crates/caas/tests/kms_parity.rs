//! AWS KMS 2024–2026 additions through the `caas` binary with real clients: boto3 and
//! the aws CLI (tests/python/kms_parity.py) for ML-DSA, Ed25519, ECDH, GetKeyLastUsage and
//! DryRun, with OpenSSL checking Ed25519 signatures and ECDH secrets outside caas, and
//! aws-lc-rs here checking the ML-DSA signatures (raw and external-μ) outside caas.
//! Then the audit log: every record of those requests names their transport (plain HTTP
//! in `caas dev`), dry runs are recorded as such.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use serde_json::Value;
use std::process::Command;

#[test]
fn boto3_and_aws_cli_use_ml_dsa_ed25519_ecdh_last_usage_and_dry_run() {
    let venv = venv_bin();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dev = Dev::start(&tmp.path().join("dev"));
    let path = format!(
        "{}:{}",
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(venv.join("python"))
        .arg(repo_root().join("tests/python/kms_parity.py"))
        .envs(&dev.env)
        .env("PATH", path)
        .env("CAAS_TEST_OUT", &out_dir)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python client checks failed");
    assert!(stdout.contains(" passed, 0 failed"));

    // ML-DSA signatures made by caas verify outside it (aws-lc-rs), RAW and external-μ
    // alike, and not after tampering.
    use aws_lc_rs::signature::{self, ParsedPublicKey};
    for (spec, alg) in [
        ("ML_DSA_44", &signature::ML_DSA_44),
        ("ML_DSA_65", &signature::ML_DSA_65),
        ("ML_DSA_87", &signature::ML_DSA_87),
    ] {
        let read = |n: &str| std::fs::read(out_dir.join(format!("{spec}.{n}"))).unwrap();
        let pk = ParsedPublicKey::new(alg, read("spki")).unwrap();
        let msg = read("msg");
        for s in ["sig", "musig"] {
            let sig = read(s);
            pk.verify_sig(&msg, &sig)
                .unwrap_or_else(|_| panic!("{spec} {s} does not verify outside caas"));
            let mut bad = sig.clone();
            bad[1] ^= 0x10;
            assert!(pk.verify_sig(&msg, &bad).is_err());
        }
    }

    let audit: Vec<Value> = dev
        .caas(&["audit", "list", "--limit", "100000"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!audit.is_empty());
    let ops = |name: &str| -> Vec<&Value> {
        audit
            .iter()
            .filter(|r| r.to_string().contains(&format!("\"{name}\"")))
            .collect()
    };
    assert!(!ops("DeriveSharedSecret").is_empty());
    assert!(!ops("GetKeyLastUsage").is_empty());
    let dry = ops("DryRunOperationException");
    assert!(dry.len() >= 4, "dry runs audited as such: {dry:?}");
    for r in &dry {
        assert!(r.to_string().contains("DryRun"), "{r}");
    }
    // caas dev serves plain HTTP: the records say so.
    for r in ops("DeriveSharedSecret") {
        assert!(r.to_string().contains("plain HTTP"), "{r}");
    }
}
