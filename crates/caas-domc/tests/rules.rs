//! The token's rules through the real module and the `cryptoki` crate (a Rust PKCS#11
//! application): sensitivity, extractability, PIN lockout, tenant isolation, misuse limits,
//! AES-GCM, concurrency, the audit log, and a crypto domain killed mid-operation.

mod common;

use anyhow::{Result, bail, ensure};
use common::ck::*;
use common::*;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const CKA_CAAS_MAX_USES: u64 = caas_vsm_proto::attr::CKA_CAAS_MAX_USES;
const CKA_CAAS_RATE_PER_SEC: u64 = caas_vsm_proto::attr::CKA_CAAS_RATE_PER_SEC;

fn aes_key(s: &Session, extra: &[Attribute]) -> Result<ObjectHandle> {
    let mut t = vec![
        Attribute::ValueLen(32.into()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    t.extend_from_slice(extra);
    Ok(s.generate_key(&Mechanism::AesKeyGen, &t)?)
}

fn ec_pair(s: &Session, extra: &[Attribute]) -> Result<(ObjectHandle, ObjectHandle)> {
    let mut private = vec![Attribute::Sign(true), Attribute::Label(b"ec".to_vec())];
    private.extend_from_slice(extra);
    Ok(s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
        &private,
    )?)
}

// The module is a per-process singleton configured from the environment at C_Initialize, so
// each test body runs in a child process (see `run_in_child`).

#[test]
fn token_rules_hold() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("token_rules_hold");
    };
    let dom = Dom::start_in(&dir, &["--max-pin-retries", "3"])?;
    caas_domc::dev::init_token(&dom.socket, 0, "rules", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;

    // A sensitive key's value cannot be read.
    let k = aes_key(
        &s,
        &[Attribute::Sensitive(true), Attribute::Extractable(true)],
    )?;
    let info = s.get_attribute_info(k, &[AttributeType::Value])?;
    ensure!(
        matches!(info[0], AttributeInfo::Sensitive),
        "CKA_VALUE of a sensitive key: {info:?}"
    );
    // ... and CKA_SENSITIVE cannot be switched off again.
    let e = s.update_attributes(k, &[Attribute::Sensitive(false)]).err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::AttributeReadOnly),
        "{e:?}"
    );

    // An unextractable key cannot be wrapped.
    let kek = aes_key(&s, &[Attribute::Wrap(true), Attribute::Unwrap(true)])?;
    let secret = aes_key(&s, &[Attribute::Extractable(false)])?;
    let e = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, secret).err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::KeyUnextractable),
        "wrap of unextractable key: {e:?}"
    );
    // An extractable one can, and unwraps to a working key.
    let movable = aes_key(
        &s,
        &[Attribute::Extractable(true), Attribute::Sensitive(false)],
    )?;
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, movable)?;
    let unwrapped = s.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        kek,
        &wrapped,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(cryptoki::object::KeyType::AES),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;

    // AES-GCM round trip across the two copies; a flipped bit is detected.
    let mut iv = [3u8; 12];
    let aad = b"header";
    let ct = s.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into())?),
        movable,
        b"gcm plaintext",
    )?;
    ensure!(ct.len() == 13 + 16, "GCM output length {}", ct.len());
    let mut iv2 = [3u8; 12];
    let pt = s.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv2, aad, 128.into())?),
        unwrapped,
        &ct,
    )?;
    ensure!(pt == b"gcm plaintext", "GCM round trip");
    let mut bad = ct.clone();
    bad[0] ^= 1;
    let mut iv3 = [3u8; 12];
    let e = s
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv3, aad, 128.into())?),
            unwrapped,
            &bad,
        )
        .err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::EncryptedDataInvalid),
        "tampered GCM: {e:?}"
    );

    // HMAC-SHA256 sign/verify.
    let hk = s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[
            Attribute::ValueLen(32.into()),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::KeyType(cryptoki::object::KeyType::GENERIC_SECRET),
        ],
    )?;
    let tag = s.sign(&Mechanism::Sha256Hmac, hk, b"mac me")?;
    s.verify(&Mechanism::Sha256Hmac, hk, b"mac me", &tag)?;
    ensure!(
        s.verify(&Mechanism::Sha256Hmac, hk, b"mac you", &tag)
            .is_err(),
        "HMAC accepted wrong data"
    );

    // Misuse limits: a total-use limit and a rate limit refuse the excess with
    // CKR_FUNCTION_REJECTED.
    let (_, limited) = ec_pair(
        &s,
        &[Attribute::VendorDefined((
            AttributeType::VendorDefined(CKA_CAAS_MAX_USES),
            3u64.to_ne_bytes().to_vec(),
        ))],
    )?;
    for _ in 0..3 {
        s.sign(&Mechanism::EcdsaSha256, limited, b"m")?;
    }
    let e = s.sign(&Mechanism::EcdsaSha256, limited, b"m").err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::FunctionRejected),
        "over the total limit: {e:?}"
    );
    let (_, rated) = ec_pair(
        &s,
        &[Attribute::VendorDefined((
            AttributeType::VendorDefined(CKA_CAAS_RATE_PER_SEC),
            10u64.to_ne_bytes().to_vec(),
        ))],
    )?;
    let mut ok_count = 0;
    let mut rejected = 0;
    for _ in 0..40 {
        match s.sign(&Mechanism::EcdsaSha256, rated, b"m") {
            Ok(_) => ok_count += 1,
            Err(e) if rv(&e) == Some(RvError::FunctionRejected) => rejected += 1,
            Err(e) => bail!("unexpected {e}"),
        }
    }
    ensure!(
        rejected > 0 && (10..40).contains(&ok_count),
        "rate limit: {ok_count} ok, {rejected} rejected"
    );

    // Many threads sign concurrently over the pooled connections.
    let (_, shared) = ec_pair(&s, &[])?;
    std::thread::scope(|sc| -> Result<()> {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    let s = p.open_ro_session(p.get_slots_with_token()?[0])?;
                    for _ in 0..50 {
                        ensure!(s.sign(&Mechanism::EcdsaSha256, shared, b"t")?.len() == 64);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        }
        Ok(())
    })?;

    // Logging out destroys private session objects: the handle is dead after re-login.
    let ephemeral = aes_key(&s, &[Attribute::Private(true)])?;
    s.logout()?;
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
    let e = s
        .get_attribute_info(ephemeral, &[AttributeType::Label])
        .err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::ObjectHandleInvalid),
        "private session object survived logout: {e:?}"
    );

    // Wrong PINs lock the user PIN after the retry limit (3 here), also for the right PIN.
    s.logout()?;
    for i in 0..3 {
        let e = s
            .login(UserType::User, Some(&AuthPin::new("wrong-pin".into())))
            .err();
        let want = if i < 2 {
            RvError::PinIncorrect
        } else {
            RvError::PinLocked
        };
        ensure!(e.as_ref().and_then(rv) == Some(want), "attempt {i}: {e:?}");
    }
    let e = s
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::PinLocked),
        "locked PIN accepted: {e:?}"
    );
    let flags = p.get_token_info(p.get_slots_with_token()?[0])?;
    ensure!(flags.user_pin_locked(), "token info does not show the lock");

    // The audit log recorded the operations and its chain verifies; no PIN in it.
    let entries = caas_domc::audit::verify_with_key_file(
        &dom.state_dir().join("audit.log"),
        &dom.state_dir().join("domain.key"),
    )?;
    ensure!(
        entries
            .iter()
            // At C_SignInit on the classic path, at C_Sign on the single-round-trip path.
            .any(|e| (e.op == "C_SignInit" || e.op == "C_Sign") && e.rv == "0x200"),
        "rejected use not audited"
    );
    ensure!(
        entries
            .iter()
            .any(|e| e.op == "C_Login(user)" && e.rv == "0xa4"),
        "lockout not audited"
    );
    let text = std::fs::read_to_string(dom.state_dir().join("audit.log"))?;
    ensure!(
        !text.contains(USER_PIN) && !text.contains("wrong-pin"),
        "PIN in audit log"
    );
    Ok(())
}

#[test]
fn killing_the_domain_mid_operation_gives_device_error_and_restart_keeps_token_objects()
-> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child(
            "killing_the_domain_mid_operation_gives_device_error_and_restart_keeps_token_objects",
        );
    };
    let mut dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "kill", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let rsa = s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::ModulusBits(2048.into()),
            Attribute::Label(b"kill-rsa".to_vec()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Sign(true),
            Attribute::Label(b"kill-rsa".to_vec()),
        ],
    )?;
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Verify(true),
            Attribute::Label(b"kill-ec-pub".to_vec()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Sign(true),
            Attribute::Label(b"kill-ec".to_vec()),
        ],
    )?;
    let _aes = aes_key(
        &s,
        &[
            Attribute::Token(true),
            Attribute::Label(b"kill-aes".to_vec()),
        ],
    )?;

    // A thread signs in a loop; the domain is killed under it.
    let (tx, rx) = std::sync::mpsc::channel();
    let failure = std::thread::scope(|sc| -> Result<CkError> {
        let h = sc.spawn(|| -> Result<CkError> {
            let ts = p.open_ro_session(p.get_slots_with_token()?[0])?;
            let mut n = 0u64;
            loop {
                match ts.sign(&Mechanism::Sha256RsaPkcs, rsa.1, b"payload") {
                    Ok(_) => {
                        n += 1;
                        if n == 5 {
                            let _ = tx.send(());
                        }
                    }
                    Err(e) => return Ok(e),
                }
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))?;
        dom.kill()?;
        h.join()
            .map_err(|_| anyhow::anyhow!("signing thread panicked"))?
    })?;
    let device = [RvError::DeviceError, RvError::DeviceRemoved];
    ensure!(
        rv(&failure).is_some_and(|r| device.contains(&r)),
        "mid-operation failure was {failure}"
    );
    let again = s.sign(&Mechanism::Sha256RsaPkcs, rsa.1, b"payload").err();
    ensure!(
        again
            .as_ref()
            .and_then(rv)
            .is_some_and(|r| device.contains(&r)),
        "call to dead domain: {again:?}"
    );

    // Restart on the same state: all token objects are back and usable.
    dom.restart()?;
    let s = user_session(&p)?;
    for label in ["kill-rsa", "kill-ec", "kill-ec-pub", "kill-aes"] {
        let found = s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
        ensure!(!found.is_empty(), "{label} lost across restart");
    }
    let private = s.find_objects(&[
        Attribute::Label(b"kill-ec".to_vec()),
        Attribute::Class(ObjectClass::PRIVATE_KEY),
    ])?;
    let public = s.find_objects(&[Attribute::Label(b"kill-ec-pub".to_vec())])?;
    let sig = s.sign(&Mechanism::EcdsaSha256, private[0], b"after restart")?;
    s.verify(&Mechanism::EcdsaSha256, public[0], b"after restart", &sig)?;
    Ok(())
}

#[test]
fn second_tenants_domain_cannot_see_the_first_tenants_objects() -> Result<()> {
    require("pkcs11-tool", "opensc")?;
    let a = Dom::start_initialised("tenant-a", &[])?;
    let b = Dom::start_initialised("tenant-b", &[])?;
    ok(caas_tool(&a)?.args([
        "--login",
        "--pin",
        USER_PIN,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "a-secret-key",
    ]))?;
    let in_a = ok(caas_tool(&a)?.args(["--login", "--pin", USER_PIN, "-O"]))?;
    ensure!(in_a.contains("a-secret-key"), "{in_a}");
    let in_b = ok(caas_tool(&b)?.args(["--login", "--pin", USER_PIN, "-O"]))?;
    ensure!(
        !in_b.contains("a-secret-key"),
        "tenant B sees A's key:\n{in_b}"
    );
    // Even A's sealed state file is useless to B's domain (different domain key).
    let mut b = b;
    b.kill()?;
    std::fs::copy(
        a.state_dir().join("slot-0.token"),
        b.state_dir().join("slot-0.token"),
    )?;
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args(["domc", "serve", "--run-as", "0:0", "--state-dir"])
        .arg(b.state_dir())
        .arg("--socket")
        .arg(b.dir.join("other.sock")))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("sealed under another key"),
        "B opened A's token: {err}"
    );
    Ok(())
}
