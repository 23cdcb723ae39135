//! Configuration bundles (`config.proto`): a service's files and one TOML
//! or JSON document for one environment, versioned apart from its code.
//! droverctl builds them, the coordinator checks and keeps them, the agent
//! checks them again and places them. Everything here is pure.
//!
//! Rules:
//! 1. A bundle's identity is [`digest`]: sha256 of `drover-config-v1\n`
//!    and its protobuf encoding with `digest` empty and files sorted by
//!    path. prost encodes fields in number order and repeated fields in
//!    order, so equal content always has equal bytes.
//! 2. [`check`] names every problem: the service and environment names,
//!    the format, a document that does not parse, file paths that are not
//!    plain relative paths (or collide with the document), too many files,
//!    too many bytes, and secret references with bad names.
//! 3. A secret is a reference, the whole string value `secret://NAME` of
//!    the document. [`resolve`] replaces every reference with the host's
//!    value, or fails naming every secret the host lacks; it never
//!    produces a document with a blank where a secret should be.

use std::collections::BTreeSet;
use std::path::Path;

use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::proto::{ConfigBundle, ConfigFormat};

/// Bytes of a bundle (document and files) at most: configuration, not data.
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024;
/// Files of a bundle at most.
pub const MAX_FILES: usize = 64;
/// The prefix of a secret reference.
pub const SECRET_SCHEME: &str = "secret://";

/// Rule 1: the bundle's content address (lowercase hex).
pub fn digest(bundle: &ConfigBundle) -> String {
    let mut canonical = bundle.clone();
    canonical.digest.clear();
    canonical.files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = Sha256::new();
    h.update(b"drover-config-v1\n");
    h.update(canonical.encode_to_vec());
    hex::encode(h.finalize())
}

/// The name the document is placed under when the manifest does not say.
pub fn default_document_name(format: ConfigFormat) -> &'static str {
    match format {
        ConfigFormat::Json => "config.json",
        _ => "config.toml",
    }
}

/// The format a document file's name says (`.toml`, `.json`).
pub fn format_of(path: &Path) -> Option<ConfigFormat> {
    match path.extension()?.to_str()? {
        "toml" => Some(ConfigFormat::Toml),
        "json" => Some(ConfigFormat::Json),
        _ => None,
    }
}

/// A document, parsed into one tree whichever its format.
enum Doc {
    Toml(toml::Table),
    Json(serde_json::Value),
}

fn parse(format: ConfigFormat, bytes: &[u8]) -> Result<Doc, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not UTF-8".to_string())?;
    match format {
        ConfigFormat::Toml => text
            .parse::<toml::Table>()
            .map(Doc::Toml)
            .map_err(|e| format!("is not valid TOML: {}", e.message())),
        ConfigFormat::Json => serde_json::from_str::<serde_json::Value>(text)
            .map(Doc::Json)
            .map_err(|e| format!("is not valid JSON: {e}")),
        ConfigFormat::Unspecified => Err("has no format (TOML or JSON)".into()),
    }
}

/// Calls `f` on every string value of the document (in tables, arrays and
/// objects), which may replace it.
fn each_string(doc: &mut Doc, f: &mut dyn FnMut(&mut String)) {
    fn toml_value(v: &mut toml::Value, f: &mut dyn FnMut(&mut String)) {
        match v {
            toml::Value::String(s) => f(s),
            toml::Value::Array(a) => a.iter_mut().for_each(|v| toml_value(v, f)),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| toml_value(v, f)),
            _ => {}
        }
    }
    fn json_value(v: &mut serde_json::Value, f: &mut dyn FnMut(&mut String)) {
        match v {
            serde_json::Value::String(s) => f(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| json_value(v, f)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|v| json_value(v, f)),
            _ => {}
        }
    }
    match doc {
        Doc::Toml(t) => t.iter_mut().for_each(|(_, v)| toml_value(v, f)),
        Doc::Json(v) => json_value(v, f),
    }
}

/// A secret's name: 1 to 128 of `[A-Za-z0-9_.-]`.
fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A relative path of plain components (no `..`, `.`, root or empty part).
fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Rule 2: every problem of `bundle` as (field, problem); the secret names
/// its document refers to when there is none.
pub fn check(bundle: &ConfigBundle) -> Result<Vec<String>, Vec<(String, String)>> {
    let mut problems = Vec::new();
    if let Err(e) = crate::ids::validate_service(&bundle.service) {
        problems.push(("service".into(), e));
    }
    if bundle.environment.is_empty() {
        problems.push(("environment".into(), "is empty".into()));
    }
    let bytes = bundle.document.len() + bundle.files.iter().map(|f| f.content.len()).sum::<usize>();
    if bytes > MAX_BUNDLE_BYTES {
        problems.push((
            "bundle".into(),
            format!("is {bytes} bytes; at most {MAX_BUNDLE_BYTES}"),
        ));
    }
    if bundle.files.len() > MAX_FILES {
        problems.push((
            "files".into(),
            format!("are {}; at most {MAX_FILES}", bundle.files.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for f in &bundle.files {
        if !plain_relative(&f.path) {
            problems.push((
                format!("files[{}]", f.path),
                "must be a relative path without '..' or '.'".into(),
            ));
        } else if !seen.insert(f.path.as_str()) {
            problems.push((format!("files[{}]", f.path), "appears twice".into()));
        }
    }
    let mut secrets = BTreeSet::new();
    match parse(bundle.format(), &bundle.document) {
        Err(e) => problems.push(("document".into(), e)),
        Ok(mut doc) => each_string(&mut doc, &mut |s| {
            if let Some(name) = s.strip_prefix(SECRET_SCHEME) {
                if valid_secret_name(name) {
                    secrets.insert(name.to_string());
                } else {
                    problems.push((
                        "document".into(),
                        format!("secret reference {s:?}: names are 1-128 of A-Z a-z 0-9 _ . -"),
                    ));
                }
            }
        }),
    }
    if !bundle.digest.is_empty() && bundle.digest != digest(bundle) {
        problems.push((
            "digest".into(),
            "does not match the bundle's content".into(),
        ));
    }
    if problems.is_empty() {
        Ok(secrets.into_iter().collect())
    } else {
        Err(problems)
    }
}

/// The secrets a host lacks, by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret{} {} not available on this host", if .0.len() == 1 { "" } else { "s" }, .0.join(", "))]
pub struct MissingSecrets(pub Vec<String>);

/// Rule 3: the document with every `secret://NAME` replaced by `lookup`'s
/// value for NAME, in the bundle's format.
pub fn resolve(
    bundle: &ConfigBundle,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<u8>, ResolveError> {
    let mut doc = parse(bundle.format(), &bundle.document).map_err(ResolveError::Document)?;
    let mut missing = BTreeSet::new();
    each_string(&mut doc, &mut |s| {
        if let Some(name) = s.strip_prefix(SECRET_SCHEME) {
            match lookup(name) {
                Some(value) => *s = value,
                None => {
                    missing.insert(name.to_string());
                }
            }
        }
    });
    if !missing.is_empty() {
        return Err(ResolveError::Missing(MissingSecrets(
            missing.into_iter().collect(),
        )));
    }
    Ok(match doc {
        Doc::Toml(t) => toml::to_string(&t)
            .map_err(|e| ResolveError::Document(e.to_string()))?
            .into_bytes(),
        Doc::Json(v) => serde_json::to_vec_pretty(&v).expect("a JSON value serializes"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Missing(MissingSecrets),
    #[error("config document {0}")]
    Document(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ConfigFile;

    fn bundle(doc: &str) -> ConfigBundle {
        ConfigBundle {
            service: "web".into(),
            environment: "prod".into(),
            format: ConfigFormat::Toml as i32,
            document: doc.as_bytes().to_vec(),
            files: vec![
                ConfigFile {
                    path: "b.txt".into(),
                    content: b"b".to_vec(),
                },
                ConfigFile {
                    path: "certs/a.pem".into(),
                    content: b"a".to_vec(),
                },
            ],
            digest: String::new(),
        }
    }

    #[test]
    fn the_digest_is_of_the_content_whatever_the_order_of_files() {
        let a = bundle("x = 1\n");
        let mut b = a.clone();
        b.files.reverse();
        assert_eq!(digest(&a), digest(&b));
        let mut c = a.clone();
        c.document = b"x = 2\n".to_vec();
        assert_ne!(digest(&a), digest(&c));
        let mut d = a.clone();
        d.environment = "staging".into();
        assert_ne!(digest(&a), digest(&d), "the environment is part of it");
        let mut e = a.clone();
        e.digest = digest(&a);
        assert_eq!(digest(&e), digest(&a), "the digest field is not");
        assert_eq!(digest(&a).len(), 64);
    }

    #[test]
    fn check_names_every_problem_and_the_secrets() {
        let ok =
            bundle("db = \"secret://DB_PASSWORD\"\n[x]\nk = [\"secret://API.key\", \"plain\"]\n");
        assert_eq!(check(&ok).unwrap(), vec!["API.key", "DB_PASSWORD"]);
        let mut bad = bundle("x = \"secret://no spaces\"\n");
        bad.service = "Web".into();
        bad.environment.clear();
        bad.files.push(ConfigFile {
            path: "../etc/passwd".into(),
            content: vec![],
        });
        bad.files.push(ConfigFile {
            path: "b.txt".into(),
            content: vec![],
        });
        bad.digest = "00".repeat(32);
        let fields: Vec<String> = check(&bad).unwrap_err().into_iter().map(|p| p.0).collect();
        for f in [
            "service",
            "environment",
            "files[../etc/passwd]",
            "files[b.txt]",
            "document",
            "digest",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
        }
        let unparsable = bundle("x = = 1");
        let p = check(&unparsable).unwrap_err();
        assert!(p[0].1.contains("not valid TOML"), "{p:?}");
        let mut json = bundle("{\"a\": [1, \"secret://T\"]}");
        json.format = ConfigFormat::Json as i32;
        assert_eq!(check(&json).unwrap(), vec!["T"]);
        let mut big = bundle("x = 1");
        big.files[0].content = vec![0; MAX_BUNDLE_BYTES];
        assert_eq!(check(&big).unwrap_err()[0].0, "bundle");
        for path in ["/abs", "a/./b", "", "a/../b"] {
            let mut b = bundle("x = 1");
            b.files[0].path = path.into();
            assert!(check(&b).is_err(), "{path:?}");
        }
    }

    #[test]
    fn resolve_fills_every_reference_or_names_every_missing_one() {
        let b = bundle("db = \"secret://DB\"\nname = \"web\"\n[t]\nk = \"secret://API\"\n");
        let both = |n: &str| match n {
            "DB" => Some("hunter2".to_string()),
            "API" => Some("k\"ey".to_string()),
            _ => None,
        };
        let text = String::from_utf8(resolve(&b, &both).unwrap()).unwrap();
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["db"].as_str(), Some("hunter2"));
        assert_eq!(t["t"]["k"].as_str(), Some("k\"ey"));
        assert_eq!(t["name"].as_str(), Some("web"));
        let none = |_: &str| None;
        assert_eq!(
            resolve(&b, &none).unwrap_err(),
            ResolveError::Missing(MissingSecrets(vec!["API".into(), "DB".into()]))
        );
        assert_eq!(
            ResolveError::Missing(MissingSecrets(vec!["DB".into()])).to_string(),
            "secret DB not available on this host"
        );
        let mut json = bundle("{\"p\": \"secret://DB\"}");
        json.format = ConfigFormat::Json as i32;
        let v: serde_json::Value = serde_json::from_slice(&resolve(&json, &both).unwrap()).unwrap();
        assert_eq!(v["p"], "hunter2");
    }
}
