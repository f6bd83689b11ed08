//! A real VM through trusted launch (issue 13, first acceptance bullet): the legacy guest
//! image of `scripts/build-guest-image` (Debian cloud kernel, busybox, syslinux, the tenant's
//! guest agent and PKCS#11 module) is provisioned with Algorithm 1 (encrypted under k), then
//! launched with the qemu driver through TL on a `caas dev` host (swtpm TPM, host agent,
//! crypto-domain processes). qemu boots the WHOLE disk from the crypto domain's NBD export,
//! the guest reads τ and pk_DM from fw_cfg, signs with a VSM key over virtio-serial, and the
//! tenant checks all of it from outside.
//!
//! Needs qemu-system-x86 and the image tools (`scripts/install-deps` installs them); without
//! them the test fails saying what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::vm::*;
use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[test]
fn real_vm_boots_encrypted_image_through_crypto_domain_and_signs_over_virtio_serial() {
    let t0 = Instant::now();
    let image = guest_image();
    let plain = std::fs::read(&image).unwrap();
    eprintln!(
        "guest image {} ({} bytes) in {:?}",
        image.display(),
        plain.len(),
        t0.elapsed()
    );

    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let root = tmp.path().to_path_buf();
    let dev = Dev::start_with(
        &root.join("dev"),
        "127.0.0.1:0",
        &["--hosts", "1", "--attest-secs", "3600"],
    );
    let storage = PathBuf::from(&dev.env["CAAS_STORAGE_DIR"]);
    let raw = root.join("guest.raw");
    std::fs::copy(&image, &raw).unwrap();

    // Algorithm 1: the tenant encrypts the image under k and seals its configuration.
    tenant(&root, &dev, &["init"]);
    tenant(&root, &dev, &["acl", "--domains", "finance"]);
    tenant(
        &root,
        &dev,
        &[
            "provision",
            "--image",
            raw.to_str().unwrap(),
            "--id",
            "legacy",
            "--hosts",
            "host-1",
        ],
    );
    let t_launch = Instant::now();
    let out = tenant(
        &root,
        &dev,
        &[
            "launch",
            "--id",
            "legacy",
            "--vm",
            "vm1",
            "--driver",
            "qemu",
            "--domains",
            "finance",
        ],
    );
    eprintln!(
        "launch with the qemu driver: {:?}\n{out}",
        t_launch.elapsed()
    );
    assert!(out.contains("\"vm_id\": \"vm1\""), "{out}");

    // qemu boots the whole disk from the crypto domain's NBD export: no image file, no key.
    let args = qemu_cmdline("vm1").expect("the VM's qemu process");
    let drives: Vec<&String> = args
        .windows(2)
        .filter(|w| w[0] == "-drive")
        .map(|w| &w[1])
        .collect();
    assert_eq!(drives.len(), 1, "{args:?}");
    assert!(drives[0].starts_with("file=nbd+unix:///"), "{args:?}");
    assert!(!args.iter().any(|a| a.contains("caasvol")), "{args:?}");
    assert!(args.iter().any(|a| a.contains("name=caas.vsm")), "{args:?}");
    // τ reached the guest through a read-once file: gone from the host once it was ready.
    assert!(
        find_file(&root.join("dev"), "inject.json").is_none(),
        "the inject file outlived the boot"
    );
    let serial = find_file(&root.join("dev"), "vm1.serial.log").expect("serial log");
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(console.contains("caas-workload ready"), "{console}");

    // The tenant's check over the PSK channel: the guest proves τ, answers the DM's signed
    // challenge with the hash of the disk it booted and a VSM signature made over
    // virtio-serial.
    let rep = tenant(&root, &dev, &["connect", "--vm", "vm1"]);
    let v: Value = serde_json::from_str(&rep[rep.find('{').unwrap()..]).unwrap();
    assert_eq!(
        v["disk_sha256"],
        Value::from(hex::encode(caas_tl::crypto::sha256(&plain))),
        "the guest booted another disk: {v}"
    );
    assert_eq!(v["disk_size"], Value::from(plain.len() as u64));
    assert_eq!(
        v["vsm"]["mechanism"],
        Value::from("CKM_ECDSA_SHA256"),
        "{v}"
    );
    let nonce: [u8; 32] = B64
        .decode(v["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let disk: [u8; 32] = caas_tl::crypto::sha256(&plain);
    let msg = caas_workload::proto::vsm_message("vm1", &nonce, &disk);
    let point = B64
        .decode(v["vsm"]["public_point"].as_str().unwrap())
        .unwrap();
    let sig = B64.decode(v["vsm"]["signature"].as_str().unwrap()).unwrap();
    caas_workload::vsm::verify_vsm_signature(&point, &msg, &sig)
        .expect("the tenant verifies the guest's VSM signature");
    let mut bad = sig.clone();
    bad[10] ^= 1;
    assert!(caas_workload::vsm::verify_vsm_signature(&point, &msg, &bad).is_err());

    // The PSK check succeeds only with the right τ (and identity).
    let rec: Value =
        serde_json::from_slice(&std::fs::read(root.join("alice/vms/vm1.json")).unwrap()).unwrap();
    let addr: std::net::SocketAddr = rec["endpoint"].as_str().unwrap().parse().unwrap();
    assert!(
        addr.ip().is_loopback(),
        "the forwarded port is on loopback: {addr}"
    );
    let tau = caas_crypto::SecretBytes::new(B64.decode(rec["tau"].as_str().unwrap()).unwrap());
    let psk = |id: &str, k: &caas_crypto::SecretBytes| {
        caas_workload::psk::connect(std::net::TcpStream::connect(addr).unwrap(), id, k)
    };
    assert!(psk("vm1", &tau).is_ok(), "the right τ is refused");
    let mut wrong = tau.expose().to_vec();
    wrong[0] ^= 0x80;
    let wrong = caas_crypto::SecretBytes::new(wrong);
    assert!(psk("vm1", &wrong).is_err(), "a wrong τ is accepted");
    assert!(psk("vm2", &tau).is_err(), "another identity is accepted");

    // The storage side holds only ciphertext: no 16-byte block of the image's content (the
    // kernel, the compressed initramfs, the boot loader: every aligned block with at least 6
    // distinct byte values — runs of zeros or small integers also occur in the volume's own
    // header) appears at any offset of the stored file.
    let enc = std::fs::read(storage.join("images/legacy/image.caasvol")).unwrap();
    let blocks: HashSet<[u8; 16]> = plain
        .chunks_exact(16)
        .filter(|c| c.iter().collect::<HashSet<_>>().len() >= 6)
        .map(|c| <[u8; 16]>::try_from(c).unwrap())
        .collect();
    assert!(
        blocks.len() > 500_000,
        "the image has content: {}",
        blocks.len()
    );
    let leak = enc
        .windows(16)
        .position(|w| blocks.contains(<&[u8; 16]>::try_from(w).unwrap()));
    assert!(
        leak.is_none(),
        "plaintext of the image at offset {leak:?} of the stored file: {}",
        leak.map(|o| hex::encode(&enc[o..o + 16]))
            .unwrap_or_default()
    );

    eprintln!("real VM test total: {:?}", t0.elapsed());
}
