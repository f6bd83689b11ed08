//! The shared-memory ring (`caas_vsm_proto::ring`, served by `caas_domc::server`) from the
//! position of a compromised workload: the module's process owns its half of the mapping
//! and can write any byte or index of it at any time. Each test plays such a client against
//! a real crypto domain process and checks that the domain fails closed (the connection
//! ends, with a `RingViolation` audit record where the ring's rules were broken), never
//! reads past its ring, parses only its own copy of a request, keeps the flooding client's
//! memory bounded, stays up for everyone else, and never puts one connection's traffic in
//! another's ring.

mod common;

use anyhow::{Context as _, Result, bail, ensure};
use caas_vsm_proto::blocking::{read_message, write_message};
use caas_vsm_proto::ring::{self, RING_BYTES, RawWord};
use caas_vsm_proto::{
    Attr, Blob, Body, MechParam, Mechanism, PROTOCOL_VERSION, Request, Response, Secret, attr,
    frame_message,
};
use common::*;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A client speaking to the domain over a ring it can also scribble on.
struct Hostile {
    sock: UnixStream,
    rx: ring::Rx<UnixStream>,
    tx: ring::Tx<UnixStream>,
    ino: u64,
    /// The memfd (a second mapping of it plays a concurrent scribbler).
    fd: std::os::fd::OwnedFd,
}

impl Hostile {
    fn open(dom: &Dom, app: [u8; 16]) -> Result<Self> {
        let mut sock = UnixStream::connect(&dom.socket)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        write_message(
            &mut sock,
            &Request::Hello {
                version: PROTOCOL_VERSION,
                app,
            },
        )?;
        let r: Response = read_message(&mut sock)?;
        ensure!(r.rv == 0, "hello: {r:?}");
        write_message(&mut sock, &Request::RingOpen {})?;
        let mut buf = [0u8; 64];
        let (n, fd) = ring::recv_with_fd(&sock, &mut buf)?;
        let fd = fd.context("no memfd with the RingOpen answer")?;
        let r: Response = caas_vsm_proto::from_bytes(&buf[4..n])?;
        ensure!(r.rv == 0, "RingOpen: {r:?}");
        let ino = nix::sys::stat::fstat(&fd)?.st_ino;
        let map = ring::attach(&fd)?;
        let (rx, tx) = ring::endpoints(
            map,
            ring::Side::Client,
            sock.try_clone()?,
            sock.try_clone()?,
            Some(Duration::from_secs(10)),
        );
        Ok(Self {
            sock,
            rx,
            tx,
            ino,
            fd,
        })
    }

    fn send(&mut self, req: &Request) -> Result<()> {
        self.tx
            .send(&frame_message(req)?)
            .map_err(|e| anyhow::anyhow!("ring send: {e:?}"))
    }

    fn call(&mut self, req: &Request) -> Result<Response> {
        self.send(req)?;
        read_message(&mut self.rx).context("answer over the ring")
    }

    fn word(&self, w: RawWord) -> &std::sync::atomic::AtomicU32 {
        self.rx.map().raw_word(w)
    }

    /// Whether the domain ended the connection (the socket reads EOF) within `t`.
    fn closed_within(&self, t: Duration) -> Result<bool> {
        use std::io::Read as _;
        let mut s = self.sock.try_clone()?;
        s.set_read_timeout(Some(t))?;
        let mut b = [0u8; 1];
        Ok(matches!(s.read(&mut b), Ok(0)))
    }

    /// Opens a logged-in session and makes an ECDSA P-256 key pair; returns
    /// (session, private key, public point).
    fn signing_key(&mut self) -> Result<(u64, u64, Vec<u8>)> {
        let s = match self
            .call(&Request::OpenSession {
                slot: 0,
                flags: cryptoki_sys::CKF_SERIAL_SESSION | cryptoki_sys::CKF_RW_SESSION,
            })?
            .body
        {
            Body::Ulong { value } => value,
            b => bail!("open session: {b:?}"),
        };
        let r = self.call(&Request::Login {
            session: s,
            user_type: cryptoki_sys::CKU_USER,
            pin: Secret::new(USER_PIN.as_bytes().to_vec()),
        })?;
        ensure!(r.rv == 0, "login: {r:?}");
        let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
        let r = self.call(&Request::GenerateKeyPair {
            session: s,
            mechanism: Mechanism {
                mechanism: cryptoki_sys::CKM_EC_KEY_PAIR_GEN,
                param: MechParam::None {},
            },
            public_template: vec![a(
                cryptoki_sys::CKA_EC_PARAMS,
                caas_domc::der::OID_P256.to_vec(),
            )],
            private_template: vec![a(cryptoki_sys::CKA_SIGN, attr::boolean(true))],
        })?;
        let Body::KeyPair { public, private } = r.body else {
            bail!("key pair: {r:?}");
        };
        let r = self.call(&Request::GetAttributeValue {
            session: s,
            object: public,
            types: vec![cryptoki_sys::CKA_EC_POINT],
        })?;
        let point = match r.body {
            Body::Attrs { values } => match values.into_iter().next() {
                Some(caas_vsm_proto::AttrValue::Value { value }) => value.0,
                v => bail!("EC point: {v:?}"),
            },
            b => bail!("EC point: {b:?}"),
        };
        let raw = caas_domc::der::octet_string(&point)
            .unwrap_or(&point)
            .to_vec();
        Ok((s, private, raw))
    }
}

fn sign_once(session: u64, key: u64, data: &[u8]) -> Request {
    Request::SignOnce {
        session,
        mechanism: Mechanism {
            mechanism: cryptoki_sys::CKM_ECDSA_SHA256,
            param: MechParam::None {},
        },
        key,
        data: Blob(data.to_vec()),
    }
}

fn verifies(point: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        point,
    )
    .verify(msg, sig)
    .is_ok()
}

/// The domain's audit has a `RingViolation` record for `app` (non-routine records are
/// written through at once; polled briefly all the same).
fn violation_audited(dom: &Dom, app: [u8; 16]) -> Result<()> {
    let app_hex: String = app[..8].iter().map(|b| format!("{b:02x}")).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entries = caas_domc::audit::verify_with_key_file(
            &dom.state_dir().join("audit.log"),
            &dom.state_dir().join("domain.key"),
        )?;
        if entries
            .iter()
            .any(|e| e.op == "RingViolation" && e.app == app_hex && e.rv == "0x200")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no RingViolation audit record for {app_hex}: {:?}",
                entries.iter().map(|e| &e.op).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everyone else is still served: a fresh ring connection signs and verifies.
fn still_serves(dom: &mut Dom) -> Result<()> {
    ensure!(
        dom.child.try_wait()?.is_none(),
        "the crypto domain process died"
    );
    let mut c = Hostile::open(dom, [0x77; 16])?;
    let (s, k, point) = c.signing_key()?;
    let r = c.call(&sign_once(s, k, b"still here"))?;
    let Body::Data { data } = r.body else {
        bail!("sign after the attack: {r:?}");
    };
    ensure!(verifies(&point, b"still here", &data.0), "bad signature");
    Ok(())
}

/// A producer index published more than a ring ahead (it would make the domain read past
/// its ring, or re-read stale bytes as a request): the connection ends and it is audited.
#[test]
fn producer_index_beyond_the_ring_fails_closed_and_is_audited() -> Result<()> {
    let mut dom = Dom::start_initialised("ring1", &[])?;
    let app = [0xa1; 16];
    let c = Hostile::open(&dom, app)?;
    c.word(RawWord::ReqHead)
        .store(RING_BYTES as u32 + 17, Ordering::SeqCst);
    // Wake the domain if it sleeps.
    c.word(RawWord::DomainSleeping).store(0, Ordering::SeqCst);
    ensure!(
        c.closed_within(Duration::from_secs(5))?,
        "the domain kept the connection open"
    );
    violation_audited(&dom, app)?;
    still_serves(&mut dom)
}

/// The answer ring's consumer index rewritten past what the domain wrote (to make it
/// believe there is room that is not, or to confuse its accounting): fails closed, audited.
#[test]
fn consumer_index_beyond_the_answers_fails_closed_and_is_audited() -> Result<()> {
    let mut dom = Dom::start_initialised("ring2", &[])?;
    let app = [0xa2; 16];
    let mut c = Hostile::open(&dom, app)?;
    let r = c.call(&Request::GetSlotList {
        token_present: true,
    })?;
    ensure!(r.rv == 0, "{r:?}");
    let head = c.word(RawWord::RespHead).load(Ordering::SeqCst);
    c.word(RawWord::RespTail)
        .store(head.wrapping_add(4096), Ordering::SeqCst);
    c.send(&Request::GetSlotList {
        token_present: true,
    })?;
    ensure!(
        c.closed_within(Duration::from_secs(5))?,
        "the domain kept the connection open"
    );
    violation_audited(&dom, app)?;
    still_serves(&mut dom)
}

/// A request rewritten in the ring after it was published (length, key handle, data): the
/// domain copied it out once before parsing, so the answer is the one to the request as
/// first published — the rewrite neither changes what was checked nor what was signed.
#[test]
fn request_rewritten_after_publishing_is_served_from_the_domains_copy() -> Result<()> {
    let mut dom = Dom::start_initialised("ring3", &[])?;
    let mut c = Hostile::open(&dom, [0xa3; 16])?;
    let (s, k, point) = c.signing_key()?;
    let msg = b"the message as published";
    let frame = frame_message(&sign_once(s, k, msg))?;
    let at = c.word(RawWord::ReqHead).load(Ordering::SeqCst);
    c.tx.send(&frame).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Wait until the domain has consumed the frame, then rewrite it in place: a huge
    // length, another key handle, other data.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.word(RawWord::ReqTail).load(Ordering::SeqCst) != at.wrapping_add(frame.len() as u32) {
        ensure!(
            Instant::now() < deadline,
            "the domain never consumed the frame"
        );
        std::hint::spin_loop();
    }
    let mut evil = frame_message(&sign_once(s, k ^ 0xffff, b"the message as rewritten!"))?;
    evil[..4].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.rx.map().raw_write_request(at, &evil);
    let r: Response = read_message(&mut c.rx)?;
    let Body::Data { data } = r.body else {
        bail!("answer: {r:?}");
    };
    ensure!(
        verifies(&point, msg, &data.0),
        "the signature is not over the request as published"
    );
    still_serves(&mut dom)
}

/// A client racing its own requests: one thread keeps rewriting the length words and bytes
/// of the request ring while another publishes requests. Whatever the domain copied is
/// either a request it checks and answers, or a malformed frame that ends the connection
/// (the client then opens a new one); the domain never crashes, never reads outside its
/// ring, and serves others meanwhile.
#[test]
fn concurrent_scribbling_on_the_ring_never_crashes_the_domain() -> Result<()> {
    let mut dom = Dom::start_initialised("ring4", &[])?;
    let (mut answered, mut verified, mut ended) = (0u32, 0u32, 0u32);
    for round in 0..5u32 {
        let mut c = Hostile::open(&dom, [0x40 + round as u8; 16])?;
        let (s, k, point) = c.signing_key()?;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let second = ring::attach(&c.fd)?;
        std::thread::scope(|sc| -> Result<()> {
            let (map, stop) = (&second, &stop);
            sc.spawn(move || {
                let mut x = 0x9e37_79b9u32 ^ round;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    // Mostly at the frame being published (its length word and first
                    // bytes, right behind the producer index), sometimes anywhere.
                    let at = if x.is_multiple_of(4) {
                        x
                    } else {
                        map.raw_word(RawWord::ReqHead)
                            .load(Ordering::Relaxed)
                            .wrapping_sub(x % 64)
                    };
                    map.raw_write_request(at, &x.to_le_bytes());
                    std::thread::sleep(Duration::from_micros(u64::from(x % 500)));
                }
            });
            for i in 0..300u32 {
                let msg = format!("racing message {round} {i}");
                if c.tx
                    .send(&frame_message(&sign_once(s, k, msg.as_bytes()))?)
                    .is_err()
                {
                    ended += 1;
                    break;
                }
                let Ok(r) = read_message::<_, Response>(&mut c.rx) else {
                    ended += 1;
                    break;
                };
                answered += 1;
                if let Body::Data { data } = &r.body {
                    verified += u32::from(verifies(&point, msg.as_bytes(), &data.0));
                }
            }
            stop.store(true, Ordering::Relaxed);
            Ok(())
        })?;
        ensure!(dom.child.try_wait()?.is_none(), "the crypto domain died");
    }
    eprintln!("scribbled ring: {answered} answered ({verified} verified), {ended} ended");
    ensure!(
        answered > 0 && verified > 0,
        "no request got through at all"
    );
    still_serves(&mut dom)
}

/// A client that floods its ring with requests and never reads an answer: the domain stops
/// when the answer ring is full (no unbounded buffering), the flood's own writes then block,
/// other clients are served meanwhile, and hanging up frees the domain's thread.
#[test]
fn flooding_the_ring_is_bounded_and_does_not_starve_others() -> Result<()> {
    let mut dom = Dom::start_initialised("ring5", &[])?;
    let pid = dom.child.id();
    let threads =
        || -> Result<usize> { Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count()) };
    let before = threads()?;
    let c = Hostile::open(&dom, [0xa5; 16])?;
    let frame = frame_message(&Request::GetSlotInfo { slot: 0 })?;
    let mut sent = 0usize;
    let start = Instant::now();
    // The flood's writes must block within (request ring + answer ring) worth of traffic.
    let mut tx = c.tx;
    let (ftx, frx) = std::sync::mpsc::channel();
    let flooder = std::thread::spawn(move || {
        let mut sent = 0usize;
        while tx.send(&frame).is_ok() {
            sent += frame.len();
            let _ = ftx.send(sent);
        }
        tx
    });
    std::thread::sleep(Duration::from_secs(2));
    while let Ok(n) = frx.try_recv() {
        sent = n;
    }
    ensure!(
        sent <= 4 * RING_BYTES + 64 * 1024 + 4096,
        "the domain accepted {sent} bytes of requests without answers being read"
    );
    // Others are served meanwhile.
    still_serves(&mut dom)?;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(!rss.is_empty());
    // Hanging up ends the flood and the domain's connection thread.
    c.sock.shutdown(std::net::Shutdown::Both)?;
    drop(c.rx);
    let tx = flooder
        .join()
        .map_err(|_| anyhow::anyhow!("flooder panicked"))?;
    drop(tx);
    drop(c.sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads()? > before {
        ensure!(
            Instant::now() < deadline,
            "the domain's thread for the flooding connection did not end ({} > {before}) after {:?}",
            threads()?,
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Two connections never share a ring: each gets its own memfd, and what one connection
/// signs never appears in the other's mapping (a workload cannot read another session's
/// requests or answers, nor another application's).
#[test]
fn a_second_connection_never_shares_a_ring() -> Result<()> {
    let dom = Dom::start_initialised("ring6", &[])?;
    let mut a = Hostile::open(&dom, [0xa6; 16])?;
    let mut b = Hostile::open(&dom, [0xb6; 16])?;
    ensure!(a.ino != b.ino, "two connections got the same memfd");
    let (s, k, point) = b.signing_key()?;
    let secret_msg = b"b's confidential message 5f3c9a".to_vec();
    let r = b.call(&sign_once(s, k, &secret_msg))?;
    let Body::Data { data: sig } = r.body else {
        bail!("sign: {r:?}");
    };
    ensure!(verifies(&point, &secret_msg, &sig.0));
    // A's own traffic goes on, and its mapping holds nothing of B's.
    let r = a.call(&Request::GetSlotList {
        token_present: true,
    })?;
    ensure!(r.rv == 0);
    let snap = a.rx.map().raw_snapshot();
    let has = |needle: &[u8]| snap.windows(needle.len()).any(|w| w == needle);
    ensure!(!has(&secret_msg), "B's request is visible in A's ring");
    ensure!(!has(&sig.0), "B's signature is visible in A's ring");
    Ok(())
}

/// The memfd a client receives is sealed: shrinking it under the domain's mapping (which
/// would fault the domain with SIGBUS on its next access) is refused by the kernel, and the
/// domain goes on serving that very connection. A second RingOpen is refused.
#[test]
fn the_ring_memfd_cannot_be_shrunk_and_is_offered_once() -> Result<()> {
    let mut dom = Dom::start_initialised("ring7", &[])?;
    let mut sock = UnixStream::connect(&dom.socket)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    write_message(
        &mut sock,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            app: [0xa7; 16],
        },
    )?;
    let _: Response = read_message(&mut sock)?;
    write_message(&mut sock, &Request::RingOpen {})?;
    let mut buf = [0u8; 64];
    let (_, fd) = ring::recv_with_fd(&sock, &mut buf)?;
    let fd = fd.context("no memfd")?;
    ensure!(
        nix::unistd::ftruncate(&fd, 0).is_err(),
        "the client could shrink the ring memfd"
    );
    ensure!(
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE)
        )
        .is_err(),
        "the client could add seals"
    );
    let map = ring::attach(&fd)?;
    let (mut rx, mut tx) = ring::endpoints(
        map,
        ring::Side::Client,
        sock.try_clone()?,
        sock.try_clone()?,
        Some(Duration::from_secs(10)),
    );
    tx.send(&frame_message(&Request::RingOpen {})?)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let r: Response = read_message(&mut rx)?;
    ensure!(
        r.rv == cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED,
        "second RingOpen: {r:?}"
    );
    tx.send(&frame_message(&Request::GetSlotList {
        token_present: true,
    })?)
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let r: Response = read_message(&mut rx)?;
    ensure!(r.rv == 0, "after the attempts: {r:?}");
    still_serves(&mut dom)
}

/// The answer count and the wake words are the domain's to write, but the module can write
/// them too: a client that sets every wake word's sleeping bit and scribbles the answer
/// count only makes the domain wake it (or not); the domain's answers, read from the ring,
/// stay right, and nothing else changes.
#[test]
fn scribbled_wake_words_only_change_whom_the_domain_wakes() -> Result<()> {
    let mut dom = Dom::start_initialised("ring8", &[])?;
    let mut c = Hostile::open(&dom, [0xa8; 16])?;
    let (s, k, point) = c.signing_key()?;
    let second = ring::attach(&c.fd)?;
    let snap = second.raw_snapshot();
    ensure!(snap.len() == ring::MAP_BYTES);
    for i in 0..50u32 {
        // Every control word of the header page after the indices: sleeping bits set,
        // absurd counts.
        for off in (448..4096).step_by(64) {
            second
                .raw_header_word(off)
                .store(0xffff_ffff ^ i, Ordering::SeqCst);
        }
        let msg = format!("wake words scribbled {i}");
        let r = c.call(&sign_once(s, k, msg.as_bytes()))?;
        let Body::Data { data } = r.body else {
            bail!("sign {i}: {r:?}");
        };
        ensure!(verifies(&point, msg.as_bytes(), &data.0), "signature {i}");
    }
    still_serves(&mut dom)
}

/// The `C_Sign` audit records of `app` (chain and tags verified), in log order.
fn sign_records(dom: &Dom, app: [u8; 16]) -> Result<Vec<caas_domc::audit::Entry>> {
    let app_hex: String = app[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(caas_domc::audit::verify_with_key_file(
        &dom.state_dir().join("audit.log"),
        &dom.state_dir().join("domain.key"),
    )?
    .into_iter()
    .filter(|e| e.op == "C_Sign" && e.app == app_hex)
    .collect())
}

/// Routine key uses reach the file at most this late (`caas_domc::audit`'s flush interval,
/// 100 ms) plus scheduling slack on a loaded machine.
const AUDIT_BOUND: Duration = Duration::from_millis(100 + 400);

/// Two compromised workloads each flood their ring with a burst of signing requests (the
/// domain serves them in passes of many requests per wake-up, answers batched) and hang up
/// at once, without waiting: every signature the domain answered is in the audit log, once,
/// attributed to its application, key and mechanism, in the order served (one verified
/// chain), within the documented bound — a flood can neither drop nor reorder records. A
/// third hangs up in the middle of its burst: the log holds at least every answer it read
/// and never more records than requests it sent.
#[test]
fn a_signing_flood_and_a_hang_up_mid_batch_leave_every_served_signature_audited() -> Result<()> {
    const N: usize = 400;
    let dom = Dom::start_initialised("ring-audit", &[])?;
    let apps = [[0x31; 16], [0x32; 16], [0x33; 16]];
    let mut clients = Vec::new();
    for app in apps {
        let mut c = Hostile::open(&dom, app)?;
        let (s, k, point) = c.signing_key()?;
        clients.push((c, s, k, point));
    }
    let (third, flooders) = clients.split_last_mut().context("three clients")?;
    // The two full floods run concurrently: their records interleave in one chain.
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = flooders
            .iter_mut()
            .map(|(c, s, k, point)| {
                sc.spawn(move || -> Result<()> {
                    let mut burst = Vec::new();
                    for i in 0..N {
                        let msg = format!("flood {i}");
                        burst.extend_from_slice(&frame_message(&sign_once(
                            *s,
                            *k,
                            msg.as_bytes(),
                        ))?);
                    }
                    c.tx.send(&burst)
                        .map_err(|e| anyhow::anyhow!("ring send: {e:?}"))?;
                    for i in 0..N {
                        let r: Response = read_message(&mut c.rx).context("answer")?;
                        let Body::Data { data } = r.body else {
                            bail!("signature {i}: {r:?}");
                        };
                        ensure!(
                            verifies(point, format!("flood {i}").as_bytes(), &data.0),
                            "answer {i} is not the signature of request {i}"
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("flooder panicked"))??;
        }
        Ok(())
    })?;
    // The third sends a burst and hangs up after reading a tenth of the answers.
    let (c, s, k, _) = third;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend_from_slice(&frame_message(&sign_once(
            *s,
            *k,
            format!("cut {i}").as_bytes(),
        ))?);
    }
    c.tx.send(&burst)
        .map_err(|e| anyhow::anyhow!("ring send: {e:?}"))?;
    for _ in 0..N / 10 {
        let _: Response = read_message(&mut c.rx).context("answer before the hang-up")?;
    }
    let hung_up = Instant::now();
    let handles: Vec<u64> = clients.iter().map(|(_, _, k, _)| *k).collect();
    for (c, ..) in clients {
        c.sock.shutdown(std::net::Shutdown::Both)?;
    }
    std::thread::sleep(AUDIT_BOUND);
    for (i, app) in apps.iter().enumerate() {
        let recs = sign_records(&dom, *app)?;
        for r in &recs {
            ensure!(
                r.rv == "0x0"
                    && r.mechanism == format!("0x{:x}", cryptoki_sys::CKM_ECDSA_SHA256)
                    && r.object.starts_with(&format!("{}:", handles[i])),
                "record not attributable to its key use: {r:?}"
            );
        }
        // Served in order: the seqs of one application's records only go up.
        ensure!(
            recs.windows(2).all(|w| w[0].seq < w[1].seq),
            "records out of order"
        );
        if i < 2 {
            ensure!(
                recs.len() == N,
                "app {i}: {} C_Sign records for {N} answered signatures ({:?} after the hang-up)",
                recs.len(),
                hung_up.elapsed()
            );
        } else {
            ensure!(
                (N / 10..=N).contains(&recs.len()),
                "hung-up app: {} C_Sign records, {} answers read, {N} sent",
                recs.len(),
                N / 10
            );
        }
    }
    Ok(())
}

/// The durability bound of routine key uses, as documented in `caas_domc::audit`: a
/// signature the domain answered is in the audit file within the flush interval even when
/// nothing else happens afterwards (the flusher thread writes it), so a `kill -9` after
/// that bound loses none of them.
#[test]
fn answered_signatures_survive_kill_9_after_the_flush_bound() -> Result<()> {
    let mut dom = Dom::start_initialised("ring-kill", &[])?;
    let app = [0x41; 16];
    let mut c = Hostile::open(&dom, app)?;
    let (s, k, _) = c.signing_key()?;
    for i in 0..50 {
        let r = c.call(&sign_once(s, k, format!("kill {i}").as_bytes()))?;
        ensure!(r.rv == 0, "sign {i}: {r:?}");
    }
    // The connection stays open (no hang-up, no further request: only the flusher writes).
    std::thread::sleep(AUDIT_BOUND);
    dom.kill()?;
    let recs = sign_records(&dom, app)?;
    ensure!(
        recs.len() == 50,
        "{} of 50 answered signatures in the audit after kill -9",
        recs.len()
    );
    drop(c);
    Ok(())
}
