//! The C ABI: every PKCS#11 entry point, the static function list and the 3.0 interface
//! list. This is the only file with `unsafe` code: raw pointers from the caller are checked
//! for NULL and turned into slices/values by the small helpers below, then each call is
//! forwarded to the crypto domain. Every entry runs inside `catch_unwind`; a panic becomes
//! CKR_GENERAL_ERROR.

// CK_ULONG is `unsigned long`: u64 here, u32 on other ABIs. The explicit conversions keep
// the code portable even where they are identities.
#![allow(clippy::useless_conversion, clippy::unnecessary_cast)]

use crate::client::{Client, Config};
use crate::ops::{Delivery, Kind, Phase};
use caas_vsm_proto::attr::{self, AttrKind};
use caas_vsm_proto::v32;
use caas_vsm_proto::{
    Attr, AttrValue, Blob, Body, GcmMessageParams, MechParam, Mechanism, Request, Response, Secret,
};
use cryptoki_sys::*;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, RwLock};

type Rv = CK_RV;

/// CK_SIGN_ADDITIONAL_CONTEXT of PKCS#11 3.2 (`pkcs11t.h` 3.2 l. 2708-2712; not in
/// `cryptoki-sys` 0.4).
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(non_snake_case)]
struct SignAdditionalContext {
    hedgeVariant: CK_ULONG,
    pContext: *const u8,
    ulContextLen: CK_ULONG,
}

/// Forks this process has gone through, as seen by the children: bumped by a
/// `pthread_atfork` child handler, so a pool tells that it belongs to a parent process with
/// one atomic load instead of a `getpid` system call on every entry point (four per
/// signature). Registered by [`watch_forks`] before the first pool exists.
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn forked_child() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The fork generation of this process ([`FORKS`]), or `None` when the child handler could
/// not be registered (the pool then compares process ids, as before).
pub(crate) fn fork_generation() -> Option<u64> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: registers a child handler that only bumps an atomic (async-signal-safe, as
    // a handler run in a forked child must be). glibc's `pthread_atfork` (libc_nonshared)
    // passes this object's `__dso_handle`, so the handler is unregistered on `dlclose`.
    let ok = *REGISTERED
        .get_or_init(|| unsafe { libc::pthread_atfork(None, None, Some(forked_child)) } == 0);
    ok.then(|| FORKS.load(std::sync::atomic::Ordering::Relaxed))
}

/// The client of the current C_Initialize, shared by all threads (read lock only per call).
static STATE: RwLock<Option<Arc<Client>>> = RwLock::new(None);

const ULONG_SIZE: usize = std::mem::size_of::<CK_ULONG>();

fn client() -> Result<Arc<Client>, Rv> {
    STATE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .filter(|c| c.owned_by_this_process())
        .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

fn guard(f: impl FnOnce() -> Result<(), Rv>) -> Rv {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// Forgets every validated operation (after anything that may change a key's usability).
fn invalidate() {
    if let Ok(c) = client() {
        c.ops.invalidate();
    }
}

fn call_raw(req: &Request) -> Result<Response, Rv> {
    client()?.call(req)
}

fn call(req: &Request) -> Result<Body, Rv> {
    let r = call_raw(req)?;
    if r.rv != CKR_OK {
        return Err(r.rv);
    }
    Ok(r.body)
}

fn ulong(b: Body) -> Result<u64, Rv> {
    match b {
        Body::Ulong { value } => Ok(value),
        _ => Err(CKR_DEVICE_ERROR),
    }
}

fn to_ck(v: u64) -> Result<CK_ULONG, Rv> {
    CK_ULONG::try_from(v).map_err(|_| CKR_DEVICE_ERROR)
}

/// Borrows `len` bytes at `p` (NULL is allowed only for `len` 0).
///
/// # Safety
/// `p` must be NULL or point to `len` readable bytes that outlive the returned slice.
unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> Result<&'a [u8], Rv> {
    let len = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    if p.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: non-NULL and, per the caller's contract, valid for `len` bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Writes `v` to `p`.
///
/// # Safety
/// `p` must be NULL or valid for writing one `T`.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), Rv> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL and valid for writes per the caller's contract.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Reads a `T` from `p`.
///
/// # Safety
/// `p` must be NULL or valid for reading one `T`.
unsafe fn get<T: Copy>(p: *const T) -> Result<T, Rv> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL and valid for reads per the caller's contract.
    Ok(unsafe { p.read_unaligned() })
}

/// Converts one C attribute value to the canonical wire form.
fn canonical(ty: u64, v: &[u8]) -> Result<Vec<u8>, Rv> {
    let read_ulong = |c: &[u8]| -> Result<u64, Rv> {
        let a: [u8; ULONG_SIZE] = c.try_into().map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
        Ok(u64::from(CK_ULONG::from_ne_bytes(a)))
    };
    match attr::kind(ty) {
        AttrKind::Ulong => Ok(attr::ulong(read_ulong(v)?)),
        AttrKind::Bool if v.len() == 1 => Ok(v.to_vec()),
        AttrKind::Bool => Err(CKR_ATTRIBUTE_VALUE_INVALID),
        AttrKind::UlongArray => {
            if !v.len().is_multiple_of(ULONG_SIZE) {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            let mut out = Vec::with_capacity(v.len() / ULONG_SIZE * 8);
            for c in v.chunks_exact(ULONG_SIZE) {
                out.extend_from_slice(&attr::ulong(read_ulong(c)?));
            }
            Ok(out)
        }
        AttrKind::Bytes => Ok(v.to_vec()),
    }
}

/// Converts a canonical value back to the C form.
fn native(ty: u64, v: &[u8]) -> Vec<u8> {
    match attr::kind(ty) {
        AttrKind::Ulong | AttrKind::UlongArray => v
            .chunks_exact(8)
            .flat_map(|c| {
                let x = attr::as_ulong(c).unwrap_or(0);
                (x as CK_ULONG).to_ne_bytes()
            })
            .collect(),
        _ => v.to_vec(),
    }
}

/// Reads a template.
///
/// # Safety
/// `p` must be NULL or point to `n` valid CK_ATTRIBUTEs whose values are readable.
unsafe fn template(p: *const CK_ATTRIBUTE, n: CK_ULONG) -> Result<Vec<Attr>, Rv> {
    let n = usize::try_from(n).map_err(|_| CKR_ARGUMENTS_BAD)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: `p` points to `n` attributes per the caller's contract and i < n.
        let a = unsafe { p.add(i).read_unaligned() };
        // SAFETY: pValue/ulValueLen describe the attribute's value buffer.
        let v = unsafe { bytes(a.pValue as *const u8, a.ulValueLen) }
            .map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
        let ty = u64::from(a.type_);
        out.push(Attr {
            ty,
            value: Blob(canonical(ty, v)?),
        });
    }
    Ok(out)
}

/// Reads a CK_MECHANISM and its parameter.
///
/// # Safety
/// `p` must be NULL or point to a valid CK_MECHANISM whose parameter is readable.
unsafe fn mechanism(p: *const CK_MECHANISM) -> Result<Mechanism, Rv> {
    // SAFETY: forwarded contract.
    let m = unsafe { get(p)? };
    let mech = u64::from(m.mechanism);
    let plen = usize::try_from(m.ulParameterLen).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let pp = m.pParameter;
    let param = |size: usize| -> Result<(), Rv> {
        if pp.is_null() || plen != size {
            Err(CKR_MECHANISM_PARAM_INVALID)
        } else {
            Ok(())
        }
    };
    let param = match mech {
        CKM_AES_GCM => {
            param(std::mem::size_of::<CK_GCM_PARAMS>())?;
            // SAFETY: size checked; the caller passes a CK_GCM_PARAMS.
            let g = unsafe { (pp as *const CK_GCM_PARAMS).read_unaligned() };
            // SAFETY: the IV and AAD buffers are described by the params.
            let (iv, aad) = unsafe { (bytes(g.pIv, g.ulIvLen)?, bytes(g.pAAD, g.ulAADLen)?) };
            MechParam::Gcm {
                iv: Blob::from(iv),
                aad: Blob::from(aad),
                tag_bits: u64::from(g.ulTagBits),
            }
        }
        CKM_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS => {
            param(std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>())?;
            // SAFETY: size checked.
            let s = unsafe { (pp as *const CK_RSA_PKCS_PSS_PARAMS).read_unaligned() };
            MechParam::Pss {
                hash: u64::from(s.hashAlg),
                mgf: u64::from(s.mgf),
                salt_len: u64::from(s.sLen),
            }
        }
        CKM_RSA_PKCS_OAEP => {
            param(std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>())?;
            // SAFETY: size checked.
            let o = unsafe { (pp as *const CK_RSA_PKCS_OAEP_PARAMS).read_unaligned() };
            // SAFETY: the source data buffer is described by the params.
            let src = unsafe { bytes(o.pSourceData as *const u8, o.ulSourceDataLen)? };
            MechParam::Oaep {
                hash: u64::from(o.hashAlg),
                mgf: u64::from(o.mgf),
                source: u64::from(o.source),
                source_data: Blob::from(src),
            }
        }
        CKM_ECDH1_DERIVE => {
            param(std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>())?;
            // SAFETY: size checked.
            let e = unsafe { (pp as *const CK_ECDH1_DERIVE_PARAMS).read_unaligned() };
            // SAFETY: buffers described by the params.
            let (sd, pd) = unsafe {
                (
                    bytes(e.pSharedData, e.ulSharedDataLen)?,
                    bytes(e.pPublicData, e.ulPublicDataLen)?,
                )
            };
            MechParam::Ecdh {
                kdf: u64::from(e.kdf),
                shared_data: Blob::from(sd),
                public_data: Blob::from(pd),
            }
        }
        CKM_AES_CTR => {
            param(std::mem::size_of::<CK_AES_CTR_PARAMS>())?;
            // SAFETY: size checked; the caller passes a CK_AES_CTR_PARAMS.
            let c = unsafe { (pp as *const CK_AES_CTR_PARAMS).read_unaligned() };
            MechParam::Ctr {
                counter_bits: u64::from(c.ulCounterBits),
                cb: Blob(c.cb.to_vec()),
            }
        }
        CKM_AES_CMAC_GENERAL
        | CKM_SHA_1_HMAC_GENERAL
        | CKM_SHA224_HMAC_GENERAL
        | CKM_SHA256_HMAC_GENERAL
        | CKM_SHA384_HMAC_GENERAL
        | CKM_SHA512_HMAC_GENERAL => {
            param(std::mem::size_of::<CK_MAC_GENERAL_PARAMS>())?;
            // SAFETY: size checked; the caller passes a CK_MAC_GENERAL_PARAMS (a CK_ULONG).
            let len = unsafe { (pp as *const CK_MAC_GENERAL_PARAMS).read_unaligned() };
            MechParam::MacLen {
                len: u64::from(len),
            }
        }
        v32::CKM_ML_DSA if !pp.is_null() => {
            param(std::mem::size_of::<SignAdditionalContext>())?;
            // SAFETY: size checked; the caller passes a CK_SIGN_ADDITIONAL_CONTEXT.
            let c = unsafe { (pp as *const SignAdditionalContext).read_unaligned() };
            // SAFETY: the context buffer is described by the params.
            let ctx = unsafe { bytes(c.pContext, c.ulContextLen)? };
            MechParam::SignContext {
                hedge: u64::from(c.hedgeVariant),
                context: Blob::from(ctx),
            }
        }
        CKM_EDDSA if !pp.is_null() && plen == std::mem::size_of::<CK_EDDSA_PARAMS>() => {
            // SAFETY: size checked.
            let e = unsafe { (pp as *const CK_EDDSA_PARAMS).read_unaligned() };
            // SAFETY: context buffer described by the params.
            let ctx = unsafe { bytes(e.pContextData, e.ulContextDataLen)? };
            if e.phFlag == 0 && ctx.is_empty() {
                MechParam::None {}
            } else {
                MechParam::Bytes {
                    data: Blob::from(ctx),
                }
            }
        }
        _ => {
            // SAFETY: the parameter buffer is described by the mechanism.
            let b = unsafe { bytes(pp as *const u8, m.ulParameterLen)? };
            if b.is_empty() {
                MechParam::None {}
            } else {
                MechParam::Bytes {
                    data: Blob::from(b),
                }
            }
        }
    };
    Ok(Mechanism {
        mechanism: mech,
        param,
    })
}

/// Runs a request with an output buffer, implementing the length-query protocol.
///
/// # Safety
/// `out` must be NULL or valid for `*len` bytes; `len` must be valid.
unsafe fn out_data(
    make: impl FnOnce(Option<u64>) -> Request,
    out: *mut u8,
    len: *mut CK_ULONG,
) -> Result<(), Rv> {
    // SAFETY: forwarded contract.
    let cap = unsafe { get(len)? };
    let cap = if out.is_null() {
        None
    } else {
        Some(u64::from(cap))
    };
    let r = call_raw(&make(cap))?;
    let write = |data: &[u8]| -> Result<(), Rv> {
        let n = to_ck(data.len() as u64)?;
        match cap {
            None => {
                // SAFETY: `len` was checked readable/writable above.
                unsafe { put(len, n) }
            }
            Some(c) if (data.len() as u64) > c => {
                // SAFETY: as above.
                unsafe { put(len, n)? };
                Err(CKR_BUFFER_TOO_SMALL)
            }
            Some(_) => {
                // SAFETY: `out` holds at least `cap` >= data.len() bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
                // SAFETY: as above.
                unsafe { put(len, n) }
            }
        }
    };
    match (r.rv, r.body) {
        (CKR_OK | CKR_BUFFER_TOO_SMALL, Body::Len { len: l }) => {
            // SAFETY: `len` checked above.
            unsafe { put(len, to_ck(l)?)? };
            if r.rv == CKR_OK {
                Ok(())
            } else {
                Err(CKR_BUFFER_TOO_SMALL)
            }
        }
        (CKR_OK, Body::Data { data }) => write(&data.0),
        (CKR_OK, Body::SecretData { data }) => write(data.expose()),
        (CKR_OK, _) => Err(CKR_DEVICE_ERROR),
        (rv, _) => Err(rv),
    }
}

/// Writes a list of ulongs with the length-query protocol.
///
/// # Safety
/// `out` NULL or valid for `*count` elements; `count` valid.
unsafe fn out_ulongs(values: &[u64], out: *mut CK_ULONG, count: *mut CK_ULONG) -> Result<(), Rv> {
    // SAFETY: forwarded contract.
    let cap = unsafe { get(count)? };
    let n = to_ck(values.len() as u64)?;
    // SAFETY: `count` is valid.
    unsafe { put(count, n)? };
    if out.is_null() {
        return Ok(());
    }
    if u64::from(cap) < values.len() as u64 {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    for (i, v) in values.iter().enumerate() {
        // SAFETY: i < values.len() <= cap elements.
        unsafe { out.add(i).write_unaligned(to_ck(*v)?) };
    }
    Ok(())
}

fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn version(major: u8, minor: u8) -> CK_VERSION {
    CK_VERSION { major, minor }
}

macro_rules! export {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        /// # Safety
        /// Called by PKCS#11 applications with arguments valid per the PKCS#11 specification;
        /// NULL pointers are detected and reported.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            guard(move || $body)
        }
    };
}

export! {
    /// C_Initialize: connects the module to its crypto domain.
    fn C_Initialize(init_args: CK_VOID_PTR) {
        if !init_args.is_null() {
            // SAFETY: a non-NULL argument is a CK_C_INITIALIZE_ARGS per the specification.
            let a = unsafe { get(init_args as *const CK_C_INITIALIZE_ARGS)? };
            if !a.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let fns = [a.CreateMutex.is_some(), a.DestroyMutex.is_some(), a.LockMutex.is_some(), a.UnlockMutex.is_some()];
            if fns.iter().any(|x| *x) && !fns.iter().all(|x| *x) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if fns[0] && a.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        let mut st = STATE.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A forked child inherits the parent's state but must initialise its own.
        if st.as_ref().is_some_and(|c| c.owned_by_this_process()) {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let cfg = Config::from_env().map_err(|e| {
            eprintln!("libcaas_pkcs11: {e}");
            CKR_GENERAL_ERROR
        })?;
        let c = Client::new(cfg)?;
        c.warm_up();
        *st = Some(Arc::new(c));
        Ok(())
    }
}

export! {
    /// C_Finalize: drops all connections (the domain closes this application's sessions).
    fn C_Finalize(reserved: CK_VOID_PTR) {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        verify_signatures().clear();
        STATE
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|_| ())
            .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
    }
}

export! {
    /// C_GetInfo.
    fn C_GetInfo(info: CK_INFO_PTR) {
        client()?;
        let mut i = CK_INFO {
            cryptokiVersion: version(2, 40),
            manufacturerID: [0; 32],
            flags: 0,
            libraryDescription: [0; 32],
            libraryVersion: version(0, 1),
        };
        pad(&mut i.manufacturerID, "caas");
        pad(&mut i.libraryDescription, "caas VSM PKCS#11 module");
        // SAFETY: `info` is NULL or a CK_INFO to fill.
        unsafe { put(info, i) }
    }
}

export! {
    /// C_GetFunctionList.
    fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) {
        // SAFETY: `list` is NULL or a pointer to fill; FUNCTION_LIST is static and never
        // written through the returned pointer by conforming callers.
        unsafe { put(list, std::ptr::addr_of!(FUNCTION_LIST) as *mut CK_FUNCTION_LIST) }
    }
}

export! {
    /// C_GetSlotList.
    fn C_GetSlotList(token_present: CK_BBOOL, list: CK_SLOT_ID_PTR, count: CK_ULONG_PTR) {
        let Body::Ulongs { values } = call(&Request::GetSlotList { token_present: token_present != 0 })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        // SAFETY: forwarded pointers.
        unsafe { out_ulongs(&values, list, count) }
    }
}

export! {
    /// C_GetSlotInfo.
    fn C_GetSlotInfo(slot: CK_SLOT_ID, info: CK_SLOT_INFO_PTR) {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let Body::Slot { info: s } = call(&Request::GetSlotInfo { slot: u64::from(slot) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        let mut i = CK_SLOT_INFO {
            slotDescription: [0; 64],
            manufacturerID: [0; 32],
            flags: to_ck(s.flags)?,
            hardwareVersion: version(0, 1),
            firmwareVersion: version(0, 1),
        };
        pad(&mut i.slotDescription, &s.description);
        pad(&mut i.manufacturerID, &s.manufacturer);
        // SAFETY: checked non-NULL.
        unsafe { put(info, i) }
    }
}

export! {
    /// C_GetTokenInfo.
    fn C_GetTokenInfo(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let Body::Token { info: t } = call(&Request::GetTokenInfo { slot: u64::from(slot) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        let mut i = CK_TOKEN_INFO {
            label: [0; 32],
            manufacturerID: [0; 32],
            model: [0; 16],
            serialNumber: [0; 16],
            flags: to_ck(t.flags)?,
            ulMaxSessionCount: to_ck(t.max_sessions)?,
            ulSessionCount: to_ck(t.session_count)?,
            ulMaxRwSessionCount: to_ck(t.max_rw_sessions)?,
            ulRwSessionCount: to_ck(t.rw_session_count)?,
            ulMaxPinLen: to_ck(t.max_pin_len)?,
            ulMinPinLen: to_ck(t.min_pin_len)?,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version(0, 1),
            firmwareVersion: version(0, 1),
            utcTime: [b' '; 16],
        };
        pad(&mut i.label, &t.label);
        pad(&mut i.manufacturerID, &t.manufacturer);
        pad(&mut i.model, &t.model);
        pad(&mut i.serialNumber, &t.serial);
        // SAFETY: checked non-NULL.
        unsafe { put(info, i) }
    }
}

export! {
    /// C_GetMechanismList.
    fn C_GetMechanismList(slot: CK_SLOT_ID, list: CK_MECHANISM_TYPE_PTR, count: CK_ULONG_PTR) {
        let Body::Ulongs { values } = call(&Request::GetMechanismList { slot: u64::from(slot) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        // SAFETY: forwarded pointers.
        unsafe { out_ulongs(&values, list, count) }
    }
}

export! {
    /// C_GetMechanismInfo.
    fn C_GetMechanismInfo(slot: CK_SLOT_ID, mech: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO_PTR) {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let Body::Mech { info: m } = call(&Request::GetMechanismInfo { slot: u64::from(slot), mechanism: u64::from(mech) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        let i = CK_MECHANISM_INFO {
            ulMinKeySize: to_ck(m.min_key_size)?,
            ulMaxKeySize: to_ck(m.max_key_size)?,
            flags: to_ck(m.flags)?,
        };
        // SAFETY: checked non-NULL.
        unsafe { put(info, i) }
    }
}

export! {
    /// C_InitToken.
    fn C_InitToken(slot: CK_SLOT_ID, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG, label: CK_UTF8CHAR_PTR) {
        // SAFETY: PIN of `pin_len` bytes; the label is 32 bytes per the specification.
        let (pin, label) = unsafe { (bytes(pin, pin_len)?, bytes(label, 32)?) };
        if label.is_empty() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let label = String::from_utf8_lossy(label).trim_end().to_string();
        let r = call(&Request::InitToken { slot: u64::from(slot), so_pin: Secret::new(pin.to_vec()), label }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_InitPIN.
    fn C_InitPIN(session: CK_SESSION_HANDLE, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG) {
        // SAFETY: PIN buffer of `pin_len` bytes.
        let pin = unsafe { bytes(pin, pin_len)? };
        call(&Request::InitPin { session: u64::from(session), pin: Secret::new(pin.to_vec()) }).map(|_| ())
    }
}

export! {
    /// C_SetPIN.
    fn C_SetPIN(session: CK_SESSION_HANDLE, old: CK_UTF8CHAR_PTR, old_len: CK_ULONG, new: CK_UTF8CHAR_PTR, new_len: CK_ULONG) {
        // SAFETY: PIN buffers of the given lengths.
        let (old, new) = unsafe { (bytes(old, old_len)?, bytes(new, new_len)?) };
        call(&Request::SetPin {
            session: u64::from(session),
            old_pin: Secret::new(old.to_vec()),
            new_pin: Secret::new(new.to_vec()),
        })
        .map(|_| ())
    }
}

export! {
    /// C_OpenSession (notifications are not supported and ignored).
    fn C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, _app: CK_VOID_PTR, _notify: CK_NOTIFY, session: CK_SESSION_HANDLE_PTR) {
        if session.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let c = client()?;
        let h = ulong(call(&Request::OpenSession { slot: u64::from(slot), flags: u64::from(flags) })?)?;
        c.ops.opened(h, u64::from(slot));
        // SAFETY: checked non-NULL.
        unsafe { put(session, to_ck(h)?) }
    }
}

export! {
    /// C_CloseSession.
    fn C_CloseSession(session: CK_SESSION_HANDLE) {
        let c = client()?;
        let r = call(&Request::CloseSession { session: u64::from(session) }).map(|_| ());
        c.ops.closed(u64::from(session));
        verify_signatures().retain(|(s, _)| *s != session);
        r
    }
}

export! {
    /// C_CloseAllSessions.
    fn C_CloseAllSessions(slot: CK_SLOT_ID) {
        let c = client()?;
        let r = call(&Request::CloseAllSessions { slot: u64::from(slot) }).map(|_| ());
        c.ops.closed_slot(u64::from(slot));
        // Stored C_VerifySignatureInit signatures are not indexed by slot: all go (a
        // session of another slot then answers CKR_OPERATION_NOT_INITIALIZED).
        verify_signatures().clear();
        r
    }
}

export! {
    /// C_GetSessionInfo.
    fn C_GetSessionInfo(session: CK_SESSION_HANDLE, info: CK_SESSION_INFO_PTR) {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let Body::Session { info: s } = call(&Request::GetSessionInfo { session: u64::from(session) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        let i = CK_SESSION_INFO {
            slotID: to_ck(s.slot)?,
            state: to_ck(s.state)?,
            flags: to_ck(s.flags)?,
            ulDeviceError: 0,
        };
        // SAFETY: checked non-NULL.
        unsafe { put(info, i) }
    }
}

export! {
    /// C_GetOperationState: not supported (operation state stays in the crypto domain).
    fn C_GetOperationState(_session: CK_SESSION_HANDLE, _state: CK_BYTE_PTR, _len: CK_ULONG_PTR) {
        client()?;
        Err(CKR_FUNCTION_NOT_SUPPORTED)
    }
}

export! {
    /// C_SetOperationState: not supported.
    fn C_SetOperationState(_session: CK_SESSION_HANDLE, _state: CK_BYTE_PTR, _len: CK_ULONG, _ek: CK_OBJECT_HANDLE, _ak: CK_OBJECT_HANDLE) {
        client()?;
        Err(CKR_FUNCTION_NOT_SUPPORTED)
    }
}

export! {
    /// C_Login.
    fn C_Login(session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG) {
        // SAFETY: PIN buffer of `pin_len` bytes.
        let pin = unsafe { bytes(pin, pin_len)? };
        let r = call(&Request::Login { session: u64::from(session), user_type: u64::from(user), pin: Secret::new(pin.to_vec()) }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_Logout.
    fn C_Logout(session: CK_SESSION_HANDLE) {
        let r = call(&Request::Logout { session: u64::from(session) }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_CreateObject.
    fn C_CreateObject(session: CK_SESSION_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, object: CK_OBJECT_HANDLE_PTR) {
        if object.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: template of `n` attributes.
        let template = unsafe { template(tmpl, n)? };
        let h = ulong(call(&Request::CreateObject { session: u64::from(session), template })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(object, to_ck(h)?) }
    }
}

export! {
    /// C_CopyObject.
    fn C_CopyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, new: CK_OBJECT_HANDLE_PTR) {
        if new.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: template of `n` attributes.
        let template = unsafe { template(tmpl, n)? };
        let h = ulong(call(&Request::CopyObject { session: u64::from(session), object: u64::from(object), template })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(new, to_ck(h)?) }
    }
}

export! {
    /// C_DestroyObject.
    fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) {
        let r = call(&Request::DestroyObject { session: u64::from(session), object: u64::from(object) }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_GetObjectSize.
    fn C_GetObjectSize(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, size: CK_ULONG_PTR) {
        if size.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let s = ulong(call(&Request::GetObjectSize { session: u64::from(session), object: u64::from(object) })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(size, to_ck(s)?) }
    }
}

export! {
    /// C_GetAttributeValue, with the per-attribute length/sensitivity rules.
    fn C_GetAttributeValue(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG) {
        let count = usize::try_from(n).map_err(|_| CKR_ARGUMENTS_BAD)?;
        if tmpl.is_null() && count > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let mut types = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: `tmpl` holds `n` attributes.
            let a = unsafe { tmpl.add(i).read_unaligned() };
            types.push(u64::from(a.type_));
        }
        let Body::Attrs { values } = call(&Request::GetAttributeValue { session: u64::from(session), object: u64::from(object), types: types.clone() })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        if values.len() != count {
            return Err(CKR_DEVICE_ERROR);
        }
        let mut rv = CKR_OK;
        for (i, v) in values.into_iter().enumerate() {
            // SAFETY: i < n.
            let slot = unsafe { tmpl.add(i) };
            // SAFETY: as above.
            let mut a = unsafe { slot.read_unaligned() };
            match v {
                AttrValue::Value { value } => {
                    let nv = native(types[i], &value.0);
                    if a.pValue.is_null() {
                        a.ulValueLen = to_ck(nv.len() as u64)?;
                    } else if u64::from(a.ulValueLen) >= nv.len() as u64 {
                        // SAFETY: the caller's buffer holds ulValueLen >= nv.len() bytes.
                        unsafe { std::ptr::copy_nonoverlapping(nv.as_ptr(), a.pValue as *mut u8, nv.len()) };
                        a.ulValueLen = to_ck(nv.len() as u64)?;
                    } else {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        if rv == CKR_OK {
                            rv = CKR_BUFFER_TOO_SMALL;
                        }
                    }
                }
                AttrValue::Sensitive {} => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_SENSITIVE;
                }
                AttrValue::Invalid {} => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    if rv != CKR_ATTRIBUTE_SENSITIVE {
                        rv = CKR_ATTRIBUTE_TYPE_INVALID;
                    }
                }
            }
            // SAFETY: writing back the same attribute slot.
            unsafe { slot.write_unaligned(a) };
        }
        if rv == CKR_OK { Ok(()) } else { Err(rv) }
    }
}

export! {
    /// C_SetAttributeValue.
    fn C_SetAttributeValue(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG) {
        // SAFETY: template of `n` attributes.
        let template = unsafe { template(tmpl, n)? };
        let r = call(&Request::SetAttributeValue { session: u64::from(session), object: u64::from(object), template }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_FindObjectsInit.
    fn C_FindObjectsInit(session: CK_SESSION_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG) {
        // SAFETY: template of `n` attributes.
        let template = unsafe { template(tmpl, n)? };
        call(&Request::FindObjectsInit { session: u64::from(session), template }).map(|_| ())
    }
}

export! {
    /// C_FindObjects.
    fn C_FindObjects(session: CK_SESSION_HANDLE, objects: CK_OBJECT_HANDLE_PTR, max: CK_ULONG, count: CK_ULONG_PTR) {
        if count.is_null() || (objects.is_null() && max > 0) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let Body::Ulongs { values } = call(&Request::FindObjects { session: u64::from(session), max: u64::from(max) })? else {
            return Err(CKR_DEVICE_ERROR);
        };
        if values.len() as u64 > u64::from(max) {
            return Err(CKR_DEVICE_ERROR);
        }
        for (i, v) in values.iter().enumerate() {
            // SAFETY: i < values.len() <= max.
            unsafe { objects.add(i).write_unaligned(to_ck(*v)?) };
        }
        // SAFETY: checked non-NULL.
        unsafe { put(count, to_ck(values.len() as u64)?) }
    }
}

export! {
    /// C_FindObjectsFinal.
    fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) {
        call(&Request::FindObjectsFinal { session: u64::from(session) }).map(|_| ())
    }
}

fn rv_of(r: &Result<(), Rv>) -> Rv {
    match r {
        Ok(()) => CKR_OK,
        Err(rv) => *rv,
    }
}

macro_rules! init_fn {
    ($name:ident, $kind:ident) => {
        export! {
            /// Operation initialisation: validated by the domain the first time, then
            /// recorded locally (see the `ops` module).
            fn $name(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) {
                let c = client()?;
                // SAFETY: mechanism pointer from the caller.
                let mechanism = unsafe { mechanism(mech)? };
                c.ops.init(&|r| c.rv_body(r), c.fused(), Kind::$kind, u64::from(session), mechanism, u64::from(key))
            }
        }
    };
}

init_fn!(C_EncryptInit, Encrypt);
init_fn!(C_DecryptInit, Decrypt);
init_fn!(C_SignInit, Sign);
init_fn!(C_VerifyInit, Verify);

/// C_Sign/C_Encrypt/C_Decrypt: one fused round trip for a locally recorded operation,
/// otherwise forwarded to the operation the domain holds.
///
/// # Safety
/// `input` valid for `input_len` bytes; `out` NULL or valid for `*out_len` bytes; `out_len`
/// valid.
unsafe fn single_part(
    kind: Kind,
    session: CK_SESSION_HANDLE,
    input: *const u8,
    input_len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> Result<(), Rv> {
    let c = client()?;
    // SAFETY: input buffer of `input_len` bytes.
    let data = unsafe { bytes(input, input_len)? };
    // SAFETY: `out_len` from the caller (NULL is reported).
    let cap = unsafe { get(out_len)? };
    let cap = if out.is_null() {
        None
    } else {
        Some(u64::from(cap))
    };
    let session = u64::from(session);
    match c.ops.single(&|r| c.rv_body(r), kind, session, data, cap)? {
        Some(Delivery::Len(n)) => {
            // SAFETY: `out_len` checked above.
            unsafe { put(out_len, to_ck(n as u64)?) }
        }
        Some(Delivery::TooSmall(n)) => {
            // SAFETY: `out_len` checked above.
            unsafe { put(out_len, to_ck(n as u64)?)? };
            Err(CKR_BUFFER_TOO_SMALL)
        }
        Some(Delivery::Data(d)) => {
            // SAFETY: `out` is non-NULL (cap is Some) and holds `cap` >= d.len() bytes.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), out, d.len()) };
            // SAFETY: `out_len` checked above.
            unsafe { put(out_len, to_ck(d.len() as u64)?) }
        }
        None => {
            let data = Blob::from(data);
            let make = |cap| match kind {
                Kind::Sign => Request::Sign { session, data, cap },
                Kind::Encrypt => Request::Encrypt { session, data, cap },
                Kind::Decrypt | Kind::Verify => Request::Decrypt { session, data, cap },
            };
            // SAFETY: forwarded contract.
            let r = unsafe { out_data(make, out, out_len) };
            c.ops.forwarded(
                kind,
                session,
                Phase::Output {
                    length_query: out.is_null(),
                },
                rv_of(&r),
            );
            r
        }
    }
}

macro_rules! single_fn {
    ($name:ident, $kind:ident) => {
        export! {
            /// Single-part call with output.
            fn $name(session: CK_SESSION_HANDLE, input: CK_BYTE_PTR, input_len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
                // SAFETY: the caller's buffers, forwarded.
                unsafe { single_part(Kind::$kind, session, input, input_len, out, out_len) }
            }
        }
    };
}

macro_rules! data_fn {
    ($name:ident, $variant:ident, $kind:ident) => {
        export! {
            /// Update call with output.
            fn $name(session: CK_SESSION_HANDLE, input: CK_BYTE_PTR, input_len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
                let c = client()?;
                // SAFETY: input buffer of `input_len` bytes.
                let data = Blob::from(unsafe { bytes(input, input_len)? });
                let session = u64::from(session);
                c.ops.to_domain(&|r| c.rv_body(r), Kind::$kind, session)?;
                // SAFETY: output buffer and its length from the caller.
                let r = unsafe { out_data(|cap| Request::$variant { session, data, cap }, out, out_len) };
                c.ops.forwarded(Kind::$kind, session, Phase::Update, rv_of(&r));
                r
            }
        }
    };
}

macro_rules! final_fn {
    ($name:ident, $variant:ident, $kind:ident) => {
        export! {
            /// Final call with output.
            fn $name(session: CK_SESSION_HANDLE, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
                let c = client()?;
                let session = u64::from(session);
                c.ops.to_domain(&|r| c.rv_body(r), Kind::$kind, session)?;
                // SAFETY: output buffer and its length from the caller.
                let r = unsafe { out_data(|cap| Request::$variant { session, cap }, out, out_len) };
                c.ops.forwarded(Kind::$kind, session, Phase::Output { length_query: out.is_null() }, rv_of(&r));
                r
            }
        }
    };
}

macro_rules! update_fn {
    ($name:ident, $variant:ident, $kind:ident) => {
        export! {
            /// Update call without output.
            fn $name(session: CK_SESSION_HANDLE, input: CK_BYTE_PTR, input_len: CK_ULONG) {
                let c = client()?;
                // SAFETY: input buffer of `input_len` bytes.
                let data = Blob::from(unsafe { bytes(input, input_len)? });
                let session = u64::from(session);
                c.ops.to_domain(&|r| c.rv_body(r), Kind::$kind, session)?;
                let r = call(&Request::$variant { session, data }).map(|_| ());
                c.ops.forwarded(Kind::$kind, session, Phase::Update, rv_of(&r));
                r
            }
        }
    };
}

single_fn!(C_Encrypt, Encrypt);
data_fn!(C_EncryptUpdate, EncryptUpdate, Encrypt);
final_fn!(C_EncryptFinal, EncryptFinal, Encrypt);
single_fn!(C_Decrypt, Decrypt);
data_fn!(C_DecryptUpdate, DecryptUpdate, Decrypt);
final_fn!(C_DecryptFinal, DecryptFinal, Decrypt);
single_fn!(C_Sign, Sign);
update_fn!(C_SignUpdate, SignUpdate, Sign);
final_fn!(C_SignFinal, SignFinal, Sign);
update_fn!(C_VerifyUpdate, VerifyUpdate, Verify);

export! {
    /// C_Digest.
    fn C_Digest(session: CK_SESSION_HANDLE, input: CK_BYTE_PTR, input_len: CK_ULONG, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        // SAFETY: input buffer of `input_len` bytes.
        let data = Blob::from(unsafe { bytes(input, input_len)? });
        let session = u64::from(session);
        // SAFETY: output buffer and its length from the caller.
        unsafe { out_data(|cap| Request::Digest { session, data, cap }, out, out_len) }
    }
}

export! {
    /// C_DigestUpdate.
    fn C_DigestUpdate(session: CK_SESSION_HANDLE, input: CK_BYTE_PTR, input_len: CK_ULONG) {
        // SAFETY: input buffer of `input_len` bytes.
        let data = Blob::from(unsafe { bytes(input, input_len)? });
        call(&Request::DigestUpdate { session: u64::from(session), data }).map(|_| ())
    }
}

export! {
    /// C_DigestFinal.
    fn C_DigestFinal(session: CK_SESSION_HANDLE, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        let session = u64::from(session);
        // SAFETY: output buffer and its length from the caller.
        unsafe { out_data(|cap| Request::DigestFinal { session, cap }, out, out_len) }
    }
}

export! {
    /// C_DigestInit.
    fn C_DigestInit(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR) {
        // SAFETY: mechanism pointer from the caller.
        let mechanism = unsafe { mechanism(mech)? };
        call(&Request::DigestInit { session: u64::from(session), mechanism }).map(|_| ())
    }
}

export! {
    /// C_DigestKey.
    fn C_DigestKey(session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
        call(&Request::DigestKey { session: u64::from(session), key: u64::from(key) }).map(|_| ())
    }
}

export! {
    /// C_Verify: one fused round trip for a locally recorded operation.
    fn C_Verify(session: CK_SESSION_HANDLE, data: CK_BYTE_PTR, data_len: CK_ULONG, sig: CK_BYTE_PTR, sig_len: CK_ULONG) {
        let c = client()?;
        // SAFETY: buffers of the given lengths.
        let (data, sig) = unsafe { (bytes(data, data_len)?, bytes(sig, sig_len)?) };
        let session = u64::from(session);
        if c.ops.verify(&|r| c.rv_body(r), session, data, sig)?.is_some() {
            return Ok(());
        }
        let r = call(&Request::Verify { session, data: Blob::from(data), signature: Blob::from(sig) }).map(|_| ());
        c.ops.forwarded(Kind::Verify, session, Phase::Verify, rv_of(&r));
        r
    }
}

export! {
    /// C_VerifyFinal.
    fn C_VerifyFinal(session: CK_SESSION_HANDLE, sig: CK_BYTE_PTR, sig_len: CK_ULONG) {
        let c = client()?;
        // SAFETY: buffer of the given length.
        let sig = unsafe { bytes(sig, sig_len)? };
        let session = u64::from(session);
        c.ops.to_domain(&|r| c.rv_body(r), Kind::Verify, session)?;
        let r = call(&Request::VerifyFinal { session, signature: Blob::from(sig) }).map(|_| ());
        c.ops.forwarded(Kind::Verify, session, Phase::Verify, rv_of(&r));
        r
    }
}

macro_rules! unsupported {
    ($name:ident($($arg:ident: $ty:ty),*)) => {
        export! {
            /// Not supported by this module.
            fn $name($($arg: $ty),*) {
                let _ = ($($arg),*);
                client()?;
                Err(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
    };
}

unsupported!(C_SignRecoverInit(s: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE));
unsupported!(C_SignRecover(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));
unsupported!(C_VerifyRecoverInit(s: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE));
unsupported!(C_VerifyRecover(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));
unsupported!(C_DigestEncryptUpdate(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));
unsupported!(C_DecryptDigestUpdate(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));
unsupported!(C_SignEncryptUpdate(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));
unsupported!(C_DecryptVerifyUpdate(s: CK_SESSION_HANDLE, d: CK_BYTE_PTR, dl: CK_ULONG, o: CK_BYTE_PTR, ol: CK_ULONG_PTR));

export! {
    /// C_WaitForSlotEvent: the token is never removed and no slot appears, so there is no
    /// event to report. With CKF_DONT_BLOCK the answer is CKR_NO_EVENT (as SoftHSM2 gives);
    /// the blocking form would wait forever and is CKR_FUNCTION_NOT_SUPPORTED.
    fn C_WaitForSlotEvent(flags: CK_FLAGS, slot: CK_SLOT_ID_PTR, reserved: CK_VOID_PTR) {
        client()?;
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let _ = slot;
        if flags & CKF_DONT_BLOCK != 0 {
            Err(CKR_NO_EVENT)
        } else {
            Err(CKR_FUNCTION_NOT_SUPPORTED)
        }
    }
}

export! {
    /// C_GetFunctionStatus (legacy).
    fn C_GetFunctionStatus(_session: CK_SESSION_HANDLE) {
        client()?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    }
}

export! {
    /// C_CancelFunction (legacy).
    fn C_CancelFunction(_session: CK_SESSION_HANDLE) {
        client()?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    }
}

export! {
    /// C_GenerateKey.
    fn C_GenerateKey(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, key: CK_OBJECT_HANDLE_PTR) {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's mechanism and template.
        let (mechanism, template) = unsafe { (mechanism(mech)?, template(tmpl, n)?) };
        let h = ulong(call(&Request::GenerateKey { session: u64::from(session), mechanism, template })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(key, to_ck(h)?) }
    }
}

export! {
    /// C_GenerateKeyPair.
    fn C_GenerateKeyPair(
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_PTR,
        pub_tmpl: CK_ATTRIBUTE_PTR,
        pub_n: CK_ULONG,
        priv_tmpl: CK_ATTRIBUTE_PTR,
        priv_n: CK_ULONG,
        pub_key: CK_OBJECT_HANDLE_PTR,
        priv_key: CK_OBJECT_HANDLE_PTR,
    ) {
        if pub_key.is_null() || priv_key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's mechanism and templates.
        let (mechanism, public_template, private_template) =
            unsafe { (mechanism(mech)?, template(pub_tmpl, pub_n)?, template(priv_tmpl, priv_n)?) };
        let Body::KeyPair { public, private } = call(&Request::GenerateKeyPair {
            session: u64::from(session),
            mechanism,
            public_template,
            private_template,
        })?
        else {
            return Err(CKR_DEVICE_ERROR);
        };
        // SAFETY: checked non-NULL.
        unsafe {
            put(pub_key, to_ck(public)?)?;
            put(priv_key, to_ck(private)?)
        }
    }
}

export! {
    /// C_WrapKey.
    fn C_WrapKey(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, wrapping: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, out: CK_BYTE_PTR, out_len: CK_ULONG_PTR) {
        // SAFETY: caller's mechanism.
        let mechanism = unsafe { mechanism(mech)? };
        let session = u64::from(session);
        let (wrapping_key, key) = (u64::from(wrapping), u64::from(key));
        // SAFETY: output buffer and length from the caller.
        unsafe { out_data(|cap| Request::WrapKey { session, mechanism, wrapping_key, key, cap }, out, out_len) }
    }
}

export! {
    /// C_UnwrapKey.
    fn C_UnwrapKey(
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_PTR,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: CK_BYTE_PTR,
        wrapped_len: CK_ULONG,
        tmpl: CK_ATTRIBUTE_PTR,
        n: CK_ULONG,
        key: CK_OBJECT_HANDLE_PTR,
    ) {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's mechanism, wrapped bytes and template.
        let (mechanism, wrapped, template) =
            unsafe { (mechanism(mech)?, bytes(wrapped, wrapped_len)?, template(tmpl, n)?) };
        let h = ulong(call(&Request::UnwrapKey {
            session: u64::from(session),
            mechanism,
            unwrapping_key: u64::from(unwrapping),
            wrapped: Blob::from(wrapped),
            template,
        })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(key, to_ck(h)?) }
    }
}

export! {
    /// C_DeriveKey.
    fn C_DeriveKey(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, base: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, key: CK_OBJECT_HANDLE_PTR) {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's mechanism and template.
        let (mechanism, template) = unsafe { (mechanism(mech)?, template(tmpl, n)?) };
        let h = ulong(call(&Request::DeriveKey { session: u64::from(session), mechanism, base_key: u64::from(base), template })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(key, to_ck(h)?) }
    }
}

export! {
    /// C_SeedRandom.
    fn C_SeedRandom(session: CK_SESSION_HANDLE, seed: CK_BYTE_PTR, len: CK_ULONG) {
        // SAFETY: seed buffer.
        let seed = unsafe { bytes(seed, len)? };
        call(&Request::SeedRandom { session: u64::from(session), seed: Blob::from(seed) }).map(|_| ())
    }
}

export! {
    /// C_GenerateRandom.
    fn C_GenerateRandom(session: CK_SESSION_HANDLE, out: CK_BYTE_PTR, len: CK_ULONG) {
        // SAFETY: writable buffer of `len` bytes (checked non-NULL below).
        if out.is_null() && len > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let b = call(&Request::GenerateRandom { session: u64::from(session), len: u64::from(len) })?;
        let Body::SecretData { data } = b else {
            return Err(CKR_DEVICE_ERROR);
        };
        if data.expose().len() as u64 != u64::from(len) {
            return Err(CKR_DEVICE_ERROR);
        }
        if !data.expose().is_empty() {
            // SAFETY: `out` holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.expose().as_ptr(), out, data.expose().len()) };
        }
        Ok(())
    }
}

export! {
    /// C_LoginUser (PKCS#11 3.0). The token has one normal user and one SO, so the user
    /// name carries no meaning here and is ignored; the PIN decides, as in C_Login.
    fn C_LoginUser(session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, pin_len: CK_ULONG, name: CK_UTF8CHAR_PTR, name_len: CK_ULONG) {
        // SAFETY: user name buffer of `name_len` bytes (only checked for validity).
        unsafe { bytes(name, name_len)? };
        // SAFETY: PIN buffer of `pin_len` bytes.
        let pin = unsafe { bytes(pin, pin_len)? };
        let r = call(&Request::Login { session: u64::from(session), user_type: u64::from(user), pin: Secret::new(pin.to_vec()) }).map(|_| ());
        invalidate();
        r
    }
}

export! {
    /// C_SessionCancel (PKCS#11 3.0): ends the session's active operations named by
    /// `flags` (CKF_ENCRYPT, CKF_DECRYPT, CKF_DIGEST, CKF_SIGN, CKF_VERIFY,
    /// CKF_FIND_OBJECTS), both the ones the module recorded and the domain's.
    fn C_SessionCancel(session: CK_SESSION_HANDLE, flags: CK_FLAGS) {
        let c = client()?;
        let flags = u64::from(flags);
        if flags == 0 {
            return Ok(());
        }
        let kinds: Vec<Kind> = [
            (CKF_SIGN, Kind::Sign),
            (CKF_VERIFY, Kind::Verify),
            (CKF_ENCRYPT, Kind::Encrypt),
            (CKF_DECRYPT, Kind::Decrypt),
        ]
        .iter()
        .filter(|(f, _)| flags & *f != 0)
        .map(|(_, k)| *k)
        .collect();
        let r = call(&Request::SessionCancel { session: u64::from(session), flags }).map(|_| ());
        c.ops.cancel(u64::from(session), &kinds);
        if flags & CKF_VERIFY != 0 {
            verify_signatures().retain(|(s, _)| *s != session);
        }
        r
    }
}

export! {
    /// C_EncapsulateKey (PKCS#11 3.2): CKM_ML_KEM to an ML-KEM public key; the shared
    /// secret becomes a new secret key in the crypto domain (`*key`), the ciphertext goes
    /// to the caller. A NULL `ct` asks for the ciphertext length and creates nothing.
    fn C_EncapsulateKey(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, public_key: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, ct: CK_BYTE_PTR, ct_len: CK_ULONG_PTR, key: CK_OBJECT_HANDLE_PTR) {
        // SAFETY: caller's mechanism and template.
        let (mechanism, template) = unsafe { (mechanism(mech)?, template(tmpl, n)?) };
        // SAFETY: `ct_len` from the caller.
        let cap = unsafe { get(ct_len)? };
        if !ct.is_null() && key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let cap = (!ct.is_null()).then_some(u64::from(cap));
        let r = call_raw(&Request::EncapsulateKey {
            session: u64::from(session),
            mechanism,
            public_key: u64::from(public_key),
            template,
            cap,
        })?;
        match (r.rv, r.body) {
            (CKR_OK | CKR_BUFFER_TOO_SMALL, Body::Len { len }) => {
                // SAFETY: `ct_len` checked above.
                unsafe { put(ct_len, to_ck(len)?)? };
                if r.rv == CKR_OK { Ok(()) } else { Err(CKR_BUFFER_TOO_SMALL) }
            }
            (CKR_OK, Body::Encapsulated { ciphertext, key: h }) => {
                let data = &ciphertext.0;
                if cap.is_none_or(|c| (data.len() as u64) > c) {
                    return Err(CKR_DEVICE_ERROR);
                }
                // SAFETY: `ct` is non-NULL (cap is Some) and holds `cap` >= data.len() bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ct, data.len()) };
                // SAFETY: `ct_len` checked above, `key` checked non-NULL.
                unsafe {
                    put(ct_len, to_ck(data.len() as u64)?)?;
                    put(key, to_ck(h)?)
                }
            }
            (CKR_OK, _) => Err(CKR_DEVICE_ERROR),
            (rv, _) => Err(rv),
        }
    }
}

export! {
    /// C_DecapsulateKey (PKCS#11 3.2): CKM_ML_KEM with an ML-KEM private key; the shared
    /// secret becomes a new secret key in the crypto domain.
    fn C_DecapsulateKey(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, private_key: CK_OBJECT_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG, ct: CK_BYTE_PTR, ct_len: CK_ULONG, key: CK_OBJECT_HANDLE_PTR) {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's mechanism, template and ciphertext.
        let (mechanism, template, ct) = unsafe { (mechanism(mech)?, template(tmpl, n)?, bytes(ct, ct_len)?) };
        let h = ulong(call(&Request::DecapsulateKey {
            session: u64::from(session),
            mechanism,
            private_key: u64::from(private_key),
            template,
            ciphertext: Blob::from(ct),
        })?)?;
        // SAFETY: checked non-NULL.
        unsafe { put(key, to_ck(h)?) }
    }
}

/// Signatures given to C_VerifySignatureInit, per session, until the operation ends.
static VERIFY_SIGNATURES: std::sync::Mutex<Vec<(CK_SESSION_HANDLE, Vec<u8>)>> =
    std::sync::Mutex::new(Vec::new());

fn verify_signatures() -> std::sync::MutexGuard<'static, Vec<(CK_SESSION_HANDLE, Vec<u8>)>> {
    VERIFY_SIGNATURES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn take_signature(session: CK_SESSION_HANDLE) -> Result<Vec<u8>, Rv> {
    let mut g = verify_signatures();
    let i = g
        .iter()
        .position(|(s, _)| *s == session)
        .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
    Ok(g.swap_remove(i).1)
}

export! {
    /// C_VerifySignatureInit (PKCS#11 3.2): the signature comes first. Implemented on the
    /// session's verification (the domain runs every C_VerifyInit check), so a session has
    /// one verification at a time, by C_Verify* or C_VerifySignature*.
    fn C_VerifySignatureInit(session: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE, sig: CK_BYTE_PTR, sig_len: CK_ULONG) {
        // SAFETY: signature buffer of `sig_len` bytes.
        let sig = unsafe { bytes(sig, sig_len)? }.to_vec();
        if verify_signatures().iter().any(|(s, _)| *s == session) {
            return Err(CKR_OPERATION_ACTIVE);
        }
        // SAFETY: forwarded caller arguments.
        let rv = unsafe { C_VerifyInit(session, mech, key) };
        if rv != CKR_OK {
            return Err(rv);
        }
        verify_signatures().push((session, sig));
        Ok(())
    }
}

export! {
    /// C_VerifySignature (PKCS#11 3.2): single-part, ends the operation.
    fn C_VerifySignature(session: CK_SESSION_HANDLE, data: CK_BYTE_PTR, data_len: CK_ULONG) {
        let mut sig = take_signature(session)?;
        // SAFETY: the caller's data buffer; `sig` is ours.
        let rv = unsafe { C_Verify(session, data, data_len, sig.as_mut_ptr(), sig.len() as CK_ULONG) };
        if rv == CKR_OK { Ok(()) } else { Err(rv) }
    }
}

export! {
    /// C_VerifySignatureUpdate (PKCS#11 3.2).
    fn C_VerifySignatureUpdate(session: CK_SESSION_HANDLE, data: CK_BYTE_PTR, data_len: CK_ULONG) {
        if !verify_signatures().iter().any(|(s, _)| *s == session) {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        }
        // SAFETY: the caller's data buffer.
        let rv = unsafe { C_VerifyUpdate(session, data, data_len) };
        if rv != CKR_OK {
            // A failed update ends the operation, as for C_VerifyUpdate.
            let _ = take_signature(session);
            return Err(rv);
        }
        Ok(())
    }
}

export! {
    /// C_VerifySignatureFinal (PKCS#11 3.2): checks the signature given at init.
    fn C_VerifySignatureFinal(session: CK_SESSION_HANDLE) {
        let mut sig = take_signature(session)?;
        // SAFETY: `sig` is ours.
        let rv = unsafe { C_VerifyFinal(session, sig.as_mut_ptr(), sig.len() as CK_ULONG) };
        if rv == CKR_OK { Ok(()) } else { Err(rv) }
    }
}

/// The mechanism of C_MessageEncryptInit/C_MessageDecryptInit: its parameters come with
/// each message, so none (or a `CK_GCM_MESSAGE_PARAMS`, which some callers pass here too and
/// which is ignored) is `MechParam::None`; anything else goes to the domain to be refused.
///
/// # Safety
/// `p` must be NULL or point to a valid CK_MECHANISM whose parameter is readable.
unsafe fn message_mechanism(p: *const CK_MECHANISM) -> Result<Mechanism, Rv> {
    // SAFETY: forwarded contract.
    let m = unsafe { get(p)? };
    let len = usize::try_from(m.ulParameterLen).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let param = if m.pParameter.is_null() && len == 0
        || !m.pParameter.is_null() && len == std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>()
    {
        MechParam::None {}
    } else {
        // SAFETY: the parameter buffer is described by the mechanism.
        let b = unsafe { bytes(m.pParameter as *const u8, m.ulParameterLen)? };
        MechParam::Bytes {
            data: Blob::from(b),
        }
    };
    Ok(Mechanism {
        mechanism: u64::from(m.mechanism),
        param,
    })
}

/// Reads the CK_GCM_MESSAGE_PARAMS of one message; with `tag_in` the tag is read too
/// (decryption).
///
/// # Safety
/// `p` must be NULL or point to `len` bytes holding a CK_GCM_MESSAGE_PARAMS whose IV (and,
/// with `tag_in`, tag) buffers are readable.
unsafe fn gcm_message_params(
    p: Vp,
    len: CK_ULONG,
    tag_in: bool,
) -> Result<(CK_GCM_MESSAGE_PARAMS, GcmMessageParams), Rv> {
    if p.is_null()
        || usize::try_from(len).ok() != Some(std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>())
    {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: size checked; the caller passes a CK_GCM_MESSAGE_PARAMS.
    let g = unsafe { (p as *const CK_GCM_MESSAGE_PARAMS).read_unaligned() };
    // SAFETY: the IV buffer is described by the params.
    let iv = unsafe { bytes(g.pIv, g.ulIvLen) }.map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let tag = if tag_in {
        // SAFETY: the tag buffer holds ulTagBits / 8 bytes.
        unsafe { bytes(g.pTag, g.ulTagBits / 8) }.map_err(|_| CKR_MECHANISM_PARAM_INVALID)?
    } else {
        &[]
    };
    let params = GcmMessageParams {
        iv: Blob::from(iv),
        iv_fixed_bits: u64::from(g.ulIvFixedBits),
        generator: u64::from(g.ivGenerator),
        tag: Blob::from(tag),
        tag_bits: u64::from(g.ulTagBits),
    };
    Ok((g, params))
}

macro_rules! message_init_fn {
    ($name:ident, $encrypt:expr, $doc:literal) => {
        export! {
            #[doc = $doc]
            fn $name(session: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) {
                // SAFETY: the caller's mechanism.
                let mechanism = unsafe { message_mechanism(mech)? };
                call(&Request::MessageInit { session: u64::from(session), mechanism, key: u64::from(key), encrypt: $encrypt }).map(|_| ())
            }
        }
    };
}

message_init_fn!(
    C_MessageEncryptInit,
    true,
    "C_MessageEncryptInit (PKCS#11 3.0): CKM_AES_GCM for single-part C_EncryptMessage calls."
);
message_init_fn!(
    C_MessageDecryptInit,
    false,
    "C_MessageDecryptInit (PKCS#11 3.0): CKM_AES_GCM for single-part C_DecryptMessage calls."
);

export! {
    /// C_MessageEncryptFinal (PKCS#11 3.0).
    fn C_MessageEncryptFinal(session: CK_SESSION_HANDLE) {
        call(&Request::MessageFinal { session: u64::from(session), encrypt: true }).map(|_| ())
    }
}

export! {
    /// C_MessageDecryptFinal (PKCS#11 3.0).
    fn C_MessageDecryptFinal(session: CK_SESSION_HANDLE) {
        call(&Request::MessageFinal { session: u64::from(session), encrypt: false }).map(|_| ())
    }
}

export! {
    /// C_EncryptMessage (PKCS#11 3.0), AES-GCM: the ciphertext (as long as the plaintext) to
    /// `out`, the tag to the parameters' `pTag` and, when the domain generated it, the IV to
    /// their `pIv`. A NULL `out` asks for the length and spends no IV.
    fn C_EncryptMessage(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, aad: Bp, aad_len: CK_ULONG, data: Bp, data_len: CK_ULONG, out: Bp, out_len: Up) {
        // SAFETY: the caller's parameters, associated data and plaintext.
        let ((g, params), aad, data) = unsafe { (gcm_message_params(param, param_len, false)?, bytes(aad, aad_len)?, bytes(data, data_len)?) };
        // SAFETY: `out_len` from the caller.
        let cap = unsafe { get(out_len)? };
        let cap = (!out.is_null()).then_some(u64::from(cap));
        if cap.is_some() && g.ulTagBits >= 8 && g.pTag.is_null() {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        let r = call_raw(&Request::EncryptMessage { session: u64::from(session), params, aad: Blob::from(aad), data: Blob::from(data), cap })?;
        match (r.rv, r.body) {
            (CKR_OK | CKR_BUFFER_TOO_SMALL, Body::Len { len }) => {
                // SAFETY: `out_len` checked above.
                unsafe { put(out_len, to_ck(len)?)? };
                if r.rv == CKR_OK { Ok(()) } else { Err(CKR_BUFFER_TOO_SMALL) }
            }
            // SAFETY: `out`/`out_len` and the parameters' buffers per the caller's contract.
            (CKR_OK, Body::Sealed { iv, tag, data: ct }) => unsafe { write_sealed(&g, &iv.0, &tag.0, &ct.0, cap, out, out_len) },
            (CKR_OK, _) => Err(CKR_DEVICE_ERROR),
            (rv, _) => Err(rv),
        }
    }
}

/// Writes an encryption's answer: the ciphertext to `out` (`*out_len` its length), the tag
/// (when not empty) to the parameters' pTag, the IV to their pIv.
///
/// # Safety
/// `out` holds `cap` bytes (when `cap` is Some); `out_len` is valid; `g.pTag` holds
/// ulTagBits / 8 bytes and `g.pIv` ulIvLen bytes.
unsafe fn write_sealed(
    g: &CK_GCM_MESSAGE_PARAMS,
    iv: &[u8],
    tag: &[u8],
    ct: &[u8],
    cap: Option<u64>,
    out: Bp,
    out_len: Up,
) -> Result<(), Rv> {
    let tag_len = usize::try_from(g.ulTagBits / 8).map_err(|_| CKR_DEVICE_ERROR)?;
    let fits = ct.is_empty() || cap.is_some_and(|c| ct.len() as u64 <= c);
    if !fits
        || !(tag.is_empty() || tag.len() == tag_len)
        || iv.len() as u64 != u64::from(g.ulIvLen)
        || (!tag.is_empty() && g.pTag.is_null())
    {
        return Err(CKR_DEVICE_ERROR);
    }
    // SAFETY: lengths checked above against the caller's buffers.
    unsafe {
        if !ct.is_empty() {
            std::ptr::copy_nonoverlapping(ct.as_ptr(), out, ct.len());
        }
        if !tag.is_empty() {
            std::ptr::copy_nonoverlapping(tag.as_ptr(), g.pTag, tag.len());
        }
        if !iv.is_empty() && !g.pIv.is_null() {
            std::ptr::copy_nonoverlapping(iv.as_ptr(), g.pIv, iv.len());
        }
        if !out_len.is_null() {
            put(out_len, to_ck(ct.len() as u64)?)?;
        }
    }
    Ok(())
}

export! {
    /// C_EncryptMessageBegin (PKCS#11 3.0): starts a multi-part AES-GCM message; a generated
    /// IV is written to the parameters' pIv now.
    fn C_EncryptMessageBegin(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, aad: Bp, aad_len: CK_ULONG) {
        // SAFETY: the caller's parameters and associated data.
        let ((g, params), aad) = unsafe { (gcm_message_params(param, param_len, false)?, bytes(aad, aad_len)?) };
        match call(&Request::EncryptMessageBegin { session: u64::from(session), params, aad: Blob::from(aad) })? {
            // SAFETY: no ciphertext or tag; the IV buffer holds ulIvLen bytes.
            Body::Sealed { iv, .. } => unsafe { write_sealed(&g, &iv.0, &[], &[], None, std::ptr::null_mut(), std::ptr::null_mut()) },
            _ => Err(CKR_DEVICE_ERROR),
        }
    }
}

export! {
    /// C_EncryptMessageNext (PKCS#11 3.0): parts are buffered in the domain (no output
    /// before the last part); with CKF_END_OF_MESSAGE the whole ciphertext comes back and the
    /// tag goes to this call's parameters' pTag.
    fn C_EncryptMessageNext(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, data: Bp, data_len: CK_ULONG, out: Bp, out_len: Up, flags: CK_FLAGS) {
        // SAFETY: the caller's parameters and data.
        let ((g, _), data) = unsafe { (gcm_message_params(param, param_len, false)?, bytes(data, data_len)?) };
        // SAFETY: `out_len` from the caller.
        let cap = unsafe { get(out_len)? };
        let cap = (!out.is_null()).then_some(u64::from(cap));
        let end = u64::from(flags) & CKF_END_OF_MESSAGE != 0;
        let r = call_raw(&Request::EncryptMessageNext { session: u64::from(session), data: Blob::from(data), end, cap })?;
        match (r.rv, r.body) {
            (CKR_OK | CKR_BUFFER_TOO_SMALL, Body::Len { len }) => {
                // SAFETY: `out_len` checked above.
                unsafe { put(out_len, to_ck(len)?)? };
                if r.rv == CKR_OK { Ok(()) } else { Err(CKR_BUFFER_TOO_SMALL) }
            }
            // SAFETY: `out_len` checked above.
            (CKR_OK, Body::Data { data }) if data.0.is_empty() => unsafe { put(out_len, 0) },
            // SAFETY: `out`/`out_len` and the parameters' buffers per the caller's contract.
            (CKR_OK, Body::Sealed { iv, tag, data: ct }) => unsafe { write_sealed(&g, &iv.0, &tag.0, &ct.0, cap, out, out_len) },
            (CKR_OK, _) => Err(CKR_DEVICE_ERROR),
            (rv, _) => Err(rv),
        }
    }
}

export! {
    /// C_DecryptMessageBegin (PKCS#11 3.0): the IV and associated data of a multi-part message.
    fn C_DecryptMessageBegin(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, aad: Bp, aad_len: CK_ULONG) {
        // SAFETY: the caller's parameters and associated data.
        let ((_, params), aad) = unsafe { (gcm_message_params(param, param_len, false)?, bytes(aad, aad_len)?) };
        call(&Request::DecryptMessageBegin { session: u64::from(session), params, aad: Blob::from(aad) }).map(|_| ())
    }
}

export! {
    /// C_DecryptMessageNext (PKCS#11 3.0): parts are buffered; with CKF_END_OF_MESSAGE the tag
    /// (from this call's parameters) is checked and only then is the plaintext answered.
    fn C_DecryptMessageNext(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, data: Bp, data_len: CK_ULONG, out: Bp, out_len: Up, flags: CK_FLAGS) {
        let end = u64::from(flags) & CKF_END_OF_MESSAGE != 0;
        // SAFETY: the caller's parameters (their tag read at the last part) and data.
        let ((_, params), data) = unsafe { (gcm_message_params(param, param_len, end)?, bytes(data, data_len)?) };
        // SAFETY: forwarded output buffer contract.
        unsafe {
            out_data(
                |cap| Request::DecryptMessageNext { session: u64::from(session), data: Blob::from(data), tag: params.tag.clone(), end, cap },
                out,
                out_len,
            )
        }
    }
}

export! {
    /// C_DecryptMessage (PKCS#11 3.0), AES-GCM: the IV and tag from the parameters.
    fn C_DecryptMessage(session: CK_SESSION_HANDLE, param: Vp, param_len: CK_ULONG, aad: Bp, aad_len: CK_ULONG, data: Bp, data_len: CK_ULONG, out: Bp, out_len: Up) {
        // SAFETY: the caller's parameters, associated data and ciphertext.
        let ((_, params), aad, data) = unsafe { (gcm_message_params(param, param_len, true)?, bytes(aad, aad_len)?, bytes(data, data_len)?) };
        // SAFETY: forwarded output buffer contract.
        unsafe {
            out_data(
                |cap| Request::DecryptMessage { session: u64::from(session), params, aad: Blob::from(aad), data: Blob::from(data), cap },
                out,
                out_len,
            )
        }
    }
}

/// Entries of the 3.0/3.2 function lists this module does not implement: message-based
/// signing (3.0), validation flags, async and authenticated wrap (3.2). Each answers CKR_FUNCTION_NOT_SUPPORTED (CKR_CRYPTOKI_NOT_INITIALIZED before
/// C_Initialize), as the specification asks of a listed but unsupported function.
macro_rules! unsupported_3x {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            /// Not supported: CKR_FUNCTION_NOT_SUPPORTED.
            ///
            /// # Safety
            /// Reads none of its arguments.
            #[unsafe(no_mangle)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                $(let _ = $arg;)*
                guard(|| {
                    client()?;
                    Err(CKR_FUNCTION_NOT_SUPPORTED)
                })
            }
        )*
    };
}

type Vp = *mut std::ffi::c_void;
type Bp = *mut CK_BYTE;
type Up = *mut CK_ULONG;
type Sh = CK_SESSION_HANDLE;
type Ul = CK_ULONG;

unsupported_3x! {
    C_MessageSignInit(s: Sh, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_SignMessage(s: Sh, p: Vp, pl: Ul, d: Bp, dl: Ul, o: Bp, ol: Up);
    C_SignMessageBegin(s: Sh, p: Vp, pl: Ul);
    C_SignMessageNext(s: Sh, p: Vp, pl: Ul, d: Bp, dl: Ul, o: Bp, ol: Up);
    C_MessageSignFinal(s: Sh);
    C_MessageVerifyInit(s: Sh, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_VerifyMessage(s: Sh, p: Vp, pl: Ul, d: Bp, dl: Ul, g: Bp, gl: Ul);
    C_VerifyMessageBegin(s: Sh, p: Vp, pl: Ul);
    C_VerifyMessageNext(s: Sh, p: Vp, pl: Ul, d: Bp, dl: Ul, g: Bp, gl: Ul);
    C_MessageVerifyFinal(s: Sh);
    C_GetSessionValidationFlags(s: Sh, t: Ul, f: Up);
    C_AsyncComplete(s: Sh, n: *mut CK_UTF8CHAR, r: Vp);
    C_AsyncGetID(s: Sh, n: *mut CK_UTF8CHAR, id: Up);
    C_AsyncJoin(s: Sh, n: *mut CK_UTF8CHAR, id: Ul, d: Bp, dl: Ul);
    C_WrapKeyAuthenticated(s: Sh, m: *mut CK_MECHANISM, w: CK_OBJECT_HANDLE, k: CK_OBJECT_HANDLE, a: Bp, al: Ul, o: Bp, ol: Up);
    C_UnwrapKeyAuthenticated(s: Sh, m: *mut CK_MECHANISM, u: CK_OBJECT_HANDLE, w: Bp, wl: Ul, t: *mut CK_ATTRIBUTE, tn: Ul, a: Bp, al: Ul, k: *mut CK_OBJECT_HANDLE);
}

/// A function-list struct whose entries are this module's functions of the same name: the
/// v2.40 entries (in `pkcs11f.h` order), then `$extra` (the later versions' functions).
macro_rules! function_list {
    ($ty:ident { $major:expr, $minor:expr } $(, $extra:ident)* $(,)?) => {
        $ty {
            version: CK_VERSION {
                major: $major,
                minor: $minor,
            },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetInfo: Some(C_GetInfo),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetTokenInfo: Some(C_GetTokenInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_InitToken: Some(C_InitToken),
            C_InitPIN: Some(C_InitPIN),
            C_SetPIN: Some(C_SetPIN),
            C_OpenSession: Some(C_OpenSession),
            C_CloseSession: Some(C_CloseSession),
            C_CloseAllSessions: Some(C_CloseAllSessions),
            C_GetSessionInfo: Some(C_GetSessionInfo),
            C_GetOperationState: Some(C_GetOperationState),
            C_SetOperationState: Some(C_SetOperationState),
            C_Login: Some(C_Login),
            C_Logout: Some(C_Logout),
            C_CreateObject: Some(C_CreateObject),
            C_CopyObject: Some(C_CopyObject),
            C_DestroyObject: Some(C_DestroyObject),
            C_GetObjectSize: Some(C_GetObjectSize),
            C_GetAttributeValue: Some(C_GetAttributeValue),
            C_SetAttributeValue: Some(C_SetAttributeValue),
            C_FindObjectsInit: Some(C_FindObjectsInit),
            C_FindObjects: Some(C_FindObjects),
            C_FindObjectsFinal: Some(C_FindObjectsFinal),
            C_EncryptInit: Some(C_EncryptInit),
            C_Encrypt: Some(C_Encrypt),
            C_EncryptUpdate: Some(C_EncryptUpdate),
            C_EncryptFinal: Some(C_EncryptFinal),
            C_DecryptInit: Some(C_DecryptInit),
            C_Decrypt: Some(C_Decrypt),
            C_DecryptUpdate: Some(C_DecryptUpdate),
            C_DecryptFinal: Some(C_DecryptFinal),
            C_DigestInit: Some(C_DigestInit),
            C_Digest: Some(C_Digest),
            C_DigestUpdate: Some(C_DigestUpdate),
            C_DigestKey: Some(C_DigestKey),
            C_DigestFinal: Some(C_DigestFinal),
            C_SignInit: Some(C_SignInit),
            C_Sign: Some(C_Sign),
            C_SignUpdate: Some(C_SignUpdate),
            C_SignFinal: Some(C_SignFinal),
            C_SignRecoverInit: Some(C_SignRecoverInit),
            C_SignRecover: Some(C_SignRecover),
            C_VerifyInit: Some(C_VerifyInit),
            C_Verify: Some(C_Verify),
            C_VerifyUpdate: Some(C_VerifyUpdate),
            C_VerifyFinal: Some(C_VerifyFinal),
            C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
            C_VerifyRecover: Some(C_VerifyRecover),
            C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
            C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
            C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
            C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
            C_GenerateKey: Some(C_GenerateKey),
            C_GenerateKeyPair: Some(C_GenerateKeyPair),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_DeriveKey: Some(C_DeriveKey),
            C_SeedRandom: Some(C_SeedRandom),
            C_GenerateRandom: Some(C_GenerateRandom),
            C_GetFunctionStatus: Some(C_GetFunctionStatus),
            C_CancelFunction: Some(C_CancelFunction),
            C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
            $($extra: Some($extra),)*
        }
    };
}

/// The PKCS#11 v2.40 function list: every entry populated.
static FUNCTION_LIST: CK_FUNCTION_LIST = function_list!(CK_FUNCTION_LIST { 2, 40 });

/// The PKCS#11 3.0 function list: the v2.40 list plus the 3.0 functions.
static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = function_list!(
    CK_FUNCTION_LIST_3_0 { 3, 0 },
    C_GetInterfaceList,
    C_GetInterface,
    C_LoginUser,
    C_SessionCancel,
    C_MessageEncryptInit,
    C_EncryptMessage,
    C_EncryptMessageBegin,
    C_EncryptMessageNext,
    C_MessageEncryptFinal,
    C_MessageDecryptInit,
    C_DecryptMessage,
    C_DecryptMessageBegin,
    C_DecryptMessageNext,
    C_MessageDecryptFinal,
    C_MessageSignInit,
    C_SignMessage,
    C_SignMessageBegin,
    C_SignMessageNext,
    C_MessageSignFinal,
    C_MessageVerifyInit,
    C_VerifyMessage,
    C_VerifyMessageBegin,
    C_VerifyMessageNext,
    C_MessageVerifyFinal,
);

type Fp<A> = Option<A>;

/// CK_FUNCTION_LIST_3_2 (`pkcs11.h` 3.2 l. 209; entries in the order of its `pkcs11f.h`):
/// the 3.0 list followed by the 3.2 functions. `cryptoki-sys` 0.4 has no 3.2 binding, so the
/// layout is spelt out here: `repr(C)` of the 3.0 list (all pointers) then pointers.
#[repr(C)]
#[allow(non_snake_case)]
pub struct FunctionList32 {
    base: CK_FUNCTION_LIST_3_0,
    C_EncapsulateKey: Fp<
        unsafe extern "C" fn(
            Sh,
            CK_MECHANISM_PTR,
            CK_OBJECT_HANDLE,
            CK_ATTRIBUTE_PTR,
            Ul,
            Bp,
            Up,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
    C_DecapsulateKey: Fp<
        unsafe extern "C" fn(
            Sh,
            CK_MECHANISM_PTR,
            CK_OBJECT_HANDLE,
            CK_ATTRIBUTE_PTR,
            Ul,
            Bp,
            Ul,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
    C_VerifySignatureInit:
        Fp<unsafe extern "C" fn(Sh, *mut CK_MECHANISM, CK_OBJECT_HANDLE, Bp, Ul) -> CK_RV>,
    C_VerifySignature: Fp<unsafe extern "C" fn(Sh, Bp, Ul) -> CK_RV>,
    C_VerifySignatureUpdate: Fp<unsafe extern "C" fn(Sh, Bp, Ul) -> CK_RV>,
    C_VerifySignatureFinal: Fp<unsafe extern "C" fn(Sh) -> CK_RV>,
    C_GetSessionValidationFlags: Fp<unsafe extern "C" fn(Sh, Ul, Up) -> CK_RV>,
    C_AsyncComplete: Fp<unsafe extern "C" fn(Sh, *mut CK_UTF8CHAR, Vp) -> CK_RV>,
    C_AsyncGetID: Fp<unsafe extern "C" fn(Sh, *mut CK_UTF8CHAR, Up) -> CK_RV>,
    C_AsyncJoin: Fp<unsafe extern "C" fn(Sh, *mut CK_UTF8CHAR, Ul, Bp, Ul) -> CK_RV>,
    C_WrapKeyAuthenticated: Fp<
        unsafe extern "C" fn(
            Sh,
            *mut CK_MECHANISM,
            CK_OBJECT_HANDLE,
            CK_OBJECT_HANDLE,
            Bp,
            Ul,
            Bp,
            Up,
        ) -> CK_RV,
    >,
    C_UnwrapKeyAuthenticated: Fp<
        unsafe extern "C" fn(
            Sh,
            *mut CK_MECHANISM,
            CK_OBJECT_HANDLE,
            Bp,
            Ul,
            *mut CK_ATTRIBUTE,
            Ul,
            Bp,
            Ul,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
}

/// The PKCS#11 3.2 function list.
static FUNCTION_LIST_3_2: FunctionList32 = FunctionList32 {
    base: CK_FUNCTION_LIST_3_0 {
        version: CK_VERSION { major: 3, minor: 2 },
        ..FUNCTION_LIST_3_0
    },
    C_EncapsulateKey: Some(C_EncapsulateKey),
    C_DecapsulateKey: Some(C_DecapsulateKey),
    C_VerifySignatureInit: Some(C_VerifySignatureInit),
    C_VerifySignature: Some(C_VerifySignature),
    C_VerifySignatureUpdate: Some(C_VerifySignatureUpdate),
    C_VerifySignatureFinal: Some(C_VerifySignatureFinal),
    C_GetSessionValidationFlags: Some(C_GetSessionValidationFlags),
    C_AsyncComplete: Some(C_AsyncComplete),
    C_AsyncGetID: Some(C_AsyncGetID),
    C_AsyncJoin: Some(C_AsyncJoin),
    C_WrapKeyAuthenticated: Some(C_WrapKeyAuthenticated),
    C_UnwrapKeyAuthenticated: Some(C_UnwrapKeyAuthenticated),
};

/// The interfaces this module offers, all named "PKCS 11": the 3.2, 3.0 and v2.40 function
/// lists, newest first (the default interface of `C_GetInterface(NULL, NULL, ..)` is the
/// first). Fork safety is not claimed (CKF_INTERFACE_FORK_SAFE clear): a forked child must
/// call C_Initialize again (it then gets its own connections).
struct Interfaces([CK_INTERFACE; 3]);

// SAFETY: the interfaces only point to static, immutable data (a NUL-terminated name and
// the static function lists); sharing them between threads is sound.
unsafe impl Sync for Interfaces {}

static INTERFACE_NAME: &[u8] = b"PKCS 11\0";

static INTERFACES: Interfaces = Interfaces([
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_CHAR,
        pFunctionList: std::ptr::addr_of!(FUNCTION_LIST_3_2) as *mut std::ffi::c_void,
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_CHAR,
        pFunctionList: std::ptr::addr_of!(FUNCTION_LIST_3_0) as *mut std::ffi::c_void,
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_CHAR,
        pFunctionList: std::ptr::addr_of!(FUNCTION_LIST) as *mut std::ffi::c_void,
        flags: 0,
    },
]);

/// The version of an interface's function list (its first member in every version).
fn interface_version(i: &CK_INTERFACE) -> CK_VERSION {
    // SAFETY: every pFunctionList in INTERFACES points to a static function list, whose
    // first field is its CK_VERSION.
    unsafe { (i.pFunctionList as *const CK_VERSION).read() }
}

export! {
    /// C_GetInterfaceList (PKCS#11 3.0).
    fn C_GetInterfaceList(list: *mut CK_INTERFACE, count: CK_ULONG_PTR) {
        // SAFETY: `count` from the caller.
        let cap = unsafe { get(count)? };
        let n = INTERFACES.0.len();
        // SAFETY: as above.
        unsafe { put(count, n as CK_ULONG)? };
        if list.is_null() {
            return Ok(());
        }
        if (cap as usize) < n {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        for (k, i) in INTERFACES.0.iter().enumerate() {
            // SAFETY: `list` holds at least `n` elements (checked above).
            unsafe { list.add(k).write_unaligned(CK_INTERFACE { ..*i }) };
        }
        Ok(())
    }
}

export! {
    /// C_GetInterface (PKCS#11 3.0): the newest interface matching the name ("PKCS 11" or
    /// NULL), the version (NULL: any) and the flags; CKR_ARGUMENTS_BAD when none does.
    fn C_GetInterface(name: *mut CK_UTF8CHAR, ver: *mut CK_VERSION, iface: *mut *mut CK_INTERFACE, flags: CK_FLAGS) {
        if iface.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        if !name.is_null() {
            // SAFETY: a non-NULL name is a NUL-terminated string.
            let n = unsafe { std::ffi::CStr::from_ptr(name as *const std::ffi::c_char) };
            if n.to_bytes() != b"PKCS 11" {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        let want = if ver.is_null() {
            None
        } else {
            // SAFETY: non-NULL version pointer.
            let v = unsafe { get(ver)? };
            Some((v.major, v.minor))
        };
        let found = INTERFACES
            .0
            .iter()
            .find(|i| {
                let v = interface_version(i);
                want.is_none_or(|w| w == (v.major, v.minor)) && flags & !i.flags == 0
            })
            .ok_or(CKR_ARGUMENTS_BAD)?;
        // SAFETY: `iface` checked non-NULL; the pointee is static.
        unsafe { put(iface, found as *const CK_INTERFACE as *mut CK_INTERFACE) }
    }
}
