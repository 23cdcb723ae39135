//! Who is calling, and may they. Every RPC handler asks [`Authorizer`]
//! before it acts.
//!
//! - The caller's identity comes from its verified certificate
//!   ([`drover_common::tls::server::PeerInfo`]), never from a field it sends.
//!   A request forwarded by another coordinator carries its original
//!   caller in [`CALLER_HEADER`], believed only from a coordinator
//!   certificate.
//! - With TLS off (loopback development, or `--insecure`) there is no
//!   identity and so no authorization: every caller is [`Caller::Anonymous`]
//!   and allowed everything. The coordinator refuses to listen beyond
//!   loopback that way unless told `--insecure`.
//! - The policy ([`policy`]) is reloaded on SIGHUP; a file that does not
//!   parse leaves the policy in force, logged and counted.

pub mod policy;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use drover_common::tls::identity::{Kind, SpiffeId};
use drover_common::tls::server::PeerInfo;
use tonic::Request;

pub use policy::{Permission, Policy, Scope, Subject};

use crate::error::ApiError;

/// Metadata carrying the original caller of a forwarded request:
/// `spiffe://…/user/alice;groups=sre,deployer`.
pub const CALLER_HEADER: &str = "x-drover-caller";

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext listener: nobody is authenticated.
    Anonymous,
    Subject(Subject),
}

impl Caller {
    /// The identity recorded in the audit: `user/alice`, or `anonymous`.
    pub fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::Subject(s) => s.id.short(),
        }
    }

    pub fn kind(&self) -> Option<Kind> {
        match self {
            Caller::Anonymous => None,
            Caller::Subject(s) => Some(s.id.kind),
        }
    }

    /// The [`CALLER_HEADER`] value for forwarding this caller.
    pub fn header(&self) -> Option<String> {
        match self {
            Caller::Anonymous => None,
            Caller::Subject(s) => Some(format!("{};groups={}", s.id, s.groups.join(","))),
        }
    }
}

fn parse_header(value: &str) -> Result<Subject, String> {
    let (id, groups) = value.split_once(";groups=").unwrap_or((value, ""));
    let id = SpiffeId::parse(id).map_err(|e| e.to_string())?;
    let groups = groups
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Subject { id, groups })
}

/// Reads the caller of `request` (see the module doc).
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, ApiError> {
    let cert = request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.cert.clone());
    let forwarded = request.metadata().get(CALLER_HEADER);
    let Some(cert) = cert else {
        return Ok(Caller::Anonymous);
    };
    let direct = Subject {
        id: cert.id.clone(),
        groups: cert.groups.clone(),
    };
    match forwarded {
        None => Ok(Caller::Subject(direct)),
        Some(_) if cert.id.kind != Kind::Coordinator => Err(ApiError::PermissionDenied(format!(
            "{} may not forward requests on behalf of others (only coordinators do)",
            cert.id.short()
        ))),
        Some(v) => {
            let text = v
                .to_str()
                .map_err(|_| ApiError::Invalid(format!("{CALLER_HEADER} is not ASCII")))?;
            let subject = parse_header(text)
                .map_err(|e| ApiError::Invalid(format!("{CALLER_HEADER}: {e}")))?;
            Ok(Caller::Subject(subject))
        }
    }
}

/// The policy in force, and where it is reloaded from.
#[derive(Debug)]
pub struct Authorizer {
    /// TLS on: policies apply. Off: everything is allowed.
    enforce: bool,
    file: Option<PathBuf>,
    policy: RwLock<Arc<Policy>>,
}

impl Authorizer {
    /// No TLS: nothing to check.
    pub fn open() -> Authorizer {
        Authorizer {
            enforce: false,
            file: None,
            policy: RwLock::new(Arc::new(Policy::default())),
        }
    }

    /// Policies apply; `file` (or the default policy) says which.
    pub fn enforcing(file: Option<PathBuf>) -> anyhow::Result<Authorizer> {
        let policy = match &file {
            Some(path) => read(path)?,
            None => Policy::default(),
        };
        Ok(Authorizer {
            enforce: true,
            file,
            policy: RwLock::new(Arc::new(policy)),
        })
    }

    pub fn enforces(&self) -> bool {
        self.enforce
    }

    /// Re-reads the policy file; on error the policy in force stays.
    pub fn reload(&self) -> anyhow::Result<Option<usize>> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let policy = read(path)?;
        let grants = policy.grant_count();
        *self.policy.write().expect("policy lock") = Arc::new(policy);
        Ok(Some(grants))
    }

    /// Whether `caller` may do `permission` at `scope`.
    pub fn allows(&self, caller: &Caller, permission: Permission, scope: Scope<'_>) -> bool {
        match caller {
            Caller::Anonymous => !self.enforce,
            Caller::Subject(s) => {
                !self.enforce
                    || self
                        .policy
                        .read()
                        .expect("policy lock")
                        .allows(s, permission, scope)
            }
        }
    }

    /// Whether `caller` holds one of `roles` at `scope` (an approver-role
    /// rule of a stage). Without enforcement, everyone does.
    pub fn holds_any_role(&self, caller: &Caller, roles: &[String], scope: Scope<'_>) -> bool {
        if !self.enforce || roles.is_empty() {
            return true;
        }
        let Caller::Subject(s) = caller else {
            return false;
        };
        let policy = self.policy.read().expect("policy lock");
        roles.iter().any(|r| policy.holds_role(s, r, scope))
    }

    /// [`Authorizer::allows`], or PERMISSION_DENIED naming what is missing.
    pub fn check(
        &self,
        caller: &Caller,
        permission: Permission,
        scope: Scope<'_>,
    ) -> Result<(), ApiError> {
        if self.allows(caller, permission, scope) {
            return Ok(());
        }
        let mut at = String::new();
        if let Some(p) = scope.pipeline {
            at.push_str(&format!(" on pipeline {p}"));
        }
        if let Some(e) = scope.environment {
            at.push_str(&format!(", environment {e}"));
        }
        Err(ApiError::PermissionDenied(format!(
            "{} lacks permission {}{at}",
            caller.actor(),
            permission.as_str()
        )))
    }

    /// The caller of `request`, checked for `permission` at `scope`.
    pub fn caller<T>(
        &self,
        request: &Request<T>,
        permission: Permission,
        scope: Scope<'_>,
    ) -> Result<Caller, ApiError> {
        let caller = caller_of(request)?;
        self.check(&caller, permission, scope)?;
        Ok(caller)
    }
}

fn read(path: &PathBuf) -> anyhow::Result<Policy> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    Policy::parse(&text).map_err(|e| anyhow::anyhow!("policy file {}: {e}", path.display()))
}

/// Checks a free-text field (a note, a reason): at most `max` characters,
/// no control characters, so nothing forges a line in the audit display.
pub fn validate_text(field: &str, text: &str, max: usize) -> Result<(), ApiError> {
    if text.chars().count() > max {
        return Err(ApiError::Invalid(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(ApiError::Invalid(format!(
            "{field} contains the control character {c:?}"
        )));
    }
    Ok(())
}

/// Checks an idempotency key: at most 128 of `[A-Za-z0-9._:/-]`.
pub fn validate_idempotency_key(key: &str) -> Result<(), ApiError> {
    let ok = key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(
            "idempotency_key must be at most 128 of [A-Za-z0-9._:/-]".into(),
        ))
    }
}

/// Who a caller is for four-eyes rules: the authenticated identity, or,
/// without TLS, the free-text name it gave (nothing better exists).
pub fn identity_or_note(caller: &Caller, note: &str) -> String {
    match caller {
        Caller::Subject(_) => caller.actor(),
        Caller::Anonymous if note.is_empty() => "anonymous".into(),
        Caller::Anonymous => note.to_string(),
    }
}

/// What the audit records for an action: the authenticated identity, and
/// the caller's free-text note after it. Without TLS the note is all there
/// is (and says so).
pub fn actor_with_note(caller: &Caller, note: &str) -> String {
    match (caller, note.is_empty()) {
        (Caller::Anonymous, true) => "anonymous".into(),
        (Caller::Anonymous, false) => note.to_string(),
        (Caller::Subject(_), true) => caller.actor(),
        (Caller::Subject(_), false) => format!("{} (note: {note})", caller.actor()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_header_round_trips() {
        let s = Subject {
            id: SpiffeId::parse("spiffe://example.org/user/alice").unwrap(),
            groups: vec!["sre".into(), "deployer".into()],
        };
        let header = Caller::Subject(s.clone()).header().unwrap();
        assert_eq!(parse_header(&header).unwrap(), s);
        assert!(parse_header("user/alice").is_err());
    }

    #[test]
    fn free_text_is_bounded_and_printable() {
        assert!(validate_text("reason", "bad canary, see INC-42", 256).is_ok());
        assert!(validate_text("reason", "ok\n2026-01-01 approved by root", 256).is_err());
        assert!(validate_text("reason", "\u{1b}[2J", 256).is_err());
        assert!(validate_text("reason", &"x".repeat(257), 256).is_err());
        assert!(validate_idempotency_key("ci-1234/build:5").is_ok());
        assert!(validate_idempotency_key("a b").is_err());
        assert!(validate_idempotency_key(&"k".repeat(129)).is_err());
    }

    #[test]
    fn open_authorizer_allows_anonymous_and_enforcing_refuses_it() {
        let open = Authorizer::open();
        assert!(open.allows(
            &Caller::Anonymous,
            Permission::CommandsSend,
            Scope::default()
        ));
        let strict = Authorizer::enforcing(None).unwrap();
        let err = strict
            .check(
                &Caller::Anonymous,
                Permission::DeploysApprove,
                Scope {
                    pipeline: Some("p"),
                    environment: Some("prod"),
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "anonymous lacks permission deploys.approve on pipeline p, environment prod"
        );
    }
}
