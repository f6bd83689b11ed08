//! More mechanism parity with SoftHSM2 and Kryoptic (issue 17), through the real module and
//! the `cryptoki` crate, each checked against an implementation outside the domain or a
//! standard's known answer: X25519 (CKK_EC_MONTGOMERY key pairs, CKM_ECDH1_DERIVE; RFC 7748
//! §6.1 and aws-lc-rs outside), RSA-PSS over SHA-1 and SHA-224 (OpenSSL verifies the VSM's
//! signatures and the VSM verifies OpenSSL's), and AES key wrap with 192-bit KEKs
//! (RFC 3394 §4.2, RFC 5649 §6). Misuse gets the PKCS#11 code and is audited.

// CKM_SHA224_RSA_PKCS_PSS has no `cryptoki` binding: those calls go through the module's
// raw function list.
#![allow(unsafe_code)]

mod common;

use anyhow::{Context as _, Result, ensure};
use aws_lc_rs::agreement;
use common::ck::*;
use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;

/// DER OID 1.3.101.110 (X25519) and the PKCS#11 3.0 printable-string form.
const OID_X25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
const NAME_X25519: &[u8] = b"\x13\x0acurve25519";
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

fn start(label: &str) -> Result<Option<Dom>> {
    let Some(dir) = child_dir() else {
        return Ok(None);
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, label, SO_PIN, USER_PIN)?;
    Ok(Some(dom))
}

/// Fails unless the audit log verifies and has an `op` record for `mech` with result `rv`.
fn audited(dom: &Dom, op: &str, mech: u64, rv: u64) -> Result<()> {
    let entries = caas_domc::audit::verify_with_key_file(
        &dom.state_dir().join("audit.log"),
        &dom.state_dir().join("domain.key"),
    )?;
    let (want_rv, want_mech) = (format!("{rv:#x}"), format!("{mech:#x}"));
    ensure!(
        entries
            .iter()
            .any(|e| e.op == op && e.rv == want_rv && e.mechanism == want_mech),
        "no audit record {op} {want_mech} {want_rv}"
    );
    Ok(())
}

fn value(s: &Session, o: ObjectHandle, ty: AttributeType) -> Result<Vec<u8>> {
    let a = s.get_attributes(o, &[ty])?;
    match a.first() {
        Some(Attribute::Value(v) | Attribute::EcPoint(v) | Attribute::Modulus(v))
        | Some(Attribute::PublicExponent(v)) => Ok(v.clone()),
        other => anyhow::bail!("attribute {ty:?}: {other:?}"),
    }
}

/// ECDH1_DERIVE into a readable generic secret; the derived value.
fn derive(s: &Session, base: ObjectHandle, peer: &[u8]) -> cryptoki::error::Result<ObjectHandle> {
    let params = Ecdh1DeriveParams::new(EcKdf::null(), peer);
    s.derive_key(
        &Mechanism::Ecdh1Derive(params),
        base,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ],
    )
}

fn x25519_pair(
    s: &Session,
    params: &[u8],
) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(
        &Mechanism::EccMontgomeryKeyPairGen,
        &[Attribute::EcParams(params.to_vec())],
        &[Attribute::Derive(true)],
    )
}

/// X25519 in the VSM: key pairs with either CKA_EC_PARAMS form; ECDH inside equals X25519
/// outside with aws-lc-rs (both directions of the agreement), the RFC 7748 §6.1 known
/// answer with an imported key, and the refusals: a low-order peer point, a wrong length,
/// a Montgomery key for EdDSA, the wrong curve for each key-pair mechanism, a derive
/// without CKA_DERIVE, and an Edwards key for ECDH (audited).
#[test]
fn x25519_ecdh_in_the_vsm_equals_x25519_outside() -> Result<()> {
    let Some(dom) = start("x25519")? else {
        return run_in_child("x25519_ecdh_in_the_vsm_equals_x25519_outside");
    };
    let p = context()?;
    let slot = p.get_slots_with_token()?[0];
    let info = p.get_mechanism_info(slot, MechanismType::ECC_MONTGOMERY_KEY_PAIR_GEN)?;
    ensure!(
        info.generate_key_pair(),
        "EC_MONTGOMERY_KEY_PAIR_GEN info {info:?}"
    );
    let info = p.get_mechanism_info(slot, MechanismType::ECDH1_DERIVE)?;
    ensure!(
        info.derive() && info.min_key_size() == 255,
        "ECDH1_DERIVE info {info:?}"
    );
    let s = user_session(&p)?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    for params in [OID_X25519, NAME_X25519] {
        let (public, private) = x25519_pair(&s, params)?;
        let point = value(&s, public, AttributeType::EcPoint)?;
        ensure!(
            point.len() == 34 && point[..2] == [0x04, 32],
            "CKA_EC_POINT {point:02x?}"
        );
        let vsm_public = &point[2..];
        // Outside: an aws-lc-rs X25519 key agrees with the VSM's public value.
        let outside = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)?;
        let outside_pub = outside.compute_public_key()?;
        let want = agreement::agree_ephemeral(
            outside,
            agreement::UnparsedPublicKey::new(&agreement::X25519, vsm_public),
            aws_lc_rs::error::Unspecified,
            |z| Ok(z.to_vec()),
        )?;
        // Inside, with the peer's value raw and as a DER OCTET STRING.
        let raw = outside_pub.as_ref().to_vec();
        let der = [&[0x04, 32][..], &raw].concat();
        for peer in [&raw, &der] {
            let k = derive(&s, private, peer)?;
            ensure!(
                value(&s, k, AttributeType::Value)? == want,
                "ECDH inside = outside"
            );
        }
        let got = s.get_attributes(private, &[AttributeType::EcParams])?;
        ensure!(
            matches!(got.first(), Some(Attribute::EcParams(v)) if v == params),
            "the caller's curve encoding is kept: {got:?}"
        );
    }
    // RFC 7748 §6.1: Alice's private key, Bob's public key, their shared secret.
    let alice = s.create_object(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC_MONTGOMERY),
        Attribute::EcParams(OID_X25519.to_vec()),
        Attribute::Value(h(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        )?),
        Attribute::Derive(true),
    ])?;
    let bob_pub = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")?;
    let k = derive(&s, alice, &bob_pub)?;
    ensure!(
        hex::encode(value(&s, k, AttributeType::Value)?)
            == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
        "RFC 7748 shared secret"
    );
    // A low-order point (all zero) gives the all-zero secret: refused, as a short value.
    expect_rv(
        derive(&s, alice, &[0u8; 32]),
        RvError::MechanismParamInvalid,
        "zero point",
    )?;
    expect_rv(
        derive(&s, alice, &[9u8; 31]),
        RvError::MechanismParamInvalid,
        "31 bytes",
    )?;
    // Misuse.
    let mut sig_mech = Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
        cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
    ));
    expect_rv(
        s.sign(&sig_mech, alice, b"m"),
        RvError::KeyTypeInconsistent,
        "EdDSA with X25519",
    )?;
    sig_mech = Mechanism::Ecdsa;
    expect_rv(
        s.sign(&sig_mech, alice, b"m"),
        RvError::KeyTypeInconsistent,
        "ECDSA with X25519",
    )?;
    expect_rv(
        x25519_pair(&s, OID_P256),
        RvError::TemplateInconsistent,
        "P-256 for Montgomery",
    )?;
    expect_rv(
        x25519_pair(&s, b"\x06\x03\x2b\x65\x6f"),
        RvError::CurveNotSupported,
        "X448",
    )?;
    expect_rv(
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(OID_X25519.to_vec())],
            &[],
        ),
        RvError::CurveNotSupported,
        "X25519 for CKM_EC_KEY_PAIR_GEN",
    )?;
    expect_rv(
        s.create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(OID_X25519.to_vec()),
            Attribute::Value(vec![7u8; 32]),
        ]),
        RvError::CurveNotSupported,
        "an X25519 value as a CKK_EC key",
    )?;
    let (_, no_derive) = s.generate_key_pair(
        &Mechanism::EccMontgomeryKeyPairGen,
        &[Attribute::EcParams(OID_X25519.to_vec())],
        &[],
    )?;
    expect_rv(
        derive(&s, no_derive, &bob_pub),
        RvError::KeyFunctionNotPermitted,
        "no CKA_DERIVE",
    )?;
    let (_, ed) = s.generate_key_pair(
        &Mechanism::EccEdwardsKeyPairGen,
        &[Attribute::EcParams(OID_ED25519.to_vec())],
        &[Attribute::Derive(true)],
    )?;
    expect_rv(
        derive(&s, ed, &bob_pub),
        RvError::KeyTypeInconsistent,
        "Ed25519 for ECDH",
    )?;
    audited(
        &dom,
        "C_DeriveKey",
        CKM_ECDH1_DERIVE,
        CKR_KEY_TYPE_INCONSISTENT,
    )?;
    Ok(())
}

/// OpenSSL's RSA-PSS verification of `sig` over `msg` with `md` (salt = hash length).
fn openssl_pss_verify(
    n: &[u8],
    e: &[u8],
    md: openssl::hash::MessageDigest,
    msg: &[u8],
    sig: &[u8],
) -> Result<bool> {
    let rsa = openssl::rsa::Rsa::from_public_components(
        openssl::bn::BigNum::from_slice(n)?,
        openssl::bn::BigNum::from_slice(e)?,
    )?;
    let key = openssl::pkey::PKey::from_rsa(rsa)?;
    let mut v = openssl::sign::Verifier::new(md, &key)?;
    v.set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)?;
    v.set_rsa_mgf1_md(md)?;
    v.set_rsa_pss_saltlen(openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)?;
    v.update(msg)?;
    Ok(v.verify(sig)?)
}

/// The module's raw function list (the module `cryptoki` loaded, already initialised) and
/// a session of its own (the application's login covers it).
struct Raw {
    l: &'static CK_FUNCTION_LIST,
    s: CK_SESSION_HANDLE,
}

/// The CK_OBJECT_HANDLE of a `cryptoki` handle (which shows it only through Display).
fn raw_handle(o: ObjectHandle) -> CK_OBJECT_HANDLE {
    o.to_string().parse().unwrap_or(CK_INVALID_HANDLE)
}

impl Raw {
    fn open() -> Result<Self> {
        let path = std::ffi::CString::new(module()?.to_string_lossy().as_bytes())?;
        // SAFETY: the module this workspace built; C_GetFunctionList has its PKCS#11 type.
        unsafe {
            let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
            ensure!(!h.is_null(), "dlopen");
            let sym = libc::dlsym(h, c"C_GetFunctionList".as_ptr());
            ensure!(!sym.is_null(), "dlsym");
            let get: unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV =
                std::mem::transmute(sym);
            let mut l: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
            ensure!(get(&mut l) == CKR_OK && !l.is_null(), "C_GetFunctionList");
            let l = &*l;
            let mut s = 0;
            let rv = l.C_OpenSession.context("open")?(
                0,
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                std::ptr::null_mut(),
                None,
                &mut s,
            );
            ensure!(rv == CKR_OK, "C_OpenSession {rv:#x}");
            Ok(Self { l, s })
        }
    }

    fn mech(mech: CK_MECHANISM_TYPE, params: &mut CK_RSA_PKCS_PSS_PARAMS) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: mech,
            pParameter: params as *mut _ as *mut std::ffi::c_void,
            ulParameterLen: std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() as CK_ULONG,
        }
    }

    fn sign(
        &self,
        mech: CK_MECHANISM_TYPE,
        mut params: CK_RSA_PKCS_PSS_PARAMS,
        key: ObjectHandle,
        msg: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        let mut m = Self::mech(mech, &mut params);
        let mut sig = vec![0u8; 1024];
        let mut len = sig.len() as CK_ULONG;
        // SAFETY: valid mechanism, buffers and lengths.
        unsafe {
            let rv = self.l.C_SignInit.ok_or(CKR_GENERAL_ERROR)?(self.s, &mut m, raw_handle(key));
            if rv != CKR_OK {
                return Err(rv);
            }
            let rv = self.l.C_Sign.ok_or(CKR_GENERAL_ERROR)?(
                self.s,
                msg.as_ptr() as *mut u8,
                msg.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut len,
            );
            if rv != CKR_OK {
                return Err(rv);
            }
        }
        sig.truncate(len as usize);
        Ok(sig)
    }

    fn verify(
        &self,
        mech: CK_MECHANISM_TYPE,
        mut params: CK_RSA_PKCS_PSS_PARAMS,
        key: ObjectHandle,
        msg: &[u8],
        sig: &[u8],
    ) -> CK_RV {
        let mut m = Self::mech(mech, &mut params);
        // SAFETY: valid mechanism and buffers.
        unsafe {
            let (Some(init), Some(verify)) = (self.l.C_VerifyInit, self.l.C_Verify) else {
                return CKR_GENERAL_ERROR;
            };
            let rv = init(self.s, &mut m, raw_handle(key));
            if rv != CKR_OK {
                return rv;
            }
            verify(
                self.s,
                msg.as_ptr() as *mut u8,
                msg.len() as CK_ULONG,
                sig.as_ptr() as *mut u8,
                sig.len() as CK_ULONG,
            )
        }
    }
}

/// RSA-PSS over SHA-1 and SHA-224 (CKM_SHA1_RSA_PKCS_PSS, CKM_SHA224_RSA_PKCS_PSS and
/// CKM_RSA_PKCS_PSS over a precomputed hash): the VSM's signatures verify with OpenSSL, an
/// OpenSSL signature verifies in the VSM, a changed signature does not, and parameters
/// that do not match (MGF1 hash, a salt too long for the key, hash of the mechanism) are
/// refused.
#[test]
fn rsa_pss_sha1_and_sha224_cross_checked_with_openssl() -> Result<()> {
    let Some(_dom) = start("pss")? else {
        return run_in_child("rsa_pss_sha1_and_sha224_cross_checked_with_openssl");
    };
    let p = context()?;
    let s = user_session(&p)?;
    let (public, private) = s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
        ],
        &[],
    )?;
    let n = value(&s, public, AttributeType::Modulus)?;
    let e = value(&s, public, AttributeType::PublicExponent)?;
    let msg = b"RSA-PSS with a legacy hash";
    use openssl::hash::{MessageDigest, hash};
    let raw = Raw::open()?;
    for (mech, hash_mech, mgf, md, len) in [
        (
            CKM_SHA1_RSA_PKCS_PSS,
            CKM_SHA_1,
            CKG_MGF1_SHA1,
            MessageDigest::sha1(),
            20,
        ),
        (
            CKM_SHA224_RSA_PKCS_PSS,
            CKM_SHA224,
            CKG_MGF1_SHA224,
            MessageDigest::sha224(),
            28,
        ),
    ] {
        let params = CK_RSA_PKCS_PSS_PARAMS {
            hashAlg: hash_mech,
            mgf,
            sLen: len,
        };
        let what = format!("{mech:#x}");
        let ckr = |rv: CK_RV| anyhow::anyhow!("{what}: rv {rv:#x}");
        let sig = raw.sign(mech, params, private, msg).map_err(ckr)?;
        ensure!(sig.len() == 256, "signature length");
        ensure!(
            openssl_pss_verify(&n, &e, md, msg, &sig)?,
            "OpenSSL verifies {what}"
        );
        ensure!(
            raw.verify(mech, params, public, msg, &sig) == CKR_OK,
            "VSM verifies"
        );
        let mut bad = sig.clone();
        bad[7] ^= 1;
        ensure!(
            raw.verify(mech, params, public, msg, &bad) == CKR_SIGNATURE_INVALID,
            "changed signature"
        );
        // CKM_RSA_PKCS_PSS over the hash.
        let digest = hash(md, msg)?;
        let sig = raw
            .sign(CKM_RSA_PKCS_PSS, params, private, &digest)
            .map_err(ckr)?;
        ensure!(
            openssl_pss_verify(&n, &e, md, msg, &sig)?,
            "OpenSSL verifies raw PSS"
        );
        // Parameters that do not match.
        for (bad, why) in [
            (
                CK_RSA_PKCS_PSS_PARAMS {
                    hashAlg: hash_mech,
                    mgf: CKG_MGF1_SHA256,
                    sLen: len,
                },
                "MGF1 hash",
            ),
            (
                CK_RSA_PKCS_PSS_PARAMS {
                    hashAlg: hash_mech,
                    mgf,
                    // hash + salt + 2 bytes exceed the 256-byte modulus (any salt that
                    // fits is served, see keys::tests::rsa_pss_with_a_chosen_salt_length_*).
                    sLen: 256,
                },
                "salt length that does not fit the key",
            ),
            (
                CK_RSA_PKCS_PSS_PARAMS {
                    hashAlg: CKM_SHA256,
                    mgf: CKG_MGF1_SHA256,
                    sLen: 32,
                },
                "other hash",
            ),
        ] {
            ensure!(
                raw.sign(mech, bad, private, msg) == Err(CKR_MECHANISM_PARAM_INVALID),
                "{what}: {why}"
            );
        }
    }
    // OpenSSL signs (its own key), the VSM verifies with the imported public key.
    let ossl = openssl::rsa::Rsa::generate(2048)?;
    let imported = s.create_object(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Modulus(ossl.n().to_vec()),
        Attribute::PublicExponent(ossl.e().to_vec()),
        Attribute::Verify(true),
    ])?;
    let key = openssl::pkey::PKey::from_rsa(ossl)?;
    let md = MessageDigest::sha224();
    let mut signer = openssl::sign::Signer::new(md, &key)?;
    signer.set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)?;
    signer.set_rsa_mgf1_md(md)?;
    signer.set_rsa_pss_saltlen(openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)?;
    signer.update(msg)?;
    let sig = signer.sign_to_vec()?;
    let params = CK_RSA_PKCS_PSS_PARAMS {
        hashAlg: CKM_SHA224,
        mgf: CKG_MGF1_SHA224,
        sLen: 28,
    };
    ensure!(
        raw.verify(CKM_SHA224_RSA_PKCS_PSS, params, imported, msg, &sig) == CKR_OK,
        "the VSM verifies OpenSSL's SHA-224 PSS signature"
    );
    Ok(())
}

fn secret_import(s: &Session, kt: KeyType, v: &[u8], extra: &[Attribute]) -> Result<ObjectHandle> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(kt),
        Attribute::Value(v.to_vec()),
    ];
    t.extend_from_slice(extra);
    Ok(s.create_object(&t)?)
}

/// AES key wrap under a 192-bit KEK through C_WrapKey/C_UnwrapKey gives RFC 3394 §4.2's
/// and RFC 5649 §6's wrapped keys and unwraps them back; a changed wrapped key is refused.
#[test]
fn aes_key_wrap_with_192_bit_keks_matches_rfc_3394_and_5649() -> Result<()> {
    let Some(_dom) = start("kw192")? else {
        return run_in_child("aes_key_wrap_with_192_bit_keks_matches_rfc_3394_and_5649");
    };
    let p = context()?;
    let s = user_session(&p)?;
    let readable = [Attribute::Sensitive(false), Attribute::Extractable(true)];
    let roles = [Attribute::Wrap(true), Attribute::Unwrap(true)];
    for (kek, kt, data, mech, want) in [
        (
            "000102030405060708090a0b0c0d0e0f1011121314151617",
            KeyType::AES,
            "00112233445566778899aabbccddeeff",
            Mechanism::AesKeyWrap,
            "96778b25ae6ca435f92b5b97c050aed2468ab8a17ad84e5d",
        ),
        (
            "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8",
            KeyType::GENERIC_SECRET,
            "c37b7e6492584340bed12207808941155068f738",
            Mechanism::AesKeyWrapPad,
            "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a",
        ),
        (
            "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8",
            KeyType::GENERIC_SECRET,
            "466f7250617369",
            Mechanism::AesKeyWrapPad,
            "afbeb0f07dfbf5419200f2ccb50bb24f",
        ),
    ] {
        let kek = secret_import(&s, KeyType::AES, &h(kek)?, &roles)?;
        let k = secret_import(&s, kt, &h(data)?, &readable)?;
        let wrapped = s.wrap_key(&mech, kek, k)?;
        ensure!(
            hex::encode(&wrapped) == want,
            "wrapped {}",
            hex::encode(&wrapped)
        );
        let back = s.unwrap_key(
            &mech,
            kek,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(kt),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )?;
        ensure!(
            value(&s, back, AttributeType::Value)? == h(data)?,
            "unwrapped value"
        );
        let mut bad = wrapped.clone();
        bad[9] ^= 1;
        expect_rv(
            s.unwrap_key(
                &mech,
                kek,
                &bad,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(kt),
                ],
            ),
            RvError::WrappedKeyInvalid,
            "changed wrapped key",
        )?;
    }
    Ok(())
}

/// Ed448 (CKK_EC_EDWARDS with Ed448 parameters, CKM_EDDSA): the RFC 8032 §7.4 "Blank"
/// known answer with an imported key, a key pair generated in the VSM (the printable-string
/// form of CKA_EC_PARAMS) whose signatures verify with OpenSSL outside and in the VSM, a
/// changed message that does not, and the mechanism info that says 255–448.
#[test]
fn ed448_rfc8032_known_answer_and_openssl_cross_check() -> Result<()> {
    let Some(_dom) = start("ed448")? else {
        return run_in_child("ed448_rfc8032_known_answer_and_openssl_cross_check");
    };
    let p = context()?;
    let slot = p.get_slots_with_token()?[0];
    let info = p.get_mechanism_info(slot, MechanismType::EDDSA)?;
    ensure!(
        (info.min_key_size(), info.max_key_size()) == (255, 448),
        "EDDSA info {info:?}"
    );
    let s = user_session(&p)?;
    let oid_ed448 = vec![0x06, 0x03, 0x2b, 0x65, 0x71];
    let eddsa = Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
        cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
    ));
    let k = s.create_object(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC_EDWARDS),
        Attribute::EcParams(oid_ed448.clone()),
        Attribute::Value(h("6c82a562cb808d10d632be89c8513ebf6c929f34ddfa8c9f63c9960ef6e348a3528c8a3fcc2f044e39a3fc5b94492f8f032e7549a20098f95b")?),
        Attribute::Sign(true),
    ])?;
    let sig = s.sign(&eddsa, k, b"")?;
    ensure!(
        hex::encode(&sig)
            == "533a37f6bbe457251f023c0d88f976ae2dfb504a843e34d2074fd823d41a591f2b233f034f628281f2fd7a22ddd47d7828c59bd0a21bfd3980ff0d2028d4b18a9df63e006c5d1c2d345b925d8dc00b4104852db99ac5c7cdda8530a113a0f4dbb61149f05a7363268c71d95808ff2e652600",
        "RFC 8032 Ed448 signature"
    );
    let (public, private) = s.generate_key_pair(
        &Mechanism::EccEdwardsKeyPairGen,
        &[Attribute::EcParams(b"\x13\x0aedwards448".to_vec())],
        &[],
    )?;
    let point = value(&s, public, AttributeType::EcPoint)?;
    ensure!(
        point.len() == 59 && point[..2] == [0x04, 57],
        "CKA_EC_POINT"
    );
    let msg = b"signed by an Ed448 key in the VSM";
    let sig = s.sign(&eddsa, private, msg)?;
    ensure!(sig.len() == 114, "signature length");
    let outside =
        openssl::pkey::PKey::public_key_from_raw_bytes(&point[2..], openssl::pkey::Id::ED448)?;
    ensure!(
        openssl::sign::Verifier::new_without_digest(&outside)?.verify_oneshot(&sig, msg)?,
        "OpenSSL verifies the VSM's Ed448 signature"
    );
    s.verify(&eddsa, public, msg, &sig)?;
    expect_rv(
        s.verify(&eddsa, public, b"another message", &sig),
        RvError::SignatureInvalid,
        "changed message",
    )?;
    // An Ed448 value is not an Ed25519 (nor a P-256) key.
    expect_rv(
        s.create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(oid_ed448),
            Attribute::Value(vec![1u8; 57]),
        ]),
        RvError::CurveNotSupported,
        "Ed448 parameters on a CKK_EC key",
    )?;
    Ok(())
}
