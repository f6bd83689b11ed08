//! caas-workload: workloads started by the host agent after trusted launch (seed 003 §4.3).
//!
//! - [`psk`]: the TLS 1.3 external-PSK channel keyed by the launch token τ.
mod error;
pub mod psk;

pub use error::{Error, Result};
