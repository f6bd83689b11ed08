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
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

/// A 64-bit fingerprint of a 16-byte window.
fn fingerprint(w: &[u8]) -> u64 {
    let x = u128::from_le_bytes(w.try_into().unwrap());
    let h = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ((x >> 64) as u64)
            .rotate_left(29)
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h ^ (h >> 31)
}

/// The sorted fingerprints of every 16-byte window of `plain` (at every offset) with at
/// least `min_distinct` distinct byte values.
fn plaintext_run_fingerprints(plain: &[u8], min_distinct: usize) -> Vec<u64> {
    let mut counts = [0u32; 256];
    let mut distinct = 0usize;
    let mut out = Vec::with_capacity(plain.len());
    for (i, &b) in plain.iter().enumerate() {
        if counts[b as usize] == 0 {
            distinct += 1;
        }
        counts[b as usize] += 1;
        if i >= 16 {
            let old = plain[i - 16] as usize;
            counts[old] -= 1;
            if counts[old] == 0 {
                distinct -= 1;
            }
        }
        if i >= 15 && distinct >= min_distinct {
            out.push(fingerprint(&plain[i - 15..=i]));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The first window of `stored` that is a run of `plain` among `runs`
/// ([`plaintext_run_fingerprints`]): its offset and bytes.
fn leaked_run<'a>(stored: &'a [u8], plain: &[u8], runs: &[u64]) -> Option<(usize, &'a [u8])> {
    let mut fps: Vec<u64> = stored.windows(16).map(fingerprint).collect();
    fps.sort_unstable();
    fps.dedup();
    // Merge the two sorted lists: the common fingerprints.
    let (mut i, mut j) = (0, 0);
    let mut common = HashSet::new();
    while i < fps.len() && j < runs.len() {
        match fps[i].cmp(&runs[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common.insert(fps[i]);
                i += 1;
                j += 1;
            }
        }
    }
    if common.is_empty() {
        return None;
    }
    // Rare: a candidate; confirmed only by the same 16 bytes in the plaintext.
    stored.windows(16).enumerate().find_map(|(off, w)| {
        (common.contains(&fingerprint(w)) && plain.windows(16).any(|p| p == w)).then_some((off, w))
    })
}

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

    // Algorithm 1: the tenant encrypts the image under k and seals its configuration.
    let (_tmp, root, dev, storage) = provisioned_guest(&image, &["host-1"]);
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
    let args = qemu_cmdline(&root, "vm1").expect("the VM's qemu process");
    let drives: Vec<&String> = args
        .windows(2)
        .filter(|w| w[0] == "-drive")
        .map(|w| &w[1])
        .collect();
    assert_eq!(drives.len(), 1, "{args:?}");
    assert!(drives[0].starts_with("file=nbd+unix:///"), "{args:?}");
    assert!(!args.iter().any(|a| a.contains("caasvol")), "{args:?}");
    // The guest's only way to its VSM: a virtio-serial port named caas.vsm whose qemu
    // chardev is the crypto domain's UNIX socket on the host (no VSM over the network).
    let chardev = args
        .windows(2)
        .find(|w| w[0] == "-chardev" && w[1].starts_with("socket,id=vsm0,"))
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("no VSM chardev: {args:?}"));
    let vsm_socket = PathBuf::from(
        chardev
            .split_once(",path=")
            .map(|(_, p)| p.replace(",,", ","))
            .expect("the chardev names a socket path"),
    );
    {
        use std::os::unix::fs::FileTypeExt;
        let ft = std::fs::metadata(&vsm_socket).unwrap().file_type();
        assert!(ft.is_socket(), "{} is not a socket", vsm_socket.display());
    }
    assert!(
        vsm_socket.starts_with(root.join("dev")),
        "the VSM socket is the dev host's crypto domain's: {}",
        vsm_socket.display()
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "-device" && w[1] == "virtserialport,chardev=vsm0,name=caas.vsm"),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a == "virtio-serial-pci"), "{args:?}");
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

    // The storage side holds only ciphertext: no 16-byte run of the image's content — every
    // window, at every offset of the image, with at least 6 distinct byte values (the
    // kernel, the compressed initramfs, the boot loader; runs of zeros or small integers
    // also occur in the volume's own header) — appears at any offset of any file the storage
    // side holds (the encrypted image, the sealed configurations, whatever else a launch left
    // there). Fingerprints of all windows on both sides, sorted and intersected; a common
    // fingerprint is then compared byte for byte.
    let t_scan = Instant::now();
    let image_runs = plaintext_run_fingerprints(&plain, 6);
    assert!(
        image_runs.len() > 5_000_000,
        "the image has content: {}",
        image_runs.len()
    );
    let mut files = Vec::new();
    let mut todo = vec![storage.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    let enc_image = storage.join("images/legacy/image.caasvol");
    assert!(files.contains(&enc_image), "{files:?}");
    let mut scanned = 0usize;
    for f in &files {
        let enc = std::fs::read(f).unwrap();
        scanned += enc.len();
        if let Some((off, run)) = leaked_run(&enc, &plain, &image_runs) {
            panic!(
                "plaintext of the image ({}) at offset {off} of the stored file {}",
                hex::encode(run),
                f.display()
            );
        }
    }
    assert!(
        scanned >= plain.len(),
        "the storage side holds the whole encrypted image"
    );
    // The check finds a planted run: 16 bytes of the kernel copied into a ciphertext.
    let mut planted = std::fs::read(&enc_image).unwrap();
    let src = (plain.len() / 3 + 7..plain.len() - 16)
        .find(|&o| plain[o..o + 16].iter().collect::<HashSet<_>>().len() >= 6)
        .unwrap();
    let at = planted.len() / 2 + 3;
    let run: Vec<u8> = plain[src..src + 16].to_vec();
    planted[at..at + 16].copy_from_slice(&run);
    assert_eq!(
        leaked_run(&planted, &plain, &image_runs).map(|(o, _)| o),
        Some(at),
        "the scan misses a planted 16-byte run"
    );
    eprintln!(
        "storage scanned for plaintext runs in {:?}",
        t_scan.elapsed()
    );

    eprintln!("real VM test total: {:?}", t0.elapsed());
}
