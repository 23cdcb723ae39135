//! Certificate checks beyond the chain: the one-URI-SAN identity rule, the
//! trust domain, the kinds a side accepts, and the deny list.
//!
//! Rules (both sides):
//! 1. The chain, key usage and validity period are checked by webpki
//!    against the configured CA (expired and wrong-CA certificates stop here).
//! 2. The end-entity certificate must carry exactly one Drover SPIFFE id
//!    ([`PeerCert::from_der`]) in the CA's trust domain, when the CA names one.
//! 3. Its serial number and its id must not be on the deny list.
//! 4. A client (agent, droverctl) accepts only `coordinator` certificates as
//!    servers; the DNS name it dialled is not used (the id is the identity).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use super::identity::{Kind, PeerCert};

/// Certificates refused even though they chain to the CA: one entry per
/// line, a serial number in hex (`serial:0a1b…` or bare hex) or a SPIFFE id;
/// `#` starts a comment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DenyList {
    serials: HashSet<String>,
    ids: HashSet<String>,
}

impl DenyList {
    pub fn parse(text: &str) -> Result<DenyList, String> {
        let mut out = DenyList::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with("spiffe://") {
                super::identity::SpiffeId::parse(line)
                    .map_err(|e| format!("line {}: {e}", n + 1))?;
                out.ids.insert(line.to_string());
                continue;
            }
            let hex = line
                .strip_prefix("serial:")
                .unwrap_or(line)
                .replace(':', "")
                .to_lowercase();
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "line {}: {line:?} is neither a serial number in hex nor a spiffe:// id",
                    n + 1
                ));
            }
            out.serials.insert(hex.trim_start_matches('0').to_string());
        }
        Ok(out)
    }

    /// Why `cert` is denied, if it is.
    pub fn denies(&self, cert: &PeerCert) -> Option<String> {
        if self.serials.contains(cert.serial.trim_start_matches('0')) {
            return Some(format!(
                "certificate serial {} of {} is on the deny list",
                cert.serial, cert.id
            ));
        }
        if self.ids.contains(&cert.id.to_string()) {
            return Some(format!("{} is on the deny list", cert.id));
        }
        None
    }

    pub fn len(&self) -> usize {
        self.serials.len() + self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A refusal reason rustls carries to the handshake error (and our log).
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Refused(reason),
    ))))
}

/// Rules 2 and 3 for any peer certificate.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    trust_domain: Option<&str>,
    deny: &DenyList,
) -> Result<PeerCert, rustls::Error> {
    let cert = PeerCert::from_der(end_entity).map_err(|e| refuse(e.to_string()))?;
    if let Some(domain) = trust_domain
        && cert.id.trust_domain != domain
    {
        return Err(refuse(format!(
            "{} is outside trust domain {domain}",
            cert.id
        )));
    }
    if let Some(why) = deny.denies(&cert) {
        return Err(refuse(why));
    }
    Ok(cert)
}

/// The server side: webpki's client verifier (rule 1) plus rules 2 and 3.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) trust_domain: Option<String>,
    pub(super) deny: DenyList,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, self.trust_domain.as_deref(), &self.deny)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client side: the server must be a coordinator of our CA (rules 1–4),
/// or, for an agent dialing a peer's chunk service, another agent of it.
#[derive(Debug)]
pub struct CoordinatorVerifier {
    pub(super) roots: Arc<RootCertStore>,
    pub(super) trust_domain: Option<String>,
    pub(super) deny: DenyList,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
    /// Agents' certificates are accepted too (peers, issue 15).
    pub(super) accept_agents: bool,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let cert = check_identity(end_entity, self.trust_domain.as_deref(), &self.deny)?;
        if cert.id.kind != Kind::Coordinator && !(self.accept_agents && cert.id.kind == Kind::Agent)
        {
            return Err(refuse(format!(
                "the server presented {}, not a coordinator certificate",
                cert.id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_parses_serials_and_ids() {
        let deny = DenyList::parse(
            "# revoked\nserial:0A:1b\n  00ff  # padded\nspiffe://example.org/agent/web-9\n",
        )
        .unwrap();
        assert_eq!(deny.len(), 3);
        let mut cert = PeerCert {
            id: super::super::identity::SpiffeId::parse("spiffe://example.org/agent/web-1")
                .unwrap(),
            groups: vec![],
            serial: "0a1b".into(),
            not_after: 0,
        };
        assert!(deny.denies(&cert).unwrap().contains("serial 0a1b"));
        cert.serial = "ff".into();
        assert!(deny.denies(&cert).is_some());
        cert.serial = "01".into();
        assert!(deny.denies(&cert).is_none());
        cert.id =
            super::super::identity::SpiffeId::parse("spiffe://example.org/agent/web-9").unwrap();
        assert!(deny.denies(&cert).unwrap().contains("deny list"));
        assert!(DenyList::parse("not-hex!\n").is_err());
        assert!(DenyList::parse("spiffe://x/robot/y\n").is_err());
    }
}
