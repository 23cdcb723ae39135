//! `drover.toml`: what an artifact is and how to run it.
//!
//! ```toml
//! service = "hello"
//! version = "1.4.2"
//!
//! [start]
//! command = "bin/hello"              # relative to the release dir, or absolute
//! args = ["--port", "${PORT}"]       # ${VAR}: the service's environment
//! env = { RUST_LOG = "info" }
//! stop_signal = "SIGTERM"
//! stop_grace = "10s"
//! user = "hello"                     # default: the agent's --service-user
//!
//! [readiness]
//! http = "http://127.0.0.1:${PORT}/healthz"   # or tcp = "127.0.0.1:${PORT}", or exec = ["bin/check"]
//! expect_status = 200
//! interval = "1s"
//! timeout = "1s"
//! failure_threshold = 3
//!
//! [metrics]
//! url = "http://127.0.0.1:${PORT}/metrics"
//! requests = "http_requests_total"
//! errors = { label = "code", prefix = "5" }
//! latency = "http_request_duration_seconds"
//!
//! [hooks]
//! pre_start = { command = ["bin/migrate"], timeout = "60s" }
//!
//! [config]                           # the environment's config bundle, if one is deployed
//! document = "hello.toml"            # the document's name in $DROVER_CONFIG_DIR (default config.toml / config.json)
//! reload = "sighup"                  # restart (default), sighup or none
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub service: String,
    #[serde(default)]
    pub version: String,
    pub start: Start,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub metrics: Option<MetricsSpec>,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub config: ConfigSpec,
}

/// Where a config bundle goes and how the service takes a new one. The
/// agent places every bundle in the service's config directory (the
/// service finds it as `$DROVER_CONFIG_DIR`, a link switched atomically
/// to the bundle's own directory): its files by their paths, the document
/// (secrets resolved) as `document`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// The document's file name (default `config.toml` or `config.json`).
    pub document: Option<String>,
    #[serde(default)]
    pub reload: Reload,
}

/// What the agent does once a new config is in place while the same code
/// keeps running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reload {
    /// Restart the service (hooks and readiness as any restart).
    #[default]
    Restart,
    /// Send the process SIGHUP; it must stay up and ready.
    Sighup,
    /// Nothing: the service reads its config when it wants.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory, relative to the release dir (default: the release dir).
    pub workdir: Option<String>,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// The unprivileged user the service, its hooks and exec probes run as
    /// (default: the agent's `--service-user`).
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub exec: Option<Vec<String>>,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

/// What a probe checks, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck<'a> {
    Http(&'a str),
    Tcp(&'a str),
    Exec(&'a [String]),
}

impl Probe {
    pub fn check(&self) -> Option<ProbeCheck<'_>> {
        match (&self.http, &self.tcp, &self.exec) {
            (Some(url), None, None) => Some(ProbeCheck::Http(url)),
            (None, Some(addr), None) => Some(ProbeCheck::Tcp(addr)),
            (None, None, Some(cmd)) => Some(ProbeCheck::Exec(cmd)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// Prometheus text exposition endpoint.
    pub url: String,
    /// Counter of requests served.
    pub requests: String,
    /// Which of those requests are errors.
    pub errors: Option<ErrorSelector>,
    /// Histogram of request latency, in seconds.
    pub latency: Option<String>,
}

/// A request is an error when its `label` starts with `prefix` (`code` = `5..`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorSelector {
    pub label: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Before the switch; failure aborts the restart with nothing changed.
    pub pre_start: Option<Hook>,
    /// After the service is ready.
    pub post_start: Option<Hook>,
    /// Last check of a restart; failure fails the restart.
    pub validate: Option<Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub command: Vec<String>,
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_expect_status() -> u16 {
    200
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Everything wrong with a manifest, each problem naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: ", super::MANIFEST_FILE)?;
        for (i, (field, problem)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{field}: {problem}")?;
        }
        Ok(())
    }
}

impl ManifestError {
    fn one(field: &str, problem: impl Into<String>) -> ManifestError {
        ManifestError {
            problems: vec![(field.to_string(), problem.into())],
        }
    }
}

/// Signals a service may ask to be stopped with.
pub const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
];

impl Manifest {
    /// Parses and validates `drover.toml` text.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            // toml's message names the key and the line; keep it on one line.
            ManifestError::one("toml", e.message().to_string() + &location(text, e.span()))
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut problems = Vec::new();
        let mut bad =
            |field: &str, problem: &str| problems.push((field.to_string(), problem.to_string()));
        if let Err(e) = crate::ids::validate_service(&self.service) {
            bad("service", &e);
        }
        if self.start.command.trim().is_empty() {
            bad("start.command", "must not be empty");
        }
        if let Some(dir) = &self.start.workdir
            && (dir.starts_with('/') || dir.split('/').any(|c| c == ".."))
        {
            bad(
                "start.workdir",
                "must be a path inside the release (relative, no '..')",
            );
        }
        if let Some(doc) = &self.config.document
            && (doc.is_empty() || doc.contains('/') || doc == "." || doc == "..")
        {
            bad("config.document", "must be a file name (no '/')");
        }
        if !STOP_SIGNALS.contains(&self.start.stop_signal.as_str()) {
            bad(
                "start.stop_signal",
                "must be one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2",
            );
        }
        if let Some(user) = &self.start.user
            && !valid_user_name(user)
        {
            bad(
                "start.user",
                "must be a user name: 1-32 of [a-z0-9_-], starting with a letter or '_'",
            );
        }
        for key in self.start.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                bad(
                    "start.env",
                    "keys must be non-empty and contain no '=' or NUL",
                );
            }
        }
        for (field, probe) in [("readiness", &self.readiness), ("liveness", &self.liveness)] {
            let Some(probe) = probe else { continue };
            match probe.check() {
                None => bad(field, "give exactly one of http, tcp or exec"),
                Some(ProbeCheck::Exec([])) => bad(&format!("{field}.exec"), "must name a command"),
                Some(ProbeCheck::Http(url)) if !url.starts_with("http://") => {
                    bad(&format!("{field}.http"), "must be an http:// URL")
                }
                Some(_) => {}
            }
            if probe.timeout.is_zero() || probe.interval.is_zero() {
                bad(field, "interval and timeout must be above zero");
            }
            if probe.failure_threshold == 0 {
                bad(&format!("{field}.failure_threshold"), "must be at least 1");
            }
            if !(100..=599).contains(&probe.expect_status) {
                bad(
                    &format!("{field}.expect_status"),
                    "must be an HTTP status (100-599)",
                );
            }
        }
        if let Some(m) = &self.metrics {
            if !m.url.starts_with("http://") {
                bad("metrics.url", "must be an http:// URL");
            }
            if m.requests.is_empty() {
                bad("metrics.requests", "must name the request counter");
            }
            if let Some(e) = &m.errors
                && e.label.is_empty()
            {
                bad("metrics.errors.label", "must name a label");
            }
        }
        for (name, hook) in [
            ("hooks.pre_start", &self.hooks.pre_start),
            ("hooks.post_start", &self.hooks.post_start),
            ("hooks.validate", &self.hooks.validate),
        ] {
            if let Some(h) = hook {
                if h.command.is_empty() || h.command[0].is_empty() {
                    bad(&format!("{name}.command"), "must name a command");
                }
                if h.timeout.is_zero() {
                    bad(&format!("{name}.timeout"), "must be above zero");
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ManifestError { problems })
        }
    }
}

/// A portable user name (POSIX, as useradd accepts by default).
fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 32
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Expands `${VAR}` and `$VAR` from `env`; an unknown variable is an error
/// naming it.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    shellexpand::env_with_context(s, |var: &str| -> Result<Option<&String>, String> {
        env.get(var)
            .map(Some)
            .ok_or_else(|| format!("${{{var}}} is not set for this service"))
    })
    .map(|c| c.into_owned())
    .map_err(|e| e.cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
service = "hello"
version = "1.0.0"
[start]
command = "bin/hello"
args = ["--port", "${PORT}"]
[readiness]
http = "http://127.0.0.1:${PORT}/healthz"
[metrics]
url = "http://127.0.0.1:${PORT}/metrics"
requests = "http_requests_total"
errors = { label = "code", prefix = "5" }
latency = "http_request_duration_seconds"
[hooks]
pre_start = { command = ["bin/check"], timeout = "5s" }
"#;

    #[test]
    fn parses_a_full_manifest_with_defaults() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.service, "hello");
        assert_eq!(m.start.stop_signal, "SIGTERM");
        assert_eq!(m.start.stop_grace, Duration::from_secs(10));
        let r = m.readiness.unwrap();
        assert_eq!(
            r.check(),
            Some(ProbeCheck::Http("http://127.0.0.1:${PORT}/healthz"))
        );
        assert_eq!((r.failure_threshold, r.expect_status), (3, 200));
        assert_eq!(m.hooks.pre_start.unwrap().timeout, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_names_its_field() {
        let text = r#"
service = "Hello World"
[start]
command = ""
stop_signal = "SIGKILL"
[readiness]
http = "http://x/"
tcp = "127.0.0.1:1"
failure_threshold = 0
"#;
        let err = Manifest::parse(text).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "service",
                "start.command",
                "start.stop_signal",
                "readiness",
                "readiness.failure_threshold"
            ]
        );
        assert!(
            err.to_string()
                .starts_with("invalid drover.toml: service: service \"Hello World\" must be"),
            "{err}"
        );
    }

    #[test]
    fn syntax_and_unknown_keys_are_reported_with_the_line() {
        let err = Manifest::parse("service = \"a\"\n[start]\ncommand = \"x\"\ncomand = \"y\"\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("comand") && err.to_string().contains("line 4"),
            "{err}"
        );
        let err = Manifest::parse("service = ").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = Manifest::parse("service = \"a\"\n").unwrap_err();
        assert!(err.to_string().contains("start"), "{err}");
    }

    #[test]
    fn expands_variables_from_the_service_environment() {
        let env: BTreeMap<String, String> = [("PORT".to_string(), "8081".to_string())].into();
        assert_eq!(
            expand("http://127.0.0.1:${PORT}/x", &env).unwrap(),
            "http://127.0.0.1:8081/x"
        );
        assert_eq!(expand("$PORT", &env).unwrap(), "8081");
        assert_eq!(
            expand("${NOPE}", &env).unwrap_err(),
            "${NOPE} is not set for this service"
        );
    }
}
