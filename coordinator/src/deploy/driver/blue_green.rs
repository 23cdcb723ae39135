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
//! 3. Switch: the wave's hosts are recorded as switched before the router
//!    is told; then every `to` server is made ready, then every `from`
//!    server drained (for a moment both serve, never neither); the audit
//!    records each server's state and weight before and after. The
//!    post-promotion gate judges `to` alone; its failure fails the step,
//!    and the rollback switches back.
//! 4. ScaleDown: waits out the scale-down delay, counted from the recorded
//!    switch (a new leader waits only what is left), woken by controls: a
//!    rollback meanwhile is a switch back with no restart. Then `from` is
//!    recorded as scaled down, stopped on every host and put in
//!    maintenance.
//! 5. RollBack: `from` is started again (on the stage's previous release)
//!    only where it was stopped; the switched hosts are recorded back,
//!    then `from` made ready and `to` drained; then `to` is stopped and
//!    put in maintenance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    ApprovalTimeoutOutcome, CommandStatus, HostOutcome, RestartCommand, RouterTarget, Slot,
    StopCommand, TrafficChange, command,
};
use tracing::{info, warn};

use super::Driver;
use super::batch::{GateStop, RESULT_SLACK, Side, batch_command};
use crate::deploy::audit;
use crate::deploy::blue_green::{BlueGreenStage, Color, Step, server_name};
use crate::deploy::deployments::DeployError;
use crate::deploy::machine::{Event, Phase, ReasonKind, Why};
use crate::deploy::record::DeployRecord;
use crate::ha::election::Leadership;
use crate::router::{Router, ServerState, ServerView};

/// How long a host that is away gets for a blue-green command.
const PATIENCE: Duration = Duration::from_secs(60);
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
            Step::Switch(_) => self.switch(&cx).await,
            Step::ScaleDown => self.scale_down(&cx).await,
        }
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
            .map(|h| (h.clone(), self.slot_restarts(h, &rec.service, to.slot())))
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
                anew: false,
                slot: to.slot() as i32,
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
                for (color, state) in progress(&rec, stage).preview() {
                    let server = server_name(host, color);
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
            let old: Vec<Side> = hosts.iter().map(|h| Side::old(h, from.slot())).collect();
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
            self.ledger
                .update(
                    id,
                    |rec| {
                        let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                        if bg.promotion_asked_unix_ms == 0 {
                            bg.promotion_asked_unix_ms = now;
                        }
                    },
                    |_, _| Vec::new(),
                )
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

    /// Rule 3.
    async fn switch(&self, cx: &StepContext<'_>) -> Result<Option<Event>, DeployError> {
        let (id, stage, batch) = (cx.id, cx.stage, cx.batch);
        let (rec, _) = self.ledger.load(id).await?;
        let hosts = rec.plan[stage][batch].clone();
        let (from, to) = (progress(&rec, stage).from, progress(&rec, stage).to);
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
                    for h in &hosts {
                        let note = format!("serving from the {} slot", to.name());
                        rec.set_result(h, HostOutcome::Updated, note);
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        if let Err(e) = move_traffic(cx.router, backend, &hosts, to, from).await {
            let text = format!("router: switching to the {} slot: {e}", to.name());
            return self.step_failed(id, stage, batch, text).await;
        }
        let after = cx.router.servers(backend).await.unwrap_or_default();
        let traffic = changes(backend, &hosts, &before, &after);
        let what = format!("switched to {}", to.name());
        self.ledger
            .update(
                id,
                |_| {},
                |rec, now| {
                    let hosts = hosts.clone();
                    let t = traffic.clone();
                    vec![audit::traffic_switched(rec, stage, &what, hosts, t, now)]
                },
            )
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

    /// Rule 4.
    async fn scale_down(&self, cx: &StepContext<'_>) -> Result<Option<Event>, DeployError> {
        let (id, stage, batch) = (cx.id, cx.stage, cx.batch);
        let wake = self.wake_of(id);
        let delay = loop {
            let (rec, _) = self.ledger.load(id).await?;
            if rec.machine.phase != Phase::Rolling
                || (rec.machine.stage, rec.machine.batch) != (stage, batch)
            {
                info!(deploy = %id, phase = ?rec.machine.phase, "scale-down wait overtaken by a control");
                return Ok(None);
            }
            let bg = progress(&rec, stage);
            let delay = u64::from(rec.scale_down_delay_ms(stage));
            let due = bg.switched_unix_ms + delay;
            let now = self.ledger.now();
            if bg.scaled_down || now >= due {
                break delay;
            }
            let left = Duration::from_millis(due - now).min(SCALE_DOWN_LOOK);
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = wake.notified() => {}
            }
        };
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    rec.blue_green
                        .get_mut(&stage)
                        .expect("blue-green stage")
                        .scaled_down = true;
                },
                |_, _| Vec::new(),
            )
            .await?;
        let bg = progress(&rec, stage);
        let from = bg.from;
        let hosts = rec.plan[stage][batch].clone();
        let stopped = self
            .stop_slot(&rec, &hosts, from, cx.fence, |h| {
                batch_command_id(id, (stage, batch), h, from)
            })
            .await;
        let mut problems = Vec::new();
        for (host, outcome) in &stopped {
            let server = server_name(host, from);
            let result = match outcome {
                Ok(()) => cx
                    .router
                    .set_state(&cx.target.backend, &server, ServerState::Maint)
                    .await
                    .map_err(|e| format!("router: {e}")),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = result {
                warn!(deploy = %id, %host, error = %e, "the old slot did not stop cleanly");
                problems.push(format!("{host}: {e}"));
            }
        }
        let mut text = format!(
            "the {} slot stopped on {} hosts after {}",
            from.name(),
            hosts.len() - problems.len(),
            humantime::format_duration(Duration::from_millis(delay))
        );
        if !problems.is_empty() {
            text.push_str(&format!("; not on: {}", problems.join("; ")));
        }
        self.set_verdict(id, stage, batch, &text).await?;
        Ok(Some(Event::BatchPassed))
    }

    /// Stops `color` on `hosts` (at once); per host, Ok or why not.
    async fn stop_slot(
        &self,
        rec: &DeployRecord,
        hosts: &[String],
        color: Color,
        fence: (u32, u64),
        command_id: impl Fn(&str) -> String,
    ) -> Vec<(String, Result<(), String>)> {
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let cmd = drover_common::proto::Command {
                command_id: command_id(host),
                shard: fence.0,
                epoch: fence.1,
                action: Some(command::Action::Stop(StopCommand {
                    service: rec.service.clone(),
                    slot: color.slot() as i32,
                })),
            };
            let (effects, host) = (self.effects.clone(), host.clone());
            tasks.spawn(async move {
                let outcome = match effects.send(&host, cmd, PATIENCE, PATIENCE).await {
                    Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                    Ok(u) => Err(format!("stopping the {} slot: {}", color.name(), u.reason)),
                    Err(e) => Err(e),
                };
                (host, outcome)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            out.push(done.expect("host task does not panic"));
        }
        out
    }

    /// Rule 5, for every blue-green stage the deploy asked to start a slot
    /// in; per host, Ok or why not.
    pub(super) async fn roll_back_blue_green(
        &self,
        id: &str,
        epoch: u64,
    ) -> Result<Vec<(String, Result<(), String>)>, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let fence = (self.ledger.shard_of_pipeline(&rec.pipeline), epoch);
        let mut out = Vec::new();
        for (&stage, bg) in &rec.blue_green {
            // Hosts asked to start the new slot (started or not).
            let hosts: Vec<String> = bg.restarts_before.keys().cloned().collect();
            if hosts.is_empty() {
                continue;
            }
            let spec = &rec.snapshot.stages[stage];
            let router = match spec.router.as_ref().map(|t| (self.effects.router(t), t)) {
                Some((Ok(r), t)) => (r, t.clone()),
                Some((Err(e), _)) => {
                    out.extend(
                        hosts
                            .iter()
                            .map(|h| (h.clone(), Err(format!("router: {e}")))),
                    );
                    continue;
                }
                None => continue,
            };
            out.extend(self.roll_back_stage(&rec, stage, &router, fence).await?);
        }
        Ok(out)
    }

    async fn roll_back_stage(
        &self,
        rec: &DeployRecord,
        stage: usize,
        (router, target): &(Arc<dyn Router>, RouterTarget),
        fence: (u32, u64),
    ) -> Result<Vec<(String, Result<(), String>)>, DeployError> {
        let id = rec.id.as_str();
        let bg = progress(rec, stage).clone();
        let (from, to) = (bg.from, bg.to);
        let backend = &target.backend;
        let mut broken: BTreeMap<String, String> = BTreeMap::new();
        // `from` running again where the scale-down stopped it (its
        // release is still on the host: rollback never downloads).
        if bg.scaled_down && !bg.switched.is_empty() {
            let mut tasks = tokio::task::JoinSet::new();
            for host in &bg.switched {
                let cmd = drover_common::proto::Command {
                    command_id: format!("{id}/rollback/{host}/start-{}", from.name()),
                    shard: fence.0,
                    epoch: fence.1,
                    action: Some(command::Action::Restart(RestartCommand {
                        service: rec.service.clone(),
                        artifact: rec.stage_rollback_target(stage).to_string(),
                        ready_timeout_ms: PATIENCE.as_millis() as u32,
                        anew: false,
                        slot: from.slot() as i32,
                    })),
                };
                let (effects, host) = (self.effects.clone(), host.clone());
                tasks.spawn(async move {
                    let outcome = match effects
                        .send(&host, cmd, PATIENCE + RESULT_SLACK, PATIENCE)
                        .await
                    {
                        Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                        Ok(u) => Err(format!(
                            "starting the {} slot again: {}",
                            from.name(),
                            u.reason
                        )),
                        Err(e) => Err(e),
                    };
                    (host, outcome)
                });
            }
            while let Some(done) = tasks.join_next().await {
                if let (host, Err(e)) = done.expect("host task does not panic") {
                    broken.insert(host, e);
                }
            }
        }
        // Recorded first (rule 1 re-asserts it), then told: hosts whose
        // old slot could not start keep their traffic where it is.
        let back: Vec<String> = bg
            .switched
            .iter()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        let before = router.servers(backend).await.unwrap_or_default();
        self.ledger
            .update(
                id,
                |rec| {
                    let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                    bg.switched.retain(|h| broken.contains_key(h));
                    if bg.switched.is_empty() {
                        bg.rolled_back();
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        if let Err(e) = move_traffic(router.as_ref(), backend, &back, from, to).await {
            for h in &back {
                broken.insert(h.clone(), format!("router: switching back: {e}"));
            }
        }
        let after = router.servers(backend).await.unwrap_or_default();
        if !back.is_empty() {
            let traffic = changes(backend, &back, &before, &after);
            let what = format!("switched back to {}", from.name());
            self.ledger
                .update(
                    id,
                    |_| {},
                    |rec, now| {
                        let t = traffic.clone();
                        vec![audit::traffic_switched(
                            rec,
                            stage,
                            &what,
                            back.clone(),
                            t,
                            now,
                        )]
                    },
                )
                .await?;
            info!(deploy = %id, stage, hosts = back.len(), to = from.name(), "traffic switched back");
        }
        // `to` stopped where no traffic needs it (also where it started
        // but never got ready).
        let idle: Vec<String> = bg
            .restarts_before
            .keys()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        let stopped = self
            .stop_slot(rec, &idle, to, fence, |h| {
                format!("{id}/rollback/{h}/stop-{}", to.name())
            })
            .await;
        for (host, outcome) in stopped {
            match outcome {
                Ok(()) => {
                    let server = server_name(&host, to);
                    if let Err(e) = router.set_state(backend, &server, ServerState::Maint).await {
                        warn!(deploy = %id, %host, error = %e, "the new slot's server is not in maintenance");
                    }
                }
                Err(e) => warn!(deploy = %id, %host, error = %e, "the new slot did not stop"),
            }
        }
        let preview = rec.snapshot.stages[stage]
            .blue_green
            .as_ref()
            .map(|b| b.preview_backend.clone())
            .unwrap_or_default();
        if !preview.is_empty() {
            for host in &idle {
                for (color, state) in [(from, ServerState::Ready), (to, ServerState::Maint)] {
                    let server = server_name(host, color);
                    if let Err(e) = router.set_state(&preview, &server, state).await {
                        warn!(deploy = %id, %host, error = %e, "the preview backend was not reset");
                    }
                }
            }
        }
        Ok(bg
            .restarts_before
            .keys()
            .map(|h| (h.clone(), broken.remove(h).map_or(Ok(()), Err)))
            .collect())
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

/// The new slot's side of a gate on `hosts`: evidence after it started.
fn new_sides(bg: &BlueGreenStage, hosts: &[String]) -> Vec<Side> {
    hosts
        .iter()
        .map(|h| Side {
            host: h.clone(),
            slot: bg.to.slot(),
            after_heartbeat: bg.started.get(h).copied(),
            restarts_before: bg.restarts_before.get(h).copied().unwrap_or(0),
        })
        .collect()
}

/// Rule 1: every host of the stage's servers as the record intends.
async fn assert_traffic(
    router: &dyn Router,
    backend: &str,
    rec: &DeployRecord,
    stage: usize,
) -> Result<(), String> {
    let bg = progress(rec, stage);
    let hosts: BTreeSet<&String> = rec.plan[stage].iter().flatten().collect();
    for host in hosts {
        for (color, state) in bg.intended(host) {
            router
                .set_state(backend, &server_name(host, color), state)
                .await
                .map_err(|e| format!("router: asserting the intended traffic: {e}"))?;
        }
    }
    Ok(())
}

/// Moves `hosts`' traffic to `onto`: every `onto` server ready first, then
/// every `off` server drained, so some server always answers.
async fn move_traffic(
    router: &dyn Router,
    backend: &str,
    hosts: &[String],
    onto: Color,
    off: Color,
) -> Result<(), crate::router::RouterError> {
    for host in hosts {
        router
            .set_state(backend, &server_name(host, onto), ServerState::Ready)
            .await?;
    }
    for host in hosts {
        router
            .set_state(backend, &server_name(host, off), ServerState::Drain)
            .await?;
    }
    Ok(())
}

/// Each server of `hosts` (both slots) in `backend`, before and after.
fn changes(
    backend: &str,
    hosts: &[String],
    before: &[ServerView],
    after: &[ServerView],
) -> Vec<TrafficChange> {
    let find = |views: &[ServerView], name: &str| {
        views
            .iter()
            .find(|v| v.backend == backend && v.server == name)
            .map(|v| (v.state.name().to_string(), v.weight))
            .unwrap_or_default()
    };
    hosts
        .iter()
        .flat_map(|h| [server_name(h, Color::Blue), server_name(h, Color::Green)])
        .map(|server| {
            let (state_before, weight_before) = find(before, &server);
            let (state_after, weight_after) = find(after, &server);
            TrafficChange {
                backend: backend.to_string(),
                server,
                state_before,
                state_after,
                weight_before,
                weight_after,
            }
        })
        .collect()
}
