//! Client configurations: the deployment CA pinned (no system roots), optionally a client
//! certificate, and optionally a required role of the server (a host agent's client requires
//! `key-service`; the key service's client to agents requires `host`), so that another
//! endpoint of the same deployment cannot pose as the one the client means to reach.

use crate::{Error, PeerIdentity, Role};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::PathBuf;
use std::sync::Arc;

/// The connector [`ClientTls::connector`] returns.
pub type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// What a client pins and presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The deployment CA (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key (PEM), if the client authenticates.
    pub identity: Option<crate::pki::CertFiles>,
    /// The role the server's certificate must carry, if any.
    pub server_role: Option<Role>,
}

#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    role: Role,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match PeerIdentity::from_der(end_entity) {
            Ok(id) if id.has(self.role) => Ok(ok),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ClientTls {
    /// The rustls client configuration.
    pub fn config(&self) -> Result<rustls::ClientConfig, Error> {
        let roots = Arc::new(crate::read_roots(&self.ca)?);
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, crate::provider())
                .build()
                .map_err(|e| Error::Config(format!("CA {}: {e}", self.ca.display())))?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(e.to_string()))?;
        let builder = match self.server_role {
            None => builder.with_webpki_verifier(webpki),
            Some(role) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RoleVerifier {
                    inner: webpki,
                    role,
                })),
        };
        // No ALPN here: the hyper-rustls connector sets it (and refuses a preset one).
        let cfg = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(f) => builder
                .with_client_auth_cert(crate::read_certs(&f.cert)?, crate::read_key(&f.key)?)
                .map_err(|e| Error::Config(format!("{}: {e}", f.cert.display())))?,
        };
        Ok(cfg)
    }

    /// A hyper-util connector for `https://` URLs with this configuration (`http://` URLs
    /// are refused by the connector: a client that pins a CA never talks in the clear).
    pub fn connector(&self) -> Result<HttpsConnector, Error> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.config()?)
            .https_only()
            .enable_http1()
            .wrap_connector(http))
    }
}
