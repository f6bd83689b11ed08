//! The Secure Device Proxy (SDP) of the crypto domain: an NBD server that presents an
//! ordinary disk while everything stored behind it is encrypted and integrity-protected
//! under a key only the crypto domain holds (SYSTEM.md §4.3; seed 001 §3.1 "Secure Device
//! Proxy"). The protocol codec is `caas-nbd`, the volume format `caas-volume`; this crate
//! is the tokio glue: ciphertext stores ([`store`]), the block engine ([`engine`]), the
//! server ([`server`]), the `caas volume` CLI ([`cli`]) and the `caas dev` hook ([`dev`]).
//! [`net`] is the network half: `caas net serve`, a VM's NIC backend that seals every
//! Ethernet frame for the other members of its network domain (`docs/network-sdp.md`).
//!
//! Transports: UNIX socket, TCP, or AF_VSOCK ([`vsock`]; on a host without a vsock
//! transport the port binds but nobody can connect). Optional TLS 1.3 via NBD_OPT_STARTTLS
//! (`--tls-cert/--tls-key [--tls-required]`, rustls with aws-lc-rs), with mutual TLS when
//! `--tls-client-ca` is given; the certificate and key come from files only.
//!
//! Peers: a UNIX-socket client must be the proxy's own uid or a `--peer-uid` (SO_PEERCRED),
//! a vsock client the `--vsock-peer-cid`; refusals are logged with the reason and counted.
//! `caas volume serve` is hardened by the binary before the key arrives (not dumpable,
//! RLIMIT_CORE 0, memory locked: [`cli::Hardening`]) and, with `--run-as`, switches to its
//! crypto domain's identity once the store is open and the key read; `caas net serve`
//! likewise once its sockets are bound, then adds the seccomp filter ([`net::serve::run`]).
//!
//! Volumes are format v2 (`docs/volume-format.md`): per-session keys, an authenticated
//! state sector whose rollback is refused at open ([`engine::OpenOptions::min_epoch`] is the
//! external anchor against whole-volume rollback); v1 volumes are read, and upgraded by
//! `caas volume upgrade` or a writable `serve`.
//!
//! Trust boundary: the ciphertext store (a file, or an upstream NBD export on the storage
//! host) only ever sees ciphertext, metadata and the header; keys live in zeroizing types
//! in this process and never appear in logs, errors, argv or the environment.
pub mod cli;
pub mod dev;
pub mod engine;
mod error;
pub mod net;
pub mod server;
pub mod store;
pub mod vsock;

/// The KMS hook: implement this to supply data keys (re-exported from `caas-volume`).
pub use caas_volume::DataKeyProvider;
pub use engine::{Backend, KeyInput, OpenOptions, ScanReport, Volume};
pub use error::Error;
pub use server::{Listen, Listener, ServerConfig, serve};
pub use store::Store;
