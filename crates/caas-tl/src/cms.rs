//! `CiphertextForRecipient` in AWS KMS's format: a CMS (RFC 5652) `ContentInfo` of type
//! EnvelopedData, DER, with one KeyTransRecipientInfo (RSAES-OAEP, RFC 8017/RFC 3560, with
//! SHA-256 and MGF1-SHA-256, empty label) and AES-256-CBC content encryption (RFC 3565,
//! PKCS#7 padding) — what AWS returns to a Nitro enclave and what the Nitro Enclaves SDK's
//! `aws_kms_decrypt` parses, and what `openssl cms -decrypt -inform DER -inkey KEY` opens.
//!
//! ```text
//! ContentInfo ::= SEQUENCE { contentType id-envelopedData, [0] EXPLICIT EnvelopedData }
//! EnvelopedData ::= SEQUENCE { version 2, recipientInfos SET OF {
//!     KeyTransRecipientInfo ::= SEQUENCE { version 2,
//!         rid [0] IMPLICIT SubjectKeyIdentifier,     -- SHA-1 of the RSAPublicKey (RFC 5280 §4.2.1.2 (1))
//!         keyEncryptionAlgorithm { id-RSAES-OAEP, { [0] sha256, [1] mgf1(sha256) } },
//!         encryptedKey OCTET STRING } },            -- RSA-OAEP of the 32-byte content key
//!   encryptedContentInfo SEQUENCE { id-data, { aes256-CBC, iv OCTET STRING (16) },
//!         [0] IMPLICIT encryptedContent } }          -- AES-256-CBC(k, iv, secret ‖ PKCS#7 pad)
//! ```
//!
//! [`envelope`] writes it for a recipient's SubjectPublicKeyInfo; [`parse`] reads exactly
//! this shape back (strict DER: definite, minimal lengths, nothing trailing; the algorithms
//! above and no others, so a downgrade to OAEP-SHA-1 or another cipher is refused) into the
//! RSA part (for whoever holds the private key: a TPM) and the content part, which
//! [`Enveloped::open_content`] decrypts with the content key. As in AWS's format, the content
//! has no integrity of its own: it comes from the key service over its authenticated TLS
//! channel, and only the holder of the recipient's private key can learn the content key.
//! Every failure to open the content is the one error `decryption_failed` (no padding oracle).
use crate::error::{Error, Result};
use aws_lc_rs::cipher::{
    AES_256, DecryptionContext, PaddedBlockDecryptingKey, PaddedBlockEncryptingKey,
    UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use caas_crypto::{SecretBytes, SecretKey};

/// Largest CMS message [`parse`] reads (secrets are at most a few KiB).
pub const MAX_CMS: usize = 64 * 1024;

const OID_ENVELOPED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_RSAES_OAEP: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x07];
const OID_MGF1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_AES256_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2a];
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const NULL: u8 = 0x05;
const OID: u8 = 0x06;
const CTX0_CONSTRUCTED: u8 = 0xa0;
const CTX1_CONSTRUCTED: u8 = 0xa1;
const CTX0_PRIMITIVE: u8 = 0x80;

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(tag);
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = (n as u64)
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(body);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

/// `AlgorithmIdentifier { sha256, NULL }` (as OpenSSL writes it; [`parse`] also takes it
/// without the NULL).
fn sha256_alg() -> Vec<u8> {
    seq(&[&tlv(OID, OID_SHA256), &tlv(NULL, &[])])
}

fn oaep_alg() -> Vec<u8> {
    let mgf = seq(&[&tlv(OID, OID_MGF1), &sha256_alg()]);
    let params = seq(&[
        &tlv(CTX0_CONSTRUCTED, &sha256_alg()),
        &tlv(CTX1_CONSTRUCTED, &mgf),
    ]);
    seq(&[&tlv(OID, OID_RSAES_OAEP), &params])
}

fn malformed(detail: &str) -> Error {
    Error::malformed("CMS EnvelopedData", detail)
}

/// A strict DER reader over one buffer.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The contents of the next element, which must have `tag`.
    fn read(&mut self, tag: u8) -> Result<&'a [u8]> {
        let (&t, rest) = self.0.split_first().ok_or_else(|| malformed("truncated"))?;
        if t != tag {
            return Err(malformed("unexpected element"));
        }
        let (&l0, rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
        let (len, rest) = if l0 < 0x80 {
            (usize::from(l0), rest)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 3 || rest.len() < n {
                return Err(malformed("unsupported length encoding"));
            }
            let (lb, rest) = rest.split_at(n);
            if lb[0] == 0 {
                return Err(malformed("non-minimal length"));
            }
            let len = lb.iter().fold(0usize, |a, &b| (a << 8) | usize::from(b));
            if len < 0x80 {
                return Err(malformed("non-minimal length"));
            }
            (len, rest)
        };
        if rest.len() < len {
            return Err(malformed("truncated"));
        }
        let (body, rest) = rest.split_at(len);
        self.0 = rest;
        Ok(body)
    }

    fn inner(&mut self, tag: u8) -> Result<Der<'a>> {
        self.read(tag).map(Der)
    }

    fn expect(&mut self, tag: u8, value: &[u8]) -> Result<()> {
        if self.read(tag)? == value {
            Ok(())
        } else {
            Err(malformed("unsupported algorithm or version"))
        }
    }

    fn end(&self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(malformed("trailing data"))
        }
    }
}

/// `sha256` with absent or NULL parameters.
fn read_sha256(d: &mut Der<'_>) -> Result<()> {
    let mut a = d.inner(SEQUENCE)?;
    a.expect(OID, OID_SHA256)?;
    if a.peek() == Some(NULL) {
        a.expect(NULL, &[])?;
    }
    a.end()
}

/// The RSAPublicKey inside an RSA SubjectPublicKeyInfo.
fn rsa_public_key_of(spki: &[u8]) -> Result<&[u8]> {
    let bad = |_| Error::malformed("recipient key", "not an RSA SubjectPublicKeyInfo");
    let mut top = Der(spki);
    let mut s = top.inner(SEQUENCE).map_err(bad)?;
    top.end().map_err(bad)?;
    let mut alg = s.inner(SEQUENCE).map_err(bad)?;
    alg.expect(OID, OID_RSA_ENCRYPTION).map_err(bad)?;
    let bits = s.read(BIT_STRING).map_err(bad)?;
    s.end().map_err(bad)?;
    match bits.split_first() {
        Some((0, key)) => Ok(key),
        _ => Err(Error::malformed(
            "recipient key",
            "not an RSA SubjectPublicKeyInfo",
        )),
    }
}

/// The recipient identifier: SHA-1 of the RSAPublicKey (RFC 5280 §4.2.1.2, method 1), the
/// SubjectKeyIdentifier a certificate for the key would carry. An identifier, not a
/// security property.
pub fn subject_key_identifier(spki: &[u8]) -> Result<[u8; 20]> {
    let key = rsa_public_key_of(spki)?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut out = [0u8; 20];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

/// `secret` enveloped to the RSA key `spki` (DER SubjectPublicKeyInfo): a fresh 256-bit
/// content key under RSAES-OAEP-SHA-256, the secret under AES-256-CBC with a random IV.
pub fn envelope(spki: &[u8], secret: &[u8]) -> Result<Vec<u8>> {
    let ski = subject_key_identifier(spki)?;
    let pk = PublicEncryptingKey::from_der(spki)
        .map_err(|_| Error::malformed("recipient key", "unusable RSA key"))?;
    let oaep = OaepPublicEncryptingKey::new(pk).map_err(|_| Error::Crypto("RSA-OAEP"))?;
    let k = caas_crypto::random_key().map_err(|_| Error::Crypto("RNG"))?;
    let mut ek = vec![0u8; oaep.ciphertext_size()];
    let n = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, k.expose(), &mut ek, None)
        .map_err(|_| Error::Crypto("RSA-OAEP"))?
        .len();
    ek.truncate(n);

    let key = UnboundCipherKey::new(&AES_256, k.expose()).map_err(|_| Error::Crypto("AES"))?;
    let cbc = PaddedBlockEncryptingKey::cbc_pkcs7(key).map_err(|_| Error::Crypto("AES"))?;
    // Room for the padding up front: no reallocation leaves a copy of the secret behind.
    let mut body = Vec::with_capacity(secret.len() + 16);
    body.extend_from_slice(secret);
    // aws-lc-rs draws the IV at random.
    let ctx = cbc
        .encrypt(&mut body)
        .map_err(|_| Error::Crypto("AES-CBC"))?;
    let iv: &[u8] = (&ctx).try_into().map_err(|_| Error::Crypto("AES-CBC"))?;

    let ktri = seq(&[
        &tlv(INTEGER, &[2]),
        &tlv(CTX0_PRIMITIVE, &ski),
        &oaep_alg(),
        &tlv(OCTET_STRING, &ek),
    ]);
    let eci = seq(&[
        &tlv(OID, OID_DATA),
        &seq(&[&tlv(OID, OID_AES256_CBC), &tlv(OCTET_STRING, iv)]),
        &tlv(CTX0_PRIMITIVE, &body),
    ]);
    let ed = seq(&[&tlv(INTEGER, &[2]), &tlv(SET, &ktri), &eci]);
    Ok(seq(&[
        &tlv(OID, OID_ENVELOPED_DATA),
        &tlv(CTX0_CONSTRUCTED, &ed),
    ]))
}

/// A parsed [`envelope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enveloped {
    /// The recipient's SubjectKeyIdentifier (`rid`).
    pub subject_key_identifier: Vec<u8>,
    /// The RSAES-OAEP-SHA-256 encryption of the content key (`encryptedKey`).
    pub encrypted_key: Vec<u8>,
    /// AES-256-CBC IV.
    pub iv: [u8; 16],
    /// The AES-256-CBC ciphertext (`encryptedContent`).
    pub encrypted_content: Vec<u8>,
}

/// Reads a CMS EnvelopedData of exactly the shape [`envelope`] writes (one
/// KeyTransRecipientInfo by SubjectKeyIdentifier, RSAES-OAEP with SHA-256 and MGF1-SHA-256,
/// AES-256-CBC); anything else is `malformed`.
pub fn parse(der: &[u8]) -> Result<Enveloped> {
    if der.len() > MAX_CMS {
        return Err(malformed("too large"));
    }
    let mut top = Der(der);
    let mut ci = top.inner(SEQUENCE)?;
    top.end()?;
    ci.expect(OID, OID_ENVELOPED_DATA)?;
    let mut explicit = ci.inner(CTX0_CONSTRUCTED)?;
    ci.end()?;
    let mut ed = explicit.inner(SEQUENCE)?;
    explicit.end()?;
    ed.expect(INTEGER, &[2])?;
    if ed.peek() == Some(CTX0_CONSTRUCTED) {
        return Err(malformed("originatorInfo is not supported"));
    }
    let mut ris = ed.inner(SET)?;
    let mut ktri = ris.inner(SEQUENCE)?;
    if ris.end().is_err() {
        return Err(malformed("exactly one recipient expected"));
    }
    ktri.expect(INTEGER, &[2])?;
    let ski = ktri.read(CTX0_PRIMITIVE)?.to_vec();
    {
        let mut alg = ktri.inner(SEQUENCE)?;
        alg.expect(OID, OID_RSAES_OAEP)?;
        let mut p = alg.inner(SEQUENCE)?;
        alg.end()?;
        read_sha256(&mut p.inner(CTX0_CONSTRUCTED)?)?;
        let mut mgf_x = p.inner(CTX1_CONSTRUCTED)?;
        let mut mgf = mgf_x.inner(SEQUENCE)?;
        mgf_x.end()?;
        mgf.expect(OID, OID_MGF1)?;
        read_sha256(&mut mgf)?;
        mgf.end()?;
        // pSourceAlgorithm [2] absent: the default, an empty label.
        p.end()?;
    }
    let encrypted_key = ktri.read(OCTET_STRING)?.to_vec();
    ktri.end()?;
    let mut eci = ed.inner(SEQUENCE)?;
    eci.expect(OID, OID_DATA)?;
    let mut cea = eci.inner(SEQUENCE)?;
    cea.expect(OID, OID_AES256_CBC)?;
    let iv: [u8; 16] = cea
        .read(OCTET_STRING)?
        .try_into()
        .map_err(|_| malformed("the IV must be 16 bytes"))?;
    cea.end()?;
    let encrypted_content = eci.read(CTX0_PRIMITIVE)?.to_vec();
    eci.end()?;
    if ed.peek().is_some() {
        return Err(malformed("unprotectedAttrs are not supported"));
    }
    if encrypted_content.is_empty() || encrypted_content.len() % 16 != 0 {
        return Err(malformed("the content is not whole AES blocks"));
    }
    Ok(Enveloped {
        subject_key_identifier: ski,
        encrypted_key,
        iv,
        encrypted_content,
    })
}

impl Enveloped {
    /// The secret, given the content key the recipient's private key recovered from
    /// [`Enveloped::encrypted_key`]. Any failure is `decryption_failed`.
    pub fn open_content(&self, content_key: &[u8]) -> Result<SecretBytes> {
        let failed = || Error::rejected("decryption_failed", "cannot open the enveloped content");
        let k = SecretKey::from_slice(content_key).map_err(|_| failed())?;
        let key = UnboundCipherKey::new(&AES_256, k.expose()).map_err(|_| failed())?;
        let cbc = PaddedBlockDecryptingKey::cbc_pkcs7(key).map_err(|_| failed())?;
        // Decrypted in a zeroizing buffer: a bad padding leaves no plaintext behind.
        let mut buf = zeroize::Zeroizing::new(self.encrypted_content.clone());
        let plain = cbc
            .decrypt(
                buf.as_mut_slice(),
                DecryptionContext::Iv128(FixedLength::from(self.iv)),
            )
            .map_err(|_| failed())?;
        Ok(SecretBytes::from_slice(plain))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};

    fn keypair() -> (PrivateDecryptingKey, Vec<u8>) {
        let k = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        (k, spki)
    }

    fn open(k: &PrivateDecryptingKey, der: &[u8]) -> Result<SecretBytes> {
        let e = parse(der)?;
        let oaep = OaepPrivateDecryptingKey::new(k.clone()).unwrap();
        let mut out = vec![0u8; oaep.min_output_size()];
        let ck = oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, &e.encrypted_key, &mut out, None)
            .map_err(|_| Error::rejected("decryption_failed", "rsa"))?;
        e.open_content(ck)
    }

    #[test]
    fn envelope_round_trips_for_every_length() {
        let (k, spki) = keypair();
        for n in [0usize, 1, 15, 16, 17, 32, 1000, 4096] {
            let secret: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let der = envelope(&spki, &secret).unwrap();
            assert_eq!(open(&k, &der).unwrap().expose(), &secret[..], "length {n}");
            let e = parse(&der).unwrap();
            assert_eq!(
                e.subject_key_identifier,
                subject_key_identifier(&spki).unwrap()
            );
        }
    }

    #[test]
    fn tampered_or_foreign_envelopes_are_refused() {
        let (k, spki) = keypair();
        let der = envelope(&spki, b"a secret").unwrap();
        // Trailing bytes, truncation, indefinite length: malformed.
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(parse(&trailing).is_err());
        assert!(parse(&der[..der.len() - 1]).is_err());
        let mut indefinite = der.clone();
        indefinite[1] = 0x80;
        assert!(parse(&indefinite).is_err());
        // A downgrade of the OAEP hash to SHA-1 (the OID's last byte) is refused.
        let pos = der
            .windows(OID_SHA256.len())
            .position(|w| w == OID_SHA256)
            .unwrap();
        let mut sha1 = der.clone();
        sha1[pos + OID_SHA256.len() - 1] = 0x02;
        assert!(parse(&sha1).is_err());
        // Every flip of the content fails to open as the one error (or, rarely, to
        // garbage that is not the secret: CBC has no integrity, as in AWS's format).
        let e = parse(&der).unwrap();
        let mut flipped = der.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        match open(&k, &flipped) {
            Err(e) => assert_eq!(e.code(), "decryption_failed"),
            Ok(s) => assert_ne!(s.expose(), b"a secret"),
        }
        assert_eq!(
            e.open_content(&[0u8; 32])
                .err()
                .map(|e| e.code().to_string()),
            e.open_content(&[1u8; 16])
                .err()
                .map(|e| e.code().to_string())
        );
        // Another key cannot open it.
        let (other, _) = keypair();
        assert!(open(&other, &der).is_err());
    }
}
