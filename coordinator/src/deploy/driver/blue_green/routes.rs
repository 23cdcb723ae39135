//! Telling the router what the record intends (`BlueGreenStage::intended`):
//! every call idempotent, so a repeat or a new leader changes nothing that
//! is already right; and what changed, for the audit.

use std::collections::BTreeSet;

use drover_common::proto::TrafficChange;

use crate::deploy::blue_green::{BlueGreenStage, Color};
use crate::deploy::record::DeployRecord;
use crate::router::{Router, RouterError, ServerView};

/// Rule 1: every host of the stage's two servers as the record intends,
/// per host the one meant to be ready first.
pub(super) async fn assert_traffic(
    router: &dyn Router,
    backend: &str,
    rec: &DeployRecord,
    stage: usize,
) -> Result<(), String> {
    let bg = super::progress(rec, stage);
    let hosts: BTreeSet<&String> = rec.plan[stage].iter().flatten().collect();
    for host in hosts {
        for intent in bg.intended(host) {
            apply_one(router, backend, bg, host, intent.color)
                .await
                .map_err(|e| format!("router: asserting the intended traffic: {e}"))?;
        }
    }
    Ok(())
}

/// `color`'s intended state (and weight) on every one of `hosts`.
pub(super) async fn apply(
    router: &dyn Router,
    backend: &str,
    bg: &BlueGreenStage,
    hosts: &[String],
    color: Color,
) -> Result<(), RouterError> {
    for host in hosts {
        apply_one(router, backend, bg, host, color).await?;
    }
    Ok(())
}

/// The weight first: a server made ready for a 1% share never takes its
/// full weight for a moment.
async fn apply_one(
    router: &dyn Router,
    backend: &str,
    bg: &BlueGreenStage,
    host: &str,
    color: Color,
) -> Result<(), RouterError> {
    let Some(intent) = bg.intended(host).into_iter().find(|i| i.color == color) else {
        return Ok(()); // the host does not run that color (host groups)
    };
    if let Some(weight) = intent.weight {
        router.set_weight(backend, &intent.server, weight).await?;
    }
    router
        .set_state(backend, &intent.server, intent.state)
        .await
}

/// Each of `servers` in `backend`, before and after.
pub(super) fn changes(
    backend: &str,
    servers: &[String],
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
    servers
        .iter()
        .cloned()
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
