//! `caas dev` integration: start one crypto domain for the dev tenant as a child process
//! (`<caas> domc serve`), initialise its token with generated PINs, and describe how a
//! workload reaches it (`CAAS_PKCS11_*` variables for `DIR/env`). Also the `caas demo`
//! step: generate a key in the token and sign with it.

use crate::client::Client;
use crate::error::{Ckr, Error};
use caas_vsm_proto::{Attr, Blob, Body, MechParam, Mechanism, Request, Secret, attr};
use cryptoki_sys::*;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Label of the dev token.
pub const DEV_TOKEN_LABEL: &str = "caas-dev";

/// A running dev crypto domain.
#[derive(Debug)]
pub struct DevDomain {
    /// The child process (`caas domc serve`).
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Absolute path of libcaas_pkcs11.so, if found next to the executable.
    pub module: Option<PathBuf>,
    /// Token label.
    pub token_label: String,
    /// User PIN (dev only; also written to DIR/env).
    pub user_pin: String,
    /// SO PIN (dev only).
    pub so_pin: String,
}

impl DevDomain {
    /// The variables for `DIR/env`.
    #[must_use]
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if let Some(m) = &self.module {
            v.push(("CAAS_PKCS11_MODULE".into(), m.display().to_string()));
        }
        v.push((
            "CAAS_PKCS11_SOCKET".into(),
            self.socket.display().to_string(),
        ));
        v.push(("CAAS_PKCS11_TOKEN_LABEL".into(), self.token_label.clone()));
        v.push(("CAAS_PKCS11_USER_PIN".into(), self.user_pin.clone()));
        v.push(("CAAS_PKCS11_SO_PIN".into(), self.so_pin.clone()));
        v
    }

    /// Stops the crypto domain.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `libcaas_pkcs11.so` next to `exe` (target/debug, target/debug/deps, ../lib).
#[must_use]
pub fn find_module(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [
        dir.join("libcaas_pkcs11.so"),
        dir.join("deps/libcaas_pkcs11.so"),
        dir.join("../lib/libcaas_pkcs11.so"),
        dir.join("../lib/caas/libcaas_pkcs11.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .and_then(|p| p.canonicalize().ok())
}

fn random_pin() -> Result<String, Error> {
    let mut b = [0u8; 6];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::Config("rng".into()))?;
    Ok(hex::encode(b))
}

/// Waits for a socket to accept connections.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Error::Config(format!(
                "crypto domain did not start listening on {}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the dev crypto domain under `dir` using `exe` (the `caas` binary, which must
/// accept `domc serve`), and initialises its token on first start.
pub fn start(dir: &Path, exe: &Path) -> Result<DevDomain, Error> {
    let state = dir.join("domc");
    std::fs::create_dir_all(&state).map_err(Error::io("create", &state))?;
    let socket = dir.join("domc.sock");
    // Dev mode runs the domain as the invoking user (a root `caas dev` would otherwise hand
    // the state to nobody inside a directory nobody cannot reach).
    let ids = format!(
        "{}:{}",
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw()
    );
    // No inherited descriptors: `caas dev` opens host TPM connections concurrently, and a
    // copy of one kept by this long-lived child would stall that TPM (swtpm serves one
    // connection at a time).
    let child = caas_crypto::hardening::command_without_inherited_fds(exe)
        .args([
            "domc",
            "serve",
            "--create-key",
            "--socket-mode",
            "600",
            "--run-as",
            &ids,
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .spawn()
        .map_err(Error::io("spawn", exe))?;
    let mut dev = DevDomain {
        child,
        socket: socket.clone(),
        module: find_module(exe),
        token_label: DEV_TOKEN_LABEL.into(),
        user_pin: String::new(),
        so_pin: String::new(),
    };
    if let Err(e) = wait_for_socket(&socket, Duration::from_secs(10)) {
        dev.stop();
        return Err(e);
    }
    let pins = state.join("dev-pins");
    if let Ok(text) = std::fs::read_to_string(&pins) {
        let mut l = text.lines();
        dev.so_pin = l.next().unwrap_or_default().to_string();
        dev.user_pin = l.next().unwrap_or_default().to_string();
        return Ok(dev);
    }
    dev.so_pin = random_pin()?;
    dev.user_pin = random_pin()?;
    if let Err(e) = init_token(&socket, 0, DEV_TOKEN_LABEL, &dev.so_pin, &dev.user_pin) {
        dev.stop();
        return Err(e);
    }
    // The dev token's PINs: a secret file like any other (0600, atomic).
    caas_crypto::fs::write_secret(
        &pins,
        format!("{}\n{}\n", dev.so_pin, dev.user_pin).as_bytes(),
        None,
    )
    .map_err(Error::io("write", &pins))?;
    Ok(dev)
}

fn body_ulong(b: Body) -> Result<u64, Error> {
    match b {
        Body::Ulong { value } => Ok(value),
        _ => Err(Error::Token(Ckr(CKR_DEVICE_ERROR))),
    }
}

/// Initialises the token of `slot`: label, SO PIN, user PIN.
pub fn init_token(
    socket: &Path,
    slot: u64,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<(), Error> {
    let mut c = Client::connect(socket)?;
    c.call(Request::InitToken {
        slot,
        so_pin: Secret::new(so_pin.as_bytes().to_vec()),
        label: label.into(),
    })?;
    let s = body_ulong(c.call(Request::OpenSession {
        slot,
        flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
    })?)?;
    c.call(Request::Login {
        session: s,
        user_type: CKU_SO,
        pin: Secret::new(so_pin.as_bytes().to_vec()),
    })?;
    c.call(Request::InitPin {
        session: s,
        pin: Secret::new(user_pin.as_bytes().to_vec()),
    })?;
    c.call(Request::CloseSession { session: s })?;
    Ok(())
}

/// The `caas demo` step: log in, generate an ECDSA P-256 key pair in the token (session
/// objects), sign a message inside the crypto domain and verify the signature locally
/// against the public point read from the token. Returns a one-line summary.
pub fn demo_sign(socket: &Path, user_pin: &str) -> Result<String, Error> {
    let mut c = Client::connect(socket)?;
    let s = body_ulong(c.call(Request::OpenSession {
        slot: 0,
        flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
    })?)?;
    c.call(Request::Login {
        session: s,
        user_type: CKU_USER,
        pin: Secret::new(user_pin.as_bytes().to_vec()),
    })?;
    let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
    let (public, private) = match c.call(Request::GenerateKeyPair {
        session: s,
        mechanism: Mechanism {
            mechanism: CKM_EC_KEY_PAIR_GEN,
            param: MechParam::None {},
        },
        public_template: vec![a(CKA_EC_PARAMS, crate::der::OID_P256.to_vec())],
        private_template: vec![
            a(CKA_LABEL, b"caas-demo".to_vec()),
            a(CKA_SIGN, attr::boolean(true)),
        ],
    })? {
        Body::KeyPair { public, private } => (public, private),
        _ => return Err(Error::Token(Ckr(CKR_DEVICE_ERROR))),
    };
    let msg = b"caas demo: signed inside the crypto domain".to_vec();
    c.call(Request::SignInit {
        session: s,
        mechanism: Mechanism {
            mechanism: CKM_ECDSA_SHA256,
            param: MechParam::None {},
        },
        key: private,
    })?;
    let sig = match c.call(Request::Sign {
        session: s,
        data: Blob(msg.clone()),
        cap: Some(1024),
    })? {
        Body::Data { data } => data.0,
        _ => return Err(Error::Token(Ckr(CKR_DEVICE_ERROR))),
    };
    let point = match c.call(Request::GetAttributeValue {
        session: s,
        object: public,
        types: vec![CKA_EC_POINT],
    })? {
        Body::Attrs { values } => match values.into_iter().next() {
            Some(caas_vsm_proto::AttrValue::Value { value }) => value.0,
            _ => return Err(Error::Token(Ckr(CKR_DEVICE_ERROR))),
        },
        _ => return Err(Error::Token(Ckr(CKR_DEVICE_ERROR))),
    };
    let raw = crate::der::octet_string(&point).unwrap_or(&point).to_vec();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        raw,
    )
    .verify(&msg, &sig)
    .map_err(|_| Error::Token(Ckr(CKR_SIGNATURE_INVALID)))?;
    c.call(Request::CloseSession { session: s })?;
    Ok(format!(
        "generated an ECDSA P-256 key in the token and signed {} bytes; signature ({} bytes) verified",
        msg.len(),
        sig.len()
    ))
}
