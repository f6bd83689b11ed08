//! Mutual TLS bound to one launch. When a workload asks for network transports, the agent
//! makes a CA for that launch alone (P-256, in memory; its private key signs two
//! certificates and is dropped, never written), a server certificate for the launch's
//! crypto domain (`localhost`, `127.0.0.1`) and a client certificate for its workload. The
//! crypto domain's TLS listeners (the disk's Secure Device Proxy over NBD STARTTLS, the VSM
//! over TCP) trust only this CA for clients, and the client key is handed only to the
//! workload (its 0600 read-once inject file). A client certificate of another launch, of
//! the operator's CA, or none at all fails the handshake; the refusal is audited by the
//! VSM and logged by the proxy.

use crate::error::Error;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use zeroize::Zeroizing;

/// The credentials of one launch (PEM).
pub struct LaunchPki {
    /// The launch's CA certificate: clients and the server check each other against it.
    pub ca_pem: String,
    /// The crypto domain's server certificate.
    pub server_cert_pem: String,
    /// Its private key (handed to the crypto-domain processes only).
    pub server_key_pem: Zeroizing<String>,
    /// The workload's client certificate.
    pub client_cert_pem: String,
    /// Its private key (handed to the workload only).
    pub client_key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for LaunchPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchPki").finish_non_exhaustive()
    }
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::Domain(format!("launch certificates: {e}"))
}

impl LaunchPki {
    /// Fresh credentials for the launch of `vm_id` (the name only labels the certificates).
    ///
    /// # Errors
    /// [`Error::Domain`] when key generation or signing fails.
    pub fn generate(vm_id: &str) -> Result<Self, Error> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, format!("caas launch CA {vm_id}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(pki_err)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |sans: Vec<String>, cn: String, eku: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
            let mut p = CertificateParams::new(sans).map_err(pki_err)?;
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &issuer).map_err(pki_err)?;
            Ok::<_, Error>((cert.pem(), Zeroizing::new(key.serialize_pem())))
        };
        let (server_cert_pem, server_key_pem) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            format!("caas crypto domain {vm_id}"),
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert_pem, client_key_pem) = leaf(
            Vec::new(),
            format!("caas workload {vm_id}"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        })
    }
}
