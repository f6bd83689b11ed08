//! The saved-state object of an encrypted suspend (seed 001 §3.4 "Suspension and
//! migration"; `docs/suspend-migrate.md`): one file in untrusted storage holding a VM's
//! qemu migration stream and its crypto domain's state, encrypted and integrity-protected
//! under a fresh state key `K_s` that only the TTP can release (to a host attested in the
//! workload's profile, for the latest suspend counter).
//!
//! Format (online authenticated encryption, the STREAM construction of Hoang, Reyhanitabar,
//! Rogaway and Vizár, as in age):
//!
//! ```text
//! magic "caasST01" (8) ‖ header length u32 BE ‖ header (JSON, ≤ 4 KiB)
//! chunk*: length u32 BE ‖ AES-256-GCM(K_c, nonce = 0^4 ‖ index u64 BE,
//!                                      aad = SHA-256(magic ‖ header) ‖ index u64 BE ‖ final u8,
//!                                      plaintext ≤ chunk_size)
//! K_c = SP 800-108 KDF(K_s, "caas-state chunks v1", SHA-256(magic ‖ header))
//! ```
//!
//! The header ([`StateHeader`]: vm id, owner H2, suspend counter, a random stream id, the
//! chunk size) is authenticated by every chunk; every chunk is bound to its index; exactly
//! one chunk, the last, carries the final flag. So an edited byte anywhere, a reordered,
//! dropped or duplicated chunk, a cut stream (no final chunk) and bytes after the final
//! chunk are all refused ([`StateError`]). The chunk key depends on the whole header
//! (including the fresh stream id), so no (key, nonce) pair ever repeats.
//!
//! The plaintext is `domain-state length u32 BE ‖ domain state ‖ qemu migration stream`.
//! [`StateReader`] releases plaintext chunk by chunk, each authenticated, but the stream is
//! complete only when [`StateReader::finished`] says so: the resume path feeds qemu an
//! authentic prefix and continues the VM only after the final chunk verified.
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use caas_crypto::SecretKey;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use zeroize::Zeroizing;

/// The format's magic and version.
pub const MAGIC: &[u8; 8] = b"caasST01";
/// Longest header accepted.
pub const MAX_HEADER: usize = 4096;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
/// Largest chunk size a header may declare.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Longest crypto-domain state section accepted.
pub const MAX_DOMAIN_STATE: usize = 16 << 20;
const TAG: usize = 16;
const KDF_LABEL: &[u8] = b"caas-state chunks v1";

/// Why a saved state was refused. No variant carries plaintext or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the object failed.
    #[error("saved state: {context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a saved state of this version, or a malformed header.
    #[error("saved state: bad header: {0}")]
    Header(String),
    /// A chunk does not authenticate (edited, reordered, another key or header).
    #[error("saved state: chunk {0} failed authentication")]
    Tampered(u64),
    /// The stream ends before its final chunk.
    #[error("saved state: truncated (no final chunk after chunk {0})")]
    Truncated(u64),
    /// Bytes follow the final chunk.
    #[error("saved state: data after the final chunk")]
    Extended,
    /// A chunk length outside the header's bounds.
    #[error("saved state: bad chunk length {0}")]
    ChunkLength(u32),
    /// The crypto-domain state section is malformed.
    #[error("saved state: bad crypto-domain section: {0}")]
    Section(String),
    /// The key or the RNG failed.
    #[error("saved state: crypto failure")]
    Crypto,
}

impl StateError {
    fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { context, source }
    }
}

/// The clear, authenticated header of a saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateHeader {
    /// The workload.
    pub vm_id: String,
    /// The owner's H2 (hex SHA-256 of pk_DM).
    pub h2: String,
    /// The TTP's suspend counter this state was saved under (replays of older states are
    /// refused by the TTP, which releases K_s only for the latest).
    pub counter: u64,
    /// 32 random bytes (hex): no two streams share a chunk key.
    pub stream_id: String,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
}

impl StateHeader {
    /// A header with a fresh stream id and the default chunk size.
    pub fn new(vm_id: &str, h2: &str, counter: u64) -> Result<Self, StateError> {
        let id: [u8; 32] = caas_crypto::random_array().map_err(|_| StateError::Crypto)?;
        Ok(Self {
            vm_id: vm_id.to_string(),
            h2: h2.to_string(),
            counter,
            stream_id: hex::encode(id),
            chunk_size: DEFAULT_CHUNK,
        })
    }

    fn validate(&self) -> Result<(), StateError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK {
            return Err(StateError::Header(format!(
                "chunk size {} out of range",
                self.chunk_size
            )));
        }
        if self.stream_id.len() != 64 || hex::decode(&self.stream_id).is_err() {
            return Err(StateError::Header("stream id".into()));
        }
        if self.vm_id.is_empty() || self.vm_id.len() > 128 || self.h2.len() > 128 {
            return Err(StateError::Header("vm id or owner".into()));
        }
        Ok(())
    }
}

/// Chunk key and header hash of one stream.
struct Keys {
    key: LessSafeKey,
    header_hash: [u8; 32],
}

impl Keys {
    fn new(k_s: &SecretKey, prefix: &[u8]) -> Result<Self, StateError> {
        let header_hash: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, prefix)
            .as_ref()
            .try_into()
            .map_err(|_| StateError::Crypto)?;
        let k_c = caas_crypto::kdf::derive_key(k_s.expose(), KDF_LABEL, &header_hash)
            .map_err(|_| StateError::Crypto)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, k_c.expose()).map_err(|_| StateError::Crypto)?,
        );
        Ok(Self { key, header_hash })
    }

    fn nonce(index: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&index.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn aad(&self, index: u64, last: bool) -> [u8; 41] {
        let mut a = [0u8; 41];
        a[..32].copy_from_slice(&self.header_hash);
        a[32..40].copy_from_slice(&index.to_be_bytes());
        a[40] = u8::from(last);
        a
    }
}

/// The header's bytes as written: magic ‖ length ‖ JSON.
fn header_prefix(h: &StateHeader) -> Result<Vec<u8>, StateError> {
    h.validate()?;
    let json = serde_json::to_vec(h).map_err(|e| StateError::Header(e.to_string()))?;
    let mut p = Vec::with_capacity(12 + json.len());
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(
        &u32::try_from(json.len())
            .map_err(|_| StateError::Header("too long".into()))?
            .to_be_bytes(),
    );
    p.extend_from_slice(&json);
    Ok(p)
}

/// Writes a saved state: [`StateWriter::new`] writes the header, [`Write`] takes the
/// plaintext, [`StateWriter::finish`] writes the final chunk. Dropped without `finish`,
/// the object has no final chunk and is refused as truncated.
pub struct StateWriter<W: Write> {
    out: W,
    keys: Keys,
    buf: Zeroizing<Vec<u8>>,
    used: usize,
    chunk: usize,
    index: u64,
    written: u64,
}

impl<W: Write> std::fmt::Debug for StateWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StateWriter<W> {
    /// Writes the header to `out`; chunks are sealed under a key derived from `k_s` and it.
    pub fn new(mut out: W, k_s: &SecretKey, header: &StateHeader) -> Result<Self, StateError> {
        let prefix = header_prefix(header)?;
        out.write_all(&prefix)
            .map_err(StateError::io("write the header"))?;
        let chunk = header.chunk_size as usize;
        Ok(Self {
            out,
            keys: Keys::new(k_s, &prefix)?,
            buf: Zeroizing::new(vec![0u8; chunk + TAG]),
            used: 0,
            chunk,
            index: 0,
            written: prefix.len() as u64,
        })
    }

    fn seal(&mut self, last: bool) -> Result<(), StateError> {
        let n = self.used;
        let aad = self.keys.aad(self.index, last);
        // The buffer is zeroized on drop; sealing happens in place (the plaintext is
        // overwritten by its ciphertext).
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(Keys::nonce(self.index), Aad::from(aad), &mut self.buf[..n])
            .map_err(|_| StateError::Crypto)?;
        self.buf[n..n + TAG].copy_from_slice(tag.as_ref());
        let len = u32::try_from(n + TAG).map_err(|_| StateError::Crypto)?;
        let r = self
            .out
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.out.write_all(&self.buf[..n + TAG]));
        r.map_err(StateError::io("write a chunk"))?;
        self.written += 4 + (n + TAG) as u64;
        self.used = 0;
        self.index += 1;
        Ok(())
    }

    /// Writes the last chunk (with the final flag) and returns the sink and the object's
    /// size in bytes.
    pub fn finish(mut self) -> Result<(W, u64), StateError> {
        self.seal(true)?;
        self.out.flush().map_err(StateError::io("flush"))?;
        Ok((self.out, self.written))
    }

    /// Writes the crypto-domain section (`length ‖ bytes`); call it first, once.
    pub fn write_domain_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.len() > MAX_DOMAIN_STATE {
            return Err(StateError::Section("too large".into()));
        }
        let len = u32::try_from(state.len()).map_err(|_| StateError::Section("len".into()))?;
        self.write_all(&len.to_be_bytes())
            .and_then(|()| self.write_all(state))
            .map_err(StateError::io("write the crypto-domain section"))
    }
}

impl<W: Write> Write for StateWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < data.len() {
            if self.used == self.chunk {
                self.seal(false).map_err(std::io::Error::other)?;
            }
            let n = (self.chunk - self.used).min(data.len() - done);
            self.buf[self.used..self.used + n].copy_from_slice(&data[done..done + n]);
            self.used += n;
            done += n;
        }
        Ok(done)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads the header of a saved state without any key (to ask the TTP for K_s by vm id and
/// counter). Bounded: at most [`MAX_HEADER`] bytes are read.
pub fn read_header(r: &mut impl Read) -> Result<(StateHeader, Vec<u8>), StateError> {
    let mut fixed = [0u8; 12];
    r.read_exact(&mut fixed)
        .map_err(|_| StateError::Header("shorter than its header".into()))?;
    if &fixed[..8] != MAGIC {
        return Err(StateError::Header("not a caas saved state (v1)".into()));
    }
    let len = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize;
    if len > MAX_HEADER {
        return Err(StateError::Header(format!("header of {len} bytes")));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json)
        .map_err(|_| StateError::Header("shorter than its header".into()))?;
    let h: StateHeader =
        serde_json::from_slice(&json).map_err(|e| StateError::Header(e.to_string()))?;
    h.validate()?;
    let mut prefix = fixed.to_vec();
    prefix.extend_from_slice(&json);
    Ok((h, prefix))
}

/// Reads a saved state: every chunk authenticated before its plaintext is released
/// ([`Read`]); an error for every form of tampering ([`StateError`], as the
/// [`std::io::Error`]'s inner error).
pub struct StateReader<R: Read> {
    input: R,
    header: StateHeader,
    keys: Keys,
    plain: Zeroizing<Vec<u8>>,
    pos: usize,
    index: u64,
    finished: bool,
}

impl<R: Read> std::fmt::Debug for StateReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("header", &self.header)
            .field("index", &self.index)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<R: Read> StateReader<R> {
    /// Continues after [`read_header`] with K_s.
    pub fn new(
        input: R,
        header: StateHeader,
        prefix: &[u8],
        k_s: &SecretKey,
    ) -> Result<Self, StateError> {
        Ok(Self {
            input,
            keys: Keys::new(k_s, prefix)?,
            header,
            plain: Zeroizing::new(Vec::new()),
            pos: 0,
            index: 0,
            finished: false,
        })
    }

    /// The authenticated header (authenticated once the first chunk has been read).
    #[must_use]
    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// True once the final chunk verified and nothing follows it: only then is the state
    /// complete.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.finished && self.pos == self.plain.len()
    }

    /// Reads and authenticates the next chunk. `Ok(false)` at the verified end.
    fn next_chunk(&mut self) -> Result<bool, StateError> {
        if self.finished {
            return Ok(false);
        }
        let mut len = [0u8; 4];
        if !read_full(&mut self.input, &mut len).map_err(StateError::io("read a chunk"))? {
            return Err(StateError::Truncated(self.index));
        }
        let len = u32::from_be_bytes(len);
        if (len as usize) < TAG || len > self.header.chunk_size + TAG as u32 {
            return Err(StateError::ChunkLength(len));
        }
        let mut data = Zeroizing::new(vec![0u8; len as usize]);
        if !read_full(&mut self.input, &mut data).map_err(StateError::io("read a chunk"))? {
            return Err(StateError::Truncated(self.index));
        }
        // The final flag is not in the clear: try the common case first.
        let mut last = false;
        let mut plain = None;
        for flag in [false, true] {
            let mut d = data.clone();
            if let Ok(p) = self.keys.key.open_in_place(
                Keys::nonce(self.index),
                Aad::from(self.keys.aad(self.index, flag)),
                &mut d[..],
            ) {
                let n = p.len();
                d.truncate(n);
                plain = Some(d);
                last = flag;
                break;
            }
        }
        let Some(p) = plain else {
            return Err(StateError::Tampered(self.index));
        };
        self.plain = p;
        self.pos = 0;
        self.index += 1;
        if last {
            self.finished = true;
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra).map_err(StateError::io("read the end"))? {
                self.plain = Zeroizing::new(Vec::new());
                return Err(StateError::Extended);
            }
        }
        Ok(true)
    }

    /// Reads the crypto-domain section (the first thing in the plaintext).
    pub fn read_domain_state(&mut self) -> Result<caas_crypto::SecretBytes, StateError> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len).map_err(unwrap_state)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_DOMAIN_STATE {
            return Err(StateError::Section(format!("{len} bytes")));
        }
        let mut s = vec![0u8; len];
        self.read_exact(&mut s).map_err(unwrap_state)?;
        Ok(caas_crypto::SecretBytes::new(s))
    }
}

/// The [`StateError`] inside an IO error from [`StateReader`]'s `Read`.
#[must_use]
pub fn unwrap_state(e: std::io::Error) -> StateError {
    match e.get_ref().and_then(|i| i.downcast_ref::<StateError>()) {
        Some(_) => match e.into_inner().map(|i| i.downcast::<StateError>()) {
            Some(Ok(s)) => *s,
            _ => StateError::Crypto,
        },
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            StateError::Section("the plaintext ends inside the crypto-domain section".into())
        }
        None => StateError::Io {
            context: "read",
            source: e,
        },
    }
}

/// Fills `buf`; `Ok(false)` on EOF before the first byte, an error on EOF inside.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cut inside a chunk",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> Read for StateReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.plain.len() {
            match self.next_chunk() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                // A chunk cut in the middle is a truncation too.
                Err(StateError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    return Err(std::io::Error::other(StateError::Truncated(self.index)));
                }
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    fn header() -> StateHeader {
        let mut h = StateHeader::new("vm1", &"ab".repeat(32), 7).unwrap_or_else(|e| panic!("{e}"));
        h.chunk_size = 1000;
        h
    }

    fn seal(h: &StateHeader, domain: &[u8], body: &[u8]) -> Vec<u8> {
        let mut w = StateWriter::new(Vec::new(), &key(1), h).unwrap_or_else(|e| panic!("{e}"));
        w.write_domain_state(domain)
            .unwrap_or_else(|e| panic!("{e}"));
        w.write_all(body).unwrap_or_else(|e| panic!("{e}"));
        let (out, n) = w.finish().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n as usize, out.len());
        out
    }

    fn open(obj: &[u8], k: &SecretKey) -> Result<(Vec<u8>, Vec<u8>), StateError> {
        let mut r = obj;
        let (h, prefix) = read_header(&mut r)?;
        let mut s = StateReader::new(r, h, &prefix, k)?;
        let d = s.read_domain_state()?.expose().to_vec();
        let mut body = Vec::new();
        s.read_to_end(&mut body).map_err(unwrap_state)?;
        assert!(s.finished());
        Ok((d, body))
    }

    fn body() -> Vec<u8> {
        (0..5000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn round_trip() {
        let h = header();
        let obj = seal(&h, b"domain", &body());
        let (d, b) = open(&obj, &key(1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d, b"domain");
        assert_eq!(b, body());
        // Nothing of the plaintext is in the object.
        assert!(!obj.windows(16).any(|w| body().windows(16).any(|x| x == w)));
        // Empty body: one (final) chunk.
        let obj = seal(&h, b"", b"");
        assert_eq!(open(&obj, &key(1)).unwrap_or_else(|e| panic!("{e}")).1, b"");
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let obj = seal(&header(), b"domain", &body());
        for i in (0..obj.len()).step_by(7) {
            let mut bad = obj.clone();
            bad[i] ^= 0x01;
            assert!(open(&bad, &key(1)).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn wrong_key_is_refused() {
        let obj = seal(&header(), b"domain", &body());
        assert!(matches!(open(&obj, &key(2)), Err(StateError::Tampered(0))));
    }

    #[test]
    fn truncation_is_refused_at_every_chunk_boundary_and_inside() {
        let obj = seal(&header(), b"domain", &body());
        // Chunk boundaries: 12 + header, then 4 + 1016 per full chunk.
        let mut r = &obj[..];
        let (_, prefix) = read_header(&mut r).unwrap_or_else(|e| panic!("{e}"));
        let mut cut = prefix.len();
        let mut boundaries = vec![cut];
        while cut < obj.len() {
            let len = u32::from_be_bytes(obj[cut..cut + 4].try_into().unwrap_or([0; 4])) as usize;
            cut += 4 + len;
            boundaries.push(cut);
        }
        assert_eq!(*boundaries.last().unwrap_or(&0), obj.len());
        for &b in &boundaries[..boundaries.len() - 1] {
            let e = open(&obj[..b], &key(1));
            assert!(
                matches!(e, Err(StateError::Truncated(_))),
                "cut at {b}: {e:?}"
            );
        }
        for b in [obj.len() - 1, obj.len() - 17, prefix.len() + 2] {
            assert!(open(&obj[..b], &key(1)).is_err(), "cut at {b}");
        }
    }

    #[test]
    fn reordered_dropped_and_appended_chunks_are_refused() {
        let obj = seal(&header(), b"domain", &body());
        let mut r = &obj[..];
        let (_, prefix) = read_header(&mut r).unwrap_or_else(|e| panic!("{e}"));
        let mut chunks = Vec::new();
        let mut at = prefix.len();
        while at < obj.len() {
            let len = u32::from_be_bytes(obj[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
            chunks.push(obj[at..at + 4 + len].to_vec());
            at += 4 + len;
        }
        assert!(chunks.len() >= 4);
        let build = |cs: &[Vec<u8>]| {
            let mut o = prefix.clone();
            for c in cs {
                o.extend_from_slice(c);
            }
            o
        };
        let mut swapped = chunks.clone();
        swapped.swap(1, 2);
        assert!(matches!(
            open(&build(&swapped), &key(1)),
            Err(StateError::Tampered(1))
        ));
        let mut dropped = chunks.clone();
        dropped.remove(1);
        assert!(matches!(
            open(&build(&dropped), &key(1)),
            Err(StateError::Tampered(1))
        ));
        let mut appended = chunks.clone();
        appended.push(chunks[0].clone());
        assert!(matches!(
            open(&build(&appended), &key(1)),
            Err(StateError::Extended)
        ));
        let mut extra = obj.clone();
        extra.push(0);
        assert!(matches!(open(&extra, &key(1)), Err(StateError::Extended)));
    }

    /// The header is authenticated: another vm id or an older counter under the same key
    /// does not open (a state cannot be re-labelled as another VM's or a newer one).
    #[test]
    fn header_is_authenticated() {
        let h = header();
        let obj = seal(&h, b"domain", &body());
        let mut r = &obj[..];
        let (_, prefix) = read_header(&mut r).unwrap_or_else(|e| panic!("{e}"));
        let rest = &obj[prefix.len()..];
        for edit in [
            StateHeader {
                counter: 8,
                ..h.clone()
            },
            StateHeader {
                vm_id: "vm2".into(),
                ..h.clone()
            },
        ] {
            let mut o = header_prefix(&edit).unwrap_or_else(|e| panic!("{e}"));
            o.extend_from_slice(rest);
            assert!(matches!(open(&o, &key(1)), Err(StateError::Tampered(0))));
        }
    }

    #[test]
    fn hostile_headers_are_bounded_errors() {
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&(u32::MAX).to_be_bytes());
        assert!(matches!(
            read_header(&mut &big[..]),
            Err(StateError::Header(_))
        ));
        assert!(matches!(
            read_header(&mut &b"caasST02xxxx"[..]),
            Err(StateError::Header(_))
        ));
        assert!(matches!(
            read_header(&mut &b"ca"[..]),
            Err(StateError::Header(_))
        ));
        let mut h = header();
        h.chunk_size = MAX_CHUNK + 1;
        assert!(header_prefix(&h).is_err());
        // A chunk length beyond the header's chunk size is refused before allocating it.
        let obj = seal(&header(), b"d", b"x");
        let mut r = &obj[..];
        let (_, prefix) = read_header(&mut r).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = obj.clone();
        bad[prefix.len()..prefix.len() + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            open(&bad, &key(1)),
            Err(StateError::ChunkLength(_))
        ));
        // A domain section longer than the bound.
        let mut w =
            StateWriter::new(Vec::new(), &key(1), &header()).unwrap_or_else(|e| panic!("{e}"));
        w.write_all(&u32::MAX.to_be_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let (o, _) = w.finish().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(open(&o, &key(1)), Err(StateError::Section(_))));
    }

    /// A writer dropped without `finish` (a suspend that failed half-way) leaves an object
    /// that is refused.
    #[test]
    fn unfinished_object_is_refused() {
        let mut out = Vec::new();
        {
            let mut w =
                StateWriter::new(&mut out, &key(1), &header()).unwrap_or_else(|e| panic!("{e}"));
            w.write_domain_state(b"d").unwrap_or_else(|e| panic!("{e}"));
            w.write_all(&body()).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(matches!(open(&out, &key(1)), Err(StateError::Truncated(_))));
    }
}
