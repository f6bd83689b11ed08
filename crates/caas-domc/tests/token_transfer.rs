//! Token export and import between two real crypto domains (`caas-domc domc serve
//! --ephemeral-key --control-stdio`, as the host agent runs them), over the control channel
//! only the parent holds (`caas_domc::transfer`): a key pair made in the first domain after
//! its token was initialised signs in the second, and the signature verifies under the
//! public key read before. Attacks, each audited by the importing domain: a tampered
//! export, an export replayed into another context (a later resume), a second import, an
//! import once a session is open.

mod common;

use anyhow::{Context, Result, bail, ensure};
use caas_domc::client::Client;
use caas_domc::transfer::{Control, ControlError, TransferKey};
use caas_vsm_proto::{Attr, AttrValue, Blob, Body, MechParam, Mechanism, Request, Secret, attr};
use common::{SO_PIN, USER_PIN};
use cryptoki_sys::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Vsm {
    child: Child,
    control: Control,
    socket: PathBuf,
    state: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Vsm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Result<Vsm> {
    let tmp = tempfile::tempdir()?;
    let socket = tmp.path().join("vsm.sock");
    let state = tmp.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args([
            "domc",
            "serve",
            "--ephemeral-key",
            "--control-stdio",
            "--run-as",
            "0:0",
            "--state-dir",
        ])
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning caas-domc")?;
    let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("no control pipes");
    };
    caas_domc::dev::wait_for_socket(&socket, Duration::from_secs(10))?;
    caas_domc::dev::init_token(&socket, 0, "tenant", SO_PIN, USER_PIN)?;
    Ok(Vsm {
        child,
        control: Control::new(to, from),
        socket,
        state,
        _tmp: tmp,
    })
}

fn login(socket: &Path) -> Result<(Client, u64)> {
    let mut c = Client::connect(socket)?;
    let session = match c.call(Request::OpenSession {
        slot: 0,
        flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
    })? {
        Body::Ulong { value } => value,
        b => bail!("OpenSession: {b:?}"),
    };
    c.call(Request::Login {
        session,
        user_type: CKU_USER,
        pin: Secret::new(USER_PIN.as_bytes().to_vec()),
    })?;
    Ok((c, session))
}

const ID: &[u8] = b"tenant-tls-1";

/// Generates a P-256 token key pair with CKA_ID [`ID`]; returns the public point (DER).
fn make_key(socket: &Path) -> Result<Vec<u8>> {
    let (mut c, session) = login(socket)?;
    let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
    let t = || attr::boolean(true);
    let public = match c.call(Request::GenerateKeyPair {
        session,
        mechanism: Mechanism {
            mechanism: CKM_EC_KEY_PAIR_GEN,
            param: MechParam::None {},
        },
        public_template: vec![
            a(CKA_EC_PARAMS, caas_domc::der::OID_P256.to_vec()),
            a(CKA_ID, ID.to_vec()),
            a(CKA_TOKEN, t()),
            a(CKA_VERIFY, t()),
        ],
        private_template: vec![a(CKA_ID, ID.to_vec()), a(CKA_TOKEN, t()), a(CKA_SIGN, t())],
    })? {
        Body::KeyPair { public, .. } => public,
        b => bail!("GenerateKeyPair: {b:?}"),
    };
    match c.call(Request::GetAttributeValue {
        session,
        object: public,
        types: vec![CKA_EC_POINT],
    })? {
        Body::Attrs { values } => match values.into_iter().next() {
            Some(AttrValue::Value { value }) => Ok(value.0),
            v => bail!("CKA_EC_POINT: {v:?}"),
        },
        b => bail!("GetAttributeValue: {b:?}"),
    }
}

/// Finds the private key with CKA_ID [`ID`] and signs `msg` with it.
fn sign_with_id(socket: &Path, msg: &[u8]) -> Result<Vec<u8>> {
    let (mut c, session) = login(socket)?;
    c.call(Request::FindObjectsInit {
        session,
        template: vec![
            Attr {
                ty: CKA_CLASS,
                value: Blob(attr::ulong(CKO_PRIVATE_KEY)),
            },
            Attr {
                ty: CKA_ID,
                value: Blob(ID.to_vec()),
            },
        ],
    })?;
    let found = match c.call(Request::FindObjects { session, max: 4 })? {
        Body::Ulongs { values } => values,
        b => bail!("FindObjects: {b:?}"),
    };
    c.call(Request::FindObjectsFinal { session })?;
    let [key] = found[..] else {
        bail!(
            "expected one private key with the id, found {}",
            found.len()
        );
    };
    match c.call(Request::SignOnce {
        session,
        mechanism: Mechanism {
            mechanism: CKM_ECDSA_SHA256,
            param: MechParam::None {},
        },
        key,
        data: Blob(msg.to_vec()),
    })? {
        Body::Data { data } => Ok(data.0),
        b => bail!("SignOnce: {b:?}"),
    }
}

fn verify(point_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<()> {
    let point = caas_domc::der::octet_string(point_der).unwrap_or(point_der);
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        point,
    )
    .verify(msg, sig)
    .map_err(|_| anyhow::anyhow!("the signature does not verify under the key read before"))
}

fn refused(r: Result<u64, ControlError>, rv: u64, what: &str) -> Result<()> {
    match r {
        Err(ControlError::Refused(c)) if c.0 == rv => Ok(()),
        other => bail!("{what}: expected CK_RV 0x{rv:x}, got {other:?}"),
    }
}

/// The importing domain's audit records `op` (links checked: its key is ephemeral).
fn audited(v: &Vsm, op: &str, rv: u64) -> Result<usize> {
    let entries = caas_domc::audit::verify_links_only(&v.state.join("audit.log"))?;
    Ok(entries
        .iter()
        .filter(|e| e.op == op && e.rv == format!("0x{rv:x}"))
        .count())
}

#[test]
fn a_token_key_made_after_launch_signs_in_the_importing_domain() -> Result<()> {
    let mut a = start()?;
    let point = make_key(&a.socket)?;
    let key = TransferKey::generate()?;
    let context = b"suspend vm-1 counter 1";
    let (blob, objects) = a.control.export(&key, context)?;
    ensure!(
        objects == 2,
        "the export holds the key pair ({objects} objects)"
    );
    ensure!(
        audited(&a, "TokenExport", CKR_OK)? == 1,
        "the export is audited"
    );
    let mut b = start()?;
    let n = b.control.import(&key, context, &blob)?;
    ensure!(n == 2, "imported {n} objects");
    let msg = b"signed on the target";
    verify(&point, msg, &sign_with_id(&b.socket, msg)?)?;
    ensure!(audited(&b, "TokenImport", CKR_OK)? == 1);
    Ok(())
}

#[test]
fn tampered_token_export_is_refused_and_audited() -> Result<()> {
    let mut a = start()?;
    make_key(&a.socket)?;
    let key = TransferKey::generate()?;
    let (blob, _) = a.control.export(&key, b"ctx")?;
    let mut b = start()?;
    for i in [3, 12, blob.len() / 2, blob.len() - 1] {
        let mut t = blob.clone();
        t[i] ^= 0x40;
        refused(
            b.control.import(&key, b"ctx", &t),
            CKR_ENCRYPTED_DATA_INVALID,
            &format!("byte {i} flipped"),
        )?;
    }
    refused(
        b.control.import(&key, b"ctx", &blob[..blob.len() - 1]),
        CKR_ENCRYPTED_DATA_INVALID,
        "truncated",
    )?;
    refused(
        b.control.import(&TransferKey::generate()?, b"ctx", &blob),
        CKR_ENCRYPTED_DATA_INVALID,
        "another transfer key",
    )?;
    ensure!(audited(&b, "TokenImport", CKR_ENCRYPTED_DATA_INVALID)? == 6);
    // Nothing was imported: no key with the id.
    ensure!(sign_with_id(&b.socket, b"x").is_err());
    Ok(())
}

#[test]
fn token_export_replayed_into_a_later_resume_is_refused_and_audited() -> Result<()> {
    let mut a = start()?;
    make_key(&a.socket)?;
    let key = TransferKey::generate()?;
    let (old, _) = a.control.export(&key, b"suspend vm-1 counter 1")?;
    // The domain of the resume of counter 2 expects its own context.
    let mut b = start()?;
    refused(
        b.control.import(&key, b"suspend vm-1 counter 2", &old),
        CKR_ENCRYPTED_DATA_INVALID,
        "replayed into counter 2",
    )?;
    refused(
        b.control.import(&key, b"suspend vm-2 counter 1", &old),
        CKR_ENCRYPTED_DATA_INVALID,
        "another workload",
    )?;
    ensure!(audited(&b, "TokenImport", CKR_ENCRYPTED_DATA_INVALID)? == 2);
    // One import per domain: after the right one, even the same export is refused.
    b.control.import(&key, b"suspend vm-1 counter 1", &old)?;
    refused(
        b.control.import(&key, b"suspend vm-1 counter 1", &old),
        CKR_OPERATION_NOT_INITIALIZED,
        "second import",
    )?;
    ensure!(audited(&b, "TokenImport", CKR_OPERATION_NOT_INITIALIZED)? == 1);
    Ok(())
}

#[test]
fn no_import_once_the_workload_has_a_session() -> Result<()> {
    let mut a = start()?;
    make_key(&a.socket)?;
    let key = TransferKey::generate()?;
    let (blob, _) = a.control.export(&key, b"ctx")?;
    let mut b = start()?;
    let _open = login(&b.socket)?;
    refused(
        b.control.import(&key, b"ctx", &blob),
        CKR_SESSION_EXISTS,
        "session open",
    )?;
    ensure!(audited(&b, "TokenImport", CKR_SESSION_EXISTS)? == 1);
    Ok(())
}
