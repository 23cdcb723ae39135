//! `drover.v1.AgentControl/Connect`: one long-lived stream per agent.
//!
//! The handler waits for the Hello, validates it, registers the host and
//! hands the rest of the stream to a [`Session`] task. A bad first message is
//! answered with a status before anything is registered, so no other agent
//! notices it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_common::ids::validate_host_id;
use drover_common::labels::validate_labels;
use drover_common::proto::agent_control_server::AgentControl;
use drover_common::proto::{
    AgentMessage, CommandStatus, CoordinatorMessage, Hello, ReportMetrics, Welcome, agent_message,
    coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::error::ApiError;
use crate::fleet::{Departure, OutboundItem, PendingCommands, Registry, SessionHandle};
use crate::ha::leases::ShardLeases;
use crate::metrics::Metrics;

/// Outbound messages queued per stream before the session waits for the agent.
const OUTBOUND_QUEUE: usize = 64;
/// Longest agent version string accepted.
const MAX_AGENT_VERSION_LEN: usize = 64;
/// Heartbeat intervals outside this range are refused.
const HEARTBEAT_INTERVAL_RANGE_MS: std::ops::RangeInclusive<u32> = 10..=3_600_000;

pub struct AgentControlService {
    pub coordinator_id: String,
    pub registry: Arc<Registry>,
    pub pending: Arc<PendingCommands>,
    pub metrics: Metrics,
    pub hello_timeout: Duration,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Shards led (their epochs go in Welcome) and the live coordinators
    /// (their addresses go in Welcome, for discovery).
    pub leases: Arc<ShardLeases>,
    /// The metrics heartbeats must carry (kept current from the pipelines).
    pub report: Arc<std::sync::Mutex<ReportMetrics>>,
    /// The coordinators' cluster id (Welcome): epochs belong to it.
    pub cluster_id: String,
    /// Under TLS, an agent connects only as the host its certificate names.
    pub auth: Arc<crate::auth::Authorizer>,
}

/// Checks everything a Hello carries before it reaches the registry.
pub fn validate_hello(hello: &Hello) -> Result<(), ApiError> {
    validate_host_id(&hello.host_id)?;
    validate_labels(hello.labels.iter())?;
    if hello.agent_version.len() > MAX_AGENT_VERSION_LEN {
        return Err(ApiError::Invalid(format!(
            "agent_version is {} characters long; the limit is {MAX_AGENT_VERSION_LEN}",
            hello.agent_version.len()
        )));
    }
    if hello.peer_address.len() > 256 || hello.peer_address.chars().any(char::is_control) {
        return Err(ApiError::Invalid(
            "peer_address must be at most 256 printable characters".into(),
        ));
    }
    if let Some(bad) = hello
        .held_artifacts
        .iter()
        .find(|a| a.parse::<drover_common::artifact::Digest>().is_err())
    {
        return Err(ApiError::Invalid(format!(
            "held_artifacts: {bad:?} is not a sha256 (64 lowercase hex characters)"
        )));
    }
    if !HEARTBEAT_INTERVAL_RANGE_MS.contains(&hello.heartbeat_interval_ms) {
        return Err(ApiError::Invalid(format!(
            "heartbeat_interval_ms is {}; it must be between {} and {}",
            hello.heartbeat_interval_ms,
            HEARTBEAT_INTERVAL_RANGE_MS.start(),
            HEARTBEAT_INTERVAL_RANGE_MS.end()
        )));
    }
    Ok(())
}

fn kind_of(msg: &Option<agent_message::Msg>) -> &'static str {
    match msg {
        Some(agent_message::Msg::Hello(_)) => "Hello",
        Some(agent_message::Msg::Heartbeat(_)) => "Heartbeat",
        Some(agent_message::Msg::CommandUpdate(_)) => "CommandUpdate",
        Some(agent_message::Msg::Goodbye(_)) => "Goodbye",
        Some(agent_message::Msg::FenceAck(_)) => "FenceAck",
        None => "an empty AgentMessage",
    }
}

impl AgentControlService {
    /// Reads the first message, which must be a valid Hello.
    async fn read_hello(&self, inbound: &mut Streaming<AgentMessage>) -> Result<Hello, Status> {
        let first = tokio::time::timeout(self.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                self.metrics.reject("hello_timeout");
                Status::from(ApiError::TimedOut(format!(
                    "no Hello within {:?}: the first message on a Connect stream must be Hello",
                    self.hello_timeout
                )))
            })?
            .inspect_err(|_| self.metrics.reject("bad_message"))?
            .ok_or_else(|| {
                self.metrics.reject("no_hello");
                Status::from(ApiError::Malformed(
                    "the stream ended before its Hello".into(),
                ))
            })?;
        let hello = match first.msg {
            Some(agent_message::Msg::Hello(h)) => h,
            other => {
                self.metrics.reject("not_hello");
                return Err(Status::from(ApiError::Malformed(format!(
                    "the first message on a Connect stream must be Hello, got {}",
                    kind_of(&other)
                ))));
            }
        };
        validate_hello(&hello).map_err(|e| {
            self.metrics.reject("invalid_hello");
            Status::from(e)
        })?;
        Ok(hello)
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentControl for AgentControlService {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<ConnectStream>, Status> {
        let info = request
            .extensions()
            .get::<drover_common::tls::server::PeerInfo>()
            .cloned();
        let peer = info
            .as_ref()
            .map(|i| i.remote.to_string())
            .unwrap_or_default();
        let cert = info.and_then(|i| i.cert);
        let mut inbound = request.into_inner();
        let hello = match self.read_hello(&mut inbound).await {
            Ok(h) => h,
            Err(status) => {
                warn!(%peer, code = ?status.code(), message = status.message(), "refused agent stream");
                return Err(status);
            }
        };
        // Identity comes from the certificate: the Hello's host id must be
        // the one it names, checked before anything is registered (so an
        // impostor displaces nobody).
        if self.auth.enforces() {
            use drover_common::tls::identity::Kind;
            let ok = cert
                .as_ref()
                .is_some_and(|c| c.id.kind == Kind::Agent && c.id.name == hello.host_id);
            if !ok {
                self.metrics.reject("identity");
                let who = cert
                    .as_ref()
                    .map(|c| c.id.to_string())
                    .unwrap_or_else(|| "a caller without a certificate".into());
                let status = Status::from(ApiError::PermissionDenied(format!(
                    "{who} may not connect as agent {:?}: an agent connects only as the host its certificate names",
                    hello.host_id
                )));
                warn!(%peer, message = status.message(), "refused agent stream");
                return Err(status);
            }
        }
        let host_id = hello.host_id.clone();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let cancel = self.shutdown.child_token();
        let (fenced_tx, fenced) = tokio::sync::watch::channel(HashMap::new());
        let handle = SessionHandle {
            outbound: tx.clone(),
            cancel: cancel.clone(),
            fenced,
        };
        let labels = format!("{:?}", hello.labels);
        let (session_id, replaced) = match self.registry.connect(hello, peer.clone(), handle) {
            Ok(registered) => registered,
            Err(full) => {
                self.metrics.reject("registry_full");
                warn!(%host_id, %peer, "refused agent stream: {full}");
                return Err(Status::from(ApiError::Full(full.to_string())));
            }
        };
        if let Some(old) = replaced {
            info!(%host_id, %peer, "a newer stream replaces the host's previous one");
            old.close(Status::from(ApiError::Replaced(format!(
                "replaced by a newer stream for host {host_id} from {peer}; two agents may share this host id"
            ))));
        }
        let welcome = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                cluster_id: self.cluster_id.clone(),
                coordinator_id: self.coordinator_id.clone(),
                session_id: session_id.to_string(),
                coordinators: self.leases.addresses(),
                epochs: self.leases.epochs(),
                report_metrics: Some(self.report.lock().expect("report lock").clone()),
            })),
        };
        // The queue is empty and its receiver alive: this cannot fail.
        let _ = tx.try_send(Box::new(Ok(welcome)));
        info!(%host_id, %peer, session_id, labels, "agent connected");
        // A stream lives no longer than the certificate it was opened with.
        let expires = cert.as_ref().map(|c| {
            let left = c.not_after - drover_common::time::now_unix_ms() as i64 / 1000;
            tokio::time::Instant::now() + Duration::from_secs(left.max(0) as u64)
        });
        let session = Session {
            host_id: host_id.clone(),
            session_id,
            expires,
            fenced: fenced_tx,
            registry: self.registry.clone(),
            pending: self.pending.clone(),
            metrics: self.metrics.clone(),
            outbound: tx,
            cancel,
        };
        tokio::spawn(
            session
                .run(inbound)
                .instrument(info_span!("agent", %host_id, session_id)),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|item| *item),
        )))
    }
}

/// The life of one registered stream after its Hello.
struct Session {
    host_id: String,
    session_id: u64,
    /// When the agent's certificate expires (TLS): the stream ends then.
    expires: Option<tokio::time::Instant>,
    /// The epochs the agent acknowledged (FenceAck), read by command sends.
    fenced: tokio::sync::watch::Sender<HashMap<u32, u64>>,
    registry: Arc<Registry>,
    pending: Arc<PendingCommands>,
    metrics: Metrics,
    outbound: mpsc::Sender<OutboundItem>,
    cancel: CancellationToken,
}

impl Session {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let departure = loop {
            let expired = async {
                match self.expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = self.cancel.cancelled() => break None,
                _ = expired => {
                    let status = Status::from(ApiError::Unauthenticated(
                        "the certificate this stream was opened with has expired; reconnect with a current one".into()));
                    break Some((Departure::Dropped("certificate expired".into()), Some(status)));
                }
                next = inbound.message() => next,
            };
            match next {
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(hb)),
                })) => {
                    if !self.registry.heartbeat(&self.host_id, self.session_id, hb) {
                        break None; // replaced; the registry closed us
                    }
                }
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Goodbye(bye)),
                })) => {
                    let reason = if bye.reason.is_empty() {
                        "agent said goodbye".to_string()
                    } else {
                        bye.reason
                    };
                    info!(%reason, "agent leaving");
                    self.registry.disconnect(
                        &self.host_id,
                        self.session_id,
                        Departure::Left(reason),
                    );
                }
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::FenceAck(ack)),
                })) => {
                    self.fenced.send_modify(|m| {
                        for e in &ack.epochs {
                            let held = m.entry(e.shard).or_insert(0);
                            *held = (*held).max(e.epoch);
                        }
                    });
                }
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::CommandUpdate(update)),
                })) => {
                    tracing::debug!(command_id = %update.command_id, status = ?update.status(), "command update");
                    if update.status() == CommandStatus::RejectedStale {
                        self.metrics.stale_commands.inc();
                        warn!(command_id = %update.command_id, shard = update.shard, epoch = update.epoch, reason = %update.reason, "the agent rejected a stale command: a newer leader owns the shard");
                    }
                    if let Some(pull) = &update.pull {
                        self.registry
                            .report_bad_peers(&self.host_id, &pull.bad_peers);
                    }
                    self.pending.deliver(&self.host_id, update);
                }
                Ok(Some(other)) => {
                    let status = Status::from(ApiError::Malformed(format!(
                        "unexpected {} after Hello on a Connect stream",
                        kind_of(&other.msg)
                    )));
                    break Some((
                        Departure::Dropped(status.message().to_string()),
                        Some(status),
                    ));
                }
                Ok(None) => {
                    break Some((
                        Departure::Dropped("stream closed by the agent".into()),
                        None,
                    ));
                }
                Err(status) => {
                    // Decoding errors (an oversized message, say) are told to
                    // the agent; transport errors have nobody left to tell.
                    let reason = format!("stream error: {}", status.message());
                    break Some((Departure::Dropped(reason), Some(status)));
                }
            }
        };
        if let Some((departure, status)) = departure {
            if let Some(status) = status {
                let _ = self.outbound.try_send(Box::new(Err(status)));
            }
            info!(?departure, "agent stream ended");
            self.registry
                .disconnect(&self.host_id, self.session_id, departure);
        } else if self.cancel.is_cancelled() {
            // Replaced or coordinator shutdown: whoever cancelled us already
            // queued the closing status; mark this session's end.
            self.registry.disconnect(
                &self.host_id,
                self.session_id,
                Departure::Dropped("stream closed by the coordinator".into()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            host_id: "web-1".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            agent_version: "0.1.0".into(),
            services: vec![],
            heartbeat_interval_ms: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn hello_validation_names_the_problem() {
        assert!(validate_hello(&hello()).is_ok());
        let mut h = hello();
        h.host_id.clear();
        assert_eq!(
            validate_hello(&h).unwrap_err().to_string(),
            "host id is empty"
        );
        let mut h = hello();
        h.labels.insert("bad key".into(), "x".into());
        assert!(
            validate_hello(&h)
                .unwrap_err()
                .to_string()
                .contains("bad key")
        );
        let mut h = hello();
        h.heartbeat_interval_ms = 0;
        assert!(
            validate_hello(&h)
                .unwrap_err()
                .to_string()
                .contains("heartbeat_interval_ms")
        );
        let mut h = hello();
        h.agent_version = "v".repeat(65);
        assert!(
            validate_hello(&h)
                .unwrap_err()
                .to_string()
                .contains("agent_version")
        );
    }
}
