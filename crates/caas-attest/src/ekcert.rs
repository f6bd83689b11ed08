//! EK certificate validation: parse the X.509 certificate that the TPM vendor (swtpm's
//! local CA in development) stored in the TPM's NV, check its validity period and that it
//! chains to one of the configured TPM-vendor CA certificates (signatures verified with
//! aws-lc-rs), and check that its public key is the EK the host presented.

use crate::error::Error;
use crate::structures::{Public, PublicKey};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};

/// Trusted TPM-vendor CA certificates (roots and intermediates; each one is an anchor).
#[derive(Debug, Clone, Default)]
pub struct EkCaStore {
    certs: Vec<Certificate>,
}

impl EkCaStore {
    /// An empty store (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every certificate of a PEM bundle or one DER certificate.
    pub fn add(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
            let certs = Certificate::load_pem_chain(bytes)
                .map_err(|e| Error::EkCertificate(format!("CA PEM: {e}")))?;
            let n = certs.len();
            self.certs.extend(certs);
            Ok(n)
        } else {
            let c = Certificate::from_der(bytes)
                .map_err(|e| Error::EkCertificate(format!("CA DER: {e}")))?;
            self.certs.push(c);
            Ok(1)
        }
    }

    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Validates an EK certificate (DER) at time `now_unix` and returns its
    /// SubjectPublicKeyInfo DER.
    pub fn validate(&self, ek_cert_der: &[u8], now_unix: u64) -> Result<Vec<u8>, Error> {
        let leaf = Certificate::from_der(ek_cert_der)
            .map_err(|e| Error::EkCertificate(format!("not a DER X.509 certificate: {e}")))?;
        check_time(&leaf, now_unix)?;
        // Every configured certificate is an anchor, so one verified step suffices.
        for ca in &self.certs {
            if ca.tbs_certificate.subject != leaf.tbs_certificate.issuer {
                continue;
            }
            if verify_cert_signature(&leaf, ca).is_ok() {
                check_time(ca, now_unix)?;
                return leaf
                    .tbs_certificate
                    .subject_public_key_info
                    .to_der()
                    .map_err(|e| Error::EkCertificate(format!("SPKI: {e}")));
            }
        }
        Err(Error::EkCertificate(format!(
            "issuer '{}' is not a configured TPM vendor CA (or the signature does not verify)",
            leaf.tbs_certificate.issuer
        )))
    }
}

fn check_time(c: &Certificate, now_unix: u64) -> Result<(), Error> {
    let v = &c.tbs_certificate.validity;
    let nb = v.not_before.to_unix_duration().as_secs();
    let na = v.not_after.to_unix_duration().as_secs();
    if now_unix < nb || now_unix > na {
        return Err(Error::EkCertificate(format!(
            "certificate '{}' is outside its validity period",
            c.tbs_certificate.subject
        )));
    }
    Ok(())
}

fn verify_cert_signature(cert: &Certificate, issuer: &Certificate) -> Result<(), Error> {
    let tbs = cert
        .tbs_certificate
        .to_der()
        .map_err(|e| Error::EkCertificate(format!("TBS: {e}")))?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or_else(|| Error::EkCertificate("signature bit string".into()))?;
    let spki = &issuer.tbs_certificate.subject_public_key_info;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| Error::EkCertificate("issuer key bit string".into()))?;
    let sig_oid = cert.signature_algorithm.oid.to_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    let alg: &dyn VerificationAlgorithm = match (sig_oid.as_str(), curve.as_deref()) {
        ("1.2.840.113549.1.1.11", _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", _) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", _) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("1.2.840.113549.1.1.5", _) => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        ("1.2.840.10045.4.3.2", Some("1.2.840.10045.3.1.7")) => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some("1.2.840.10045.3.1.7")) => &signature::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.2", Some("1.3.132.0.34")) => &signature::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some("1.3.132.0.34")) => &signature::ECDSA_P384_SHA384_ASN1,
        (other, _) => {
            return Err(Error::EkCertificate(format!(
                "unsupported signature algorithm {other}"
            )));
        }
    };
    UnparsedPublicKey::new(alg, key)
        .verify(&tbs, sig)
        .map_err(|_| Error::EkCertificate("certificate signature does not verify".into()))
}

/// Checks that the certificate's SubjectPublicKeyInfo is the key of `ek`.
pub fn ek_matches_certificate(ek: &Public, cert_spki_der: &[u8]) -> Result<(), Error> {
    if matches!(ek.key, PublicKey::Other) {
        return Err(Error::EkCertificate("EK is not an asymmetric key".into()));
    }
    let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(cert_spki_der)
        .map_err(|e| Error::EkCertificate(format!("SPKI: {e}")))?;
    let ours = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(&ek.spki_der()?)
        .map_err(|e| Error::EkCertificate(format!("EK SPKI: {e}")))?;
    if spki.subject_public_key != ours.subject_public_key
        || spki.algorithm.oid != ours.algorithm.oid
    {
        return Err(Error::EkCertificate(
            "the EK public key does not match the EK certificate".into(),
        ));
    }
    Ok(())
}
