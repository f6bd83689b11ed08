//! Multi-threaded PKCS#11 signing benchmark (any module, via the `cryptoki` crate): one
//! session key pair, N threads each with its own session signing for a fixed time.
//! Prints `MECH THREADS sig/s`. Used by `bench/vsm-bench.sh` to compare caas with SoftHSM2.
//!
//! Usage: p11bench MODULE TOKEN_LABEL PIN ecdsa-p256|ed25519|rsa2048 THREADS SECONDS

use anyhow::{Context, Result, bail};
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        bail!("usage: p11bench MODULE TOKEN_LABEL PIN ecdsa-p256|ed25519|rsa2048 THREADS SECONDS");
    }
    let (module, label, pin, mech) = (&a[1], &a[2], &a[3], a[4].as_str());
    let threads: usize = a[5].parse()?;
    let secs: u64 = a[6].parse()?;
    let p = Pkcs11::new(module)?;
    p.initialize(CInitializeArgs::OsThreads)?;
    let slot = p
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            p.get_token_info(*s)
                .map(|t| t.label() == label)
                .unwrap_or(false)
        })
        .context("token not found")?;
    let s = p.open_rw_session(slot)?;
    s.login(UserType::User, Some(&AuthPin::new(pin.clone())))?;
    let (keygen, public, _, data): (Mechanism, Vec<Attribute>, Mechanism, Vec<u8>) = match mech {
        // Prehashed ECDSA: SoftHSM2 has no CKM_ECDSA_SHA256.
        "ecdsa-p256" => (
            Mechanism::EccKeyPairGen,
            vec![Attribute::EcParams(vec![
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ])],
            Mechanism::Ecdsa,
            vec![0x5a; 32],
        ),
        "ed25519" => (
            Mechanism::EccEdwardsKeyPairGen,
            vec![Attribute::EcParams(vec![0x06, 0x03, 0x2b, 0x65, 0x70])],
            Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
                cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
            )),
            vec![0x5a; 64],
        ),
        "rsa2048" => (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ],
            Mechanism::Sha256RsaPkcs,
            vec![0x5a; 64],
        ),
        other => bail!("unknown mechanism {other}"),
    };
    let (_, private) = s.generate_key_pair(
        &keygen,
        &public,
        &[Attribute::Sign(true), Attribute::Token(false)],
    )?;
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    let ts = p.open_ro_session(slot)?;
                    let sign_mech = sign_mechanism(mech);
                    while Instant::now() < deadline {
                        ts.sign(&sign_mech, private, &data)?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        }
        Ok(())
    })?;
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{mech} {threads} {rate:.0}");
    Ok(())
}

fn sign_mechanism(name: &str) -> Mechanism<'static> {
    match name {
        "ecdsa-p256" => Mechanism::Ecdsa,
        "ed25519" => Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
            cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
        )),
        _ => Mechanism::Sha256RsaPkcs,
    }
}
