//! A host's traffic around its restart, when its stage names a router
//! (`Stage.router`): the host's server (named as the host) is
//!
//! 1. drained first: no new requests go to it;
//! 2. waited on until its requests in flight are done, at most the
//!    stage's `drain_timeout_ms` (default 10 s; past it the restart goes
//!    ahead, and the wait is logged);
//! 3. restarted (the batch's own step);
//! 4. made ready again only once its restart succeeded: a host that failed
//!    stays drained, so no traffic goes to a release that is not ready.
//!
//! A router error before the restart fails the host (its process is not
//! touched, its traffic stays where it was); one after it fails the host
//! too, saying the server is still drained.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::RouterTarget;
use tracing::{info, warn};

use crate::router::{Router, ServerState};

/// Default of `RouterTarget.drain_timeout_ms`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often requests in flight are asked for while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The router a stage names, as the driver got it (or why not).
pub(super) type StageRouter = Option<(Result<Arc<dyn Router>, String>, RouterTarget)>;

/// Runs `restart` of `host` within the rules when the stage names a
/// router (rules 1, 2, then 3 = `restart`, then 4), else on its own.
pub(super) async fn around<F>(router: StageRouter, host: &str, restart: F) -> Result<(), String>
where
    F: Future<Output = Result<(), String>>,
{
    let router = match router {
        Some((Ok(r), t)) => Some((r, t)),
        Some((Err(e), _)) => return Err(format!("router: {e}")),
        None => None,
    };
    if let Some((r, t)) = &router {
        drain(r.as_ref(), t, host).await?;
    }
    restart.await?;
    match &router {
        Some((r, t)) => ready(r.as_ref(), t, host).await,
        None => Ok(()),
    }
}

/// Rules 1 and 2 for `server`.
pub(super) async fn drain(
    router: &dyn Router,
    target: &RouterTarget,
    server: &str,
) -> Result<(), String> {
    let backend = &target.backend;
    router
        .set_state(backend, server, ServerState::Drain)
        .await
        .map_err(|e| format!("router: draining before the restart: {e}"))?;
    let limit = match target.drain_timeout_ms {
        0 => DRAIN_TIMEOUT,
        ms => Duration::from_millis(ms.into()),
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = router
            .in_flight(backend, server)
            .await
            .map_err(|e| format!("router: reading requests in flight: {e}"))?;
        if left == 0 {
            info!(backend, server, "drained");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                backend,
                server,
                left,
                ?limit,
                "requests still in flight after the drain timeout; restarting anyway"
            );
            return Ok(());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Rule 4 for `server`.
async fn ready(router: &dyn Router, target: &RouterTarget, server: &str) -> Result<(), String> {
    router
        .set_state(&target.backend, server, ServerState::Ready)
        .await
        .map_err(|e| format!("router: restarted, but still drained: {e}"))
}
