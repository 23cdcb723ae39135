//! The deploy facade the API calls: start (idempotent, one active deploy
//! per pipeline), controls (pause, resume, approve, promote, abort,
//! rollback), reads (records, watches, environments, audit, what ran
//! when) and resuming deploys on a shard just won. It decides nothing
//! itself: the state machine decides, the [`Ledger`] writes, the
//! [`Driver`] runs the deploy. Starting is in `starting.rs` (a config
//! deploy's beginnings in `config_start.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_common::proto::{AuditEvent, Environment, PullCommand, WhatWasRunningResponse};
use tracing::info;

use super::audit;
use super::blue_green::Step;
use super::clock::{Clock, SystemClock};
use super::driver::Driver;
use super::driver::effects::{Effects, FleetEffects};
use super::ledger::Ledger;
use super::machine::{Event, Phase};
use super::pipeline::{PipelineError, Pipelines};
use super::record::{DeployRecord, StageApproval};
use crate::fleet::{PendingCommands, Registry};
use crate::ha::leases::ShardLeases;
use crate::metrics::Metrics;
use crate::origin::BlobStore;
use crate::store::{Store, StoreError};

mod config_start;
mod starting;

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
    /// Routers the configuration declares, by name (`[routers.NAME]`).
    pub routers: std::collections::BTreeMap<String, crate::router::RouterConfig>,
    /// Peers handed to each pull (`--peers-per-pull`).
    pub peers_per_pull: usize,
    /// `--pull-mode`.
    pub pull_mode: crate::config::PullMode,
}

pub struct Deployments {
    ledger: Arc<Ledger>,
    driver: Arc<Driver>,
    /// Hosts a new deploy resolves its stages against.
    registry: Arc<Registry>,
    pipelines: Arc<Pipelines>,
    /// Artifacts a deploy may start with.
    blobs: Arc<BlobStore>,
}

impl Deployments {
    pub fn new(parts: Parts) -> Arc<Deployments> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let ledger = Arc::new(Ledger::new(
            parts.store,
            &parts.key_prefix,
            parts.leases.clone(),
            parts.metrics,
            clock,
        ));
        let effects: Arc<dyn Effects> = Arc::new(FleetEffects {
            registry: parts.registry.clone(),
            pending: parts.pending,
            blobs: parts.blobs.clone(),
            origin: parts.origin,
            leases: parts.leases,
            routers: Arc::new(parts.routers),
            peers_per_pull: parts.peers_per_pull,
            pull_mode: parts.pull_mode,
        });
        Arc::new(Deployments {
            driver: Driver::new(ledger.clone(), effects),
            ledger,
            registry: parts.registry,
            pipelines: parts.pipelines,
            blobs: parts.blobs,
        })
    }

    /// The Pull of `artifact` for `host`, as a deploy would send it.
    pub async fn pull_command(&self, service: &str, artifact: &str, host: &str) -> PullCommand {
        let mut pulls = self
            .driver
            .effects()
            .pull_commands(service, artifact, &[host.to_string()])
            .await;
        pulls.pop().expect("one pull per host asked")
    }

    /// The shard `pipeline` belongs to (whose leader runs its deploys).
    pub fn shard_of_pipeline(&self, pipeline: &str) -> u32 {
        self.ledger.shard_of_pipeline(pipeline)
    }

    /// Every artifact something may still need, and why (the first reason
    /// found): what an environment runs, a pipeline's known-good release,
    /// what a live deploy rolls out or back to. Artifact gc keeps these.
    pub async fn artifacts_in_use(&self) -> Result<BTreeMap<String, String>, DeployError> {
        let store = self.ledger.store();
        let keys = self.ledger.keys();
        let mut used = BTreeMap::new();
        let (envs, _) = store.range(&keys.environments()).await?;
        for kv in envs {
            let Ok(env) = <Environment as prost::Message>::decode(kv.value.as_slice()) else {
                continue;
            };
            let place = kv.key.strip_prefix(&keys.environments()).unwrap_or(&kv.key);
            used.entry(env.artifact)
                .or_insert_with(|| format!("running in {place}"));
        }
        let (goods, _) = store.range(&keys.known_goods()).await?;
        for kv in goods {
            let pipeline = kv.key.strip_prefix(&keys.known_goods()).unwrap_or(&kv.key);
            used.entry(String::from_utf8_lossy(&kv.value).into_owned())
                .or_insert_with(|| format!("known-good of {pipeline}"));
        }
        let (actives, _) = store.range(&keys.actives()).await?;
        for kv in actives {
            let id = String::from_utf8_lossy(&kv.value).into_owned();
            let Ok((rec, _)) = self.ledger.load(&id).await else {
                continue;
            };
            used.entry(rec.artifact.clone())
                .or_insert_with(|| format!("deployed by {id}"));
            used.entry(rec.known_good.clone())
                .or_insert_with(|| format!("rollback target of {id}"));
        }
        used.remove("");
        Ok(used)
    }

    /// Removes an artifact's metadata (`meta_key`, unchanged since
    /// `mod_revision`) and audits it, in one transaction; false when the
    /// metadata changed or went meanwhile (another coordinator's sweep).
    pub async fn collect_artifact(
        &self,
        info: &drover_common::proto::ArtifactInfo,
        meta_key: &str,
        mod_revision: u64,
        actor: &str,
        why: &str,
    ) -> Result<bool, DeployError> {
        use crate::store::{Compare, Op};
        let event = audit::artifact_collected(info, actor, why, self.ledger.now());
        self.ledger
            .record_with(
                &event,
                vec![Compare::ModRevision(meta_key.to_string(), mod_revision)],
                vec![Op::Delete(meta_key.to_string())],
            )
            .await
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
        let event = audit::command_by_hand(service, actor, host, cmd, self.ledger.now());
        self.ledger.record(&event).await
    }

    pub async fn audit_log(
        &self,
        service: &str,
        since: u64,
        until: u64,
    ) -> Result<Vec<AuditEvent>, DeployError> {
        self.ledger.audit_log(service, since, until).await
    }

    /// What ran for `service` at `at`, per environment, from the audit's
    /// structured events.
    pub async fn what_was_running(
        &self,
        service: &str,
        at: u64,
    ) -> Result<WhatWasRunningResponse, DeployError> {
        let events = self.ledger.audit_log(service, 0, at).await?;
        Ok(audit::what_was_running(&events, at))
    }

    /// The record and its store revision.
    pub async fn load(&self, id: &str) -> Result<(DeployRecord, u64), DeployError> {
        self.ledger.load(id).await
    }

    pub async fn list(&self, pipeline: &str) -> Result<Vec<DeployRecord>, DeployError> {
        self.ledger.list(pipeline).await
    }

    /// The deploy as it is now, then every stored change of it. Served from
    /// the store, so any coordinator answers and a watch outlives a failover
    /// of the deploy's leader.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl tokio_stream::Stream<Item = DeployRecord> + Send + use<>, DeployError> {
        self.ledger.watch(id).await
    }

    /// Applies `event` to the stored deploy by `who`. A refused event
    /// changes nothing and is reported.
    pub async fn control(
        &self,
        id: &str,
        event: Event,
        who: &str,
    ) -> Result<DeployRecord, DeployError> {
        self.control_noting(id, event, who, |_| {}).await
    }

    async fn control_noting(
        &self,
        id: &str,
        event: Event,
        who: &str,
        note: impl Fn(&mut DeployRecord),
    ) -> Result<DeployRecord, DeployError> {
        let applied = self
            .ledger
            .apply(id, &event, who, note)
            .await?
            .map_err(|refused| DeployError::Conflict(refused.to_string()))?;
        info!(deploy = %id, %who, event = ?event, phase = ?applied.rec.machine.phase, "deploy control");
        self.driver.wake(id);
        if applied.before.is_terminal() && !applied.rec.machine.phase.is_terminal() {
            // A rollback after COMPLETE: the deploy needs a driver again.
            self.driver.spawn(id.to_string());
        }
        Ok(applied.rec)
    }

    /// An approval of the stage deploy `id` waits at, by `approver` (an
    /// authenticated identity, or the free-text name without TLS; `who` is
    /// what the audit shows). The stage moves on once it holds
    /// `required_approvals` approvals from distinct approvers; with four
    /// eyes the deploy's starter cannot be one. Approving twice counts once.
    pub async fn approve(
        &self,
        id: &str,
        approver: &str,
        who: &str,
    ) -> Result<DeployRecord, DeployError> {
        loop {
            let (rec, _) = self.ledger.load(id).await?;
            if rec.machine.phase != Phase::AwaitingApproval {
                // The machine says why an approval does not apply now.
                return self.control(id, Event::Approve, who).await;
            }
            let index = rec.machine.stage;
            let stage = rec.snapshot.stages[index].clone();
            if stage.four_eyes && approver == rec.started_by {
                return Err(DeployError::Forbidden(format!(
                    "four eyes: {approver} started deploy {id} and cannot approve its stage {}",
                    stage.name
                )));
            }
            let given = |r: &DeployRecord| {
                r.stage_approvals
                    .iter()
                    .filter(|a| a.stage == stage.name)
                    .count()
            };
            let required = stage.required_approvals.max(1) as usize;
            // A stage its release train holds moves when the train releases
            // it and enough people approved (if any must): the driver
            // decides; an approval here is only recorded.
            let held = rec.held_by_train(index);
            if held && !stage.requires_approval {
                return Err(DeployError::Conflict(format!(
                    "deploy {id} waits before stage {} for its release train, not for people; nothing to approve",
                    stage.name
                )));
            }
            if rec
                .stage_approvals
                .iter()
                .any(|a| a.stage == stage.name && a.approver == approver)
            {
                if given(&rec) >= required && !held {
                    // Approvals raced in: enough now, the stage moves.
                    return self.control(id, Event::Approve, who).await;
                }
                return Ok(rec);
            }
            let approval = StageApproval {
                stage: stage.name.clone(),
                approver: approver.to_string(),
                at_unix_ms: self.ledger.now(),
            };
            if given(&rec) + 1 >= required && !held {
                let note = |r: &mut DeployRecord| {
                    r.stage_approvals.push(approval.clone());
                    r.approvals
                        .push(format!("{who} approved stage {}", stage.name));
                };
                return self.control_noting(id, Event::Approve, who, note).await;
            }
            // Not enough yet: record this one (the stage still waits).
            let still_waiting = |r: &DeployRecord| {
                r.machine.phase == Phase::AwaitingApproval && r.machine.stage == index
            };
            let rec = self
                .ledger
                .update(
                    id,
                    |r| {
                        if still_waiting(r) && !r.stage_approvals.contains(&approval) {
                            let n = given(r) + 1;
                            r.stage_approvals.push(approval.clone());
                            r.approvals.push(format!(
                                "{who} approved stage {} ({n} of {required})",
                                stage.name
                            ));
                        }
                    },
                    |r, now| vec![audit::approval(r, index, given(r), required, who, now)],
                )
                .await?;
            if held {
                self.driver.wake(id);
                return Ok(rec);
            }
            if given(&rec) >= required {
                continue; // approvals raced in: the next round moves the stage
            }
            return Ok(rec);
        }
    }

    /// Passes the canary step in flight (or on hold) by hand.
    pub async fn promote(&self, id: &str, who: &str) -> Result<DeployRecord, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let (stage, step) = (rec.machine.stage, rec.machine.batch);
        let blue_green = matches!(
            rec.blue_green_step(stage, step),
            Some(Step::StandUp | Step::Weight(_))
        );
        if !matches!(rec.machine.phase, Phase::Rolling | Phase::Paused)
            || !(rec.is_canary_step(stage, step) || blue_green)
        {
            return Err(DeployError::Conflict(format!(
                "deploy {id} is {:?} at stage {stage} batch {step}, not in a canary step or before a blue-green switch; nothing to promote",
                rec.machine.phase
            )));
        }
        let key = format!("{stage}/{step}");
        let stage_name = rec.snapshot.stages[stage].name.clone();
        let note = |r: &mut DeployRecord| {
            if !r.promoted.contains(&key) {
                r.promoted.push(key.clone());
            }
            r.approvals.push(if blue_green {
                format!("{who} promoted stage {stage_name}'s new slot (traffic switches)")
            } else {
                format!("{who} promoted canary step {step} of stage {stage_name}")
            });
        };
        let promoted = |r: &DeployRecord, now| vec![audit::promoted(r, stage, step, who, now)];
        let rec = if rec.machine.phase == Phase::Paused {
            // On hold: the machine moves on now; the driver follows.
            let rec = self.control_noting(id, Event::Promote, who, note).await?;
            self.ledger.update(id, |_| {}, promoted).await?;
            rec
        } else {
            // Baking: the bake sees the mark at its next look.
            let rec = self.ledger.update(id, note, promoted).await?;
            self.driver.wake(id);
            rec
        };
        info!(deploy = %id, %who, stage, step, blue_green, "promoted");
        Ok(rec)
    }

    /// The ledger (release trains write through it too).
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Which artifact runs in each stage of `pipeline`, in pipeline order.
    pub async fn environments(&self, pipeline: &str) -> Result<Vec<Environment>, DeployError> {
        let p = self.pipelines.get(pipeline).await?;
        let mut out = Vec::new();
        for stage in &p.stages {
            if let Some(env) = self.ledger.environment(pipeline, &stage.name).await? {
                out.push(env);
            }
        }
        Ok(out)
    }

    /// Resumes the unfinished deploys of `shard` (just won).
    pub async fn resume_shard(&self, shard: u32) -> Result<usize, DeployError> {
        self.resume(|rec| self.ledger.shard_of_pipeline(&rec.pipeline) == shard)
            .await
    }

    /// Resumes every unfinished deploy this coordinator leads (its start).
    pub async fn resume_all(&self) -> Result<usize, DeployError> {
        self.resume(|rec| self.ledger.leads(&rec.pipeline)).await
    }

    async fn resume(&self, ours: impl Fn(&DeployRecord) -> bool) -> Result<usize, DeployError> {
        let live: Vec<String> = self
            .ledger
            .list("")
            .await?
            .into_iter()
            .filter(|r| !r.machine.phase.is_terminal() && ours(r))
            .map(|r| r.id)
            .collect();
        for id in &live {
            info!(deploy = %id, "resuming deploy");
            self.driver.spawn(id.clone());
        }
        Ok(live.len())
    }
}
