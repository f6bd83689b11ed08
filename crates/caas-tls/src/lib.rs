//! TLS for caas's HTTP links (rustls with the aws-lc-rs provider only).
//!
//! - [`identity`]: a deployment's roles ([`Role`]) as they appear in certificates (a SAN URI
//!   `caas:role:<role>`), and the verified identity of a peer ([`PeerIdentity`]).
//! - [`pki`]: the deployment CA. Production: operator-provided PEM files. `caas dev` and the
//!   tests: [`pki::DevCa`] generates one (rcgen), issues role certificates from it and
//!   revokes them (a CRL every server loads).
//! - [`server`]: the one accept loop for TLS listeners (key service, host agents): each
//!   request carries its connection's [`server::Peer`] (address and, with a client
//!   certificate that chains to the deployment CA, its identity).
//! - [`client`]: client configurations that pin the deployment CA, optionally present a
//!   client certificate, and can require the server's role.
pub mod client;
pub mod identity;
pub mod pki;
pub mod server;

pub use identity::{PeerIdentity, Role, spki_sha256, spki_sha256_of_file};

/// Errors of this crate (messages name files and reasons, never key material).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A certificate could not be parsed or lacks what caas needs.
    #[error("certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The crypto provider every caas TLS endpoint uses: aws-lc-rs, with the hybrid
/// post-quantum key exchange `X25519MLKEM768` (ML-KEM-768 + X25519) preferred, then the
/// classical groups for clients without it (an OpenSSL < 3.5 client gets `X25519`).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ];
    std::sync::Arc::new(p)
}

fn file_err(path: &std::path::Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::File {
        path: path.display().to_string(),
        reason,
    }
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn read_certs(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Error> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path)(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(path)("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn read_key(
    path: &std::path::Path,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, Error> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path)(e.to_string()))
}

/// Reads PEM certificate revocation lists (at least one).
pub fn read_crls(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, Error> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| file_err(path)(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(path)(e.to_string()))?;
    if crls.is_empty() {
        return Err(file_err(path)(
            "no certificate revocation list in the file".into(),
        ));
    }
    Ok(crls)
}

/// A root store holding the deployment CA certificate(s) of `path`.
pub fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .map_err(|e| file_err(path)(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}
