//! The VSM policy a compromised workload cannot bypass (issue 12, Build item 4), tried from
//! the workload's position: a PKCS#11 application holding the user PIN, through the real
//! module (`libcaas_pkcs11.so`, the `cryptoki` crate) against a real `caas-domc domc serve`.
//! Each refusal must also be in the crypto domain's audit log.

mod common;

use anyhow::{Result, ensure};
use common::ck::*;
use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const CKA_CAAS_MAX_USES: u64 = caas_vsm_proto::attr::CKA_CAAS_MAX_USES;
const CKA_CAAS_RATE_PER_SEC: u64 = caas_vsm_proto::attr::CKA_CAAS_RATE_PER_SEC;
const CKA_CAAS_USAGE_COUNT: u64 = caas_vsm_proto::attr::CKA_CAAS_USAGE_COUNT;

/// Fails unless `r` is the PKCS#11 error `want`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    r: cryptoki::error::Result<T>,
    want: RvError,
) -> Result<()> {
    match r {
        Err(e) if rv(&e) == Some(want) => Ok(()),
        other => anyhow::bail!("{what}: expected {want:?}, got {other:?}"),
    }
}

fn login(s: &Session, who: UserType) -> Result<()> {
    let pin = if matches!(who, UserType::So) {
        SO_PIN
    } else {
        USER_PIN
    };
    s.login(who, Some(&AuthPin::new(pin.into())))?;
    Ok(())
}

fn user_session(p: &Pkcs11) -> Result<Session> {
    let slot = p.get_slots_with_token()?[0];
    let s = p.open_rw_session(slot)?;
    login(&s, UserType::User)?;
    Ok(s)
}

fn ulong_attr(ty: u64, v: u64) -> Attribute {
    Attribute::VendorDefined((AttributeType::VendorDefined(ty), v.to_ne_bytes().to_vec()))
}

fn max_uses(n: u64) -> Attribute {
    ulong_attr(CKA_CAAS_MAX_USES, n)
}

fn rate(n: u64) -> Attribute {
    ulong_attr(CKA_CAAS_RATE_PER_SEC, n)
}

fn aes(s: &Session, extra: &[Attribute]) -> Result<ObjectHandle> {
    let mut t = vec![Attribute::ValueLen(32.into())];
    t.extend_from_slice(extra);
    Ok(s.generate_key(&Mechanism::AesKeyGen, &t)?)
}

/// A key worth stealing: sensitive (its value is never shown) but extractable (it may leave
/// the token wrapped, for backup or transfer).
fn crown_jewel(s: &Session, extra: &[Attribute]) -> Result<ObjectHandle> {
    let mut t = vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Label(b"crown-jewel".to_vec()),
    ];
    t.extend_from_slice(extra);
    aes(s, &t)
}

fn bool_attr(s: &Session, o: ObjectHandle, ty: AttributeType) -> Result<bool> {
    for a in s.get_attributes(o, &[ty])? {
        let v = match a {
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Sensitive(b)
            | Attribute::WrapWithTrusted(b)
            | Attribute::Trusted(b) => b,
            _ => continue,
        };
        return Ok(v);
    }
    anyhow::bail!("{ty:?} missing")
}

fn vendor_ulong(s: &Session, o: ObjectHandle, ty: u64) -> Result<u64> {
    for a in s.get_attributes(o, &[AttributeType::VendorDefined(ty)])? {
        if let Attribute::VendorDefined((_, v)) = a {
            let b: [u8; 8] = v.as_slice().try_into()?;
            return Ok(u64::from_ne_bytes(b));
        }
    }
    anyhow::bail!("{ty:#x} missing")
}

/// Fails unless the audit log verifies and has an `op` record with result `rv`.
fn audited(dom: &Dom, op: &str, rv: u64) -> Result<()> {
    let entries = caas_domc::audit::verify_with_key_file(
        &dom.state_dir().join("audit.log"),
        &dom.state_dir().join("domain.key"),
    )?;
    let want = format!("{rv:#x}");
    ensure!(
        entries.iter().any(|e| e.op == op && e.rv == want),
        "no audit record {op} {want}"
    );
    Ok(())
}

/// The domain's attribute-binding wrap mechanism.
fn caas_wrap() -> Result<Mechanism<'static>> {
    Ok(Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(
        MechanismType::new_vendor_defined(caas_domc::wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS)?,
        None,
    )))
}

fn unwrap_template(extra: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    t.extend_from_slice(extra);
    t
}

#[test]
fn user_cannot_raise_or_reset_key_limits() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("user_cannot_raise_or_reset_key_limits");
    };
    let mut dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "limits", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;

    // The tenant's signing key, provisioned with a budget of 3 signatures.
    let (_, limited) = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
        &[
            Attribute::Token(true),
            Attribute::Sign(true),
            Attribute::Label(b"limited".to_vec()),
            max_uses(3),
        ],
    )?;
    for _ in 0..3 {
        s.sign(&Mechanism::EcdsaSha256, limited, b"m")?;
    }
    let sign = || s.sign(&Mechanism::EcdsaSha256, limited, b"m");
    refused("4th use", sign(), RvError::FunctionRejected)?;

    // The workload raises the limit, removes it, or adds a rate limit of its choosing.
    for (what, t) in [
        ("raise", max_uses(1_000_000)),
        ("remove", max_uses(0)),
        ("rate", rate(1_000_000)),
    ] {
        refused(
            what,
            s.update_attributes(limited, &[t]),
            RvError::AttributeReadOnly,
        )?;
    }
    // It copies the key to get a fresh counter, with or without a new limit.
    refused(
        "copy",
        s.copy_object(limited, &[]),
        RvError::ActionProhibited,
    )?;
    refused(
        "copy with limit 0",
        s.copy_object(limited, &[max_uses(0)]),
        RvError::ActionProhibited,
    )?;
    refused("use after the attempts", sign(), RvError::FunctionRejected)?;
    ensure!(
        vendor_ulong(&s, limited, CKA_CAAS_USAGE_COUNT)? == 3,
        "counter changed"
    );
    ensure!(
        vendor_ulong(&s, limited, CKA_CAAS_MAX_USES)? == 3,
        "limit changed"
    );
    // Nor does a restart of the crypto domain reset the counter (it is persisted with the
    // token object before each use is answered).
    dom.kill()?;
    // (The module notices the dead domain at its next call and reconnects after that.)
    ensure!(sign().is_err(), "signed with the domain down");
    dom.restart()?;
    let s = user_session(&p)?;
    let limited = s.find_objects(&[
        Attribute::Label(b"limited".to_vec()),
        Attribute::Class(ObjectClass::PRIVATE_KEY),
    ])?;
    ensure!(limited.len() == 1, "limited key after restart: {limited:?}");
    let limited = limited[0];
    refused(
        "use after a restart",
        s.sign(&Mechanism::EcdsaSha256, limited, b"m"),
        RvError::FunctionRejected,
    )?;

    // A rate-limited key: the same, and a limited key does not leave the token wrapped
    // (the unwrapped copy would carry no limit).
    let rated = aes(
        &s,
        &[
            Attribute::Encrypt(true),
            Attribute::Extractable(true),
            Attribute::Sensitive(false),
            rate(5),
        ],
    )?;
    refused(
        "rate 0",
        s.update_attributes(rated, &[rate(0)]),
        RvError::AttributeReadOnly,
    )?;
    refused(
        "copy rated",
        s.copy_object(rated, &[rate(0)]),
        RvError::ActionProhibited,
    )?;
    let kek = aes(&s, &[Attribute::Wrap(true)])?;
    refused(
        "wrap a limited key",
        s.wrap_key(&Mechanism::AesKeyWrapPad, kek, rated),
        RvError::KeyNotWrappable,
    )?;
    // An unlimited key cannot be given a limit by the user either (only the SO changes them).
    let free = aes(&s, &[])?;
    refused(
        "add a limit",
        s.update_attributes(free, &[max_uses(5)]),
        RvError::AttributeReadOnly,
    )?;

    // The SO may change limits of objects it can reach (non-private ones): a verification
    // key limited to one use, raised by the SO, not by the user.
    let (vk, sk) = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Verify(true),
            Attribute::Label(b"vk".to_vec()),
            max_uses(1),
        ],
        &[Attribute::Token(true), Attribute::Sign(true)],
    )?;
    let sig = s.sign(&Mechanism::EcdsaSha256, sk, b"v")?;
    s.verify(&Mechanism::EcdsaSha256, vk, b"v", &sig)?;
    refused(
        "2nd verify",
        s.verify(&Mechanism::EcdsaSha256, vk, b"v", &sig),
        RvError::FunctionRejected,
    )?;
    refused(
        "user raises",
        s.update_attributes(vk, &[max_uses(5)]),
        RvError::AttributeReadOnly,
    )?;
    s.logout()?;
    login(&s, UserType::So)?;
    s.update_attributes(vk, &[max_uses(5)])?;
    s.logout()?;
    login(&s, UserType::User)?;
    s.verify(&Mechanism::EcdsaSha256, vk, b"v", &sig)?;

    audited(
        &dom,
        "C_SetAttributeValue",
        cryptoki_sys::CKR_ATTRIBUTE_READ_ONLY,
    )?;
    audited(&dom, "C_CopyObject", cryptoki_sys::CKR_ACTION_PROHIBITED)?;
    audited(&dom, "C_WrapKey", cryptoki_sys::CKR_KEY_NOT_WRAPPABLE)?;
    Ok(())
}

#[test]
fn wrap_then_decrypt_does_not_reveal_a_sensitive_key() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("wrap_then_decrypt_does_not_reveal_a_sensitive_key");
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "wrap", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let target = crown_jewel(&s, &[Attribute::Encrypt(true)])?;
    let kwp = Mechanism::AesKeyWrapPad;
    let cbc = Mechanism::AesCbcPad([0u8; 16]);
    let caas_wrap = caas_wrap()?;

    // A key made with the default template has the data role only.
    let data = aes(&s, &[])?;
    ensure!(
        bool_attr(&s, data, AttributeType::Decrypt)?,
        "default key cannot decrypt"
    );
    ensure!(
        !bool_attr(&s, data, AttributeType::Wrap)?,
        "default key can wrap"
    );
    refused(
        "wrap under a default key",
        s.wrap_key(&kwp, data, target),
        RvError::KeyFunctionNotPermitted,
    )?;

    // A wrap key has the wrap role only, and cannot get the data role later, nor a copy.
    let w = aes(&s, &[Attribute::Wrap(true)])?;
    ensure!(
        bool_attr(&s, w, AttributeType::Unwrap)?
            && !bool_attr(&s, w, AttributeType::Decrypt)?
            && !bool_attr(&s, w, AttributeType::Encrypt)?,
        "wrap key roles"
    );
    refused(
        "give the wrap key CKA_DECRYPT",
        s.update_attributes(w, &[Attribute::Decrypt(true)]),
        RvError::TemplateInconsistent,
    )?;
    refused(
        "copy the wrap key as a decrypting twin",
        s.copy_object(
            w,
            &[
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Decrypt(true),
            ],
        ),
        RvError::AttributeReadOnly,
    )?;
    // A standard format carries no attributes: under an untrusted key a sensitive key is
    // wrapped only in the domain's own format (allowed here: the key was generated here and
    // never left). Then decrypting the blob is refused.
    refused(
        "standard wrap under an untrusted key",
        s.wrap_key(&kwp, w, target),
        RvError::KeyNotWrappable,
    )?;
    let blob = s.wrap_key(&caas_wrap, w, target)?;
    refused(
        "decrypt the blob",
        s.decrypt(&cbc, w, &blob),
        RvError::KeyFunctionNotPermitted,
    )?;

    // A key asked for both roles explicitly is accepted but never wraps a sensitive key.
    let dual = aes(
        &s,
        &[
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;
    refused(
        "wrap under a dual key",
        s.wrap_key(&kwp, dual, target),
        RvError::KeyNotWrappable,
    )?;
    // The same through the domain's own format, which a trusted key is not needed for:
    // refused by the wrapping-key checks themselves (a decrypting twin, a key that left
    // the token), not by the standard-format rule above.
    refused(
        "wrap under a dual key (CKM_CAAS_AES_KEY_WRAP_ATTRS)",
        s.wrap_key(&caas_wrap, dual, target),
        RvError::KeyNotWrappable,
    )?;
    // ... nor does a wrap-only copy of it (the original still decrypts).
    let wrap_only_copy = s.copy_object(
        dual,
        &[Attribute::Encrypt(false), Attribute::Decrypt(false)],
    )?;
    refused(
        "wrap under a copy of a dual key",
        s.wrap_key(&kwp, wrap_only_copy, target),
        RvError::KeyNotWrappable,
    )?;
    // The same through the domain's own format, which a trusted key is not needed for:
    // refused by the wrapping-key checks themselves (a decrypting twin, a key that left
    // the token), not by the standard-format rule above.
    refused(
        "wrap under a copy of a dual key (CKM_CAAS_AES_KEY_WRAP_ATTRS)",
        s.wrap_key(&caas_wrap, wrap_only_copy, target),
        RvError::KeyNotWrappable,
    )?;

    // Wrap, then unwrap as a readable key: refused; unwrapped keys are sensitive.
    refused(
        "unwrap as non-sensitive",
        s.unwrap_key(
            &caas_wrap,
            w,
            &blob,
            &unwrap_template(&[Attribute::Sensitive(false), Attribute::Extractable(true)]),
        ),
        RvError::TemplateInconsistent,
    )?;
    let u = s.unwrap_key(
        &caas_wrap,
        w,
        &blob,
        &unwrap_template(&[Attribute::Encrypt(true)]),
    )?;
    let info = s.get_attribute_info(u, &[AttributeType::Value])?;
    ensure!(
        matches!(info[0], AttributeInfo::Sensitive),
        "unwrapped value: {info:?}"
    );
    refused(
        "unwrapped key made readable",
        s.update_attributes(u, &[Attribute::Sensitive(false)]),
        RvError::AttributeReadOnly,
    )?;
    // The unwrapped key is the same key (the legitimate path works).
    let mut iv = [5u8; 12];
    let ct = s.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into())?),
        target,
        b"x",
    )?;
    let mut iv = [5u8; 12];
    let ct2 = s.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into())?),
        u,
        b"x",
    )?;
    ensure!(ct == ct2, "unwrapped key differs");

    // The domain's own format binds the wrapped key's attributes: an encrypt-only key
    // comes back encrypt-only and sensitive, whatever the unwrap template asks.
    let encrypt_only = crown_jewel(&s, &[Attribute::Encrypt(true), Attribute::Decrypt(false)])?;
    let bound = s.wrap_key(&caas_wrap, w, encrypt_only)?;
    for (what, weaker) in [
        ("CKA_DECRYPT", Attribute::Decrypt(true)),
        ("CKA_SENSITIVE false", Attribute::Sensitive(false)),
        (
            "another key type",
            Attribute::KeyType(KeyType::GENERIC_SECRET),
        ),
    ] {
        refused(
            &format!("unwrap a bound blob with {what}"),
            s.unwrap_key(&caas_wrap, w, &bound, &[weaker]),
            RvError::TemplateInconsistent,
        )?;
    }
    let back = s.unwrap_key(&caas_wrap, w, &bound, &[Attribute::Label(b"back".to_vec())])?;
    ensure!(
        bool_attr(&s, back, AttributeType::Sensitive)?
            && bool_attr(&s, back, AttributeType::Encrypt)?
            && !bool_attr(&s, back, AttributeType::Decrypt)?,
        "bound attributes not restored"
    );
    let mut tampered = bound.clone();
    tampered[20] ^= 1;
    refused(
        "unwrap a tampered bound blob",
        s.unwrap_key(&caas_wrap, w, &tampered, &[]),
        RvError::WrappedKeyInvalid,
    )?;

    // Mechanisms with a caller-chosen nonce or a padding oracle do not wrap sensitive keys,
    // and CBC-PAD does not unwrap at all.
    let mut iv = [1u8; 12];
    refused(
        "GCM wrap",
        s.wrap_key(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into())?),
            w,
            target,
        ),
        RvError::KeyNotWrappable,
    )?;
    refused(
        "CBC-PAD wrap",
        s.wrap_key(&cbc, w, target),
        RvError::KeyNotWrappable,
    )?;
    refused(
        "CBC-PAD unwrap",
        s.unwrap_key(&cbc, w, &[0u8; 48], &unwrap_template(&[])),
        RvError::MechanismInvalid,
    )?;

    // A wrapping key whose value the attacker knows: imported, or an untrusted public key.
    let imported = s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(vec![7u8; 32]),
        Attribute::Wrap(true),
    ])?;
    refused(
        "wrap under an imported key",
        s.wrap_key(&kwp, imported, target),
        RvError::KeyNotWrappable,
    )?;
    // The same through the domain's own format, which a trusted key is not needed for:
    // refused by the wrapping-key checks themselves (a decrypting twin, a key that left
    // the token), not by the standard-format rule above.
    refused(
        "wrap under an imported key (CKM_CAAS_AES_KEY_WRAP_ATTRS)",
        s.wrap_key(&caas_wrap, imported, target),
        RvError::KeyNotWrappable,
    )?;
    let (rsa_pub, _) = s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[Attribute::ModulusBits(2048.into()), Attribute::Wrap(true)],
        &[Attribute::Unwrap(true)],
    )?;
    let mut pubkey = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Wrap(true),
    ];
    pubkey.extend(s.get_attributes(
        rsa_pub,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )?);
    let attacker_pub = s.create_object(&pubkey)?;
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    ));
    for (what, k) in [("generated", rsa_pub), ("imported", attacker_pub)] {
        refused(
            &format!("OAEP wrap under an untrusted {what} public key"),
            s.wrap_key(&oaep, k, target),
            RvError::KeyNotWrappable,
        )?;
    }

    // Non-sensitive extractable keys still move freely (their value is readable anyway).
    let movable = aes(
        &s,
        &[Attribute::Sensitive(false), Attribute::Extractable(true)],
    )?;
    s.wrap_key(&kwp, dual, movable)?;
    // ... and under a key that never wrapped a sensitive key (its value is known outside),
    // an unwrap may ask for a readable key, as pkcs11-tool does.
    let b = s.wrap_key(&kwp, imported, movable)?;
    s.unwrap_key(
        &kwp,
        imported,
        &b,
        &unwrap_template(&[Attribute::Sensitive(false), Attribute::Extractable(true)]),
    )?;

    audited(&dom, "C_WrapKey", cryptoki_sys::CKR_KEY_NOT_WRAPPABLE)?;
    audited(&dom, "C_UnwrapKey", cryptoki_sys::CKR_TEMPLATE_INCONSISTENT)?;
    audited(&dom, "C_UnwrapKey", cryptoki_sys::CKR_MECHANISM_INVALID)?;
    audited(&dom, "C_UnwrapKey", cryptoki_sys::CKR_WRAPPED_KEY_INVALID)?;
    audited(
        &dom,
        "C_SetAttributeValue",
        cryptoki_sys::CKR_TEMPLATE_INCONSISTENT,
    )?;
    audited(&dom, "C_CopyObject", cryptoki_sys::CKR_ATTRIBUTE_READ_ONLY)?;
    Ok(())
}

#[test]
fn untrusted_user_cannot_wrap_with_trusted_only_key() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("untrusted_user_cannot_wrap_with_trusted_only_key");
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "trusted", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let kwp = Mechanism::AesKeyWrapPad;

    // The user cannot make a trusted key, nor trust one of its keys later.
    refused(
        "generate a trusted key",
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Trusted(true),
            ],
        ),
        RvError::AttributeReadOnly,
    )?;
    let w = aes(&s, &[Attribute::Wrap(true)])?;
    refused(
        "trust own key",
        s.update_attributes(w, &[Attribute::Trusted(true)]),
        RvError::AttributeReadOnly,
    )?;

    // A key that may leave only under a trusted key.
    let k = crown_jewel(
        &s,
        &[Attribute::Token(true), Attribute::WrapWithTrusted(true)],
    )?;
    refused(
        "wrap under an untrusted key",
        s.wrap_key(&kwp, w, k),
        RvError::KeyNotWrappable,
    )?;
    refused(
        "clear CKA_WRAP_WITH_TRUSTED",
        s.update_attributes(k, &[Attribute::WrapWithTrusted(false)]),
        RvError::AttributeReadOnly,
    )?;
    refused(
        "copy without CKA_WRAP_WITH_TRUSTED",
        s.copy_object(k, &[Attribute::WrapWithTrusted(false)]),
        RvError::AttributeReadOnly,
    )?;
    // false -> true is allowed, and then holds.
    let k2 = crown_jewel(&s, &[])?;
    s.update_attributes(k2, &[Attribute::WrapWithTrusted(true)])?;
    refused(
        "wrap after setting it",
        s.wrap_key(&kwp, w, k2),
        RvError::KeyNotWrappable,
    )?;

    // Two RSA pairs whose public halves the SO will trust: one made with the defaults (its
    // private half signs with raw RSA, a decryption), one made for wrapping only.
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    ));
    let rsa_pair = |label: &str, private: &[Attribute]| -> Result<ObjectHandle> {
        let mut priv_t = vec![Attribute::Token(true)];
        priv_t.extend_from_slice(private);
        let (public, _) = s.generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::Wrap(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
            &priv_t,
        )?;
        Ok(public)
    };
    let default_pub = rsa_pair("rsa-default", &[Attribute::Unwrap(true)])?;
    let wrap_pub = rsa_pair(
        "rsa-wrap",
        &[
            Attribute::Unwrap(true),
            Attribute::Sign(false),
            Attribute::Label(b"rsa-wrap".to_vec()),
            Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        ],
    )?;
    refused(
        "OAEP wrap under an untrusted public key",
        s.wrap_key(&oaep, wrap_pub, k),
        RvError::KeyNotWrappable,
    )?;

    // The SO makes a trusted wrapping key (a non-private token object, which the user sees)
    // and trusts the two public keys.
    s.logout()?;
    login(&s, UserType::So)?;
    for public in [default_pub, wrap_pub] {
        s.update_attributes(public, &[Attribute::Trusted(true)])?;
    }
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Wrap(true),
            Attribute::Trusted(true),
            Attribute::Label(b"so-kek".to_vec()),
        ],
    )?;
    s.logout()?;
    login(&s, UserType::User)?;
    let so_kek = s.find_objects(&[Attribute::Label(b"so-kek".to_vec())])?;
    ensure!(so_kek.len() == 1, "SO key not found: {so_kek:?}");
    let so_kek = so_kek[0];
    ensure!(
        bool_attr(&s, so_kek, AttributeType::Trusted)?,
        "SO key not trusted"
    );
    // Trust is the SO's both ways: the user can neither clear it nor copy it away.
    refused(
        "user clears CKA_TRUSTED",
        s.update_attributes(so_kek, &[Attribute::Trusted(false)]),
        RvError::AttributeReadOnly,
    )?;
    refused(
        "user copies without CKA_TRUSTED",
        s.copy_object(so_kek, &[Attribute::Trusted(false)]),
        RvError::AttributeReadOnly,
    )?;
    let blob = s.wrap_key(&kwp, so_kek, k)?;
    // What comes back under a trusted key with a standard mechanism is sensitive and keeps
    // CKA_WRAP_WITH_TRUSTED.
    refused(
        "unwrap as non-sensitive under a trusted key",
        s.unwrap_key(
            &kwp,
            so_kek,
            &blob,
            &unwrap_template(&[Attribute::Sensitive(false), Attribute::Extractable(true)]),
        ),
        RvError::TemplateInconsistent,
    )?;
    refused(
        "unwrap without CKA_WRAP_WITH_TRUSTED",
        s.unwrap_key(
            &kwp,
            so_kek,
            &blob,
            &unwrap_template(&[Attribute::WrapWithTrusted(false)]),
        ),
        RvError::TemplateInconsistent,
    )?;
    let back = s.unwrap_key(
        &kwp,
        so_kek,
        &blob,
        &unwrap_template(&[Attribute::Extractable(true)]),
    )?;
    ensure!(
        bool_attr(&s, back, AttributeType::WrapWithTrusted)?,
        "unwrapped key lost CKA_WRAP_WITH_TRUSTED"
    );
    // (The user's session keys went with the logout; a new untrusted wrap key.)
    let w = aes(&s, &[Attribute::Wrap(true)])?;
    refused(
        "re-wrap the unwrapped key under an untrusted key",
        s.wrap_key(&kwp, w, back),
        RvError::KeyNotWrappable,
    )?;
    // RSA-OAEP under a trusted public key: only when its private half cannot decrypt.
    refused(
        "OAEP wrap under a trusted key whose private half signs raw",
        s.wrap_key(&oaep, default_pub, k),
        RvError::KeyNotWrappable,
    )?;
    let blob = s.wrap_key(&oaep, wrap_pub, k)?;
    let rsa_private = s.find_objects(&[
        Attribute::Label(b"rsa-wrap".to_vec()),
        Attribute::Class(ObjectClass::PRIVATE_KEY),
    ])?;
    ensure!(
        rsa_private.len() == 1,
        "rsa-wrap private key: {rsa_private:?}"
    );
    refused(
        "give the private half CKA_SIGN",
        s.update_attributes(rsa_private[0], &[Attribute::Sign(true)]),
        RvError::AttributeReadOnly,
    )?;
    refused(
        "widen its mechanisms",
        s.update_attributes(rsa_private[0], &[Attribute::AllowedMechanisms(vec![])]),
        RvError::AttributeReadOnly,
    )?;
    let back = s.unwrap_key(&oaep, rsa_private[0], &blob, &unwrap_template(&[]))?;
    ensure!(
        bool_attr(&s, back, AttributeType::Sensitive)?
            && bool_attr(&s, back, AttributeType::WrapWithTrusted)?,
        "OAEP-unwrapped key is weaker than the original"
    );
    // The user cannot turn the trusted key into a decrypting one.
    refused(
        "give the trusted key CKA_DECRYPT",
        s.update_attributes(so_kek, &[Attribute::Decrypt(true)]),
        RvError::TemplateInconsistent,
    )?;

    audited(&dom, "C_GenerateKey", cryptoki_sys::CKR_ATTRIBUTE_READ_ONLY)?;
    audited(
        &dom,
        "C_SetAttributeValue",
        cryptoki_sys::CKR_ATTRIBUTE_READ_ONLY,
    )?;
    audited(&dom, "C_WrapKey", cryptoki_sys::CKR_KEY_NOT_WRAPPABLE)?;
    Ok(())
}
