//! libcaas_pkcs11.so: the PKCS#11 module (v2.40 through `C_GetFunctionList`; 3.0 and 3.2
//! function lists through `C_GetInterfaceList`/`C_GetInterface`, the 3.2 one the default) a workload loads to use keys that live in its tenant's crypto domain. It
//! forwards every call over the VSM wire protocol ([`caas_vsm_proto`]) and holds no key
//! material. Configuration: `CAAS_PKCS11_SOCKET` (a UNIX socket path, `vsock:CID:PORT`
//! or, inside a VM, `virtio:/dev/virtio-ports/caas.vsm`),
//! or a TOML file named by `CAAS_PKCS11_CONFIG` (`socket`, `vsock`, `virtio` or `tcp` + TLS settings,
//! optional `timeout_secs`; see `caas-pkcs11.toml.example`). Single-part operations cost one
//! round trip to the crypto domain (see `ops`); on the UNIX socket the threads of a process
//! share pipelined connections for them (see `mux`; `CAAS_PKCS11_PIPES`, 1 to 8, default
//! the number of CPUs, sets how many), carried by a shared-memory ring per connection when
//! the domain offers one (`CAAS_PKCS11_RING=0` keeps them on the socket). The key policy (usage limits, usage roles,
//! wrap/unwrap rules, `CKA_TRUSTED`) is enforced in the crypto domain (`caas_domc::policy`)
//! and nothing in the module can relax it; vendor mechanisms without a parameter, such as
//! the domain's `CKM_CAAS_AES_KEY_WRAP_ATTRS`, pass through unchanged. The mechanisms served,
//! per flag and key size, are listed in `caas_domc::ops` (the table `C_GetMechanismInfo`
//! answers from). `C_SeedRandom` answers CKR_RANDOM_SEED_NOT_SUPPORTED (as SoftHSM2: the
//! domain's generator is not the workload's to steer); `C_WaitForSlotEvent` answers
//! CKR_NO_EVENT with CKF_DONT_BLOCK (the one slot's token is never removed) and
//! CKR_FUNCTION_NOT_SUPPORTED for the blocking form. Every object has a token-set,
//! read-only `CKA_UNIQUE_ID` (PKCS#11 3.0).
//!
//! PKCS#11 3.0/3.2 functions: `C_LoginUser` (the token has one user per type, so the user
//! name is ignored and the PIN decides, as in `C_Login`), `C_SessionCancel` (ends the named
//! operations, in the module and in the domain), and `C_EncapsulateKey`/`C_DecapsulateKey`
//! (3.2, `CKM_ML_KEM`; the shared secret stays in the domain as a new key) and
//! `C_VerifySignature*` (3.2; on the session's verification, so a session has one
//! verification at a time by `C_Verify*` or `C_VerifySignature*`), message-based AES-GCM
//! (3.0: `C_MessageEncryptInit`, `C_EncryptMessage`/`C_DecryptMessage` and
//! `C_*MessageBegin`/`Next` with `CK_GCM_MESSAGE_PARAMS`, the IV generated in the domain or
//! given; `caas_domc`'s `domain::message`). Message-based signing (3.0), async and
//! authenticated wrapping (3.2) are listed and answer CKR_FUNCTION_NOT_SUPPORTED. The 3.2 identifiers `cryptoki-sys`
//! lacks are in `caas_vsm_proto::v32`, cited from the OASIS headers. The interfaces do not
//! claim `CKF_INTERFACE_FORK_SAFE`: a forked child calls `C_Initialize` again (a child is
//! told from its parent by a `pthread_atfork` handler bumping a fork generation, so the
//! entry points pay no `getpid` per call; see `Client::owned_by_this_process`).
//!
//! All `unsafe` code is confined to the `ffi` module (the C ABI surface); every exported
//! function catches panics and returns CKR_GENERAL_ERROR instead of unwinding into C.

#![deny(unsafe_code)]

pub mod client;
mod error;
#[allow(unsafe_code)]
mod ffi;
mod mux;
mod ops;

pub use error::Error;
pub use ffi::C_GetFunctionList;
