//! The cryptographic calls of the dispatcher: C_Encrypt*/C_Decrypt*/C_Sign*/C_Verify*/
//! C_Digest*, key generation, wrapping, derivation and random numbers. Every call with a key
//! checks the key's usage flags, counts a use against the tenant's limits and is audited.

use super::*;
use crate::wrap;

fn secret_len(t: &[Attr]) -> R<usize> {
    let n = tmpl_ulong(t, CKA_VALUE_LEN).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
    usize::try_from(n).map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
}

/// Key type and length of the secret key an ML-KEM operation creates: CKO_SECRET_KEY,
/// CKA_KEY_TYPE (default CKK_GENERIC_SECRET), CKA_VALUE_LEN at most the 32-byte shared
/// secret (default 32; the leading bytes are kept).
fn kem_template(t: &[Attr]) -> R<(u64, usize)> {
    if tmpl_ulong(t, CKA_CLASS).is_some_and(|c| c != CKO_SECRET_KEY) {
        return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
    }
    let kt = tmpl_ulong(t, CKA_KEY_TYPE).unwrap_or(CKK_GENERIC_SECRET);
    let len = match tmpl_ulong(t, CKA_VALUE_LEN) {
        Some(l) => usize::try_from(l).map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))?,
        None => pq::ML_KEM_SECRET_LEN,
    };
    if len > pq::ML_KEM_SECRET_LEN {
        return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
    }
    object::check_secret_len(kt, len)?;
    Ok((kt, len))
}

fn no_param(m: &Mechanism) -> R<()> {
    if matches!(m.param, MechParam::None {}) {
        Ok(())
    } else {
        Err(Ckr(CKR_MECHANISM_PARAM_INVALID))
    }
}

impl Domain {
    #[allow(clippy::too_many_lines)]
    pub(super) fn crypto(&self, app: &Arc<App>, req: Request) -> R<Response> {
        use Request as Q;
        Ok(match req {
            Q::EncryptInit {
                session,
                mechanism,
                key,
            } => self.cipher_init(app, session, &mechanism, key, true)?,
            Q::DecryptInit {
                session,
                mechanism,
                key,
            } => self.cipher_init(app, session, &mechanism, key, false)?,
            Q::Encrypt { session, data, cap } => {
                self.cipher_single(app, session, &data.0, cap, true)?
            }
            Q::Decrypt { session, data, cap } => {
                self.cipher_single(app, session, &data.0, cap, false)?
            }
            Q::EncryptUpdate { session, data, cap } => {
                self.cipher_update(app, session, &data.0, cap, true)?
            }
            Q::DecryptUpdate { session, data, cap } => {
                self.cipher_update(app, session, &data.0, cap, false)?
            }
            Q::EncryptFinal { session, cap } => self.cipher_final(app, session, cap, true)?,
            Q::DecryptFinal { session, cap } => self.cipher_final(app, session, cap, false)?,
            Q::DigestInit { session, mechanism } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                if g.digest.is_some() {
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                g.digest = Some(DigestOp::init(mechanism.mechanism, &mechanism.param)?);
                Response::ok(Body::Empty {})
            }
            Q::Digest { session, data, cap } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g
                    .digest
                    .as_ref()
                    .ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                if op.multi {
                    clear(g, Slot::Digest);
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                let Some(cap) = cap else {
                    return Ok(Response::ok(Body::Len {
                        len: op.out_len as u64,
                    }));
                };
                if (cap as usize) < op.out_len {
                    return Ok(Response {
                        rv: CKR_BUFFER_TOO_SMALL,
                        body: Body::Len {
                            len: op.out_len as u64,
                        },
                    });
                }
                let Some(mut op) = g.digest.take() else {
                    return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED));
                };
                op.update(&data.0);
                data_resp(op.finish())
            }
            Q::DigestUpdate { session, data } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g
                    .digest
                    .as_mut()
                    .ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                op.multi = true;
                op.update(&data.0);
                Response::ok(Body::Empty {})
            }
            Q::DigestKey { session, key } => {
                let (s, slot) = self.op_session(app, session)?;
                let k = self.key(app, slot, key)?;
                if k.class() != CKO_SECRET_KEY {
                    return Err(Ckr(CKR_KEY_INDIGESTIBLE));
                }
                if k.flag(CKA_SENSITIVE) || !k.flag(CKA_EXTRACTABLE) {
                    return Err(Ckr(CKR_KEY_INDIGESTIBLE));
                }
                let m = k.material()?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g
                    .digest
                    .as_mut()
                    .ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                op.multi = true;
                op.update(m.secret()?);
                Response::ok(Body::Empty {})
            }
            Q::DigestFinal { session, cap } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g
                    .digest
                    .as_ref()
                    .ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                let len = op.out_len as u64;
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
                let Some(op) = g.digest.take() else {
                    return Err(Ckr(CKR_OPERATION_NOT_INITIALIZED));
                };
                data_resp(op.finish())
            }
            Q::SignOnce {
                session,
                mechanism,
                key,
                data,
            } => {
                let (_, slot) = self.op_session(app, session)?;
                let k = self.key(app, slot, key)?;
                let mut op = SignOp::init(mechanism.mechanism, &mechanism.param, &k, true)?;
                self.use_key(app, slot, &k, "C_Sign", mechanism.mechanism)?;
                op.update(&data.0)?;
                data_resp(op.sign()?)
            }
            Q::VerifyOnce {
                session,
                mechanism,
                key,
                data,
                signature,
            } => {
                let (_, slot) = self.op_session(app, session)?;
                let k = self.key(app, slot, key)?;
                let mut op = SignOp::init(mechanism.mechanism, &mechanism.param, &k, false)?;
                self.use_key(app, slot, &k, "C_Verify", mechanism.mechanism)?;
                op.update(&data.0)?;
                op.verify(&signature.0)?;
                Response::ok(Body::Empty {})
            }
            Q::EncryptOnce {
                session,
                mechanism,
                key,
                data,
            } => {
                let out = self.cipher_once(app, session, &mechanism, key, &data.0, true)?;
                data_resp(out.to_vec())
            }
            Q::DecryptOnce {
                session,
                mechanism,
                key,
                data,
            } => {
                let out = self.cipher_once(app, session, &mechanism, key, &data.0, false)?;
                Response::ok(Body::SecretData { data: Secret(out) })
            }
            Q::SignInit {
                session,
                mechanism,
                key,
            } => {
                let (s, slot) = self.op_session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                if g.sign.is_some() {
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                let k = self.key(app, slot, key)?;
                let op = SignOp::init(mechanism.mechanism, &mechanism.param, &k, true)?;
                self.use_key(app, slot, &k, "C_SignInit", mechanism.mechanism)?;
                g.sign = Some(op);
                g.cached = None;
                Response::ok(Body::Empty {})
            }
            Q::Sign { session, data, cap } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g.sign.as_mut().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                if op.multi {
                    clear(g, Slot::Sign);
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                let out_len = op.out_len as u64;
                if let Some(c) = g.cached.take() {
                    return Ok(deliver(g, Slot::Sign, c, cap.unwrap_or(0), false));
                }
                let Some(cap) = cap else {
                    return Ok(Response::ok(Body::Len { len: out_len }));
                };
                if cap < out_len {
                    return Ok(Response {
                        rv: CKR_BUFFER_TOO_SMALL,
                        body: Body::Len { len: out_len },
                    });
                }
                let r = op.update(&data.0).and_then(|()| op.sign());
                match r {
                    Ok(sig) => deliver(g, Slot::Sign, Zeroizing::new(sig), cap, false),
                    Err(e) => {
                        clear(g, Slot::Sign);
                        return Err(e);
                    }
                }
            }
            Q::SignUpdate { session, data } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g.sign.as_mut().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                op.multi = true;
                if let Err(e) = op.update(&data.0) {
                    clear(g, Slot::Sign);
                    return Err(e);
                }
                Response::ok(Body::Empty {})
            }
            Q::SignFinal { session, cap } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g.sign.as_mut().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                let out_len = op.out_len as u64;
                if let Some(c) = g.cached.take() {
                    return Ok(deliver(g, Slot::Sign, c, cap.unwrap_or(0), false));
                }
                let Some(cap) = cap else {
                    return Ok(Response::ok(Body::Len { len: out_len }));
                };
                if cap < out_len {
                    return Ok(Response {
                        rv: CKR_BUFFER_TOO_SMALL,
                        body: Body::Len { len: out_len },
                    });
                }
                match op.sign() {
                    Ok(sig) => deliver(g, Slot::Sign, Zeroizing::new(sig), cap, false),
                    Err(e) => {
                        clear(g, Slot::Sign);
                        return Err(e);
                    }
                }
            }
            Q::VerifyInit {
                session,
                mechanism,
                key,
            } => {
                let (s, slot) = self.op_session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                if g.verify.is_some() {
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                let k = self.key(app, slot, key)?;
                let op = SignOp::init(mechanism.mechanism, &mechanism.param, &k, false)?;
                self.use_key(app, slot, &k, "C_VerifyInit", mechanism.mechanism)?;
                g.verify = Some(op);
                Response::ok(Body::Empty {})
            }
            Q::Verify {
                session,
                data,
                signature,
            } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let mut op = g.verify.take().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                if op.multi {
                    return Err(Ckr(CKR_OPERATION_ACTIVE));
                }
                op.update(&data.0)?;
                op.verify(&signature.0)?;
                Response::ok(Body::Empty {})
            }
            Q::VerifyUpdate { session, data } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let op = g
                    .verify
                    .as_mut()
                    .ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                op.multi = true;
                if let Err(e) = op.update(&data.0) {
                    g.verify = None;
                    return Err(e);
                }
                Response::ok(Body::Empty {})
            }
            Q::VerifyFinal { session, signature } => {
                let s = self.session(app, session)?;
                let mut guard = lock(&s);
                let g: &mut Session = &mut guard;
                let mut op = g.verify.take().ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
                op.verify(&signature.0)?;
                Response::ok(Body::Empty {})
            }
            Q::GenerateKey {
                session,
                mechanism,
                template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                no_param(&mechanism)?;
                let (key_type, len) = match mechanism.mechanism {
                    CKM_AES_KEY_GEN => {
                        let len = secret_len(&template)?;
                        object::check_secret_len(CKK_AES, len)?;
                        (CKK_AES, len)
                    }
                    CKM_GENERIC_SECRET_KEY_GEN => {
                        let kt = tmpl_ulong(&template, CKA_KEY_TYPE).unwrap_or(CKK_GENERIC_SECRET);
                        let len = secret_len(&template)?;
                        object::check_secret_len(kt, len)?;
                        (kt, len)
                    }
                    _ => return Err(Ckr(CKR_MECHANISM_INVALID)),
                };
                if tmpl_ulong(&template, CKA_CLASS).is_some_and(|c| c != CKO_SECRET_KEY) {
                    return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                }
                let mut v = Zeroizing::new(vec![0u8; len]);
                aws_lc_rs::rand::fill(&mut v).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
                let (attrs, secret) = object::build(
                    &template,
                    CKO_SECRET_KEY,
                    Some(key_type),
                    Origin::Generated(mechanism.mechanism),
                    &[(CKA_VALUE_LEN, attr::ulong(len as u64))],
                    Some(v),
                    self.role(app, slot),
                )
                .map_err(|e| {
                    self.refuse(
                        app,
                        "C_GenerateKey",
                        slot,
                        None,
                        Some(mechanism.mechanism),
                        e,
                    )
                })?;
                let o = self.insert(app, session, slot, rw, attrs, secret)?;
                self.audit(
                    app,
                    "C_GenerateKey",
                    slot,
                    Some(&o),
                    Some(mechanism.mechanism),
                    0,
                );
                Response::ok(Body::Ulong { value: o.handle })
            }
            Q::GenerateKeyPair {
                session,
                mechanism,
                public_template,
                private_template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                no_param(&mechanism)?;
                let (key_type, pair) = match mechanism.mechanism {
                    CKM_RSA_PKCS_KEY_PAIR_GEN => {
                        let bits = tmpl_ulong(&public_template, CKA_MODULUS_BITS)
                            .ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                        if let Some(e) = tmpl_bytes(&public_template, CKA_PUBLIC_EXPONENT) {
                            let skip = e.iter().take_while(|b| **b == 0).count();
                            if e[skip..] != [1, 0, 1] {
                                return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                            }
                        }
                        (CKK_RSA, keys::generate_rsa(bits, self.legacy_rsa_1024)?)
                    }
                    CKM_EC_EDWARDS_KEY_PAIR_GEN
                        if tmpl_bytes(&public_template, CKA_EC_PARAMS)
                            .is_some_and(crate::der::is_ed448) =>
                    {
                        let mut g = keys::generate_ed448()?;
                        if let (Some(e), Some(p)) = (
                            g.public_attrs.iter_mut().find(|a| a.0 == CKA_EC_PARAMS),
                            tmpl_bytes(&public_template, CKA_EC_PARAMS),
                        ) {
                            e.1 = p.to_vec();
                        }
                        (CKK_EC_EDWARDS, g)
                    }
                    CKM_EC_KEY_PAIR_GEN | CKM_EC_EDWARDS_KEY_PAIR_GEN => {
                        let p = tmpl_bytes(&public_template, CKA_EC_PARAMS)
                            .ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                        let curve = Curve::from_params(p)?;
                        let edwards = mechanism.mechanism == CKM_EC_EDWARDS_KEY_PAIR_GEN;
                        if edwards != (curve == Curve::Ed25519) {
                            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                        }
                        let kt = if edwards { CKK_EC_EDWARDS } else { CKK_EC };
                        let mut g = keys::generate_ec(curve)?;
                        // Keep the caller's encoding of the curve (OID or name).
                        if let Some(e) = g.public_attrs.iter_mut().find(|a| a.0 == CKA_EC_PARAMS) {
                            e.1 = p.to_vec();
                        }
                        (kt, g)
                    }
                    CKM_EC_MONTGOMERY_KEY_PAIR_GEN => {
                        let p = tmpl_bytes(&public_template, CKA_EC_PARAMS)
                            .ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                        if !crate::der::is_x25519(p) {
                            // A Weierstrass or Edwards curve is this mechanism's misuse;
                            // anything else (X448 included) is not supported.
                            return Err(Ckr(if Curve::from_params(p).is_ok() {
                                CKR_TEMPLATE_INCONSISTENT
                            } else {
                                CKR_CURVE_NOT_SUPPORTED
                            }));
                        }
                        let mut g = keys::generate_x25519()?;
                        // Keep the caller's encoding of the curve (OID or name).
                        if let Some(e) = g.public_attrs.iter_mut().find(|a| a.0 == CKA_EC_PARAMS) {
                            e.1 = p.to_vec();
                        }
                        (CKK_EC_MONTGOMERY, g)
                    }
                    CKM_ML_DSA_KEY_PAIR_GEN | CKM_ML_KEM_KEY_PAIR_GEN => {
                        // PKCS#11 3.2: CKA_PARAMETER_SET in the public template (the
                        // private template may repeat it, but not contradict it).
                        let set = tmpl_ulong(&public_template, CKA_PARAMETER_SET)
                            .or_else(|| tmpl_ulong(&private_template, CKA_PARAMETER_SET))
                            .ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                        if [&public_template, &private_template]
                            .iter()
                            .any(|t| tmpl_ulong(t, CKA_PARAMETER_SET).is_some_and(|s| s != set))
                        {
                            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                        }
                        let (kt, (secret, public)) =
                            if mechanism.mechanism == CKM_ML_DSA_KEY_PAIR_GEN {
                                (CKK_ML_DSA, pq::generate_ml_dsa(pq::MlDsa::from_set(set)?)?)
                            } else {
                                (CKK_ML_KEM, pq::generate_ml_kem(pq::MlKem::from_set(set)?)?)
                            };
                        let pair = keys::GeneratedPair {
                            secret,
                            public_attrs: vec![
                                (CKA_PARAMETER_SET, attr::ulong(set)),
                                (CKA_VALUE, public),
                            ],
                        };
                        (kt, pair)
                    }
                    _ => return Err(Ckr(CKR_MECHANISM_INVALID)),
                };
                let strip = |t: &[Attr], ty: u64| -> Vec<Attr> {
                    t.iter()
                        .filter(|a| {
                            a.ty != ty
                                && a.ty != CKA_MODULUS_BITS
                                && a.ty != CKA_PUBLIC_EXPONENT
                                && a.ty != CKA_PARAMETER_SET
                        })
                        .cloned()
                        .collect()
                };
                let pub_t = strip(&public_template, CKA_EC_PARAMS);
                let priv_t = strip(&private_template, CKA_EC_PARAMS);
                let origin = Origin::Generated(mechanism.mechanism);
                let (pa, _) = object::build(
                    &pub_t,
                    CKO_PUBLIC_KEY,
                    Some(key_type),
                    origin,
                    &pair.public_attrs,
                    None,
                    self.role(app, slot),
                )
                .map_err(|e| {
                    self.refuse(
                        app,
                        "C_GenerateKeyPair",
                        slot,
                        None,
                        Some(mechanism.mechanism),
                        e,
                    )
                })?;
                let priv_extra: Vec<(u64, Vec<u8>)> = pair
                    .public_attrs
                    .iter()
                    // The public point / public key value stay on the public object (a
                    // private key's CKA_VALUE is its secret).
                    .filter(|(t, _)| *t != CKA_EC_POINT && *t != CKA_VALUE)
                    .cloned()
                    .collect();
                let (sa, ss) = object::build(
                    &priv_t,
                    CKO_PRIVATE_KEY,
                    Some(key_type),
                    origin,
                    &priv_extra,
                    Some(pair.secret),
                    self.role(app, slot),
                )
                .map_err(|e| {
                    self.refuse(
                        app,
                        "C_GenerateKeyPair",
                        slot,
                        None,
                        Some(mechanism.mechanism),
                        e,
                    )
                })?;
                let public = self.insert(app, session, slot, rw, pa, None)?;
                let private = match self.insert(app, session, slot, rw, sa, ss) {
                    Ok(p) => p,
                    Err(e) => {
                        self.remove(slot, public.handle);
                        if public.is_token() {
                            self.token(slot)?.persist()?;
                        }
                        return Err(e);
                    }
                };
                self.audit(
                    app,
                    "C_GenerateKeyPair",
                    slot,
                    Some(&private),
                    Some(mechanism.mechanism),
                    0,
                );
                Response::ok(Body::KeyPair {
                    public: public.handle,
                    private: private.handle,
                })
            }
            Q::WrapKey {
                session,
                mechanism,
                wrapping_key,
                key,
                cap,
            } => {
                let (slot, _) = self.slot_rw(app, session)?;
                let wk = self
                    .object(app, slot, wrapping_key)
                    .map_err(|_| Ckr(CKR_WRAPPING_KEY_HANDLE_INVALID))?;
                let k = self.key(app, slot, key)?;
                if !k.flag(CKA_EXTRACTABLE) {
                    self.audit(
                        app,
                        "C_WrapKey",
                        slot,
                        Some(&k),
                        Some(mechanism.mechanism),
                        CKR_KEY_UNEXTRACTABLE,
                    );
                    return Err(Ckr(CKR_KEY_UNEXTRACTABLE));
                }
                let policy = ops::check_key(&wk, CKA_WRAP, mechanism.mechanism)
                    .and_then(|()| self.wrap_policy(slot, mechanism.mechanism, &wk, &k));
                if let Err(e) = policy {
                    return Err(self.refuse(
                        app,
                        "C_WrapKey",
                        slot,
                        Some(&k),
                        Some(mechanism.mechanism),
                        e,
                    ));
                }
                let plain = match k.class() {
                    CKO_SECRET_KEY | CKO_PRIVATE_KEY => {
                        if k.class() == CKO_PRIVATE_KEY && k.key_type() != Some(CKK_RSA) {
                            return Err(Ckr(CKR_KEY_NOT_WRAPPABLE));
                        }
                        Zeroizing::new(
                            k.secret
                                .as_deref()
                                .ok_or(Ckr(CKR_KEY_NOT_WRAPPABLE))?
                                .to_vec(),
                        )
                    }
                    _ => return Err(Ckr(CKR_KEY_NOT_WRAPPABLE)),
                };
                let out = if mechanism.mechanism == wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS {
                    let kek = self.caas_wrap_key(&mechanism, &wk, true)?;
                    Zeroizing::new(wrap::seal(kek.secret()?, &k, &plain)?)
                } else {
                    self.wrap_bytes(&mechanism, &wk, &plain, true)?
                };
                self.use_key(app, slot, &wk, "C_WrapKey", mechanism.mechanism)?;
                self.audit(
                    app,
                    "C_WrapKey(target)",
                    slot,
                    Some(&k),
                    Some(mechanism.mechanism),
                    0,
                );
                match cap {
                    None => Response::ok(Body::Len {
                        len: out.len() as u64,
                    }),
                    Some(c) if c < out.len() as u64 => Response {
                        rv: CKR_BUFFER_TOO_SMALL,
                        body: Body::Len {
                            len: out.len() as u64,
                        },
                    },
                    Some(_) => data_resp(out.to_vec()),
                }
            }
            Q::UnwrapKey {
                session,
                mechanism,
                unwrapping_key,
                wrapped,
                template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let uk = self
                    .object(app, slot, unwrapping_key)
                    .map_err(|_| Ckr(CKR_UNWRAPPING_KEY_HANDLE_INVALID))?;
                // The unwrap rules (`policy`): no padding oracle, never a weaker key.
                let refuse = |e| {
                    self.refuse(
                        app,
                        "C_UnwrapKey",
                        slot,
                        Some(&uk),
                        Some(mechanism.mechanism),
                        e,
                    )
                };
                let (template, plain) = if mechanism.mechanism == wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS
                {
                    // The blob's own attributes are the floor.
                    let kek = self.caas_wrap_key(&mechanism, &uk, false).map_err(refuse)?;
                    let (bound, plain) = wrap::open(kek.secret()?, &wrapped.0).map_err(refuse)?;
                    (wrap::merge(&bound, template).map_err(refuse)?, plain)
                } else {
                    if mechanism.mechanism == CKM_AES_CBC_PAD {
                        return Err(refuse(Ckr(CKR_MECHANISM_INVALID)));
                    }
                    let forced = policy::unwrap_forced(&template, &uk).map_err(refuse)?;
                    let plain = self
                        .wrap_bytes(&mechanism, &uk, &wrapped.0, false)
                        .map_err(refuse)?;
                    (template.into_iter().chain(forced).collect(), plain)
                };
                let class = tmpl_ulong(&template, CKA_CLASS).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                let kt = tmpl_ulong(&template, CKA_KEY_TYPE).ok_or(Ckr(CKR_TEMPLATE_INCOMPLETE))?;
                self.use_key(app, slot, &uk, "C_UnwrapKey", mechanism.mechanism)?;
                let (extra, secret) = match (class, kt) {
                    (CKO_SECRET_KEY, _) => {
                        object::check_secret_len(kt, plain.len())
                            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?;
                        if tmpl_ulong(&template, CKA_VALUE_LEN)
                            .is_some_and(|l| l != plain.len() as u64)
                        {
                            return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                        }
                        (
                            vec![(CKA_VALUE_LEN, attr::ulong(plain.len() as u64))],
                            plain,
                        )
                    }
                    (CKO_PRIVATE_KEY, CKK_RSA) => {
                        let m = keys::KeyMaterial::rsa_private(&plain)
                            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?;
                        self.check_rsa_size(&m)
                            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?;
                        (keys::rsa_public_attrs(&plain)?, plain)
                    }
                    _ => return Err(Ckr(CKR_TEMPLATE_INCONSISTENT)),
                };
                let t: Vec<Attr> = template
                    .into_iter()
                    .filter(|a| a.ty != CKA_VALUE_LEN)
                    .collect();
                let (attrs, secret) = object::build(
                    &t,
                    class,
                    Some(kt),
                    Origin::Imported,
                    &extra,
                    Some(secret),
                    self.role(app, slot),
                )
                .map_err(refuse)?;
                let o = self.insert(app, session, slot, rw, attrs, secret)?;
                self.audit(
                    app,
                    "C_UnwrapKey(new)",
                    slot,
                    Some(&o),
                    Some(mechanism.mechanism),
                    0,
                );
                Response::ok(Body::Ulong { value: o.handle })
            }
            Q::DeriveKey {
                session,
                mechanism,
                base_key,
                template,
            } => {
                let (slot, rw) = self.slot_rw(app, session)?;
                let k = self.key(app, slot, base_key)?;
                if mechanism.mechanism != CKM_ECDH1_DERIVE {
                    // Including `CKM_*_ENCRYPT_DATA` (see `ops`: not served, by policy).
                    return Err(self.refuse(
                        app,
                        "C_DeriveKey",
                        slot,
                        Some(&k),
                        Some(mechanism.mechanism),
                        Ckr(CKR_MECHANISM_INVALID),
                    ));
                }
                ops::check_key(&k, CKA_DERIVE, CKM_ECDH1_DERIVE)?;
                if k.class() != CKO_PRIVATE_KEY
                    || !matches!(k.key_type(), Some(CKK_EC | CKK_EC_MONTGOMERY))
                {
                    return Err(self.refuse(
                        app,
                        "C_DeriveKey",
                        slot,
                        Some(&k),
                        Some(CKM_ECDH1_DERIVE),
                        Ckr(CKR_KEY_TYPE_INCONSISTENT),
                    ));
                }
                let MechParam::Ecdh {
                    kdf,
                    shared_data,
                    public_data,
                } = &mechanism.param
                else {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                };
                // CKD_NULL: the shared secret itself (no shared data); CKD_SHA*_KDF: the
                // ANSI X9.63 KDF over it (what CMS/ECIES users such as the pkcs11-provider ask).
                if *kdf == CKD_NULL && !shared_data.0.is_empty() {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                let z = k.material()?.ecdh(&public_data.0)?;
                self.use_key(app, slot, &k, "C_DeriveKey", CKM_ECDH1_DERIVE)?;
                let kt = tmpl_ulong(&template, CKA_KEY_TYPE).unwrap_or(CKK_GENERIC_SECRET);
                let len = match tmpl_ulong(&template, CKA_VALUE_LEN) {
                    Some(l) => usize::try_from(l).map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))?,
                    None => z.len(),
                };
                let z = if *kdf == CKD_NULL {
                    z
                } else {
                    keys::x963_kdf(*kdf, &z, &shared_data.0, len)?
                };
                if len > z.len() {
                    return Err(Ckr(CKR_TEMPLATE_INCONSISTENT));
                }
                object::check_secret_len(kt, len)?;
                let t: Vec<Attr> = template
                    .into_iter()
                    .filter(|a| a.ty != CKA_VALUE_LEN)
                    .collect();
                let (mut attrs, secret) = object::build(
                    &t,
                    CKO_SECRET_KEY,
                    Some(kt),
                    Origin::Generated(CKM_ECDH1_DERIVE),
                    &[(CKA_VALUE_LEN, attr::ulong(len as u64))],
                    Some(Zeroizing::new(z[..len].to_vec())),
                    self.role(app, slot),
                )
                .map_err(|e| {
                    self.refuse(
                        app,
                        "C_DeriveKey",
                        slot,
                        Some(&k),
                        Some(CKM_ECDH1_DERIVE),
                        e,
                    )
                })?;
                // Derived keys inherit the base key's sensitivity history.
                attrs.insert(CKA_LOCAL, attr::boolean(false));
                if !k.flag(CKA_ALWAYS_SENSITIVE) {
                    attrs.insert(CKA_ALWAYS_SENSITIVE, attr::boolean(false));
                }
                if !k.flag(CKA_NEVER_EXTRACTABLE) {
                    attrs.insert(CKA_NEVER_EXTRACTABLE, attr::boolean(false));
                }
                let o = self.insert(app, session, slot, rw, attrs, secret)?;
                self.audit(
                    app,
                    "C_DeriveKey(new)",
                    slot,
                    Some(&o),
                    Some(CKM_ECDH1_DERIVE),
                    0,
                );
                Response::ok(Body::Ulong { value: o.handle })
            }
            Q::EncapsulateKey {
                session,
                mechanism,
                public_key,
                template,
                cap,
            } => self.encapsulate(app, session, &mechanism, public_key, template, cap)?,
            Q::DecapsulateKey {
                session,
                mechanism,
                private_key,
                template,
                ciphertext,
            } => self.decapsulate(
                app,
                session,
                &mechanism,
                private_key,
                template,
                &ciphertext.0,
            )?,
            Q::MessageInit {
                session,
                mechanism,
                key,
                encrypt,
            } => self.message_init(app, session, &mechanism, key, encrypt)?,
            Q::EncryptMessage {
                session,
                params,
                aad,
                data,
                cap,
            } => self.encrypt_message(app, session, &params, &aad.0, &data.0, cap)?,
            Q::DecryptMessage {
                session,
                params,
                aad,
                data,
                cap,
            } => self.decrypt_message(app, session, &params, &aad.0, &data.0, cap)?,
            Q::MessageFinal { session, encrypt } => self.message_final(app, session, encrypt)?,
            Q::EncryptMessageBegin {
                session,
                params,
                aad,
            } => self.message_begin(app, session, &params, &aad.0, true)?,
            Q::DecryptMessageBegin {
                session,
                params,
                aad,
            } => self.message_begin(app, session, &params, &aad.0, false)?,
            Q::EncryptMessageNext {
                session,
                data,
                end,
                cap,
            } => self.message_next(app, session, &data.0, &[], end, cap, true)?,
            Q::DecryptMessageNext {
                session,
                data,
                tag,
                end,
                cap,
            } => self.message_next(app, session, &data.0, &tag.0, end, cap, false)?,
            Q::SeedRandom { session, .. } => {
                self.session(app, session)?;
                return Err(Ckr(CKR_RANDOM_SEED_NOT_SUPPORTED));
            }
            Q::GenerateRandom { session, len } => {
                self.session(app, session)?;
                let len = usize::try_from(len).map_err(|_| Ckr(CKR_ARGUMENTS_BAD))?;
                if len > caas_vsm_proto::MAX_FRAME - 64 {
                    return Err(Ckr(CKR_ARGUMENTS_BAD));
                }
                let mut v = vec![0u8; len];
                aws_lc_rs::rand::fill(&mut v).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
                Response::ok(Body::SecretData {
                    data: Secret::new(v),
                })
            }
            _ => return Err(Ckr(CKR_FUNCTION_NOT_SUPPORTED)),
        })
    }

    /// C_EncapsulateKey with CKM_ML_KEM (PKCS#11 3.2): checks the public key
    /// (`CKA_ENCAPSULATE`, `CKA_ALLOWED_MECHANISMS`, type), answers the ciphertext length to a
    /// length query without creating anything, else encapsulates, counts and audits the
    /// key use, and keeps the shared secret as a new secret key ([`Self::kem_secret_key`]).
    fn encapsulate(
        &self,
        app: &Arc<App>,
        session: u64,
        m: &Mechanism,
        public_key: u64,
        template: Vec<Attr>,
        cap: Option<u64>,
    ) -> R<Response> {
        let (slot, rw) = self.slot_rw(app, session)?;
        let k = self.key(app, slot, public_key)?;
        let refuse = |e| {
            self.refuse(
                app,
                "C_EncapsulateKey",
                slot,
                Some(&k),
                Some(m.mechanism),
                e,
            )
        };
        if m.mechanism != CKM_ML_KEM {
            return Err(refuse(Ckr(CKR_MECHANISM_INVALID)));
        }
        no_param(m).map_err(refuse)?;
        if k.class() != CKO_PUBLIC_KEY || k.key_type() != Some(CKK_ML_KEM) {
            return Err(refuse(Ckr(CKR_KEY_TYPE_INCONSISTENT)));
        }
        ops::check_key(&k, CKA_ENCAPSULATE, CKM_ML_KEM).map_err(refuse)?;
        let material = k.material()?;
        let keys::KeyMaterial::MlKemPublic { set, public } = &*material else {
            return Err(refuse(Ckr(CKR_KEY_TYPE_INCONSISTENT)));
        };
        let ct_len = set.ciphertext_len() as u64;
        match cap {
            None => return Ok(Response::ok(Body::Len { len: ct_len })),
            Some(c) if c < ct_len => {
                return Ok(Response {
                    rv: CKR_BUFFER_TOO_SMALL,
                    body: Body::Len { len: ct_len },
                });
            }
            Some(_) => {}
        }
        // The template is checked before the key use is counted.
        let (kt, len) = kem_template(&template).map_err(refuse)?;
        let (ct, ss) = pq::ml_kem_encapsulate(*set, public)?;
        self.use_key(app, slot, &k, "C_EncapsulateKey", CKM_ML_KEM)?;
        let o = self.kem_secret_key(
            app,
            session,
            slot,
            rw,
            template,
            kt,
            &ss[..len],
            "C_EncapsulateKey",
        )?;
        Ok(Response::ok(Body::Encapsulated {
            ciphertext: Blob(ct),
            key: o.handle,
        }))
    }

    /// C_DecapsulateKey with CKM_ML_KEM (PKCS#11 3.2).
    fn decapsulate(
        &self,
        app: &Arc<App>,
        session: u64,
        m: &Mechanism,
        private_key: u64,
        template: Vec<Attr>,
        ct: &[u8],
    ) -> R<Response> {
        let (slot, rw) = self.slot_rw(app, session)?;
        let k = self.key(app, slot, private_key)?;
        let refuse = |e| {
            self.refuse(
                app,
                "C_DecapsulateKey",
                slot,
                Some(&k),
                Some(m.mechanism),
                e,
            )
        };
        if m.mechanism != CKM_ML_KEM {
            return Err(refuse(Ckr(CKR_MECHANISM_INVALID)));
        }
        no_param(m).map_err(refuse)?;
        if k.class() != CKO_PRIVATE_KEY || k.key_type() != Some(CKK_ML_KEM) {
            return Err(refuse(Ckr(CKR_KEY_TYPE_INCONSISTENT)));
        }
        ops::check_key(&k, CKA_DECAPSULATE, CKM_ML_KEM).map_err(refuse)?;
        let material = k.material()?;
        let keys::KeyMaterial::MlKemPrivate(dk) = &*material else {
            return Err(refuse(Ckr(CKR_KEY_TYPE_INCONSISTENT)));
        };
        let (kt, len) = kem_template(&template).map_err(refuse)?;
        let ss = dk.decapsulate(ct).map_err(refuse)?;
        self.use_key(app, slot, &k, "C_DecapsulateKey", CKM_ML_KEM)?;
        let o = self.kem_secret_key(
            app,
            session,
            slot,
            rw,
            template,
            kt,
            &ss[..len],
            "C_DecapsulateKey",
        )?;
        Ok(Response::ok(Body::Ulong { value: o.handle }))
    }

    /// The secret key made from an ML-KEM shared secret. Its value is known outside the
    /// token (to whoever holds the private key an encapsulation was made to, or whoever made
    /// the ciphertext a decapsulation opened, which anyone with the public key can), so it
    /// is never `CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE` or `CKA_NEVER_EXTRACTABLE`: the wrap
    /// policy never treats it as a key whose value stayed in the token. Audited as
    /// `"{op}(new)"` (a refusal too).
    #[allow(clippy::too_many_arguments)]
    fn kem_secret_key(
        &self,
        app: &Arc<App>,
        session: u64,
        slot: u64,
        rw: bool,
        template: Vec<Attr>,
        kt: u64,
        value: &[u8],
        op: &str,
    ) -> R<Arc<Object>> {
        let what = format!("{op}(new)");
        let o = self
            .kem_secret_object(app, session, slot, rw, template, kt, value)
            .map_err(|e| self.refuse(app, &what, slot, None, Some(CKM_ML_KEM), e))?;
        self.audit(app, &what, slot, Some(&o), Some(CKM_ML_KEM), 0);
        Ok(o)
    }

    /// [`Self::kem_secret_key`]'s object, unaudited.
    #[allow(clippy::too_many_arguments)]
    fn kem_secret_object(
        &self,
        app: &Arc<App>,
        session: u64,
        slot: u64,
        rw: bool,
        template: Vec<Attr>,
        kt: u64,
        value: &[u8],
    ) -> R<Arc<Object>> {
        let t: Vec<Attr> = template
            .into_iter()
            .filter(|a| a.ty != CKA_VALUE_LEN)
            .collect();
        let (mut attrs, secret) = object::build(
            &t,
            CKO_SECRET_KEY,
            Some(kt),
            Origin::Generated(CKM_ML_KEM),
            &[(CKA_VALUE_LEN, attr::ulong(value.len() as u64))],
            Some(Zeroizing::new(value.to_vec())),
            self.role(app, slot),
        )?;
        for a in [CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE] {
            attrs.insert(a, attr::boolean(false));
        }
        self.insert(app, session, slot, rw, attrs, secret)
    }

    /// The wrap rules of `policy`: may `wk` wrap `k` with `mech`? CKR_KEY_NOT_WRAPPABLE if not.
    fn wrap_policy(&self, slot: u64, mech: u64, wk: &Object, k: &Object) -> R<()> {
        let no = Err(Ckr(CKR_KEY_NOT_WRAPPABLE));
        if k.flag(CKA_WRAP_WITH_TRUSTED) && !wk.flag(CKA_TRUSTED) {
            return no;
        }
        if policy::has_limit(k) {
            return no;
        }
        if !k.flag(CKA_SENSITIVE) {
            return Ok(());
        }
        if !policy::wraps_sensitive(mech) {
            return no;
        }
        // A standard format carries no attributes: only under a key the SO trusts.
        if mech != wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS && !wk.flag(CKA_TRUSTED) {
            return no;
        }
        let t = self.token(slot)?;
        let objects = t.read_objects();
        match wk.class() {
            CKO_SECRET_KEY => {
                if !policy::secret_wrapping_key_is_safe(wk) {
                    return no;
                }
                let value = wk.secret.as_deref().ok_or(Ckr(CKR_KEY_NOT_WRAPPABLE))?;
                // The key itself and every copy of its value: none may let the user read
                // a wrap.
                let twin_opens = objects.values().any(|o| {
                    o.class() == CKO_SECRET_KEY
                        && o.secret.as_deref().is_some_and(|v| {
                            aws_lc_rs::constant_time::verify_slices_are_equal(v, value).is_ok()
                        })
                        && policy::opens_wraps(o)
                });
                if twin_opens {
                    return no;
                }
            }
            CKO_PUBLIC_KEY => {
                if !wk.flag(CKA_TRUSTED) {
                    return no;
                }
                let modulus = wk.bytes(CKA_MODULUS).ok_or(Ckr(CKR_KEY_NOT_WRAPPABLE))?;
                let twin_opens = objects.values().any(|o| {
                    o.class() == CKO_PRIVATE_KEY
                        && o.bytes(CKA_MODULUS).as_deref() == Some(&modulus[..])
                        && policy::opens_wraps(o)
                });
                if twin_opens {
                    return no;
                }
            }
            _ => return no,
        }
        Ok(())
    }

    /// The AES wrapping key of a `CKM_CAAS_AES_KEY_WRAP_ATTRS` call, after the usage check.
    fn caas_wrap_key(&self, m: &Mechanism, key: &Object, wrap: bool) -> R<Arc<keys::KeyMaterial>> {
        ops::check_key(key, if wrap { CKA_WRAP } else { CKA_UNWRAP }, m.mechanism)?;
        if key.class() != CKO_SECRET_KEY || key.key_type() != Some(CKK_AES) {
            return Err(Ckr(if wrap {
                CKR_WRAPPING_KEY_TYPE_INCONSISTENT
            } else {
                CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT
            }));
        }
        if !matches!(m.param, MechParam::None {}) {
            return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
        }
        key.material()
    }

    fn wrap_bytes(
        &self,
        m: &Mechanism,
        key: &Object,
        input: &[u8],
        wrap: bool,
    ) -> R<Zeroizing<Vec<u8>>> {
        let usage = if wrap { CKA_WRAP } else { CKA_UNWRAP };
        match m.mechanism {
            CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP => {
                ops::check_key(key, usage, m.mechanism)?;
                if key.class() != CKO_SECRET_KEY || key.key_type() != Some(CKK_AES) {
                    return Err(Ckr(if wrap {
                        CKR_WRAPPING_KEY_TYPE_INCONSISTENT
                    } else {
                        CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT
                    }));
                }
                if !matches!(m.param, MechParam::None {}) {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                ops::aes_kw(m.mechanism, key.material()?.secret()?, input, wrap)
            }
            _ => {
                let mut op = CipherOp::init(m.mechanism, &m.param, key, wrap, usage)?;
                op.update(input)?;
                op.finish().map_err(|e| {
                    if !wrap && e.0 == CKR_ENCRYPTED_DATA_INVALID {
                        Ckr(CKR_WRAPPED_KEY_INVALID)
                    } else {
                        e
                    }
                })
            }
        }
    }

    fn cipher_init(
        &self,
        app: &App,
        session: u64,
        m: &Mechanism,
        key: u64,
        encrypt: bool,
    ) -> R<Response> {
        let (s, slot) = self.op_session(app, session)?;
        let mut guard = lock(&s);
        let g: &mut Session = &mut guard;
        let active = if encrypt {
            g.encrypt.is_some()
        } else {
            g.decrypt.is_some()
        };
        if active {
            return Err(Ckr(CKR_OPERATION_ACTIVE));
        }
        let k = self.key(app, slot, key)?;
        let usage = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
        let op = CipherOp::init(m.mechanism, &m.param, &k, encrypt, usage)?;
        self.use_key(
            app,
            slot,
            &k,
            if encrypt {
                "C_EncryptInit"
            } else {
                "C_DecryptInit"
            },
            m.mechanism,
        )?;
        if encrypt {
            g.encrypt = Some(op);
        } else {
            g.decrypt = Some(op);
        }
        g.cached = None;
        Ok(Response::ok(Body::Empty {}))
    }

    /// C_EncryptInit/C_DecryptInit + C_Encrypt/C_Decrypt in one call, leaving no state in
    /// the session.
    fn cipher_once(
        &self,
        app: &App,
        session: u64,
        m: &Mechanism,
        key: u64,
        data: &[u8],
        encrypt: bool,
    ) -> R<Zeroizing<Vec<u8>>> {
        let (_, slot) = self.op_session(app, session)?;
        let k = self.key(app, slot, key)?;
        let usage = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
        let mut op = CipherOp::init(m.mechanism, &m.param, &k, encrypt, usage)?;
        let name = if encrypt { "C_Encrypt" } else { "C_Decrypt" };
        self.use_key(app, slot, &k, name, m.mechanism)?;
        op.update(data)?;
        op.finish()
    }

    fn cipher_single(
        &self,
        app: &App,
        session: u64,
        data: &[u8],
        cap: Option<u64>,
        encrypt: bool,
    ) -> R<Response> {
        let s = self.session(app, session)?;
        let mut guard = lock(&s);
        let g: &mut Session = &mut guard;
        let which = if encrypt {
            Slot::Encrypt
        } else {
            Slot::Decrypt
        };
        let op = if encrypt {
            g.encrypt.as_mut()
        } else {
            g.decrypt.as_mut()
        };
        let op = op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.multi {
            clear(g, which);
            return Err(Ckr(CKR_OPERATION_ACTIVE));
        }
        if let Some(c) = g.cached.take() {
            return Ok(deliver(g, which, c, cap.unwrap_or(0), !encrypt));
        }
        let Some(cap) = cap else {
            return Ok(Response::ok(Body::Len {
                len: op.max_out(data.len()) as u64,
            }));
        };
        let r = op.update(data).and_then(|()| op.finish());
        match r {
            Ok(out) => Ok(deliver(g, which, out, cap, !encrypt)),
            Err(e) => {
                clear(g, which);
                Err(e)
            }
        }
    }

    fn cipher_update(
        &self,
        app: &App,
        session: u64,
        data: &[u8],
        cap: Option<u64>,
        encrypt: bool,
    ) -> R<Response> {
        let s = self.session(app, session)?;
        let mut guard = lock(&s);
        let g: &mut Session = &mut guard;
        let which = if encrypt {
            Slot::Encrypt
        } else {
            Slot::Decrypt
        };
        let op = if encrypt {
            g.encrypt.as_mut()
        } else {
            g.decrypt.as_mut()
        };
        let op = op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        // Input is buffered; output comes at C_*Final. A length query answers 0.
        if cap.is_none() {
            return Ok(Response::ok(Body::Len { len: 0 }));
        }
        op.multi = true;
        if let Err(e) = op.update(data) {
            clear(g, which);
            return Err(e);
        }
        Ok(data_resp(Vec::new()))
    }

    fn cipher_final(
        &self,
        app: &App,
        session: u64,
        cap: Option<u64>,
        encrypt: bool,
    ) -> R<Response> {
        let s = self.session(app, session)?;
        let mut guard = lock(&s);
        let g: &mut Session = &mut guard;
        let which = if encrypt {
            Slot::Encrypt
        } else {
            Slot::Decrypt
        };
        let op = if encrypt {
            g.encrypt.as_mut()
        } else {
            g.decrypt.as_mut()
        };
        let op = op.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        if let Some(c) = g.cached.take() {
            return Ok(deliver(g, which, c, cap.unwrap_or(0), !encrypt));
        }
        let Some(cap) = cap else {
            return Ok(Response::ok(Body::Len {
                len: op.max_out(0) as u64,
            }));
        };
        match op.finish() {
            Ok(out) => Ok(deliver(g, which, out, cap, !encrypt)),
            Err(e) => {
                clear(g, which);
                Err(e)
            }
        }
    }
}

fn data_resp(v: Vec<u8>) -> Response {
    Response::ok(Body::Data { data: Blob(v) })
}
