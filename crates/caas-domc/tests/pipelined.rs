//! The pipelined transport (`caas_pkcs11::mux` in the module, batched answers in
//! `caas_domc::server`), through the real module, the `cryptoki` crate and a real crypto
//! domain process: many threads signing at once share a few connections, and yet each gets
//! a signature over its own data, every request is still checked on its own in the domain
//! (a use limit cuts off exactly at its count, whichever thread's request comes first) and
//! every key use — granted or refused — has its own audit record.

mod common;

use anyhow::{Context as _, Result, bail, ensure};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use caas_vsm_proto::{Body, PROTOCOL_VERSION, Request, Response, frame_message};
use common::*;
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::io::{Read as _, Write as _};

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const THREADS: usize = 8;
const PER_THREAD: usize = 40;
const LIMIT: usize = 100;

/// One signing attempt: the message and what C_Sign answered.
type Attempt = (Vec<u8>, Result<Vec<u8>, CkError>);

/// An attacker's position here is a thread of the workload racing the others for a
/// limited key: pipelining must not let a batch slip past the per-use check, and must not
/// hand one thread's signature to another.
#[test]
fn concurrent_pipelined_signatures_are_each_checked_and_audited() -> Result<()> {
    let Some(dir) = child_dir() else {
        return run_in_child("concurrent_pipelined_signatures_are_each_checked_and_audited");
    };
    let dom = Dom::start_in(&dir, &[])?;
    caas_domc::dev::init_token(&dom.socket, 0, "pipes", SO_PIN, USER_PIN)?;
    let p = Pkcs11::new(module()?)?;
    p.initialize(CInitializeArgs::OsThreads)?;
    let slot = p.get_slots_with_token()?[0];
    let s = p.open_rw_session(slot)?;
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
    let (public, private) = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
        &[
            Attribute::Sign(true),
            Attribute::VendorDefined((
                AttributeType::VendorDefined(caas_vsm_proto::attr::CKA_CAAS_MAX_USES),
                (LIMIT as u64).to_ne_bytes().to_vec(),
            )),
        ],
    )?;
    let point = match s.get_attributes(public, &[AttributeType::EcPoint])?.pop() {
        // DER OCTET STRING around the 65-byte uncompressed point.
        Some(Attribute::EcPoint(p)) if p.len() == 67 => p[2..].to_vec(),
        other => bail!("EC point: {other:?}"),
    };
    let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point);

    let results: Vec<Vec<Attempt>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let (p, verifier) = (&p, &verifier);
                sc.spawn(move || -> Result<Vec<_>> {
                    let ts = p.open_ro_session(slot)?;
                    let mut out = Vec::new();
                    for i in 0..PER_THREAD {
                        let msg = format!("thread {t} message {i}").into_bytes();
                        let r = ts.sign(&Mechanism::EcdsaSha256, private, &msg);
                        if let Ok(sig) = &r {
                            verifier.verify(&msg, sig).map_err(|_| {
                                anyhow::anyhow!("thread {t} #{i}: not its signature")
                            })?;
                        }
                        out.push((msg, r));
                    }
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    // The pipes run over shared-memory rings (caas_vsm_proto::ring), not silently over the
    // socket: the domain maps one ring per pipe while the module holds them (none when the
    // module is told to stay on the socket, CAAS_PKCS11_RING=0).
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", dom.child.id()))?;
    let want_ring = std::env::var("CAAS_PKCS11_RING").map_or(true, |v| v != "0");
    ensure!(
        maps.contains("memfd:caas-vsm-ring") == want_ring,
        "shared-memory ring in use: {}, wanted: {want_ring}",
        !want_ring
    );
    let (mut granted, mut refused) = (0, 0);
    for (msg, r) in results.iter().flatten() {
        match r {
            Ok(_) => granted += 1,
            Err(CkError::Pkcs11(RvError::FunctionRejected, _)) => refused += 1,
            Err(e) => bail!("{}: {e}", String::from_utf8_lossy(msg)),
        }
    }
    ensure!(
        granted == LIMIT && refused == THREADS * PER_THREAD - LIMIT,
        "use limit {LIMIT}: {granted} granted, {refused} refused"
    );
    // A logout writes the audit log through (routine records may wait up to 100 ms).
    s.logout()?;
    let entries = caas_domc::audit::verify_with_key_file(
        &dom.state_dir().join("audit.log"),
        &dom.state_dir().join("domain.key"),
    )?;
    let signs = |rv: &str| {
        entries
            .iter()
            .filter(|e| e.op == "C_Sign" && e.rv == rv)
            .count()
    };
    // The first signature of each session is validated through C_SignInit (audited as
    // such); the rest are fused C_Sign requests, one record each.
    let inits = entries
        .iter()
        .filter(|e| e.op == "C_SignInit" && e.rv == "0x0")
        .count();
    ensure!(
        signs("0x0") + inits == LIMIT,
        "granted uses audited: {} C_Sign + {inits} C_SignInit",
        signs("0x0")
    );
    ensure!(
        signs("0x200")
            + entries
                .iter()
                .filter(|e| e.op == "C_SignInit" && e.rv == "0x200")
                .count()
            == THREADS * PER_THREAD - LIMIT,
        "refused uses audited: {}",
        signs("0x200")
    );
    Ok(())
}

/// The domain side: requests written back to back in one write are answered in order, one
/// answer each (a refused one included), and a malformed frame after them closes only that
/// connection after the earlier answers went out.
#[test]
fn pipelined_requests_are_answered_in_order() -> Result<()> {
    let dom = Dom::start_initialised("order", &[])?;
    let mut c = std::os::unix::net::UnixStream::connect(&dom.socket)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut batch = frame_message(&Request::Hello {
        version: PROTOCOL_VERSION,
        app: [9; 16],
    })?;
    let slots = [0u64, 7, 0, 99, 0];
    for slot in slots {
        batch.extend(frame_message(&Request::GetSlotInfo { slot })?);
    }
    batch.extend_from_slice(&[0, 0, 0, 1, 0xff]); // a frame with an unknown tag
    c.write_all(&batch)?;
    let mut read =
        || -> Result<Response> { caas_vsm_proto::blocking::read_message(&mut c).context("answer") };
    ensure!(read()?.rv == 0, "hello");
    for slot in slots {
        let r = read()?;
        match slot {
            0 => ensure!(
                r.rv == 0 && matches!(r.body, Body::Slot { .. }),
                "slot 0: {r:?}"
            ),
            _ => ensure!(
                r.rv == cryptoki_sys::CKR_SLOT_ID_INVALID,
                "slot {slot}: {r:?}"
            ),
        }
    }
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)?;
    ensure!(rest.is_empty(), "answer to a malformed frame: {rest:?}");
    Ok(())
}
