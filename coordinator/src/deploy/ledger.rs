//! The deploy ledger: everything a deploy keeps in the store, and the only
//! code that writes it. A deploy record is read with its revision and
//! written back with a compare-and-swap on that revision plus the shard
//! leader's fencing guard, so a concurrent control or a deposed leader can
//! never overwrite a newer state. One write carries, in one transaction:
//!
//! 1. the record (the machine's new state);
//! 2. the ledger actions of the transition ([`Action::is_ledger`]): a stage
//!    passed (`passed/` and `environments/`), the known-good release, the
//!    environments restored after a rollback, the pipeline's active marker
//!    released;
//! 3. the transition's audit events.
//!
//! So what the machine decided, what the environments say and what the
//! audit tells are never out of step, whichever coordinator wrote them.

use std::sync::Arc;

use drover_common::proto::{AuditEvent, BakeEvidence, Environment, Slot};
use prost::Message;
use tokio_stream::StreamExt;
use tracing::warn;

use super::audit;
use super::clock::Clock;
use super::deployments::DeployError;
use super::machine::{Action, Event, Phase, Refused};
use super::record::DeployRecord;
use crate::ha::leases::ShardLeases;
use crate::ha::shards::shard_of;
use crate::metrics::Metrics;
use crate::store::keys::Keys;
use crate::store::{Compare, KeyValue, Op, Store, StoreError, Txn, WatchEvent};

pub struct Ledger {
    store: Arc<dyn Store>,
    /// Where everything lives in the store.
    keys: Keys,
    /// Whose writes land: every write carries the shard leader's guard.
    leases: Arc<ShardLeases>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
}

/// A transition written: the new record and the actions it returned.
pub struct Applied {
    /// The phase the event was applied to (the record as it was written over).
    pub before: Phase,
    pub rec: DeployRecord,
    pub actions: Vec<Action>,
}

fn encode(rec: &DeployRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a deploy record always serializes")
}

impl Ledger {
    pub fn new(
        store: Arc<dyn Store>,
        key_prefix: &str,
        leases: Arc<ShardLeases>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> Ledger {
        Ledger {
            store,
            keys: Keys::new(key_prefix),
            leases,
            metrics,
            clock,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now_unix_ms()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
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

    /// Every deploy of `pipeline` (all pipelines if empty), newest first.
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

    /// The deploy as it is now, then every stored change of it. A watch
    /// that falls behind re-reads the record and watches again, so a
    /// watcher may skip intermediate states but always sees the latest.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl tokio_stream::Stream<Item = DeployRecord> + Send + use<>, DeployError> {
        let key = self.keys.deploy(id);
        // Watch before reading, so no change falls between the two.
        let mut changes = self.store.watch(&key).await?;
        let (current, revision) = self.load(id).await?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let decode = |kv: &KeyValue| serde_json::from_slice::<DeployRecord>(&kv.value).ok();
            let mut seen = revision;
            if tx.send(current).await.is_err() {
                return;
            }
            loop {
                let latest = match changes.next().await {
                    Some(Ok(WatchEvent::Put(kv))) if kv.key == key => Some(kv),
                    Some(Ok(_)) => None,
                    Some(Err(StoreError::Lagged { after })) => {
                        warn!(key, after, "deploy watch fell behind: re-reading");
                        let Ok(again) = store.watch(&key).await else {
                            return;
                        };
                        changes = again;
                        match store.get(&key).await {
                            Ok(kv) => kv,
                            Err(_) => return,
                        }
                    }
                    Some(Err(_)) | None => return,
                };
                let Some(kv) = latest.filter(|kv| kv.mod_revision > seen) else {
                    continue;
                };
                seen = kv.mod_revision;
                if let Some(rec) = decode(&kv)
                    && tx.send(rec).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Applies `event` to the stored deploy, by `actor`, retrying on
    /// concurrent writes; `note` changes the record alongside (an approval
    /// line). `Err(Refused)` when the machine refuses the event in the
    /// state the deploy is in now (nothing is written).
    pub async fn apply(
        &self,
        id: &str,
        event: &Event,
        actor: &str,
        note: impl Fn(&mut DeployRecord),
    ) -> Result<Result<Applied, Refused>, DeployError> {
        self.apply_if(id, event, actor, |_| true, note).await
    }

    /// [`Ledger::apply`], only while `still` holds for the stored record
    /// (the driver's rule 4: an outcome applies to the state that asked).
    pub async fn apply_if(
        &self,
        id: &str,
        event: &Event,
        actor: &str,
        still: impl Fn(&DeployRecord) -> bool,
        note: impl Fn(&mut DeployRecord),
    ) -> Result<Result<Applied, Refused>, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            if !still(&rec) {
                return Ok(Err(Refused {
                    event: "apply the outcome of a step it moved past",
                    phase: rec.machine.phase,
                }));
            }
            let before = rec.machine.clone();
            let (machine, actions) = match rec.machine.apply(event.clone()) {
                Ok(next) => next,
                Err(refused) => return Ok(Err(refused)),
            };
            rec.machine = machine;
            note(&mut rec);
            let audit = audit::transition(&before, &rec, event, &actions, actor, self.now());
            if self
                .save(&mut rec, revision, &actions, audit)
                .await?
                .is_some()
            {
                return Ok(Ok(Applied {
                    before: before.phase,
                    rec,
                    actions,
                }));
            }
        }
    }

    /// Changes the record (not its phase) with compare-and-swap, with the
    /// audit events `audit` builds from the changed record.
    pub async fn update(
        &self,
        id: &str,
        change: impl Fn(&mut DeployRecord),
        audit: impl Fn(&DeployRecord, u64) -> Vec<AuditEvent>,
    ) -> Result<DeployRecord, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            change(&mut rec);
            let events = audit(&rec, self.now());
            if self.save(&mut rec, revision, &[], events).await?.is_some() {
                return Ok(rec);
            }
        }
    }

    /// Writes `rec` if the record is still at `revision`, with the ledger
    /// writes of `actions` and the `audit` events; the new revision, or
    /// `None` if the record changed meanwhile.
    pub async fn save(
        &self,
        rec: &mut DeployRecord,
        revision: u64,
        actions: &[Action],
        audit: Vec<AuditEvent>,
    ) -> Result<Option<u64>, DeployError> {
        let now = self.now();
        rec.updated_at_unix_ms = now;
        rec.writes += 1;
        rec.awaiting_since_unix_ms = match rec.machine.phase {
            Phase::AwaitingApproval if rec.awaiting_since_unix_ms == 0 => now,
            Phase::AwaitingApproval => rec.awaiting_since_unix_ms,
            _ => 0,
        };
        let key = self.keys.deploy(&rec.id);
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let mut compares = vec![
            Compare::ModRevision(key.clone(), revision),
            self.guard(shard)?,
        ];
        let mut success = vec![Op::put(key, encode(rec))];
        for action in actions {
            success.extend(self.ledger_ops(rec, action, now, &mut compares).await?);
        }
        success.extend(self.audit_ops(&audit, &format!("w{:08}", rec.writes)));
        self.guarded_txn(shard, compares, success).await
    }

    /// The puts of a write's audit events (numbered within the write).
    /// The audit events' writes, and for each notifiable one its outbox
    /// entry (`notify::rules` rule 1): both in the caller's transaction.
    /// `write` keeps the events of two writes in the same millisecond
    /// apart (`Keys::audit_event`).
    fn audit_ops(&self, audit: &[AuditEvent], write: &str) -> Vec<Op> {
        let mut ops = Vec::new();
        // A train's event is written once per member's service, and
        // notified once.
        let mut trains = std::collections::HashSet::new();
        for (n, event) in audit.iter().enumerate() {
            let bytes = event.encode_to_vec();
            let train_wide = crate::notify::rules::train_wide(event.event())
                && !trains.insert((event.event, event.train_id.clone()));
            if crate::notify::rules::event_of(event.event()).is_some() && !train_wide {
                ops.push(Op::put(
                    self.keys
                        .outbox_entry(event.at_unix_ms, &event.deploy_id, write, n),
                    bytes.clone(),
                ));
            }
            ops.push(Op::put(
                self.keys
                    .audit_event(&event.service, event.at_unix_ms, &event.deploy_id, write, n),
                bytes,
            ));
        }
        ops
    }

    /// Writes `ops` with `audit` as `shard`'s leader if every one of
    /// `compares` holds: the new revision, or `None` when a compare failed
    /// (a release train's record: trains live on their first member's
    /// shard).
    pub async fn write_guarded(
        &self,
        shard: u32,
        mut compares: Vec<Compare>,
        mut ops: Vec<Op>,
        audit: &[AuditEvent],
    ) -> Result<Option<u64>, DeployError> {
        compares.push(self.guard(shard)?);
        let write = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        ops.extend(self.audit_ops(audit, &write));
        self.guarded_txn(shard, compares, ops).await
    }

    /// Runs a transaction of `shard`'s leader: the new revision, or `None`
    /// when a compare failed; refused (and counted) if another coordinator
    /// leads the shard now.
    async fn guarded_txn(
        &self,
        shard: u32,
        compares: Vec<Compare>,
        success: Vec<Op>,
    ) -> Result<Option<u64>, DeployError> {
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
        Ok(r.succeeded.then_some(r.revision))
    }

    /// The store writes of one ledger action of `rec`'s transition.
    async fn ledger_ops(
        &self,
        rec: &DeployRecord,
        action: &Action,
        now: u64,
        compares: &mut Vec<Compare>,
    ) -> Result<Vec<Op>, DeployError> {
        let environment =
            |stage: usize, (artifact, config): (&str, &str), forced: bool, live_slot: Slot| {
                let name = rec.snapshot.stages[stage].name.clone();
                let env = Environment {
                    config: config.to_string(),
                    stage: name.clone(),
                    artifact: artifact.to_string(),
                    deploy_id: rec.id.clone(),
                    since_unix_ms: now,
                    forced,
                    live_slot: live_slot as i32,
                };
                Op::put(
                    self.keys.environment(&rec.pipeline, &name),
                    env.encode_to_vec(),
                )
            };
        Ok(match action {
            Action::PassStage { stage } => vec![
                Op::put(
                    self.keys.passed(
                        &rec.pipeline,
                        &rec.snapshot.stages[*stage].name,
                        &rec.artifact,
                    ),
                    now.to_string(),
                ),
                environment(
                    *stage,
                    (&rec.artifact, rec.stage_config(*stage)),
                    !rec.forced_past.is_empty(),
                    rec.live_slot_after(*stage),
                ),
            ],
            // A config deploy leaves the code, and so the known good, alone.
            Action::MarkKnownGood if rec.is_config_deploy() => Vec::new(),
            Action::MarkKnownGood => vec![Op::put(
                self.keys.known_good(&rec.pipeline),
                rec.artifact.clone(),
            )],
            Action::RestorePrevious => {
                let mut ops: Vec<Op> = rec
                    .touched_stages()
                    .into_iter()
                    .map(|s| {
                        let target = rec.stage_rollback_target(s);
                        let config = rec.stage_rollback_config(s);
                        environment(s, (target, config), false, rec.live_slot_before(s))
                    })
                    .collect();
                if !rec.known_good.is_empty() {
                    // The release returned to is the known good again (also
                    // after a rollback of a completed deploy).
                    ops.push(Op::put(
                        self.keys.known_good(&rec.pipeline),
                        rec.known_good.clone(),
                    ));
                }
                ops
            }
            Action::ReleasePipeline => {
                // Only our own marker: after a rollback of a completed
                // deploy, the pipeline may be running its next one.
                let key = self.keys.active(&rec.pipeline);
                match self.store.get(&key).await? {
                    Some(kv) if kv.value == rec.id.as_bytes() => {
                        compares.push(Compare::Value(key.clone(), kv.value));
                        vec![Op::Delete(key)]
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        })
    }

    /// Writes a new deploy: its record, the pipeline's active marker and
    /// the idempotency key (both must be free), and its first audit
    /// events. `false` if another start won the race.
    pub async fn create(
        &self,
        rec: &DeployRecord,
        actions: &[Action],
        audit: Vec<AuditEvent>,
    ) -> Result<bool, DeployError> {
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let active = self.keys.active(&rec.pipeline);
        let mut compares = vec![Compare::Missing(active.clone()), self.guard(shard)?];
        let mut success = vec![
            Op::put(self.keys.deploy(&rec.id), encode(rec)),
            Op::put(active, rec.id.clone()),
        ];
        for action in actions {
            success.extend(
                self.ledger_ops(rec, action, self.now(), &mut compares)
                    .await?,
            );
        }
        success.extend(self.audit_ops(&audit, &format!("w{:08}", rec.writes)));
        if !rec.idempotency_key.is_empty() {
            let key = self.keys.idempotency(&rec.pipeline, &rec.idempotency_key);
            compares.push(Compare::Missing(key.clone()));
            success.push(Op::put(key, rec.id.clone()));
        }
        Ok(self.guarded_txn(shard, compares, success).await?.is_some())
    }

    /// The deploy an idempotency key of `pipeline` started, if any.
    pub async fn by_idempotency_key(
        &self,
        pipeline: &str,
        key: &str,
    ) -> Result<Option<String>, DeployError> {
        Ok(self
            .store
            .get(&self.keys.idempotency(pipeline, key))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// The deploy `pipeline` is running now, if any.
    pub async fn active(&self, pipeline: &str) -> Result<Option<String>, DeployError> {
        Ok(self
            .store
            .get(&self.keys.active(pipeline))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// The pipeline's last known-good release (empty: none yet).
    pub async fn known_good(&self, pipeline: &str) -> Result<String, DeployError> {
        Ok(self
            .store
            .get(&self.keys.known_good(pipeline))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default())
    }

    /// What environment `stage` of `pipeline` runs, if it was ever deployed.
    pub async fn environment(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> Result<Option<Environment>, DeployError> {
        let Some(kv) = self
            .store
            .get(&self.keys.environment(pipeline, stage))
            .await?
        else {
            return Ok(None);
        };
        Environment::decode(kv.value.as_slice())
            .map(Some)
            .map_err(|e| {
                DeployError::Invalid(format!("stored environment {stage} is unreadable: {e}"))
            })
    }

    /// Keeps what a canary step's bake has seen so far, for a new leader
    /// (written by `rec`'s shard leader only).
    pub async fn save_evidence(
        &self,
        rec: &DeployRecord,
        (stage, step): (usize, usize),
        evidence: &BakeEvidence,
    ) -> Result<(), DeployError> {
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let key = self.keys.evidence(&rec.id, stage, step);
        let put = Op::put(key, evidence.encode_to_vec());
        self.guarded_txn(shard, vec![self.guard(shard)?], vec![put])
            .await
            .map(|_| ())
    }

    /// What an earlier leader kept of a canary step's bake, if anything
    /// (unreadable evidence is none: the bake starts a new window).
    pub async fn evidence(
        &self,
        id: &str,
        (stage, step): (usize, usize),
    ) -> Result<Option<BakeEvidence>, DeployError> {
        let key = self.keys.evidence(id, stage, step);
        Ok(self
            .store
            .get(&key)
            .await?
            .and_then(|kv| BakeEvidence::decode(kv.value.as_slice()).ok()))
    }

    /// Forgets a canary step's evidence (its verdict is in the record).
    pub async fn drop_evidence(
        &self,
        rec: &DeployRecord,
        (stage, step): (usize, usize),
    ) -> Result<(), DeployError> {
        let shard = self.shard_of_pipeline(&rec.pipeline);
        let key = self.keys.evidence(&rec.id, stage, step);
        self.guarded_txn(shard, vec![self.guard(shard)?], vec![Op::Delete(key)])
            .await
            .map(|_| ())
    }

    /// Whether `artifact` passed stage `stage` of `pipeline`.
    pub async fn passed(
        &self,
        pipeline: &str,
        stage: &str,
        artifact: &str,
    ) -> Result<bool, DeployError> {
        Ok(self
            .store
            .get(&self.keys.passed(pipeline, stage, artifact))
            .await?
            .is_some())
    }

    /// Adds one event to `service`'s audit log on its own (a command sent
    /// by hand: no deploy record changes with it).
    pub async fn record(&self, event: &AuditEvent) -> Result<(), DeployError> {
        let key = self.keys.audit_command(
            &event.service,
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

    /// Adds `event` to its service's audit log in the same transaction as
    /// `ops`, only if every one of `compares` holds (an artifact collected:
    /// its metadata removed and the removal audited together, once).
    /// Returns whether it was applied.
    pub async fn record_with(
        &self,
        event: &AuditEvent,
        compares: Vec<crate::store::Compare>,
        mut ops: Vec<Op>,
    ) -> Result<bool, DeployError> {
        let key = self.keys.audit_command(
            &event.service,
            event.at_unix_ms,
            &uuid::Uuid::new_v4().simple().to_string(),
        );
        ops.push(Op::put(key, event.encode_to_vec()));
        let result = self
            .store
            .txn(Txn {
                compares,
                success: ops,
                failure: vec![],
            })
            .await?;
        Ok(result.succeeded)
    }

    /// `service`'s audit log between `since` and `until` (0: open), in time order.
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

    /// The shard `pipeline` belongs to (whose leader runs its deploys).
    pub fn shard_of_pipeline(&self, pipeline: &str) -> u32 {
        shard_of(pipeline, self.leases.shards)
    }

    /// Whether this coordinator leads `pipeline`'s shard now.
    pub fn leads(&self, pipeline: &str) -> bool {
        self.leases
            .leadership(self.shard_of_pipeline(pipeline))
            .is_some()
    }

    /// The compare every write for `shard` carries: only its leader's land.
    fn guard(&self, shard: u32) -> Result<Compare, DeployError> {
        self.leases.guard(shard).ok_or_else(|| {
            DeployError::NotLeader(format!("this coordinator does not lead shard {shard}"))
        })
    }

    /// Refuses at once unless this coordinator leads `pipeline`'s shard.
    pub fn check_leader(&self, pipeline: &str) -> Result<(), DeployError> {
        self.guard(self.shard_of_pipeline(pipeline)).map(|_| ())
    }

    /// This coordinator's leadership of `pipeline`'s shard: the shard and
    /// epoch stamped on commands, and the token cancelled when it is lost.
    pub fn leadership(
        &self,
        pipeline: &str,
    ) -> Result<(u32, crate::ha::election::Leadership), DeployError> {
        let shard = self.shard_of_pipeline(pipeline);
        let leadership = self.leases.leadership(shard).ok_or_else(|| {
            DeployError::NotLeader(format!("this coordinator does not lead shard {shard}"))
        })?;
        Ok((shard, leadership))
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
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use crate::deploy::testing::World;

    /// A WatchDeploy whose client reads nothing while hundreds of changes
    /// are made (the store buffers 32) still ends on the record's latest state (it re-reads when
    /// its store watch falls behind), and its revisions never go back.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_watch_that_falls_behind_still_reaches_the_latest_state() {
        let w = World::with_watch_buffer(&["h1"], 32).await;
        let p = crate::deploy::testing::staged_pipeline(&["prod"]);
        let id = w.start(&p, &[&["h1"]]).await;
        let mut watch = w.ledger.watch(&id).await.unwrap();
        for n in 0..400u32 {
            w.ledger
                .update(&id, |r| r.requester = format!("n{n}"), |_, _| Vec::new())
                .await
                .unwrap();
        }
        let mut writes = 0;
        loop {
            let rec = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next())
                .await
                .expect("the watch keeps delivering")
                .expect("the watch does not end");
            assert!(
                rec.writes >= writes,
                "went back from {writes} to {}",
                rec.writes
            );
            writes = rec.writes;
            if rec.requester == "n399" {
                break;
            }
        }
    }
}
