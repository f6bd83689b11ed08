//! RSA-1024 is below the crypto domain's policy: refused by default (CKR_KEY_SIZE_RANGE),
//! generated and used for PKCS#1 v1.5 signatures only by a domain started with
//! `--allow-legacy-rsa-1024` (for the seed's ods-hsmspeed RSA-1024 comparison), and refused
//! again when the same token key meets a domain restarted without the flag.

mod common;

use anyhow::{Result, ensure};
use common::ck::*;
use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

fn rsa_1024(s: &Session) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::ModulusBits(1024.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Verify(true),
            Attribute::Label(b"legacy-pub".to_vec()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Sign(true),
            Attribute::Label(b"legacy".to_vec()),
        ],
    )
}

/// SHA-256 DigestInfo prefix (what ods-hsmspeed/libhsm feed to CKM_RSA_PKCS).
const SHA256_DI: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

#[test]
fn rsa_1024_is_refused_by_default_and_works_with_the_legacy_flag() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("rsa_1024_is_refused_by_default_and_works_with_the_legacy_flag");
    };
    let mut dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "legacy", SO_PIN, USER_PIN)?;

    // Default policy: no 1024-bit key generation; the mechanism info says 2048.
    {
        let p = context()?;
        let slot = p.get_slots_with_token()?[0];
        let s = user_session(&p)?;
        let e = rsa_1024(&s).err();
        ensure!(
            e.as_ref().and_then(rv) == Some(RvError::KeySizeRange),
            "1024-bit key generated without the flag: {e:?}"
        );
        let info = p.get_mechanism_info(slot, MechanismType::RSA_PKCS_KEY_PAIR_GEN)?;
        ensure!(info.min_key_size() == 2048, "{info:?}");
        drop(s);
        p.finalize();
    }

    // With --allow-legacy-rsa-1024: generate, sign (fused fast path included), verify.
    dom.kill()?;
    dom.extra = vec!["--allow-legacy-rsa-1024".into()];
    dom.restart()?;
    let signature = {
        let p = context()?;
        let slot = p.get_slots_with_token()?[0];
        let info = p.get_mechanism_info(slot, MechanismType::RSA_PKCS_KEY_PAIR_GEN)?;
        ensure!(info.min_key_size() == 1024, "{info:?}");
        let s = user_session(&p)?;
        let (public, private) = rsa_1024(&s)?;
        let bits = s.get_attributes(public, &[AttributeType::ModulusBits])?;
        ensure!(
            matches!(bits.first(), Some(Attribute::ModulusBits(b)) if u64::from(*b) == 1024),
            "{bits:?}"
        );
        let msg = b"legacy DNSSEC zone data";
        let sig = s.sign(&Mechanism::Sha256RsaPkcs, private, msg)?;
        ensure!(sig.len() == 128, "signature of {} bytes", sig.len());
        // CKM_RSA_PKCS over the DigestInfo (libhsm's way) gives the same deterministic
        // signature, also on the second (single-round-trip) use of the key.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        let di = [&SHA256_DI[..], digest.as_ref()].concat();
        for _ in 0..3 {
            ensure!(s.sign(&Mechanism::RsaPkcs, private, &di)? == sig);
        }
        s.verify(&Mechanism::Sha256RsaPkcs, public, msg, &sig)?;
        ensure!(
            s.verify(&Mechanism::Sha256RsaPkcs, public, b"other", &sig)
                .is_err(),
            "wrong data verified"
        );
        // PSS is offered from 2048 bits only.
        let pss = cryptoki::mechanism::rsa::PkcsPssParams {
            hash_alg: MechanismType::SHA256,
            mgf: cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA256,
            s_len: 32.into(),
        };
        let e = s
            .sign(&Mechanism::Sha256RsaPkcsPss(pss), private, msg)
            .err();
        ensure!(
            e.as_ref().and_then(rv) == Some(RvError::KeySizeRange),
            "PSS with a legacy key: {e:?}"
        );
        // Checked independently with OpenSSL against the token's public key.
        let attrs = s.get_attributes(
            public,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        let rsa = openssl::rsa::Rsa::from_public_components(
            openssl::bn::BigNum::from_slice(&n)?,
            openssl::bn::BigNum::from_slice(&e)?,
        )?;
        let pkey = openssl::pkey::PKey::from_rsa(rsa)?;
        let mut v = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &pkey)?;
        v.update(msg)?;
        ensure!(v.verify(&sig)?, "OpenSSL rejects the legacy signature");
        drop(s);
        p.finalize();
        sig
    };
    ensure!(!signature.is_empty());

    // The token key survives a restart without the flag, but may no longer be used.
    dom.kill()?;
    dom.extra = vec![];
    dom.restart()?;
    let p = context()?;
    let s = user_session(&p)?;
    let found = s.find_objects(&[Attribute::Label(b"legacy".to_vec())])?;
    ensure!(found.len() == 1, "legacy key not found after restart");
    let e = s.sign(&Mechanism::Sha256RsaPkcs, found[0], b"x").err();
    ensure!(
        e.as_ref().and_then(rv) == Some(RvError::KeySizeRange),
        "legacy key usable without the flag: {e:?}"
    );
    drop(s);
    p.finalize();
    Ok(())
}
