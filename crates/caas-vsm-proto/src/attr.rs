//! Canonical attribute values: which CKA_* types hold a CK_ULONG (sent as 8 bytes
//! little-endian), a CK_BBOOL (1 byte) or an array of CK_ULONG; everything else is opaque
//! bytes. Both the module (C ABI <-> canonical) and the crypto domain use this table.

/// The value kind of an attribute type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    /// CK_ULONG.
    Ulong,
    /// CK_BBOOL.
    Bool,
    /// CK_ULONG array (CKA_ALLOWED_MECHANISMS).
    UlongArray,
    /// CK_DATE (8 ASCII digits) or opaque bytes.
    Bytes,
}

/// Vendor attributes of caas: `CKA_VENDOR_DEFINED | 0x0CAA_0000 | n` (bit 30, the
/// array flag, stays clear).
pub const CKA_CAAS_BASE: u64 = 0x8000_0000 | 0x0CAA_0000;
/// Read-only: how many times the key has been used (CK_ULONG).
pub const CKA_CAAS_USAGE_COUNT: u64 = CKA_CAAS_BASE + 1;
/// Tenant limit: total uses allowed over the key's lifetime, 0 = unlimited (CK_ULONG). Set
/// by the creation template; afterwards only the SO changes it (see `caas_domc::policy`).
pub const CKA_CAAS_MAX_USES: u64 = CKA_CAAS_BASE + 2;
/// Tenant limit: uses allowed per second (token bucket, burst = rate), 0 = unlimited. Set
/// like [`CKA_CAAS_MAX_USES`].
pub const CKA_CAAS_RATE_PER_SEC: u64 = CKA_CAAS_BASE + 3;
/// Read-only, set by the crypto domain: the state of the key's AES-GCM IV counter for
/// message-based encryption (16 bytes: the counter value below which IVs may have been
/// issued, then the narrowest counter field used, both u64 little-endian). Not secret.
pub const CKA_CAAS_GCM_IV_STATE: u64 = CKA_CAAS_BASE + 4;

/// The kind of attribute `ty`.
#[must_use]
pub fn kind(ty: u64) -> AttrKind {
    match ty {
        // CKA_CLASS, CKA_CERTIFICATE_TYPE, CKA_KEY_TYPE, CKA_CERTIFICATE_CATEGORY,
        // CKA_JAVA_MIDP_SECURITY_DOMAIN, CKA_NAME_HASH_ALGORITHM, CKA_MODULUS_BITS,
        // CKA_PRIME_BITS, CKA_SUB_PRIME_BITS, CKA_VALUE_BITS, CKA_VALUE_LEN,
        // CKA_KEY_GEN_MECHANISM, CKA_HW_FEATURE_TYPE, CKA_PIXEL_X.., CKA_MECHANISM_TYPE,
        // CKA_PROFILE_ID, CKA_OTP_*.
        0x0000
        | 0x0080
        | 0x0100
        | 0x0087
        | 0x0088
        | 0x008C
        | 0x0121
        | 0x0133
        | 0x0134
        | 0x0160
        | 0x0161
        | 0x0166
        | 0x0300
        | 0x0500
        | 0x0601
        | 0x0220..=0x0228 => AttrKind::Ulong,
        CKA_CAAS_USAGE_COUNT | CKA_CAAS_MAX_USES | CKA_CAAS_RATE_PER_SEC => AttrKind::Ulong,
        // CKA_PARAMETER_SET (PKCS#11 3.2).
        crate::v32::CKA_PARAMETER_SET => AttrKind::Ulong,
        // CKA_ENCAPSULATE, CKA_DECAPSULATE (PKCS#11 3.2).
        crate::v32::CKA_ENCAPSULATE | crate::v32::CKA_DECAPSULATE => AttrKind::Bool,
        // CKA_TOKEN, CKA_PRIVATE, CKA_TRUSTED, CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT,
        // CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY,
        // CKA_VERIFY_RECOVER, CKA_DERIVE, CKA_EXTRACTABLE, CKA_LOCAL,
        // CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_MODIFIABLE, CKA_COPYABLE,
        // CKA_DESTROYABLE, CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED, CKA_RESET_ON_INIT,
        // CKA_HAS_RESET.
        0x0001
        | 0x0002
        | 0x0086
        | 0x0103..=0x010C
        | 0x0162
        | 0x0163
        | 0x0164
        | 0x0165
        | 0x0170
        | 0x0171
        | 0x0172
        | 0x0202
        | 0x0210
        | 0x0301
        | 0x0302 => AttrKind::Bool,
        // CKA_ALLOWED_MECHANISMS
        0x4000_0600 => AttrKind::UlongArray,
        _ => AttrKind::Bytes,
    }
}

/// Canonical encoding of a CK_ULONG.
#[must_use]
pub fn ulong(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Canonical encoding of a CK_BBOOL.
#[must_use]
pub fn boolean(v: bool) -> Vec<u8> {
    vec![u8::from(v)]
}

/// Decodes a canonical CK_ULONG.
#[must_use]
pub fn as_ulong(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_le_bytes)
}

/// Decodes a canonical CK_BBOOL (any non-zero byte is true, as in C).
#[must_use]
pub fn as_bool(v: &[u8]) -> Option<bool> {
    match v {
        [b] => Some(*b != 0),
        _ => None,
    }
}
