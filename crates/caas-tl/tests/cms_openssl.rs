//! `CiphertextForRecipient` (`caas_tl::cms`) against an independent CMS implementation,
//! OpenSSL's `openssl cms` (package `openssl`), with a software RSA recipient key:
//! what caas writes, OpenSSL decrypts; what OpenSSL writes with the same algorithms
//! (RSAES-OAEP-SHA-256, MGF1-SHA-256, AES-256-CBC, recipient by SubjectKeyIdentifier),
//! caas parses and opens, and the SubjectKeyIdentifier caas computes is the one OpenSSL puts
//! in a certificate for the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, PrivateDecryptingKey};
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is required (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A software RSA-2048 key: (its directory with key.pem, SPKI DER, PKCS#8 DER).
fn software_key() -> (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "key.pem",
        ],
    );
    openssl(
        d,
        &[
            "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
        ],
    );
    openssl(
        d,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der",
        ],
    );
    let spki = std::fs::read(d.join("pub.der")).unwrap();
    let pkcs8 = std::fs::read(d.join("key.der")).unwrap();
    (dir, spki, pkcs8)
}

#[test]
fn openssl_cms_decrypts_ciphertext_for_recipient() {
    let (dir, spki, _) = software_key();
    let d = dir.path();
    for (i, secret) in [
        b"".to_vec(),
        b"a 32-byte data key, exactly 32 B".to_vec(),
        (0..=255u8).cycle().take(1000).collect::<Vec<u8>>(),
    ]
    .into_iter()
    .enumerate()
    {
        let der = caas_tl::cms::envelope(&spki, &secret).unwrap();
        let ct = format!("ct{i}.der");
        std::fs::write(d.join(&ct), &der).unwrap();
        // `openssl cms -cmsout -print` parses the whole structure.
        let printed = String::from_utf8_lossy(&openssl(
            d,
            &["cms", "-cmsout", "-print", "-inform", "DER", "-in", &ct],
        ))
        .to_string();
        assert!(printed.contains("pkcs7-envelopedData"), "{printed}");
        assert!(printed.contains("rsaesOaep"), "{printed}");
        assert!(printed.contains("aes-256-cbc"), "{printed}");
        assert!(printed.contains("sha256"), "{printed}");
        let plain = openssl(
            d,
            &[
                "cms", "-decrypt", "-binary", "-inform", "DER", "-in", &ct, "-inkey", "key.pem",
            ],
        );
        assert_eq!(plain, secret, "secret {i} as OpenSSL decrypts it");
    }
}

#[test]
fn caas_opens_what_openssl_cms_encrypts() {
    let (dir, spki, pkcs8) = software_key();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "key.pem",
            "-subj",
            "/CN=recipient",
            "-days",
            "1",
            "-out",
            "cert.pem",
        ],
    );
    let secret = b"secret from an independent encoder";
    std::fs::write(d.join("secret.bin"), secret).unwrap();
    openssl(
        d,
        &[
            "cms",
            "-encrypt",
            "-binary",
            "-outform",
            "DER",
            "-in",
            "secret.bin",
            "-out",
            "ct.der",
            "-aes256",
            "-recip",
            "cert.pem",
            "-keyid",
            "-keyopt",
            "rsa_padding_mode:oaep",
            "-keyopt",
            "rsa_oaep_md:sha256",
            "-keyopt",
            "rsa_mgf1_md:sha256",
        ],
    );
    let der = std::fs::read(d.join("ct.der")).unwrap();
    let e = caas_tl::cms::parse(&der).unwrap();
    assert_eq!(
        e.subject_key_identifier,
        caas_tl::cms::subject_key_identifier(&spki).unwrap(),
        "the recipient identifier is the certificate's SubjectKeyIdentifier"
    );
    let k =
        OaepPrivateDecryptingKey::new(PrivateDecryptingKey::from_pkcs8(&pkcs8).unwrap()).unwrap();
    let mut out = vec![0u8; k.min_output_size()];
    let ck = k
        .decrypt(&OAEP_SHA256_MGF1SHA256, &e.encrypted_key, &mut out, None)
        .unwrap();
    assert_eq!(e.open_content(ck).unwrap().expose(), secret);

    // OAEP with SHA-1 (OpenSSL's default) is not the format: refused, not opened.
    openssl(
        d,
        &[
            "cms",
            "-encrypt",
            "-binary",
            "-outform",
            "DER",
            "-in",
            "secret.bin",
            "-out",
            "sha1.der",
            "-aes256",
            "-recip",
            "cert.pem",
            "-keyid",
            "-keyopt",
            "rsa_padding_mode:oaep",
        ],
    );
    let sha1 = std::fs::read(d.join("sha1.der")).unwrap();
    assert!(caas_tl::cms::parse(&sha1).is_err());
}
