//! Canary test: run PIN, key-import, encryption and decryption requests through the crypto
//! domain with TRACE logging captured, and check that the canary PINs, key bytes and
//! plaintext appear neither in the log, nor in the audit log, nor in the sealed token file.

use anyhow::{Result, ensure};
use caas_domc::domain::{Domain, DomainConfig};
use caas_domc::keysource::DomainKey;
use caas_vsm_proto::{Attr, Blob, Body, MechParam, Mechanism, Request, Secret, attr};
use cryptoki_sys::*;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SO_PIN: &str = "CANARY-SO-PIN-1f3a";
const USER_PIN: &str = "CANARY-USER-PIN-9b2c";
const KEY: &[u8; 32] = b"CANARY-KEY-BYTES-0123456789abcde";
const PLAINTEXT: &[u8] = b"CANARY-PLAINTEXT-do-not-log";

#[test]
fn canary_pins_keys_and_plaintext_never_reach_logs_or_disk_in_clear() -> Result<()> {
    let cap = Capture::default();
    let w = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir()?;
    let cfg = DomainConfig {
        state_dir: dir.path().to_path_buf(),
        slots: 1,
        max_pin_retries: 5,
    };
    let d = Domain::open(&cfg, DomainKey::new([7; 32]))?;
    let app = d.attach([1; 16]);
    let call = |req: Request| -> Result<Body> {
        tracing::trace!(?req, "request");
        let r = d.handle(&app, req);
        ensure!(r.rv == 0, "CK_RV 0x{:x}", r.rv);
        tracing::trace!(?r, "response");
        Ok(r.body)
    };
    let pin = |p: &str| Secret::new(p.as_bytes().to_vec());
    call(Request::InitToken {
        slot: 0,
        so_pin: pin(SO_PIN),
        label: "canary".into(),
    })?;
    let Body::Ulong { value: s } = call(Request::OpenSession {
        slot: 0,
        flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
    })?
    else {
        anyhow::bail!("no session");
    };
    call(Request::Login {
        session: s,
        user_type: CKU_SO,
        pin: pin(SO_PIN),
    })?;
    call(Request::InitPin {
        session: s,
        pin: pin(USER_PIN),
    })?;
    call(Request::Logout { session: s })?;
    call(Request::Login {
        session: s,
        user_type: CKU_USER,
        pin: pin(USER_PIN),
    })?;
    let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
    let Body::Ulong { value: key } = call(Request::CreateObject {
        session: s,
        template: vec![
            a(CKA_CLASS, attr::ulong(CKO_SECRET_KEY)),
            a(CKA_KEY_TYPE, attr::ulong(CKK_AES)),
            a(CKA_VALUE, KEY.to_vec()),
            a(CKA_TOKEN, attr::boolean(true)),
            a(CKA_ENCRYPT, attr::boolean(true)),
            a(CKA_DECRYPT, attr::boolean(true)),
        ],
    })?
    else {
        anyhow::bail!("no key");
    };
    let gcm = Mechanism {
        mechanism: CKM_AES_GCM,
        param: MechParam::Gcm {
            iv: Blob(vec![1; 12]),
            aad: Blob(vec![]),
            tag_bits: 128,
        },
    };
    call(Request::EncryptInit {
        session: s,
        mechanism: gcm.clone(),
        key,
    })?;
    let Body::Data { data: ct } = call(Request::Encrypt {
        session: s,
        data: Blob(PLAINTEXT.to_vec()),
        cap: Some(1024),
    })?
    else {
        anyhow::bail!("no ciphertext");
    };
    call(Request::DecryptInit {
        session: s,
        mechanism: gcm,
        key,
    })?;
    let Body::SecretData { data: pt } = call(Request::Decrypt {
        session: s,
        data: ct,
        cap: Some(1024),
    })?
    else {
        anyhow::bail!("no plaintext");
    };
    ensure!(pt.expose() == PLAINTEXT, "round trip");
    // A wrong PIN is logged and audited as a failure, without the PIN.
    let r = d.handle(
        &app,
        Request::Login {
            session: s,
            user_type: CKU_USER,
            pin: pin("CANARY-WRONG-PIN"),
        },
    );
    tracing::trace!(rv = r.rv, "wrong pin");
    d.detach(&app);
    drop(d);

    let log = String::from_utf8(
        cap.0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone(),
    )?;
    ensure!(
        log.contains("request") && log.contains("REDACTED"),
        "nothing captured at trace level:\n{log}"
    );
    let audit = std::fs::read(dir.path().join("audit.log"))?;
    let token = std::fs::read(dir.path().join("slot-0.token"))?;
    for (name, hay) in [
        ("log", log.as_bytes()),
        ("audit log", &audit[..]),
        ("token file", &token[..]),
    ] {
        for canary in [
            SO_PIN.as_bytes(),
            USER_PIN.as_bytes(),
            b"CANARY-WRONG-PIN",
            &KEY[..],
            PLAINTEXT,
            b"CANARY",
        ] {
            ensure!(
                !hay.windows(canary.len()).any(|w| w == canary),
                "{} found in the {name}",
                String::from_utf8_lossy(canary)
            );
        }
    }
    Ok(())
}
