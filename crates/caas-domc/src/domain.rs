//! The request dispatcher: one [`Domain`] per crypto domain process holds the tokens, the
//! applications (one per module `C_Initialize`, identified by the id in
//! [`Request::Hello`]) with their sessions and login state, and answers each [`Request`]
//! with a [`Response`]. This is where the token model's rules are enforced and where each
//! failure becomes a CK_RV. Concurrency: a session is locked only by the call using it, key
//! objects are shared immutably, so calls on different sessions run in parallel.

use crate::audit::{AuditLog, Record};
use crate::error::{Ckr, Error};
use crate::keys::{self, Curve};
use crate::keysource::DomainKey;
use crate::object::{self, Object, Origin, Owner, tmpl_bytes, tmpl_ulong};
use crate::ops::{self, CipherOp, DigestOp, SignOp};
use crate::policy::{self, Role};
use crate::pq;
use crate::token::Token;
use caas_vsm_proto::attr;
use caas_vsm_proto::v32::*;
use caas_vsm_proto::{
    Attr, Blob, Body, MechInfo, MechParam, Mechanism, Request, Response, Secret, SessionInfo,
    SlotInfo, TokenInfo,
};
use cryptoki_sys::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

#[path = "domain_crypto.rs"]
mod crypto;
#[path = "message.rs"]
pub mod message;

/// Settings of a domain.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// State directory (token files, audit log).
    pub state_dir: PathBuf,
    /// Number of slots (each with one token).
    pub slots: u64,
    /// Wrong PINs before lockout.
    pub max_pin_retries: u64,
}

/// A session.
#[derive(Debug)]
pub struct Session {
    slot: u64,
    rw: bool,
    find: Option<Vec<u64>>,
    sign: Option<SignOp>,
    verify: Option<SignOp>,
    encrypt: Option<CipherOp>,
    decrypt: Option<CipherOp>,
    digest: Option<DigestOp>,
    cached: Option<Zeroizing<Vec<u8>>>,
    /// C_MessageEncryptInit / C_MessageDecryptInit ([`message`]).
    msg_encrypt: Option<message::MessageOp>,
    msg_decrypt: Option<message::MessageOp>,
}

/// One application instance (a process that called C_Initialize).
#[derive(Debug)]
pub struct App {
    /// Its id.
    pub id: [u8; 16],
    connections: AtomicU64,
    sessions: Mutex<HashMap<u64, Arc<Mutex<Session>>>>,
    login: Mutex<HashMap<u64, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The crypto domain state.
#[derive(Debug)]
pub struct Domain {
    tokens: Vec<Arc<Token>>,
    apps: Mutex<HashMap<[u8; 16], Arc<App>>>,
    handles: AtomicU64,
    sessions: AtomicU64,
    audit: Arc<AuditLog>,
    /// Starts the audit log's flusher thread with the first record, not when the domain
    /// opens: a serving domain opens before it drops root, and a thread started then keeps
    /// no capability, so under `mlockall(MCL_FUTURE)` it could not even map its signal
    /// stack past RLIMIT_MEMLOCK ([`crate::harden::drop_privileges`]).
    audit_flusher: std::sync::Once,
    /// Connections refused by the peer policy.
    refused: AtomicU64,
    /// `--allow-legacy-rsa-1024`: 1024-bit RSA keys may be generated, imported and used.
    legacy_rsa_1024: bool,
    /// A token export was imported (at most once per domain, [`crate::transfer`]).
    imported: std::sync::atomic::AtomicBool,
    /// The AES-GCM IV counters of message-based encryption, per key value.
    iv_counters: message::IvCounters,
}

type R<T> = Result<T, Ckr>;

fn data(v: Vec<u8>) -> Response {
    Response::ok(Body::Data { data: Blob(v) })
}

#[derive(Clone, Copy)]
enum Slot {
    Sign,
    Encrypt,
    Decrypt,
    Digest,
}

fn clear(s: &mut Session, which: Slot) {
    s.cached = None;
    match which {
        Slot::Sign => s.sign = None,
        Slot::Encrypt => s.encrypt = None,
        Slot::Decrypt => s.decrypt = None,
        Slot::Digest => s.digest = None,
    }
}

/// Hands out `out` if it fits in `cap`, else caches it and answers CKR_BUFFER_TOO_SMALL.
fn deliver(
    s: &mut Session,
    which: Slot,
    out: Zeroizing<Vec<u8>>,
    cap: u64,
    secret: bool,
) -> Response {
    if out.len() as u64 > cap {
        let len = out.len() as u64;
        s.cached = Some(out);
        return Response {
            rv: CKR_BUFFER_TOO_SMALL,
            body: Body::Len { len },
        };
    }
    clear(s, which);
    if secret {
        Response::ok(Body::SecretData { data: Secret(out) })
    } else {
        data(out.to_vec())
    }
}

impl Domain {
    /// Opens the domain: loads every token from the state directory.
    pub fn open(cfg: &DomainConfig, key: DomainKey) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(Error::io("create", &cfg.state_dir))?;
        let audit_key = crate::audit::audit_key(&key)?;
        let key = Arc::new(key);
        let handles = AtomicU64::new(1);
        let mut tokens = Vec::new();
        for slot in 0..cfg.slots.max(1) {
            tokens.push(Arc::new(Token::open(
                &cfg.state_dir,
                slot,
                key.clone(),
                cfg.max_pin_retries.max(1),
                &handles,
            )?));
        }
        Ok(Self {
            tokens,
            apps: Mutex::new(HashMap::new()),
            handles,
            sessions: AtomicU64::new(1),
            audit: Arc::new(AuditLog::open(&cfg.state_dir.join("audit.log"), audit_key)?),
            audit_flusher: std::sync::Once::new(),
            refused: AtomicU64::new(0),
            legacy_rsa_1024: false,
            imported: std::sync::atomic::AtomicBool::new(false),
            iv_counters: message::IvCounters::new().map_err(Error::Token)?,
        })
    }

    /// Allows 1024-bit RSA keys (off by default: only for comparisons with legacy setups
    /// such as the seed's ods-hsmspeed RSA-1024 figures). Without it, generating, importing
    /// or using such a key fails with CKR_KEY_SIZE_RANGE.
    #[must_use]
    pub fn allow_legacy_rsa_1024(mut self, allow: bool) -> Self {
        self.legacy_rsa_1024 = allow;
        self
    }

    /// CKR_KEY_SIZE_RANGE for an RSA key below 2048 bits unless legacy keys are allowed.
    pub(crate) fn check_rsa_size(&self, m: &keys::KeyMaterial) -> R<()> {
        let bits = m.rsa_bits();
        if bits != 0 && bits < keys::RSA_MIN_BITS && !self.legacy_rsa_1024 {
            return Err(Ckr(CKR_KEY_SIZE_RANGE));
        }
        Ok(())
    }

    /// Registers a connection of application `id`.
    pub fn attach(&self, id: [u8; 16]) -> Arc<App> {
        let mut apps = lock(&self.apps);
        let app = apps
            .entry(id)
            .or_insert_with(|| {
                Arc::new(App {
                    id,
                    connections: AtomicU64::new(0),
                    sessions: Mutex::new(HashMap::new()),
                    login: Mutex::new(HashMap::new()),
                })
            })
            .clone();
        app.connections.fetch_add(1, Ordering::SeqCst);
        app
    }

    /// Unregisters a connection; the last one closes the application's sessions.
    pub fn detach(&self, app: &Arc<App>) {
        let mut apps = lock(&self.apps);
        if app.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            apps.remove(&app.id);
            drop(apps);
            let handles: Vec<u64> = lock(&app.sessions).keys().copied().collect();
            for h in handles {
                let _ = self.close_session(app, h);
            }
        }
    }

    fn token(&self, slot: u64) -> R<&Arc<Token>> {
        usize::try_from(slot)
            .ok()
            .and_then(|i| self.tokens.get(i))
            .ok_or(Ckr(CKR_SLOT_ID_INVALID))
    }

    fn session(&self, app: &App, h: u64) -> R<Arc<Mutex<Session>>> {
        lock(&app.sessions)
            .get(&h)
            .cloned()
            .ok_or(Ckr(CKR_SESSION_HANDLE_INVALID))
    }

    fn user(&self, app: &App, slot: u64) -> Option<u64> {
        lock(&app.login).get(&slot).copied()
    }

    fn audit(
        &self,
        app: &App,
        op: &str,
        slot: u64,
        obj: Option<&Object>,
        mech: Option<u64>,
        rv: u64,
    ) {
        let object = obj
            .map(|o| {
                let label = o.bytes(CKA_LABEL).unwrap_or_default();
                format!("{}:{}", o.handle, String::from_utf8_lossy(&label))
            })
            .unwrap_or_default();
        self.log(Record {
            app: app.id,
            op,
            slot,
            object,
            mechanism: mech,
            rv,
        });
    }

    /// Appends `r` to the audit log (and starts its flusher with the first record).
    fn log(&self, r: Record<'_>) {
        self.audit_flusher.call_once(|| self.audit.start_flusher());
        self.audit.record(r);
    }

    /// Audits a refused request (failures are written through at once) and returns its error.
    fn refuse(
        &self,
        app: &App,
        op: &str,
        slot: u64,
        obj: Option<&Object>,
        mech: Option<u64>,
        e: Ckr,
    ) -> Ckr {
        self.audit(app, op, slot, obj, mech, e.0);
        e
    }

    /// Who the application is on `slot` (decides which attributes it may set).
    fn role(&self, app: &App, slot: u64) -> Role {
        Role::of(self.user(app, slot))
    }

    /// A connection refused before its first frame (a peer-credential or CID mismatch):
    /// counted, logged, and written through to the audit log as `Connect` with
    /// CKR_FUNCTION_REJECTED and the reason (`transport`, `why`: no secret in either).
    pub fn refuse_peer(&self, transport: &str, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(transport, reason = why, refused = n, "connection refused");
        self.log(Record {
            app: [0; 16],
            op: "Connect",
            slot: 0,
            object: format!("{transport}: {why}"),
            mechanism: None,
            rv: cryptoki_sys::CKR_FUNCTION_REJECTED,
        });
    }

    /// A module broke the rules of its connection's shared-memory ring
    /// ([`caas_vsm_proto::ring`]): the connection ends and this is audited (`RingViolation`).
    pub fn ring_violation(&self, app: &App, why: &str) {
        tracing::warn!(
            reason = why,
            "shared-memory ring violation; connection closed"
        );
        self.log(Record {
            app: app.id,
            op: "RingViolation",
            slot: 0,
            object: why.to_string(),
            mechanism: None,
            rv: cryptoki_sys::CKR_FUNCTION_REJECTED,
        });
    }

    /// Exports every token under the agent's transfer `key` for `context`
    /// ([`crate::transfer`]): the sealed export and the number of token objects in it.
    /// Audited (`TokenExport`).
    pub fn export_tokens(&self, key: &[u8], context: &[u8]) -> R<(Vec<u8>, u64)> {
        let r = (|| {
            if key.len() != crate::transfer::KEY_LEN || context.len() > crate::transfer::MAX_CONTEXT
            {
                return Err(Ckr(CKR_ARGUMENTS_BAD));
            }
            let slots: Vec<_> = self.tokens.iter().map(|t| t.image()).collect();
            let objects = slots.iter().map(|s| s.objects.len() as u64).sum::<u64>();
            let plain = Zeroizing::new(caas_vsm_proto::to_bytes(&crate::transfer::TokenExport {
                slots,
            }));
            Ok((crate::transfer::seal(key, context, &plain)?, objects))
        })();
        self.audit_transfer("TokenExport", context, r.as_ref().map(|(_, n)| n));
        r
    }

    /// Imports an export made for `context` under `key`, replacing every token's label,
    /// PINs and token objects, and persists them under this domain's key. Refused when the
    /// export does not authenticate for exactly this context (tampered, or made for another
    /// suspend, migration or workload: `CKR_ENCRYPTED_DATA_INVALID`), when a session is
    /// open (`CKR_SESSION_EXISTS`), or after a first import. Audited (`TokenImport`).
    pub fn import_tokens(&self, key: &[u8], context: &[u8], blob: &[u8]) -> R<u64> {
        let r = (|| {
            if key.len() != crate::transfer::KEY_LEN || context.len() > crate::transfer::MAX_CONTEXT
            {
                return Err(Ckr(CKR_ARGUMENTS_BAD));
            }
            if self.imported.load(Ordering::SeqCst) {
                return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED));
            }
            if self
                .tokens
                .iter()
                .any(|t| t.sessions.load(Ordering::SeqCst) > 0)
            {
                return Err(Ckr(CKR_SESSION_EXISTS));
            }
            let plain = crate::transfer::open(key, context, blob)?;
            let export: crate::transfer::TokenExport =
                caas_vsm_proto::from_bytes(&plain).map_err(|_| Ckr(CKR_ENCRYPTED_DATA_INVALID))?;
            if export.slots.len() != self.tokens.len() {
                return Err(Ckr(CKR_ENCRYPTED_DATA_INVALID));
            }
            if self.imported.swap(true, Ordering::SeqCst) {
                return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED));
            }
            let mut objects = 0u64;
            for (t, image) in self.tokens.iter().zip(export.slots) {
                objects += image.objects.len() as u64;
                t.apply_image(image, &self.handles)?;
                t.persist()?;
            }
            Ok(objects)
        })();
        self.audit_transfer("TokenImport", context, r.as_ref());
        r
    }

    fn audit_transfer(&self, op: &str, context: &[u8], r: Result<&u64, &Ckr>) {
        let ctx = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, context);
        let ctx = hex::encode(&ctx.as_ref()[..8]);
        let (object, rv) = match r {
            Ok(n) => (format!("{n} token objects, context {ctx}"), CKR_OK),
            Err(e) => (format!("context {ctx}"), e.0),
        };
        self.log(Record {
            app: [0; 16],
            op,
            slot: 0,
            object,
            mechanism: None,
            rv,
        });
        self.audit.flush();
    }

    /// Connections refused so far ([`Domain::refuse_peer`]).
    #[must_use]
    pub fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Looks up an object visible to this application in the session's token.
    fn object(&self, app: &App, slot: u64, h: u64) -> R<Arc<Object>> {
        let t = self.token(slot)?;
        let o = t
            .read_objects()
            .get(&h)
            .cloned()
            .ok_or(Ckr(CKR_OBJECT_HANDLE_INVALID))?;
        if o.owner.is_some_and(|ow| ow.app != app.id) {
            return Err(Ckr(CKR_OBJECT_HANDLE_INVALID));
        }
        if o.is_private() && self.user(app, slot) != Some(CKU_USER) {
            return Err(Ckr(CKR_OBJECT_HANDLE_INVALID));
        }
        Ok(o)
    }

    fn key(&self, app: &App, slot: u64, h: u64) -> R<Arc<Object>> {
        let k = self.object(app, slot, h).map_err(|e| {
            if e.0 == CKR_OBJECT_HANDLE_INVALID {
                Ckr(CKR_KEY_HANDLE_INVALID)
            } else {
                e
            }
        })?;
        if k.key_type() == Some(CKK_RSA)
            && let Ok(m) = k.material()
        {
            self.check_rsa_size(&m)?;
        }
        Ok(k)
    }

    /// Counts a use of `key` and audits it.
    fn use_key(&self, app: &App, slot: u64, key: &Object, op: &str, mech: u64) -> R<()> {
        let r = key.count_use();
        self.audit(
            app,
            op,
            slot,
            Some(key),
            Some(mech),
            r.err().map_or(CKR_OK, |c| c.0),
        );
        r?;
        if key.owner.is_none() && key.ulong(attr::CKA_CAAS_MAX_USES).unwrap_or(0) > 0 {
            self.token(slot)?.persist()?;
        }
        Ok(())
    }

    /// Answers one request.
    pub fn handle(&self, app: &Arc<App>, req: Request) -> Response {
        match self.dispatch(app, req) {
            Ok(r) => r,
            Err(c) => Response::rv(c.0),
        }
    }

    #[allow(clippy::too_many_lines)]
    fn dispatch(&self, app: &Arc<App>, req: Request) -> R<Response> {
        use Request as Q;
        Ok(match req {
            Q::Hello { .. } => Response::ok(Body::Empty {}),
            // Served by the transport (`crate::server`) where it can be; anywhere else (a
            // transport without shared memory, a second ring) it is refused.
            Q::RingOpen {} => Response::rv(cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED),
            Q::GetSlotList { .. } => Response::ok(Body::Ulongs {
                values: (0..self.tokens.len() as u64).collect(),
            }),
            Q::GetSlotInfo { slot } => {
                self.token(slot)?;
                Response::ok(Body::Slot {
                    info: SlotInfo {
                        description: format!("caas crypto domain slot {slot}"),
                        manufacturer: "caas".into(),
                        flags: CKF_TOKEN_PRESENT,
                    },
                })
            }
            Q::GetTokenInfo { slot } => {
                let t = self.token(slot)?;
                let label = t.lock_state().label.clone();
                Response::ok(Body::Token {
                    info: TokenInfo {
                        label,
                        manufacturer: "caas".into(),
                        model: "caas VSM".into(),
                        serial: format!("caas-{slot:011}"),
                        flags: t.flags(),
                        max_sessions: CK_EFFECTIVELY_INFINITE,
                        session_count: t.sessions.load(Ordering::Relaxed),
                        max_rw_sessions: CK_EFFECTIVELY_INFINITE,
                        rw_session_count: t.rw_sessions.load(Ordering::Relaxed),
                        max_pin_len: crate::token::MAX_PIN as u64,
                        min_pin_len: crate::token::MIN_PIN as u64,
                    },
                })
            }
            Q::GetMechanismList { slot } => {
                self.token(slot)?;
                Response::ok(Body::Ulongs {
                    values: ops::MECHANISMS.iter().map(|m| m.0).collect(),
                })
            }
            Q::GetMechanismInfo { slot, mechanism } => {
                self.token(slot)?;
                let m = ops::MECHANISMS
                    .iter()
                    .find(|m| m.0 == mechanism)
                    .ok_or(Ckr(CKR_MECHANISM_INVALID))?;
                let legacy_rsa = self.legacy_rsa_1024
                    && matches!(
                        mechanism,
                        CKM_RSA_PKCS_KEY_PAIR_GEN
                            | CKM_RSA_PKCS
                            | CKM_SHA256_RSA_PKCS
                            | CKM_SHA384_RSA_PKCS
                            | CKM_SHA512_RSA_PKCS
                    );
                Response::ok(Body::Mech {
                    info: MechInfo {
                        min_key_size: if legacy_rsa { 1024 } else { m.1 },
                        max_key_size: m.2,
                        // The crypto domain is this token's (virtual) hardware.
                        flags: m.3 | CKF_HW,
                    },
                })
            }
            Q::InitToken {
                slot,
                so_pin,
                label,
            } => {
                let t = self.token(slot)?;
                if t.sessions.load(Ordering::SeqCst) > 0 {
                    return Err(Ckr(CKR_SESSION_EXISTS));
                }
                let r = t.init(so_pin.expose(), &label);
                self.audit(
                    app,
                    "C_InitToken",
                    slot,
                    None,
                    None,
                    r.err().map_or(0, |c| c.0),
                );
                r?;
                Response::ok(Body::Empty {})
            }
            Q::InitPin { session, pin } => {
                let s = self.session(app, session)?;
                let slot = lock(&s).slot;
                if self.user(app, slot) != Some(CKU_SO) || !lock(&s).rw {
                    return Err(Ckr(CKR_USER_NOT_LOGGED_IN));
                }
                let r = self.token(slot)?.set_user_pin(pin.expose());
                self.audit(
                    app,
                    "C_InitPIN",
                    slot,
                    None,
                    None,
                    r.err().map_or(0, |c| c.0),
                );
                r?;
                Response::ok(Body::Empty {})
            }
            Q::SetPin {
                session,
                old_pin,
                new_pin,
            } => {
                let s = self.session(app, session)?;
                let (slot, rw) = {
                    let g = lock(&s);
                    (g.slot, g.rw)
                };
                if !rw {
                    return Err(Ckr(CKR_SESSION_READ_ONLY));
                }
                let user = self.user(app, slot).unwrap_or(CKU_USER);
                let t = self.token(slot)?;
                crate::token::check_pin_len(new_pin.expose())?;
                let r = t.check_pin(user, old_pin.expose()).and_then(|()| {
                    if user == CKU_SO {
                        t.set_so_pin(new_pin.expose())
                    } else {
                        t.set_user_pin(new_pin.expose())
                    }
                });
                self.audit(
                    app,
                    "C_SetPIN",
                    slot,
                    None,
                    None,
                    r.err().map_or(0, |c| c.0),
                );
                r?;
                Response::ok(Body::Empty {})
            }
            Q::OpenSession { slot, flags } => {
                let t = self.token(slot)?;
                if flags & CKF_SERIAL_SESSION == 0 {
                    return Err(Ckr(CKR_SESSION_PARALLEL_NOT_SUPPORTED));
                }
                let rw = flags & CKF_RW_SESSION != 0;
                if !rw && self.user(app, slot) == Some(CKU_SO) {
                    return Err(Ckr(CKR_SESSION_READ_WRITE_SO_EXISTS));
                }
                let h = self.sessions.fetch_add(1, Ordering::Relaxed);
                lock(&app.sessions).insert(
                    h,
                    Arc::new(Mutex::new(Session {
                        slot,
                        rw,
                        find: None,
                        sign: None,
                        verify: None,
                        encrypt: None,
                        decrypt: None,
                        digest: None,
                        cached: None,
                        msg_encrypt: None,
                        msg_decrypt: None,
                    })),
                );
                t.sessions.fetch_add(1, Ordering::SeqCst);
                if rw {
                    t.rw_sessions.fetch_add(1, Ordering::SeqCst);
                }
                Response::ok(Body::Ulong { value: h })
            }
            Q::CloseSession { session } => {
                self.close_session(app, session)?;
                Response::ok(Body::Empty {})
            }
            Q::CloseAllSessions { slot } => {
                self.token(slot)?;
                let hs: Vec<u64> = lock(&app.sessions)
                    .iter()
                    .filter(|(_, s)| lock(s).slot == slot)
                    .map(|(h, _)| *h)
                    .collect();
                for h in hs {
                    let _ = self.close_session(app, h);
                }
                Response::ok(Body::Empty {})
            }
            Q::GetSessionInfo { session } => {
                let s = self.session(app, session)?;
                let (slot, rw) = {
                    let g = lock(&s);
                    (g.slot, g.rw)
                };
                let state = match (self.user(app, slot), rw) {
                    (Some(CKU_SO), _) => CKS_RW_SO_FUNCTIONS,
                    (Some(_), true) => CKS_RW_USER_FUNCTIONS,
                    (Some(_), false) => CKS_RO_USER_FUNCTIONS,
                    (None, true) => CKS_RW_PUBLIC_SESSION,
                    (None, false) => CKS_RO_PUBLIC_SESSION,
                };
                let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
                Response::ok(Body::Session {
                    info: SessionInfo { slot, state, flags },
                })
            }
            Q::Login {
                session,
                user_type,
                pin,
            } => {
                let s = self.session(app, session)?;
                let slot = lock(&s).slot;
                let t = self.token(slot)?;
                let current = self.user(app, slot);
                match (user_type, current) {
                    (CKU_CONTEXT_SPECIFIC, Some(CKU_USER)) => {
                        t.check_pin(CKU_USER, pin.expose())?;
                        return Ok(Response::ok(Body::Empty {}));
                    }
                    (CKU_CONTEXT_SPECIFIC, _) => return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED)),
                    (CKU_SO | CKU_USER, Some(c)) if c == user_type => {
                        return Err(Ckr(CKR_USER_ALREADY_LOGGED_IN));
                    }
                    (CKU_SO | CKU_USER, Some(_)) => {
                        return Err(Ckr(CKR_USER_ANOTHER_ALREADY_LOGGED_IN));
                    }
                    (CKU_SO | CKU_USER, None) => {}
                    _ => return Err(Ckr(CKR_USER_TYPE_INVALID)),
                }
                if user_type == CKU_SO
                    && lock(&app.sessions).values().any(|x| {
                        let g = lock(x);
                        g.slot == slot && !g.rw
                    })
                {
                    return Err(Ckr(CKR_SESSION_READ_ONLY_EXISTS));
                }
                let r = t.check_pin(user_type, pin.expose());
                let op = if user_type == CKU_SO {
                    "C_Login(SO)"
                } else {
                    "C_Login(user)"
                };
                self.audit(app, op, slot, None, None, r.err().map_or(0, |c| c.0));
                r?;
                lock(&app.login).insert(slot, user_type);
                Response::ok(Body::Empty {})
            }
            Q::Logout { session } => {
                let s = self.session(app, session)?;
                let slot = lock(&s).slot;
                if lock(&app.login).remove(&slot).is_none() {
                    return Err(Ckr(CKR_USER_NOT_LOGGED_IN));
                }
                // PKCS#11: logging out destroys the application's private session objects.
                self.token(slot)?
                    .write_objects()
                    .retain(|_, o| !(o.owner.is_some_and(|ow| ow.app == app.id) && o.is_private()));
                self.audit(app, "C_Logout", slot, None, None, 0);
                Response::ok(Body::Empty {})
            }
            Q::CreateObject { session, template } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let class = tmpl_ulong(&template, CKA_CLASS).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                let key_type = match class {
                    CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY => Some(
                        tmpl_ulong(&template, CKA_KEY_TYPE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?,
                    ),
                    CKO_DATA | CKO_CERTIFICATE => None,
                    _ => return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID)),
                };
                let (attrs, secret) = object::build(
                    &template,
                    class,
                    key_type,
                    Origin::Imported,
                    &[],
                    None,
                    self.role(app, slot),
                )
                .map_err(|e| self.refuse(app, "C_CreateObject", slot, None, None, e))?;
                let o = self.insert(app, session, slot, rw, attrs, secret)?;
                // Public keys must parse now so a bad key fails here, not at use.
                if (class == CKO_PUBLIC_KEY || class == CKO_PRIVATE_KEY)
                    && let Err(e) = o.material().and_then(|m| self.check_rsa_size(&m))
                {
                    self.remove(slot, o.handle);
                    return Err(match e.0 {
                        CKR_KEY_HANDLE_INVALID => Ckr(CKR_TEMPLATE_INCOMPLETE),
                        // A legacy-size RSA modulus without --allow-legacy-rsa-1024.
                        CKR_KEY_SIZE_RANGE => Ckr(CKR_ATTRIBUTE_VALUE_INVALID),
                        _ => e,
                    });
                }
                self.audit(app, "C_CreateObject", slot, Some(&o), None, 0);
                Response::ok(Body::Ulong { value: o.handle })
            }
            Q::CopyObject {
                session,
                object,
                template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let o = self.object(app, slot, object)?;
                if !o.flag(CKA_COPYABLE) {
                    return Err(Ckr(CKR_ACTION_PROHIBITED));
                }
                // A copy would start a fresh use counter and rate bucket (see `policy`).
                if policy::has_limit(&o) {
                    let e = Ckr(CKR_ACTION_PROHIBITED);
                    return Err(self.refuse(app, "C_CopyObject", slot, Some(&o), None, e));
                }
                let attrs = o
                    .apply_template(&template, true, self.role(app, slot))
                    .map_err(|e| self.refuse(app, "C_CopyObject", slot, Some(&o), None, e))?;
                let secret = o.secret.as_ref().map(|s| Zeroizing::new(s.to_vec()));
                let n = self.insert(app, session, slot, rw, attrs, secret)?;
                self.audit(app, "C_CopyObject", slot, Some(&n), None, 0);
                Response::ok(Body::Ulong { value: n.handle })
            }
            Q::DestroyObject { session, object } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let o = self.object(app, slot, object)?;
                if o.is_token() && !rw {
                    return Err(Ckr(CKR_SESSION_READ_ONLY));
                }
                if !o.flag(CKA_DESTROYABLE) {
                    return Err(Ckr(CKR_ACTION_PROHIBITED));
                }
                self.remove(slot, object);
                if o.is_token() {
                    self.token(slot)?.persist()?;
                }
                self.audit(app, "C_DestroyObject", slot, Some(&o), None, 0);
                Response::ok(Body::Empty {})
            }
            Q::GetObjectSize { session, object } => {
                let (slot, _) = self.slot_rw(app, session)?;
                let o = self.object(app, slot, object)?;
                Response::ok(Body::Ulong { value: o.size() })
            }
            Q::GetAttributeValue {
                session,
                object,
                types,
            } => {
                let (slot, _) = self.slot_rw(app, session)?;
                let o = self.object(app, slot, object)?;
                Response::ok(Body::Attrs {
                    values: types.iter().map(|t| o.get_attr(*t)).collect(),
                })
            }
            Q::SetAttributeValue {
                session,
                object,
                template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let o = self.object(app, slot, object)?;
                if o.is_token() && !rw {
                    return Err(Ckr(CKR_SESSION_READ_ONLY));
                }
                let new = o
                    .apply_template(&template, false, self.role(app, slot))
                    .map_err(|e| {
                        self.refuse(app, "C_SetAttributeValue", slot, Some(&o), None, e)
                    })?;
                *o.attrs
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
                if o.is_token() {
                    self.token(slot)?.persist()?;
                }
                self.audit(app, "C_SetAttributeValue", slot, Some(&o), None, 0);
                Response::ok(Body::Empty {})
            }
            Q::FindObjectsInit { session, template } => {
                let s = self.session(app, session)?;
                let mut g = lock(&s);
                if g.find.is_some() {
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                for a in &template {
                    object::check_attr(a)?;
                }
                let user = self.user(app, g.slot) == Some(CKU_USER);
                let t = self.token(g.slot)?;
                let mut found: Vec<u64> = t
                    .read_objects()
                    .values()
                    .filter(|o| o.owner.is_none_or(|ow| ow.app == app.id))
                    .filter(|o| user || !o.is_private())
                    .filter(|o| o.matches(&template))
                    .map(|o| o.handle)
                    .collect();
                found.sort_unstable();
                found.reverse();
                g.find = Some(found);
                Response::ok(Body::Empty {})
            }
            Q::FindObjects { session, max } => {
                let s = self.session(app, session)?;
                let mut g = lock(&s);
                let f = g.find.as_mut().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                let mut out = Vec::new();
                while (out.len() as u64) < max {
                    match f.pop() {
                        Some(h) => out.push(h),
                        None => break,
                    }
                }
                Response::ok(Body::Ulongs { values: out })
            }
            Q::SessionCancel { session, flags } => {
                // PKCS#11 3.0 C_SessionCancel: ends the named active operations; flags for
                // operations this token has not (async) are ignored.
                let s = self.session(app, session)?;
                let mut g = lock(&s);
                if flags & CKF_FIND_OBJECTS != 0 {
                    g.find = None;
                }
                if flags & CKF_SIGN != 0 {
                    g.sign = None;
                }
                if flags & CKF_VERIFY != 0 {
                    g.verify = None;
                }
                if flags & CKF_ENCRYPT != 0 {
                    g.encrypt = None;
                }
                if flags & CKF_DECRYPT != 0 {
                    g.decrypt = None;
                }
                if flags & CKF_DIGEST != 0 {
                    g.digest = None;
                }
                if flags & CKF_MESSAGE_ENCRYPT != 0 {
                    g.msg_encrypt = None;
                }
                if flags & CKF_MESSAGE_DECRYPT != 0 {
                    g.msg_decrypt = None;
                }
                if flags & (CKF_SIGN | CKF_ENCRYPT | CKF_DECRYPT | CKF_DIGEST) != 0 {
                    g.cached = None;
                }
                Response::ok(Body::Empty {})
            }
            Q::FindObjectsFinal { session } => {
                let s = self.session(app, session)?;
                let mut g = lock(&s);
                if g.find.take().is_none() {
                    return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED));
                }
                Response::ok(Body::Empty {})
            }
            other => return self.crypto(app, other),
        })
    }

    fn slot_rw(&self, app: &App, session: u64) -> R<(u64, bool)> {
        let s = self.session(app, session)?;
        let g = lock(&s);
        Ok((g.slot, g.rw))
    }

    fn remove(&self, slot: u64, h: u64) {
        if let Ok(t) = self.token(slot) {
            t.write_objects().remove(&h);
        }
    }

    /// Adds a new object after the session/login checks for its CKA_TOKEN/CKA_PRIVATE.
    fn insert(
        &self,
        app: &App,
        session: u64,
        slot: u64,
        rw: bool,
        mut attrs: object::Attrs,
        secret: Option<Zeroizing<Vec<u8>>>,
    ) -> R<Arc<Object>> {
        // Every object gets its own id, a copy too (C_CopyObject starts from the original's).
        attrs.insert(CKA_UNIQUE_ID, object::new_unique_id()?);
        let is_token = attrs.get(&CKA_TOKEN).and_then(|v| attr::as_bool(v)) == Some(true);
        let private = attrs.get(&CKA_PRIVATE).and_then(|v| attr::as_bool(v)) == Some(true);
        if is_token && !rw {
            return Err(Ckr(CKR_SESSION_READ_ONLY));
        }
        let user = self.user(app, slot);
        if private && user != Some(CKU_USER) {
            return Err(Ckr(CKR_USER_NOT_LOGGED_IN));
        }
        let t = self.token(slot)?;
        if !t.lock_state().initialized {
            return Err(Ckr(CKR_TOKEN_NOT_RECOGNIZED));
        }
        let h = self.handles.fetch_add(1, Ordering::Relaxed);
        let owner = (!is_token).then_some(Owner {
            app: app.id,
            session,
        });
        let o = Arc::new(Object::new(h, owner, attrs, secret, 0));
        t.write_objects().insert(h, o.clone());
        if is_token && let Err(e) = t.persist() {
            t.write_objects().remove(&h);
            return Err(e);
        }
        Ok(o)
    }

    fn close_session(&self, app: &App, h: u64) -> R<()> {
        let s = lock(&app.sessions)
            .remove(&h)
            .ok_or(Ckr(CKR_SESSION_HANDLE_INVALID))?;
        let (slot, rw) = {
            let g = lock(&s);
            (g.slot, g.rw)
        };
        let t = self.token(slot)?;
        t.write_objects().retain(|_, o| {
            o.owner
                .is_none_or(|ow| !(ow.app == app.id && ow.session == h))
        });
        t.sessions.fetch_sub(1, Ordering::SeqCst);
        if rw {
            t.rw_sessions.fetch_sub(1, Ordering::SeqCst);
        }
        let last = !lock(&app.sessions).values().any(|x| lock(x).slot == slot);
        if last {
            lock(&app.login).remove(&slot);
        }
        Ok(())
    }

    fn op_session(&self, app: &App, session: u64) -> R<(Arc<Mutex<Session>>, u64)> {
        let s = self.session(app, session)?;
        let slot = lock(&s).slot;
        Ok((s, slot))
    }
}
