//! Release trains: several pipelines, each with its artifact, released
//! together in the order a dependency graph gives ("the schema service
//! before the API, the API before the web tier"). This file is the pure
//! model; `trains/` stores and runs it.
//!
//! ```text
//! Running ─every member Complete→ Complete
//!    └ a member failed, rolled back or aborted; or AbortTrain
//!        → Stopping (live members aborted) ─none live→ RollingBack ─done→ RolledBack
//!                                                 └ no rollback: Failed (Aborted by hand)
//! ```
//!
//! Rules:
//! 1. A train names each member pipeline once, with its artifact and the
//!    members it comes after; every name after `after` must be a member,
//!    and the graph must have no cycle (a cycle is refused naming it,
//!    `a → b → a`).
//! 2. Every member's deploy starts at once; before each environment that
//!    a member it comes after also has, it waits (`holds`) until those
//!    members completed that environment (`waiting_for`), and the train
//!    releases it.
//! 3. A member that ends other than complete stops the train: nothing is
//!    released or started any more, live members are aborted (rolling
//!    back what they changed when the policy says roll back).
//! 4. Rolled back (by policy, or an abort asking for it), the members that
//!    completed go back in reverse dependency order, one at a time:
//!    dependents before what they depend on (`rollback_order`).
//! 5. A train is complete when every member completed every environment.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::machine::Phase;

/// One member of a train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pipeline: String,
    pub artifact: String,
    /// Members (pipelines) that must complete an environment first.
    pub after: Vec<String>,
}

impl From<&drover_common::proto::TrainMemberSpec> for Member {
    fn from(m: &drover_common::proto::TrainMemberSpec) -> Member {
        Member {
            pipeline: m.pipeline.clone(),
            artifact: m.artifact.clone(),
            after: m.after.clone(),
        }
    }
}

/// Why a train is refused (rule 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    #[error("a train needs at least one member")]
    Empty,
    #[error("pipeline {0:?} is a member twice")]
    Duplicate(String),
    #[error("member {member:?} comes after {after:?}, which is not a member of the train")]
    UnknownAfter { member: String, after: String },
    #[error("the members form a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

/// Rule 1: the members in an order that respects every `after` (ties by
/// name, so the order is stable), or why there is none.
pub fn order(members: &[Member]) -> Result<Vec<String>, TrainError> {
    if members.is_empty() {
        return Err(TrainError::Empty);
    }
    let mut after: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for m in members {
        if after.insert(m.pipeline.as_str(), BTreeSet::new()).is_some() {
            return Err(TrainError::Duplicate(m.pipeline.clone()));
        }
    }
    for m in members {
        for a in &m.after {
            if !after.contains_key(a.as_str()) {
                return Err(TrainError::UnknownAfter {
                    member: m.pipeline.clone(),
                    after: a.clone(),
                });
            }
            after
                .get_mut(m.pipeline.as_str())
                .expect("inserted above")
                .insert(a.as_str());
        }
    }
    // Kahn's algorithm, smallest name first among the ready.
    let mut done: Vec<String> = Vec::new();
    let mut left = after.clone();
    while !left.is_empty() {
        let next = left
            .iter()
            .find(|(_, deps)| deps.iter().all(|d| done.iter().any(|x| x.as_str() == *d)))
            .map(|(name, _)| *name);
        match next {
            Some(name) => {
                left.remove(name);
                done.push(name.to_string());
            }
            None => return Err(TrainError::Cycle(cycle_in(&left))),
        }
    }
    Ok(done)
}

/// A cycle among `left` (every one of them waits on another of them):
/// follow first dependencies until a name repeats.
fn cycle_in(left: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<String> {
    let mut path: Vec<&str> = Vec::new();
    let mut at = *left.keys().next().expect("called with members left");
    loop {
        if let Some(start) = path.iter().position(|p| *p == at) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(at.to_string());
            return cycle;
        }
        path.push(at);
        at = left[at]
            .iter()
            .find(|d| left.contains_key(*d))
            .copied()
            .expect("a member left waits on another member left");
    }
}

/// A train's phase (proto `TrainPhase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainPhase {
    Running,
    Complete,
    /// A member failed or the train was aborted: live members are stopped.
    Stopping,
    /// Completed members go back, dependents first, one at a time.
    RollingBack,
    Failed,
    RolledBack,
    Aborted,
}

impl TrainPhase {
    /// A proto `TrainPhase` (as i32) that is terminal.
    pub fn is_terminal_proto(phase: i32) -> bool {
        use drover_common::proto::TrainPhase as P;
        matches!(
            P::try_from(phase),
            Ok(P::Complete | P::Failed | P::RolledBack | P::Aborted)
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TrainPhase::Complete
                | TrainPhase::Failed
                | TrainPhase::RolledBack
                | TrainPhase::Aborted
        )
    }
}

/// What the train sees of one member now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberView {
    /// Its pipeline's environments (stage names), in order.
    pub stages: Vec<String>,
    /// Its deploy, once started.
    pub deploy: Option<DeployView>,
    /// Environments the train let it enter.
    pub released: BTreeSet<String>,
}

/// A member's deploy as the train sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployView {
    pub phase: Phase,
    /// Environments this deploy completed.
    pub completed: BTreeSet<String>,
    /// The environment it waits before for its train, if it does.
    pub held_at: Option<String>,
    /// Why it failed, rolled back or was aborted.
    pub reason: String,
}

/// What the train does next (rules 2 to 5); each step is idempotent, so
/// a new leader repeating one does no harm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start the member's deploy.
    Start(String),
    /// Let the member's deploy enter the environment.
    Release { member: String, env: String },
    /// Abort the member's live deploy (rolling back what it changed).
    Abort { member: String, rollback: bool },
    /// Roll back the member's completed deploy.
    RollBack(String),
    /// The train moves to a new phase, for this reason.
    Become(TrainPhase, String),
}

/// How the train ends when it stops (rule 3): by policy or by an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// Roll back what was deployed.
    pub rollback: bool,
    /// Stopped by hand (ends Aborted rather than Failed without rollback).
    pub by_hand: bool,
}

/// Rules 2 to 5: the train's next steps in `phase`, from its members'
/// views (`views` has every member; a missing one counts as not started).
pub fn decide(
    phase: TrainPhase,
    stop: Stop,
    members: &[Member],
    views: &BTreeMap<String, MemberView>,
) -> Vec<Step> {
    let empty = MemberView::default();
    let view = |p: &str| views.get(p).unwrap_or(&empty);
    let live = |p: &str| {
        view(p)
            .deploy
            .as_ref()
            .is_some_and(|d| !d.phase.is_terminal())
    };
    match phase {
        TrainPhase::Running => {
            // Rule 3: a member that ended other than complete stops the train.
            for m in members {
                if let Some(d) = &view(&m.pipeline).deploy
                    && d.phase.is_terminal()
                    && d.phase != Phase::Complete
                {
                    return vec![Step::Become(
                        TrainPhase::Stopping,
                        format!(
                            "member {} {}: {}",
                            m.pipeline,
                            ended(d.phase),
                            if d.reason.is_empty() {
                                "no reason given"
                            } else {
                                &d.reason
                            }
                        ),
                    )];
                }
            }
            if members.iter().all(|m| {
                view(&m.pipeline)
                    .deploy
                    .as_ref()
                    .is_some_and(|d| d.phase == Phase::Complete)
            }) {
                return vec![Step::Become(
                    TrainPhase::Complete,
                    "every member completed every environment".into(),
                )];
            }
            let mut steps = Vec::new();
            for m in members {
                let v = view(&m.pipeline);
                match &v.deploy {
                    None => steps.push(Step::Start(m.pipeline.clone())),
                    Some(d) => {
                        if let Some(env) = &d.held_at
                            && !v.released.contains(env)
                            && waiting_for(m, env, views).is_empty()
                        {
                            steps.push(Step::Release {
                                member: m.pipeline.clone(),
                                env: env.clone(),
                            });
                        }
                    }
                }
            }
            steps
        }
        TrainPhase::Stopping => {
            let mut steps: Vec<Step> = members
                .iter()
                .filter(|m| {
                    view(&m.pipeline)
                        .deploy
                        .as_ref()
                        .is_some_and(|d| !d.phase.is_terminal() && d.phase != Phase::RollingBack)
                })
                .map(|m| Step::Abort {
                    member: m.pipeline.clone(),
                    rollback: stop.rollback,
                })
                .collect();
            if steps.is_empty() && !members.iter().any(|m| live(&m.pipeline)) {
                steps.push(match (stop.rollback, stop.by_hand) {
                    (true, _) => Step::Become(
                        TrainPhase::RollingBack,
                        "rolling back the members already deployed, dependents first".into(),
                    ),
                    (false, true) => Step::Become(TrainPhase::Aborted, String::new()),
                    (false, false) => Step::Become(TrainPhase::Failed, String::new()),
                });
            }
            steps
        }
        TrainPhase::RollingBack => {
            // Rule 4: one at a time, so dependents are back first.
            if members.iter().any(|m| live(&m.pipeline)) {
                return Vec::new();
            }
            let complete: BTreeMap<String, bool> = members
                .iter()
                .map(|m| {
                    let done = view(&m.pipeline)
                        .deploy
                        .as_ref()
                        .is_some_and(|d| d.phase == Phase::Complete);
                    (m.pipeline.clone(), done)
                })
                .collect();
            match rollback_order(members, &complete)
                .ok()
                .and_then(|o| o.into_iter().next())
            {
                Some(next) => vec![Step::RollBack(next)],
                None => vec![Step::Become(TrainPhase::RolledBack, String::new())],
            }
        }
        _ => Vec::new(),
    }
}

fn ended(phase: Phase) -> &'static str {
    match phase {
        Phase::RolledBack => "failed and rolled back",
        Phase::Aborted => "was aborted",
        _ => "failed",
    }
}

/// Rule 2: the members `member` still waits for before `env` ("api to
/// complete prod"), empty when it may go. A member whose pipeline has no
/// such environment is not waited for.
pub fn waiting_for(member: &Member, env: &str, views: &BTreeMap<String, MemberView>) -> String {
    let pending: Vec<&str> = member
        .after
        .iter()
        .filter(|a| {
            views.get(a.as_str()).is_some_and(|v| {
                v.stages.iter().any(|s| s == env)
                    && !v.deploy.as_ref().is_some_and(|d| d.completed.contains(env))
            })
        })
        .map(String::as_str)
        .collect();
    if pending.is_empty() {
        String::new()
    } else {
        format!("{} to complete {env}", pending.join(" and "))
    }
}

/// The environments of `member`'s pipeline (`stages`) it waits before for
/// the train: those where a member it comes after also deploys.
pub fn holds(
    member: &Member,
    stages: &[String],
    stages_of: &BTreeMap<String, Vec<String>>,
) -> Vec<bool> {
    stages
        .iter()
        .map(|env| {
            member
                .after
                .iter()
                .any(|a| stages_of.get(a).is_some_and(|s| s.contains(env)))
        })
        .collect()
}

/// Rule 4: the members marked done in `complete`, dependents first.
pub fn rollback_order(
    members: &[Member],
    complete: &BTreeMap<String, bool>,
) -> Result<Vec<String>, TrainError> {
    let mut order = order(members)?;
    order.reverse();
    order.retain(|p| complete.get(p).copied().unwrap_or(false));
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pipeline: &str, after: &[&str]) -> Member {
        Member {
            pipeline: pipeline.into(),
            artifact: format!("{pipeline}-sha"),
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_order_respects_every_dependency_and_bad_trains_are_named() {
        let train = [
            m("web", &["api"]),
            m("api", &["schema"]),
            m("schema", &[]),
            m("docs", &[]),
        ];
        assert_eq!(order(&train).unwrap(), ["docs", "schema", "api", "web"]);
        assert_eq!(order(&[]), Err(TrainError::Empty));
        assert_eq!(
            order(&[m("a", &[]), m("a", &[])]),
            Err(TrainError::Duplicate("a".into()))
        );
        assert_eq!(
            order(&[m("a", &["ghost"])]),
            Err(TrainError::UnknownAfter {
                member: "a".into(),
                after: "ghost".into()
            })
        );
        let cyclic = [m("a", &["c"]), m("b", &["a"]), m("c", &["b"]), m("d", &[])];
        let err = order(&cyclic).unwrap_err();
        assert_eq!(err.to_string(), "the members form a cycle: a → c → b → a");
        assert_eq!(
            order(&[m("a", &["a"])]).unwrap_err().to_string(),
            "the members form a cycle: a → a"
        );
    }

    fn view(stages: &[&str], deploy: Option<(Phase, &[&str], Option<&str>)>) -> MemberView {
        MemberView {
            stages: stages.iter().map(|s| s.to_string()).collect(),
            deploy: deploy.map(|(phase, completed, held)| DeployView {
                phase,
                completed: completed.iter().map(|s| s.to_string()).collect(),
                held_at: held.map(str::to_string),
                reason: "bad".into(),
            }),
            released: BTreeSet::new(),
        }
    }

    const ROLL: Stop = Stop {
        rollback: true,
        by_hand: false,
    };

    #[test]
    fn members_wait_for_what_they_come_after_in_each_environment() {
        let train = [m("schema", &[]), m("api", &["schema"]), m("web", &["api"])];
        let envs = ["staging", "prod"];
        let mut v: BTreeMap<String, MemberView> = BTreeMap::new();
        // Nothing started: every member starts (rule 2).
        assert_eq!(
            decide(TrainPhase::Running, ROLL, &train, &v),
            vec![
                Step::Start("schema".into()),
                Step::Start("api".into()),
                Step::Start("web".into())
            ]
        );
        v.insert(
            "schema".into(),
            view(&envs, Some((Phase::Rolling, &[], None))),
        );
        v.insert(
            "api".into(),
            view(&envs, Some((Phase::AwaitingApproval, &[], Some("staging")))),
        );
        v.insert(
            "web".into(),
            view(&envs, Some((Phase::AwaitingApproval, &[], Some("staging")))),
        );
        assert_eq!(decide(TrainPhase::Running, ROLL, &train, &v), vec![]);
        assert_eq!(
            waiting_for(&train[1], "staging", &v),
            "schema to complete staging"
        );
        // Schema completed staging: api goes in; web still waits for api.
        v.get_mut("schema").unwrap().deploy =
            view(&envs, Some((Phase::Rolling, &["staging"], None))).deploy;
        assert_eq!(
            decide(TrainPhase::Running, ROLL, &train, &v),
            vec![Step::Release {
                member: "api".into(),
                env: "staging".into()
            }]
        );
        // Released once: not again.
        v.get_mut("api").unwrap().released.insert("staging".into());
        assert_eq!(decide(TrainPhase::Running, ROLL, &train, &v), vec![]);
        // A member whose dependency has no such environment is not held.
        let holds_of = |member: &Member, stages: &[&str]| {
            let of: BTreeMap<String, Vec<String>> = [
                ("schema".to_string(), vec!["prod".to_string()]),
                (
                    "api".to_string(),
                    vec!["staging".to_string(), "prod".to_string()],
                ),
            ]
            .into();
            let stages: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
            holds(member, &stages, &of)
        };
        assert_eq!(holds_of(&train[1], &["staging", "prod"]), [false, true]);
        assert_eq!(holds_of(&train[0], &["staging", "prod"]), [false, false]);
        // Everything complete: the train is.
        for p in ["schema", "api", "web"] {
            v.get_mut(p).unwrap().deploy = view(&envs, Some((Phase::Complete, &envs, None))).deploy;
        }
        assert!(matches!(
            decide(TrainPhase::Running, ROLL, &train, &v)[..],
            [Step::Become(TrainPhase::Complete, _)]
        ));
    }

    #[test]
    fn a_failure_stops_the_train_and_rolls_back_dependents_first() {
        let train = [
            m("schema", &[]),
            m("api", &["schema"]),
            m("web", &["api"]),
            m("docs", &[]),
        ];
        let envs = ["staging", "prod"];
        let mut v: BTreeMap<String, MemberView> = BTreeMap::new();
        v.insert(
            "schema".into(),
            view(&envs, Some((Phase::Complete, &envs, None))),
        );
        v.insert(
            "api".into(),
            view(&envs, Some((Phase::RolledBack, &["staging"], None))),
        );
        v.insert(
            "web".into(),
            view(
                &envs,
                Some((Phase::AwaitingApproval, &["staging"], Some("prod"))),
            ),
        );
        v.insert(
            "docs".into(),
            view(&envs, Some((Phase::Complete, &envs, None))),
        );
        // Rule 3: the failure stops the train, naming the member.
        let steps = decide(TrainPhase::Running, ROLL, &train, &v);
        assert_eq!(
            steps,
            vec![Step::Become(
                TrainPhase::Stopping,
                "member api failed and rolled back: bad".into()
            )]
        );
        // Stopping: web (live) is aborted with rollback; nothing else yet.
        assert_eq!(
            decide(TrainPhase::Stopping, ROLL, &train, &v),
            vec![Step::Abort {
                member: "web".into(),
                rollback: true
            }]
        );
        // While web rolls back, the train waits.
        v.get_mut("web").unwrap().deploy.as_mut().unwrap().phase = Phase::RollingBack;
        assert_eq!(decide(TrainPhase::Stopping, ROLL, &train, &v), vec![]);
        v.get_mut("web").unwrap().deploy.as_mut().unwrap().phase = Phase::RolledBack;
        assert!(matches!(
            decide(TrainPhase::Stopping, ROLL, &train, &v)[..],
            [Step::Become(TrainPhase::RollingBack, _)]
        ));
        // Rule 4: the completed ones, dependents first (schema after docs
        // by name among independents: reverse of docs, schema, api, web).
        assert_eq!(
            decide(TrainPhase::RollingBack, ROLL, &train, &v),
            vec![Step::RollBack("schema".into())]
        );
        v.get_mut("schema").unwrap().deploy.as_mut().unwrap().phase = Phase::RollingBack;
        assert_eq!(decide(TrainPhase::RollingBack, ROLL, &train, &v), vec![]);
        v.get_mut("schema").unwrap().deploy.as_mut().unwrap().phase = Phase::RolledBack;
        assert_eq!(
            decide(TrainPhase::RollingBack, ROLL, &train, &v),
            vec![Step::RollBack("docs".into())]
        );
        v.get_mut("docs").unwrap().deploy.as_mut().unwrap().phase = Phase::RolledBack;
        assert!(matches!(
            decide(TrainPhase::RollingBack, ROLL, &train, &v)[..],
            [Step::Become(TrainPhase::RolledBack, _)]
        ));
        // Without rollback: stopped, completed members stay; by hand: aborted.
        v.get_mut("web").unwrap().deploy.as_mut().unwrap().phase = Phase::Aborted;
        let stop = Stop {
            rollback: false,
            by_hand: false,
        };
        assert!(matches!(
            decide(TrainPhase::Stopping, stop, &train, &v)[..],
            [Step::Become(TrainPhase::Failed, _)]
        ));
        let by_hand = Stop {
            rollback: false,
            by_hand: true,
        };
        assert!(matches!(
            decide(TrainPhase::Stopping, by_hand, &train, &v)[..],
            [Step::Become(TrainPhase::Aborted, _)]
        ));
        // Finished trains do nothing.
        assert_eq!(decide(TrainPhase::RolledBack, ROLL, &train, &v), vec![]);
    }
}
