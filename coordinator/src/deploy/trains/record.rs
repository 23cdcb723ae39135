//! A release train as stored (`trains/<id>`, JSON) and as shown: its
//! members, their deploys, what the train released and did. Pure; the
//! views of the members' deploys are read by the caller.

use std::collections::{BTreeMap, BTreeSet};

use drover_common::proto::{Train, TrainFailurePolicy, TrainMember};
use serde::{Deserialize, Serialize};

use crate::deploy::machine::Phase;
use crate::deploy::record::{DeployRecord, phase_proto};
use crate::deploy::train::{DeployView, Member, MemberView, Stop, TrainPhase, waiting_for};

/// One member as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub pipeline: String,
    pub service: String,
    pub artifact: String,
    pub after: Vec<String>,
    /// Its pipeline's environments (stage names) when the train started.
    pub stages: Vec<String>,
    /// Per stage: its deploy waits there for the train (`train::holds`).
    pub holds: Vec<bool>,
    /// Its deploy, once started (empty before).
    #[serde(default)]
    pub deploy_id: String,
}

impl MemberRecord {
    pub fn member(&self) -> Member {
        Member {
            pipeline: self.pipeline.clone(),
            artifact: self.artifact.clone(),
            after: self.after.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub id: String,
    pub name: String,
    /// Members in dependency order; the first one's shard runs the train.
    pub members: Vec<MemberRecord>,
    pub phase: TrainPhase,
    /// Why it stopped.
    #[serde(default)]
    pub reason: String,
    /// Roll back what was deployed when the train stops.
    pub rollback_on_failure: bool,
    /// Stopped by hand (AbortTrain), with its own rollback choice.
    #[serde(default)]
    pub aborted: Option<bool>,
    /// Per member, the environments the train let it enter.
    #[serde(default)]
    pub released: BTreeMap<String, BTreeSet<String>>,
    /// Members the train rolled back.
    #[serde(default)]
    pub rolled_back: BTreeSet<String>,
    /// What the train did, in order, for people.
    #[serde(default)]
    pub log: Vec<String>,
    pub requester: String,
    /// The authenticated identity that started it (`user/alice`).
    pub started_by: String,
    /// How a coordinator forwards a member's control on the starter's
    /// behalf (`auth::CALLER_HEADER`); none without TLS.
    #[serde(default)]
    pub caller: Option<String>,
    #[serde(default)]
    pub idempotency_key: String,
    pub created_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
}

impl TrainRecord {
    pub fn members(&self) -> Vec<Member> {
        self.members.iter().map(MemberRecord::member).collect()
    }

    pub fn member(&self, pipeline: &str) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.pipeline == pipeline)
    }

    /// The pipeline whose shard leads the train.
    pub fn home(&self) -> &str {
        &self.members[0].pipeline
    }

    /// How the train ends once it stops (rule 3).
    pub fn stop(&self) -> Stop {
        match self.aborted {
            Some(rollback) => Stop {
                rollback,
                by_hand: true,
            },
            None => Stop {
                rollback: self.rollback_on_failure,
                by_hand: false,
            },
        }
    }

    /// Whether the train let `pipeline` enter `env`.
    pub fn has_released(&self, pipeline: &str, env: &str) -> bool {
        self.released.get(pipeline).is_some_and(|e| e.contains(env))
    }

    /// The train's view of each member, from its deploy's record
    /// (`deploys` by deploy id; a member not started has none).
    pub fn views(&self, deploys: &BTreeMap<String, DeployRecord>) -> BTreeMap<String, MemberView> {
        self.members
            .iter()
            .map(|m| {
                let deploy = deploys.get(&m.deploy_id).map(|rec| DeployView {
                    phase: rec.machine.phase,
                    completed: rec.completed_environments().into_iter().collect(),
                    held_at: (rec.machine.phase == Phase::AwaitingApproval
                        && rec.held_by_train(rec.machine.stage))
                    .then(|| rec.snapshot.stages[rec.machine.stage].name.clone()),
                    reason: rec.machine.reason.clone(),
                });
                let view = MemberView {
                    stages: m.stages.clone(),
                    deploy,
                    released: self.released.get(&m.pipeline).cloned().unwrap_or_default(),
                };
                (m.pipeline.clone(), view)
            })
            .collect()
    }

    pub fn to_proto(&self, deploys: &BTreeMap<String, DeployRecord>) -> Train {
        let views = self.views(deploys);
        let members = self
            .members
            .iter()
            .map(|m| {
                let rec = deploys.get(&m.deploy_id);
                let view = &views[&m.pipeline];
                let held_at = view.deploy.as_ref().and_then(|d| d.held_at.clone());
                TrainMember {
                    pipeline: m.pipeline.clone(),
                    service: m.service.clone(),
                    artifact: m.artifact.clone(),
                    after: m.after.clone(),
                    deploy_id: m.deploy_id.clone(),
                    phase: rec.map_or(0, |r| phase_proto(r.machine.phase) as i32),
                    stage: rec
                        .and_then(|r| r.snapshot.stages.get(r.machine.stage))
                        .map(|s| s.name.clone())
                        .unwrap_or_default(),
                    completed: rec.map(|r| r.completed_environments()).unwrap_or_default(),
                    waiting_for: match (&held_at, self.phase) {
                        (Some(env), TrainPhase::Running) => {
                            let w = waiting_for(&m.member(), env, &views);
                            if w.is_empty() {
                                format!("the train to release {env}")
                            } else {
                                w
                            }
                        }
                        _ => String::new(),
                    },
                    rolled_back_by_train: self.rolled_back.contains(&m.pipeline),
                    reason: rec.map(|r| r.machine.reason.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Train {
            id: self.id.clone(),
            name: self.name.clone(),
            phase: phase_to_proto(self.phase) as i32,
            reason: self.reason.clone(),
            members,
            on_failure: if self.rollback_on_failure {
                TrainFailurePolicy::Rollback
            } else {
                TrainFailurePolicy::Stop
            } as i32,
            started_by: self.started_by.clone(),
            requester: self.requester.clone(),
            created_at_unix_ms: self.created_at_unix_ms,
            updated_at_unix_ms: self.updated_at_unix_ms,
            log: self.log.clone(),
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

pub fn phase_to_proto(p: TrainPhase) -> drover_common::proto::TrainPhase {
    use drover_common::proto::TrainPhase as P;
    match p {
        TrainPhase::Running => P::Running,
        TrainPhase::Complete => P::Complete,
        TrainPhase::Stopping => P::Stopping,
        TrainPhase::RollingBack => P::RollingBack,
        TrainPhase::Failed => P::Failed,
        TrainPhase::RolledBack => P::RolledBack,
        TrainPhase::Aborted => P::Aborted,
    }
}
