//! The machine's signing ceiling: aws-lc-rs (the library the crypto domain signs with)
//! signing in-process, N threads for a fixed time, no PKCS#11, no socket, no audit, so
//! `bench/vsm-bench.sh` can show in the same run how close the VSM comes to what the CPUs
//! can do.
//!
//! ECDSA P-256 signs a 32-byte prehash with `sign_digest` (what the domain does for
//! `CKM_ECDSA`); ML-DSA-65 signs a 64-byte message (pure ML-DSA, empty context, hedged —
//! what the domain does for `CKM_ML_DSA`).
//!
//! Prints `MECH THREADS sig/s CPU-seconds`.
//!
//! With `remote SERVERS` the signatures are made in another process, as in a VSM, but by
//! the least code that can do it: THREADS callers in this process, each with a slot in a
//! shared mapping, and SERVERS signing threads in a forked child that serve the slots in
//! turn (slot `i` by thread `i % SERVERS`, as the module spreads callers over one
//! connection per CPU); a caller publishes its request, rings its server's doorbell only
//! if that server sleeps, and sleeps on its own futex word until the answer is there; a
//! server answers every request it finds before it sleeps, and wakes only callers that
//! sleep. No framing, parsing, policy or audit. Mechanism `null` answers without signing:
//! the cost of the round trip alone. This is the floor of any design that keeps the key in
//! another process and answers a synchronous `C_Sign` (see `bench/vsm-bench.sh`); CPU
//! seconds are both processes'.
//!
//! Usage: sigceiling ecdsa-p256|mldsa65|null THREADS SECONDS [remote SERVERS]

#![allow(unsafe_code)] // getrusage; the remote floor's mmap, fork and waitpid

use anyhow::{Context, Result, bail};
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, ML_DSA_65_SIGNING, PqdsaKeyPair,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

enum Key {
    Ecdsa(EcdsaKeyPair),
    MlDsa(PqdsaKeyPair),
    /// No signature (the remote floor's round trip alone).
    Null,
}

impl Key {
    fn sign(&self, buf: &mut [u8]) -> Result<()> {
        match self {
            Key::Ecdsa(k) => {
                let d = digest::Digest::import_less_safe(&[0x5a; 32], &digest::SHA256)
                    .map_err(|_| anyhow::anyhow!("digest"))?;
                let s = k.sign_digest(&d).map_err(|_| anyhow::anyhow!("sign"))?;
                std::hint::black_box(s);
            }
            Key::MlDsa(k) => {
                k.sign(&[0x5a; 64], buf)
                    .map_err(|_| anyhow::anyhow!("sign"))?;
                std::hint::black_box(&buf);
            }
            Key::Null => {}
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: sigceiling ecdsa-p256|mldsa65|null THREADS SECONDS [remote SERVERS]";
    let servers: Option<usize> = match a.len() {
        4 => None,
        6 if a[4] == "remote" => Some(a[5].parse().context("SERVERS")?),
        _ => bail!("{usage}"),
    };
    let mech = a[1].as_str();
    let threads: usize = a[2].parse().context("THREADS")?;
    let secs: u64 = a[3].parse().context("SECONDS")?;
    let key = match mech {
        "ecdsa-p256" => {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|_| anyhow::anyhow!("keygen"))?;
            Key::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                    .map_err(|_| anyhow::anyhow!("parse"))?,
            )
        }
        "mldsa65" => Key::MlDsa(
            PqdsaKeyPair::generate(&ML_DSA_65_SIGNING).map_err(|_| anyhow::anyhow!("keygen"))?,
        ),
        "null" if servers.is_some() => Key::Null,
        other => bail!("unknown mechanism {other} ({usage})"),
    };
    let sig_len = match &key {
        Key::Ecdsa(_) | Key::Null => 64,
        Key::MlDsa(_) => ML_DSA_65_SIGNING.signature_len(),
    };
    if let Some(servers) = servers {
        let (rate, cpu) = remote::run(&key, sig_len, threads, servers, Duration::from_secs(secs))?;
        println!("{mech} {threads} {rate:.0} {cpu:.2}");
        return Ok(());
    }
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; sig_len];
                    while Instant::now() < deadline {
                        key.sign(&mut buf)?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        }
        Ok(())
    })?;
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{mech} {threads} {rate:.0} {:.2}", cpu_seconds());
    Ok(())
}

/// CPU time (user + system) this process used so far, in seconds: with the wall-clock rate
/// it gives signatures per CPU-second, which other load on the machine hardly changes.
fn cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF)
}

/// CPU seconds of `who` (`RUSAGE_SELF`, or `RUSAGE_CHILDREN`: the children waited for).
fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut u);
        u
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The remote floor: callers here, signers in a forked child, one shared mapping between.
mod remote {
    use super::{Key, rusage_seconds};
    use anyhow::{Result, bail};
    use caas_vsm_proto::ring::{futex_wait, futex_wake};
    use std::sync::atomic::{
        AtomicU32,
        Ordering::{Acquire, Relaxed, SeqCst},
    };
    use std::time::{Duration, Instant};

    const MAX_CALLERS: usize = 256;
    const MAX_SERVERS: usize = 16;
    /// The longest a caller or a signing thread sleeps before looking again (a dead child
    /// is noticed, a stop is seen even if its wake-up were missed).
    const WAIT_SLICE: Duration = Duration::from_millis(100);

    /// One caller's request and answer counters (own cache line).
    #[repr(C, align(64))]
    struct Slot {
        req: AtomicU32,
        ans: AtomicU32,
        /// The caller sleeps (or is about to) on `ans`.
        waiting: AtomicU32,
    }

    /// One server thread's doorbell (own cache line).
    #[repr(C, align(64))]
    struct Server {
        bell: AtomicU32,
        sleeping: AtomicU32,
    }

    #[repr(C)]
    struct Shared {
        stop: AtomicU32,
        servers: [Server; MAX_SERVERS],
        slots: [Slot; MAX_CALLERS],
    }

    /// Runs THREADS callers against SERVERS signing threads in a child for `time`; returns
    /// round trips per second and the CPU seconds of both processes.
    pub(super) fn run(
        key: &Key,
        sig_len: usize,
        threads: usize,
        servers: usize,
        time: Duration,
    ) -> Result<(f64, f64)> {
        if threads == 0 || threads > MAX_CALLERS || servers == 0 || servers > MAX_SERVERS {
            bail!("1..={MAX_CALLERS} threads and 1..={MAX_SERVERS} servers");
        }
        let len = std::mem::size_of::<Shared>();
        // SAFETY: a fresh anonymous shared mapping, zero-filled (all-zero atomics are
        // valid); it lives until both processes exit and is never unmapped.
        let shared: &'static Shared = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                bail!("mmap: {}", std::io::Error::last_os_error());
            }
            &*p.cast::<Shared>()
        };
        // SAFETY: the process has one thread here (nothing was spawned yet), so the child
        // may run arbitrary code.
        let child = unsafe { libc::fork() };
        if child < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if child == 0 {
            serve(shared, key, sig_len, threads, servers);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        let count = std::sync::atomic::AtomicU64::new(0);
        // A caller left without an answer a second past the deadline (the child died).
        let unanswered = std::sync::atomic::AtomicBool::new(false);
        let start = Instant::now();
        let deadline = start + time;
        let give_up = deadline + Duration::from_secs(1);
        std::thread::scope(|sc| {
            for i in 0..threads {
                let (count, unanswered) = (&count, &unanswered);
                sc.spawn(move || {
                    let (slot, server) = (&shared.slots[i], &shared.servers[i % servers]);
                    let mut seq = 0u32;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        seq = seq.wrapping_add(1);
                        slot.req.store(seq, SeqCst);
                        if server.sleeping.load(SeqCst) != 0 {
                            server.bell.fetch_add(1, SeqCst);
                            futex_wake(&server.bell);
                        }
                        loop {
                            let cur = slot.ans.load(Acquire);
                            if cur == seq {
                                break;
                            }
                            if Instant::now() > give_up {
                                unanswered.store(true, Relaxed);
                                return;
                            }
                            slot.waiting.store(1, SeqCst);
                            if slot.ans.load(SeqCst) != seq {
                                futex_wait(&slot.ans, cur, WAIT_SLICE);
                            }
                            slot.waiting.store(0, Relaxed);
                        }
                        n += 1;
                    }
                    count.fetch_add(n, Relaxed);
                });
            }
        });
        let rate = count.load(Relaxed) as f64 / start.elapsed().as_secs_f64();
        shared.stop.store(1, SeqCst);
        for s in &shared.servers[..servers] {
            s.bell.fetch_add(1, SeqCst);
            futex_wake(&s.bell);
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        if unsafe { libc::waitpid(child, &mut status, 0) } != child
            || !libc::WIFEXITED(status)
            || libc::WEXITSTATUS(status) != 0
        {
            bail!("the signing child failed (status {status})");
        }
        if unanswered.load(Relaxed) {
            bail!("a caller got no answer from the signing child");
        }
        Ok((
            rate,
            rusage_seconds(libc::RUSAGE_SELF) + rusage_seconds(libc::RUSAGE_CHILDREN),
        ))
    }

    /// The child: `servers` threads, each answering the slots `s, s + servers, …`.
    fn serve(shared: &Shared, key: &Key, sig_len: usize, threads: usize, servers: usize) {
        std::thread::scope(|sc| {
            for s in 0..servers {
                sc.spawn(move || {
                    let me = &shared.servers[s];
                    let mine: Vec<&Slot> = shared.slots[..threads]
                        .iter()
                        .skip(s)
                        .step_by(servers)
                        .collect();
                    let mut served = vec![0u32; mine.len()];
                    let mut buf = vec![0u8; sig_len];
                    loop {
                        let bell = me.bell.load(SeqCst);
                        let mut any = false;
                        for (slot, done) in mine.iter().zip(served.iter_mut()) {
                            let r = slot.req.load(Acquire);
                            if r != *done {
                                if key.sign(&mut buf).is_err() {
                                    // SAFETY: ends the child at once with a failure
                                    // status (the parent's callers give up, waitpid
                                    // reports it).
                                    unsafe { libc::_exit(1) };
                                }
                                *done = r;
                                slot.ans.store(r, SeqCst);
                                if slot.waiting.load(SeqCst) != 0 {
                                    futex_wake(&slot.ans);
                                }
                                any = true;
                            }
                        }
                        if shared.stop.load(SeqCst) != 0 {
                            return;
                        }
                        if !any {
                            me.sleeping.store(1, SeqCst);
                            let pending = mine
                                .iter()
                                .zip(&served)
                                .any(|(slot, done)| slot.req.load(SeqCst) != *done);
                            if !pending {
                                futex_wait(&me.bell, bell, WAIT_SLICE);
                            }
                            me.sleeping.store(0, SeqCst);
                        }
                    }
                });
            }
        });
    }
}
