//! Message-based AES-GCM (PKCS#11 3.0 §5.19 and the `CK_GCM_MESSAGE_PARAMS` of CKM_AES_GCM):
//! `C_MessageEncryptInit`, `C_EncryptMessage`, `C_EncryptMessageBegin`/`Next`,
//! `C_MessageEncryptFinal` and the decryption side. Each message is one AES-GCM encryption
//! with its own IV and associated data, through the same [`crate::ops::CipherOp`] as
//! `C_Encrypt` (key type, usage flag, `CKA_ALLOWED_MECHANISMS`); each message counts one key
//! use and is audited (`C_EncryptMessage` / `C_DecryptMessage`), so usage limits hold per
//! message. Multi-part messages (`*MessageBegin`/`Next`) buffer their parts in the domain (a
//! message of at most `MAX_MESSAGE` bytes, so its answer fits one frame; longer is
//! CKR_DATA_LEN_RANGE and ends it) and answer the whole output at the part flagged
//! CKF_END_OF_MESSAGE, so a decryption never releases plaintext before its tag verified;
//! the IV is generated and the use counted at `*MessageBegin`. C_SessionCancel with
//! CKF_MESSAGE_ENCRYPT / CKF_MESSAGE_DECRYPT ends the operation.
//!
//! IV generators (`ivGenerator`):
//! - `CKG_NO_GENERATE`: the caller's IV (1–256 bytes), its uniqueness the caller's duty as
//!   with CKM_AES_GCM's `CK_GCM_PARAMS`.
//! - `CKG_GENERATE` and `CKG_GENERATE_COUNTER`: the leading `ulIvFixedBits` bits of the
//!   caller's IV are kept and the rest is the key's counter, big-endian, right-aligned
//!   (SP 800-38D §8.2.1). **The domain never issues the same counter value twice for the
//!   same key value**: one counter per key *value* (copies, re-imports and unwrapped twins
//!   share it, found by value like the wrap policy's twin check), reserved ahead in blocks of
//!   [`IV_BLOCK`] and persisted on every twin object (`CKA_CAAS_GCM_IV_STATE`, read-only,
//!   carried by token export/import) before any value of a block is used, so a restart
//!   resumes above every issued value. Two IVs are equal only if their counter fields are,
//!   which holds across different `ulIvFixedBits` as long as every issued value fits the
//!   narrowest counter field ever used for the key (also persisted): a request whose field
//!   is too narrow for the next value is CKR_MECHANISM_PARAM_INVALID, never a wrap.
//!   Limit: the counter lives on the key's objects (and, while the domain runs, in memory by
//!   value); a key value whose every object was destroyed and which is imported again
//!   (unwrapped, created) after a restart of the domain starts from its new object's state,
//!   i.e. from zero. A counter that must survive that belongs to a key that is never
//!   destroyed (a token object).
//! - `CKG_GENERATE_RANDOM`: the non-fixed bits random; at least 96 of them (SP 800-38D
//!   §8.2.2), else CKR_MECHANISM_PARAM_INVALID.
//! - `CKG_GENERATE_COUNTER_XOR`: not served (CKR_MECHANISM_PARAM_INVALID).
//!
//! A length query (NULL output) answers the ciphertext length without using the key or an IV.

use super::*;
use aws_lc_rs::hmac;
use caas_vsm_proto::GcmMessageParams;
use caas_vsm_proto::attr::CKA_CAAS_GCM_IV_STATE;

/// The largest multi-part message: its answer (with IV and tag) must fit one frame.
const MAX_MESSAGE: usize = caas_vsm_proto::MAX_FRAME - 1024;

/// IV counter values reserved (and persisted) at a time.
pub const IV_BLOCK: u64 = 4096;

/// An active message-based operation of a session: the key and the mechanism.
#[derive(Debug)]
pub struct MessageOp {
    key: Arc<Object>,
    mechanism: u64,
    /// The multi-part message in progress (between `*MessageBegin` and the last `*Next`).
    part: Option<Part>,
}

/// A multi-part message: its IV, associated data, tag length and the parts so far.
#[derive(Debug)]
struct Part {
    iv: Vec<u8>,
    aad: Vec<u8>,
    tag_bits: u64,
    buf: Zeroizing<Vec<u8>>,
}

/// The counter of one key value.
#[derive(Debug, Clone, Copy)]
struct IvState {
    /// Next value to issue.
    next: u64,
    /// Values below this one may have been issued (persisted on the twins).
    reserved: u64,
    /// The narrowest counter field (bits) used so far (persisted).
    width: u32,
}

/// The per-key-value IV counters of a domain, keyed by an HMAC of the key value under a key
/// of this process (never stored, never shown).
pub struct IvCounters {
    fingerprint: hmac::Key,
    map: Mutex<HashMap<Vec<u8>, IvState>>,
}

impl std::fmt::Debug for IvCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IvCounters")
    }
}

impl IvCounters {
    /// Empty counters with a fresh fingerprint key.
    pub fn new() -> Result<Self, Ckr> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ok(Self {
            fingerprint: hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .map_err(|_| Ckr(CKR_DEVICE_ERROR))?,
            map: Mutex::new(HashMap::new()),
        })
    }
}

/// `CKA_CAAS_GCM_IV_STATE` of an object: (reserved, width); (0, 64) when absent.
fn stored_state(o: &Object) -> (u64, u32) {
    let Some(v) = o.bytes(CKA_CAAS_GCM_IV_STATE) else {
        return (0, 64);
    };
    let word = |i: usize| {
        v.get(i..i + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    match (word(0), word(8)) {
        (Some(r), Some(w)) => (r, u32::try_from(w.min(64)).unwrap_or(64)),
        // Unreadable state: assume the worst (nothing more can be issued).
        _ => (u64::MAX, 0),
    }
}

fn encode_state(reserved: u64, width: u32) -> Vec<u8> {
    [reserved.to_le_bytes(), u64::from(width).to_le_bytes()].concat()
}

/// Whether `value` fits a counter field of `width` bits.
fn fits(value: u64, width: u32) -> bool {
    width >= 64 || value < (1u64 << width)
}

/// The generated IV: `iv`'s leading `fixed_bits` bits, then `fill` (the low bits of the
/// result come from the end of `fill`).
fn compose_iv(iv: &[u8], fixed_bits: usize, fill: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; iv.len()];
    let n = out.len();
    for (i, b) in fill.iter().rev().take(n).enumerate() {
        out[n - 1 - i] = *b;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let start = i * 8;
        if start + 8 <= fixed_bits {
            *o = iv[i];
        } else if start < fixed_bits {
            let keep = fixed_bits - start;
            let mask = 0xffu8 << (8 - keep);
            *o = (iv[i] & mask) | (*o & !mask);
        }
    }
    out
}

impl Domain {
    /// Every secret key object of every token whose value equals `value` (constant-time).
    fn twins(&self, value: &[u8]) -> Vec<(u64, Arc<Object>)> {
        let mut out = Vec::new();
        for slot in 0..self.tokens.len() as u64 {
            let Ok(t) = self.token(slot) else { continue };
            let objects = t.read_objects();
            out.extend(
                objects
                    .values()
                    .filter(|o| {
                        o.class() == CKO_SECRET_KEY
                            && o.secret.as_deref().is_some_and(|v| {
                                aws_lc_rs::constant_time::verify_slices_are_equal(v, value).is_ok()
                            })
                    })
                    .map(|o| (slot, o.clone())),
            );
        }
        out
    }

    /// The next counter value for `key`, for a counter field of `width` bits: reserves
    /// (and persists on every twin) a new block first when needed.
    fn next_iv_counter(&self, key: &Object, width: u32) -> Result<u64, Ckr> {
        let value = key.secret.as_deref().ok_or(Ckr(CKR_KEY_HANDLE_INVALID))?;
        let fp = hmac::sign(&self.iv_counters.fingerprint, value)
            .as_ref()
            .to_vec();
        let mut map = self
            .iv_counters
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = match map.get(&fp) {
            Some(s) => *s,
            None => {
                let (reserved, width) = self
                    .twins(value)
                    .iter()
                    .map(|(_, o)| stored_state(o))
                    .fold((0u64, 64u32), |(r, w), (r2, w2)| (r.max(r2), w.min(w2)));
                IvState {
                    next: reserved,
                    reserved,
                    width,
                }
            }
        };
        let width = st.width.min(width);
        if !fits(st.next, width) || st.next == u64::MAX {
            return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
        }
        let mut new = IvState {
            next: st.next + 1,
            reserved: st.reserved,
            width,
        };
        if st.next >= st.reserved || width < st.width {
            new.reserved = st.next.saturating_add(IV_BLOCK).max(st.reserved);
            let state = encode_state(new.reserved, width);
            let twins = self.twins(value);
            let mut slots = Vec::new();
            for (slot, o) in &twins {
                o.attrs
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(CKA_CAAS_GCM_IV_STATE, state.clone());
                if o.is_token() && !slots.contains(slot) {
                    slots.push(*slot);
                }
            }
            for slot in slots {
                self.token(slot)?.persist()?;
            }
        }
        map.insert(fp, new);
        Ok(st.next)
    }

    /// C_MessageEncryptInit / C_MessageDecryptInit: CKM_AES_GCM (no parameter: each message
    /// brings its `CK_GCM_MESSAGE_PARAMS`) with an AES key allowed to encrypt/decrypt.
    pub(super) fn message_init(
        &self,
        app: &App,
        session: u64,
        m: &Mechanism,
        key: u64,
        encrypt: bool,
    ) -> Result<Response, Ckr> {
        let (s, slot) = self.op_session(app, session)?;
        let op = if encrypt {
            "C_MessageEncryptInit"
        } else {
            "C_MessageDecryptInit"
        };
        let k = self.key(app, slot, key)?;
        let refuse = |e| self.refuse(app, op, slot, Some(&k), Some(m.mechanism), e);
        let flag = if encrypt {
            CKF_MESSAGE_ENCRYPT
        } else {
            CKF_MESSAGE_DECRYPT
        };
        if !crate::ops::supports(m.mechanism, flag) {
            return Err(refuse(Ckr(CKR_MECHANISM_INVALID)));
        }
        if !matches!(m.param, MechParam::None {}) {
            return Err(refuse(Ckr(CKR_MECHANISM_PARAM_INVALID)));
        }
        // The same checks as a C_EncryptInit (key class and type, usage, allowed mechanisms)
        // with a placeholder IV.
        let probe = MechParam::Gcm {
            iv: Blob(vec![0; 12]),
            aad: Blob(Vec::new()),
            tag_bits: 128,
        };
        let usage = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
        CipherOp::init(m.mechanism, &probe, &k, encrypt, usage).map_err(refuse)?;
        let mut g = lock(&s);
        let slot_op = if encrypt {
            &mut g.msg_encrypt
        } else {
            &mut g.msg_decrypt
        };
        if slot_op.is_some() {
            return Err(Ckr(CKR_OPERATION_ACTIVE));
        }
        *slot_op = Some(MessageOp {
            key: k,
            mechanism: m.mechanism,
            part: None,
        });
        Ok(Response::ok(Body::Empty {}))
    }

    /// C_MessageEncryptFinal / C_MessageDecryptFinal.
    pub(super) fn message_final(
        &self,
        app: &App,
        session: u64,
        encrypt: bool,
    ) -> Result<Response, Ckr> {
        let s = self.session(app, session)?;
        let mut g = lock(&s);
        let op = if encrypt {
            g.msg_encrypt.take()
        } else {
            g.msg_decrypt.take()
        };
        op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        Ok(Response::ok(Body::Empty {}))
    }

    /// The operation's key and mechanism (the session lock is not held while encrypting).
    fn message_op(
        &self,
        app: &App,
        session: u64,
        encrypt: bool,
    ) -> Result<(u64, Arc<Object>, u64), Ckr> {
        let (s, slot) = self.op_session(app, session)?;
        let g = lock(&s);
        let op = if encrypt {
            g.msg_encrypt.as_ref()
        } else {
            g.msg_decrypt.as_ref()
        };
        let op = op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.part.is_some() {
            return Err(Ckr(CKR_OPERATION_ACTIVE));
        }
        Ok((slot, op.key.clone(), op.mechanism))
    }

    /// C_EncryptMessage (single part).
    pub(super) fn encrypt_message(
        &self,
        app: &App,
        session: u64,
        p: &GcmMessageParams,
        aad: &[u8],
        data: &[u8],
        cap: Option<u64>,
    ) -> Result<Response, Ckr> {
        let (slot, k, mech) = self.message_op(app, session, true)?;
        let refuse = |e| self.refuse(app, "C_EncryptMessage", slot, Some(&k), Some(mech), e);
        let tag_len = gcm_tag_len(p.tag_bits).map_err(refuse)?;
        let len = data.len() as u64;
        match cap {
            None => return Ok(Response::ok(Body::Len { len })),
            Some(c) if c < len => {
                return Ok(Response {
                    rv: CKR_BUFFER_TOO_SMALL,
                    body: Body::Len { len },
                });
            }
            Some(_) => {}
        }
        let (iv, mut op) = self.message_iv(&k, mech, p, aad).map_err(refuse)?;
        self.use_key(app, slot, &k, "C_EncryptMessage", mech)?;
        op.update(data)?;
        sealed(iv, op.finish()?, tag_len)
    }

    /// The IV of one message to encrypt (the caller's, or generated: a counter value or
    /// random bits) and its cipher. Everything that can fail on the caller's input is
    /// checked before an IV is spent.
    fn message_iv(
        &self,
        k: &Object,
        mech: u64,
        p: &GcmMessageParams,
        aad: &[u8],
    ) -> Result<(Vec<u8>, CipherOp), Ckr> {
        gcm_tag_len(p.tag_bits)?;
        let iv_len = p.iv.0.len();
        if !(1..=256).contains(&iv_len) {
            return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
        }
        let fixed = usize::try_from(p.iv_fixed_bits).unwrap_or(usize::MAX);
        let free_bits = (iv_len * 8).checked_sub(fixed);
        let op_for = |iv: Vec<u8>| -> Result<CipherOp, Ckr> {
            CipherOp::init(
                mech,
                &MechParam::Gcm {
                    iv: Blob(iv),
                    aad: Blob(aad.to_vec()),
                    tag_bits: p.tag_bits,
                },
                k,
                true,
                CKA_ENCRYPT,
            )
        };
        let op = op_for(p.iv.0.clone())?;
        let iv = match (p.generator, free_bits) {
            (CKG_NO_GENERATE, _) => return Ok((p.iv.0.clone(), op)),
            (CKG_GENERATE | CKG_GENERATE_COUNTER, Some(free)) if free > 0 => {
                let width = u32::try_from(free.min(64)).unwrap_or(64);
                let c = self.next_iv_counter(k, width)?;
                compose_iv(&p.iv.0, fixed, &c.to_be_bytes())
            }
            (CKG_GENERATE_RANDOM, Some(free)) if free >= 96 => {
                let mut r = vec![0u8; iv_len];
                aws_lc_rs::rand::fill(&mut r).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
                compose_iv(&p.iv.0, fixed, &r)
            }
            _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
        };
        let op = op_for(iv.clone())?;
        Ok((iv, op))
    }

    /// The session's message operation, for a multi-part step.
    fn with_message_op<T>(
        &self,
        app: &App,
        session: u64,
        encrypt: bool,
        f: impl FnOnce(&mut MessageOp) -> Result<T, Ckr>,
    ) -> Result<T, Ckr> {
        let s = self.session(app, session)?;
        let mut g = lock(&s);
        let op = if encrypt {
            g.msg_encrypt.as_mut()
        } else {
            g.msg_decrypt.as_mut()
        };
        f(op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?)
    }

    /// C_EncryptMessageBegin / C_DecryptMessageBegin: the IV (generated now when encrypting,
    /// and the key use counted and audited: one message) and the associated data.
    pub(super) fn message_begin(
        &self,
        app: &App,
        session: u64,
        p: &GcmMessageParams,
        aad: &[u8],
        encrypt: bool,
    ) -> Result<Response, Ckr> {
        let (slot, k, mech) = self.message_op(app, session, encrypt)?;
        let name = if encrypt {
            "C_EncryptMessageBegin"
        } else {
            "C_DecryptMessageBegin"
        };
        let refuse = |e| self.refuse(app, name, slot, Some(&k), Some(mech), e);
        let iv = if encrypt {
            self.message_iv(&k, mech, p, aad).map_err(refuse)?.0
        } else {
            gcm_tag_len(p.tag_bits).map_err(refuse)?;
            CipherOp::init(
                mech,
                &MechParam::Gcm {
                    iv: p.iv.clone(),
                    aad: Blob(aad.to_vec()),
                    tag_bits: p.tag_bits,
                },
                &k,
                false,
                CKA_DECRYPT,
            )
            .map_err(refuse)?;
            p.iv.0.clone()
        };
        self.use_key(app, slot, &k, name, mech)?;
        let part = Part {
            iv: iv.clone(),
            aad: aad.to_vec(),
            tag_bits: p.tag_bits,
            buf: Zeroizing::new(Vec::new()),
        };
        self.with_message_op(app, session, encrypt, |op| {
            if op.part.is_some() {
                return Err(Ckr(CKR_OPERATION_ACTIVE));
            }
            op.part = Some(part);
            Ok(())
        })?;
        Ok(Response::ok(Body::Sealed {
            iv: Blob(iv),
            tag: Blob(Vec::new()),
            data: Blob(Vec::new()),
        }))
    }

    /// C_EncryptMessageNext / C_DecryptMessageNext: parts are buffered; the last one (`end`)
    /// runs AES-GCM over the whole message (decryption answers plaintext only after the tag
    /// verified). A length query buffers nothing; a failure ends the message.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn message_next(
        &self,
        app: &App,
        session: u64,
        data: &[u8],
        tag: &[u8],
        end: bool,
        cap: Option<u64>,
        encrypt: bool,
    ) -> Result<Response, Ckr> {
        let taken = self.with_message_op(app, session, encrypt, |op| {
            let part = op.part.as_mut().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
            let total = part.buf.len() + data.len();
            if total > MAX_MESSAGE {
                op.part = None;
                return Err(Ckr(if encrypt {
                    CKR_DATA_LEN_RANGE
                } else {
                    CKR_ENCRYPTED_DATA_LEN_RANGE
                }));
            }
            if !end {
                if cap.is_none() {
                    return Ok(Err(Response::ok(Body::Len { len: 0 })));
                }
                part.buf.extend_from_slice(data);
                return Ok(Err(Response::ok(Body::Data {
                    data: Blob(Vec::new()),
                })));
            }
            let len = total as u64;
            match cap {
                None => return Ok(Err(Response::ok(Body::Len { len }))),
                Some(c) if c < len => {
                    return Ok(Err(Response {
                        rv: CKR_BUFFER_TOO_SMALL,
                        body: Body::Len { len },
                    }));
                }
                Some(_) => {}
            }
            let mut part = op.part.take().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
            part.buf.extend_from_slice(data);
            Ok(Ok((part, op.key.clone(), op.mechanism)))
        })?;
        let (part, k, mech) = match taken {
            Ok(t) => t,
            Err(answer) => return Ok(answer),
        };
        let tag_len = gcm_tag_len(part.tag_bits)?;
        if !encrypt && tag.len() != tag_len {
            return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
        }
        let mut op = CipherOp::init(
            mech,
            &MechParam::Gcm {
                iv: Blob(part.iv.clone()),
                aad: Blob(part.aad.clone()),
                tag_bits: part.tag_bits,
            },
            &k,
            encrypt,
            if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT },
        )?;
        op.update(&part.buf)?;
        if encrypt {
            sealed(part.iv, op.finish()?, tag_len)
        } else {
            op.update(tag)?;
            Ok(Response::ok(Body::SecretData {
                data: Secret(op.finish()?),
            }))
        }
    }

    /// C_DecryptMessage (single part): the IV and tag come from the parameters.
    pub(super) fn decrypt_message(
        &self,
        app: &App,
        session: u64,
        p: &GcmMessageParams,
        aad: &[u8],
        data: &[u8],
        cap: Option<u64>,
    ) -> Result<Response, Ckr> {
        let (slot, k, mech) = self.message_op(app, session, false)?;
        let refuse = |e| self.refuse(app, "C_DecryptMessage", slot, Some(&k), Some(mech), e);
        let tag_len = gcm_tag_len(p.tag_bits).map_err(refuse)?;
        if p.tag.0.len() != tag_len {
            return Err(refuse(Ckr(CKR_MECHANISM_PARAM_INVALID)));
        }
        let len = data.len() as u64;
        match cap {
            None => return Ok(Response::ok(Body::Len { len })),
            Some(c) if c < len => {
                return Ok(Response {
                    rv: CKR_BUFFER_TOO_SMALL,
                    body: Body::Len { len },
                });
            }
            Some(_) => {}
        }
        let mut op = CipherOp::init(
            mech,
            &MechParam::Gcm {
                iv: p.iv.clone(),
                aad: Blob(aad.to_vec()),
                tag_bits: p.tag_bits,
            },
            &k,
            false,
            CKA_DECRYPT,
        )
        .map_err(refuse)?;
        self.use_key(app, slot, &k, "C_DecryptMessage", mech)?;
        op.update(data)?;
        op.update(&p.tag.0)?;
        let out = op.finish()?;
        Ok(Response::ok(Body::SecretData { data: Secret(out) }))
    }
}

/// The answer of an encryption: the IV, and the cipher's output split into ciphertext and tag.
fn sealed(iv: Vec<u8>, mut out: Zeroizing<Vec<u8>>, tag_len: usize) -> Result<Response, Ckr> {
    let split = out
        .len()
        .checked_sub(tag_len)
        .ok_or(Ckr(CKR_FUNCTION_FAILED))?;
    let tag = out.split_off(split);
    Ok(Response::ok(Body::Sealed {
        iv: Blob(iv),
        tag: Blob(tag),
        data: Blob(out.to_vec()),
    }))
}

/// The tag length in bytes of `ulTagBits` (96–128 in steps of 8, as for CK_GCM_PARAMS).
fn gcm_tag_len(bits: u64) -> Result<usize, Ckr> {
    if matches!(bits, 96 | 104 | 112 | 120 | 128) {
        Ok(usize::try_from(bits / 8).unwrap_or(16))
    } else {
        Err(Ckr(CKR_MECHANISM_PARAM_INVALID))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iv_keeps_the_fixed_bits_and_right_aligns_the_counter() {
        let iv = [0xabu8; 12];
        assert_eq!(
            compose_iv(&iv, 32, &5u64.to_be_bytes()),
            [0xab, 0xab, 0xab, 0xab, 0, 0, 0, 0, 0, 0, 0, 5]
        );
        // A fixed field ending inside a byte keeps only its top bits there.
        assert_eq!(
            compose_iv(&iv, 12, &0x0123u64.to_be_bytes()),
            [0xab, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x23]
        );
        assert_eq!(
            compose_iv(&iv, 0, &[1, 2]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(compose_iv(&iv, 96, &[1, 2]), iv);
        assert!(fits(255, 8) && !fits(256, 8) && fits(u64::MAX, 64));
        assert_eq!(stored_state_of(&encode_state(8192, 32)), (8192, 32));
    }

    fn stored_state_of(v: &[u8]) -> (u64, u32) {
        use caas_vsm_proto::attr;
        let mut a = crate::object::Attrs::new();
        a.insert(CKA_CLASS, attr::ulong(CKO_SECRET_KEY));
        a.insert(CKA_CAAS_GCM_IV_STATE, v.to_vec());
        stored_state(&Object::new(1, None, a, None, 0))
    }
}
