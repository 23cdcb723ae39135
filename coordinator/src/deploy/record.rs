//! A deploy as stored: the state machine, the host plan resolved at start,
//! per-host outcomes and what was touched. Writes grow with batches, not
//! hosts: the record is rewritten once per transition and once per batch.

use std::collections::BTreeMap;

use drover_common::labels::Selector;
use drover_common::proto::{
    Batch, BatchHost, BlueGreenStatus, Canary, CanaryAnalysis, Deploy, DeployPhase, Host,
    HostOutcome, Pipeline, Slot, Stage,
};
use serde::{Deserialize, Serialize};

use super::blue_green::{BlueGreenStage, Step};
use super::machine::{Machine, Phase};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostResult {
    pub outcome: i32,
    pub reason: String,
}

/// One approval of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageApproval {
    pub stage: String,
    pub approver: String,
    pub at_unix_ms: u64,
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
    /// Who approved which stage (distinct approvers count).
    #[serde(default)]
    pub stage_approvals: Vec<StageApproval>,
    /// The authenticated identity that started the deploy (`user/alice`),
    /// or the free-text requester without TLS.
    #[serde(default)]
    pub started_by: String,
    pub created_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    pub snapshot: Pipeline,
    /// Times this record was written (grows with batches and transitions,
    /// not with hosts).
    #[serde(default)]
    pub writes: u64,
    /// Per stage, the bake (ms) of each canary step; the stage's first plan
    /// entries are those steps (step k's entry holds the hosts it adds to
    /// the cohort).
    #[serde(default)]
    pub canary_bakes: Vec<Vec<u32>>,
    /// The analysis of every canary step judged so far.
    #[serde(default)]
    pub analyses: Vec<CanaryAnalysis>,
    /// "stage/step" of canary steps passed by hand (PromoteDeploy).
    #[serde(default)]
    pub promoted: Vec<String>,
    /// Per stage, its waves: the plan entries right after its canary steps.
    #[serde(default)]
    pub waves: Vec<Vec<WaveEntry>>,
    /// When the deploy began waiting for the approval in front of it (0: it
    /// is not waiting).
    #[serde(default)]
    pub awaiting_since_unix_ms: u64,
    /// Stages it was started past without having passed them (forced).
    #[serde(default)]
    pub forced_past: Vec<String>,
    /// Per host, its service's restart count before the batch that
    /// switched it: crash loops are counted from there, across failovers.
    #[serde(default)]
    pub restarts_before: BTreeMap<String, u32>,
    /// Per host, the last heartbeat sequence the coordinator had seen when
    /// the host's restart answered: evidence about the new release is only
    /// what comes after it.
    #[serde(default)]
    pub switched_at_heartbeat: BTreeMap<String, u64>,
    /// Per canary step ("stage/step"), its bake so far: a new leader
    /// resumes the bake where it was, never from zero.
    #[serde(default)]
    pub bakes: BTreeMap<String, BakeProgress>,
    /// Per stage, the release its hosts return to on rollback: what ran in
    /// that environment when the deploy started (empty: the pipeline's
    /// known good).
    #[serde(default)]
    pub rollback_targets: Vec<String>,
    /// Per stage, its canary's fresh baseline (a FRESH analysis baseline).
    #[serde(default)]
    pub fresh_baselines: BTreeMap<usize, FreshBaseline>,
    /// Per blue-green stage, its progress and intended traffic.
    #[serde(default)]
    pub blue_green: BTreeMap<usize, BlueGreenStage>,
    /// The release train this deploy is a member of, if any.
    #[serde(default)]
    pub train: Option<TrainLink>,
    /// A config deploy: the config bundle it rolls out (digest; its one
    /// stage is the bundle's environment, `artifact` the code that runs
    /// there and stays). Empty: a code deploy.
    #[serde(default)]
    pub config: String,
    /// Per stage, the config bundle its hosts get with their restart
    /// (empty: none, theirs stays): a code deploy's is what the
    /// environment runs, a config deploy's the one it rolls out.
    #[serde(default)]
    pub configs: Vec<String>,
    /// Per stage, the config bundle its hosts return to on rollback (what
    /// the environment ran when the deploy started; empty: none).
    #[serde(default)]
    pub rollback_configs: Vec<String>,
}

/// A deploy's place in a release train: the train, and the stages the
/// deploy waits before until the train releases it (`train::holds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainLink {
    pub id: String,
    /// Per stage: wait for the train before it.
    pub holds: Vec<bool>,
}

/// The fewest hosts a fresh baseline has (when the stage has them): a
/// one-host canary is judged against the baseline hosts' spread, which
/// takes a few hosts to know.
pub const FRESH_MIN_HOSTS: usize = 3;

/// A canary's fresh baseline: hosts of the stage's last batches restarted
/// on the old release with each canary step, so both sides are equally
/// fresh. They keep the old release until their own batch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FreshBaseline {
    /// Chosen so far, in the order chosen (recorded before any restart, so
    /// a new leader restarts the same hosts).
    pub hosts: Vec<String>,
    /// Per host whose restart succeeded, the last heartbeat sequence seen
    /// when it answered: its evidence is what comes after.
    pub restarted_at_heartbeat: BTreeMap<String, u64>,
}

/// How far a canary step's bake got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BakeProgress {
    /// When the bake began (wall clock; it survives a change of leader).
    pub started_unix_ms: u64,
    /// Times an inconclusive end extended it by one bake time.
    pub extensions: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveEntry {
    pub name: String,
    pub bake_ms: u32,
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
    /// A config deploy: a new config with the same code.
    pub fn is_config_deploy(&self) -> bool {
        !self.config.is_empty()
    }

    /// The config bundle stage `stage`'s hosts get (empty: none).
    pub fn stage_config(&self, stage: usize) -> &str {
        self.configs.get(stage).map_or("", String::as_str)
    }

    /// The config bundle the deploy's hosts get where it is now: a config
    /// deploy's own, else its current (or last) stage's.
    pub fn current_config(&self) -> &str {
        if self.is_config_deploy() {
            return &self.config;
        }
        let last = self.snapshot.stages.len().saturating_sub(1);
        self.stage_config(self.machine.stage.min(last))
    }

    /// The config bundle stage `stage`'s hosts return to (empty: none).
    pub fn stage_rollback_config(&self, stage: usize) -> &str {
        self.rollback_configs.get(stage).map_or("", String::as_str)
    }

    /// Whether stage `stage` waits for the deploy's release train.
    pub fn held_by_train(&self, stage: usize) -> bool {
        self.train
            .as_ref()
            .is_some_and(|t| t.holds.get(stage).copied().unwrap_or(false))
    }

    /// The environments (stage names) this deploy has completed: every
    /// stage once complete, the stages before the one it is at while it
    /// goes on (or stopped there), none once rolling back.
    pub fn completed_environments(&self) -> Vec<String> {
        let upto = match self.machine.phase {
            Phase::Complete => self.snapshot.stages.len(),
            Phase::RollingBack | Phase::RolledBack | Phase::Pending => 0,
            _ => self.machine.stage.min(self.snapshot.stages.len()),
        };
        self.snapshot.stages[..upto]
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

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
            analyses: self.analyses.clone(),
            train_id: self
                .train
                .as_ref()
                .map(|t| t.id.clone())
                .unwrap_or_default(),
            config: self.config.clone(),
            held_by_train: self.machine.phase == Phase::AwaitingApproval
                && self.held_by_train(self.machine.stage),
            blue_green: self
                .blue_green
                .iter()
                .map(|(stage, bg)| BlueGreenStatus {
                    stage: *stage as u32,
                    from_slot: bg.from.slot() as i32,
                    to_slot: bg.to.slot() as i32,
                    switched_hosts: bg.switched.clone(),
                    scale_down_at_unix_ms: match bg.switched_unix_ms {
                        0 => 0,
                        at => at + u64::from(self.scale_down_delay_ms(*stage)),
                    },
                    scaled_down: bg.scaled_down,
                })
                .collect(),
        }
    }

    /// The step entry `batch` of stage `stage` is, if the stage is blue-green.
    pub fn blue_green_step(&self, stage: usize, batch: usize) -> Option<Step> {
        self.blue_green.get(&stage).map(|bg| bg.step(batch))
    }

    /// How long stage `stage` keeps its old slot after the switch.
    pub fn scale_down_delay_ms(&self, stage: usize) -> u32 {
        self.snapshot
            .stages
            .get(stage)
            .and_then(|s| s.blue_green.as_ref())
            .map_or(0, |b| b.scale_down_delay_ms)
    }

    /// The slot stage `stage`'s environment serves from once it passed
    /// (SLOT_NONE for a rolling stage).
    pub fn live_slot_after(&self, stage: usize) -> Slot {
        self.blue_green
            .get(&stage)
            .map_or(Slot::None, |bg| bg.live_after().slot())
    }

    /// The slot stage `stage`'s environment serves from after a rollback.
    pub fn live_slot_before(&self, stage: usize) -> Slot {
        self.blue_green
            .get(&stage)
            .map_or(Slot::None, |bg| bg.from.slot())
    }

    /// The wave entry `batch` of stage `stage`'s plan is, if it is one.
    pub fn wave(&self, stage: usize, batch: usize) -> Option<&WaveEntry> {
        let first = self.canary_bakes.get(stage).map_or(0, Vec::len);
        self.waves.get(stage)?.get(batch.checked_sub(first)?)
    }

    /// The release stage `stage` returns to on rollback: its environment
    /// as it was at the start, else the pipeline's known good.
    pub fn stage_rollback_target(&self, stage: usize) -> &str {
        if self.is_config_deploy() {
            // The code stays; only the config goes back.
            return &self.artifact;
        }
        self.rollback_targets
            .get(stage)
            .filter(|t| !t.is_empty() && **t != self.artifact)
            .map_or(self.known_good.as_str(), String::as_str)
    }

    /// The stage whose plan holds `host`.
    pub fn stage_of(&self, host: &str) -> Option<usize> {
        self.plan
            .iter()
            .position(|s| s.iter().flatten().any(|h| h == host))
    }

    /// The release `host` returns to on rollback (that of its stage).
    pub fn rollback_target(&self, host: &str) -> &str {
        self.stage_of(host)
            .map_or(self.known_good.as_str(), |s| self.stage_rollback_target(s))
    }

    /// Whether entry `batch` of stage `stage`'s plan is a canary step.
    pub fn is_canary_step(&self, stage: usize, batch: usize) -> bool {
        self.canary_bakes
            .get(stage)
            .is_some_and(|b| batch < b.len())
    }

    /// The hosts stage `stage`'s fresh baseline has once canary step
    /// `step` begins: those it had, and more as the cohort grows (as many
    /// as the cohort, at least [`FRESH_MIN_HOSTS`]), taken from the end of
    /// the stage's plan — never a canary step's host, never one this
    /// deploy switched.
    pub fn fresh_baseline_for(&self, stage: usize, step: usize) -> Vec<String> {
        let Some(batches) = self.plan.get(stage) else {
            return Vec::new();
        };
        let steps = self.canary_bakes.get(stage).map_or(0, Vec::len);
        let cohort: usize = batches.iter().take(step + 1).map(Vec::len).sum();
        let mut hosts = self
            .fresh_baselines
            .get(&stage)
            .map(|f| f.hosts.clone())
            .unwrap_or_default();
        let candidates: Vec<&String> = batches
            .iter()
            .skip(steps)
            .flatten()
            .rev()
            .filter(|h| !self.touched.contains(h) && !hosts.contains(h))
            .collect();
        let more = cohort.max(FRESH_MIN_HOSTS).saturating_sub(hosts.len());
        hosts.extend(candidates.into_iter().take(more).cloned());
        hosts
    }

    /// The hosts of batch `batch` of stage `stage` (none if there is no such batch).
    pub fn hosts_of(&self, stage: usize, batch: usize) -> Vec<String> {
        self.plan
            .get(stage)
            .and_then(|s| s.get(batch))
            .cloned()
            .unwrap_or_default()
    }

    /// The stages with a host this deploy switched or started a slot on
    /// (in stage order).
    pub fn touched_stages(&self) -> Vec<usize> {
        (0..self.plan.len())
            .filter(|s| {
                self.plan[*s]
                    .iter()
                    .flatten()
                    .any(|h| self.touched.contains(h))
                    || self
                        .blue_green
                        .get(s)
                        .is_some_and(|bg| !bg.restarts_before.is_empty())
            })
            .collect()
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

/// A stage's plan: canary cohorts (when `canary` is given), then waves,
/// then batches of whatever is left.
pub struct StagePlan {
    pub entries: Vec<Vec<String>>,
    pub canary_bakes: Vec<u32>,
    pub waves: Vec<WaveEntry>,
}

/// Plans one stage over its `hosts` (sorted; with their labels).
pub fn plan_stage(hosts: &[Host], stage: &Stage, canary: Option<&Canary>) -> StagePlan {
    let ids: Vec<String> = hosts.iter().map(|h| h.host_id.clone()).collect();
    let (canary_entries, canary_bakes) = match canary {
        Some(c) => canary_plan(&ids, c, 0, 100),
        None => (Vec::new(), Vec::new()),
    };
    let mut entries: Vec<Vec<String>> = canary_entries
        .into_iter()
        .take(canary_bakes.len())
        .collect();
    let cohort: std::collections::HashSet<String> = entries.iter().flatten().cloned().collect();
    let mut rest: Vec<&Host> = hosts
        .iter()
        .filter(|h| !cohort.contains(&h.host_id))
        .collect();
    let mut waves = Vec::new();
    for wave in &stage.waves {
        let selectors: Vec<Selector> = wave
            .selectors
            .iter()
            .filter_map(|s| Selector::parse(s).ok())
            .collect();
        let (mine, others): (Vec<&Host>, Vec<&Host>) = rest
            .into_iter()
            .partition(|h| selectors.iter().any(|s| s.matches(&h.labels)));
        rest = others;
        if !mine.is_empty() {
            entries.push(mine.iter().map(|h| h.host_id.clone()).collect());
            waves.push(WaveEntry {
                name: wave.name.clone(),
                bake_ms: wave.bake_ms,
            });
        }
    }
    let rest: Vec<String> = rest.iter().map(|h| h.host_id.clone()).collect();
    entries.extend(batches(&rest, stage.batch_size, stage.batch_percent));
    StagePlan {
        entries,
        canary_bakes,
        waves,
    }
}

/// A stage's plan with a canary: the cohorts of its steps (each entry the
/// hosts that step adds), then the rest in batches of `size`/`percent`.
/// Returns the plan and the bake of each canary step. A step whose
/// cohort would not grow (a small stage) is dropped; at least one host
/// always stays on the old version as the baseline, so a stage of one host
/// has no canary.
pub fn canary_plan(
    hosts: &[String],
    canary: &Canary,
    size: u32,
    percent: u32,
) -> (Vec<Vec<String>>, Vec<u32>) {
    let mut plan = Vec::new();
    let mut bakes = Vec::new();
    let mut taken = 0;
    if hosts.len() >= 2 {
        for step in &canary.steps {
            let cohort = if step.count > 0 {
                step.count as usize
            } else {
                (hosts.len() * step.percent as usize).div_ceil(100)
            }
            .clamp(1, hosts.len() - 1);
            if cohort > taken {
                plan.push(hosts[taken..cohort].to_vec());
                bakes.push(step.bake_ms);
                taken = cohort;
            }
        }
    }
    plan.extend(batches(&hosts[taken..], size, percent));
    (plan, bakes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::proto::CanaryStep;

    #[test]
    fn canary_cohorts_grow_keep_a_baseline_and_the_rest_rolls_in_batches() {
        let hosts: Vec<String> = (0..100).map(|i| format!("h{i}")).collect();
        let step = |percent, count| CanaryStep {
            percent,
            count,
            bake_ms: 1000,
        };
        let canary = Canary {
            steps: vec![step(1, 0), step(5, 0), step(25, 0)],
            ..Default::default()
        };
        let (plan, bakes) = canary_plan(&hosts, &canary, 0, 25);
        assert_eq!(bakes.len(), 3);
        let sizes: Vec<usize> = plan.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 4, 20, 19, 19, 19, 18]);
        assert_eq!(plan.concat(), hosts, "every host once, in order");

        // Four hosts: 1%, 5% and 25% are all one host; one step remains.
        let (plan, bakes) = canary_plan(&hosts[..4], &canary, 1, 0);
        assert_eq!(bakes.len(), 1);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1, 1]);
        // A count past the stage keeps one baseline host.
        let big = Canary {
            steps: vec![step(0, 10)],
            ..Default::default()
        };
        let (plan, bakes) = canary_plan(&hosts[..3], &big, 1, 0);
        assert_eq!((bakes.len(), plan[0].len()), (1, 2));
        // One host: no canary.
        let (plan, bakes) = canary_plan(&hosts[..1], &canary, 1, 0);
        assert_eq!((bakes.len(), plan.len()), (0, 1));
    }

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
