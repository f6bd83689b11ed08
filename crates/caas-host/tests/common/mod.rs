//! Shared harness for the end-to-end tests: an in-process key service (registrar +
//! verifier router over the in-memory store) on a free port, and dev hosts with swtpm.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use caas_attest::client::AgentClient;
use caas_attest::ekcert::EkCaStore;
use caas_attest::registrar::Registrar;
use caas_attest::service::{AttestState, TrustHook, router};
use caas_attest::store::{MemoryStore, put_profile};
use caas_attest::verifier::Verifier;
use caas_host::dev::DevHosts;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub type State = AttestState<MemoryStore, AgentClient>;

pub struct Ks {
    pub url: String,
    pub state: Arc<State>,
    pub store: Arc<MemoryStore>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Ks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub hosts: DevHosts,
    pub ks: Ks,
}

/// Prepares `n` dev hosts and a key service trusting their CA (or `other_ca` files) with the
/// dev profile as default; agents are not started.
pub async fn env(
    n: usize,
    nonce_ttl_ms: u64,
    other_ca: Option<Vec<PathBuf>>,
    hook: Option<TrustHook>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hosts = DevHosts::prepare(dir.path(), n, &url, Default::default())
        .await
        .unwrap();
    let mut ca = EkCaStore::new();
    for f in other_ca.unwrap_or_else(|| hosts.ca_cert_files()) {
        ca.add(&std::fs::read(f).unwrap()).unwrap();
    }
    let store = Arc::new(MemoryStore::new());
    put_profile(
        &*store,
        &hosts.profile("dev").unwrap(),
        "test",
        "CreateProfile",
    )
    .await
    .unwrap();
    let state = Arc::new(AttestState {
        registrar: Registrar {
            ca,
            enrollment_ttl_ms: 60_000,
            default_profile: Some("dev".into()),
        },
        verifier: Verifier::new(store.clone(), nonce_ttl_ms),
        source: hosts.agent_client().unwrap(),
        on_trust_change: hook,
    });
    let app = router(state.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Env {
        dir,
        hosts,
        ks: Ks {
            url,
            state,
            store,
            task,
        },
    }
}

/// Runs a tpm2-tools command against `tcti`; panics with an install hint if missing.
pub fn tpm2(tcti: &str, tool: &str, args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    let out = caas_tpm::swtpm::command_without_inherited_fds(tool)
        .args(args)
        .env("TPM2TOOLS_TCTI", tcti)
        .env("TSS2_LOG", "all+none")
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} not runnable ({e}): install the Debian package tpm2-tools")
        });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn codes(v: &caas_attest::Verdict) -> Vec<String> {
    let mut c: Vec<String> = v
        .reasons
        .iter()
        .map(|r| {
            serde_json::to_value(r).unwrap()["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    c.dedup();
    c
}

pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
