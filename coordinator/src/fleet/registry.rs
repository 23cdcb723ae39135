//! In-memory host registry, fed by agent streams and read by the Deployer API.
//!
//! Invariants:
//! - a host has at most one live session; a newer one replaces the older,
//!   and updates carrying a replaced session's id are ignored;
//! - `LATE` is never stored: it is derived at read time from the age of the
//!   last heartbeat, so a frozen agent shows as late without any timer;
//! - nothing here touches disk;
//! - memory is bounded: a host away (disconnected or gone) longer than
//!   `Retention::forget_after` is forgotten by `sweep`, and at
//!   `Retention::max_hosts` a new host displaces the one away longest; when
//!   every host held is connected, a new one is refused. A connected host
//!   is never forgotten.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use drover_common::labels::Selector;
use drover_common::proto::{
    ConnectionState, CoordinatorMessage, Heartbeat, Hello, Host, HostMetrics, ServiceHealth,
    ServiceVersion,
};
use drover_common::time::{now_unix_micros, unix_ms};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::metrics::Metrics;

/// A host is late after this many heartbeat intervals without a heartbeat.
pub const LATE_AFTER_INTERVALS: u32 = 3;

/// One queued message (or closing status) for an agent. Boxed because a
/// channel allocates its slots in blocks of 32 up front, and an unboxed
/// `Status` is large: per connected agent that is the difference between
/// about 6 KiB and 256 bytes.
pub type OutboundItem = Box<Result<CoordinatorMessage, Status>>;

/// The coordinator's end of one agent stream.
#[derive(Clone)]
pub struct SessionHandle {
    pub outbound: mpsc::Sender<OutboundItem>,
    pub cancel: CancellationToken,
    /// The epoch per shard the agent acknowledged on this stream
    /// (FenceAck): it is commanded for a shard only at or below it.
    pub fenced: tokio::sync::watch::Receiver<HashMap<u32, u64>>,
}

impl SessionHandle {
    /// Ends the stream with `status`. If the outbound queue is full the
    /// status may not reach the agent, but the stream still ends.
    pub fn close(&self, status: Status) {
        let _ = self.outbound.try_send(Box::new(Err(status)));
        self.cancel.cancel();
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Departure {
    /// The agent said Goodbye.
    Left(String),
    /// The stream broke: crash, kill, network fault, protocol error.
    Dropped(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connected,
    Disconnected,
    Gone,
}

struct HostEntry {
    labels: HashMap<String, String>,
    agent_version: String,
    services: Vec<ServiceVersion>,
    session_id: u64,
    session: Option<SessionHandle>,
    link: Link,
    state_reason: String,
    state_since: SystemTime,
    connected_at: SystemTime,
    peer: String,
    heartbeat_interval: Duration,
    /// Last heartbeat, or Hello when none came yet on this stream.
    last_seen: Instant,
    last_heartbeat_wall: Option<SystemTime>,
    sequence: u64,
    dropped: u64,
    metrics: Option<HostMetrics>,
    health: Vec<ServiceHealth>,
    /// The latest heartbeat's disk/journal problems (bounded on arrival).
    problems: Vec<String>,
    /// Where the agent serves chunks to peers (empty: it does not).
    chunk_address: String,
    /// Artifacts it holds by chunks (bounded on arrival; tracker).
    held: Vec<String>,
}

impl HostEntry {
    fn state(&self, now: Instant) -> ConnectionState {
        match self.link {
            Link::Connected
                if now.saturating_duration_since(self.last_seen)
                    > self.heartbeat_interval * LATE_AFTER_INTERVALS =>
            {
                ConnectionState::Late
            }
            Link::Connected => ConnectionState::Connected,
            Link::Disconnected => ConnectionState::Disconnected,
            Link::Gone => ConnectionState::Gone,
        }
    }

    fn to_proto(&self, host_id: &str, now: Instant) -> Host {
        let state = self.state(now);
        let state_reason = if state == ConnectionState::Late {
            format!(
                "no heartbeat for {} ms (interval {} ms)",
                now.saturating_duration_since(self.last_seen).as_millis(),
                self.heartbeat_interval.as_millis()
            )
        } else {
            self.state_reason.clone()
        };
        Host {
            host_id: host_id.to_string(),
            labels: self.labels.clone(),
            agent_version: self.agent_version.clone(),
            state: state as i32,
            state_reason,
            connected_at_unix_ms: unix_ms(self.connected_at),
            state_since_unix_ms: unix_ms(self.state_since),
            last_heartbeat_unix_ms: self.last_heartbeat_wall.map(unix_ms).unwrap_or(0),
            last_heartbeat_age_ms: now.saturating_duration_since(self.last_seen).as_millis() as u64,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
            heartbeat_sequence: self.sequence,
            dropped_heartbeats: self.dropped,
            peer_address: self.peer.clone(),
            services: self.services.clone(),
            metrics: self.metrics,
            health: self.health.clone(),
            problems: self.problems.clone(),
        }
    }
}

/// At most [`MAX_PROBLEMS`] problems of at most [`MAX_PROBLEM_CHARS`]
/// characters each: what an agent reports is shown, never trusted to be short.
fn bounded_problems(mut problems: Vec<String>) -> Vec<String> {
    problems.truncate(MAX_PROBLEMS);
    for p in &mut problems {
        if let Some((cut, _)) = p.char_indices().nth(MAX_PROBLEM_CHARS) {
            p.truncate(cut);
            p.push('…');
        }
    }
    problems
}
const MAX_PROBLEMS: usize = 8;

/// At most [`MAX_HELD`] artifacts a host says it holds.
fn bounded_held(mut held: Vec<String>) -> Vec<String> {
    held.truncate(MAX_HELD);
    held
}
const MAX_HELD: usize = 64;
const MAX_PROBLEM_CHARS: usize = 512;

/// How much the registry keeps (see the invariants above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// `--host-retention`: a host away this long is forgotten.
    pub forget_after: Duration,
    /// `--max-hosts`: the most hosts held.
    pub max_hosts: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            forget_after: Duration::from_secs(7 * 24 * 3600),
            max_hosts: 250_000,
        }
    }
}

/// A Hello the registry cannot take: every host it holds is connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this coordinator holds its limit of {0} hosts, all connected (--max-hosts); connect to another coordinator or raise the limit"
)]
pub struct RegistryFull(pub usize);

/// Hosts this coordinator has seen, connected or away (within the retention).
pub struct Registry {
    /// By host id, so pages come in id order.
    hosts: Mutex<BTreeMap<String, HostEntry>>,
    next_session: AtomicU64,
    metrics: Metrics,
    retention: Retention,
    /// Peers pullers reported (tracker rule 3).
    bad_peers: super::tracker::BadPeers,
}

impl Registry {
    pub fn new(metrics: Metrics, retention: Retention) -> Registry {
        Registry {
            hosts: Mutex::new(BTreeMap::new()),
            next_session: AtomicU64::new(1),
            bad_peers: Default::default(),
            metrics,
            retention,
        }
    }

    /// Forgets hosts away longer than the retention; returns how many.
    pub fn sweep(&self) -> usize {
        let now = SystemTime::now();
        let forget_after = self.retention.forget_after;
        let mut hosts = self.hosts.lock().expect("registry lock poisoned");
        let before = hosts.len();
        hosts.retain(|id, e| {
            let away = now.duration_since(e.state_since).unwrap_or_default();
            let keep = e.link == Link::Connected || away < forget_after;
            if !keep {
                tracing::info!(host = %id, since = ?e.state_since, "host forgotten: away past the retention");
            }
            keep
        });
        let forgotten = before - hosts.len();
        self.metrics.hosts_known.set(hosts.len() as i64);
        drop(hosts);
        self.metrics.hosts_forgotten.inc_by(forgotten as u64);
        forgotten
    }

    /// Makes room for one new host at the limit: the host away longest goes.
    fn make_room(&self, hosts: &mut BTreeMap<String, HostEntry>) -> Result<(), RegistryFull> {
        if hosts.len() < self.retention.max_hosts {
            return Ok(());
        }
        let oldest = hosts
            .iter()
            .filter(|(_, e)| e.link != Link::Connected)
            .min_by_key(|(_, e)| e.state_since)
            .map(|(id, _)| id.clone())
            .ok_or(RegistryFull(self.retention.max_hosts))?;
        hosts.remove(&oldest);
        tracing::info!(host = %oldest, "host forgotten: displaced at the host limit");
        self.metrics.hosts_forgotten.inc();
        Ok(())
    }

    /// Registers a validated Hello. Returns the new session id and the
    /// session it replaced, which the caller must close.
    pub fn connect(
        &self,
        hello: Hello,
        peer: String,
        session: SessionHandle,
    ) -> Result<(u64, Option<SessionHandle>), RegistryFull> {
        let now_wall = SystemTime::now();
        let interval = Duration::from_millis(u64::from(hello.heartbeat_interval_ms.max(1)));
        let mut hosts = self.hosts.lock().expect("registry lock poisoned");
        if !hosts.contains_key(&hello.host_id) {
            self.make_room(&mut hosts)?;
        }
        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let previous = hosts.get_mut(&hello.host_id).and_then(|e| e.session.take());
        let entry = HostEntry {
            labels: hello.labels,
            agent_version: hello.agent_version,
            services: hello.services,
            session_id,
            session: Some(session),
            link: Link::Connected,
            state_reason: String::new(),
            state_since: now_wall,
            connected_at: now_wall,
            peer,
            heartbeat_interval: interval,
            last_seen: Instant::now(),
            last_heartbeat_wall: None,
            sequence: 0,
            dropped: 0,
            metrics: None,
            health: Vec::new(),
            problems: Vec::new(),
            chunk_address: hello.peer_address,
            held: bounded_held(hello.held_artifacts),
        };
        hosts.insert(hello.host_id, entry);
        self.metrics.hosts_known.set(hosts.len() as i64);
        drop(hosts);
        if previous.is_some() {
            self.metrics.streams_replaced.inc();
        } else {
            self.metrics.connected_agents.inc();
        }
        Ok((session_id, previous))
    }

    /// Records a heartbeat of the live session `session_id` of `host_id`.
    /// Returns false when that session was replaced meanwhile.
    pub fn heartbeat(&self, host_id: &str, session_id: u64, hb: Heartbeat) -> bool {
        let lag_micros = now_unix_micros().saturating_sub(hb.sent_at_unix_micros);
        let mut hosts = self.hosts.lock().expect("registry lock poisoned");
        let Some(entry) = hosts
            .get_mut(host_id)
            .filter(|e| e.session_id == session_id)
        else {
            return false;
        };
        let newly_dropped = hb.dropped_heartbeats.saturating_sub(entry.dropped);
        entry.last_seen = Instant::now();
        entry.last_heartbeat_wall = Some(SystemTime::now());
        entry.sequence = hb.sequence;
        entry.dropped = hb.dropped_heartbeats;
        entry.metrics = hb.host;
        entry.health = hb.services;
        entry.problems = bounded_problems(hb.problems);
        if entry.held != hb.held_artifacts {
            entry.held = bounded_held(hb.held_artifacts);
        }
        if entry.services != hb.versions {
            entry.services = hb.versions;
        }
        drop(hosts);
        self.metrics.heartbeats.inc();
        self.metrics
            .heartbeat_lag_seconds
            .observe(lag_micros as f64 / 1e6);
        if newly_dropped > 0 {
            self.metrics.agent_dropped_heartbeats.inc_by(newly_dropped);
        }
        true
    }

    /// Marks the end of session `session_id`. A Goodbye followed by the end
    /// of the stream stays `GONE`; a replaced session changes nothing.
    pub fn disconnect(&self, host_id: &str, session_id: u64, how: Departure) {
        let mut hosts = self.hosts.lock().expect("registry lock poisoned");
        let Some(entry) = hosts
            .get_mut(host_id)
            .filter(|e| e.session_id == session_id)
        else {
            return;
        };
        let was_connected = entry.session.take().is_some();
        let (link, reason) = match how {
            Departure::Left(r) => (Link::Gone, r),
            Departure::Dropped(r) => (Link::Disconnected, r),
        };
        if entry.link == Link::Gone && link == Link::Disconnected {
            // The stream's end after a Goodbye is expected, not a failure.
        } else if entry.link != link {
            entry.link = link;
            entry.state_reason = reason;
            entry.state_since = SystemTime::now();
        }
        drop(hosts);
        if was_connected {
            self.metrics.connected_agents.dec();
        }
    }

    /// Hosts matching `selector`, sorted by host id.
    pub fn list(&self, selector: &Selector) -> Vec<Host> {
        let now = Instant::now();
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        let out: Vec<Host> = hosts
            .iter()
            .filter(|(_, e)| selector.matches(&e.labels))
            .map(|(id, e)| e.to_proto(id, now))
            .collect();
        drop(hosts);
        out
    }

    /// One page of the hosts matching `selector`, in host id order, after
    /// host id `after` (empty: from the start); and the id to continue
    /// after, when more may follow.
    pub fn page(
        &self,
        selector: &Selector,
        after: &str,
        limit: usize,
    ) -> (Vec<Host>, Option<String>) {
        use std::ops::Bound;
        let now = Instant::now();
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        let start = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after.to_string())
        };
        let mut page: Vec<Host> = hosts
            .range((start, Bound::Unbounded))
            .filter(|(_, e)| selector.matches(&e.labels))
            .take(limit + 1)
            .map(|(id, e)| e.to_proto(id, now))
            .collect();
        drop(hosts);
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|h| h.host_id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// The tracker's answer: up to `k` peers for `puller` to fetch
    /// `artifact`'s chunks from (rules in `tracker.rs`).
    pub fn peers_for(
        &self,
        artifact: &str,
        puller: &str,
        k: usize,
    ) -> Vec<drover_common::proto::PeerSource> {
        let labels = self.labels(puller).unwrap_or_default();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ puller
                .bytes()
                .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        super::tracker::choose(
            self.holders(artifact, puller),
            labels.get("zone").map(String::as_str),
            labels.get("region").map(String::as_str),
            k,
            &mut rng,
        )
    }

    /// Tracker rule 3: `reporter`'s pull dropped these peers.
    pub fn report_bad_peers(&self, reporter: &str, bad: &[drover_common::proto::BadPeer]) {
        let now = Instant::now();
        for peer in bad.iter().take(16) {
            tracing::warn!(reporter, peer = %peer.host_id, reason = %peer.reason, "a puller dropped a bad peer; it is left out of tracker answers for a while");
            self.bad_peers.report(&peer.host_id, now);
        }
    }

    /// Tracker rule 1: connected hosts other than `puller` that serve
    /// chunks, hold `artifact` whole and were not reported (rule 3).
    pub fn holders(&self, artifact: &str, puller: &str) -> Vec<super::tracker::Holder> {
        let now = Instant::now();
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        hosts
            .iter()
            .filter(|(id, e)| {
                id.as_str() != puller
                    && !self.bad_peers.is_bad(id, now)
                    && e.state(now) == ConnectionState::Connected
                    && !e.chunk_address.is_empty()
                    && e.held.iter().any(|a| a == artifact)
            })
            .map(|(id, e)| super::tracker::Holder {
                host_id: id.clone(),
                address: e.chunk_address.clone(),
                zone: e.labels.get("zone").cloned(),
                region: e.labels.get("region").cloned(),
            })
            .collect()
    }

    /// `host_id` holds `artifact` now (its pull succeeded); its next
    /// heartbeat says so too.
    pub fn add_held(&self, host_id: &str, artifact: &str) {
        let mut hosts = self.hosts.lock().expect("registry lock poisoned");
        if let Some(e) = hosts.get_mut(host_id)
            && !e.held.iter().any(|a| a == artifact)
            && e.held.len() < MAX_HELD
        {
            e.held.push(artifact.to_string());
        }
    }

    /// A host's labels, if it is known.
    pub fn labels(&self, host_id: &str) -> Option<HashMap<String, String>> {
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        hosts.get(host_id).map(|e| e.labels.clone())
    }

    pub fn get(&self, host_id: &str) -> Option<Host> {
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        hosts
            .get(host_id)
            .map(|e| e.to_proto(host_id, Instant::now()))
    }

    /// The live stream of `host_id`, if it is connected.
    pub fn session(&self, host_id: &str) -> Option<SessionHandle> {
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        hosts.get(host_id).and_then(|e| e.session.clone())
    }

    /// Queues `message` on `host_id`'s live stream, if it has one (a full
    /// queue gets it as soon as it has room).
    pub fn send_to(&self, host_id: &str, message: CoordinatorMessage) -> bool {
        let Some(session) = self.session(host_id) else {
            return false;
        };
        if let Err(mpsc::error::TrySendError::Full(item)) =
            session.outbound.try_send(Box::new(Ok(message)))
        {
            tokio::spawn(async move {
                let _ = session.outbound.send(item).await;
            });
        }
        true
    }

    /// Queues `message` on every live stream (a Fence after winning shards).
    /// A full queue gets it as soon as it has room; nothing is dropped.
    pub fn broadcast(&self, message: CoordinatorMessage) {
        let sessions: Vec<SessionHandle> = {
            let hosts = self.hosts.lock().expect("registry lock poisoned");
            hosts.values().filter_map(|e| e.session.clone()).collect()
        };
        for session in sessions {
            if let Err(mpsc::error::TrySendError::Full(item)) =
                session.outbound.try_send(Box::new(Ok(message.clone())))
            {
                tokio::spawn(async move {
                    let _ = session.outbound.send(item).await;
                });
            }
        }
    }

    /// Closes every live stream with `status` (coordinator shutdown).
    pub fn close_all(&self, status: Status) {
        let hosts = self.hosts.lock().expect("registry lock poisoned");
        for session in hosts.values().filter_map(|e| e.session.as_ref()) {
            session.close(status.clone());
        }
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
