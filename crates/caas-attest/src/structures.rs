//! Parsers (and the few encoders the verifier needs) for TPM 2.0 structures that travel in
//! attestation evidence: TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC/TPMT_PUBLIC and
//! TPML_PCR_SELECTION (TPM 2.0 Library Part 2). Pure and sans-IO; every length is checked.

use crate::error::Error;
use crate::wire::{Reader, put_tpm2b};
use aws_lc_rs::digest;

/// TPM_GENERATED_VALUE: the magic that marks TPM-produced attestation structures.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_ST_ATTEST_CERTIFY.
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;

/// TPM_ALG_* identifiers used here.
pub mod alg {
    /// RSA.
    pub const RSA: u16 = 0x0001;
    /// SHA-1.
    pub const SHA1: u16 = 0x0004;
    /// HMAC.
    pub const HMAC: u16 = 0x0005;
    /// AES.
    pub const AES: u16 = 0x0006;
    /// Keyed hash object.
    pub const KEYEDHASH: u16 = 0x0008;
    /// SHA-256.
    pub const SHA256: u16 = 0x000B;
    /// SHA-384.
    pub const SHA384: u16 = 0x000C;
    /// SHA-512.
    pub const SHA512: u16 = 0x000D;
    /// Null algorithm.
    pub const NULL: u16 = 0x0010;
    /// RSASSA-PKCS1-v1_5.
    pub const RSASSA: u16 = 0x0014;
    /// RSAES-PKCS1-v1_5.
    pub const RSAES: u16 = 0x0015;
    /// RSASSA-PSS.
    pub const RSAPSS: u16 = 0x0016;
    /// RSAES-OAEP.
    pub const OAEP: u16 = 0x0017;
    /// ECDSA.
    pub const ECDSA: u16 = 0x0018;
    /// ECDH.
    pub const ECDH: u16 = 0x0019;
    /// ECC key.
    pub const ECC: u16 = 0x0023;
    /// Symmetric cipher object.
    pub const SYMCIPHER: u16 = 0x0025;
    /// CFB mode.
    pub const CFB: u16 = 0x0043;
}

/// TPM_ECC_CURVE identifiers.
pub mod curve {
    /// NIST P-256.
    pub const NIST_P256: u16 = 0x0003;
    /// NIST P-384.
    pub const NIST_P384: u16 = 0x0004;
}

/// TPMA_OBJECT bits.
pub mod attr {
    /// fixedTPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// userWithAuth.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// adminWithPolicy.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// restricted.
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign/encrypt.
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// A hash algorithm the verifier supports.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    /// SHA-1 (event logs only).
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// From a TPM_ALG_ID.
    pub fn from_tpm(id: u16) -> Result<Self, Error> {
        Ok(match id {
            alg::SHA1 => Self::Sha1,
            alg::SHA256 => Self::Sha256,
            alg::SHA384 => Self::Sha384,
            alg::SHA512 => Self::Sha512,
            other => {
                return Err(Error::Unsupported {
                    what: "hash algorithm",
                    value: other,
                });
            }
        })
    }
    /// The TPM_ALG_ID.
    pub fn tpm_id(self) -> u16 {
        match self {
            Self::Sha1 => alg::SHA1,
            Self::Sha256 => alg::SHA256,
            Self::Sha384 => alg::SHA384,
            Self::Sha512 => alg::SHA512,
        }
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
    /// The aws-lc-rs digest algorithm.
    pub fn digest_alg(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }
    /// Hashes `data`.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        digest::digest(self.digest_alg(), data).as_ref().to_vec()
    }
    /// Hashes the concatenation of `parts`.
    pub fn hash_parts(self, parts: &[&[u8]]) -> Vec<u8> {
        let mut c = digest::Context::new(self.digest_alg());
        for p in parts {
            c.update(p);
        }
        c.finish().as_ref().to_vec()
    }
    /// Lower-case name as used in profiles and tpm2-tools (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }
}

/// One bank's PCR selection: the hash algorithm and the selected PCR indices (ascending).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcrSelection {
    /// Bank.
    pub hash: HashAlg,
    /// Selected PCRs, ascending, each < 24.
    pub pcrs: Vec<u32>,
}

impl PcrSelection {
    /// A selection, normalised (sorted, deduplicated); rejects PCR indices ≥ 24.
    pub fn new(hash: HashAlg, pcrs: &[u32]) -> Result<Self, Error> {
        let mut v: Vec<u32> = pcrs.to_vec();
        v.sort_unstable();
        v.dedup();
        if v.iter().any(|&p| p >= 24) {
            return Err(Error::InvalidRequest("PCR index must be < 24".into()));
        }
        Ok(Self { hash, pcrs: v })
    }
}

/// Parses a TPML_PCR_SELECTION.
pub fn parse_pcr_selection_list(r: &mut Reader<'_>) -> Result<Vec<PcrSelection>, Error> {
    let count = r.u32_be()?;
    if count > 16 {
        return Err(Error::malformed("TPML_PCR_SELECTION", "too many banks"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let hash = HashAlg::from_tpm(r.u16_be()?)?;
        let size = r.u8()? as usize;
        if size > 4 {
            return Err(Error::malformed("TPMS_PCR_SELECTION", "sizeofSelect > 4"));
        }
        let bits = r.take(size)?;
        let mut pcrs = Vec::new();
        for (i, b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pcrs.push((i * 8 + bit) as u32);
                }
            }
        }
        if pcrs.iter().any(|&p| p >= 24) {
            return Err(Error::malformed("TPMS_PCR_SELECTION", "PCR index >= 24"));
        }
        out.push(PcrSelection { hash, pcrs });
    }
    Ok(out)
}

/// Encodes a TPML_PCR_SELECTION with 3-byte select bitmaps.
pub fn encode_pcr_selection_list(sel: &[PcrSelection]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(sel.len() as u32).to_be_bytes());
    for s in sel {
        out.extend_from_slice(&s.hash.tpm_id().to_be_bytes());
        out.push(3);
        let mut bits = [0u8; 3];
        for &p in &s.pcrs {
            if let Some(b) = bits.get_mut((p / 8) as usize) {
                *b |= 1 << (p % 8);
            }
        }
        out.extend_from_slice(&bits);
    }
    out
}

/// TPMS_CLOCK_INFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered.
    pub clock: u64,
    /// TPM resets.
    pub reset_count: u32,
    /// TPM restarts.
    pub restart_count: u32,
    /// Whether clock was not lost.
    pub safe: bool,
}

/// The attested part of a TPMS_ATTEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    /// TPMS_QUOTE_INFO.
    Quote {
        /// PCRs covered.
        selection: Vec<PcrSelection>,
        /// Digest of the selected PCR values (hash = the signing scheme's hash).
        pcr_digest: Vec<u8>,
    },
    /// TPMS_CERTIFY_INFO.
    Certify {
        /// Name of the certified object.
        name: Vec<u8>,
        /// Its qualified name.
        qualified_name: Vec<u8>,
    },
}

/// A parsed TPMS_ATTEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// Qualified name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// Caller-supplied data (the nonce).
    pub extra_data: Vec<u8>,
    /// Clock information.
    pub clock_info: ClockInfo,
    /// Firmware version.
    pub firmware_version: u64,
    /// Quote or certify info.
    pub attested: Attested,
}

impl Attest {
    /// Parses TPMS_ATTEST bytes (the signed message of a quote or certify).
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(buf, "TPMS_ATTEST");
        let magic = r.u32_be()?;
        if magic != TPM_GENERATED_VALUE {
            return Err(Error::malformed(
                "TPMS_ATTEST",
                "magic is not TPM_GENERATED_VALUE",
            ));
        }
        let ty = r.u16_be()?;
        let qualified_signer = r.tpm2b()?.to_vec();
        let extra_data = r.tpm2b()?.to_vec();
        let clock_info = ClockInfo {
            clock: r.u64_be()?,
            reset_count: r.u32_be()?,
            restart_count: r.u32_be()?,
            safe: match r.u8()? {
                0 => false,
                1 => true,
                _ => {
                    return Err(Error::malformed(
                        "TPMS_CLOCK_INFO",
                        "safe is not a TPMI_YES_NO",
                    ));
                }
            },
        };
        let firmware_version = r.u64_be()?;
        let attested = match ty {
            TPM_ST_ATTEST_QUOTE => {
                let selection = parse_pcr_selection_list(&mut r)?;
                let pcr_digest = r.tpm2b()?.to_vec();
                Attested::Quote {
                    selection,
                    pcr_digest,
                }
            }
            TPM_ST_ATTEST_CERTIFY => {
                let name = r.tpm2b()?.to_vec();
                let qualified_name = r.tpm2b()?.to_vec();
                Attested::Certify {
                    name,
                    qualified_name,
                }
            }
            other => {
                return Err(Error::malformed(
                    "TPMS_ATTEST",
                    format!("unsupported type {other:#06x}"),
                ));
            }
        };
        r.finish()?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock_info,
            firmware_version,
            attested,
        })
    }
}

/// A parsed TPMT_SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// ECDSA (r, s big-endian).
    Ecdsa {
        /// Hash.
        hash: HashAlg,
        /// r.
        r: Vec<u8>,
        /// s.
        s: Vec<u8>,
    },
    /// RSASSA-PKCS1-v1_5.
    RsaSsa {
        /// Hash.
        hash: HashAlg,
        /// Signature bytes.
        sig: Vec<u8>,
    },
    /// RSASSA-PSS.
    RsaPss {
        /// Hash.
        hash: HashAlg,
        /// Signature bytes.
        sig: Vec<u8>,
    },
}

impl Signature {
    /// Parses TPMT_SIGNATURE bytes.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(buf, "TPMT_SIGNATURE");
        let scheme = r.u16_be()?;
        let s = match scheme {
            alg::ECDSA => {
                let hash = HashAlg::from_tpm(r.u16_be()?)?;
                let rr = r.tpm2b()?.to_vec();
                let ss = r.tpm2b()?.to_vec();
                Self::Ecdsa { hash, r: rr, s: ss }
            }
            alg::RSASSA | alg::RSAPSS => {
                let hash = HashAlg::from_tpm(r.u16_be()?)?;
                let sig = r.tpm2b()?.to_vec();
                if scheme == alg::RSASSA {
                    Self::RsaSsa { hash, sig }
                } else {
                    Self::RsaPss { hash, sig }
                }
            }
            other => {
                return Err(Error::Unsupported {
                    what: "signature scheme",
                    value: other,
                });
            }
        };
        r.finish()?;
        Ok(s)
    }

    /// The hash algorithm the signature was made over.
    pub fn hash(&self) -> HashAlg {
        match self {
            Self::Ecdsa { hash, .. } | Self::RsaSsa { hash, .. } | Self::RsaPss { hash, .. } => {
                *hash
            }
        }
    }
}

/// The unique (public key) part of a TPMT_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA modulus and exponent (big-endian, no leading zeros in exponent).
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
        /// Key bits.
        bits: u16,
    },
    /// ECC point.
    Ecc {
        /// TPM_ECC_CURVE.
        curve: u16,
        /// X.
        x: Vec<u8>,
        /// Y.
        y: Vec<u8>,
    },
    /// Keyed-hash or symmetric object (no public key).
    Other,
}

/// A parsed TPMT_PUBLIC, keeping its encoding for Name computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    /// TPMI_ALG_PUBLIC.
    pub object_type: u16,
    /// Name algorithm.
    pub name_alg: HashAlg,
    /// TPMA_OBJECT.
    pub attributes: u32,
    /// authPolicy digest.
    pub auth_policy: Vec<u8>,
    /// Symmetric algorithm of a storage parent (TPM_ALG_NULL if none).
    pub symmetric: u16,
    /// Symmetric key bits (0 when NULL).
    pub symmetric_bits: u16,
    /// Signing/decryption scheme (TPM_ALG_NULL if none).
    pub scheme: u16,
    /// Scheme hash (when the scheme has one).
    pub scheme_hash: Option<HashAlg>,
    /// Public key.
    pub key: PublicKey,
    /// The exact TPMT_PUBLIC encoding.
    pub encoded: Vec<u8>,
}

impl Public {
    /// Parses a TPM2B_PUBLIC (u16 size + TPMT_PUBLIC).
    pub fn parse_tpm2b(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(buf, "TPM2B_PUBLIC");
        let inner = r.tpm2b()?;
        r.finish()?;
        Self::parse(inner)
    }

    /// Parses a TPMT_PUBLIC.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(buf, "TPMT_PUBLIC");
        let object_type = r.u16_be()?;
        let name_alg = HashAlg::from_tpm(r.u16_be()?)?;
        let attributes = r.u32_be()?;
        let auth_policy = r.tpm2b()?.to_vec();
        let mut symmetric = alg::NULL;
        let mut symmetric_bits = 0;
        let mut scheme = alg::NULL;
        let mut scheme_hash = None;
        let read_sym = |r: &mut Reader<'_>| -> Result<(u16, u16), Error> {
            let a = r.u16_be()?;
            if a == alg::NULL {
                return Ok((a, 0));
            }
            let bits = r.u16_be()?;
            let _mode = r.u16_be()?;
            Ok((a, bits))
        };
        let read_scheme = |r: &mut Reader<'_>| -> Result<(u16, Option<HashAlg>), Error> {
            let s = r.u16_be()?;
            if s == alg::NULL {
                return Ok((s, None));
            }
            let h = r.u16_be()?;
            Ok((
                s,
                if h == alg::NULL {
                    None
                } else {
                    Some(HashAlg::from_tpm(h)?)
                },
            ))
        };
        let key = match object_type {
            alg::RSA => {
                (symmetric, symmetric_bits) = read_sym(&mut r)?;
                (scheme, scheme_hash) = read_scheme(&mut r)?;
                let bits = r.u16_be()?;
                let exp = r.u32_be()?;
                let exp = if exp == 0 { 65537 } else { exp };
                let e: Vec<u8> = exp
                    .to_be_bytes()
                    .iter()
                    .copied()
                    .skip_while(|&b| b == 0)
                    .collect();
                let n = r.tpm2b()?.to_vec();
                if n.is_empty() || n.len() * 8 != bits as usize {
                    return Err(Error::malformed(
                        "TPMT_PUBLIC",
                        "RSA modulus size does not match keyBits",
                    ));
                }
                PublicKey::Rsa { n, e, bits }
            }
            alg::ECC => {
                (symmetric, symmetric_bits) = read_sym(&mut r)?;
                (scheme, scheme_hash) = read_scheme(&mut r)?;
                let curve = r.u16_be()?;
                let kdf = r.u16_be()?;
                if kdf != alg::NULL {
                    let _kdf_hash = r.u16_be()?;
                }
                let x = r.tpm2b()?.to_vec();
                let y = r.tpm2b()?.to_vec();
                PublicKey::Ecc { curve, x, y }
            }
            alg::KEYEDHASH => {
                let s = r.u16_be()?;
                if s != alg::NULL {
                    let _ = r.u16_be()?;
                    if s == 0x000A {
                        let _ = r.u16_be()?; // XOR kdf
                    }
                }
                let _unique = r.tpm2b()?;
                PublicKey::Other
            }
            alg::SYMCIPHER => {
                (symmetric, symmetric_bits) = read_sym(&mut r)?;
                let _unique = r.tpm2b()?;
                PublicKey::Other
            }
            other => {
                return Err(Error::Unsupported {
                    what: "object type",
                    value: other,
                });
            }
        };
        r.finish()?;
        Ok(Self {
            object_type,
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            symmetric_bits,
            scheme,
            scheme_hash,
            key,
            encoded: buf.to_vec(),
        })
    }

    /// The object's Name: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut n = self.name_alg.tpm_id().to_be_bytes().to_vec();
        n.extend_from_slice(&self.name_alg.hash(&self.encoded));
        n
    }

    /// TPM2B_PUBLIC encoding.
    pub fn to_tpm2b(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(self.encoded.len() + 2);
        put_tpm2b(&mut out, &self.encoded)?;
        Ok(out)
    }

    /// Whether all bits in `mask` are set.
    pub fn has(&self, mask: u32) -> bool {
        self.attributes & mask == mask
    }

    /// DER SubjectPublicKeyInfo of the key (for comparing with certificates).
    pub fn spki_der(&self) -> Result<Vec<u8>, Error> {
        crate::der::spki(&self.key)
    }
}

/// Digest over PCR values as TPM2_Quote computes it: `H(pcr[s0] || pcr[s1] || ...)`.
pub fn pcr_digest(hash: HashAlg, values: &[&[u8]]) -> Vec<u8> {
    hash.hash_parts(values)
}
