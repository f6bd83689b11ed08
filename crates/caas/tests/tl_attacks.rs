//! Trusted launch (TL), DBSP and encrypted provisioning against a real `caas dev --hosts 2`
//! (swtpm TPMs, host agents, crypto-domain processes, process workloads): the tenant story
//! end to end, one test per attack of seed 003 §3.3/§5, the tampering and replay cases, the
//! host that changes state (attestation-gated release), and a compromised management API.
//! Attackers act as the seed's ADV does: they control the scheduler, the network to the
//! hosts' management APIs and the cloud storage, but not the TPMs or the TTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_attest::client::HttpClient;
use caas_tl::TtpPublic;
use caas_tl::dm::DomainManager;
use caas_tl::wire::{LaunchCall, VolumeRequest};
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Cloud {
    /// The cloud management's client to host agents. These attackers *are* the compromised
    /// scheduler and management: they hold a certificate of the dev deployment CA with the
    /// key-service and operator roles (tests/host_auth_attacks.rs covers callers without).
    mgmt: HttpClient,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dev: Dev,
    rt: tokio::runtime::Runtime,
}

type Reply = Result<Value, (u16, String)>;

impl Cloud {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        // Workload identities traverse (never list) the test directory to reach their own
        // 0700 run directories, as they traverse /run on a real host.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let root = tmp.path().to_path_buf();
        // Continuous attestation is slow here so that tests trigger it explicitly.
        let dev = Dev::start_with(
            &root.join("dev"),
            "127.0.0.1:0",
            &["--hosts", "2", "--attest-secs", "3600"],
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pki = caas_tls::pki::DevCa::load_or_create(&root.join("dev/pki")).unwrap();
        let mgmt = tls_client(
            &pki.ca_file(),
            Some(
                pki.issue(
                    "cloud-management",
                    &[caas_tls::Role::KeyService, caas_tls::Role::Operator],
                    &[],
                )
                .unwrap(),
            ),
        );
        Cloud {
            mgmt,
            _tmp: tmp,
            root,
            dev,
            rt,
        }
    }

    fn env(&self, k: &str) -> String {
        self.dev.var(k)
    }

    fn storage(&self) -> PathBuf {
        PathBuf::from(self.env("CAAS_STORAGE_DIR"))
    }

    fn tdir(&self, tenant: &str) -> PathBuf {
        self.root.join(tenant)
    }

    /// `caas tenant --dir ROOT/<tenant> ARGS` with the dev env.
    fn tenant(&self, tenant: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(caas_bin())
            .arg("tenant")
            .arg("--dir")
            .arg(self.tdir(tenant))
            .args(args)
            .envs(&self.dev.env)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn tenant_ok(&self, tenant: &str, args: &[&str]) -> String {
        let (ok, text) = self.tenant(tenant, args);
        assert!(ok, "caas tenant {args:?} failed:\n{text}");
        text
    }

    /// A tenant with a key, an ACL and a provisioned image `id` sealed to both hosts.
    fn tenant_with_image(&self, tenant: &str, domains: &str, id: &str) {
        self.tenant_ok(tenant, &["init"]);
        self.tenant_ok(tenant, &["acl", "--domains", domains]);
        let raw = self.root.join(format!("{tenant}-{id}.raw"));
        let data: Vec<u8> = (0..(2 << 20))
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&raw, &data).unwrap();
        self.tenant_ok(
            tenant,
            &[
                "provision",
                "--image",
                raw.to_str().unwrap(),
                "--id",
                id,
                "--hosts",
                "host-1,host-2",
            ],
        );
    }

    /// A call as the cloud's operator would make it: to the host agents (https) with the
    /// management's certificate; to the key service signed with the dev operator's key
    /// (every key-service route but health, public keys and the host protocol requires it).
    fn call(&self, method: &str, url: &str, body: Option<&Value>) -> Reply {
        let timeout = std::time::Duration::from_secs(120);
        if url.starts_with("https://") {
            return http_call(&self.rt, &self.mgmt, method, url, body);
        }
        let http = if url.starts_with(&self.ks()) {
            self.dev.operator_http(timeout)
        } else {
            HttpClient::new(timeout)
        };
        http_call(&self.rt, &http, method, url, body)
    }

    fn agent(&self, host: &str) -> String {
        self.dev.agent_url(host)
    }

    fn ks(&self) -> String {
        self.dev.ks_url()
    }

    /// A signed TL.Request built the way the tenant CLI builds it (for attackers that
    /// replay or redirect it).
    fn launch_call(
        &self,
        tenant: &str,
        id: &str,
        vm: &str,
        sp: &str,
        domains: &[&str],
    ) -> (LaunchCall, Vec<u8>) {
        let dm = dm(&self.tdir(tenant));
        let rec: Value = serde_json::from_slice(
            &std::fs::read(self.tdir(tenant).join("images").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        let mut h1 = [0u8; 32];
        hex::decode_to_slice(rec["h1"].as_str().unwrap(), &mut h1).unwrap();
        let ttp = TtpPublic::from_text(&self.env("CAAS_TTP_PUBLIC_KEY")).unwrap();
        let domains: Vec<String> = domains.iter().map(|s| s.to_string()).collect();
        let t = dm
            .token(&ttp, &h1, sp, vm, &domains, caas_attest::now_ms())
            .unwrap();
        (
            LaunchCall {
                request: t.request,
                vm_id: vm.into(),
                image_id: id.into(),
                driver: None,
                volumes: vec![],
                network: false,
                net: None,
            },
            t.tau.expose().to_vec(),
        )
    }

    /// `caas tenant launch` of image "web" as `vm` on `host` with finance/db attached.
    fn launch_with_db(&self, tenant: &str, vm: &str, host: &str) {
        self.tenant_ok(
            tenant,
            &[
                "launch",
                "--id",
                "web",
                "--vm",
                vm,
                "--host",
                host,
                "--domains",
                "finance",
                "--volumes",
                "finance/db",
            ],
        );
    }

    /// Management API: stop `vm` on `host`.
    fn stop(&self, host: &str, vm: &str) {
        self.call(
            "POST",
            &format!("{}/v1/agent/workloads/{vm}/stop", self.agent(host)),
            None,
        )
        .unwrap();
    }

    fn launch_at(&self, host: &str, call: &LaunchCall) -> Reply {
        self.call(
            "POST",
            &format!("{}/v1/agent/workloads", self.agent(host)),
            Some(&serde_json::to_value(call).unwrap()),
        )
    }

    fn workloads(&self, host: &str) -> Vec<Value> {
        self.call(
            "GET",
            &format!("{}/v1/agent/workloads", self.agent(host)),
            None,
        )
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
    }

    /// Restarts `caas dev` on the same directory (TPM state, key service store and agent
    /// state are kept; ports change).
    fn restart(&mut self) {
        self.dev.stop();
        self.dev.kill_orphans();
        let new = Dev::start_with(
            &self.root.join("dev"),
            "127.0.0.1:0",
            &["--hosts", "2", "--attest-secs", "3600"],
        );
        // The old handle's Drop would `pkill -f` the (shared) directory: the new deployment.
        std::mem::forget(std::mem::replace(&mut self.dev, new));
    }

    /// The host agent's audit log (its management audit, hash-chained) as text.
    fn agent_audit(&self, host: &str) -> String {
        self.call("GET", &format!("{}/v1/agent/audit", self.agent(host)), None)
            .unwrap()
            .to_string()
    }

    /// How many records of `host`'s agent audit have `op` with result `result`.
    fn agent_audit_count(&self, host: &str, op: &str, result: &str) -> usize {
        let log = self
            .call("GET", &format!("{}/v1/agent/audit", self.agent(host)), None)
            .unwrap();
        log.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["op"] == json!(op) && e["result"] == json!(result))
            .count()
    }

    fn agent_audit_has(&self, host: &str, op: &str, result: &str) -> bool {
        self.agent_audit_count(host, op, result) > 0
    }

    /// What anyone with read access to the cloud storage knows of an image: H1, the hash of
    /// its encrypted copy.
    fn stored_h1(&self, id: &str) -> [u8; 32] {
        let enc =
            std::fs::read(self.storage().join("images").join(id).join("image.caasvol")).unwrap();
        caas_tl::crypto::sha256(&enc)
    }

    /// The SHA-256 of a tenant's plaintext image (`tenant_with_image`).
    fn plain_sha256(&self, tenant: &str, id: &str) -> String {
        let raw = std::fs::read(self.root.join(format!("{tenant}-{id}.raw"))).unwrap();
        hex::encode(caas_tl::crypto::sha256(&raw))
    }

    /// The key service's audit records (JSON lines).
    fn audit(&self) -> String {
        self.dev.caas(&["audit", "list", "--limit", "100000"])
    }

    /// A second security profile "other" accepting the same boot, assigned to `host`:
    /// the host is then in CH_SPj with SPj ≠ "dev".
    fn move_to_other_profile(&self, host: &str) {
        let mut p = self
            .call(
                "GET",
                &format!("{}/v1/attest/profiles/dev", self.ks()),
                None,
            )
            .unwrap();
        p["name"] = json!("other");
        self.call(
            "POST",
            &format!("{}/v1/attest/profiles", self.ks()),
            Some(&p),
        )
        .unwrap();
        self.call(
            "PUT",
            &format!("{}/v1/attest/hosts/{host}/profile", self.ks()),
            Some(&json!({ "profile": "other" })),
        )
        .unwrap();
        let v = self
            .call(
                "POST",
                &format!("{}/v1/attest/hosts/{host}/attest", self.ks()),
                None,
            )
            .unwrap();
        assert_eq!(v["trusted"], json!(true), "{host} trusted under other: {v}");
    }
}

/// The DBSP volume finance/db (1 MiB when created).
fn finance_db() -> Vec<VolumeRequest> {
    vec![VolumeRequest {
        domain: "finance".into(),
        sr: "db".into(),
        size: 1 << 20,
    }]
}

fn dm(tdir: &Path) -> DomainManager {
    DomainManager::from_pkcs8(&std::fs::read(tdir.join("dm.pk8")).unwrap()).unwrap()
}

fn assert_refused(r: &Reply, code: &str, what: &str) {
    match r {
        Err((403, c)) if c == code => {}
        other => panic!("{what}: expected 403 {code}, got {other:?}"),
    }
}

fn audit_has(audit: &str, op: &str, result: &str) -> bool {
    audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|v| v["Operation"] == json!(op) && v["Result"] == json!(result))
}

#[test]
fn trusted_launch_end_to_end_with_dbsp_psk_channel_and_vsm() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance,hr", "web");
    let out = c.tenant_ok(
        "alice",
        &[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm1",
            "--domains",
            "finance",
            "--volumes",
            "finance/db",
        ],
    );
    assert!(out.contains("\"vm_id\": \"vm1\""), "{out}");
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm1"]);
    let v: Value = serde_json::from_str(&rep[rep.find('{').unwrap()..]).unwrap();
    // The workload read the image the tenant encrypted: its plaintext hash.
    let raw = std::fs::read(c.root.join("alice-web.raw")).unwrap();
    assert_eq!(
        v["disk_sha256"],
        json!(hex::encode(caas_tl::crypto::sha256(&raw)))
    );
    assert_eq!(v["vsm"]["mechanism"], json!("CKM_ECDSA_SHA256"), "{v}");
    assert_eq!(v["volumes"][0]["ok"], json!(true), "{v}");
    // Storage holds only ciphertext: no 16-byte run of the image in the encrypted copy.
    let enc = std::fs::read(c.storage().join("images/web/image.caasvol")).unwrap();
    for chunk in raw.chunks(4096).take(64) {
        assert!(
            !enc.windows(16).any(|w| w == &chunk[..16]),
            "plaintext in storage"
        );
    }
    // The DBSP volume's header carries the domain, SP, c4 and μ.
    let vol = std::fs::read(c.storage().join("domains/finance/db.caasvol")).unwrap();
    assert_eq!(&vol[1120..1127], b"finance");
    // Re-attach after a stop: the keys are re-created from c4 and μ (same data).
    c.call(
        "POST",
        &format!(
            "{}/v1/agent/workloads/vm1/stop",
            c.agent(&v_host(&c, "vm1"))
        ),
        None,
    )
    .unwrap();
    c.tenant_ok(
        "alice",
        &[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm1b",
            "--domains",
            "finance",
            "--volumes",
            "finance/db",
        ],
    );
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm1b"]);
    assert!(rep.contains("\"ok\": true"), "{rep}");
    let audit = c.audit();
    assert!(
        audit_has(&audit, "TlAttest", "Success"),
        "TTP audit: {audit}"
    );
    assert!(audit_has(&audit, "DbspDomKey", "Success"));
}

fn v_host(c: &Cloud, vm: &str) -> String {
    let rec: Value = serde_json::from_slice(
        &std::fs::read(c.tdir("alice").join("vms").join(format!("{vm}.json"))).unwrap(),
    )
    .unwrap();
    rec["host"].as_str().unwrap().to_string()
}

/// Definition 1: the scheduler launches another image than the DM's. The SC's H1 check
/// refuses another image of the same DM, the owner check an image of another DM; and a VM
/// the attacker launched itself cannot answer the DM's PSK channel.
#[test]
fn vm_substitution_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_with_image("alice", "finance", "web2");
    c.tenant_with_image("mallory", "mal", "evil");
    let (mut call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    call.image_id = "web2".into();
    assert_refused(
        &c.launch_at("host-1", &call),
        "h1_mismatch",
        "substituted image",
    );
    let (mut call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    call.image_id = "evil".into();
    assert_refused(
        &c.launch_at("host-1", &call),
        "owner_mismatch",
        "another DM's image",
    );
    assert!(c.workloads("host-1").is_empty());
    // The attacker's own VM, presented to the DM as vm1: the PSK handshake fails (τ' ≠ τ).
    c.tenant_ok(
        "mallory",
        &["launch", "--id", "evil", "--vm", "vm1", "--host", "host-2"],
    );
    c.tenant_ok(
        "alice",
        &["launch", "--id", "web", "--vm", "vm1", "--host", "host-1"],
    );
    let mal: Value =
        serde_json::from_slice(&std::fs::read(c.tdir("mallory").join("vms/vm1.json")).unwrap())
            .unwrap();
    let p = c.tdir("alice").join("vms/vm1.json");
    let mut rec: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    rec["endpoint"] = mal["endpoint"].clone();
    std::fs::write(&p, serde_json::to_vec(&rec).unwrap()).unwrap();
    let (ok, text) = c.tenant("alice", &["connect", "--vm", "vm1"]);
    assert!(!ok, "the DM accepted a substituted VM: {text}");
    assert!(audit_has(&c.audit(), "TlAttest", "Success"));
}

/// Definition 2: the VM is sent to a host whose security profile is not SP_i.
#[test]
fn ch_substitution_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.move_to_other_profile("host-2");
    let (call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    assert_refused(
        &c.launch_at("host-2", &call),
        "sp_mismatch",
        "host in another profile",
    );
    assert!(c.workloads("host-2").is_empty());
    // The honest scheduler does not place it there either.
    let (ok, text) = c.tenant(
        "alice",
        &["launch", "--id", "web", "--vm", "vm2", "--host", "host-2"],
    );
    assert!(!ok && text.contains("no_host"), "{text}");
    assert!(audit_has(&c.audit(), "TlAttest", "sp_mismatch"));
}

/// Definition 3: a substituted image on a substituted host.
#[test]
fn combined_substitution_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_with_image("mallory", "mal", "evil");
    c.move_to_other_profile("host-2");
    let (mut call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    call.image_id = "evil".into();
    let r = c.launch_at("host-2", &call);
    assert!(
        matches!(&r, Err((403, code)) if ["sp_mismatch", "h1_mismatch", "owner_mismatch"].contains(&code.as_str())),
        "{r:?}"
    );
    assert!(c.workloads("host-2").is_empty());
}

/// Definition 4: the DM's workload, launched on a host of another profile, must not reach
/// the domain's data: the volume's c4 names SP_i, the host is in SP_j.
#[test]
fn storage_ch_substitution_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    // (The volume is released first: while vm1's proxy has it open, a second proxy is
    // refused before any key is asked for — one writer per volume.)
    c.stop("host-1", "vm1");
    c.move_to_other_profile("host-2");
    // The same DM's workload, accepted under SP "other" on host-2, asks for finance/db.
    let (mut call, _) = c.launch_call("alice", "web", "vm2", "other", &["finance"]);
    call.volumes = finance_db();
    assert_refused(
        &c.launch_at("host-2", &call),
        "sp_mismatch",
        "storage CH substitution",
    );
    assert!(
        c.workloads("host-2").is_empty(),
        "no crypto domain may stay up"
    );
    assert!(audit_has(&c.audit(), "DbspDomKey", "sp_mismatch"));
}

/// Definition 5: a workload of another DM gets access to a domain it does not own.
#[test]
fn domain_violation_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_with_image("mallory", "mal", "evil");
    // mallory cannot claim alice's domain in the ACL...
    let (ok, text) = c.tenant("mallory", &["acl", "--domains", "finance"]);
    assert!(!ok && text.contains("domain_owned"), "{text}");
    // ...nor launch a workload with it.
    let (ok, text) = c.tenant(
        "mallory",
        &[
            "launch",
            "--id",
            "evil",
            "--vm",
            "m1",
            "--domains",
            "finance",
            "--volumes",
            "finance/db",
        ],
    );
    assert!(!ok && text.contains("acl_denied"), "{text}");
    // A workload launched without the domain cannot attach it later.
    c.tenant_ok(
        "alice",
        &["launch", "--id", "web", "--vm", "a1", "--host", "host-1"],
    );
    let r = c.call(
        "POST",
        &format!("{}/v1/agent/workloads/a1/volumes", c.agent("host-1")),
        Some(&json!({ "domain": "finance", "sr": "db" })),
    );
    assert_refused(&r, "acl_denied", "domain not in D_vm");
    let audit = c.audit();
    assert!(audit_has(&audit, "TlAttest", "acl_denied"), "{audit}");
    assert!(audit_has(&audit, "DbspDomKey", "acl_denied"));
}

#[test]
fn replayed_tl_and_dbsp_messages_are_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    let (call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    c.launch_at("host-1", &call).unwrap();
    // The same TL.Request again: refused by the host, and by the TTP on another host.
    c.stop("host-1", "vm1");
    assert_refused(
        &c.launch_at("host-1", &call),
        "nonce_replayed",
        "replay at the host",
    );
    assert_refused(
        &c.launch_at("host-2", &call),
        "nonce_replayed",
        "replay at the TTP",
    );
    // A DBSP request replayed at the TTP: the attacker records a DomKeyReq (here: built with
    // the host's own quote over its digest) and sends it twice.
    let body = serde_json::to_vec(&json!({
        "host": "host-1", "vm_id": "vm1", "sr": "db", "h2": dm(&c.tdir("alice")).h2(),
        "launch_r": caas_attest::b64::encode(&[8u8; 32]),
        "r": caas_attest::b64::encode(&[7u8; 32]), "t_ms": caas_attest::now_ms(),
        "enc": caas_attest::b64::encode(&[0u8; 64]),
    }))
    .unwrap();
    let nonce = caas_tl::crypto::ak_nonce(caas_tl::wire::label::DOMKEY_REQUEST, &body);
    let ev = c
        .call(
            "POST",
            &format!("{}/v1/agent/quote", c.agent("host-1")),
            Some(&json!({ "nonce": caas_attest::b64::encode(&nonce), "selection": { "hash": "sha256", "pcrs": [0,1,2,3,4,5,6,7] } })),
        )
        .unwrap();
    let req = json!({ "body": caas_attest::b64::encode(&body), "evidence": ev });
    let first = c.call("POST", &format!("{}/v1/tl/domkey", c.ks()), Some(&req));
    assert!(
        matches!(&first, Err((403, code)) if code != "nonce_replayed"),
        "{first:?}"
    );
    assert_refused(
        &c.call("POST", &format!("{}/v1/tl/domkey", c.ks()), Some(&req)),
        "nonce_replayed",
        "DBSP replay",
    );
    let audit = c.audit();
    assert!(audit_has(&audit, "TlAttest", "nonce_replayed"));
    assert!(audit_has(&audit, "DbspDomKey", "nonce_replayed"));
}

#[test]
fn tampered_image_configuration_and_swapped_pk_dm_are_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_with_image("mallory", "mal", "evil");
    let img = c.storage().join("images/web/image.caasvol");
    let cfg = c.storage().join("images/web/domc-host-1.sealed");
    let orig_img = std::fs::read(&img).unwrap();
    let orig_cfg = std::fs::read(&cfg).unwrap();
    // A tampered encrypted image in storage: H1 ≠ H1'.
    let mut t = orig_img.clone();
    let n = t.len() - 100;
    t[n] ^= 1;
    std::fs::write(&img, &t).unwrap();
    let (call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
    assert_refused(
        &c.launch_at("host-1", &call),
        "h1_mismatch",
        "tampered image",
    );
    std::fs::write(&img, &orig_img).unwrap();
    // A tampered configuration: only its holder (the TPM bind key) could make a valid one.
    // (Envelope label, the RSA part for the TPM, the AES-GCM body.)
    for at in [10usize, 150, orig_cfg.len() - 5] {
        let mut t = orig_cfg.clone();
        t[at] ^= 0x40;
        std::fs::write(&cfg, &t).unwrap();
        let (call, _) = c.launch_call("alice", "web", "vm1", "dev", &[]);
        assert_refused(
            &c.launch_at("host-1", &call),
            "config_tampered",
            "tampered configuration",
        );
    }
    std::fs::write(&cfg, &orig_cfg).unwrap();
    // The cloud provider swaps pk_DM: σ_DM fails if it only swaps the key; re-signed with its
    // own key, alice's configuration does not open for it (SC), and for an image of its own
    // H2 = hash(pk_DM) in m1 no longer matches (TTP).
    let (call, _) = c.launch_call("alice", "web", "vm2", "dev", &[]);
    let mut lr: Value = serde_json::from_slice(&call.request.body).unwrap();
    let mallory = dm(&c.tdir("mallory"));
    lr["pk_dm"] = json!(caas_attest::b64::encode(&mallory.public()));
    let swapped_only = LaunchCall {
        request: caas_tl::wire::Signed {
            body: serde_json::to_vec(&lr).unwrap(),
            sig: call.request.sig.clone(),
        },
        ..call.clone()
    };
    assert_refused(
        &c.launch_at("host-1", &swapped_only),
        "bad_signature",
        "swapped pk_DM, old signature",
    );
    let resigned = LaunchCall {
        request: caas_tl::wire::Signed::sign(
            mallory.key_pair(),
            caas_tl::wire::label::LAUNCH_REQUEST,
            &lr,
        ),
        ..call
    };
    assert_refused(
        &c.launch_at("host-1", &resigned),
        "owner_mismatch",
        "swapped pk_DM, re-signed",
    );
    let (call, _) = c.launch_call("alice", "web", "vm4", "dev", &[]);
    let mut lr: Value = serde_json::from_slice(&call.request.body).unwrap();
    lr["pk_dm"] = json!(caas_attest::b64::encode(&mallory.public()));
    let own_image = LaunchCall {
        request: caas_tl::wire::Signed::sign(
            mallory.key_pair(),
            caas_tl::wire::label::LAUNCH_REQUEST,
            &lr,
        ),
        image_id: "evil".into(),
        ..call
    };
    assert_refused(
        &c.launch_at("host-1", &own_image),
        "h2_mismatch",
        "swapped pk_DM, re-signed, own image",
    );
    // A good launch still works afterwards.
    let (call, _) = c.launch_call("alice", "web", "vm3", "dev", &[]);
    c.launch_at("host-1", &call).unwrap();
    let audit = c.audit();
    assert!(audit_has(&audit, "TlAttest", "h2_mismatch"), "{audit}");
    let agent_audit = c
        .call(
            "GET",
            &format!("{}/v1/agent/audit", c.agent("host-1")),
            None,
        )
        .unwrap();
    let text = agent_audit.to_string();
    for code in [
        "h1_mismatch",
        "config_tampered",
        "bad_signature",
        "owner_mismatch",
        "h2_mismatch",
    ] {
        assert!(text.contains(code), "agent audit lacks {code}: {text}");
    }
}

#[test]
fn tampered_c4_or_mu_is_rejected() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    c.stop("host-1", "vm1");
    let vol = c.storage().join("domains/finance/db.caasvol");
    let orig = std::fs::read(&vol).unwrap();
    for (off, code) in [(1504 + 20, "c4_invalid"), (2528 + 3, "mu_invalid")] {
        let mut t = orig.clone();
        t[off] ^= 1;
        std::fs::write(&vol, &t).unwrap();
        let (mut call, _) = c.launch_call("alice", "web", "vm2", "dev", &["finance"]);
        call.volumes = finance_db();
        assert_refused(
            &c.launch_at("host-1", &call),
            code,
            "tampered domain header",
        );
    }
    std::fs::write(&vol, &orig).unwrap();
    let (mut call, _) = c.launch_call("alice", "web", "vm3", "dev", &["finance"]);
    call.volumes = finance_db();
    c.launch_at("host-1", &call).unwrap();
    let audit = c.audit();
    assert!(
        audit_has(&audit, "DbspDomKey", "c4_invalid")
            && audit_has(&audit, "DbspDomKey", "mu_invalid")
    );
}

/// A host whose PCRs change after enrollment: no launch, no DBSP key, and its running crypto
/// domains drop their keys once continuous attestation notices (attestation-gated release).
#[test]
fn host_that_changed_state_is_rejected_and_loses_its_keys() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    assert_eq!(c.workloads("host-1").len(), 1);
    c.call(
        "POST",
        &format!("{}/v1/agent/dev/measure", c.agent("host-1")),
        Some(&json!({ "pcr": 7, "data": "an unexpected kernel module" })),
    )
    .unwrap();
    let (call, _) = c.launch_call("alice", "web", "vm2", "dev", &[]);
    assert_refused(
        &c.launch_at("host-1", &call),
        "attestation_failed",
        "changed host",
    );
    // Continuous attestation marks it untrusted → the TTP revokes → crypto domains stop.
    let v = c
        .call(
            "POST",
            &format!("{}/v1/attest/hosts/host-1/attest", c.ks()),
            None,
        )
        .unwrap();
    assert_eq!(v["trusted"], json!(false));
    let t = std::time::Instant::now();
    while !c.workloads("host-1").is_empty() && t.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        c.workloads("host-1").is_empty(),
        "crypto domains still running after revocation"
    );
    let (ok, _) = c.tenant("alice", &["connect", "--vm", "vm1"]);
    assert!(!ok, "the workload must be gone");
    assert!(audit_has(&c.audit(), "TlAttest", "attestation_failed"));
}

/// The management API driven as an attacker would: every route, odd paths, and the audit
/// trail. No answer carries τ, the token PIN, a key or a plaintext configuration.
#[test]
fn compromised_management_gets_no_key_material() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    let vm: Value =
        serde_json::from_slice(&std::fs::read(c.tdir("alice").join("vms/vm1.json")).unwrap())
            .unwrap();
    let tau_b64 = vm["tau"].as_str().unwrap().to_string();
    let tau = caas_attest::b64::decode(&tau_b64).unwrap();
    let img: Value =
        serde_json::from_slice(&std::fs::read(c.tdir("alice").join("images/web.json")).unwrap())
            .unwrap();
    let pin = img["user_pin"].as_str().unwrap().to_string();
    let a = c.agent("host-1");
    let mut answers = String::new();
    for (m, path, body) in [
        ("GET", "/v1/agent/status", None),
        ("GET", "/v1/agent/bind-key", None),
        ("GET", "/v1/agent/workloads", None),
        ("GET", "/v1/agent/audit", None),
        ("GET", "/v1/agent/workloads/vm1", None),
        ("GET", "/v1/agent/keys", None),
        ("GET", "/v1/agent/workloads/vm1/memory", None),
        (
            "POST",
            "/v1/agent/workloads/vm1/volumes",
            Some(json!({ "domain": "finance", "sr": "db" })),
        ),
        (
            "POST",
            "/v1/agent/workloads/vm1/volumes",
            Some(json!({ "domain": "finance", "sr": "../../x" })),
        ),
        (
            "POST",
            "/v1/agent/revoke",
            Some(json!({ "body": "e30=", "sig": "AAAA" })),
        ),
        (
            "POST",
            "/v1/agent/workloads",
            Some(
                json!({ "request": { "body": "e30=", "sig": "" }, "vm_id": "x", "image_id": "web" }),
            ),
        ),
    ] {
        let r = c.call(m, &format!("{a}{path}"), body.as_ref());
        answers.push_str(&format!("{m} {path} → {r:?}\n"));
    }
    for secret in [tau_b64.as_str(), &hex::encode(&tau), &pin] {
        assert!(
            !answers.contains(secret),
            "management API leaked a secret:\n{answers}"
        );
    }
    // Nothing on the host's disk holds τ or the PIN in the clear either.
    let host_dir = c.dev.dir.join("hosts/host-1");
    let mut stack = vec![host_dir, c.storage()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                for secret in [&tau[..], pin.as_bytes(), tau_b64.as_bytes()] {
                    assert!(
                        !b.windows(secret.len()).any(|w| w == secret),
                        "{} holds a secret",
                        p.display()
                    );
                }
            }
        }
    }
    // Every management call is in the agent's hash-chained audit log.
    let log = c.call("GET", &format!("{a}/v1/agent/audit"), None).unwrap();
    let ops: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["op"].as_str())
        .collect();
    for op in ["LaunchWorkload", "ListWorkloads", "AttachVolume", "Revoke"] {
        assert!(ops.contains(&op), "{op} not audited: {ops:?}");
    }
    // The workload still works: management calls did not disturb it.
    c.tenant_ok("alice", &["connect", "--vm", "vm1"]);
}

/// Issue 12: a second domain manager, knowing only what storage shows (the encrypted image,
/// hence H1), registers the victim's image id in its own tenant state and launches it. The
/// crypto-domain configuration that holds k is sealed for its owner's H2: the host refuses
/// the launch before any key is released, and audits the refusal.
#[test]
fn another_dm_cannot_launch_my_image() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "secret-img");
    c.tenant_ok("mallory", &["init"]);
    let rec = json!({
        "id": "secret-img",
        "h1": hex::encode(c.stored_h1("secret-img")),
        "token_label": "caas-workload",
        "user_pin": "guessed",
    });
    let images = c.tdir("mallory").join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(
        images.join("secret-img.json"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    let victim = c.plain_sha256("alice", "secret-img");
    for host in ["host-1", "host-2"] {
        let vm = format!("stolen-{host}");
        let (ok, text) = c.tenant(
            "mallory",
            &["launch", "--id", "secret-img", "--vm", &vm, "--host", host],
        );
        if ok {
            let (_, rep) = c.tenant("mallory", &["connect", "--vm", &vm]);
            panic!(
                "another DM launched secret-img on {host} (its workload reads the victim's plaintext: {}):\n{rep}",
                rep.contains(&victim)
            );
        }
        assert!(text.contains("owner_mismatch"), "{host}: {text}");
        assert!(c.workloads(host).is_empty(), "{host}: nothing may run");
        assert!(
            c.agent_audit_has(host, "LaunchWorkload", "owner_mismatch"),
            "{host}: {}",
            c.agent_audit(host)
        );
    }
    // The attacker also controls storage: it rewrites the owner the envelope names in the
    // clear to its own H2. The owner is in the AAD too: the configuration no longer opens.
    let cfg = c.storage().join("images/secret-img/domc-host-1.sealed");
    let orig = std::fs::read(&cfg).unwrap();
    let mut relabelled = orig.clone();
    let at = 4 + caas_tl::wire::label::DOMC_CONFIG.len() + 4;
    assert_eq!(
        &relabelled[at..at + 64],
        dm(&c.tdir("alice")).h2().as_bytes()
    );
    relabelled[at..at + 64].copy_from_slice(dm(&c.tdir("mallory")).h2().as_bytes());
    std::fs::write(&cfg, &relabelled).unwrap();
    let (ok, text) = c.tenant(
        "mallory",
        &[
            "launch",
            "--id",
            "secret-img",
            "--vm",
            "relabel",
            "--host",
            "host-1",
        ],
    );
    assert!(!ok && text.contains("config_tampered"), "{text}");
    assert!(c.workloads("host-1").is_empty());
    assert!(c.agent_audit_has("host-1", "LaunchWorkload", "config_tampered"));
    std::fs::write(&cfg, &orig).unwrap();
    // The owner still launches it, and reads the plaintext.
    c.tenant_ok(
        "alice",
        &[
            "launch",
            "--id",
            "secret-img",
            "--vm",
            "mine",
            "--host",
            "host-1",
        ],
    );
    let rep = c.tenant_ok("alice", &["connect", "--vm", "mine"]);
    assert!(rep.contains(&victim), "{rep}");
}

/// Issue 12: the untrusted scheduler plays a domain manager of its own (its own key, a
/// TL.Request the TTP accepts for it) and places the victim's image, through its own route
/// and directly at a host agent. Refused with `owner_mismatch`, audited by the agent.
#[test]
fn scheduler_cannot_launch_my_image() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "secret-img");
    let doc = caas_tl::crypto::ed25519_generate().unwrap();
    let sched = DomainManager::from_pkcs8(doc.expose()).unwrap();
    let ttp = TtpPublic::from_text(&c.env("CAAS_TTP_PUBLIC_KEY")).unwrap();
    let h1 = c.stored_h1("secret-img");
    let victim = c.plain_sha256("alice", "secret-img");
    let call = |vm: &str| {
        let t = sched
            .token(&ttp, &h1, "dev", vm, &[], caas_attest::now_ms())
            .unwrap();
        (
            LaunchCall {
                request: t.request,
                vm_id: vm.into(),
                image_id: "secret-img".into(),
                driver: None,
                volumes: vec![],
                network: false,
                net: None,
            },
            t.tau,
        )
    };
    let steal = |r: Reply, vm: &str, tau: &caas_crypto::SecretBytes| {
        if let Ok(v) = &r {
            let addr = v["workload"]["endpoint"].as_str().unwrap().parse().unwrap();
            let rep = caas_workload::challenge(addr, vm, tau, sched.key_pair()).unwrap();
            panic!(
                "the scheduler launched secret-img (disk = victim's plaintext: {}): {v}",
                rep.disk_sha256 == victim
            );
        }
        assert_refused(&r, "owner_mismatch", vm);
    };
    // Through the scheduler's own route, placed on host-1.
    let (via_sched, tau) = call("sched-1");
    let mut body = serde_json::to_value(&via_sched).unwrap();
    body["host"] = json!("host-1");
    let r = c.call("POST", &format!("{}/v1/sched/launch", c.ks()), Some(&body));
    steal(r, "sched-1", &tau);
    // Straight at host-2's agent.
    let (direct, tau) = call("sched-2");
    steal(c.launch_at("host-2", &direct), "sched-2", &tau);
    for host in ["host-1", "host-2"] {
        assert!(c.workloads(host).is_empty(), "{host}");
        assert!(
            c.agent_audit_has(host, "LaunchWorkload", "owner_mismatch"),
            "{host}: {}",
            c.agent_audit(host)
        );
    }
}

/// Issue 12: the TTP keyed its sessions by (host, id_vm), so a second AttestToken for the
/// same pair replaced a live workload's DK_i, H2 and D_vm. The attacker (the scheduler, or
/// anyone on the management network: the agent quotes any nonce) has host-1 sign a
/// TL.AttestRequest for its own DM naming the victim's running id_vm and sends it to the
/// TTP. The victim's workload keeps its session: it still attaches its domain's volume.
#[test]
fn live_ttp_session_is_not_overwritten() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_ok(
        "alice",
        &[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm1",
            "--host",
            "host-1",
            "--domains",
            "finance",
        ],
    );
    let doc = caas_tl::crypto::ed25519_generate().unwrap();
    let mallory = DomainManager::from_pkcs8(doc.expose()).unwrap();
    let ttp = TtpPublic::from_text(&c.env("CAAS_TTP_PUBLIC_KEY")).unwrap();
    let token = mallory
        .token(&ttp, &[0u8; 32], "dev", "vm1", &[], caas_attest::now_ms())
        .unwrap();
    let bind = c
        .call(
            "GET",
            &format!("{}/v1/agent/bind-key", c.agent("host-1")),
            None,
        )
        .unwrap();
    let body = serde_json::to_vec(&json!({
        "host": "host-1",
        "launch": token.request,
        "bind": bind,
        "t_ms": caas_attest::now_ms(),
    }))
    .unwrap();
    let nonce = caas_tl::crypto::ak_nonce(caas_tl::wire::label::ATTEST_REQUEST, &body);
    let ev = c
        .call(
            "POST",
            &format!("{}/v1/agent/quote", c.agent("host-1")),
            Some(&json!({ "nonce": caas_attest::b64::encode(&nonce), "selection": { "hash": "sha256", "pcrs": [0,1,2,3,4,5,6,7] } })),
        )
        .unwrap();
    let req = json!({ "body": caas_attest::b64::encode(&body), "evidence": ev });
    // The TTP may accept it (it is a valid launch of mallory's) — it gets its own session.
    let second = c.call("POST", &format!("{}/v1/tl/attest", c.ks()), Some(&req));
    // The TTP accepts it (a valid launch of mallory's): the overwrite is really attempted.
    assert!(second.is_ok(), "second AttestToken: {second:?}");
    // alice's running vm1 still holds its session: its DBSP request is answered.
    let r = c.call(
        "POST",
        &format!("{}/v1/agent/workloads/vm1/volumes", c.agent("host-1")),
        Some(&json!({ "domain": "finance", "sr": "db", "size": 1 << 20 })),
    );
    assert!(r.is_ok(), "the live session was overwritten: {r:?}");
    let audit = c.audit();
    assert!(audit_has(&audit, "DbspDomKey", "Success"), "{audit}");
    assert!(c.agent_audit_has("host-1", "AttachVolume", "ok"));
    // Both launches are in the TTP's audit, each with its own session.
    let sessions: Vec<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["Operation"] == json!("TlAttest")
                && v["Result"] == json!("Success")
                && v["KeyId"] == json!("host-1/vm1")
        })
        .map(|v| v.to_string())
        .collect();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(sessions[1].contains(&hex::encode(&token.r)), "{sessions:?}");
}

/// Issue 12: a TTP-signed revocation used to be accepted again for its whole freshness
/// window. The notice is public (the agent keeps the last one it applied, and anyone on the
/// management network sees it go by); replaying it after the host is trusted again would
/// stop every crypto domain on it. Revocations carry a sequence number; the agent refuses
/// one not above the last it applied, durably, and audits the refusal.
#[test]
fn replayed_revocation_is_refused() {
    let mut c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    // The dev profile briefly expects another PCR 0: host-1 turns untrusted → the TTP
    // revokes; with the profile restored it is trusted again.
    let dev = c
        .call("GET", &format!("{}/v1/attest/profiles/dev", c.ks()), None)
        .unwrap();
    let mut strict = dev.clone();
    strict["pcrs"]["0"]["values"] = json!(["ff".repeat(32)]);
    let set_profile = |c: &Cloud, p: &Value| {
        c.call(
            "PUT",
            &format!("{}/v1/attest/profiles/dev", c.ks()),
            Some(p),
        )
        .unwrap();
        c.call(
            "POST",
            &format!("{}/v1/attest/hosts/host-1/attest", c.ks()),
            None,
        )
        .unwrap()
    };
    assert_eq!(set_profile(&c, &strict)["trusted"], json!(false));
    let state = c.dev.dir.join("hosts/host-1/agent-state/revocation.json");
    let t = std::time::Instant::now();
    while !state.exists() && t.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        state.exists(),
        "no revocation applied: agent audit {}\n{}",
        c.agent_audit("host-1"),
        std::fs::read_to_string(c.dev.dir.join("test-dev.log")).unwrap_or_default()
    );
    let kept: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let notice = kept["notice"].clone();
    assert!(kept["seq"].as_u64().unwrap() > 0, "{kept}");
    assert!(c.agent_audit_has("host-1", "Revoke", "ok"));
    // Trusted again; alice's workload runs.
    assert_eq!(set_profile(&c, &dev)["trusted"], json!(true));
    c.tenant_ok(
        "alice",
        &["launch", "--id", "web", "--vm", "vm1", "--host", "host-1"],
    );
    assert_eq!(c.workloads("host-1").len(), 1);
    let replay = |c: &Cloud| {
        c.call(
            "POST",
            &format!("{}/v1/agent/revoke", c.agent("host-1")),
            Some(&notice),
        )
    };
    assert_refused(&replay(&c), "revoke_replayed", "replayed revocation");
    assert_eq!(c.workloads("host-1").len(), 1, "the replay stopped vm1");
    c.tenant_ok("alice", &["connect", "--vm", "vm1"]);
    assert_eq!(
        c.agent_audit_count("host-1", "Revoke", "revoke_replayed"),
        1
    );
    // After an agent restart (state kept), the replay is still refused.
    c.restart();
    assert_refused(&replay(&c), "revoke_replayed", "replay after restart");
    assert_eq!(
        c.agent_audit_count("host-1", "Revoke", "revoke_replayed"),
        2
    );
    assert!(
        audit_has(&c.audit(), "TlRevoke", "Success"),
        "TTP audit of the notice"
    );
}

// ---------------------------------------------------------------------------------------
// Issue 12: one crypto domain, one identity; no key on the host's disk or in a core file.
// ---------------------------------------------------------------------------------------

/// `role -> pid` of a workload's processes, from the management API.
fn procs(c: &Cloud, host: &str, vm: &str) -> Vec<(String, u32)> {
    let w = c.workloads(host);
    let w = w
        .iter()
        .find(|w| w["vm_id"] == json!(vm))
        .unwrap_or_else(|| panic!("{vm} not running on {host}"));
    w["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (role, pid) = p.as_str().unwrap().split_once(':').unwrap();
            (role.to_string(), pid.parse().unwrap())
        })
        .collect()
}

fn pid_of(c: &Cloud, host: &str, vm: &str, role: &str) -> u32 {
    procs(c, host, vm)
        .into_iter()
        .find(|(r, _)| r == role)
        .unwrap_or_else(|| panic!("no {role} process for {vm}"))
        .1
}

/// Every live process whose command line names `needle` (the DBSP volume proxies are not
/// listed by the management API).
fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

/// The crypto domain's directory of a launch: its sockets and VSM state.
fn domain_dir(c: &Cloud, host: &str, vm: &str) -> PathBuf {
    run_dir(c, host, vm).join("domain")
}

fn run_dir(c: &Cloud, host: &str, vm: &str) -> PathBuf {
    c.dev
        .dir
        .join("hosts")
        .join(host)
        .join("agent-state/run")
        .join(vm)
}

/// Connects to a UNIX socket as `uid:gid` (no capabilities) and reports what happened:
/// `connect-error N`, `closed` (accepted, then closed before any answer: a refused peer)
/// or `data` (the server answered: NBD greets at once; the VSM answers any frame).
fn probe(uid: u32, gid: u32, socket: &Path, vsm: bool) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
try:
    if sys.argv[2] == "vsm":
        s.sendall(b"\x00\x00\x00\x04abcd")
    d = s.recv(64)
except OSError as e:
    print("closed" if e.errno in (104, 32) else "recv-error %d" % e.errno); sys.exit(0)
print("data" if d else "closed")
"#;
    use std::os::unix::process::CommandExt;
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .arg(if vsm { "vsm" } else { "nbd" })
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .output()
        .expect("/usr/bin/python3 is needed (apt-get install python3)");
    assert!(
        out.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Co-tenants on one host: alice's and bob's workloads get different identities; bob's
/// workload identity (and any other uid) reaches none of alice's crypto-domain sockets —
/// neither by path (0700 run directory) nor through a hard link to the socket (the
/// servers check SO_PEERCRED) — and every refusal is audited by alice's crypto domain and
/// logged by her proxies.
#[test]
fn co_tenant_cannot_reach_another_crypto_domain() {
    assert!(
        ids_of(std::process::id()).0 == 0,
        "this test needs root (workload identities are separate uids)"
    );
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_with_image("bob", "hr", "app");
    c.launch_with_db("alice", "vm-a", "host-1");
    c.tenant_ok(
        "bob",
        &["launch", "--id", "app", "--vm", "vm-b", "--host", "host-1"],
    );
    let (ua, ga) = ids_of(pid_of(&c, "host-1", "vm-a", "workload"));
    let (ub, gb) = ids_of(pid_of(&c, "host-1", "vm-b", "workload"));
    assert!(
        (200_000..300_000).contains(&ua),
        "alice's workload uid {ua}"
    );
    assert!((200_000..300_000).contains(&ub), "bob's workload uid {ub}");
    assert_ne!(ua, ub, "two tenants' workloads share a uid");
    // alice's crypto domain runs under an identity of its own: not root, not her
    // workload's, not bob's.
    let (ud, _) = ids_of(pid_of(&c, "host-1", "vm-a", "vsm"));
    assert!((200_000..300_000).contains(&ud), "alice's domain uid {ud}");
    assert!(ud != ua && ud != ub, "crypto domain uid {ud}");
    for role in ["sdp", "vsm"] {
        let pid = pid_of(&c, "host-1", "vm-a", role);
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uids.split_whitespace().skip(1).all(|u| u == ud.to_string()),
            "{role}: {uids}"
        );
    }
    let dir = domain_dir(&c, "host-1", "vm-a");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (ud, ga, 0o710),
        "crypto-domain directory: the domain's, reachable by the workload's group only"
    );
    let sockets = [
        ("disk", dir.join("disk.sock"), false),
        ("volume", dir.join("vol-finance-db.sock"), false),
        ("vsm", dir.join("vsm.sock"), true),
    ];
    // Hard links in a directory everyone may traverse: only the peer check stands between
    // a co-tenant and the servers there.
    let open = c.root.join("links");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (name, sock, vsm) in &sockets {
        let link = open.join(format!("{name}.sock"));
        std::fs::hard_link(sock, &link).unwrap();
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o777)).unwrap();
        // The owner's workload identity is served (the probe works)...
        assert_eq!(
            probe(ua, ga, &link, *vsm),
            "data",
            "{name}: alice's own workload"
        );
        // ...bob's workload identity and an unrelated uid are not, by path or by link.
        for (who, uid, gid) in [
            ("bob's workload", ub, gb),
            ("another uid", 299_999, 299_999),
        ] {
            let by_path = probe(uid, gid, sock, *vsm);
            assert_eq!(by_path, "connect-error 13", "{name} by path as {who}");
            let by_link = probe(uid, gid, &link, *vsm);
            assert_eq!(by_link, "closed", "{name} through a hard link as {who}");
        }
    }
    // The refusals are in alice's crypto-domain audit log (hash chain intact)...
    let out = Command::new(caas_bin())
        .args(["domc", "audit", "--state-dir"])
        .arg(dir.join("domc"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = String::from_utf8_lossy(&out.stdout);
    for uid in [ub, 299_999] {
        assert!(
            audit.lines().any(|l| l.contains("\"op\":\"Connect\"")
                && l.contains(&format!("uid {uid} not allowed"))
                && l.contains("\"rv\":\"0x200\"")),
            "no audited refusal of uid {uid}:\n{audit}"
        );
    }
    // ...and her proxies logged and counted theirs.
    let raw = std::fs::read_to_string(c.dev.dir.join("test-dev.log")).unwrap();
    // Without the terminal colour codes.
    let mut log = String::new();
    let mut it = raw.chars();
    while let Some(ch) = it.next() {
        if ch == '\x1b' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            log.push(ch);
        }
    }
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    for uid in [ub, 299_999] {
        let n = log
            .lines()
            .filter(|l| {
                l.contains("NBD connection refused")
                    && l.contains(&format!("unix peer uid {uid} not allowed"))
            })
            .count();
        assert!(
            n >= 2,
            "proxies logged {n} refusals of uid {uid}: {refusals:#?}\n{}",
            &log[log.len().saturating_sub(3000)..]
        );
    }
    assert!(
        refusals.iter().any(|l| l.contains("refused=2")),
        "refusals are counted: {refusals:#?}"
    );
    // alice's workload still works.
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm-a"]);
    assert!(rep.contains("\"ok\": true"), "{rep}");
}

/// After a launch, and after the agent is SIGKILLed, nothing on the host's disk holds a
/// key: no `*.key` file, no file of exactly 32 bytes (the size of every key the crypto
/// domain holds: the VSM domain key, k, the DBSP volume keys), and no copy of τ or the
/// token PIN; the workload's injection file is gone.
#[test]
fn no_plaintext_key_on_host_disk_after_launch_and_after_agent_kill() {
    let mut c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    let vm: Value =
        serde_json::from_slice(&std::fs::read(c.tdir("alice").join("vms/vm1.json")).unwrap())
            .unwrap();
    let tau_b64 = vm["tau"].as_str().unwrap().to_string();
    let tau = caas_attest::b64::decode(&tau_b64).unwrap();
    let img: Value =
        serde_json::from_slice(&std::fs::read(c.tdir("alice").join("images/web.json")).unwrap())
            .unwrap();
    let pin = img["user_pin"].as_str().unwrap().to_string();
    let host_dir = c.dev.dir.join("hosts/host-1");
    let run = run_dir(&c, "host-1", "vm1");
    let dom = domain_dir(&c, "host-1", "vm1");
    let scan = |when: &str| {
        let mut files = 0;
        let mut stack = vec![host_dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    stack.push(p);
                    continue;
                }
                if !md.is_file() {
                    continue;
                }
                files += 1;
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                assert!(!name.ends_with(".key"), "{when}: key file {}", p.display());
                assert!(
                    name != "inject.json" && name != "user.pin",
                    "{when}: {} was left behind",
                    p.display()
                );
                assert_ne!(
                    md.len(),
                    32,
                    "{when}: {} has the size of a key",
                    p.display()
                );
                let b = std::fs::read(&p).unwrap();
                for secret in [&tau[..], pin.as_bytes(), tau_b64.as_bytes()] {
                    assert!(
                        !b.windows(secret.len()).any(|w| w == secret),
                        "{when}: {} holds a secret",
                        p.display()
                    );
                }
            }
        }
        // The scan saw the crypto domain's state (token files, audit log) and the TPM blobs.
        assert!(
            dom.join("domc/audit.log").exists(),
            "{when}: no crypto-domain state"
        );
        assert!(files > 5, "{when}: only {files} files scanned");
    };
    scan("after launch");
    let keep: Vec<u32> = procs(&c, "host-1", "vm1")
        .into_iter()
        .map(|p| p.1)
        .collect();
    let keep: Vec<u32> = keep
        .into_iter()
        .chain(pids_with(&run.display().to_string()))
        .collect();
    // The host agent (in-process in `caas dev`) dies as a crash would; its crypto domain
    // processes are orphaned but still hold their keys in memory only.
    let _ = c.dev.child.kill();
    let _ = c.dev.child.wait();
    std::thread::sleep(std::time::Duration::from_millis(300));
    scan("after the agent was killed");
    for pid in keep {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Every process that holds a key — the image's and the DBSP volume's Secure Device
/// Proxies, the VSM crypto domain, and the host agent — has RLIMIT_CORE 0 and is not
/// dumpable: a process of the crypto domain's identity without CAP_SYS_PTRACE cannot read
/// its /proc/PID/environ (while it can read a dumpable process's of that identity); the
/// agent, root with every capability and so unobservable that way, reports
/// PR_GET_DUMPABLE in its status. The crypto-domain processes have every resident page
/// locked (a host administrator reading swap finds none of them), even where their
/// RLIMIT_MEMLOCK cannot be lifted, and keep no capability but CAP_IPC_LOCK.
#[test]
fn key_holding_processes_cannot_dump_core() {
    assert!(
        ids_of(std::process::id()).0 == 0,
        "this test needs root (workload identities are separate uids)"
    );
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    let run = run_dir(&c, "host-1", "vm1");
    let proxies = pids_with("volume\0serve");
    let proxies: Vec<u32> = proxies
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let s = run.display().to_string();
                c.windows(s.len()).any(|w| w == s.as_bytes())
            })
        })
        .collect();
    assert_eq!(
        proxies.len(),
        2,
        "image and finance/db proxies: {proxies:?}"
    );
    let vsm = pid_of(&c, "host-1", "vm1", "vsm");
    let workload = pid_of(&c, "host-1", "vm1", "workload");
    let agent = c.dev.child.id();
    // Reads /proc/PID/environ as uid:gid with no capabilities at all.
    let peek = |pid: u32, uid: u32, gid: u32| -> bool {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "cat",
            ])
            .arg(format!("/proc/{pid}/environ"))
            .output()
            .expect("setpriv is needed (util-linux)");
        out.status.success()
    };
    let (wu, wg) = ids_of(workload);
    // The probe works: a dumpable process of the same identity is readable.
    assert!(
        peek(workload, wu, wg),
        "probe cannot read the (dumpable) workload"
    );
    let (du, dg) = ids_of(vsm);
    let mut holders: Vec<(String, u32)> = proxies
        .iter()
        .map(|p| ("volume serve".to_string(), *p))
        .collect();
    holders.push(("VSM crypto domain".into(), vsm));
    for (what, pid) in &holders {
        let (u, g) = ids_of(*pid);
        assert_eq!(
            (u, g),
            (du, dg),
            "{what} runs under the crypto domain's identity"
        );
        assert_ne!(u, wu, "{what} shares the workload's uid");
        assert!(
            !peek(*pid, u, g),
            "{what} ({pid}) is dumpable/ptraceable by its uid"
        );
        assert_eq!(core_limit(*pid), "0 0", "{what}: core limit");
        // A host administrator reading the swap device finds no page of it (mlockall leaves
        // out only the kernel's special mappings), including memory mapped after the drop.
        assert_memory_locked(*pid, what);
        // What kept the locking possible is CAP_IPC_LOCK alone, in every thread, and every
        // thread was started after the switch.
        assert_capabilities_at_most_ipc_lock(*pid, what);
        // The seccomp filter covers every one of its threads (a filter is per thread: one
        // started before it would be unfiltered). The volume servers parse the workload's
        // NBD requests: a parsing bug there finds no ptrace, exec, mount or module loading.
        assert_every_thread_filtered(*pid, what);
    }
    // The host agent runs as root with every capability: no capability-less observer can
    // read it whether it is dumpable or not, so it reports PR_GET_DUMPABLE itself.
    assert_eq!(core_limit(agent), "0 0", "host agent: core limit");
    // It unseals launch secrets (and, in this one `caas dev` process, the key service holds
    // the HBKs and domain keys): a host administrator reading the swap device finds none of
    // its pages either.
    assert_memory_locked(agent, "host agent / key service");
    let st = c
        .call(
            "GET",
            &format!("{}/v1/agent/status", c.agent("host-1")),
            None,
        )
        .unwrap();
    assert_eq!(st["dumpable"], json!(false), "host agent: {st}");
}

// ---------------------------------------------------------------------------------------
// Issue 12: network transports authenticate clients with credentials of the launch.
// ---------------------------------------------------------------------------------------

/// The dev deployment's log without terminal colour codes.
fn dev_log(c: &Cloud) -> String {
    let raw = std::fs::read_to_string(c.dev.dir.join("test-dev.log")).unwrap();
    let mut log = String::new();
    let mut it = raw.chars();
    while let Some(ch) = it.next() {
        if ch == '\x1b' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            log.push(ch);
        }
    }
    log
}

/// A TLS client in its own process (python3's ssl: another TLS stack than the servers')
/// that does not check the server at all — an attacker does not care whom it talks to —
/// and presents `creds` (cert, key) or no certificate. For `nbd` it speaks NBD up to
/// NBD_OPT_STARTTLS first. Prints `data` (the server answered inside TLS: served),
/// `refused ...` (the handshake or the first read failed) or `closed`.
fn tls_probe(addr: &str, nbd: bool, creds: Option<(&Path, &Path)>) -> String {
    let script = r#"
import socket, ssl, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
mode, cert, key = sys.argv[2], sys.argv[3], sys.argv[4]
IHAVEOPT = 0x49484156454F5054
def recvall(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise OSError(104, "closed")
        b += d
    return b
s = socket.create_connection((host, int(port)), timeout=10)
if mode == "nbd":
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 5, 0))
    magic, opt, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    recvall(s, ln)
    if typ != 1:
        print("no-starttls", typ); sys.exit(0)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if cert:
    ctx.load_cert_chain(cert, key)
try:
    t = ctx.wrap_socket(s, server_hostname="localhost")
    if mode == "nbd":
        t.sendall(struct.pack(">QII", IHAVEOPT, 3, 0))  # NBD_OPT_LIST
    else:
        t.sendall(b"\x00\x00\x00\x04abcd")
    d = t.recv(64)
    print("data" if d else "closed")
except (ssl.SSLError, OSError) as e:
    print("refused", type(e).__name__, e)
"#;
    let arg = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(addr)
        .arg(if nbd { "nbd" } else { "vsm" })
        .arg(arg(creds.map(|c| c.0)))
        .arg(arg(creds.map(|c| c.1)))
        .output()
        .expect("/usr/bin/python3 is needed (apt-get install python3)");
    assert!(
        out.status.success(),
        "tls probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Client credentials of a CA that is not the launch's, as files: `name-cert.pem`,
/// `name-key.pem` (and the CA, `name-ca.pem`).
fn foreign_client(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let pki = caas_host::pki::LaunchPki::generate(name).unwrap();
    let f = |suffix: &str, body: &str| {
        let p = dir.join(format!("{name}-{suffix}.pem"));
        std::fs::write(&p, body).unwrap();
        p
    };
    (
        f("cert", &pki.client_cert_pem),
        f("key", &pki.client_key_pem),
        f("ca", &pki.ca_pem),
    )
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_tcp(addr: &str) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("nothing listens on {addr}");
}

fn loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A workload launched with network transports reads its disk over NBD with mutual TLS and
/// has its VSM over TCP with mutual TLS, both bound to its launch. A co-tenant that got a
/// client certificate of its own launch (made the same way, by a launch CA that is not
/// this one), one of an operator-wide CA, or none at all, is refused by both transports —
/// in the TLS handshake, before any NBD option or VSM frame — and every refusal is audited
/// by the VSM (hash-chained `Connect` record) and logged and counted by the proxy. The
/// probe itself is shown to work against servers that do trust its CA.
#[test]
fn another_launch_cannot_use_my_tls_transport() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.tenant_ok(
        "alice",
        &[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm-net",
            "--host",
            "host-1",
            "--network",
        ],
    );
    let w = c.workloads("host-1");
    let w = w.iter().find(|w| w["vm_id"] == json!("vm-net")).unwrap();
    let disk_uri = w["disk_uri"].as_str().unwrap().to_string();
    let disk = disk_uri
        .strip_prefix("nbds://")
        .and_then(|r| r.split_once('/'))
        .unwrap_or_else(|| panic!("disk is not served over TLS: {disk_uri}"))
        .0
        .to_string();
    let vsm = w["vsm_tls"].as_str().unwrap().to_string();
    // The legitimate workload got the launch's client key and read its disk through it:
    // the hash it reports is the tenant's plaintext image.
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm-net"]);
    let v: Value = serde_json::from_str(&rep[rep.find('{').unwrap()..]).unwrap();
    assert_eq!(
        v["disk_sha256"],
        json!(c.plain_sha256("alice", "web")),
        "{v}"
    );
    // No server key is left on the host's disk.
    assert!(!domain_dir(&c, "host-1", "vm-net").join("tls").exists());

    let creds = c.root.join("creds");
    std::fs::create_dir(&creds).unwrap();
    let other_launch = foreign_client(&creds, "vm-other");
    let operator = foreign_client(&creds, "operator");
    // The probe works: servers trusting its CA serve it (a plaintext-passthrough proxy and
    // a VSM started by hand with the "other launch" CA as client CA).
    let srv_pki = caas_host::pki::LaunchPki::generate("srv").unwrap();
    std::fs::write(creds.join("srv-server.pem"), &srv_pki.server_cert_pem).unwrap();
    std::fs::write(creds.join("srv-server.key"), &*srv_pki.server_key_pem).unwrap();
    let blob = creds.join("blob.img");
    std::fs::write(&blob, vec![0u8; 1 << 20]).unwrap();
    let (ctl_nbd, ctl_vsm) = (loopback_addr(), loopback_addr());
    let tls_args = |ca: &Path| -> Vec<String> {
        vec![
            "--tls-cert".into(),
            creds.join("srv-server.pem").display().to_string(),
            "--tls-key".into(),
            creds.join("srv-server.key").display().to_string(),
            "--tls-client-ca".into(),
            ca.display().to_string(),
        ]
    };
    let _proxy = Killed(
        Command::new(caas_bin())
            .args(["volume", "serve"])
            .arg(&blob)
            .args(["--plaintext", "--tcp", &ctl_nbd])
            .args(tls_args(&other_launch.2))
            .spawn()
            .unwrap(),
    );
    let _dom = Killed(
        Command::new(caas_bin())
            .args(["domc", "serve", "--ephemeral-key", "--state-dir"])
            .arg(creds.join("domc"))
            .args(["--tcp", &ctl_vsm])
            .args(tls_args(&other_launch.2))
            .spawn()
            .unwrap(),
    );
    wait_tcp(&ctl_nbd);
    wait_tcp(&ctl_vsm);
    let ol = Some((other_launch.0.as_path(), other_launch.1.as_path()));
    assert_eq!(tls_probe(&ctl_nbd, true, ol), "data", "control: NBD");
    assert_eq!(tls_probe(&ctl_vsm, false, ol), "data", "control: VSM");

    // Against alice's launch, every one of them is refused, on both transports.
    let attackers: [(&str, Option<(&Path, &Path)>); 3] = [
        ("another launch's certificate", ol),
        (
            "an operator CA's certificate",
            Some((operator.0.as_path(), operator.1.as_path())),
        ),
        ("no certificate", None),
    ];
    for (who, cr) in attackers {
        let r = tls_probe(&disk, true, cr);
        assert!(r.starts_with("refused"), "NBD with {who}: {r}");
        let r = tls_probe(&vsm, false, cr);
        assert!(r.starts_with("refused"), "VSM with {who}: {r}");
    }
    // The VSM audited three refusals in its hash-chained log...
    let out = Command::new(caas_bin())
        .args(["domc", "audit", "--state-dir"])
        .arg(domain_dir(&c, "host-1", "vm-net").join("domc"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = String::from_utf8_lossy(&out.stdout);
    let n = audit
        .lines()
        .filter(|l| {
            l.contains("\"op\":\"Connect\"")
                && l.contains("tls: 127.0.0.1")
                && l.contains("\"rv\":\"0x200\"")
        })
        .count();
    assert_eq!(n, 3, "audited TLS refusals:\n{audit}");
    // ...and the disk's proxy logged and counted its three.
    let log = dev_log(&c);
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NBD connection refused") && l.contains("TLS handshake failed"))
        .collect();
    assert!(
        refused.len() >= 3 && refused.iter().any(|l| l.contains("refused=3")),
        "proxy refusals: {refused:#?}"
    );
    // alice's workload still works, VSM included.
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm-net"]);
    let v: Value = serde_json::from_str(&rep[rep.find('{').unwrap()..]).unwrap();
    assert_eq!(v["vsm"]["mechanism"], json!("CKM_ECDSA_SHA256"), "{v}");
}

// ---------------------------------------------------------------------------------------
// Issue 12: the workload and its own crypto domain do not share an identity.
// ---------------------------------------------------------------------------------------

/// Runs `script` (python3) as `uid:gid` with no capabilities, with `args`.
fn as_user(uid: u32, gid: u32, script: &str, args: &[String]) -> String {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .args(args)
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux) and /usr/bin/python3 are needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A compromised workload attacks its own crypto domain from its own identity: it cannot
/// signal (kill, stop) its VSM or its Secure Device Proxies, cannot ptrace-attach to them
/// nor read their memory, and cannot list or plant entries in the crypto-domain directory;
/// it can still use the crypto domain through its sockets. (With one shared uid, as before,
/// the kill succeeds: the probe is checked against a process of the workload's own uid.)
#[test]
fn workload_cannot_signal_or_trace_its_crypto_domain() {
    assert!(
        ids_of(std::process::id()).0 == 0,
        "this test needs root (workload identities are separate uids)"
    );
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    c.launch_with_db("alice", "vm1", "host-1");
    let workload = pid_of(&c, "host-1", "vm1", "workload");
    let (wu, wg) = ids_of(workload);
    let dom = domain_dir(&c, "host-1", "vm1");
    let mut targets: Vec<(String, u32)> = vec![
        ("vsm".into(), pid_of(&c, "host-1", "vm1", "vsm")),
        ("disk proxy".into(), pid_of(&c, "host-1", "vm1", "sdp")),
    ];
    for p in pids_with(&format!("{}/vol-finance-db.sock", dom.display())) {
        if std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"/")) {
            targets.push(("volume proxy".into(), p));
        }
    }
    assert_eq!(targets.len(), 3, "{targets:?}");
    let script = r#"
import ctypes, errno, os, signal, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = []
for name, sig in (("kill0", 0), ("stop", signal.SIGSTOP), ("term", signal.SIGTERM)):
    try:
        os.kill(pid, sig); out.append(name + "=ok")
    except OSError as e:
        out.append(name + "=" + errno.errorcode[e.errno])
PTRACE_ATTACH = 16
r = libc.ptrace(PTRACE_ATTACH, pid, None, None)
out.append("ptrace=" + ("ok" if r == 0 else errno.errorcode[ctypes.get_errno()]))
try:
    open("/proc/%d/mem" % pid, "rb").close(); out.append("mem=ok")
except OSError as e:
    out.append("mem=" + errno.errorcode[e.errno])
print(" ".join(out))
"#;
    // The probe works: against a process of the workload's own uid, signals land.
    let mut same_uid = {
        use std::os::unix::process::CommandExt;
        let mut s = Command::new("sleep");
        s.arg("60").uid(wu).gid(wg);
        s.spawn().unwrap()
    };
    let out = as_user(wu, wg, script, &[same_uid.id().to_string()]);
    assert!(out.starts_with("kill0=ok stop=ok term=ok"), "probe: {out}");
    let _ = same_uid.kill();
    let _ = same_uid.wait();
    for (what, pid) in &targets {
        let (du, _) = ids_of(*pid);
        assert_ne!(du, wu, "{what} runs under the workload's uid");
        let out = as_user(wu, wg, script, &[pid.to_string()]);
        assert_eq!(
            out, "kill0=EPERM stop=EPERM term=EPERM ptrace=EPERM mem=EACCES",
            "{what} ({pid})"
        );
        // Still running.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    // The crypto-domain directory: reachable by name, not listable, not writable.
    let dir_script = r#"
import os, sys
d = sys.argv[1]
out = []
try:
    os.listdir(d); out.append("list=ok")
except OSError as e:
    out.append("list=%d" % e.errno)
try:
    open(os.path.join(d, "planted.sock"), "w").close(); out.append("create=ok")
except OSError as e:
    out.append("create=%d" % e.errno)
try:
    os.rename(os.path.join(d, "vsm.sock"), os.path.join(d, "x")); out.append("rename=ok")
except OSError as e:
    out.append("rename=%d" % e.errno)
print(" ".join(out))
"#;
    let out = as_user(wu, wg, dir_script, &[dom.display().to_string()]);
    assert_eq!(
        out, "list=13 create=13 rename=13",
        "crypto-domain directory"
    );
    // The workload still uses its crypto domain: disk, VSM signature and volume.
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm1"]);
    let v: Value = serde_json::from_str(&rep[rep.find('{').unwrap()..]).unwrap();
    assert_eq!(
        v["disk_sha256"],
        json!(c.plain_sha256("alice", "web")),
        "{v}"
    );
    assert_eq!(v["vsm"]["mechanism"], json!("CKM_ECDSA_SHA256"), "{v}");
    assert_eq!(v["volumes"][0]["ok"], json!(true), "{v}");
}

// ---------------------------------------------------------------------------------------
// Issue 12: a DBSP volume's epoch is anchored at the TTP.
// ---------------------------------------------------------------------------------------

/// Storage rolls a whole DBSP volume back to an older consistent snapshot (every byte a
/// valid old state, so the volume alone cannot tell). The TTP keeps the epoch the SC
/// reported (AK-signed) at the last attach and returns it with the next DomKeyGen; the
/// proxy refuses the volume below it: the attach, and so the launch, fails with
/// `volume_rollback`, recorded in the agent's audit log and the proxy's audit record.
#[test]
fn rolled_back_volume_is_refused_at_attach() {
    let c = Cloud::start();
    c.tenant_with_image("alice", "finance", "web");
    let vol = c.storage().join("domains/finance/db.caasvol");
    c.launch_with_db("alice", "vm1", "host-1");
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm1"]);
    assert!(rep.contains("\"ok\": true"), "{rep}");
    c.stop("host-1", "vm1");
    // Storage keeps a snapshot of the volume...
    let snapshot = std::fs::read(&vol).unwrap();
    // ...the tenant keeps working on it (the next attach opens it at a later epoch, which
    // the SC reports to the TTP)...
    c.launch_with_db("alice", "vm2", "host-1");
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm2"]);
    assert!(rep.contains("\"ok\": true"), "{rep}");
    c.stop("host-1", "vm2");
    let audit = c.audit();
    assert!(
        audit_has(&audit, "DbspEpoch", "Success"),
        "no epoch report at the TTP: {audit}"
    );
    // ...then storage puts the old snapshot back.
    let current = std::fs::read(&vol).unwrap();
    std::fs::write(&vol, &snapshot).unwrap();
    let (ok, text) = c.tenant(
        "alice",
        &[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm3",
            "--host",
            "host-1",
            "--domains",
            "finance",
            "--volumes",
            "finance/db",
        ],
    );
    assert!(!ok, "a rolled-back volume was attached:\n{text}");
    assert!(text.contains("volume_rollback"), "{text}");
    assert!(
        c.agent_audit_has("host-1", "AttachVolume", "volume_rollback"),
        "{}",
        c.agent_audit("host-1")
    );
    let log = dev_log(&c);
    assert!(
        log.lines()
            .any(|l| l.contains("volume_rollback") && l.contains("behind the expected epoch")),
        "no audit record of the proxy"
    );
    assert!(
        c.workloads("host-1")
            .iter()
            .all(|w| w["vm_id"] != json!("vm3")),
        "the workload runs"
    );
    // The current volume (not rolled back) still attaches.
    std::fs::write(&vol, &current).unwrap();
    c.launch_with_db("alice", "vm4", "host-1");
    let rep = c.tenant_ok("alice", &["connect", "--vm", "vm4"]);
    assert!(rep.contains("\"ok\": true"), "{rep}");
}
