//! Object-row authentication: every object row carries a MAC, computed by the writer when it
//! assigns the row's revision and checked on every read, so that the database (and whoever
//! administers it) cannot edit, swap, copy or re-point a row without the reader noticing.
//!
//! The MAC is the authenticator's tag over [`record_mac_input`]`(kind, account, id, rev, body)`,
//! the unambiguous encoding
//! `"caas/store/object/v1" ‖ F(kind) ‖ F(account) ‖ F(id) ‖ rev as i64 BE ‖ F(body)` and
//! `F(x)` is the byte length of `x` as u64 BE followed by `x`. The key service supplies the
//! authenticator (HMAC-SHA256 under a key the database never sees, [`HmacRecordKey`]).
//!
//! What this does not cover: a row can be *deleted*, and an *older version of the same row*
//! (same kind, account and id, with the MAC it had then) can be put back — the MAC proves
//! that the key service wrote those bytes under that name at that revision, not that it is
//! the latest revision. The revision floors of a running store (`floor.rs`) refuse the
//! latter; see ARCHITECTURE.md (Trust boundaries) for what remains.

use aws_lc_rs::hmac;

/// Computes the MAC of object rows (the key service derives its key; the database never
/// holds it).
pub trait RecordAuthenticator: Send + Sync + 'static {
    /// The 32-byte tag of the concatenation of `parts` (the pieces of a canonical row
    /// encoding, [`record_mac_input`], given one by one so that no row body is copied).
    fn tag(&self, parts: &[&[u8]]) -> [u8; 32];

    /// The bytes stored in the row's `mac` column. Default: the tag. An authenticator
    /// with several key versions (a KMS domain's key epochs) prefixes the version here.
    fn seal(&self, parts: &[&[u8]]) -> Vec<u8> {
        self.tag(parts).to_vec()
    }

    /// Whether `stored` (the row's `mac` column) authenticates `parts`. Default: constant-
    /// time equality with the tag. An authenticator with key versions checks `stored`
    /// under the version it names, and refuses versions it no longer trusts.
    fn check(&self, parts: &[&[u8]], stored: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.tag(parts), stored).is_ok()
    }
}

/// HMAC-SHA256 record authenticator.
pub struct HmacRecordKey(hmac::Key);

impl HmacRecordKey {
    /// A record authenticator keyed with `key` (use at least 32 random bytes).
    pub fn new(key: &[u8]) -> Self {
        HmacRecordKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }
}

impl std::fmt::Debug for HmacRecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacRecordKey([REDACTED])")
    }
}

impl RecordAuthenticator for HmacRecordKey {
    fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(p);
        }
        let t = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(t.as_ref());
        out
    }
}

const DOMAIN: &[u8] = b"caas/store/object/v1";

/// The canonical bytes a row's MAC covers (see the module documentation).
pub fn record_mac_input(kind: &str, account: &str, id: &str, rev: i64, body: &[u8]) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut m =
        Vec::with_capacity(DOMAIN.len() + 40 + kind.len() + account.len() + id.len() + body.len());
    m.extend_from_slice(DOMAIN);
    field(&mut m, kind.as_bytes());
    field(&mut m, account.as_bytes());
    field(&mut m, id.as_bytes());
    m.extend_from_slice(&rev.to_be_bytes());
    field(&mut m, body);
    m
}

/// [`record_mac_input`]'s encoding in pieces, handed to `f` (so that no row body is copied).
fn with_parts<T>(
    kind: &str,
    account: &str,
    id: &str,
    rev: i64,
    body: &[u8],
    f: impl FnOnce(&[&[u8]]) -> T,
) -> T {
    let len = |b: &[u8]| (b.len() as u64).to_be_bytes();
    let (k, a, i, b) = (
        len(kind.as_bytes()),
        len(account.as_bytes()),
        len(id.as_bytes()),
        len(body),
    );
    f(&[
        DOMAIN,
        &k,
        kind.as_bytes(),
        &a,
        account.as_bytes(),
        &i,
        id.as_bytes(),
        &rev.to_be_bytes(),
        &b,
        body,
    ])
}

/// The row's tag: [`record_mac_input`]'s encoding, streamed into the authenticator.
#[cfg(test)]
fn row_tag(
    auth: &dyn RecordAuthenticator,
    kind: &str,
    account: &str,
    id: &str,
    rev: i64,
    body: &[u8],
) -> [u8; 32] {
    with_parts(kind, account, id, rev, body, |p| auth.tag(p))
}

/// What the writer stores in the row's `mac` column ([`RecordAuthenticator::seal`]).
pub(crate) fn tag_row(
    auth: &dyn RecordAuthenticator,
    kind: &str,
    account: &str,
    id: &str,
    rev: i64,
    body: &[u8],
) -> Vec<u8> {
    with_parts(kind, account, id, rev, body, |p| auth.seal(p))
}

/// An object row as read, before its MAC is checked.
#[derive(Debug, Clone)]
pub(crate) struct RawObject {
    pub obj: crate::Object,
    /// NULL (a row not written by this code) reads as None.
    pub mac: Option<Vec<u8>>,
}

impl RawObject {
    /// True when the stored MAC matches the row's kind, account, id, rev and body.
    pub fn verify(&self, auth: &dyn RecordAuthenticator) -> bool {
        let Some(mac) = &self.mac else {
            return false;
        };
        let o = &self.obj;
        with_parts(&o.kind, &o.account, &o.id, o.rev, &o.body, |p| {
            auth.check(p, mac)
        })
    }
}

/// A row that failed its integrity check: where it is, never what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    /// Object kind.
    pub kind: String,
    /// Owning account (as stored).
    pub account: String,
    /// Object id.
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed tag is the tag of [`record_mac_input`]'s bytes (one encoding, two forms).
    #[test]
    fn streamed_tag_equals_tag_of_the_canonical_encoding() {
        let k = HmacRecordKey::new(&[7u8; 32]);
        let whole = record_mac_input("key", "111122223333", "k1", 3, b"{\"a\":1}");
        assert_eq!(
            row_tag(&k, "key", "111122223333", "k1", 3, b"{\"a\":1}"),
            k.tag(&[&whole])
        );
        assert_ne!(
            row_tag(&k, "key", "111122223333", "k1", 4, b"{\"a\":1}"),
            k.tag(&[&whole])
        );
    }
}
