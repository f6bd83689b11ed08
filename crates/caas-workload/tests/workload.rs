//! The process workload end to end: a disk served over NBD by nbdkit, the injected τ and
//! pk_DM, the PSK channel, the DM's signed challenge, the VSM signature and the DBSP
//! volume marker check, and the process driver running the real binary.
mod common;

use anyhow::{Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use caas_crypto::SecretBytes;
use caas_workload::driver::{Driver, ProcessDriver};
use caas_workload::proto::{self, ChallengeRequest, ErrorAnswer, WorkloadReport};
use caas_workload::{Error, InjectedSecrets, ReadyInfo, challenge, psk};
use common::{Fixture, Options, sha256_hex};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[test]
fn trusted_launch_channel_end_to_end() -> Result<()> {
    // 2.5 MiB + a bit: several NBD reads, a partial last chunk.
    let f = Fixture::new(Options {
        disk_len: (5 << 19) + 4321,
        ..Options::default()
    })?;
    let addr = f.start()?;

    // The injected secrets were read once and are gone from disk.
    assert!(!f.spec.inject_file.exists(), "inject file still on disk");
    let ready = ReadyInfo::read_from(&f.spec.ready_file)?;
    let Some(ready) = ready else {
        bail!("no ready file")
    };
    assert_eq!(ready.addr, addr);
    assert_eq!(ready.disk_sha256, sha256_hex(&f.disk));

    // The DM with τ and sk_DM gets the report.
    let r = challenge(addr, &f.spec.vm_id, &f.tau, &f.sk_dm)?;
    assert_eq!(r.vm_id, f.spec.vm_id);
    assert_eq!(r.disk_sha256, sha256_hex(&f.disk));
    assert_eq!(r.disk_size, f.disk.len() as u64);
    assert!(r.vsm.is_none() && r.volumes.is_empty());

    // Without τ (another token): the handshake fails, nothing is answered.
    let wrong_tau = SecretBytes::new(caas_crypto::random_bytes(32)?);
    let e = challenge(addr, &f.spec.vm_id, &wrong_tau, &f.sk_dm);
    assert!(matches!(e, Err(Error::Handshake(_))), "{e:?}");
    // Right τ, wrong identity.
    let e = challenge(addr, "vm-other", &f.tau, &f.sk_dm);
    assert!(matches!(e, Err(Error::Handshake(_))), "{e:?}");

    // Right τ (e.g. the host, which saw τ) but not the DM's key: rejected by the workload.
    let other_dm = common::dm_key()?;
    let e = challenge(addr, &f.spec.vm_id, &f.tau, &other_dm);
    assert!(matches!(e, Err(Error::DmSignatureInvalid)), "{e:?}");

    // A replayed nonce is refused.
    let nonce = [7u8; 32];
    proto::challenge_with_nonce(addr, &f.spec.vm_id, &f.tau, &f.sk_dm, &nonce)?;
    let e = proto::challenge_with_nonce(addr, &f.spec.vm_id, &f.tau, &f.sk_dm, &nonce);
    assert!(
        matches!(&e, Err(Error::Remote(c)) if c == proto::ERR_REPLAY),
        "{e:?}"
    );

    // Still serving.
    challenge(addr, &f.spec.vm_id, &f.tau, &f.sk_dm)?;
    Ok(())
}

/// Opens the PSK channel, sends `payload` raw, returns the answer line.
fn raw_exchange(
    addr: SocketAddr,
    vm_id: &str,
    tau: &SecretBytes,
    payload: &[u8],
) -> Result<String> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut s = psk::connect(tcp, vm_id, tau)?;
    // The workload may refuse and close before an oversized payload is fully sent (then
    // the write fails, and its answer may be lost to the reset): the caller decides.
    let _ = s.write_all(payload);
    let mut line = String::new();
    let _ = BufReader::new(&mut s).read_line(&mut line);
    Ok(line)
}

#[test]
fn malformed_requests_get_an_error_and_do_not_stop_the_workload() -> Result<()> {
    let f = Fixture::new(Options {
        disk_len: 8192,
        ..Options::default()
    })?;
    let addr = f.start()?;
    let id = f.spec.vm_id.as_str();
    let bad_request = |line: &str| -> Result<()> {
        let a: ErrorAnswer = serde_json::from_str(line)?;
        assert_eq!(a.error, proto::ERR_BAD_REQUEST);
        Ok(())
    };
    // Longer than the 64 KiB line bound: refused (the answer may be lost to the reset
    // caused by the unread rest of the payload).
    let a = raw_exchange(addr, id, &f.tau, &vec![b'A'; 100 * 1024])?;
    if !a.is_empty() {
        bad_request(&a)?;
    }
    bad_request(&raw_exchange(addr, id, &f.tau, b"{not json\n")?)?;
    bad_request(&raw_exchange(addr, id, &f.tau, b"[1,2,3]\n")?)?;
    let short = serde_json::to_string(&ChallengeRequest {
        nonce: B64.encode([1u8; 5]),
        sig: B64.encode([0u8; 64]),
    })?;
    bad_request(&raw_exchange(
        addr,
        id,
        &f.tau,
        format!("{short}\n").as_bytes(),
    )?)?;
    let not_b64 = r#"{"nonce":"***","sig":"***"}"#;
    bad_request(&raw_exchange(
        addr,
        id,
        &f.tau,
        format!("{not_b64}\n").as_bytes(),
    )?)?;
    // A well-formed request with a garbage signature.
    let forged = serde_json::to_string(&ChallengeRequest {
        nonce: B64.encode([1u8; 32]),
        sig: B64.encode([0u8; 64]),
    })?;
    let a: ErrorAnswer = serde_json::from_str(&raw_exchange(
        addr,
        id,
        &f.tau,
        format!("{forged}\n").as_bytes(),
    )?)?;
    assert_eq!(a.error, proto::ERR_DM_SIGNATURE);
    // Plain garbage instead of a TLS handshake.
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let _ = tcp.write_all(&[0x16, 3, 1, 0xff, 0xff, 1, 2, 3]);
    drop(tcp);
    let r = challenge(addr, id, &f.tau, &f.sk_dm)?;
    assert_eq!(r.disk_sha256, sha256_hex(&f.disk));
    Ok(())
}

#[test]
fn vsm_signature_and_volume_marker() -> Result<()> {
    let f = Fixture::new(Options {
        disk_len: 64 * 1024,
        vsm: true,
        volumes: 1,
    })?;
    let addr = f.start()?;
    let nonce = [0x5a; 32];
    // `challenge` verifies the VSM signature against the returned point.
    let r: WorkloadReport =
        proto::challenge_with_nonce(addr, &f.spec.vm_id, &f.tau, &f.sk_dm, &nonce)?;
    let Some(vsm) = &r.vsm else {
        bail!("no VSM signature")
    };
    assert_eq!(vsm.mechanism, "CKM_ECDSA_SHA256");
    assert_eq!(r.volumes.len(), 1);
    assert!(r.volumes[0].ok, "{:?}", r.volumes[0]);
    // The marker went through NBD into the last 4 KiB block of the volume.
    let vol = std::fs::read(&f.exports[1].file)?;
    let last = &vol[vol.len() - 4096..];
    assert!(last.starts_with(b"caas-workload marker v1\0"));
    assert_eq!(&last[24..56], &nonce);

    // A tampered report (another disk hash) no longer verifies.
    let mut bad = r.clone();
    bad.disk_sha256 = sha256_hex(b"another disk");
    let e = proto::check_report(&bad, &f.spec.vm_id, &nonce);
    assert!(matches!(e, Err(Error::VsmSignatureInvalid)), "{e:?}");
    // Same key for the workload's lifetime.
    let r2 = challenge(addr, &f.spec.vm_id, &f.tau, &f.sk_dm)?;
    assert_eq!(
        r2.vsm.map(|v| v.public_point),
        Some(vsm.public_point.clone())
    );
    Ok(())
}

#[test]
fn inject_file_is_checked_and_always_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("inject");
    let good = InjectedSecrets {
        tau: SecretBytes::new(vec![9u8; 32]),
        pk_dm: [3u8; 32],
        tls: None,
    };
    // Written 0600, read back once, then gone.
    good.write_to(&p)?;
    assert_eq!(std::fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
    assert!(
        good.write_to(&p).is_err(),
        "overwrote an existing inject file"
    );
    assert_eq!(InjectedSecrets::take_from(&p)?, good);
    assert!(!p.exists());
    assert!(InjectedSecrets::take_from(&p).is_err());

    // Readable by others: refused, and deleted anyway.
    good.write_to(&p)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
    assert!(matches!(
        InjectedSecrets::take_from(&p),
        Err(Error::Inject(_))
    ));
    assert!(!p.exists());

    // Another identity's file (planted by a co-tenant, or meant for another workload):
    // refused and deleted. The agent writes it for the workload's identity.
    good.write_to_owned(&p, Some((65_534, 65_534)))?;
    let md = std::fs::metadata(&p)?;
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&md),
            md.permissions().mode() & 0o777
        ),
        (65_534, 0o600),
        "inject file given to the workload's identity (this test needs root)"
    );
    match InjectedSecrets::take_from(&p) {
        Err(Error::Inject(m)) => assert!(m.contains("owned by uid 65534"), "{m}"),
        other => bail!("another identity's inject file: {other:?}"),
    }
    assert!(!p.exists());

    // Wrong sizes and garbage: refused without quoting the content, deleted.
    for body in [
        format!(
            r#"{{"tau":"{}","pk_dm":"{}"}}"#,
            B64.encode([1u8; 16]),
            B64.encode([3u8; 32])
        ),
        format!(
            r#"{{"tau":"{}","pk_dm":"{}"}}"#,
            B64.encode([1u8; 32]),
            B64.encode([3u8; 31])
        ),
        r#"{"tau":"canary-secret"}"#.to_string(),
        "canary-secret".to_string(),
    ] {
        std::fs::write(&p, &body)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        let e = InjectedSecrets::take_from(&p);
        let Err(e) = e else { bail!("accepted {body}") };
        assert!(!format!("{e} {e:?}").contains("canary"), "{e}");
        assert!(!p.exists());
    }
    Ok(())
}

#[test]
fn workload_without_inject_file_does_not_start() -> Result<()> {
    let f = Fixture::new(Options {
        disk_len: 4096,
        ..Options::default()
    })?;
    std::fs::remove_file(&f.spec.inject_file)?;
    assert!(caas_workload::Workload::start(&f.spec).is_err());
    assert!(!f.spec.ready_file.exists());
    Ok(())
}

#[test]
fn process_driver_runs_the_workload_binary() -> Result<()> {
    let f = Fixture::new(Options {
        disk_len: 300 * 1024,
        ..Options::default()
    })?;
    let driver = ProcessDriver::new(
        env!("CARGO_BIN_EXE_caas-workload").into(),
        f.dir.path().join("driver"),
    );
    let program = driver.program()?;
    let mut h = driver.start(&f.spec, std::process::Command::new(program))?;
    let addr = h.wait_ready(Duration::from_secs(30))?;
    assert!(h.pid() > 0);
    assert!(!f.spec.inject_file.exists());
    let r = challenge(addr, &f.spec.vm_id, &f.tau, &f.sk_dm)?;
    assert_eq!(r.disk_sha256, sha256_hex(&f.disk));
    h.stop()?;
    assert!(h.try_wait()?.is_some());
    assert!(challenge(addr, &f.spec.vm_id, &f.tau, &f.sk_dm).is_err());

    // A workload that cannot start (no inject file) is reported as exited, not hung.
    let mut h = driver.start(&f.spec, std::process::Command::new(driver.program()?))?;
    let e = h.wait_ready(Duration::from_secs(30));
    assert!(
        matches!(&e, Err(Error::Driver(m)) if m.contains("exited")),
        "{e:?}"
    );
    Ok(())
}

/// The `caas` binary and the lead's tests may call in from an async context: no
/// nested-runtime panic, also when start fails after its IO runtime exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_starts_from_an_async_context() -> Result<()> {
    let f = Fixture::new(Options {
        disk_len: 12345,
        volumes: 1,
        ..Options::default()
    })?;
    let w = caas_workload::Workload::start(&f.spec)?;
    let addr = w.addr();
    std::thread::spawn(move || w.serve());
    let (id, tau, sk) = (f.spec.vm_id.clone(), f.tau.clone(), common::dm_key()?);
    let e = tokio::task::spawn_blocking(move || challenge(addr, &id, &tau, &sk)).await?;
    assert!(matches!(e, Err(Error::DmSignatureInvalid)), "{e:?}");

    // The disk is unreachable: start fails (its runtime is dropped here, in async code).
    let mut spec = f.spec.clone();
    spec.disk = format!(
        "nbd+unix:///disk?socket={}",
        f.dir.path().join("none.sock").display()
    );
    f.inject()?;
    let e = caas_workload::Workload::start(&spec);
    assert!(matches!(e, Err(Error::Disk(_))), "{e:?}");
    assert!(!spec.inject_file.exists());
    Ok(())
}
