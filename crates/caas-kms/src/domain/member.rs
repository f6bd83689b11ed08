//! The store-backed side of a KMS domain: reading and verifying the chain, opening this
//! node's EDTs, rotation, re-export to joiners, and the primitives of the operator commands.
//!
//! Agreement: every new version of the domain state is one row (`kms_domain_state`, id = the
//! version) inserted with `expect_rev = 0` in one transaction; of two changes racing for the
//! same version the database lets exactly one in, the other is refused as a conflict and must
//! be proposed again on top of the winner. New domain keys are claimed the same way
//! (`kms_domain_dk`, id = the dk version) in the transaction that stores their EDT. Nothing
//! else is needed: a node that dies mid-change has either committed the whole row set or none.
//!
//! Trust: the database may hold anything; a member acts only on the prefix of the chain that
//! verifies from the pinned genesis ([`state::verify_genesis`], [`state::verify_next`]), refuses
//! (and audits, once per offending row) the first version that does not, and refuses a chain
//! shorter than the longest it has verified before (a per-node high-water file beside its
//! identity: a database rolled back to an older domain state — e.g. before a node's removal —
//! is not accepted).
use super::edt::{self, Edt, EdtBody};
use super::epoch::{self, ACK_KIND, AckBody, EpochKeys, FLOOR_ID, FLOOR_KIND, FloorBody};
use super::identity::{NodeId, NodeIdentity};
use super::state::{self, Change, DomainState, OperatorKey, SignedState};
use super::{DK_KIND, DomainError, EDT_KIND, PENDING_KIND, STATE_KIND};
use crate::keyring::SYSTEM_ACCOUNT;
use caas_crypto::SecretKey;
use caas_store::{AuditEntry, Batch, Store, Write};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

fn store_err(e: caas_store::Error) -> DomainError {
    match e {
        e @ caas_store::Error::Conflict { .. } => DomainError::Conflict(e.to_string()),
        other => DomainError::Store(other.to_string()),
    }
}

fn state_id(v: u64) -> String {
    format!("{v:020}")
}

fn audit(op: &str, result: &str, detail: serde_json::Value) -> AuditEntry {
    AuditEntry {
        time_ms: crate::now_ms(),
        account: SYSTEM_ACCOUNT.into(),
        principal: "caas:key-service".into(),
        operation: op.into(),
        key_id: None,
        result: result.into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        detail: detail.to_string(),
    }
}

/// The verified prefix of the domain chain.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Versions 1..=n, each verified against its predecessor.
    pub versions: Vec<(SignedState, DomainState)>,
    /// The first stored version that was refused, and why.
    pub refused: Option<(String, String)>,
}

impl Chain {
    /// The newest verified version.
    pub fn latest(&self) -> &DomainState {
        // Never empty: read_chain fails when the genesis does not verify.
        &self.versions[self.versions.len() - 1].1
    }

    /// Version `v`, if verified.
    pub fn get(&self, v: u64) -> Option<&DomainState> {
        let i = usize::try_from(v.checked_sub(1)?).ok()?;
        self.versions.get(i).map(|(_, s)| s)
    }
}

/// Reads and verifies the chain from the pinned genesis (no audit, no high-water check).
pub async fn read_chain(store: &Store, pinned: &[u8; 32]) -> Result<Chain, DomainError> {
    let rows = store
        .list(STATE_KIND, Some(SYSTEM_ACCOUNT))
        .await
        .map_err(store_err)?;
    let mut it = rows.into_iter();
    let first = it
        .next()
        .ok_or_else(|| DomainError::Refused("no KMS domain in this database".into()))?;
    if first.id != state_id(1) {
        return Err(DomainError::Refused("the domain genesis is missing".into()));
    }
    let g: SignedState = serde_json::from_slice(&first.body)
        .map_err(|_| DomainError::Malformed("genesis row".into()))?;
    let gs = state::verify_genesis(&g, pinned)?;
    let mut chain = Chain {
        versions: vec![(g, gs)],
        refused: None,
    };
    for row in it {
        let prev = chain.latest().clone();
        let res = if row.id != state_id(prev.version + 1) {
            Err(DomainError::Refused(format!(
                "row {} does not follow version {} (skipped version)",
                row.id, prev.version
            )))
        } else {
            serde_json::from_slice::<SignedState>(&row.body)
                .map_err(|_| DomainError::Malformed("domain state row".into()))
                .and_then(|s| state::verify_next(&prev, &s).map(|st| (s, st)))
        };
        match res {
            Ok(v) => chain.versions.push(v),
            Err(e) => {
                chain.refused = Some((row.id.clone(), e.to_string()));
                break;
            }
        }
    }
    Ok(chain)
}

/// The domain keys this node holds, in memory.
#[derive(Debug, Default)]
pub struct DomainKeys {
    /// Every domain key version this node could open.
    pub keys: BTreeMap<u32, SecretKey>,
    /// Creation time of each.
    pub created: BTreeMap<u32, i64>,
    /// The version new EKTs are sealed under: the newest one made under the current rules
    /// (its maker is still a member, made at or after the last removal / forced rotation).
    pub sealing: Option<u32>,
    /// No domain key may be used for sealing: a member must make a new one.
    pub needs_rotation: bool,
    /// Newest verified domain state version.
    pub state_version: u64,
    /// The first domain key made under the current rules (at or after the last removal or
    /// forced rotation, by a current member): record epochs below it are exposed.
    pub fresh_from: Option<u32>,
    /// Record-MAC epoch this node writes under ([`epoch`]).
    pub record_epoch: Option<u32>,
    /// Record-MAC floor: tags under older epochs are refused.
    pub record_floor: u32,
}

struct EdtRow {
    id: String,
    body: EdtBody,
}

/// This node as a member of a domain.
pub struct Member {
    me: NodeIdentity,
    genesis: [u8; 32],
    head_file: Option<PathBuf>,
    reported: Mutex<HashSet<String>>,
    epochs: Arc<EpochKeys>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Member({})", self.me.id())
    }
}

impl Member {
    /// `head_file`: where this node records the newest domain state version it verified
    /// (None: no rollback protection, tests of a single process only).
    /// The record floor this node saw last is read from beside the head file.
    pub fn new(me: NodeIdentity, genesis: [u8; 32], head_file: Option<PathBuf>) -> Self {
        let epochs = Arc::new(EpochKeys::default());
        if let Some(f) = head_file.as_ref().map(|h| h.with_extension("record-floor"))
            && let Ok(text) = std::fs::read_to_string(f)
        {
            let mut parts = text.split_whitespace();
            if let (Some(Ok(v)), Some(Ok(from))) = (
                parts.next().map(str::parse::<u32>),
                parts.next().map(str::parse::<u64>),
            ) {
                epochs.raise_floor(v, from);
            }
        }
        Member {
            me,
            genesis,
            head_file,
            reported: Mutex::new(HashSet::new()),
            epochs,
        }
    }

    /// The record authenticator of the store this member serves from: its record epochs
    /// (updated on every [`Member::keys`]).
    pub fn record_auth(&self) -> super::DomainRecordAuth {
        super::DomainRecordAuth::with_epochs(self.epochs.clone())
    }

    /// This member's record epochs.
    pub fn epochs(&self) -> &EpochKeys {
        &self.epochs
    }

    /// This member's record epochs, shared (for the store's audit signer).
    pub fn epochs_shared(&self) -> Arc<EpochKeys> {
        self.epochs.clone()
    }

    fn raise_floor(&self, f: u32, audit_from: u64) -> Result<(), DomainError> {
        if !self.epochs.raise_floor(f, audit_from) {
            return Ok(());
        }
        let Some(path) = self
            .head_file
            .as_ref()
            .map(|h| h.with_extension("record-floor"))
        else {
            return Ok(());
        };
        let tmp = path.with_extension("record-floor.tmp");
        std::fs::write(&tmp, format!("{f} {audit_from}\n"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| DomainError::Io(format!("cannot record the record floor: {}", e.kind())))
    }

    /// Reads the floor row and the members' acknowledgements (both signed by a current
    /// member), raises this node's floor and moves its write epoch (see [`epoch`]).
    async fn update_epochs(
        &self,
        store: &Store,
        latest: &DomainState,
        dks: &DomainKeys,
        audit: Option<&Store>,
    ) -> Result<BTreeMap<NodeId, AckBody>, DomainError> {
        self.epochs.add_keys(&dks.keys)?;
        if let Some(row) = store
            .get(FLOOR_KIND, SYSTEM_ACCOUNT, FLOOR_ID)
            .await
            .map_err(store_err)?
        {
            match epoch::open_floor(latest, &row.body) {
                Ok(f) => self.raise_floor(f.floor, f.audit_from)?,
                Err(e) => {
                    self.refuse(audit, "RecordFloor", FLOOR_ID, &e.to_string())
                        .await
                }
            }
        }
        let mut acks = BTreeMap::new();
        for row in store
            .list(ACK_KIND, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(store_err)?
        {
            // A removed node's acknowledgement no longer counts (nor is it its business).
            if !latest.members.contains_key(&row.id) {
                continue;
            }
            match epoch::open_ack(latest, &row.id, &row.body) {
                Ok(a) => {
                    acks.insert(row.id.clone(), a);
                }
                Err(e) => {
                    self.refuse(audit, "EpochAck", &row.id, &e.to_string())
                        .await
                }
            }
        }
        let held = self.epochs.held().unwrap_or(0);
        let mut w = dks.sealing.unwrap_or(held).min(held);
        for m in latest.members.keys().filter(|m| *m != self.me.id()) {
            // A member that never acknowledged holds epoch 1 only (e.g. older code).
            w = w.min(acks.get(m).map_or(1, |a| a.holds));
        }
        if let Some(a) = acks.get(self.me.id()) {
            // Never down, across restarts too.
            w = w.max(a.writes.min(held));
        }
        if w >= 1 && dks.keys.contains_key(&w) {
            self.epochs.raise_write(w);
        }
        Ok(acks)
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    /// The pinned genesis hash.
    pub fn genesis(&self) -> &[u8; 32] {
        &self.genesis
    }

    async fn refuse(&self, store: Option<&Store>, what: &str, row: &str, reason: &str) {
        tracing::warn!(what, row, reason, "KMS domain: refused");
        let Some(store) = store else { return };
        let fresh = self
            .reported
            .lock()
            .map_or(true, |mut s| s.insert(format!("{what}/{row}/{reason}")));
        if fresh {
            let e = audit(
                "DomainChangeRefused",
                "Refused",
                serde_json::json!({ "what": what, "row": row, "reason": reason, "node": self.me.id() }),
            );
            if let Err(err) = store
                .commit(Batch {
                    writes: vec![],
                    audit: vec![e],
                })
                .await
            {
                tracing::warn!(error = %err, "cannot audit a refused domain change");
            }
        }
    }

    /// The verified chain. `audit`: the store whose audit log records refusals (None at
    /// bootstrap, before the audit key is known).
    pub async fn chain(&self, store: &Store, audit: Option<&Store>) -> Result<Chain, DomainError> {
        let chain = read_chain(store, &self.genesis).await?;
        if let Some((row, reason)) = &chain.refused {
            self.refuse(audit, "DomainState", row, reason).await;
        }
        self.check_head(&chain)?;
        Ok(chain)
    }

    fn check_head(&self, chain: &Chain) -> Result<(), DomainError> {
        let Some(path) = &self.head_file else {
            return Ok(());
        };
        let latest = chain.latest();
        let latest_hash = hex::encode(chain.versions[chain.versions.len() - 1].0.hash());
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut parts = text.split_whitespace();
            let v: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let h = parts.next().unwrap_or("");
            if v > latest.version {
                return Err(DomainError::Refused(format!(
                    "the database holds domain state version {} but this node has verified \
                     version {v}: refusing a rolled-back domain state",
                    latest.version
                )));
            }
            if let Some((s, _)) = chain.versions.get(v.saturating_sub(1) as usize)
                && v > 0
                && hex::encode(s.hash()) != h
            {
                return Err(DomainError::Refused(format!(
                    "domain state version {v} differs from the one this node verified (fork)"
                )));
            }
            if v == latest.version {
                return Ok(());
            }
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {latest_hash}\n", latest.version))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| DomainError::Io(format!("cannot record the domain head: {}", e.kind())))
    }

    async fn edt_rows(
        &self,
        store: &Store,
        chain: &Chain,
        audit: Option<&Store>,
    ) -> Result<Vec<EdtRow>, DomainError> {
        let rows = store
            .list(EDT_KIND, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(store_err)?;
        let mut out = vec![];
        for row in rows {
            let parsed = serde_json::from_slice::<Edt>(&row.body)
                .map_err(|_| DomainError::Malformed("EDT row".into()))
                .and_then(|edt| {
                    let b = edt.body()?;
                    let st = chain.get(b.state_version).ok_or_else(|| {
                        DomainError::Refused("EDT names a domain state that does not verify".into())
                    })?;
                    let b = edt.verify(st)?;
                    let origin = chain.get(b.origin_state).ok_or_else(|| {
                        DomainError::Refused("EDT origin state does not verify".into())
                    })?;
                    if !origin.members.contains_key(&b.origin_sender) {
                        return Err(DomainError::Refused(
                            "EDT origin sender was not a member".into(),
                        ));
                    }
                    let want = format!(
                        "{:010}.{}.{}",
                        b.dk_version,
                        state_id(b.state_version),
                        b.sender
                    );
                    if row.id != want {
                        return Err(DomainError::Refused(
                            "EDT stored under another version or sender (moved or replayed)".into(),
                        ));
                    }
                    Ok(EdtRow {
                        id: row.id.clone(),
                        body: b,
                    })
                });
            match parsed {
                Ok(r) => out.push(r),
                Err(e) => {
                    // Refusals of EDTs that would concern this node are audited; others'
                    // tokens are none of its business beyond not using them.
                    let mine = serde_json::from_slice::<Edt>(&row.body)
                        .ok()
                        .and_then(|t| t.body().ok())
                        .is_none_or(|b| b.envelopes.iter().any(|v| v.recipient == self.me.id()));
                    if mine {
                        self.refuse(audit, "EDT", &row.id, &e.to_string()).await;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Verifies the chain and opens every EDT addressed to this node.
    pub async fn keys(
        &self,
        store: &Store,
        audit: Option<&Store>,
    ) -> Result<(Chain, DomainKeys), DomainError> {
        let chain = self.chain(store, audit).await?;
        let rows = self.edt_rows(store, &chain, audit).await?;
        let latest = chain.latest().clone();
        let mut dks = DomainKeys {
            state_version: latest.version,
            ..Default::default()
        };
        let mut origin: BTreeMap<u32, (u64, NodeId)> = BTreeMap::new();
        for r in &rows {
            if !r.body.envelopes.iter().any(|e| e.recipient == self.me.id()) {
                continue;
            }
            match edt::open(&self.me, &r.body) {
                Ok(dk) => {
                    let v = r.body.dk_version;
                    origin.insert(v, (r.body.origin_state, r.body.origin_sender.clone()));
                    let c = dks.created.entry(v).or_insert(r.body.created_ms);
                    *c = (*c).min(r.body.created_ms);
                    dks.keys.entry(v).or_insert(dk);
                }
                Err(e) => self.refuse(audit, "EDT", &r.id, &e.to_string()).await,
            }
        }
        dks.sealing = origin
            .iter()
            .rev()
            .find(|(_, (s, sender))| {
                *s >= latest.rotate_from && latest.members.contains_key(sender)
            })
            .map(|(v, _)| *v);
        dks.needs_rotation = dks.sealing.is_none();
        dks.fresh_from = origin
            .iter()
            .find(|(_, (s, sender))| {
                *s >= latest.rotate_from && latest.members.contains_key(sender)
            })
            .map(|(v, _)| *v);
        self.update_epochs(store, &latest, &dks, audit).await?;
        dks.record_epoch = self.epochs.write();
        dks.record_floor = self.epochs.floor();
        Ok((chain, dks))
    }

    /// What a member does on maintenance, with the store it serves from (whose record
    /// authenticator is [`Member::record_auth`]): acknowledge the epochs it holds and writes
    /// under, and, once every current member writes under the first fresh epoch after a
    /// removal or forced rotation, re-MAC every row under it and publish the floor. Returns
    /// the floor it published, if any.
    pub async fn reseal(&self, store: &Store) -> Result<Option<u32>, DomainError> {
        let (chain, dks) = self.keys(store, Some(store)).await?;
        let latest = chain.latest();
        if !latest.members.contains_key(self.me.id()) {
            return Ok(None);
        }
        let mut acks = self.update_epochs(store, latest, &dks, None).await?;
        let (Some(holds), Some(writes)) = (self.epochs.held(), self.epochs.write()) else {
            return Ok(None);
        };
        if acks
            .get(self.me.id())
            .is_none_or(|a| (a.holds, a.writes) != (holds, writes))
        {
            let body = AckBody {
                domain: latest.domain.clone(),
                node: self.me.id().into(),
                holds,
                writes,
                state_version: latest.version,
            };
            store
                .commit(Batch {
                    writes: vec![Write::Put {
                        kind: ACK_KIND.into(),
                        account: SYSTEM_ACCOUNT.into(),
                        id: self.me.id().into(),
                        body: epoch::sign_ack(&self.me, &body)?,
                        expect_rev: None,
                    }],
                    audit: vec![audit(
                        "DomainEpochAck",
                        "Success",
                        serde_json::json!({ "node": self.me.id(), "holds": holds, "writes": writes }),
                    )],
                })
                .await
                .map_err(store_err)?;
            acks.insert(self.me.id().into(), body);
        }
        let Some(target) = dks.fresh_from else {
            return Ok(None);
        };
        if latest.rotate_from <= 1
            || self.epochs.floor() >= target
            || !latest
                .members
                .keys()
                .all(|m| acks.get(m).is_some_and(|a| a.writes >= target))
        {
            return Ok(None);
        }
        // Every member has acknowledged writing (and signing) at or above `target`, and its
        // acknowledgement is in the chain: every audit record after this head is theirs.
        let (audit_from, _) = store.audit_head().await.map_err(store_err)?;
        let rows = self.remac_all(store).await?;
        let body = FloorBody {
            domain: latest.domain.clone(),
            floor: target,
            node: self.me.id().into(),
            state_version: latest.version,
            audit_from,
        };
        store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: FLOOR_KIND.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: FLOOR_ID.into(),
                    body: epoch::sign_floor(&self.me, &body)?,
                    expect_rev: None,
                }],
                audit: vec![audit(
                    "DomainRecordsResealed",
                    "Success",
                    serde_json::json!({ "node": self.me.id(), "floor": target, "rows": rows, "state_version": latest.version }),
                )],
            })
            .await
            .map_err(store_err)?;
        self.raise_floor(target, audit_from)?;
        Ok(Some(target))
    }

    /// Writes every row (but the domain's own, which are signed) back unchanged, so that
    /// its MAC is made under this node's write epoch. A row changed meanwhile was written
    /// by a member under its own (acknowledged, fresh) epoch: skipped.
    async fn remac_all(&self, store: &Store) -> Result<usize, DomainError> {
        let mut n = 0;
        for kind in store.kinds().await.map_err(store_err)? {
            if kind.starts_with("kms_domain_") {
                continue;
            }
            // Rows that do not verify were audited by the store; they stay refused.
            let (rows, _bad) = store.list_healthy(&kind, None).await.map_err(store_err)?;
            let put = |o: &caas_store::Object| Write::Put {
                kind: o.kind.clone(),
                account: o.account.clone(),
                id: o.id.clone(),
                body: o.body.clone(),
                expect_rev: Some(o.rev),
            };
            for chunk in rows.chunks(256) {
                let batch = Batch {
                    writes: chunk.iter().map(put).collect(),
                    audit: vec![],
                };
                match store.commit(batch).await {
                    Ok(_) => n += chunk.len(),
                    Err(caas_store::Error::Conflict { .. }) => {
                        for o in chunk {
                            let one = Batch {
                                writes: vec![put(o)],
                                audit: vec![],
                            };
                            match store.commit(one).await {
                                Ok(_) => n += 1,
                                Err(caas_store::Error::Conflict { .. }) => {}
                                Err(e) => return Err(store_err(e)),
                            }
                        }
                    }
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
        Ok(n)
    }

    /// Makes a new domain key under the newest verified state and sends it to every member
    /// as one EDT, claiming the next version by compare-and-set. Returns the new version.
    pub async fn rotate(&self, store: &Store) -> Result<u32, DomainError> {
        let (chain, dks) = self.keys(store, Some(store)).await?;
        let latest = chain.latest();
        let claimed = store
            .list(DK_KIND, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(store_err)?
            .iter()
            .filter_map(|o| o.id.parse::<u32>().ok())
            .max()
            .unwrap_or(0);
        let next = claimed
            .max(dks.keys.keys().next_back().copied().unwrap_or(0))
            .checked_add(1)
            .ok_or_else(|| DomainError::Refused("domain key version overflow".into()))?;
        let dk = caas_crypto::random_key().map_err(|_| DomainError::Crypto("rng"))?;
        let recipients: Vec<NodeId> = latest.members.keys().cloned().collect();
        let token = edt::seal(&self.me, latest, next, &dk, &recipients, None)?;
        self.store_new_dk(store, latest, next, &token).await?;
        Ok(next)
    }

    async fn store_new_dk(
        &self,
        store: &Store,
        st: &DomainState,
        v: u32,
        token: &Edt,
    ) -> Result<(), DomainError> {
        let claim = serde_json::json!({ "state_version": st.version, "sender": self.me.id() });
        let body = serde_json::to_vec(token).map_err(|_| DomainError::Malformed("edt".into()))?;
        store
            .commit(Batch {
                writes: vec![
                    Write::Put {
                        kind: DK_KIND.into(),
                        account: SYSTEM_ACCOUNT.into(),
                        id: format!("{v:010}"),
                        body: claim.to_string().into_bytes(),
                        expect_rev: Some(0),
                    },
                    Write::Put {
                        kind: EDT_KIND.into(),
                        account: SYSTEM_ACCOUNT.into(),
                        id: format!("{v:010}.{}.{}", state_id(st.version), self.me.id()),
                        body,
                        expect_rev: Some(0),
                    },
                ],
                audit: vec![audit(
                    "CreateDomainKey",
                    "Success",
                    serde_json::json!({ "version": v, "state_version": st.version, "node": self.me.id(), "recipients": st.members.len() }),
                )],
            })
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// Sends every domain key this node holds to the members of the newest state that have
    /// no EDT for it yet (a node that joined). Returns the number of EDTs written.
    pub async fn reexport(&self, store: &Store) -> Result<usize, DomainError> {
        let (chain, dks) = self.keys(store, Some(store)).await?;
        let latest = chain.latest();
        if !latest.members.contains_key(self.me.id()) {
            return Ok(0);
        }
        let rows = self.edt_rows(store, &chain, None).await?;
        let mut have: BTreeMap<u32, BTreeSet<NodeId>> = BTreeMap::new();
        let mut origin: BTreeMap<u32, (u64, NodeId)> = BTreeMap::new();
        for r in &rows {
            let set = have.entry(r.body.dk_version).or_default();
            set.extend(r.body.envelopes.iter().map(|e| e.recipient.clone()));
            if r.body.envelopes.iter().any(|e| e.recipient == self.me.id()) {
                origin.insert(
                    r.body.dk_version,
                    (r.body.origin_state, r.body.origin_sender.clone()),
                );
            }
        }
        let mut n = 0;
        for (v, dk) in &dks.keys {
            let missing: Vec<NodeId> = latest
                .members
                .keys()
                .filter(|m| !have.get(v).is_some_and(|s| s.contains(*m)))
                .cloned()
                .collect();
            if missing.is_empty() {
                continue;
            }
            let token = edt::seal(&self.me, latest, *v, dk, &missing, origin.get(v).cloned())?;
            let body =
                serde_json::to_vec(&token).map_err(|_| DomainError::Malformed("edt".into()))?;
            let res = store
                .commit(Batch {
                    writes: vec![Write::Put {
                        kind: EDT_KIND.into(),
                        account: SYSTEM_ACCOUNT.into(),
                        id: format!("{v:010}.{}.{}", state_id(latest.version), self.me.id()),
                        body,
                        expect_rev: Some(0),
                    }],
                    audit: vec![audit(
                        "ExportDomainKey",
                        "Success",
                        serde_json::json!({ "version": v, "state_version": latest.version, "node": self.me.id(), "recipients": missing }),
                    )],
                })
                .await;
            match res {
                Ok(_) => n += 1,
                Err(caas_store::Error::Conflict { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        Ok(n)
    }

    /// What a member does on every reload: verify, make a new domain key if the rules
    /// demand one (after a removal or a forced rotation), send keys to joiners, and return
    /// the keys it holds.
    pub async fn sync(&self, store: &Store) -> Result<DomainKeys, DomainError> {
        let (chain, dks) = self.keys(store, Some(store)).await?;
        let member = chain.latest().members.contains_key(self.me.id());
        if !member {
            return Ok(dks);
        }
        let mut again = false;
        if dks.needs_rotation {
            match self.rotate(store).await {
                Ok(_) | Err(DomainError::Conflict(_)) => again = true,
                Err(e) => return Err(e),
            }
        }
        if self.reexport(store).await? > 0 {
            again = true;
        }
        if again {
            return Ok(self.keys(store, Some(store)).await?.1);
        }
        Ok(dks)
    }
}

/// Genesis of a new domain, prepared in memory: the document, its first domain key and the
/// EDT that carries it to the first member. Write them with [`commit_genesis`].
pub struct Genesis {
    /// The signed genesis (no approvals needed: its hash is pinned in every node's config).
    pub signed: SignedState,
    /// The first domain key (the domain root derives from it).
    pub dk1: SecretKey,
    /// Its EDT for the first member.
    pub edt: Edt,
}

impl std::fmt::Debug for Genesis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Genesis")
    }
}

/// Prepares a new domain with `me` as its first member.
pub fn prepare_genesis(
    me: &NodeIdentity,
    operators: BTreeMap<String, state::OperatorPublic>,
    rules: state::QuorumRules,
) -> Result<Genesis, DomainError> {
    let domain = format!(
        "domain-{}",
        hex::encode(caas_crypto::random_bytes(8).map_err(|_| DomainError::Crypto("rng"))?)
    );
    let g = DomainState::genesis(&domain, me.public().clone(), operators, rules)?;
    let dk1 = caas_crypto::random_key().map_err(|_| DomainError::Crypto("rng"))?;
    let edt = edt::seal(me, &g, 1, &dk1, &[me.id().to_string()], None)?;
    Ok(Genesis {
        signed: SignedState::new(&g)?,
        dk1,
        edt,
    })
}

/// Stores a prepared genesis (refused if the database already has a domain).
pub async fn commit_genesis(
    store: &Store,
    me: &NodeIdentity,
    g: &Genesis,
) -> Result<[u8; 32], DomainError> {
    let s = g.signed.state()?;
    let writes = vec![
        Write::Put {
            kind: STATE_KIND.into(),
            account: SYSTEM_ACCOUNT.into(),
            id: state_id(1),
            body: serde_json::to_vec(&g.signed)
                .map_err(|_| DomainError::Malformed("state".into()))?,
            expect_rev: Some(0),
        },
        Write::Put {
            kind: DK_KIND.into(),
            account: SYSTEM_ACCOUNT.into(),
            id: format!("{:010}", 1),
            body: serde_json::json!({ "state_version": 1, "sender": me.id() })
                .to_string()
                .into_bytes(),
            expect_rev: Some(0),
        },
        Write::Put {
            kind: EDT_KIND.into(),
            account: SYSTEM_ACCOUNT.into(),
            id: format!("{:010}.{}.{}", 1, state_id(1), me.id()),
            body: serde_json::to_vec(&g.edt).map_err(|_| DomainError::Malformed("edt".into()))?,
            expect_rev: Some(0),
        },
    ];
    store
        .commit(Batch {
            writes,
            audit: vec![audit(
                "CreateDomain",
                "Success",
                serde_json::json!({ "domain": s.domain, "genesis": hex::encode(g.signed.hash()), "node": me.id() }),
            )],
        })
        .await
        .map_err(store_err)?;
    Ok(g.signed.hash())
}

/// A pending change as an operator reviews it.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The proposed document with the approvals collected so far.
    pub signed: SignedState,
    /// The proposed next state.
    pub state: DomainState,
    /// The state it changes.
    pub current: DomainState,
    /// Operators whose approval verifies.
    pub approved_by: Vec<String>,
    /// Approvals the rules demand.
    pub required: u32,
    rev: i64,
}

/// Proposes `change` on top of the newest verified state (replacing any earlier proposal).
pub async fn propose(
    store: &Store,
    pinned: &[u8; 32],
    change: Change,
) -> Result<Pending, DomainError> {
    let chain = read_chain(store, pinned).await?;
    let current = chain.latest().clone();
    let next = current.apply(&change)?;
    let signed = SignedState::new(&next)?;
    store
        .commit(Batch {
            writes: vec![Write::Put {
                kind: PENDING_KIND.into(),
                account: SYSTEM_ACCOUNT.into(),
                id: "next".into(),
                body: serde_json::to_vec(&signed).map_err(|_| DomainError::Malformed("state".into()))?,
                expect_rev: None,
            }],
            audit: vec![audit(
                "ProposeDomainChange",
                "Success",
                serde_json::json!({ "change": change.kind(), "version": next.version, "hash": hex::encode(signed.hash()) }),
            )],
        })
        .await
        .map_err(store_err)?;
    pending(store, pinned)
        .await?
        .ok_or_else(|| DomainError::Conflict("the proposal was replaced".into()))
}

/// The pending change, checked against the newest verified state (None: nothing pending).
pub async fn pending(store: &Store, pinned: &[u8; 32]) -> Result<Option<Pending>, DomainError> {
    let Some(row) = store
        .get(PENDING_KIND, SYSTEM_ACCOUNT, "next")
        .await
        .map_err(store_err)?
    else {
        return Ok(None);
    };
    let chain = read_chain(store, pinned).await?;
    let current = chain.latest().clone();
    let signed: SignedState = serde_json::from_slice(&row.body)
        .map_err(|_| DomainError::Malformed("pending row".into()))?;
    let st = signed.state()?;
    if st.version != current.version + 1 || current.apply(&st.change)? != st {
        return Err(DomainError::Refused(
            "the pending change does not apply to the current domain state (stale or altered): \
             propose it again"
                .into(),
        ));
    }
    Ok(Some(Pending {
        approved_by: signed.valid_approvers(&current.operators),
        required: current.rules.required(&st.change),
        signed,
        state: st,
        current,
        rev: row.rev,
    }))
}

/// What an approval did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approved {
    /// Recorded; more approvals are needed.
    Recorded {
        /// Approvals that verify.
        have: usize,
        /// Approvals needed.
        need: u32,
    },
    /// The change took effect as this version.
    Published(u64),
}

/// Adds `key`'s approval to the pending change whose hash is `reviewed` (what the operator
/// was shown); publishes the new version when the quorum is met.
pub async fn approve(
    store: &Store,
    pinned: &[u8; 32],
    key: &OperatorKey,
    reviewed: &[u8; 32],
) -> Result<Approved, DomainError> {
    let mut p = pending(store, pinned)
        .await?
        .ok_or_else(|| DomainError::Refused("no pending domain change".into()))?;
    if &p.signed.hash() != reviewed {
        return Err(DomainError::Refused(
            "the pending change is not the one reviewed".into(),
        ));
    }
    if !p.current.operators.contains_key(&key.name)
        || p.current.operators.get(&key.name) != Some(&key.public())
    {
        return Err(DomainError::Refused(
            "this key is not an operator of the domain".into(),
        ));
    }
    p.signed.approve(key);
    let have = p.signed.valid_approvers(&p.current.operators).len();
    let body = serde_json::to_vec(&p.signed).map_err(|_| DomainError::Malformed("state".into()))?;
    if have < p.required as usize {
        store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: PENDING_KIND.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: "next".into(),
                    body,
                    expect_rev: Some(p.rev),
                }],
                audit: vec![audit(
                    "ApproveDomainChange",
                    "Success",
                    serde_json::json!({ "operator": key.name, "change": p.state.change.kind(), "version": p.state.version, "have": have, "need": p.required }),
                )],
            })
            .await
            .map_err(store_err)?;
        return Ok(Approved::Recorded {
            have,
            need: p.required,
        });
    }
    state::verify_next(&p.current, &p.signed)?;
    store
        .commit(Batch {
            writes: vec![
                Write::Put {
                    kind: STATE_KIND.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: state_id(p.state.version),
                    body,
                    expect_rev: Some(0),
                },
                Write::Delete {
                    kind: PENDING_KIND.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: "next".into(),
                    expect_rev: Some(p.rev),
                },
            ],
            audit: vec![audit(
                "DomainChange",
                "Success",
                serde_json::json!({ "operator": key.name, "change": p.state.change.kind(), "version": p.state.version, "approvals": have }),
            )],
        })
        .await
        .map_err(store_err)?;
    Ok(Approved::Published(p.state.version))
}
