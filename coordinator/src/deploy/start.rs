//! A new deploy's record, built by a pure function from what the facade
//! read: the pipeline, the connected hosts each stage's selector matches,
//! what each environment runs, and where the deploy starts. The hosts are
//! resolved once, here, and recorded: a stage's hosts are the connected
//! hosts its selector matches, each in its first stage only.

use std::collections::{BTreeMap, HashSet};

use drover_common::proto::{Host, Pipeline, Slot, Strategy};

use drover_common::labels::Selector;

use super::blue_green::{self, BlueGreenStage, Color};
use super::machine::{Action, Event, Machine};
use super::record::{DeployRecord, TrainLink, plan_stage};

/// Everything a new deploy is made of.
pub struct NewDeploy<'a> {
    pub id: String,
    pub pipeline: &'a Pipeline,
    /// Per stage, the connected hosts its selector matches (any order).
    pub hosts: Vec<Vec<Host>>,
    /// The artifact's digest (hex).
    pub artifact: String,
    pub git_sha: String,
    /// The pipeline's last known good (empty: a first deploy).
    pub known_good: String,
    /// Per stage, what its environment runs now (empty: nothing yet).
    pub environments: Vec<String>,
    /// Per stage, the slot its environment serves from (blue-green; may
    /// be shorter than the stages: SLOT_NONE).
    pub live_slots: Vec<Slot>,
    /// The first stage that runs; stages before it get no hosts.
    pub first_stage: usize,
    /// Stages it was started past without having passed them (forced).
    pub forced_past: Vec<String>,
    pub requester: String,
    pub started_by: String,
    pub idempotency_key: String,
    /// The release train it belongs to (its holds, one per stage).
    pub train: Option<TrainLink>,
    /// A config deploy's bundle (digest); empty: a code deploy. A config
    /// deploy runs through its first stage only (the bundle's
    /// environment): the stages after it get no hosts either.
    pub config: String,
    /// Per stage, the config bundle its environment runs (empty: none).
    pub environment_configs: Vec<String>,
    pub now: u64,
}

/// The record of a started deploy and the actions of its Start; `None`
/// when no stage has a host.
pub fn new_record(d: NewDeploy<'_>) -> Option<(DeployRecord, Vec<Action>)> {
    let mut taken = HashSet::new();
    let mut plan = Vec::new();
    let mut canary_bakes = Vec::new();
    let mut waves = Vec::new();
    let mut blue_green = BTreeMap::new();
    for (i, (stage, hosts)) in d.pipeline.stages.iter().zip(d.hosts).enumerate() {
        let hosts: Vec<Host> = hosts
            .into_iter()
            .filter(|h| taken.insert(h.host_id.clone()))
            .filter(|_| i >= d.first_stage)
            .filter(|_| d.config.is_empty() || i == d.first_stage)
            .collect();
        // A first deploy has no baseline to judge a canary against (and no
        // release to roll back to): its stages roll in batches.
        if matches!(
            stage.strategy(),
            Strategy::BlueGreen | Strategy::WeightedCanary
        ) {
            // Its shares of traffic come first, then its waves switch one
            // after another (blue_green.rs). A first deploy has no old
            // slot to share traffic with.
            let ids: Vec<String> = hosts.iter().map(|h| h.host_id.clone()).collect();
            let by_wave = plan_stage(&hosts, stage, None);
            let wave_hosts = &by_wave.entries[..by_wave.waves.len()];
            let steps = match (&stage.canary, stage.strategy()) {
                (Some(c), Strategy::WeightedCanary) if !d.known_good.is_empty() => c.steps.clone(),
                _ => Vec::new(),
            };
            let live = Color::live(d.live_slots.get(i).copied().unwrap_or(Slot::None));
            let groups = stage
                .blue_green
                .as_ref()
                .and_then(|b| {
                    Selector::parse(&b.green_selector)
                        .ok()
                        .filter(|_| !b.green_selector.is_empty())
                })
                .map(|green| blue_green::Groups {
                    blue: hosts
                        .iter()
                        .filter(|h| !green.matches(&h.labels))
                        .map(|h| h.host_id.clone())
                        .collect(),
                    green: hosts
                        .iter()
                        .filter(|h| green.matches(&h.labels))
                        .map(|h| h.host_id.clone())
                        .collect(),
                });
            let entries = match &groups {
                Some(g) => blue_green::plan_groups(g, live, steps.len()),
                None => blue_green::plan(&ids, steps.len(), wave_hosts),
            };
            if !entries.is_empty() {
                let switches = entries.len() - 2 - steps.len();
                let mut bg = BlueGreenStage::new(live, switches);
                // Over slots, a stage never switched has nothing in its
                // slots yet; a host group may run the stage's release.
                let recorded = d.live_slots.get(i).is_some_and(|s| *s != Slot::None);
                let ran = d.environments.get(i).is_some_and(|a| !a.is_empty());
                bg.from_serving = recorded || (groups.is_some() && ran);
                bg.groups = groups;
                bg.shares = steps.iter().map(|s| s.percent).collect();
                bg.bakes = steps.iter().map(|s| s.bake_ms).collect();
                blue_green.insert(i, bg);
            }
            plan.push(entries);
            canary_bakes.push(Vec::new());
            waves.push(Vec::new());
            continue;
        }
        // A config deploy always has a baseline: the same code with the
        // environment's config.
        let canary = stage
            .canary
            .as_ref()
            .filter(|_| !d.known_good.is_empty() || !d.config.is_empty());
        let p = plan_stage(&hosts, stage, canary);
        plan.push(p.entries);
        canary_bakes.push(p.canary_bakes);
        waves.push(p.waves);
    }
    if plan.iter().all(|s| s.is_empty()) {
        return None;
    }
    let machine = Machine::new(
        plan.iter().map(Vec::len).collect(),
        d.pipeline
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.requires_approval
                    || d.train
                        .as_ref()
                        .is_some_and(|t| t.holds.get(i).copied().unwrap_or(false))
            })
            .collect(),
        !d.config.is_empty() || (!d.known_good.is_empty() && d.known_good != d.artifact),
    );
    let mut approvals = Vec::new();
    if !d.forced_past.is_empty() {
        approvals.push(format!(
            "{} forced the deploy past stages it had not passed: {}",
            if d.requester.is_empty() {
                "someone"
            } else {
                &d.requester
            },
            d.forced_past.join(", ")
        ));
    }
    let (machine, actions) = machine.apply(Event::Start).expect("a new deploy starts");
    let rec = DeployRecord {
        id: d.id,
        pipeline: d.pipeline.name.clone(),
        service: d.pipeline.service.clone(),
        artifact: d.artifact,
        known_good: d.known_good,
        machine,
        plan,
        results: Default::default(),
        verdicts: Default::default(),
        touched: Vec::new(),
        requester: d.requester,
        git_sha: d.git_sha,
        idempotency_key: d.idempotency_key,
        approvals,
        stage_approvals: Vec::new(),
        started_by: d.started_by,
        created_at_unix_ms: d.now,
        updated_at_unix_ms: d.now,
        snapshot: d.pipeline.clone(),
        writes: 1,
        canary_bakes,
        analyses: Vec::new(),
        promoted: Vec::new(),
        waves,
        awaiting_since_unix_ms: 0,
        forced_past: d.forced_past,
        restarts_before: Default::default(),
        switched_at_heartbeat: Default::default(),
        bakes: Default::default(),
        rollback_targets: d.environments,
        fresh_baselines: Default::default(),
        blue_green,
        train: d.train,
        configs: (0..d.pipeline.stages.len())
            .map(|i| match d.environment_configs.get(i) {
                _ if !d.config.is_empty() && i == d.first_stage => d.config.clone(),
                Some(c) => c.clone(),
                None => String::new(),
            })
            .collect(),
        rollback_configs: d.environment_configs,
        config: d.config,
    };
    Some((rec, actions))
}

#[cfg(test)]
mod tests {
    use drover_common::proto::ConnectionState;

    use super::*;
    use crate::deploy::machine::Phase;

    fn host(id: &str) -> Host {
        Host {
            host_id: id.into(),
            state: ConnectionState::Connected as i32,
            ..Default::default()
        }
    }

    fn pipeline() -> Pipeline {
        crate::deploy::testing::staged_pipeline(&["staging", "prod"])
    }

    fn deploy(p: &Pipeline, hosts: Vec<Vec<Host>>, first_stage: usize) -> NewDeploy<'_> {
        NewDeploy {
            id: "hello-1".into(),
            pipeline: p,
            hosts,
            artifact: "b".repeat(64),
            git_sha: String::new(),
            known_good: "a".repeat(64),
            environments: vec!["a".repeat(64), String::new()],
            live_slots: Vec::new(),
            first_stage,
            forced_past: Vec::new(),
            requester: "ci".into(),
            started_by: "user/ci".into(),
            idempotency_key: String::new(),
            train: None,
            config: String::new(),
            environment_configs: Vec::new(),
            now: 7,
        }
    }

    #[test]
    fn each_host_rolls_in_its_first_stage_only_and_stages_before_the_first_get_none() {
        let p = pipeline();
        let both = vec![vec![host("a"), host("b")], vec![host("b"), host("c")]];
        let (rec, actions) = new_record(deploy(&p, both.clone(), 0)).unwrap();
        assert_eq!(
            rec.plan,
            vec![
                vec![vec!["a".to_string()], vec!["b".to_string()]],
                vec![vec!["c".to_string()]]
            ]
        );
        assert_eq!(rec.machine.phase, Phase::Rolling);
        assert_eq!(actions, vec![Action::RunBatch { stage: 0, batch: 0 }]);
        assert_eq!(rec.stage_rollback_target(0), "a".repeat(64));
        assert_eq!(
            rec.stage_rollback_target(1),
            "a".repeat(64),
            "an environment that ran nothing returns to the known good"
        );

        let (rec, actions) = new_record(deploy(&p, both, 1)).unwrap();
        assert!(rec.plan[0].is_empty());
        assert_eq!(actions, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        assert!(new_record(deploy(&p, vec![vec![], vec![]], 0)).is_none());
    }

    #[test]
    fn a_config_deploy_runs_its_environment_only_keeps_the_code_and_can_always_go_back() {
        let mut p = crate::deploy::testing::staged_pipeline(&["staging", "prod", "dr"]);
        p.stages[1].canary = Some(drover_common::proto::Canary {
            steps: vec![drover_common::proto::CanaryStep {
                percent: 50,
                bake_ms: 1000,
                ..Default::default()
            }],
            ..Default::default()
        });
        let code = "a".repeat(64);
        let (c0, c1) = ("0".repeat(64), "1".repeat(64));
        let hosts = vec![vec![host("s")], vec![host("a"), host("b")], vec![host("d")]];
        // Prod runs the known good: a code deploy of it would have nothing
        // to roll back to; a config deploy always has.
        let mut d = deploy(&p, hosts.clone(), 1);
        d.artifact = code.clone();
        d.environments = vec![code.clone(); 3];
        d.environment_configs = vec![String::new(), c0.clone(), String::new()];
        d.config = c1.clone();
        let (rec, actions) = new_record(d).unwrap();
        assert!(rec.is_config_deploy());
        assert!(rec.machine.can_roll_back);
        assert!(
            rec.plan[0].is_empty() && rec.plan[2].is_empty(),
            "{:?}",
            rec.plan
        );
        assert_eq!(actions, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        assert_eq!(rec.canary_bakes[1], vec![1000], "its canary runs");
        assert_eq!(
            (rec.stage_config(1), rec.stage_rollback_config(1)),
            (c1.as_str(), c0.as_str())
        );
        assert_eq!(rec.stage_rollback_target(1), code, "the code stays");
        assert_eq!(rec.rollback_target("a"), code);

        // A code deploy carries each environment's config, both ways.
        let mut d = deploy(&p, hosts, 0);
        d.environment_configs = vec![c0.clone(); 3];
        let (rec, _) = new_record(d).unwrap();
        assert!(!rec.is_config_deploy());
        assert_eq!(
            (rec.stage_config(2), rec.stage_rollback_config(2)),
            (c0.as_str(), c0.as_str())
        );
    }
}
