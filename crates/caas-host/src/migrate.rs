//! Live migration of a workload to an attested host, the agents' side
//! (`docs/suspend-migrate.md` "Live migration"; protocol in [`caas_tl::migrate`]).
//!
//! Source (`POST /v1/agent/workloads/{vm}/migrate`, the management's request):
//! 1. an AK-signed [`MigrateRequest`] to the TTP (`POST /v1/tl/migrate`); the TTP's
//!    [`caas_tl::migrate::MigrationStatement`] must verify under pk_TTP and name this host,
//!    the requested target and the workload. **Nothing is sent to the target before.**
//! 2. the offer (the statement, an ephemeral X25519 key, a session secret sealed to the
//!    target's attested bind key) to the target agent over mutual TLS
//!    (`POST /v1/agent/migrations`, role `host`); the target's accept must carry the key
//!    confirmation only the attested TPM state can compute.
//! 3. the workload's state in AEAD records (`POST /v1/agent/migrations/{id}/records`): its
//!    description, τ and pk_DM, and for a VM qemu's live-migration stream (QMP `migrate` to
//!    a pipe, `Agent::send_vm`; qemu starts before step 1 into a queue in this agent's
//!    memory bounded by `SOURCE_BUFFER_BYTES`, which is sealed and sent only after step 2
//!    and dropped unsent, qemu's migration cancelled, if step 1 or 2 fails; each request
//!    carries what is queued, up to `VM_BATCH_MAX`, one in flight) followed, once the
//!    workload stopped (a process workload is
//!    stopped for it), by its VSM's token export and transfer key (`crate::token`); then
//!    the source releases its volumes (a process workload: destroys its crypto domain) and
//!    sends the commit and end records.
//!
//! Target: the offer must come from the statement's source (the caller's certificate names
//! it), be fresh, and its migration id unused (`migration_replayed`); its TPM opens the
//! session secret and the workload's new DK_i (both under the bind key's PCR policy); the
//! records must open in order under the session's key (DK_i is opened after the accept
//! went back). A VM is prepared in the background once the description and secrets are in
//! (crypto domain, qemu waiting for its state with `-incoming defer -S`) while the source
//! streams on: each record's bytes, once authenticated, wait in a queue bounded in bytes
//! until qemu reads them; its VSM imports the token for (vm, H2, migration id), and it
//! continues only after the end record (`Agent::finish_incoming`); a process workload is
//! started at the end with its token imported first (`Agent::resume_migrated`).
//!
//! Every step is in the agent's audit log (`MigrateWorkload` on the source,
//! `AcceptMigration` and `MigrationRecords` on the target) with the refusal code.
use crate::agent::Agent;
use crate::error::Error;
use caas_tl::migrate::{
    self as proto, Channel, MigrateAccept, MigrateOffer, MigrateRequest, MigrationStatement,
    Record, Role, StreamOpener, StreamSealer,
};
use caas_tl::wire::{self, Signed, label};
use std::collections::HashMap;
use std::time::Instant;
use zeroize::Zeroizing;

/// Body of `POST /v1/agent/workloads/{vm}/migrate`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MigrateCall {
    /// The target host (as enrolled).
    pub to: String,
    /// Its agent's URL. Untrusted: the target proves itself by the key confirmation only
    /// its attested TPM can compute, and the TLS link requires the `host` role.
    pub to_url: String,
}

/// What the source reports (no key, no state).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MigrateResult {
    /// The workload.
    pub vm_id: String,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// The migration id (hex).
    pub migration_id: String,
    /// Bytes sent per channel (control, vm, domain).
    pub bytes: [u64; 3],
    /// The workload's endpoint on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The workload's network attachment on the target (its new member of N, which the
    /// scheduler tells N's other members), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetView>,
    /// Phases and their times (ms).
    pub timings: Vec<(String, f64)>,
}

/// What the target answers to a batch of records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecordsAck {
    /// Records opened so far.
    pub records: u64,
    /// Whether the end record was received and checked.
    pub ended: bool,
    /// After the commit: the workload's endpoint on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// After the commit: the target's phases (ms; no key, no state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<(String, f64)>,
    /// After the commit: the workload's network attachment on the target (no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetView>,
}

/// The workload's description that travels first (channel `Control`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkloadTransfer {
    /// id_vm.
    pub vm_id: String,
    /// The image.
    pub image_id: String,
    /// H2 of the DM.
    pub h2: String,
    /// Workload driver.
    pub driver: String,
    /// The DBSP volumes (domain, SR).
    pub volumes: Vec<(String, String)>,
    /// Its network domain and overlay address: the target starts its own proxy, keyed by
    /// the TTP under the target's session (no network key travels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<caas_tl::wire::NetAttach>,
}

/// The crypto domain's secrets that travel (channel `Domain`): τ (the workload proves it
/// to its DM) and pk_DM. The image key and the token's PINs do not travel: the target's
/// TPM opens the image's configuration sealed to it; the volumes' keys come from the TTP
/// (DBSP) under the workload's new session.
pub struct DomainSecrets(caas_crypto::SecretBytes);

impl std::fmt::Debug for DomainSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainSecrets([REDACTED])")
    }
}

impl DomainSecrets {
    /// τ ‖ pk_DM.
    pub(crate) fn new(tau: &[u8], pk_dm: &[u8]) -> Self {
        Self(caas_crypto::SecretBytes::new(caas_tl::crypto::lp(&[
            tau, pk_dm,
        ])))
    }

    fn parse(b: &[u8]) -> Result<Self, Error> {
        let parts = caas_tl::crypto::split_lp(b, 2)
            .filter(|p| p[0].len() == 32 && p[1].len() == 32)
            .ok_or_else(|| Error::Tl(caas_tl::Error::malformed("domain state", "bad encoding")))?;
        Ok(Self::new(parts[0], parts[1]))
    }

    fn part(&self, i: usize) -> &[u8] {
        caas_tl::crypto::split_lp(self.0.expose(), 2)
            .map(|p| p[i])
            .unwrap_or_default()
    }

    /// τ.
    pub(crate) fn tau(&self) -> &[u8] {
        self.part(0)
    }

    /// pk_DM.
    pub(crate) fn pk_dm(&self) -> &[u8] {
        self.part(1)
    }

    fn bytes(&self) -> &[u8] {
        self.0.expose()
    }
}

/// Control messages of the stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    /// The workload's description (first record).
    Workload(WorkloadTransfer),
    /// The source has stopped the workload and released its volumes: the target takes
    /// over (last record before the end).
    Commit,
}

/// A migration the target accepted and is receiving.
pub(crate) struct Incoming {
    statement: MigrationStatement,
    opener: StreamOpener,
    /// The target's sealer (acknowledgements; kept so no second one exists).
    _sealer: StreamSealer,
    /// DK_i of the workload's new TTP session: its TPM decryption runs after the accept
    /// went back (off the offer's round trip); a VM's preparation takes it over.
    dk: Pending<Zeroizing<Vec<u8>>>,
    transfer: Option<WorkloadTransfer>,
    secrets: Option<DomainSecrets>,
    /// The workload's VSM token arrived ([`crate::token`]; required before the commit):
    /// a VM's is imported at once, a process workload's when it starts here (`token_in`).
    token: bool,
    token_in: Option<crate::token::TokenTransfer>,
    /// A VM's crypto domain and qemu, prepared (TPM, processes, qemu waiting for its
    /// stream) while its stream already arrives.
    vm: Option<Pending<crate::tl::IncomingVm>>,
    /// The queue of the VM stream's authenticated chunks to its qemu (bounded: when the
    /// preparation or qemu lags, the records' requests wait, and so does the source).
    vm_tx: Option<StreamQueueTx>,
    committed: bool,
    records: u64,
    started: Instant,
    /// The last batch (an abandoned migration is dropped after [`IDLE`]).
    last: Instant,
}

/// Work a migration's target runs in the background while records arrive (its TPM's
/// decryption of DK_i, a VM's preparation); awaited where its result is needed.
enum Pending<T> {
    Running(tokio::task::JoinHandle<Result<T, Error>>),
    Done(T),
    Failed,
}

impl<T> Pending<T> {
    fn spawn(f: impl std::future::Future<Output = Result<T, Error>> + Send + 'static) -> Self
    where
        T: Send + 'static,
    {
        Self::Running(tokio::spawn(f))
    }

    /// Its result (the task's error the first time, afterwards a generic one).
    async fn get(&mut self) -> Result<&mut T, Error> {
        if let Self::Running(h) = self {
            let r = match h.await {
                Ok(r) => r,
                Err(e) => Err(Error::Domain(format!("migration task: {e}"))),
            };
            match r {
                Ok(v) => *self = Self::Done(v),
                Err(e) => {
                    *self = Self::Failed;
                    return Err(e);
                }
            }
        }
        match self {
            Self::Done(v) => Ok(v),
            _ => Err(Error::Domain("migration task failed".into())),
        }
    }

    async fn wait(mut self) -> Result<T, Error> {
        self.get().await?;
        match self {
            Self::Done(v) => Ok(v),
            _ => Err(Error::Domain("migration task failed".into())),
        }
    }
}

/// A migration whose source sent nothing for this long is dropped (with a VM waiting for
/// it) when the next offer arrives.
const IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// The target side's state: migrations in progress and the ids already used.
#[derive(Default)]
pub(crate) struct MigrationState {
    incoming: std::sync::Mutex<HashMap<String, Incoming>>,
    /// Migration ids accepted (an id is accepted once; statements expire after
    /// [`wire::FRESHNESS_MS`], so the set is pruned of expired ones), persisted in
    /// `STATE/migrations/seen.json` before an offer is accepted, so a restarted target
    /// refuses an offer it accepted before; loaded at the first offer.
    seen: std::sync::Mutex<Option<HashMap<String, u64>>>,
    /// Workloads this host is sending away (one migration at a time per workload).
    outgoing: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationState").finish_non_exhaustive()
    }
}

/// Bytes of a VM's stream the target queues for its qemu: while the target prepares the
/// VM (~200–300 ms: TPM, crypto domain, qemu's start), the source's qemu streams on into
/// it instead of waiting.
const VM_QUEUE_BYTES: usize = 64 << 20;

/// Bytes of a VM's stream the source holds in memory, not yet sealed: qemu starts its
/// pre-copy into this buffer while the TTP attests the target and the session key is
/// agreed (nothing leaves the host before both), and writes ahead of the network by as
/// much afterwards. Bounded: when it is full qemu waits on its pipe. Small enough that a
/// backlog at qemu's stop adds little to the guest's downtime.
const SOURCE_BUFFER_BYTES: usize = 16 << 20;

/// The queue's unit (permits are KiB).
const KIB: usize = 1024;

/// The sending end of a VM stream's queue: bounded in bytes; a send waits while the queue
/// is full. Chunks are the guest's plaintext state: each is wiped when dropped, whether
/// written, sealed or abandoned in the queue.
pub(crate) struct StreamQueueTx {
    tx: tokio::sync::mpsc::UnboundedSender<Zeroizing<Vec<u8>>>,
    room: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The receiving end (the target: the thread that writes into qemu's pipe; the source:
/// the task that seals and sends).
pub(crate) struct StreamQueueRx {
    rx: tokio::sync::mpsc::UnboundedReceiver<Zeroizing<Vec<u8>>>,
    room: std::sync::Arc<tokio::sync::Semaphore>,
}

fn permits(len: usize) -> u32 {
    u32::try_from(len.div_ceil(KIB)).unwrap_or(u32::MAX)
}

/// A VM stream's queue of at most `cap` bytes (chunks are at most 1 MiB, a record's).
pub(crate) fn stream_queue(cap: usize) -> (StreamQueueTx, StreamQueueRx) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(cap / KIB));
    (
        StreamQueueTx {
            tx,
            room: room.clone(),
        },
        StreamQueueRx { rx, room },
    )
}

impl StreamQueueTx {
    /// Queues a chunk (≤ 1 MiB, a record's) once there is room; false when the reader is
    /// gone.
    async fn send(&self, chunk: Zeroizing<Vec<u8>>) -> bool {
        match self.room.acquire_many(permits(chunk.len())).await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.tx.send(chunk).is_ok()
    }

    /// [`Self::send`] from a blocking thread (`rt`: the runtime the reader runs on).
    fn blocking_send(&self, rt: &tokio::runtime::Handle, chunk: Zeroizing<Vec<u8>>) -> bool {
        rt.block_on(self.send(chunk))
    }
}

impl StreamQueueRx {
    /// Blocking: the next chunk, or None when the sender is gone.
    pub(crate) fn recv(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        self.rx.blocking_recv()
    }

    /// Frees the room of a chunk of `len` bytes written.
    pub(crate) fn written(&self, len: usize) {
        self.room.add_permits(permits(len) as usize);
    }

    /// The next chunk (its room freed), or None when the sender is gone.
    async fn take(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        let c = self.rx.recv().await?;
        self.written(c.len());
        Some(c)
    }

    /// A chunk already queued (its room freed), if any.
    fn try_take(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        let c = self.rx.try_recv().ok()?;
        self.written(c.len());
        Some(c)
    }
}

impl Drop for StreamQueueRx {
    fn drop(&mut self) {
        // A sender waiting for room learns that nobody reads any more.
        self.room.close();
    }
}

/// Batch of records per request of the workload's description and token (records are
/// never split).
const BATCH: usize = 1 << 20;

/// Largest batch of a VM stream's records per request: the sender takes whatever qemu
/// wrote meanwhile (up to this), so a backlog goes in few requests. The records route
/// accepts [`RECORDS_BODY_LIMIT`].
const VM_BATCH_MAX: usize = 8 << 20;

/// The records route's body limit: a batch plus one record.
pub(crate) const RECORDS_BODY_LIMIT: usize = VM_BATCH_MAX + proto::MAX_RECORD + (64 << 10);

/// A VM's outgoing stream, started (qemu migrating into the queue).
struct OutgoingVm {
    rx: StreamQueueRx,
    reader: tokio::task::JoinHandle<Result<(caas_workload::qmp::MigrationInfo, Instant), String>>,
    /// Bytes qemu wrote so far.
    queued: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl OutgoingVm {
    /// Bytes qemu wrote so far (before the key: what waited here).
    fn queued(&self) -> u64 {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a VM stream's sender waited (VERBOSE timings).
#[derive(Default)]
struct StreamStats {
    wait_qemu_ms: f64,
    wait_target_ms: f64,
    requests: u64,
}

/// The name under which the source's qemu holds the migration pipe.
const VM_FD: &str = "caas-migrate";

impl Agent {
    /// The agents' client for agent-to-agent calls: the deployment CA pinned, this host's
    /// certificate as client identity, the `host` role required of the server.
    fn peer_client(&self) -> Result<caas_attest::client::HttpClient, Error> {
        let ca = self
            .cfg
            .tls
            .client_ca
            .clone()
            .ok_or_else(|| Error::Config("tls.ca is required for migration".into()))?;
        Ok(caas_attest::client::HttpClient::with_tls(
            std::time::Duration::from_secs(120),
            &caas_tls::client::ClientTls {
                ca,
                identity: Some(caas_tls::pki::CertFiles {
                    cert: self.cfg.tls.cert.clone(),
                    key: self.cfg.tls.key.clone(),
                }),
                server_role: Some(caas_tls::Role::Host),
            },
        )?)
    }

    /// Source: live migration of `vm_id` to `call.to` (module doc). Audited
    /// (`MigrateWorkload`) with the refusal code.
    pub async fn migrate_workload(
        &self,
        vm_id: &str,
        call: &MigrateCall,
    ) -> Result<MigrateResult, Error> {
        let r = self.migrate_out(vm_id, call).await;
        self.tl
            .audit("MigrateWorkload", &format!("{vm_id} -> {}", call.to), &r);
        if let Err(e) = &r {
            tracing::warn!(vm = %vm_id, to = %call.to, code = crate::tl::error_code(e), error = %e, "migration refused");
        }
        r
    }

    async fn migrate_out(&self, vm_id: &str, call: &MigrateCall) -> Result<MigrateResult, Error> {
        wire::check_name("vm_id", vm_id)?;
        wire::check_name("host", &call.to)?;
        let busy = || Error::Domain("migration state".into());
        if !self
            .tl
            .migrations
            .outgoing
            .lock()
            .map_err(|_| busy())?
            .insert(vm_id.to_string())
        {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "migration_in_progress",
                "this workload is already being migrated",
            )));
        }
        let r = self.migrate_out_inner(vm_id, call).await;
        if let Ok(mut g) = self.tl.migrations.outgoing.lock() {
            g.remove(vm_id);
        }
        r
    }

    async fn migrate_out_inner(
        &self,
        vm_id: &str,
        call: &MigrateCall,
    ) -> Result<MigrateResult, Error> {
        let received = Instant::now();
        let mut timings = Vec::new();
        let (h2, launch_r, transfer, secrets) = self.tl.migration_source(vm_id).await?;
        let driver = transfer.driver.clone();
        let has_volumes = !transfer.volumes.is_empty();
        // A VM's qemu starts its live migration at once, into a bounded buffer in this
        // agent's memory (`SOURCE_BUFFER_BYTES`): its pre-copy overlaps the TTP's
        // attestation of the target and the key agreement. Nothing of it is sealed or
        // sent before both succeeded; if either fails, qemu's migration is cancelled and
        // the guest runs on here.
        let mut vm_stream = if driver == "qemu" {
            Some(self.start_vm_stream(vm_id).await?)
        } else {
            None
        };
        let agreed = self.agree_session(vm_id, call, launch_r, h2).await;
        let (st, mut sealer, peer, token_context, ttp_ms, key_ms) = match agreed {
            Ok(v) => v,
            Err(e) => {
                if let Some(v) = vm_stream.take() {
                    self.abandon_vm_stream(vm_id, v).await;
                }
                return Err(e);
            }
        };
        let migration_id = hex::encode(&st.migration_id);
        timings.push(("TTP attests the target (statement)".to_string(), ttp_ms));
        timings.push(("session key (target's TPM, X25519)".to_string(), key_ms));
        let base = call.to_url.trim_end_matches('/');
        // 3. The state, in records.
        let t = Instant::now();
        let url = format!("{base}/v1/agent/migrations/{migration_id}/records");
        let first = async {
            let mut batch = sealer.data(
                Channel::Control,
                &proto::control(&Control::Workload(transfer)),
            )?;
            batch.extend_from_slice(&sealer.data(Channel::Domain, secrets.bytes())?);
            drop(secrets);
            for chunk in split_batches(batch) {
                let _: RecordsAck = peer.request("POST", &url, Some(chunk), &[]).await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = first {
            if let Some(v) = vm_stream.take() {
                self.abandon_vm_stream(vm_id, v).await;
            }
            return Err(e);
        }
        timings.push(("crypto-domain state transfer".to_string(), ms(t)));
        // A VM: when qemu completed (the guest stopped a `downtime` before).
        let mut stopped = None;
        if driver == "qemu" {
            let t = Instant::now();
            let vm = vm_stream
                .take()
                .ok_or_else(|| Error::Domain("the VM's stream did not start".into()))?;
            let buffered = vm.queued();
            let (info, completed, stats) = self.send_vm(vm, &mut sealer, &peer, &url).await?;
            timings.push((
                "qemu live migration (encrypted records, after the key)".to_string(),
                ms(t),
            ));
            timings.push((
                "  qemu's stream buffered here before the key (MiB)".to_string(),
                (buffered as f64 / 1048576.0 * 10.0).round() / 10.0,
            ));
            timings.push(("  stream: waited for qemu".to_string(), stats.wait_qemu_ms));
            timings.push((
                "  stream: waited for the target's acks".to_string(),
                stats.wait_target_ms,
            ));
            timings.push(("  stream: requests".to_string(), stats.requests as f64));
            if let Some(d) = info.downtime_ms {
                timings.push((
                    "qemu downtime (source: stop to end of stream)".to_string(),
                    d as f64,
                ));
            }
            stopped = Some((info.downtime_ms.unwrap_or(0) as f64, completed));
        }
        // The token as the workload left it (a VM's guest is stopped now; a process
        // workload is stopped first, its crypto domain staying): exported by its VSM under
        // a fresh transfer key, both sealed into the stream (channel domain), imported by
        // the target's VSM before the workload continues there.
        let t = Instant::now();
        if driver != "qemu" && !self.tl.stop_workload_process(vm_id).await {
            return Err(Error::Domain("the workload process is gone".into()));
        }
        let token = match self.tl.vsm_control(vm_id).await {
            Some(ctl) => crate::token::TokenTransfer::export(ctl, token_context).await,
            None => Err(Error::Domain("the VSM has no control channel".into())),
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                // Nothing committed: a VM's guest goes on here.
                if driver == "qemu" {
                    self.continue_here(vm_id).await;
                }
                return Err(e);
            }
        };
        timings.push(("VSM token exported (workload stopped)".to_string(), ms(t)));
        let token_record = sealer.data(Channel::Domain, token.to_bytes().expose())?;
        drop(token);
        // 4. The source's crypto domain and its keys go (its volume proxies flush and
        // release the volumes); then the target takes over and becomes the single writer
        // (new epochs at the TTP). A VM's volumes are released first, then it is continued
        // on the target first:
        // its qemu here stays stopped (migration completed) until it is destroyed right
        // after, so the guest's downtime does not include the teardown.
        let stop_first = driver != "qemu";
        if !stop_first && has_volumes {
            // The VM is stopped (qemu completed its migration, its disks flushed): the
            // volumes' proxies flush and release them, so the target can open them on the
            // commit (its proxies served qemu's NBD handshake with a deferred open).
            let t = Instant::now();
            self.tl.release_volumes(vm_id).await;
            timings.push(("source volumes flushed and released".to_string(), ms(t)));
        }
        if stop_first {
            let t = Instant::now();
            self.tl.drop_migrated(vm_id).await;
            timings.push((
                "source crypto domain destroyed (guest stopped)".to_string(),
                ms(t),
            ));
        }
        let t = Instant::now();
        let mut last = token_record;
        last.extend_from_slice(&sealer.data(Channel::Control, &proto::control(&Control::Commit))?);
        last.extend_from_slice(&sealer.finish()?);
        let ack = peer
            .request::<RecordsAck>("POST", &url, Some(last), &[])
            .await;
        let handover = ms(t);
        let total = ms(received);
        // The guest's whole downtime: qemu's (its stop to the end of its stream here), then
        // the last records, the token, the commit and the target's resume (its `cont`).
        let downtime = stopped.map(|(d, completed)| d + ms(completed));
        if !stop_first {
            // Whatever the target answered, the source's copy goes: the state has left.
            let t2 = Instant::now();
            self.tl.drop_migrated_soon(vm_id).await;
            timings.push(("source crypto domain destroyed".to_string(), ms(t2)));
        }
        let ack = ack?;
        if !ack.ended {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "stream_truncated",
                "the target did not confirm the end of the stream",
            )));
        }
        timings.push((
            "handover: commit → target resumed the workload".to_string(),
            handover,
        ));
        timings.extend(ack.timings.iter().cloned());
        timings.push((
            "source agent: request received → target resumed the workload".to_string(),
            total,
        ));
        if let Some(d) = downtime {
            timings.push((
                "downtime: guest stopped here → continued on the target".to_string(),
                d,
            ));
        }
        Ok(MigrateResult {
            vm_id: vm_id.to_string(),
            source: self.cfg.name.clone(),
            target: call.to.clone(),
            migration_id,
            bytes: sealer.totals().bytes,
            endpoint: ack.endpoint,
            net: ack.net,
            timings,
        })
    }

    /// Source, steps 1–2: the TTP's statement attesting `call.to` for the workload, then the
    /// session key with the target (its accept carries the key confirmation only its
    /// attested TPM state can compute). The target is contacted only after the statement
    /// verified. Returns the statement, the sealer, the client to the target, the VSM
    /// token's context and the two phases' times (ms).
    async fn agree_session(
        &self,
        vm_id: &str,
        call: &MigrateCall,
        launch_r: Vec<u8>,
        h2: String,
    ) -> Result<
        (
            MigrationStatement,
            StreamSealer,
            caas_attest::client::HttpClient,
            Vec<u8>,
            f64,
            f64,
        ),
        Error,
    > {
        // 1. The TTP attests the target in the workload's profile.
        let t = Instant::now();
        let ttp = self.ttp().await?;
        let req = MigrateRequest {
            source: self.cfg.name.clone(),
            vm_id: vm_id.to_string(),
            launch_r,
            h2,
            target: call.to.clone(),
            r: caas_tl::crypto::random32()?.to_vec(),
            t_ms: caas_attest::now_ms(),
        };
        let resp: Signed = self
            .ttp_request(
                label::MIGRATE_REQUEST,
                "/v1/tl/migrate",
                wire::to_bytes(&req),
            )
            .await?;
        let st = proto::verify_statement(
            &resp,
            &ttp.sign,
            &self.cfg.name,
            &call.to,
            vm_id,
            caas_attest::now_ms(),
        )?;
        if !caas_tl::crypto::ct_eq(&st.r, &req.r) {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "nonce_mismatch",
                "the statement answers another request",
            )));
        }
        let token_context = crate::token::migration_context(vm_id, &req.h2, &st.migration_id);
        let ttp_ms = ms(t);
        // 2. Session key bound to the target's attested bind key. Only now is the target
        // contacted.
        let t = Instant::now();
        let (init, offer) = proto::Initiator::offer(&resp, st.clone())?;
        let peer = self.peer_client()?;
        let base = call.to_url.trim_end_matches('/');
        let accept: MigrateAccept = peer
            .post(&format!("{base}/v1/agent/migrations"), &offer)
            .await?;
        let keys = init.complete(&accept)?;
        let (sealer, _opener) = keys.into_streams(Role::Source)?;
        Ok((st, sealer, peer, token_context, ttp_ms, ms(t)))
    }

    /// Source: a VM whose migration is abandoned before the commit continues here.
    async fn continue_here(&self, vm_id: &str) {
        if let Some(qmp) = self.tl.workload_qmp(vm_id).await {
            let _ = tokio::task::spawn_blocking(move || {
                caas_workload::qmp::Qmp::connect(&qmp, std::time::Duration::from_secs(5))
                    .and_then(|mut q| q.cont())
            })
            .await;
        }
    }

    /// Source: starts qemu's live migration into a pipe it got by QMP `getfd`; a thread
    /// reads the pipe into a queue of at most [`SOURCE_BUFFER_BYTES`] in this agent's
    /// memory (qemu waits on the pipe while the queue is full). Nothing is sealed or sent
    /// here: [`Self::send_vm`] does, once the target is attested and the key agreed.
    async fn start_vm_stream(&self, vm_id: &str) -> Result<OutgoingVm, Error> {
        use caas_workload::qmp::{MigrationUri, Qmp};
        let qmp_path = self
            .tl
            .workload_qmp(vm_id)
            .await
            .ok_or_else(|| Error::Domain("the VM has no QMP socket".into()))?;
        let (tx, rx) = stream_queue(SOURCE_BUFFER_BYTES);
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = queued.clone();
        let rt = tokio::runtime::Handle::current();
        let reader = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let s = |e: &dyn std::fmt::Display| e.to_string();
            let mut q =
                Qmp::connect(&qmp_path, std::time::Duration::from_secs(10)).map_err(|e| s(&e))?;
            let (mut r, w) = std::io::pipe().map_err(|e| s(&e))?;
            q.getfd(VM_FD, std::os::fd::AsFd::as_fd(&w))
                .map_err(|e| s(&e))?;
            drop(w);
            if let Err(e) = q.migrate(&MigrationUri::Fd(VM_FD.into())) {
                let _ = q.execute("closefd", Some(serde_json::json!({ "fdname": VM_FD })));
                return Err(s(&e));
            }
            let mut buf = Zeroizing::new(vec![0u8; 256 << 10]);
            loop {
                let n = match std::io::Read::read(&mut r, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(s(&e)),
                };
                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if !tx.blocking_send(&rt, Zeroizing::new(buf[..n].to_vec())) {
                    // The migration was refused or abandoned: qemu stops migrating, the
                    // guest runs on.
                    drop(r);
                    let _ = q.execute("migrate_cancel", None);
                    return Err("the migration was abandoned".into());
                }
            }
            let info = q
                .wait_migration(
                    std::time::Duration::from_secs(300),
                    std::time::Duration::from_millis(5),
                )
                .map_err(|e| s(&e))?;
            let completed = Instant::now();
            if q.query_status().map_err(|e| s(&e))?.running {
                return Err("the VM runs after its state was sent".into());
            }
            Ok((info, completed))
        });
        Ok(OutgoingVm { rx, reader, queued })
    }

    /// Source: a VM's stream started before the migration was refused (by the TTP, the
    /// target, or the first records): its buffered bytes are dropped unsent, qemu's
    /// migration is cancelled, and the guest continues here (also if qemu completed its
    /// stream into the buffer already).
    async fn abandon_vm_stream(&self, vm_id: &str, vm: OutgoingVm) {
        let OutgoingVm { rx, reader, .. } = vm;
        drop(rx);
        let _ = reader.await;
        self.continue_here(vm_id).await;
    }

    /// Source: qemu's stream (pre-copy while the guest runs, then the stop-and-copy) from
    /// its queue into `vm` records, posted to the target in order, one request in flight
    /// while the next batch is sealed; a batch takes whatever is queued (up to
    /// [`VM_BATCH_MAX`]). If the target refuses a batch, the migration is cancelled and the
    /// guest keeps running here.
    async fn send_vm(
        &self,
        vm: OutgoingVm,
        sealer: &mut StreamSealer,
        peer: &caas_attest::client::HttpClient,
        url: &str,
    ) -> Result<(caas_workload::qmp::MigrationInfo, Instant, StreamStats), Error> {
        let OutgoingVm { mut rx, reader, .. } = vm;
        let mut stats = StreamStats::default();
        type Post = tokio::task::JoinHandle<Result<RecordsAck, Error>>;
        let mut inflight: Option<Post> = None;
        let sent = async {
            loop {
                let t = Instant::now();
                let Some(first) = rx.take().await else { break };
                stats.wait_qemu_ms += ms(t);
                let mut batch = sealer.data(Channel::Vm, &first)?;
                drop(first);
                while batch.len() < VM_BATCH_MAX {
                    let Some(c) = rx.try_take() else { break };
                    batch.extend_from_slice(&sealer.data(Channel::Vm, &c)?);
                }
                if let Some(p) = inflight.take() {
                    let t = Instant::now();
                    let _: RecordsAck = p
                        .await
                        .map_err(|e| Error::Domain(format!("migration task: {e}")))??;
                    stats.wait_target_ms += ms(t);
                }
                // What qemu wrote while the last request was out goes in this one.
                while batch.len() < VM_BATCH_MAX {
                    let Some(c) = rx.try_take() else { break };
                    batch.extend_from_slice(&sealer.data(Channel::Vm, &c)?);
                }
                let (peer, url) = (peer.clone(), url.to_string());
                stats.requests += 1;
                inflight = Some(tokio::spawn(async move {
                    peer.request::<RecordsAck>("POST", &url, Some(batch), &[])
                        .await
                        .map_err(Error::from)
                }));
            }
            if let Some(p) = inflight.take() {
                let t = Instant::now();
                let _: RecordsAck = p
                    .await
                    .map_err(|e| Error::Domain(format!("migration task: {e}")))??;
                stats.wait_target_ms += ms(t);
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = sent {
            if let Some(p) = inflight.take() {
                p.abort();
            }
            drop(rx);
            let _ = reader.await;
            return Err(e);
        }
        let (info, completed) = reader
            .await
            .map_err(|e| Error::Domain(format!("migration task: {e}")))?
            .map_err(|e| Error::Domain(format!("qemu: {e}")))?;
        Ok((info, completed, stats))
    }

    /// Target: an offer from the source agent `peer` (its verified certificate's name).
    /// Audited (`AcceptMigration`).
    pub async fn accept_migration(
        self: &std::sync::Arc<Self>,
        offer: &MigrateOffer,
        peer: Option<&caas_tls::PeerIdentity>,
    ) -> Result<MigrateAccept, Error> {
        let claimed = offer
            .statement
            .peek::<MigrationStatement>(label::MIGRATE_STATEMENT);
        let subject = claimed.as_ref().map_or_else(
            |_| "?".to_string(),
            |s| {
                format!(
                    "{} <- {} ({})",
                    s.vm_id,
                    s.source,
                    hex::encode(&s.migration_id)
                )
            },
        );
        let r = self.accept_inner(offer, peer).await;
        self.tl.audit("AcceptMigration", &subject, &r);
        r
    }

    async fn accept_inner(
        self: &std::sync::Arc<Self>,
        offer: &MigrateOffer,
        peer: Option<&caas_tls::PeerIdentity>,
    ) -> Result<MigrateAccept, Error> {
        let peer = peer
            .filter(|p| p.has(caas_tls::Role::Host))
            .ok_or_else(|| {
                Error::Tl(caas_tl::Error::rejected(
                    "host_mismatch",
                    "a migration comes from a host agent",
                ))
            })?;
        let ttp = self.ttp().await?;
        let claimed: MigrationStatement = offer.statement.peek(label::MIGRATE_STATEMENT)?;
        let now = caas_attest::now_ms();
        let (st, rsa) = proto::check_offer(
            offer,
            &ttp.sign,
            &self.cfg.name,
            &peer.name,
            &claimed.vm_id,
            now,
        )?;
        let id = hex::encode(&st.migration_id);
        let stale: Vec<Incoming> = {
            let mut map = self
                .tl
                .migrations
                .incoming
                .lock()
                .map_err(|_| Error::Domain("migration state".into()))?;
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, m)| m.last.elapsed() > IDLE)
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| map.remove(k)).collect()
        };
        for m in stale {
            tracing::warn!(vm = %m.statement.vm_id, "abandoned migration dropped");
            self.abort_incoming(m).await;
        }
        {
            let mut seen = self
                .tl
                .migrations
                .seen
                .lock()
                .map_err(|_| Error::Domain("migration state".into()))?;
            let path = seen_path(&self.cfg.state_dir);
            if seen.is_none() {
                *seen = Some(load_seen(&path)?);
            }
            let seen = seen
                .as_mut()
                .ok_or_else(|| Error::Domain("migration state".into()))?;
            seen.retain(|_, t| now.saturating_sub(*t) <= 2 * wire::FRESHNESS_MS);
            if seen.insert(id.clone(), now).is_some() {
                return Err(Error::Tl(caas_tl::Error::rejected(
                    "migration_replayed",
                    "this migration was already offered",
                )));
            }
            // Durable before the offer is accepted (fail closed: no record, no accept).
            if let Err(e) = store_seen(&path, seen) {
                seen.remove(&id);
                return Err(e);
            }
        }
        if self.tl.has_workload(&st.vm_id).await {
            return Err(Error::InvalidRequest(format!(
                "workload {} is already running here",
                st.vm_id
            )));
        }
        // The TPM opens the session secret and the new DK_i only in the attested state.
        let key = self.bind_decrypt(rsa).await?;
        let (keys, accept) = proto::accept_offer(offer, &st, &key)?;
        drop(key);
        // DK_i (in the TTP's statement, sealed to the same bind key): the TPM opens it
        // while the accept travels back; a failure refuses the first record that needs it.
        let (dk_rsa, dk_body) = caas_tl::crypto::split_bind_sealed(&st.c_dk)?;
        let (dk_rsa, dk_body) = (dk_rsa.to_vec(), dk_body.to_vec());
        let aad = proto::dk_aad(&self.cfg.name, &st.migration_id);
        let agent = std::sync::Arc::clone(self);
        let dk = Pending::spawn(async move {
            let dk_key = agent.bind_decrypt(&dk_rsa).await?;
            let dk = caas_tl::crypto::open_bind_sealed(&dk_key, &aad, &dk_body)?;
            Ok(Zeroizing::new(dk.expose().to_vec()))
        });
        let (sealer, opener) = keys.into_streams(Role::Target)?;
        let incoming = Incoming {
            statement: st,
            opener,
            _sealer: sealer,
            dk,
            transfer: None,
            secrets: None,
            token: false,
            token_in: None,
            vm: None,
            vm_tx: None,
            committed: false,
            records: 0,
            started: Instant::now(),
            last: Instant::now(),
        };
        self.tl
            .migrations
            .incoming
            .lock()
            .map_err(|_| Error::Domain("migration state".into()))?
            .insert(id, incoming);
        Ok(accept)
    }

    /// Target: a batch of records of migration `id` from `peer`. A record that does not
    /// open (tampered, reordered, replayed, from another migration) ends the migration:
    /// everything received is dropped. After the source's commit and the end record the
    /// workload is resumed here. Audited (`MigrationRecords`) when refused or ended.
    pub async fn migration_records(
        self: &std::sync::Arc<Self>,
        id: &str,
        body: &[u8],
        peer: Option<&caas_tls::PeerIdentity>,
    ) -> Result<RecordsAck, Error> {
        let r = self.records_inner(id, body, peer).await;
        match &r {
            Ok(a) if !a.ended => {}
            _ => self.tl.audit("MigrationRecords", id, &r),
        }
        r
    }

    async fn records_inner(
        self: &std::sync::Arc<Self>,
        id: &str,
        body: &[u8],
        peer: Option<&caas_tls::PeerIdentity>,
    ) -> Result<RecordsAck, Error> {
        // Taken out of the map while its records are processed: a concurrent batch of the
        // same migration finds none (`no_migration`) instead of interleaving.
        let mut m = {
            let mut map = self
                .tl
                .migrations
                .incoming
                .lock()
                .map_err(|_| Error::Domain("migration state".into()))?;
            let Some(m) = map.remove(id) else {
                return Err(Error::Tl(caas_tl::Error::rejected(
                    "no_migration",
                    "no migration in progress with this id (ended, refused or never offered)",
                )));
            };
            if peer.is_none_or(|p| p.name != m.statement.source) {
                map.insert(id.to_string(), m);
                return Err(Error::Tl(caas_tl::Error::rejected(
                    "host_mismatch",
                    "records come from the migration's source",
                )));
            }
            m
        };
        m.last = Instant::now();
        // On any error the migration is over (fail closed): its keys, the state received
        // and a VM waiting for its stream are dropped.
        if let Err(e) = self.open_batch(&mut m, body).await {
            self.abort_incoming(m).await;
            return Err(e);
        }
        if !m.opener.ended() {
            let ack = RecordsAck {
                records: m.records,
                ended: false,
                endpoint: None,
                timings: Vec::new(),
                net: None,
            };
            self.tl
                .migrations
                .incoming
                .lock()
                .map_err(|_| Error::Domain("migration state".into()))?
                .insert(id.to_string(), m);
            return Ok(ack);
        }
        if m.transfer.is_none() || m.secrets.is_none() || !m.committed {
            self.abort_incoming(m).await;
            return Err(Error::Tl(caas_tl::Error::rejected(
                "stream_truncated",
                "the stream ended without the workload's state and the source's commit",
            )));
        }
        drop(m.vm_tx.take());
        let mut timings = Vec::new();
        let endpoint = match m.vm.take() {
            Some(vm) => {
                let vm = vm.wait().await?;
                timings.push((
                    "target: VM ready for its stream (TPM, crypto domain, qemu), since the offer"
                        .to_string(),
                    (vm.ready.saturating_duration_since(m.started).as_secs_f64() * 1e5).round()
                        / 100.0,
                ));
                let t = Instant::now();
                let e = self.finish_incoming(vm).await?;
                timings.push((
                    "target: end record → guest continued (volumes opened ∥ qemu loaded, cont)"
                        .to_string(),
                    ms(t),
                ));
                e
            }
            None => {
                let (Some(t), Some(secrets)) = (&m.transfer, &m.secrets) else {
                    return Err(Error::Domain("migration state".into()));
                };
                let dk = match m.dk.get().await {
                    Ok(dk) => dk.clone(),
                    Err(e) => {
                        self.abort_incoming(m).await;
                        return Err(e);
                    }
                };
                let token = m.token_in.take();
                self.resume_migrated(&m.statement, t, secrets, &dk, token)
                    .await?
                    .workload
                    .endpoint
                    .unwrap_or_default()
            }
        };
        tracing::info!(
            migration = %id,
            vm = %m.statement.vm_id,
            ms = m.started.elapsed().as_millis() as u64,
            "migrated workload resumed"
        );
        timings.push((
            "target: offer → workload resumed".to_string(),
            ms(m.started),
        ));
        let net = self.tl.net_view(&m.statement.vm_id).await;
        Ok(RecordsAck {
            records: m.records,
            ended: true,
            endpoint: Some(endpoint),
            timings,
            net,
        })
    }

    /// Drops a refused migration: a VM prepared for it is stopped with its crypto domain.
    async fn abort_incoming(&self, mut m: Incoming) {
        drop(m.vm_tx.take());
        if let Some(vm) = m.vm.take() {
            // A preparation still running finishes first (a failed one cleaned up after
            // itself), so nothing it starts outlives the migration.
            let _ = vm.wait().await;
            self.tl.drop_migrated(&m.statement.vm_id).await;
        }
    }

    /// Opens a batch of records into `m`; a VM's qemu is started (waiting for its state)
    /// once the workload's description and secrets are in, and gets its stream's bytes as
    /// their records authenticate.
    async fn open_batch(
        self: &std::sync::Arc<Self>,
        m: &mut Incoming,
        mut body: &[u8],
    ) -> Result<(), Error> {
        while !body.is_empty() {
            let (h, ct, rest) = proto::split_record(body)?;
            body = rest;
            let rec = m.opener.open(&h, ct.to_vec())?;
            m.records += 1;
            match rec {
                Record::Data(Channel::Control, b) => match wire::parse("control record", &b)? {
                    Control::Workload(t) if m.transfer.is_none() => {
                        if t.vm_id != m.statement.vm_id || t.h2 != m.statement.h2 {
                            return Err(Error::Tl(caas_tl::Error::rejected(
                                "vm_id_mismatch",
                                "the state is of another workload",
                            )));
                        }
                        m.transfer = Some(t);
                    }
                    Control::Commit
                        if m.transfer.is_some()
                            && m.secrets.is_some()
                            && m.transfer.as_ref().is_some_and(|t| t.driver != "qemu")
                                == m.vm.is_none()
                            && m.token =>
                    {
                        m.committed = true;
                    }
                    _ => {
                        return Err(Error::Tl(caas_tl::Error::rejected(
                            "stream_tampered",
                            "control record out of place",
                        )));
                    }
                },
                Record::Data(Channel::Domain, b) if m.secrets.is_none() && m.transfer.is_some() => {
                    let secrets = DomainSecrets::parse(&b)?;
                    if let Some(t) = m.transfer.as_ref().filter(|t| t.driver == "qemu") {
                        // Prepared in the background: the source goes on with the stream,
                        // whose chunks wait in the queue until qemu reads them.
                        let (tx, rx) = stream_queue(VM_QUEUE_BYTES);
                        let agent = std::sync::Arc::clone(self);
                        let (st, t) = (m.statement.clone(), t.clone());
                        let own = DomainSecrets::new(secrets.tau(), secrets.pk_dm());
                        let mut dk = std::mem::replace(&mut m.dk, Pending::Failed);
                        m.vm = Some(Pending::spawn(async move {
                            let dk = dk.get().await?;
                            agent.prepare_incoming(&st, &t, &own, dk, rx).await
                        }));
                        m.vm_tx = Some(tx);
                    }
                    m.secrets = Some(secrets);
                }
                // A process workload's token (it stopped on the source), imported when it
                // starts here.
                Record::Data(Channel::Domain, b)
                    if m.secrets.is_some() && m.vm.is_none() && !m.token && !m.committed =>
                {
                    m.token_in = Some(crate::token::TokenTransfer::parse(&b)?);
                    m.token = true;
                }
                // A VM's token, after its stream (the guest stopped on the source).
                Record::Data(Channel::Domain, b)
                    if m.secrets.is_some() && m.vm.is_some() && !m.token && !m.committed =>
                {
                    let token = crate::token::TokenTransfer::parse(&b)?;
                    // The stream is complete: its queue closes, and the VM's crypto
                    // domain (its VSM) is ready.
                    drop(m.vm_tx.take());
                    if let Some(vm) = m.vm.as_mut() {
                        vm.get().await?;
                    }
                    let st = &m.statement;
                    let ctl =
                        self.tl.vsm_control(&st.vm_id).await.ok_or_else(|| {
                            Error::Domain("the VSM has no control channel".into())
                        })?;
                    token
                        .import(
                            ctl,
                            crate::token::migration_context(&st.vm_id, &st.h2, &st.migration_id),
                        )
                        .await?;
                    m.token = true;
                }
                Record::Data(Channel::Vm, b) if m.vm.is_some() && !m.token && !m.committed => {
                    let sent = match &m.vm_tx {
                        Some(tx) => tx.send(Zeroizing::new(b)).await,
                        None => false,
                    };
                    if !sent {
                        // The preparation failed (its error) or qemu stopped reading.
                        if let Some(vm) = m.vm.as_mut() {
                            vm.get().await?;
                        }
                        return Err(Error::Domain(
                            "qemu stopped reading its migration stream".into(),
                        ));
                    }
                }
                Record::Data(ch, _) => {
                    return Err(Error::Tl(caas_tl::Error::rejected(
                        "stream_tampered",
                        format!("unexpected record on channel {ch:?}"),
                    )));
                }
                Record::End(_) => {}
            }
        }
        Ok(())
    }
}

/// Where a target keeps the migration ids it accepted.
fn seen_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("migrations").join("seen.json")
}

/// The accepted migration ids (id → when, ms). A missing file is an empty set; an
/// unreadable one refuses every offer (fail closed) until the operator removes it.
fn load_seen(path: &std::path::Path) -> Result<HashMap<String, u64>, Error> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::Domain(format!(
                "the accepted migration ids ({}) are unreadable: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(Error::io(format!("read {}", path.display()))(e)),
    }
}

fn store_seen(path: &std::path::Path, seen: &HashMap<String, u64>) -> Result<(), Error> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(Error::io("create the migrations directory"))?;
    }
    let body =
        serde_json::to_vec(seen).map_err(|e| Error::Domain(format!("migration ids: {e}")))?;
    caas_crypto::fs::write_secret(path, &body, None)
        .map_err(Error::io("store the accepted migration ids"))
}

/// Splits concatenated records into request bodies of at most [`BATCH`] bytes (records
/// are never split).
fn split_batches(all: Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut rest = &all[..];
    while let Ok((h, ct, next)) = proto::split_record(rest) {
        let len = proto::HEADER_LEN + h.ct_len;
        if !cur.is_empty() && cur.len() + len > BATCH {
            out.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(&rest[..len]);
        let _ = ct;
        rest = next;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e5).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted ids survive the agent (what a restarted target reads back), and a file
    /// that does not parse refuses every offer instead of forgetting them.
    #[test]
    fn accepted_migration_ids_persist_and_a_corrupt_file_fails_closed() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let path = seen_path(dir.path());
        assert!(load_seen(&path)?.is_empty());
        let mut seen = HashMap::new();
        seen.insert("ab".repeat(32), 1_700_000_000_000u64);
        store_seen(&path, &seen)?;
        assert_eq!(load_seen(&path)?, seen);
        std::fs::write(&path, b"{not json").map_err(Error::io("write"))?;
        assert!(load_seen(&path).is_err());
        Ok(())
    }
}
