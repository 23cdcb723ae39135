//! One agent stream to one coordinator, kept up for the agent's lifetime.
//!
//! Each attempt connects, sends Hello, then heartbeats; the coordinator
//! answers Welcome. When the stream breaks the connection waits (jittered
//! exponential backoff, capped) and tries again, Hello first. On shutdown it
//! sends Goodbye, half-closes, and waits briefly for the coordinator to end
//! the stream, so the host shows as gone rather than failed.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use backon::BackoffBuilder;
use drover_common::proto::agent_control_client::AgentControlClient;
use drover_common::proto::{
    AgentMessage, CoordinatorMessage, FenceAck, Goodbye, Hello, HostFlags, ReportMetrics,
    ShardEpoch, agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::directory::Directory;
use crate::heartbeat::{self, HeartbeatFeed};

/// Reconnect delays: from `min`, doubling with up to 100% jitter, never
/// above `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let max = self.max;
        // Jitter adds up to 100%, so grow to max/2 and let jitter fill the rest.
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min.min(max / 2))
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |d| d.min(max))
    }
}

/// Builds the Hello sent at every (re)connect, so it always tells the
/// current truth about the host's services.
pub type HelloSource = Arc<dyn Fn() -> Hello + Send + Sync>;

/// Receives each command with the channel its updates go back on. It must
/// not block: it spawns the work.
pub type CommandSink =
    Arc<dyn Fn(drover_common::proto::Command, mpsc::Sender<AgentMessage>) + Send + Sync>;

/// Receives the epochs of shards a coordinator leads (Welcome, Fence): the
/// executor raises and persists its highest epoch for each, and says
/// whether they are durable (only then are they acknowledged).
pub type FenceSink = Arc<dyn Fn(&[ShardEpoch]) -> bool + Send + Sync>;

/// Receives the cluster id of every Welcome, and whether the coordinator
/// proved its identity with a certificate; runs before the Welcome's epochs.
pub type ClusterSink = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// Receives the metrics heartbeats must carry (Welcome, ReportMetrics).
pub type ReportSink = Arc<dyn Fn(&ReportMetrics) + Send + Sync>;

/// Receives the host's feature flags (HostFlags: the whole set each time).
pub type FlagSink = Arc<dyn Fn(&HostFlags) + Send + Sync>;

/// How long a leaving agent waits for the coordinator to close the stream.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

pub struct Connection {
    pub coordinator: String,
    pub hello: HelloSource,
    pub heartbeats: HeartbeatFeed,
    pub backoff: Backoff,
    pub shutdown: CancellationToken,
    /// Heartbeats this connection dropped since the agent started.
    pub dropped: Arc<AtomicU64>,
    pub commands: CommandSink,
    pub fence: FenceSink,
    pub cluster: ClusterSink,
    /// Told when this connection first got a Welcome or failed to connect
    /// (the agent is "ready" for systemd after its first attempt).
    pub contact: Arc<tokio::sync::Notify>,
    pub report: ReportSink,
    pub flags: FlagSink,
    /// Where discovered coordinators are announced (None: only the
    /// configured ones, as drover-fleetsim does).
    pub directory: Option<Arc<Directory>>,
    /// Plaintext, or mutual TLS with the agent's certificate.
    pub dialer: drover_common::tls::client::Dialer,
}

enum Ended {
    /// The agent is shutting down.
    Shutdown,
    /// Another stream of this agent already reaches the same coordinator.
    Duplicate(String),
    /// The stream broke; `welcomed` says whether it had been established.
    Broken { welcomed: bool, reason: String },
}

impl Connection {
    /// Keeps a stream up until shutdown.
    pub async fn run(self) {
        let mut delays = self.backoff.delays();
        loop {
            match self.attempt().await {
                Ended::Shutdown => return,
                Ended::Duplicate(id) => {
                    info!(coordinator = %self.coordinator, coordinator_id = %id, "another address already reaches this coordinator; closing this one");
                    return;
                }
                Ended::Broken { welcomed, reason } => {
                    if welcomed {
                        delays = self.backoff.delays();
                    }
                    let delay = delays.next().unwrap_or(self.backoff.max);
                    warn!(coordinator = %self.coordinator, %reason, retry_in = ?delay, "stream down");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn attempt(&self) -> Ended {
        let broken = |welcomed, reason: String| Ended::Broken { welcomed, reason };
        let channel = tokio::select! {
            _ = self.shutdown.cancelled() => return Ended::Shutdown,
            c = self.dialer.connect(&self.coordinator) => c,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                self.contact.notify_one();
                return broken(
                    false,
                    format!("connect: {}", drover_common::grpc::error_chain(&e)),
                );
            }
        };
        let mut client = AgentControlClient::new(channel);

        let (control, control_rx) = mpsc::channel::<AgentMessage>(16);
        let hello = (self.hello)();
        control
            .try_send(AgentMessage {
                msg: Some(agent_message::Msg::Hello(hello)),
            })
            .expect("fresh channel has room");
        let Some(heartbeats) = self.heartbeats.subscribe() else {
            return Ended::Shutdown; // the producer has stopped
        };
        let heartbeats =
            heartbeat::stream_for(heartbeats, self.dropped.clone()).map(|hb| AgentMessage {
                msg: Some(agent_message::Msg::Heartbeat(hb)),
            });
        let outbound = ReceiverStream::new(control_rx).merge(heartbeats);

        let response = tokio::select! {
            _ = self.shutdown.cancelled() => return Ended::Shutdown,
            r = client.connect(outbound) => r,
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(status) => return broken(false, describe(&status)),
        };

        let mut control = Some(control);
        let mut welcomed = false;
        let mut coordinator_id = String::new();
        let ended = self
            .read(
                &mut inbound,
                &mut control,
                &mut welcomed,
                &mut coordinator_id,
            )
            .await;
        if welcomed && let Some(directory) = &self.directory {
            directory.down(&self.coordinator, &coordinator_id);
        }
        ended
    }

    /// Raises (and persists) the epochs, then tells the coordinator, which
    /// commands this host for those shards only after the acknowledgement.
    async fn raise_and_ack(
        &self,
        epochs: &[ShardEpoch],
        control: &Option<mpsc::Sender<AgentMessage>>,
    ) {
        let durable = (self.fence)(epochs);
        if let Some(tx) = control
            && durable
            && !epochs.is_empty()
        {
            let _ = tx
                .send(AgentMessage {
                    msg: Some(agent_message::Msg::FenceAck(FenceAck {
                        epochs: epochs.to_vec(),
                    })),
                })
                .await;
        }
    }

    /// Reads the coordinator's messages until the stream ends.
    async fn read(
        &self,
        inbound: &mut tonic::Streaming<CoordinatorMessage>,
        control: &mut Option<mpsc::Sender<AgentMessage>>,
        welcomed: &mut bool,
        coordinator_id: &mut String,
    ) -> Ended {
        let broken = |welcomed, reason: String| Ended::Broken { welcomed, reason };
        let mut leaving_deadline = None;
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled(), if control.is_some() => {
                    let goodbye = AgentMessage {
                        msg: Some(agent_message::Msg::Goodbye(Goodbye {
                            reason: "agent shutting down".into(),
                        })),
                    };
                    if let Some(tx) = control.take() {
                        let _ = tx.send(goodbye).await;
                        // Dropping the sender half-closes once heartbeats end too.
                    }
                    leaving_deadline = Some(tokio::time::Instant::now() + GOODBYE_WAIT);
                    continue;
                }
                _ = sleep_until_opt(leaving_deadline) => return Ended::Shutdown,
                next = inbound.message() => next,
            };
            match next {
                Ok(Some(msg)) => match msg.msg {
                    Some(coordinator_message::Msg::Welcome(w)) => {
                        if let Some(directory) = &self.directory
                            && !directory.welcomed(
                                &self.coordinator,
                                &w.coordinator_id,
                                &w.coordinators,
                            )
                        {
                            return Ended::Duplicate(w.coordinator_id);
                        }
                        *welcomed = true;
                        *coordinator_id = w.coordinator_id.clone();
                        (self.cluster)(&w.cluster_id, self.dialer.is_tls());
                        self.contact.notify_one();
                        self.raise_and_ack(&w.epochs, control).await;
                        if let Some(r) = &w.report_metrics {
                            (self.report)(r);
                        }
                        info!(coordinator = %self.coordinator, coordinator_id = %w.coordinator_id, session = %w.session_id, "connected");
                    }
                    Some(coordinator_message::Msg::Fence(f)) => {
                        self.raise_and_ack(&f.epochs, control).await;
                    }
                    Some(coordinator_message::Msg::ReportMetrics(r)) => {
                        (self.report)(&r);
                    }
                    Some(coordinator_message::Msg::Flags(f)) => {
                        (self.flags)(&f);
                    }
                    Some(coordinator_message::Msg::Peers(p)) => {
                        if let Some(directory) = &self.directory {
                            directory.peers(coordinator_id, &p.coordinators);
                        }
                    }
                    Some(coordinator_message::Msg::Command(cmd)) => {
                        debug!(command_id = %cmd.command_id, "command received");
                        if let Some(reply) = &control {
                            (self.commands)(cmd, reply.clone());
                        }
                    }
                    Some(coordinator_message::Msg::Ack(ack)) => {
                        debug!(command_id = %ack.command_id, "ack");
                    }
                    None => {}
                },
                Ok(None) if leaving_deadline.is_some() => return Ended::Shutdown,
                Ok(None) => return broken(*welcomed, "the coordinator ended the stream".into()),
                Err(_) if leaving_deadline.is_some() => return Ended::Shutdown,
                Err(status) => return broken(*welcomed, describe(&status)),
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_never_passes_the_cap() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let delays: Vec<Duration> = b.delays().take(50).collect();
        assert!(delays.iter().all(|d| *d <= b.max), "{delays:?}");
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        assert!(
            delays[20] >= Duration::from_secs(1),
            "grows to the cap: {delays:?}"
        );
        let distinct: std::collections::HashSet<_> = delays[20..].iter().collect();
        assert!(distinct.len() > 1, "jittered even at the cap: {delays:?}");
    }
}
