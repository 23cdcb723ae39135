//! [`Action::RunBatch`](super::Action::RunBatch) of a blue-green stage,
//! and its part of [`Action::RollBack`](super::Action::RollBack). The
//! steps and the intended traffic are pure, in `deploy/blue_green.rs`.
//!
//! 1. Every step first re-asserts the stage's intended traffic in its
//!    router (idempotent): a new leader puts back what the record says,
//!    whatever an earlier leader left half done.
//! 2. StandUp: every host pulls, then starts the new release in its idle
//!    slot (`to`), all at once; the live slot (`from`) keeps serving. A
//!    host that fails fails the step, and no traffic moves. Then the
//!    preview backend sends its traffic to `to`, the pre-promotion gate
//!    judges `to` against `from`, and a manual promotion holds the deploy
//!    (its wait limit: [`Driver::await_human`](super::Driver)).
//! 3. Weight (a weighted canary, [`weighted`]): the servers' weights
//!    before any change are recorded once; the share is recorded, then
//!    the weights set (`to` share%, `from` the rest, both ready) and the
//!    shift audited; the canary analysis bakes `to` against `from` on
//!    every host. A failure fails the step: the rollback returns `to` to
//!    0% at once.
//! 4. Switch: the wave's hosts are recorded as switched before the router
//!    is told; then every `to` server is made ready, then every `from`
//!    server drained (for a moment both serve, never neither), both at
//!    their weights from before a weighted canary; the audit
//!    records each server's state and weight before and after. The
//!    post-promotion gate judges `to` alone; its failure fails the step,
//!    and the rollback switches back.
//! 5. ScaleDown ([`scale_down`]): waits out the scale-down delay, counted from the recorded
//!    switch (a new leader waits only what is left), woken by controls: a
//!    rollback meanwhile is a switch back with no restart. Then `from` is
//!    recorded as scaled down, its requests in flight waited for, stopped
//!    on every host and put in maintenance.
//! 6. RollBack ([`rollback`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    ApprovalTimeoutOutcome, CommandStatus, HostOutcome, RestartCommand, RouterTarget, Slot, command,
};
use tracing::info;

mod rollback;
mod routes;
mod scale_down;
mod weighted;

use routes::{apply, assert_traffic, changes};

use super::Driver;
use super::batch::{GateStop, RESULT_SLACK, Side, batch_command};
use crate::deploy::audit;
use crate::deploy::blue_green::{BlueGreenStage, Color, Step};
use crate::deploy::deployments::DeployError;
use crate::deploy::machine::{Event, ReasonKind, Why};
use crate::deploy::record::DeployRecord;
use crate::ha::election::Leadership;
use crate::router::Router;

/// How long a host that is away gets for a blue-green command.
pub(super) const PATIENCE: Duration = Duration::from_secs(60);
/// The longest sleep of the scale-down wait between looks at the record.
const SCALE_DOWN_LOOK: Duration = Duration::from_secs(1);

/// A step that failed: its event (the verdict says the same).
fn failed(text: impl Into<String>) -> Event {
    Event::BatchFailed(Why::new(ReasonKind::GateFailed, text))
}

/// The stage's blue-green progress (present for a blue-green stage).
fn progress(rec: &DeployRecord, stage: usize) -> &BlueGreenStage {
    rec.blue_green
        .get(&stage)
        .expect("a blue-green stage has its progress from the start")
}

impl Driver {
    /// Runs step `batch` of blue-green stage `stage`; the event its outcome
    /// is, or `None` if the deploy moved on meanwhile.
    pub(super) async fn run_blue_green(
        self: &Arc<Self>,
        id: &str,
        stage: usize,
        batch: usize,
        term: &Leadership,
    ) -> Result<Option<Event>, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let spec = &rec.snapshot.stages[stage];
        let stuck = Duration::from_millis(u64::from(spec.stuck_timeout_ms.max(1000)));
        let fence = (self.ledger.shard_of_pipeline(&rec.pipeline), term.epoch);
        let Some(target) = spec.router.clone() else {
            return self
                .step_failed(id, stage, batch, "the stage names no router")
                .await;
        };
        let router = match self.effects.router(&target) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .step_failed(id, stage, batch, format!("router: {e}"))
                    .await;
            }
        };
        // Rule 1.
        if let Err(e) = assert_traffic(router.as_ref(), &target.backend, &rec, stage).await {
            return self.step_failed(id, stage, batch, e).await;
        }
        let step = Step::of(&rec, stage, batch);
        let cx = StepContext {
            id,
            stage,
            batch,
            router: router.as_ref(),
            target: &target,
            fence,
            stuck,
        };
        match step {
            Step::StandUp => self.stand_up(&cx).await,
            Step::Weight(n) => self.weigh(&cx, n).await,
            Step::Switch(_) => self.switch(&cx).await,
            Step::ScaleDown => self.scale_down(&cx).await,
        }
    }

    /// Changes stage `stage`'s blue-green progress in the record.
    async fn update_progress(
        &self,
        id: &str,
        stage: usize,
        change: impl Fn(&mut BlueGreenStage),
    ) -> Result<DeployRecord, DeployError> {
        self.ledger
            .update(
                id,
                |rec| change(rec.blue_green.get_mut(&stage).expect("blue-green stage")),
                |_, _| Vec::new(),
            )
            .await
    }

    /// Audits a traffic move of stage `stage` (`what`: "switched to green").
    async fn audit_traffic(
        &self,
        id: &str,
        stage: usize,
        what: &str,
        hosts: &[String],
        traffic: Vec<drover_common::proto::TrafficChange>,
    ) -> Result<(), DeployError> {
        self.ledger
            .update(
                id,
                |_| {},
                |rec, now| {
                    let (h, t) = (hosts.to_vec(), traffic.clone());
                    vec![audit::traffic_switched(rec, stage, what, h, t, now)]
                },
            )
            .await
            .map(|_| ())
    }

    /// Records `text` as the step's verdict and fails it.
    async fn step_failed(
        &self,
        id: &str,
        stage: usize,
        batch: usize,
        text: impl Into<String>,
    ) -> Result<Option<Event>, DeployError> {
        let text = text.into();
        self.set_verdict(id, stage, batch, &text).await?;
        Ok(Some(failed(text)))
    }

    /// Rule 2.
    async fn stand_up(&self, cx: &StepContext<'_>) -> Result<Option<Event>, DeployError> {
        let (rec, _) = self.ledger.load(cx.id).await?;
        let bg = progress(&rec, cx.stage).clone();
        let hosts = rec.plan[cx.stage][0].clone();
        let settings = rec.snapshot.stages[cx.stage]
            .blue_green
            .clone()
            .unwrap_or_default();
        let (from, to) = (bg.from, bg.to);
        let restarts: BTreeMap<String, u32> = hosts
            .iter()
            .map(|h| (h.clone(), self.slot_restarts(h, &rec.service, bg.slot(to))))
            .collect();
        let first = bg.restarts_before.is_empty();
        let (stage, id) = (cx.stage, cx.id);
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                    for (h, n) in &restarts {
                        bg.restarts_before.entry(h.clone()).or_insert(*n);
                    }
                },
                |rec, now| {
                    if first {
                        vec![audit::batch_started(rec, stage, 0, now)]
                    } else {
                        Vec::new()
                    }
                },
            )
            .await?;
        let pulls = self
            .pull_batch(&rec, (stage, 0), &hosts, cx.fence, cx.stuck)
            .await;
        let mut outcomes: Vec<(String, Result<(), String>)> = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for host in &hosts {
            if let Some(Err(e)) = pulls.get(host) {
                outcomes.push((host.clone(), Err(e.clone())));
                continue;
            }
            let start = command::Action::Restart(RestartCommand {
                service: rec.service.clone(),
                artifact: rec.artifact.clone(),
                ready_timeout_ms: cx.stuck.as_millis() as u32,
                slot: bg.slot(to) as i32,
                ..Default::default()
            });
            let verb = format!("start-{}", to.name());
            let cmd = batch_command(cx.fence, id, (stage, 0), host, &verb, start);
            let (effects, host, stuck) = (self.effects.clone(), host.clone(), cx.stuck);
            tasks.spawn(async move {
                let outcome = match effects.send(&host, cmd, stuck + RESULT_SLACK, stuck).await {
                    Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                    Ok(u) => Err(format!("starting the {} slot: {}", to.name(), u.reason)),
                    Err(e) => Err(e),
                };
                (host, outcome)
            });
        }
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.expect("host task does not panic"));
        }
        let beats: BTreeMap<String, u64> = outcomes
            .iter()
            .map(|(h, _)| (h.clone(), self.heartbeat_now(h, &rec.service)))
            .collect();
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    for (host, outcome) in &outcomes {
                        match outcome {
                            Ok(()) => {
                                let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                                bg.started.entry(host.clone()).or_insert(beats[host]);
                            }
                            Err(e) => rec.set_result(host, HostOutcome::Failed, e.clone()),
                        }
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        let failures: Vec<String> = outcomes
            .iter()
            .filter_map(|(h, o)| o.as_ref().err().map(|e| format!("{h}: {e}")))
            .collect();
        if !failures.is_empty() {
            let text = format!(
                "the new release is not ready in the {} slot on {} of {} hosts, traffic stays on {}: {}",
                to.name(),
                failures.len(),
                hosts.len(),
                from.name(),
                failures.join("; ")
            );
            return self.step_failed(id, stage, 0, text).await;
        }
        if !settings.preview_backend.is_empty() {
            for host in &hosts {
                for (server, state) in progress(&rec, stage).preview(host) {
                    if let Err(e) = cx
                        .router
                        .set_state(&settings.preview_backend, &server, state)
                        .await
                    {
                        let text = format!("router: preparing the preview: {e}");
                        return self.step_failed(id, stage, 0, text).await;
                    }
                }
            }
        }
        let bg = progress(&rec, stage);
        if let Some(gate) = &settings.pre_promotion {
            let new = new_sides(bg, &hosts);
            let old: Vec<Side> = bg
                .running(&all_hosts(&rec, stage), from)
                .iter()
                .map(|h| Side::old(h, bg.slot(from)))
                .collect();
            match self.judge_batch(gate, &rec.service, &new, &old).await {
                Ok(()) => {}
                Err(GateStop::Failed(why)) => {
                    let text = format!("pre-promotion gate: {}", why.text);
                    return self.step_failed(id, stage, 0, text).await;
                }
                Err(GateStop::Hold(why)) => {
                    self.set_verdict(id, stage, 0, &why.text).await?;
                    return Ok(Some(Event::Hold(why)));
                }
            }
        }
        let ready = format!(
            "the new release is ready in the {} slot on {} hosts",
            to.name(),
            hosts.len()
        );
        if settings.manual_promotion && !rec.promoted.contains(&format!("{stage}/0")) {
            let now = self.ledger.now();
            self.update_progress(id, stage, |bg| {
                if bg.promotion_asked_unix_ms == 0 {
                    bg.promotion_asked_unix_ms = now;
                }
            })
            .await?;
            let text = format!("{ready}; waiting for promote to switch traffic (manual promotion)");
            self.set_verdict(id, stage, 0, &text).await?;
            return Ok(Some(Event::Hold(Why::new(
                ReasonKind::AwaitingPromotion,
                text,
            ))));
        }
        self.set_verdict(id, stage, 0, &ready).await?;
        Ok(Some(Event::BatchPassed))
    }

    /// Rule 4.
    async fn switch(&self, cx: &StepContext<'_>) -> Result<Option<Event>, DeployError> {
        let (id, stage, batch) = (cx.id, cx.stage, cx.batch);
        let (rec, _) = self.ledger.load(id).await?;
        let hosts = rec.plan[stage][batch].clone();
        let (from, to) = (progress(&rec, stage).from, progress(&rec, stage).to);
        let updated = progress(&rec, stage).running(&hosts, to);
        let backend = &cx.target.backend;
        let before = cx.router.servers(backend).await.unwrap_or_default();
        let now = self.ledger.now();
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                    for h in &hosts {
                        if !bg.switched.contains(h) {
                            bg.switched.push(h.clone());
                        }
                    }
                    if bg.switched_unix_ms < now {
                        bg.switched_unix_ms = now;
                    }
                    for h in &updated {
                        let note = format!("serving from the {} slot", to.name());
                        rec.set_result(h, HostOutcome::Updated, note);
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        let bg = progress(&rec, stage);
        let moved = async {
            apply(cx.router, backend, bg, &hosts, to).await?;
            apply(cx.router, backend, bg, &hosts, from).await
        };
        if let Err(e) = moved.await {
            let text = format!("router: switching to the {} slot: {e}", to.name());
            return self.step_failed(id, stage, batch, text).await;
        }
        let after = cx.router.servers(backend).await.unwrap_or_default();
        let servers = bg.servers_of(&hosts);
        let traffic = changes(backend, &servers, &before, &after);
        let what = format!("switched to {}", to.name());
        self.audit_traffic(id, stage, &what, &hosts, traffic)
            .await?;
        info!(deploy = %id, stage, hosts = hosts.len(), to = to.name(), "traffic switched");
        let spec = &rec.snapshot.stages[stage];
        let gate = spec
            .blue_green
            .as_ref()
            .and_then(|b| b.post_promotion)
            .or(spec.gate)
            .unwrap_or_default();
        let sides = new_sides(progress(&rec, stage), &hosts);
        match self.judge_batch(&gate, &rec.service, &sides, &[]).await {
            Ok(()) => {
                let text = format!(
                    "traffic on the {} slot of {} hosts; post-promotion gate passed",
                    to.name(),
                    hosts.len()
                );
                self.set_verdict(id, stage, batch, &text).await?;
                Ok(Some(Event::BatchPassed))
            }
            Err(GateStop::Failed(why)) => {
                let text = format!(
                    "post-promotion gate: {}; switching back to {}",
                    why.text,
                    from.name()
                );
                self.step_failed(id, stage, batch, text).await
            }
            Err(GateStop::Hold(why)) => {
                self.set_verdict(id, stage, batch, &why.text).await?;
                Ok(Some(Event::Hold(why)))
            }
        }
    }

    /// The restart count of `service`'s `slot` on `host` as last reported.
    fn slot_restarts(&self, host: &str, service: &str, slot: Slot) -> u32 {
        self.effects
            .host_in(host, service, slot)
            .and_then(|h| h.health)
            .map_or(0, |h| h.restarts)
    }

    /// The promotion wait's limit, if the deploy holds for a blue-green
    /// promotion: the outcome once it passed, else `None` after waiting
    /// (woken by a control, or at the limit).
    pub(super) async fn promotion_timeout(
        &self,
        rec: &DeployRecord,
        wake: &tokio::sync::Notify,
    ) -> Option<Option<Event>> {
        if rec.machine.reason_kind != ReasonKind::AwaitingPromotion {
            return None;
        }
        let stage = rec.machine.stage;
        let bg = rec.blue_green.get(&stage)?;
        let settings = rec.snapshot.stages[stage].blue_green.as_ref()?;
        if bg.promotion_asked_unix_ms == 0 {
            return None;
        }
        let limit = Duration::from_millis(settings.promotion_timeout_ms.into());
        let waited =
            Duration::from_millis(self.ledger.now().saturating_sub(bg.promotion_asked_unix_ms));
        if waited < limit {
            let left = (limit - waited).max(Duration::from_millis(10));
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(left) => {}
            }
            return Some(None);
        }
        let rollback = settings.on_promotion_timeout() == ApprovalTimeoutOutcome::Rollback;
        let name = &rec.snapshot.stages[stage].name;
        Some(Some(Event::Abort {
            rollback,
            why: Why::new(
                ReasonKind::ApprovalTimeout,
                format!(
                    "nobody promoted stage {name} within {}; {}",
                    humantime::format_duration(limit),
                    if rollback {
                        "rolling back as the pipeline says (traffic never moved)"
                    } else {
                        "stopped here as the pipeline says (traffic stays on the live slot)"
                    }
                ),
            ),
        }))
    }
}

/// What a step works with.
struct StepContext<'a> {
    id: &'a str,
    stage: usize,
    batch: usize,
    router: &'a dyn Router,
    target: &'a RouterTarget,
    fence: (u32, u64),
    stuck: Duration,
}

impl Step {
    fn of(rec: &DeployRecord, stage: usize, batch: usize) -> Step {
        rec.blue_green_step(stage, batch)
            .expect("run_blue_green runs blue-green stages only")
    }
}

/// The command id of the scale-down's stop of `color` on `host`.
fn batch_command_id(id: &str, (stage, batch): (usize, usize), host: &str, color: Color) -> String {
    format!("{id}/{stage}.{batch}/{host}/stop-{}", color.name())
}

/// Every host of stage `stage` (each once).
fn all_hosts(rec: &DeployRecord, stage: usize) -> Vec<String> {
    let hosts: std::collections::BTreeSet<&String> = rec.plan[stage].iter().flatten().collect();
    hosts.into_iter().cloned().collect()
}

/// The new slot's side of a gate on `hosts`: evidence after it started.
fn new_sides(bg: &BlueGreenStage, hosts: &[String]) -> Vec<Side> {
    bg.running(hosts, bg.to)
        .iter()
        .map(|h| Side {
            host: h.clone(),
            slot: bg.slot(bg.to),
            after_heartbeat: bg.started.get(h).copied(),
            restarts_before: bg.restarts_before.get(h).copied().unwrap_or(0),
        })
        .collect()
}
