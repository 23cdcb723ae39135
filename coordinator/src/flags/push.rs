//! Keeping every connected host's flags current: on each change of the
//! stored flags (a store watch, so within moments of a SetFlag) and every
//! second (hosts that connected, pipelines whose selectors changed), the
//! flags are assigned again and each host whose set differs from what its
//! stream was last sent gets a `HostFlags` (which replaces its earlier set).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{ConnectionState, CoordinatorMessage, HostFlags, coordinator_message};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Flags;

pub async fn keep_hosts_current(flags: Arc<Flags>, stop: CancellationToken) {
    // Per host: the stream it was sent on (when it connected) and what.
    let mut sent: HashMap<String, (u64, HostFlags)> = HashMap::new();
    let mut changes = None;
    loop {
        if changes.is_none() {
            changes = flags
                .ledger()
                .store()
                .watch(&flags.ledger().keys().flags())
                .await
                .ok();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            change = async {
                match changes.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if !matches!(change, Some(Ok(_))) {
                    changes = None; // ended or fell behind: watch again
                }
            }
        }
        let assigned = match flags.all().await {
            Ok(states) => flags.assignment(&states).await,
            Err(e) => Err(e),
        };
        let assigned = match assigned {
            Ok(a) => a.per_host,
            Err(e) => {
                warn!(error = %e, "cannot assign feature flags; trying again");
                continue;
            }
        };
        let registry = flags.registry();
        let connected = registry.list(&Default::default());
        sent.retain(|host, _| connected.iter().any(|h| &h.host_id == host));
        for host in connected {
            if host.state() != ConnectionState::Connected && host.state() != ConnectionState::Late {
                continue;
            }
            let now = assigned.get(&host.host_id).cloned().unwrap_or_default();
            let stream = host.connected_at_unix_ms;
            if sent.get(&host.host_id) == Some(&(stream, now.clone())) {
                continue;
            }
            let message = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Flags(now.clone())),
            };
            if registry.send_to(&host.host_id, message) {
                sent.insert(host.host_id.clone(), (stream, now));
            }
        }
    }
}
