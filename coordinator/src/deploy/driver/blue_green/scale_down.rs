//! Rule 5: the old slot (or group) stopped once the scale-down delay has
//! passed since the recorded switch; and stopping a color on hosts, which
//! the rollback uses too.

use std::time::Duration;

use drover_common::proto::{CommandStatus, Slot, StopCommand, command};
use tracing::{info, warn};

use super::routes::apply;
use super::{PATIENCE, SCALE_DOWN_LOOK, StepContext, batch_command_id, progress};
use crate::deploy::blue_green::Color;
use crate::deploy::deployments::DeployError;
use crate::deploy::driver::{Driver, traffic};
use crate::deploy::machine::{Event, Phase};
use crate::deploy::record::DeployRecord;

impl Driver {
    /// Rule 5.
    pub(super) async fn scale_down(
        &self,
        cx: &StepContext<'_>,
    ) -> Result<Option<Event>, DeployError> {
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
            .update_progress(id, stage, |bg| bg.scaled_down = true)
            .await?;
        let bg = progress(&rec, stage);
        let from = bg.from;
        let hosts = rec.plan[stage][batch].clone();
        for host in &hosts {
            let server = bg.server(host, from);
            if let Err(e) = traffic::drain(cx.router, cx.target, &server).await {
                warn!(deploy = %id, %host, error = %e, "the old slot was not drained");
            }
        }
        let stopped = self
            .stop_slot(&rec, &hosts, (from, bg.slot(from)), cx.fence, |h| {
                batch_command_id(id, (stage, batch), h, from)
            })
            .await;
        let mut problems = Vec::new();
        for (host, outcome) in &stopped {
            let result = match outcome {
                Ok(()) => apply(
                    cx.router,
                    &cx.target.backend,
                    bg,
                    std::slice::from_ref(host),
                    from,
                )
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
    pub(super) async fn stop_slot(
        &self,
        rec: &DeployRecord,
        hosts: &[String],
        (color, slot): (Color, Slot),
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
                    slot: slot as i32,
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
}
