//! TLS 1.3 with an external pre-shared key (RFC 8446 §2.2, §4.2.11): the last step of
//! trusted launch (seed 003 §4.3), where the domain manager and the launched workload
//! authenticate each other with the launch token τ as the PSK.
//!
//! Mechanism: OpenSSL's PSK callbacks (`SSL_CTX_set_psk_server_callback` /
//! `SSL_CTX_set_psk_client_callback`), which OpenSSL ≥ 1.1.1 applies to TLS 1.3 with a
//! SHA-256 PSK — hence the single ciphersuite `TLS_AES_128_GCM_SHA256`. The key exchange is
//! `psk_dhe_ke` (ECDHE on top of the PSK, so sessions are forward secret). There is no
//! certificate on either side: the server has none, and the client trusts no CA, so a
//! server that falls back to a certificate handshake (it does not know the identity or
//! the PSK) is rejected, as is one that answers without using the PSK. Session tickets
//! are off: every connection proves possession of τ afresh.
//!
//! The PSK is held in a [`SecretBytes`] inside the callback closure (zeroized when the
//! context is dropped); OpenSSL cleanses its own copy. It never appears in a log line or an
//! error message.
use crate::error::{Error, Result};
use caas_crypto::SecretBytes;
use openssl::ssl::{
    HandshakeError, Ssl, SslAcceptor, SslContext, SslContextBuilder, SslMethod, SslOptions,
    SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use std::io::{Read, Write};
use std::net::TcpStream;

/// The only ciphersuite: its hash (SHA-256) is the hash OpenSSL's PSK callbacks bind the
/// external PSK to.
pub const CIPHERSUITE: &str = "TLS_AES_128_GCM_SHA256";
/// Shortest accepted PSK (τ is 32 bytes).
pub const MIN_PSK_LEN: usize = 16;
/// Longest accepted PSK (OpenSSL's `PSK_MAX_PSK_LEN` is 512; τ is 32 bytes).
pub const MAX_PSK_LEN: usize = 256;
/// Longest accepted identity (OpenSSL's `PSK_MAX_IDENTITY_LEN` is 256).
pub const MAX_IDENTITY_LEN: usize = 128;

fn check_params(identity: &str, psk: &SecretBytes) -> Result<()> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN || identity.contains('\0') {
        return Err(Error::Config(format!(
            "PSK identity must be 1..={MAX_IDENTITY_LEN} bytes without NUL"
        )));
    }
    if !(MIN_PSK_LEN..=MAX_PSK_LEN).contains(&psk.len()) {
        return Err(Error::Config(format!(
            "PSK must be {MIN_PSK_LEN}..={MAX_PSK_LEN} bytes, got {}",
            psk.len()
        )));
    }
    Ok(())
}

fn tls13_only(b: &mut SslContextBuilder) -> Result<()> {
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(CIPHERSUITE)?;
    b.set_options(SslOptions::NO_TICKET);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    Ok(())
}

/// A TLS 1.3 server context that accepts exactly one external PSK: `identity` with `psk`.
/// There is no certificate, so a client offering another identity (or none) cannot
/// complete a handshake, and a client with another PSK fails the binder check.
pub fn server_acceptor(identity: &str, psk: &SecretBytes) -> Result<SslAcceptor> {
    check_params(identity, psk)?;
    let mut b = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())?;
    tls13_only(&mut b)?;
    b.set_num_tickets(0)?;
    let expected = identity.as_bytes().to_vec();
    let key = psk.clone();
    b.set_psk_server_callback(move |_ssl, offered, out| {
        // Another identity: no PSK (0), and with no certificate the handshake fails.
        if offered != Some(expected.as_slice()) || out.len() < key.len() {
            return Ok(0);
        }
        out[..key.len()].copy_from_slice(key.expose());
        Ok(key.len())
    });
    Ok(b.build())
}

fn client_context(identity: &str, psk: &SecretBytes) -> Result<SslContext> {
    check_params(identity, psk)?;
    let mut b = SslContext::builder(SslMethod::tls_client())?;
    tls13_only(&mut b)?;
    // No trust anchors: a server that presents a certificate instead of using the PSK is
    // rejected.
    b.set_verify(SslVerifyMode::PEER);
    b.set_cert_store(X509StoreBuilder::new()?.build());
    let id = identity.as_bytes().to_vec();
    let key = psk.clone();
    b.set_psk_client_callback(move |_ssl, _hint, id_out, psk_out| {
        // The identity is written as a C string.
        if id_out.len() <= id.len() || psk_out.len() < key.len() {
            return Ok(0);
        }
        id_out[..id.len()].copy_from_slice(&id);
        id_out[id.len()] = 0;
        psk_out[..key.len()].copy_from_slice(key.expose());
        Ok(key.len())
    });
    Ok(b.build())
}

fn handshake_error<S>(e: HandshakeError<S>) -> Error {
    match e {
        HandshakeError::SetupFailure(s) => Error::TlsConfig(s),
        HandshakeError::Failure(m) | HandshakeError::WouldBlock(m) => {
            Error::Handshake(m.error().to_string())
        }
    }
}

/// Fails unless the handshake really used the external PSK (TLS 1.3, PSK accepted).
fn require_psk<S>(s: &SslStream<S>) -> Result<()> {
    let ssl = s.ssl();
    if ssl.version2() != Some(SslVersion::TLS1_3) || !ssl.session_reused() {
        return Err(Error::Handshake(
            "the peer did not authenticate with the pre-shared key".into(),
        ));
    }
    Ok(())
}

/// Connects as the TLS 1.3 PSK client over an established TCP stream. Fails when the
/// server does not know `identity` or holds another PSK.
pub fn connect(
    stream: TcpStream,
    identity: &str,
    psk: &SecretBytes,
) -> Result<SslStream<TcpStream>> {
    connect_stream(stream, identity, psk)
}

/// [`connect`] over any byte stream.
pub fn connect_stream<S: Read + Write>(
    stream: S,
    identity: &str,
    psk: &SecretBytes,
) -> Result<SslStream<S>> {
    let ctx = client_context(identity, psk)?;
    let ssl = Ssl::new(&ctx)?;
    let s = ssl.connect(stream).map_err(handshake_error)?;
    require_psk(&s)?;
    Ok(s)
}

/// Runs the server side of the handshake with an acceptor from [`server_acceptor`].
pub fn accept<S: Read + Write>(acceptor: &SslAcceptor, stream: S) -> Result<SslStream<S>> {
    let s = acceptor.accept(stream).map_err(handshake_error)?;
    require_psk(&s)?;
    Ok(s)
}
