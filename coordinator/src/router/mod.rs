//! Traffic routers: the load balancers a deploy moves traffic through
//! (blue-green switches, weighted canaries, draining before a restart).
//!
//! A router is driven by the coordinator (the shard leader of the deploy),
//! behind the narrow [`Router`] trait: set a server's state, set its
//! weight, read the servers of a backend. The deploy engine decides what
//! the traffic should be; a router only applies it, idempotently, so a new
//! leader can re-assert the intended state after a failover.
//!
//! Implementations: [`haproxy::Haproxy`], HAProxy's runtime API (a unix
//! socket or a TCP address; `set server … state|weight`, `show servers
//! state`), which switches atomically without a reload; [`nginx::Nginx`],
//! an upstream file rewritten and nginx reloaded (gracefully: old workers
//! finish their requests); [`exec::ExecHook`], a command the operator
//! configured, for anything else. The last two are declared in the
//! coordinator's configuration ([`RouterConfig`]) and named by pipelines.

pub mod exec;
pub mod haproxy;
pub mod nginx;

/// Whether `name` is a backend or server name a router's configuration
/// could have given: letters, digits and `-_.:`, at most 256 characters
/// (so no name can carry a second command).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// Refuses a name no router configuration could have given (so no name
/// can carry a second command, whatever the router).
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), RouterError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RouterError::Refused {
            command: format!("{kind} {name:?}"),
            answer: format!("not a valid {kind} name (letters, digits, '-', '_', '.', ':')"),
        })
    }
}

/// [`check_name`] for a backend and one of its servers.
pub(crate) fn check_server(backend: &str, server: &str) -> Result<(), RouterError> {
    check_name("backend", backend)?;
    check_name("server", server)
}

/// The largest weight a router takes (HAProxy's; the others follow it).
pub const MAX_WEIGHT: u32 = 256;

/// Refuses a weight past [`MAX_WEIGHT`].
pub(crate) fn check_weight(weight: u32) -> Result<(), RouterError> {
    if weight > MAX_WEIGHT {
        return Err(RouterError::BadWeight(weight));
    }
    Ok(())
}

/// A server's administrative state in its router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Takes new traffic (by its weight).
    Ready,
    /// Takes no new traffic; connections in flight finish.
    Drain,
    /// Out of service: no traffic at all.
    Maint,
}

impl ServerState {
    /// As HAProxy's runtime API spells it (and the audit records it).
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Ready => "ready",
            ServerState::Drain => "drain",
            ServerState::Maint => "maint",
        }
    }
}

/// A server as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerView {
    pub backend: String,
    pub server: String,
    pub state: ServerState,
    /// The router takes it to be running (its health checks pass, or it
    /// has none).
    pub up: bool,
    /// Its weight among the backend's servers (0: no new traffic).
    pub weight: u32,
    /// Where it sends traffic: "address:port".
    pub address: String,
}

/// Why a router did not do what was asked; nothing changed in any case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// The router's control channel cannot be reached (no such socket,
    /// connection refused, timed out).
    #[error("router at {at} is unreachable: {why}")]
    Unreachable { at: String, why: String },
    #[error("the router has no backend {0:?}")]
    UnknownBackend(String),
    #[error("the router's backend {backend:?} has no server {server:?}")]
    UnknownServer { backend: String, server: String },
    /// The router answered with something else than success.
    #[error("the router refused {command:?}: {answer}")]
    Refused { command: String, answer: String },
    /// A weight outside what the router accepts.
    #[error("weight {0} is outside 0..=256")]
    BadWeight(u32),
}

/// What the deploy engine needs of a load balancer.
#[async_trait::async_trait]
pub trait Router: Send + Sync {
    /// Sets `server` of `backend` to `state`.
    async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: ServerState,
    ) -> Result<(), RouterError>;

    /// Sets the weight of `server` of `backend` (0..=256).
    async fn set_weight(&self, backend: &str, server: &str, weight: u32)
    -> Result<(), RouterError>;

    /// The servers of `backend`.
    async fn servers(&self, backend: &str) -> Result<Vec<ServerView>, RouterError>;

    /// Requests (sessions) `server` of `backend` is serving now.
    async fn in_flight(&self, backend: &str, server: &str) -> Result<u64, RouterError>;
}

/// A router named in the coordinator's configuration file
/// (`[routers.NAME]`), which pipelines name (`router.name`). Only the
/// coordinator's operator decides which file is rewritten or which
/// command runs; a pipeline only picks one by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterConfig {
    /// nginx: the coordinator rewrites `upstream_file` (see `nginx.rs`)
    /// and runs `reload` (e.g. `["nginx", "-s", "reload"]`).
    Nginx {
        upstream_file: std::path::PathBuf,
        reload: Vec<String>,
    },
    /// Anything else: `command` is run with the operation as arguments
    /// (see `exec.rs`).
    Exec { command: Vec<String> },
}

impl RouterConfig {
    /// What is wrong with it, if anything (checked when the file is read).
    pub fn problem(&self) -> Option<String> {
        match self {
            RouterConfig::Nginx { reload, .. } if reload.is_empty() => {
                Some("reload: the command that reloads nginx is required".into())
            }
            RouterConfig::Exec { command } if command.is_empty() => {
                Some("command: the hook to run is required".into())
            }
            _ => None,
        }
    }
}

/// The router a stage's target names: HAProxy by its runtime address, or
/// one of `configured` by name.
pub fn build(
    target: &drover_common::proto::RouterTarget,
    configured: &std::collections::BTreeMap<String, RouterConfig>,
) -> Result<std::sync::Arc<dyn Router>, String> {
    if !target.name.is_empty() {
        return match configured.get(&target.name) {
            Some(RouterConfig::Nginx {
                upstream_file,
                reload,
            }) => Ok(std::sync::Arc::new(nginx::Nginx::new(
                upstream_file.clone(),
                reload.clone(),
            ))),
            Some(RouterConfig::Exec { command }) => {
                Ok(std::sync::Arc::new(exec::ExecHook::new(command.clone())))
            }
            None => Err(format!(
                "no router named {:?} in this coordinator's configuration ([routers.{}] in its --config file)",
                target.name, target.name
            )),
        };
    }
    let addr: haproxy::RuntimeAddr = target.haproxy.parse()?;
    Ok(std::sync::Arc::new(haproxy::Haproxy::new(addr)))
}
