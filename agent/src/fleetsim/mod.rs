//! `drover-fleetsim`: many virtual agents in one process. Each has its own
//! gRPC connection and stream per coordinator, its own Hello and its own
//! heartbeat producer (phases spread over the interval, as in a real fleet),
//! so the coordinator does exactly the work a real fleet would cause. The
//! services they "run" serve random traffic (`traffic.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::Parser;
use drover_common::logging::LogFormat;
use drover_common::proto::{AgentMessage, Command, CommandStatus, Hello, HostMetrics, ShardEpoch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::connection::{Backoff, CommandSink, Connection, FenceSink, HelloSource};
use crate::heartbeat;

pub mod traffic;

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
    /// How long a virtual agent takes to execute a command.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub command_delay: Duration,
    /// Share of commands (0.0 to 1.0) that fail, chosen by command id so a
    /// re-sent command gets the same answer.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Requests each simulated service serves per heartbeat interval, on
    /// average (drawn at random: Poisson).
    #[arg(long, default_value_t = 100)]
    pub requests_per_interval: u64,
    /// The error rate of every release not named by --error-rate-of
    /// (each request an error at random, times the host's own offset).
    #[arg(long, default_value_t = 0.001)]
    pub error_rate: f64,
    /// SHA256=RATE: hosts running that artifact answer this share of
    /// requests with errors (a bad version). Repeatable.
    #[arg(long = "error-rate-of", value_parser = parse_error_rate)]
    pub error_rates: Vec<(String, f64)>,
    /// Median p99 latency (ms) of a release (lognormal draws around it,
    /// times the host's own offset).
    #[arg(long, default_value_t = 20.0)]
    pub p99_ms: f64,
    /// SHA256=MS: that artifact's p99 is this much slower. Repeatable.
    #[arg(long = "latency-of", value_parser = parse_latency)]
    pub latency_of: Vec<(String, f64)>,
    /// How much hosts differ from each other (lognormal sigma of their
    /// latency and error offsets).
    #[arg(long, default_value_t = 0.1)]
    pub host_spread: f64,
    /// A release just started runs cold this long (twice the latency,
    /// three times the errors at first, fading out).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Seed of the random traffic (default: the clock; logged).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Writes the requests served per artifact so far (JSON, rewritten
    /// every 100 ms) to this file, to measure what a bad version served.
    #[arg(long)]
    pub served_file: Option<std::path::PathBuf>,
    /// A CA directory (`droverctl ca init`): every virtual agent gets its
    /// own agent certificate from it (made in memory) and connects with
    /// mutual TLS, as a real one does.
    #[arg(long)]
    pub tls_ca_dir: Option<std::path::PathBuf>,
}

fn parse_latency(s: &str) -> Result<(String, f64), String> {
    let (sha, ms) = s.split_once('=').ok_or("expected SHA256=MS")?;
    let ms: f64 = ms.parse().map_err(|e| format!("milliseconds: {e}"))?;
    if !(0.0..=600_000.0).contains(&ms) {
        return Err("milliseconds must be between 0 and 600000".into());
    }
    Ok((sha.to_string(), ms))
}

fn parse_error_rate(s: &str) -> Result<(String, f64), String> {
    let (sha, rate) = s.split_once('=').ok_or("expected SHA256=RATE")?;
    let rate: f64 = rate.parse().map_err(|e| format!("rate: {e}"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err("rate must be between 0 and 1".into());
    }
    Ok((sha.to_string(), rate))
}

/// A virtual agent's highest epoch per shard (shared by its connections).
type Epochs = Arc<std::sync::Mutex<HashMap<u32, u64>>>;

/// Raises a virtual agent's epochs on Welcome and Fence, as a real agent does.
fn simulated_fence(epochs: Epochs) -> FenceSink {
    Arc::new(move |raised: &[ShardEpoch]| {
        let mut epochs = epochs.lock().expect("epochs lock");
        for e in raised {
            let highest = epochs.entry(e.shard).or_insert(0);
            *highest = (*highest).max(e.epoch);
        }
        true
    })
}

/// What a virtual agent "runs": service → its releases.
type Services = Arc<std::sync::Mutex<HashMap<String, Running>>>;

/// A simulated service's releases.
#[derive(Debug, Clone, Default)]
struct Running {
    current: String,
    previous: String,
    /// When `current` started (its warm-up counts from here).
    since: Option<std::time::Instant>,
}

impl Running {
    fn switch(&mut self, to: String) {
        if self.current != to {
            self.previous = std::mem::replace(&mut self.current, to);
            self.since = Some(std::time::Instant::now());
        }
    }
}

/// A virtual agent's command executor: fenced by epoch like a real one,
/// answers after `delay`, fails a deterministic share of commands, and
/// switches its simulated services on Restart and Rollback.
fn simulated_commands(
    delay: Duration,
    failure_rate: f64,
    services: Services,
    epochs: Epochs,
) -> CommandSink {
    Arc::new(
        move |cmd: Command, reply: tokio::sync::mpsc::Sender<AgentMessage>| {
            let epochs = epochs.clone();
            let services = services.clone();
            tokio::spawn(async move {
                let update = |status: CommandStatus, reason: &str| cmd.update(status, reason, "");
                let stale = {
                    let mut epochs = epochs.lock().expect("epochs lock");
                    let highest = epochs.entry(cmd.shard).or_insert(0);
                    let stale = cmd.epoch < *highest;
                    *highest = (*highest).max(cmd.epoch);
                    stale
                };
                if stale {
                    let _ = reply
                        .send(update(CommandStatus::RejectedStale, "stale epoch"))
                        .await;
                    return;
                }
                let _ = reply.send(update(CommandStatus::Accepted, "")).await;
                tokio::time::sleep(delay).await;
                // Stable per command id: a re-sent command gets the same answer.
                let mut h = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&cmd.command_id, &mut h);
                let roll = (std::hash::Hasher::finish(&h) % 10_000) as f64 / 10_000.0;
                let final_update = if roll < failure_rate {
                    update(CommandStatus::Failed, "simulated failure")
                } else {
                    let mut running = services.lock().expect("services lock");
                    match &cmd.action {
                        Some(drover_common::proto::command::Action::Restart(r)) => {
                            running
                                .entry(r.service.clone())
                                .or_default()
                                .switch(r.artifact.clone());
                        }
                        Some(drover_common::proto::command::Action::Rollback(r)) => {
                            let entry = running.entry(r.service.clone()).or_default();
                            let target = if r.artifact.is_empty() {
                                entry.previous.clone()
                            } else {
                                r.artifact.clone()
                            };
                            entry.switch(target);
                        }
                        _ => {}
                    }
                    update(CommandStatus::Succeeded, "simulated")
                };
                let _ = reply.send(final_update).await;
            });
        },
    )
}

/// A virtual agent's heartbeat: synthetic host figures, and every service
/// it "runs" serving random traffic at its current release (traffic.rs).
fn simulated_sample(
    index: usize,
    sequence: &mut u64,
    host: &mut traffic::Host,
    services: &Services,
    model: &traffic::Model,
    interval_ms: u32,
) -> heartbeat::Sample {
    let running = services.lock().expect("services lock");
    let started = std::time::Instant::now();
    heartbeat::Sample {
        host: synthetic_metrics(index, sequence),
        health: running
            .iter()
            .map(|(service, r)| {
                let i = host.interval_after(
                    model,
                    (&r.current, &r.previous),
                    r.since.unwrap_or(started),
                    std::time::Duration::from_millis(interval_ms.into()),
                );
                i.health(service, interval_ms)
            })
            .collect(),
        versions: running
            .iter()
            .map(|(service, r)| drover_common::proto::ServiceVersion {
                service: service.clone(),
                current_artifact: r.current.clone(),
                previous_artifact: r.previous.clone(),
                current_since_unix_ms: 0,
                slot: 0,
                config: String::new(),
            })
            .collect(),
        problems: Vec::new(),
        held_artifacts: Vec::new(),
    }
}

/// How often `--served-file` is rewritten.
const SERVED_EVERY: Duration = Duration::from_millis(100);

/// Rewrites `path` with the requests served per artifact every 100 ms
/// (temp file + rename: a reader never sees half of it).
async fn write_served(
    path: std::path::PathBuf,
    served: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    shutdown: CancellationToken,
) {
    loop {
        let snapshot = served.lock().expect("served lock").clone();
        let tmp = path.with_extension("tmp");
        if let Ok(json) = serde_json::to_vec(&snapshot)
            && std::fs::write(&tmp, json).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SERVED_EVERY) => {}
        }
    }
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
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.failure_rate),
        "--failure-rate must be between 0 and 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.error_rate),
        "--error-rate must be between 0 and 1"
    );
    anyhow::ensure!(
        args.host_spread >= 0.0 && args.p99_ms > 0.0,
        "--host-spread must be at least 0 and --p99-ms above 0"
    );
    let model = traffic::Model {
        requests: args.requests_per_interval as f64,
        error_rate: args.error_rate,
        error_rates: args.error_rates.iter().cloned().collect(),
        p99_ms: args.p99_ms,
        latency_added: args.latency_of.iter().cloned().collect(),
        host_spread: args.host_spread,
        warmup: args.warmup,
        served: Arc::default(),
    };
    let seed = args.seed.unwrap_or_else(drover_common::time::now_unix_ms);
    info!(seed, "traffic drawn at random (--seed repeats a run)");
    if let Some(path) = args.served_file.clone() {
        tokio::spawn(write_served(path, model.served.clone(), shutdown.clone()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    let start_gap = Duration::from_secs(1) / args.connect_rate;
    let ca = match &args.tls_ca_dir {
        None => None,
        Some(dir) => {
            let (issuer, domain) = drover_common::tls::ca::load(dir)?;
            let ca_pem = std::fs::read_to_string(dir.join(drover_common::tls::ca::CA_CERT_FILE))?;
            Some((issuer, domain, ca_pem))
        }
    };
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
                ..Default::default()
            })
        };
        let phase = args
            .heartbeat_interval
            .mul_f64(index as f64 / args.hosts as f64);
        let mut sequence = 0u64;
        let mut host = traffic::Host::new(&model, seed, index);
        let services: Services = Arc::default();
        let running = services.clone();
        let interval_ms = args.heartbeat_interval.as_millis() as u32;
        let host_model = model.clone();
        let heartbeats = heartbeat::spawn_producer(
            args.heartbeat_interval,
            phase,
            16,
            move || {
                simulated_sample(
                    index,
                    &mut sequence,
                    &mut host,
                    &running,
                    &host_model,
                    interval_ms,
                )
            },
            shutdown.clone(),
        );
        let epochs: Epochs = Arc::default();
        let commands = simulated_commands(
            args.command_delay,
            args.failure_rate,
            services.clone(),
            epochs.clone(),
        );
        let fence = simulated_fence(epochs);
        let dialer = match &ca {
            None => drover_common::tls::client::Dialer::plaintext(),
            Some((issuer, domain, ca_pem)) => {
                let issued = drover_common::tls::ca::issue_with(
                    issuer,
                    domain,
                    &drover_common::tls::ca::IssueRequest {
                        kind: drover_common::tls::identity::Kind::Agent,
                        name: format!("{}-{index}", args.prefix),
                        groups: Vec::new(),
                        dns: Vec::new(),
                        ips: Vec::new(),
                        not_before: None,
                        lifetime: drover_common::tls::ca::DEFAULT_CERT_LIFETIME,
                    },
                )?;
                let config = drover_common::tls::client_config_from_pem(
                    &issued.cert_pem,
                    &issued.key_pem,
                    ca_pem,
                )?;
                drover_common::tls::client::Dialer::tls(drover_common::tls::ClientTls::fixed(
                    config,
                ))
            }
        };
        for coordinator in &args.coordinators {
            tasks.spawn(
                Connection {
                    coordinator: coordinator.clone(),
                    hello: hello.clone(),
                    heartbeats: heartbeats.clone(),
                    backoff,
                    shutdown: shutdown.clone(),
                    dropped: Arc::new(AtomicU64::new(0)),
                    commands: commands.clone(),
                    fence: fence.clone(),
                    cluster: Arc::new(|_, _| {}),
                    contact: Arc::default(),
                    report: Arc::new(|_| {}),
                    flags: Arc::new(|_| {}),
                    directory: None,
                    dialer: dialer.clone(),
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
