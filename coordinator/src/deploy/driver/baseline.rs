//! A canary step's fresh baseline (an analysis with `baseline = FRESH`).
//!
//! 1. The hosts are chosen by the record ([`DeployRecord::fresh_baseline_for`]:
//!    as many of the stage's last hosts as the cohort has, growing with it)
//!    and recorded before any restart, so a new leader restarts the same
//!    hosts and no others.
//! 2. The hosts added at this step are restarted on the stage's old
//!    release (`anew`: even though it already runs), concurrently with the
//!    canary's own restarts. Command ids are fixed, so a repeat restarts
//!    nothing twice.
//! 3. A host whose restart failed leaves the baseline (it is not the
//!    deploy's to fix; its own batch will meet it). For each that
//!    succeeded, the heartbeat seen when it answered is recorded: the
//!    baseline's evidence is only what comes after, as the canary's.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_common::proto::{CommandStatus, RestartCommand, command};
use tracing::{info, warn};

use super::Driver;
use super::batch::{RESULT_SLACK, batch_command};
use crate::deploy::deployments::DeployError;
use crate::deploy::record::{DeployRecord, FreshBaseline};

impl Driver {
    /// Rule 1: the fresh baseline of canary step `step`, recorded; the
    /// hosts it adds at this step.
    pub(super) async fn choose_fresh_baseline(
        &self,
        id: &str,
        stage: usize,
        step: usize,
    ) -> Result<(DeployRecord, Vec<String>), DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let before = rec.fresh_baselines.get(&stage).cloned().unwrap_or_default();
        let hosts = rec.fresh_baseline_for(stage, step);
        if hosts == before.hosts {
            // Chosen already (a resumed step): restart what is not yet.
            let added = before
                .hosts
                .into_iter()
                .filter(|h| !before.restarted_at_heartbeat.contains_key(h))
                .collect();
            return Ok((rec, added));
        }
        let added: Vec<String> = hosts[before.hosts.len()..].to_vec();
        info!(deploy = %id, stage, step, ?added, "fresh baseline: hosts restarted on the old release with the canary");
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    rec.fresh_baselines.entry(stage).or_default().hosts = hosts.clone();
                },
                |_, _| Vec::new(),
            )
            .await?;
        Ok((rec, added))
    }

    /// Rules 2 and 3: restarts `hosts` on the stage's old release and
    /// records the outcome.
    pub(super) async fn restart_fresh_baseline(
        &self,
        rec: &DeployRecord,
        (stage, step): (usize, usize),
        hosts: Vec<String>,
        fence: (u32, u64),
        stuck: Duration,
    ) -> Result<(), DeployError> {
        if hosts.is_empty() {
            return Ok(());
        }
        let old = rec.stage_rollback_target(stage).to_string();
        let config = self.rollback_config(rec, stage).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let restart = command::Action::Restart(config.on_restart(RestartCommand {
                service: rec.service.clone(),
                artifact: old.clone(),
                ready_timeout_ms: stuck.as_millis() as u32,
                anew: true,
                ..Default::default()
            }));
            let cmd = batch_command(fence, &rec.id, (stage, step), &host, "baseline", restart);
            let effects = self.effects.clone();
            tasks.spawn(async move {
                let outcome = effects.send(&host, cmd, stuck + RESULT_SLACK, stuck).await;
                let ok = matches!(&outcome, Ok(u) if u.status() == CommandStatus::Succeeded);
                if !ok {
                    warn!(%host, ?outcome, "fresh baseline host did not restart; left out of the baseline");
                }
                (host, ok)
            });
        }
        let mut restarted: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (host, ok) = done.expect("host task does not panic");
            if ok {
                let seq = self.heartbeat_now(&host, &rec.service);
                restarted.insert(host, seq);
            } else {
                failed.push(host);
            }
        }
        self.ledger
            .update(
                &rec.id,
                |rec| {
                    let f: &mut FreshBaseline = rec.fresh_baselines.entry(stage).or_default();
                    f.hosts.retain(|h| !failed.contains(h));
                    for (h, seq) in &restarted {
                        f.restarted_at_heartbeat.entry(h.clone()).or_insert(*seq);
                    }
                },
                |_, _| Vec::new(),
            )
            .await
            .map(|_| ())
    }
}

/// Whether `rec`'s stage `stage` judges its canary against a fresh baseline.
pub(super) fn is_fresh(rec: &DeployRecord, stage: usize) -> bool {
    rec.snapshot
        .stages
        .get(stage)
        .and_then(|s| s.canary.as_ref())
        .and_then(|c| c.analysis.as_ref())
        .is_some_and(|a| a.baseline() == drover_common::proto::BaselineKind::Fresh)
}

#[cfg(test)]
mod tests {
    use crate::deploy::record::DeployRecord;

    /// A stage of two canary steps (1 host, then 3 more) and two batches.
    fn rec() -> DeployRecord {
        let hosts = |names: &[&str]| names.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let p = crate::deploy::testing::staged_pipeline(&["prod"]);
        let (mut rec, _) = crate::deploy::testing::record_of(&p, &[&["x"]], 0);
        rec.plan = vec![vec![
            hosts(&["c1"]),
            hosts(&["c2", "c3", "c4"]),
            hosts(&["h1", "h2", "h3"]),
            hosts(&["h4", "h5", "h6"]),
        ]];
        rec.canary_bakes = vec![vec![1000, 1000]];
        rec
    }

    #[test]
    fn a_fresh_baseline_grows_with_the_cohort_from_the_end_of_the_stage() {
        let mut r = rec();
        // At least three hosts, for a one-host canary.
        assert_eq!(r.fresh_baseline_for(0, 0), ["h6", "h5", "h4"]);
        r.fresh_baselines.entry(0).or_default().hosts = r.fresh_baseline_for(0, 0);
        // Then as many as the cohort.
        assert_eq!(r.fresh_baseline_for(0, 1), ["h6", "h5", "h4", "h3"]);
        // Never a host the deploy switched, never a canary's.
        r.touched = vec!["c1".into(), "h3".into()];
        assert_eq!(r.fresh_baseline_for(0, 1), ["h6", "h5", "h4", "h2"]);
        // A stage too small for it gives what it has.
        r.plan[0].truncate(3);
        r.fresh_baselines.clear();
        assert_eq!(r.fresh_baseline_for(0, 1), ["h2", "h1"]);
    }
}
