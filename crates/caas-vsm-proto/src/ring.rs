//! Shared-memory transport for a UNIX-socket connection: the same frames as on the socket,
//! carried by two byte rings in a memfd the crypto domain creates and passes to the module
//! over the socket (SCM_RIGHTS, answering [`crate::Request::RingOpen`]). The socket stays
//! open for the connection's life: its hang-up ends the connection, and the module falls
//! back to the plain socket when the domain offers no ring.
//!
//! Layout ([`MAP_BYTES`]): a header page of control words, each on its own cache line, then
//! the request ring (module → domain) and the answer ring (domain → module), [`RING_BYTES`]
//! each. Each ring has a producer index (`head`, bytes written so far, wrapping `u32`)
//! written only by its producer and a consumer index (`tail`) written only by its consumer;
//! a side announces that it is about to sleep (`*_SLEEPING`), so the other side wakes it
//! (`FUTEX_WAKE` on the producer index, a shared futex) only then. A side that is busy or
//! polls pays no system call per frame. For the module's many calling threads the domain
//! also publishes a count of complete answers and bumps one of [`WAKE_WORDS`] wake words
//! per answer (position modulo 32), waking it when a caller announced it sleeps there
//! ([`Tx::answered`], [`Answers`]): each caller then sleeps once per call and is woken by the
//! domain directly, instead of a reading thread waking the others.
//!
//! **The other side is not trusted** (the domain's position: the module runs in a possibly
//! compromised workload that can write any word of the mapping at any time):
//! - every index read from the mapping is bounded: a producer index more than
//!   [`RING_BYTES`] ahead of the consumer's own (private) tail, or a consumer index that
//!   claims more than was ever written, is a [`Violation`], and the connection ends;
//! - a side never reads back its own indices from the mapping (the peer may have rewritten
//!   them): it keeps them privately and only publishes them;
//! - bytes are copied out of the mapping once, into private memory, before anything parses
//!   them (no double fetch: a peer rewriting a frame after publishing it changes at most
//!   which bytes the single copy saw, and that copy is what is decoded and checked);
//!   no reference to shared memory is ever formed, only raw-pointer copies;
//! - every offset is reduced modulo the ring size (a power of two) before use; the wake
//!   words are only bumped by the domain and their sleeping bit read (a module writing them
//!   changes at most whom the domain wakes);
//! - the memfd is sealed against shrinking and growing before it is handed out
//!   (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), so a peer cannot truncate it under the
//!   domain's mapping (which would fault the domain with SIGBUS);
//! - only the frames of this connection ever enter its mapping: each connection gets a new
//!   memfd, never shared with another connection or session.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// Bytes per ring (a power of two).
pub const RING_BYTES: usize = 256 * 1024;
/// The header page.
const HDR: usize = 4096;
/// Size of the shared mapping.
pub const MAP_BYTES: usize = HDR + 2 * RING_BYTES;

const MAGIC: usize = 0;
const REQ_HEAD: usize = 64;
const REQ_TAIL: usize = 128;
const RESP_HEAD: usize = 192;
const RESP_TAIL: usize = 256;
const DOMAIN_SLEEPING: usize = 320;
const CLIENT_SLEEPING: usize = 384;
const ANSWERS: usize = 448;
const WAKE: usize = 512;
/// Wake words: a module caller waiting for the answer at position `n` sleeps on word
/// `n % WAKE_WORDS`, which the domain bumps (and wakes, when the sleeping bit is set) once
/// that answer is published.
pub const WAKE_WORDS: u32 = 32;
const REQ_DATA: usize = HDR;
const RESP_DATA: usize = HDR + RING_BYTES;
/// "CRNG" version 1.
const MAGIC_V1: u32 = 0x4352_4e01;

/// The peer broke the ring's rules (the domain audits it and ends the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shared-memory ring violation: {0}")]
pub struct Violation(pub &'static str);

/// A shared mapping of the ring memfd (unmapped on drop).
#[derive(Debug)]
pub struct Map {
    ptr: NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics or raw
// copies, never through references to its bytes.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `ptr` is the start of a MAP_BYTES mapping this value owns.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), MAP_BYTES) };
    }
}

impl Map {
    fn new(fd: &OwnedFd) -> io::Result<Self> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        let len = std::num::NonZeroUsize::new(MAP_BYTES).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a memfd of MAP_BYTES bytes (checked or set by
        // the caller); nothing else in this process aliases it.
        let p = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Self { ptr: p.cast() })
    }

    /// The control word at `off` (a multiple of 64 below [`HDR`]).
    fn word(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off < HDR && off.is_multiple_of(64));
        // SAFETY: `off` is inside the header page and 4-aligned (page-aligned mapping); an
        // AtomicU32 has the layout of a u32 and the word is only ever accessed atomically.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// Copies `dst.len()` (≤ RING_BYTES) bytes of the ring at `region` starting at index
    /// `pos` (reduced modulo the ring) into private memory.
    fn copy_out(&self, region: usize, pos: u32, dst: &mut [u8]) {
        let n = dst.len().min(RING_BYTES);
        let off = pos as usize & (RING_BYTES - 1);
        let first = n.min(RING_BYTES - off);
        // SAFETY: both ranges lie inside the ring (`off + first <= RING_BYTES`,
        // `n - first <= off`) and `dst` is private memory; the peer may write the source
        // concurrently, which can change the bytes copied but never their bounds.
        unsafe {
            let base = self.ptr.as_ptr().add(region);
            std::ptr::copy_nonoverlapping(base.add(off), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(base, dst.as_mut_ptr().add(first), n - first);
        }
    }

    /// Copies `src` (≤ RING_BYTES bytes) into the ring at `region` at index `pos`.
    fn copy_in(&self, region: usize, pos: u32, src: &[u8]) {
        let n = src.len().min(RING_BYTES);
        let off = pos as usize & (RING_BYTES - 1);
        let first = n.min(RING_BYTES - off);
        // SAFETY: as in `copy_out`, with the ring as destination.
        unsafe {
            let base = self.ptr.as_ptr().add(region);
            std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), base, n - first);
        }
    }

    /// The wake word of answer position `ord`.
    fn wake_word(&self, ord: u32) -> &AtomicU32 {
        self.word(WAKE + (ord % WAKE_WORDS) as usize * 64)
    }

    /// Test hook: the raw control words (for attack tests playing a hostile peer).
    #[doc(hidden)]
    #[must_use]
    pub fn raw_word(&self, which: RawWord) -> &AtomicU32 {
        self.word(match which {
            RawWord::ReqHead => REQ_HEAD,
            RawWord::ReqTail => REQ_TAIL,
            RawWord::RespHead => RESP_HEAD,
            RawWord::RespTail => RESP_TAIL,
            RawWord::DomainSleeping => DOMAIN_SLEEPING,
            RawWord::ClientSleeping => CLIENT_SLEEPING,
        })
    }

    /// Test hook: any control word of the header page (`off` a multiple of 64 below 4096).
    #[doc(hidden)]
    #[must_use]
    pub fn raw_header_word(&self, off: usize) -> &AtomicU32 {
        self.word(off.min(HDR - 64) / 64 * 64)
    }

    /// Test hook: writes `src` into the request ring at `pos` (a hostile module rewriting
    /// a frame it already published).
    #[doc(hidden)]
    pub fn raw_write_request(&self, pos: u32, src: &[u8]) {
        self.copy_in(REQ_DATA, pos, src);
    }

    /// Test hook: copies the whole mapping out (to check what a module can see).
    #[doc(hidden)]
    #[must_use]
    pub fn raw_snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MAP_BYTES];
        // SAFETY: the whole mapping, into private memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), v.as_mut_ptr(), MAP_BYTES) };
        v
    }
}

/// The control words, for tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum RawWord {
    ReqHead,
    ReqTail,
    RespHead,
    RespTail,
    DomainSleeping,
    ClientSleeping,
}

/// Creates a sealed ring memfd and maps it (the domain's side).
///
/// # Errors
/// The system calls' errors.
pub fn create() -> io::Result<(OwnedFd, Map)> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(
        c"caas-vsm-ring",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)?;
    nix::unistd::ftruncate(&fd, MAP_BYTES as i64).map_err(io::Error::from)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(io::Error::from)?;
    let m = Map::new(&fd)?;
    m.word(MAGIC).store(MAGIC_V1, Ordering::Release);
    Ok((fd, m))
}

/// Maps a ring memfd received from the domain (the module's side), after checking its size,
/// seals and magic.
///
/// # Errors
/// `InvalidData` when the memfd is not a ring.
pub fn attach(fd: &OwnedFd) -> io::Result<Map> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(io::Error::from)?;
    let need = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
    if usize::try_from(st.st_size).ok() != Some(MAP_BYTES)
        || !SealFlag::from_bits_truncate(seals).contains(need)
    {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let m = Map::new(fd)?;
    if m.word(MAGIC).load(Ordering::Acquire) != MAGIC_V1 {
        return Err(io::ErrorKind::InvalidData.into());
    }
    Ok(m)
}

/// Which end of the connection a ring endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The crypto domain: consumes requests, produces answers.
    Domain,
    /// The module: produces requests, consumes answers.
    Client,
}

/// Sleeps while `w` (a word of memory shared between processes) holds `expected`, for at
/// most `timeout`; returns at once if it holds something else. Also used by the VSM
/// benchmark's reference signer (`caas-domc/examples/sigceiling.rs`).
pub fn futex_wait(w: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT (shared: the word lives in a mapping shared between processes) on
    // a valid, aligned u32 with a valid timeout; it only blocks.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
        );
    }
}

/// Wakes every thread sleeping in [`futex_wait`] on `w`.
pub fn futex_wake(w: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Whether the socket that carries the connection hung up (or, in ring mode, carries
/// anything at all: after the ring is open nothing more may arrive on it).
fn socket_done(s: &impl AsFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    !matches!(
        poll(&mut fds, PollTimeout::ZERO),
        Ok(0) | Err(nix::errno::Errno::EINTR)
    )
}

/// Polls `ready` (no system call but a `sched_yield` every 64 tries) for at most `budget`;
/// returns whether it turned true.
fn spin_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        if ready() {
            return true;
        }
        i += 1;
        if i.is_multiple_of(64) {
            if start.elapsed() >= budget {
                return false;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Why a wait ended without data.
#[derive(Debug)]
pub enum WaitEnd {
    /// The peer broke the rules.
    Violation(Violation),
    /// The socket hung up (or carried data: in ring mode that ends the connection too).
    Closed,
    /// The deadline passed.
    TimedOut,
}

impl From<WaitEnd> for io::Error {
    fn from(e: WaitEnd) -> Self {
        match e {
            WaitEnd::Violation(v) => io::Error::new(io::ErrorKind::InvalidData, v),
            WaitEnd::Closed => io::ErrorKind::UnexpectedEof.into(),
            WaitEnd::TimedOut => io::ErrorKind::TimedOut.into(),
        }
    }
}

/// The receiving end of one ring (requests for the domain, answers for the module).
#[derive(Debug)]
pub struct Rx<S: AsFd> {
    map: std::sync::Arc<Map>,
    /// Private consumer index (never read back from the mapping).
    tail: u32,
    head: usize,
    tail_word: usize,
    data: usize,
    sleeping: usize,
    /// The connection's socket (hang-up detection).
    sock: S,
    /// How long a read may wait for data (`None`: until the socket hangs up).
    timeout: Option<Duration>,
    /// The first violation seen (sticky).
    pub violation: Option<Violation>,
}

/// The sending end of one ring.
#[derive(Debug)]
pub struct Tx<S: AsFd> {
    map: std::sync::Arc<Map>,
    /// Private producer index.
    head: u32,
    /// The highest consumer index seen (a consumer index never goes back).
    seen_tail: u32,
    /// Complete answers published so far (domain side).
    answers: u32,
    head_word: usize,
    tail: usize,
    data: usize,
    peer_sleeping: usize,
    sock: S,
    timeout: Option<Duration>,
    /// The first violation seen (sticky).
    pub violation: Option<Violation>,
}

/// Both ends of `side` over `map`; `rx_sock` and `tx_sock` are (clones of) the connection's
/// socket; `timeout` bounds a wait (`None`: only a hang-up ends it).
pub fn endpoints<S: AsFd>(
    map: Map,
    side: Side,
    rx_sock: S,
    tx_sock: S,
    timeout: Option<Duration>,
) -> (Rx<S>, Tx<S>) {
    let map = std::sync::Arc::new(map);
    let (rx, tx) = match side {
        Side::Domain => (
            (REQ_HEAD, REQ_TAIL, REQ_DATA, DOMAIN_SLEEPING),
            (RESP_HEAD, RESP_TAIL, RESP_DATA, CLIENT_SLEEPING),
        ),
        Side::Client => (
            (RESP_HEAD, RESP_TAIL, RESP_DATA, CLIENT_SLEEPING),
            (REQ_HEAD, REQ_TAIL, REQ_DATA, DOMAIN_SLEEPING),
        ),
    };
    // Both ends start at index 0 (a fresh mapping); nothing is read back.
    (
        Rx {
            map: map.clone(),
            tail: 0,
            head: rx.0,
            tail_word: rx.1,
            data: rx.2,
            sleeping: rx.3,
            sock: rx_sock,
            timeout,
            violation: None,
        },
        Tx {
            map,
            head: 0,
            seen_tail: 0,
            answers: 0,
            head_word: tx.0,
            tail: tx.1,
            data: tx.2,
            peer_sleeping: tx.3,
            sock: tx_sock,
            timeout,
            violation: None,
        },
    )
}

/// A wait's next sleep: short first (a quick peer), longer while nothing comes (an idle
/// connection costs a few wake-ups a second to notice a hang-up).
fn slice(waited: u32) -> Duration {
    Duration::from_millis(match waited {
        0..=4 => 10,
        5..=20 => 50,
        _ => 500,
    })
}

impl<S: AsFd> Rx<S> {
    /// Bytes published and not yet consumed, bounded by the ring's size.
    ///
    /// # Errors
    /// [`Violation`] when the producer's index is out of range.
    pub fn available(&mut self) -> Result<usize, Violation> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let head = self.map.word(self.head).load(Ordering::Acquire);
        let n = head.wrapping_sub(self.tail) as usize;
        if n > RING_BYTES {
            let v = Violation("producer index beyond the ring");
            self.violation = Some(v.clone());
            return Err(v);
        }
        Ok(n)
    }

    /// Polls for data without a system call for at most `budget` (yielding the CPU between
    /// polls). Returns whether data is available.
    pub fn spin(&mut self, budget: Duration) -> bool {
        if budget.is_zero() {
            return false;
        }
        spin_until(budget, || !matches!(self.available(), Ok(0)))
    }

    /// Waits (asleep) until data is available, the socket hangs up or the timeout passes.
    ///
    /// # Errors
    /// [`WaitEnd`].
    pub fn wait(&mut self) -> Result<usize, WaitEnd> {
        let start = Instant::now();
        let mut waited = 0;
        loop {
            let n = self.available().map_err(WaitEnd::Violation)?;
            if n > 0 {
                return Ok(n);
            }
            if socket_done(&self.sock) {
                return Err(WaitEnd::Closed);
            }
            if self.timeout.is_some_and(|t| start.elapsed() >= t) {
                return Err(WaitEnd::TimedOut);
            }
            let head = self.map.word(self.head);
            let seen = self.tail;
            self.map.word(self.sleeping).store(1, Ordering::SeqCst);
            // Dekker with the producer: it stores its index, then reads this flag; this
            // side stores the flag, then reads the index. One of the two sees the other.
            if head.load(Ordering::SeqCst) == seen {
                futex_wait(head, seen, slice(waited));
            }
            self.map.word(self.sleeping).store(0, Ordering::Relaxed);
            waited += 1;
        }
    }

    /// Copies up to `buf.len()` available bytes out (waiting for at least one).
    ///
    /// # Errors
    /// [`WaitEnd`].
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, WaitEnd> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.wait()?.min(buf.len());
        self.map.copy_out(self.data, self.tail, &mut buf[..n]);
        self.tail = self.tail.wrapping_add(n as u32);
        // The copy is complete before the producer may reuse the bytes.
        self.map
            .word(self.tail_word)
            .store(self.tail, Ordering::Release);
        Ok(n)
    }
}

impl<S: AsFd> io::Read for Rx<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.recv(buf)?)
    }
}

impl<S: AsFd> Tx<S> {
    /// Free bytes, from the consumer's published index (bounded and never going back).
    fn free(&mut self) -> Result<usize, Violation> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let tail = self.map.word(self.tail).load(Ordering::Acquire);
        // The consumer may only have consumed what was written, and only forward.
        let consumed = tail.wrapping_sub(self.seen_tail);
        let written = self.head.wrapping_sub(self.seen_tail);
        if consumed > written {
            let v = Violation("consumer index beyond what was written");
            self.violation = Some(v.clone());
            return Err(v);
        }
        self.seen_tail = tail;
        Ok(RING_BYTES - self.head.wrapping_sub(tail) as usize)
    }

    /// Copies all of `buf` in (waiting for room while the ring is full) and wakes the
    /// consumer if it sleeps.
    ///
    /// # Errors
    /// [`WaitEnd`].
    pub fn send(&mut self, mut buf: &[u8]) -> Result<(), WaitEnd> {
        let start = Instant::now();
        let mut polls = 0u32;
        while !buf.is_empty() {
            let free = self.free().map_err(WaitEnd::Violation)?;
            if free == 0 {
                // Full: the consumer is behind (rare: only huge or flooding batches).
                if socket_done(&self.sock) {
                    return Err(WaitEnd::Closed);
                }
                if self.timeout.is_some_and(|t| start.elapsed() >= t) {
                    return Err(WaitEnd::TimedOut);
                }
                // Yield first (a consumer on this CPU), then sleep, longer the longer the
                // consumer stays behind (a module that never reads costs its domain thread
                // a hundred wake-ups a second, no more).
                polls = polls.saturating_add(1);
                match polls {
                    0..100 => std::thread::yield_now(),
                    100..1000 => std::thread::sleep(Duration::from_micros(200)),
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
                continue;
            }
            let n = free.min(buf.len());
            self.map.copy_in(self.data, self.head, &buf[..n]);
            self.head = self.head.wrapping_add(n as u32);
            let h = self.map.word(self.head_word);
            h.store(self.head, Ordering::SeqCst);
            if self.map.word(self.peer_sleeping).load(Ordering::SeqCst) != 0 {
                futex_wake(h);
            }
            buf = &buf[n..];
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The socket this end watches.
    pub fn socket(&self) -> &S {
        &self.sock
    }

    /// Publishes that `n` more complete answers are in the ring (call after their bytes were
    /// sent) and wakes the module's callers sleeping for them (the domain's side). The wake
    /// words are only bumped and their sleeping bit read: whatever the module writes there
    /// changes at most whom this wakes.
    pub fn answered(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let first = self.answers;
        self.answers = self.answers.wrapping_add(n as u32);
        // The count first, then the wake words (Dekker with `Answers::wait`).
        self.map.word(ANSWERS).store(self.answers, Ordering::SeqCst);
        for i in 0..n.min(WAKE_WORDS as usize) {
            let w = self.map.wake_word(first.wrapping_add(i as u32));
            if w.fetch_add(2, Ordering::SeqCst) & 1 != 0 {
                w.fetch_and(!1, Ordering::SeqCst);
                futex_wake(w);
            }
        }
    }
}

impl<S: AsFd> io::Write for Tx<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The module's view of the published-answers count and its wake words: a caller sleeps
/// until its own answer is published, woken by the domain directly.
#[derive(Debug, Clone)]
pub struct Answers {
    map: std::sync::Arc<Map>,
}

impl Answers {
    /// Complete answers the domain has published so far (wrapping).
    #[must_use]
    pub fn published(&self) -> u32 {
        self.map.word(ANSWERS).load(Ordering::SeqCst)
    }

    /// Whether the answer at position `ord` is published.
    #[must_use]
    pub fn is_published(&self, ord: u32) -> bool {
        let d = self.published().wrapping_sub(ord);
        d != 0 && d < 1 << 31
    }

    /// Sleeps until the answer at position `ord` may be published, or `slice` passes.
    pub fn wait(&self, ord: u32, slice: Duration) {
        let w = self.map.wake_word(ord);
        let v = w.load(Ordering::SeqCst);
        if self.is_published(ord) {
            return;
        }
        if v & 1 == 0
            && w.compare_exchange(v, v | 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        if self.is_published(ord) {
            return;
        }
        futex_wait(w, v | 1, slice);
    }

    /// Polls (no system call but `sched_yield`) for at most `budget` until answer `ord` is
    /// published; returns whether it is.
    pub fn spin(&self, ord: u32, budget: Duration) -> bool {
        spin_until(budget, || self.is_published(ord))
    }
}

/// Whether a connection's socket hung up (or carries anything: in ring mode nothing may
/// arrive on it).
#[must_use]
pub fn hung_up(s: &impl AsFd) -> bool {
    socket_done(s)
}

impl<S: AsFd> Rx<S> {
    /// The published-answers view of this (module-side) ring.
    #[must_use]
    pub fn answers(&self) -> Answers {
        Answers {
            map: self.map.clone(),
        }
    }

    /// The shared mapping (tests play a hostile peer through it).
    #[doc(hidden)]
    #[must_use]
    pub fn map(&self) -> &Map {
        &self.map
    }
}

/// Sends `data` with `fd` attached (SCM_RIGHTS) on a UNIX stream.
///
/// # Errors
/// The system call's.
pub fn send_with_fd(sock: &impl AsRawFd, data: &[u8], fd: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [io::IoSlice::new(data)];
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if n != data.len() {
        // A short send of a few bytes on a fresh connection: send the rest plainly.
        let mut rest = &data[n..];
        while !rest.is_empty() {
            let m = nix::sys::socket::send(sock.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL)
                .map_err(io::Error::from)?;
            rest = &rest[m..];
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and at most one passed descriptor (others are closed).
///
/// # Errors
/// The system call's.
pub fn recv_with_fd(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let n = msg.bytes;
    let mut got = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in this process for us; we own it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                if got.is_none() {
                    got = Some(fd);
                }
            }
        }
    }
    Ok((n, got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (
        Rx<UnixStream>,
        Tx<UnixStream>,
        Rx<UnixStream>,
        Tx<UnixStream>,
        UnixStream,
    ) {
        let (fd, dmap) = create().unwrap_or_else(|e| panic!("memfd: {e}"));
        let cmap = attach(&fd).unwrap_or_else(|e| panic!("attach: {e}"));
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("pair: {e}"));
        let (drx, dtx) = endpoints(
            dmap,
            Side::Domain,
            a.try_clone().unwrap_or_else(|e| panic!("{e}")),
            a.try_clone().unwrap_or_else(|e| panic!("{e}")),
            None,
        );
        let (crx, ctx) = endpoints(
            cmap,
            Side::Client,
            b.try_clone().unwrap_or_else(|e| panic!("{e}")),
            b.try_clone().unwrap_or_else(|e| panic!("{e}")),
            Some(Duration::from_secs(10)),
        );
        (drx, dtx, crx, ctx, b)
    }

    /// Bytes go through both rings in order, across wrap-around and with sleeping readers.
    #[test]
    fn round_trips_across_the_wrap() {
        let (mut drx, mut dtx, mut crx, mut ctx, _b) = pair();
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 7000];
            let mut total = 0usize;
            while total < 3 * RING_BYTES {
                let n = drx.read(&mut buf).unwrap_or_else(|e| panic!("{e}"));
                dtx.write_all(&buf[..n]).unwrap_or_else(|e| panic!("{e}"));
                total += n;
            }
        });
        let data: Vec<u8> = (0..3 * RING_BYTES).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; data.len()];
        for (c, g) in data.chunks(5000).zip(got.chunks_mut(5000)) {
            ctx.write_all(c).unwrap_or_else(|e| panic!("{e}"));
            crx.read_exact(g).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(got, data);
        echo.join().unwrap_or_else(|_| panic!("echo"));
    }

    /// A producer index more than a ring ahead is a violation, not a read past the ring.
    #[test]
    fn producer_index_out_of_range_is_a_violation() {
        let (mut drx, _dtx, crx, _ctx, _b) = pair();
        crx.map()
            .raw_word(RawWord::ReqHead)
            .store(RING_BYTES as u32 + 1, Ordering::SeqCst);
        assert!(matches!(
            drx.recv(&mut [0u8; 16]),
            Err(WaitEnd::Violation(_))
        ));
        // Sticky: putting the index back does not reopen the ring.
        crx.map()
            .raw_word(RawWord::ReqHead)
            .store(1, Ordering::SeqCst);
        assert!(drx.available().is_err());
    }

    /// A consumer index that claims more than was written is a violation.
    #[test]
    fn consumer_index_beyond_written_is_a_violation() {
        let (_drx, mut dtx, crx, _ctx, _b) = pair();
        dtx.send(b"abc").unwrap_or_else(|e| panic!("{e:?}"));
        crx.map()
            .raw_word(RawWord::RespTail)
            .store(100, Ordering::SeqCst);
        assert!(matches!(dtx.send(b"d"), Err(WaitEnd::Violation(_))));
    }

    /// A hang-up ends a sleeping reader.
    #[test]
    fn hang_up_ends_the_wait() {
        let (mut drx, _dtx, _crx, _ctx, b) = pair();
        drop(b);
        drop(_crx);
        drop(_ctx);
        assert!(matches!(drx.recv(&mut [0u8; 4]), Err(WaitEnd::Closed)));
    }

    /// The sealed memfd cannot be shrunk or grown by the module (it would fault the domain).
    #[test]
    fn memfd_is_sealed_against_resizing() {
        let (fd, _m) = create().unwrap_or_else(|e| panic!("{e}"));
        assert!(nix::unistd::ftruncate(&fd, 4096).is_err());
        assert!(nix::unistd::ftruncate(&fd, 2 * MAP_BYTES as i64).is_err());
    }
}
