//! PKCS#11 3.2 post-quantum keys and the 3.0/3.2 interfaces (issue 17), through the real
//! module loaded with `dlopen` and its 3.2 function list from `C_GetInterface` (the
//! `cryptoki` crate has no 3.2 binding): ML-DSA signatures made in the VSM verify with
//! aws-lc-rs outside the domain, ML-KEM encapsulation outside / decapsulation inside (and
//! the reverse) give the same secret, bad parameters get the PKCS#11 codes, and the policy
//! holds: a key made from an ML-KEM secret (which is known outside the token) never counts
//! as a key that stayed in the token, so it cannot wrap a sensitive key.

// The 3.2 functions are reached through the raw function list (no safe binding exists).
#![allow(unsafe_code)]

mod common;

use anyhow::{Context as _, Result, bail, ensure};
use aws_lc_rs::kem;
use aws_lc_rs::signature::{self, KeyPair as _};
use caas_vsm_proto::v32::*;
use common::*;
use cryptoki_sys::*;
use std::ffi::c_void;
use std::ptr::{null, null_mut};

type Fp<A> = Option<A>;

/// CK_FUNCTION_LIST_3_2 up to the two 3.2 functions used here (`pkcs11.h` 3.2 l. 209).
#[repr(C)]
#[allow(non_snake_case)]
struct List32 {
    base: CK_FUNCTION_LIST_3_0,
    C_EncapsulateKey: Fp<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut CK_MECHANISM,
            CK_OBJECT_HANDLE,
            *mut CK_ATTRIBUTE,
            CK_ULONG,
            *mut u8,
            *mut CK_ULONG,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
    C_DecapsulateKey: Fp<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut CK_MECHANISM,
            CK_OBJECT_HANDLE,
            *mut CK_ATTRIBUTE,
            CK_ULONG,
            *mut u8,
            CK_ULONG,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
    C_VerifySignatureInit: Fp<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut CK_MECHANISM,
            CK_OBJECT_HANDLE,
            *mut u8,
            CK_ULONG,
        ) -> CK_RV,
    >,
    C_VerifySignature: Fp<unsafe extern "C" fn(CK_SESSION_HANDLE, *mut u8, CK_ULONG) -> CK_RV>,
    C_VerifySignatureUpdate:
        Fp<unsafe extern "C" fn(CK_SESSION_HANDLE, *mut u8, CK_ULONG) -> CK_RV>,
    C_VerifySignatureFinal: Fp<unsafe extern "C" fn(CK_SESSION_HANDLE) -> CK_RV>,
}

/// CK_SIGN_ADDITIONAL_CONTEXT (`pkcs11t.h` 3.2 l. 2708).
#[repr(C)]
#[allow(non_snake_case)]
struct SignContext {
    hedgeVariant: CK_ULONG,
    pContext: *const u8,
    ulContextLen: CK_ULONG,
}

/// A template attribute value, kept alive while the C template points to it.
enum V {
    U(CK_ULONG),
    B(bool),
    Bytes(Vec<u8>),
}

struct Tmpl {
    vals: Vec<(u64, V)>,
    bools: Vec<u8>,
}

impl Tmpl {
    fn new(vals: Vec<(u64, V)>) -> Self {
        let bools = vals
            .iter()
            .map(|(_, v)| matches!(v, V::B(true)) as u8)
            .collect();
        Self { vals, bools }
    }

    fn c(&mut self) -> Vec<CK_ATTRIBUTE> {
        let mut out = Vec::new();
        for (i, (t, v)) in self.vals.iter_mut().enumerate() {
            let (p, l): (*mut c_void, usize) = match v {
                V::U(u) => (u as *mut CK_ULONG as *mut c_void, 8),
                V::B(_) => (&mut self.bools[i] as *mut u8 as *mut c_void, 1),
                V::Bytes(b) => (b.as_mut_ptr() as *mut c_void, b.len()),
            };
            out.push(CK_ATTRIBUTE {
                type_: *t as CK_ULONG,
                pValue: p,
                ulValueLen: l as CK_ULONG,
            });
        }
        out
    }
}

/// The module, loaded with dlopen, and a logged-in R/W user session.
struct P11 {
    l: &'static List32,
    l30: &'static CK_FUNCTION_LIST_3_0,
    s: CK_SESSION_HANDLE,
    get_interface_list: unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV,
    get_interface:
        unsafe extern "C" fn(*mut u8, *mut CK_VERSION, *mut *mut CK_INTERFACE, CK_FLAGS) -> CK_RV,
}

fn ck(rv: CK_RV, what: &str) -> Result<()> {
    if rv == CKR_OK {
        Ok(())
    } else {
        bail!("{what}: rv {rv:#x}")
    }
}

fn want(rv: CK_RV, want: CK_RV, what: &str) -> Result<()> {
    ensure!(rv == want, "{what}: want {want:#x}, got {rv:#x}");
    Ok(())
}

impl P11 {
    fn load() -> Result<Self> {
        let path = std::ffi::CString::new(module()?.to_string_lossy().as_bytes())?;
        // SAFETY: loading the module built by this workspace; symbols are PKCS#11 entry
        // points with the declared signatures.
        unsafe {
            let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
            ensure!(!h.is_null(), "dlopen");
            let sym = |n: &str| -> Result<*mut c_void> {
                let n = std::ffi::CString::new(n)?;
                let p = libc::dlsym(h, n.as_ptr());
                ensure!(!p.is_null(), "dlsym {n:?}");
                Ok(p)
            };
            let get_interface: unsafe extern "C" fn(
                *mut u8,
                *mut CK_VERSION,
                *mut *mut CK_INTERFACE,
                CK_FLAGS,
            ) -> CK_RV = std::mem::transmute(sym("C_GetInterface")?);
            let get_interface_list: unsafe extern "C" fn(
                *mut CK_INTERFACE,
                *mut CK_ULONG,
            ) -> CK_RV = std::mem::transmute(sym("C_GetInterfaceList")?);
            let mut name = *b"PKCS 11\0";
            let mut ver = CK_VERSION { major: 3, minor: 2 };
            let mut i: *mut CK_INTERFACE = null_mut();
            ck(
                get_interface(name.as_mut_ptr(), &mut ver, &mut i, 0),
                "C_GetInterface 3.2",
            )?;
            let l = &*((*i).pFunctionList as *const List32);
            let l30 = &l.base;
            ensure!(
                (l30.version.major, l30.version.minor) == (3, 2),
                "3.2 list version"
            );
            let init = CK_C_INITIALIZE_ARGS {
                CreateMutex: None,
                DestroyMutex: None,
                LockMutex: None,
                UnlockMutex: None,
                flags: CKF_OS_LOCKING_OK,
                pReserved: null_mut(),
            };
            ck(
                l30.C_Initialize.context("C_Initialize")?(&init as *const _ as *mut c_void),
                "C_Initialize",
            )?;
            let mut s = 0;
            ck(
                l30.C_OpenSession.context("open")?(
                    0,
                    CKF_SERIAL_SESSION | CKF_RW_SESSION,
                    null_mut(),
                    None,
                    &mut s,
                ),
                "C_OpenSession",
            )?;
            let mut pin = USER_PIN.as_bytes().to_vec();
            ck(
                l30.C_Login.context("login")?(s, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG),
                "C_Login",
            )?;
            Ok(Self {
                l,
                l30,
                s,
                get_interface_list,
                get_interface,
            })
        }
    }

    fn keypair(
        &self,
        mech: u64,
        set: u64,
        extra_pub: Vec<(u64, V)>,
    ) -> (CK_RV, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
        let mut m = CK_MECHANISM {
            mechanism: mech as CK_ULONG,
            pParameter: null_mut(),
            ulParameterLen: 0,
        };
        let mut pt = vec![
            (CKA_PARAMETER_SET, V::U(set as CK_ULONG)),
            (CKA_TOKEN, V::B(false)),
        ];
        pt.extend(extra_pub);
        let mut pt = Tmpl::new(pt);
        let mut st = Tmpl::new(vec![(CKA_TOKEN, V::B(false))]);
        let (mut pc, mut sc) = (pt.c(), st.c());
        let (mut pubk, mut privk) = (0, 0);
        // SAFETY: valid mechanism, templates and out pointers.
        let rv = unsafe {
            self.l30.C_GenerateKeyPair.unwrap_unchecked()(
                self.s,
                &mut m,
                pc.as_mut_ptr(),
                pc.len() as CK_ULONG,
                sc.as_mut_ptr(),
                sc.len() as CK_ULONG,
                &mut pubk,
                &mut privk,
            )
        };
        (rv, pubk, privk)
    }

    /// One attribute value (CKR_* on failure).
    fn attr(&self, o: CK_OBJECT_HANDLE, ty: u64) -> Result<Vec<u8>, CK_RV> {
        let mut a = CK_ATTRIBUTE {
            type_: ty as CK_ULONG,
            pValue: null_mut(),
            ulValueLen: 0,
        };
        // SAFETY: length query, then a buffer of that length.
        unsafe {
            let f = self.l30.C_GetAttributeValue.unwrap_unchecked();
            let rv = f(self.s, o, &mut a, 1);
            if rv != CKR_OK {
                return Err(rv);
            }
            let mut buf = vec![0u8; a.ulValueLen as usize];
            a.pValue = buf.as_mut_ptr() as *mut c_void;
            let rv = f(self.s, o, &mut a, 1);
            if rv != CKR_OK {
                return Err(rv);
            }
            Ok(buf)
        }
    }

    fn create(&self, vals: Vec<(u64, V)>) -> (CK_RV, CK_OBJECT_HANDLE) {
        let mut t = Tmpl::new(vals);
        let mut c = t.c();
        let mut h = 0;
        // SAFETY: valid template.
        let rv = unsafe {
            self.l30.C_CreateObject.unwrap_unchecked()(
                self.s,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                &mut h,
            )
        };
        (rv, h)
    }

    fn sign(
        &self,
        mech: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        msg: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        // SAFETY: valid mechanism, data and buffers.
        unsafe {
            let rv = self.l30.C_SignInit.unwrap_unchecked()(self.s, mech, key);
            if rv != CKR_OK {
                return Err(rv);
            }
            let mut len: CK_ULONG = 0;
            let f = self.l30.C_Sign.unwrap_unchecked();
            let rv = f(
                self.s,
                msg.as_ptr() as *mut u8,
                msg.len() as CK_ULONG,
                null_mut(),
                &mut len,
            );
            if rv != CKR_OK {
                return Err(rv);
            }
            let mut sig = vec![0u8; len as usize];
            let rv = f(
                self.s,
                msg.as_ptr() as *mut u8,
                msg.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut len,
            );
            if rv != CKR_OK {
                return Err(rv);
            }
            sig.truncate(len as usize);
            Ok(sig)
        }
    }

    fn verify(&self, key: CK_OBJECT_HANDLE, msg: &[u8], sig: &[u8]) -> CK_RV {
        let mut m = mech(CKM_ML_DSA);
        // SAFETY: valid mechanism and buffers.
        unsafe {
            let rv = self.l30.C_VerifyInit.unwrap_unchecked()(self.s, &mut m, key);
            if rv != CKR_OK {
                return rv;
            }
            self.l30.C_Verify.unwrap_unchecked()(
                self.s,
                msg.as_ptr() as *mut u8,
                msg.len() as CK_ULONG,
                sig.as_ptr() as *mut u8,
                sig.len() as CK_ULONG,
            )
        }
    }

    /// C_EncapsulateKey with a length query first: (ciphertext, new key).
    fn encapsulate(
        &self,
        public: CK_OBJECT_HANDLE,
        vals: Vec<(u64, V)>,
    ) -> Result<(Vec<u8>, CK_OBJECT_HANDLE), CK_RV> {
        let mut m = mech(CKM_ML_KEM);
        let mut t = Tmpl::new(vals);
        let mut c = t.c();
        let f = self.l.C_EncapsulateKey.ok_or(CKR_GENERAL_ERROR)?;
        let mut len: CK_ULONG = 0;
        let mut h: CK_OBJECT_HANDLE = 0;
        // SAFETY: valid arguments; NULL ciphertext is the length query.
        unsafe {
            let rv = f(
                self.s,
                &mut m,
                public,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                null_mut(),
                &mut len,
                &mut h,
            );
            if rv != CKR_OK {
                return Err(rv);
            }
            let mut ct = vec![0u8; len as usize];
            let rv = f(
                self.s,
                &mut m,
                public,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                ct.as_mut_ptr(),
                &mut len,
                &mut h,
            );
            if rv != CKR_OK {
                return Err(rv);
            }
            ct.truncate(len as usize);
            Ok((ct, h))
        }
    }

    fn decapsulate(
        &self,
        private: CK_OBJECT_HANDLE,
        ct: &[u8],
        vals: Vec<(u64, V)>,
    ) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut m = mech(CKM_ML_KEM);
        let mut t = Tmpl::new(vals);
        let mut c = t.c();
        let f = self.l.C_DecapsulateKey.ok_or(CKR_GENERAL_ERROR)?;
        let mut h: CK_OBJECT_HANDLE = 0;
        let mut ct = ct.to_vec();
        // SAFETY: valid arguments.
        let rv = unsafe {
            f(
                self.s,
                &mut m,
                private,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                ct.as_mut_ptr(),
                ct.len() as CK_ULONG,
                &mut h,
            )
        };
        if rv == CKR_OK { Ok(h) } else { Err(rv) }
    }
}

fn mech(m: u64) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m as CK_ULONG,
        pParameter: null_mut(),
        ulParameterLen: 0,
    }
}

fn readable_secret(kt: u64) -> Vec<(u64, V)> {
    vec![
        (CKA_CLASS, V::U(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, V::U(kt as CK_ULONG)),
        (CKA_SENSITIVE, V::B(false)),
        (CKA_EXTRACTABLE, V::B(true)),
    ]
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

fn start() -> Result<(Dom, P11)> {
    let dir = child_dir().context("child dir")?;
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "pqc", SO_PIN, USER_PIN)?;
    Ok((dom, P11::load()?))
}

/// ML-DSA-44/65/87 key pairs generated in the VSM: the signature over a message verifies
/// with aws-lc-rs outside the domain (and with C_Verify inside), a changed message does
/// not, the private key's value is not readable, and the key use is audited.
#[test]
fn ml_dsa_signatures_made_in_the_vsm_verify_with_aws_lc_outside() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child("ml_dsa_signatures_made_in_the_vsm_verify_with_aws_lc_outside");
    }
    let (dom, p) = start()?;
    let msg = b"post-quantum message signed inside the crypto domain";
    for (set, alg, sig_len) in [
        (CKP_ML_DSA_44, &signature::ML_DSA_44, 2420),
        (CKP_ML_DSA_65, &signature::ML_DSA_65, 3309),
        (CKP_ML_DSA_87, &signature::ML_DSA_87, 4627),
    ] {
        let (rv, pubk, privk) = p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, set, vec![]);
        ck(rv, "ML-DSA C_GenerateKeyPair")?;
        let pk = p
            .attr(pubk, CKA_VALUE)
            .map_err(|rv| anyhow::anyhow!("pub CKA_VALUE {rv:#x}"))?;
        ensure!(
            p.attr(privk, CKA_PARAMETER_SET) == Ok(set.to_le_bytes().to_vec()),
            "private CKA_PARAMETER_SET"
        );
        want(
            p.attr(privk, CKA_VALUE).err().unwrap_or(CKR_OK),
            CKR_ATTRIBUTE_SENSITIVE,
            "private CKA_VALUE",
        )?;
        // No parameter, and CK_SIGN_ADDITIONAL_CONTEXT asking for a hedged signature.
        let sig = p
            .sign(&mut mech(CKM_ML_DSA), privk, msg)
            .map_err(|rv| anyhow::anyhow!("sign {rv:#x}"))?;
        ensure!(sig.len() == sig_len, "signature length {}", sig.len());
        signature::UnparsedPublicKey::new(alg, &pk)
            .verify(msg, &sig)
            .map_err(|_| {
                anyhow::anyhow!("aws-lc-rs rejects the VSM's ML-DSA signature (set {set})")
            })?;
        ensure!(
            signature::UnparsedPublicKey::new(alg, &pk)
                .verify(b"another message", &sig)
                .is_err()
        );
        let ctx = SignContext {
            hedgeVariant: CKH_HEDGE_REQUIRED as CK_ULONG,
            pContext: null(),
            ulContextLen: 0,
        };
        let mut m = CK_MECHANISM {
            mechanism: CKM_ML_DSA as CK_ULONG,
            pParameter: &ctx as *const SignContext as *mut c_void,
            ulParameterLen: std::mem::size_of::<SignContext>() as CK_ULONG,
        };
        let sig2 = p
            .sign(&mut m, privk, msg)
            .map_err(|rv| anyhow::anyhow!("hedged sign {rv:#x}"))?;
        signature::UnparsedPublicKey::new(alg, &pk)
            .verify(msg, &sig2)
            .map_err(|_| anyhow::anyhow!("hedged signature rejected"))?;
        ensure!(sig != sig2, "hedged signatures of one message must differ");
        want(p.verify(pubk, msg, &sig), CKR_OK, "C_Verify")?;
        want(
            p.verify(pubk, b"x", &sig),
            CKR_SIGNATURE_INVALID,
            "C_Verify other message",
        )?;
        // A signature made outside verifies inside.
        let outside = signature::PqdsaKeyPair::generate(match set {
            CKP_ML_DSA_44 => &signature::ML_DSA_44_SIGNING,
            CKP_ML_DSA_65 => &signature::ML_DSA_65_SIGNING,
            _ => &signature::ML_DSA_87_SIGNING,
        })
        .map_err(|_| anyhow::anyhow!("generate"))?;
        let mut osig = vec![0u8; sig_len];
        outside
            .sign(msg, &mut osig)
            .map_err(|_| anyhow::anyhow!("sign outside"))?;
        let (rv, imported) = p.create(vec![
            (CKA_CLASS, V::U(CKO_PUBLIC_KEY)),
            (CKA_KEY_TYPE, V::U(CKK_ML_DSA as CK_ULONG)),
            (CKA_PARAMETER_SET, V::U(set as CK_ULONG)),
            (CKA_VALUE, V::Bytes(outside.public_key().as_ref().to_vec())),
        ]);
        ck(rv, "import ML-DSA public key")?;
        want(
            p.verify(imported, msg, &osig),
            CKR_OK,
            "C_Verify of an outside signature",
        )?;
    }
    audited(&dom, "C_Sign", CKM_ML_DSA, CKR_OK)
        .or_else(|_| audited(&dom, "C_SignInit", CKM_ML_DSA, CKR_OK))?;
    Ok(())
}

/// ML-KEM-512/768/1024: encapsulation outside (aws-lc-rs) to the VSM's public key and
/// C_DecapsulateKey inside give the same secret; C_EncapsulateKey inside to a public key
/// whose private half is outside gives the secret aws-lc-rs decapsulates.
#[test]
fn ml_kem_encapsulation_outside_decapsulation_inside_agree_and_the_reverse() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child(
            "ml_kem_encapsulation_outside_decapsulation_inside_agree_and_the_reverse",
        );
    }
    let (dom, p) = start()?;
    for (set, alg, ct_len) in [
        (CKP_ML_KEM_512, &kem::ML_KEM_512, 768),
        (CKP_ML_KEM_768, &kem::ML_KEM_768, 1088),
        (CKP_ML_KEM_1024, &kem::ML_KEM_1024, 1568),
    ] {
        let (rv, pubk, privk) = p.keypair(CKM_ML_KEM_KEY_PAIR_GEN, set, vec![]);
        ck(rv, "ML-KEM C_GenerateKeyPair")?;
        ensure!(
            p.attr(pubk, CKA_ENCAPSULATE) == Ok(vec![1]),
            "CKA_ENCAPSULATE default"
        );
        ensure!(
            p.attr(privk, CKA_DECAPSULATE) == Ok(vec![1]),
            "CKA_DECAPSULATE default"
        );
        let pk = p
            .attr(pubk, CKA_VALUE)
            .map_err(|rv| anyhow::anyhow!("pub value {rv:#x}"))?;
        // Outside encapsulates, the VSM decapsulates.
        let ek = kem::EncapsulationKey::new(alg, &pk).map_err(|_| anyhow::anyhow!("ek"))?;
        let (ct, ss) = ek
            .encapsulate()
            .map_err(|_| anyhow::anyhow!("encapsulate"))?;
        let k = p
            .decapsulate(privk, ct.as_ref(), readable_secret(CKK_GENERIC_SECRET))
            .map_err(|rv| anyhow::anyhow!("C_DecapsulateKey {rv:#x}"))?;
        ensure!(
            p.attr(k, CKA_VALUE) == Ok(ss.as_ref().to_vec()),
            "decapsulated secret differs (set {set})"
        );
        // The VSM encapsulates to an outside key pair, outside decapsulates.
        let dk = kem::DecapsulationKey::generate(alg).map_err(|_| anyhow::anyhow!("dk"))?;
        let opk = dk
            .encapsulation_key()
            .and_then(|e| e.key_bytes())
            .map_err(|_| anyhow::anyhow!("pk bytes"))?;
        let (rv, imported) = p.create(vec![
            (CKA_CLASS, V::U(CKO_PUBLIC_KEY)),
            (CKA_KEY_TYPE, V::U(CKK_ML_KEM as CK_ULONG)),
            (CKA_PARAMETER_SET, V::U(set as CK_ULONG)),
            (CKA_VALUE, V::Bytes(opk.as_ref().to_vec())),
        ]);
        ck(rv, "import ML-KEM public key")?;
        let (ct, k) = p
            .encapsulate(imported, readable_secret(CKK_GENERIC_SECRET))
            .map_err(|rv| anyhow::anyhow!("C_EncapsulateKey {rv:#x}"))?;
        ensure!(ct.len() == ct_len, "ciphertext length {}", ct.len());
        let ss = dk
            .decapsulate(kem::Ciphertext::from(&ct[..]))
            .map_err(|_| anyhow::anyhow!("decapsulate outside"))?;
        ensure!(
            p.attr(k, CKA_VALUE) == Ok(ss.as_ref().to_vec()),
            "encapsulated secret differs (set {set})"
        );
        // The VSM to itself: an AES key on both sides, equal values.
        let aes = |len: CK_ULONG| {
            let mut t = readable_secret(CKK_AES);
            t.push((CKA_VALUE_LEN, V::U(len)));
            t
        };
        let (ct, a) = p
            .encapsulate(pubk, aes(16))
            .map_err(|rv| anyhow::anyhow!("self encaps {rv:#x}"))?;
        let b = p
            .decapsulate(privk, &ct, aes(16))
            .map_err(|rv| anyhow::anyhow!("self decaps {rv:#x}"))?;
        let va = p
            .attr(a, CKA_VALUE)
            .map_err(|rv| anyhow::anyhow!("{rv:#x}"))?;
        ensure!(
            va.len() == 16 && p.attr(b, CKA_VALUE) == Ok(va),
            "AES-128 from ML-KEM"
        );
    }
    audited(&dom, "C_DecapsulateKey", CKM_ML_KEM, CKR_OK)?;
    audited(&dom, "C_EncapsulateKey", CKM_ML_KEM, CKR_OK)?;
    Ok(())
}

/// Bad parameters get the PKCS#11 3.2 return values, and refusals by the key policy are
/// audited.
#[test]
fn pq_bad_parameters_are_refused_with_the_right_ckr() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child("pq_bad_parameters_are_refused_with_the_right_ckr");
    }
    let (dom, p) = start()?;
    want(
        p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, 4, vec![]).0,
        CKR_PARAMETER_SET_NOT_SUPPORTED,
        "ML-DSA set 4",
    )?;
    want(
        p.keypair(CKM_ML_KEM_KEY_PAIR_GEN, 0, vec![]).0,
        CKR_PARAMETER_SET_NOT_SUPPORTED,
        "ML-KEM set 0",
    )?;
    let (rv, dsa_pub, dsa_priv) = p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, CKP_ML_DSA_65, vec![]);
    ck(rv, "ML-DSA keygen")?;
    let (rv, kem_pub, kem_priv) = p.keypair(CKM_ML_KEM_KEY_PAIR_GEN, CKP_ML_KEM_768, vec![]);
    ck(rv, "ML-KEM keygen")?;
    // A context string or a deterministic signature cannot be honoured by aws-lc-rs.
    let ctx_bytes = *b"app-context";
    for (hedge, ctx) in [
        (CKH_HEDGE_PREFERRED, &ctx_bytes[..]),
        (CKH_DETERMINISTIC_REQUIRED, &[][..]),
        (7, &[][..]),
    ] {
        let c = SignContext {
            hedgeVariant: hedge as CK_ULONG,
            pContext: if ctx.is_empty() { null() } else { ctx.as_ptr() },
            ulContextLen: ctx.len() as CK_ULONG,
        };
        let mut m = CK_MECHANISM {
            mechanism: CKM_ML_DSA as CK_ULONG,
            pParameter: &c as *const SignContext as *mut c_void,
            ulParameterLen: std::mem::size_of::<SignContext>() as CK_ULONG,
        };
        want(
            p.sign(&mut m, dsa_priv, b"m").err().unwrap_or(CKR_OK),
            CKR_MECHANISM_PARAM_INVALID,
            "ML-DSA param",
        )?;
    }
    // A parameter of the wrong size.
    let junk = [0u8; 3];
    let mut m = CK_MECHANISM {
        mechanism: CKM_ML_DSA as CK_ULONG,
        pParameter: junk.as_ptr() as *mut c_void,
        ulParameterLen: 3,
    };
    want(
        p.sign(&mut m, dsa_priv, b"m").err().unwrap_or(CKR_OK),
        CKR_MECHANISM_PARAM_INVALID,
        "short param",
    )?;
    // HashML-DSA is not served; ML-DSA with an ML-KEM key or an EC mechanism with ML-DSA.
    want(
        p.sign(&mut mech(CKM_HASH_ML_DSA), dsa_priv, b"m")
            .err()
            .unwrap_or(CKR_OK),
        CKR_MECHANISM_INVALID,
        "HashML-DSA",
    )?;
    want(
        p.sign(&mut mech(CKM_ML_DSA), kem_priv, b"m")
            .err()
            .unwrap_or(CKR_OK),
        CKR_KEY_TYPE_INCONSISTENT,
        "ML-DSA with ML-KEM key",
    )?;
    want(
        p.sign(&mut mech(CKM_ECDSA), dsa_priv, b"m")
            .err()
            .unwrap_or(CKR_OK),
        CKR_KEY_TYPE_INCONSISTENT,
        "ECDSA with ML-DSA key",
    )?;
    // Encapsulation with the wrong key, too long a secret, a truncated ciphertext.
    want(
        p.encapsulate(dsa_pub, readable_secret(CKK_GENERIC_SECRET))
            .err()
            .unwrap_or(CKR_OK),
        CKR_KEY_TYPE_INCONSISTENT,
        "encapsulate to ML-DSA key",
    )?;
    let mut long = readable_secret(CKK_GENERIC_SECRET);
    long.push((CKA_VALUE_LEN, V::U(33)));
    want(
        p.encapsulate(kem_pub, long).err().unwrap_or(CKR_OK),
        CKR_TEMPLATE_INCONSISTENT,
        "33-byte secret",
    )?;
    let (ct, _) = p
        .encapsulate(kem_pub, readable_secret(CKK_GENERIC_SECRET))
        .map_err(|rv| anyhow::anyhow!("{rv:#x}"))?;
    want(
        p.decapsulate(kem_priv, &ct[1..], readable_secret(CKK_GENERIC_SECRET))
            .err()
            .unwrap_or(CKR_OK),
        CKR_WRAPPED_KEY_LEN_RANGE,
        "short ciphertext",
    )?;
    want(
        p.decapsulate(kem_pub, &ct, readable_secret(CKK_GENERIC_SECRET))
            .err()
            .unwrap_or(CKR_OK),
        CKR_KEY_TYPE_INCONSISTENT,
        "decapsulate with public key",
    )?;
    // A public key without CKA_ENCAPSULATE is refused, and the refusal is audited.
    let (rv, no_encaps, _) = p.keypair(
        CKM_ML_KEM_KEY_PAIR_GEN,
        CKP_ML_KEM_512,
        vec![(CKA_ENCAPSULATE, V::B(false))],
    );
    ck(rv, "keygen without CKA_ENCAPSULATE")?;
    want(
        p.encapsulate(no_encaps, readable_secret(CKK_GENERIC_SECRET))
            .err()
            .unwrap_or(CKR_OK),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "CKA_ENCAPSULATE false",
    )?;
    audited(
        &dom,
        "C_EncapsulateKey",
        CKM_ML_KEM,
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    )?;
    // An imported private key with a value that is not a key of its set.
    let (rv, _) = p.create(vec![
        (CKA_CLASS, V::U(CKO_PRIVATE_KEY)),
        (CKA_KEY_TYPE, V::U(CKK_ML_KEM as CK_ULONG)),
        (CKA_PARAMETER_SET, V::U(CKP_ML_KEM_768 as CK_ULONG)),
        (CKA_VALUE, V::Bytes(vec![7u8; 100])),
    ]);
    want(rv, CKR_ATTRIBUTE_VALUE_INVALID, "bad ML-KEM private value")?;
    Ok(())
}

/// Attack: whoever holds the user PIN encapsulates to a public key whose private half they
/// hold outside (or encapsulates outside to the token's own public key and decapsulates
/// inside), so they know the new key's value. If that key counted as "generated in the
/// token, never extractable", the wrap policy would let it wrap a sensitive key, and the
/// attacker would open the wrap outside with the known value. The key is never CKA_LOCAL /
/// CKA_ALWAYS_SENSITIVE / CKA_NEVER_EXTRACTABLE, so the wrap is refused and audited.
#[test]
fn kem_secret_known_outside_cannot_wrap_a_sensitive_key() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child("kem_secret_known_outside_cannot_wrap_a_sensitive_key");
    }
    let (dom, p) = start()?;
    let dk =
        kem::DecapsulationKey::generate(&kem::ML_KEM_768).map_err(|_| anyhow::anyhow!("dk"))?;
    let opk = dk
        .encapsulation_key()
        .and_then(|e| e.key_bytes())
        .map_err(|_| anyhow::anyhow!("pk"))?;
    let (rv, attacker_pub) = p.create(vec![
        (CKA_CLASS, V::U(CKO_PUBLIC_KEY)),
        (CKA_KEY_TYPE, V::U(CKK_ML_KEM as CK_ULONG)),
        (CKA_PARAMETER_SET, V::U(CKP_ML_KEM_768 as CK_ULONG)),
        (CKA_VALUE, V::Bytes(opk.as_ref().to_vec())),
    ]);
    ck(rv, "import attacker public key")?;
    let kek_template = || {
        vec![
            (CKA_CLASS, V::U(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, V::U(CKK_AES)),
            (CKA_VALUE_LEN, V::U(32)),
            (CKA_SENSITIVE, V::B(true)),
            (CKA_EXTRACTABLE, V::B(false)),
            (CKA_WRAP, V::B(true)),
            (CKA_UNWRAP, V::B(true)),
        ]
    };
    let (_, kek1) = p
        .encapsulate(attacker_pub, kek_template())
        .map_err(|rv| anyhow::anyhow!("encaps {rv:#x}"))?;
    // The other direction: the attacker encapsulates outside to the token's key.
    let (rv, vsm_pub, vsm_priv) = p.keypair(CKM_ML_KEM_KEY_PAIR_GEN, CKP_ML_KEM_768, vec![]);
    ck(rv, "keygen")?;
    let pk = p
        .attr(vsm_pub, CKA_VALUE)
        .map_err(|rv| anyhow::anyhow!("{rv:#x}"))?;
    let (ct, _) = kem::EncapsulationKey::new(&kem::ML_KEM_768, &pk)
        .map_err(|_| anyhow::anyhow!("ek"))?
        .encapsulate()
        .map_err(|_| anyhow::anyhow!("encapsulate outside"))?;
    let kek2 = p
        .decapsulate(vsm_priv, ct.as_ref(), kek_template())
        .map_err(|rv| anyhow::anyhow!("decaps {rv:#x}"))?;
    // A sensitive, extractable target key generated in the token.
    let mut m = mech(CKM_AES_KEY_GEN);
    let mut t = Tmpl::new(vec![
        (CKA_VALUE_LEN, V::U(32)),
        (CKA_SENSITIVE, V::B(true)),
        (CKA_EXTRACTABLE, V::B(true)),
        (CKA_ENCRYPT, V::B(true)),
    ]);
    let mut c = t.c();
    let mut target = 0;
    // SAFETY: valid arguments.
    ck(
        unsafe {
            p.l30.C_GenerateKey.unwrap_unchecked()(
                p.s,
                &mut m,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                &mut target,
            )
        },
        "target key",
    )?;
    for kek in [kek1, kek2] {
        for a in [CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE] {
            ensure!(
                p.attr(kek, a) == Ok(vec![0]),
                "attribute {a:#x} of a KEM-made key must be false"
            );
        }
        for wrap_mech in [
            caas_domc::wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS,
            CKM_AES_KEY_WRAP_KWP,
        ] {
            let mut wm = mech(wrap_mech);
            let mut len: CK_ULONG = 0;
            // SAFETY: valid arguments; length query.
            let rv = unsafe {
                p.l30.C_WrapKey.unwrap_unchecked()(p.s, &mut wm, kek, target, null_mut(), &mut len)
            };
            want(
                rv,
                CKR_KEY_NOT_WRAPPABLE,
                "wrap a sensitive key under a KEM-made key",
            )?;
        }
    }
    audited(
        &dom,
        "C_WrapKey",
        caas_domc::wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS,
        CKR_KEY_NOT_WRAPPABLE,
    )?;
    Ok(())
}

/// C_VerifySignature* (PKCS#11 3.2), single- and multi-part, with an ML-DSA signature made
/// in the VSM: the right signature verifies, a changed one does not, and the operation
/// ends either way.
#[test]
fn verify_signature_3_2_single_and_multi_part() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child("verify_signature_3_2_single_and_multi_part");
    }
    let (_dom, p) = start()?;
    let (rv, pubk, privk) = p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, CKP_ML_DSA_44, vec![]);
    ck(rv, "keygen")?;
    let mut msg = b"verified with the 3.2 signature-first functions".to_vec();
    let sig = p
        .sign(&mut mech(CKM_ML_DSA), privk, &msg)
        .map_err(|rv| anyhow::anyhow!("{rv:#x}"))?;
    let mut bad = sig.clone();
    bad[7] ^= 1;
    let (init, single, update, fin) = (
        p.l.C_VerifySignatureInit.context("init")?,
        p.l.C_VerifySignature.context("single")?,
        p.l.C_VerifySignatureUpdate.context("update")?,
        p.l.C_VerifySignatureFinal.context("final")?,
    );
    let n = msg.len() as CK_ULONG;
    // SAFETY: valid arguments throughout.
    unsafe {
        want(
            single(p.s, msg.as_mut_ptr(), n),
            CKR_OPERATION_NOT_INITIALIZED,
            "no init",
        )?;
        for (s, expect) in [(&sig, CKR_OK), (&bad, CKR_SIGNATURE_INVALID)] {
            let mut s = s.clone();
            let mut m = mech(CKM_ML_DSA);
            ck(
                init(p.s, &mut m, pubk, s.as_mut_ptr(), s.len() as CK_ULONG),
                "init",
            )?;
            want(
                init(p.s, &mut m, pubk, s.as_mut_ptr(), s.len() as CK_ULONG),
                CKR_OPERATION_ACTIVE,
                "init twice",
            )?;
            want(
                single(p.s, msg.as_mut_ptr(), n),
                expect,
                "C_VerifySignature",
            )?;
            want(
                single(p.s, msg.as_mut_ptr(), n),
                CKR_OPERATION_NOT_INITIALIZED,
                "ended",
            )?;
            ck(
                init(p.s, &mut m, pubk, s.as_mut_ptr(), s.len() as CK_ULONG),
                "init",
            )?;
            let (a, b) = msg.split_at_mut(10);
            ck(update(p.s, a.as_mut_ptr(), a.len() as CK_ULONG), "update")?;
            ck(update(p.s, b.as_mut_ptr(), b.len() as CK_ULONG), "update")?;
            want(fin(p.s), expect, "C_VerifySignatureFinal")?;
            want(fin(p.s), CKR_OPERATION_NOT_INITIALIZED, "ended")?;
        }
        // A private key has no CKA_VERIFY.
        let mut s = sig.clone();
        let mut m = mech(CKM_ML_DSA);
        want(
            init(p.s, &mut m, privk, s.as_mut_ptr(), s.len() as CK_ULONG),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "private key (no CKA_VERIFY)",
        )?;
    }
    Ok(())
}

/// PKCS#11 3.0/3.2 interfaces: C_GetInterfaceList offers the 3.2, 3.0 and 2.40 lists,
/// C_GetInterface finds each by version and refuses others, C_LoginUser logs in,
/// C_SessionCancel ends an active operation (on both the domain path and the module's
/// recorded one), message-based signing answers CKR_FUNCTION_NOT_SUPPORTED, and
/// C_GetMechanismInfo of CKM_ML_KEM says encapsulate/decapsulate.
#[test]
fn interfaces_3_0_and_3_2_login_user_and_session_cancel() -> Result<()> {
    if child_dir().is_none() {
        return run_in_child("interfaces_3_0_and_3_2_login_user_and_session_cancel");
    }
    let (_dom, p) = start()?;
    let mut n: CK_ULONG = 0;
    // SAFETY: count query, then a buffer of that many interfaces.
    let versions: Vec<(u8, u8)> = unsafe {
        ck((p.get_interface_list)(null_mut(), &mut n), "count")?;
        let mut v: Vec<CK_INTERFACE> = (0..n)
            .map(|_| CK_INTERFACE {
                pInterfaceName: null_mut(),
                pFunctionList: null_mut(),
                flags: 0,
            })
            .collect();
        ck((p.get_interface_list)(v.as_mut_ptr(), &mut n), "list")?;
        v.iter()
            .map(|i| {
                let name = std::ffi::CStr::from_ptr(i.pInterfaceName as *const std::ffi::c_char);
                assert_eq!(name.to_bytes(), b"PKCS 11");
                let ver = *(i.pFunctionList as *const CK_VERSION);
                (ver.major, ver.minor)
            })
            .collect()
    };
    ensure!(
        versions == [(3, 2), (3, 0), (2, 40)],
        "interfaces {versions:?}"
    );
    for (want_v, rv) in [
        ((3, 0), CKR_OK),
        ((2, 40), CKR_OK),
        ((3, 1), CKR_ARGUMENTS_BAD),
    ] {
        let mut ver = CK_VERSION {
            major: want_v.0,
            minor: want_v.1,
        };
        let mut i: *mut CK_INTERFACE = null_mut();
        // SAFETY: valid arguments.
        let got = unsafe { (p.get_interface)(null_mut(), &mut ver, &mut i, 0) };
        want(got, rv, "C_GetInterface")?;
        if rv == CKR_OK {
            // SAFETY: a returned interface points to a static list.
            let v = unsafe { *((*i).pFunctionList as *const CK_VERSION) };
            ensure!((v.major, v.minor) == want_v);
        }
    }
    let mut i: *mut CK_INTERFACE = null_mut();
    // SAFETY: valid arguments; the default interface is the newest.
    unsafe {
        ck(
            (p.get_interface)(null_mut(), null_mut(), &mut i, 0),
            "default",
        )?;
        let v = *((*i).pFunctionList as *const CK_VERSION);
        ensure!((v.major, v.minor) == (3, 2), "default interface");
        let mut other = *b"Vendor\0";
        want(
            (p.get_interface)(other.as_mut_ptr(), null_mut(), &mut i, 0),
            CKR_ARGUMENTS_BAD,
            "unknown name",
        )?;
        want(
            (p.get_interface)(null_mut(), null_mut(), &mut i, CKF_INTERFACE_FORK_SAFE),
            CKR_ARGUMENTS_BAD,
            "fork-safe asked",
        )?;
    }
    let l = p.l30;
    // SAFETY: valid arguments throughout.
    unsafe {
        // C_LoginUser in a fresh session of a second application state: logout first.
        ck(l.C_Logout.unwrap_unchecked()(p.s), "logout")?;
        let mut pin = USER_PIN.as_bytes().to_vec();
        let mut user = *b"anyone";
        ck(
            l.C_LoginUser.unwrap_unchecked()(
                p.s,
                CKU_USER,
                pin.as_mut_ptr(),
                pin.len() as CK_ULONG,
                user.as_mut_ptr(),
                user.len() as CK_ULONG,
            ),
            "C_LoginUser",
        )?;
        let mut bad = b"wrong-pin".to_vec();
        ck(l.C_Logout.unwrap_unchecked()(p.s), "logout")?;
        want(
            l.C_LoginUser.unwrap_unchecked()(
                p.s,
                CKU_USER,
                bad.as_mut_ptr(),
                bad.len() as CK_ULONG,
                user.as_mut_ptr(),
                user.len() as CK_ULONG,
            ),
            CKR_PIN_INCORRECT,
            "C_LoginUser wrong PIN",
        )?;
        ck(
            l.C_LoginUser.unwrap_unchecked()(
                p.s,
                CKU_USER,
                pin.as_mut_ptr(),
                pin.len() as CK_ULONG,
                null_mut(),
                0,
            ),
            "C_LoginUser no name",
        )?;
        // C_SessionCancel of a sign operation, first on the domain path, then on the
        // module's recorded one (the second C_SignInit of the same key is local).
        let (rv, _, k) = p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, CKP_ML_DSA_44, vec![]);
        ck(rv, "keygen")?;
        let msg = *b"m";
        for round in 0..2 {
            let mut m = mech(CKM_ML_DSA);
            ck(
                l.C_SignInit.unwrap_unchecked()(p.s, &mut m, k),
                "C_SignInit",
            )?;
            want(
                l.C_SignInit.unwrap_unchecked()(p.s, &mut m, k),
                CKR_OPERATION_ACTIVE,
                "second C_SignInit",
            )?;
            ck(
                l.C_SessionCancel.unwrap_unchecked()(p.s, CKF_SIGN),
                "C_SessionCancel",
            )?;
            let mut len: CK_ULONG = 0;
            want(
                l.C_Sign.unwrap_unchecked()(p.s, msg.as_ptr() as *mut u8, 1, null_mut(), &mut len),
                CKR_OPERATION_NOT_INITIALIZED,
                &format!("C_Sign after cancel, round {round}"),
            )?;
            // And the session works normally afterwards.
            p.sign(&mut mech(CKM_ML_DSA), k, &msg)
                .map_err(|rv| anyhow::anyhow!("sign after cancel {rv:#x}"))?;
        }
        ck(l.C_SessionCancel.unwrap_unchecked()(p.s, 0), "no flags")?;
        want(
            l.C_SignMessageBegin.unwrap_unchecked()(p.s, null_mut(), 0),
            CKR_FUNCTION_NOT_SUPPORTED,
            "C_SignMessageBegin",
        )?;
        let mut info = CK_MECHANISM_INFO {
            ulMinKeySize: 0,
            ulMaxKeySize: 0,
            flags: 0,
        };
        ck(
            l.C_GetMechanismInfo.unwrap_unchecked()(0, CKM_ML_KEM as CK_ULONG, &mut info),
            "info",
        )?;
        ensure!(
            info.flags & (CKF_ENCAPSULATE | CKF_DECAPSULATE) as CK_ULONG
                == (CKF_ENCAPSULATE | CKF_DECAPSULATE) as CK_ULONG
                && (info.ulMinKeySize, info.ulMaxKeySize) == (800, 1568),
            "ML-KEM info"
        );
        ck(
            l.C_GetMechanismInfo.unwrap_unchecked()(0, CKM_ML_DSA as CK_ULONG, &mut info),
            "info",
        )?;
        ensure!(
            info.flags & CKF_SIGN != 0 && (info.ulMinKeySize, info.ulMaxKeySize) == (1312, 2592),
            "ML-DSA info"
        );
    }
    Ok(())
}

/// ML-DSA-65 signatures per second through the module (one thread, one session, the fused
/// single-round-trip path) against aws-lc-rs in-process. A timing probe, not a check:
/// `cargo nextest run -p caas-domc --test pqc --run-ignored only ml_dsa_65_sign_rate --no-capture`.
#[test]
#[ignore = "timing probe"]
fn ml_dsa_65_sign_rate() -> Result<()> {
    if child_dir().is_none() {
        // As `run_in_child`, but the child must run this ignored test too.
        let tmp = tempfile::tempdir()?;
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["ml_dsa_65_sign_rate", "--exact", "--ignored", "--nocapture"])
            .env("CAAS_TEST_CHILD_DIR", tmp.path())
            .env("CAAS_PKCS11_SOCKET", tmp.path().join("domc.sock"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        ensure!(
            out.status.success() && text.contains("1 passed"),
            "child failed"
        );
        return Ok(());
    }
    let (_dom, p) = start()?;
    let (rv, _, k) = p.keypair(CKM_ML_DSA_KEY_PAIR_GEN, CKP_ML_DSA_65, vec![]);
    ck(rv, "keygen")?;
    let msg = [0x5au8; 32];
    let n = 500;
    let t = std::time::Instant::now();
    for _ in 0..n {
        p.sign(&mut mech(CKM_ML_DSA), k, &msg)
            .map_err(|rv| anyhow::anyhow!("{rv:#x}"))?;
    }
    let vsm = f64::from(n) / t.elapsed().as_secs_f64();
    let kp = signature::PqdsaKeyPair::generate(&signature::ML_DSA_65_SIGNING)
        .map_err(|_| anyhow::anyhow!("gen"))?;
    let mut sig = vec![0u8; 3309];
    let t = std::time::Instant::now();
    for _ in 0..n {
        kp.sign(&msg, &mut sig)
            .map_err(|_| anyhow::anyhow!("sign"))?;
    }
    let ceiling = f64::from(n) / t.elapsed().as_secs_f64();
    println!(
        "ML-DSA-65, 1 thread: VSM {vsm:.0} sig/s, aws-lc-rs in-process {ceiling:.0} sig/s ({:.2}x)",
        vsm / ceiling
    );
    Ok(())
}
