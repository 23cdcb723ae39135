//! Judging a flag change as a canary is judged (`deploy::analysis`): the
//! hosts the flag is on for against the eligible hosts it is off for.
//!
//! 1. The leader of the flag's pipeline's shard bakes every setting that
//!    asks for an analysis, is on for some eligible hosts and off for
//!    others (0 < percent < 100), and has no verdict yet: from when it was
//!    set, for its `bake_ms` (default 60 s).
//! 2. Each eligible host's heartbeat intervals after the change are folded
//!    into its side of a `Window` (on: the canary side, off: the
//!    baseline); the first heartbeat seen of a host and the one after it
//!    (which may straddle the change) are skipped.
//! 3. At the end, one look with the analysis's whole alpha. FAIL, or
//!    INCONCLUSIVE when the analysis says to fail on too little evidence:
//!    the verdict is recorded and the flag rolled back by drover (audited
//!    with the reason; the setting it returns to keeps the verdict, so it
//!    says why it is back and is not judged again). Otherwise the verdict
//!    is recorded and the flag stays.
//! 4. A newer setting ends the bake of the older; a new leader bakes from
//!    its own first look (the evidence is not kept across a failover).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{AnalysisVerdict, FlagRef, FlagState, InconclusiveAction};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Flags, key_of};
use crate::deploy::analysis::{self, Interval, Look, Side, Window};
use crate::deploy::pipeline::analysis_defaults;
use crate::ha::leases::ShardLeases;
use crate::ha::shards::shard_of;

/// The actor of an automatic rollback.
pub const JUDGE: &str = "drover (flag analysis)";

/// Rule 1: whether `s` waits for a judgement.
pub fn wants_judgement(s: &FlagState) -> bool {
    s.flag
        .as_ref()
        .is_some_and(|f| f.analysis.is_some() && f.percent > 0 && f.percent < 100)
        && s.verdict() == AnalysisVerdict::Unspecified
}

/// Rule 1, on every coordinator: bakes the settings of the shards it leads.
pub async fn judge_forever(flags: Arc<Flags>, leases: Arc<ShardLeases>, stop: CancellationToken) {
    // (flag, the setting's time) being baked here.
    let running: Arc<std::sync::Mutex<HashSet<(super::assign::FlagKey, u64)>>> = Arc::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Ok(states) = flags.all().await else {
            continue;
        };
        for s in states.into_iter().filter(wants_judgement) {
            if leases
                .leadership(shard_of(&s.pipeline, leases.shards))
                .is_none()
            {
                continue;
            }
            let at = s.flag.as_ref().map_or(0, |f| f.updated_at_unix_ms);
            let id = (key_of(&s), at);
            if !running.lock().expect("running lock").insert(id.clone()) {
                continue;
            }
            let (flags, running) = (flags.clone(), running.clone());
            tokio::spawn(async move {
                if let Err(e) = bake(&flags, s).await {
                    warn!(error = %e, "a flag's judgement stopped");
                }
                running.lock().expect("running lock").remove(&id);
            });
        }
    }
}

/// Rules 2 and 3 for one setting.
async fn bake(
    flags: &Flags,
    state: FlagState,
) -> Result<(), crate::deploy::deployments::DeployError> {
    let flag = state.flag.clone().unwrap_or_default();
    let mut a = flag.analysis.clone().unwrap_or_default();
    analysis_defaults(&mut a);
    let bake_ms = if flag.bake_ms == 0 {
        60_000
    } else {
        u64::from(flag.bake_ms)
    };
    let end = flag.updated_at_unix_ms + bake_ms;
    let service = flags.service_of(&state.pipeline).await?;
    let key = key_of(&state);
    let mut window = Window::default();
    // Per host: the first heartbeat seen, and the last taken.
    let mut seen: HashMap<String, (u64, u64)> = HashMap::new();
    info!(flag = %flag.name, pipeline = %state.pipeline, environment = %state.environment, bake_ms, "judging a flag change");
    while flags.ledger().now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(now) = flags.get(&key).await? else {
            return Ok(()); // gone
        };
        if now.flag.as_ref().map(|f| f.updated_at_unix_ms) != Some(flag.updated_at_unix_ms) {
            return Ok(()); // a newer setting (rule 4)
        }
        let assigned = flags.assignment(std::slice::from_ref(&now)).await?;
        for (host, on) in assigned.eligible.get(&key).into_iter().flatten() {
            let Some(h) = flags.registry().get(host) else {
                continue;
            };
            let Some(health) = h.health.into_iter().find(|x| x.service == service) else {
                continue;
            };
            let seq = h.heartbeat_sequence;
            let (first, last) = seen.entry(host.clone()).or_insert((seq, seq));
            if seq <= *last || seq <= *first + 1 {
                *last = (*last).max(seq);
                continue;
            }
            *last = seq;
            let side = if *on { Side::Canary } else { Side::Baseline };
            window.add(side, host, &Interval::from(health));
        }
    }
    let judgement = analysis::judge(&a, &window, Look { alpha: a.alpha });
    let fail = judgement.verdict == AnalysisVerdict::Fail
        || (judgement.verdict == AnalysisVerdict::Inconclusive
            && a.inconclusive() == InconclusiveAction::Fail);
    info!(flag = %flag.name, verdict = ?judgement.verdict, reason = %judgement.reason, "flag judged");
    if !flags
        .judged(&state, judgement.verdict, &judgement.reason)
        .await?
    {
        return Ok(()); // changed meanwhile
    }
    if fail {
        flags
            .rollback_because(
                FlagRef {
                    pipeline: state.pipeline.clone(),
                    environment: state.environment.clone(),
                    name: flag.name.clone(),
                    requester: String::new(),
                },
                JUDGE,
                Some((judgement.verdict, judgement.reason.clone())),
            )
            .await?;
    }
    Ok(())
}
