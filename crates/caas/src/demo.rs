//! `caas demo`: the tenant story against the dev deployment in DIR, step by step with
//! timings; exits non-zero if any step fails. Starts a detached deployment if none runs.
//!
//! With the default `--driver qemu` the trusted-launch story boots a **real VM** (issue 13,
//! item 3): the legacy guest image of `scripts/build-guest-image` (built once and cached,
//! exactly as `tests/real_vm.rs` gets it) is provisioned with Algorithm 1, launched through
//! TL with the qemu driver (qemu boots the whole disk from the crypto domain's NBD export),
//! and the tenant checks τ over the forwarded port (the right τ is accepted, a wrong one
//! refused), verifies a VSM signature made inside the guest over virtio-serial, and compares
//! the hash of the disk the guest read with its own image. [`vm_suspend_resume`] and
//! [`vm_migrate`] are the hook points for suspend/resume and live migration. Then
//! [`net_story`] (issue 16) launches two VMs of that image in one network domain on two
//! hosts and shows them pinging each other and moving 1 MiB (its SHA-256 checked on both
//! sides) through the crypto domains' encrypted overlay, then stops them. Without
//! `qemu-system-x86_64` the demo stops at once saying what to install (no silent fallback);
//! `--driver process` runs the same story with workload processes (fast tests).
use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use caas_crypto::SecretBytes;
use caas_kms::client::{ClientError, KmsClient, b64field};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The workload driver of the demo's trusted-launch story.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoDriver {
    /// A real VM: qemu-system-x86_64 boots the guest image from the crypto domain.
    Qemu,
    /// Workload processes instead of VMs (fast; no qemu needed).
    Process,
}

/// `caas demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory of the dev deployment.
    #[arg(long, env = "CAAS_DEV_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Simulated compute hosts when the demo has to start the deployment itself.
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
    /// How the trusted-launch story runs its workloads: `qemu` boots a real VM (needs
    /// qemu-system-x86; the demo fails saying so when it is missing), `process` runs
    /// workload processes.
    #[arg(long, env = "CAAS_DEMO_DRIVER", value_enum, default_value_t = DemoDriver::Qemu)]
    pub driver: DemoDriver,
    /// A guest image built beforehand by `scripts/build-guest-image --net-demo` (default:
    /// the demo runs that script, which caches the image; without `--net-demo` the network
    /// step's VMs exchange no traffic and it fails).
    #[arg(long, env = "CAAS_GUEST_IMAGE")]
    pub guest_image: Option<PathBuf>,
}

/// The qemu binary the qemu driver runs.
const QEMU: &str = "qemu-system-x86_64";

/// Fails, saying what to install, when `qemu-system-x86_64` is not in PATH.
fn require_qemu() -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file()));
    if !found {
        bail!(
            "{QEMU} is not installed: the demo boots a real VM. Install the Debian packages \
             qemu-system-x86 and qemu-utils together (scripts/install-deps does), or run \
             `caas demo --driver process` for the same story with workload processes"
        );
    }
    Ok(())
}

/// `scripts/build-guest-image` of the source tree this binary was built from (or of the
/// current directory's tree).
fn guest_image_script() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let cwd = std::env::current_dir()?;
    exe.ancestors()
        .chain(cwd.ancestors())
        .map(|d| d.join("scripts/build-guest-image"))
        .find(|p| p.is_file())
        .context(
            "scripts/build-guest-image not found next to this binary or above the current \
             directory: run the demo from the repository, or pass --guest-image",
        )
}

/// The newest existing path of `paths`.
fn newest(paths: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    paths
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// Builds (or takes from the script's cache) the guest image with this build's guest agent
/// and PKCS#11 module and the tenant's overlay traffic role (`--net-demo`, as
/// `tests/vm_net_agent.rs` gets it); returns its path.
async fn build_guest_image() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let agent = exe.with_file_name("caas-guest");
    if !agent.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p caas`",
            agent.display()
        );
    }
    // `cargo build -p caas-pkcs11` uplifts the module next to the binaries; a build of
    // caas alone leaves it in deps/: the newer one.
    let dir = exe.parent().context("the binary's directory")?;
    let pkcs11 = newest([
        dir.join("libcaas_pkcs11.so"),
        dir.join("deps/libcaas_pkcs11.so"),
    ])
    .or_else(|| caas_domc::dev::find_module(&exe))
    .context("libcaas_pkcs11.so is missing: build it with `cargo build -p caas-pkcs11`")?;
    let out = tokio::process::Command::new(guest_image_script()?)
        .arg("--agent")
        .arg(&agent)
        .arg("--pkcs11")
        .arg(&pkcs11)
        // The tenant's overlay traffic role (run only when the VM has an overlay NIC): the
        // network step's two VMs ping each other and move 1 MiB.
        .arg("--net-demo")
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "scripts/build-guest-image failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !path.is_file() {
        bail!("scripts/build-guest-image printed no image path");
    }
    Ok(path)
}

struct Steps {
    n: usize,
    failed: usize,
}

impl Steps {
    async fn run<F, T>(&mut self, name: &str, f: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        self.n += 1;
        let t = Instant::now();
        let r = f.await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match r {
            Ok(v) => {
                println!("[{:>2}] ok    {:>9.1} ms  {name}", self.n, ms);
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                println!("[{:>2}] FAIL  {:>9.1} ms  {name}: {e:#}", self.n, ms);
                None
            }
        }
    }

    /// A step this run leaves out, with the reason in `name`.
    fn skip(&self, name: &str) {
        println!("[--] skip               {name}");
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn s(v: &Value, k: &str) -> Result<String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("reply lacks {k}"))
}

/// What the tenant's steps share.
struct Tenant<'a> {
    /// The `caas tenant` arguments (endpoint, TTP key, credentials).
    ta: crate::tenant::TenantArgs,
    /// The tenant's directory (DM key, image and VM records).
    tdir: PathBuf,
    /// The dev hosts, all provisioned.
    hosts: Vec<String>,
    /// The untrusted storage the hosts share.
    storage: PathBuf,
    /// The dev deployment's directory (the hosts' run directories: a VM's serial console).
    dev_dir: PathBuf,
    /// A variable of `DIR/env`.
    get: &'a dyn Fn(&str) -> Result<String>,
}

impl Tenant<'_> {
    /// Algorithm 1 for `raw` as image `id`, sealed to every host.
    async fn provision(&self, raw: &Path, id: &str) -> Result<()> {
        crate::tenant::provision(
            &self.ta,
            &self.tdir,
            raw,
            id,
            &self.hosts,
            &self.storage,
            "caas-demo",
        )
        .await
    }

    /// TL launch of `image_id` as `vm` through the scheduler; prints the host's phases and
    /// returns the host.
    async fn launch(
        &self,
        image_id: &str,
        vm: &str,
        doms: &[String],
        vols: &[String],
        driver: &str,
    ) -> Result<String> {
        self.launch_on(image_id, vm, doms, vols, driver, None, None)
            .await
    }

    /// [`Self::launch`] on `host` (the scheduler's choice when `None`), attached to a
    /// network domain when `net` says so.
    #[allow(clippy::too_many_arguments)]
    async fn launch_on(
        &self,
        image_id: &str,
        vm: &str,
        doms: &[String],
        vols: &[String],
        driver: &str,
        host: Option<String>,
        net: Option<caas_tl::wire::NetAttach>,
    ) -> Result<String> {
        let r = crate::tenant::launch(
            &self.ta, &self.tdir, image_id, vm, "dev", doms, vols, host, driver, false, net,
        )
        .await?;
        let host = s(&r, "host")?;
        let phases: Vec<String> = r["timings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some(format!("{} {:.1} ms", p[0].as_str()?, p[1].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        println!("       on {host}: {}", phases.join("; "));
        Ok(host)
    }

    /// The DM's ACL at the TTP: its workloads may be given `domains`.
    async fn acl(&self, domains: &[&str]) -> Result<()> {
        let get = self.get;
        let dm = crate::tenant::load_dm(&self.tdir, true)?;
        let domains: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
        let body = dm.acl_update("caas demo", &domains, caas_attest::now_ms())?;
        crate::key_service::client::signed(
            &get("AWS_DEFAULT_REGION")?,
            &get("AWS_ACCESS_KEY_ID")?,
            SecretBytes::new(get("AWS_SECRET_ACCESS_KEY")?.into_bytes()),
            std::time::Duration::from_secs(30),
        )?
        .put::<_, Value>(&format!("{}/v1/tl/acl", get("CAAS_KMS_ENDPOINT")?), &body)
        .await?;
        Ok(())
    }

    /// Stops workload `vm` on `host` through the host agent's operator API.
    async fn stop(&self, host: &str, vm: &str) -> Result<()> {
        let get = self.get;
        let key = format!(
            "CAAS_HOST_{}_URL",
            host.to_uppercase().replace(['-', '.'], "_")
        );
        caas_host::cli::OperatorArgs {
            ca: get(caas_host::cli::ENV_PKI_CA)?.into(),
            cert: get(caas_host::cli::ENV_OPERATOR_CERT)?.into(),
            key: get(caas_host::cli::ENV_OPERATOR_KEY)?.into(),
        }
        .client()?
        .post::<_, Value>(
            &format!("{}/v1/agent/workloads/{vm}/stop", get(&key)?),
            &json!({}),
        )
        .await?;
        Ok(())
    }
}

/// A VM the demo launched and checked: what the suspend/resume and migration hooks get.
pub(crate) struct DemoVm {
    /// id_vm.
    pub vm: String,
    /// The provisioned image it booted.
    pub image_id: String,
    /// The host it runs on now.
    pub host: String,
    /// SHA-256 of the plaintext guest image (hex): what the guest must report having read.
    pub image_sha: String,
    /// Its DBSP volume (domain/SR), on which the guest keeps a sequence of records.
    pub volume: String,
}

/// The last `caas-seq N` (the guest's sequence on its DBSP volume, every 10th record) and
/// `caas-counter N` (its heartbeat in memory) on `vm`'s serial console on `host`.
fn guest_counters(t: &Tenant<'_>, host: &str, vm: &str) -> (Option<u64>, Option<u64>) {
    let text = caas_workload::console::console(&t.dev_dir.join("hosts").join(host), vm);
    let last = |prefix: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(prefix)?.trim().parse::<u64>().ok())
            .next_back()
    };
    (last("caas-seq "), last("caas-counter "))
}

/// The guest's sequence on its disk (the DBSP volume) before a move, read on the source's
/// console.
fn seq_before(t: &Tenant<'_>, vm: &DemoVm) -> Option<u64> {
    let (seq, counter) = guest_counters(t, &vm.host, &vm.vm);
    println!(
        "       before: disk seq {} (volume {}), heartbeat {} on {}",
        seq.map_or("-".into(), |n| n.to_string()),
        vm.volume,
        counter.map_or("-".into(), |n| n.to_string()),
        vm.host
    );
    seq
}

/// A timed step: the guest's disk sequence continues on `vm.host` past `before` (it kept
/// writing durable records to its DBSP volume through the new host's crypto domain).
async fn disk_continues(
    st: &mut Steps,
    t: &Tenant<'_>,
    vm: &DemoVm,
    before: Option<u64>,
    when: &str,
) {
    st.run(
        &format!(
            "VM{when}: the guest's disk counter continues on {}: its sequence of records on the DBSP volume {} goes on past the last one seen before",
            vm.host, vm.volume
        ),
        async {
            let before = before.context("no sequence on the guest's console before")?;
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let (seq, counter) = guest_counters(t, &vm.host, &vm.vm);
                if let Some(n) = seq.filter(|n| *n > before) {
                    println!(
                        "       after: disk seq {n} (> {before}), heartbeat {} on {}",
                        counter.map_or("-".into(), |n| n.to_string()),
                        vm.host
                    );
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("the guest's disk sequence did not pass {before} on {}", vm.host);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        },
    )
    .await;
}

/// The tenant's checks of a running VM (or workload) over the forwarded PSK port, one
/// timed step each: τ (the right τ is accepted, a wrong one refused), the VSM signature made
/// inside the guest, the guest's read of its disk.
async fn check_vm(st: &mut Steps, t: &Tenant<'_>, vm: &DemoVm, when: &str) -> bool {
    let rec = st
        .run(
            &format!("VM{when}: the tenant checks τ: TLS 1.3-PSK to the guest's responder through the forwarded port succeeds with τ and is refused with a wrong τ"),
            async {
                let rec: crate::tenant::VmRecord = serde_json::from_slice(
                    &std::fs::read(t.tdir.join("vms").join(format!("{}.json", vm.vm)))?,
                )?;
                let addr: std::net::SocketAddr = rec.endpoint.parse().context("VM endpoint")?;
                let tau = SecretBytes::new(caas_attest::b64::decode(&rec.tau)?);
                let vm_id = vm.vm.clone();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let psk = |k: &SecretBytes| {
                        let tcp = std::net::TcpStream::connect_timeout(
                            &addr,
                            std::time::Duration::from_secs(10),
                        )?;
                        tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
                        anyhow::Ok(caas_workload::psk::connect(tcp, &vm_id, k)?)
                    };
                    psk(&tau).context("the guest refused the right τ")?;
                    let mut wrong = tau.expose().to_vec();
                    if let Some(b) = wrong.first_mut() {
                        *b ^= 0x80;
                    }
                    if psk(&SecretBytes::new(wrong)).is_ok() {
                        bail!("the guest accepted a wrong τ");
                    }
                    Ok(())
                })
                .await??;
                Ok(rec)
            },
        )
        .await;
    if rec.is_none() {
        return false;
    }
    let report = st
        .run(
            &format!("VM{when}: the guest signs the tenant's signed challenge with a P-256 key in its VSM (PKCS#11 over virtio-serial); the tenant verifies the signature"),
            async {
                let r = crate::tenant::connect(&t.tdir, &vm.vm).await?;
                // `connect` already checked it (caas_workload::check_report); shown here.
                let v = r.vsm.as_ref().context("the guest made no VSM signature")?;
                let b64 = &base64::engine::general_purpose::STANDARD;
                let nonce: [u8; caas_workload::proto::NONCE_LEN] = b64
                    .decode(&r.nonce)?
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("nonce size"))?;
                let mut disk = [0u8; 32];
                hex::decode_to_slice(&r.disk_sha256, &mut disk)?;
                let point = b64.decode(&v.public_point)?;
                caas_workload::vsm::verify_vsm_signature(
                    &point,
                    &caas_workload::proto::vsm_message(&vm.vm, &nonce, &disk),
                    &b64.decode(&v.signature)?,
                )?;
                println!(
                    "       {} by VSM key {}…",
                    v.mechanism,
                    &hex::encode(caas_tl::crypto::sha256(&point))[..16]
                );
                Ok(r)
            },
        )
        .await;
    let Some(report) = report else {
        return false;
    };
    st.run(
        &format!("VM{when}: the guest read its whole disk through the crypto domain: its SHA-256 is that of the tenant's plaintext image {}", vm.image_id),
        async {
            if report.disk_sha256 != vm.image_sha {
                bail!("the guest's disk is not the tenant's image");
            }
            println!(
                "       {} MiB, sha256 {}…",
                report.disk_size >> 20,
                &report.disk_sha256[..16]
            );
            Ok(())
        },
    )
    .await
    .is_some()
}

/// Encrypted suspend and resume (issue 13 item 4, `docs/suspend-migrate.md`): `caas tenant
/// suspend` has the VM's host save qemu's state into an encrypted, integrity-protected
/// object in the untrusted storage under a key only the TTP can release; `caas tenant
/// resume` places it on the other dev host, whose TPM must open that key after attestation.
/// The tenant then [`check_vm`]s it there. Runs after the live migration: a resumed VM
/// carries no τ on its host and cannot be live-migrated.
async fn vm_suspend_resume(st: &mut Steps, t: &Tenant<'_>, vm: &mut DemoVm) {
    let Some(target) = t.hosts.iter().find(|h| **h != vm.host).cloned() else {
        st.skip(&format!(
            "VM: suspend and resume of {} — needs a second dev host",
            vm.vm
        ));
        return;
    };
    let before = seq_before(t, vm);
    let suspended = st
        .run(
            &format!(
                "VM: suspend {} on {}: qemu's state saved encrypted (chunked AES-GCM) into the untrusted storage; the state key is sealed to attested hosts by the TTP, which raises the workload's suspend counter",
                vm.vm, vm.host
            ),
            async {
                let r = crate::tenant::suspend(&t.ta, &t.tdir, &vm.vm).await?;
                println!(
                    "       counter {}, {} bytes of ciphertext in {}",
                    r["counter"], r["bytes"], r["object"].as_str().unwrap_or("?")
                );
                Ok(())
            },
        )
        .await;
    if suspended.is_none() {
        return;
    }
    let resumed = st
        .run(
            &format!(
                "VM: resume {} on {target}: the TTP releases the state key only to an attested host of the workload's profile; the guest continues where it stopped",
                vm.vm
            ),
            async {
                let r = crate::tenant::resume(&t.ta, &t.tdir, &vm.vm, Some(target.clone())).await?;
                r["host"]
                    .as_str()
                    .map(str::to_string)
                    .context("the resume names no host")
            },
        )
        .await;
    if let Some(host) = resumed {
        vm.host = host;
        disk_continues(st, t, vm, before, " (after resume)").await;
        check_vm(st, t, vm, " (after resume)").await;
    }
}

/// Live migration to an attested host (issue 13 item 5, `docs/suspend-migrate.md`):
/// `caas tenant migrate` moves `vm` to another dev host through the scheduler (the TTP
/// attests the target first; qemu's stream travels in the agents' encrypted records), then
/// the tenant [`check_vm`]s it there.
async fn vm_migrate(st: &mut Steps, t: &Tenant<'_>, vm: &mut DemoVm) {
    let Some(target) = t.hosts.iter().find(|h| **h != vm.host).cloned() else {
        st.skip(&format!(
            "VM: live migration of {} — needs a second dev host",
            vm.vm
        ));
        return;
    };
    let before = seq_before(t, vm);
    let moved = st
        .run(
            &format!(
                "VM: live migration of {} from {} to {target}: the TTP attests {target} in the workload's profile before any state leaves; qemu's stream and the crypto domain's state travel in records sealed under a key bound to {target}'s attested bind key",
                vm.vm, vm.host
            ),
            async {
                let r = crate::tenant::migrate(&t.ta, &t.tdir, &vm.vm, &target).await?;
                let phases: Vec<String> = r["timings"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| {
                                Some(format!("{} {:.1} ms", p[0].as_str()?, p[1].as_f64()?))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!("       {}", phases.join("; "));
                Ok(())
            },
        )
        .await;
    if moved.is_some() {
        vm.host = target;
        disk_continues(st, t, vm, before, " (after migration)").await;
        check_vm(st, t, vm, " (after migration)").await;
    }
}

/// The real VM (issue 13, item 3): the guest image provisioned with Algorithm 1, booted
/// through TL with the qemu driver, checked by the tenant, then suspended/resumed and
/// migrated (hooks), then stopped. Returns the id of the provisioned image (for
/// [`net_story`]) once it is provisioned.
async fn vm_story(st: &mut Steps, t: &Tenant<'_>, image: &Path) -> Option<String> {
    let run_id = std::process::id();
    let image_id = format!("demo-guest-{run_id}");
    let image_sha = st
        .run(
            "VM: provision the legacy guest image (seed 001 Alg. 1): encrypted under k, its crypto-domain configuration sealed to each host's certified bind key",
            async {
                let sha = caas_tl::crypto::sha256(&tokio::fs::read(image).await?);
                t.provision(image, &image_id).await?;
                Ok(hex::encode(sha))
            },
        )
        .await;
    let image_sha = image_sha?;
    let vm_id = format!("demo-vm-{run_id}");
    let volume = format!("demo-data/vm-disk-{run_id}");
    let host = st
        .run(
            &format!("VM: trusted launch with the qemu driver: attested host, τ and pk_DM by fw_cfg, qemu boots the whole encrypted disk from the crypto domain's NBD export, VSM on virtio-serial, DBSP volume {volume} as its data disk (the guest keeps a sequence of records on it), guest ready"),
            t.launch(&image_id, &vm_id, &["demo-data".to_string()], std::slice::from_ref(&volume), "qemu"),
        )
        .await;
    let Some(host) = host else {
        return Some(image_id);
    };
    let mut vm = DemoVm {
        vm: vm_id,
        image_id: image_id.clone(),
        host,
        image_sha,
        volume,
    };
    if check_vm(st, t, &vm, "").await {
        vm_migrate(st, t, &mut vm).await;
        vm_suspend_resume(st, t, &mut vm).await;
    }
    st.run(
        &format!(
            "VM: stop {} on {} (qemu exits, the crypto domain is destroyed)",
            vm.vm, vm.host
        ),
        t.stop(&vm.host, &vm.vm),
    )
    .await;
    Some(image_id)
}

/// The network domain of the demo's two VMs.
const NET_DOMAIN: &str = "demo-lan";

/// The network Secure Device Proxy (issue 16, `docs/network-sdp.md`): two VMs of the
/// provisioned guest image `image_id` in network domain [`NET_DOMAIN`], launched at once
/// through TL on two dev hosts (each agent runs the VM's `caas net serve`, keyed with the
/// domain's network key from the TTP; the scheduler tells each proxy the other), exchange
/// traffic through the overlay: the image's traffic role (`scripts/build-guest-image
/// --net-demo`) has the VM at .2 ping the one at .1 and send it 1 MiB over TCP; the demo
/// reads both consoles (`caas_workload::console`, as `tests/vm_net_agent.rs`) and checks the
/// SHA-256 on both sides. Both VMs are stopped afterwards, whatever failed.
async fn net_story(st: &mut Steps, t: &Tenant<'_>, image_id: &str) {
    use caas_workload::console;
    let [h1, h2, ..] = &t.hosts[..] else {
        st.skip("Network: two VMs talking through the overlay — needs two dev hosts");
        return;
    };
    let run_id = std::process::id();
    let (a, b) = (
        format!("demo-net-a-{run_id}"),
        format!("demo-net-b-{run_id}"),
    );
    let attach = |host: u8| caas_tl::wire::NetAttach {
        domain: NET_DOMAIN.into(),
        address: std::net::Ipv4Addr::new(10, 77, 0, host),
        prefix_len: 24,
    };
    if st
        .run(
            &format!("Network: the DM's ACL grants the network domain {NET_DOMAIN} (the TTP releases its key only for workloads of this DM that name it in their signed D_vm)"),
            t.acl(&["demo-data", NET_DOMAIN]),
        )
        .await
        .is_none()
    {
        return;
    }
    let doms = ["demo-data".to_string()];
    // Which of the two runs (stopped at the end even when the other failed).
    let mut up = [false; 2];
    let ok = st
        .run(
            &format!("Network: trusted launch of two VMs of network domain {NET_DOMAIN} at once, {a} (10.77.0.1/24) on {h1} and {b} (10.77.0.2/24) on {h2}: each agent starts the VM's network proxy (caas net serve) keyed with {NET_DOMAIN}'s key from the TTP (attested host, ACL), qemu's second NIC is that proxy, the scheduler tells each proxy the other"),
            async {
                let (ra, rb) = tokio::join!(
                    t.launch_on(image_id, &a, &doms, &[], "qemu", Some(h1.clone()), Some(attach(1))),
                    t.launch_on(image_id, &b, &doms, &[], "qemu", Some(h2.clone()), Some(attach(2))),
                );
                up = [ra.is_ok(), rb.is_ok()];
                ra.with_context(|| format!("launch of {a}"))?;
                rb.with_context(|| format!("launch of {b}"))?;
                Ok(())
            },
        )
        .await
        .is_some();
    if ok {
        let wait = |host: &str, vm: &str, marker: &'static str| {
            let dir = t.dev_dir.join("hosts").join(host);
            let vm = vm.to_string();
            async move {
                tokio::task::spawn_blocking(move || {
                    console::wait_marker(
                        &dir,
                        &vm,
                        marker,
                        &[console::NET_PING_FAILED],
                        std::time::Duration::from_secs(180),
                    )
                })
                .await?
                .map_err(anyhow::Error::from)
            }
        };
        let pinged = st
            .run(
                &format!("Network: {b} pings {a} through the overlay (every Ethernet frame sealed with AES-256-GCM by its crypto domain, UDP between the two proxies)"),
                async {
                    wait(h2, &b, console::NET_PING_OK).await?;
                    let rtt = wait(h2, &b, console::NET_RTT).await?;
                    println!("       {}", rtt.trim_start_matches(console::NET_RTT).trim());
                    Ok(())
                },
            )
            .await;
        if pinged.is_some() {
            st.run(
                &format!("Network: {b} sends 1 MiB of random bytes to {a} over TCP through the overlay; the SHA-256 the receiver computes is the sender's"),
                async {
                    let sent = wait(h2, &b, console::NET_SENT).await?;
                    let recv = wait(h1, &a, console::NET_RECV).await?;
                    let tr = console::NetTransfer::parse(&sent, &recv)?;
                    tr.check()?;
                    println!(
                        "       sent sha256 {}… ({b}), received {} bytes sha256 {}… ({a})",
                        &tr.sent_sha256[..16],
                        tr.recv_bytes,
                        &tr.recv_sha256[..16]
                    );
                    Ok(())
                },
            )
            .await;
        }
    }
    let stops: Vec<(&String, &String)> = [(h1, &a), (h2, &b)]
        .into_iter()
        .zip(up)
        .filter_map(|(v, up)| up.then_some(v))
        .collect();
    if !stops.is_empty() {
        st.run(
            &format!(
                "Network: stop {} (qemu exits, the crypto domain and the VM's network proxy stop)",
                stops
                    .iter()
                    .map(|(h, vm)| format!("{vm} on {h}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            async {
                for (h, vm) in &stops {
                    t.stop(h, vm).await?;
                }
                Ok(())
            },
        )
        .await;
    }
}

/// The tenant story of trusted launch, DBSP and encrypted provisioning (seed 003 §4.3–4.4,
/// seed 001 Algorithm 1, §3.4) on the dev hosts: the real VM first (with a guest image),
/// then DBSP with workload processes.
async fn tenant_story(
    st: &mut Steps,
    dir: &Path,
    get: &dyn Fn(&str) -> Result<String>,
    guest_image: Option<&Path>,
) {
    use crate::tenant::{TenantArgs, TenantCmd};
    let Ok(storage) = get("CAAS_STORAGE_DIR") else {
        return;
    };
    let t = Tenant {
        ta: TenantArgs {
            dir: Some(dir.join("tenant")),
            endpoint: get("CAAS_KMS_ENDPOINT").ok(),
            ttp: get("CAAS_TTP_PUBLIC_KEY").ok(),
            access_key_id: get("AWS_ACCESS_KEY_ID").ok(),
            secret_access_key: get("AWS_SECRET_ACCESS_KEY").ok(),
            cmd: TenantCmd::Init,
        },
        tdir: dir.join("tenant"),
        hosts: get("CAAS_HOSTS")
            .unwrap_or_default()
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect(),
        storage: PathBuf::from(storage),
        dev_dir: dir.to_path_buf(),
        get,
    };
    let run_id = std::process::id();
    let (image_id, vm1, vm2) = (
        format!("demo-img-{run_id}"),
        format!("demo-wl-{run_id}"),
        format!("demo-wl-{run_id}-b"),
    );
    let raw = dir.join("demo-image.raw");
    let image: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let image_sha = hex::encode(caas_tl::crypto::sha256(&image));
    let ok = st
        .run(
            "TL: domain manager key pair (TL.Setup) and the TTP's ACL for domain demo-data",
            t.acl(&["demo-data"]),
        )
        .await;
    if ok.is_none() {
        return;
    }
    match guest_image {
        Some(img) => {
            if let Some(image_id) = vm_story(st, &t, img).await {
                net_story(st, &t, &image_id).await;
            }
        }
        None => st.skip("VM: a real VM (caas demo --driver process: workload processes only)"),
    }
    let ok = st
        .run(
            "Provisioning (seed 001 Alg. 1): validate the hosts' certified bind keys, encrypt a 4 MiB image under k, seal the crypto-domain configuration to each host",
            async {
                tokio::fs::write(&raw, &image).await?;
                t.provision(&raw, &image_id).await
            },
        )
        .await;
    if ok.is_none() {
        return;
    }
    let vols = ["demo-data/db".to_string()];
    let doms = ["demo-data".to_string()];
    let launched = st
        .run(
            "TL: trusted launch of a workload process through the scheduler (attested host, sealed token, H1/H2 checks, crypto domain, DBSP volume demo-data/db, workload)",
            t.launch(&image_id, &vm1, &doms, &vols, "process"),
        )
        .await;
    let Some(host) = launched else {
        return;
    };
    let check = |vm: String| {
        let tdir = t.tdir.clone();
        let image_sha = image_sha.clone();
        async move {
            let r = crate::tenant::connect(&tdir, &vm).await?;
            if r.disk_sha256 != image_sha {
                bail!("the workload's disk is not the tenant's image");
            }
            if r.vsm.is_none() || !r.volumes.iter().all(|v| v.ok) || r.volumes.is_empty() {
                bail!("VSM signature or DBSP volume check missing: {r:?}");
            }
            Ok(())
        }
    };
    st.run(
        "TL: the workload proves τ over TLS 1.3-PSK, verifies pk_DM's signature, reads the image, signs in its VSM, writes its DBSP volume",
        check(vm1.clone()),
    )
    .await;
    st.run(
        "DBSP: stop the workload and relaunch: the domain key is re-created from c4 and μ in the domain header",
        async {
            t.stop(&host, &vm1).await?;
            t.launch(&image_id, &vm2, &doms, &vols, "process").await?;
            check(vm2.clone()).await
        },
    )
    .await;
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    // No silent fallback to processes: a demo of real VMs without qemu fails here, first.
    if args.driver == DemoDriver::Qemu {
        require_qemu()?;
    }
    let dir = args.data_dir.unwrap_or_else(crate::dev::default_dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    if !crate::dev::is_running(&dir).await {
        println!("starting a dev deployment in {}", dir.display());
        crate::dev::run(crate::dev::DevArgs {
            cmd: None,
            data_dir: Some(dir.clone()),
            listen: "127.0.0.1:0".into(),
            detach: true,
            maintenance_secs: 60,
            hosts: args.hosts,
            attest_secs: 10,
            accept_audit_rollback: false,
            audit_durability: Default::default(),
        })
        .await?;
    }
    let env = crate::dev::read_env(&dir.join("env"))?;
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("{k} missing from env"))
    };
    let client = KmsClient::new(
        &get("CAAS_KMS_ENDPOINT")?,
        &get("AWS_DEFAULT_REGION")?,
        &get("AWS_ACCESS_KEY_ID")?,
        SecretBytes::new(get("AWS_SECRET_ACCESS_KEY")?.into_bytes()),
        None,
    )?;
    let c = &client;
    let total = Instant::now();
    let mut st = Steps { n: 0, failed: 0 };
    println!(
        "caas demo — tenant story against {}",
        get("CAAS_KMS_ENDPOINT")?
    );

    let key = st
        .run("KMS: create a symmetric key", async {
            s(
                &c.call("CreateKey", &json!({ "Description": "caas demo data key" }))
                    .await?["KeyMetadata"],
                "KeyId",
            )
        })
        .await;
    let alias = format!("alias/demo-{}", std::process::id());
    if let Some(key) = &key {
        st.run(&format!("KMS: name it {alias}"), async {
            c.call(
                "CreateAlias",
                &json!({ "AliasName": alias, "TargetKeyId": key }),
            )
            .await?;
            Ok(())
        })
        .await;
    }
    let ec = json!({ "tenant": "demo", "purpose": "payroll" });
    let ct = st
        .run("KMS: encrypt a secret under the alias with an encryption context", async {
            let v = c.call("Encrypt", &json!({ "KeyId": alias, "Plaintext": b64(b"the payroll database password"), "EncryptionContext": ec })).await?;
            Ok(b64field(&v, "CiphertextBlob")?)
        })
        .await;
    if let Some(ct) = &ct {
        st.run("KMS: decrypt it (same context)", async {
            let p = c.decrypt(ct, &ec).await?;
            if p.expose() != b"the payroll database password" {
                bail!("plaintext differs");
            }
            Ok(())
        })
        .await;
        st.run("KMS: decrypt with another context is refused", async {
            match c
                .decrypt(ct, &json!({ "tenant": "demo", "purpose": "other" }))
                .await
            {
                Err(ClientError::Service { code, .. }) if code == "InvalidCiphertextException" => {
                    Ok(())
                }
                other => bail!("expected InvalidCiphertextException, got {other:?}"),
            }
        })
        .await;
    }
    if let Some(key) = &key {
        st.run("KMS: envelope encryption — generate a data key", async {
            let (p, blob) = c.generate_data_key(key, &ec).await?;
            let back = c.decrypt(&blob, &ec).await?;
            if back.expose() != p.expose() || p.len() != 32 {
                bail!("data key round trip failed");
            }
            Ok(())
        })
        .await;
        st.run(
            "KMS: rotate the key on demand; the old ciphertext still decrypts",
            async {
                c.call("RotateKeyOnDemand", &json!({ "KeyId": key }))
                    .await?;
                if let Some(ct) = &ct {
                    c.decrypt(ct, &ec).await?;
                }
                let r = c.call("ListKeyRotations", &json!({ "KeyId": key })).await?;
                if r["Rotations"].as_array().map_or(0, Vec::len) != 1 {
                    bail!("expected one rotation");
                }
                Ok(())
            },
        )
        .await;
    }
    st.run("KMS: ECDSA P-256 signing key: sign and verify", async {
        let k = s(&c.call("CreateKey", &json!({ "KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY" })).await?["KeyMetadata"], "KeyId")?;
        let msg = b64(b"release v1.0 manifest");
        let sig = s(&c.call("Sign", &json!({ "KeyId": k, "Message": msg, "SigningAlgorithm": "ECDSA_SHA_256" })).await?, "Signature")?;
        let v = c.call("Verify", &json!({ "KeyId": k, "Message": msg, "Signature": sig, "SigningAlgorithm": "ECDSA_SHA_256" })).await?;
        if v["SignatureValid"] != json!(true) {
            bail!("signature did not verify");
        }
        Ok(())
    })
    .await;
    st.run("KMS: HMAC key: generate and verify a MAC", async {
        let k = s(&c.call("CreateKey", &json!({ "KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC" })).await?["KeyMetadata"], "KeyId")?;
        let m = s(&c.call("GenerateMac", &json!({ "KeyId": k, "Message": b64(b"token"), "MacAlgorithm": "HMAC_SHA_256" })).await?, "Mac")?;
        c.call("VerifyMac", &json!({ "KeyId": k, "Message": b64(b"token"), "Mac": m, "MacAlgorithm": "HMAC_SHA_256" })).await?;
        Ok(())
    })
    .await;
    let exe = std::env::current_exe()?;
    let hosts: Vec<String> = get("CAAS_HOSTS")
        .map(|h| {
            h.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if hosts.is_empty() {
        println!(
            "[--] skip               attestation: this deployment has no hosts (caas dev --hosts N)"
        );
    } else {
        st.run(&format!("Attestation: {} hosts enrolled (EK certificate checked, AK certified by MakeCredential/ActivateCredential)", hosts.len()), async {
            let out = tokio::process::Command::new(&exe).args(["host", "list"]).envs(env.iter().cloned()).output().await?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !hosts.iter().all(|h| text.contains(h.as_str())) {
                bail!("host list: {text} {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })
        .await;
        for h in &hosts {
            st.run(
                &format!(
                    "Attestation: attest {h} now (fresh nonce, quote, event-log replay, profile)"
                ),
                async {
                    let out = tokio::process::Command::new(&exe)
                        .args(["attest", h])
                        .envs(env.iter().cloned())
                        .output()
                        .await?;
                    if !out.status.success() {
                        bail!("not trusted: {}", String::from_utf8_lossy(&out.stdout));
                    }
                    Ok(())
                },
            )
            .await;
        }
    }
    st.run(
        "SDP: create a volume whose data key comes from the KMS (caas volume create)",
        async {
            let vol = dir.join("demo-created.caasvol");
            let _ = std::fs::remove_file(&vol);
            let out = tokio::process::Command::new(&exe)
                .args([
                    "volume",
                    "--kms-key-id",
                    "alias/caas-dev-volume",
                    "create",
                    "--size",
                    "16M",
                    "--out",
                ])
                .arg(&vol)
                .envs(env.iter().cloned())
                .output()
                .await?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            let info = tokio::process::Command::new(&exe)
                .args(["volume", "info"])
                .arg(&vol)
                .envs(env.iter().cloned())
                .output()
                .await?;
            if !info.status.success() {
                bail!("volume info: {}", String::from_utf8_lossy(&info.stderr));
            }
            Ok(())
        },
    )
    .await;
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| b"caas-demo-plaintext:"[(i % 20) as usize])
        .collect();
    let nbd_ok = st
        .run(
            "SDP: write 1 MiB through the encrypting NBD proxy, flush, read it back",
            async {
                let store = caas_sdp::store::Store::connect_nbd(&get("CAAS_NBD_URI")?)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                store
                    .write_at(1 << 20, &pattern)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                store.sync().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut back = vec![0u8; pattern.len()];
                store
                    .read_at(1 << 20, &mut back)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if back != pattern {
                    bail!("read back differs");
                }
                Ok(())
            },
        )
        .await;
    if nbd_ok.is_some() {
        st.run(
            "SDP: the ciphertext file holds no 16-byte run of the plaintext",
            async {
                let ct = tokio::fs::read(get("CAAS_VOLUME_FILE")?).await?;
                // The pattern has period 20, so its 16-byte runs are its first 20 windows.
                // Indexed by their first two bytes, so random ciphertext is rejected cheaply.
                let mut runs: std::collections::HashMap<[u8; 2], Vec<&[u8]>> = Default::default();
                for w in pattern.windows(16).take(20) {
                    runs.entry([w[0], w[1]]).or_default().push(w);
                }
                if ct
                    .windows(16)
                    .any(|w| runs.get(&[w[0], w[1]]).is_some_and(|c| c.contains(&w)))
                {
                    bail!("plaintext found in the ciphertext file");
                }
                Ok(())
            },
        )
        .await;
    }
    st.run(
        "VSM: generate a P-256 key in the crypto domain's token and sign with it",
        async {
            let (socket, pin) = (get("CAAS_PKCS11_SOCKET")?, get("CAAS_PKCS11_USER_PIN")?);
            let summary = tokio::task::spawn_blocking(move || {
                caas_domc::dev::demo_sign(std::path::Path::new(&socket), &pin)
            })
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("       {summary}");
            Ok(())
        },
    )
    .await;
    if get("CAAS_TTP_PUBLIC_KEY").is_ok() && !hosts.is_empty() {
        let guest_image = match (args.driver, args.guest_image) {
            (DemoDriver::Process, _) => None,
            (DemoDriver::Qemu, Some(p)) => Some(p),
            (DemoDriver::Qemu, None) => {
                st.run(
                    "VM: the legacy guest image (scripts/build-guest-image: Debian kernel, busybox, syslinux, this build's guest agent and PKCS#11 module; cached)",
                    async {
                        let p = build_guest_image().await?;
                        println!("       {} ({} MiB)", p.display(), std::fs::metadata(&p)?.len() >> 20);
                        Ok(p)
                    },
                )
                .await
            }
        };
        if args.driver == DemoDriver::Process || guest_image.is_some() {
            tenant_story(&mut st, &dir, &get, guest_image.as_deref()).await;
        }
    }
    st.run(
        "Audit: the hash-chained, signed audit log verifies",
        async {
            let out = tokio::process::Command::new(&exe)
                .arg("audit")
                .arg("verify")
                .arg("--data-dir")
                .arg(&dir)
                .output()
                .await?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        },
    )
    .await;
    println!(
        "{} steps, {} failed, {:.1} ms in total",
        st.n,
        st.failed,
        total.elapsed().as_secs_f64() * 1000.0
    );
    if st.failed > 0 {
        bail!("{} demo step(s) failed", st.failed);
    }
    Ok(())
}
