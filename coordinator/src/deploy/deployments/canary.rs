//! Baking a canary step: once per heartbeat interval, the new heartbeats
//! of the canary cohort and of the baseline (the stage's hosts not touched
//! yet) go into the window and the analysis looks at it. A failure at any
//! look ends the step at once (rollback inside the first bake window); the
//! look at the end of the window can pass it; an inconclusive end follows
//! the analysis' policy. Promote (by hand) passes the step at the next look.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{AnalysisVerdict, CanaryAnalysis, InconclusiveAction};
use tokio::time::Instant;
use tracing::info;

use super::{DeployError, Deployments};
use crate::deploy::analysis::{self, Observation, Window};
use crate::deploy::machine::{Event, Phase};

/// Looks at the window at least this often, whatever the heartbeat interval.
const MAX_LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// The canary step being baked.
pub(super) struct Step<'a> {
    pub id: &'a str,
    pub stage: usize,
    pub step: usize,
    /// Every host of the cohort so far (earlier steps included), failed
    /// hosts excluded.
    pub cohort: Vec<String>,
    pub baseline: Vec<String>,
    pub service: String,
}

impl Deployments {
    /// Bakes a canary step and returns its outcome for the state machine.
    pub(super) async fn bake(self: &Arc<Self>, s: Step<'_>) -> Result<Event, DeployError> {
        let (rec, _) = self.load(s.id).await?;
        let canary = rec.snapshot.stages[s.stage]
            .canary
            .clone()
            .unwrap_or_default();
        let manual = canary.manual_promotion;
        let analysis = canary.analysis.unwrap_or_default();
        let bake = Duration::from_millis(rec.canary_bakes[s.stage][s.step].into());
        let key = format!("{}/{}", s.stage, s.step);
        let look_every = s
            .cohort
            .iter()
            .filter_map(|h| self.registry.get(h))
            .map(|h| Duration::from_millis(h.heartbeat_interval_ms.max(10).into()))
            .min()
            .unwrap_or(MAX_LOOK_INTERVAL)
            .min(MAX_LOOK_INTERVAL);
        let wake = self.live(s.id);
        let started = Instant::now();
        let mut deadline = started + bake;
        let mut extensions = 0u32;
        let mut window = Window::default();
        // Heartbeat sequence last taken per host; restarts at the start.
        let mut seen: HashMap<String, u64> = HashMap::new();
        let restarts_at_start: HashMap<String, u32> = s
            .cohort
            .iter()
            .map(|h| (h.clone(), self.restarts(h, &s.service)))
            .collect();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(look_every) => {}
                _ = wake.notified() => {}
            }
            let (rec, _) = self.load(s.id).await?;
            if rec.machine.phase != Phase::Rolling
                || (rec.machine.stage, rec.machine.batch) != (s.stage, s.step)
            {
                // A control (abort, rollback) overtook the step: stop baking
                // at once. The outcome below is refused by the new phase and
                // the driver carries on with what the phase calls for.
                info!(deploy = %s.id, phase = ?rec.machine.phase, "canary bake overtaken by a control");
                return Ok(Event::BatchPassed);
            }
            let (verdict, reason, metrics, event) = if rec.promoted.contains(&key) {
                let j = analysis::judge(&analysis, &window, true);
                let reason = format!(
                    "promoted by hand after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                (
                    AnalysisVerdict::Promoted,
                    reason,
                    j.metrics,
                    Event::BatchPassed,
                )
            } else {
                self.observe(&s, &mut window, &mut seen, &restarts_at_start);
                let open = Instant::now() < deadline;
                let j = analysis::judge(&analysis, &window, open);
                match (j.verdict, open) {
                    (AnalysisVerdict::Fail, _) => {
                        let event =
                            Event::BatchFailed(format!("canary analysis failed: {}", j.reason));
                        (AnalysisVerdict::Fail, j.reason, j.metrics, event)
                    }
                    (_, true) => continue,
                    (AnalysisVerdict::Pass, false) => {
                        let event = if manual {
                            Event::Hold(format!(
                                "canary step {} passed its analysis; waiting for promote (manual promotion)",
                                s.step
                            ))
                        } else {
                            Event::BatchPassed
                        };
                        (AnalysisVerdict::Pass, j.reason, j.metrics, event)
                    }
                    // Inconclusive at the end of the window: the policy decides.
                    (_, false) => match analysis.inconclusive() {
                        InconclusiveAction::Extend if extensions < analysis.max_extensions => {
                            extensions += 1;
                            deadline += bake;
                            info!(deploy = %s.id, stage = s.stage, step = s.step, extensions, reason = %j.reason, "canary inconclusive: extending the bake");
                            continue;
                        }
                        InconclusiveAction::Pause => {
                            let event = Event::Hold(format!(
                                "canary analysis inconclusive, waiting for a human (resume to judge again, promote to pass): {}",
                                j.reason
                            ));
                            (AnalysisVerdict::Inconclusive, j.reason, j.metrics, event)
                        }
                        _ => {
                            let event = Event::BatchFailed(format!(
                                "canary analysis inconclusive after {extensions} extensions: {}",
                                j.reason
                            ));
                            (AnalysisVerdict::Inconclusive, j.reason, j.metrics, event)
                        }
                    },
                }
            };
            self.record_analysis(&s, verdict, reason, metrics, started, extensions)
                .await?;
            return Ok(event);
        }
    }

    fn restarts(&self, host: &str, service: &str) -> u32 {
        self.service_health(host, service)
            .map(|h| h.restarts)
            .unwrap_or(0)
    }

    /// Takes every heartbeat that arrived since the last look.
    fn observe(
        &self,
        s: &Step<'_>,
        window: &mut Window,
        seen: &mut HashMap<String, u64>,
        restarts_at_start: &HashMap<String, u32>,
    ) {
        window.canary_not_ready.clear();
        window.canary_restarts.clear();
        for (hosts, is_canary) in [(&s.cohort, true), (&s.baseline, false)] {
            for host in hosts.iter() {
                let Some(h) = self.registry.get(host) else {
                    continue;
                };
                let health = h.health.iter().find(|x| x.service == s.service);
                if is_canary && let Some(health) = health {
                    if !health.ready {
                        window.canary_not_ready.push(host.clone());
                    }
                    let before = restarts_at_start.get(host).copied().unwrap_or(0);
                    if health.restarts > before {
                        window
                            .canary_restarts
                            .push((host.clone(), health.restarts - before));
                    }
                }
                if seen.insert(host.clone(), h.heartbeat_sequence) == Some(h.heartbeat_sequence) {
                    continue; // no new heartbeat since the last look
                }
                let Some(health) = health else { continue };
                let o = Observation {
                    requests: health.request_count,
                    errors: health.error_count,
                    p50_ms: health.latency_p50_ms,
                    p99_ms: health.latency_p99_ms,
                    extra: health.metrics.clone(),
                };
                if is_canary {
                    window.canary.push(o);
                } else {
                    window.baseline.push(o);
                }
            }
        }
    }

    /// Stores the step's verdict and evidence with the deploy (and its line
    /// in the audit log).
    #[allow(clippy::too_many_arguments)]
    async fn record_analysis(
        &self,
        s: &Step<'_>,
        verdict: AnalysisVerdict,
        reason: String,
        metrics: Vec<drover_common::proto::MetricVerdict>,
        started: Instant,
        extensions: u32,
    ) -> Result<(), DeployError> {
        let report = CanaryAnalysis {
            stage: s.stage as u32,
            step: s.step as u32,
            verdict: verdict as i32,
            reason,
            canary_hosts: s.cohort.clone(),
            baseline_hosts: s.baseline.clone(),
            baked_ms: started.elapsed().as_millis() as u64,
            extensions,
            metrics,
            decided_at_unix_ms: drover_common::time::now_unix_ms(),
        };
        info!(deploy = %s.id, stage = s.stage, step = s.step, verdict = ?verdict, reason = %report.reason, "canary analysis");
        self.record_step_analysis(s.id, report).await
    }
}
