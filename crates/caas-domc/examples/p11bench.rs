//! Multi-threaded PKCS#11 signing benchmark (any module, via the `cryptoki` crate): one
//! session key pair, N threads each with its own session signing for a fixed time.
//! Prints `MECH THREADS sig/s CPU-seconds` (the process's, module included). Used by `bench/vsm-bench.sh` to compare caas with SoftHSM2.
//!
//! `mldsa65` (PKCS#11 3.2 `CKM_ML_DSA`, which the `cryptoki` crate does not bind) goes
//! through the module's raw function list instead.
//!
//! Usage: p11bench MODULE TOKEN_LABEL PIN ecdsa-p256|ed25519|rsa2048|mldsa65 THREADS SECONDS

// The ML-DSA path calls the module's C functions directly.
#![allow(unsafe_code)]

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
        bail!(
            "usage: p11bench MODULE TOKEN_LABEL PIN ecdsa-p256|ed25519|rsa2048|mldsa65|hmac-sha256 THREADS SECONDS"
        );
    }
    let (module, label, pin, mech) = (&a[1], &a[2], &a[3], a[4].as_str());
    let threads: usize = a[5].parse()?;
    let secs: u64 = a[6].parse()?;
    if mech == "mldsa65" {
        let rate = raw::ml_dsa_65(module, label, pin, threads, secs)?;
        println!("{mech} {threads} {rate:.0} {:.2}", cpu_seconds());
        return Ok(());
    }
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
    let (private, data) = if mech == "hmac-sha256" {
        // A MAC of 32 bytes costs the token well under a microsecond: the module's and the
        // token's own cost per call (round trip, checks, audit) is nearly all of it.
        let key = s.generate_key(
            &Mechanism::GenericSecretKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Sign(true),
                Attribute::Token(false),
            ],
        )?;
        (key, vec![0x5a; 32])
    } else {
        key_pair(&s, mech)?
    };
    let rate = timed(
        threads,
        secs,
        || Ok((p.open_ro_session(slot)?, sign_mechanism(mech))),
        |(ts, m)| Ok(ts.sign(m, private, &data).map(drop)?),
    )?;
    println!("{mech} {threads} {rate:.0} {:.2}", cpu_seconds());
    Ok(())
}

/// Runs `op` in a loop on `threads` threads for `secs` seconds, each thread on the state its
/// `setup` call made (its own session); returns calls per second.
fn timed<S>(
    threads: usize,
    secs: u64,
    setup: impl Fn() -> Result<S> + Sync,
    op: impl Fn(&mut S) -> Result<()> + Sync,
) -> Result<f64> {
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    let mut state = setup()?;
                    while Instant::now() < deadline {
                        op(&mut state)?;
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
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// A signing key pair of `mech` in the session, and the data each call signs.
fn key_pair(
    s: &cryptoki::session::Session,
    mech: &str,
) -> Result<(cryptoki::object::ObjectHandle, Vec<u8>)> {
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
    Ok((private, data))
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

fn sign_mechanism(name: &str) -> Mechanism<'static> {
    match name {
        "ecdsa-p256" => Mechanism::Ecdsa,
        "ed25519" => Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
            cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
        )),
        "hmac-sha256" => Mechanism::Sha256Hmac,
        _ => Mechanism::Sha256RsaPkcs,
    }
}

/// ML-DSA-65 through the raw 2.40 function list (the mechanism and attribute numbers are
/// PKCS#11 3.2's; a module that does not know them answers CKR_MECHANISM_INVALID).
mod raw {
    use anyhow::{Result, bail, ensure};
    use cryptoki_sys::*;
    use std::ffi::c_void;
    use std::ptr::null_mut;

    /// PKCS#11 3.2 `pkcs11t.h`: CKK_ML_DSA, CKA_PARAMETER_SET, CKM_ML_DSA_KEY_PAIR_GEN,
    /// CKM_ML_DSA, CKP_ML_DSA_65.
    const CKA_PARAMETER_SET: CK_ULONG = 0x61d;
    const CKM_ML_DSA_KEY_PAIR_GEN: CK_ULONG = 0x1c;
    const CKM_ML_DSA: CK_ULONG = 0x1d;
    const CKP_ML_DSA_65: CK_ULONG = 2;

    fn ck(rv: CK_RV, what: &str) -> Result<()> {
        if rv == CKR_OK {
            Ok(())
        } else {
            bail!("{what}: rv {rv:#x}")
        }
    }

    fn attr(ty: CK_ULONG, v: &mut [u8]) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE {
            type_: ty,
            pValue: v.as_mut_ptr().cast::<c_void>(),
            ulValueLen: v.len() as CK_ULONG,
        }
    }

    pub fn ml_dsa_65(
        module: &str,
        label: &str,
        pin: &str,
        threads: usize,
        secs: u64,
    ) -> Result<f64> {
        let path = std::ffi::CString::new(module)?;
        // SAFETY: a PKCS#11 module; every call follows the PKCS#11 2.40 signatures, buffers
        // outlive the calls that use them.
        unsafe {
            let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
            ensure!(!h.is_null(), "dlopen {module}");
            let sym = libc::dlsym(h, c"C_GetFunctionList".as_ptr());
            ensure!(!sym.is_null(), "C_GetFunctionList");
            let get: unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV =
                std::mem::transmute(sym);
            let mut l: *mut CK_FUNCTION_LIST = null_mut();
            ck(get(&mut l), "C_GetFunctionList")?;
            let f = &*l;
            let mut init = CK_C_INITIALIZE_ARGS {
                CreateMutex: None,
                DestroyMutex: None,
                LockMutex: None,
                UnlockMutex: None,
                flags: CKF_OS_LOCKING_OK,
                pReserved: null_mut(),
            };
            macro_rules! fnp {
                ($n:ident) => {
                    f.$n.ok_or_else(|| anyhow::anyhow!(concat!("no ", stringify!($n))))?
                };
            }
            ck(
                fnp!(C_Initialize)((&raw mut init).cast::<c_void>()),
                "C_Initialize",
            )?;
            let mut slots = [0 as CK_SLOT_ID; 16];
            let mut n = slots.len() as CK_ULONG;
            ck(
                fnp!(C_GetSlotList)(CK_TRUE, slots.as_mut_ptr(), &mut n),
                "C_GetSlotList",
            )?;
            let mut slot = None;
            for &s in &slots[..n as usize] {
                let mut ti: CK_TOKEN_INFO = std::mem::zeroed();
                if fnp!(C_GetTokenInfo)(s, &mut ti) == CKR_OK
                    && String::from_utf8_lossy(&ti.label).trim_end() == label
                {
                    slot = Some(s);
                }
            }
            let Some(slot) = slot else {
                bail!("token not found")
            };
            let open = |s: &mut CK_SESSION_HANDLE| -> Result<()> {
                ck(
                    fnp!(C_OpenSession)(
                        slot,
                        CKF_SERIAL_SESSION | CKF_RW_SESSION,
                        null_mut(),
                        None,
                        s,
                    ),
                    "C_OpenSession",
                )
            };
            let mut s = 0;
            open(&mut s)?;
            let mut p = pin.as_bytes().to_vec();
            ck(
                fnp!(C_Login)(s, CKU_USER, p.as_mut_ptr(), p.len() as CK_ULONG),
                "C_Login",
            )?;
            let mut set = CKP_ML_DSA_65.to_ne_bytes();
            let (mut t, mut f0) = ([CK_TRUE], [CK_FALSE]);
            let mut public = [attr(CKA_PARAMETER_SET, &mut set)];
            let mut private = [attr(CKA_SIGN, &mut t), attr(CKA_TOKEN, &mut f0)];
            let mut keygen = CK_MECHANISM {
                mechanism: CKM_ML_DSA_KEY_PAIR_GEN,
                pParameter: null_mut(),
                ulParameterLen: 0,
            };
            let (mut pubk, mut privk) = (0, 0);
            ck(
                fnp!(C_GenerateKeyPair)(
                    s,
                    &mut keygen,
                    public.as_mut_ptr(),
                    public.len() as CK_ULONG,
                    private.as_mut_ptr(),
                    private.len() as CK_ULONG,
                    &mut pubk,
                    &mut privk,
                ),
                "C_GenerateKeyPair ML-DSA-65",
            )?;
            let rate = super::timed(
                threads,
                secs,
                || {
                    let mut ts = 0;
                    open(&mut ts)?;
                    Ok((ts, [0x5a_u8; 64], vec![0u8; 4096]))
                },
                |(ts, data, sig)| {
                    let mut m = CK_MECHANISM {
                        mechanism: CKM_ML_DSA,
                        pParameter: null_mut(),
                        ulParameterLen: 0,
                    };
                    ck(fnp!(C_SignInit)(*ts, &mut m, privk), "C_SignInit")?;
                    let mut len = sig.len() as CK_ULONG;
                    ck(
                        fnp!(C_Sign)(
                            *ts,
                            data.as_mut_ptr(),
                            data.len() as CK_ULONG,
                            sig.as_mut_ptr(),
                            &mut len,
                        ),
                        "C_Sign",
                    )
                },
            )?;
            let _ = fnp!(C_Finalize)(null_mut());
            Ok(rate)
        }
    }
}
