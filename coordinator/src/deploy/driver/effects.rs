//! What the driver does to the world besides the store, behind one narrow
//! trait: send a command to a host and wait for its result, read what the
//! fleet view knows of a host, learn what a pull carries, and reach the
//! load balancer a stage names. The live
//! implementation ([`FleetEffects`]) goes through the registry, the agents'
//! streams and the origin; the driver's unit tests use a scripted fleet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    Command, CommandUpdate, PullCommand, RouterTarget, ServiceHealth, Slot,
};

use crate::fleet::{PendingCommands, Registry, SendError};
use crate::ha::leases::ShardLeases;
use crate::origin::BlobStore;
use crate::router::{Router, RouterConfig};

/// What the fleet view knows of one host now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostView {
    pub heartbeat_interval_ms: u32,
    /// Grows with every heartbeat the coordinator received.
    pub heartbeat_sequence: u64,
    /// The service's health in the last heartbeat (None: not reported).
    pub health: Option<ServiceHealth>,
}

#[async_trait::async_trait]
pub trait Effects: Send + Sync {
    /// Sends `cmd` to `host` and waits up to `timeout` for its result. A
    /// host that is away (or drops) gets `patience` to come back; the
    /// command is sent again then (ids are deterministic, agents answer a
    /// repeat from their records). `Err`: why there is no result (the
    /// host gave none within its patience and timeout: it is stuck).
    async fn send(
        &self,
        host: &str,
        cmd: Command,
        timeout: Duration,
        patience: Duration,
    ) -> Result<CommandUpdate, String>;

    /// What the fleet view knows of `host`, with the health of `service`'s
    /// process in `slot` (None: not a known host).
    fn host_in(&self, host: &str, service: &str, slot: Slot) -> Option<HostView>;

    /// What the fleet view knows of `host`, with the health of `service`'s
    /// one process (rolling deploys).
    fn host(&self, host: &str, service: &str) -> Option<HostView> {
        self.host_in(host, service, Slot::None)
    }

    /// The Pull of `artifact` for each of `hosts`, in order: the signatures
    /// CI made, its size (agents check their free space first), its chunk
    /// index, the origin (coordinators, best first) and, per host, the
    /// peers that hold it (tracker). The artifact's metadata is read once.
    async fn pull_commands(
        &self,
        service: &str,
        artifact: &str,
        hosts: &[String],
    ) -> Vec<PullCommand>;

    /// `host` pulled `artifact`: the tracker may name it as a peer before
    /// its next heartbeat says so.
    fn pulled(&self, _host: &str, _artifact: &str) {}

    /// The load balancer a stage names (nothing is contacted until used):
    /// HAProxy by address (routers named in a configuration: the live
    /// effects).
    fn router(&self, target: &RouterTarget) -> Result<Arc<dyn Router>, String> {
        crate::router::build(target, &BTreeMap::new())
    }
}

/// The live effects: the registry, the agents' command streams, the origin.
pub struct FleetEffects {
    pub registry: Arc<Registry>,
    pub pending: Arc<PendingCommands>,
    pub blobs: Arc<BlobStore>,
    /// This coordinator's origin address (agents' first pull source).
    pub origin: String,
    /// The other live coordinators (further pull sources).
    pub leases: Arc<ShardLeases>,
    /// Routers the configuration declares, by name.
    pub routers: Arc<BTreeMap<String, RouterConfig>>,
    /// Peers handed to each pull (`--peers-per-pull`; 0: origin only).
    pub peers_per_pull: usize,
    /// `--pull-mode`: whole files carry no chunk index.
    pub pull_mode: crate::config::PullMode,
}

#[async_trait::async_trait]
impl Effects for FleetEffects {
    async fn send(
        &self,
        host: &str,
        cmd: Command,
        timeout: Duration,
        patience: Duration,
    ) -> Result<CommandUpdate, String> {
        // One deadline for everything: a host that reconnects late gets
        // what is left, never a fresh `timeout`.
        let deadline = tokio::time::Instant::now() + timeout.max(patience);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .pending
                .send(&self.registry, host, cmd.clone(), left)
                .await
            {
                Ok(u) => return Ok(u),
                Err(
                    e @ (SendError::NotConnected(_)
                    | SendError::StreamClosed(_)
                    | SendError::Unfenced(..)),
                ) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e.to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn host_in(&self, host: &str, service: &str, slot: Slot) -> Option<HostView> {
        let h = self.registry.get(host)?;
        Some(HostView {
            heartbeat_interval_ms: h.heartbeat_interval_ms,
            heartbeat_sequence: h.heartbeat_sequence,
            health: h
                .health
                .into_iter()
                .find(|s| s.service == service && s.slot() == slot),
        })
    }

    fn router(&self, target: &RouterTarget) -> Result<Arc<dyn Router>, String> {
        crate::router::build(target, &self.routers)
    }

    fn pulled(&self, host: &str, artifact: &str) {
        self.registry.add_held(host, artifact);
    }

    async fn pull_commands(
        &self,
        service: &str,
        artifact: &str,
        hosts: &[String],
    ) -> Vec<PullCommand> {
        let info = match artifact.parse::<drover_common::artifact::Digest>() {
            Ok(digest) => self.blobs.info(&digest).await.ok().flatten(),
            Err(_) => None,
        }
        .unwrap_or_default();
        let (index_sha256, unpacked_bytes) = match self.pull_mode {
            crate::config::PullMode::Chunks => (info.index_sha256, info.unpacked_bytes),
            crate::config::PullMode::Whole => (String::new(), 0),
        };
        let sources = self.pull_sources();
        hosts
            .iter()
            .map(|host| PullCommand {
                service: service.to_string(),
                artifact: artifact.to_string(),
                sources: sources.clone(),
                size_bytes: info.size_bytes,
                signatures: info.signatures.clone(),
                index_sha256: index_sha256.clone(),
                unpacked_bytes,
                // Peers only for an artifact with a chunk index (else the
                // agent fetches the whole file from the origin).
                peers: match index_sha256.is_empty() {
                    true => Vec::new(),
                    false => self.registry.peers_for(artifact, host, self.peers_per_pull),
                },
            })
            .collect()
    }
}

impl FleetEffects {
    /// This coordinator first (it fetches a blob it lacks from its peers),
    /// then every other live coordinator.
    fn pull_sources(&self) -> Vec<String> {
        let mut sources = vec![self.origin.clone()];
        for m in self.leases.members() {
            if !m.address.is_empty() && !sources.contains(&m.address) {
                sources.push(m.address);
            }
        }
        sources
    }
}
