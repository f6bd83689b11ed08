//! One token (one slot): label, SO and user PINs (PBKDF2-HMAC-SHA256 hashes) with a retry
//! limit and lockout, and its objects. Token objects and PIN state persist in
//! `slot-N.token`, sealed with AES-256-GCM under the domain key (nonce || ciphertext || tag,
//! slot number as associated data), written atomically (temp file, fsync, rename).

use crate::error::{Ckr, Error};
use crate::keysource::DomainKey;
use crate::object::{Attrs, Object};
use aws_lc_rs::{aead, pbkdf2, rand};
use caas_vsm_proto::{Attr, Blob, Secret, from_bytes, to_bytes, wire_struct};
use cryptoki_sys::*;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const PBKDF2_ITERATIONS: u32 = 10_000;
/// Minimum PIN length.
pub const MIN_PIN: usize = 4;
/// Maximum PIN length.
pub const MAX_PIN: usize = 64;

wire_struct! {
    /// A persisted object.
    #[derive(Debug)]
    pub struct StoredObject {
        /// Canonical attributes.
        pub attrs: Vec<Attr>,
        /// Secret material.
        pub secret: Option<Secret>,
        /// Usage counter.
        pub uses: u64,
    }
}

wire_struct! {
    /// The persisted token image.
    #[derive(Debug)]
    pub struct TokenImage {
        /// Label.
        pub label: String,
        /// Whether C_InitToken ran.
        pub initialized: bool,
        /// SO PIN hash (salt || pbkdf2), empty when unset.
        pub so_pin: Secret,
        /// User PIN hash, empty when unset.
        pub user_pin: Secret,
        /// Consecutive wrong SO PINs.
        pub so_failures: u64,
        /// Consecutive wrong user PINs.
        pub user_failures: u64,
        /// Token objects.
        pub objects: Vec<StoredObject>,
    }
}

/// PIN and label state.
#[derive(Debug)]
pub struct TokenState {
    /// Label.
    pub label: String,
    /// Initialised.
    pub initialized: bool,
    so_pin: Secret,
    user_pin: Secret,
    /// Consecutive SO failures.
    pub so_failures: u64,
    /// Consecutive user failures.
    pub user_failures: u64,
}

/// A token.
#[derive(Debug)]
pub struct Token {
    /// Slot id.
    pub slot: u64,
    path: PathBuf,
    key: Arc<DomainKey>,
    /// PIN retry limit.
    pub max_retries: u64,
    /// Label and PINs.
    pub state: Mutex<TokenState>,
    /// All objects (token and session objects).
    pub objects: RwLock<HashMap<u64, Arc<Object>>>,
    /// Open sessions.
    pub sessions: AtomicU64,
    /// Open R/W sessions.
    pub rw_sessions: AtomicU64,
    persist_lock: Mutex<()>,
}

fn hash_pin(pin: &[u8]) -> Result<Secret, Ckr> {
    let mut out = vec![0u8; 48];
    rand::fill(&mut out[..16]).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let (salt, hash) = out.split_at_mut(16);
    let iters = NonZeroU32::new(PBKDF2_ITERATIONS).ok_or(Ckr(CKR_GENERAL_ERROR))?;
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iters, salt, pin, hash);
    Ok(Secret::new(out))
}

fn pin_matches(stored: &Secret, pin: &[u8]) -> bool {
    let s = stored.expose();
    let Some(iters) = NonZeroU32::new(PBKDF2_ITERATIONS) else {
        return false;
    };
    s.len() == 48
        && pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, iters, &s[..16], pin, &s[16..]).is_ok()
}

/// Checks a PIN's length.
pub fn check_pin_len(pin: &[u8]) -> Result<(), Ckr> {
    if (MIN_PIN..=MAX_PIN).contains(&pin.len()) {
        Ok(())
    } else {
        Err(Ckr(CKR_PIN_LEN_RANGE))
    }
}

impl Token {
    /// Loads the token of `slot` from `dir`, or creates an uninitialised one.
    pub fn open(
        dir: &std::path::Path,
        slot: u64,
        key: Arc<DomainKey>,
        max_retries: u64,
        handles: &AtomicU64,
    ) -> Result<Self, Error> {
        let path = dir.join(format!("slot-{slot}.token"));
        let token = Token {
            slot,
            path: path.clone(),
            key,
            max_retries,
            state: Mutex::new(TokenState {
                label: String::new(),
                initialized: false,
                so_pin: Secret::default(),
                user_pin: Secret::default(),
                so_failures: 0,
                user_failures: 0,
            }),
            objects: RwLock::new(HashMap::new()),
            sessions: AtomicU64::new(0),
            rw_sessions: AtomicU64::new(0),
            persist_lock: Mutex::new(()),
        };
        if !path.exists() {
            return Ok(token);
        }
        let sealed = std::fs::read(&path).map_err(Error::io("read", &path))?;
        let plain = token
            .unseal(&sealed)
            .ok_or_else(|| Error::CorruptState { path: path.clone() })?;
        let image: TokenImage =
            from_bytes(&plain).map_err(|_| Error::CorruptState { path: path.clone() })?;
        if token.apply_image(image, handles).map_err(Error::Token)? {
            token.persist().map_err(Error::Token)?;
        }
        Ok(token)
    }

    /// Replaces the token's label, PIN state and token objects with `image`'s (loading its
    /// state file, or importing a transferred token: [`crate::transfer`]). Session objects
    /// stay. Returns whether an object needed a `CKA_UNIQUE_ID` (the caller persists then).
    pub(crate) fn apply_image(&self, image: TokenImage, handles: &AtomicU64) -> Result<bool, Ckr> {
        {
            let mut st = self.lock_state();
            st.label = image.label;
            st.initialized = image.initialized;
            st.so_pin = image.so_pin;
            st.user_pin = image.user_pin;
            st.so_failures = image.so_failures;
            st.user_failures = image.user_failures;
        }
        let mut objs = self.write_objects();
        objs.retain(|_, o| o.owner.is_some());
        let mut migrated = false;
        for o in image.objects {
            let mut attrs: Attrs = o.attrs.into_iter().map(|a| (a.ty, a.value.0)).collect();
            if let std::collections::btree_map::Entry::Vacant(e) = attrs.entry(CKA_UNIQUE_ID) {
                // A state written before CKA_UNIQUE_ID existed: assigned once, persisted.
                e.insert(crate::object::new_unique_id()?);
                migrated = true;
            }
            let h = handles.fetch_add(1, Ordering::Relaxed);
            let secret = o.secret.map(|s| s.0);
            objs.insert(h, Arc::new(Object::new(h, None, attrs, secret, o.uses)));
        }
        Ok(migrated)
    }

    /// Locks the PIN/label state.
    pub fn lock_state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the object table.
    pub fn read_objects(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Object>>> {
        self.objects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the object table.
    pub fn write_objects(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Object>>> {
        self.objects
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn aad(&self) -> String {
        format!("caas-domc token v1 slot {}", self.slot)
    }

    fn unseal(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, ct) = sealed.split_first_chunk::<12>()?;
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, self.key.expose()).ok()?,
        );
        let mut buf = ct.to_vec();
        let n = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(*nonce),
                aead::Aad::from(self.aad().as_bytes()),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }

    /// The token's image: label, PIN state and token objects (not session objects).
    pub(crate) fn image(&self) -> TokenImage {
        let st = self.lock_state();
        let objs = self.read_objects();
        let mut objects: Vec<StoredObject> = objs
            .values()
            .filter(|o| o.owner.is_none())
            .map(|o| StoredObject {
                attrs: o
                    .snapshot()
                    .into_iter()
                    .map(|(ty, v)| Attr { ty, value: Blob(v) })
                    .collect(),
                secret: o.secret.as_ref().map(|s| Secret::new(s.to_vec())),
                uses: o.uses.load(Ordering::Relaxed),
            })
            .collect();
        objects.sort_by_key(|o| o.attrs.len());
        TokenImage {
            label: st.label.clone(),
            initialized: st.initialized,
            so_pin: st.so_pin.clone(),
            user_pin: st.user_pin.clone(),
            so_failures: st.so_failures,
            user_failures: st.user_failures,
            objects,
        }
    }

    /// Writes the token image (token objects and PIN state) to disk.
    pub fn persist(&self) -> Result<(), Ckr> {
        let _g = self
            .persist_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let image = self.image();
        let plain = zeroize::Zeroizing::new(to_bytes(&image));
        let mut nonce = [0u8; 12];
        rand::fill(&mut nonce).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, self.key.expose())
                .map_err(|_| Ckr(CKR_DEVICE_ERROR))?,
        );
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(self.aad().as_bytes()),
            &mut buf,
        )
        .map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
        buf.splice(0..0, nonce);
        caas_crypto::fs::write_secret(&self.path, &buf, None).map_err(|e| {
            tracing::error!(slot = self.slot, error = %e, "persisting token failed");
            Ckr(CKR_DEVICE_MEMORY)
        })
    }

    /// CKF_* token flags.
    #[must_use]
    pub fn flags(&self) -> u64 {
        let st = self.lock_state();
        let mut f = CKF_RNG | CKF_LOGIN_REQUIRED;
        if st.initialized {
            f |= CKF_TOKEN_INITIALIZED;
        }
        if !st.user_pin.expose().is_empty() {
            f |= CKF_USER_PIN_INITIALIZED;
        }
        let left = |n: u64| self.max_retries.saturating_sub(n);
        if st.user_failures > 0 {
            f |= CKF_USER_PIN_COUNT_LOW;
            match left(st.user_failures) {
                0 => f |= CKF_USER_PIN_LOCKED,
                1 => f |= CKF_USER_PIN_FINAL_TRY,
                _ => {}
            }
        }
        if st.so_failures > 0 {
            f |= CKF_SO_PIN_COUNT_LOW;
            match left(st.so_failures) {
                0 => f |= CKF_SO_PIN_LOCKED,
                1 => f |= CKF_SO_PIN_FINAL_TRY,
                _ => {}
            }
        }
        f
    }

    /// Checks a PIN for `user` (CKU_SO or CKU_USER), counting failures and locking.
    pub fn check_pin(&self, user: u64, pin: &[u8]) -> Result<(), Ckr> {
        let result = {
            let mut st = self.lock_state();
            let (stored, failures) = if user == CKU_SO {
                (st.so_pin.clone(), st.so_failures)
            } else {
                (st.user_pin.clone(), st.user_failures)
            };
            if stored.expose().is_empty() {
                return Err(Ckr(CKR_USER_PIN_NOT_INITIALIZED));
            }
            if failures >= self.max_retries {
                return Err(Ckr(CKR_PIN_LOCKED));
            }
            let ok = pin_matches(&stored, pin);
            let counter = if user == CKU_SO {
                &mut st.so_failures
            } else {
                &mut st.user_failures
            };
            let before = *counter;
            if ok {
                *counter = 0;
            } else {
                *counter += 1;
            }
            let changed = before != *counter;
            let locked = *counter >= self.max_retries;
            (ok, changed, locked)
        };
        let (ok, changed, locked) = result;
        if changed {
            self.persist()?;
        }
        match (ok, locked) {
            (true, _) => Ok(()),
            (false, true) => Err(Ckr(CKR_PIN_LOCKED)),
            (false, false) => Err(Ckr(CKR_PIN_INCORRECT)),
        }
    }

    /// C_InitToken (caller checked there are no sessions).
    pub fn init(&self, so_pin: &[u8], label: &str) -> Result<(), Ckr> {
        check_pin_len(so_pin)?;
        let initialized = self.lock_state().initialized;
        if initialized {
            self.check_pin(CKU_SO, so_pin)?;
        }
        {
            let mut st = self.lock_state();
            st.label = label.trim_end().to_string();
            st.initialized = true;
            if !initialized {
                st.so_pin = hash_pin(so_pin)?;
            }
            st.user_pin = Secret::default();
            st.user_failures = 0;
            st.so_failures = 0;
        }
        self.write_objects().retain(|_, o| o.owner.is_some());
        self.persist()
    }

    /// Sets the user PIN (C_InitPIN by the SO) and unlocks it.
    pub fn set_user_pin(&self, pin: &[u8]) -> Result<(), Ckr> {
        check_pin_len(pin)?;
        {
            let mut st = self.lock_state();
            st.user_pin = hash_pin(pin)?;
            st.user_failures = 0;
        }
        self.persist()
    }

    /// Replaces the SO PIN.
    pub fn set_so_pin(&self, pin: &[u8]) -> Result<(), Ckr> {
        check_pin_len(pin)?;
        self.lock_state().so_pin = hash_pin(pin)?;
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, key: [u8; 32]) -> Result<Token, Error> {
        Token::open(dir, 0, Arc::new(DomainKey::new(key)), 3, &AtomicU64::new(1))
    }

    #[test]
    fn pins_lock_after_retry_limit_and_persist() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let t = open(dir.path(), [1; 32])?;
        t.init(b"so-pin-1", "tok").map_err(|e| e.to_string())?;
        t.set_user_pin(b"1234").map_err(|e| e.to_string())?;
        assert_eq!(t.check_pin(CKU_USER, b"1234"), Ok(()));
        assert_eq!(t.check_pin(CKU_USER, b"0000"), Err(Ckr(CKR_PIN_INCORRECT)));
        assert_eq!(t.check_pin(CKU_USER, b"0000"), Err(Ckr(CKR_PIN_INCORRECT)));
        assert_eq!(t.check_pin(CKU_USER, b"0000"), Err(Ckr(CKR_PIN_LOCKED)));
        assert_eq!(t.check_pin(CKU_USER, b"1234"), Err(Ckr(CKR_PIN_LOCKED)));
        assert_ne!(t.flags() & CKF_USER_PIN_LOCKED, 0);
        drop(t);
        // Lockout survives a restart; the wrong domain key cannot open the state.
        let t = open(dir.path(), [1; 32])?;
        assert_eq!(t.check_pin(CKU_USER, b"1234"), Err(Ckr(CKR_PIN_LOCKED)));
        assert_eq!(t.lock_state().label, "tok");
        assert!(matches!(
            open(dir.path(), [2; 32]),
            Err(Error::CorruptState { .. })
        ));
        // The SO resets the user PIN.
        t.set_user_pin(b"5678").map_err(|e| e.to_string())?;
        assert_eq!(t.check_pin(CKU_USER, b"5678"), Ok(()));
        Ok(())
    }

    /// A token object stored before CKA_UNIQUE_ID existed gets an id at the first load,
    /// and keeps that same id afterwards (it is persisted then, not re-drawn per start).
    #[test]
    fn object_from_an_older_state_gets_a_stable_unique_id() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let t = open(dir.path(), [1; 32])?;
        t.init(b"so-pin-1", "tok").map_err(|e| e.to_string())?;
        let attrs: Attrs = [
            (CKA_CLASS, caas_vsm_proto::attr::ulong(CKO_DATA)),
            (CKA_TOKEN, caas_vsm_proto::attr::boolean(true)),
        ]
        .into_iter()
        .collect();
        t.write_objects()
            .insert(7, Arc::new(Object::new(7, None, attrs, None, 0)));
        t.persist().map_err(|e| e.to_string())?;
        drop(t);
        let id = |t: &Token| -> Option<Vec<u8>> {
            t.read_objects()
                .values()
                .next()
                .and_then(|o| o.bytes(CKA_UNIQUE_ID))
        };
        let first = id(&open(dir.path(), [1; 32])?).ok_or("no CKA_UNIQUE_ID after load")?;
        assert_eq!(first.len(), 32);
        assert_eq!(id(&open(dir.path(), [1; 32])?), Some(first));
        Ok(())
    }
}
