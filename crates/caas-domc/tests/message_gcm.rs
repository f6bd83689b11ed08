//! Message-based AES-GCM (PKCS#11 3.0 `C_MessageEncryptInit`/`C_EncryptMessage`/
//! `C_DecryptMessage`, issue 17) through the real module and the `cryptoki` crate: the GCM
//! specification's known answer with a caller's IV, generated IVs cross-checked by
//! decrypting with OpenSSL outside the domain, and the attacks on IV generation: the domain
//! must never issue an IV twice for a key, not after a copy of the key, not after a restart
//! of the crypto domain, not when the caller narrows the counter field. Policy (key type,
//! usage, allowed mechanisms, usage limits per message) and audit hold as for `C_Encrypt`.
//! Multi-part messages (`C_EncryptMessageBegin`/`Next`) give the same ciphertext and never
//! release plaintext before the tag verified.

// C_SessionCancel has no `cryptoki` binding: that test calls the 3.0 function list.
#![allow(unsafe_code)]

mod common;

use anyhow::{Context as _, Result, ensure};
use common::ck::*;
use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::{GcmMessageParams, GeneratorFunction};
use cryptoki::mechanism::{Mechanism, MechanismType, MessageParam};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// GCM specification (McGrew–Viega) test case 4: AES-128, 96-bit IV, AAD, 60-byte text.
const TC4_K: &str = "feffe9928665731c6d6a8f9467308308";
const TC4_IV: &str = "cafebabefacedbaddecaf888";
const TC4_P: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
const TC4_A: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
const TC4_C: &str = "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091";
const TC4_T: &str = "5bc94fbc3221a5db94fae95ae7121a47";

const CKA_CAAS_GCM_IV_STATE: u64 = caas_vsm_proto::attr::CKA_CAAS_GCM_IV_STATE;
const CKA_CAAS_MAX_USES: u64 = caas_vsm_proto::attr::CKA_CAAS_MAX_USES;

fn aes_import(s: &Session, value: &[u8], extra: &[Attribute]) -> Result<ObjectHandle> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(value.to_vec()),
    ];
    t.extend_from_slice(extra);
    Ok(s.create_object(&t)?)
}

/// One C_EncryptMessage: (IV as returned in the parameters, ciphertext, tag).
fn seal(
    s: &Session,
    iv: &[u8],
    fixed_bits: u64,
    generator: GeneratorFunction,
    aad: &[u8],
    pt: &[u8],
) -> cryptoki::error::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut iv = iv.to_vec();
    let mut tag = [0u8; 16];
    let mut params = GcmMessageParams::new(&mut iv, fixed_bits.into(), generator, &mut tag)?;
    let ct = {
        let mp = MessageParam::AesGcmMessage(params);
        let ct = s.encrypt_message(&mp, aad, pt)?;
        let MessageParam::AesGcmMessage(p) = mp;
        params = p;
        ct
    };
    let iv_out = params.iv().to_vec();
    let tag_out = params.tag().to_vec();
    Ok((iv_out, ct, tag_out))
}

/// One C_DecryptMessage with the IV and tag.
fn open(
    s: &Session,
    iv: &[u8],
    tag: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = iv.to_vec();
    let mut tag = tag.to_vec();
    let params = GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut tag)?;
    s.decrypt_message(&MessageParam::AesGcmMessage(params), aad, ct)
}

fn message_init(s: &Session, k: ObjectHandle, encrypt: bool) -> cryptoki::error::Result<()> {
    let mut iv = [0u8; 12];
    let mut tag = [0u8; 16];
    let params = GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut tag)?;
    let m = Mechanism::AesGcmMessage(params);
    if encrypt {
        s.message_encrypt_init(&m, k)
    } else {
        s.message_decrypt_init(&m, k)
    }
}

/// The counter field (last 8 bytes) of a 96-bit IV with 32 fixed bits.
fn counter(iv: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(iv[4..12].try_into()?))
}

fn openssl_open(key: &[u8], iv: &[u8], aad: &[u8], ct: &[u8], tag: &[u8]) -> Result<Vec<u8>> {
    let cipher = match key.len() {
        16 => openssl::symm::Cipher::aes_128_gcm(),
        _ => openssl::symm::Cipher::aes_256_gcm(),
    };
    Ok(openssl::symm::decrypt_aead(
        cipher,
        key,
        Some(iv),
        aad,
        ct,
        tag,
    )?)
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

/// The GCM specification's test case 4 through C_EncryptMessage with the caller's IV
/// (`CKG_NO_GENERATE`) gives its ciphertext and tag, and C_DecryptMessage gives the text
/// back; IVs generated by the domain (`CKG_GENERATE_COUNTER` keeping the caller's 32 fixed
/// bits, `CKG_GENERATE_RANDOM`) produce messages OpenSSL opens outside the domain; a
/// changed tag does not open; a length query spends no IV; the mechanism info says message
/// encrypt/decrypt.
#[test]
fn gcm_message_known_answer_and_openssl_cross_check() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("gcm_message_known_answer_and_openssl_cross_check");
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "msg", SO_PIN, USER_PIN)?;
    let p = context()?;
    let info = p.get_mechanism_info(p.get_slots_with_token()?[0], MechanismType::AES_GCM)?;
    ensure!(
        info.message_encrypt() && info.message_decrypt() && info.multi_message(),
        "AES-GCM info {info:?}"
    );
    let s = user_session(&p)?;
    let key = h(TC4_K)?;
    let k = aes_import(&s, &key, &[])?;
    message_init(&s, k, true)?;
    message_init(&s, k, false)?;
    let (aad, pt) = (h(TC4_A)?, h(TC4_P)?);
    let (iv, ct, tag) = seal(&s, &h(TC4_IV)?, 0, GeneratorFunction::NoGenerate, &aad, &pt)?;
    ensure!(iv == h(TC4_IV)?, "the caller's IV is kept");
    ensure!(hex::encode(&ct) == TC4_C, "ciphertext {}", hex::encode(&ct));
    ensure!(hex::encode(&tag) == TC4_T, "tag {}", hex::encode(&tag));
    ensure!(open(&s, &iv, &tag, &aad, &ct)? == pt, "C_DecryptMessage");
    let mut bad = tag.clone();
    bad[0] ^= 1;
    expect_rv(
        open(&s, &iv, &bad, &aad, &ct),
        RvError::EncryptedDataInvalid,
        "changed tag",
    )?;

    // Generated IVs: the caller's fixed field, then the key's counter (from zero), opened by
    // OpenSSL with the IV and tag the module handed back.
    let fixed = [1u8, 2, 3, 4, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
    let mut last = None;
    for (i, msg) in [&b"first"[..], b"second message", b""].iter().enumerate() {
        let (iv, ct, tag) = seal(
            &s,
            &fixed,
            32,
            GeneratorFunction::GenerateCounter,
            b"hdr",
            msg,
        )?;
        ensure!(
            iv[..4] == fixed[..4],
            "fixed field kept: {}",
            hex::encode(&iv)
        );
        let c = counter(&iv)?;
        ensure!(c == i as u64, "counter {c} for message {i}");
        ensure!(
            openssl_open(&key, &iv, b"hdr", &ct, &tag)? == *msg,
            "OpenSSL opens message {i}"
        );
        ensure!(open(&s, &iv, &tag, b"hdr", &ct)? == *msg, "and the domain");
        last = Some(c);
    }
    // Every `seal` asks for the length first (NULL output): consecutive counters show a
    // length query spends no IV. CKG_GENERATE is the same counter.
    let (iv, _, _) = seal(&s, &fixed, 32, GeneratorFunction::Generate, b"", b"x")?;
    ensure!(
        Some(counter(&iv)?) == last.map(|c| c + 1),
        "CKG_GENERATE continues the counter"
    );
    // Random IVs: at least 96 random bits.
    let (iv1, ct, tag) = seal(
        &s,
        &[0u8; 12],
        0,
        GeneratorFunction::GenerateRandom,
        b"",
        b"rnd",
    )?;
    let (iv2, _, _) = seal(
        &s,
        &[0u8; 12],
        0,
        GeneratorFunction::GenerateRandom,
        b"",
        b"rnd",
    )?;
    ensure!(iv1 != iv2 && iv1 != [0u8; 12], "random IVs");
    ensure!(
        openssl_open(&key, &iv1, b"", &ct, &tag)? == b"rnd",
        "OpenSSL opens"
    );
    expect_rv(
        seal(
            &s,
            &[0u8; 12],
            8,
            GeneratorFunction::GenerateRandom,
            b"",
            b"x",
        ),
        RvError::MechanismParamInvalid,
        "88 random bits",
    )?;
    expect_rv(
        seal(
            &s,
            &[0u8; 12],
            32,
            GeneratorFunction::GenerateCounterXor,
            b"",
            b"x",
        ),
        RvError::MechanismParamInvalid,
        "CKG_GENERATE_COUNTER_XOR",
    )?;
    s.message_encrypt_final()?;
    s.message_decrypt_final()?;
    expect_rv(
        seal(
            &s,
            &fixed,
            32,
            GeneratorFunction::GenerateCounter,
            b"",
            b"x",
        ),
        RvError::OperationNotInitialized,
        "after C_MessageEncryptFinal",
    )?;
    drop(dom);
    Ok(())
}

/// The IV-reuse attacks: a copy of the key, a restart of the crypto domain (SIGKILL, so
/// nothing is written at exit) and a narrower counter field must not make the domain issue
/// a counter value it issued before. The counter state is on the key object, readable and
/// not settable by the user.
#[test]
fn gcm_message_iv_counter_never_repeats_across_copy_restart_and_narrower_field() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child(
            "gcm_message_iv_counter_never_repeats_across_copy_restart_and_narrower_field",
        );
    };
    let mut dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "msg", SO_PIN, USER_PIN)?;
    let fixed = [9u8; 12];
    let mut issued = std::collections::HashSet::new();
    let mut take = |s: &Session, what: &str| -> Result<u64> {
        let (iv, _, _) = seal(s, &fixed, 32, GeneratorFunction::GenerateCounter, b"", b"m")?;
        let c = counter(&iv)?;
        ensure!(issued.insert(iv), "{what}: IV {c} issued twice");
        Ok(c)
    };
    {
        let p = context()?;
        let s = user_session(&p)?;
        let k = s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"gcm-token".to_vec()),
            ],
        )?;
        message_init(&s, k, true)?;
        ensure!(take(&s, "first")? == 0, "starts at 0");
        ensure!(take(&s, "second")? == 1, "then 1");
        // A copy has the same value: it continues the same counter.
        let copy = s.copy_object(k, &[Attribute::Token(false)])?;
        let s2 = p.open_rw_session(p.get_slots_with_token()?[0])?;
        message_init(&s2, copy, true)?;
        ensure!(take(&s2, "copy")? == 2, "the copy continues the counter");
        ensure!(take(&s, "original")? == 3, "and the original after it");
        // The state is readable and read-only.
        let state = s.get_attributes(
            k,
            &[AttributeType::VendorDefined(CKA_CAAS_GCM_IV_STATE as _)],
        )?;
        ensure!(!state.is_empty(), "CKA_CAAS_GCM_IV_STATE readable");
        expect_rv(
            s.update_attributes(
                k,
                &[Attribute::VendorDefined((
                    AttributeType::VendorDefined(CKA_CAAS_GCM_IV_STATE as _),
                    vec![0u8; 16],
                ))],
            ),
            RvError::AttributeReadOnly,
            "resetting the counter",
        )?;
    }
    // The crypto domain dies without a chance to write anything, and comes back.
    dom.kill()?;
    dom.restart()?;
    {
        let p = context()?;
        let s = user_session(&p)?;
        let k = s.find_objects(&[Attribute::Label(b"gcm-token".to_vec())])?;
        let k = *k.first().context("token key after restart")?;
        message_init(&s, k, true)?;
        let c = take(&s, "after restart")?;
        ensure!(
            c > 3,
            "counter after restart {c} must be above every issued value"
        );
        // Now the counter is above 255: an 8-bit counter field (88 fixed bits) cannot
        // hold it, so the domain refuses rather than wrap (and audits the refusal).
        expect_rv(
            seal(
                &s,
                &fixed,
                88,
                GeneratorFunction::GenerateCounter,
                b"",
                b"m",
            ),
            RvError::MechanismParamInvalid,
            "narrower counter field",
        )?;
        audited(
            &dom,
            "C_EncryptMessage",
            cryptoki_sys::CKM_AES_GCM,
            cryptoki_sys::CKR_MECHANISM_PARAM_INVALID,
        )?;
        // The other way round: after a narrow field was used, the counter may not outgrow
        // it under a wider one (the IVs would meet). A fresh key: 8-bit field first.
        let k2 = s.generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::Token(false), Attribute::ValueLen(16.into())],
        )?;
        s.message_encrypt_final()?;
        message_init(&s, k2, true)?;
        for _ in 0..256 {
            seal(
                &s,
                &fixed,
                88,
                GeneratorFunction::GenerateCounter,
                b"",
                b"m",
            )?;
        }
        expect_rv(
            seal(
                &s,
                &fixed,
                32,
                GeneratorFunction::GenerateCounter,
                b"",
                b"m",
            ),
            RvError::MechanismParamInvalid,
            "a wider field after 256 values in an 8-bit one",
        )?;
    }
    Ok(())
}

/// The key checks of C_EncryptInit hold at C_MessageEncryptInit (wrong key type, usage flag,
/// allowed mechanisms), the usage limit counts each message (and the refusal is audited),
/// and the operation state rules: no message before init, no second init.
#[test]
fn gcm_message_policy_limits_and_audit() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("gcm_message_policy_limits_and_audit");
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "msg", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let hmac = s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Value(vec![7u8; 32]),
    ])?;
    expect_rv(
        message_init(&s, hmac, true),
        RvError::KeyTypeInconsistent,
        "generic secret",
    )?;
    audited(
        &dom,
        "C_MessageEncryptInit",
        cryptoki_sys::CKM_AES_GCM,
        cryptoki_sys::CKR_KEY_TYPE_INCONSISTENT,
    )?;
    let cbc_only = aes_import(
        &s,
        &[1u8; 16],
        &[Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC])],
    )?;
    expect_rv(
        message_init(&s, cbc_only, true),
        RvError::MechanismInvalid,
        "allowed mechanisms",
    )?;
    let no_decrypt = aes_import(&s, &[2u8; 16], &[Attribute::Decrypt(false)])?;
    expect_rv(
        message_init(&s, no_decrypt, false),
        RvError::KeyFunctionNotPermitted,
        "CKA_DECRYPT false",
    )?;
    expect_rv(
        seal(&s, &[0u8; 12], 0, GeneratorFunction::NoGenerate, b"", b"x"),
        RvError::OperationNotInitialized,
        "no init",
    )?;
    let limited = aes_import(
        &s,
        &[3u8; 32],
        &[Attribute::VendorDefined((
            AttributeType::VendorDefined(CKA_CAAS_MAX_USES as _),
            2u64.to_ne_bytes().to_vec(),
        ))],
    )?;
    message_init(&s, limited, true)?;
    expect_rv(
        message_init(&s, limited, true),
        RvError::OperationActive,
        "second init",
    )?;
    for _ in 0..2 {
        seal(
            &s,
            &[0u8; 12],
            32,
            GeneratorFunction::GenerateCounter,
            b"",
            b"x",
        )?;
    }
    expect_rv(
        seal(
            &s,
            &[0u8; 12],
            32,
            GeneratorFunction::GenerateCounter,
            b"",
            b"x",
        ),
        RvError::FunctionRejected,
        "third message of a 2-use key",
    )?;
    audited(
        &dom,
        "C_EncryptMessage",
        cryptoki_sys::CKM_AES_GCM,
        cryptoki_sys::CKR_FUNCTION_REJECTED,
    )?;
    Ok(())
}

/// Multi-part messages: C_EncryptMessageBegin generates the IV (continuing the key's
/// counter), the parts give the same ciphertext as one C_EncryptMessage (OpenSSL opens it),
/// C_DecryptMessageBegin/Next give the text back only at the last part and only with the
/// right tag; a single-part call or a second Begin inside a message is CKR_OPERATION_ACTIVE
/// and a Next without Begin CKR_OPERATION_NOT_INITIALIZED.
#[test]
fn gcm_multi_part_messages_match_single_part_and_check_the_tag_first() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("gcm_multi_part_messages_match_single_part_and_check_the_tag_first");
    };
    let _dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&_dom.socket, 0, "msg", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let key = [0x42u8; 32];
    let k = aes_import(&s, &key, &[])?;
    message_init(&s, k, true)?;
    message_init(&s, k, false)?;
    let fixed = [7u8, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0];
    let (iv0, _, _) = seal(
        &s,
        &fixed,
        32,
        GeneratorFunction::GenerateCounter,
        b"",
        b"x",
    )?;
    ensure!(counter(&iv0)? == 0, "first message");
    let parts: [&[u8]; 3] = [b"part one, ", b"part two, ", b"and the end"];
    let whole: Vec<u8> = parts.concat();
    // Encrypt in parts.
    let mut iv = fixed.to_vec();
    let mut tag = [0u8; 16];
    let params = GcmMessageParams::new(
        &mut iv,
        32.into(),
        GeneratorFunction::GenerateCounter,
        &mut tag,
    )?;
    // The generated IV is written back to `iv` by C_EncryptMessageBegin.
    s.encrypt_message_begin(MessageParam::AesGcmMessage(params), b"aad")?;
    // Inside a message: no single-part call, no second Begin.
    expect_rv(
        seal(
            &s,
            &fixed,
            32,
            GeneratorFunction::GenerateCounter,
            b"",
            b"x",
        ),
        RvError::OperationActive,
        "single part inside a message",
    )?;
    let mut ct = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let mut tag2 = [0u8; 16];
        let end = i == parts.len() - 1;
        let mut iv2 = [0u8; 12];
        let p2 =
            GcmMessageParams::new(&mut iv2, 0.into(), GeneratorFunction::NoGenerate, &mut tag2)?;
        // The tag goes to the last Next's parameters.
        let out = s.encrypt_message_next(MessageParam::AesGcmMessage(p2), part, end)?;
        ct.extend_from_slice(&out);
        if end {
            tag.copy_from_slice(&tag2);
        } else {
            ensure!(out.is_empty(), "no output before the last part");
        }
    }
    let iv_used = iv.clone();
    ensure!(
        counter(&iv_used)? == 1,
        "Begin continued the counter: {}",
        hex::encode(&iv_used)
    );
    ensure!(iv_used[..4] == fixed[..4], "fixed field kept");
    ensure!(
        openssl_open(&key, &iv_used, b"aad", &ct, &tag)? == whole,
        "OpenSSL opens the multi-part message"
    );
    // Decrypt in parts: nothing before the end, the text with the right tag only.
    let decrypt = |tag: &[u8]| -> cryptoki::error::Result<Vec<u8>> {
        let mut iv = iv_used.clone();
        let mut t0 = [0u8; 16];
        let p0 = GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut t0)?;
        s.decrypt_message_begin(MessageParam::AesGcmMessage(p0), b"aad")?;
        let mut pt = Vec::new();
        let (a, b) = ct.split_at(7);
        for (chunk, end) in [(a, false), (b, true)] {
            let mut iv = iv_used.clone();
            let mut t = tag.to_vec();
            let pp =
                GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut t)?;
            let out = s.decrypt_message_next(MessageParam::AesGcmMessage(pp), chunk, end)?;
            if !end {
                assert!(out.is_empty(), "plaintext before the tag was checked");
            }
            pt.extend_from_slice(&out);
        }
        Ok(pt)
    };
    ensure!(decrypt(&tag)? == whole, "multi-part decryption");
    let mut bad = tag;
    bad[15] ^= 1;
    expect_rv(decrypt(&bad), RvError::EncryptedDataInvalid, "wrong tag")?;
    // The failed message ended: a Next now has no message.
    let mut iv3 = [0u8; 12];
    let mut t3 = [0u8; 16];
    let p3 = GcmMessageParams::new(&mut iv3, 0.into(), GeneratorFunction::NoGenerate, &mut t3)?;
    expect_rv(
        s.decrypt_message_next(MessageParam::AesGcmMessage(p3), b"x", true),
        RvError::OperationNotInitialized,
        "Next without Begin",
    )?;
    // A message longer than one frame's answer is refused and ends (the domain buffers at
    // most that much per message).
    let mut iv4 = fixed.to_vec();
    let mut t4 = [0u8; 16];
    let p4 = GcmMessageParams::new(
        &mut iv4,
        32.into(),
        GeneratorFunction::GenerateCounter,
        &mut t4,
    )?;
    s.encrypt_message_begin(MessageParam::AesGcmMessage(p4), b"")?;
    let big = vec![0x55u8; 9 << 20];
    let mut results = Vec::new();
    for _ in 0..2 {
        let mut iv5 = [0u8; 12];
        let mut t5 = [0u8; 16];
        let p5 = GcmMessageParams::new(&mut iv5, 0.into(), GeneratorFunction::NoGenerate, &mut t5)?;
        results.push(s.encrypt_message_next(MessageParam::AesGcmMessage(p5), &big, false));
    }
    ensure!(results[0].is_ok(), "first 9 MiB part: {:?}", results[0]);
    expect_rv(results.remove(1), RvError::DataLenRange, "18 MiB message")?;
    // After the refusal the message is over: single-part calls work again.
    seal(
        &s,
        &fixed,
        32,
        GeneratorFunction::GenerateCounter,
        b"",
        b"x",
    )?;
    Ok(())
}

/// C_SessionCancel (PKCS#11 3.0) with CKF_MESSAGE_ENCRYPT ends a message-based operation:
/// the next C_EncryptMessage is CKR_OPERATION_NOT_INITIALIZED and a new
/// C_MessageEncryptInit is accepted (not CKR_OPERATION_ACTIVE).
#[test]
fn session_cancel_ends_a_message_operation() -> Result<()> {
    use cryptoki_sys::*;
    let Some(dir) = child_dir() else {
        return run_in_child("session_cancel_ends_a_message_operation");
    };
    let _dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&_dom.socket, 0, "msg", SO_PIN, USER_PIN)?;
    let p = context()?;
    let s = user_session(&p)?;
    let k = aes_import(&s, &[5u8; 16], &[])?;
    let k: CK_OBJECT_HANDLE = k.to_string().parse()?;
    let path = std::ffi::CString::new(module()?.to_string_lossy().as_bytes())?;
    // SAFETY: the module `cryptoki` loaded and initialised; the 3.0 function list from its
    // C_GetInterface; valid arguments throughout.
    unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
        ensure!(!h.is_null(), "dlopen");
        let sym = libc::dlsym(h, c"C_GetInterface".as_ptr());
        ensure!(!sym.is_null(), "dlsym");
        let get: unsafe extern "C" fn(
            *mut u8,
            *mut CK_VERSION,
            *mut *mut CK_INTERFACE,
            CK_FLAGS,
        ) -> CK_RV = std::mem::transmute(sym);
        let mut ver = CK_VERSION { major: 3, minor: 0 };
        let mut i: *mut CK_INTERFACE = std::ptr::null_mut();
        ensure!(
            get(std::ptr::null_mut(), &mut ver, &mut i, 0) == CKR_OK,
            "C_GetInterface"
        );
        let l = &*((*i).pFunctionList as *const CK_FUNCTION_LIST_3_0);
        let mut session = 0;
        let rv = l.C_OpenSession.context("open")?(
            0,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            std::ptr::null_mut(),
            None,
            &mut session,
        );
        ensure!(rv == CKR_OK, "C_OpenSession {rv:#x}");
        let mut m = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        let init = l.C_MessageEncryptInit.context("init")?;
        ensure!(init(session, &mut m, k) == CKR_OK, "C_MessageEncryptInit");
        ensure!(
            init(session, &mut m, k) == CKR_OPERATION_ACTIVE,
            "second init"
        );
        let cancel = l.C_SessionCancel.context("cancel")?;
        ensure!(
            cancel(session, CKF_MESSAGE_ENCRYPT) == CKR_OK,
            "C_SessionCancel"
        );
        let mut iv = [0u8; 12];
        let mut tag = [0u8; 16];
        let mut params = CK_GCM_MESSAGE_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvFixedBits: 0,
            ivGenerator: CKG_NO_GENERATE,
            pTag: tag.as_mut_ptr(),
            ulTagBits: 128,
        };
        let mut out = [0u8; 4];
        let mut out_len: CK_ULONG = 4;
        let rv = l.C_EncryptMessage.context("encrypt")?(
            session,
            &mut params as *mut _ as *mut std::ffi::c_void,
            std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG,
            std::ptr::null_mut(),
            0,
            b"data".as_ptr() as *mut u8,
            4,
            out.as_mut_ptr(),
            &mut out_len,
        );
        ensure!(
            rv == CKR_OPERATION_NOT_INITIALIZED,
            "C_EncryptMessage after cancel: {rv:#x}"
        );
        ensure!(init(session, &mut m, k) == CKR_OK, "init after cancel");
    }
    Ok(())
}
