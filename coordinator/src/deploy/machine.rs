//! The deploy state machine as pure transitions: `(state, event) →
//! (state, actions)`. No I/O here: the executor performs the actions
//! (commands to agents, gate checks, persisting) and feeds back events, so
//! every path is testable exhaustively and a restarted coordinator resumes
//! from the persisted state by re-issuing the actions of its phase.
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
    /// Why the deploy is failing, rolling back, aborted or failed.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    /// The batch in flight passed its health gate.
    BatchPassed,
    /// The batch failed its gate, or the failure budget is spent.
    BatchFailed(String),
    /// The batch in flight cannot be judged and a human must decide (an
    /// inconclusive analysis with the pause policy): paused at once.
    Hold(String),
    /// A human passes the batch (a canary step) in flight or on hold.
    Promote,
    Pause,
    Resume,
    Approve,
    Abort {
        rollback: bool,
        reason: String,
    },
    Rollback(String),
    /// Every touched host is back on the known-good release.
    RollbackDone,
    /// Rolling back could not finish (hosts failed to switch back).
    RollbackFailed(String),
}

/// What the executor must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pull (prefetch) and restart the hosts of this batch, then judge it.
    RunBatch { stage: usize, batch: usize },
    /// Re-point every touched host to the last known-good release.
    RollBack,
    /// Record the release as the pipeline's last known good.
    MarkKnownGood,
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
        }
    }

    /// The actions that bring the executor back in step with this state
    /// (after a coordinator restart): the batch in flight, or the rollback.
    pub fn resume_actions(&self) -> Vec<Action> {
        match self.phase {
            Phase::Rolling => vec![Action::RunBatch {
                stage: self.stage,
                batch: self.batch,
            }],
            Phase::RollingBack => vec![Action::RollBack],
            _ => Vec::new(),
        }
    }

    /// Enters stage `stage` at its first batch (or waits for approval);
    /// past the last stage the deploy is complete.
    fn enter_stage(&mut self, stage: usize) -> Vec<Action> {
        // Stages without hosts are skipped.
        let mut stage = stage;
        while stage < self.batches.len() && self.batches[stage] == 0 {
            stage += 1;
        }
        self.stage = stage;
        self.batch = 0;
        if stage >= self.batches.len() {
            self.phase = Phase::Complete;
            return vec![Action::MarkKnownGood];
        }
        if self.approvals[stage] {
            self.phase = Phase::AwaitingApproval;
            return Vec::new();
        }
        self.run_batch()
    }

    fn run_batch(&mut self) -> Vec<Action> {
        if self.pause_requested {
            self.pause_requested = false;
            self.phase = Phase::Paused;
            return Vec::new();
        }
        self.phase = Phase::Rolling;
        vec![Action::RunBatch {
            stage: self.stage,
            batch: self.batch,
        }]
    }

    fn roll_back(&mut self, reason: String) -> Vec<Action> {
        self.reason = reason;
        self.pause_requested = false;
        if self.can_roll_back {
            self.phase = Phase::RollingBack;
            vec![Action::RollBack]
        } else {
            self.phase = Phase::Failed;
            self.reason = format!("{}; no known-good release to roll back to", self.reason);
            Vec::new()
        }
    }

    /// Applies `event`; on refusal the state is unchanged.
    pub fn apply(&self, event: Event) -> Result<(Machine, Vec<Action>), Refused> {
        let refuse = |e: &Event| Refused {
            event: event_name(e),
            phase: self.phase,
        };
        let mut m = self.clone();
        let live = !self.phase.is_terminal() && self.phase != Phase::RollingBack;
        let actions = match (self.phase, event) {
            (Phase::Pending, Event::Start) => m.enter_stage(0),
            (Phase::Rolling, Event::BatchPassed | Event::Promote)
            | (Phase::Paused, Event::Promote) => {
                m.reason.clear();
                m.advance()
            }
            (Phase::Rolling, Event::Hold(reason)) => {
                m.phase = Phase::Paused;
                m.pause_requested = false;
                m.reason = reason;
                Vec::new()
            }
            (Phase::Rolling, Event::BatchFailed(reason)) => m.roll_back(reason),
            (Phase::Rolling, Event::Pause) => {
                m.pause_requested = true;
                Vec::new()
            }
            (Phase::AwaitingApproval | Phase::Pending, Event::Pause) => {
                m.phase = Phase::Paused;
                Vec::new()
            }
            (Phase::Paused, Event::Resume) => {
                if m.stage < m.approvals.len()
                    && m.approvals[m.stage]
                    && m.batch == 0
                    && !self.approved_stage()
                {
                    m.phase = Phase::AwaitingApproval;
                    Vec::new()
                } else {
                    m.run_batch()
                }
            }
            (Phase::AwaitingApproval, Event::Approve) => {
                m.approvals[m.stage] = false; // approved: recorded by clearing the wait
                m.run_batch()
            }
            (_, Event::Abort { rollback, reason }) if live => {
                if rollback {
                    m.roll_back(reason)
                } else {
                    m.phase = Phase::Aborted;
                    m.reason = reason;
                    m.pause_requested = false;
                    Vec::new()
                }
            }
            (p, Event::Rollback(reason)) if live || p == Phase::Complete => m.roll_back(reason),
            (Phase::RollingBack, Event::RollbackDone) => {
                m.phase = Phase::RolledBack;
                Vec::new()
            }
            (Phase::RollingBack, Event::RollbackFailed(reason)) => {
                m.phase = Phase::Failed;
                m.reason = format!("{}; rollback incomplete: {reason}", m.reason);
                Vec::new()
            }
            (_, e) => return Err(refuse(&e)),
        };
        Ok((m, actions))
    }

    /// Past the batch in flight: the next batch, the next stage, or done.
    fn advance(&mut self) -> Vec<Action> {
        if self.batch + 1 < self.batches[self.stage] {
            self.batch += 1;
            return self.run_batch();
        }
        let next = self.stage + 1;
        let pause = std::mem::take(&mut self.pause_requested);
        let actions = self.enter_stage(next);
        if pause && self.phase == Phase::Rolling {
            // Pause between stages too, before the next batch starts.
            self.phase = Phase::Paused;
            Vec::new()
        } else {
            actions
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

    fn events() -> Vec<Event> {
        vec![
            Event::Start,
            Event::BatchPassed,
            Event::BatchFailed("5xx".into()),
            Event::Hold("inconclusive".into()),
            Event::Promote,
            Event::Pause,
            Event::Resume,
            Event::Approve,
            Event::Abort {
                rollback: false,
                reason: "stop".into(),
            },
            Event::Abort {
                rollback: true,
                reason: "stop".into(),
            },
            Event::Rollback("by hand".into()),
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
                        // Terminal states accept nothing but a rollback after Complete.
                        if m.phase.is_terminal() {
                            assert_eq!(m.phase, Phase::Complete, "{m:?} accepted {e:?}");
                            assert!(matches!(e, Event::Rollback(_)));
                        }
                        // Position stays inside the plan.
                        assert!(next.stage <= next.batches.len(), "{next:?}");
                        if next.phase == Phase::Rolling {
                            assert!(
                                next.batch < next.batches[next.stage],
                                "{m:?} --{e:?}--> {next:?}"
                            );
                            let moved = m.phase != Phase::Rolling
                                || (next.stage, next.batch) != (m.stage, m.batch);
                            let expected = if moved {
                                vec![Action::RunBatch {
                                    stage: next.stage,
                                    batch: next.batch,
                                }]
                            } else {
                                vec![] // a pause request: the batch in flight goes on
                            };
                            assert_eq!(actions, expected, "{m:?} --{e:?}--> {next:?}");
                        }
                        // Rolling back always comes with the RollBack action,
                        // and only with a known-good release.
                        if next.phase == Phase::RollingBack && m.phase != Phase::RollingBack {
                            assert!(next.can_roll_back);
                            assert_eq!(actions, vec![Action::RollBack]);
                        }
                        if next.phase == Phase::Complete && m.phase != Phase::Complete {
                            assert_eq!(actions, vec![Action::MarkKnownGood]);
                        }
                        if matches!(
                            next.phase,
                            Phase::Failed | Phase::RolledBack | Phase::Aborted
                        ) {
                            assert!(actions.is_empty());
                            assert!(!next.reason.is_empty() || next.phase == Phase::RolledBack);
                        }
                        // A failure never completes, and never leaves a live rollout.
                        if matches!(e, Event::BatchFailed(_)) {
                            assert!(
                                matches!(next.phase, Phase::RollingBack | Phase::Failed),
                                "{next:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_good_deploy_rolls_through_every_batch_with_an_approval() {
        let m = Machine::new(vec![2, 1], vec![false, true], true);
        let (m, a) = m.apply(Event::Start).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 0, batch: 0 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 0, batch: 1 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!((m.phase, a), (Phase::AwaitingApproval, vec![]));
        assert!(
            m.apply(Event::BatchPassed).is_err(),
            "no batch runs before approval"
        );
        let (m, a) = m.apply(Event::Approve).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!((m.phase, a), (Phase::Complete, vec![Action::MarkKnownGood]));
        // Rollback after complete: the fast path.
        let (m, a) = m.apply(Event::Rollback("bad in prod".into())).unwrap();
        assert_eq!((m.phase, a), (Phase::RollingBack, vec![Action::RollBack]));
        let (m, _) = m.apply(Event::RollbackDone).unwrap();
        assert_eq!(m.phase, Phase::RolledBack);
    }

    #[test]
    fn pause_waits_for_the_batch_in_flight() {
        let m = Machine::new(vec![3], vec![false], true);
        let (m, _) = m.apply(Event::Start).unwrap();
        let (m, a) = m.apply(Event::Pause).unwrap();
        assert_eq!(
            (m.phase, a),
            (Phase::Rolling, vec![]),
            "the batch in flight finishes"
        );
        let (m, a) = m.apply(Event::BatchPassed).unwrap();
        assert_eq!((m.phase, m.batch, a), (Phase::Paused, 1, vec![]));
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
        let (held, a) = m.apply(Event::Hold("canary inconclusive".into())).unwrap();
        assert_eq!((held.phase, held.batch, a), (Phase::Paused, 0, vec![]));
        assert_eq!(held.reason, "canary inconclusive");
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
            .apply(Event::BatchFailed("error rate 3% > 1%".into()))
            .unwrap();
        assert_eq!((m.phase, a), (Phase::RollingBack, vec![Action::RollBack]));
        assert_eq!(m.reason, "error rate 3% > 1%");
        let first = Machine::new(vec![2], vec![false], false);
        let (first, _) = first.apply(Event::Start).unwrap();
        let (first, a) = first
            .apply(Event::BatchFailed("crash loop".into()))
            .unwrap();
        assert_eq!((first.phase, a), (Phase::Failed, vec![]));
        assert_eq!(
            first.reason,
            "crash loop; no known-good release to roll back to"
        );
    }

    #[test]
    fn abort_stops_or_rolls_back_and_empty_stages_are_skipped() {
        let m = Machine::new(vec![0, 2, 0], vec![false, false, true], true);
        let (m, a) = m.apply(Event::Start).unwrap();
        assert_eq!(a, vec![Action::RunBatch { stage: 1, batch: 0 }]);
        let (stopped, a) = m
            .apply(Event::Abort {
                rollback: false,
                reason: "by hand".into(),
            })
            .unwrap();
        assert_eq!((stopped.phase, a), (Phase::Aborted, vec![]));
        let (back, a) = m
            .apply(Event::Abort {
                rollback: true,
                reason: "by hand".into(),
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
            (Phase::Complete, vec![Action::MarkKnownGood]),
            "empty last stage skipped"
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
