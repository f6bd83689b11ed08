//! The VSM policy a workload cannot bypass. The workload holds the user PIN, so anything a
//! PKCS#11 user can do, a compromised workload can do; these rules hold against it (issue 12,
//! Build item 4). [`object`](crate::object) applies the attribute rules at creation and on
//! change, the dispatcher ([`domain`](crate::domain)) the wrap/unwrap rules; every refusal is
//! audited (write-through, like every failure).
//!
//! **Usage limits** (`CKA_CAAS_MAX_USES`, `CKA_CAAS_RATE_PER_SEC`) are set by the creation
//! template (the policy of whoever creates the key: it can only restrict the new key) and
//! afterwards only by the SO (`CKR_ATTRIBUTE_READ_ONLY` for anyone else, also in a
//! `C_CopyObject` template). Since the SO cannot reach private objects (in PKCS#11 they are
//! the normal user's alone), a private key's limits are fixed for its lifetime. A key with a limit cannot be copied
//! (`CKR_ACTION_PROHIBITED`: a copy would start a fresh counter and bucket) nor wrapped
//! (`CKR_KEY_NOT_WRAPPABLE`: an unwrapped copy would carry no limit).
//!
//! **Usage roles.** A wrapping key that can also decrypt reveals every key it wraps
//! (wrap, then `C_Decrypt`; for AES-CBC even a padding oracle suffices). So:
//! - defaults: a key whose template asks for `CKA_WRAP`/`CKA_UNWRAP` gets
//!   `CKA_ENCRYPT`/`CKA_DECRYPT` false by default, and any other key gets
//!   `CKA_WRAP`/`CKA_UNWRAP` false by default (SoftHSM2 defaults all four to true);
//! - after creation usage flags (`CKA_ENCRYPT`, `CKA_DECRYPT`, `CKA_WRAP`, `CKA_UNWRAP`,
//!   `CKA_SIGN`, ...) can only be cleared and `CKA_ALLOWED_MECHANISMS` only narrowed, by
//!   `C_SetAttributeValue` or in a `C_CopyObject` template (a change that would combine
//!   wrap and data roles is `CKR_TEMPLATE_INCONSISTENT`, any other widening
//!   `CKR_ATTRIBUTE_READ_ONLY`): a copy cannot become the decrypting twin of a wrap key,
//!   and what made a wrapping key safe when it wrapped stays true;
//! - a template that asks for both roles explicitly is still accepted (python-pkcs11 asks
//!   for ENCRYPT+DECRYPT+WRAP+UNWRAP by default, PKCS#11 calls such a key valid), but such a
//!   key never wraps a sensitive key (below).
//!
//! **Wrapping a sensitive key** (`CKA_SENSITIVE` true; non-sensitive extractable keys can be
//! read anyway) is allowed only when nobody but the token can open the result:
//! - the mechanism authenticates and has no caller-chosen nonce: the domain's own
//!   `CKM_CAAS_AES_KEY_WRAP_ATTRS`, or AES key wrap (RFC 3394, RFC 5649) or RSA-OAEP;
//!   AES-GCM (a repeated caller IV turns two wraps into a key stream), AES-CBC-PAD and RSA
//!   PKCS#1 v1.5 (padding oracles) give `CKR_KEY_NOT_WRAPPABLE`;
//! - a standard format (AES key wrap, RSA-OAEP) carries no attributes, so it is used only
//!   under a `CKA_TRUSTED` wrapping key (the SO's export and import channel); under any
//!   other key only `CKM_CAAS_AES_KEY_WRAP_ATTRS`, which binds the attributes;
//! - a secret wrapping key was generated in this token and never left it (`CKA_LOCAL`,
//!   `CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE`: an imported or ECDH-derived key's
//!   value is known outside), or is `CKA_TRUSTED` and not extractable;
//! - a public wrapping key is `CKA_TRUSTED` (an imported public key's private half may be
//!   the attacker's);
//! - no object in the token holding the wrapping key's value (the key and its copies or
//!   unwrapped twins) or its RSA modulus (the private half) lets the user read a wrap: none
//!   has `CKA_DECRYPT`, a secret one none unwraps without the rule below, a private one
//!   none unwraps with PKCS#1 v1.5 or signs with raw RSA (`CKM_RSA_X_509`).
//!
//! **Unwrapping** never yields a key less protected than the wrapped one. The domain's own
//! format, `CKM_CAAS_AES_KEY_WRAP_ATTRS` ([`wrap`](crate::wrap)), carries the wrapped key's
//! class, type, CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, usage flags,
//! mechanism list and CKA_COPYABLE/CKA_MODIFIABLE/CKA_DESTROYABLE authenticated, and an
//! unwrap template may only strengthen them. Standard wrap formats carry no attributes, so
//! when the unwrapping key could have wrapped a sensitive key (it is trusted, its value
//! never left the token, or it is a private key) the token assumes the strongest: the
//! unwrapped key is `CKA_SENSITIVE` (a template asking otherwise is
//! `CKR_TEMPLATE_INCONSISTENT`; a caller who wants a readable key with a known value uses
//! `C_CreateObject`), and `CKA_WRAP_WITH_TRUSTED` when the unwrapping key is trusted or a
//! private key. Under any other key only readable keys were ever wrapped, and the template
//! is honoured
//! (pkcs11-tool unwraps with `CKA_SENSITIVE` false). Unwrapped keys are never `CKA_LOCAL`,
//! `CKA_ALWAYS_SENSITIVE` or `CKA_NEVER_EXTRACTABLE`; `CKA_EXTRACTABLE` stays as asked: the
//! wrapped key was extractable, or it could not have been wrapped. AES-CBC-PAD is refused
//! as an unwrap mechanism (`CKR_MECHANISM_INVALID`): its padding check is a decryption
//! oracle that also opens AES key wrap blobs under the same key.
//!
//! **Trust.** `CKA_TRUSTED` is the SO's: only the SO sets it, either way
//! (`CKR_ATTRIBUTE_READ_ONLY` otherwise; SoftHSM2 lets anyone clear it, but a user who
//! could clear it would lift the unwrap rule above); a copy keeps it. A key with
//! `CKA_WRAP_WITH_TRUSTED` is wrapped only by a trusted key (`CKR_KEY_NOT_WRAPPABLE`), and
//! `CKA_WRAP_WITH_TRUSTED` only goes from false to true.
//!
//! Left open, on the SO's channel only: a sensitive key wrapped with a standard mechanism
//! under a trusted key and unwrapped in this token gets the usage flags, key type and
//! mechanism list the unwrap template asks (its sensitivity and CKA_WRAP_WITH_TRUSTED are
//! forced), e.g. an encrypt-only key can come back able to decrypt. CKA_UNWRAP_TEMPLATE on
//! the trusted key would close it; it needs attribute arrays in the protocol. As in every
//! PKCS#11 token, `CKM_RSA_PKCS` unwrap with a private key is a Bleichenbacher oracle for
//! ciphertexts to that key, which is why such a key's public half never wraps a sensitive
//! key.

use crate::error::Ckr;
use crate::object::{Attrs, Object};
use caas_vsm_proto::Attr;
use caas_vsm_proto::attr::{self, CKA_CAAS_MAX_USES, CKA_CAAS_RATE_PER_SEC};
use cryptoki_sys::*;

/// Who asks for an object change (from the application's login state on the slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not logged in.
    Public,
    /// The normal user (what a workload is).
    User,
    /// The security officer.
    So,
}

impl Role {
    /// The role of a login state (`CKU_*` or none).
    #[must_use]
    pub fn of(login: Option<u64>) -> Self {
        match login {
            Some(CKU_SO) => Role::So,
            Some(CKU_USER) => Role::User,
            _ => Role::Public,
        }
    }
}

/// The usage-limit attributes.
#[must_use]
pub fn is_limit(ty: u64) -> bool {
    matches!(ty, CKA_CAAS_MAX_USES | CKA_CAAS_RATE_PER_SEC)
}

/// The usage flags that decide a key's role (wrap or data).
pub const ROLE_FLAGS: [u64; 4] = [CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP];

/// Every usage flag; after creation they can only be cleared (a raw RSA signature is a
/// decryption, so even CKA_SIGN switched on later could open an RSA-OAEP wrap).
pub const USAGE_FLAGS: [u64; 11] = [
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_DERIVE,
    caas_vsm_proto::v32::CKA_ENCAPSULATE,
    caas_vsm_proto::v32::CKA_DECAPSULATE,
];

fn flag(m: &Attrs, ty: u64) -> bool {
    m.get(&ty).and_then(|v| attr::as_bool(v)) == Some(true)
}

/// Whether a key with these attributes has both the wrap role and the data role.
#[must_use]
pub fn dual_role(m: &Attrs) -> bool {
    (flag(m, CKA_WRAP) || flag(m, CKA_UNWRAP)) && (flag(m, CKA_ENCRYPT) || flag(m, CKA_DECRYPT))
}

/// Fills the usage flags a creation template left open: wrap role or data role, not both.
pub fn usage_defaults(m: &mut Attrs, class: u64, template: &[Attr]) {
    let asked = |ty| {
        template
            .iter()
            .rev()
            .find(|a| a.ty == ty)
            .and_then(|a| attr::as_bool(&a.value.0))
            == Some(true)
    };
    let (wrap_role, data_role): (&[u64], &[u64]) = match class {
        CKO_SECRET_KEY => (&[CKA_WRAP, CKA_UNWRAP], &[CKA_ENCRYPT, CKA_DECRYPT]),
        CKO_PUBLIC_KEY => (&[CKA_WRAP], &[CKA_ENCRYPT]),
        CKO_PRIVATE_KEY => (&[CKA_UNWRAP], &[CKA_DECRYPT]),
        _ => return,
    };
    let wrap = wrap_role.iter().any(|t| asked(*t));
    for t in wrap_role {
        m.entry(*t).or_insert_with(|| attr::boolean(wrap));
    }
    for t in data_role {
        m.entry(*t).or_insert_with(|| attr::boolean(!wrap));
    }
}

/// Checks that a change from `before` to `after` switches no usage flag on and does not
/// widen CKA_ALLOWED_MECHANISMS: a change that would combine the wrap and data roles is
/// CKR_TEMPLATE_INCONSISTENT, any other widening CKR_ATTRIBUTE_READ_ONLY.
pub fn check_role_change(before: &Attrs, after: &Attrs) -> Result<(), Ckr> {
    let on = USAGE_FLAGS
        .iter()
        .any(|t| !flag(before, *t) && flag(after, *t));
    if on && dual_role(after) && !dual_role(before) {
        return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
    }
    if on || widens_mechanisms(before, after) {
        return Err(Ckr(CKR_ATTRIBUTE_READ_ONLY));
    }
    Ok(())
}

/// Whether CKA_ALLOWED_MECHANISMS grows (empty means every mechanism).
fn widens_mechanisms(before: &Attrs, after: &Attrs) -> bool {
    let list = |m: &Attrs| -> Vec<u64> {
        m.get(&CKA_ALLOWED_MECHANISMS)
            .map(|v| v.chunks_exact(8).filter_map(attr::as_ulong).collect())
            .unwrap_or_default()
    };
    let (old, new) = (list(before), list(after));
    if old.is_empty() {
        return false;
    }
    new.is_empty() || new.iter().any(|m| !old.contains(m))
}

/// Whether a key carries a usage limit.
#[must_use]
pub fn has_limit(o: &Object) -> bool {
    o.ulong(CKA_CAAS_MAX_USES).unwrap_or(0) > 0 || o.ulong(CKA_CAAS_RATE_PER_SEC).unwrap_or(0) > 0
}

/// Mechanisms that may wrap a sensitive key: authenticated, no caller-chosen nonce.
#[must_use]
pub fn wraps_sensitive(mech: u64) -> bool {
    matches!(
        mech,
        CKM_AES_KEY_WRAP
            | CKM_AES_KEY_WRAP_PAD
            | CKM_AES_KEY_WRAP_KWP
            | CKM_RSA_PKCS_OAEP
            | crate::wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS
    )
}

/// Whether a secret key's value never left the token: generated here, always sensitive and
/// never extractable (copies keep these token-set flags).
#[must_use]
pub fn inside_only(k: &Object) -> bool {
    k.flag(CKA_LOCAL) && k.flag(CKA_ALWAYS_SENSITIVE) && k.flag(CKA_NEVER_EXTRACTABLE)
}

/// Whether a secret key may wrap a sensitive key: its value never left the token, or the SO
/// trusts it and it cannot be extracted now (so no new copy of its value can appear).
#[must_use]
pub fn secret_wrapping_key_is_safe(wk: &Object) -> bool {
    inside_only(wk) || (wk.flag(CKA_TRUSTED) && !wk.flag(CKA_EXTRACTABLE))
}

fn allows(o: &Object, mech: u64) -> bool {
    let allowed = o.bytes(CKA_ALLOWED_MECHANISMS).unwrap_or_default();
    allowed.is_empty()
        || allowed
            .chunks_exact(8)
            .any(|c| attr::as_ulong(c) == Some(mech))
}

/// Whether `o`, an object holding a wrapping key's value (a secret key or a copy of it, or
/// the private half of an RSA wrapping key), lets its holder read what that key wraps:
/// CKA_DECRYPT; for a secret key, CKA_UNWRAP without the forced unwrap rule (it would
/// unwrap as readable); for an RSA private key, CKM_RSA_PKCS unwrap (a Bleichenbacher
/// oracle) or CKM_RSA_X_509 signing (a raw private-key operation).
#[must_use]
pub fn opens_wraps(o: &Object) -> bool {
    if o.flag(CKA_DECRYPT) {
        return true;
    }
    match o.class() {
        CKO_SECRET_KEY => o.flag(CKA_UNWRAP) && !may_hold_sensitive(o),
        CKO_PRIVATE_KEY => {
            (o.flag(CKA_UNWRAP) && allows(o, CKM_RSA_PKCS))
                || (o.flag(CKA_SIGN) && allows(o, CKM_RSA_X_509))
        }
        _ => false,
    }
}

/// Whether a blob under `unwrapping_key` may hold a sensitive key: the key is trusted, its
/// value never left the token, or it is a private key (whose public half may be trusted;
/// the token does not track which public key objects once were). Only the token-set
/// CKA_LOCAL/CKA_ALWAYS_SENSITIVE/CKA_NEVER_EXTRACTABLE and the SO-only CKA_TRUSTED decide,
/// so the user cannot flip the answer.
#[must_use]
pub fn may_hold_sensitive(unwrapping_key: &Object) -> bool {
    unwrapping_key.class() == CKO_PRIVATE_KEY
        || inside_only(unwrapping_key)
        || unwrapping_key.flag(CKA_TRUSTED)
}

/// Checks the template of `C_UnwrapKey` against the unwrap rules and returns the attributes
/// the token forces on the new key.
pub fn unwrap_forced(template: &[Attr], unwrapping_key: &Object) -> Result<Vec<Attr>, Ckr> {
    let asked_false = |ty| {
        template
            .iter()
            .any(|a| a.ty == ty && attr::as_bool(&a.value.0) == Some(false))
    };
    if !may_hold_sensitive(unwrapping_key) {
        // Only keys whose values were readable anyway were wrapped under it.
        return Ok(Vec::new());
    }
    if asked_false(CKA_SENSITIVE) {
        return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
    }
    let mut forced = vec![Attr {
        ty: CKA_SENSITIVE,
        value: caas_vsm_proto::Blob(attr::boolean(true)),
    }];
    // A trusted key (or a private key, whose public half may be trusted) may have wrapped
    // a key that only trusted keys may wrap.
    if unwrapping_key.flag(CKA_TRUSTED) || unwrapping_key.class() == CKO_PRIVATE_KEY {
        if asked_false(CKA_WRAP_WITH_TRUSTED) {
            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
        }
        forced.push(Attr {
            ty: CKA_WRAP_WITH_TRUSTED,
            value: caas_vsm_proto::Blob(attr::boolean(true)),
        });
    }
    Ok(forced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caas_vsm_proto::Blob;

    fn t(ty: u64, v: bool) -> Attr {
        Attr {
            ty,
            value: Blob(attr::boolean(v)),
        }
    }

    #[test]
    fn defaults_give_one_role() {
        let mut m = Attrs::new();
        usage_defaults(&mut m, CKO_SECRET_KEY, &[]);
        assert!(flag(&m, CKA_ENCRYPT) && flag(&m, CKA_DECRYPT));
        assert!(!flag(&m, CKA_WRAP) && !flag(&m, CKA_UNWRAP));
        let mut m = Attrs::new();
        let tmpl = [t(CKA_WRAP, true)];
        for a in &tmpl {
            m.insert(a.ty, a.value.0.clone());
        }
        usage_defaults(&mut m, CKO_SECRET_KEY, &tmpl);
        assert!(flag(&m, CKA_WRAP) && flag(&m, CKA_UNWRAP));
        assert!(!flag(&m, CKA_ENCRYPT) && !flag(&m, CKA_DECRYPT));
        let mut m = Attrs::new();
        usage_defaults(&mut m, CKO_PRIVATE_KEY, &[]);
        assert!(flag(&m, CKA_DECRYPT) && !flag(&m, CKA_UNWRAP));
    }
}
