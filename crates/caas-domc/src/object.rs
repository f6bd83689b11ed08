//! PKCS#11 objects and the spec's attribute rules: defaults per class, which attributes may
//! be given at creation, which may change later (CKA_SENSITIVE only to true,
//! CKA_EXTRACTABLE only to false, CKA_MODIFIABLE respected), which are never revealed
//! (secret key values, private key components unless extractable and not sensitive), and
//! the per-key usage counter with the tenant's total and rate limits. The rules a workload
//! holding the user PIN must not bypass (limits, usage roles, trust) are in [`policy`].

use crate::der;
use crate::error::Ckr;
use crate::keys::{Curve, KeyMaterial};
use crate::policy::{self, Role};
use crate::pq::{MlDsa, MlKem};
use caas_vsm_proto::attr::{
    self, AttrKind, CKA_CAAS_BASE, CKA_CAAS_GCM_IV_STATE, CKA_CAAS_MAX_USES, CKA_CAAS_RATE_PER_SEC,
    CKA_CAAS_USAGE_COUNT,
};
use caas_vsm_proto::v32::{
    CKA_DECAPSULATE, CKA_ENCAPSULATE, CKA_PARAMETER_SET, CKK_ML_DSA, CKK_ML_KEM,
};
use caas_vsm_proto::{Attr, AttrValue, Blob};
use cryptoki_sys::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;
use zeroize::Zeroizing;

/// Canonical attribute map.
pub type Attrs = BTreeMap<u64, Vec<u8>>;

/// Who owns a session object: (application id, session handle). Token objects have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The application instance.
    pub app: [u8; 16],
    /// The session that created it.
    pub session: u64,
}

/// Rate-limiter state (token bucket).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// One object of a token.
pub struct Object {
    /// Handle, unique within the domain run.
    pub handle: u64,
    /// Session owner (session objects only).
    pub owner: Option<Owner>,
    /// Canonical attributes (never contains secret values).
    pub attrs: RwLock<Attrs>,
    /// Secret material: CKA_VALUE of secret/EC keys, PKCS#8 of RSA private keys.
    pub secret: Option<Zeroizing<Vec<u8>>>,
    material: OnceLock<Arc<KeyMaterial>>,
    /// Uses so far.
    pub uses: AtomicU64,
    bucket: Mutex<Bucket>,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("handle", &self.handle)
            .field("owner", &self.owner)
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// Attributes whose values are secret parts of a key.
fn is_secret_attr(class: u64, ty: u64) -> bool {
    match class {
        CKO_SECRET_KEY => ty == CKA_VALUE,
        CKO_PRIVATE_KEY => matches!(
            ty,
            CKA_VALUE
                | CKA_PRIVATE_EXPONENT
                | CKA_PRIME_1
                | CKA_PRIME_2
                | CKA_EXPONENT_1
                | CKA_EXPONENT_2
                | CKA_COEFFICIENT
        ),
        _ => false,
    }
}

/// Attributes fixed once the object exists.
fn is_immutable(ty: u64) -> bool {
    matches!(
        ty,
        CKA_CLASS
            | CKA_KEY_TYPE
            | CKA_VALUE
            | CKA_MODULUS
            | CKA_MODULUS_BITS
            | CKA_PUBLIC_EXPONENT
            | CKA_EC_PARAMS
            | CKA_EC_POINT
            | CKA_VALUE_LEN
            | CKA_PARAMETER_SET
            | CKA_LOCAL
            | CKA_KEY_GEN_MECHANISM
            | CKA_ALWAYS_SENSITIVE
            | CKA_NEVER_EXTRACTABLE
            | CKA_TOKEN
            | CKA_PRIVATE
            | CKA_CERTIFICATE_TYPE
            | CKA_CAAS_USAGE_COUNT
            | CKA_CAAS_GCM_IV_STATE
            | CKA_UNIQUE_ID
            | CKA_PRIVATE_EXPONENT
            | CKA_PRIME_1
            | CKA_PRIME_2
            | CKA_EXPONENT_1
            | CKA_EXPONENT_2
            | CKA_COEFFICIENT
    )
}

/// Attributes only the token sets.
fn token_set_only(ty: u64) -> bool {
    matches!(
        ty,
        CKA_LOCAL
            | CKA_KEY_GEN_MECHANISM
            | CKA_ALWAYS_SENSITIVE
            | CKA_NEVER_EXTRACTABLE
            | CKA_CAAS_USAGE_COUNT
            | CKA_CAAS_GCM_IV_STATE
            | CKA_UNIQUE_ID
    )
}

/// A fresh CKA_UNIQUE_ID (PKCS#11 3.0 §4.4.1: set by the token, read-only, unique per
/// object): 32 lowercase hex digits of 16 random bytes, so unique across tokens and
/// domains too. Assigned to every new object (`Domain::insert`, also for a copy) and to a
/// token object loaded from a state that predates it.
pub fn new_unique_id() -> Result<Vec<u8>, Ckr> {
    let mut r = [0u8; 16];
    aws_lc_rs::rand::fill(&mut r).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    Ok(hex::encode(r).into_bytes())
}

/// Validates the shape of one template attribute.
pub fn check_attr(a: &Attr) -> Result<(), Ckr> {
    // Attribute arrays (wrap/unwrap/derive templates) are not supported.
    if a.ty & CKF_ARRAY_ATTRIBUTE != 0 && a.ty != CKA_ALLOWED_MECHANISMS {
        return Err(Ckr(CKR_ATTRIBUTE_TYPE_INVALID));
    }
    if a.ty >= CKA_VENDOR_DEFINED && (a.ty & 0xffff_0000) != CKA_CAAS_BASE {
        return Err(Ckr(CKR_ATTRIBUTE_TYPE_INVALID));
    }
    let ok = match attr::kind(a.ty) {
        AttrKind::Ulong => a.value.0.len() == 8,
        AttrKind::Bool => a.value.0.len() == 1,
        AttrKind::UlongArray => a.value.0.len().is_multiple_of(8),
        AttrKind::Bytes => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
    }
}

/// Reads a CK_ULONG attribute from a template.
pub fn tmpl_ulong(t: &[Attr], ty: u64) -> Option<u64> {
    t.iter()
        .rev()
        .find(|a| a.ty == ty)
        .and_then(|a| attr::as_ulong(&a.value.0))
}

/// Reads a byte attribute from a template.
pub fn tmpl_bytes(t: &[Attr], ty: u64) -> Option<&[u8]> {
    t.iter().rev().find(|a| a.ty == ty).map(|a| &a.value.0[..])
}

/// Reads a CK_BBOOL attribute from a template.
pub fn tmpl_bool(t: &[Attr], ty: u64) -> Option<bool> {
    t.iter()
        .rev()
        .find(|a| a.ty == ty)
        .and_then(|a| attr::as_bool(&a.value.0))
}

/// Default attributes of a new object of `class`/`key_type`.
fn defaults(class: u64, key_type: Option<u64>) -> Attrs {
    let mut m = Attrs::new();
    let b = |v| attr::boolean(v);
    m.insert(CKA_CLASS, attr::ulong(class));
    m.insert(CKA_TOKEN, b(false));
    m.insert(
        CKA_PRIVATE,
        b(matches!(class, CKO_PRIVATE_KEY | CKO_SECRET_KEY)),
    );
    m.insert(CKA_MODIFIABLE, b(true));
    m.insert(CKA_COPYABLE, b(true));
    m.insert(CKA_DESTROYABLE, b(true));
    m.insert(CKA_LABEL, Vec::new());
    if let Some(kt) = key_type {
        m.insert(CKA_KEY_TYPE, attr::ulong(kt));
        m.insert(CKA_ID, Vec::new());
        m.insert(CKA_START_DATE, Vec::new());
        m.insert(CKA_END_DATE, Vec::new());
        m.insert(CKA_DERIVE, b(false));
        m.insert(CKA_LOCAL, b(false));
        m.insert(
            CKA_KEY_GEN_MECHANISM,
            attr::ulong(CK_UNAVAILABLE_INFORMATION),
        );
        m.insert(CKA_ALLOWED_MECHANISMS, Vec::new());
        m.insert(CKA_CAAS_MAX_USES, attr::ulong(0));
        m.insert(CKA_CAAS_RATE_PER_SEC, attr::ulong(0));
    }
    // PKCS#11 3.2: an ML-KEM public key encapsulates and its private key decapsulates by
    // default (both only ever cleared afterwards, `policy::USAGE_FLAGS`).
    if key_type == Some(CKK_ML_KEM) {
        match class {
            CKO_PUBLIC_KEY => m.insert(CKA_ENCAPSULATE, b(true)),
            _ => m.insert(CKA_DECAPSULATE, b(true)),
        };
    }
    match class {
        CKO_PUBLIC_KEY => {
            m.insert(CKA_SUBJECT, Vec::new());
            // CKA_ENCRYPT/CKA_WRAP: policy::usage_defaults.
            for t in [CKA_VERIFY, CKA_VERIFY_RECOVER] {
                m.insert(t, b(true));
            }
            m.insert(CKA_TRUSTED, b(false));
        }
        CKO_PRIVATE_KEY | CKO_SECRET_KEY => {
            if class == CKO_PRIVATE_KEY {
                m.insert(CKA_SUBJECT, Vec::new());
                // CKA_DECRYPT/CKA_UNWRAP: policy::usage_defaults.
                for t in [CKA_SIGN, CKA_SIGN_RECOVER] {
                    m.insert(t, b(true));
                }
            } else {
                // CKA_ENCRYPT/CKA_DECRYPT/CKA_WRAP/CKA_UNWRAP: policy::usage_defaults.
                for t in [CKA_SIGN, CKA_VERIFY] {
                    m.insert(t, b(true));
                }
                m.insert(CKA_TRUSTED, b(false));
            }
            m.insert(CKA_SENSITIVE, b(true));
            m.insert(CKA_EXTRACTABLE, b(false));
            m.insert(CKA_ALWAYS_SENSITIVE, b(false));
            m.insert(CKA_NEVER_EXTRACTABLE, b(false));
            m.insert(CKA_ALWAYS_AUTHENTICATE, b(false));
            m.insert(CKA_WRAP_WITH_TRUSTED, b(false));
        }
        CKO_DATA => {
            m.insert(CKA_APPLICATION, Vec::new());
            m.insert(CKA_OBJECT_ID, Vec::new());
            m.insert(CKA_VALUE, Vec::new());
        }
        CKO_CERTIFICATE => {
            m.insert(CKA_TRUSTED, b(false));
            m.insert(CKA_CERTIFICATE_CATEGORY, attr::ulong(0));
            m.insert(CKA_CHECK_VALUE, Vec::new());
            m.insert(CKA_START_DATE, Vec::new());
            m.insert(CKA_END_DATE, Vec::new());
            m.insert(CKA_ID, Vec::new());
            m.insert(CKA_ISSUER, Vec::new());
            m.insert(CKA_SERIAL_NUMBER, Vec::new());
            m.insert(CKA_SUBJECT, Vec::new());
        }
        _ => {}
    }
    m
}

/// How an object comes into being (decides which attributes the caller may set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// C_CreateObject or C_UnwrapKey: values come from outside.
    Imported,
    /// C_GenerateKey(Pair) or C_DeriveKey: generated inside the token.
    Generated(u64),
}

/// Attributes plus optional secret material of a new object.
pub type Built = (Attrs, Option<Zeroizing<Vec<u8>>>);

/// Builds attributes and secret for a new object from a template. `extra` are attributes
/// the token computed (public values); `secret` is material generated or unwrapped.
/// `role` is who creates it: only the SO may create a CKA_TRUSTED object. Usage limits may
/// be given by any creator (they only restrict the new key); see [`policy`].
pub fn build(
    template: &[Attr],
    class: u64,
    key_type: Option<u64>,
    origin: Origin,
    extra: &[(u64, Vec<u8>)],
    mut secret: Option<Zeroizing<Vec<u8>>>,
    role: Role,
) -> Result<Built, Ckr> {
    let mut m = defaults(class, key_type);
    for a in template {
        check_attr(a)?;
        if token_set_only(a.ty) {
            return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
        }
        if a.ty == CKA_TRUSTED && attr::as_bool(&a.value.0) == Some(true) && role != Role::So {
            return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
        }
        if a.ty == CKA_CLASS && attr::as_ulong(&a.value.0) != Some(class) {
            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
        }
        if a.ty == CKA_KEY_TYPE && key_type.is_some() && attr::as_ulong(&a.value.0) != key_type {
            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
        }
        if is_secret_attr(class, a.ty) {
            if origin != Origin::Imported || secret.is_some() && class == CKO_SECRET_KEY {
                return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
            }
            continue; // collected below
        }
        if origin != Origin::Imported
            && matches!(
                a.ty,
                CKA_VALUE | CKA_MODULUS | CKA_PUBLIC_EXPONENT | CKA_EC_POINT
            )
        {
            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
        }
        m.insert(a.ty, a.value.0.clone());
    }
    if key_type.is_some() {
        policy::usage_defaults(&mut m, class, template);
    }
    for (t, v) in extra {
        m.insert(*t, v.clone());
    }
    if let Origin::Generated(mech) = origin {
        m.insert(CKA_LOCAL, attr::boolean(true));
        m.insert(CKA_KEY_GEN_MECHANISM, attr::ulong(mech));
    }
    if matches!(class, CKO_PRIVATE_KEY | CKO_SECRET_KEY) {
        let sensitive = m.get(&CKA_SENSITIVE).and_then(|v| attr::as_bool(v)) == Some(true);
        let extractable = m.get(&CKA_EXTRACTABLE).and_then(|v| attr::as_bool(v)) == Some(true);
        let local = matches!(origin, Origin::Generated(_));
        m.insert(CKA_ALWAYS_SENSITIVE, attr::boolean(local && sensitive));
        m.insert(CKA_NEVER_EXTRACTABLE, attr::boolean(local && !extractable));
    }
    // Secret values supplied in the template (C_CreateObject).
    if origin == Origin::Imported && secret.is_none() {
        secret = imported_secret(template, class, key_type, &mut m)?;
    }
    Ok((m, secret))
}

/// Turns the secret attributes of an imported key into the stored secret form.
fn imported_secret(
    t: &[Attr],
    class: u64,
    key_type: Option<u64>,
    m: &mut Attrs,
) -> Result<Option<Zeroizing<Vec<u8>>>, Ckr> {
    match (class, key_type) {
        (CKO_SECRET_KEY, Some(kt)) => {
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            check_secret_len(kt, v.len())?;
            m.insert(CKA_VALUE_LEN, attr::ulong(v.len() as u64));
            Ok(Some(Zeroizing::new(v.to_vec())))
        }
        (CKO_PRIVATE_KEY, Some(CKK_EC_EDWARDS))
            if m.get(&CKA_EC_PARAMS).is_some_and(|p| der::is_ed448(p)) =>
        {
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            if v.len() != crate::keys::ED448_KEY_LEN {
                return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
            }
            Ok(Some(Zeroizing::new(v.to_vec())))
        }
        (CKO_PRIVATE_KEY, Some(CKK_EC | CKK_EC_EDWARDS)) => {
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            let params = m.get(&CKA_EC_PARAMS).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            let curve = Curve::from_params(params)?;
            let mut scalar = vec![0u8; curve.field_len()];
            if v.len() > scalar.len() {
                return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
            }
            let off = scalar.len() - v.len();
            scalar[off..].copy_from_slice(v);
            Ok(Some(Zeroizing::new(scalar)))
        }
        (CKO_PRIVATE_KEY, Some(CKK_EC_MONTGOMERY)) => {
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            let params = m.get(&CKA_EC_PARAMS).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            if !der::is_x25519(params) {
                return Err(Ckr(CKR_CURVE_NOT_SUPPORTED));
            }
            if v.len() != 32 {
                return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
            }
            Ok(Some(Zeroizing::new(v.to_vec())))
        }
        (CKO_PRIVATE_KEY, Some(kt @ (CKK_ML_DSA | CKK_ML_KEM))) => {
            // The expanded private key; the public value is recomputed, never taken on trust.
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            let set = tmpl_ulong(t, CKA_PARAMETER_SET).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            crate::pq::public_of(kt, set, v)?;
            Ok(Some(Zeroizing::new(v.to_vec())))
        }
        (CKO_PRIVATE_KEY, Some(CKK_RSA)) => {
            let get = |ty| tmpl_bytes(t, ty).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE));
            let comps = aws_lc_rs::rsa::KeyPairComponents {
                public_key: aws_lc_rs::rsa::PublicKeyComponents {
                    n: get(CKA_MODULUS)?,
                    e: get(CKA_PUBLIC_EXPONENT)?,
                },
                d: get(CKA_PRIVATE_EXPONENT)?,
                p: get(CKA_PRIME_1)?,
                q: get(CKA_PRIME_2)?,
                dP: get(CKA_EXPONENT_1)?,
                dQ: get(CKA_EXPONENT_2)?,
                qInv: get(CKA_COEFFICIENT)?,
            };
            let kp = aws_lc_rs::rsa::KeyPair::from_components(&comps)
                .map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))?;
            let pkcs8 =
                aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&kp)
                    .map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let secret = Zeroizing::new(pkcs8.as_ref().to_vec());
            for (ty, v) in crate::keys::rsa_public_attrs(&secret)? {
                m.insert(ty, v);
            }
            Ok(Some(secret))
        }
        (CKO_PUBLIC_KEY, Some(kt @ (CKK_ML_DSA | CKK_ML_KEM))) => {
            // An imported post-quantum public key is checked now, not at first use.
            let v = tmpl_bytes(t, CKA_VALUE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            let set = tmpl_ulong(t, CKA_PARAMETER_SET).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
            if kt == CKK_ML_DSA {
                crate::pq::check_ml_dsa_public(MlDsa::from_set(set)?, v)?;
            } else {
                crate::pq::check_ml_kem_public(MlKem::from_set(set)?, v)?;
            }
            Ok(None)
        }
        (CKO_PRIVATE_KEY, _) => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        _ => Ok(None),
    }
}

/// Checks a secret key length for its key type.
pub fn check_secret_len(key_type: u64, len: usize) -> Result<(), Ckr> {
    let ok = match key_type {
        CKK_AES => matches!(len, 16 | 24 | 32),
        CKK_GENERIC_SECRET | CKK_SHA224_HMAC | CKK_SHA256_HMAC | CKK_SHA384_HMAC
        | CKK_SHA512_HMAC | CKK_SHA_1_HMAC => (1..=512).contains(&len),
        _ => return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
    };
    if ok {
        Ok(())
    } else {
        Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
    }
}

impl Object {
    /// A new object.
    #[must_use]
    pub fn new(
        handle: u64,
        owner: Option<Owner>,
        attrs: Attrs,
        secret: Option<Zeroizing<Vec<u8>>>,
        uses: u64,
    ) -> Self {
        Self {
            handle,
            owner,
            attrs: RwLock::new(attrs),
            secret,
            material: OnceLock::new(),
            uses: AtomicU64::new(uses),
            bucket: Mutex::new(Bucket {
                tokens: f64::MAX,
                last: Instant::now(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Attrs> {
        self.attrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A CK_ULONG attribute.
    #[must_use]
    pub fn ulong(&self, ty: u64) -> Option<u64> {
        self.read().get(&ty).and_then(|v| attr::as_ulong(v))
    }

    /// A CK_BBOOL attribute (absent = false).
    #[must_use]
    pub fn flag(&self, ty: u64) -> bool {
        self.read().get(&ty).and_then(|v| attr::as_bool(v)) == Some(true)
    }

    /// A byte attribute.
    #[must_use]
    pub fn bytes(&self, ty: u64) -> Option<Vec<u8>> {
        self.read().get(&ty).cloned()
    }

    /// CKA_CLASS.
    #[must_use]
    pub fn class(&self) -> u64 {
        self.ulong(CKA_CLASS).unwrap_or(CK_UNAVAILABLE_INFORMATION)
    }

    /// CKA_KEY_TYPE.
    #[must_use]
    pub fn key_type(&self) -> Option<u64> {
        self.ulong(CKA_KEY_TYPE)
    }

    /// CKA_TOKEN.
    #[must_use]
    pub fn is_token(&self) -> bool {
        self.flag(CKA_TOKEN)
    }

    /// CKA_PRIVATE.
    #[must_use]
    pub fn is_private(&self) -> bool {
        self.flag(CKA_PRIVATE)
    }

    /// A snapshot of the attributes.
    #[must_use]
    pub fn snapshot(&self) -> Attrs {
        self.read().clone()
    }

    /// Whether every attribute of `template` matches (C_FindObjects).
    #[must_use]
    pub fn matches(&self, template: &[Attr]) -> bool {
        let a = self.read();
        template.iter().all(|t| {
            if t.ty == CKA_CAAS_USAGE_COUNT {
                return attr::as_ulong(&t.value.0) == Some(self.uses.load(Ordering::Relaxed));
            }
            match a.get(&t.ty) {
                Some(v) => *v == t.value.0,
                None => false,
            }
        })
    }

    /// The parsed key material (built on first use).
    pub fn material(&self) -> Result<Arc<KeyMaterial>, Ckr> {
        if let Some(m) = self.material.get() {
            return Ok(m.clone());
        }
        let m = Arc::new(self.parse_material()?);
        Ok(self.material.get_or_init(|| m).clone())
    }

    fn parse_material(&self) -> Result<KeyMaterial, Ckr> {
        let kt = self.key_type().ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
        let secret = || self.secret.as_deref().ok_or(Ckr(CKR_KEY_HANDLE_INVALID));
        match (self.class(), kt) {
            (CKO_PRIVATE_KEY, CKK_RSA) => KeyMaterial::rsa_private(secret()?),
            (CKO_PUBLIC_KEY, CKK_RSA) => {
                let n = self.bytes(CKA_MODULUS).ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                let e = self
                    .bytes(CKA_PUBLIC_EXPONENT)
                    .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                KeyMaterial::rsa_public(&n, &e)
            }
            (class @ (CKO_PRIVATE_KEY | CKO_PUBLIC_KEY), CKK_EC_EDWARDS)
                if self.bytes(CKA_EC_PARAMS).is_some_and(|p| der::is_ed448(&p)) =>
            {
                if class == CKO_PRIVATE_KEY {
                    KeyMaterial::ed448_private(secret()?)
                } else {
                    let q = self
                        .bytes(CKA_EC_POINT)
                        .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                    KeyMaterial::ed448_public(&q)
                }
            }
            (CKO_PRIVATE_KEY, CKK_EC | CKK_EC_EDWARDS) => {
                let p = self
                    .bytes(CKA_EC_PARAMS)
                    .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                KeyMaterial::ec_private(Curve::from_params(&p)?, secret()?)
            }
            (CKO_PUBLIC_KEY, CKK_EC | CKK_EC_EDWARDS) => {
                let p = self
                    .bytes(CKA_EC_PARAMS)
                    .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                let q = self
                    .bytes(CKA_EC_POINT)
                    .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                KeyMaterial::ec_public(Curve::from_params(&p)?, &q)
            }
            (class @ (CKO_PRIVATE_KEY | CKO_PUBLIC_KEY), CKK_EC_MONTGOMERY) => {
                let p = self
                    .bytes(CKA_EC_PARAMS)
                    .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                if !der::is_x25519(&p) {
                    return Err(Ckr(CKR_CURVE_NOT_SUPPORTED));
                }
                if class == CKO_PRIVATE_KEY {
                    KeyMaterial::x25519_private(secret()?)
                } else {
                    let q = self
                        .bytes(CKA_EC_POINT)
                        .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                    KeyMaterial::x25519_public(&q)
                }
            }
            (CKO_PRIVATE_KEY, CKK_ML_DSA) => Ok(KeyMaterial::MlDsaPrivate(
                crate::pq::MlDsaPrivate::new(self.parameter_set(MlDsa::from_set)?, secret()?)?,
            )),
            (CKO_PUBLIC_KEY, CKK_ML_DSA) => {
                let set = self.parameter_set(MlDsa::from_set)?;
                let public = self.bytes(CKA_VALUE).ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                crate::pq::check_ml_dsa_public(set, &public)?;
                Ok(KeyMaterial::MlDsaPublic { set, public })
            }
            (CKO_PRIVATE_KEY, CKK_ML_KEM) => Ok(KeyMaterial::MlKemPrivate(
                crate::pq::MlKemPrivate::new(self.parameter_set(MlKem::from_set)?, secret()?)?,
            )),
            (CKO_PUBLIC_KEY, CKK_ML_KEM) => {
                let set = self.parameter_set(MlKem::from_set)?;
                let public = self.bytes(CKA_VALUE).ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
                crate::pq::check_ml_kem_public(set, &public)?;
                Ok(KeyMaterial::MlKemPublic { set, public })
            }
            (CKO_SECRET_KEY, _) => Ok(KeyMaterial::Secret(Zeroizing::new(secret()?.to_vec()))),
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }

    /// The object's CKA_PARAMETER_SET, parsed by `parse`.
    fn parameter_set<T>(&self, parse: fn(u64) -> Result<T, Ckr>) -> Result<T, Ckr> {
        parse(
            self.ulong(CKA_PARAMETER_SET)
                .ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?,
        )
    }

    /// C_GetAttributeValue for one type, applying the sensitivity rules.
    #[must_use]
    pub fn get_attr(&self, ty: u64) -> AttrValue {
        let class = self.class();
        if ty == CKA_CAAS_USAGE_COUNT && self.key_type().is_some() {
            return AttrValue::Value {
                value: Blob(attr::ulong(self.uses.load(Ordering::Relaxed))),
            };
        }
        if is_secret_attr(class, ty) {
            if self.flag(CKA_SENSITIVE) || !self.flag(CKA_EXTRACTABLE) {
                return AttrValue::Sensitive {};
            }
            return match self.reveal(class, ty) {
                Some(v) => AttrValue::Value { value: Blob(v) },
                None => AttrValue::Invalid {},
            };
        }
        match self.read().get(&ty) {
            Some(v) => AttrValue::Value {
                value: Blob(v.clone()),
            },
            None => AttrValue::Invalid {},
        }
    }

    fn reveal(&self, class: u64, ty: u64) -> Option<Vec<u8>> {
        let secret = self.secret.as_deref()?;
        if class == CKO_SECRET_KEY || self.key_type() != Some(CKK_RSA) {
            return (ty == CKA_VALUE).then(|| secret.to_vec());
        }
        let p = der::rsa_parts_from_pkcs8(secret)?;
        let v = match ty {
            CKA_PRIVATE_EXPONENT => p.d,
            CKA_PRIME_1 => p.p,
            CKA_PRIME_2 => p.q,
            CKA_EXPONENT_1 => p.dp,
            CKA_EXPONENT_2 => p.dq,
            CKA_COEFFICIENT => p.qinv,
            _ => return None,
        };
        Some(v.to_vec())
    }

    /// Checks a C_SetAttributeValue/C_CopyObject template against the change rules and
    /// returns the new attribute map. `copy` allows CKA_TOKEN/CKA_PRIVATE changes; `role` is
    /// who asks (usage limits and CKA_TRUSTED are the SO's; usage flags only clear; see
    /// [`policy`]).
    pub fn apply_template(&self, template: &[Attr], copy: bool, role: Role) -> Result<Attrs, Ckr> {
        let mut m = self.snapshot();
        let class = self.class();
        if !copy && !self.flag(CKA_MODIFIABLE) && !template.is_empty() {
            return Err(Ckr(CKR_ACTION_PROHIBITED));
        }
        for a in template {
            check_attr(a)?;
            let old = m.get(&a.ty);
            if old == Some(&a.value.0) {
                continue;
            }
            if is_secret_attr(class, a.ty) {
                return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
            }
            let copy_ok = copy && matches!(a.ty, CKA_TOKEN | CKA_PRIVATE);
            if is_immutable(a.ty) && !copy_ok {
                return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
            }
            let new_b = attr::as_bool(&a.value.0);
            match a.ty {
                CKA_SENSITIVE if new_b != Some(true) => return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY)),
                CKA_EXTRACTABLE if new_b != Some(false) => {
                    return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
                }
                CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE if new_b != Some(false) => {
                    return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
                }
                CKA_TRUSTED if role != Role::So => {
                    return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
                }
                // PKCS#11: changes once only, from CK_FALSE to CK_TRUE (as SoftHSM2).
                CKA_WRAP_WITH_TRUSTED if new_b != Some(true) => {
                    return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
                }
                ty if policy::is_limit(ty) && role != Role::So => {
                    return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
                }
                _ => {}
            }
            m.insert(a.ty, a.value.0.clone());
        }
        if self.key_type().is_some() {
            policy::check_role_change(&self.read(), &m)?;
        }
        Ok(m)
    }

    /// Counts one use of this key, enforcing the tenant's limits (CKR_FUNCTION_REJECTED).
    pub fn count_use(&self) -> Result<u64, Ckr> {
        let max = self.ulong(CKA_CAAS_MAX_USES).unwrap_or(0);
        let rate = self.ulong(CKA_CAAS_RATE_PER_SEC).unwrap_or(0);
        if rate > 0 {
            let mut b = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let cap = rate as f64;
            let elapsed = now.duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens.min(cap) + elapsed * cap).min(cap);
            b.last = now;
            if b.tokens < 1.0 {
                return Err(Ckr(CKR_FUNCTION_REJECTED));
            }
            b.tokens -= 1.0;
        }
        let n = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        if max > 0 && n > max {
            self.uses.fetch_sub(1, Ordering::Relaxed);
            return Err(Ckr(CKR_FUNCTION_REJECTED));
        }
        Ok(n)
    }

    /// Size estimate for C_GetObjectSize.
    #[must_use]
    pub fn size(&self) -> u64 {
        let a = self.read();
        (a.values().map(|v| v.len() + 16).sum::<usize>()
            + self.secret.as_ref().map_or(0, |s| s.len())) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ty: u64, v: Vec<u8>) -> Attr {
        Attr { ty, value: Blob(v) }
    }

    fn aes(template: &[Attr]) -> Result<Object, Ckr> {
        let (a, s) = build(
            template,
            CKO_SECRET_KEY,
            Some(CKK_AES),
            Origin::Generated(CKM_AES_KEY_GEN),
            &[(CKA_VALUE_LEN, attr::ulong(32))],
            Some(Zeroizing::new(vec![9u8; 32])),
            Role::User,
        )?;
        Ok(Object::new(1, None, a, s, 0))
    }

    #[test]
    fn sensitive_value_is_not_revealed() -> Result<(), Ckr> {
        let o = aes(&[])?;
        assert_eq!(o.get_attr(CKA_VALUE), AttrValue::Sensitive {});
        assert!(o.flag(CKA_ALWAYS_SENSITIVE) && o.flag(CKA_NEVER_EXTRACTABLE));
        let o = aes(&[
            t(CKA_SENSITIVE, attr::boolean(false)),
            t(CKA_EXTRACTABLE, attr::boolean(true)),
        ])?;
        assert_eq!(
            o.get_attr(CKA_VALUE),
            AttrValue::Value {
                value: Blob(vec![9u8; 32])
            }
        );
        Ok(())
    }

    #[test]
    fn one_way_attribute_changes() -> Result<(), Ckr> {
        let o = aes(&[t(CKA_SENSITIVE, attr::boolean(false))])?;
        o.apply_template(&[t(CKA_SENSITIVE, attr::boolean(true))], false, Role::User)?;
        let o = aes(&[])?;
        assert_eq!(
            o.apply_template(&[t(CKA_SENSITIVE, attr::boolean(false))], false, Role::User),
            Err(Ckr(CKR_ATTRIBUTE_READ_ONLY))
        );
        assert_eq!(
            o.apply_template(
                &[t(CKA_EXTRACTABLE, attr::boolean(true))],
                false,
                Role::User
            ),
            Err(Ckr(CKR_ATTRIBUTE_READ_ONLY))
        );
        assert_eq!(
            o.apply_template(&[t(CKA_CLASS, attr::ulong(CKO_DATA))], false, Role::User),
            Err(Ckr(CKR_ATTRIBUTE_READ_ONLY))
        );
        assert_eq!(
            aes(&[t(CKA_LOCAL, attr::boolean(true))]).err(),
            Some(Ckr(CKR_ATTRIBUTE_READ_ONLY))
        );
        assert_eq!(
            aes(&[t(CKA_TOKEN, vec![1, 2])]).err(),
            Some(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
        );
        Ok(())
    }

    #[test]
    fn limits_trust_and_roles_are_not_the_users() -> Result<(), Ckr> {
        let ro = Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
        let o = aes(&[t(CKA_CAAS_MAX_USES, attr::ulong(3))])?;
        for copy in [false, true] {
            for ty in [CKA_CAAS_MAX_USES, CKA_CAAS_RATE_PER_SEC] {
                let tmpl = [t(ty, attr::ulong(1_000))];
                assert_eq!(o.apply_template(&tmpl, copy, Role::User).map(|_| ()), ro);
                assert_eq!(o.apply_template(&tmpl, copy, Role::Public).map(|_| ()), ro);
                assert!(o.apply_template(&tmpl, copy, Role::So).is_ok());
            }
        }
        let trusted = [t(CKA_TRUSTED, attr::boolean(true))];
        assert_eq!(
            o.apply_template(&trusted, false, Role::User).map(|_| ()),
            ro
        );
        assert!(o.apply_template(&trusted, false, Role::So).is_ok());
        assert_eq!(aes(&trusted).err(), Some(Ckr(CKR_ATTRIBUTE_READ_ONLY)));
        // CKA_WRAP_WITH_TRUSTED only false -> true.
        let o = aes(&[t(CKA_WRAP_WITH_TRUSTED, attr::boolean(true))])?;
        let off = [t(CKA_WRAP_WITH_TRUSTED, attr::boolean(false))];
        assert_eq!(o.apply_template(&off, false, Role::So).map(|_| ()), ro);
        assert_eq!(o.apply_template(&off, true, Role::User).map(|_| ()), ro);
        // Defaults give the data role; the wrap role cannot be switched on, by set or copy.
        let o = aes(&[])?;
        assert!(o.flag(CKA_ENCRYPT) && o.flag(CKA_DECRYPT) && !o.flag(CKA_WRAP));
        let wrap = [t(CKA_WRAP, attr::boolean(true))];
        for copy in [false, true] {
            assert_eq!(
                o.apply_template(&wrap, copy, Role::So).map(|_| ()),
                Err(Ckr(CKR_TEMPLATE_INCONSISTENT))
            );
        }
        // A wrap key cannot get (nor its copy) the data role back; it may drop a flag.
        let w = aes(&wrap)?;
        assert!(w.flag(CKA_WRAP) && w.flag(CKA_UNWRAP) && !w.flag(CKA_DECRYPT));
        let twin = [
            t(CKA_WRAP, attr::boolean(false)),
            t(CKA_UNWRAP, attr::boolean(false)),
            t(CKA_DECRYPT, attr::boolean(true)),
        ];
        assert_eq!(w.apply_template(&twin, true, Role::User).map(|_| ()), ro);
        assert_eq!(
            w.apply_template(&[t(CKA_DECRYPT, attr::boolean(true))], false, Role::User)
                .map(|_| ()),
            Err(Ckr(CKR_TEMPLATE_INCONSISTENT))
        );
        assert!(
            w.apply_template(&[t(CKA_UNWRAP, attr::boolean(false))], false, Role::User)
                .is_ok()
        );
        // Other usage flags and the mechanism list only narrow too.
        let o = aes(&[
            t(CKA_SIGN, attr::boolean(false)),
            t(CKA_ALLOWED_MECHANISMS, attr::ulong(CKM_AES_GCM)),
        ])?;
        assert_eq!(
            o.apply_template(&[t(CKA_SIGN, attr::boolean(true))], false, Role::So)
                .map(|_| ()),
            ro
        );
        for widen in [
            Vec::new(),
            [attr::ulong(CKM_AES_GCM), attr::ulong(CKM_AES_CBC_PAD)].concat(),
        ] {
            assert_eq!(
                o.apply_template(&[t(CKA_ALLOWED_MECHANISMS, widen)], true, Role::User)
                    .map(|_| ()),
                ro
            );
        }
        let narrowed = aes(&[])?.apply_template(
            &[t(CKA_ALLOWED_MECHANISMS, attr::ulong(CKM_AES_GCM))],
            false,
            Role::User,
        );
        assert!(narrowed.is_ok());
        Ok(())
    }

    #[test]
    fn limits_reject_excess() -> Result<(), Ckr> {
        let o = aes(&[t(CKA_CAAS_MAX_USES, attr::ulong(3))])?;
        for _ in 0..3 {
            o.count_use()?;
        }
        assert_eq!(o.count_use(), Err(Ckr(CKR_FUNCTION_REJECTED)));
        let o = aes(&[t(CKA_CAAS_RATE_PER_SEC, attr::ulong(5))])?;
        let ok = (0..20).filter(|_| o.count_use().is_ok()).count();
        assert!((5..=6).contains(&ok), "{ok} uses allowed");
        Ok(())
    }
}
