//! The agent process: samples the host, produces heartbeats and keeps one
//! connection per coordinator until shutdown.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use drover_common::proto::Hello;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::connection::{Connection, HelloSource};
use crate::heartbeat;
use crate::host_metrics::HostSampler;

/// How long shutdown waits for every connection to say Goodbye.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let hello: HelloSource = {
        let cfg = cfg.clone();
        Arc::new(move || Hello {
            host_id: cfg.host_id.clone(),
            labels: cfg.labels.clone(),
            agent_version: drover_common::VERSION.to_string(),
            // Services and their releases arrive with the executor.
            services: Vec::new(),
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u32,
        })
    };
    let mut sampler = HostSampler::new(cfg.data_dir.clone())?;
    let heartbeats = heartbeat::spawn_producer(
        cfg.heartbeat_interval,
        cfg.heartbeat_interval,
        cfg.queue_capacity,
        move || (sampler.sample(), Vec::new()),
        shutdown.clone(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for coordinator in &cfg.coordinators {
        tasks.spawn(
            Connection {
                coordinator: coordinator.clone(),
                hello: hello.clone(),
                heartbeats: heartbeats.clone(),
                backoff: cfg.backoff,
                shutdown: shutdown.clone(),
                dropped: Arc::new(AtomicU64::new(0)),
            }
            .run(),
        );
    }
    info!(host_id = %cfg.host_id, coordinators = ?cfg.coordinators, "agent started");
    shutdown.cancelled().await;
    info!("shutting down: saying goodbye to every coordinator");
    if tokio::time::timeout(SHUTDOWN_WAIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!("some coordinators did not close their streams in time");
    }
    info!("stopped");
    Ok(())
}
