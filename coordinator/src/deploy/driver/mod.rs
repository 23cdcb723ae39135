//! The driver: one task per live deploy on its shard's leader, executing
//! the state machine's actions and nothing else.
//!
//! 1. On start (a new deploy, a restart, a shard won in a failover) the
//!    task loads the record and takes [`Machine::resume_actions`] of its
//!    state: the effect that state calls for.
//! 2. It runs that effect ([`Action::RunBatch`] in [`batch`], [`canary`]
//!    for a canary step, [`blue_green`] for a blue-green stage;
//!    [`Action::RollBack`] in [`rollback`]; the waits for an approval or a
//!    person here) and turns its outcome into an [`Event`].
//! 3. The ledger applies the event to the record *as it is now* (a control
//!    may have changed it meanwhile) with a compare-and-swap that also
//!    carries the transition's ledger writes and audit. The transition's
//!    effect is the next one to run (rule 2).
//! 4. An outcome is applied only to the state that asked for it: if the
//!    state moved on (abort, rollback, a hold resolved by hand), the
//!    outcome is dropped and the task takes the new state's effect (rule 1).
//! 5. Everything the task does belongs to the leader's term: when the
//!    shard is lost, the task and its prefetches stop at once, and the new
//!    leader resumes from the record (rule 1). Commands carry fixed ids and
//!    the leader's epoch, so a repeated step restarts nothing twice and a
//!    deposed leader's commands are refused by the agents.
//! 6. Progress a failover must not lose is in the record: the hosts
//!    touched and their restart counts before the batch, a canary step's
//!    bake start and extensions.

mod baseline;
mod batch;
mod blue_green;
mod canary;
mod configs;
pub mod effects;
mod prefetch;
mod rollback;
mod traffic;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_common::proto::ApprovalTimeoutOutcome;
use tokio::sync::Notify;
use tracing::{info, warn};

use self::effects::Effects;
use super::audit::DROVER;
use super::deployments::DeployError;
use super::ledger::Ledger;
use super::machine::{Action, Event, ReasonKind, Why};

/// The task driving one deploy, if any, and how to wake it.
struct Live {
    wake: Arc<Notify>,
    /// A task drives this deploy now (at most one).
    driven: bool,
}

pub struct Driver {
    ledger: Arc<Ledger>,
    effects: Arc<dyn Effects>,
    /// Deploys with a task, or woken by a control.
    live: Mutex<HashMap<String, Live>>,
}

impl Driver {
    pub fn new(ledger: Arc<Ledger>, effects: Arc<dyn Effects>) -> Arc<Driver> {
        Arc::new(Driver {
            ledger,
            effects,
            live: Mutex::new(HashMap::new()),
        })
    }

    pub fn effects(&self) -> &Arc<dyn Effects> {
        &self.effects
    }

    /// The wake-up of `id`'s task.
    fn wake_of(&self, id: &str) -> Arc<Notify> {
        let mut live = self.live.lock().expect("live lock");
        live.entry(id.to_string())
            .or_insert_with(|| Live {
                wake: Arc::new(Notify::new()),
                driven: false,
            })
            .wake
            .clone()
    }

    /// Tells `id`'s task its record changed (a control).
    pub fn wake(&self, id: &str) {
        self.wake_of(id).notify_one();
    }

    /// Starts the task that drives `id`, unless one already does.
    pub fn spawn(self: &Arc<Self>, id: String) {
        self.wake_of(&id);
        {
            let mut live = self.live.lock().expect("live lock");
            let entry = live.get_mut(&id).expect("just created");
            if entry.driven {
                return;
            }
            entry.driven = true;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let deposed = match this.drive(&id).await {
                Ok(()) => false,
                Err(e) => {
                    warn!(deploy = %id, error = %e, "deploy task stopped");
                    matches!(e, DeployError::NotLeader(_))
                }
            };
            if let Some(entry) = this.live.lock().expect("live lock").get_mut(&id) {
                entry.driven = false;
            }
            // The shard may have been lost and won again while this task was
            // winding down (its resume found the deploy still driven).
            if deposed
                && let Ok((rec, _)) = this.ledger.load(&id).await
                && !rec.machine.phase.is_terminal()
                && this.ledger.leads(&rec.pipeline)
            {
                this.spawn(id);
            }
        });
    }

    /// Drives one deploy until it is finished, or until this coordinator
    /// stops leading its shard (rule 5).
    pub async fn drive(self: &Arc<Self>, id: &str) -> Result<(), DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let (shard, leadership) = self.ledger.leadership(&rec.pipeline)?;
        tokio::select! {
            _ = leadership.lost.cancelled() => Err(DeployError::NotLeader(format!(
                "stopped driving: this coordinator no longer leads shard {shard}; its new leader resumes the deploy"
            ))),
            done = self.run(id, leadership.clone()) => done,
        }
    }

    /// Rules 1 to 4.
    async fn run(
        self: &Arc<Self>,
        id: &str,
        term: crate::ha::election::Leadership,
    ) -> Result<(), DeployError> {
        let wake = self.wake_of(id);
        let mut next = self.ledger.load(id).await?.0.machine.resume_actions();
        loop {
            let Some(effect) = next.iter().find(|a| !a.is_ledger()).cloned() else {
                return Ok(()); // finished: no effect left
            };
            let outcome = match &effect {
                Action::RunBatch { stage, batch } => {
                    self.run_batch(id, *stage, *batch, &term).await?
                }
                Action::RollBack => Some(self.roll_back(id, term.epoch).await?),
                Action::AwaitApproval { stage } => self.await_approval(id, *stage, &wake).await?,
                Action::AwaitHuman => self.await_human(id, &wake).await?,
                ledger => unreachable!("ledger action {ledger:?} is written, not run"),
            };
            next = match outcome {
                Some(event) => self.conclude(id, &effect, event).await?,
                None => self.ledger.load(id).await?.0.machine.resume_actions(),
            };
        }
    }

    /// Applies the outcome of `effect` if the deploy still asks for that
    /// effect (rule 4); the actions to take next.
    async fn conclude(
        &self,
        id: &str,
        effect: &Action,
        event: Event,
    ) -> Result<Vec<Action>, DeployError> {
        let expected = vec![effect.clone()];
        let written = self
            .ledger
            .apply_if(
                id,
                &event,
                DROVER,
                |rec| rec.machine.resume_actions() == expected,
                |_| {},
            )
            .await?;
        match written {
            Ok(applied) => {
                info!(deploy = %id, event = ?event, phase = ?applied.rec.machine.phase, "deploy step");
                Ok(applied.actions)
            }
            Err(_) => {
                info!(deploy = %id, event = ?event, "deploy moved on meanwhile: outcome dropped");
                Ok(self.ledger.load(id).await?.0.machine.resume_actions())
            }
        }
    }

    /// Waits for a person (resume, promote, abort, rollback); a blue-green
    /// promotion is waited for within its limit, then its stated outcome.
    async fn await_human(&self, id: &str, wake: &Notify) -> Result<Option<Event>, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        if let Some(outcome) = self.promotion_timeout(&rec, wake).await {
            return Ok(outcome);
        }
        wake.notified().await;
        Ok(None)
    }

    /// Waits for the approvals of `stage`: `None` when woken (the state
    /// may have changed), the stage's stated outcome once its approval
    /// timeout has passed. No deploy waits forever.
    async fn await_approval(
        &self,
        id: &str,
        stage: usize,
        wake: &Notify,
    ) -> Result<Option<Event>, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let spec = &rec.snapshot.stages[stage];
        if let Some(train) = rec.train.as_ref().filter(|_| rec.held_by_train(stage)) {
            // Held by its release train: the stage moves once the train
            // released it and, if people must approve too, they have.
            let (t, _) = super::trains::load(&self.ledger, &train.id).await?;
            if !t.has_released(&rec.pipeline, &spec.name) {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(super::trains::LOOK_EVERY) => {}
                }
                return Ok(None);
            }
            let given = rec
                .stage_approvals
                .iter()
                .filter(|a| a.stage == spec.name)
                .count();
            if !spec.requires_approval || given >= spec.required_approvals.max(1) as usize {
                return Ok(Some(Event::Approve));
            }
        }
        let limit = Duration::from_millis(spec.approval_timeout_ms.into());
        let waited =
            Duration::from_millis(self.ledger.now().saturating_sub(rec.awaiting_since_unix_ms));
        if rec.awaiting_since_unix_ms == 0 || waited < limit {
            let left = limit.saturating_sub(waited).max(Duration::from_millis(10));
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(left) => {}
            }
            return Ok(None);
        }
        let rollback = spec.on_approval_timeout() == ApprovalTimeoutOutcome::Rollback;
        Ok(Some(Event::Abort {
            rollback,
            why: Why::new(
                ReasonKind::ApprovalTimeout,
                format!(
                    "nobody approved stage {} within {}; {}",
                    spec.name,
                    humantime::format_duration(limit),
                    if rollback {
                        "rolling back as the pipeline says"
                    } else {
                        "stopped here as the pipeline says (earlier stages keep the new version)"
                    }
                ),
            ),
        }))
    }
}
