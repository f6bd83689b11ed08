//! The volume's keys and its per-block AEAD.
//!
//! Version 2: nothing is computed under the data key K itself. With the SP 800-108 KDF
//! (`caas_crypto::kdf`) and the context `volume id ‖ volume salt` (the salt is 256 random
//! bits in the header), K gives:
//!
//! - the key check value: 16 bytes of KDF output (label `caas-volume-v2 key check value`);
//! - the header MAC key (HMAC-SHA256, tag truncated to 16 bytes) and the state-sector MAC
//!   key (HMAC-SHA256, 32 bytes) — no nonces at all;
//! - one AES-256-GCM key per writing *session* (label `caas-volume-v2 block key`, context
//!   extended with the session's epoch and 88-bit random session salt), used with the
//!   nonce `epoch ‖ counter` where the counter starts at 1 in every session.
//!
//! A (key, nonce) pair therefore repeats only if two sessions of volumes with the same salt
//! drew the same epoch *and* the same random session salt — the epoch is persisted and
//! authenticated, the session salt is fresh randomness at every writable open, so even a
//! storage host that rolls the whole volume back (and so makes an epoch recur) cannot make
//! a session reuse a key (probability 2^-88 per pair of sessions sharing an epoch).
//!
//! Version 1 (read-only support): K directly, block nonce `counter ‖ salt32`, key check
//! value and header tag as GMACs under K with fixed nonces.
use crate::entry::{Slot, SlotKind};
use crate::{Error, Version};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use caas_crypto::SecretKey;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// Domain separation for v1 block associated data.
const BLOCK_AAD_V1: &[u8; 8] = b"CAASBLK1";
/// Domain separation for v2 block associated data.
const BLOCK_AAD_V2: &[u8; 8] = b"CAASBLK2";
/// v1: domain separation for the key check value.
const KCV_AAD_TAG_V1: &[u8] = b"caas-volume-kcv-v1";
/// v1: reserved nonce of the key check value.
const KCV_NONCE_V1: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// v1: reserved nonce of the header tag.
const HEADER_NONCE_V1: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// KDF labels of version 2.
const LABEL_KCV: &[u8] = b"caas-volume-v2 key check value";
const LABEL_HEADER: &[u8] = b"caas-volume-v2 header mac";
const LABEL_STATE: &[u8] = b"caas-volume-v2 state mac";
const LABEL_BLOCK: &[u8] = b"caas-volume-v2 block key";
/// Session keys kept for reading (each is re-derivable; past this many the cache restarts).
const MAX_CACHED_SESSIONS: usize = 4096;

/// Identifies the session that wrote a slot: its key is derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId {
    /// The volume's epoch when the session started (persisted in the state sector; grows
    /// with every writable open). 0 only in version 1.
    pub epoch: u32,
    /// Random per session (88 bits). In version 1, the first four bytes are the nonce's
    /// 32-bit session salt.
    pub salt: [u8; 11],
}

/// A writing session: its id and its block key.
pub struct Session {
    id: SessionId,
    key: Arc<LessSafeKey>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl Session {
    /// The session id stored in every slot it writes.
    pub fn id(&self) -> SessionId {
        self.id
    }
}

/// A volume's keys, ready to check its header and state sector and to seal and open its
/// blocks.
pub struct VolumeCipher {
    version: Version,
    volume_id: [u8; 16],
    salt: [u8; 32],
    data_key: SecretKey,
    v1_key: Option<LessSafeKey>,
    header_mac: Option<hmac::Key>,
    state_mac: Option<hmac::Key>,
    /// The first session key derived (a writer's own session): looked up without a lock.
    primary: OnceLock<(SessionId, Arc<LessSafeKey>)>,
    sessions: RwLock<HashMap<SessionId, Arc<LessSafeKey>>>,
}

impl std::fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeCipher")
            .field("version", &self.version)
            .field("key", &"[REDACTED]")
            .field("volume_id", &self.volume_id)
            .finish()
    }
}

fn gcm_key(k: &[u8]) -> Result<LessSafeKey, Error> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, k).map_err(|_| Error::Crypto)?,
    ))
}

impl VolumeCipher {
    /// The keys of a version 2 volume with this id and salt.
    pub fn new_v2(key: &SecretKey, volume_id: [u8; 16], salt: [u8; 32]) -> Result<Self, Error> {
        let mut c = Self {
            version: Version::V2,
            volume_id,
            salt,
            data_key: key.clone(),
            v1_key: None,
            header_mac: None,
            state_mac: None,
            primary: OnceLock::new(),
            sessions: RwLock::new(HashMap::new()),
        };
        let hk = c.derive(LABEL_HEADER, &[])?;
        c.header_mac = Some(hmac::Key::new(hmac::HMAC_SHA256, hk.expose()));
        let sk = c.derive(LABEL_STATE, &[])?;
        c.state_mac = Some(hmac::Key::new(hmac::HMAC_SHA256, sk.expose()));
        Ok(c)
    }

    /// The key of a version 1 volume (read-only use: checking its header, opening blocks).
    pub fn new_v1(key: &SecretKey, volume_id: [u8; 16]) -> Result<Self, Error> {
        Ok(Self {
            version: Version::V1,
            volume_id,
            salt: [0; 32],
            data_key: key.clone(),
            v1_key: Some(gcm_key(key.expose())?),
            header_mac: None,
            state_mac: None,
            primary: OnceLock::new(),
            sessions: RwLock::new(HashMap::new()),
        })
    }

    /// The format version the cipher implements.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The volume id the cipher is bound to.
    pub fn volume_id(&self) -> [u8; 16] {
        self.volume_id
    }

    /// The volume salt the keys are derived with (zero in v1).
    pub fn salt(&self) -> [u8; 32] {
        self.salt
    }

    fn context(&self, extra: &[u8]) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(48 + extra.len());
        ctx.extend_from_slice(&self.volume_id);
        ctx.extend_from_slice(&self.salt);
        ctx.extend_from_slice(extra);
        ctx
    }

    fn derive(&self, label: &[u8], extra: &[u8]) -> Result<SecretKey, Error> {
        caas_crypto::kdf::derive_key(self.data_key.expose(), label, &self.context(extra))
            .map_err(|_| Error::Crypto)
    }

    fn session_context(id: &SessionId) -> [u8; 15] {
        let mut b = [0u8; 15];
        b[..4].copy_from_slice(&id.epoch.to_be_bytes());
        b[4..].copy_from_slice(&id.salt);
        b
    }

    fn session_key(&self, id: &SessionId) -> Result<Arc<LessSafeKey>, Error> {
        if let Some(k) = self.sessions.read().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(k);
        }
        let k = self.derive(LABEL_BLOCK, &Self::session_context(id))?;
        let key = Arc::new(gcm_key(k.expose())?);
        let _ = self.primary.set((*id, key.clone()));
        if let Ok(mut m) = self.sessions.write() {
            // Full: start over rather than derive per block from then on.
            if m.len() >= MAX_CACHED_SESSIONS {
                m.clear();
            }
            m.insert(*id, key.clone());
        }
        Ok(key)
    }

    /// Starts a writing session in `epoch` (≥ 1) with a fresh random session salt.
    /// Version 1 volumes are never written.
    pub fn new_session(&self, epoch: u32) -> Result<Session, Error> {
        if self.version != Version::V2 {
            return Err(Error::V1ReadOnly);
        }
        if epoch == 0 {
            return Err(Error::InvalidHeader("epoch 0 is reserved"));
        }
        let salt = caas_crypto::random_array().map_err(|_| Error::Crypto)?;
        let id = SessionId { epoch, salt };
        Ok(Session {
            id,
            key: self.session_key(&id)?,
        })
    }

    /// Runs `f` with the key that sealed `slot`.
    fn with_key<R>(&self, slot: &Slot, f: impl FnOnce(&LessSafeKey) -> R) -> Result<R, Error> {
        match self.version {
            Version::V1 => self.v1_key.as_ref().map(f).ok_or(Error::Crypto),
            Version::V2 => {
                if let Some((id, k)) = self.primary.get()
                    && *id == slot.session
                {
                    return Ok(f(k));
                }
                if let Ok(m) = self.sessions.read()
                    && let Some(k) = m.get(&slot.session)
                {
                    return Ok(f(k));
                }
                let k = self.session_key(&slot.session)?;
                Ok(f(&k))
            }
        }
    }

    fn aad(&self, index: u64, kind: SlotKind) -> [u8; 33] {
        let mut aad = [0u8; 33];
        aad[..8].copy_from_slice(match self.version {
            Version::V1 => BLOCK_AAD_V1,
            Version::V2 => BLOCK_AAD_V2,
        });
        aad[8..24].copy_from_slice(&self.volume_id);
        aad[24..32].copy_from_slice(&index.to_be_bytes());
        aad[32] = kind as u8;
        aad
    }

    /// Encrypts block `index` in place under the session's key with the session counter
    /// `counter` (≥ 1, never reused within the session); returns its data slot.
    pub fn seal_block(
        &self,
        session: &Session,
        index: u64,
        counter: u64,
        buf: &mut [u8],
    ) -> Result<Slot, Error> {
        let mut slot = Slot {
            kind: SlotKind::Data,
            session: session.id,
            counter,
            tag: [0; 16],
        };
        let aad = self.aad(index, SlotKind::Data);
        let tag = session
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(slot.nonce(self.version)),
                Aad::from(&aad),
                buf,
            )
            .map_err(|_| Error::Crypto)?;
        slot.tag.copy_from_slice(tag.as_ref());
        Ok(slot)
    }

    /// A "reads as zeroes" slot for block `index` (a GMAC over its associated data).
    pub fn zero_slot(&self, session: &Session, index: u64, counter: u64) -> Result<Slot, Error> {
        let mut slot = Slot {
            kind: SlotKind::Zero,
            session: session.id,
            counter,
            tag: [0; 16],
        };
        let aad = self.aad(index, SlotKind::Zero);
        let tag = session
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(slot.nonce(self.version)),
                Aad::from(&aad),
                &mut [],
            )
            .map_err(|_| Error::Crypto)?;
        slot.tag.copy_from_slice(tag.as_ref());
        Ok(slot)
    }

    /// Decrypts `ct` into `out` (same length) if `slot` (a data slot) authenticates it as
    /// block `index`.
    pub fn open_block(
        &self,
        index: u64,
        slot: &Slot,
        ct: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        if slot.kind != SlotKind::Data {
            return Err(Error::BlockAuth { index });
        }
        let aad = self.aad(index, SlotKind::Data);
        let nonce = slot.nonce(self.version);
        self.with_key(slot, |k| {
            k.open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                ct,
                &slot.tag,
                out,
            )
        })?
        .map_err(|_| Error::BlockAuth { index })
    }

    /// Decrypts block `index` in place if `slot` authenticates it. On failure `buf` holds
    /// unspecified bytes (never returned to anyone): re-read the ciphertext to retry.
    pub fn open_block_in_place(
        &self,
        index: u64,
        slot: &Slot,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        if slot.kind != SlotKind::Data {
            return Err(Error::BlockAuth { index });
        }
        let aad = self.aad(index, SlotKind::Data);
        let nonce = slot.nonce(self.version);
        self.with_key(slot, |k| {
            k.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &slot.tag,
                buf,
            )
            .map(|_| ())
        })?
        .map_err(|_| Error::BlockAuth { index })
    }

    /// Verifies a "reads as zeroes" slot.
    pub fn verify_zero(&self, index: u64, slot: &Slot) -> bool {
        if slot.kind != SlotKind::Zero {
            return false;
        }
        let aad = self.aad(index, SlotKind::Zero);
        let nonce = slot.nonce(self.version);
        self.with_key(slot, |k| {
            k.open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &[],
                &slot.tag,
                &mut [],
            )
            .is_ok()
        })
        .unwrap_or(false)
    }

    /// The key check value. v2: 16 bytes of KDF output for this volume (a PRF value: it
    /// reveals nothing about K nor about any other derived key). v1: a GMAC under K with a
    /// fixed nonce.
    pub fn kcv(&self) -> Result<[u8; 16], Error> {
        match self.version {
            Version::V2 => {
                let b = caas_crypto::kdf::derive(
                    self.data_key.expose(),
                    LABEL_KCV,
                    &self.context(&[]),
                    16,
                )
                .map_err(|_| Error::Crypto)?;
                let mut out = [0u8; 16];
                out.copy_from_slice(b.expose());
                Ok(out)
            }
            Version::V1 => {
                let mut aad = Vec::with_capacity(KCV_AAD_TAG_V1.len() + 16);
                aad.extend_from_slice(KCV_AAD_TAG_V1);
                aad.extend_from_slice(&self.volume_id);
                self.gmac_v1(KCV_NONCE_V1, &aad)
            }
        }
    }

    /// The header tag over the immutable part of the header. v2: HMAC-SHA256 under the
    /// volume's header key, truncated to 16 bytes. v1: a GMAC under K with a fixed nonce.
    pub fn header_tag(&self, immutable: &[u8]) -> Result<[u8; 16], Error> {
        match (&self.header_mac, self.version) {
            (Some(k), Version::V2) => {
                let t = hmac::sign(k, immutable);
                let mut out = [0u8; 16];
                out.copy_from_slice(&t.as_ref()[..16]);
                Ok(out)
            }
            (_, Version::V1) => self.gmac_v1(HEADER_NONCE_V1, immutable),
            (None, Version::V2) => Err(Error::Crypto),
        }
    }

    /// The state-sector MAC (v2): HMAC-SHA256 under the volume's state key over the header
    /// tag (binding it to this header) and the state sector's other bytes.
    pub fn state_mac(&self, header_tag: &[u8; 16], body: &[u8]) -> Result<[u8; 32], Error> {
        let k = self.state_mac.as_ref().ok_or(Error::V1ReadOnly)?;
        let mut ctx = hmac::Context::with_key(k);
        ctx.update(header_tag);
        ctx.update(body);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Ok(out)
    }

    /// Verifies a state-sector MAC in constant time.
    pub fn verify_state_mac(
        &self,
        header_tag: &[u8; 16],
        body: &[u8],
        mac: &[u8; 32],
    ) -> Result<(), Error> {
        let k = self.state_mac.as_ref().ok_or(Error::V1ReadOnly)?;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(header_tag);
        msg.extend_from_slice(body);
        hmac::verify(k, &msg, mac).map_err(|_| Error::StateTampered)
    }

    fn gmac_v1(&self, nonce: [u8; 12], aad: &[u8]) -> Result<[u8; 16], Error> {
        let key = self.v1_key.as_ref().ok_or(Error::Crypto)?;
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut [],
            )
            .map_err(|_| Error::Crypto)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> VolumeCipher {
        VolumeCipher::new_v2(&SecretKey::from_bytes([7u8; 32]), [9u8; 16], [3u8; 32])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Known answer: Test Case 13 of the GCM specification (McGrew & Viega, "The
    /// Galois/Counter Mode of Operation"): K = 0^256, IV = 0^96, empty P and A,
    /// T = 530f8afbc74536b9a963b4f1c4cb738b.
    #[test]
    fn aes_256_gcm_known_answer() {
        let key = gcm_key(&[0u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::empty(),
                &mut [],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            hex::encode(tag.as_ref()),
            "530f8afbc74536b9a963b4f1c4cb738b"
        );
    }

    #[test]
    fn block_roundtrip_and_binding() {
        let c = cipher();
        let s = c.new_session(1).unwrap_or_else(|e| panic!("{e}"));
        let plain = [0x5au8; 4096];
        let mut buf = plain;
        let slot = c
            .seal_block(&s, 3, 1, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(buf, plain);
        let mut out = [0u8; 4096];
        assert!(c.open_block(3, &slot, &buf, &mut out).is_ok());
        assert_eq!(out, plain);
        let mut inplace = buf;
        assert!(c.open_block_in_place(3, &slot, &mut inplace).is_ok());
        assert_eq!(inplace, plain);
        let mut inplace = buf;
        assert!(c.open_block_in_place(2, &slot, &mut inplace).is_err());
        // Moved to another index: rejected.
        assert_eq!(
            c.open_block(4, &slot, &buf, &mut out),
            Err(Error::BlockAuth { index: 4 })
        );
        // Another volume (same key, other id or salt): rejected.
        for other in [
            VolumeCipher::new_v2(&SecretKey::from_bytes([7u8; 32]), [8u8; 16], [3u8; 32]),
            VolumeCipher::new_v2(&SecretKey::from_bytes([7u8; 32]), [9u8; 16], [4u8; 32]),
        ] {
            let other = other.unwrap_or_else(|e| panic!("{e}"));
            assert!(other.open_block(3, &slot, &buf, &mut out).is_err());
        }
        // Another session (other salt or epoch): rejected.
        let mut moved = slot;
        moved.session.salt[0] ^= 1;
        assert!(c.open_block(3, &moved, &buf, &mut out).is_err());
        let mut moved = slot;
        moved.session.epoch += 1;
        assert!(c.open_block(3, &moved, &buf, &mut out).is_err());
        // A fresh cipher (no cached keys) re-derives the session key from the slot.
        assert!(cipher().open_block(3, &slot, &buf, &mut out).is_ok());
        // Flipped ciphertext bit: rejected.
        buf[100] ^= 1;
        assert!(c.open_block(3, &slot, &buf, &mut out).is_err());
    }

    #[test]
    fn sessions_get_distinct_keys() {
        let c = cipher();
        let a = c.new_session(5).unwrap_or_else(|e| panic!("{e}"));
        let b = c.new_session(5).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a.id(), b.id(), "same epoch, fresh random session salt");
        let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
        c.seal_block(&a, 0, 1, &mut x)
            .unwrap_or_else(|e| panic!("{e}"));
        c.seal_block(&b, 0, 1, &mut y)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(
            x, y,
            "same epoch, block, counter and plaintext: other keystream"
        );
    }

    #[test]
    fn zero_slots_bind_index_and_kind() {
        let c = cipher();
        let s = c.new_session(1).unwrap_or_else(|e| panic!("{e}"));
        let z = c.zero_slot(&s, 2, 5).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.verify_zero(2, &z));
        assert!(!c.verify_zero(3, &z));
        // A data tag over an empty block is not a zero tag (kind is in the AAD).
        let mut d = c
            .seal_block(&s, 2, 6, &mut [])
            .unwrap_or_else(|e| panic!("{e}"));
        d.kind = SlotKind::Zero;
        assert!(!c.verify_zero(2, &d));
    }

    #[test]
    fn kcv_depends_on_key_volume_and_salt() {
        let a = cipher().kcv().unwrap_or_else(|e| panic!("{e}"));
        for other in [
            VolumeCipher::new_v2(&SecretKey::from_bytes([6u8; 32]), [9u8; 16], [3u8; 32]),
            VolumeCipher::new_v2(&SecretKey::from_bytes([7u8; 32]), [9u8; 16], [5u8; 32]),
        ] {
            let b = other
                .and_then(|c| c.kcv())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(a, b);
        }
        assert_eq!(a, cipher().kcv().unwrap_or_else(|e| panic!("{e}")));
    }

    /// Known answer for the v2 derivations (pins the labels and context layout).
    #[test]
    fn v2_derivations_known_answer() {
        let c = VolumeCipher::new_v2(&SecretKey::from_bytes([0u8; 32]), [0u8; 16], [0u8; 32])
            .unwrap_or_else(|e| panic!("{e}"));
        let kcv = c.kcv().unwrap_or_else(|e| panic!("{e}"));
        let direct = caas_crypto::kdf::derive(&[0u8; 32], LABEL_KCV, &[0u8; 48], 16)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&kcv[..], direct.expose());
        let hk = caas_crypto::kdf::derive_key(&[0u8; 32], LABEL_HEADER, &[0u8; 48])
            .unwrap_or_else(|e| panic!("{e}"));
        let t = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, hk.expose()), b"hdr");
        assert_eq!(
            c.header_tag(b"hdr").unwrap_or_else(|e| panic!("{e}")),
            t.as_ref()[..16]
        );
    }

    #[test]
    fn v1_cannot_write() {
        let c = VolumeCipher::new_v1(&SecretKey::from_bytes([7u8; 32]), [9u8; 16])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.new_session(1), Err(Error::V1ReadOnly)));
        assert!(c.state_mac(&[0; 16], b"").is_err());
    }
}
