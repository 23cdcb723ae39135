//! Executes coordinator commands: Pull, Verify, Restart, Rollback.
//!
//! Rules, in the order they are applied to every command:
//! 1. Fencing: a command whose epoch is below the highest seen for its shard
//!    is answered REJECTED_STALE and does nothing; one above it is answered
//!    REJECTED_UNFENCED (epochs rise only with a Fence or Welcome from the
//!    shard's leader, persisted before they count, so no command can raise
//!    one). After the per-service lock is taken (rule 3) the epoch is
//!    checked again: a Fence that arrived while it waited wins. Epochs
//!    belong to the coordinators' cluster id; a new one (a rebuilt store)
//!    resets them, logged. Raised epochs are acknowledged (FenceAck) only
//!    once persisted; coordinators command a shard's hosts only after that.
//! 2. Idempotency: a command id with a recorded result gets that result
//!    again; one still running is joined, not started twice.
//! 3. Commands for one service run one at a time; different services run
//!    in parallel.
//! 4. Restart to the release already active and ready is a no-op success,
//!    unless it asks to start it anew (a canary's fresh baseline);
//!    Rollback never downloads; Stop of a stopped unit succeeds.
//! 6. Blue-green slots (`crate::unit`): a Restart with a slot starts the
//!    release in that slot, on the slot's port, and leaves the other slot
//!    running; a slot whose port another process holds is refused before
//!    anything starts. Both slots share the service's releases, which are
//!    pruned by the service's record and never while any slot runs one.
//! 5. With trusted signers (`--trust-signer`), a Pull accepts an artifact
//!    only with a valid signature from one of them (checked before any
//!    byte is fetched) and keeps it beside the cached archive; Restart and
//!    Rollback check that kept signature again before anything starts. So
//!    a coordinator alone cannot run code on a host.
//! 7. A Restart or Rollback may carry a config bundle (or `no_config`):
//!    it is checked, its secrets resolved and written whole before
//!    anything changes (`crate::config_bundles`; a missing secret fails the
//!    command by name with nothing changed), recorded in the journal, and
//!    linked as `$DROVER_CONFIG_DIR`. A new release starts with it; for
//!    the release already running, the manifest's `config.reload` says
//!    how it is taken: a restart, SIGHUP (the process must stay up and
//!    ready), or nothing. The config linked already (what the service
//!    reads, whatever the journal says) is rule 4's no-op.

mod activate;
mod hooks;
mod pulling;
mod recovery;
mod reload;
mod signatures;
mod spec;

use crate::config_bundles::ConfigChange;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_common::artifact::Digest;
use drover_common::proto::{
    AgentMessage, Command, CommandStatus, ServiceVersion, ShardEpoch, command,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::disk::{self, DiskHealth};
use crate::health::HealthBoard;
use crate::pull::{self, PullLimits};
use crate::releases::{Layout, validate_service};
use crate::runtime::{Runtime, UserPolicy};
use crate::state::{Journal, LocalState, RecordedResult, ServiceRecord};
use crate::unit::Unit;

/// Lines of service output attached to a failure.
const TAIL_LINES: usize = 20;
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Without a readiness probe, a service is ready after running this long.
const READY_WITHOUT_PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub layout: Layout,
    /// Host-level environment passed to every service (`--env`).
    pub env: BTreeMap<String, String>,
    /// Rule 6: the ports of each service's blue-green slots.
    pub slot_ports: crate::unit::SlotPorts,
    /// Whom services run as (`--service-user`, `--allow-root-services`).
    pub users: UserPolicy,
    pub keep_releases: usize,
    pub limits: PullLimits,
    /// Stop what a crashed predecessor left running (process runtime).
    pub kill_leftovers: bool,
    /// How artifact sources are dialled (the agent's certificate under TLS).
    pub dialer: drover_common::tls::client::Dialer,
    /// Rule 5; empty: signatures are not checked.
    pub signers: drover_common::artifact::signature::TrustedSigners,
    /// Where journal and pull disk faults are reported (heartbeats).
    pub disk: Arc<DiskHealth>,
    /// How peers are dialled: under TLS, their agent certificates of the
    /// fleet's CA are accepted (`dialer` accepts only coordinators).
    pub peer_dialer: drover_common::tls::client::Dialer,
    /// Artifacts held by chunks (reused by pulls, served to peers).
    pub chunks: Arc<crate::chunk_cache::ChunkCache>,
    /// Where config bundles' secret references are resolved from.
    pub secrets: crate::config_bundles::Secrets,
}

/// The final answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: CommandStatus,
    pub reason: String,
    pub output_tail: String,
    /// A Pull's sources of bytes (not journaled: a repeated answer has none).
    pub pull: Option<drover_common::proto::PullStats>,
    /// It failed at the command's deadline (a step hung: the host is stuck).
    pub deadline_exceeded: bool,
}

impl Outcome {
    fn ok(reason: impl Into<String>) -> Outcome {
        Outcome {
            status: CommandStatus::Succeeded,
            reason: reason.into(),
            output_tail: String::new(),
            pull: None,
            deadline_exceeded: false,
        }
    }

    fn failed(reason: impl Into<String>) -> Outcome {
        Outcome {
            status: CommandStatus::Failed,
            reason: reason.into(),
            output_tail: String::new(),
            pull: None,
            deadline_exceeded: false,
        }
    }

    fn with_tail(mut self, tail: String) -> Outcome {
        self.output_tail = tail;
        self
    }

    /// Marks it failed at the command's deadline.
    fn at_deadline(mut self) -> Outcome {
        self.deadline_exceeded = true;
        self
    }

    fn with_pull(mut self, stats: drover_common::proto::PullStats) -> Outcome {
        self.pull = Some(stats);
        self
    }

    /// The final CommandUpdate of `cmd` saying this.
    fn update(&self, cmd: &Command) -> drover_common::proto::AgentMessage {
        let mut msg = cmd.update(self.status, &self.reason, &self.output_tail);
        if let Some(drover_common::proto::agent_message::Msg::CommandUpdate(u)) = &mut msg.msg {
            u.pull = self.pull.clone();
            u.deadline_exceeded = self.deadline_exceeded;
        }
        msg
    }
}

pub struct Executor {
    cfg: ExecutorConfig,
    journal: Mutex<Journal>,
    runtime: Arc<dyn Runtime>,
    board: Arc<HealthBoard>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse::<Digest>().map_err(|e| e.to_string())
}

impl Executor {
    pub fn new(
        cfg: ExecutorConfig,
        journal: Journal,
        runtime: Arc<dyn Runtime>,
        board: Arc<HealthBoard>,
    ) -> Arc<Executor> {
        Arc::new(Executor {
            cfg,
            journal: Mutex::new(journal),
            runtime,
            board,
            inflight: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// What every service runs now, for Hello.
    pub fn services(&self) -> Vec<ServiceVersion> {
        let journal = self.journal.lock().expect("journal lock");
        journal
            .state
            .services
            .iter()
            .filter(|(_, r)| r.current.is_some())
            .map(|(key, r)| {
                let unit = Unit::from_key(key);
                ServiceVersion {
                    service: unit.service,
                    current_artifact: r.current.clone().unwrap_or_default(),
                    previous_artifact: r.previous.clone().unwrap_or_default(),
                    current_since_unix_ms: r.current_since_unix_ms,
                    slot: unit.slot as i32,
                    config: r.config.clone().unwrap_or_default(),
                }
            })
            .collect()
    }

    fn service_lock(&self, service: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("locks lock")
            .entry(service.to_string())
            .or_default()
            .clone()
    }

    /// Changes the journal: in memory only once it is on disk.
    fn save(&self, change: impl FnOnce(&mut crate::state::LocalState)) -> Result<(), String> {
        let mut journal = self.journal.lock().expect("journal lock");
        match journal.commit(change) {
            Ok(()) => {
                self.cfg.disk.clear(disk::Source::Journal);
                Ok(())
            }
            Err(e) => {
                let problem = format!("journal: cannot write the state journal: {e}");
                self.cfg.disk.set(disk::Source::Journal, problem.clone());
                Err(problem)
            }
        }
    }

    /// The journal's record of `unit` (its key; the plain service's record
    /// also keeps the service's releases).
    fn record(&self, unit: &Unit) -> ServiceRecord {
        self.journal
            .lock()
            .expect("journal lock")
            .state
            .services
            .get(&unit.key())
            .cloned()
            .unwrap_or_default()
    }

    /// Raises the highest epoch of each shard to what a coordinator says its
    /// leader holds (Welcome, Fence), persisted before anything else can
    /// run: from then on a deposed leader's commands are rejected-stale.
    /// Returns whether the epochs are durable (then they are acknowledged).
    pub fn raise_epochs(&self, epochs: &[ShardEpoch]) -> bool {
        let raised = {
            let journal = self.journal.lock().expect("journal lock");
            epochs.iter().any(|e| {
                journal
                    .state
                    .epochs
                    .get(&e.shard)
                    .is_none_or(|h| e.epoch > *h)
            })
        };
        if !raised {
            return true;
        }
        let raise = |state: &mut crate::state::LocalState| {
            for e in epochs {
                let highest = state.epochs.entry(e.shard).or_insert(0);
                *highest = (*highest).max(e.epoch);
            }
        };
        // Not on disk, not raised: commands at the new epoch stay
        // REJECTED_UNFENCED until a Fence is persisted.
        if let Err(e) = self.save(raise) {
            warn!(error = %e, "cannot persist the shard epochs; not acknowledging them");
            return false;
        }
        true
    }

    /// Rule 1's cluster: adopts the coordinators' cluster id; a different
    /// one than the journal's resets every shard's epoch (logged).
    pub fn join_cluster(&self, cluster_id: &str, authenticated: bool) {
        if cluster_id.is_empty() {
            return;
        }
        let mut journal = self.journal.lock().expect("journal lock");
        if journal.state.cluster_id == cluster_id {
            return;
        }
        if !journal.state.cluster_id.is_empty() {
            warn!(
                from = %journal.state.cluster_id,
                to = %cluster_id,
                authenticated,
                "the coordinators belong to a new cluster (a rebuilt store): resetting every shard epoch"
            );
        }
        let reset = !journal.state.cluster_id.is_empty();
        let adopt = |state: &mut crate::state::LocalState| {
            if reset {
                state.epochs.clear();
            }
            state.cluster_id = cluster_id.to_string();
        };
        if let Err(e) = journal.commit(adopt) {
            warn!(error = %e, "cannot persist the cluster id");
        }
    }

    /// The highest epoch this host holds for `shard`.
    fn epoch_of(&self, shard: u32) -> u64 {
        self.journal
            .lock()
            .expect("journal lock")
            .state
            .epochs
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// Handles one command from a coordinator; every update goes to `reply`.
    pub async fn handle(self: &Arc<Self>, cmd: Command, reply: mpsc::Sender<AgentMessage>) {
        // 1. Fencing, then 2. a recorded result.
        enum Gate {
            Reject(String),
            Unfenced(String),
            Recorded(RecordedResult),
            Run,
        }
        let gate = {
            let journal = self.journal.lock().expect("journal lock");
            let highest = journal.state.epochs.get(&cmd.shard).copied().unwrap_or(0);
            if cmd.epoch < highest {
                Gate::Reject(format!(
                    "epoch {} is below {highest}, the highest seen for shard {}; a newer leader owns this shard",
                    cmd.epoch, cmd.shard
                ))
            } else if cmd.epoch > highest {
                Gate::Unfenced(format!(
                    "epoch {} is above {highest}, the epoch shard {} was fenced at here; only the shard leader's Fence raises it",
                    cmd.epoch, cmd.shard
                ))
            } else {
                match journal.state.result(&cmd.command_id) {
                    Some(r) => Gate::Recorded(r.clone()),
                    None => Gate::Run,
                }
            }
        };
        match gate {
            Gate::Reject(reason) => {
                warn!(command_id = %cmd.command_id, %reason, "rejected stale command");
                let _ = reply
                    .send(cmd.update(CommandStatus::RejectedStale, &reason, ""))
                    .await;
                return;
            }
            Gate::Unfenced(reason) => {
                warn!(command_id = %cmd.command_id, %reason, "rejected unfenced command");
                let _ = reply
                    .send(cmd.update(CommandStatus::RejectedUnfenced, &reason, ""))
                    .await;
                return;
            }
            Gate::Recorded(r) => {
                let status = CommandStatus::try_from(r.status).unwrap_or(CommandStatus::Failed);
                let mut answer = cmd.update(status, &r.reason, &r.output_tail);
                if let Some(drover_common::proto::agent_message::Msg::CommandUpdate(u)) =
                    &mut answer.msg
                {
                    u.deadline_exceeded = r.deadline_exceeded;
                }
                let _ = reply.send(answer).await;
                return;
            }
            Gate::Run => {}
        }
        // 2b. Join a run of the same command already under way.
        let (running, tx) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(&cmd.command_id) {
                Some(rx) => (Some(rx.clone()), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(cmd.command_id.clone(), rx);
                    (None, Some(tx))
                }
            }
        };
        if let Some(mut rx) = running {
            let _ = reply
                .send(cmd.update(CommandStatus::Accepted, "already running", ""))
                .await;
            let outcome = rx
                .wait_for(|o| o.is_some())
                .await
                .ok()
                .and_then(|o| o.clone());
            if let Some(o) = outcome {
                let _ = reply.send(o.update(&cmd)).await;
            }
            return;
        }
        let tx = tx.expect("set when not running");
        let _ = reply
            .send(cmd.update(CommandStatus::Accepted, "", ""))
            .await;
        let started = Instant::now();
        let outcome = self.execute(&cmd).await;
        info!(command_id = %cmd.command_id, status = ?outcome.status, reason = %outcome.reason, took = ?started.elapsed(), "command finished");
        let recorded = RecordedResult {
            command_id: cmd.command_id.clone(),
            status: outcome.status as i32,
            reason: outcome.reason.clone(),
            output_tail: outcome.output_tail.clone(),
            deadline_exceeded: outcome.deadline_exceeded,
        };
        // No durable record, no success: the coordinator sends it again
        // (rule 4 makes a repeated Restart a no-op) rather than believe a
        // result a crash would forget.
        let outcome = match self.save(|s| s.record(recorded)) {
            Ok(()) => outcome,
            Err(e) => {
                warn!(command_id = %cmd.command_id, error = %e, "command result not recorded: failing it");
                Outcome {
                    status: CommandStatus::Failed,
                    reason: format!("{}; the result could not be recorded ({e})", outcome.reason),
                    output_tail: outcome.output_tail,
                    pull: outcome.pull,
                    deadline_exceeded: outcome.deadline_exceeded,
                }
            }
        };
        self.inflight
            .lock()
            .expect("inflight lock")
            .remove(&cmd.command_id);
        let _ = tx.send(Some(outcome.clone()));
        let _ = reply.send(outcome.update(&cmd)).await;
    }

    async fn execute(&self, cmd: &Command) -> Outcome {
        if cmd.command_id.is_empty() || cmd.command_id.len() > 256 {
            return Outcome::failed("command_id must be 1-256 characters");
        }
        let (service, result) = match &cmd.action {
            Some(command::Action::Pull(p)) => (p.service.clone(), None),
            Some(command::Action::Verify(v)) => (v.service.clone(), None),
            Some(command::Action::Restart(r)) => (r.service.clone(), None),
            Some(command::Action::Rollback(r)) => (r.service.clone(), None),
            Some(command::Action::Stop(s)) => (s.service.clone(), None),
            None => (
                String::new(),
                Some(Outcome::failed("the command carries no action")),
            ),
        };
        if let Some(o) = result {
            return o;
        }
        if let Err(e) = validate_service(&service) {
            return Outcome::failed(e);
        }
        let lock = self.service_lock(&service);
        let _guard = lock.lock().await;
        // Rule 1 again: a Fence may have arrived while this command waited.
        let highest = self.epoch_of(cmd.shard);
        if cmd.epoch < highest {
            return Outcome {
                status: CommandStatus::RejectedStale,
                reason: format!(
                    "epoch {} fell below {highest} for shard {} while the command waited for the service",
                    cmd.epoch, cmd.shard
                ),
                output_tail: String::new(),
                pull: None,
                deadline_exceeded: false,
            };
        }
        match cmd.action.as_ref().expect("checked above") {
            command::Action::Pull(p) => self.pull(p).await,
            command::Action::Verify(v) => match parse_digest(&v.artifact) {
                Ok(d) => match pull::verify(&self.cfg.layout, &v.service, &d).await {
                    Ok(()) => Outcome::ok(format!("{d} verified (archive and release)")),
                    Err(e) => Outcome::failed(e.to_string()),
                },
                Err(e) => Outcome::failed(e),
            },
            command::Action::Restart(r) => match parse_digest(&r.artifact) {
                Ok(d) => {
                    let unit = Unit::new(&r.service, r.slot());
                    let config = ConfigChange::of(r.config.as_ref(), r.no_config);
                    self.activate(&unit, &d, r.ready_timeout_ms, r.anew, config)
                        .await
                }
                Err(e) => Outcome::failed(e),
            },
            command::Action::Stop(s) => self.stop(&Unit::new(&s.service, s.slot())).await,
            command::Action::Rollback(r) => {
                let config = ConfigChange::of(r.config.as_ref(), r.no_config);
                self.rollback(&r.service, &r.artifact, r.ready_timeout_ms, config)
                    .await
            }
        }
    }

    async fn rollback(
        &self,
        service: &str,
        artifact: &str,
        ready_timeout_ms: u32,
        config: ConfigChange<'_>,
    ) -> Outcome {
        let unit = Unit::plain(service);
        let rec = self.record(&unit);
        let target = if artifact.is_empty() {
            match rec.previous {
                Some(p) => p,
                None => {
                    return Outcome::failed(format!(
                        "{service} has no previous release to roll back to"
                    ));
                }
            }
        } else {
            artifact.to_string()
        };
        let digest = match parse_digest(&target) {
            Ok(d) => d,
            Err(e) => return Outcome::failed(e),
        };
        if !self.cfg.layout.release(service, &digest).is_dir() {
            return Outcome::failed(format!(
                "release {digest} of {service} is not on this host; rollback never downloads"
            ));
        }
        self.activate(&unit, &digest, ready_timeout_ms, false, config)
            .await
    }

    /// Stops a unit: a blue-green slot, or a service's one process (the
    /// old group of a blue-green deploy across host groups). Rule 4: a
    /// stopped unit is a success. Its release stays on disk, kept as the
    /// unit's previous; a later Restart (or Rollback) starts it again.
    async fn stop(&self, unit: &Unit) -> Outcome {
        let key = unit.key();
        let rec = self.record(unit);
        if rec.current.is_none() && !self.runtime.status(&key).running {
            return Outcome::ok(format!("{unit} is not running"));
        }
        self.board.unwatch(&key);
        if let Err(e) = self.runtime.stop(&key).await {
            return Outcome::failed(format!("stopping {unit}: {e}"));
        }
        // Recorded after the stop: a crash in between starts it again at
        // agent start, and the coordinator's repeated Stop stops it.
        if let Err(e) = self.save(|s| {
            let rec = s.services.entry(key.clone()).or_default();
            if let Some(current) = rec.current.take() {
                rec.previous = Some(current);
            }
            rec.pgid = None;
        }) {
            return Outcome::failed(e);
        }
        Outcome::ok(format!("{unit} stopped"))
    }

    /// Stops every service (agent shutdown, process runtime).
    pub async fn shutdown(&self) {
        self.runtime.stop_all().await;
    }
}

/// Prunes `service`'s releases (kept on its plain record) to the newest
/// `keep`, never one that any of its units (the plain process, either
/// slot) runs or ran last, nor `also` (a release just pulled). Rule 6.
fn prune_service(
    state: &mut LocalState,
    layout: &Layout,
    service: &str,
    keep: usize,
    also: Option<String>,
) -> Vec<String> {
    let mut protect: Vec<Option<String>> = vec![also];
    for slot in [
        drover_common::proto::Slot::None,
        drover_common::proto::Slot::Blue,
        drover_common::proto::Slot::Green,
    ] {
        if let Some(rec) = state.services.get(&Unit::new(service, slot).key()) {
            protect.push(rec.current.clone());
            protect.push(rec.previous.clone());
        }
    }
    let protect: Vec<Option<&str>> = protect.iter().map(|p| p.as_deref()).collect();
    let rec = state.services.entry(service.to_string()).or_default();
    layout.prune(service, &mut rec.releases, keep, &protect)
}
