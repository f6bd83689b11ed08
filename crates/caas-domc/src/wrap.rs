//! `CKM_CAAS_AES_KEY_WRAP_ATTRS`: the crypto domain's own key wrap format, which carries the
//! wrapped key's protective attributes authenticated, so `C_UnwrapKey` can never produce a
//! key less protected than the wrapped one (standard formats carry no attributes; see
//! [`policy`](crate::policy) for what the token does with those).
//!
//! Blob: `"CAW1" || header length (u32 LE) || header || envelope`, where the envelope is
//! `caas_crypto::aead::seal` (random nonce || AES-256-GCM(key bytes) || tag) with everything
//! before it as AAD. The GCM key is derived from the wrapping key's AES value with the
//! SP 800-108 KDF (`caas_crypto::kdf`, label `caas-domc wrap v1`), so the format shares no
//! key with AES key wrap or `C_Encrypt` under the same key; the nonce is the token's own
//! random (no caller-chosen nonce). The header is the wrapped key's class, key type, CKA_SENSITIVE,
//! CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, usage flags, CKA_ALLOWED_MECHANISMS and
//! CKA_COPYABLE/CKA_MODIFIABLE/CKA_DESTROYABLE, as `type (u64 LE) || length (u32 LE) ||
//! value` entries.
//!
//! At unwrap the header is the floor: the template may only strengthen it (CKA_SENSITIVE and
//! CKA_WRAP_WITH_TRUSTED only to true, CKA_EXTRACTABLE, usage flags and CKA_COPYABLE/
//! CKA_MODIFIABLE/CKA_DESTROYABLE only to false, the mechanism list only narrowed; class
//! and key type as wrapped), anything else is `CKR_TEMPLATE_INCONSISTENT`. Non-protective attributes (label, id, CKA_TOKEN, ...)
//! come from the template as usual.

use crate::error::Ckr;
use crate::object::{Attrs, Object};
use crate::policy::USAGE_FLAGS;
use caas_crypto::{SecretKey, aead, kdf};
use caas_vsm_proto::attr;
use caas_vsm_proto::{Attr, Blob};
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// The vendor mechanism (`CKM_VENDOR_DEFINED | 0x0CAA_0001`), no parameter.
pub const CKM_CAAS_AES_KEY_WRAP_ATTRS: u64 = CKM_VENDOR_DEFINED | 0x0CAA_0001;

const MAGIC: &[u8; 4] = b"CAW1";
const INFO: &[u8] = b"caas-domc wrap v1";

/// The attributes bound into a blob.
fn bound_types() -> impl Iterator<Item = u64> {
    [
        CKA_CLASS,
        CKA_KEY_TYPE,
        CKA_SENSITIVE,
        CKA_EXTRACTABLE,
        CKA_WRAP_WITH_TRUSTED,
        CKA_ALLOWED_MECHANISMS,
        // An unwrap is a copy: it must not shed CKA_COPYABLE (nor the other two) false.
        CKA_COPYABLE,
        CKA_MODIFIABLE,
        CKA_DESTROYABLE,
    ]
    .into_iter()
    .chain(USAGE_FLAGS)
}

fn gcm_key(kek: &[u8]) -> Result<SecretKey, Ckr> {
    if !matches!(kek.len(), 16 | 24 | 32) {
        return Err(Ckr(CKR_WRAPPING_KEY_SIZE_RANGE));
    }
    kdf::derive_key(kek, INFO, b"").map_err(|_| Ckr(CKR_FUNCTION_FAILED))
}

/// Wraps `plain` (the key bytes of `k`) under the AES value `kek`, binding `k`'s attributes.
pub fn seal(kek: &[u8], k: &Object, plain: &[u8]) -> Result<Vec<u8>, Ckr> {
    let attrs = k.snapshot();
    let mut header = Vec::new();
    for ty in bound_types() {
        let Some(v) = attrs.get(&ty) else {
            continue;
        };
        let len = u32::try_from(v.len()).map_err(|_| Ckr(CKR_KEY_NOT_WRAPPABLE))?;
        header.extend_from_slice(&ty.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(v);
    }
    let hlen = u32::try_from(header.len()).map_err(|_| Ckr(CKR_KEY_NOT_WRAPPABLE))?;
    let mut out = Vec::with_capacity(8 + header.len() + plain.len() + aead::OVERHEAD);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(&header);
    let envelope = aead::seal(&gcm_key(kek)?, &out, plain).map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
    out.extend_from_slice(&envelope);
    Ok(out)
}

/// Opens a blob under the AES value `kek`: the bound attributes and the key bytes.
/// Anything malformed or forged is CKR_WRAPPED_KEY_INVALID.
pub fn open(kek: &[u8], blob: &[u8]) -> Result<(Attrs, Zeroizing<Vec<u8>>), Ckr> {
    let bad = Ckr(CKR_WRAPPED_KEY_INVALID);
    let rest = blob.strip_prefix(MAGIC.as_slice()).ok_or(bad)?;
    let (hlen, rest) = rest.split_first_chunk::<4>().ok_or(bad)?;
    let hlen = usize::try_from(u32::from_le_bytes(*hlen)).map_err(|_| bad)?;
    if rest.len() < hlen {
        return Err(bad);
    }
    let (header, envelope) = rest.split_at(hlen);
    let aad = &blob[..blob.len() - envelope.len()];
    let plain = aead::open(&gcm_key(kek)?, aad, envelope).map_err(|_| bad)?;
    let plain = Zeroizing::new(plain.expose().to_vec());
    let mut attrs = Attrs::new();
    let mut h = header;
    while !h.is_empty() {
        let (ty, r) = h.split_first_chunk::<8>().ok_or(bad)?;
        let (len, r) = r.split_first_chunk::<4>().ok_or(bad)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| bad)?;
        if r.len() < len {
            return Err(bad);
        }
        let ty = u64::from_le_bytes(*ty);
        if !bound_types().any(|t| t == ty) || attrs.insert(ty, r[..len].to_vec()).is_some() {
            return Err(bad);
        }
        h = &r[len..];
    }
    if !attrs.contains_key(&CKA_CLASS) || !attrs.contains_key(&CKA_KEY_TYPE) {
        return Err(bad);
    }
    Ok((attrs, plain))
}

fn is_true(v: &[u8]) -> bool {
    attr::as_bool(v) == Some(true)
}

/// The unwrap template: the bound attributes of the blob, then the caller's `template`
/// where it only strengthens them (CKR_TEMPLATE_INCONSISTENT otherwise).
pub fn merge(bound: &Attrs, template: Vec<Attr>) -> Result<Vec<Attr>, Ckr> {
    let no = Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
    for a in &template {
        if !bound_types().any(|t| t == a.ty) {
            continue;
        }
        // A bound attribute the wrapped key did not have counts as false / empty.
        let b: &[u8] = bound.get(&a.ty).map_or(&[], Vec::as_slice);
        let v = &a.value.0[..];
        let ok = match a.ty {
            CKA_CLASS | CKA_KEY_TYPE => v == b,
            CKA_SENSITIVE | CKA_WRAP_WITH_TRUSTED => is_true(v) || !is_true(b),
            CKA_EXTRACTABLE => !is_true(v) || is_true(b),
            CKA_ALLOWED_MECHANISMS => {
                let list = |x: &[u8]| -> Vec<u64> {
                    x.chunks_exact(8).filter_map(attr::as_ulong).collect()
                };
                let (old, new) = (list(b), list(v));
                old.is_empty() || (!new.is_empty() && new.iter().all(|m| old.contains(m)))
            }
            // Usage flags, CKA_COPYABLE/CKA_MODIFIABLE/CKA_DESTROYABLE: only cleared.
            _ => !is_true(v) || is_true(b),
        };
        if !ok {
            return no;
        }
    }
    let mut out: Vec<Attr> = bound
        .iter()
        .map(|(ty, v)| Attr {
            ty: *ty,
            value: Blob(v.clone()),
        })
        .collect();
    out.extend(template);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{self, Origin};
    use crate::policy::Role;

    fn key() -> Result<Object, Ckr> {
        let t = |ty, v| Attr {
            ty,
            value: Blob(attr::boolean(v)),
        };
        let (a, s) = object::build(
            &[
                t(CKA_EXTRACTABLE, true),
                t(CKA_ENCRYPT, true),
                t(CKA_DECRYPT, false),
                t(CKA_COPYABLE, false),
            ],
            CKO_SECRET_KEY,
            Some(CKK_AES),
            Origin::Generated(CKM_AES_KEY_GEN),
            &[(CKA_VALUE_LEN, attr::ulong(16))],
            Some(Zeroizing::new(vec![3u8; 16])),
            Role::User,
        )?;
        Ok(Object::new(1, None, a, s, 0))
    }

    #[test]
    fn round_trip_binds_attributes_and_detects_tampering() -> Result<(), Ckr> {
        let k = key()?;
        let kek = [9u8; 32];
        let blob = seal(&kek, &k, &[3u8; 16])?;
        let (bound, plain) = open(&kek, &blob)?;
        assert_eq!(&plain[..], &[3u8; 16]);
        assert_eq!(bound.get(&CKA_DECRYPT), Some(&attr::boolean(false)));
        // Any flipped bit (header or ciphertext) and any other key fail.
        for i in [5, 20, blob.len() - 1] {
            let mut b = blob.clone();
            b[i] ^= 1;
            assert_eq!(open(&kek, &b).err(), Some(Ckr(CKR_WRAPPED_KEY_INVALID)));
        }
        assert_eq!(
            open(&[8u8; 32], &blob).err(),
            Some(Ckr(CKR_WRAPPED_KEY_INVALID))
        );
        assert_eq!(
            open(&kek, &blob[..10]).err(),
            Some(Ckr(CKR_WRAPPED_KEY_INVALID))
        );
        // The template may strengthen, not weaken.
        let set = |ty, v| Attr {
            ty,
            value: Blob(attr::boolean(v)),
        };
        for weaker in [
            set(CKA_SENSITIVE, false),
            set(CKA_DECRYPT, true),
            set(CKA_COPYABLE, true),
            Attr {
                ty: CKA_KEY_TYPE,
                value: Blob(attr::ulong(CKK_GENERIC_SECRET)),
            },
        ] {
            assert_eq!(
                merge(&bound, vec![weaker]).err(),
                Some(Ckr(CKR_TEMPLATE_INCONSISTENT))
            );
        }
        let t = merge(
            &bound,
            vec![set(CKA_EXTRACTABLE, false), set(CKA_ENCRYPT, false)],
        )?;
        assert_eq!(object::tmpl_bool(&t, CKA_EXTRACTABLE), Some(false));
        assert_eq!(object::tmpl_bool(&t, CKA_SENSITIVE), Some(true));
        Ok(())
    }
}
