//! The single-round-trip operations through the real module and the `cryptoki` crate: after
//! the crypto domain has once accepted a C_SignInit (C_VerifyInit, C_EncryptInit,
//! C_DecryptInit) for a session, key and mechanism, the module records the next ones locally
//! and sends one fused request at C_Sign. What must not change for the application: init
//! errors still come from C_*Init, multi-part operations still work, the length-query
//! protocol still works, and a key this application destroys is refused at C_SignInit. The
//! documented exception: a key destroyed by *another* application is reported at C_Sign.

mod common;

use anyhow::{Result, ensure};
use common::*;
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Whether `e` is `rv` returned by the PKCS#11 function `f` (e.g. "SignInit").
fn is(e: &Option<CkError>, rv: RvError, f: &str) -> bool {
    matches!(e, Some(CkError::Pkcs11(r, func)) if *r == rv && format!("{func:?}") == f)
}

fn ec_pair(s: &Session, token: bool, label: &str) -> Result<(ObjectHandle, ObjectHandle)> {
    Ok(s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(token),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Verify(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
        &[
            Attribute::Token(token),
            Attribute::Sign(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )?)
}

#[test]
fn fused_operations_keep_the_pkcs11_semantics() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("fused_operations_keep_the_pkcs11_semantics");
    };
    require("pkcs11-tool", "opensc")?;
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "fused", SO_PIN, USER_PIN)?;
    let p = Pkcs11::new(module()?)?;
    p.initialize(CInitializeArgs::OsThreads)?;
    let slot = p.get_slots_with_token()?[0];
    let s = p.open_rw_session(slot)?;
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
    let (public, private) = ec_pair(&s, false, "fused")?;
    let m = Mechanism::EcdsaSha256;

    // Repeated single-part signatures (the first validates, the rest are fused) verify, and
    // so do repeated verifications; a bad signature fails at C_Verify and ends only that
    // operation.
    for i in 0..5u8 {
        let msg = [i; 40];
        let sig = s.sign(&m, private, &msg)?;
        ensure!(sig.len() == 64);
        s.verify(&m, public, &msg, &sig)?;
        let mut bad = sig.clone();
        bad[10] ^= 1;
        let e = s.verify(&m, public, &msg, &bad).err();
        ensure!(
            is(&e, RvError::SignatureInvalid, "Verify"),
            "bad signature: {e:?}"
        );
    }

    // Multi-part after a locally recorded init.
    s.sign_init(&m, private)?;
    // A second init while one is active: CKR_OPERATION_ACTIVE from C_SignInit.
    let e = s.sign_init(&m, private).err();
    ensure!(is(&e, RvError::OperationActive, "SignInit"), "{e:?}");
    s.sign_update(b"multi-")?;
    s.sign_update(b"part")?;
    let sig = s.sign_final()?;
    s.verify(&m, public, b"multi-part", &sig)?;
    s.verify_init(&m, public)?;
    s.verify_update(b"multi-")?;
    s.verify_update(b"part")?;
    s.verify_final(&sig)?;

    // Init errors still come from C_SignInit: a public key cannot sign.
    let e = s.sign(&m, public, b"x").err();
    ensure!(
        is(&e, RvError::KeyFunctionNotPermitted, "SignInit")
            || is(&e, RvError::KeyTypeInconsistent, "SignInit"),
        "{e:?}"
    );

    // Encrypt/decrypt single-part, repeatedly (fused after the first), with the length query
    // cryptoki makes first.
    let aes = s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;
    let cbc = Mechanism::AesCbcPad([7; 16]);
    for n in [0usize, 15, 16, 100] {
        let pt = vec![0x42u8; n];
        let ct = s.encrypt(&cbc, aes, &pt)?;
        ensure!(ct.len() == (n / 16 + 1) * 16, "{} bytes for {n}", ct.len());
        ensure!(s.decrypt(&cbc, aes, &ct)? == pt);
    }

    // A key this application destroys is refused at C_SignInit, even though the same
    // (key, mechanism) was validated before.
    s.destroy_object(private)?;
    let e = s.sign(&m, private, b"x").err();
    ensure!(is(&e, RvError::KeyHandleInvalid, "SignInit"), "{e:?}");

    // A token key destroyed by another application (pkcs11-tool) after validation: the
    // documented exception, reported by C_Sign; the next C_SignInit reports it again.
    let (_, shared) = ec_pair(&s, true, "shared")?;
    s.sign(&m, shared, b"one")?;
    s.sign(&m, shared, b"two")?;
    ok(caas_tool(&dom)?.args([
        "--login",
        "--pin",
        USER_PIN,
        "--delete-object",
        "--type",
        "privkey",
        "--label",
        "shared",
    ]))?;
    let e = s.sign(&m, shared, b"three").err();
    ensure!(is(&e, RvError::KeyHandleInvalid, "Sign"), "{e:?}");
    let e = s.sign(&m, shared, b"four").err();
    ensure!(is(&e, RvError::KeyHandleInvalid, "SignInit"), "{e:?}");
    Ok(())
}
