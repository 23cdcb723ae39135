//! `drover-fleetsim`: many virtual agents in one process. Each has its own
//! gRPC connection and stream per coordinator, its own Hello and its own
//! heartbeat producer (phases spread over the interval, as in a real fleet),
//! so the coordinator does exactly the work a real fleet would cause.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::Parser;
use drover_common::logging::LogFormat;
use drover_common::proto::{Hello, HostMetrics};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::connection::{Backoff, Connection, HelloSource};
use crate::heartbeat;

#[derive(Debug, Parser)]
#[command(
    name = "drover-fleetsim",
    version,
    about = "Simulate a fleet of Drover agents in one process"
)]
pub struct Args {
    /// Coordinator address. Repeat it for every coordinator.
    #[arg(long = "coordinator", required = true)]
    pub coordinators: Vec<String>,
    /// Number of virtual agents.
    #[arg(long, default_value_t = 100)]
    pub hosts: usize,
    /// Host ids are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// A label of every virtual host, key=value. Repeatable. Each host also
    /// gets `sim-index=<n>`.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Virtual agents started per second (a fleet does not boot at once).
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub reconnect_min: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,
    /// Stop after this long (default: run until SIGTERM/SIGINT).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    drover_common::labels::parse_label(s).map_err(|e| e.to_string())
}

/// Synthetic host figures: plausible and varying, cheap to produce.
fn synthetic_metrics(index: usize, sequence: &mut u64) -> HostMetrics {
    *sequence += 1;
    let wobble = ((*sequence as usize + index) % 20) as f64 / 100.0;
    HostMetrics {
        cpu_usage: 0.1 + wobble,
        cpu_cores: 8,
        load_average_1m: 0.8 + wobble,
        memory_total_bytes: 16 << 30,
        memory_used_bytes: (6 << 30) + (index as u64 % 1024) * (1 << 20),
        disk_total_bytes: 200 << 30,
        disk_available_bytes: 120 << 30,
    }
}

/// Runs the simulated fleet until `shutdown` (or `--duration`).
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(args.hosts > 0, "--hosts must be at least 1");
    anyhow::ensure!(args.connect_rate > 0, "--connect-rate must be at least 1");
    let base_labels: HashMap<String, String> = args.labels.iter().cloned().collect();
    let backoff = Backoff {
        min: args.reconnect_min,
        max: args.reconnect_max,
    };
    if let Some(d) = args.duration {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    let start_gap = Duration::from_secs(1) / args.connect_rate;
    let mut pacer = tokio::time::interval(start_gap.max(Duration::from_micros(1)));
    for index in 0..args.hosts {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = pacer.tick() => {}
        }
        let host_id = format!("{}-{index}", args.prefix);
        drover_common::ids::validate_host_id(&host_id)?;
        let mut labels = base_labels.clone();
        labels.insert("sim-index".into(), index.to_string());
        let hello: HelloSource = {
            let interval_ms = args.heartbeat_interval.as_millis() as u32;
            Arc::new(move || Hello {
                host_id: host_id.clone(),
                labels: labels.clone(),
                agent_version: format!("{}-sim", drover_common::VERSION),
                services: Vec::new(),
                heartbeat_interval_ms: interval_ms,
            })
        };
        let phase = args
            .heartbeat_interval
            .mul_f64(index as f64 / args.hosts as f64);
        let mut sequence = 0u64;
        let heartbeats = heartbeat::spawn_producer(
            args.heartbeat_interval,
            phase,
            16,
            move || (synthetic_metrics(index, &mut sequence), Vec::new()),
            shutdown.clone(),
        );
        for coordinator in &args.coordinators {
            tasks.spawn(
                Connection {
                    coordinator: coordinator.clone(),
                    hello: hello.clone(),
                    heartbeats: heartbeats.clone(),
                    backoff,
                    shutdown: shutdown.clone(),
                    dropped: Arc::new(AtomicU64::new(0)),
                }
                .run(),
            );
        }
    }
    info!(hosts = args.hosts, "all virtual agents started");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    info!("stopped");
    Ok(())
}
