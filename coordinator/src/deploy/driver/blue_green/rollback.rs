//! Rule 6: a blue-green stage's part of the rollback. `from` is started
//! again (on the stage's previous release) only where the scale-down
//! stopped it; the record says traffic is back on `from` (share 0, no
//! host switched); then every `from` server gets its intended state and
//! weight back, every `to` server is drained and waited on, `to` is
//! stopped and put in maintenance. A host whose `from` could not start
//! keeps its traffic where it is.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_common::proto::{CommandStatus, RestartCommand, RouterTarget, command};
use tracing::{info, warn};

use super::routes::{apply, changes};
use super::{PATIENCE, progress};
use crate::deploy::audit;
use crate::deploy::blue_green::{Color, server_name};
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
        let mut broken = if bg.scaled_down {
            self.start_again(rec, stage, &bg.switched, from, fence)
                .await
        } else {
            BTreeMap::new()
        };
        let hosts: Vec<String> = bg
            .restarts_before
            .keys()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        let moved = !bg.switched.is_empty() || bg.share > 0;
        let before = router.servers(backend).await.unwrap_or_default();
        // Recorded first (rule 1 re-asserts it), then told.
        let rec = self
            .ledger
            .update(
                id,
                |rec| {
                    let bg = rec.blue_green.get_mut(&stage).expect("blue-green stage");
                    bg.switched.retain(|h| broken.contains_key(h));
                    bg.share = 0;
                    if bg.switched.is_empty() {
                        bg.rolled_back();
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        let now = progress(&rec, stage);
        if let Err(e) = apply(router.as_ref(), backend, now, &hosts, from).await {
            for h in &hosts {
                broken.insert(h.clone(), format!("router: switching back: {e}"));
            }
        }
        for host in &hosts {
            // Drained (0% new traffic at once), its requests in flight waited for.
            if let Err(e) = traffic::drain(router.as_ref(), target, &server_name(host, to)).await {
                warn!(deploy = %id, %host, error = %e, "the new slot was not drained");
            }
        }
        let after = router.servers(backend).await.unwrap_or_default();
        if moved {
            let traffic = changes(backend, &hosts, &before, &after);
            let what = format!("switched back to {}", from.name());
            let back = hosts.clone();
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
            info!(deploy = %id, stage, hosts = hosts.len(), to = from.name(), "traffic switched back");
        }
        let idle: Vec<String> = hosts
            .iter()
            .filter(|h| !broken.contains_key(*h))
            .cloned()
            .collect();
        let stopped = self
            .stop_slot(&rec, &idle, to, fence, |h| {
                format!("{id}/rollback/{h}/stop-{}", to.name())
            })
            .await;
        for (host, outcome) in stopped {
            let done = match outcome {
                Ok(()) => apply(
                    router.as_ref(),
                    backend,
                    now,
                    std::slice::from_ref(&host),
                    to,
                )
                .await
                .map_err(|e| format!("router: {e}")),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                warn!(deploy = %id, %host, error = %e, "the new slot is not stopped and in maintenance");
            }
        }
        self.reset_preview(&rec, stage, router.as_ref(), &idle)
            .await;
        Ok(bg
            .restarts_before
            .keys()
            .map(|h| (h.clone(), broken.remove(h).map_or(Ok(()), Err)))
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
        from: Color,
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
                    anew: false,
                    slot: from.slot() as i32,
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
                let server = server_name(host, color);
                if let Err(e) = router.set_state(&preview, &server, state).await {
                    warn!(deploy = %rec.id, %host, error = %e, "the preview backend was not reset");
                }
            }
        }
    }
}
