//! Rule 6: a blue-green stage's part of the rollback. `from` is started
//! again (on the stage's previous release) only where the scale-down
//! stopped it; the record says traffic is back on `from` (share 0, no
//! host switched); then every `from` server gets its intended state and
//! weight back, every `to` server is drained and waited on, `to` is
//! stopped and put in maintenance. A host whose `from` could not start
//! keeps its traffic where it is.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_common::proto::{CommandStatus, RestartCommand, RouterTarget, Slot, command};
use tracing::{info, warn};

use super::routes::{apply, changes};
use super::{PATIENCE, all_hosts, progress};
use crate::deploy::blue_green::Color;
use crate::deploy::deployments::DeployError;
use crate::deploy::driver::batch::RESULT_SLACK;
use crate::deploy::driver::{Driver, traffic};
use crate::deploy::record::DeployRecord;
use crate::router::{Router, ServerState};

/// Per host, Ok or why not.
type HostOutcomes = Vec<(String, Result<(), String>)>;

impl Driver {
    /// Rule 6 for every blue-green stage the deploy asked to start a slot
    /// in.
    pub(in crate::deploy::driver) async fn roll_back_blue_green(
        &self,
        id: &str,
        epoch: u64,
    ) -> Result<HostOutcomes, DeployError> {
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
                    let why = format!("router: {e}");
                    out.extend(hosts.iter().map(|h| (h.clone(), Err(why.clone()))));
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
    ) -> Result<HostOutcomes, DeployError> {
        let id = rec.id.as_str();
        let bg = progress(rec, stage).clone();
        let (from, to) = (bg.from, bg.to);
        let backend = &target.backend;
        let all = all_hosts(rec, stage);
        // `from` running again where the scale-down stopped it: the
        // switched hosts' old slot, or the whole old group.
        let mut broken = if bg.scaled_down {
            let again = match bg.groups {
                Some(_) => bg.running(&all, from),
                None => bg.switched.clone(),
            };
            self.start_again(rec, stage, &again, (from, bg.slot(from)), fence)
                .await
        } else {
            BTreeMap::new()
        };
        let moved = !bg.switched.is_empty() || bg.share > 0;
        let before = router.servers(backend).await.unwrap_or_default();
        // Recorded first (rule 1 re-asserts it), then told: hosts whose
        // old process could not start keep their traffic where it is.
        let rec = self
            .update_progress(id, stage, |bg| {
                bg.switched.retain(|h| broken.contains_key(h));
                bg.share = 0;
                if bg.switched.is_empty() {
                    bg.rolled_back();
                }
            })
            .await?;
        let now = progress(&rec, stage);
        let back: Vec<String> = all
            .iter()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        if let Err(e) = apply(router.as_ref(), backend, now, &back, from).await {
            for h in &back {
                broken.insert(h.clone(), format!("router: switching back: {e}"));
            }
        }
        // Every host asked to start the new release: its server drained
        // (0% new traffic at once) and its requests in flight waited for.
        let news: Vec<String> = bg
            .restarts_before
            .keys()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        for host in &news {
            let server = now.server(host, to);
            if let Err(e) = traffic::drain(router.as_ref(), target, &server).await {
                warn!(deploy = %id, %host, error = %e, "the new release's server was not drained");
            }
        }
        let after = router.servers(backend).await.unwrap_or_default();
        if moved {
            let traffic = changes(backend, &now.servers_of(&back), &before, &after);
            let what = format!("switched back to {}", from.name());
            self.audit_traffic(id, stage, &what, &back, traffic).await?;
            info!(deploy = %id, stage, hosts = back.len(), to = from.name(), "traffic switched back");
        }
        let stopped = self
            .stop_slot(&rec, &news, (to, now.slot(to)), fence, |h| {
                format!("{id}/rollback/{h}/stop-{}", to.name())
            })
            .await;
        for (host, outcome) in stopped {
            let one = std::slice::from_ref(&host);
            let done = match outcome {
                Ok(()) => apply(router.as_ref(), backend, now, one, to)
                    .await
                    .map_err(|e| format!("router: {e}")),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                warn!(deploy = %id, %host, error = %e, "the new release is not stopped and in maintenance");
            }
        }
        self.reset_preview(&rec, stage, router.as_ref(), &back)
            .await;
        let mut reported: Vec<String> = bg.restarts_before.keys().cloned().collect();
        reported.extend(
            broken
                .keys()
                .filter(|h| !reported.contains(h))
                .cloned()
                .collect::<Vec<_>>(),
        );
        Ok(reported
            .into_iter()
            .map(|h| {
                let outcome = broken.remove(&h).map_or(Ok(()), Err);
                (h, outcome)
            })
            .collect())
    }

    /// `from` running again on `hosts` where the scale-down stopped it
    /// (its release is still on the host: rollback never downloads); the
    /// hosts where it did not start, and why.
    async fn start_again(
        &self,
        rec: &DeployRecord,
        stage: usize,
        hosts: &[String],
        (from, slot): (Color, Slot),
        fence: (u32, u64),
    ) -> BTreeMap<String, String> {
        let id = rec.id.as_str();
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let cmd = drover_common::proto::Command {
                command_id: format!("{id}/rollback/{host}/start-{}", from.name()),
                shard: fence.0,
                epoch: fence.1,
                action: Some(command::Action::Restart(RestartCommand {
                    service: rec.service.clone(),
                    artifact: rec.stage_rollback_target(stage).to_string(),
                    ready_timeout_ms: PATIENCE.as_millis() as u32,
                    slot: slot as i32,
                    ..Default::default()
                })),
            };
            let (effects, host) = (self.effects.clone(), host.clone());
            tasks.spawn(async move {
                let sent = effects
                    .send(&host, cmd, PATIENCE + RESULT_SLACK, PATIENCE)
                    .await;
                let outcome = match sent {
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
        let mut broken = BTreeMap::new();
        while let Some(done) = tasks.join_next().await {
            if let (host, Err(e)) = done.expect("host task does not panic") {
                broken.insert(host, e);
            }
        }
        broken
    }

    /// The preview backend back on `from` for `hosts` (its `to` stopped).
    async fn reset_preview(
        &self,
        rec: &DeployRecord,
        stage: usize,
        router: &dyn Router,
        hosts: &[String],
    ) {
        let bg = progress(rec, stage);
        let preview = rec.snapshot.stages[stage]
            .blue_green
            .as_ref()
            .map(|b| b.preview_backend.clone())
            .unwrap_or_default();
        if preview.is_empty() {
            return;
        }
        for host in hosts {
            for (color, state) in [(bg.from, ServerState::Ready), (bg.to, ServerState::Maint)] {
                if !bg.runs(host, color) {
                    continue;
                }
                let server = bg.server(host, color);
                if let Err(e) = router.set_state(&preview, &server, state).await {
                    warn!(deploy = %rec.id, %host, error = %e, "the preview backend was not reset");
                }
            }
        }
    }
}
