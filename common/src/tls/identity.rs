//! Who a certificate says its holder is.
//!
//! Every Drover certificate carries exactly one SPIFFE-style URI SAN:
//! `spiffe://<trust-domain>/<kind>/<name>` with kind `agent` (name: the host
//! id), `coordinator` (name: the coordinator id), `user` (a person or a
//! CI identity) or `etcd` (the store's server certificate, which is never
//! taken for any of the others). Groups ride in the subject's Organization (O) entries, as
//! Kubernetes does with client certificates. The CA certificate carries
//! `spiffe://<trust-domain>` so both sides learn the domain from it.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// What a certificate may be used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Agent,
    Coordinator,
    User,
    /// A store server (etcd): never a Drover caller or coordinator.
    Etcd,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Coordinator => "coordinator",
            Kind::User => "user",
            Kind::Etcd => "etcd",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "agent" => Some(Kind::Agent),
            "coordinator" => Some(Kind::Coordinator),
            "user" => Some(Kind::User),
            "etcd" => Some(Kind::Etcd),
            _ => None,
        }
    }
}

/// `spiffe://<trust_domain>/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub kind: Kind,
    pub name: String,
}

/// Why a certificate or an id is not a Drover identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("certificate has {0} URI SANs; a Drover identity has exactly one")]
    UriSanCount(usize),
    #[error("{0:?} is not spiffe://<trust-domain>/<agent|coordinator|user>/<name>")]
    BadId(String),
    #[error("name {0:?} must be 1-253 of [A-Za-z0-9._-], starting alphanumeric")]
    BadName(String),
    #[error("trust domain {0:?} must be 1-253 of [a-z0-9.-]")]
    BadTrustDomain(String),
}

/// Checks a trust domain (a DNS-like name, lower case).
pub fn validate_trust_domain(domain: &str) -> Result<(), IdentityError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadTrustDomain(domain.to_string()))
    }
}

/// Checks the name part of an identity (the host id rule, for every kind).
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    crate::ids::validate_host_id(name).map_err(|_| IdentityError::BadName(name.to_string()))
}

impl SpiffeId {
    pub fn new(trust_domain: &str, kind: Kind, name: &str) -> Result<SpiffeId, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name(name)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let bad = || IdentityError::BadId(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let kind = Kind::parse(kind).ok_or_else(bad)?;
        SpiffeId::new(domain, kind, name)
    }

    /// `kind/name`, the short form used in policies and audit lines.
    pub fn short(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.name)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain,
            self.kind.as_str(),
            self.name
        )
    }
}

/// What the TLS layer learned about a peer from its (verified) certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub id: SpiffeId,
    /// Subject Organization entries, each split on commas: the holder's groups.
    pub groups: Vec<String>,
    /// Serial number, lower-case hex without separators (deny lists use it).
    pub serial: String,
    /// Not valid after, seconds since the unix epoch.
    pub not_after: i64,
}

impl PeerCert {
    /// Reads the identity out of a DER certificate. Exactly one URI SAN,
    /// and it must be a Drover SPIFFE id.
    pub fn from_der(der: &[u8]) -> Result<PeerCert, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris = uri_sans(&cert);
        if uris.len() != 1 {
            return Err(IdentityError::UriSanCount(uris.len()));
        }
        let id = SpiffeId::parse(&uris[0])?;
        let groups = cert
            .subject()
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .flat_map(|o| o.split(','))
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        Ok(PeerCert {
            id,
            groups,
            serial: cert.raw_serial_as_string().replace(':', "").to_lowercase(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// The trust domain a CA certificate names in its URI SAN
/// (`spiffe://<domain>`), if it names one.
pub fn ca_trust_domain(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    uri_sans(&cert).into_iter().find_map(|u| {
        let d = u.strip_prefix("spiffe://")?.trim_end_matches('/');
        (!d.contains('/') && validate_trust_domain(d).is_ok()).then(|| d.to_string())
    })
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    out.push(uri.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print() {
        let id = SpiffeId::parse("spiffe://example.org/agent/web-1").unwrap();
        assert_eq!(id.kind, Kind::Agent);
        assert_eq!(id.name, "web-1");
        assert_eq!(id.to_string(), "spiffe://example.org/agent/web-1");
        assert_eq!(id.short(), "agent/web-1");
        for bad in [
            "http://example.org/agent/web-1",
            "spiffe://example.org/agent",
            "spiffe://example.org/robot/x",
            "spiffe://example.org/agent/web-1/x",
            "spiffe://Example.org/agent/web-1",
            "spiffe://example.org/user/al ice",
            "spiffe:///user/alice",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
