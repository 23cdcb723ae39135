//! The built-in certificate authority, in the manner of `nomad tls ca
//! create` / `consul tls cert create`: a CA key and certificate in a
//! directory, and certificates issued from it with one SPIFFE id each.
//!
//! Files: `<ca-dir>/ca.pem` (distribute it) and `<ca-dir>/ca-key.pem`
//! (mode 0600, keep it offline). Issued: `<out>/<kind>-<name>.pem` and
//! `<out>/<kind>-<name>-key.pem` (0600). Keys are ECDSA P-256. rcgen does
//! the X.509 work (chosen over hand-written DER: it is the rustls project's
//! own generator).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use super::identity::{IdentityError, Kind, SpiffeId, validate_trust_domain};

/// Default lifetime of an issued certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default lifetime of the CA certificate.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0} exists; refusing to overwrite a CA (move it away first)")]
    Exists(PathBuf),
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What `ca issue` is asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub kind: Kind,
    pub name: String,
    /// Groups (subject O entries); `--role R` adds group R.
    pub groups: Vec<String>,
    /// Extra DNS and IP SANs (for coordinators that grpcurl or etcd clients
    /// dial by name; Drover's own clients check the SPIFFE id).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Valid from (default: now, less a minute of clock skew).
    pub not_before: Option<SystemTime>,
    pub lifetime: Duration,
}

/// An issued certificate in PEM, with its identity and serial.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    pub serial: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn file_err(path: &Path, e: impl ToString) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn to_time(t: SystemTime) -> OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> rcgen::SerialNumber {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 16];
    default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("system random");
    bytes[0] &= 0x7f; // positive
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Writes `text` to `path`, creating it (never replacing) with `mode`.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CaError::Exists(path.to_path_buf())
            } else {
                file_err(path, e)
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| file_err(path, e))
}

/// Writes a file, replacing any previous one atomically (issued
/// certificates are rotated by re-issuing into the same place).
pub fn write_replacing(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, text, mode)?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

/// Creates a CA in `dir` for `trust_domain`. Refuses to overwrite one.
pub fn init(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<PathBuf, CaError> {
    validate_trust_domain(trust_domain)?;
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Drover CA {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Invalid(e.to_string()))?,
    )];
    let now = SystemTime::now();
    params.not_before = to_time(now - Duration::from_secs(60));
    params.not_after = to_time(now + lifetime);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(CaError::Exists(cert_path));
    }
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate from the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, req: &IssueRequest) -> Result<Issued, CaError> {
    let (issuer, domain) = load(ca_dir)?;
    issue_with(&issuer, &domain, req)
}

/// Issues from a loaded CA (drover-fleetsim issues thousands at once).
pub fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    trust_domain: &str,
    req: &IssueRequest,
) -> Result<Issued, CaError> {
    let id = SpiffeId::new(trust_domain, req.kind, &req.name)?;
    for g in &req.groups {
        super::identity::validate_name(g)
            .map_err(|_| CaError::Invalid(format!("group {g:?}: 1-253 of [A-Za-z0-9._-]")))?;
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, id.short());
    if !req.groups.is_empty() {
        // rcgen keeps one entry per attribute type: the groups share one O
        // entry, comma-separated (several O entries read the same way).
        params
            .distinguished_name
            .push(DnType::OrganizationName, req.groups.join(","));
    }
    let mut sans =
        vec![SanType::URI(id.to_string().try_into().map_err(
            |e: rcgen::Error| CaError::Invalid(e.to_string()),
        )?)];
    for d in &req.dns {
        sans.push(SanType::DnsName(d.clone().try_into().map_err(|_| {
            CaError::Invalid(format!("{d:?} is not a DNS name"))
        })?));
    }
    sans.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let from = req
        .not_before
        .unwrap_or_else(|| SystemTime::now() - Duration::from_secs(60));
    params.not_before = to_time(from);
    params.not_after = to_time(from + req.lifetime);
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Issued {
        id,
        serial: hex::encode(serial.to_bytes()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Loads the CA in `dir` for repeated issuing.
pub fn load(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let ca_pem = std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, e))?;
    let ca_key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| file_err(&key_path, e))?;
    let der = rustls::pki_types::CertificateDer::from(
        pem_block(&ca_pem).ok_or_else(|| file_err(&cert_path, "no CERTIFICATE block"))?,
    );
    let domain = super::identity::ca_trust_domain(&der).ok_or_else(|| {
        file_err(
            &cert_path,
            "the CA certificate names no trust domain (spiffe://<domain> URI SAN)",
        )
    })?;
    Ok((Issuer::from_ca_cert_der(&der, ca_key)?, domain))
}

/// Writes an issued certificate to `<out>/<kind>-<name>.pem` and its key
/// beside it; returns the two paths.
pub fn write_issued(out: &Path, issued: &Issued) -> Result<(PathBuf, PathBuf), CaError> {
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let stem = format!("{}-{}", issued.id.kind.as_str(), issued.id.name);
    let cert = out.join(format!("{stem}.pem"));
    let key = out.join(format!("{stem}-key.pem"));
    write_replacing(&key, &issued.key_pem, 0o600)?;
    write_replacing(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
}

fn pem_block(text: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(text.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::PeerCert;

    #[test]
    fn issued_certificates_carry_one_spiffe_id_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "example.org", DEFAULT_CA_LIFETIME).unwrap();
        assert!(matches!(
            init(dir.path(), "example.org", DEFAULT_CA_LIFETIME),
            Err(CaError::Exists(_))
        ));
        let issued = issue(
            dir.path(),
            &IssueRequest {
                kind: Kind::User,
                name: "alice".into(),
                groups: vec!["sre".into(), "deployer".into()],
                dns: vec![],
                ips: vec![],
                not_before: None,
                lifetime: DEFAULT_CERT_LIFETIME,
            },
        )
        .unwrap();
        let (cert, _key) = write_issued(dir.path(), &issued).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
        let peer = PeerCert::from_der(&der).unwrap();
        assert_eq!(peer.id.to_string(), "spiffe://example.org/user/alice");
        assert_eq!(peer.groups, vec!["sre".to_string(), "deployer".to_string()]);
        assert_eq!(
            peer.serial.trim_start_matches('0'),
            issued.serial.trim_start_matches('0')
        );
        let key_mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.mode() & 0o777, 0o600);
    }
}
