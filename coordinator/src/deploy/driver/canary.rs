//! Baking a canary step: once per heartbeat interval, the new heartbeats
//! of the canary cohort and of the baseline (the stage's hosts not touched
//! yet) go into the window and the analysis looks at it. A failure at any
//! look ends the step at once (rollback inside the first bake window); the
//! look at the end of the window can pass it; an inconclusive end follows
//! the analysis' policy. Promote (by hand) passes the step at the next look.
//!
//! Each look spends its share of the false-alarm rate (see `analysis.rs`)
//! and runs off the async runtime within a time budget.
//!
//! The bake's start and extensions are in the record (rule 6 of the
//! driver): a new leader continues the same bake to the same deadline, and
//! counts the cohort's restarts from before its batches, so a failover
//! neither lets a bad canary serve a whole bake longer nor hides a crash
//! loop that began before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    Analysis, AnalysisVerdict, BaselineKind, CanaryAnalysis, InconclusiveAction, MetricVerdict,
    Slot,
};
use tracing::{info, warn};

use super::Driver;
use crate::deploy::analysis::{self, Interval, Judgement, Look, Side, Spending, Window};
use crate::deploy::audit;
use crate::deploy::deployments::DeployError;
use crate::deploy::machine::{Event, Phase, ReasonKind, Why};
use crate::deploy::record::BakeProgress;

/// Looks at the window at least this often, whatever the heartbeat interval.
const MAX_LOOK_INTERVAL: Duration = Duration::from_secs(1);
/// The time one look's analysis may take (it runs off the async runtime).
const ANALYSIS_BUDGET: Duration = Duration::from_secs(2);
/// Baseline hosts whose evidence is kept for a new leader (a uniform
/// sample of them beyond).
const KEPT_BASELINE_HOSTS: usize = 500;
/// How often a bake's evidence is written: the evidence of up to
/// [`SMALL_EVIDENCE_HOSTS`] hosts (about 250 bytes each) at most every
/// second, more at most every 5 s (a store's history holds every version
/// until compaction, and a bake's writes grow with its time, not hosts).
const SMALL_EVIDENCE_HOSTS: usize = 200;
const KEPT_EVERY_SMALL: Duration = Duration::from_secs(1);
const KEPT_EVERY_LARGE: Duration = Duration::from_secs(5);

/// Judges the window on a blocking thread, within [`ANALYSIS_BUDGET`]. An
/// analysis over its budget is inconclusive (a last look says so; an
/// interim look is skipped by the caller since it cannot fail then).
async fn judge_off_runtime(
    analysis: &Analysis,
    window: &Arc<Window>,
    look: Look,
    last: bool,
) -> Judgement {
    let (a, w) = (analysis.clone(), window.clone());
    let task = tokio::task::spawn_blocking(move || analysis::judge(&a, &w, look));
    match tokio::time::timeout(ANALYSIS_BUDGET, task).await {
        Ok(Ok(j)) => j,
        outcome => {
            warn!(?outcome, last, "a canary analysis ran over its time budget");
            Judgement {
                verdict: AnalysisVerdict::Inconclusive,
                reason: format!(
                    "the analysis took longer than {ANALYSIS_BUDGET:?}; too many samples?"
                ),
                metrics: Vec::new(),
            }
        }
    }
}

/// The heartbeat and scrape a host's evidence was last taken from.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Taken {
    heartbeat: u64,
    scrape: u64,
}

/// The canary step being baked.
pub(in crate::deploy::driver) struct Step<'a> {
    pub id: &'a str,
    pub stage: usize,
    pub step: usize,
    /// Every host of the cohort so far (earlier steps included), failed
    /// hosts excluded.
    pub cohort: Vec<String>,
    pub baseline: Vec<String>,
    /// The baseline is fresh (restarted with the canary): its evidence
    /// counts only after its restart, as the canary's.
    pub fresh: bool,
    pub service: String,
    /// How long the step bakes (before extensions).
    pub bake_ms: u64,
    /// A weighted canary: the canary is each host's new slot, the baseline
    /// its old slot (the cohort and the baseline are the same hosts).
    pub slots: Option<SlotSides>,
}

/// A weighted canary's sides: which slot is judged against which, and
/// where the new slot's evidence and restarts count from.
pub(in crate::deploy::driver) struct SlotSides {
    pub canary: Slot,
    pub baseline: Slot,
    /// Per host, the last heartbeat sequence when the new slot answered.
    pub started_at_heartbeat: BTreeMap<String, u64>,
    /// Per host, the new slot's restarts before it started.
    pub restarts_before: BTreeMap<String, u32>,
}

/// How a look ended the step.
struct Decision {
    verdict: AnalysisVerdict,
    reason: String,
    metrics: Vec<MetricVerdict>,
    event: Event,
}

impl Driver {
    /// Bakes a canary step; its outcome for the state machine, or `None`
    /// if a control overtook it (the driver then follows the new state).
    pub(super) async fn bake(self: &Arc<Self>, s: Step<'_>) -> Result<Option<Event>, DeployError> {
        let key = format!("{}/{}", s.stage, s.step);
        // The bake so far: begun now, or by an earlier leader.
        let now = self.ledger.now();
        let rec = self
            .ledger
            .update(
                s.id,
                |rec| {
                    rec.bakes.entry(key.clone()).or_insert(BakeProgress {
                        started_unix_ms: now,
                        extensions: 0,
                    });
                },
                |_, _| Vec::new(),
            )
            .await?;
        let mut progress = rec.bakes[&key];
        let canary = rec.snapshot.stages[s.stage]
            .canary
            .clone()
            .unwrap_or_default();
        let manual = canary.manual_promotion;
        let analysis = canary.analysis.unwrap_or_default();
        let bake_ms = s.bake_ms;
        let look_every = s
            .cohort
            .iter()
            .filter_map(|h| self.effects.host(h, &s.service))
            .map(|h| Duration::from_millis(h.heartbeat_interval_ms.max(10).into()))
            .min()
            .unwrap_or(MAX_LOOK_INTERVAL)
            .min(MAX_LOOK_INTERVAL);
        let wake = self.wake_of(s.id);
        // What an earlier leader saw of this bake, if any (rule 6 of the
        // driver); shared with an analysis still running off the runtime,
        // the next look's observations copy it only then (Arc::make_mut).
        let kept = self.ledger.evidence(s.id, (s.stage, s.step)).await?;
        let mut window = Arc::new(kept.as_ref().map(Window::restored).unwrap_or_default());
        // What was last taken per side and host (an interval kept by an
        // earlier leader is not taken again).
        let canary = window.canary.iter().map(|e| (true, e));
        let baseline = window.baseline.iter().map(|e| (false, e));
        let mut seen: HashMap<(bool, String), Taken> = canary
            .chain(baseline)
            .map(|(is_canary, (h, e))| {
                let taken = Taken {
                    heartbeat: 0,
                    scrape: e.last_scrape,
                };
                ((is_canary, h.clone()), taken)
            })
            .collect();
        let mut kept_at: Option<tokio::time::Instant> = None;
        // The false-alarm budget, spent over the planned bake (a new leader
        // starts from where the bake is).
        let extensions_planned = Spending::extensions_planned(&analysis);
        let mut spending = Spending::new(
            &analysis,
            bake_ms,
            self.ledger.now().saturating_sub(progress.started_unix_ms),
        );
        loop {
            tokio::select! {
                _ = tokio::time::sleep(look_every) => {}
                _ = wake.notified() => {}
            }
            let (rec, _) = self.ledger.load(s.id).await?;
            if rec.machine.phase != Phase::Rolling
                || (rec.machine.stage, rec.machine.batch) != (s.stage, s.step)
            {
                info!(deploy = %s.id, phase = ?rec.machine.phase, "canary bake overtaken by a control");
                if let Err(e) = self.ledger.drop_evidence(&rec, (s.stage, s.step)).await {
                    warn!(deploy = %s.id, error = %e, "could not forget a canary step's evidence");
                }
                return Ok(None);
            }
            let baked_ms = self.ledger.now().saturating_sub(progress.started_unix_ms);
            let decision = if rec.promoted.contains(&key) {
                let look = Look { alpha: 0.0 }; // evidence only, it cannot fail
                let j = judge_off_runtime(&analysis, &window, look, true).await;
                Decision {
                    verdict: AnalysisVerdict::Promoted,
                    reason: format!("promoted by hand after {:.1}s", baked_ms as f64 / 1000.0),
                    metrics: j.metrics,
                    event: Event::BatchPassed,
                }
            } else {
                self.observe(&s, Arc::make_mut(&mut window), &mut seen, &rec);
                self.keep_evidence(&s, &rec, &window, &mut kept_at).await?;
                let open = baked_ms < bake_ms * u64::from(1 + progress.extensions);
                let last = !open && progress.extensions >= extensions_planned;
                let look = spending.look(baked_ms, last);
                let j = judge_off_runtime(&analysis, &window, look, !open).await;
                let j = if open {
                    j
                } else {
                    analysis::settle_window_end(j, &analysis, last)
                };
                match (j.verdict, open) {
                    (AnalysisVerdict::Fail, _) => Decision {
                        event: Event::BatchFailed(Why::new(
                            ReasonKind::CanaryFailed,
                            format!("canary analysis failed: {}", j.reason),
                        )),
                        verdict: AnalysisVerdict::Fail,
                        reason: j.reason,
                        metrics: j.metrics,
                    },
                    (_, true) => continue,
                    (AnalysisVerdict::Pass, false) => Decision {
                        event: if manual {
                            Event::Hold(Why::new(
                                ReasonKind::AwaitingPromotion,
                                format!(
                                    "canary step {} passed its analysis; waiting for promote (manual promotion)",
                                    s.step
                                ),
                            ))
                        } else {
                            Event::BatchPassed
                        },
                        verdict: AnalysisVerdict::Pass,
                        reason: j.reason,
                        metrics: j.metrics,
                    },
                    // Inconclusive at the end of the window: the policy decides.
                    (_, false) => match analysis.inconclusive() {
                        InconclusiveAction::Extend
                            if progress.extensions < analysis.max_extensions =>
                        {
                            progress.extensions += 1;
                            self.ledger
                                .update(
                                    s.id,
                                    |rec| {
                                        rec.bakes.insert(key.clone(), progress);
                                    },
                                    |_, _| Vec::new(),
                                )
                                .await?;
                            info!(deploy = %s.id, stage = s.stage, step = s.step, extensions = progress.extensions, reason = %j.reason, "canary inconclusive: extending the bake");
                            continue;
                        }
                        InconclusiveAction::Pause => Decision {
                            event: Event::Hold(Why::new(
                                ReasonKind::Inconclusive,
                                format!(
                                    "canary analysis inconclusive, waiting for a human (resume to judge again, promote to pass): {}",
                                    j.reason
                                ),
                            )),
                            verdict: AnalysisVerdict::Inconclusive,
                            reason: j.reason,
                            metrics: j.metrics,
                        },
                        _ => Decision {
                            event: Event::BatchFailed(Why::new(
                                ReasonKind::Inconclusive,
                                format!(
                                    "canary analysis inconclusive after {} extensions: {}",
                                    progress.extensions, j.reason
                                ),
                            )),
                            verdict: AnalysisVerdict::Inconclusive,
                            reason: j.reason,
                            metrics: j.metrics,
                        },
                    },
                }
            };
            self.record_analysis(&s, &decision, baked_ms, progress.extensions)
                .await?;
            return Ok(Some(decision.event));
        }
    }

    /// Keeps the window for a new leader, at most every
    /// [`KEPT_EVERY_SMALL`] or [`KEPT_EVERY_LARGE`] by its size.
    async fn keep_evidence(
        &self,
        s: &Step<'_>,
        rec: &crate::deploy::record::DeployRecord,
        window: &Window,
        kept_at: &mut Option<tokio::time::Instant>,
    ) -> Result<(), DeployError> {
        let now = tokio::time::Instant::now();
        let hosts = window.canary.len() + window.baseline.len().min(KEPT_BASELINE_HOSTS);
        let every = if hosts > SMALL_EVIDENCE_HOSTS {
            KEPT_EVERY_LARGE
        } else {
            KEPT_EVERY_SMALL
        };
        if kept_at.is_some_and(|at| now.duration_since(at) < every) {
            return Ok(());
        }
        let stored = window.stored(KEPT_BASELINE_HOSTS);
        self.ledger
            .save_evidence(rec, (s.stage, s.step), &stored)
            .await?;
        *kept_at = Some(now);
        Ok(())
    }

    /// Takes every heartbeat that arrived since the last look. A canary
    /// host counts only with heartbeats newer than its restart (the one
    /// that may already have been on its way when the restart answered
    /// skipped too); its restarts are counted from before its batch.
    fn observe(
        &self,
        s: &Step<'_>,
        window: &mut Window,
        seen: &mut HashMap<(bool, String), Taken>,
        rec: &crate::deploy::record::DeployRecord,
    ) {
        window.canary_not_ready.clear();
        window.canary_restarts.clear();
        for (hosts, is_canary) in [(&s.cohort, true), (&s.baseline, false)] {
            let slot = match &s.slots {
                Some(sides) if is_canary => sides.canary,
                Some(sides) => sides.baseline,
                None => Slot::None,
            };
            for host in hosts.iter() {
                let Some(h) = self.effects.host_in(host, &s.service, slot) else {
                    continue;
                };
                let restarted = if is_canary {
                    match &s.slots {
                        Some(sides) => sides.started_at_heartbeat.get(host),
                        None => rec.switched_at_heartbeat.get(host),
                    }
                } else if s.fresh {
                    let f = rec.fresh_baselines.get(&s.stage);
                    match f.and_then(|f| f.restarted_at_heartbeat.get(host)) {
                        Some(at) => Some(at),
                        None => continue, // not restarted (yet)
                    }
                } else {
                    None
                };
                if restarted.is_some_and(|at| h.heartbeat_sequence <= at + 1) {
                    continue; // nothing since the restart yet
                }
                if is_canary && let Some(health) = &h.health {
                    if !health.ready {
                        window.canary_not_ready.push(host.clone());
                    }
                    let before = match &s.slots {
                        Some(sides) => sides.restarts_before.get(host),
                        None => rec.restarts_before.get(host),
                    };
                    let before = before.copied().unwrap_or(0);
                    if health.restarts > before {
                        window
                            .canary_restarts
                            .push((host.clone(), health.restarts - before));
                    }
                }
                let Some(health) = h.health else { continue };
                let taken = Taken {
                    heartbeat: h.heartbeat_sequence,
                    scrape: health.scrape,
                };
                let before = seen.insert((is_canary, host.clone()), taken);
                if before.is_some_and(|b| b.heartbeat == taken.heartbeat) {
                    continue; // no new heartbeat since the last look
                }
                if taken.scrape != 0 && before.is_some_and(|b| b.scrape == taken.scrape) {
                    continue; // a new heartbeat repeating the last scrape's figures
                }
                let side = if is_canary {
                    Side::Canary
                } else {
                    Side::Baseline
                };
                window.add(side, host, &Interval::from(health));
            }
        }
    }

    /// Stores the step's verdict and evidence with the deploy (and its
    /// line in the audit log).
    async fn record_analysis(
        &self,
        s: &Step<'_>,
        d: &Decision,
        baked_ms: u64,
        extensions: u32,
    ) -> Result<(), DeployError> {
        let report = CanaryAnalysis {
            stage: s.stage as u32,
            step: s.step as u32,
            verdict: d.verdict as i32,
            reason: d.reason.clone(),
            canary_hosts: s.cohort.clone(),
            baseline_hosts: s.baseline.clone(),
            baked_ms,
            extensions,
            metrics: d.metrics.clone(),
            decided_at_unix_ms: self.ledger.now(),
            baseline: if s.fresh {
                BaselineKind::Fresh
            } else {
                BaselineKind::Live
            } as i32,
        };
        info!(deploy = %s.id, stage = s.stage, step = s.step, verdict = ?d.verdict, reason = %report.reason, "canary analysis");
        let rec = self
            .ledger
            .update(
                s.id,
                |rec| {
                    rec.analyses
                        .retain(|a| (a.stage, a.step) != (report.stage, report.step));
                    rec.analyses.push(report.clone());
                },
                |rec, now| vec![audit::analysis(rec, &report, now)],
            )
            .await?;
        self.ledger.drop_evidence(&rec, (s.stage, s.step)).await
    }
}
