//! caas-host: the host agent (the only holder of a compute host's TPM), its configuration,
//! the dev hosts' measured boot step, workload identities, simulated dev hosts for `caas dev`, and the CLI for
//! `caas host ...`, `caas attest HOST` and `caas profile ...`.

pub mod agent;
pub mod audit;
pub mod boot;
pub mod cli;
pub mod config;
pub mod dev;
pub mod error;
pub mod identity;
pub mod migrate;
pub mod net;
pub mod pki;
pub mod recipient;
pub mod tl;
mod token;

pub use error::Error;
