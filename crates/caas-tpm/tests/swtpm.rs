//! caas-tpm against a real swtpm (each test its own swtpm on free ports, own state dir,
//! EK certificate from its own project-local swtpm_localca), cross-checked with caas-attest:
//! EK certificate chain, software MakeCredential → TPM ActivateCredential, quotes verified
//! by the pure-Rust verifier, AK-certified bind key with policy decrypt, seal/unseal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caas_attest::credential::make_credential;
use caas_attest::ekcert::{EkCaStore, ek_matches_certificate};
use caas_attest::quote::verify_signature;
use caas_attest::registrar::{check_ak_attributes, check_bind_key};
use caas_attest::store::BindKeyRecord;
use caas_attest::structures::{Attest, Attested, HashAlg, Public, Signature};
use caas_tpm::swtpm::{LocalCa, Swtpm};
use caas_tpm::{AkAlg, PcrBank, Tpm};

struct Env {
    _dir: tempfile::TempDir,
    ca: LocalCa,
    swtpm: Swtpm,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::create(&dir.path().join("ca")).unwrap();
    let state = dir.path().join("tpm");
    ca.provision(&state).unwrap();
    let swtpm = Swtpm::start(&state).unwrap();
    Env {
        _dir: dir,
        ca,
        swtpm,
    }
}

const PCRS: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

#[test]
fn ek_certificate_chains_to_local_ca_and_matches_ek() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let cert = tpm.ek_certificate().unwrap();
    let ek = Public::parse_tpm2b(&tpm.ek_public().unwrap()).unwrap();
    let mut store = EkCaStore::new();
    for f in e.ca.ca_cert_files() {
        store.add(&std::fs::read(f).unwrap()).unwrap();
    }
    assert!(!store.is_empty());
    let spki = store.validate(&cert, caas_attest::now_ms() / 1000).unwrap();
    ek_matches_certificate(&ek, &spki).unwrap();
    // An empty store trusts nothing.
    assert!(
        EkCaStore::new()
            .validate(&cert, caas_attest::now_ms() / 1000)
            .is_err()
    );
}

#[test]
fn quote_verifies_with_pure_rust_verifier() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let akp = Public::parse_tpm2b(&ak.public).unwrap();
    check_ak_attributes(&akp).unwrap();
    tpm.pcr_extend(PcrBank::Sha256, 4, &[0x42; 32]).unwrap();
    let q = tpm
        .quote(&ak, b"fresh-nonce", PcrBank::Sha256, &PCRS)
        .unwrap();
    let vals = tpm.pcr_read(PcrBank::Sha256, &PCRS).unwrap();
    let sig = Signature::parse(&q.signature).unwrap();
    verify_signature(&akp, &q.attest, &sig).unwrap();
    let a = Attest::parse(&q.attest).unwrap();
    assert_eq!(a.extra_data, b"fresh-nonce");
    let Attested::Quote {
        selection,
        pcr_digest,
    } = a.attested
    else {
        panic!("not a quote")
    };
    assert_eq!(selection[0].pcrs, PCRS);
    let refs: Vec<&[u8]> = vals.iter().map(|v| v.as_slice()).collect();
    assert_eq!(HashAlg::Sha256.hash_parts(&refs), pcr_digest);
    // A tampered message does not verify.
    let mut bad = q.attest.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(verify_signature(&akp, &bad, &sig).is_err());
}

#[test]
fn software_make_credential_activates_only_for_the_right_ak() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let ek = Public::parse_tpm2b(&tpm.ek_public().unwrap()).unwrap();
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let other = tpm.create_ak(AkAlg::EccP256).unwrap();
    let akp = Public::parse_tpm2b(&ak.public).unwrap();
    let secret = [7u8; 32];
    let made = make_credential(&ek, &akp.name(), &secret).unwrap();
    let got = tpm
        .activate_credential(&ak, &made.credential_blob, &made.encrypted_secret)
        .unwrap();
    assert_eq!(got.as_slice(), &secret);
    // The credential is bound to the AK's name: another AK of the same TPM cannot open it.
    let err = tpm
        .activate_credential(&other, &made.credential_blob, &made.encrypted_secret)
        .unwrap_err();
    assert!(err.to_string().contains("activate credential"), "{err}");
}

#[test]
fn bind_key_is_certified_and_decrypts_only_in_its_pcr_state() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let akp = Public::parse_tpm2b(&ak.public).unwrap();
    let bind = tpm.create_bind_key(PcrBank::Sha256, &PCRS).unwrap();
    let cert = tpm.certify_bind_key(&ak, &bind, b"bind").unwrap();
    let rec = BindKeyRecord {
        public: bind.public.clone(),
        certify_attest: cert.attest,
        certify_signature: cert.signature,
    };
    let bp = check_bind_key(&akp, &rec).unwrap();
    // Encrypt to the bind key in software (RSA-OAEP-SHA256), decrypt in the TPM.
    let spki = bp.spki_der().unwrap();
    let pk = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki).unwrap();
    let oaep = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(pk).unwrap();
    let mut ct = vec![0u8; oaep.ciphertext_size()];
    let ct = oaep
        .encrypt(
            &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
            b"data key",
            &mut ct,
            None,
        )
        .unwrap()
        .to_vec();
    let pt = tpm
        .bind_decrypt(&bind, PcrBank::Sha256, &PCRS, &ct)
        .unwrap();
    assert_eq!(pt.as_slice(), b"data key");
    // After a PCR changes, the policy session no longer satisfies the key's policy.
    tpm.pcr_extend(PcrBank::Sha256, 7, &[1; 32]).unwrap();
    let err = tpm
        .bind_decrypt(&bind, PcrBank::Sha256, &PCRS, &ct)
        .unwrap_err();
    assert!(err.is_policy_failure(), "{err}");
}

#[test]
fn seal_unseal_follows_pcr_policy() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let sealed = tpm
        .seal(PcrBank::Sha256, &PCRS, b"agent state key")
        .unwrap();
    assert_eq!(
        tpm.unseal(&sealed, PcrBank::Sha256, &PCRS)
            .unwrap()
            .as_slice(),
        b"agent state key"
    );
    // The sealed blob survives a new context (reopen), as it would survive a restart.
    drop(tpm);
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.unseal(&sealed, PcrBank::Sha256, &PCRS)
            .unwrap()
            .as_slice(),
        b"agent state key"
    );
    tpm.pcr_extend(PcrBank::Sha256, 0, &[2; 32]).unwrap();
    let err = tpm.unseal(&sealed, PcrBank::Sha256, &PCRS).unwrap_err();
    assert!(err.is_policy_failure(), "{err}");
}

#[test]
fn rsa_ak_quote_verifies() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlg::Rsa2048).unwrap();
    let akp = Public::parse_tpm2b(&ak.public).unwrap();
    check_ak_attributes(&akp).unwrap();
    let q = tpm.quote(&ak, b"n", PcrBank::Sha256, &PCRS).unwrap();
    verify_signature(&akp, &q.attest, &Signature::parse(&q.signature).unwrap()).unwrap();
}

#[test]
fn many_operations_do_not_leak_tpm_slots() {
    let e = env();
    let mut tpm = Tpm::open(&e.swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let sealed = tpm.seal(PcrBank::Sha256, &PCRS, b"x").unwrap();
    for i in 0..10u8 {
        tpm.quote(&ak, &[i], PcrBank::Sha256, &PCRS).unwrap();
        tpm.unseal(&sealed, PcrBank::Sha256, &PCRS).unwrap();
    }
}

/// Descriptor numbers above stderr that `pid` keeps once it runs its program. Polled: the
/// kernel closes close-on-exec descriptors one by one during exec, after the descriptor
/// that tells the parent exec succeeded, so a first look can still see some.
fn child_fds(pid: u32) -> Vec<i32> {
    let list = || -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let fds = list();
        if fds.is_empty() || std::time::Instant::now() > deadline {
            return fds;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until `pid` runs `program` (the wrapper's bash has exec'd it).
fn wait_for_exec(pid: u32, program: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(program.as_bytes()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{pid} never ran {program}");
}

/// The stall seen under load: a child that keeps a copy of the owner's swtpm connection
/// blocks every later connection (swtpm serves one at a time). Opening the TPM marks every
/// descriptor of the process close-on-exec (also numbers that existed before the open, which
/// libtss2 may reuse), and the spawn helper starts children with none inherited.
#[test]
fn children_never_inherit_a_tpm_connection() {
    use std::os::fd::AsRawFd;
    let e = env();
    // An inheritable descriptor, as a C library would leave one.
    let leaky = nix::unistd::dup(std::io::stderr()).unwrap();
    let flags = || {
        nix::fcntl::FdFlag::from_bits_truncate(
            nix::fcntl::fcntl(&leaky, nix::fcntl::FcntlArg::F_GETFD).unwrap(),
        )
    };
    assert!(!flags().contains(nix::fcntl::FdFlag::FD_CLOEXEC));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tpm = caas_tpm::TpmHandle::open(&e.swtpm.tcti()).unwrap();
    rt.block_on(tpm.run(|t| t.ek_public())).unwrap();
    assert!(
        flags().contains(nix::fcntl::FdFlag::FD_CLOEXEC),
        "fd {} is still inheritable after the TPM was opened",
        leaky.as_raw_fd()
    );
    // A plain spawn inherits nothing now...
    let mut plain = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let fds = child_fds(plain.id());
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(fds.is_empty(), "a plain child inherited {fds:?}");
    // ...and the helper closes even what is not close-on-exec.
    let raw = nix::unistd::dup(std::io::stderr()).unwrap();
    let mut wrapped = caas_tpm::swtpm::command_without_inherited_fds("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    wait_for_exec(wrapped.id(), "sleep");
    let fds = child_fds(wrapped.id());
    let _ = wrapped.kill();
    let _ = wrapped.wait();
    drop(raw);
    assert!(fds.is_empty(), "a wrapped child inherited {fds:?}");
}
