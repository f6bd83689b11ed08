//! Signature verification of TPM-signed structures (quotes and certifications) with an
//! attestation key's public area, using aws-lc-rs. The TPM signs H(TPMS_ATTEST) with the
//! scheme's hash; aws-lc-rs hashes the message itself, so the raw TPMS_ATTEST is passed.

use crate::der;
use crate::error::Error;
use crate::structures::{HashAlg, Public, PublicKey, Signature, curve};
use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

/// Verifies `sig` over `message` with the key `key`.
pub fn verify_signature(key: &Public, message: &[u8], sig: &Signature) -> Result<(), Error> {
    match (sig, &key.key) {
        (Signature::Ecdsa { hash, r, s }, PublicKey::Ecc { curve: c, x, y }) => {
            let (alg, size): (&signature::EcdsaVerificationAlgorithm, usize) = match (*c, *hash) {
                (curve::NIST_P256, HashAlg::Sha256) => (&signature::ECDSA_P256_SHA256_FIXED, 32),
                (curve::NIST_P384, HashAlg::Sha384) => (&signature::ECDSA_P384_SHA384_FIXED, 48),
                (c, _) => {
                    return Err(Error::Unsupported {
                        what: "ECDSA curve/hash combination",
                        value: c,
                    });
                }
            };
            if r.len() > size || s.len() > size {
                return Err(Error::BadSignature(
                    "ECDSA r or s longer than the curve size",
                ));
            }
            let mut fixed = vec![0u8; 2 * size];
            fixed[size - r.len()..size].copy_from_slice(r);
            fixed[2 * size - s.len()..].copy_from_slice(s);
            let point = der::ec_point(*c, x, y)?;
            UnparsedPublicKey::new(alg, &point)
                .verify(message, &fixed)
                .map_err(|_| Error::BadSignature("ECDSA signature does not verify with the key"))
        }
        (Signature::RsaSsa { hash, sig }, PublicKey::Rsa { n, e, .. }) => {
            let alg = match hash {
                HashAlg::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                HashAlg::Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                HashAlg::Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                HashAlg::Sha1 => {
                    return Err(Error::Unsupported {
                        what: "signature hash",
                        value: hash.tpm_id(),
                    });
                }
            };
            RsaPublicKeyComponents {
                n: n.as_slice(),
                e: e.as_slice(),
            }
            .verify(alg, message, sig)
            .map_err(|_| Error::BadSignature("RSASSA signature does not verify with the key"))
        }
        (Signature::RsaPss { hash, sig }, PublicKey::Rsa { n, e, .. }) => {
            let alg = match hash {
                HashAlg::Sha256 => &signature::RSA_PSS_2048_8192_SHA256,
                HashAlg::Sha384 => &signature::RSA_PSS_2048_8192_SHA384,
                HashAlg::Sha512 => &signature::RSA_PSS_2048_8192_SHA512,
                HashAlg::Sha1 => {
                    return Err(Error::Unsupported {
                        what: "signature hash",
                        value: hash.tpm_id(),
                    });
                }
            };
            RsaPublicKeyComponents {
                n: n.as_slice(),
                e: e.as_slice(),
            }
            .verify(alg, message, sig)
            .map_err(|_| Error::BadSignature("RSASSA-PSS signature does not verify with the key"))
        }
        _ => Err(Error::BadSignature(
            "signature scheme does not match the key type",
        )),
    }
}
