//! Running deploys: start (idempotent, one active per pipeline), the task
//! that drives each deploy's state machine, controls, and watches.
//!
//! The task is restart-safe by construction: each step reads the record,
//! does what its phase calls for (run the batch in flight, roll back, or
//! wait), and writes the result with a compare-and-swap on the record's
//! revision. Commands carry deterministic ids (`<deploy>/<stage>.<batch>/
//! <host>/<verb>`), so a step repeated after a crash is answered from the
//! agents' recorded results instead of restarting anything twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_common::labels::Selector;
use drover_common::proto::{
    AuditEvent, Command, CommandStatus, ConnectionState, Environment, HealthGate, HostOutcome,
    InconclusivePolicy, PullCommand, RestartCommand, RollbackCommand, StartDeployRequest,
    WhatWasRunningResponse, command,
};
use prost::Message;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::gate::{Sample, Verdict, judge};
use super::machine::{Event, Machine, Phase};
use super::pipeline::{PipelineError, Pipelines};
use super::record::{DeployRecord, StageApproval, plan_stage};

mod canary;
use crate::fleet::{PendingCommands, Registry};
use crate::ha::leases::ShardLeases;
use crate::ha::shards::shard_of;
use crate::metrics::Metrics;
use crate::origin::BlobStore;
use crate::store::WatchEvent;
use crate::store::{Compare, Op, Store, StoreError, Txn};

/// The end of a failed command's output, for the host's failure reason:
/// its last lines, at most [`LAST_WORDS_CHARS`] characters.
fn last_words(tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        return String::new();
    }
    let start = tail
        .char_indices()
        .rev()
        .nth(LAST_WORDS_CHARS)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let cut = if start > 0 { "…" } else { "" };
    format!(" (output: {cut}{})", tail[start..].replace('\n', " | "))
}
const LAST_WORDS_CHARS: usize = 400;

/// Why a batch's health gate did not pass: it failed, or (the pause policy
/// for an inconclusive gate) it holds the deploy for a person to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GateStop {
    Failed(String),
    Hold(String),
}

/// Hosts rolled back at once.
const ROLLBACK_PARALLELISM: usize = 256;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// A restart is the agent's to finish within the stage's stuck_timeout
/// (its own deadline, hooks included); this is the network's share on top.
const RESULT_SLACK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This coordinator does not (or no longer) lead the pipeline's shard.
    #[error("{0}")]
    NotLeader(String),
    /// The caller may not do this to this deploy (four eyes).
    #[error("{0}")]
    Forbidden(String),
}

struct Live {
    wake: Arc<Notify>,
    /// A task drives this deploy now (at most one).
    driven: bool,
}

/// What deploys need from the rest of the coordinator.
pub struct Parts {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub pending: Arc<PendingCommands>,
    pub pipelines: Arc<Pipelines>,
    pub blobs: Arc<BlobStore>,
    /// Pull source for agents: this coordinator's origin.
    pub origin: String,
    pub key_prefix: String,
    pub leases: Arc<ShardLeases>,
    pub metrics: Metrics,
}

pub struct Deployments {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    pending: Arc<PendingCommands>,
    pipelines: Arc<Pipelines>,
    blobs: Arc<BlobStore>,
    origin: String,
    /// Where everything lives in the store.
    keys: crate::store::keys::Keys,
    live: Mutex<HashMap<String, Live>>,
    leases: Arc<ShardLeases>,
    metrics: Metrics,
}

/// Where a deploy starts, and the stages it was forced past.
struct FirstStage {
    index: usize,
    forced_past: Vec<String>,
}

/// The batch after (`stage`, `batch`) in `plan`, skipping empty stages.
fn next_position(plan: &[Vec<Vec<String>>], stage: usize, batch: usize) -> Option<(usize, usize)> {
    if batch + 1 < plan.get(stage)?.len() {
        return Some((stage, batch + 1));
    }
    (stage + 1..plan.len())
        .find(|s| !plan[*s].is_empty())
        .map(|s| (s, 0))
}

fn encode(rec: &DeployRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a deploy record always serializes")
}

impl Deployments {
    pub fn new(parts: Parts) -> Arc<Deployments> {
        Arc::new(Deployments {
            store: parts.store,
            registry: parts.registry,
            pending: parts.pending,
            pipelines: parts.pipelines,
            blobs: parts.blobs,
            origin: parts.origin,
            keys: crate::store::keys::Keys::new(&parts.key_prefix),
            live: Mutex::new(HashMap::new()),
            leases: parts.leases,
            metrics: parts.metrics,
        })
    }

    fn audit(rec: &DeployRecord, kind: &str, actor: &str, message: String) -> AuditEvent {
        AuditEvent {
            at_unix_ms: drover_common::time::now_unix_ms(),
            service: rec.service.clone(),
            pipeline: rec.pipeline.clone(),
            deploy_id: rec.id.clone(),
            kind: kind.to_string(),
            actor: actor.to_string(),
            artifact: rec.artifact.clone(),
            git_sha: rec.git_sha.clone(),
            message,
            pipeline_version: rec.snapshot.version,
        }
    }

    /// What a Pull of `artifact` carries from the origin's metadata: the
    /// signatures CI made (agents with trusted signers pull nothing without
    /// one) and the size (agents check their free space first).
    pub async fn pull_facts(
        &self,
        artifact: &str,
    ) -> (Vec<drover_common::proto::ArtifactSignature>, u64) {
        let Ok(digest) = artifact.parse::<drover_common::artifact::Digest>() else {
            return (Vec::new(), 0);
        };
        match self.blobs.info(&digest).await {
            Ok(Some(info)) => (info.signatures, info.size_bytes),
            _ => (Vec::new(), 0),
        }
    }

    /// Records a command sent by hand (SendCommand) in the service's audit,
    /// with the authenticated sender, before it is sent.
    pub async fn audit_command(
        &self,
        service: &str,
        actor: &str,
        host: &str,
        cmd: &drover_common::proto::Command,
    ) -> Result<(), DeployError> {
        use drover_common::proto::command::Action;
        let (action, artifact) = match &cmd.action {
            Some(Action::Pull(p)) => ("pull", p.artifact.as_str()),
            Some(Action::Verify(v)) => ("verify", v.artifact.as_str()),
            Some(Action::Restart(r)) => ("restart", r.artifact.as_str()),
            Some(Action::Rollback(_)) => ("rollback", ""),
            None => ("none", ""),
        };
        let event = AuditEvent {
            at_unix_ms: drover_common::time::now_unix_ms(),
            service: service.to_string(),
            pipeline: String::new(),
            deploy_id: String::new(),
            kind: "command".into(),
            actor: actor.to_string(),
            artifact: artifact.to_string(),
            git_sha: String::new(),
            message: format!(
                "{action} sent to host {host} by hand (command {}, shard {}, epoch {})",
                cmd.command_id, cmd.shard, cmd.epoch
            ),
            pipeline_version: 0,
        };
        let key = self.keys.audit_command(
            service,
            event.at_unix_ms,
            &uuid::Uuid::new_v4().simple().to_string(),
        );
        self.store
            .txn(Txn {
                compares: vec![],
                success: vec![Op::put(key, event.encode_to_vec())],
                failure: vec![],
            })
            .await?;
        Ok(())
    }

    /// The audit entries of a transition from `before` to `rec`'s phase.
    /// `before`: phase, stage and batch before the transition.
    fn transition_audit(
        before: (Phase, usize, usize),
        rec: &DeployRecord,
        event: &Event,
        actor: &str,
    ) -> Vec<AuditEvent> {
        let (before, stage, batch) = before;
        let mut out = Vec::new();
        let m = &rec.machine;
        match event {
            Event::Pause => out.push(Self::audit(rec, "paused", actor, "pause requested".into())),
            Event::Resume => out.push(Self::audit(rec, "resumed", actor, "resumed".into())),
            Event::Approve => out.push(Self::audit(
                rec,
                "approved",
                actor,
                format!(
                    "approved stage {}",
                    rec.snapshot.stages[m.stage.min(rec.snapshot.stages.len() - 1)].name
                ),
            )),
            Event::Abort { reason, .. } => {
                out.push(Self::audit(rec, "aborted", actor, reason.clone()))
            }
            Event::Rollback(reason) => {
                out.push(Self::audit(rec, "rollback", actor, reason.clone()))
            }
            Event::BatchPassed | Event::BatchFailed(_) => {
                let hosts = rec
                    .plan
                    .get(stage)
                    .and_then(|s| s.get(batch))
                    .map(|h| h.join(","))
                    .unwrap_or_default();
                let message = match event {
                    Event::BatchFailed(r) => {
                        format!("stage {stage} batch {batch} ({hosts}) failed: {r}")
                    }
                    _ => format!("stage {stage} batch {batch} ({hosts}) passed"),
                };
                out.push(Self::audit(rec, "batch", actor, message));
            }
            _ => {}
        }
        if m.phase != before {
            match m.phase {
                Phase::RollingBack
                    if !matches!(event, Event::Rollback(_) | Event::Abort { .. }) =>
                {
                    out.push(Self::audit(
                        rec,
                        "rollback",
                        actor,
                        format!("automatic rollback to {}: {}", rec.known_good, m.reason),
                    ))
                }
                Phase::Complete => out.push(Self::audit(
                    rec,
                    "complete",
                    actor,
                    format!("{} runs everywhere", rec.artifact),
                )),
                Phase::RolledBack => out.push(Self::audit(
                    rec,
                    "rolled_back",
                    actor,
                    format!("back on {}: {}", rec.known_good, m.reason),
                )),
                Phase::Failed => out.push(Self::audit(rec, "failed", actor, m.reason.clone())),
                _ => {}
            }
        }
        out
    }

    pub async fn audit_log(
        &self,
        service: &str,
        since: u64,
        until: u64,
    ) -> Result<Vec<AuditEvent>, DeployError> {
        let (kvs, _) = self.store.range(&self.keys.audit(service)).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| AuditEvent::decode(kv.value.as_slice()).ok())
            .filter(|e| e.at_unix_ms >= since && (until == 0 || e.at_unix_ms <= until))
            .collect())
    }

    /// What ran for `service` at `at`, from the audit log.
    pub async fn what_was_running(
        &self,
        service: &str,
        at: u64,
    ) -> Result<WhatWasRunningResponse, DeployError> {
        let mut answer = WhatWasRunningResponse::default();
        let mut open: Vec<String> = Vec::new();
        for e in self.audit_log(service, 0, at).await? {
            match e.kind.as_str() {
                "started" => open.push(e.deploy_id.clone()),
                "complete" => {
                    answer.artifact = e.artifact.clone();
                    answer.since_unix_ms = e.at_unix_ms;
                    answer.deploy_id = e.deploy_id.clone();
                    open.retain(|d| d != &e.deploy_id);
                }
                "rolled_back" => {
                    // The message names the release returned to.
                    if let Some(rest) = e.message.strip_prefix("back on ") {
                        answer.artifact = rest.split(':').next().unwrap_or_default().to_string();
                        answer.since_unix_ms = e.at_unix_ms;
                        answer.deploy_id = e.deploy_id.clone();
                    }
                    open.retain(|d| d != &e.deploy_id);
                }
                "failed" | "aborted" => open.retain(|d| d != &e.deploy_id),
                _ => {}
            }
        }
        answer.in_progress_deploy_id = open.pop().unwrap_or_default();
        Ok(answer)
    }

    /// The record and its store revision.
    pub async fn load(&self, id: &str) -> Result<(DeployRecord, u64), DeployError> {
        let kv = self
            .store
            .get(&self.keys.deploy(id))
            .await?
            .ok_or_else(|| DeployError::NotFound(format!("no deploy {id:?}")))?;
        let rec = serde_json::from_slice(&kv.value)
            .map_err(|e| DeployError::Invalid(format!("deploy {id} is unreadable: {e}")))?;
        Ok((rec, kv.mod_revision))
    }

    pub async fn list(&self, pipeline: &str) -> Result<Vec<DeployRecord>, DeployError> {
        let (kvs, _) = self.store.range(&self.keys.deploys()).await?;
        let mut out: Vec<DeployRecord> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<DeployRecord>(&kv.value).ok())
            .filter(|r| pipeline.is_empty() || r.pipeline == pipeline)
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.created_at_unix_ms));
        Ok(out)
    }

    /// The wake-up of `id`'s driver (controls ring it).
    fn live(&self, id: &str) -> Arc<Notify> {
        let mut live = self.live.lock().expect("live lock");
        let entry = live.entry(id.to_string()).or_insert_with(|| Live {
            wake: Arc::new(Notify::new()),
            driven: false,
        });
        entry.wake.clone()
    }

    /// The deploy as it is now, then every stored change of it. Served from
    /// the store, so any coordinator answers and a watch outlives a failover
    /// of the deploy's leader.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl tokio_stream::Stream<Item = DeployRecord> + Send + use<>, DeployError> {
        let key = self.keys.deploy(id);
        // Watch before reading, so no change falls between the two.
        let changes = self.store.watch(&key).await?;
        let (current, revision) = self.load(id).await?;
        let changes = changes.filter_map(move |event| match event {
            WatchEvent::Put(kv) if kv.key == key && kv.mod_revision > revision => {
                serde_json::from_slice::<DeployRecord>(&kv.value).ok()
            }
            _ => None,
        });
        Ok(tokio_stream::once(current).chain(changes))
    }

    /// Writes `rec` if the record is still at `revision`; returns the new
    /// revision. When the deploy reaches a terminal phase the pipeline's
    /// active marker goes in the same transaction (and the known-good
    /// release after a Complete).
    async fn save(
        &self,
        rec: &mut DeployRecord,
        revision: u64,
        audit: Vec<AuditEvent>,
    ) -> Result<Option<u64>, DeployError> {
        let now = drover_common::time::now_unix_ms();
        rec.updated_at_unix_ms = now;
        rec.writes += 1;
        rec.awaiting_since_unix_ms = match rec.machine.phase {
            Phase::AwaitingApproval if rec.awaiting_since_unix_ms == 0 => now,
            Phase::AwaitingApproval => rec.awaiting_since_unix_ms,
            _ => 0,
        };
        let ledger = self.environment_ops(rec, now);
        let key = self.keys.deploy(&rec.id);
        let mut success = vec![Op::put(key.clone(), encode(rec))];
        success.extend(ledger);
        for (n, event) in audit.iter().enumerate() {
            success.push(Op::put(
                self.keys
                    .audit_event(&event.service, event.at_unix_ms, &event.deploy_id, n),
                event.encode_to_vec(),
            ));
        }
        if rec.machine.phase.is_terminal() {
            success.push(Op::Delete(self.keys.active(&rec.pipeline)));
        }
        if rec.machine.phase == Phase::Complete {
            success.push(Op::put(
                self.keys.known_good(&rec.pipeline),
                rec.artifact.clone(),
            ));
        }
        if rec.machine.phase == Phase::RolledBack && !rec.known_good.is_empty() {
            // Rolled back (also after COMPLETE): the release we returned to is
            // the known good again.
            success.push(Op::put(
                self.keys.known_good(&rec.pipeline),
                rec.known_good.clone(),
            ));
        }
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let guard = self.fence_guard(shard)?;
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key, revision), guard],
                success,
                failure: vec![],
            })
            .await?;
        if !r.succeeded && !self.leases.still_leader(shard).await {
            return Err(self.fenced(shard).await);
        }
        Ok(r.succeeded.then_some(r.revision))
    }

    /// The shard `pipeline` belongs to (whose leader runs its deploys).
    pub fn shard_of_pipeline(&self, pipeline: &str) -> u32 {
        shard_of(pipeline, self.leases.shards)
    }

    /// The compare every write for `shard` carries: only its leader's land.
    fn fence_guard(&self, shard: u32) -> Result<Compare, DeployError> {
        self.leases.guard(shard).ok_or_else(|| {
            DeployError::NotLeader(format!("this coordinator does not lead shard {shard}"))
        })
    }

    /// The shard and epoch stamped on commands for `pipeline`.
    fn fence(&self, pipeline: &str) -> Result<(u32, u64), DeployError> {
        let shard = self.shard_of_pipeline(pipeline);
        let leadership = self.leases.leadership(shard).ok_or_else(|| {
            DeployError::NotLeader(format!("this coordinator does not lead shard {shard}"))
        })?;
        Ok((shard, leadership.epoch))
    }

    /// A guarded write was refused because another coordinator leads
    /// `shard` now: counted, and reported naming the leader.
    async fn fenced(&self, shard: u32) -> DeployError {
        self.metrics.fenced_writes.inc();
        warn!(
            shard,
            "the store refused our write: we no longer lead the shard"
        );
        let leader = self
            .leases
            .leader_of(shard)
            .await
            .map(|m| m.id)
            .unwrap_or_else(|| "nobody yet".into());
        DeployError::NotLeader(format!(
            "this coordinator no longer leads shard {shard} (leader: {leader})"
        ))
    }

    /// Applies `event` to the stored deploy (retrying on concurrent writes).
    /// A refused event changes nothing and is reported.
    pub async fn control(
        self: &Arc<Self>,
        id: &str,
        event: Event,
        who: &str,
    ) -> Result<DeployRecord, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            let was_terminal = rec.machine.phase.is_terminal();
            let (machine, _) = rec
                .machine
                .apply(event.clone())
                .map_err(|e| DeployError::Conflict(e.to_string()))?;
            if event == Event::Approve {
                rec.approvals.push(format!(
                    "{who} approved stage {}",
                    rec.snapshot.stages[rec.machine.stage].name
                ));
            }
            let before = (rec.machine.phase, rec.machine.stage, rec.machine.batch);
            rec.machine = machine;
            let audit = Self::transition_audit(before, &rec, &event, who);
            if self.save(&mut rec, revision, audit).await?.is_some() {
                let message = format!("{who}: {event:?} -> {:?}", rec.machine.phase);
                info!(deploy = %id, %message, "deploy control");
                self.live(id).notify_one();
                if was_terminal && !rec.machine.phase.is_terminal() {
                    // A rollback after COMPLETE: the deploy needs a driver again.
                    self.spawn(id.to_string());
                }
                return Ok(rec);
            }
        }
    }

    /// An approval of the stage deploy `id` waits at, by `approver` (an
    /// authenticated identity, or the free-text name without TLS; `who` is
    /// what the audit shows). The stage moves on once it holds
    /// `required_approvals` approvals from distinct approvers; with four
    /// eyes the deploy's starter cannot be one. Approving twice counts once.
    pub async fn approve(
        self: &Arc<Self>,
        id: &str,
        approver: &str,
        who: &str,
    ) -> Result<DeployRecord, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            if rec.machine.phase != Phase::AwaitingApproval {
                // The machine says why an approval does not apply now.
                return self.control(id, Event::Approve, who).await;
            }
            let stage = rec.snapshot.stages[rec.machine.stage].clone();
            if stage.four_eyes && approver == rec.started_by {
                return Err(DeployError::Forbidden(format!(
                    "four eyes: {approver} started deploy {id} and cannot approve its stage {}",
                    stage.name
                )));
            }
            let given = rec
                .stage_approvals
                .iter()
                .filter(|a| a.stage == stage.name)
                .count();
            if rec
                .stage_approvals
                .iter()
                .any(|a| a.stage == stage.name && a.approver == approver)
            {
                return Ok(rec);
            }
            let required = stage.required_approvals.max(1) as usize;
            rec.stage_approvals.push(StageApproval {
                stage: stage.name.clone(),
                approver: approver.to_string(),
                at_unix_ms: drover_common::time::now_unix_ms(),
            });
            if given + 1 >= required {
                let (machine, _) = rec
                    .machine
                    .apply(Event::Approve)
                    .map_err(|e| DeployError::Conflict(e.to_string()))?;
                rec.approvals
                    .push(format!("{who} approved stage {}", stage.name));
                let before = (rec.machine.phase, rec.machine.stage, rec.machine.batch);
                rec.machine = machine;
                let audit = Self::transition_audit(before, &rec, &Event::Approve, who);
                if self.save(&mut rec, revision, audit).await?.is_some() {
                    info!(deploy = %id, approver, stage = %stage.name, "approved");
                    self.live(id).notify_one();
                    return Ok(rec);
                }
                continue;
            }
            rec.approvals.push(format!(
                "{who} approved stage {} ({} of {required})",
                stage.name,
                given + 1
            ));
            let event = Self::audit(
                &rec,
                "approval",
                who,
                format!(
                    "approval {} of {required} for stage {} by {who}",
                    given + 1,
                    stage.name
                ),
            );
            if self.save(&mut rec, revision, vec![event]).await?.is_some() {
                return Ok(rec);
            }
        }
    }

    /// Starts a deploy of `artifact` through `pipeline`.
    pub async fn start(
        self: &Arc<Self>,
        req: StartDeployRequest,
        started_by: &str,
    ) -> Result<DeployRecord, DeployError> {
        let pipeline = self.pipelines.get(&req.pipeline).await?;
        self.fence_guard(self.shard_of_pipeline(&pipeline.name))?;
        let digest: drover_common::artifact::Digest = req
            .artifact
            .parse()
            .map_err(|e| DeployError::Invalid(format!("artifact: {e}")))?;
        let info = self
            .blobs
            .info(&digest)
            .await
            .map_err(|e| DeployError::Invalid(e.to_string()))?
            .ok_or_else(|| {
                DeployError::Invalid(format!(
                    "artifact {digest} is not on the origin; push it first"
                ))
            })?;
        if info.service != pipeline.service {
            return Err(DeployError::Invalid(format!(
                "artifact {digest} is for service {:?}, pipeline {} deploys {:?}",
                info.service, pipeline.name, pipeline.service
            )));
        }
        if req.idempotency_key.len() > 128 {
            return Err(DeployError::Invalid(
                "idempotency_key is longer than 128 characters".into(),
            ));
        }
        if !req.idempotency_key.is_empty()
            && let Some(kv) = self
                .store
                .get(&self.keys.idempotency(&pipeline.name, &req.idempotency_key))
                .await?
        {
            let id = String::from_utf8_lossy(&kv.value).into_owned();
            return Ok(self.load(&id).await?.0);
        }
        if let Some(kv) = self.store.get(&self.keys.active(&pipeline.name)).await? {
            return Err(DeployError::Conflict(format!(
                "pipeline {} already has an active deploy: {}",
                pipeline.name,
                String::from_utf8_lossy(&kv.value)
            )));
        }
        let known_good = self
            .store
            .get(&self.keys.known_good(&pipeline.name))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        // Resolve the hosts now and record them: a stage's hosts are the
        // connected hosts its selector matches, each in its first stage only.
        // A first deploy has no baseline to judge a canary against (and no
        // release to roll back to): its stages roll in batches.
        let first = self.first_stage(&pipeline, &req, &digest).await?;
        // What each environment runs now: where its hosts return on rollback.
        let mut rollback_targets = Vec::new();
        for stage in &pipeline.stages {
            let running = self
                .store
                .get(&self.keys.environment(&pipeline.name, &stage.name))
                .await?
                .and_then(|kv| Environment::decode(kv.value.as_slice()).ok())
                .map(|e| e.artifact)
                .unwrap_or_default();
            rollback_targets.push(running);
        }
        let mut taken = std::collections::HashSet::new();
        let mut plan = Vec::new();
        let mut canary_bakes = Vec::new();
        let mut waves = Vec::new();
        for (i, stage) in pipeline.stages.iter().enumerate() {
            let selector = Selector::parse(&stage.selector)
                .map_err(|e| DeployError::Invalid(e.to_string()))?;
            let hosts: Vec<drover_common::proto::Host> = self
                .registry
                .list(&selector)
                .into_iter()
                .filter(|h| h.state() == ConnectionState::Connected)
                .filter(|h| taken.insert(h.host_id.clone()))
                .filter(|_| i >= first.index)
                .collect();
            let canary = stage.canary.as_ref().filter(|_| !known_good.is_empty());
            let p = plan_stage(&hosts, stage, canary);
            plan.push(p.entries);
            canary_bakes.push(p.canary_bakes);
            waves.push(p.waves);
        }
        if plan.iter().all(|s| s.is_empty()) {
            return Err(DeployError::Invalid(format!(
                "no connected host matches any stage of pipeline {}",
                pipeline.name
            )));
        }
        let machine = Machine::new(
            plan.iter().map(Vec::len).collect(),
            pipeline
                .stages
                .iter()
                .map(|s| s.requires_approval)
                .collect(),
            !known_good.is_empty() && known_good != digest.hex(),
        );
        let now = drover_common::time::now_unix_ms();
        let id = format!(
            "{}-{}",
            pipeline.name,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut rec = DeployRecord {
            id: id.clone(),
            pipeline: pipeline.name.clone(),
            service: pipeline.service.clone(),
            artifact: digest.hex(),
            known_good,
            machine,
            plan,
            results: Default::default(),
            verdicts: Default::default(),
            touched: Vec::new(),
            requester: req.requester,
            git_sha: if req.git_sha.is_empty() {
                info.git_sha
            } else {
                req.git_sha
            },
            idempotency_key: req.idempotency_key.clone(),
            approvals: Vec::new(),
            stage_approvals: Vec::new(),
            started_by: started_by.to_string(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
            snapshot: pipeline.clone(),
            writes: 1,
            canary_bakes,
            analyses: Vec::new(),
            promoted: Vec::new(),
            waves,
            awaiting_since_unix_ms: 0,
            forced_past: first.forced_past.clone(),
            passed_stages: Vec::new(),
            environments_reverted: false,
            rollback_targets,
        };
        if !first.forced_past.is_empty() {
            rec.approvals.push(format!(
                "{} forced the deploy past stages it had not passed: {}",
                if rec.requester.is_empty() {
                    "someone"
                } else {
                    &rec.requester
                },
                first.forced_past.join(", ")
            ));
        }
        let (machine, _) = rec
            .machine
            .apply(Event::Start)
            .expect("a new deploy starts");
        rec.machine = machine;
        let shard = self.shard_of_pipeline(&pipeline.name);
        let mut compares = vec![
            Compare::Missing(self.keys.active(&pipeline.name)),
            self.fence_guard(shard)?,
        ];
        let started = Self::audit(
            &rec,
            "started",
            if rec.requester.is_empty() {
                "someone"
            } else {
                &rec.requester
            },
            format!(
                "deploy of {} (git {}) replacing {} through {} stages",
                rec.artifact,
                if rec.git_sha.is_empty() {
                    "unknown"
                } else {
                    &rec.git_sha
                },
                if rec.known_good.is_empty() {
                    "nothing"
                } else {
                    &rec.known_good
                },
                rec.plan.len()
            ),
        );
        let mut success = vec![
            Op::put(self.keys.deploy(&id), encode(&rec)),
            Op::put(self.keys.active(&pipeline.name), id.clone()),
            Op::put(
                self.keys
                    .audit_event(&started.service, started.at_unix_ms, &started.deploy_id, 0),
                started.encode_to_vec(),
            ),
        ];
        if !req.idempotency_key.is_empty() {
            let key = self.keys.idempotency(&pipeline.name, &req.idempotency_key);
            compares.push(Compare::Missing(key.clone()));
            success.push(Op::put(key, id.clone()));
        }
        let r = self
            .store
            .txn(Txn {
                compares,
                success,
                failure: vec![],
            })
            .await?;
        if !r.succeeded && !self.leases.still_leader(shard).await {
            return Err(self.fenced(shard).await);
        }
        if !r.succeeded {
            // Lost a race with another start: answer as if we had been second.
            return Box::pin(self.start(
                StartDeployRequest {
                    pipeline: pipeline.name,
                    artifact: rec.artifact,
                    idempotency_key: req.idempotency_key,
                    requester: rec.requester,
                    git_sha: rec.git_sha,
                    from_stage: req.from_stage,
                    force: req.force,
                },
                started_by,
            ))
            .await;
        }
        info!(deploy = %id, pipeline = %rec.pipeline, artifact = %rec.artifact, "deploy started");
        self.spawn(id);
        Ok(rec)
    }

    /// The ledger writes a save of `rec` carries: each stage the artifact
    /// has just passed (the machine moved past it) is marked passed and
    /// becomes what runs in that environment; after a rollback the
    /// environments it touched run the known-good release again.
    fn environment_ops(&self, rec: &mut DeployRecord, now: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        let m = &rec.machine;
        let environment = |stage: &str, artifact: &str, forced: bool| Environment {
            stage: stage.to_string(),
            artifact: artifact.to_string(),
            deploy_id: rec.id.clone(),
            since_unix_ms: now,
            forced,
        };
        let passed_upto = match m.phase {
            Phase::Complete => rec.plan.len(),
            Phase::Rolling | Phase::Paused | Phase::AwaitingApproval => m.stage,
            _ => 0,
        };
        let mut newly = Vec::new();
        for (i, stage) in rec.snapshot.stages.iter().enumerate().take(passed_upto) {
            if rec.plan.get(i).is_none_or(Vec::is_empty) || rec.passed_stages.contains(&stage.name)
            {
                continue;
            }
            ops.push(Op::put(
                self.keys.passed(&rec.pipeline, &stage.name, &rec.artifact),
                now.to_string(),
            ));
            let env = environment(&stage.name, &rec.artifact, !rec.forced_past.is_empty());
            ops.push(Op::put(
                self.keys.environment(&rec.pipeline, &stage.name),
                env.encode_to_vec(),
            ));
            newly.push(stage.name.clone());
        }
        if m.phase == Phase::RolledBack && !rec.environments_reverted && !rec.known_good.is_empty()
        {
            for (i, stage) in rec.snapshot.stages.iter().enumerate() {
                let touched = rec
                    .plan
                    .get(i)
                    .is_some_and(|s| s.iter().flatten().any(|h| rec.touched.contains(h)));
                if touched {
                    let env = environment(&stage.name, rec.stage_rollback_target(i), false);
                    ops.push(Op::put(
                        self.keys.environment(&rec.pipeline, &stage.name),
                        env.encode_to_vec(),
                    ));
                }
            }
            rec.environments_reverted = true;
        }
        rec.passed_stages.extend(newly);
        ops
    }

    /// Which artifact runs in each stage of `pipeline`, in pipeline order.
    pub async fn environments(&self, pipeline: &str) -> Result<Vec<Environment>, DeployError> {
        let p = self.pipelines.get(pipeline).await?;
        let mut out = Vec::new();
        for stage in &p.stages {
            if let Some(kv) = self
                .store
                .get(&self.keys.environment(pipeline, &stage.name))
                .await?
            {
                out.push(Environment::decode(kv.value.as_slice()).map_err(|e| {
                    DeployError::Invalid(format!(
                        "stored environment {} is unreadable: {e}",
                        stage.name
                    ))
                })?);
            }
        }
        Ok(out)
    }

    /// Where a deploy of `digest` starts: the first stage, or `from_stage`
    /// when the artifact passed every stage before it (or `force`).
    async fn first_stage(
        &self,
        pipeline: &drover_common::proto::Pipeline,
        req: &StartDeployRequest,
        digest: &drover_common::artifact::Digest,
    ) -> Result<FirstStage, DeployError> {
        if req.from_stage.is_empty() {
            return Ok(FirstStage {
                index: 0,
                forced_past: Vec::new(),
            });
        }
        let index = pipeline
            .stages
            .iter()
            .position(|s| s.name == req.from_stage)
            .ok_or_else(|| {
                let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
                DeployError::Invalid(format!(
                    "from_stage: pipeline {} has no stage {:?} (its stages: {})",
                    pipeline.name,
                    req.from_stage,
                    names.join(", ")
                ))
            })?;
        let mut unpassed = Vec::new();
        for stage in &pipeline.stages[..index] {
            let key = self.keys.passed(&pipeline.name, &stage.name, &digest.hex());
            if self.store.get(&key).await?.is_none() {
                unpassed.push(stage.name.clone());
            }
        }
        if !unpassed.is_empty() && !req.force {
            return Err(DeployError::Conflict(format!(
                "artifact {digest} has not passed {} of pipeline {}; deploy it there first, or force it (recorded)",
                unpassed.join(", "),
                pipeline.name
            )));
        }
        Ok(FirstStage {
            index,
            forced_past: unpassed,
        })
    }

    /// Resumes the unfinished deploys of `shard` (just won).
    pub async fn resume_shard(self: &Arc<Self>, shard: u32) -> Result<usize, DeployError> {
        let live: Vec<String> = self
            .list("")
            .await?
            .into_iter()
            .filter(|r| {
                !r.machine.phase.is_terminal() && self.shard_of_pipeline(&r.pipeline) == shard
            })
            .map(|r| r.id)
            .collect();
        for id in &live {
            info!(deploy = %id, shard, "resuming deploy");
            self.spawn(id.clone());
        }
        Ok(live.len())
    }

    /// Resumes every deploy that is not finished (coordinator start).
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, DeployError> {
        let live: Vec<String> = self
            .list("")
            .await?
            .into_iter()
            .filter(|r| {
                !r.machine.phase.is_terminal()
                    && self
                        .leases
                        .leadership(self.shard_of_pipeline(&r.pipeline))
                        .is_some()
            })
            .map(|r| r.id)
            .collect();
        for id in &live {
            info!(deploy = %id, "resuming deploy");
            self.spawn(id.clone());
        }
        Ok(live.len())
    }

    /// Starts the task that drives `id`, unless one already does.
    fn spawn(self: &Arc<Self>, id: String) {
        {
            self.live(&id);
            let mut live = self.live.lock().expect("live lock");
            let entry = live.get_mut(&id).expect("just created");
            if entry.driven {
                return;
            }
            entry.driven = true;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let deposed = match this.drive(&id).await {
                Ok(()) => false,
                Err(e) => {
                    warn!(deploy = %id, error = %e, "deploy task stopped");
                    matches!(e, DeployError::NotLeader(_))
                }
            };
            if let Some(entry) = this.live.lock().expect("live lock").get_mut(&id) {
                entry.driven = false;
            }
            // The shard may have been lost and won again while this task was
            // winding down (its resume found the deploy still driven).
            if deposed
                && let Ok((rec, _)) = this.load(&id).await
                && !rec.machine.phase.is_terminal()
                && this
                    .leases
                    .leadership(this.shard_of_pipeline(&rec.pipeline))
                    .is_some()
            {
                this.spawn(id);
            }
        });
    }

    /// Drives one deploy until it is finished, or until this coordinator
    /// stops leading its shard (the new leader resumes it from the record).
    async fn drive(self: &Arc<Self>, id: &str) -> Result<(), DeployError> {
        let (rec, _) = self.load(id).await?;
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let leadership = self.leases.leadership(shard).ok_or_else(|| {
            DeployError::NotLeader(format!("this coordinator does not lead shard {shard}"))
        })?;
        tokio::select! {
            _ = leadership.lost.cancelled() => Err(DeployError::NotLeader(format!(
                "stopped driving: this coordinator no longer leads shard {shard}; its new leader resumes the deploy"
            ))),
            done = self.drive_steps(id) => done,
        }
    }

    async fn drive_steps(self: &Arc<Self>, id: &str) -> Result<(), DeployError> {
        let wake = self.live(id);
        loop {
            let (rec, _) = self.load(id).await?;
            let event = match rec.machine.phase {
                Phase::Rolling => {
                    self.run_batch(id, rec.machine.stage, rec.machine.batch)
                        .await?
                }
                Phase::RollingBack => self.roll_back(id).await?,
                Phase::Pending => Event::Start,
                Phase::Paused => {
                    wake.notified().await;
                    continue;
                }
                Phase::AwaitingApproval => {
                    // No deploy waits forever: past the stage's approval
                    // timeout, its stated outcome applies.
                    let spec = &rec.snapshot.stages[rec.machine.stage];
                    let limit = Duration::from_millis(spec.approval_timeout_ms.into());
                    let waited = Duration::from_millis(
                        drover_common::time::now_unix_ms()
                            .saturating_sub(rec.awaiting_since_unix_ms),
                    );
                    if rec.awaiting_since_unix_ms == 0 || waited < limit {
                        let left = limit.saturating_sub(waited).max(Duration::from_millis(10));
                        tokio::select! {
                            _ = wake.notified() => {}
                            _ = tokio::time::sleep(left) => {}
                        }
                        continue;
                    }
                    let rollback = spec.on_approval_timeout()
                        == drover_common::proto::ApprovalTimeoutOutcome::Rollback;
                    Event::Abort {
                        rollback,
                        reason: format!(
                            "nobody approved stage {} within {}; {}",
                            spec.name,
                            humantime::format_duration(limit),
                            if rollback {
                                "rolling back as the pipeline says"
                            } else {
                                "stopped here as the pipeline says (earlier stages keep the new version)"
                            }
                        ),
                    }
                }
                _ => return Ok(()),
            };
            // Apply the outcome to the state as it is now (a control may
            // have changed it meanwhile; then the outcome may be refused).
            loop {
                let (mut rec, revision) = self.load(id).await?;
                let Ok((machine, _)) = rec.machine.apply(event.clone()) else {
                    break;
                };
                let message = format!("{event:?}");
                let before = (rec.machine.phase, rec.machine.stage, rec.machine.batch);
                rec.machine = machine;
                let audit = Self::transition_audit(before, &rec, &event, "drover");
                if self.save(&mut rec, revision, audit).await?.is_some() {
                    info!(deploy = %id, event = %message, phase = ?rec.machine.phase, "deploy step");
                    break;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn command(
        fence: (u32, u64),
        id: &str,
        stage: usize,
        batch: usize,
        host: &str,
        verb: &str,
        action: command::Action,
    ) -> Command {
        Command {
            command_id: format!("{id}/{stage}.{batch}/{host}/{verb}"),
            shard: fence.0,
            epoch: fence.1,
            action: Some(action),
        }
    }

    /// Pulls and restarts the batch's hosts, then judges it.
    async fn run_batch(
        self: &Arc<Self>,
        id: &str,
        stage: usize,
        batch: usize,
    ) -> Result<Event, DeployError> {
        let (rec, _) = self.load(id).await?;
        let fence = self.fence(&rec.pipeline)?;
        let spec = rec.snapshot.stages[stage].clone();
        let hosts = rec.plan[stage][batch].clone();
        let service = rec.service.clone();
        let artifact = rec.artifact.clone();
        let stuck = Duration::from_millis(u64::from(spec.stuck_timeout_ms.max(1000)));
        // Restarts of each host before the batch, to count crash loops after.
        let restarts_before: HashMap<String, u32> = hosts
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    self.service_health(h, &service)
                        .map(|s| s.restarts)
                        .unwrap_or(0),
                )
            })
            .collect();
        // Record the hosts as touched before anything can switch them.
        self.update(id, |rec| {
            for h in &hosts {
                if !rec.touched.contains(h) {
                    rec.touched.push(h.clone());
                }
            }
        })
        .await?;
        // Every host of the batch downloads first (nothing goes down for a
        // pull); only hosts holding the verified artifact are restarted, at
        // most max_unavailable at a time.
        let pulls = self.pull_batch(id, stage, batch, &hosts, stuck).await;
        let mut outcomes: Vec<(String, Result<(), String>)> = Vec::new();
        let ready: Vec<String> = hosts
            .iter()
            .filter(|h| match pulls.get(*h) {
                Some(Err(e)) => {
                    outcomes.push(((*h).clone(), Err(e.clone())));
                    false
                }
                _ => true,
            })
            .cloned()
            .collect();
        let max_unavailable = spec.max_unavailable.max(1) as usize;
        for chunk in ready.chunks(max_unavailable) {
            let mut tasks = tokio::task::JoinSet::new();
            for host in chunk {
                let this = self.clone();
                let (id, host, service, artifact) = (
                    id.to_string(),
                    host.clone(),
                    service.clone(),
                    artifact.clone(),
                );
                tasks.spawn(async move {
                    let restart = command::Action::Restart(RestartCommand {
                        service,
                        artifact,
                        ready_timeout_ms: stuck.as_millis() as u32,
                    });
                    let cmd = Self::command(fence, &id, stage, batch, &host, "restart", restart);
                    let outcome = match this
                        .send_patiently(&host, cmd, stuck + RESULT_SLACK, stuck)
                        .await
                    {
                        Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                        Ok(u) => Err(format!(
                            "restart: {}{}",
                            u.reason,
                            last_words(&u.output_tail)
                        )),
                        Err(e) => Err(e),
                    };
                    (host, outcome)
                });
            }
            while let Some(done) = tasks.join_next().await {
                outcomes.push(done.expect("host task does not panic"));
            }
        }
        // While this batch settles and is judged, the next one downloads.
        if let Some((next_stage, next_batch)) = next_position(&rec.plan, stage, batch) {
            let this = self.clone();
            let (id, next_hosts) = (id.to_string(), rec.plan[next_stage][next_batch].clone());
            tokio::spawn(async move {
                this.pull_batch(&id, next_stage, next_batch, &next_hosts, stuck)
                    .await;
            });
        }
        let failed: Vec<(String, String)> = outcomes
            .iter()
            .filter_map(|(h, o)| o.as_ref().err().map(|e| (h.clone(), e.clone())))
            .collect();
        self.update(id, |rec| {
            for (host, outcome) in &outcomes {
                match outcome {
                    Ok(()) => rec.set_result(host, HostOutcome::Updated, ""),
                    Err(e) => rec.set_result(host, HostOutcome::Failed, e.clone()),
                }
            }
        })
        .await?;
        // Failed hosts are excluded and charged to the stage's budget.
        let (rec, _) = self.load(id).await?;
        let stage_failed = rec.plan[stage]
            .iter()
            .flatten()
            .filter(|h| {
                rec.results
                    .get(*h)
                    .is_some_and(|r| r.outcome == HostOutcome::Failed as i32)
            })
            .count();
        if stage_failed as u32 > spec.failure_budget {
            let detail: Vec<String> = failed.iter().map(|(h, e)| format!("{h}: {e}")).collect();
            let reason = format!(
                "{stage_failed} hosts failed in stage {} (budget {}): {}",
                spec.name,
                spec.failure_budget,
                detail.join("; ")
            );
            self.set_verdict(id, stage, batch, &reason).await?;
            return Ok(Event::BatchFailed(reason));
        }
        let baseline: Vec<String> = rec.plan[stage]
            .iter()
            .flatten()
            .filter(|h| !rec.touched.contains(h))
            .cloned()
            .collect();
        let ok = |h: &&String| {
            rec.results
                .get(*h)
                .is_none_or(|r| r.outcome != HostOutcome::Failed as i32)
        };
        if rec.is_canary_step(stage, batch) {
            let cohort: Vec<String> = rec.plan[stage][..=batch]
                .iter()
                .flatten()
                .filter(ok)
                .cloned()
                .collect();
            return self
                .bake(canary::Step {
                    id,
                    stage,
                    step: batch,
                    cohort,
                    baseline,
                    service,
                })
                .await;
        }
        // A wave bakes for its own time before its gate judges it.
        let settle = rec.wave(stage, batch).map_or(spec.settle_ms, |w| w.bake_ms);
        tokio::time::sleep(Duration::from_millis(settle.into())).await;
        let updated: Vec<String> = hosts.iter().filter(ok).cloned().collect();
        let verdict = self
            .judge_batch(
                &spec.gate.unwrap_or_default(),
                &service,
                &updated,
                &baseline,
                &restarts_before,
            )
            .await;
        match verdict {
            Ok(()) => {
                self.set_verdict(id, stage, batch, "passed").await?;
                Ok(Event::BatchPassed)
            }
            Err(GateStop::Failed(reason)) => {
                self.set_verdict(id, stage, batch, &reason).await?;
                Ok(Event::BatchFailed(reason))
            }
            Err(GateStop::Hold(reason)) => {
                self.set_verdict(id, stage, batch, &reason).await?;
                Ok(Event::Hold(reason))
            }
        }
    }

    /// Pulls the artifact onto `hosts` (all at once); per host, Ok or why not.
    /// Ids are those of the batch, so a prefetch and the batch's own pull
    /// are one command to the agent.
    async fn pull_batch(
        self: &Arc<Self>,
        id: &str,
        stage: usize,
        batch: usize,
        hosts: &[String],
        patience: Duration,
    ) -> HashMap<String, Result<(), String>> {
        let fenced = match self.load(id).await {
            Ok((rec, _)) => self.fence(&rec.pipeline).map(|f| (rec, f)),
            Err(e) => Err(e),
        };
        let (rec, fence) = match fenced {
            Ok(v) => v,
            Err(e) => {
                return hosts
                    .iter()
                    .map(|h| (h.clone(), Err(e.to_string())))
                    .collect();
            }
        };
        let (signatures, size_bytes) = self.pull_facts(&rec.artifact).await;
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let this = self.clone();
            let (id, host) = (id.to_string(), host.clone());
            let pull = command::Action::Pull(PullCommand {
                service: rec.service.clone(),
                artifact: rec.artifact.clone(),
                sources: self.pull_sources(),
                size_bytes,
                signatures: signatures.clone(),
            });
            tasks.spawn(async move {
                let cmd = Self::command(fence, &id, stage, batch, &host, "pull", pull);
                let outcome = match this
                    .send_patiently(&host, cmd, COMMAND_TIMEOUT, patience)
                    .await
                {
                    Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                    Ok(u) => Err(format!("pull: {}", u.reason)),
                    Err(e) => Err(e),
                };
                (host, outcome)
            });
        }
        let mut out = HashMap::new();
        while let Some(done) = tasks.join_next().await {
            let (host, outcome) = done.expect("pull task does not panic");
            out.insert(host, outcome);
        }
        out
    }

    /// Where agents fetch artifacts: this coordinator first (it fetches a
    /// blob it lacks from its peers), then every other live coordinator.
    pub fn pull_sources(&self) -> Vec<String> {
        let mut sources = vec![self.origin.clone()];
        for m in self.leases.members() {
            if !m.address.is_empty() && !sources.contains(&m.address) {
                sources.push(m.address);
            }
        }
        sources
    }

    /// Sends a command, waiting up to `patience` for a disconnected host to
    /// come back (the stated policy for hosts that drop mid-batch: they get
    /// the stuck timeout to return, then they are failed and charged to the
    /// budget). Re-sending is safe: command ids are deterministic.
    async fn send_patiently(
        &self,
        host: &str,
        cmd: Command,
        timeout: Duration,
        patience: Duration,
    ) -> Result<drover_common::proto::CommandUpdate, String> {
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
                    e @ (crate::fleet::SendError::NotConnected(_)
                    | crate::fleet::SendError::StreamClosed(_)
                    | crate::fleet::SendError::Unfenced(..)),
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

    fn service_health(
        &self,
        host: &str,
        service: &str,
    ) -> Option<drover_common::proto::ServiceHealth> {
        self.registry
            .get(host)
            .and_then(|h| h.health.into_iter().find(|s| s.service == service))
    }

    /// Samples the batch against the baseline once per heartbeat interval:
    /// K consecutive bad samples fail it; after `samples`, it passes (or the
    /// inconclusive policy decides when no sample was conclusive).
    async fn judge_batch(
        &self,
        gate: &HealthGate,
        service: &str,
        batch: &[String],
        baseline: &[String],
        restarts_before: &HashMap<String, u32>,
    ) -> Result<(), GateStop> {
        if batch.is_empty() {
            return Ok(());
        }
        let interval = batch
            .iter()
            .filter_map(|h| self.registry.get(h))
            .map(|h| h.heartbeat_interval_ms)
            .max()
            .unwrap_or(1000);
        let mut bad_streak = 0u32;
        let mut conclusive = 0u32;
        let mut last_reason = String::new();
        // The window is `samples` conclusive samples (inconclusive ones, such
        // as the first intervals after a restart with no traffic counted yet,
        // do not fill it), up to three times as many attempts. A window that
        // ends in a bad streak is extended until the streak resolves: K bad
        // in a row fail, a good sample clears it.
        let wanted = gate.samples.max(1);
        let mut taken = 0u32;
        while (conclusive < wanted && taken < wanted * 3)
            || (bad_streak > 0 && taken < wanted * 3 + gate.bad_samples.max(1))
        {
            taken += 1;
            tokio::time::sleep(Duration::from_millis(interval.into())).await;
            let mut b = Sample::default();
            for h in batch {
                b.add(
                    self.service_health(h, service).as_ref(),
                    restarts_before.get(h).copied().unwrap_or(0),
                );
            }
            let mut base = Sample::default();
            for h in baseline {
                base.add(self.service_health(h, service).as_ref(), u32::MAX);
            }
            match judge(gate, &b, (!baseline.is_empty()).then_some(&base)) {
                Verdict::Good => {
                    bad_streak = 0;
                    conclusive += 1;
                }
                Verdict::Bad(reason) => {
                    bad_streak += 1;
                    conclusive += 1;
                    last_reason = reason;
                    if bad_streak >= gate.bad_samples.max(1) {
                        return Err(GateStop::Failed(format!(
                            "health gate failed {bad_streak} samples in a row: {last_reason}"
                        )));
                    }
                }
                Verdict::Inconclusive(reason) => last_reason = reason,
            }
        }
        if conclusive > 0 {
            return Ok(());
        }
        match gate.inconclusive() {
            InconclusivePolicy::Pass => Ok(()),
            InconclusivePolicy::Pause => Err(GateStop::Hold(format!(
                "paused: inconclusive health gate ({last_reason})"
            ))),
            _ => Err(GateStop::Failed(format!(
                "inconclusive health gate: {last_reason}"
            ))),
        }
    }

    /// Returns every touched host to the known-good release, most recently
    /// updated first, in parallel up to a cap. Never downloads: the agents
    /// still hold the release.
    async fn roll_back(self: &Arc<Self>, id: &str) -> Result<Event, DeployError> {
        let (rec, _) = self.load(id).await?;
        let fence = self.fence(&rec.pipeline)?;
        let mut hosts = rec.touched.clone();
        hosts.reverse();
        // Started strictly in order (most recent first), at most
        // ROLLBACK_PARALLELISM at once; results are written once at the end,
        // so writes do not grow with hosts. A crash before that write
        // repeats the rollback, which the agents answer from their records.
        let permits = Arc::new(tokio::sync::Semaphore::new(ROLLBACK_PARALLELISM));
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let this = self.clone();
            let (id, service, target) = (
                id.to_string(),
                rec.service.clone(),
                rec.rollback_target(&host).to_string(),
            );
            tasks.spawn(async move {
                let _permit = permit;
                let action = command::Action::Rollback(RollbackCommand {
                    service,
                    artifact: target,
                    ready_timeout_ms: 60_000,
                });
                let cmd = Command {
                    command_id: format!("{id}/rollback/{host}"),
                    shard: fence.0,
                    epoch: fence.1,
                    action: Some(action),
                };
                let outcome = match this
                    .send_patiently(&host, cmd, COMMAND_TIMEOUT, Duration::from_secs(60))
                    .await
                {
                    Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                    Ok(u) => Err(u.reason),
                    Err(e) => Err(e),
                };
                (host, outcome)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = tasks.join_next().await {
            results.push(done.expect("rollback task does not panic"));
        }
        self.update(id, |rec| {
            for (host, outcome) in &results {
                match outcome {
                    Ok(()) => rec.set_result(host, HostOutcome::RolledBack, "rolled back"),
                    Err(e) => rec.set_result(host, HostOutcome::Failed, format!("rollback: {e}")),
                }
            }
        })
        .await?;
        let failures: Vec<String> = results
            .into_iter()
            .filter_map(|(h, o)| o.err().map(|e| format!("{h}: {e}")))
            .collect();
        Ok(if failures.is_empty() {
            Event::RollbackDone
        } else {
            Event::RollbackFailed(failures.join("; "))
        })
    }

    async fn set_verdict(
        &self,
        id: &str,
        stage: usize,
        batch: usize,
        verdict: &str,
    ) -> Result<(), DeployError> {
        self.update(id, |rec| {
            rec.verdicts
                .insert(format!("{stage}/{batch}"), verdict.to_string());
        })
        .await
    }

    /// Stores a canary step's analysis with the deploy, with its audit line.
    async fn record_step_analysis(
        &self,
        id: &str,
        report: drover_common::proto::CanaryAnalysis,
    ) -> Result<(), DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            let verdict = report
                .verdict()
                .as_str_name()
                .trim_start_matches("ANALYSIS_VERDICT_");
            let message = format!(
                "stage {} canary step {} ({} canary, {} baseline hosts, {:.1}s): {verdict}: {}",
                report.stage,
                report.step,
                report.canary_hosts.len(),
                report.baseline_hosts.len(),
                report.baked_ms as f64 / 1000.0,
                report.reason
            );
            let audit = vec![Self::audit(&rec, "analysis", "drover", message)];
            rec.analyses
                .retain(|a| (a.stage, a.step) != (report.stage, report.step));
            rec.analyses.push(report.clone());
            if self.save(&mut rec, revision, audit).await?.is_some() {
                return Ok(());
            }
        }
    }

    /// Passes the canary step in flight (or on hold) by hand.
    pub async fn promote(
        self: &Arc<Self>,
        id: &str,
        who: &str,
    ) -> Result<DeployRecord, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            let (stage, step) = (rec.machine.stage, rec.machine.batch);
            if !matches!(rec.machine.phase, Phase::Rolling | Phase::Paused)
                || !rec.is_canary_step(stage, step)
            {
                return Err(DeployError::Conflict(format!(
                    "deploy {id} is {:?} at stage {stage} batch {step}, not in a canary step; nothing to promote",
                    rec.machine.phase
                )));
            }
            let key = format!("{stage}/{step}");
            let stage_name = rec.snapshot.stages[stage].name.clone();
            if !rec.promoted.contains(&key) {
                rec.promoted.push(key);
            }
            rec.approvals.push(format!(
                "{who} promoted canary step {step} of stage {stage_name}"
            ));
            let mut audit = vec![Self::audit(
                &rec,
                "promoted",
                who,
                format!("canary step {step} of stage {stage_name} promoted by hand"),
            )];
            let held = rec.machine.phase == Phase::Paused;
            if held {
                // On hold: the machine moves on now; the driver follows.
                let before = (rec.machine.phase, stage, step);
                let (machine, _) = rec
                    .machine
                    .apply(Event::Promote)
                    .map_err(|e| DeployError::Conflict(e.to_string()))?;
                rec.machine = machine;
                audit.extend(Self::transition_audit(before, &rec, &Event::Promote, who));
            }
            if self.save(&mut rec, revision, audit).await?.is_some() {
                info!(deploy = %id, %who, stage, step, "canary step promoted");
                self.live(id).notify_one();
                return Ok(rec);
            }
        }
    }

    /// Changes the record (not its phase) with compare-and-swap.
    async fn update(
        &self,
        id: &str,
        change: impl Fn(&mut DeployRecord),
    ) -> Result<(), DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            change(&mut rec);
            if self.save(&mut rec, revision, Vec::new()).await?.is_some() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::last_words;

    #[test]
    fn last_words_are_the_end_of_the_output_on_one_line() {
        assert_eq!(last_words(""), "");
        assert_eq!(last_words("a\nb\n"), " (output: a | b)");
        let long = "x".repeat(1000) + "\nthe end";
        let words = last_words(&long);
        assert!(words.starts_with(" (output: …x"), "{words}");
        assert!(words.ends_with(" | the end)"), "{words}");
        assert!(words.chars().count() < 420, "{}", words.len());
    }
}
