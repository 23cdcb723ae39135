//! [`Action::RunBatch`](super::Action::RunBatch): one batch of a stage.
//!
//! 1. The batch's hosts are recorded as touched, with their restart counts
//!    (the crash-loop baseline), before anything can switch them; a batch
//!    resumed after a failover keeps the baseline first recorded.
//! 2. Every host downloads first (nothing goes down for a pull; a stage with
//!    `prefetch_all` first pulls onto all its hosts, [`super::prefetch`]); only hosts
//!    holding the verified artifact restart, `max_unavailable` at a time,
//!    each drained in the stage's router first if it names one
//!    ([`super::traffic`]); a canary step's fresh baseline restarts on the
//!    old release at the same moment ([`super::baseline`]).
//! 3. While the batch settles and is judged, the next batch downloads (for
//!    the leader's term only).
//! 4. Failed hosts are excluded and charged to the stage's failure budget;
//!    over the budget the batch fails at once.
//! 5. A canary step bakes ([`super::canary`]); any other batch settles (a
//!    wave for its own bake) and its health gate judges it against the
//!    stage's hosts not yet touched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    Command, CommandStatus, HealthGate, HostOutcome, InconclusivePolicy, RestartCommand, Slot,
    command,
};

use super::configs::HostConfig;
use super::{Driver, baseline, traffic};
use crate::deploy::audit;
use crate::deploy::deployments::DeployError;
use crate::deploy::gate::{Sample, Verdict, judge};
use crate::deploy::machine::{Event, ReasonKind, Why};
use crate::deploy::record::DeployRecord;
use crate::ha::election::Leadership;

/// Pulls wait this long for their result.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// A restart is the agent's to finish within the stage's stuck_timeout
/// (its own deadline, hooks included); this is the network's share on top.
pub(super) const RESULT_SLACK: Duration = Duration::from_secs(5);
/// The end of a failed command's output kept in the host's reason.
const LAST_WORDS_CHARS: usize = 400;

/// The end of a failed command's output, for the host's failure reason:
/// its last lines, at most [`LAST_WORDS_CHARS`] characters.
fn last_words(tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        return String::new();
    }
    let start = tail
        .char_indices()
        .rev()
        .nth(LAST_WORDS_CHARS)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let cut = if start > 0 { "…" } else { "" };
    format!(" (output: {cut}{})", tail[start..].replace('\n', " | "))
}

/// The batch after (`stage`, `batch`) in `plan`, skipping empty stages.
fn next_position(plan: &[Vec<Vec<String>>], stage: usize, batch: usize) -> Option<(usize, usize)> {
    if batch + 1 < plan.get(stage)?.len() {
        return Some((stage, batch + 1));
    }
    (stage + 1..plan.len())
        .find(|s| !plan[*s].is_empty())
        .map(|s| (s, 0))
}

/// The command `verb` of batch (`stage`, `batch`) for `host`: its id is
/// fixed, so a repeat is one command to the agent.
pub(super) fn batch_command(
    fence: (u32, u64),
    id: &str,
    (stage, batch): (usize, usize),
    host: &str,
    verb: &str,
    action: command::Action,
) -> Command {
    Command {
        command_id: format!("{id}/{stage}.{batch}/{host}/{verb}"),
        shard: fence.0,
        epoch: fence.1,
        action: Some(action),
    }
}

/// One host's process a health gate judges: whose health (`slot`), from
/// which heartbeat on, and its restart count before the change.
pub(super) struct Side {
    pub host: String,
    pub slot: Slot,
    /// Only heartbeats after this sequence are evidence (None: any).
    pub after_heartbeat: Option<u64>,
    pub restarts_before: u32,
}

impl Side {
    /// A baseline host: any heartbeat, restarts not judged.
    pub fn old(host: &str, slot: Slot) -> Side {
        Side {
            host: host.to_string(),
            slot,
            after_heartbeat: None,
            restarts_before: u32::MAX,
        }
    }
}

/// Why a batch's health gate did not pass: it failed, or (the pause policy
/// for an inconclusive gate) it holds the deploy for a person to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GateStop {
    Failed(Why),
    Hold(Why),
}

impl Driver {
    /// Runs batch `batch` of stage `stage`; the event its outcome is, or
    /// `None` if the deploy moved on meanwhile.
    pub(super) async fn run_batch(
        self: &Arc<Self>,
        id: &str,
        stage: usize,
        batch: usize,
        term: &Leadership,
    ) -> Result<Option<Event>, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        if rec.blue_green.contains_key(&stage) {
            return self.run_blue_green(id, stage, batch, term).await;
        }
        let fence = (self.ledger.shard_of_pipeline(&rec.pipeline), term.epoch);
        let spec = rec.snapshot.stages[stage].clone();
        let hosts = rec.plan[stage][batch].clone();
        let stuck = Duration::from_millis(u64::from(spec.stuck_timeout_ms.max(1000)));
        // Rule 1.
        let rec = self.touch(id, stage, batch, stuck).await?;
        // Rule 2.
        if batch == 0 && spec.prefetch_all {
            self.prefetch_stage(&rec, stage, fence, stuck).await;
        }
        let pulls = self
            .pull_batch(&rec, (stage, batch), &hosts, fence, stuck)
            .await;
        let mut outcomes: Vec<(String, Result<(), String>)> = Vec::new();
        let mut ready = Vec::new();
        for h in &hosts {
            match pulls.get(h) {
                Some(Err(e)) => outcomes.push((h.clone(), Err(e.clone()))),
                _ => ready.push(h.clone()),
            }
        }
        // A fresh baseline restarts with the canary (baseline.rs).
        let fresh = baseline::is_fresh(&rec, stage) && rec.is_canary_step(stage, batch);
        let fresh_restarts = async {
            if !fresh {
                return Ok(());
            }
            let (rec, added) = self.choose_fresh_baseline(id, stage, batch).await?;
            self.restart_fresh_baseline(&rec, (stage, batch), added, fence, stuck)
                .await
        };
        let config = self.target_config(&rec, stage).await?;
        let restarts = self.restart_hosts(&rec, (stage, batch), &ready, &config, fence, stuck);
        let (fresh_done, (restarted, stuck_hosts)) = tokio::join!(fresh_restarts, restarts);
        fresh_done?;
        outcomes.extend(restarted);
        // Rule 3.
        if let Some(next) = next_position(&rec.plan, stage, batch) {
            let (this, rec, lost) = (self.clone(), rec.clone(), term.lost.clone());
            let next_hosts = rec.plan[next.0][next.1].clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => {}
                    _ = this.pull_batch(&rec, next, &next_hosts, fence, stuck) => {}
                }
            });
        }
        // Rule 4.
        let heartbeat_now: HashMap<String, u64> = outcomes
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
                                rec.set_result(host, HostOutcome::Updated, "");
                                rec.switched_at_heartbeat
                                    .entry(host.clone())
                                    .or_insert(heartbeat_now[host]);
                            }
                            Err(e) => rec.set_result(host, HostOutcome::Failed, e.clone()),
                        }
                    }
                },
                |rec, now| {
                    stuck_hosts
                        .iter()
                        .map(|(host, why)| audit::host_stuck(rec, stage, host, why, now))
                        .collect()
                },
            )
            .await?;
        let failed = |h: &String| {
            rec.results
                .get(h)
                .is_some_and(|r| r.outcome == HostOutcome::Failed as i32)
        };
        let stage_failed = rec.plan[stage]
            .iter()
            .flatten()
            .filter(|h| failed(h))
            .count();
        if stage_failed as u32 > spec.failure_budget {
            let detail: Vec<String> = outcomes
                .iter()
                .filter_map(|(h, o)| o.as_ref().err().map(|e| format!("{h}: {e}")))
                .collect();
            let why = Why::new(
                ReasonKind::BudgetSpent,
                format!(
                    "{stage_failed} hosts failed in stage {} (budget {}): {}",
                    spec.name,
                    spec.failure_budget,
                    detail.join("; ")
                ),
            );
            self.set_verdict(id, stage, batch, &why.text).await?;
            return Ok(Some(Event::BatchFailed(why)));
        }
        // Rule 5.
        let baseline: Vec<String> = rec.plan[stage]
            .iter()
            .flatten()
            .filter(|h| !rec.touched.contains(h))
            .cloned()
            .collect();
        if rec.is_canary_step(stage, batch) {
            let baseline = match rec.fresh_baselines.get(&stage) {
                Some(f) if fresh => f.hosts.clone(),
                _ => baseline,
            };
            let cohort: Vec<String> = rec.plan[stage][..=batch]
                .iter()
                .flatten()
                .filter(|h| !failed(h))
                .cloned()
                .collect();
            return self
                .bake(super::canary::Step {
                    id,
                    stage,
                    step: batch,
                    cohort,
                    baseline,
                    fresh,
                    service: rec.service.clone(),
                    bake_ms: u64::from(rec.canary_bakes[stage][batch]),
                    slots: None,
                })
                .await;
        }
        // A wave bakes for its own time before its gate judges it.
        let settle = rec.wave(stage, batch).map_or(spec.settle_ms, |w| w.bake_ms);
        tokio::time::sleep(Duration::from_millis(settle.into())).await;
        let updated: Vec<Side> = hosts
            .iter()
            .filter(|h| !failed(h))
            .map(|h| Side {
                host: h.clone(),
                slot: Slot::None,
                after_heartbeat: rec.switched_at_heartbeat.get(h).copied(),
                restarts_before: rec.restarts_before.get(h).copied().unwrap_or(0),
            })
            .collect();
        let baseline: Vec<Side> = baseline.iter().map(|h| Side::old(h, Slot::None)).collect();
        let verdict = self
            .judge_batch(
                &spec.gate.unwrap_or_default(),
                &rec.service,
                &updated,
                &baseline,
            )
            .await;
        let (text, event) = match verdict {
            Ok(()) => ("passed".to_string(), Event::BatchPassed),
            Err(GateStop::Failed(why)) => (why.text.clone(), Event::BatchFailed(why)),
            Err(GateStop::Hold(why)) => (why.text.clone(), Event::Hold(why)),
        };
        self.set_verdict(id, stage, batch, &text).await?;
        Ok(Some(event))
    }

    /// Rule 2's restarts: `hosts` onto the deploy's release,
    /// `max_unavailable` at a time; per host, Ok or why not, and the hosts
    /// that were stuck (no result in time, or a step that hung until the
    /// restart's deadline) with why.
    async fn restart_hosts(
        &self,
        rec: &DeployRecord,
        (stage, batch): (usize, usize),
        hosts: &[String],
        config: &HostConfig,
        fence: (u32, u64),
        stuck: Duration,
    ) -> (Vec<(String, Result<(), String>)>, Vec<(String, String)>) {
        let spec = &rec.snapshot.stages[stage];
        let max_unavailable = spec.max_unavailable.max(1) as usize;
        // The stage's load balancer, if any (traffic.rs).
        let router = spec
            .router
            .as_ref()
            .map(|t| (self.effects.router(t), t.clone()));
        let mut outcomes = Vec::new();
        let mut stuck_hosts = Vec::new();
        for chunk in hosts.chunks(max_unavailable) {
            let mut tasks = tokio::task::JoinSet::new();
            for host in chunk {
                let effects = self.effects.clone();
                let router = router.clone();
                let restart = command::Action::Restart(config.on_restart(RestartCommand {
                    service: rec.service.clone(),
                    artifact: rec.artifact.clone(),
                    ready_timeout_ms: stuck.as_millis() as u32,
                    ..Default::default()
                }));
                let cmd = batch_command(fence, &rec.id, (stage, batch), host, "restart", restart);
                let host = host.clone();
                tasks.spawn(async move {
                    let mut was_stuck = false;
                    let restart = async {
                        match effects.send(&host, cmd, stuck + RESULT_SLACK, stuck).await {
                            Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                            Ok(u) => {
                                was_stuck = u.deadline_exceeded;
                                Err(format!(
                                    "restart: {}{}",
                                    u.reason,
                                    last_words(&u.output_tail)
                                ))
                            }
                            Err(e) => {
                                was_stuck = true;
                                Err(e)
                            }
                        }
                    };
                    let outcome = traffic::around(router, &host, restart).await;
                    (host, outcome, was_stuck)
                });
            }
            while let Some(done) = tasks.join_next().await {
                let (host, outcome, was_stuck) = done.expect("host task does not panic");
                if was_stuck && let Err(why) = &outcome {
                    stuck_hosts.push((host.clone(), why.clone()));
                }
                outcomes.push((host, outcome));
            }
        }
        (outcomes, stuck_hosts)
    }

    /// Rule 1: records the batch's hosts as touched, with their restart
    /// counts now unless already recorded; the audit says they begin
    /// switching (once).
    async fn touch(
        &self,
        id: &str,
        stage: usize,
        batch: usize,
        patience: Duration,
    ) -> Result<DeployRecord, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let hosts = rec.hosts_of(stage, batch);
        // A baseline needs a heartbeat: a coordinator that has just started
        // (or a host that has just come back) has none yet. A host without
        // one within the patience counts from zero.
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline
            && hosts.iter().any(|h| {
                !rec.restarts_before.contains_key(h)
                    && self
                        .effects
                        .host(h, &rec.service)
                        .is_none_or(|v| v.heartbeat_sequence == 0)
            })
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restarts: HashMap<String, u32> = hosts
            .iter()
            .map(|h| (h.clone(), self.restarts(h, &rec.service)))
            .collect();
        let fresh = hosts.iter().any(|h| !rec.touched.contains(h));
        tracing::info!(deploy = %id, stage, batch, ?restarts, recorded = ?rec.restarts_before, "restart counts before the batch");
        self.ledger
            .update(
                id,
                |rec| {
                    for h in &hosts {
                        if !rec.touched.contains(h) {
                            rec.touched.push(h.clone());
                        }
                        rec.restarts_before.entry(h.clone()).or_insert(restarts[h]);
                    }
                },
                |rec, now| {
                    if fresh {
                        vec![audit::batch_started(rec, stage, batch, now)]
                    } else {
                        Vec::new()
                    }
                },
            )
            .await
    }

    /// The last heartbeat sequence seen from `host` (0: none yet): what a
    /// restart's evidence must come after.
    pub(super) fn heartbeat_now(&self, host: &str, service: &str) -> u64 {
        self.effects
            .host(host, service)
            .map_or(0, |v| v.heartbeat_sequence)
    }

    /// The service's restart count on `host` as last reported.
    pub(super) fn restarts(&self, host: &str, service: &str) -> u32 {
        self.effects
            .host(host, service)
            .and_then(|h| h.health)
            .map_or(0, |h| h.restarts)
    }

    /// Pulls the artifact onto `hosts` (all at once); per host, Ok or why
    /// not. Ids are those of the batch, so a prefetch and the batch's own
    /// pull are one command to the agent.
    pub(super) async fn pull_batch(
        &self,
        rec: &DeployRecord,
        position: (usize, usize),
        hosts: &[String],
        fence: (u32, u64),
        patience: Duration,
    ) -> HashMap<String, Result<(), String>> {
        let pulls = self
            .effects
            .pull_commands(&rec.service, &rec.artifact, hosts)
            .await;
        let mut tasks = tokio::task::JoinSet::new();
        for (host, pull) in hosts.iter().zip(pulls) {
            let effects = self.effects.clone();
            let pull = command::Action::Pull(pull);
            let cmd = batch_command(fence, &rec.id, position, host, "pull", pull);
            let (host, artifact) = (host.clone(), rec.artifact.clone());
            tasks.spawn(async move {
                let outcome = match effects.send(&host, cmd, COMMAND_TIMEOUT, patience).await {
                    Ok(u) if u.status() == CommandStatus::Succeeded => {
                        effects.pulled(&host, &artifact);
                        Ok(())
                    }
                    Ok(u) => Err(format!("pull: {}", u.reason)),
                    Err(e) => Err(e),
                };
                (host, outcome)
            });
        }
        let mut out = HashMap::new();
        while let Some(done) = tasks.join_next().await {
            let (host, outcome) = done.expect("pull task does not panic");
            out.insert(host, outcome);
        }
        out
    }

    /// Samples the batch against the baseline once per heartbeat interval:
    /// K consecutive bad samples fail it; after `samples`, it passes (or the
    /// inconclusive policy decides when no sample was conclusive).
    pub(super) async fn judge_batch(
        &self,
        gate: &HealthGate,
        service: &str,
        batch: &[Side],
        baseline: &[Side],
    ) -> Result<(), GateStop> {
        if batch.is_empty() {
            return Ok(());
        }
        let interval = batch
            .iter()
            .filter_map(|s| self.effects.host_in(&s.host, service, s.slot))
            .map(|h| h.heartbeat_interval_ms)
            .max()
            .unwrap_or(1000);
        let mut bad_streak = 0u32;
        let mut conclusive = 0u32;
        let mut last_reason = String::new();
        // The window is `samples` conclusive samples (inconclusive ones, such
        // as the first intervals after a restart with no traffic counted yet,
        // do not fill it), up to three times as many attempts. A window that
        // ends in a bad streak is extended until the streak resolves: K bad
        // in a row fail, a good sample clears it.
        let wanted = gate.samples.max(1);
        let mut taken = 0u32;
        while (conclusive < wanted && taken < wanted * 3)
            || (bad_streak > 0 && taken < wanted * 3 + gate.bad_samples.max(1))
        {
            taken += 1;
            tokio::time::sleep(Duration::from_millis(interval.into())).await;
            let mut b = Sample::default();
            for s in batch {
                // Only heartbeats newer than the host's restart are evidence
                // (older ones read as not reported yet).
                let health = self
                    .effects
                    .host_in(&s.host, service, s.slot)
                    .filter(|v| {
                        s.after_heartbeat
                            .is_none_or(|at| v.heartbeat_sequence > at + 1)
                    })
                    .and_then(|v| v.health);
                b.add(health.as_ref(), s.restarts_before);
            }
            let mut base = Sample::default();
            for s in baseline {
                let health = self
                    .effects
                    .host_in(&s.host, service, s.slot)
                    .and_then(|v| v.health);
                base.add(health.as_ref(), s.restarts_before);
            }
            match judge(gate, &b, (!baseline.is_empty()).then_some(&base)) {
                Verdict::Good => {
                    bad_streak = 0;
                    conclusive += 1;
                }
                Verdict::Bad(reason) => {
                    bad_streak += 1;
                    conclusive += 1;
                    last_reason = reason;
                    if bad_streak >= gate.bad_samples.max(1) {
                        return Err(GateStop::Failed(Why::new(
                            ReasonKind::GateFailed,
                            format!(
                                "health gate failed {bad_streak} samples in a row: {last_reason}"
                            ),
                        )));
                    }
                }
                Verdict::Inconclusive(reason) => last_reason = reason,
            }
        }
        if conclusive > 0 {
            return Ok(());
        }
        match gate.inconclusive() {
            InconclusivePolicy::Pass => Ok(()),
            InconclusivePolicy::Pause => Err(GateStop::Hold(Why::new(
                ReasonKind::Inconclusive,
                format!("paused: inconclusive health gate ({last_reason})"),
            ))),
            _ => Err(GateStop::Failed(Why::new(
                ReasonKind::Inconclusive,
                format!("inconclusive health gate: {last_reason}"),
            ))),
        }
    }

    /// Records the verdict of batch (`stage`, `batch`) with the deploy.
    pub(super) async fn set_verdict(
        &self,
        id: &str,
        stage: usize,
        batch: usize,
        verdict: &str,
    ) -> Result<(), DeployError> {
        self.ledger
            .update(
                id,
                |rec| {
                    rec.verdicts
                        .insert(format!("{stage}/{batch}"), verdict.to_string());
                },
                |_, _| Vec::new(),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::{last_words, next_position};

    #[test]
    fn last_words_are_the_end_of_the_output_on_one_line() {
        assert_eq!(last_words(""), "");
        assert_eq!(last_words("a\nb\n"), " (output: a | b)");
        let long = "x".repeat(1000) + "\nthe end";
        let words = last_words(&long);
        assert!(words.starts_with(" (output: …x"), "{words}");
        assert!(words.ends_with(" | the end)"), "{words}");
        assert!(words.chars().count() < 420, "{}", words.len());
    }

    #[test]
    fn the_next_batch_skips_empty_stages() {
        let plan = vec![
            vec![vec!["a".to_string()], vec!["b".to_string()]],
            vec![],
            vec![vec!["c".to_string()]],
        ];
        assert_eq!(next_position(&plan, 0, 0), Some((0, 1)));
        assert_eq!(next_position(&plan, 0, 1), Some((2, 0)));
        assert_eq!(next_position(&plan, 2, 0), None);
    }
}
