//! The overlay's logic without I/O: the key set of a network domain (rekey with overlap),
//! the peers, sealing the VM's frames ([`Egress`]) and opening the peers' datagrams
//! ([`Ingress`]) with replay windows, domain separation and MAC learning. [`super::serve`]
//! runs it on real sockets; the tests drive it directly.
//!
//! Rekey: a new epoch's key is accepted for receiving as soon as it is installed; this
//! proxy starts *sending* under it once a peer was seen using it or `switch_after` has
//! passed (so peers that get the key a little later lose nothing), and keeps accepting the
//! previous epoch until `retire_after` after the new key was installed. Epochs only grow.
use super::frame::{self, DomainId, HEADER_LEN, Header, KEY_LABEL, TAG_LEN};
use super::replay::{Refusal, ReplayWindow};
use super::switch::{MacTable, Route};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use caas_crypto::SecretKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How many epochs are kept at most (the sending one, the one before, one newer).
const MAX_KEYS: usize = 3;

/// The fixed settings of one proxy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The network domain.
    pub domain: DomainId,
    /// This crypto domain's sender id in the network domain (unique among its members).
    pub sender: u32,
    /// This run's session: must exceed every earlier session of this sender (the time of
    /// start in microseconds, [`session_now`]).
    pub session: u64,
    /// Start sending under a new epoch at the latest this long after it was installed.
    pub switch_after: Duration,
    /// Keep accepting the previous epoch this long after a new one was installed.
    pub retire_after: Duration,
}

/// A session number for a proxy starting now: microseconds since the UNIX epoch.
#[must_use]
pub fn session_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A member of the network domain: its sender id and UDP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's sender id.
    pub sender: u32,
    /// Where its proxy receives.
    pub addr: SocketAddr,
}

/// A refused control request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// A key for an epoch not above the newest (epochs only grow).
    #[error("key epoch {got} is not above the newest epoch {newest}")]
    StaleEpoch {
        /// The epoch offered.
        got: u32,
        /// The newest installed.
        newest: u32,
    },
    /// A peer list naming this proxy, a sender twice or an address twice.
    #[error("bad peer list: {0}")]
    BadPeers(String),
}

struct EpochKey {
    epoch: u32,
    key: SecretKey,
    installed: Instant,
    rx_seen: AtomicBool,
}

/// Per-reason counters of one proxy.
#[derive(Debug, Default)]
pub struct Counters {
    tx_frames: AtomicU64,
    tx_no_key: AtomicU64,
    tx_malformed: AtomicU64,
    rx_frames: AtomicU64,
    rx_malformed: AtomicU64,
    rx_foreign_domain: AtomicU64,
    rx_unknown_peer: AtomicU64,
    rx_unknown_epoch: AtomicU64,
    rx_auth_failed: AtomicU64,
    rx_replayed: AtomicU64,
    vm_refused: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames of the VM sealed and sent.
    pub tx_frames: u64,
    /// Frames of the VM dropped because no key is installed yet.
    pub tx_no_key: u64,
    /// Frames of the VM dropped as malformed (too short or too long).
    pub tx_malformed: u64,
    /// Frames delivered to the VM.
    pub rx_frames: u64,
    /// Datagrams dropped as not overlay datagrams.
    pub rx_malformed: u64,
    /// Datagrams of another network domain.
    pub rx_foreign_domain: u64,
    /// Datagrams from an address that is not a peer, or with another peer's sender id.
    pub rx_unknown_peer: u64,
    /// Datagrams under an epoch not (or no longer) accepted.
    pub rx_unknown_epoch: u64,
    /// Datagrams that failed authentication (forged, tampered, wrong key).
    pub rx_auth_failed: u64,
    /// Datagrams already received (replay window or an older session).
    pub rx_replayed: u64,
    /// Datagrams on the VM socket from anyone but the VM.
    pub vm_refused: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tx_frames={} tx_no_key={} tx_malformed={} rx_frames={} rx_malformed={} \
             rx_foreign_domain={} rx_unknown_peer={} rx_unknown_epoch={} rx_auth_failed={} \
             rx_replayed={} vm_refused={}",
            self.tx_frames,
            self.tx_no_key,
            self.tx_malformed,
            self.rx_frames,
            self.rx_malformed,
            self.rx_foreign_domain,
            self.rx_unknown_peer,
            self.rx_unknown_epoch,
            self.rx_auth_failed,
            self.rx_replayed,
            self.vm_refused
        )
    }
}

/// Why a frame of the VM is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// No key installed yet.
    NoKey,
    /// Shorter than an Ethernet header or longer than a datagram can carry.
    Malformed,
    /// No peer to send to.
    NoPeer,
}

/// Why a datagram from the underlay is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxDrop {
    /// Not an overlay datagram.
    Malformed,
    /// Of another network domain.
    ForeignDomain,
    /// From an address that is not a peer, or with another sender id than the peer's.
    UnknownPeer,
    /// Under an epoch not (or no longer) accepted.
    UnknownEpoch,
    /// Failed authentication.
    AuthFailed,
    /// Already received, or of an older session.
    Replayed,
}

impl RxDrop {
    /// The reason as a word (logs).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::ForeignDomain => "foreign-domain",
            Self::UnknownPeer => "unknown-peer",
            Self::UnknownEpoch => "unknown-epoch",
            Self::AuthFailed => "auth-failed",
            Self::Replayed => "replayed",
        }
    }
}

#[derive(Default)]
struct PeerSet {
    by_addr: HashMap<SocketAddr, u32>,
    addrs: Vec<SocketAddr>,
}

/// The state the control channel, the sending and the receiving side share.
pub struct Shared {
    settings: Settings,
    keys: RwLock<Vec<Arc<EpochKey>>>,
    peers: RwLock<PeerSet>,
    macs: Mutex<MacTable>,
    /// Bumped whenever keys or peers change (the receiving side then prunes its state).
    generation: AtomicU64,
    counters: Counters,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn gcm_key(k: &SecretKey) -> LessSafeKey {
    // A 32-byte key always makes an AES-256-GCM key; the match keeps unwrap out.
    match UnboundKey::new(&AES_256_GCM, k.expose()) {
        Ok(u) => LessSafeKey::new(u),
        Err(_) => unreachable!("AES-256-GCM takes 32-byte keys"),
    }
}

fn frame_key(
    net_key: &SecretKey,
    domain: &DomainId,
    epoch: u32,
    sender: u32,
    session: u64,
) -> Option<LessSafeKey> {
    let ctx = frame::key_context(domain, epoch, sender, session);
    caas_crypto::kdf::derive_key(net_key.expose(), KEY_LABEL, &ctx)
        .ok()
        .map(|k| gcm_key(&k))
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Shared {
    /// The shared state of a proxy with these settings (no key, no peer yet).
    #[must_use]
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            keys: RwLock::new(Vec::new()),
            peers: RwLock::new(PeerSet::default()),
            macs: Mutex::new(MacTable::default()),
            generation: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    /// The settings.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Installs the network key of `epoch` (above every installed epoch; the same key again
    /// for the newest epoch is accepted and changes nothing).
    ///
    /// # Errors
    /// [`ControlError::StaleEpoch`].
    pub fn install_key(
        &self,
        epoch: u32,
        key: SecretKey,
        now: Instant,
    ) -> Result<(), ControlError> {
        let mut keys = write(&self.keys);
        if let Some(newest) = keys.last() {
            if epoch == newest.epoch && key.expose() == newest.key.expose() {
                return Ok(());
            }
            if epoch <= newest.epoch {
                return Err(ControlError::StaleEpoch {
                    got: epoch,
                    newest: newest.epoch,
                });
            }
        }
        keys.push(Arc::new(EpochKey {
            epoch,
            key,
            installed: now,
            rx_seen: AtomicBool::new(false),
        }));
        if keys.len() > MAX_KEYS {
            let extra = keys.len() - MAX_KEYS;
            keys.drain(..extra);
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Replaces the peer list (a membership change: addresses learned behind a peer that
    /// left are forgotten).
    ///
    /// # Errors
    /// [`ControlError::BadPeers`] when the list names this proxy's sender id, or a sender id
    /// or address twice.
    pub fn set_peers(&self, list: &[Peer]) -> Result<(), ControlError> {
        let mut set = PeerSet::default();
        let mut senders = std::collections::HashSet::new();
        for p in list {
            if p.sender == self.settings.sender {
                return Err(ControlError::BadPeers(format!(
                    "sender id {} is this proxy's own",
                    p.sender
                )));
            }
            if !senders.insert(p.sender) {
                return Err(ControlError::BadPeers(format!(
                    "sender id {} twice",
                    p.sender
                )));
            }
            if set.by_addr.insert(p.addr, p.sender).is_some() {
                return Err(ControlError::BadPeers(format!("address {} twice", p.addr)));
            }
            set.addrs.push(p.addr);
        }
        let mut peers = write(&self.peers);
        {
            let mut macs = lock(&self.macs);
            for old in &peers.addrs {
                if !set.by_addr.contains_key(old) {
                    macs.forget_peer(old);
                }
            }
        }
        *peers = set;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The installed epochs, oldest first.
    #[must_use]
    pub fn epochs(&self) -> Vec<u32> {
        read(&self.keys).iter().map(|k| k.epoch).collect()
    }

    /// The epoch frames are sent under now.
    #[must_use]
    pub fn send_epoch(&self, now: Instant) -> Option<u32> {
        self.send_key(now).map(|k| k.epoch)
    }

    fn send_key(&self, now: Instant) -> Option<Arc<EpochKey>> {
        let keys = read(&self.keys);
        let newest = keys.last()?;
        if keys.len() == 1
            || newest.rx_seen.load(Ordering::Relaxed)
            || now.duration_since(newest.installed) >= self.settings.switch_after
        {
            return Some(newest.clone());
        }
        // The previous epoch, while peers may not have the new one yet.
        keys.get(keys.len() - 2).cloned()
    }

    fn recv_key(&self, epoch: u32, now: Instant) -> Option<Arc<EpochKey>> {
        let keys = read(&self.keys);
        let i = keys.iter().position(|k| k.epoch == epoch)?;
        match keys.get(i + 1) {
            // Superseded: accepted until retire_after after its successor arrived.
            Some(next) if now.duration_since(next.installed) >= self.settings.retire_after => None,
            _ => Some(keys[i].clone()),
        }
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            tx_frames: g(&c.tx_frames),
            tx_no_key: g(&c.tx_no_key),
            tx_malformed: g(&c.tx_malformed),
            rx_frames: g(&c.rx_frames),
            rx_malformed: g(&c.rx_malformed),
            rx_foreign_domain: g(&c.rx_foreign_domain),
            rx_unknown_peer: g(&c.rx_unknown_peer),
            rx_unknown_epoch: g(&c.rx_unknown_epoch),
            rx_auth_failed: g(&c.rx_auth_failed),
            rx_replayed: g(&c.rx_replayed),
            vm_refused: g(&c.vm_refused),
        }
    }

    /// Counts a datagram on the VM socket from someone other than the VM.
    pub fn count_vm_refused(&self) {
        bump(&self.counters.vm_refused);
    }
}

/// A sealed frame and where it goes.
#[derive(Debug)]
pub struct Outgoing {
    /// The overlay datagram.
    pub datagram: Vec<u8>,
    /// Its destinations (one learned peer, or every peer).
    pub to: Vec<SocketAddr>,
}

/// The sending side: seals the VM's frames (one per proxy: it owns the sequence counter).
pub struct Egress {
    shared: Arc<Shared>,
    next_seq: u64,
    cached: Option<(u32, LessSafeKey)>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// The sending side of `shared`. Only one may exist per session (sequence numbers).
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            next_seq: 0,
            cached: None,
        }
    }

    /// Seals one Ethernet frame of the VM.
    ///
    /// # Errors
    /// [`TxDrop`] (counted).
    pub fn seal(&mut self, eth: &[u8], now: Instant) -> Result<Outgoing, TxDrop> {
        let c = &self.shared.counters;
        let Some((dst, _)) = frame::macs(eth).filter(|_| eth.len() <= frame::MAX_FRAME) else {
            bump(&c.tx_malformed);
            return Err(TxDrop::Malformed);
        };
        let Some(ek) = self.shared.send_key(now) else {
            bump(&c.tx_no_key);
            return Err(TxDrop::NoKey);
        };
        let to = match lock(&self.shared.macs).route(&dst, now) {
            Route::Peer(p) => vec![p],
            Route::Flood => read(&self.shared.peers).addrs.clone(),
        };
        if to.is_empty() {
            return Err(TxDrop::NoPeer);
        }
        let s = &self.shared.settings;
        if self.cached.as_ref().map(|(e, _)| *e) != Some(ek.epoch) {
            let Some(k) = frame_key(&ek.key, &s.domain, ek.epoch, s.sender, s.session) else {
                bump(&c.tx_no_key);
                return Err(TxDrop::NoKey);
            };
            self.cached = Some((ek.epoch, k));
        }
        let Some((_, key)) = self.cached.as_ref() else {
            return Err(TxDrop::NoKey);
        };
        // A session never wraps its counter (2^64 frames); refuse rather than reuse a nonce.
        let seq = self.next_seq;
        let Some(next) = seq.checked_add(1) else {
            bump(&c.tx_no_key);
            return Err(TxDrop::NoKey);
        };
        self.next_seq = next;
        let h = Header {
            domain_tag: s.domain.tag(),
            epoch: ek.epoch,
            sender: s.sender,
            session: s.session,
            seq,
        };
        let mut d = Vec::with_capacity(HEADER_LEN + eth.len() + TAG_LEN);
        d.extend_from_slice(&h.encode());
        d.extend_from_slice(eth);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(h.nonce()),
                Aad::from(h.aad(&s.domain)),
                &mut d[HEADER_LEN..],
            )
            .map_err(|_| TxDrop::Malformed)?;
        d.extend_from_slice(tag.as_ref());
        bump(&c.tx_frames);
        Ok(Outgoing { datagram: d, to })
    }
}

struct RxState {
    session: u64,
    key: LessSafeKey,
    window: ReplayWindow,
}

/// The receiving side: opens the peers' datagrams (one per proxy: it owns the windows).
pub struct Ingress {
    shared: Arc<Shared>,
    rx: HashMap<(u32, u32), RxState>,
    generation: u64,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("sessions", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl Ingress {
    /// The receiving side of `shared`.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            rx: HashMap::new(),
            generation: 0,
        }
    }

    /// Opens a datagram from `from` in place; on success the returned range of `d` is the
    /// Ethernet frame for the VM.
    ///
    /// # Errors
    /// [`RxDrop`] (counted).
    pub fn open(
        &mut self,
        from: SocketAddr,
        d: &mut [u8],
        now: Instant,
    ) -> Result<std::ops::Range<usize>, RxDrop> {
        let r = self.open_inner(from, d, now);
        let c = &self.shared.counters;
        bump(match r {
            Ok(_) => &c.rx_frames,
            Err(RxDrop::Malformed) => &c.rx_malformed,
            Err(RxDrop::ForeignDomain) => &c.rx_foreign_domain,
            Err(RxDrop::UnknownPeer) => &c.rx_unknown_peer,
            Err(RxDrop::UnknownEpoch) => &c.rx_unknown_epoch,
            Err(RxDrop::AuthFailed) => &c.rx_auth_failed,
            Err(RxDrop::Replayed) => &c.rx_replayed,
        });
        r
    }

    fn prune(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g == self.generation {
            return;
        }
        self.generation = g;
        let epochs = self.shared.epochs();
        let peers = read(&self.shared.peers);
        let senders: std::collections::HashSet<u32> = peers.by_addr.values().copied().collect();
        self.rx
            .retain(|(e, s), _| epochs.contains(e) && senders.contains(s));
    }

    fn open_inner(
        &mut self,
        from: SocketAddr,
        d: &mut [u8],
        now: Instant,
    ) -> Result<std::ops::Range<usize>, RxDrop> {
        self.prune();
        let h = Header::decode(d).map_err(|_| RxDrop::Malformed)?;
        let s = &self.shared.settings;
        if h.domain_tag != s.domain.tag() {
            return Err(RxDrop::ForeignDomain);
        }
        if read(&self.shared.peers).by_addr.get(&from) != Some(&h.sender) {
            return Err(RxDrop::UnknownPeer);
        }
        let ek = self
            .shared
            .recv_key(h.epoch, now)
            .ok_or(RxDrop::UnknownEpoch)?;
        let aad = h.aad(&s.domain);
        let end = d.len() - TAG_LEN;
        let state_key = (h.epoch, h.sender);
        let fresh = match self.rx.get(&state_key) {
            Some(st) if st.session == h.session => {
                st.window.check(h.seq).map_err(|_| RxDrop::Replayed)?;
                None
            }
            // An older session of this sender: its frames are replays.
            Some(st) if st.session > h.session => return Err(RxDrop::Replayed),
            _ => Some(
                frame_key(&ek.key, &s.domain, h.epoch, h.sender, h.session)
                    .ok_or(RxDrop::AuthFailed)?,
            ),
        };
        let key = match (&fresh, self.rx.get(&state_key)) {
            (Some(k), _) => k,
            (None, Some(st)) => &st.key,
            (None, None) => return Err(RxDrop::AuthFailed),
        };
        key.open_in_place(
            Nonce::assume_unique_for_key(h.nonce()),
            Aad::from(aad),
            &mut d[HEADER_LEN..],
        )
        .map_err(|_| RxDrop::AuthFailed)?;
        match fresh {
            Some(key) => {
                let mut window = ReplayWindow::new();
                window.accept(h.seq).map_err(|_| RxDrop::Replayed)?;
                self.rx.insert(
                    state_key,
                    RxState {
                        session: h.session,
                        key,
                        window,
                    },
                );
            }
            None => {
                if let Some(st) = self.rx.get_mut(&state_key) {
                    st.window.accept(h.seq).map_err(|e| match e {
                        Refusal::Duplicate | Refusal::TooOld => RxDrop::Replayed,
                    })?;
                }
            }
        }
        ek.rx_seen.store(true, Ordering::Relaxed);
        let range = HEADER_LEN..end;
        if let Some((_, src)) = frame::macs(&d[range.clone()]) {
            lock(&self.shared.macs).learn(src, from, now);
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "127.0.0.1:4001";
    const B: &str = "127.0.0.1:4002";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxy(domain: &str, sender: u32, session: u64, peer: (u32, &str)) -> Arc<Shared> {
        let s = Shared::new(Settings {
            domain: DomainId::new(domain).unwrap(),
            sender,
            session,
            switch_after: Duration::from_secs(2),
            retire_after: Duration::from_secs(30),
        });
        s.set_peers(&[Peer {
            sender: peer.0,
            addr: addr(peer.1),
        }])
        .unwrap();
        s
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    /// A frame from MAC 02:..:src to MAC 02:..:dst with a payload.
    fn eth(dst: u8, src: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00];
        f.extend_from_slice(payload);
        f
    }

    /// Two proxies of domain "finance" (a = sender 1 at A, b = sender 2 at B) with key 1.
    fn pair(now: Instant) -> (Arc<Shared>, Arc<Shared>) {
        let a = proxy("finance", 1, 100, (2, B));
        let b = proxy("finance", 2, 200, (1, A));
        a.install_key(1, key(1), now).unwrap();
        b.install_key(1, key(1), now).unwrap();
        (a, b)
    }

    fn deliver(ing: &mut Ingress, from: &str, d: &[u8], now: Instant) -> Result<Vec<u8>, RxDrop> {
        let mut d = d.to_vec();
        let r = ing.open(addr(from), &mut d, now)?;
        Ok(d[r].to_vec())
    }

    #[test]
    fn a_frame_crosses_and_the_ciphertext_hides_it() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut tx = Egress::new(a.clone());
        let mut rx = Ingress::new(b.clone());
        let f = eth(
            0xbb,
            0xaa,
            b"the plaintext payload of a frame in the finance domain",
        );
        let out = tx.seal(&f, now).unwrap();
        assert_eq!(out.to, vec![addr(B)], "unknown destination: every peer");
        assert_eq!(out.datagram.len(), f.len() + frame::OVERHEAD);
        assert!(
            !out.datagram
                .windows(16)
                .any(|w| f.windows(16).any(|p| p == w))
        );
        assert_eq!(deliver(&mut rx, A, &out.datagram, now).unwrap(), f);
        assert_eq!(b.stats().rx_frames, 1);
        // b learned 02:..:aa behind A: its reply goes to A only.
        let mut back = Egress::new(b.clone());
        let reply = back.seal(&eth(0xaa, 0xbb, b"reply"), now).unwrap();
        assert_eq!(reply.to, vec![addr(A)]);
    }

    #[test]
    fn replayed_datagrams_are_dropped_and_counted() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut tx = Egress::new(a);
        let mut rx = Ingress::new(b.clone());
        let d1 = tx.seal(&eth(0xbb, 0xaa, b"one"), now).unwrap().datagram;
        let d2 = tx.seal(&eth(0xbb, 0xaa, b"two"), now).unwrap().datagram;
        // Out of order is fine, twice is not.
        deliver(&mut rx, A, &d2, now).unwrap();
        deliver(&mut rx, A, &d1, now).unwrap();
        assert_eq!(deliver(&mut rx, A, &d1, now), Err(RxDrop::Replayed));
        assert_eq!(deliver(&mut rx, A, &d2, now), Err(RxDrop::Replayed));
        assert_eq!(b.stats().rx_replayed, 2);
        assert_eq!(b.stats().rx_frames, 2);
    }

    #[test]
    fn an_older_session_of_a_sender_is_a_replay() {
        let now = Instant::now();
        let (a_old, b) = pair(now);
        let old = Egress::new(a_old)
            .seal(&eth(0xbb, 0xaa, b"old"), now)
            .unwrap();
        // The proxy of sender 1 restarts: a new, larger session.
        let a_new = proxy("finance", 1, 101, (2, B));
        a_new.install_key(1, key(1), now).unwrap();
        let new = Egress::new(a_new)
            .seal(&eth(0xbb, 0xaa, b"new"), now)
            .unwrap();
        let mut rx = Ingress::new(b.clone());
        deliver(&mut rx, A, &new.datagram, now).unwrap();
        assert_eq!(
            deliver(&mut rx, A, &old.datagram, now),
            Err(RxDrop::Replayed)
        );
    }

    #[test]
    fn tampered_datagrams_fail_authentication_and_move_no_window() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut tx = Egress::new(a);
        let mut rx = Ingress::new(b.clone());
        let d = tx
            .seal(&eth(0xbb, 0xaa, b"payload to tamper with"), now)
            .unwrap()
            .datagram;
        // Every byte of the header that is not parsed away, of the body and of the tag.
        for i in (4..d.len()).filter(|&i| !(16..20).contains(&i)) {
            let mut t = d.clone();
            t[i] ^= 0x01;
            let r = deliver(&mut rx, A, &t, now);
            assert!(
                matches!(
                    r,
                    Err(RxDrop::AuthFailed | RxDrop::ForeignDomain | RxDrop::UnknownEpoch)
                ),
                "byte {i}: {r:?}"
            );
        }
        // A forged frame with a huge sequence number did not move the window: the genuine
        // frame still passes.
        assert_eq!(deliver(&mut rx, A, &d, now).unwrap().len(), 14 + 22);
        assert!(b.stats().rx_auth_failed > 30);
    }

    #[test]
    fn frames_of_another_domain_are_dropped_even_with_the_same_key() {
        let now = Instant::now();
        // "hr" uses the very same key bytes (say, a mistake of the key service): still refused.
        let hr = proxy("hr", 1, 100, (2, B));
        hr.install_key(1, key(1), now).unwrap();
        let (_, b) = pair(now);
        let d = Egress::new(hr)
            .seal(&eth(0xbb, 0xaa, b"hr"), now)
            .unwrap()
            .datagram;
        let mut rx = Ingress::new(b.clone());
        assert_eq!(deliver(&mut rx, A, &d, now), Err(RxDrop::ForeignDomain));
        // Even with the finance tag pasted in, the full domain name in the AAD and the key
        // derivation refuse it.
        let mut forged = d.clone();
        forged[4..12].copy_from_slice(&DomainId::new("finance").unwrap().tag());
        assert_eq!(deliver(&mut rx, A, &forged, now), Err(RxDrop::AuthFailed));
        assert_eq!(b.stats().rx_foreign_domain, 1);
        assert_eq!(b.stats().rx_frames, 0);
    }

    #[test]
    fn datagrams_from_outside_the_peer_list_are_dropped() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let d = Egress::new(a)
            .seal(&eth(0xbb, 0xaa, b"x"), now)
            .unwrap()
            .datagram;
        let mut rx = Ingress::new(b.clone());
        assert_eq!(
            deliver(&mut rx, "127.0.0.1:9999", &d, now),
            Err(RxDrop::UnknownPeer)
        );
        // A peer claiming another member's sender id.
        b.set_peers(&[
            Peer {
                sender: 1,
                addr: addr(A),
            },
            Peer {
                sender: 3,
                addr: addr("127.0.0.1:4003"),
            },
        ])
        .unwrap();
        assert_eq!(
            deliver(&mut rx, "127.0.0.1:4003", &d, now),
            Err(RxDrop::UnknownPeer)
        );
        assert_eq!(
            deliver(&mut rx, "127.0.0.1:4003", b"garbage", now),
            Err(RxDrop::Malformed)
        );
        assert_eq!(b.stats().rx_unknown_peer, 2);
        assert!(
            b.set_peers(&[Peer {
                sender: 2,
                addr: addr(A)
            }])
            .is_err(),
            "own id"
        );
    }

    #[test]
    fn nothing_is_sent_without_a_key() {
        let now = Instant::now();
        let a = proxy("finance", 1, 100, (2, B));
        assert_eq!(
            Egress::new(a.clone()).seal(&eth(1, 2, b""), now).err(),
            Some(TxDrop::NoKey)
        );
        assert_eq!(
            Egress::new(a.clone()).seal(&[0; 10], now).err(),
            Some(TxDrop::Malformed)
        );
        assert_eq!(a.stats().tx_no_key, 1);
    }

    #[test]
    fn rekey_overlaps_then_retires_the_old_epoch() {
        let t0 = Instant::now();
        let (a, b) = pair(t0);
        let mut tx = Egress::new(a.clone());
        let mut rx = Ingress::new(b.clone());
        let f = eth(0xbb, 0xaa, b"rekey");
        let old = tx.seal(&f, t0).unwrap().datagram;
        // b gets epoch 2 first: a (still on 1) keeps getting through.
        b.install_key(2, key(2), t0).unwrap();
        deliver(&mut rx, A, &old, t0).unwrap();
        // a gets it: it keeps sending under 1 until it sees 2 in use or switch_after passes.
        a.install_key(2, key(2), t0).unwrap();
        assert_eq!(a.send_epoch(t0), Some(1));
        assert_eq!(a.send_epoch(t0 + Duration::from_secs(2)), Some(2));
        let t1 = t0 + Duration::from_secs(3);
        let new = tx.seal(&f, t1).unwrap().datagram;
        assert_eq!(Header::decode(&new).unwrap().epoch, 2);
        deliver(&mut rx, A, &new, t1).unwrap();
        // b saw epoch 2 in use: it switches at once.
        assert_eq!(b.send_epoch(t1), Some(2));
        // During the overlap a late epoch-1 frame still passes; after retire_after it is refused.
        let t2 = t0 + Duration::from_secs(31);
        let mut stale = tx_epoch1(t0, &f);
        assert_eq!(
            deliver(&mut rx, A, &stale.remove(0), t1).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            deliver(&mut rx, A, &stale.remove(0), t2),
            Err(RxDrop::UnknownEpoch)
        );
        assert_eq!(b.epochs(), vec![1, 2]);
        // Epochs only grow.
        assert!(matches!(
            b.install_key(1, key(9), t2),
            Err(ControlError::StaleEpoch { .. })
        ));
        assert!(
            b.install_key(2, key(2), t2).is_ok(),
            "the same key again changes nothing"
        );
        assert!(b.install_key(2, key(3), t2).is_err());
    }

    /// Two epoch-1 frames of sender 1 in a later session than `pair`'s (so they are fresh).
    fn tx_epoch1(now: Instant, f: &[u8]) -> Vec<Vec<u8>> {
        let p = proxy("finance", 1, 150, (2, B));
        p.install_key(1, key(1), now).unwrap();
        let mut e = Egress::new(p);
        vec![
            e.seal(f, now).unwrap().datagram,
            e.seal(f, now).unwrap().datagram,
        ]
    }
}
