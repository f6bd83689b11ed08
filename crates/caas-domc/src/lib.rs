//! caas-domc: the tenant's crypto domain (DomC, seed 001 §3.1) in its Virtual Security
//! Module mode. It owns the keys: a PKCS#11 token model ([`token`], [`object`]), the
//! mechanisms ([`keys`], [`ops`]), token objects persisted encrypted under the domain key
//! ([`keysource`], [`token`]), per-key usage limits and the policy a workload holding the
//! user PIN cannot bypass ([`policy`]) with its attribute-binding wrap format ([`wrap`]), a
//! hash-chained audit log ([`audit`]),
//! the request dispatcher ([`domain`]), the server ([`server`]: UNIX socket, TCP+TLS, vsock ([`vsock`])), process
//! hardening ([`harden`]), the `caas domc` CLI ([`cli`]) and the `caas dev` hook ([`dev`]).

pub mod audit;
pub mod cli;
pub mod client;
pub mod der;
pub mod dev;
pub mod domain;
mod error;
pub mod harden;
pub mod keys;
pub mod keysource;
pub mod object;
pub mod ops;
pub mod policy;
pub mod pq;
pub mod server;
pub mod token;
pub mod transfer;
pub mod vsock;
pub mod wrap;

pub use error::{Ckr, Error};
