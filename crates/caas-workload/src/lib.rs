//! caas-workload: workloads started by the host agent after trusted launch (seed 003 §4.3).
//!
//! - [`psk`]: the TLS 1.3 external-PSK channel keyed by the launch token τ.
//! - [`spec`]: the workload spec, the injected secrets (τ, pk_DM) and the ready file.
//! - [`vsm`]: signing inside the tenant's crypto domain from the workload.
//! - [`proto`]: the challenge protocol and the DM side ([`challenge`]).
//! - [`workload`]: the process workload ([`run`]) and the guest agent of a VM
//!   ([`Workload::start_guest`]).
//! - [`driver`]: the driver abstraction ([`driver::ProcessDriver`], [`driver::QemuDriver`]).
//! - [`qmp`]: the host agent's client of qemu's machine protocol (stop, cont, migrate).
//! - [`state`]: the saved-state object of an encrypted suspend (chunked AEAD stream).
//! - [`suspend`]: save a VM's state into a saved-state object, restore it into a new qemu.
//! - [`console`]: a VM's serial console read from the host; the demo image's overlay traffic
//!   lines (`caas demo`, the real-VM tests).
//! - [`cli`]: `caas workload run --spec FILE`, `caas workload guest` (inside a VM).
pub mod cli;
pub mod console;
pub mod driver;
mod error;
pub mod proto;
pub mod psk;
pub mod qmp;
pub mod seq;
pub mod spec;
pub mod state;
pub mod suspend;
pub mod vsm;
pub mod workload;

pub use error::{Error, Result};
pub use proto::{WorkloadReport, challenge};
pub use spec::{
    InjectedSecrets, MacAddr, NetSpec, ReadyInfo, TlsCredentials, VsmSpec, WorkloadSpec,
};
pub use workload::{GuestConfig, Workload, run};
