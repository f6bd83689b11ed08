//! The encrypting block engine: maps virtual-disk reads and writes onto the volume
//! format's data blocks and metadata slots over a [`Store`], with the crash-consistent
//! update protocol of `docs/volume-format.md`:
//!
//! 1. a write picks, per block, a slot that holds neither the block's current version
//!    nor its last flushed version ([`caas_volume::entry::choose_target`]);
//! 2. it seals the block under a fresh nonce (reserved counter ‖ session salt), writes the
//!    metadata entries first and the ciphertext second, then records the new current slot;
//! 3. a read tries the slots newest first: after a crash between the two writes the
//!    previous version still authenticates;
//! 4. FLUSH syncs the store and only then marks the written slots as committed;
//! 5. opening a volume whose dirty flag is set runs recovery, which clears slots newer
//!    than the version actually on disk, so the invariant "newest slot = content" holds.
use crate::Error;
use crate::store::Store;
use caas_crypto::SecretKey;
use caas_volume::cipher::block_nonce;
use caas_volume::entry::{Entry, Slot, SlotKind, choose_target};
use caas_volume::header::{Dbsp, Header, KeySource, STATE_OFFSET, State};
use caas_volume::{
    BLOCK_SIZE, DataKeyProvider, ENTRY_SIZE, HEADER_SIZE, Layout, SLOT_SIZE, VolumeCipher,
};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BS: usize = BLOCK_SIZE;
const BSU: u64 = BLOCK_SIZE as u64;
/// Lock stripes (block index modulo this).
const STRIPES: usize = 1024;
/// Counters reserved per header update.
const RESERVE_STEP: u64 = 1 << 24;
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
    salt: u32,
    counter: AtomicU64,
    reserved: AtomicU64,
    reserve_lock: tokio::sync::Mutex<()>,
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
            .finish_non_exhaustive()
    }
}

async fn read_header(store: &Store) -> Result<(Header, State), Error> {
    let mut hb = vec![0u8; HEADER_SIZE];
    store.read_at(0, &mut hb).await?;
    Ok(Header::decode(&hb)?)
}

fn cipher_for(header: &Header, key: &KeyInput) -> Result<VolumeCipher, Error> {
    let k = match (key, &header.key_source) {
        (KeyInput::Raw(k), _) => (**k).clone(),
        (KeyInput::Provider(p), KeySource::Wrapped(blob)) => p.unwrap(blob)?,
        (KeyInput::Provider(_), KeySource::External) => {
            return Err(Error::Config(
                "volume uses an external key: pass --key-file".into(),
            ));
        }
    };
    let c = VolumeCipher::new(&k, header.volume_id)?;
    header.verify(&c)?;
    Ok(c)
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
    let volume_id: [u8; 16] =
        caas_crypto::random_array().map_err(|_| Error::Config("RNG failure".into()))?;
    let salt = u32::from_be_bytes(
        caas_crypto::random_array().map_err(|_| Error::Config("RNG failure".into()))?,
    );
    let cipher = VolumeCipher::new(&data_key, volume_id)?;
    let header = Header::new(&cipher, size, source, dbsp)?;
    let layout = header.layout;
    if store.byte_len().await? < layout.store_len() {
        return Err(Error::Config(format!(
            "ciphertext store holds {} bytes, the volume needs {}",
            store.byte_len().await?,
            layout.store_len()
        )));
    }
    let mut counter = 1u64;
    let mut b0 = 0u64;
    let mut meta = Vec::new();
    while b0 < layout.blocks {
        let n = CHUNK_BLOCKS.min(layout.blocks - b0);
        meta.clear();
        meta.resize(n as usize * ENTRY_SIZE, 0);
        for i in 0..n {
            let nonce = block_nonce(counter, salt);
            counter += 1;
            let slot = Slot {
                nonce,
                kind: SlotKind::Zero,
                tag: cipher.zero_tag(b0 + i, nonce)?,
            };
            let at = i as usize * ENTRY_SIZE;
            meta[at..at + SLOT_SIZE].copy_from_slice(&slot.encode());
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
    let state = State {
        dirty: false,
        nonce_reserved: counter,
    };
    store.write_at(0, &header.encode(&state)).await?;
    store.sync().await?;
    Ok(header)
}

impl Volume {
    /// Opens a volume. A writable open of a volume left dirty by a crash runs recovery
    /// first (returned as the report).
    pub async fn open(
        store: Store,
        key: &KeyInput,
        writable: bool,
    ) -> Result<(Arc<Self>, Option<ScanReport>), Error> {
        let (header, state) = read_header(&store).await?;
        let cipher = cipher_for(&header, key)?;
        let layout = header.layout;
        if store.byte_len().await? < layout.store_len() {
            return Err(Error::Config(
                "ciphertext store is shorter than the volume".into(),
            ));
        }
        let salt = u32::from_be_bytes(
            caas_crypto::random_array().map_err(|_| Error::Config("RNG failure".into()))?,
        );
        let blocks =
            usize::try_from(layout.blocks).map_err(|_| Error::Config("volume too large".into()))?;
        let vol = Arc::new(Volume {
            store,
            cipher,
            header,
            layout,
            writable,
            salt,
            counter: AtomicU64::new(state.nonce_reserved.max(1)),
            reserved: AtomicU64::new(state.nonce_reserved.max(1)),
            reserve_lock: tokio::sync::Mutex::new(()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            state: (0..blocks).map(|_| AtomicU8::new(0)).collect(),
            dirty: Mutex::new(Vec::new()),
            barrier: tokio::sync::RwLock::new(()),
            pool: Arc::new(BufPool::default()),
        });
        let mut report = None;
        if writable {
            if state.dirty {
                tracing::warn!(store = %vol.store.describe(), "volume was not closed cleanly: running recovery");
                let r = vol.scan(true).await?;
                tracing::warn!(torn = r.torn, bad = r.bad_count, "recovery finished");
                report = Some(r);
            }
            // Mark dirty and reserve the first counter range before any write.
            let start = vol.counter.load(Ordering::SeqCst);
            vol.write_state(State {
                dirty: true,
                nonce_reserved: start + RESERVE_STEP,
            })
            .await?;
            vol.reserved.store(start + RESERVE_STEP, Ordering::SeqCst);
            if layout.blocks * ENTRY_SIZE as u64 <= EAGER_STATE_MAX_META {
                vol.load_slot_state().await?;
            }
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

    async fn write_state(&self, st: State) -> Result<(), Error> {
        self.store
            .write_at(STATE_OFFSET as u64, &st.encode())
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
        let next = self.counter.load(Ordering::SeqCst);
        // Reserve past everything handed out so far (counters never go backwards).
        let reserved = self.reserved.load(Ordering::SeqCst).max(next);
        self.write_state(State {
            dirty: false,
            nonce_reserved: reserved,
        })
        .await
    }

    async fn alloc_counters(&self, n: u64) -> Result<u64, Error> {
        let first = self.counter.fetch_add(n, Ordering::SeqCst);
        let end = first
            .checked_add(n)
            .ok_or(caas_volume::Error::NonceExhausted)?;
        if end > self.reserved.load(Ordering::SeqCst) {
            let _g = self.reserve_lock.lock().await;
            while end > self.reserved.load(Ordering::SeqCst) {
                let new = self
                    .reserved
                    .load(Ordering::SeqCst)
                    .checked_add(RESERVE_STEP.max(n))
                    .ok_or(caas_volume::Error::NonceExhausted)?;
                self.write_state(State {
                    dirty: true,
                    nonce_reserved: new,
                })
                .await?;
                self.reserved.store(new, Ordering::SeqCst);
            }
        }
        Ok(first)
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
        let e = Entry::decode_slice(entry);
        let (idx, n) = e.candidates();
        for &k in &idx[..n] {
            let Some(slot) = e.slots[k] else { continue };
            match slot.kind {
                SlotKind::Data => {
                    if self
                        .cipher
                        .open_block(index, slot.nonce, &slot.tag, ct, out)
                        .is_ok()
                    {
                        return Some(k);
                    }
                }
                SlotKind::Zero => {
                    // Only creation writes "zeroes" slots, over a zero data area; any other
                    // ciphertext means damage or a later (interrupted) write.
                    if ct.iter().all(|&b| b == 0)
                        && self.cipher.verify_zero(index, slot.nonce, &slot.tag)
                    {
                        out.fill(0);
                        return Some(k);
                    }
                }
                SlotKind::Empty => {}
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
        let e = Entry::decode_slice(entry);
        let Some(slot) = e.newest().and_then(|k| e.slots[k]) else {
            return false;
        };
        match slot.kind {
            SlotKind::Data => self
                .cipher
                .open_block_in_place(index, slot.nonce, &slot.tag, buf)
                .is_ok(),
            SlotKind::Zero => {
                buf.iter().all(|&b| b == 0) && self.cipher.verify_zero(index, slot.nonce, &slot.tag)
            }
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

    /// Seals and writes whole blocks `b0..b0+n` from `data` (encrypted in place), or makes
    /// them read as zeroes when `data` is `None`. Caller holds the stripe locks and the
    /// shared barrier.
    /// Learns every block's current slot from the metadata area (one sequential read), so
    /// single-block writes need not read their entry first.
    async fn load_slot_state(&self) -> Result<(), Error> {
        let mut meta = Vec::new();
        let mut b0 = 0;
        while b0 < self.layout.blocks {
            let n = (CHUNK_BLOCKS * 8).min(self.layout.blocks - b0) as usize;
            meta.resize(n * ENTRY_SIZE, 0);
            self.store
                .read_at(self.layout.entry_offset(b0), &mut meta)
                .await?;
            for i in 0..n {
                let e = Entry::decode_slice(&meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE]);
                if let Some(k) = e.newest() {
                    let k = k as u8;
                    self.state[b0 as usize + i].store(KNOWN | k | (k << 2), Ordering::SeqCst);
                }
            }
            b0 += n as u64;
        }
        Ok(())
    }

    /// The fast path of a single-block write whose slot state is known: seal, write the
    /// target slot (32 bytes) and then the block, without reading the entry.
    async fn write_one_known(&self, index: u64, st: u8, buf: &mut [u8]) -> Result<(), Error> {
        let (cur, com) = ((st & 3) as usize, ((st >> 2) & 3) as usize);
        let target = (0..caas_volume::SLOTS)
            .find(|&t| t != cur && t != com)
            .unwrap_or(0);
        let first = self.alloc_counters(1).await?;
        let nonce = block_nonce(first, self.salt);
        let tag = self.cipher.seal_block(index, nonce, buf)?;
        let slot = Slot {
            nonce,
            kind: SlotKind::Data,
            tag,
        };
        let at = self.layout.entry_offset(index) + (target * SLOT_SIZE) as u64;
        self.store.write_at(at, &slot.encode()).await?;
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
            let first = self.alloc_counters(n).await?;
            let mut targets = Vec::with_capacity(n as usize);
            for i in 0..n as usize {
                let index = b0 + i as u64;
                let em = &mut meta[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
                let e = Entry::decode_slice(em);
                let st = self.state[index as usize].load(Ordering::SeqCst);
                let (cur, com) = if st & KNOWN != 0 {
                    (Some((st & 3) as usize), Some(((st >> 2) & 3) as usize))
                } else {
                    (e.newest(), e.newest())
                };
                let target = choose_target(&e, cur, com);
                let nonce = block_nonce(first + i as u64, self.salt);
                let tag = self
                    .cipher
                    .seal_block(index, nonce, &mut buf[i * BS..(i + 1) * BS])?;
                let slot = Slot {
                    nonce,
                    kind: SlotKind::Data,
                    tag,
                };
                em[target * SLOT_SIZE..(target + 1) * SLOT_SIZE].copy_from_slice(&slot.encode());
                // Malformed slots (damage) are reset so the rewritten block is readable.
                for (j, old) in e.slots.iter().enumerate() {
                    if old.is_none() && j != target {
                        em[j * SLOT_SIZE..(j + 1) * SLOT_SIZE].fill(0);
                    }
                }
                // Reserved bytes are always zero; rewriting them heals a damaged entry.
                em[caas_volume::SLOTS * SLOT_SIZE..].fill(0);
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
                        let e = Entry::decode_slice(em);
                        if e.newest() != Some(k) {
                            rep.torn += 1;
                            let good = e.slots[k].map_or(0, |s| s.counter());
                            for j in 0..caas_volume::SLOTS {
                                let newer = e.slots[j].is_none_or(|s| s.counter() > good);
                                if repair && j != k && newer {
                                    em[j * SLOT_SIZE..(j + 1) * SLOT_SIZE].fill(0);
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

/// What the NBD server serves: an encrypted volume, or (for benchmarks) the raw store.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The encrypted, integrity-protected volume.
    Encrypted(Arc<Volume>),
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
            Backend::Plain { size, .. } => *size,
        }
    }
    /// Read-only?
    pub fn read_only(&self) -> bool {
        match self {
            Backend::Encrypted(v) => !v.writable(),
            Backend::Plain { .. } => false,
        }
    }
    /// Buffer pool.
    pub fn pool(&self) -> &Arc<BufPool> {
        match self {
            Backend::Encrypted(v) => v.pool(),
            Backend::Plain { pool, .. } => pool,
        }
    }
    /// Read.
    pub async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.read(offset, out).await,
            Backend::Plain { store, .. } => store.read_at(offset, out).await,
        }
    }
    /// Write.
    pub async fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), Error> {
        match self {
            Backend::Encrypted(v) => v.write(offset, data, fua).await,
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
            Backend::Plain { store, .. } => store.sync().await,
        }
    }
}
