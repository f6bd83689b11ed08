//! Single-round-trip cryptographic operations.
//!
//! Over a socket, a signature costs one round trip per call, and a typical application makes
//! three calls per signature (`C_SignInit`, `C_Sign` to learn the length, `C_Sign` again);
//! on a small machine the context switches of those round trips cost more than the
//! signature. This module makes the usual single-part sequence cost **one** round trip:
//!
//! - **`C_*Init` is validated once, then recorded locally.** The first `C_SignInit` (or
//!   `C_VerifyInit`, `C_EncryptInit`, `C_DecryptInit`) of a session with a given key and
//!   mechanism (parameters included) goes to the crypto domain, which runs every check and
//!   starts the operation there (the classic path). After that, the same (key, mechanism)
//!   in the same session is *validated*: a later `C_*Init` only records the operation in the
//!   module (`Pending`) and answers CKR_OK without a round trip.
//! - **The single-part call carries the init.** `C_Sign` on a recorded operation sends one
//!   fused request (`SignOnce`: mechanism, key, data); the domain re-runs every init check,
//!   counts and audits the key use and answers the whole output. The module then runs the
//!   PKCS#11 length-query protocol itself: a length query (NULL buffer) or a too-small buffer
//!   keeps the output (zeroized on drop) for the next call with the same input, so
//!   `C_Sign(NULL)` + `C_Sign(buf)` is still one round trip. `C_Verify` works the same way
//!   (`VerifyOnce`), and so do `C_Encrypt`/`C_Decrypt`.
//! - **Multi-part keeps working.** `C_*Update`/`C_*Final` on a recorded operation first sends
//!   the real `C_*Init` to the domain, then the call itself.
//!
//! **Where an error is reported.** A `C_*Init` that the domain has never accepted for this
//! session, key and mechanism always goes to the domain, so every deterministic init error
//! (CKR_KEY_HANDLE_INVALID, CKR_KEY_TYPE_INCONSISTENT, CKR_KEY_FUNCTION_NOT_PERMITTED,
//! CKR_MECHANISM_INVALID, CKR_MECHANISM_PARAM_INVALID, CKR_KEY_SIZE_RANGE,
//! CKR_USER_NOT_LOGGED_IN, CKR_SESSION_HANDLE_INVALID, CKR_OPERATION_ACTIVE) still comes from
//! `C_*Init`. The validation is forgotten whenever this application does anything that can
//! change the answer (C_DestroyObject, C_SetAttributeValue, C_Login, C_Logout, C_InitToken,
//! closing sessions, any transport failure). What the module cannot see is another
//! application changing the key between two operations (destroying it, clearing CKA_SIGN,
//! re-initialising the token); then the fused call fails and the error (for example
//! CKR_KEY_HANDLE_INVALID) comes from `C_Sign` and terminates the operation. That is the same
//! race as the key being destroyed between `C_SignInit` and `C_Sign` on any token; PKCS#11
//! v2.40 leaves the outcome of an operation whose key another session destroys undefined.
//! Such a failure also drops the validation, so the next `C_*Init` asks the domain again and
//! reports the error itself.
//! The per-key misuse limits are counted when the key is used: on the fast path that is at
//! `C_Sign`, whose v2.40 return values include CKR_FUNCTION_REJECTED (the `C_SignInit` list
//! does not).

use caas_vsm_proto::{Blob, Body, Mechanism, Request};
use cryptoki_sys::{CK_RV, CKR_BUFFER_TOO_SMALL, CKR_DEVICE_ERROR, CKR_OK, CKR_OPERATION_ACTIVE};
use std::collections::HashMap;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The four operation kinds with a fused single-part form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// C_Sign*.
    Sign = 0,
    /// C_Verify*.
    Verify = 1,
    /// C_Encrypt*.
    Encrypt = 2,
    /// C_Decrypt*.
    Decrypt = 3,
}

impl Kind {
    fn init_request(self, session: u64, mechanism: Mechanism, key: u64) -> Request {
        match self {
            Self::Sign => Request::SignInit {
                session,
                mechanism,
                key,
            },
            Self::Verify => Request::VerifyInit {
                session,
                mechanism,
                key,
            },
            Self::Encrypt => Request::EncryptInit {
                session,
                mechanism,
                key,
            },
            Self::Decrypt => Request::DecryptInit {
                session,
                mechanism,
                key,
            },
        }
    }

    fn once_request(self, session: u64, mechanism: Mechanism, key: u64, data: &[u8]) -> Request {
        let data = Blob::from(data);
        match self {
            Self::Sign => Request::SignOnce {
                session,
                mechanism,
                key,
                data,
            },
            Self::Encrypt => Request::EncryptOnce {
                session,
                mechanism,
                key,
                data,
            },
            // Verify has its own entry ([`Ops::verify`]); [`Ops::single`] refuses it.
            Self::Decrypt | Self::Verify => Request::DecryptOnce {
                session,
                mechanism,
                key,
                data,
            },
        }
    }
}

/// Output kept for the second call of the length-query protocol.
struct Cached {
    input: Zeroizing<Vec<u8>>,
    output: Zeroizing<Vec<u8>>,
}

/// An operation recorded by the module only (the domain knows nothing of it yet).
struct Pending {
    mechanism: Mechanism,
    key: u64,
    cached: Option<Cached>,
}

/// Validations kept per session (the oldest is forgotten first).
const MAX_VALIDATED: usize = 8;

#[derive(Default)]
struct SessionOps {
    slot: u64,
    local: [Option<Pending>; 4],
    /// The domain may hold an active operation of this kind (started through it): the
    /// module then takes the classic path so that the domain decides.
    remote: [bool; 4],
    validated: Vec<(Kind, u64, Mechanism)>,
}

impl SessionOps {
    /// After a fused call failed with `rv`: when the failure is one C_*Init would have
    /// reported (the key was destroyed or changed by another application, the domain
    /// restarted...), the validation is dropped so that the next C_*Init asks the domain
    /// and reports it there. Data-dependent failures (a bad signature...) keep it.
    fn forget_if_stale(&mut self, kind: Kind, key: u64, rv: CK_RV) {
        use cryptoki_sys::*;
        if matches!(
            rv,
            CKR_KEY_HANDLE_INVALID
                | CKR_KEY_FUNCTION_NOT_PERMITTED
                | CKR_KEY_TYPE_INCONSISTENT
                | CKR_KEY_SIZE_RANGE
                | CKR_USER_NOT_LOGGED_IN
                | CKR_SESSION_HANDLE_INVALID
                | CKR_MECHANISM_INVALID
                | CKR_MECHANISM_PARAM_INVALID
                | CKR_DEVICE_ERROR
                | CKR_DEVICE_REMOVED
        ) {
            self.validated
                .retain(|(vk, vh, _)| !(*vk == kind && *vh == key));
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Bumped at every invalidation, so that a validation racing with one is not kept.
    epoch: u64,
    sessions: U64Map<SessionOps>,
}

/// A map keyed by session handles or answer positions: numbers this module and its own
/// crypto domain assign, so SipHash's resistance to chosen keys buys nothing there, while
/// it cost ~10 % of the module's instructions per signature (callgrind, 8 threads); foldhash's
/// fast hasher instead.
pub(crate) type U64Map<V> = HashMap<u64, V, foldhash::fast::RandomState>;

/// What a single-part call on a recorded operation hands back to the C layer.
pub(crate) enum Delivery {
    /// Length query: the output length (the output is kept).
    Len(usize),
    /// The caller's buffer is too small for this many bytes (the output is kept).
    TooSmall(usize),
    /// The output; the operation is finished.
    Data(Zeroizing<Vec<u8>>),
}

/// How a forwarded (classic-path) call ended, for the operation bookkeeping.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// C_Sign/C_Encrypt/C_Decrypt or C_*Final; `length_query` when the output buffer was NULL.
    Output {
        /// The caller passed no output buffer.
        length_query: bool,
    },
    /// C_*Update.
    Update,
    /// C_Verify or C_VerifyFinal (always ends the operation).
    Verify,
}

/// Per-session operation state of one C_Initialize.
#[derive(Default)]
pub(crate) struct Ops {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").finish_non_exhaustive()
    }
}

/// One call to the crypto domain: the CK_RV and body of its answer, or a transport CK_RV.
pub(crate) type Exchange<'a> = &'a dyn Fn(&Request) -> Result<(CK_RV, Body), CK_RV>;

impl Ops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A session was opened (a stale entry with the same handle is replaced).
    pub(crate) fn opened(&self, session: u64, slot: u64) {
        self.lock().sessions.insert(
            session,
            SessionOps {
                slot,
                ..SessionOps::default()
            },
        );
    }

    /// A session was closed (or is unknown to the domain).
    pub(crate) fn closed(&self, session: u64) {
        let mut g = self.lock();
        g.sessions.remove(&session);
        Self::forget(&mut g);
    }

    /// All sessions of `slot` were closed.
    pub(crate) fn closed_slot(&self, slot: u64) {
        let mut g = self.lock();
        g.sessions.retain(|_, s| s.slot != slot);
        Self::forget(&mut g);
    }

    /// C_SessionCancel: drops the session's recorded operations of these kinds (the domain
    /// ends its own state in the same call).
    pub(crate) fn cancel(&self, session: u64, kinds: &[Kind]) {
        let mut g = self.lock();
        if let Some(s) = g.sessions.get_mut(&session) {
            for k in kinds {
                s.local[*k as usize] = None;
                s.remote[*k as usize] = false;
            }
        }
    }

    /// Something that may change a validation happened: forget them all.
    pub(crate) fn invalidate(&self) {
        Self::forget(&mut self.lock());
    }

    fn forget(g: &mut Inner) {
        g.epoch = g.epoch.wrapping_add(1);
        for s in g.sessions.values_mut() {
            s.validated.clear();
        }
    }

    /// C_*Init. `fused`: the domain speaks protocol v2.
    pub(crate) fn init(
        &self,
        call: Exchange<'_>,
        fused: bool,
        kind: Kind,
        session: u64,
        mechanism: Mechanism,
        key: u64,
    ) -> Result<(), CK_RV> {
        let k = kind as usize;
        let epoch = {
            let mut g = self.lock();
            let epoch = g.epoch;
            if let Some(s) = g.sessions.get_mut(&session) {
                if s.local[k].is_some() {
                    return Err(CKR_OPERATION_ACTIVE);
                }
                if fused
                    && !s.remote[k]
                    && s.validated
                        .iter()
                        .any(|(vk, vh, vm)| *vk == kind && *vh == key && *vm == mechanism)
                {
                    s.local[k] = Some(Pending {
                        mechanism,
                        key,
                        cached: None,
                    });
                    return Ok(());
                }
            }
            epoch
        };
        let (rv, _) = call(&kind.init_request(session, mechanism.clone(), key))?;
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut g = self.lock();
        let same_epoch = g.epoch == epoch;
        if let Some(s) = g.sessions.get_mut(&session) {
            s.remote[k] = true;
            if same_epoch
                && !s
                    .validated
                    .iter()
                    .any(|(vk, vh, vm)| *vk == kind && *vh == key && *vm == mechanism)
            {
                if s.validated.len() >= MAX_VALIDATED {
                    s.validated.remove(0);
                }
                s.validated.push((kind, key, mechanism));
            }
        }
        Ok(())
    }

    /// C_Sign/C_Encrypt/C_Decrypt. `Ok(None)`: no recorded operation, forward the call.
    pub(crate) fn single(
        &self,
        call: Exchange<'_>,
        kind: Kind,
        session: u64,
        data: &[u8],
        cap: Option<u64>,
    ) -> Result<Option<Delivery>, CK_RV> {
        if kind == Kind::Verify {
            return Err(cryptoki_sys::CKR_GENERAL_ERROR);
        }
        let k = kind as usize;
        let (mechanism, key) = {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&session) else {
                return Ok(None);
            };
            let Some(p) = s.local[k].as_mut() else {
                return Ok(None);
            };
            // The second call of the length-query protocol (same input): no round trip.
            if let Some(c) = p.cached.take()
                && c.input.as_slice() == data
            {
                return Ok(Some(Self::deliver(s, k, c, cap)));
            }
            (p.mechanism.clone(), p.key)
        };
        let answer = call(&kind.once_request(session, mechanism, key, data));
        let mut g = self.lock();
        let s = g.sessions.get_mut(&session);
        let output = match answer {
            Ok((CKR_OK, Body::Data { data: out })) => Zeroizing::new(out.0),
            Ok((CKR_OK, Body::SecretData { data: out })) => Zeroizing::new(out.expose().to_vec()),
            other => {
                let rv = match other {
                    Ok((CKR_OK, _)) => CKR_DEVICE_ERROR,
                    Ok((rv, _)) | Err(rv) => rv,
                };
                // Any failure ends the operation (PKCS#11: only CKR_BUFFER_TOO_SMALL and a
                // successful length query keep it).
                if let Some(s) = s {
                    s.local[k] = None;
                    s.forget_if_stale(kind, key, rv);
                }
                return Err(rv);
            }
        };
        let c = Cached {
            input: Zeroizing::new(data.to_vec()),
            output,
        };
        match s {
            Some(s) if s.local[k].is_some() => Ok(Some(Self::deliver(s, k, c, cap))),
            // The session was closed meanwhile by another thread.
            _ => Err(cryptoki_sys::CKR_SESSION_HANDLE_INVALID),
        }
    }

    fn deliver(s: &mut SessionOps, k: usize, c: Cached, cap: Option<u64>) -> Delivery {
        let n = c.output.len();
        match cap {
            Some(cap) if cap >= n as u64 => {
                s.local[k] = None;
                Delivery::Data(c.output)
            }
            _ => {
                if let Some(p) = s.local[k].as_mut() {
                    p.cached = Some(c);
                }
                if cap.is_none() {
                    Delivery::Len(n)
                } else {
                    Delivery::TooSmall(n)
                }
            }
        }
    }

    /// C_Verify. `Ok(None)`: no recorded operation, forward the call.
    pub(crate) fn verify(
        &self,
        call: Exchange<'_>,
        session: u64,
        data: &[u8],
        signature: &[u8],
    ) -> Result<Option<()>, CK_RV> {
        let k = Kind::Verify as usize;
        let (mechanism, key) = {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&session) else {
                return Ok(None);
            };
            // C_Verify always ends the operation.
            let Some(p) = s.local[k].take() else {
                return Ok(None);
            };
            (p.mechanism, p.key)
        };
        let rv = match call(&Request::VerifyOnce {
            session,
            mechanism,
            key,
            data: Blob::from(data),
            signature: Blob::from(signature),
        }) {
            Ok((rv, _)) | Err(rv) => rv,
        };
        if rv == CKR_OK {
            return Ok(Some(()));
        }
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.forget_if_stale(Kind::Verify, key, rv);
        }
        Err(rv)
    }

    /// Before C_*Update/C_*Final: a recorded operation is started in the domain (the real
    /// C_*Init), since multi-part state lives there. An error here ends the operation.
    pub(crate) fn to_domain(
        &self,
        call: Exchange<'_>,
        kind: Kind,
        session: u64,
    ) -> Result<(), CK_RV> {
        let k = kind as usize;
        let pending = {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&session) else {
                return Ok(());
            };
            match s.local[k].take() {
                Some(p) => p,
                None => return Ok(()),
            }
        };
        let (rv, _) = call(&kind.init_request(session, pending.mechanism, pending.key))?;
        if rv != CKR_OK {
            return Err(rv);
        }
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.remote[k] = true;
        }
        Ok(())
    }

    /// After a forwarded call: mirrors the domain's rule for when the operation ends.
    pub(crate) fn forwarded(&self, kind: Kind, session: u64, phase: Phase, rv: CK_RV) {
        let ended = match phase {
            Phase::Output { length_query } => {
                !(rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && length_query))
            }
            Phase::Update => rv != CKR_OK,
            Phase::Verify => true,
        };
        if ended && let Some(s) = self.lock().sessions.get_mut(&session) {
            s.remote[kind as usize] = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn mech() -> Mechanism {
        Mechanism {
            mechanism: 0x1041,
            param: caas_vsm_proto::MechParam::None {},
        }
    }

    /// A fake domain that records the requests and answers OK with a 64-byte signature.
    struct Fake {
        seen: RefCell<Vec<&'static str>>,
        rv: RefCell<CK_RV>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                seen: RefCell::new(Vec::new()),
                rv: RefCell::new(CKR_OK),
            }
        }
        fn call(&self, r: &Request) -> Result<(CK_RV, Body), CK_RV> {
            let name = match r {
                Request::SignInit { .. } => "SignInit",
                Request::SignOnce { .. } => "SignOnce",
                Request::VerifyOnce { .. } => "VerifyOnce",
                _ => "other",
            };
            self.seen.borrow_mut().push(name);
            let rv = *self.rv.borrow();
            Ok((
                rv,
                if matches!(r, Request::SignOnce { .. }) && rv == CKR_OK {
                    Body::Data {
                        data: Blob(vec![7; 64]),
                    }
                } else {
                    Body::Empty {}
                },
            ))
        }
    }

    #[test]
    fn second_init_is_local_and_sign_is_one_round_trip_with_length_query() {
        let ops = Ops::default();
        let f = Fake::new();
        let call = |r: &Request| f.call(r);
        ops.opened(1, 0);
        // First init: to the domain; the domain holds the operation.
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", None),
            Ok(None)
        ));
        ops.forwarded(Kind::Sign, 1, Phase::Output { length_query: true }, CKR_OK);
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", Some(64)),
            Ok(None)
        ));
        ops.forwarded(
            Kind::Sign,
            1,
            Phase::Output {
                length_query: false,
            },
            CKR_OK,
        );
        f.seen.borrow_mut().clear();
        // Second time: init is local, the length query makes the one round trip, the real
        // call is answered from the kept output.
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        assert_eq!(
            ops.init(&call, true, Kind::Sign, 1, mech(), 5),
            Err(CKR_OPERATION_ACTIVE)
        );
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", None),
            Ok(Some(Delivery::Len(64)))
        ));
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", Some(10)),
            Ok(Some(Delivery::TooSmall(64)))
        ));
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", Some(64)),
            Ok(Some(Delivery::Data(d))) if d.len() == 64
        ));
        assert_eq!(*f.seen.borrow(), vec!["SignOnce"]);
        // A different key or another session is validated again by the domain.
        f.seen.borrow_mut().clear();
        ops.opened(2, 0);
        assert_eq!(ops.init(&call, true, Kind::Sign, 2, mech(), 5), Ok(()));
        assert_eq!(*f.seen.borrow(), vec!["SignInit"]);
        // Without protocol v2 every init goes to the domain.
        f.seen.borrow_mut().clear();
        assert_eq!(ops.init(&call, false, Kind::Sign, 1, mech(), 5), Ok(()));
        assert_eq!(*f.seen.borrow(), vec!["SignInit"]);
    }

    #[test]
    fn invalidation_and_errors() {
        let ops = Ops::default();
        let f = Fake::new();
        let call = |r: &Request| f.call(r);
        ops.opened(1, 0);
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        ops.forwarded(
            Kind::Sign,
            1,
            Phase::Output {
                length_query: false,
            },
            CKR_OK,
        );
        // Destroying an object (or logging out...) forgets the validation.
        ops.invalidate();
        f.seen.borrow_mut().clear();
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        assert_eq!(*f.seen.borrow(), vec!["SignInit"]);
        ops.forwarded(
            Kind::Sign,
            1,
            Phase::Output {
                length_query: false,
            },
            CKR_OK,
        );
        // A failing fused call reports the domain's code and ends the operation.
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        *f.rv.borrow_mut() = cryptoki_sys::CKR_FUNCTION_REJECTED;
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", Some(64)),
            Err(cryptoki_sys::CKR_FUNCTION_REJECTED)
        ));
        assert!(matches!(
            ops.single(&call, Kind::Sign, 1, b"x", Some(64)),
            Ok(None)
        ));
        // A rejected init is not remembered.
        ops.closed(1);
        ops.opened(1, 0);
        f.seen.borrow_mut().clear();
        assert_eq!(
            ops.init(&call, true, Kind::Sign, 1, mech(), 5),
            Err(cryptoki_sys::CKR_FUNCTION_REJECTED)
        );
        *f.rv.borrow_mut() = CKR_OK;
        assert_eq!(ops.init(&call, true, Kind::Sign, 1, mech(), 5), Ok(()));
        assert_eq!(*f.seen.borrow(), vec!["SignInit", "SignInit"]);
        // Verify on a recorded operation is one fused call.
        ops.forwarded(
            Kind::Sign,
            1,
            Phase::Output {
                length_query: false,
            },
            CKR_OK,
        );
        assert_eq!(ops.init(&call, true, Kind::Verify, 1, mech(), 6), Ok(()));
        ops.forwarded(Kind::Verify, 1, Phase::Verify, CKR_OK);
        assert_eq!(ops.init(&call, true, Kind::Verify, 1, mech(), 6), Ok(()));
        f.seen.borrow_mut().clear();
        assert!(matches!(ops.verify(&call, 1, b"x", b"sig"), Ok(Some(()))));
        assert_eq!(*f.seen.borrow(), vec!["VerifyOnce"]);
    }
}
