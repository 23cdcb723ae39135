//! A deploy as stored: the state machine, the host plan resolved at start,
//! per-host outcomes and what was touched. Writes grow with batches, not
//! hosts: the record is rewritten once per transition and once per batch.

use std::collections::BTreeMap;

use drover_common::proto::{Batch, BatchHost, Deploy, DeployPhase, HostOutcome, Pipeline};
use serde::{Deserialize, Serialize};

use super::machine::{Machine, Phase};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostResult {
    pub outcome: i32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub id: String,
    pub pipeline: String,
    pub service: String,
    pub artifact: String,
    /// The release to return to on rollback; empty for a first deploy.
    pub known_good: String,
    pub machine: Machine,
    /// stage → batch → host ids.
    pub plan: Vec<Vec<Vec<String>>>,
    pub results: BTreeMap<String, HostResult>,
    /// "stage/batch" → verdict.
    pub verdicts: BTreeMap<String, String>,
    /// Hosts restarted to the new release, in order.
    pub touched: Vec<String>,
    pub requester: String,
    pub git_sha: String,
    pub idempotency_key: String,
    pub approvals: Vec<String>,
    pub created_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    pub snapshot: Pipeline,
    /// Times this record was written (grows with batches and transitions,
    /// not with hosts).
    #[serde(default)]
    pub writes: u64,
}

pub fn phase_proto(p: Phase) -> DeployPhase {
    match p {
        Phase::Pending => DeployPhase::Pending,
        Phase::Rolling => DeployPhase::Rolling,
        Phase::AwaitingApproval => DeployPhase::AwaitingApproval,
        Phase::Paused => DeployPhase::Paused,
        Phase::Complete => DeployPhase::Complete,
        Phase::Failed => DeployPhase::Failed,
        Phase::RollingBack => DeployPhase::RollingBack,
        Phase::RolledBack => DeployPhase::RolledBack,
        Phase::Aborted => DeployPhase::Aborted,
    }
}

impl DeployRecord {
    pub fn to_proto(&self) -> Deploy {
        let mut batches = Vec::new();
        for (s, stage) in self.plan.iter().enumerate() {
            for (b, hosts) in stage.iter().enumerate() {
                batches.push(Batch {
                    stage: s as u32,
                    index: b as u32,
                    hosts: hosts
                        .iter()
                        .map(|h| {
                            let r = self.results.get(h);
                            BatchHost {
                                host_id: h.clone(),
                                outcome: r
                                    .map(|r| r.outcome)
                                    .unwrap_or(HostOutcome::Pending as i32),
                                reason: r.map(|r| r.reason.clone()).unwrap_or_default(),
                            }
                        })
                        .collect(),
                    verdict: self
                        .verdicts
                        .get(&format!("{s}/{b}"))
                        .cloned()
                        .unwrap_or_default(),
                });
            }
        }
        Deploy {
            id: self.id.clone(),
            pipeline: self.pipeline.clone(),
            service: self.service.clone(),
            artifact: self.artifact.clone(),
            known_good: self.known_good.clone(),
            phase: phase_proto(self.machine.phase) as i32,
            stage: self.machine.stage as u32,
            batch: self.machine.batch as u32,
            reason: self.machine.reason.clone(),
            requester: self.requester.clone(),
            git_sha: self.git_sha.clone(),
            idempotency_key: self.idempotency_key.clone(),
            batches,
            created_at_unix_ms: self.created_at_unix_ms,
            updated_at_unix_ms: self.updated_at_unix_ms,
            pipeline_snapshot: Some(self.snapshot.clone()),
            approvals: self.approvals.clone(),
            store_writes: self.writes,
        }
    }

    pub fn set_result(&mut self, host: &str, outcome: HostOutcome, reason: impl Into<String>) {
        self.results.insert(
            host.to_string(),
            HostResult {
                outcome: outcome as i32,
                reason: reason.into(),
            },
        );
    }
}

/// Splits `hosts` into batches of `size`, or of `percent` of them (at least one host each).
pub fn batches(hosts: &[String], size: u32, percent: u32) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let per = if size > 0 {
        size as usize
    } else {
        (hosts.len() * percent as usize).div_ceil(100).max(1)
    };
    hosts.chunks(per).map(|c| c.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_by_count_and_percent() {
        let hosts: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
        assert_eq!(
            batches(&hosts, 3, 0)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(batches(&hosts, 0, 10).len(), 10);
        assert_eq!(
            batches(&hosts, 0, 25)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(
            batches(&hosts[..3], 0, 10).len(),
            3,
            "at least one host per batch"
        );
        assert!(batches(&[], 0, 10).is_empty());
    }
}
