//! Rule 3: a weighted canary's step. The new slot takes the step's share
//! of the backend's traffic through server weights and is judged by the
//! canary analysis, its own slot against the old slot on every host (or,
//! across host groups, the new group against the old one).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::info;

use super::routes::{apply, changes};
use super::{StepContext, all_hosts, progress};
use crate::deploy::deployments::DeployError;
use crate::deploy::driver::Driver;
use crate::deploy::driver::canary::{SlotSides, Step};
use crate::deploy::machine::Event;

impl Driver {
    /// Shifts the `n`th share of traffic to the new slot and bakes it.
    pub(super) async fn weigh(
        self: &Arc<Self>,
        cx: &StepContext<'_>,
        n: usize,
    ) -> Result<Option<Event>, DeployError> {
        let (id, stage, batch) = (cx.id, cx.stage, cx.batch);
        let backend = &cx.target.backend;
        let (rec, _) = self.ledger.load(id).await?;
        let hosts = all_hosts(&rec, stage);
        let servers = progress(&rec, stage).servers_of(&hosts);
        let before = match cx.router.servers(backend).await {
            Ok(servers) => servers,
            Err(e) => {
                let text = format!("router: reading the servers' weights: {e}");
                return self.step_failed(id, stage, batch, text).await;
            }
        };
        // The weights as they were before the deploy changed any: read
        // once, what the switch and a rollback restore.
        let original: BTreeMap<String, u32> = servers
            .iter()
            .filter_map(|server| {
                let view = before.iter().find(|v| &v.server == server)?;
                Some((server.clone(), view.weight))
            })
            .collect();
        let share = progress(&rec, stage).shares[n];
        let rec = self
            .update_progress(id, stage, |bg| {
                if bg.weights.is_empty() {
                    bg.weights = original.clone();
                }
                bg.share = share;
            })
            .await?;
        let bg = progress(&rec, stage);
        let (from, to) = (bg.from, bg.to);
        let shifted = async {
            apply(cx.router, backend, bg, &hosts, to).await?;
            apply(cx.router, backend, bg, &hosts, from).await
        };
        if let Err(e) = shifted.await {
            let text = format!("router: shifting {share}% to the {} slot: {e}", to.name());
            return self.step_failed(id, stage, batch, text).await;
        }
        let after = cx.router.servers(backend).await.unwrap_or_default();
        let traffic = changes(backend, &servers, &before, &after);
        let what = format!("shifted: {} takes {share}%", to.name());
        self.audit_traffic(id, stage, &what, &hosts, traffic)
            .await?;
        info!(deploy = %id, stage, share, to = to.name(), "traffic shifted");
        self.bake(Step {
            id,
            stage,
            step: batch,
            cohort: bg.running(&hosts, to),
            baseline: bg.running(&hosts, from),
            fresh: false,
            service: rec.service.clone(),
            bake_ms: u64::from(bg.bakes[n]),
            slots: Some(SlotSides {
                canary: bg.slot(to),
                baseline: bg.slot(from),
                started_at_heartbeat: bg.started.clone(),
                restarts_before: bg.restarts_before.clone(),
            }),
        })
        .await
    }
}
