//! Runtimes start and stop a service's process. Two implement one trait:
//! [`process::ProcessRuntime`] supervises the process itself; the
//! [`systemd`] runtime hands it to systemd as a unit per service.

pub mod launch;
pub mod process;
pub mod systemd;

pub use launch::{Launch, RunAs, UserPolicy};

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// Everything a runtime needs to run one release of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub service: String,
    /// The release directory (resolved, not through `current`).
    pub release_dir: PathBuf,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Who it runs as, where, with what environment (see `launch`).
    pub launch: Launch,
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    pub log_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub running: bool,
    /// Times the service exited and was started again since the agent
    /// started it (crashes and liveness kills).
    pub restarts: u32,
    /// Process group (process runtime) or main PID (systemd).
    pub pgid: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("starting {service}: {reason}")]
    Start { service: String, reason: String },
    #[error("{0}")]
    Other(String),
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// Starts `spec`, stopping whatever ran for the service before.
    async fn start(&self, spec: ServiceSpec) -> Result<(), RuntimeError>;
    /// Stops the service (stop signal, grace, then SIGKILL). No-op when stopped.
    async fn stop(&self, service: &str) -> Result<(), RuntimeError>;
    /// Kills the running process so supervision starts it again (liveness).
    async fn kill(&self, service: &str);
    /// Sends the service's main process `signal` (a config reload's
    /// SIGHUP). An error when it is not running.
    async fn signal(&self, service: &str, signal: Signal) -> Result<(), RuntimeError>;
    fn status(&self, service: &str) -> RuntimeStatus;
    /// The last lines the service wrote, for failure reports.
    fn output_tail(&self, service: &str, lines: usize) -> String;
    /// Stops every service (agent shutdown).
    async fn stop_all(&self);
}

/// Parses a signal name of a manifest (`SIGTERM`).
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    name.parse::<Signal>()
        .map_err(|_| format!("unknown signal {name:?}"))
}
