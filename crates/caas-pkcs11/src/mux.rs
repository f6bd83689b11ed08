//! Pipelined connections for the single-part operations (`SignOnce`, `VerifyOnce`,
//! `EncryptOnce`, `DecryptOnce`) on the UNIX socket.
//!
//! With one pooled connection per calling thread, every signature costs the domain one
//! wake-up and a read and a write of its own; with many threads on few CPUs the kernel's
//! socket and scheduler path costs as much as the signature. A [`Pipe`] is one connection
//! shared by several threads instead: a caller appends its request frame to the pipe's
//! queue, and whichever caller finds no write in progress writes everything queued in one
//! `send` (the others' frames included). The crypto domain answers a connection's requests
//! in order and writes the answers of the requests it found already buffered in one write
//! (`caas_domc::server`), so a burst of N requests costs the domain one read and one write.
//! Answers are matched to callers by position (the n-th answer is the n-th request's):
//! one waiting caller at a time reads from the socket, hands each answer to its caller
//! (`unpark`) and, once its own answer is in, passes the reading on to a caller still
//! waiting. Nothing changes for the domain's checks: every request still names its session
//! and is checked there as before.
//!
//! **Waiting for the answer.** A caller alone on its pipe (no other caller inside
//! [`Pipe::call`], no other request in flight) does not go to sleep in the blocking read at
//! once: it polls the socket (`MSG_PEEK | MSG_DONTWAIT`, with `sched_yield` between polls so
//! that a domain thread woken onto this very CPU gets it) for up to 50 µs
//! (`CAAS_PKCS11_SPIN_US`, 0 = off), then blocks. One thread signing in a loop otherwise pays
//! a sleep and a cross-CPU wake-up on each side per signature, which on a 2-vCPU VM costs more
//! than the signature (1 thread, ECDSA P-256, idle CPUs: ~13 k → ~34 k sig/s with the domain's
//! matching spin, `caas-domc/bench/vsm-bench.sh`). The spin turns itself off for the next call
//! when an answer took longer than the bound (a key generation, ML-DSA on a busy machine),
//! and back on when answers are quick again; several callers on a pipe never spin (they
//! would burn the CPUs the domain needs).
//!
//! **Shared-memory ring.** A new pipe asks the domain to move its connection onto a
//! shared-memory ring ([`caas_vsm_proto::ring`], `Request::RingOpen`; the domain answers with
//! a sealed memfd over SCM_RIGHTS): the same frames then travel through two byte rings in
//! that mapping instead of the socket, the writing caller copies the queued frames in, and
//! the domain is woken with a futex only when it announced that it sleeps. Answers are not
//! read by a caller blocked on the socket: the domain publishes how many complete answers
//! are in the ring and wakes the caller of each one on its wake word (`ring::Answers`), so a
//! caller sleeps once per call; whoever then finds answers published and the reading free
//! copies exactly those out into its private buffer and hands them to their callers (see
//! `Pipe::wait_on_ring`). A busy or spinning pair makes no system call per signature, and
//! the spin above polls memory instead of the socket. The socket
//! stays open (its hang-up ends the pipe; `Pipe::break_pipe` shuts it down, which also ends
//! a caller waiting on the ring). A domain that refuses the ring (or predates it) leaves the
//! pipes on the socket; `CAAS_PKCS11_RING=0` keeps them there.
//!
//! A transport failure, or an answer no request is waiting for, breaks the pipe: every
//! caller waiting on it gets CKR_DEVICE_ERROR, the socket is shut down and the next call
//! opens a new pipe.

use caas_vsm_proto::blocking::read_message;
use caas_vsm_proto::{Response, Wire, frame_message_into, ring};
use cryptoki_sys::{CK_RV, CKR_DATA_LEN_RANGE, CKR_DEVICE_ERROR};
use nix::sys::socket::{MsgFlags, recv, send};
use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// One connection shared by several calling threads.
#[derive(Debug)]
pub(crate) struct Pipe {
    /// The socket (writes, unless the ring carries them; shut down when the pipe breaks).
    stream: UnixStream,
    /// The shared-memory ring's sending end, when the connection moved onto one (only the
    /// writing caller uses it: uncontended).
    ring_tx: Option<Mutex<ring::Tx<UnixStream>>>,
    /// The ring's published-answers count and wake words.
    answers: Option<ring::Answers>,
    /// How long a call waits for its answer on the ring (the socket has its read timeout).
    timeout: Option<Duration>,
    st: Mutex<State>,
    /// Callers inside [`Pipe::call`] (a lone caller may spin for its answer; several
    /// must not burn the CPUs the domain needs).
    active: AtomicUsize,
    /// The last lone wait was shorter than the spin's bound: the next one spins.
    spin: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// Frames appended but not yet written.
    queue: Vec<u8>,
    /// The buffer of the last write, kept for the next (no allocation per batch).
    spare: Vec<u8>,
    /// A caller is writing the queue.
    writing: bool,
    /// Requests appended so far (the next request's position).
    sent: u64,
    /// Answers read so far (the next answer's position).
    received: u64,
    /// The reading side; `None` while a caller reads.
    reader: Option<Reader>,
    /// Answers read for callers that have not taken them yet, by position.
    ready: crate::ops::U64Map<Response>,
    /// Callers parked until their answer (or the reading) is theirs, by position.
    waiting: BTreeMap<u64, Thread>,
    broken: bool,
}

/// Where answers are read from.
#[derive(Debug)]
pub(crate) enum Reader {
    /// The socket.
    Socket(BufReader<UnixStream>),
    /// The shared-memory ring (every byte copied out once, into this buffer).
    Ring(BufReader<ring::Rx<UnixStream>>),
}

impl std::io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Socket(r) => r.read(buf),
            Self::Ring(r) => r.read(buf),
        }
    }
}

impl Reader {
    fn buffer_empty(&self) -> bool {
        match self {
            Self::Socket(r) => r.buffer().is_empty(),
            Self::Ring(r) => r.buffer().is_empty(),
        }
    }

    /// Waits awake (at most `budget`) for the next answer.
    fn spin(&mut self, budget: Duration) {
        match self {
            Self::Socket(r) => {
                spin_readable(r.get_ref(), budget);
            }
            Self::Ring(r) => {
                r.get_mut().spin(budget);
            }
        }
    }
}

fn send_all(s: &UnixStream, mut buf: &[u8]) -> Result<(), CK_RV> {
    while !buf.is_empty() {
        // MSG_NOSIGNAL: a dead peer must give EPIPE, not kill the host process with SIGPIPE.
        match send(s.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(CKR_DEVICE_ERROR),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Err(CKR_DEVICE_ERROR),
        }
    }
    Ok(())
}

/// How long a lone caller waits awake for its answer before blocking
/// (`CAAS_PKCS11_SPIN_US`, microseconds; 0 turns the spin off).
fn spin_budget() -> Duration {
    static B: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        Duration::from_micros(
            std::env::var("CAAS_PKCS11_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_SPIN_US)
                .min(MAX_SPIN_US),
        )
    })
}

/// The default spin (a P-256 signature in the domain takes ~20 us).
const DEFAULT_SPIN_US: u64 = 50;
/// The longest spin allowed.
const MAX_SPIN_US: u64 = 1000;

/// Polls `s` without blocking until it has data (or EOF/an error, which the blocking read
/// then reports) or `budget` has passed. Returns whether it became readable.
fn spin_readable(s: &UnixStream, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let mut b = [0u8; 1];
    loop {
        match recv(
            s.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            _ => return true,
        }
        if start.elapsed() >= budget {
            return false;
        }
        // The peer may be runnable on this very CPU (a sync wake-up put it here): let it
        // run instead of spinning it out.
        std::thread::yield_now();
    }
}

impl Pipe {
    /// A pipe over a connection that has said hello.
    pub(crate) fn new(stream: UnixStream, reader: BufReader<UnixStream>) -> Self {
        Self::with(stream, None, Reader::Socket(reader))
    }

    /// A pipe over a connection moved onto a shared-memory ring.
    pub(crate) fn new_ring(
        stream: UnixStream,
        rx: ring::Rx<UnixStream>,
        tx: ring::Tx<UnixStream>,
        timeout: Duration,
    ) -> Self {
        let answers = rx.answers();
        let mut p = Self::with(
            stream,
            Some(Mutex::new(tx)),
            Reader::Ring(BufReader::with_capacity(64 * 1024, rx)),
        );
        p.answers = Some(answers);
        p.timeout = Some(timeout);
        p
    }

    /// Whether the pipe runs over a shared-memory ring.
    #[cfg(test)]
    pub(crate) fn is_ring(&self) -> bool {
        self.ring_tx.is_some()
    }

    fn send(&self, buf: &[u8]) -> Result<(), CK_RV> {
        match &self.ring_tx {
            None => send_all(&self.stream, buf),
            Some(tx) => tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(buf)
                .map_err(|_| CKR_DEVICE_ERROR),
        }
    }

    fn with(
        stream: UnixStream,
        ring_tx: Option<Mutex<ring::Tx<UnixStream>>>,
        reader: Reader,
    ) -> Self {
        Self {
            stream,
            ring_tx,
            answers: None,
            timeout: None,
            active: AtomicUsize::new(0),
            spin: AtomicBool::new(true),
            st: Mutex::new(State {
                queue: Vec::with_capacity(4096),
                spare: Vec::with_capacity(4096),
                writing: false,
                sent: 0,
                received: 0,
                reader: Some(reader),
                ready: crate::ops::U64Map::default(),
                waiting: BTreeMap::new(),
                broken: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the pipe failed (a new one must be opened).
    pub(crate) fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// Marks the pipe broken, shuts the socket down (a caller blocked reading returns) and
    /// wakes every waiting caller.
    fn break_pipe(&self, g: &mut State) {
        g.broken = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for t in g.waiting.values() {
            t.unpark();
        }
    }

    /// Sends `req` (pipelined with the other callers' requests) and waits for its answer.
    pub(crate) fn call<Q: Wire>(&self, req: &Q) -> Result<Response, CK_RV> {
        self.active.fetch_add(1, Ordering::Relaxed);
        let r = self.call_inner(req);
        self.active.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// Waits for the answer at position `me` on a shared-memory ring. The domain publishes a
    /// count of complete answers and wakes the caller whose answer it published (its wake
    /// word), so a caller sleeps once per call: whoever finds answers published and the
    /// reading free copies exactly those out (complete frames: never a blocking read) and
    /// hands them to their callers; a caller whose answer is published while another reads
    /// parks until that reader hands it over.
    fn wait_on_ring<'a>(
        &'a self,
        mut g: MutexGuard<'a, State>,
        me: u64,
        gate: &ring::Answers,
    ) -> Result<Response, CK_RV> {
        let start = Instant::now();
        let mut slices = 0u32;
        // When a lone caller started waiting (its wait decides whether the next one spins).
        let mut solo_since: Option<Instant> = None;
        loop {
            if let Some(r) = g.ready.remove(&me) {
                if let Some(t0) = solo_since {
                    self.spin
                        .store(t0.elapsed() < spin_budget(), Ordering::Relaxed);
                }
                return Ok(r);
            }
            if g.broken {
                return Err(CKR_DEVICE_ERROR);
            }
            // Positions are counted modulo 2^32 on the ring.
            let avail = u64::from(gate.published().wrapping_sub(g.received as u32));
            if avail > g.sent - g.received {
                // More answers than requests: the positions can no longer be trusted.
                self.break_pipe(&mut g);
                return Err(CKR_DEVICE_ERROR);
            }
            if avail > 0 {
                if let Some(mut reader) = g.reader.take() {
                    drop(g);
                    let mut got = Vec::with_capacity(avail as usize);
                    let mut failed = false;
                    for _ in 0..avail {
                        match read_message::<_, Response>(&mut reader) {
                            Ok(r) => got.push(r),
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    g = self.lock();
                    g.reader = Some(reader);
                    if failed {
                        self.break_pipe(&mut g);
                        return Err(CKR_DEVICE_ERROR);
                    }
                    for r in got {
                        let n = g.received;
                        g.received = n + 1;
                        g.ready.insert(n, r);
                        if let Some(t) = g.waiting.get(&n) {
                            t.unpark();
                        }
                    }
                    // A caller parked for the reading takes it over.
                    if let Some((_, t)) = g.waiting.first_key_value() {
                        t.unpark();
                    }
                    continue;
                }
                // Another caller reads: it hands this answer (or the reading) over.
                g.waiting.insert(me, std::thread::current());
                drop(g);
                std::thread::park();
                g = self.lock();
                g.waiting.remove(&me);
                continue;
            }
            // Not yet published: wait for the domain to wake this caller — awake for a
            // short while when alone (as on the socket), asleep otherwise.
            let solo = g.waiting.is_empty()
                && g.sent == g.received + 1
                && self.active.load(Ordering::Relaxed) == 1;
            drop(g);
            if solo && slices == 0 && solo_since.is_none() {
                solo_since = Some(Instant::now());
            }
            let spun = solo
                && slices == 0
                && self.spin.load(Ordering::Relaxed)
                && gate.spin(me as u32, spin_budget());
            if !spun {
                gate.wait(me as u32, Duration::from_millis(10));
                slices += 1;
            }
            g = self.lock();
            // A published answer is taken on the next turn: the hang-up (a `poll`) and the
            // deadline only matter while it is still missing (a timed-out or spurious wake).
            if !gate.is_published(me as u32)
                && (ring::hung_up(&self.stream)
                    || self.timeout.is_some_and(|t| start.elapsed() >= t))
            {
                self.break_pipe(&mut g);
                return Err(CKR_DEVICE_ERROR);
            }
        }
    }

    fn call_inner<Q: Wire>(&self, req: &Q) -> Result<Response, CK_RV> {
        let mut g = self.lock();
        if g.broken {
            return Err(CKR_DEVICE_ERROR);
        }
        frame_message_into(req, &mut g.queue).map_err(|_| CKR_DATA_LEN_RANGE)?;
        let me = g.sent;
        g.sent += 1;
        if !g.writing {
            // Write the queue, and whatever the others append meanwhile, in as few sends
            // as the kernel takes.
            g.writing = true;
            loop {
                let mut buf = std::mem::take(&mut g.spare);
                std::mem::swap(&mut buf, &mut g.queue);
                drop(g);
                let sent = self.send(&buf);
                buf.clear();
                g = self.lock();
                g.spare = buf;
                if sent.is_err() {
                    g.writing = false;
                    self.break_pipe(&mut g);
                    return Err(CKR_DEVICE_ERROR);
                }
                if g.queue.is_empty() {
                    g.writing = false;
                    break;
                }
            }
        }
        if let Some(gate) = &self.answers {
            return self.wait_on_ring(g, me, gate);
        }
        loop {
            if let Some(r) = g.ready.remove(&me) {
                return Ok(r);
            }
            if g.broken {
                return Err(CKR_DEVICE_ERROR);
            }
            if let Some(mut reader) = g.reader.take() {
                // Read answers, handing out the others', until this caller's own is in.
                loop {
                    // Alone on the pipe with nothing buffered: the answer is a signature
                    // away, so wait for it awake (a short bounded spin) instead of paying
                    // the sleep and the wake-up of a blocking read — as long as the last
                    // answer came within the spin's bound (a slow operation, such as a key
                    // generation or a large ML-DSA signature, turns the spin off until
                    // answers are quick again).
                    let solo = g.waiting.is_empty()
                        && g.sent == g.received + 1
                        && self.active.load(Ordering::Relaxed) == 1;
                    drop(g);
                    let timed = (solo && reader.buffer_empty()).then(|| {
                        let start = Instant::now();
                        if self.spin.load(Ordering::Relaxed) {
                            reader.spin(spin_budget());
                        }
                        start
                    });
                    let read = read_message::<_, Response>(&mut reader);
                    if let Some(start) = timed {
                        self.spin
                            .store(start.elapsed() < spin_budget(), Ordering::Relaxed);
                    }
                    g = self.lock();
                    let n = g.received;
                    let r = match read {
                        Ok(r) if n < g.sent && !g.broken => r,
                        // A transport failure, or an answer to no request: the positions
                        // can no longer be trusted.
                        _ => {
                            self.break_pipe(&mut g);
                            return Err(CKR_DEVICE_ERROR);
                        }
                    };
                    g.received = n + 1;
                    if n == me {
                        g.reader = Some(reader);
                        // The reading passes to the caller still waiting whose answer
                        // comes next (it may already be buffered): it then wakes once, for
                        // its own answer.
                        if let Some((_, t)) = g.waiting.first_key_value() {
                            t.unpark();
                        }
                        return Ok(r);
                    }
                    g.ready.insert(n, r);
                    if let Some(t) = g.waiting.remove(&n) {
                        t.unpark();
                    }
                }
            }
            g.waiting.insert(me, std::thread::current());
            drop(g);
            std::thread::park();
            g = self.lock();
            g.waiting.remove(&me);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caas_vsm_proto::{Blob, Body, MechParam, Mechanism, Request, frame_message_into};
    use std::io::{Read, Write};

    fn sign_once(session: u64) -> Request {
        Request::SignOnce {
            session,
            mechanism: Mechanism {
                mechanism: 0x1041,
                param: MechParam::None {},
            },
            key: 1,
            data: Blob(vec![0x5a; 32]),
        }
    }

    /// A stand-in domain: answers each request with its session number, in order, and
    /// writes the answers of all requests that arrived together in one write.
    fn echo_domain<S: Read + Write>(mut s: S) {
        let mut d = caas_vsm_proto::FrameDecoder::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            d.feed(&chunk[..n]);
            let mut out = Vec::new();
            while let Ok(Some(f)) = d.next_frame() {
                let Ok(Request::SignOnce { session, .. }) = caas_vsm_proto::from_bytes(&f) else {
                    return;
                };
                let r = Response::ok(Body::Ulongs {
                    values: vec![session],
                });
                if frame_message_into(&r, &mut out).is_err() {
                    return;
                }
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    }

    fn pipe_pair() -> std::io::Result<(Pipe, UnixStream)> {
        let (a, b) = UnixStream::pair()?;
        a.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        let reader = BufReader::new(a.try_clone()?);
        Ok((Pipe::new(a, reader), b))
    }

    /// 8 threads × 500 calls on `pipe`, each checking that the answer is its own request's;
    /// the pipe is still whole afterwards.
    fn eight_callers_each_get_their_own_answer(pipe: &Pipe) {
        std::thread::scope(|sc| {
            for t in 0..8u64 {
                sc.spawn(move || {
                    for i in 0..500u64 {
                        let session = t * 1_000_000 + i;
                        let r = pipe.call(&sign_once(session));
                        assert!(
                            matches!(&r, Ok(Response { rv: 0, body: Body::Ulongs { values } }) if values == &[session]),
                            "thread {t} call {i}: {r:?}"
                        );
                    }
                });
            }
        });
        assert!(!pipe.is_broken());
    }

    /// Many threads on one pipe: each caller gets the answer to its own request, never a
    /// neighbour's (answers are matched by position while the peer batches them).
    #[test]
    fn pipelined_callers_each_get_their_own_answer() -> std::io::Result<()> {
        let (pipe, peer) = pipe_pair()?;
        let domain = std::thread::spawn(move || echo_domain(peer));
        eight_callers_each_get_their_own_answer(&pipe);
        drop(pipe);
        let _ = domain.join();
        Ok(())
    }

    /// A stand-in domain's two ring ends as one stream.
    struct RingEnds(ring::Rx<UnixStream>, ring::Tx<UnixStream>);

    impl Read for RingEnds {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for RingEnds {
        /// Writes whole frames (as the domain does) and publishes how many.
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.1.write(buf)?;
            let (mut frames, mut rest) = (0, buf);
            while let Some(h) = rest.first_chunk::<4>() {
                let len = 4 + u32::from_be_bytes(*h) as usize;
                rest = rest.get(len..).unwrap_or_default();
                frames += 1;
            }
            self.1.answered(frames);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The same over the shared-memory ring: many threads, one ring, each caller its own
    /// answer; the domain's hang-up breaks the pipe instead of hanging a caller.
    #[test]
    fn pipelined_callers_each_get_their_own_answer_over_the_ring() -> std::io::Result<()> {
        let (fd, dmap) = ring::create()?;
        let cmap = ring::attach(&fd)?;
        let (a, b) = UnixStream::pair()?;
        let (drx, dtx) = ring::endpoints(dmap, ring::Side::Domain, b.try_clone()?, b, None);
        let (crx, ctx) = ring::endpoints(
            cmap,
            ring::Side::Client,
            a.try_clone()?,
            a.try_clone()?,
            Some(Duration::from_secs(20)),
        );
        let pipe = Pipe::new_ring(a, crx, ctx, Duration::from_secs(20));
        assert!(pipe.is_ring());
        let domain = std::thread::spawn(move || echo_domain(RingEnds(drx, dtx)));
        eight_callers_each_get_their_own_answer(&pipe);
        drop(pipe);
        let _ = domain.join();
        Ok(())
    }

    /// A domain that answers each request after `delay`.
    fn slow_domain(mut s: UnixStream, delay: std::time::Duration) {
        let mut d = caas_vsm_proto::FrameDecoder::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            let n = match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            d.feed(&chunk[..n]);
            while let Ok(Some(f)) = d.next_frame() {
                let Ok(Request::SignOnce { session, .. }) = caas_vsm_proto::from_bytes(&f) else {
                    return;
                };
                std::thread::sleep(delay);
                let mut out = Vec::new();
                let r = Response::ok(Body::Ulongs {
                    values: vec![session],
                });
                if frame_message_into(&r, &mut out).is_err() || s.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }

    /// A lone caller spins for its answer only while answers come within the spin's bound:
    /// a slow domain (a long operation, or a domain on a busy machine) turns the spin off,
    /// so the caller sleeps instead of burning a CPU, and quick answers turn it back on.
    #[test]
    fn a_lone_caller_stops_spinning_while_the_domain_is_slow() -> std::io::Result<()> {
        let slow = spin_budget() * 4 + std::time::Duration::from_millis(2);
        let (pipe, peer) = pipe_pair()?;
        let domain = std::thread::spawn(move || slow_domain(peer, slow));
        assert!(pipe.spin.load(Ordering::Relaxed), "a new pipe spins");
        let r = pipe.call(&sign_once(1));
        assert!(
            matches!(&r, Ok(Response { rv: 0, body: Body::Ulongs { values } }) if values == &[1]),
            "{r:?}"
        );
        assert!(
            !pipe.spin.load(Ordering::Relaxed),
            "a slow answer turns the spin off"
        );
        drop(pipe);
        let _ = domain.join();

        let (pipe, peer) = pipe_pair()?;
        let domain = std::thread::spawn(move || echo_domain(peer));
        pipe.spin.store(false, Ordering::Relaxed);
        // A quick answer (the echo domain answers at once; allow for a busy machine).
        let mut back_on = false;
        for i in 0..2000 {
            let r = pipe.call(&sign_once(i));
            assert!(
                matches!(&r, Ok(Response { rv: 0, body: Body::Ulongs { values } }) if values == &[i]),
                "{r:?}"
            );
            if pipe.spin.load(Ordering::Relaxed) {
                back_on = true;
                break;
            }
        }
        assert!(back_on, "quick answers turn the spin back on");
        drop(pipe);
        let _ = domain.join();
        Ok(())
    }

    /// The spin is bounded: with nothing to read it gives up after its budget (the caller
    /// then blocks in the read, which honours the socket's timeout); data, or the peer
    /// closing, ends it at once.
    #[test]
    fn the_spin_gives_up_after_its_bound_and_sees_data_or_a_close() -> std::io::Result<()> {
        let (a, mut b) = UnixStream::pair()?;
        let budget = std::time::Duration::from_micros(200);
        let start = Instant::now();
        assert!(!spin_readable(&a, budget));
        let took = start.elapsed();
        assert!(took >= budget, "{took:?}");
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        b.write_all(b"x")?;
        assert!(spin_readable(&a, budget));
        let (c, d) = UnixStream::pair()?;
        drop(d);
        assert!(spin_readable(&c, std::time::Duration::from_secs(5)));
        // A zero budget does not spin at all.
        let (e, _f) = UnixStream::pair()?;
        assert!(!spin_readable(&e, std::time::Duration::ZERO));
        Ok(())
    }

    /// The domain dies with requests in flight: every waiting caller gets CKR_DEVICE_ERROR
    /// (none hangs, none gets another's answer), and the pipe reports itself broken so the
    /// client opens a new one.
    #[test]
    fn a_dead_domain_fails_every_waiting_caller() -> std::io::Result<()> {
        let (pipe, mut peer) = pipe_pair()?;
        let domain = std::thread::spawn(move || {
            // Reads some requests, answers none, and goes away.
            let mut b = [0u8; 256];
            let _ = peer.read(&mut b);
            std::thread::sleep(std::time::Duration::from_millis(100));
        });
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let pipe = &pipe;
                sc.spawn(move || {
                    let r = pipe.call(&sign_once(t));
                    assert_eq!(r.err(), Some(CKR_DEVICE_ERROR), "thread {t}");
                });
            }
        });
        assert!(pipe.is_broken());
        assert_eq!(pipe.call(&sign_once(9)).err(), Some(CKR_DEVICE_ERROR));
        let _ = domain.join();
        Ok(())
    }

    /// A domain that accepts requests and never answers: the caller gives up after the
    /// socket's read timeout (the configured one) with CKR_DEVICE_ERROR instead of hanging,
    /// and the pipe (whose later answers could no longer be matched) is broken.
    #[test]
    fn a_silent_domain_times_out_the_caller() -> std::io::Result<()> {
        let (a, peer) = UnixStream::pair()?;
        a.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        let reader = BufReader::new(a.try_clone()?);
        let pipe = Pipe::new(a, reader);
        let start = std::time::Instant::now();
        assert_eq!(pipe.call(&sign_once(1)).err(), Some(CKR_DEVICE_ERROR));
        assert!(start.elapsed() >= std::time::Duration::from_millis(200));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        assert!(pipe.is_broken());
        drop(peer);
        Ok(())
    }
}
