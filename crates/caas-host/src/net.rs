//! The network Secure Device Proxy of each VM attached to a network domain
//! (`docs/network-sdp.md`): the agent starts one `caas net serve` per such VM (no inherited
//! descriptors), feeds it the domain's key — fetched from the TTP with
//! [`crate::agent::Agent::net_key`] (AK-quoted request, opened by the TPM bind key) — and
//! the other members' underlay addresses on its stdin control channel (never in arguments,
//! environment or files), re-fetches the key every `[net] key_poll_ms` and before the TTP's
//! `rekey_at`, and stops the proxy with the VM.
//!
//! Peer discovery is the scheduler's placement data: a launch's answer names the VM's
//! network member (N, sender id, underlay UDP address); the scheduler sends every member's
//! agent the list of N's members (`POST /v1/agent/net/peers`) when one joins or leaves.
//! The list is not secret and not trusted: it only says where sealed frames go and whose
//! datagrams are considered; a frame from anyone without the epoch's key is dropped.
//!
//! Every start, key installation (or refusal), peer update and stop is in the agent's audit
//! log (`NetProxyStart`, `NetKey`, `NetPeers`, `NetProxyStop`).
use crate::error::Error;
use caas_crypto::SecretKey;
use caas_sdp::net::control::Control;
use caas_sdp::net::overlay::Peer;
use caas_tl::wire::NetAttach;
use caas_workload::MacAddr;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A member of a network domain as the scheduler and the other members see it (public).
pub type NetMemberView = caas_tl::wire::NetMember;

/// What the management API shows of a VM's network attachment (no key material).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetView {
    /// The network domain N.
    pub domain: String,
    /// The member (sender id, underlay address).
    pub member: NetMemberView,
    /// The guest NIC's MAC address.
    pub mac: MacAddr,
    /// The guest's overlay address (`A.B.C.D/P`).
    pub address: String,
    /// The proxy's end of the VM's NIC and qemu's (host paths).
    pub proxy_socket: PathBuf,
    /// qemu's socket, the only sender the proxy accepts.
    pub vm_socket: PathBuf,
    /// The newest key epoch installed in the proxy.
    pub epoch: u64,
    /// The proxy's counters (`Stats`), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
}

/// `POST /v1/agent/net/peers` (the scheduler): the members of network domain N.
pub type PeersCall = caas_tl::wire::NetPeers;

/// The sender id of `vm_id` in network domain `n`: 32 bits of SHA-256 (unique among the
/// members with overwhelming probability; a proxy refuses a peer list naming its own id).
#[must_use]
pub fn sender_id(n: &str, vm_id: &str) -> u32 {
    let h = caas_tl::crypto::sha256(
        &[b"caas-net-sender\0", n.as_bytes(), b"\0", vm_id.as_bytes()].concat(),
    );
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// The guest NIC's MAC: locally administered unicast, from N and id_vm.
#[must_use]
pub fn mac_of(n: &str, vm_id: &str) -> MacAddr {
    let h = caas_tl::crypto::sha256(
        &[b"caas-net-mac\0", n.as_bytes(), b"\0", vm_id.as_bytes()].concat(),
    );
    MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
}

/// The control channel of a running proxy: its stdin (messages) and stdout (one reply line
/// each).
struct Ctl {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Ctl {
    /// Sends one message (encoded in a zeroizing buffer) and reads its reply.
    fn send(&mut self, m: &Control) -> Result<String, Error> {
        let bytes = m.encode();
        self.stdin
            .write_all(bytes.expose())
            .and_then(|()| self.stdin.flush())
            .map_err(Error::io("network proxy control channel"))?;
        drop(bytes);
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(Error::io("network proxy reply"))?;
        if n == 0 {
            return Err(Error::Domain("the network proxy exited".into()));
        }
        let line = line.trim_end().to_string();
        if let Some(e) = line.strip_prefix("error: ") {
            return Err(Error::Domain(format!("network proxy refused: {e}")));
        }
        Ok(line)
    }
}

/// A VM's running network proxy.
pub(crate) struct NetProxy {
    pub(crate) attach: NetAttach,
    pub(crate) sender: u32,
    pub(crate) mac: MacAddr,
    pub(crate) udp: SocketAddr,
    /// The proxy's socket (qemu's `remote.path`) and qemu's (`local.path`).
    pub(crate) proxy_socket: PathBuf,
    pub(crate) vm_socket: PathBuf,
    /// The newest epoch installed.
    pub(crate) epoch: u64,
    /// When to ask the TTP again.
    pub(crate) next_fetch: Instant,
    child: Child,
    ctl: Arc<Mutex<Ctl>>,
}

impl std::fmt::Debug for NetProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetProxy")
            .field("domain", &self.attach.domain)
            .field("sender", &self.sender)
            .field("udp", &self.udp)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A handle on a proxy's control channel, usable without the workloads' lock.
#[derive(Clone)]
pub(crate) struct CtlHandle(Arc<Mutex<Ctl>>);

impl CtlHandle {
    /// Sends `m` (blocking; run it off the async workers).
    pub(crate) async fn send(&self, m: Control) -> Result<String, Error> {
        let c = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = c
                .lock()
                .map_err(|_| Error::Domain("network proxy channel poisoned".into()))?;
            g.send(&m)
        })
        .await
        .map_err(|e| Error::Domain(format!("network proxy task: {e}")))?
    }

    /// Installs K_{N,e}.
    pub(crate) async fn key(&self, epoch: u64, key: SecretKey) -> Result<(), Error> {
        let epoch = u32::try_from(epoch)
            .map_err(|_| Error::Domain("network key epoch beyond the frame format".into()))?;
        self.send(Control::Key { epoch, key }).await.map(drop)
    }
}

impl NetProxy {
    /// Starts `caas net serve` for `vm_id` in `dir` (the launch's network directory,
    /// [`crate::identity::RunDirs::net`]), receiving on `listen_ip` (any port). With
    /// identities of the launch's own (`ids`), its VM socket is owned by the workload's
    /// (qemu's) and the proxy runs as the crypto domain's once its sockets are bound. It
    /// waits for its key on stdin.
    pub(crate) fn start(
        exe: &str,
        dir: &Path,
        vm_id: &str,
        attach: &NetAttach,
        listen_ip: std::net::IpAddr,
        ids: crate::identity::Ids,
        s: crate::config::NetSettings,
    ) -> Result<Self, Error> {
        let sender = sender_id(&attach.domain, vm_id);
        let proxy_socket = dir.join(crate::identity::NET_PROXY_SOCKET);
        let vm_socket = dir.join(crate::identity::NET_VM_SOCKET);
        let _ = std::fs::remove_file(&vm_socket);
        let mut cmd = caas_crypto::hardening::command_without_inherited_fds(exe);
        cmd.args(["net", "serve", "--domain", &attach.domain])
            .arg("--sender-id")
            .arg(sender.to_string())
            .arg("--listen")
            .arg(SocketAddr::new(listen_ip, 0).to_string())
            .arg("--vm-socket")
            .arg(&proxy_socket)
            .arg("--vm-peer")
            .arg(&vm_socket)
            .arg("--switch-after-ms")
            .arg(s.switch_after_ms.to_string())
            .arg("--retire-after-ms")
            .arg(s.retire_after_ms.to_string());
        if ids.workload.own {
            cmd.arg("--peer-uid").arg(ids.workload.uid.to_string());
        }
        if ids.domain.own {
            cmd.arg("--run-as")
                .arg(format!("{}:{}", ids.domain.uid, ids.domain.gid));
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(Error::io("start the network proxy"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Domain("no pipes to the network proxy".into()));
        };
        let mut stdout = BufReader::new(stdout);
        // `net ready udp=ADDR vm=PATH`, or end of output when it failed to start.
        let mut line = String::new();
        let ready = stdout
            .read_line(&mut line)
            .ok()
            .filter(|n| *n > 0)
            .and_then(|_| {
                line.trim_end()
                    .strip_prefix("net ready udp=")?
                    .split_whitespace()
                    .next()?
                    .parse::<SocketAddr>()
                    .ok()
            });
        let Some(udp) = ready else {
            let _ = child.kill();
            let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(Error::Domain(format!(
                "the network proxy did not start ({st})"
            )));
        };
        Ok(Self {
            attach: attach.clone(),
            sender,
            mac: mac_of(&attach.domain, vm_id),
            udp,
            proxy_socket,
            vm_socket,
            epoch: 0,
            next_fetch: Instant::now(),
            child,
            ctl: Arc::new(Mutex::new(Ctl { stdin, stdout })),
        })
    }

    pub(crate) fn ctl(&self) -> CtlHandle {
        CtlHandle(self.ctl.clone())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's NIC for the qemu driver.
    pub(crate) fn spec(&self) -> caas_workload::NetSpec {
        caas_workload::NetSpec {
            proxy_socket: self.proxy_socket.clone(),
            vm_socket: self.vm_socket.clone(),
            mac: self.mac,
            address: self.attach.address,
            prefix_len: self.attach.prefix_len,
        }
    }

    pub(crate) fn member(&self, vm_id: &str) -> NetMemberView {
        NetMemberView {
            vm_id: vm_id.to_string(),
            sender: self.sender,
            udp: self.udp,
        }
    }

    pub(crate) fn view(&self, vm_id: &str) -> NetView {
        NetView {
            domain: self.attach.domain.clone(),
            member: self.member(vm_id),
            mac: self.mac,
            address: format!("{}/{}", self.attach.address, self.attach.prefix_len),
            proxy_socket: self.proxy_socket.clone(),
            vm_socket: self.vm_socket.clone(),
            epoch: self.epoch,
            stats: None,
        }
    }

    /// The next fetch: after the poll interval, and before the TTP's `rekey_at`.
    pub(crate) fn schedule(&mut self, poll: Duration, rekey_at_ms: u64) {
        let now_ms = caas_attest::now_ms();
        let until_rekey = Duration::from_millis(rekey_at_ms.saturating_sub(now_ms));
        self.next_fetch = Instant::now() + poll.min(until_rekey.max(Duration::from_millis(100)));
    }

    /// Stops the proxy (idempotent): SIGTERM, SIGKILL after 2 s; its socket is removed.
    pub(crate) fn stop(&mut self) {
        // Already reaped (the status is kept): never signal a pid that may be reused.
        if let Ok(Some(_)) = self.child.try_wait() {
            let _ = std::fs::remove_file(&self.proxy_socket);
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.proxy_socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.proxy_socket);
    }

    /// The other members of N for this proxy (itself left out).
    pub(crate) fn peers_of(&self, vm_id: &str, members: &[NetMemberView]) -> Vec<Peer> {
        members
            .iter()
            .filter(|m| m.vm_id != vm_id)
            .map(|m| Peer {
                sender: m.sender,
                addr: m.udp,
            })
            .collect()
    }
}

impl Drop for NetProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TTP's network key grant as the agent opened it.
pub struct NetGrant {
    /// The epoch e.
    pub epoch: u64,
    /// K_{N,e}.
    pub key: SecretKey,
    /// When the TTP rekeys N at the latest (Unix ms).
    pub rekey_at_ms: u64,
}

impl std::fmt::Debug for NetGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetGrant")
            .field("epoch", &self.epoch)
            .field("rekey_at_ms", &self.rekey_at_ms)
            .finish_non_exhaustive()
    }
}

/// What a network key request or a leave needs of a workload's TL session (DK_i zeroized
/// when dropped).
pub(crate) struct NetCreds {
    pub(crate) launch_r: Vec<u8>,
    pub(crate) h2: String,
    pub(crate) sp: String,
    pub(crate) dk: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for NetCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetCreds")
            .field("h2", &self.h2)
            .finish_non_exhaustive()
    }
}

/// The most members a peer list may name.
const MAX_MEMBERS: usize = 1024;

use crate::agent::Agent;

impl Agent {
    /// Starts the network proxy of `vm_id` (registered, its crypto domain keyed) in its
    /// network directory `dir`, keys it with N's current key from the TTP and returns the
    /// NIC for the qemu driver (a process workload has no NIC: `None`, the proxy still runs
    /// for its domain). Audited: `NetProxyStart`, `NetKey`.
    pub(crate) async fn start_net(
        &self,
        vm_id: &str,
        n: &NetAttach,
        dir: &Path,
        ids: crate::identity::Ids,
        driver: &str,
    ) -> Result<Option<caas_workload::NetSpec>, Error> {
        let (ctl, spec) = self.attach_net(vm_id, n, dir, ids).await?;
        self.key_net(vm_id, n, &ctl, None).await?;
        Ok((driver == "qemu").then_some(spec))
    }

    /// Starts `vm_id`'s network proxy (unkeyed) and registers it with its workload (in the
    /// table). Audited (`NetProxyStart`).
    pub(crate) async fn attach_net(
        &self,
        vm_id: &str,
        n: &NetAttach,
        dir: &Path,
        ids: crate::identity::Ids,
    ) -> Result<(CtlHandle, caas_workload::NetSpec), Error> {
        let proxy = self.spawn_net(vm_id, n, dir, ids).await?;
        let (ctl, spec) = (proxy.ctl(), proxy.spec());
        let mut g = self.tl.workloads.lock().await;
        let w = g
            .get_mut(vm_id)
            .ok_or_else(|| Error::Domain("workload vanished".into()))?;
        w.net = Some(proxy);
        Ok((ctl, spec))
    }

    /// Starts `vm_id`'s network proxy process (unkeyed; the caller keeps it). Audited
    /// (`NetProxyStart`).
    pub(crate) async fn spawn_net(
        &self,
        vm_id: &str,
        n: &NetAttach,
        dir: &Path,
        ids: crate::identity::Ids,
    ) -> Result<NetProxy, Error> {
        let subject = format!("{vm_id}/{}", n.domain);
        let started = async {
            n.check()?;
            let exe = crate::tl::caas_exe()?;
            let (dir, n2, vm) = (dir.to_path_buf(), n.clone(), vm_id.to_string());
            let listen = crate::tl::workload_listen_ip(self.cfg.listen.ip());
            let s = self.cfg.net;
            tokio::task::spawn_blocking(move || {
                NetProxy::start(&exe, &dir, &vm, &n2, listen, ids, s)
            })
            .await
            .map_err(|e| Error::Domain(format!("network proxy task: {e}")))?
        }
        .await;
        match started {
            Ok(p) => {
                self.tl.audit(
                    "NetProxyStart",
                    &format!("{subject} sender={} udp={}", p.sender, p.udp),
                    &Ok::<(), Error>(()),
                );
                Ok(p)
            }
            Err(e) => {
                self.tl.audit("NetProxyStart", &subject, &Err::<(), _>(e));
                Err(Error::Domain("the network proxy did not start".into()))
            }
        }
    }

    /// Keys `vm_id`'s proxy with N's current key from the TTP, under the workload's TL
    /// session (`creds`, or the registered workload's). Returns the epoch and the TTP's
    /// `rekey_at`; the epoch is noted on the registered workload. Audited (`NetKey`).
    pub(crate) async fn key_net(
        &self,
        vm_id: &str,
        n: &NetAttach,
        ctl: &CtlHandle,
        creds: Option<&NetCreds>,
    ) -> Result<(u64, u64), Error> {
        let subject = format!("{vm_id}/{}", n.domain);
        let keyed = async {
            let g = self.net_key_as(vm_id, &n.domain, creds).await?;
            let (epoch, at) = (g.epoch, g.rekey_at_ms);
            ctl.key(epoch, g.key).await?;
            self.note_epoch(vm_id, epoch, at).await;
            Ok::<_, Error>((epoch, at))
        }
        .await;
        let subj = match &keyed {
            Ok((e, _)) => format!("{subject} epoch {e}"),
            Err(_) => subject.clone(),
        };
        self.tl.audit("NetKey", &subj, &keyed);
        keyed
    }

    /// NetLeave: `vm_id`'s workload stopped or was suspended here (`why`); its TL session
    /// ends at the TTP, which moves each network domain it was a member of to a new epoch
    /// (the others pick it up at their next fetch; this host is refused it). Audited
    /// (`NetLeave`, with the domains rekeyed or the refusal's code). Best effort: a refusal
    /// leaves the session to the schedule rekey and revocation.
    pub(crate) async fn leave_net(&self, vm_id: &str, creds: &NetCreds, why: &str) {
        let r = async {
            let ttp = self.ttp().await?;
            let req = caas_tl::sc::netleave_request(
                &self.cfg.name,
                vm_id,
                &creds.launch_r,
                &creds.h2,
                &creds.dk,
                why,
                caas_attest::now_ms(),
            )?;
            let resp: caas_tl::wire::Signed = self
                .ttp_request(
                    caas_tl::wire::label::NETLEAVE_REQUEST,
                    "/v1/tl/netkey/leave",
                    caas_tl::wire::to_bytes(&req),
                )
                .await?;
            Ok::<_, Error>(caas_tl::sc::check_netleave_ack(&resp, &ttp, &req)?)
        }
        .await;
        let subject = match &r {
            Ok(l) => format!("{vm_id} {why}: rekeyed [{}]", l.rekeyed.join(",")),
            Err(e) => {
                tracing::warn!(vm = %vm_id, code = crate::tl::error_code(e), error = %e, "network leave refused");
                format!("{vm_id} {why}")
            }
        };
        self.tl.audit("NetLeave", &subject, &r.map(drop));
    }

    /// Records the installed epoch and schedules the next fetch.
    async fn note_epoch(&self, vm_id: &str, epoch: u64, rekey_at_ms: u64) {
        let poll = Duration::from_millis(self.cfg.net.key_poll_ms);
        if let Some(p) = self
            .tl
            .workloads
            .lock()
            .await
            .get_mut(vm_id)
            .and_then(|w| w.net.as_mut())
        {
            p.epoch = p.epoch.max(epoch);
            p.schedule(poll, rekey_at_ms);
        }
    }

    /// One pass of the rekey schedule: every proxy whose fetch is due asks the TTP for N's
    /// current key (fresh quote); a newer epoch is installed (`NetKey` "… epoch e"), a
    /// refusal — this host no longer trusted, the session retired, N taken out of the ACL —
    /// is audited with its code and the proxy keeps only what it had, which its peers stop
    /// accepting once they retire that epoch.
    pub async fn net_refresh_due(&self) {
        let now = Instant::now();
        let due: Vec<(String, String, u64, CtlHandle)> = self
            .tl
            .workloads
            .lock()
            .await
            .iter()
            .filter_map(|(vm, w)| {
                let n = w.net.as_ref()?;
                (n.next_fetch <= now)
                    .then(|| (vm.clone(), n.attach.domain.clone(), n.epoch, n.ctl()))
            })
            .collect();
        let poll = Duration::from_millis(self.cfg.net.key_poll_ms);
        for (vm, domain, have, ctl) in due {
            let subject = format!("{vm}/{domain}");
            match self.net_key(&vm, &domain).await {
                Ok(g) if g.epoch > have => {
                    let epoch = g.epoch;
                    let r = ctl.key(epoch, g.key).await;
                    self.tl
                        .audit("NetKey", &format!("{subject} epoch {epoch} (rekey)"), &r);
                    if r.is_ok() {
                        self.note_epoch(&vm, epoch, g.rekey_at_ms).await;
                    } else {
                        self.note_epoch(
                            &vm,
                            have,
                            caas_attest::now_ms() + self.cfg.net.key_poll_ms,
                        )
                        .await;
                    }
                }
                Ok(g) => self.note_epoch(&vm, have, g.rekey_at_ms).await,
                Err(e) => {
                    tracing::warn!(vm = %vm, net_domain = %domain, code = crate::tl::error_code(&e), error = %e, "network key refused");
                    self.tl.audit("NetKey", &subject, &Err::<(), _>(e));
                    let at =
                        caas_attest::now_ms() + u64::try_from(poll.as_millis()).unwrap_or(u64::MAX);
                    self.note_epoch(&vm, have, at).await;
                }
            }
        }
    }

    /// The scheduler's member list of network domain N: each of this host's proxies in N
    /// gets the others (`Peers`, replacing its list). Returns this host's members of N (so
    /// the scheduler drops the ones that stopped here). Audited (`NetPeers`).
    pub async fn net_peers(&self, call: &PeersCall) -> Result<Vec<String>, Error> {
        let valid = (|| {
            caas_tl::wire::check_name("net_domain", &call.net_domain)?;
            if call.members.len() > MAX_MEMBERS {
                return Err(Error::InvalidRequest(format!(
                    "at most {MAX_MEMBERS} members"
                )));
            }
            for m in &call.members {
                caas_tl::wire::check_name("vm_id", &m.vm_id)?;
            }
            Ok(())
        })();
        if let Err(e) = valid {
            self.tl.audit("NetPeers", "-", &Err::<(), _>(e));
            return Err(Error::InvalidRequest("malformed member list".into()));
        }
        let targets: Vec<(String, Vec<Peer>, CtlHandle)> = self
            .tl
            .workloads
            .lock()
            .await
            .iter_mut()
            .filter_map(|(vm, w)| {
                let n = w.net.as_mut()?;
                if n.attach.domain != call.net_domain {
                    return None;
                }
                // A membership change: a member that left made the TTP rekey N, so ask
                // for N's key at once rather than at the next poll.
                n.next_fetch = Instant::now();
                Some((vm.clone(), n.peers_of(vm, &call.members), n.ctl()))
            })
            .collect();
        let mut done = Vec::new();
        let mut first_err = None;
        for (vm, peers, ctl) in targets {
            let k = peers.len();
            let r = ctl.send(Control::Peers(peers)).await;
            self.tl
                .audit("NetPeers", &format!("{vm}/{} n={k}", call.net_domain), &r);
            match r {
                Ok(_) => done.push(vm),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Management: a workload's network attachment with its proxy's counters.
    pub async fn net_status(&self, vm_id: &str) -> Result<NetView, Error> {
        let (mut view, ctl) = {
            let g = self.tl.workloads.lock().await;
            let n = g
                .get(vm_id)
                .and_then(|w| w.net.as_ref())
                .ok_or_else(|| Error::InvalidRequest(format!("no network proxy for {vm_id}")))?;
            (n.view(vm_id), n.ctl())
        };
        let stats = ctl.send(Control::Stats).await?;
        view.stats = Some(stats.strip_prefix("stats ").unwrap_or(&stats).to_string());
        Ok(view)
    }
}

/// Runs the rekey schedule of `agent`'s network proxies until it is dropped.
pub async fn refresh_loop(agent: std::sync::Weak<Agent>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(a) = agent.upgrade() else {
            return;
        };
        a.net_refresh_due().await;
    }
}
