//! The deploy state machine as pure transitions: `(state, event) →
//! (state, actions)`. No I/O here. Every transition returns the actions to
//! take, and they are the only source of "what happens next":
//!
//! - *ledger actions* ([`Action::is_ledger`]) are written in the same store
//!   transaction as the new state (a stage passed, the known-good release,
//!   the pipeline released), so they happen exactly once, with it;
//! - *effect actions* are what the driver does next (run a batch, roll back,
//!   wait for an approval or for a person). They are always
//!   [`Machine::resume_actions`] of the new state, so the driver after a
//!   crash or a failover runs the same actions with the same code.
//!
//! ```text
//! Pending ─Start→ Rolling(stage s, batch b) ─BatchPassed→ … ─last batch→ Complete
//!              │            │ pause requested: after the batch → Paused ─Resume→ Rolling
//!              │            │ Hold (a judgement wants a human): at once → Paused; Resume
//!              │            │   re-runs the batch, Promote passes it
//!              │            └ next stage requires approval → AwaitingApproval ─Approve→ Rolling
//!              └ BatchFailed / budget spent → RollingBack ─RollbackDone→ RolledBack
//!                                 (no known-good release → Failed)
//! Abort: any live phase → Aborted, or → RollingBack with rollback.
//! Rollback: any live phase or Complete → RollingBack (straight, no batching).
//! ```
//!
//! Actions by phase (effects) and by transition (ledger):
//!
//! | new phase          | effect                 | ledger, on entering it         |
//! |--------------------|------------------------|--------------------------------|
//! | Rolling            | RunBatch(stage, batch) | PassStage for a stage left     |
//! | AwaitingApproval   | AwaitApproval(stage)   | PassStage for a stage left     |
//! | Paused             | AwaitHuman             | PassStage for a stage left     |
//! | RollingBack        | RollBack               | —                              |
//! | Complete           | —                      | PassStage, MarkKnownGood, ReleasePipeline |
//! | RolledBack         | —                      | RestorePrevious, ReleasePipeline |
//! | Failed, Aborted    | —                      | ReleasePipeline                |

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Rolling,
    AwaitingApproval,
    Paused,
    Complete,
    /// Terminal: failed and could not (or need not) roll back.
    Failed,
    RollingBack,
    RolledBack,
    Aborted,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Complete | Phase::Failed | Phase::RolledBack | Phase::Aborted
        )
    }

    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Rolling,
        Phase::AwaitingApproval,
        Phase::Paused,
        Phase::Complete,
        Phase::Failed,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::Aborted,
    ];
}

/// Why a deploy stopped, held, failed or rolled back: the kind decides
/// (and is what the audit and clients filter on); the text explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReasonKind {
    #[default]
    None,
    /// A person asked for it (abort, rollback, pause).
    ByHand,
    /// More hosts failed than the stage's failure budget allows.
    BudgetSpent,
    /// The batch's health gate judged it bad.
    GateFailed,
    /// The canary analysis judged the canary worse than the baseline.
    CanaryFailed,
    /// A gate or an analysis could not judge (too little data).
    Inconclusive,
    /// A canary step passed and waits for promotion by hand.
    AwaitingPromotion,
    /// Nobody approved a stage in time.
    ApprovalTimeout,
    /// Hosts could not be switched back.
    RollbackIncomplete,
}

/// A reason: its kind and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub kind: ReasonKind,
    pub text: String,
}

impl Why {
    pub fn new(kind: ReasonKind, text: impl Into<String>) -> Why {
        Why {
            kind,
            text: text.into(),
        }
    }
}

/// Where a deploy is. `batches[s]` is the number of batches of stage `s`
/// (the host set is resolved at start and recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub phase: Phase,
    pub stage: usize,
    pub batch: usize,
    pub batches: Vec<usize>,
    /// Stages that wait for Approve before they start.
    pub approvals: Vec<bool>,
    /// Pause after the batch in flight.
    pub pause_requested: bool,
    /// Whether a last-known-good release exists to roll back to.
    pub can_roll_back: bool,
    /// Why the deploy is held, rolling back, aborted or failed.
    pub reason: String,
    /// The kind of `reason`.
    #[serde(default)]
    pub reason_kind: ReasonKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    /// The batch in flight passed its health gate.
    BatchPassed,
    /// The batch failed its gate, or the failure budget is spent.
    BatchFailed(Why),
    /// The batch in flight cannot be judged and a human must decide (an
    /// inconclusive analysis with the pause policy, a canary waiting for
    /// promotion): paused at once.
    Hold(Why),
    /// A human passes the batch (a canary step) in flight or on hold.
    Promote,
    Pause,
    Resume,
    Approve,
    Abort {
        rollback: bool,
        why: Why,
    },
    Rollback(Why),
    /// Every touched host is back on the known-good release.
    RollbackDone,
    /// Rolling back could not finish (hosts failed to switch back).
    RollbackFailed(String),
}

/// What follows a transition: ledger writes stored with it, then the
/// driver's next effect (see the module doc's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ledger: stage `stage` passed; its environment runs the new release.
    PassStage { stage: usize },
    /// Ledger: the new release is the pipeline's last known good.
    MarkKnownGood,
    /// Ledger: rolled back; the touched environments and the known good
    /// are the releases they were before the deploy.
    RestorePrevious,
    /// Ledger: finished; the pipeline may start its next deploy.
    ReleasePipeline,
    /// Effect: pull (prefetch) and restart the hosts of this batch, then
    /// judge it.
    RunBatch { stage: usize, batch: usize },
    /// Effect: re-point every touched host to its stage's previous release.
    RollBack,
    /// Effect: wait for the approvals of `stage`, or its approval timeout.
    AwaitApproval { stage: usize },
    /// Effect: wait for a person (resume, promote, abort, rollback).
    AwaitHuman,
}

impl Action {
    /// Written in the transition's own store transaction.
    pub fn is_ledger(&self) -> bool {
        matches!(
            self,
            Action::PassStage { .. }
                | Action::MarkKnownGood
                | Action::RestorePrevious
                | Action::ReleasePipeline
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} while the deploy is {phase:?}")]
pub struct Refused {
    pub event: &'static str,
    pub phase: Phase,
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Start => "start",
        Event::BatchPassed => "pass a batch",
        Event::BatchFailed(_) => "fail a batch",
        Event::Hold(_) => "hold a batch",
        Event::Promote => "promote a batch",
        Event::Pause => "pause",
        Event::Resume => "resume",
        Event::Approve => "approve",
        Event::Abort { .. } => "abort",
        Event::Rollback(_) => "roll back",
        Event::RollbackDone => "finish a rollback",
        Event::RollbackFailed(_) => "fail a rollback",
    }
}

impl Machine {
    pub fn new(batches: Vec<usize>, approvals: Vec<bool>, can_roll_back: bool) -> Machine {
        assert_eq!(
            batches.len(),
            approvals.len(),
            "one approval flag per stage"
        );
        Machine {
            phase: Phase::Pending,
            stage: 0,
            batch: 0,
            batches,
            approvals,
            pause_requested: false,
            can_roll_back,
            reason: String::new(),
            reason_kind: ReasonKind::None,
        }
    }

    /// The effect this state calls for: what the driver runs next, the
    /// same after a transition, a crash or a failover.
    pub fn resume_actions(&self) -> Vec<Action> {
        match self.phase {
            Phase::Rolling => vec![Action::RunBatch {
                stage: self.stage,
                batch: self.batch,
            }],
            Phase::RollingBack => vec![Action::RollBack],
            Phase::AwaitingApproval => vec![Action::AwaitApproval { stage: self.stage }],
            Phase::Paused => vec![Action::AwaitHuman],
            _ => Vec::new(),
        }
    }

    fn set_reason(&mut self, why: Why) {
        self.reason = why.text;
        self.reason_kind = why.kind;
    }

    fn clear_reason(&mut self) {
        self.reason.clear();
        self.reason_kind = ReasonKind::None;
    }

    /// Enters stage `stage` at its first batch (or waits for approval);
    /// past the last stage the deploy is complete.
    fn enter_stage(&mut self, stage: usize, ledger: &mut Vec<Action>) {
        // Stages without hosts are skipped.
        let mut stage = stage;
        while stage < self.batches.len() && self.batches[stage] == 0 {
            stage += 1;
        }
        self.stage = stage;
        self.batch = 0;
        if stage >= self.batches.len() {
            self.phase = Phase::Complete;
            ledger.push(Action::MarkKnownGood);
            return;
        }
        if self.approvals[stage] {
            self.phase = Phase::AwaitingApproval;
            return;
        }
        self.run_batch();
    }

    fn run_batch(&mut self) {
        if self.pause_requested {
            self.pause_requested = false;
            self.phase = Phase::Paused;
            return;
        }
        self.phase = Phase::Rolling;
    }

    fn roll_back(&mut self, why: Why) {
        self.set_reason(why);
        self.pause_requested = false;
        if self.can_roll_back {
            self.phase = Phase::RollingBack;
        } else {
            self.phase = Phase::Failed;
            self.reason = format!("{}; no known-good release to roll back to", self.reason);
        }
    }

    /// Applies `event`; on refusal the state is unchanged. The actions are
    /// the ledger writes of the transition, then the new state's effect.
    pub fn apply(&self, event: Event) -> Result<(Machine, Vec<Action>), Refused> {
        let refuse = |e: &Event| Refused {
            event: event_name(e),
            phase: self.phase,
        };
        let mut m = self.clone();
        let mut ledger = Vec::new();
        let live = !self.phase.is_terminal() && self.phase != Phase::RollingBack;
        match (self.phase, event) {
            (Phase::Pending, Event::Start) => m.enter_stage(0, &mut ledger),
            (Phase::Rolling, Event::BatchPassed | Event::Promote)
            | (Phase::Paused, Event::Promote) => {
                m.clear_reason();
                m.advance(&mut ledger);
            }
            (Phase::Rolling, Event::Hold(why)) => {
                m.phase = Phase::Paused;
                m.pause_requested = false;
                m.set_reason(why);
            }
            (Phase::Rolling, Event::BatchFailed(why)) => m.roll_back(why),
            (Phase::Rolling, Event::Pause) => m.pause_requested = true,
            (Phase::AwaitingApproval | Phase::Pending, Event::Pause) => m.phase = Phase::Paused,
            (Phase::Paused, Event::Resume) => {
                m.clear_reason();
                if m.stage < m.approvals.len()
                    && m.approvals[m.stage]
                    && m.batch == 0
                    && !self.approved_stage()
                {
                    m.phase = Phase::AwaitingApproval;
                } else {
                    m.run_batch();
                }
            }
            (Phase::AwaitingApproval, Event::Approve) => {
                m.approvals[m.stage] = false; // approved: recorded by clearing the wait
                m.run_batch();
            }
            (_, Event::Abort { rollback, why }) if live => {
                if rollback {
                    m.roll_back(why);
                } else {
                    m.phase = Phase::Aborted;
                    m.set_reason(why);
                    m.pause_requested = false;
                }
            }
            (p, Event::Rollback(why)) if live || p == Phase::Complete => m.roll_back(why),
            (Phase::RollingBack, Event::RollbackDone) => {
                m.phase = Phase::RolledBack;
                ledger.push(Action::RestorePrevious);
            }
            (Phase::RollingBack, Event::RollbackFailed(detail)) => {
                m.phase = Phase::Failed;
                m.reason = format!("{}; rollback incomplete: {detail}", m.reason);
                m.reason_kind = ReasonKind::RollbackIncomplete;
            }
            (_, e) => return Err(refuse(&e)),
        }
        if m.phase.is_terminal() && !self.phase.is_terminal() {
            ledger.push(Action::ReleasePipeline);
        }
        let mut actions = ledger;
        actions.extend(m.resume_actions());
        Ok((m, actions))
    }

    /// Past the batch in flight: the next batch, the next stage, or done.
    fn advance(&mut self, ledger: &mut Vec<Action>) {
        if self.batch + 1 < self.batches[self.stage] {
            self.batch += 1;
            self.run_batch();
            return;
        }
        ledger.push(Action::PassStage { stage: self.stage });
        let next = self.stage + 1;
        let pause = std::mem::take(&mut self.pause_requested);
        self.enter_stage(next, ledger);
        if pause && self.phase == Phase::Rolling {
            // Pause between stages too, before the next batch starts.
            self.phase = Phase::Paused;
        }
    }

    /// True once the current stage's approval was given (its flag cleared).
    fn approved_stage(&self) -> bool {
        !self.approvals.get(self.stage).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(text: &str) -> Why {
        Why::new(ReasonKind::ByHand, text)
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Start,
            Event::BatchPassed,
            Event::BatchFailed(Why::new(ReasonKind::GateFailed, "5xx")),
            Event::Hold(Why::new(ReasonKind::Inconclusive, "inconclusive")),
            Event::Promote,
            Event::Pause,
            Event::Resume,
            Event::Approve,
            Event::Abort {
                rollback: false,
                why: why("stop"),
            },
            Event::Abort {
                rollback: true,
                why: why("stop"),
            },
            Event::Rollback(why("by hand")),
            Event::RollbackDone,
            Event::RollbackFailed("host down".into()),
        ]
    }

    /// Machines in every phase, at a few positions, with and without a
    /// known-good release.
    fn states() -> Vec<Machine> {
        let mut out = Vec::new();
        for can_roll_back in [true, false] {
            for phase in Phase::ALL {
                for (stage, batch, pause) in
                    [(0, 0, false), (0, 1, true), (1, 0, false), (1, 2, false)]
                {
                    let mut m = Machine::new(vec![2, 3], vec![false, true], can_roll_back);
                    m.phase = phase;
                    m.stage = stage;
                    m.batch = batch;
                    m.pause_requested = pause && phase == Phase::Rolling;
                    out.push(m);
                }
            }
        }
        out
    }

    fn effects(actions: &[Action]) -> Vec<Action> {
        actions.iter().filter(|a| !a.is_ledger()).cloned().collect()
    }

    #[test]
    fn every_state_and_event_is_handled_and_invariants_hold() {
        for m in states() {
            for e in events() {
                match m.apply(e.clone()) {
                    Err(refused) => {
                        assert_eq!(refused.phase, m.phase);
                        assert!(!refused.to_string().is_empty());
                    }
                    Ok((next, actions)) => {
                        let t = format!("{m:?} --{e:?}--> {next:?}: {actions:?}");
                        // Terminal states accept nothing but a rollback after Complete.
                        if m.phase.is_terminal() {
                            assert_eq!(m.phase, Phase::Complete, "{t}");
                            assert!(matches!(e, Event::Rollback(_)));
                        }
                        // Position stays inside the plan.
                        assert!(next.stage <= next.batches.len(), "{t}");
                        if next.phase == Phase::Rolling {
                            assert!(next.batch < next.batches[next.stage], "{t}");
                        }
                        // One source of truth: the effect a transition asks
                        // for is the one a resumed driver would run.
                        assert_eq!(effects(&actions), next.resume_actions(), "{t}");
                        // Ledger writes come first, then at most one effect.
                        let first_effect = actions.iter().position(|a| !a.is_ledger());
                        if let Some(i) = first_effect {
                            assert_eq!(i + 1, actions.len(), "{t}");
                        }
                        // Rolling back only with a known-good release.
                        if next.phase == Phase::RollingBack && m.phase != Phase::RollingBack {
                            assert!(next.can_roll_back, "{t}");
                        }
                        // The pipeline is released exactly when the deploy ends.
                        assert_eq!(
                            actions.contains(&Action::ReleasePipeline),
                            next.phase.is_terminal() && !m.phase.is_terminal(),
                            "{t}"
                        );
                        assert_eq!(
                            actions.contains(&Action::MarkKnownGood),
                            next.phase == Phase::Complete && m.phase != Phase::Complete,
                            "{t}"
                        );
                        assert_eq!(
                            actions.contains(&Action::RestorePrevious),
                            next.phase == Phase::RolledBack,
                            "{t}"
                        );
                        // A stage is passed only by moving past it.
                        for a in &actions {
                            if let Action::PassStage { stage } = a {
                                assert_eq!(*stage, m.stage, "{t}");
                                assert!(next.stage > m.stage, "{t}");
                            }
                        }
                        if matches!(
                            next.phase,
                            Phase::Failed | Phase::RolledBack | Phase::Aborted
                        ) {
                            assert!(!next.reason.is_empty() || next.phase == Phase::RolledBack);
                        }
                        // A failure never completes, and never leaves a live rollout.
                        if matches!(e, Event::BatchFailed(_)) {
                            assert!(
                                matches!(next.phase, Phase::RollingBack | Phase::Failed),
                                "{t}"
                            );
                            assert_eq!(next.reason_kind, ReasonKind::GateFailed, "{t}");
                        }
                    }
                }
            }
        }
    }

    /// Every sequence of events (to a depth) from a fresh deploy: each
    /// stage passes at most once, the known good is marked at most once
    /// per completion, and the pipeline is released once per ending.
    #[test]
    fn every_walk_writes_each_ledger_fact_once() {
        fn walk(m: &Machine, depth: usize, passes: &[usize], releases: usize) {
            if depth == 0 {
                return;
            }
            for e in events() {
                let Ok((next, actions)) = m.apply(e) else {
                    continue;
                };
                let mut passes = passes.to_vec();
                let mut releases = releases;
                for a in &actions {
                    match a {
                        Action::PassStage { stage } => {
                            assert!(!passes.contains(stage), "stage {stage} passed twice");
                            passes.push(*stage);
                        }
                        Action::ReleasePipeline => releases += 1,
                        _ => {}
                    }
                }
                assert!(releases <= 2, "released more than once per ending");
                walk(&next, depth - 1, &passes, releases);
            }
        }
        let m = Machine::new(vec![2, 0, 1], vec![false, false, true], true);
        walk(&m, 7, &[], 0);
    }

    #[test]
    fn a_good_deploy_rolls_through_every_batch_with_an_approval() {
        let m = Machine::new(vec![2, 1], vec![false, true], true);
        let (m, a) = m.apply(Event::Start).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 0, batch: 0 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 0, batch: 1 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(
            (m.phase, a),
            (
                Phase::AwaitingApproval,
                vec![
                    Action::PassStage { stage: 0 },
                    Action::AwaitApproval { stage: 1 }
                ]
            )
        );
        assert!(
            m.apply(Event::BatchPassed).is_err(),
            "no batch runs before approval"
        );
        let (m, a) = m.apply(Event::Approve).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(
            (m.phase, a),
            (
                Phase::Complete,
                vec![
                    Action::PassStage { stage: 1 },
                    Action::MarkKnownGood,
                    Action::ReleasePipeline
                ]
            )
        );
        // Rollback after complete: the fast path.
        let (m, a) = m.apply(Event::Rollback(why("bad in prod"))).unwrap();
        assert_eq!((m.phase, a), (Phase::RollingBack, vec![Action::RollBack]));
        assert_eq!(m.reason_kind, ReasonKind::ByHand);
        let (m, a) = m.apply(Event::RollbackDone).unwrap();
        assert_eq!(
            (m.phase, a),
            (
                Phase::RolledBack,
                vec![Action::RestorePrevious, Action::ReleasePipeline]
            )
        );
    }

    #[test]
    fn pause_waits_for_the_batch_in_flight() {
        let m = Machine::new(vec![3], vec![false], true);
        let (m, _) = m.apply(Event::Start).unwrap();
        let (m, a) = m.apply(Event::Pause).unwrap();
        assert_eq!(
            (m.phase, a),
            (
                Phase::Rolling,
                vec![Action::RunBatch { stage: 0, batch: 0 }]
            ),
            "the batch in flight finishes (the same action: not run twice, its commands have fixed ids)"
        );
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(
            (m.phase, m.batch, a),
            (Phase::Paused, 1, vec![Action::AwaitHuman])
        );
        let (m, a) = m.apply(Event::Resume).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 0, batch: 1 }]);
        assert_eq!(
            m.resume_actions(),
            a,
            "a restarted coordinator re-issues the batch in flight"
        );
    }

    #[test]
    fn hold_pauses_at_once_and_resume_or_promote_continue() {
        let m = Machine::new(vec![3], vec![false], true);
        let (m, _) = m.apply(Event::Start).unwrap();
        let (held, a) = m
            .apply(Event::Hold(Why::new(
                ReasonKind::Inconclusive,
                "canary inconclusive",
            )))
            .unwrap();
        assert_eq!(
            (held.phase, held.batch, a),
            (Phase::Paused, 0, vec![Action::AwaitHuman])
        );
        assert_eq!(
            (held.reason.as_str(), held.reason_kind),
            ("canary inconclusive", ReasonKind::Inconclusive)
        );
        let (again, a) = held.apply(Event::Resume).unwrap();
        assert_eq!(
            a,
            vec![Action::RunBatch { stage: 0, batch: 0 }],
            "judged again"
        );
        assert_eq!(again.phase, Phase::Rolling);
        let (passed, a) = held.apply(Event::Promote).unwrap();
        assert_eq!(
            a,
            vec![Action::RunBatch { stage: 0, batch: 1 }],
            "passed by hand"
        );
        assert!(passed.reason.is_empty());
        let (m, a) = m.apply(Event::Promote).unwrap();
        assert_eq!(
            (m.batch, a),
            (1, vec![Action::RunBatch { stage: 0, batch: 1 }])
        );
    }

    #[test]
    fn a_bad_batch_rolls_back_or_fails_without_a_known_good_release() {
        let m = Machine::new(vec![2], vec![false], true);
        let (m, _) = m.apply(Event::Start).unwrap();
        let (m, a) = m
            .apply(Event::BatchFailed(Why::new(
                ReasonKind::GateFailed,
                "error rate 3% > 1%",
            )))
            .unwrap();
        assert_eq!((m.phase, a), (Phase::RollingBack, vec![Action::RollBack]));
        assert_eq!(m.reason, "error rate 3% > 1%");
        let first = Machine::new(vec![2], vec![false], false);
        let (first, _) = first.apply(Event::Start).unwrap();
        let (first, a) = first
            .apply(Event::BatchFailed(Why::new(
                ReasonKind::BudgetSpent,
                "crash loop",
            )))
            .unwrap();
        assert_eq!(
            (first.phase, a),
            (Phase::Failed, vec![Action::ReleasePipeline])
        );
        assert_eq!(
            first.reason,
            "crash loop; no known-good release to roll back to"
        );
        assert_eq!(first.reason_kind, ReasonKind::BudgetSpent);
    }

    #[test]
    fn abort_stops_or_rolls_back_and_empty_stages_are_skipped() {
        let m = Machine::new(vec![0, 2, 0], vec![false, false, true], true);
        let (m, a) = m.apply(Event::Start).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        let (stopped, a) = m
            .apply(Event::Abort {
                rollback: false,
                why: why("by hand"),
            })
            .unwrap();
        assert_eq!(
            (stopped.phase, a),
            (Phase::Aborted, vec![Action::ReleasePipeline])
        );
        let (back, a) = m
            .apply(Event::Abort {
                rollback: true,
                why: why("by hand"),
            })
            .unwrap();
        assert_eq!(
            (back.phase, a),
            (Phase::RollingBack, vec![Action::RollBack])
        );
        let (m, _) = m.apply(Event::BatchPassed).unwrap();
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(
            (m.phase, a),
            (
                Phase::Complete,
                vec![
                    Action::PassStage { stage: 1 },
                    Action::MarkKnownGood,
                    Action::ReleasePipeline
                ]
            ),
            "empty last stage skipped, and never passed"
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let m = Machine::new(vec![2, 1], vec![false, true], true);
        let (m, _) = m.apply(Event::Start).unwrap();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Machine>(&text).unwrap(), m);
    }
}
