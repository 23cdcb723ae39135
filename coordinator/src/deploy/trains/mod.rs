//! Release trains (`train.rs` is the pure model): start (validated,
//! idempotent, nothing started when anything is wrong), reads, watches,
//! abort, and one driver task per live train ([`driver`]) on the leader
//! of its first member's shard. A train's record is written only by that
//! leader, through the ledger with the shard's fencing guard; its members
//! are ordinary deploys on their own shards, started and controlled
//! through [`Members`] (the shard's leader, here or forwarded).

pub mod driver;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_common::proto::{AuditEvent, AuditKind, StartTrainRequest, Train, TrainFailurePolicy};
use tokio::sync::Notify;
use tracing::info;

use self::record::{MemberRecord, TrainRecord};
use super::deployments::{DeployError, Deployments};
use super::ledger::Ledger;
use super::record::DeployRecord;
use super::train::{self, Member, TrainPhase};
use crate::store::{Compare, Op};

/// How often a train (and a member held by one) looks at the others.
pub const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Why a member's control did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The member cannot be started or controlled (bad input, a pipeline
    /// busy with another deploy): the train stops, saying why.
    #[error("{0}")]
    Refused(String),
    /// Leadership is moving or a coordinator is unreachable: try again.
    #[error("{0}")]
    Retry(String),
}

/// The member deploys' controls, sent to the leader of each member's
/// shard with the train starter's authority (narrow, so the driver is
/// tested without a network).
#[async_trait::async_trait]
pub trait Members: Send + Sync {
    /// Starts `member`'s deploy as part of `train` (idempotent: the same
    /// train starts the same deploy); its id.
    async fn start(
        &self,
        train: &TrainRecord,
        member: &MemberRecord,
    ) -> Result<String, MemberError>;
    /// Aborts a live member deploy, rolling back what it changed if asked.
    async fn abort(
        &self,
        train: &TrainRecord,
        deploy: &str,
        rollback: bool,
        reason: &str,
    ) -> Result<(), MemberError>;
    /// Rolls back a completed member deploy.
    async fn roll_back(
        &self,
        train: &TrainRecord,
        deploy: &str,
        reason: &str,
    ) -> Result<(), MemberError>;
}

pub struct Trains {
    ledger: Arc<Ledger>,
    deployments: Arc<Deployments>,
    members: Arc<dyn Members>,
    /// Trains with a driver task here.
    live: Mutex<HashSet<String>>,
    /// Woken by a control (abort).
    wake: Arc<Notify>,
}

fn encode(rec: &TrainRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a train record always serializes")
}

impl Trains {
    pub fn new(deployments: Arc<Deployments>, members: Arc<dyn Members>) -> Arc<Trains> {
        Arc::new(Trains {
            ledger: deployments.ledger().clone(),
            deployments,
            members,
            live: Mutex::new(HashSet::new()),
            wake: Arc::new(Notify::new()),
        })
    }

    /// The shard whose leader runs a train whose members are `members`
    /// (its first member in dependency order); the cycle, if any, named.
    pub fn shard_of(&self, members: &[Member]) -> Result<u32, DeployError> {
        let order = train::order(members).map_err(|e| DeployError::Invalid(e.to_string()))?;
        Ok(self.ledger.shard_of_pipeline(&order[0]))
    }

    /// The shard of a stored train.
    pub async fn shard_of_train(&self, id: &str) -> Result<u32, DeployError> {
        let (rec, _) = self.load(id).await?;
        Ok(self.ledger.shard_of_pipeline(rec.home()))
    }

    /// Starts a train (on the leader of its first member's shard): every
    /// member is checked first (pipeline, artifact for its service, no
    /// active deploy, no cycle), so a bad train starts nothing.
    pub async fn start(
        self: &Arc<Self>,
        req: StartTrainRequest,
        started_by: &str,
        caller: Option<String>,
    ) -> Result<TrainRecord, DeployError> {
        let keys = self.ledger.keys().clone();
        if !req.idempotency_key.is_empty()
            && let Some(kv) = self
                .ledger
                .store()
                .get(&keys.train_key(&req.idempotency_key))
                .await?
        {
            return Ok(self.load(&String::from_utf8_lossy(&kv.value)).await?.0);
        }
        if req.members.len() > 64 {
            return Err(DeployError::Invalid(format!(
                "members: a train has at most 64, this one {}",
                req.members.len()
            )));
        }
        let members: Vec<Member> = req.members.iter().map(Member::from).collect();
        let order = train::order(&members).map_err(|e| DeployError::Invalid(e.to_string()))?;
        self.ledger.check_leader(&order[0])?;
        let mut checked = BTreeMap::new();
        for m in &members {
            let (pipeline, digest) = self
                .deployments
                .startable(&m.pipeline, &m.artifact)
                .await
                .map_err(|e| match e {
                    DeployError::Pipeline(p) => {
                        DeployError::Invalid(format!("member {}: {p}", m.pipeline))
                    }
                    DeployError::Invalid(t) => {
                        DeployError::Invalid(format!("member {}: {t}", m.pipeline))
                    }
                    other => other,
                })?;
            if let Some(active) = self.ledger.active(&m.pipeline).await? {
                return Err(DeployError::Conflict(format!(
                    "member {}: pipeline {} already has an active deploy: {active}",
                    m.pipeline, m.pipeline
                )));
            }
            checked.insert(m.pipeline.clone(), (pipeline, digest.hex()));
        }
        let stages_of: BTreeMap<String, Vec<String>> = checked
            .iter()
            .map(|(p, (pipeline, _))| {
                (
                    p.clone(),
                    pipeline.stages.iter().map(|s| s.name.clone()).collect(),
                )
            })
            .collect();
        let records: Vec<MemberRecord> = order
            .iter()
            .map(|name| {
                let m = members
                    .iter()
                    .find(|m| &m.pipeline == name)
                    .expect("ordered members");
                let (pipeline, artifact) = &checked[name];
                MemberRecord {
                    pipeline: name.clone(),
                    service: pipeline.service.clone(),
                    artifact: artifact.clone(),
                    after: m.after.clone(),
                    stages: stages_of[name].clone(),
                    holds: train::holds(m, &stages_of[name], &stages_of),
                    deploy_id: String::new(),
                }
            })
            .collect();
        let now = self.ledger.now();
        let rec = TrainRecord {
            id: format!("train-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            name: req.name.clone(),
            members: records,
            phase: TrainPhase::Running,
            reason: String::new(),
            rollback_on_failure: req.on_failure() != TrainFailurePolicy::Stop,
            aborted: None,
            released: BTreeMap::new(),
            rolled_back: BTreeSet::new(),
            log: vec![format!("started by {started_by}: {}", order.join(" → "))],
            requester: req.requester.clone(),
            started_by: started_by.to_string(),
            caller,
            idempotency_key: req.idempotency_key.clone(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
        };
        let key = keys.train(&rec.id);
        let mut compares = vec![Compare::Missing(key.clone())];
        let mut ops = vec![Op::put(key, encode(&rec))];
        if !rec.idempotency_key.is_empty() {
            let k = keys.train_key(&rec.idempotency_key);
            compares.push(Compare::Missing(k.clone()));
            ops.push(Op::put(k, rec.id.clone()));
        }
        let message = format!("release train {} started: {}", rec.id, order.join(" → "));
        let audit = self.audit(
            &rec,
            AuditKind::TrainStarted,
            None,
            "",
            &message,
            started_by,
        );
        let shard = self.ledger.shard_of_pipeline(rec.home());
        if self
            .ledger
            .write_guarded(shard, compares, ops, &audit)
            .await?
            .is_none()
        {
            // The same key raced in: answer with its train.
            return Box::pin(self.start(req, started_by, None)).await;
        }
        info!(train = %rec.id, members = %order.join(","), "release train started");
        self.spawn(rec.id.clone());
        Ok(rec)
    }

    /// The record and its store revision.
    pub async fn load(&self, id: &str) -> Result<(TrainRecord, u64), DeployError> {
        load(&self.ledger, id).await
    }

    /// The train as shown: its record with its members' deploys.
    pub async fn get(&self, id: &str) -> Result<Train, DeployError> {
        let (rec, _) = self.load(id).await?;
        Ok(rec.to_proto(&self.deploys_of(&rec).await?))
    }

    /// Every train, newest first.
    pub async fn list(&self) -> Result<Vec<Train>, DeployError> {
        let (kvs, _) = self
            .ledger
            .store()
            .range(&self.ledger.keys().trains())
            .await?;
        let mut recs: Vec<TrainRecord> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        recs.sort_by_key(|r| std::cmp::Reverse(r.created_at_unix_ms));
        let mut out = Vec::new();
        for rec in recs {
            out.push(rec.to_proto(&self.deploys_of(&rec).await?));
        }
        Ok(out)
    }

    /// The train now, then every change of it or its members' deploys,
    /// until it has finished. Read from the store, so any coordinator
    /// answers and a watch outlives a failover.
    pub async fn watch(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Train>, DeployError> {
        let first = self.get(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(last.clone()).await.is_err() {
                return;
            }
            loop {
                if TrainPhase::is_terminal_proto(last.phase) {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(LOOK_EVERY) => {}
                }
                let Ok(now) = this.get(&id).await else {
                    continue;
                };
                if now != last {
                    last = now;
                    if tx.send(last.clone()).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Stops a running train by hand (on its leader): live members are
    /// aborted, and with `rollback` every member already deployed goes
    /// back, dependents first.
    pub async fn abort(
        &self,
        id: &str,
        rollback: bool,
        who: &str,
        reason: &str,
    ) -> Result<TrainRecord, DeployError> {
        let why = if reason.is_empty() {
            format!("aborted by {who}")
        } else {
            format!("aborted by {who}: {reason}")
        };
        let rec = self
            .update(id, |rec| {
                if rec.phase != TrainPhase::Running {
                    return Err(DeployError::Conflict(format!(
                        "train {id} is {:?}; only a running train can be aborted",
                        rec.phase
                    )));
                }
                rec.phase = TrainPhase::Stopping;
                rec.aborted = Some(rollback);
                rec.reason = why.clone();
                rec.log.push(format!(
                    "{why}{}",
                    if rollback { " (rolling back)" } else { "" }
                ));
                Ok(Some((
                    AuditKind::TrainStopping,
                    None,
                    String::new(),
                    why.clone(),
                    who.to_string(),
                )))
            })
            .await?;
        self.wake.notify_waiters();
        Ok(rec)
    }

    /// Changes the stored train with `change` (as the leader of its
    /// shard), auditing what it returns: `(kind, only this member, stage,
    /// message, actor)`. Retries when the record moved meanwhile.
    pub(crate) async fn update(
        &self,
        id: &str,
        change: impl Fn(
            &mut TrainRecord,
        ) -> Result<
            Option<(AuditKind, Option<String>, String, String, String)>,
            DeployError,
        >,
    ) -> Result<TrainRecord, DeployError> {
        loop {
            let (mut rec, revision) = self.load(id).await?;
            let audited = change(&mut rec)?;
            rec.updated_at_unix_ms = self.ledger.now();
            let audit = match &audited {
                Some((kind, only, stage, message, actor)) => {
                    let mut events =
                        self.audit(&rec, *kind, only.as_deref(), stage, message, actor);
                    events
                        .iter_mut()
                        .for_each(|e| e.reason = rec.reason.clone());
                    events
                }
                None => Vec::new(),
            };
            let key = self.ledger.keys().train(id);
            let shard = self.ledger.shard_of_pipeline(rec.home());
            let written = self
                .ledger
                .write_guarded(
                    shard,
                    vec![Compare::ModRevision(key.clone(), revision)],
                    vec![Op::put(key, encode(&rec))],
                    &audit,
                )
                .await?;
            if written.is_some() {
                return Ok(rec);
            }
        }
    }

    /// One audit event per member's service (or only `only`'s).
    fn audit(
        &self,
        rec: &TrainRecord,
        kind: AuditKind,
        only: Option<&str>,
        stage: &str,
        message: &str,
        actor: &str,
    ) -> Vec<AuditEvent> {
        let now = self.ledger.now();
        rec.members
            .iter()
            .filter(|m| only.is_none_or(|o| o == m.pipeline))
            .map(|m| AuditEvent {
                at_unix_ms: now,
                service: m.service.clone(),
                pipeline: m.pipeline.clone(),
                deploy_id: if m.deploy_id.is_empty() {
                    rec.id.clone()
                } else {
                    m.deploy_id.clone()
                },
                actor: actor.to_string(),
                artifact: m.artifact.clone(),
                message: message.to_string(),
                event: kind as i32,
                stage: stage.to_string(),
                train_id: rec.id.clone(),
                ..Default::default()
            })
            .collect()
    }

    /// The deploys of `rec`'s members that have started, by id.
    pub async fn deploys_of(
        &self,
        rec: &TrainRecord,
    ) -> Result<BTreeMap<String, DeployRecord>, DeployError> {
        let mut out = BTreeMap::new();
        for m in rec.members.iter().filter(|m| !m.deploy_id.is_empty()) {
            match self.ledger.load(&m.deploy_id).await {
                Ok((d, _)) => {
                    out.insert(m.deploy_id.clone(), d);
                }
                Err(DeployError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Starts the task that drives `id` here, unless one already does.
    pub fn spawn(self: &Arc<Self>, id: String) {
        if !self.live.lock().expect("live lock").insert(id.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = driver::drive(&this, &id).await;
            this.live.lock().expect("live lock").remove(&id);
            if let Err(e) = result {
                tracing::warn!(train = %id, error = %e, "train task stopped");
            }
        });
    }

    /// Resumes the unfinished trains of `shard` (just won; every shard
    /// this coordinator leads at its start).
    pub async fn resume(self: &Arc<Self>, shard: Option<u32>) -> Result<usize, DeployError> {
        let (kvs, _) = self
            .ledger
            .store()
            .range(&self.ledger.keys().trains())
            .await?;
        let mut n = 0;
        for kv in kvs {
            let Ok(rec) = serde_json::from_slice::<TrainRecord>(&kv.value) else {
                continue;
            };
            let ours = match shard {
                Some(s) => self.ledger.shard_of_pipeline(rec.home()) == s,
                None => self.ledger.leads(rec.home()),
            };
            if !rec.phase.is_terminal() && ours {
                info!(train = %rec.id, "resuming release train");
                self.spawn(rec.id);
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub(crate) fn members(&self) -> &Arc<dyn Members> {
        &self.members
    }

    pub(crate) fn woken(&self) -> &Notify {
        &self.wake
    }
}

/// A stored train and its revision.
pub async fn load(ledger: &Ledger, id: &str) -> Result<(TrainRecord, u64), DeployError> {
    let kv = ledger
        .store()
        .get(&ledger.keys().train(id))
        .await?
        .ok_or_else(|| DeployError::NotFound(format!("no release train {id:?}")))?;
    let rec = serde_json::from_slice(&kv.value)
        .map_err(|e| DeployError::Invalid(format!("train {id} is unreadable: {e}")))?;
    Ok((rec, kv.mod_revision))
}
