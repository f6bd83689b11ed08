//! The machine's signing ceiling: aws-lc-rs (the library the crypto domain signs with)
//! signing in-process, N threads for a fixed time, no PKCS#11, no socket, no audit, so
//! `bench/vsm-bench.sh` can show in the same run how close the VSM comes to what the CPUs
//! can do.
//!
//! ECDSA P-256 signs a 32-byte prehash with `sign_digest` (what the domain does for
//! `CKM_ECDSA`); ML-DSA-65 signs a 64-byte message (pure ML-DSA, empty context, hedged —
//! what the domain does for `CKM_ML_DSA`).
//!
//! Prints `MECH THREADS sig/s CPU-seconds`.
//!
//! Usage: sigceiling ecdsa-p256|mldsa65 THREADS SECONDS

#![allow(unsafe_code)] // getrusage

use anyhow::{Context, Result, bail};
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, ML_DSA_65_SIGNING, PqdsaKeyPair,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

enum Key {
    Ecdsa(EcdsaKeyPair),
    MlDsa(PqdsaKeyPair),
}

impl Key {
    fn sign(&self, buf: &mut [u8]) -> Result<()> {
        match self {
            Key::Ecdsa(k) => {
                let d = digest::Digest::import_less_safe(&[0x5a; 32], &digest::SHA256)
                    .map_err(|_| anyhow::anyhow!("digest"))?;
                let s = k.sign_digest(&d).map_err(|_| anyhow::anyhow!("sign"))?;
                std::hint::black_box(s);
            }
            Key::MlDsa(k) => {
                k.sign(&[0x5a; 64], buf)
                    .map_err(|_| anyhow::anyhow!("sign"))?;
                std::hint::black_box(&buf);
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        bail!("usage: sigceiling ecdsa-p256|mldsa65 THREADS SECONDS");
    }
    let mech = a[1].as_str();
    let threads: usize = a[2].parse().context("THREADS")?;
    let secs: u64 = a[3].parse().context("SECONDS")?;
    let key = match mech {
        "ecdsa-p256" => {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|_| anyhow::anyhow!("keygen"))?;
            Key::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                    .map_err(|_| anyhow::anyhow!("parse"))?,
            )
        }
        "mldsa65" => Key::MlDsa(
            PqdsaKeyPair::generate(&ML_DSA_65_SIGNING).map_err(|_| anyhow::anyhow!("keygen"))?,
        ),
        other => bail!("unknown mechanism {other}"),
    };
    let sig_len = match &key {
        Key::Ecdsa(_) => 64,
        Key::MlDsa(_) => ML_DSA_65_SIGNING.signature_len(),
    };
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; sig_len];
                    while Instant::now() < deadline {
                        key.sign(&mut buf)?;
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
    println!("{mech} {threads} {rate:.0} {:.2}", cpu_seconds());
    Ok(())
}

/// CPU time (user + system) this process used so far, in seconds: with the wall-clock rate
/// it gives signatures per CPU-second, which other load on the machine hardly changes.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
