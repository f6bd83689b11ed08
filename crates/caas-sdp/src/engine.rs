//! The encrypting block engine: maps virtual-disk reads and writes onto the volume
//! format's data blocks and metadata slots over a [`Store`], with the crash-consistent
//! update protocol of `docs/volume-format.md`:
//!
//! 1. a write picks, per block, a slot that holds neither the block's current version
//!    nor its last flushed version ([`caas_volume::entry::choose_target`]);
//! 2. it seals the block under the session's key with a fresh nonce (epoch ‖ session
//!    counter), writes the metadata entries first and the ciphertext second, then records
//!    the new current slot;
//! 3. a read tries the slots newest first: after a crash between the two writes the
//!    previous version still authenticates;
//! 4. FLUSH syncs the store and only then marks the written slots as committed;
//! 5. opening a volume whose dirty flag is set runs recovery, which clears slots newer
//!    than the version actually on disk, so the invariant "newest slot = content" holds.
//!
//! Sessions and rollback (format v2): every open checks the state sector's MAC, refuses a
//! state epoch below the caller's anchor (`OpenOptions::min_epoch`), and reads the whole
//! metadata area once: an authenticated slot written in an epoch later than the state
//! sector's proves that storage restored an old state sector (mix-and-match rollback) and
//! the open is refused with an audit record. A writable open then starts a new session:
//! epoch + 1 is written (authenticated, synced) before any block, and the session's key is
//! derived from the epoch and a fresh random session salt, so even a whole-volume rollback
//! (undetectable without an external anchor) never makes a (key, nonce) pair recur.
//! Format v1 volumes open read-only.
use crate::Error;
use crate::store::Store;
use caas_crypto::SecretKey;
use caas_volume::entry::{Entry, Slot, SlotKind, choose_target};
use caas_volume::header::{Dbsp, Header, KeySource, STATE_OFFSET, State};
use caas_volume::{
    BLOCK_SIZE, DataKeyProvider, ENTRY_SIZE, HEADER_SIZE, Layout, Session, Version, VolumeCipher,
};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BS: usize = BLOCK_SIZE;
const BSU: u64 = BLOCK_SIZE as u64;
/// Lock stripes (block index modulo this).
const STRIPES: usize = 1024;
/// Slots with an epoch later than the state sector's that are checked for authenticity
/// at open (evidence of a rolled-back state sector).
const MAX_ROLLBACK_EVIDENCE: usize = 1024;
/// Blocks per chunk in scans, creation and large zeroing.
const CHUNK_BLOCKS: u64 = 2048;
/// Learn all blocks' slot state at open when the metadata area is at most this big
/// (2 GiB of metadata = a 64 GiB volume); larger volumes learn it block by block.
const EAGER_STATE_MAX_META: u64 = 2 << 30;
/// Block state bits: known, current slot (bits 0-1), committed slot (bits 2-3).
const KNOWN: u8 = 0x80;

/// How the data key is obtained.
#[derive(Clone)]
pub enum KeyInput {
    /// A raw key (from a key file).
    Raw(Arc<SecretKey>),
    /// A data-key provider (the tenant's KMS).
    Provider(Arc<dyn DataKeyProvider>),
}

impl std::fmt::Debug for KeyInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyInput::Raw(_) => f.write_str("KeyInput::Raw([REDACTED])"),
            KeyInput::Provider(_) => f.write_str("KeyInput::Provider"),
        }
    }
}

/// How to open a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for writing (starts a new session: the epoch is incremented).
    pub writable: bool,
    /// Refuse a volume whose state-sector epoch is below this (an epoch the caller
    /// recorded elsewhere — the anchor against whole-volume rollback). 0: no anchor.
    pub min_epoch: u32,
}

/// Result of a recovery or check scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Blocks scanned.
    pub blocks: u64,
    /// Blocks whose newest slot did not match the stored data but an older one did
    /// (an interrupted write); recovery clears the stale slots.
    pub torn: u64,
    /// Blocks no slot authenticates (tampered or corrupted), by index (first 1000).
    pub bad: Vec<u64>,
    /// Total number of bad blocks.
    pub bad_count: u64,
}

/// A small pool of IO buffers so the hot path does not allocate (or zero-fill) per
/// request. Buffers keep their full length; a [`PoolBuf`] exposes the requested prefix.
#[derive(Debug, Default)]
pub struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

/// A buffer from a [`BufPool`]: derefs to exactly the requested number of bytes.
#[derive(Debug)]
pub struct PoolBuf {
    v: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

impl BufPool {
    /// A buffer of `len` bytes (contents unspecified: callers overwrite it fully).
    pub fn get(&self, len: usize) -> PoolBuf {
        let found = self.bufs.lock().ok().and_then(|mut b| {
            let i = b
                .iter()
                .rposition(|v| v.len() >= len && v.len() <= len.saturating_mul(4).max(64 << 10))?;
            Some(b.swap_remove(i))
        });
        PoolBuf {
            v: found.unwrap_or_else(|| vec![0u8; len]),
            len,
        }
    }
    /// Returns a buffer to the pool.
    pub fn put(&self, b: PoolBuf) {
        if b.v.len() <= (33 << 20)
            && let Ok(mut bufs) = self.bufs.lock()
            && bufs.len() < 256
        {
            bufs.push(b.v);
        }
    }
}

/// An open encrypted volume.
pub struct Volume {
    store: Store,
    cipher: VolumeCipher,
    header: Header,
    layout: Layout,
    writable: bool,
    version: Version,
    /// The writing session (writable v2 opens only).
    session: Option<Session>,
    /// The session's epoch (writable) or the state sector's (read-only).
    epoch: u32,
    /// Next counter of the session (counters restart at 1 in every session: the session
    /// key is new).
    counter: AtomicU64,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    state: Box<[AtomicU8]>,
    dirty: Mutex<Vec<(u64, u8)>>,
    barrier: tokio::sync::RwLock<()>,
    pool: Arc<BufPool>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("store", &self.store.describe())
            .field("size", &self.layout.size)
            .field("writable", &self.writable)
            .field("version", &self.version)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

async fn read_header(store: &Store) -> Result<(Header, State), Error> {
    let mut hb = vec![0u8; HEADER_SIZE];
    store.read_at(0, &mut hb).await?;
    Ok(Header::decode(&hb)?)
}

fn data_key(header: &Header, key: &KeyInput) -> Result<SecretKey, Error> {
    match (key, &header.key_source) {
        (KeyInput::Raw(k), _) => Ok((**k).clone()),
        (KeyInput::Provider(p), KeySource::Wrapped(blob)) => Ok(p.unwrap(blob)?),
        (KeyInput::Provider(_), KeySource::External) => Err(Error::Config(
            "volume uses an external key: pass --key-file".into(),
        )),
    }
}

fn cipher_for(header: &Header, key: &KeyInput) -> Result<VolumeCipher, Error> {
    let c = header.cipher(&data_key(header, key)?)?;
    header.verify(&c)?;
    Ok(c)
}

/// The audit record of a refused open (state sector edited or rolled back, volume behind
/// its anchor). No key, no data in it.
fn audit_refused(store: &Store, e: caas_volume::Error) -> Error {
    let event = match e {
        caas_volume::Error::StateTampered => "state_tampered",
        caas_volume::Error::StateRollback { .. } => "state_rollback",
        caas_volume::Error::EpochBehind { .. } => "volume_rollback",
        _ => "open_refused",
    };
    tracing::error!(
        target: "caas_sdp::audit",
        event,
        store = %store.describe(),
        "volume refused: {e}"
    );
    Error::Volume(e)
}

/// Reads and parses a volume's header without a key (for `volume info`).
pub async fn inspect(store: &Store) -> Result<(Header, State), Error> {
    read_header(store).await
}

/// Creates a volume of `size` bytes on `store`: header, and one authenticated
/// "reads as zeroes" slot per block. The header is written last. With `zero_data` the data
/// area is overwritten with zeroes too (a "zeroes" slot requires zero ciphertext); needed
/// unless the store is a freshly created, sparse file.
pub async fn create(
    store: &Store,
    key: &KeyInput,
    size: u64,
    dbsp: Dbsp,
    zero_data: bool,
) -> Result<Header, Error> {
    let (data_key, source) = match key {
        KeyInput::Raw(k) => ((**k).clone(), KeySource::External),
        KeyInput::Provider(p) => {
            let (k, blob) = p.generate()?;
            (k, KeySource::Wrapped(blob))
        }
    };
    create_with_key(store, &data_key, source, size, dbsp, zero_data).await
}

/// [`create`] with a given data key and key source (`upgrade` keeps both).
pub async fn create_with_key(
    store: &Store,
    data_key: &SecretKey,
    source: KeySource,
    size: u64,
    dbsp: Dbsp,
    zero_data: bool,
) -> Result<Header, Error> {
    let rng = |_| Error::Config("RNG failure".into());
    let volume_id: [u8; 16] = caas_crypto::random_array().map_err(rng)?;
    let salt: [u8; 32] = caas_crypto::random_array().map_err(rng)?;
    let cipher = VolumeCipher::new_v2(data_key, volume_id, salt)?;
    let header = Header::new(&cipher, size, source, dbsp)?;
    let layout = header.layout;
    if store.byte_len().await? < layout.store_len() {
        return Err(Error::Config(format!(
            "ciphertext store holds {} bytes, the volume needs {}",
            store.byte_len().await?,
            layout.store_len()
        )));
    }
    // Creation is the volume's first session (epoch 1).
    let session = cipher.new_session(1)?;
    let v = Version::V2;
    let mut counter = 1u64;
    let mut b0 = 0u64;
    let mut meta = Vec::new();
    while b0 < layout.blocks {
        let n = CHUNK_BLOCKS.min(layout.blocks - b0);
        meta.clear();
        meta.resize(n as usize * ENTRY_SIZE, 0);
        for i in 0..n {
            let slot = cipher.zero_slot(&session, b0 + i, counter)?;
            counter += 1;
            let at = i as usize * ENTRY_SIZE;
            slot.encode_into(v, &mut meta[at..at + v.slot_size()]);
        }
        store.write_at(layout.entry_offset(b0), &meta).await?;
        b0 += n;
    }
    if zero_data {
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < layout.size {
            let n = (layout.size - off).min(zeros.len() as u64) as usize;
            store
                .write_at(layout.data_offset + off, &zeros[..n])
                .await?;
            off += n as u64;
        }
    }
    store.sync().await?;
    let state = header.seal_state(&cipher, false, 1)?;
    store.write_at(0, &header.encode(&state)).await?;
    store.sync().await?;
    Ok(header)
}

/// Re-encrypts the format v1 volume on `src` as a new format v2 volume on `dst` (same data
/// key, key source and DBSP fields; a fresh volume id and salt). Every block is
/// authenticated on the way: a block that fails aborts the upgrade.
pub async fn upgrade(
    src: Store,
    dst: &Store,
    key: &KeyInput,
    zero_data: bool,
) -> Result<Header, Error> {
    let (h, _) = read_header(&src).await?;
    if h.version != Version::V1 {
        return Err(Error::Config(format!(
            "{} is already format v{}",
            src.describe(),
            h.version.number()
        )));
    }
    let k = data_key(&h, key)?;
    let (old, _) = Volume::open(src, key, false).await?;
    let new = create_with_key(
        dst,
        &k,
        h.key_source.clone(),
        h.layout.size,
        h.dbsp.clone(),
        zero_data,
    )
    .await?;
    let (w, _) = Volume::open(dst.clone(), &KeyInput::Raw(Arc::new(k)), true).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let r = async {
        while off < h.layout.size {
            let n = (h.layout.size - off).min(buf.len() as u64) as usize;
            old.read(off, &mut buf[..n]).await?;
            // A fresh volume already reads as zeroes.
            if buf[..n].iter().any(|&b| b != 0) {
                w.write(off, &mut buf[..n], false).await?;
            }
            off += n as u64;
        }
        Ok::<(), Error>(())
    }
    .await;
    buf.fill(0);
    r?;
    w.close().await?;
    Ok(new)
}

impl Volume {
    /// Opens a volume. A writable open of a volume left dirty by a crash runs recovery
    /// first (returned as the report).
    pub async fn open(
        store: Store,
        key: &KeyInput,
        writable: bool,
    ) -> Result<(Arc<Self>, Option<ScanReport>), Error> {
        let opts = OpenOptions {
            writable,
            min_epoch: 0,
        };
        Self::open_with(store, key, opts).await
    }

    /// Opens a volume with [`OpenOptions`]: verifies the key, the header and the state
    /// sector, refuses a rolled-back state sector or a volume behind `min_epoch` (with an
    /// audit record), and for writing runs recovery if needed and starts a new session.
    pub async fn open_with(
        store: Store,
        key: &KeyInput,
        opts: OpenOptions,
    ) -> Result<(Arc<Self>, Option<ScanReport>), Error> {
        let writable = opts.writable;
        let (header, state) = read_header(&store).await?;
        let cipher = cipher_for(&header, key)?;
        if let Err(e) = header.verify_state(&cipher, &state) {
            return Err(audit_refused(&store, e));
        }
        let version = header.version;
        if version == Version::V1 && writable {
            return Err(caas_volume::Error::V1ReadOnly.into());
        }
        if state.epoch < opts.min_epoch {
            return Err(audit_refused(
                &store,
                caas_volume::Error::EpochBehind {
                    epoch: state.epoch,
                    expected: opts.min_epoch,
                },
            ));
        }
        let layout = header.layout;
        if store.byte_len().await? < layout.store_len() {
            return Err(Error::Config(
                "ciphertext store is shorter than the volume".into(),
            ));
        }
        let blocks =
            usize::try_from(layout.blocks).map_err(|_| Error::Config("volume too large".into()))?;
        // The session is created now but used only once its epoch is in the state sector.
        let (session, epoch) = if writable {
            let epoch = state
                .epoch
                .checked_add(1)
                .ok_or(caas_volume::Error::EpochExhausted)?;
            (Some(cipher.new_session(epoch)?), epoch)
        } else {
            (None, state.epoch)
        };
        let vol = Arc::new(Volume {
            store,
            cipher,
            header,
            layout,
            writable,
            version,
            session,
            epoch,
            counter: AtomicU64::new(1),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            state: (0..blocks).map(|_| AtomicU8::new(0)).collect(),
            dirty: Mutex::new(Vec::new()),
            barrier: tokio::sync::RwLock::new(()),
            pool: Arc::new(BufPool::default()),
        });
        // One pass over the metadata: the latest epoch any slot claims (v2: rollback
        // evidence), and (for writers of volumes up to 64 GiB) every block's current slot.
        // A v1 volume has no epochs: it is read only when there is state to learn. The v2
        // pass costs a read of the whole metadata area (3 % of the volume) at each open —
        // the price of detecting a rolled-back state sector.
        let learn = writable && layout.blocks * ENTRY_SIZE as u64 <= EAGER_STATE_MAX_META;
        let later = if learn || version == Version::V2 {
            vol.metadata_pass(learn, state.epoch).await?
        } else {
            Vec::new()
        };
        if version == Version::V2
            && let Some(seen) = vol.rollback_evidence(&later).await?
        {
            return Err(audit_refused(
                &vol.store,
                caas_volume::Error::StateRollback {
                    recorded: state.epoch,
                    seen,
                },
            ));
        }
        let mut report = None;
        if writable {
            if state.dirty {
                tracing::warn!(store = %vol.store.describe(), "volume was not closed cleanly: running recovery");
                let r = vol.scan(true).await?;
                tracing::warn!(torn = r.torn, bad = r.bad_count, "recovery finished");
                report = Some(r);
                if learn {
                    // Recovery may have cleared slots: learn the current ones again.
                    for s in vol.state.iter() {
                        s.store(0, Ordering::SeqCst);
                    }
                    vol.metadata_pass(true, u32::MAX).await?;
                }
            }
            // The new epoch is durable (dirty, authenticated) before any block is written.
            vol.write_state(true).await?;
            tracing::info!(store = %vol.store.describe(), epoch, "volume opened for writing");
        }
        Ok((vol, report))
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size
    }
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// True if opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// The buffer pool shared with the server.
    pub fn pool(&self) -> &Arc<BufPool> {
        &self.pool
    }

    /// The epoch of this open: the new session's (writable) or the state sector's.
    /// A caller that anchors the volume externally records it and passes it back as
    /// [`OpenOptions::min_epoch`] next time.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
    /// The format version.
    pub fn version(&self) -> Version {
        self.version
    }

    async fn write_state(&self, dirty: bool) -> Result<(), Error> {
        let st: State = self.header.seal_state(&self.cipher, dirty, self.epoch)?;
        self.store
            .write_at(STATE_OFFSET as u64, &st.encode(self.version))
            .await?;
        self.store.sync().await
    }

    /// Flushes and marks the volume clean. Further writes are refused.
    pub async fn close(&self) -> Result<(), Error> {
        if !self.writable {
            return Ok(());
        }
        self.flush().await?;
        let _g = self.barrier.write().await;
        self.write_state(false).await
    }

    /// `n` fresh counters of the session (no IO: the session key is new, so counters
    /// restart at 1 and need no persistent reservation).
    fn alloc_counters(&self, n: u64) -> Result<(&Session, u64), Error> {
        let session = self.session.as_ref().ok_or(Error::ReadOnly)?;
        let first = self.counter.fetch_add(n, Ordering::SeqCst);
        first
            .checked_add(n)
            .filter(|&end| end < u64::MAX / 2)
            .ok_or(caas_volume::Error::NonceExhausted)?;
        Ok((session, first))
    }

    /// Reads the whole metadata area once. With `learn`, records every block's newest slot
    /// as current and committed. Returns the used slots whose epoch is later than `epoch`
    /// (block, slot, epoch; at most [`MAX_ROLLBACK_EVIDENCE`]).
    async fn metadata_pass(
        &self,
        learn: bool,
        epoch: u32,
    ) -> Result<Vec<(u64, usize, u32)>, Error> {
        let mut later = Vec::new();
        let mut meta = Vec::new();
        let mut b0 = 0;
        while b0 < self.layout.blocks {
            let n = (CHUNK_BLOCKS * 8).min(self.layout.blocks - b0) as usize;
            meta.resize(n * ENTRY_SIZE, 0);
            self.store
                .read_at(self.layout.entry_offset(b0), &mut meta)
                .await?;
            for i in 0..n {
                let e =
                    Entry::decode_slice(&meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE], self.version);
                if learn && let Some(k) = e.newest() {
                    let k = k as u8;
                    self.state[b0 as usize + i].store(KNOWN | k | (k << 2), Ordering::SeqCst);
                }
                for (k, s) in e.slots.iter().enumerate() {
                    if let Some(s) = s
                        && s.kind != SlotKind::Empty
                        && s.session.epoch > epoch
                        && later.len() < MAX_ROLLBACK_EVIDENCE
                    {
                        later.push((b0 + i as u64, k, s.session.epoch));
                    }
                }
            }
            b0 += n as u64;
        }
        Ok(later)
    }

    /// Of the slots claiming a later epoch than the state sector, the latest epoch of one
    /// that authenticates its block — proof that the state sector was rolled back. Slots
    /// that do not authenticate are damage (storage can always destroy data), not proof.
    async fn rollback_evidence(&self, later: &[(u64, usize, u32)]) -> Result<Option<u32>, Error> {
        let mut seen = None;
        let mut e = [0u8; ENTRY_SIZE];
        let mut ct = vec![0u8; BS];
        let mut out = vec![0u8; BS];
        for &(index, k, epoch) in later {
            if seen.is_some_and(|s| s >= epoch) {
                continue;
            }
            self.store
                .read_at(self.layout.entry_offset(index), &mut e)
                .await?;
            self.store
                .read_at(self.layout.block_offset(index), &mut ct)
                .await?;
            let entry = Entry::decode(&e, self.version);
            if let Some(slot) = entry.slots[k]
                && slot.session.epoch == epoch
                && self.slot_opens(index, &slot, &ct, &mut out)
            {
                seen = Some(epoch);
            }
        }
        out.fill(0);
        if seen.is_none() && !later.is_empty() {
            tracing::warn!(
                store = %self.store.describe(),
                slots = later.len(),
                "slots claim a later epoch than the state sector but do not authenticate (damage)"
            );
        }
        Ok(seen)
    }

    /// True if `slot` authenticates `ct` as block `index` (plaintext in `out`).
    fn slot_opens(&self, index: u64, slot: &Slot, ct: &[u8], out: &mut [u8]) -> bool {
        match slot.kind {
            SlotKind::Data => self.cipher.open_block(index, slot, ct, out).is_ok(),
            SlotKind::Zero => {
                if ct.iter().all(|&b| b == 0) && self.cipher.verify_zero(index, slot) {
                    out.fill(0);
                    true
                } else {
                    false
                }
            }
            SlotKind::Empty => false,
        }
    }

    async fn lock_range(&self, b0: u64, n: u64) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = if n >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (b0..b0 + n)
                .map(|b| (b % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    /// Tries each slot, newest first; returns true if one authenticates `ct` (or says
    /// "zeroes"), with the plaintext in `out`.
    fn open_one(&self, index: u64, entry: &[u8], ct: &[u8], out: &mut [u8]) -> Option<usize> {
        let e = Entry::decode_slice(entry, self.version);
        let (idx, n) = e.candidates();
        for &k in &idx[..n] {
            let Some(slot) = e.slots[k] else { continue };
            // Only creation writes "zeroes" slots, over a zero data area; any other
            // ciphertext means damage or a later (interrupted) write.
            if self.slot_opens(index, &slot, ct, out) {
                return Some(k);
            }
        }
        out.fill(0);
        None
    }

    fn auth_error(&self, index: u64) -> Error {
        // The audit record of an integrity failure (no key, no data in it).
        tracing::error!(
            target: "caas_sdp::audit",
            event = "block_auth_failure",
            block = index,
            store = %self.store.describe(),
            "block failed authentication: returning EIO"
        );
        Error::BlockAuth {
            index,
            offset: index * BSU,
        }
    }

    /// Reads whole blocks `b0..b0+n` into `out`. Without `locked`, a block that fails is
    /// retried under its lock (a concurrent write may have been half-way).
    async fn read_blocks(&self, b0: u64, out: &mut [u8], locked: bool) -> Result<(), Error> {
        let n = (out.len() / BS) as u64;
        let mut meta = self.pool.get(n as usize * ENTRY_SIZE);
        let res = async {
            self.store
                .read_at(self.layout.entry_offset(b0), &mut meta)
                .await?;
            // The ciphertext goes straight into the output buffer and is decrypted in place.
            self.store
                .read_at(self.layout.block_offset(b0), out)
                .await?;
            for i in 0..n as usize {
                let index = b0 + i as u64;
                let r = i * BS..(i + 1) * BS;
                if self.open_newest_in_place(
                    index,
                    &meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE],
                    &mut out[r.clone()],
                ) {
                    continue;
                }
                // Slow path (older slot after a crash, a concurrent write, or damage): a
                // fresh copy of entry and ciphertext, every slot, under the block's lock.
                let _g = if locked {
                    None
                } else {
                    Some(self.stripes[(index % STRIPES as u64) as usize].lock().await)
                };
                let mut e = [0u8; ENTRY_SIZE];
                let mut ct = vec![0u8; BS];
                self.store
                    .read_at(self.layout.entry_offset(index), &mut e)
                    .await?;
                self.store
                    .read_at(self.layout.block_offset(index), &mut ct)
                    .await?;
                if self.open_one(index, &e, &ct, &mut out[r]).is_none() {
                    return Err(self.auth_error(index));
                }
            }
            Ok(())
        }
        .await;
        self.pool.put(meta);
        res
    }

    /// Fast path of a read: authenticates `buf` (the stored ciphertext) against the newest
    /// slot only, decrypting in place. On `false`, `buf` holds unspecified bytes.
    fn open_newest_in_place(&self, index: u64, entry: &[u8], buf: &mut [u8]) -> bool {
        let e = Entry::decode_slice(entry, self.version);
        let Some(slot) = e.newest().and_then(|k| e.slots[k]) else {
            return false;
        };
        match slot.kind {
            SlotKind::Data => self.cipher.open_block_in_place(index, &slot, buf).is_ok(),
            SlotKind::Zero => buf.iter().all(|&b| b == 0) && self.cipher.verify_zero(index, &slot),
            SlotKind::Empty => false,
        }
    }

    /// Reads `out.len()` bytes at `offset` (any alignment).
    pub async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        if out.is_empty() {
            return Ok(());
        }
        let end = offset + out.len() as u64;
        let b0 = offset / BSU;
        let b1 = end.div_ceil(BSU);
        if offset.is_multiple_of(BSU) && end.is_multiple_of(BSU) {
            return self.read_blocks(b0, out, false).await;
        }
        let mut tmp = self.pool.get(((b1 - b0) * BSU) as usize);
        let r = self.read_blocks(b0, &mut tmp, false).await;
        if r.is_ok() {
            let s = (offset - b0 * BSU) as usize;
            out.copy_from_slice(&tmp[s..s + out.len()]);
        }
        self.pool.put(tmp);
        r
    }

    /// The fast path of a single-block write whose slot state is known: seal, write the
    /// target slot (32 bytes) and then the block, without reading the entry.
    async fn write_one_known(&self, index: u64, st: u8, buf: &mut [u8]) -> Result<(), Error> {
        let (cur, com) = ((st & 3) as usize, ((st >> 2) & 3) as usize);
        let target = (0..caas_volume::SLOTS)
            .find(|&t| t != cur && t != com)
            .unwrap_or(0);
        let (session, counter) = self.alloc_counters(1)?;
        let slot = self.cipher.seal_block(session, index, counter, buf)?;
        let v = self.version;
        let mut raw = [0u8; 64];
        let raw = &mut raw[..v.slot_size()];
        slot.encode_into(v, raw);
        let at = self.layout.entry_offset(index) + v.slot_offset(target) as u64;
        self.store.write_at(at, raw).await?;
        self.store
            .write_at(self.layout.block_offset(index), buf)
            .await?;
        self.state[index as usize]
            .store(KNOWN | target as u8 | ((com as u8) << 2), Ordering::SeqCst);
        self.dirty
            .lock()
            .map_err(|_| Error::Config("poisoned".into()))?
            .push((index, target as u8));
        Ok(())
    }

    async fn write_blocks_locked(&self, b0: u64, buf: &mut [u8]) -> Result<(), Error> {
        let n = (buf.len() / BS) as u64;
        if n == 1 {
            let st = self.state[b0 as usize].load(Ordering::SeqCst);
            if st & KNOWN != 0 {
                return self.write_one_known(b0, st, buf).await;
            }
        }
        let mut meta = self.pool.get(n as usize * ENTRY_SIZE);
        let res = async {
            self.store
                .read_at(self.layout.entry_offset(b0), &mut meta)
                .await?;
            let (session, first) = self.alloc_counters(n)?;
            let v = self.version;
            let ss = v.slot_size();
            let mut targets = Vec::with_capacity(n as usize);
            for i in 0..n as usize {
                let index = b0 + i as u64;
                let em = &mut meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
                let e = Entry::decode_slice(em, v);
                let st = self.state[index as usize].load(Ordering::SeqCst);
                let (cur, com) = if st & KNOWN != 0 {
                    (Some((st & 3) as usize), Some(((st >> 2) & 3) as usize))
                } else {
                    (e.newest(), e.newest())
                };
                let target = choose_target(&e, cur, com);
                let slot = self.cipher.seal_block(
                    session,
                    index,
                    first + i as u64,
                    &mut buf[i * BS..(i + 1) * BS],
                )?;
                slot.encode_into(v, &mut em[target * ss..(target + 1) * ss]);
                // Malformed slots (damage) are reset so the rewritten block is readable.
                for (j, old) in e.slots.iter().enumerate() {
                    if old.is_none() && j != target {
                        em[j * ss..(j + 1) * ss].fill(0);
                    }
                }
                // Reserved bytes are always zero; rewriting them heals a damaged entry.
                em[caas_volume::SLOTS * ss..].fill(0);
                targets.push((target as u8, com.unwrap_or(target) as u8));
            }
            // Metadata first, then data (see the module docs).
            self.store
                .write_at(self.layout.entry_offset(b0), &meta)
                .await?;
            self.store
                .write_at(self.layout.block_offset(b0), buf)
                .await?;
            let mut dirty = self
                .dirty
                .lock()
                .map_err(|_| Error::Config("poisoned".into()))?;
            for (i, (t, c)) in targets.into_iter().enumerate() {
                let index = b0 + i as u64;
                self.state[index as usize].store(KNOWN | t | (c << 2), Ordering::SeqCst);
                dirty.push((index, t));
            }
            Ok(())
        }
        .await;
        self.pool.put(meta);
        res
    }

    /// Writes `data` at `offset` (any alignment); `data` is used as scratch (encrypted in
    /// place when aligned). With `fua`, the write is durable on return.
    pub async fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), Error> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let b0 = offset / BSU;
        let b1 = end.div_ceil(BSU);
        {
            let _b = self.barrier.read().await;
            let _g = self.lock_range(b0, b1 - b0).await;
            if offset.is_multiple_of(BSU) && end.is_multiple_of(BSU) {
                self.write_blocks_locked(b0, data).await?;
            } else {
                let mut tmp = self.pool.get(((b1 - b0) * BSU) as usize);
                let r = async {
                    if !offset.is_multiple_of(BSU) {
                        self.read_blocks(b0, &mut tmp[..BS], true).await?;
                    }
                    if !end.is_multiple_of(BSU) && (b1 - 1 != b0 || offset.is_multiple_of(BSU)) {
                        let at = ((b1 - 1 - b0) * BSU) as usize;
                        self.read_blocks(b1 - 1, &mut tmp[at..at + BS], true)
                            .await?;
                    }
                    let s = (offset - b0 * BSU) as usize;
                    tmp[s..s + data.len()].copy_from_slice(data);
                    self.write_blocks_locked(b0, &mut tmp).await
                }
                .await;
                self.pool.put(tmp);
                r?;
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes (WRITE_ZEROES and TRIM) by writing
    /// encrypted zero blocks: a fresh ciphertext, so no older slot (not even the creation
    /// "zeroes" slot) can authenticate the block again.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let n = (end - off).min(CHUNK_BLOCKS * BSU) as usize;
            let mut z = self.pool.get(n);
            z.fill(0);
            let r = self.write(off, &mut z, false).await;
            self.pool.put(z);
            r?;
            off += n as u64;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every completed write durable, then marks the written slots committed.
    pub async fn flush(&self) -> Result<(), Error> {
        if !self.writable {
            return Ok(());
        }
        let _g = self.barrier.write().await;
        let snapshot = std::mem::take(
            &mut *self
                .dirty
                .lock()
                .map_err(|_| Error::Config("poisoned".into()))?,
        );
        self.store.sync().await?;
        for (b, slot) in snapshot {
            let st = self.state[b as usize].load(Ordering::SeqCst);
            self.state[b as usize].store((st & !0x0c) | (slot << 2), Ordering::SeqCst);
        }
        Ok(())
    }

    /// Verifies every block. With `repair` (recovery), clears slots newer than the
    /// version on disk and syncs.
    pub async fn scan(&self, repair: bool) -> Result<ScanReport, Error> {
        let mut rep = ScanReport {
            blocks: self.layout.blocks,
            ..ScanReport::default()
        };
        let mut b0 = 0;
        let mut meta = Vec::new();
        let mut ct = Vec::new();
        let mut out = vec![0u8; BS];
        while b0 < self.layout.blocks {
            let n = CHUNK_BLOCKS.min(self.layout.blocks - b0) as usize;
            meta.resize(n * ENTRY_SIZE, 0);
            ct.resize(n * BS, 0);
            self.store
                .read_at(self.layout.entry_offset(b0), &mut meta)
                .await?;
            self.store
                .read_at(self.layout.block_offset(b0), &mut ct)
                .await?;
            let mut changed = false;
            for i in 0..n {
                let index = b0 + i as u64;
                let em = &mut meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
                match self.open_one(index, em, &ct[i * BS..(i + 1) * BS], &mut out) {
                    None => {
                        rep.bad_count += 1;
                        if rep.bad.len() < 1000 {
                            rep.bad.push(index);
                        }
                    }
                    Some(k) => {
                        let v = self.version;
                        let ss = v.slot_size();
                        let e = Entry::decode_slice(em, v);
                        if e.newest() != Some(k) {
                            rep.torn += 1;
                            let good = e.slots[k].map_or((0, 0), |s| s.order());
                            for j in 0..caas_volume::SLOTS {
                                let newer = e.slots[j].is_none_or(|s| s.order() > good);
                                if repair && j != k && newer {
                                    em[j * ss..(j + 1) * ss].fill(0);
                                    changed = true;
                                }
                            }
                        }
                    }
                }
            }
            if repair && changed {
                self.store
                    .write_at(self.layout.entry_offset(b0), &meta)
                    .await?;
            }
            b0 += n as u64;
        }
        out.fill(0);
        if repair {
            self.store.sync().await?;
        }
        Ok(rep)
    }
}

/// The state of a [`Deferred`] open.
#[derive(Debug, Clone)]
pub enum DeferredState {
    /// Not opened yet: requests wait.
    Pending,
    /// Opened (and, for a writer, locked): requests go to the volume.
    Open(Arc<Volume>),
    /// The open was refused or abandoned: every request fails.
    Failed,
}

/// A volume served before it is opened (the Secure Device Proxy's deferred open, for a
/// migration's or a resume's target): the NBD handshake is answered with the size and
/// read-only flag given here, while the volume itself is opened and locked (single writer)
/// only when the caller says so ([`DeferredOpen::open`]) — after the previous writer released it.
/// Until then every request waits, at most `wait`; then it fails (EIO). No request reads
/// the store before the open authenticated it, and none writes before the lock is held.
#[derive(Debug)]
pub struct Deferred {
    size: u64,
    read_only: bool,
    wait: std::time::Duration,
    state: tokio::sync::watch::Receiver<DeferredState>,
    pool: Arc<BufPool>,
}

impl Deferred {
    /// A pending volume of `size` bytes, and the handle that opens (or fails) it.
    pub fn new(size: u64, read_only: bool, wait: std::time::Duration) -> (Arc<Self>, DeferredOpen) {
        let (tx, rx) = tokio::sync::watch::channel(DeferredState::Pending);
        (
            Arc::new(Self {
                size,
                read_only,
                wait,
                state: rx,
                pool: Arc::new(BufPool::default()),
            }),
            DeferredOpen {
                tx,
                size,
                read_only,
            },
        )
    }

    /// The volume once open (waits at most the bound).
    pub async fn volume(&self) -> Result<Arc<Volume>, Error> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(
            self.wait,
            rx.wait_for(|s| !matches!(s, DeferredState::Pending)),
        )
        .await;
        match r {
            Ok(Ok(s)) => match &*s {
                DeferredState::Open(v) => Ok(v.clone()),
                _ => Err(Error::NotOpen("the deferred open failed")),
            },
            Ok(Err(_)) => Err(Error::NotOpen("the deferred open was abandoned")),
            Err(_) => Err(Error::NotOpen("the volume was not opened in time")),
        }
    }

    /// Whether the open was refused or abandoned.
    pub fn failed(&self) -> bool {
        matches!(&*self.state.borrow(), DeferredState::Failed)
    }

    /// The volume if it is open now.
    pub fn opened(&self) -> Option<Arc<Volume>> {
        match &*self.state.borrow() {
            DeferredState::Open(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// The handle that completes a [`Deferred`] open (dropping it fails the waiting requests).
#[derive(Debug)]
pub struct DeferredOpen {
    tx: tokio::sync::watch::Sender<DeferredState>,
    size: u64,
    read_only: bool,
}

impl DeferredOpen {
    /// The volume is open: requests proceed. Refused (and the export failed) unless it has
    /// the size and mode the handshake advertised (read from the unauthenticated header).
    pub fn open(self, vol: Arc<Volume>) -> Result<(), Error> {
        if vol.size() != self.size || vol.writable() == self.read_only {
            let _ = self.tx.send(DeferredState::Failed);
            return Err(Error::Config(
                "the opened volume does not match the export advertised before the open".into(),
            ));
        }
        let _ = self.tx.send(DeferredState::Open(vol));
        Ok(())
    }

    /// The open was refused: every waiting and later request fails.
    pub fn fail(self) {
        let _ = self.tx.send(DeferredState::Failed);
    }
}

/// What the NBD server serves: an encrypted volume, or (for benchmarks) the raw store.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The encrypted, integrity-protected volume.
    Encrypted(Arc<Volume>),
    /// The encrypted volume, opened later ([`Deferred`]).
    Deferred(Arc<Deferred>),
    /// Plaintext passthrough of a store (no protection; benchmark baseline only).
    Plain {
        /// The store.
        store: Store,
        /// Its size.
        size: u64,
        /// Buffers.
        pool: Arc<BufPool>,
        /// Zeroes for WRITE_ZEROES.
        zeros: Arc<Vec<u8>>,
    },
}

impl Backend {
    /// A plaintext passthrough backend.
    pub async fn plain(store: Store) -> Result<Self, Error> {
        let size = store.byte_len().await? / BSU * BSU;
        Ok(Backend::Plain {
            store,
            size,
            pool: Arc::new(BufPool::default()),
            zeros: Arc::new(vec![0u8; 1 << 20]),
        })
    }
    /// Export size.
    pub fn size(&self) -> u64 {
        match self {
            Backend::Encrypted(v) => v.size(),
            Backend::Deferred(d) => d.size,
            Backend::Plain { size, .. } => *size,
        }
    }
    /// Read-only?
    pub fn read_only(&self) -> bool {
        match self {
            Backend::Encrypted(v) => !v.writable(),
            Backend::Deferred(d) => d.read_only,
            Backend::Plain { .. } => false,
        }
    }
    /// Buffer pool.
    pub fn pool(&self) -> &Arc<BufPool> {
        match self {
            Backend::Encrypted(v) => v.pool(),
            Backend::Deferred(d) => &d.pool,
            Backend::Plain { pool, .. } => pool,
        }
    }
    /// Read.
    pub async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.read(offset, out).await,
            Backend::Deferred(d) => d.volume().await?.read(offset, out).await,
            Backend::Plain { store, .. } => store.read_at(offset, out).await,
        }
    }
    /// Write.
    pub async fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.write(offset, data, fua).await,
            Backend::Deferred(d) => d.volume().await?.write(offset, data, fua).await,
            Backend::Plain { store, .. } => {
                store.write_at(offset, data).await?;
                if fua { store.sync().await } else { Ok(()) }
            }
        }
    }
    /// Zero a range.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.zero(offset, len, fua).await,
            Backend::Deferred(d) => d.volume().await?.zero(offset, len, fua).await,
            Backend::Plain { store, zeros, .. } => {
                let mut o = offset;
                while o < offset + len {
                    let n = (offset + len - o).min(zeros.len() as u64);
                    store.write_at(o, &zeros[..n as usize]).await?;
                    o += n;
                }
                if fua { store.sync().await } else { Ok(()) }
            }
        }
    }
    /// Flush.
    pub async fn flush(&self) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.flush().await,
            Backend::Deferred(d) => d.volume().await?.flush().await,
            Backend::Plain { store, .. } => store.sync().await,
        }
    }
}
