//! The deployment CA. In production the operator provides its certificate (every caas TLS
//! endpoint pins it) and issues each endpoint's certificate with the holder's role; `caas
//! pki` and `caas dev` use [`DevCa`], a CA generated here (ECDSA P-256, rcgen) whose key is
//! a 0600 file beside its certificate.
//!
//! Files in the CA directory: `ca.pem`, `ca.key` (0600), per issued certificate
//! `<name>.pem` and `<name>.key` (0600), and once a certificate was revoked
//! ([`DevCa::revoke`]) `revoked.txt` (one `SERIAL NAME` line per revocation) and `crl.pem`,
//! the CA-signed certificate revocation list every TLS server of the deployment loads
//! (`caas_tls::server::ServerTls::crl`).

use crate::{Error, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// Common name of a dev CA.
const CA_NAME: &str = "caas deployment CA";

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, 0600).
    pub key: PathBuf,
}

/// A CA that lives in a directory (dev deployments, tests, `caas pki`).
pub struct DevCa {
    dir: PathBuf,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn gen_err(e: impl std::fmt::Display) -> Error {
    Error::Generate(e.to_string())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `contents` to `path` with caas's one secret-file writer (`caas_crypto::fs`:
/// unpredictable temporary name, no symlink followed, 0600, fsynced, atomic). Certificates
/// go the same way: they are public, so an operator may widen their mode to share them.
fn write_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    caas_crypto::fs::write_secret(path, contents, None).map_err(io_err(path))
}

/// A holder name is a file name in the CA directory: `[A-Za-z0-9._-]{1,64}`, not `.`/`..`.
fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 64
        || name.chars().all(|c| c == '.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::Generate(format!(
            "certificate name '{name}' must match [A-Za-z0-9._-]{{1,64}}"
        )));
    }
    Ok(())
}

fn ca_params() -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

impl DevCa {
    /// Loads the CA in `dir`, or creates it (directory 0700, key 0600).
    pub fn load_or_create(dir: &Path) -> Result<Self, Error> {
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if key_path.exists() && cert_path.exists() {
            let pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let key = KeyPair::from_pem(&pem).map_err(gen_err)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                key,
            });
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))?;
        }
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = ca_params()?.self_signed(&key).map_err(gen_err)?;
        write_file(&key_path, key.serialize_pem().as_bytes())?;
        write_file(&cert_path, cert.pem().as_bytes())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate every endpoint pins.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The revocation list [`DevCa::revoke`] writes.
    pub fn crl_file(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Revokes the certificate `<name>.pem` of this CA: records its serial number in
    /// `revoked.txt` and writes `crl.pem` anew (every revoked serial, a CRL number one
    /// higher than the last, valid for a year). Servers load the CRL at start-up.
    pub fn revoke(&self, name: &str) -> Result<PathBuf, Error> {
        use rcgen::{
            CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber,
        };
        use x509_cert::der::Decode as _;
        check_name(name)?;
        let cert_path = self.dir.join(format!("{name}.pem"));
        let der = crate::read_certs(&cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Certificate(format!("{}: empty", cert_path.display())))?;
        let cert = x509_cert::Certificate::from_der(&der)
            .map_err(|e| Error::Certificate(format!("{}: {e}", cert_path.display())))?;
        let serial = cert.tbs_certificate.serial_number.as_bytes().to_vec();
        let serial_hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        let list_path = self.dir.join("revoked.txt");
        let mut list = match std::fs::read_to_string(&list_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&list_path)(e)),
        };
        if !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(serial_hex.as_str()))
        {
            list.push_str(&format!("{serial_hex} {name}\n"));
        }
        let mut revoked = Vec::new();
        for line in list.lines() {
            let hex = line.split_whitespace().next().unwrap_or("");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| {
                    Error::Generate(format!("{}: bad line '{line}'", list_path.display()))
                })?;
            revoked.push(bytes);
        }
        let (y, m, d) = civil_today();
        let today = rcgen::date_time_ymd(y, m, d);
        let params = CertificateRevocationListParams {
            this_update: today,
            next_update: rcgen::date_time_ymd(y + 1, m, d.min(28)),
            crl_number: SerialNumber::from(revoked.len() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .into_iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&s),
                    revocation_time: today,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::new(ca_params()?, &self.key);
        let crl = params.signed_by(&issuer).map_err(gen_err)?;
        write_file(&list_path, list.as_bytes())?;
        let out = self.crl_file();
        write_file(&out, crl.pem().map_err(gen_err)?.as_bytes())?;
        Ok(out)
    }

    /// Issues (or re-issues) `<name>.pem` / `<name>.key` for `name` with `roles`; `hosts`
    /// are the DNS names and IP addresses a server certificate is valid for.
    pub fn issue(&self, name: &str, roles: &[Role], hosts: &[&str]) -> Result<CertFiles, Error> {
        check_name(name)?;
        let mut p = CertificateParams::new(hosts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map_err(gen_err)?;
        for r in roles {
            p.subject_alt_names
                .push(SanType::URI(r.uri().try_into().map_err(gen_err)?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(gen_err)?;
        let issuer = Issuer::new(ca_params()?, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        write_file(&files.key, key.serialize_pem().as_bytes())?;
        write_file(&files.cert, cert.pem().as_bytes())?;
        Ok(files)
    }
}

/// Today's date (UTC) as (year, month, day): a CRL's thisUpdate is its midnight, so never
/// in the future.
fn civil_today() -> (i32, u8, u8) {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issued_certificates_carry_name_and_roles_and_chain_to_the_ca() {
        let d = tempfile::tempdir().unwrap();
        let ca = DevCa::load_or_create(&d.path().join("pki")).unwrap();
        let f = ca
            .issue("ops-1", &[Role::Operator], &["127.0.0.1", "localhost"])
            .unwrap();
        let der = crate::read_certs(&f.cert).unwrap();
        let id = crate::PeerIdentity::from_der(&der[0]).unwrap();
        assert_eq!(id.name, "ops-1");
        assert_eq!(id.roles, vec![Role::Operator]);
        // Reloaded from its files, the CA issues certificates that still chain to ca.pem.
        let again = DevCa::load_or_create(&d.path().join("pki")).unwrap();
        let f2 = again.issue("ks", &[Role::KeyService], &[]).unwrap();
        let roots = crate::read_roots(&again.ca_file()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            crate::provider(),
        )
        .build()
        .unwrap();
        for c in [&f.cert, &f2.cert] {
            let der = crate::read_certs(c).unwrap();
            verifier
                .verify_client_cert(&der[0], &[], rustls::pki_types::UnixTime::now())
                .unwrap();
        }
        assert!(ca.issue("bad name", &[], &[]).is_err());
        assert!(ca.revoke("../ca").is_err());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// A revoked certificate fails client verification with the CA's CRL; the others pass.
    #[test]
    fn revoked_certificates_fail_verification_with_the_crl() {
        let d = tempfile::tempdir().unwrap();
        let ca = DevCa::load_or_create(&d.path().join("pki")).unwrap();
        let good = ca.issue("host-a", &[Role::Host], &[]).unwrap();
        let bad = ca.issue("host-b", &[Role::Host], &[]).unwrap();
        let crl = ca.revoke("host-b").unwrap();
        // Revoking again is idempotent; the list keeps one entry.
        ca.revoke("host-b").unwrap();
        let listed = std::fs::read_to_string(d.path().join("pki/revoked.txt")).unwrap();
        assert_eq!(listed.lines().count(), 1, "{listed}");
        let roots = crate::read_roots(&ca.ca_file()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            crate::provider(),
        )
        .with_crls(crate::read_crls(&crl).unwrap())
        .only_check_end_entity_revocation()
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let der = |f: &CertFiles| crate::read_certs(&f.cert).unwrap().remove(0);
        verifier.verify_client_cert(&der(&good), &[], now).unwrap();
        let e = verifier
            .verify_client_cert(&der(&bad), &[], now)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{e:?}"
        );
    }
}
