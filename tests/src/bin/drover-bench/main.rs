//! `drover-bench fleet`: coordinator cost per connected agent.
//!
//! For each fleet size it starts a fresh coordinator and a `drover-fleetsim`
//! with that many virtual agents (one connection and stream each, one
//! heartbeat a second, phases spread), waits until all are connected, lets
//! them settle, and then over a measuring window reads from /proc the
//! coordinator's CPU time and resident memory and from its /metrics the
//! heartbeat rate and the heartbeat-to-registry lag histogram.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

mod canaries;
mod canary;
mod distribute;
mod ha;
mod judge;
mod trust;

use clap::{Parser, Subcommand};
use drover_tests::procstat::{cpu_seconds, rss_bytes};
use drover_tests::{ChildGuard, Coordinator, TestDir, bins, http_get, wait_until_ok};

#[derive(Parser)]
#[command(name = "drover-bench", about = "Drover benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Coordinator CPU, memory and heartbeat lag per connected agent.
    Fleet {
        /// Fleet sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        agents: Vec<usize>,
        /// Length of the measuring window.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Time between the last agent connecting and the window.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Transports to measure, each on a fresh coordinator: plain, tls (mutual TLS, a certificate per agent).
        #[arg(long, value_delimiter = ',', default_value = "plain,tls")]
        modes: Vec<String>,
    },
    /// A reconnect storm under mutual TLS: every simulated agent reconnects
    /// at once after a kill -9 and restart of the coordinator; time until
    /// all are back and the handshake rate.
    Storm {
        #[arg(long, default_value_t = 10000)]
        agents: usize,
    },
    /// Pull + verify + unpack of a large artifact over loopback, against
    /// sha256sum plus tar -xzf of the same file.
    Pull {
        /// Size of the incompressible payload, in MB.
        #[arg(long, default_value_t = 200)]
        size_mb: usize,
    },
    /// Rolling deploys through drover-fleetsim in 10% batches with zero
    /// settle time (orchestrator overhead end to end), and a rollback.
    Deploy {
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        hosts: Vec<usize>,
        /// Heartbeat interval of the simulated hosts (one gate sample waits one).
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        heartbeat: Duration,
    },
    /// Failover time: kill -9 of a shard leader mid-deploy until the deploy
    /// progresses under a new leader (etcd, three coordinators).
    Failover {
        #[arg(long, default_value_t = 20)]
        trials: usize,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 100)]
        hosts: usize,
    },
    /// etcd writes while agents are connected and nothing changes, and per
    /// deploy (etcd, three coordinators).
    EtcdWrites {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
    /// End to end on simulated hosts: detection time of a bad canary (3%
    /// errors; +50 ms), the share of requests it served, the coordinator's
    /// health-check latency meanwhile (exit 1 on a missed target).
    Canary {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        heartbeat: Duration,
    },
    /// Healthy canaries in a row on real agents and the sample service
    /// (random errors on both sides): false failures against alpha (exit 1
    /// when over it plus its margin).
    Canaries {
        #[arg(long, default_value_t = 100)]
        runs: usize,
        #[arg(long, default_value_t = 3000)]
        bake_ms: u32,
    },
    /// The canary judge alone over many simulated bakes with random
    /// traffic: false alarms, detection, the bad canary's share, CPU.
    Judge {
        #[arg(long, default_value_t = 500)]
        runs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Artifact distribution over network namespaces with tc-capped
    /// links: every host from the origin, then by chunks from peers, then
    /// a one-file change (exit 1 on a missed target).
    Distribute {
        #[arg(long, default_value_t = 50)]
        agents: usize,
        /// Artifact size: this many 1 MiB incompressible files.
        #[arg(long, default_value_t = 200)]
        size_mb: usize,
        /// The origin's uplink.
        #[arg(long, default_value_t = 1000)]
        origin_mbit: u32,
        /// Each agent's uplink (and its --peer-upload-bytes-per-sec).
        #[arg(long, default_value_t = 1000)]
        agent_mbit: u32,
    },
    /// An idle agent's CPU and memory at one heartbeat a second.
    AgentIdle {
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
}

struct Scrape {
    heartbeats: f64,
    connected: f64,
    /// Lag histogram: upper bound (seconds) -> cumulative count.
    lag_buckets: BTreeMap<u64, (f64, f64)>,
}

async fn scrape(coord: &Coordinator) -> Scrape {
    let text = http_get(coord.metrics_addr, "/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("parsing /metrics");
    let mut out = Scrape {
        heartbeats: 0.0,
        connected: 0.0,
        lag_buckets: BTreeMap::new(),
    };
    for sample in parsed.samples {
        match (sample.metric.as_str(), sample.value) {
            (
                "drover_heartbeats_total",
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v),
            ) => out.heartbeats = v,
            ("drover_connected_agents", prometheus_parse::Value::Gauge(v)) => out.connected = v,
            ("drover_heartbeat_lag_seconds", prometheus_parse::Value::Histogram(buckets)) => {
                for b in buckets {
                    out.lag_buckets
                        .insert((b.less_than * 1e9) as u64, (b.less_than, b.count));
                }
            }
            _ => {}
        }
    }
    out
}

/// The q-quantile of the lag observations between two scrapes.
fn quantile(before: &Scrape, after: &Scrape, q: f64) -> f64 {
    let snapshot = |s: &Scrape| s.lag_buckets.values().copied().collect::<Vec<_>>();
    let window = drover_common::histogram::delta(&snapshot(before), &snapshot(after));
    drover_common::histogram::quantile(&window, q).unwrap_or(f64::NAN)
}

async fn fleet(agents: usize, window: Duration, settle: Duration, tls: bool) {
    let dir = TestDir::new();
    let pki = drover_tests::pki::Pki::new(&dir);
    let coord = if tls {
        Coordinator::start_tls(&dir, "coord", &pki, &["--log-format", "json"]).await
    } else {
        Coordinator::start(&dir, "coord", &["--log-format", "json"]).await
    };
    let pid = coord.child.pid();
    let rss_idle = rss_bytes(pid);
    let mut cmd = Command::new(bins::bin("drover-fleetsim"));
    if tls {
        cmd.arg("--tls-ca-dir").arg(&pki.dir);
    }
    cmd.args([
        "--coordinator",
        &coord.addr_arg(),
        "--hosts",
        &agents.to_string(),
    ])
    .args([
        "--heartbeat-interval",
        "1s",
        "--connect-rate",
        "2000",
        "--reconnect-max",
        "5s",
    ]);
    let sim = ChildGuard::spawn("fleetsim", cmd, &dir.path().join("fleetsim.log"));
    let started = Instant::now();
    wait_until_ok(
        "every simulated agent connected",
        Duration::from_secs(120),
        || async { scrape(&coord).await.connected as usize == agents },
    )
    .await;
    let connect_time = started.elapsed();
    tokio::time::sleep(settle).await;

    let before = scrape(&coord).await;
    let cpu_before = cpu_seconds(pid);
    let sim_cpu_before = cpu_seconds(sim.pid());
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu_before) / elapsed;
    let sim_cpu = (cpu_seconds(sim.pid()) - sim_cpu_before) / elapsed;
    let after = scrape(&coord).await;
    let rss = rss_bytes(pid);
    assert_eq!(
        after.connected as usize, agents,
        "agents stayed connected through the window"
    );

    let rate = (after.heartbeats - before.heartbeats) / elapsed;
    let per_agent_kib = (rss.saturating_sub(rss_idle)) as f64 / agents as f64 / 1024.0;
    let p50 = quantile(&before, &after, 0.50) * 1e3;
    let p99 = quantile(&before, &after, 0.99) * 1e3;
    println!(
        "{:<5} agents={agents:>6}  connect_all={:>5.1}s  heartbeats/s={rate:>8.0}  coordinator_cpu={:>5.1}% of one core  \
         rss={:>6.1} MiB (idle {:.1} MiB)  per_agent={per_agent_kib:>5.1} KiB  lag_p50={p50:.2}ms  lag_p99={p99:.2}ms  \
         (fleetsim cpu {:.0}% of one core)",
        if tls { "mTLS" } else { "plain" },
        connect_time.as_secs_f64(),
        cpu * 100.0,
        rss as f64 / (1 << 20) as f64,
        rss_idle as f64 / (1 << 20) as f64,
        sim_cpu * 100.0,
    );
}

/// Runs a shell command and returns its wall time in seconds.
fn timed(program: &str, args: &[&str]) -> f64 {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
    started.elapsed().as_secs_f64()
}

async fn pull(size_mb: usize) {
    use drover_common::artifact::build::ArchiveBuilder;
    use drover_tests::commands::{cmd, pull, verify};
    let dir = TestDir::new();
    let payload = drover_tests::artifacts::noise(size_mb * 1_000_000);
    let bytes = ArchiveBuilder::in_memory()
        .file(
            "drover.toml",
            drover_tests::artifacts::sample_manifest("bench", "big", &[]).as_bytes(),
        )
        .file("data/payload", &payload)
        .finish();
    drop(payload);
    let artifact = drover_tests::artifacts::write(dir.path(), "big.tar.gz", bytes);
    let path = artifact.path.to_str().expect("utf-8 path").to_string();
    println!("artifact: {:.1} MB", artifact.size as f64 / 1e6);

    // sha256: ours against sha256sum, on the same (page-cached) file.
    let _ = timed("sha256sum", &[&path]);
    let sha256sum = timed("sha256sum", &[&path]);
    let started = Instant::now();
    drover_common::artifact::Digest::of_file(&artifact.path).expect("hashing");
    let ours = started.elapsed().as_secs_f64();
    let mb = artifact.size as f64 / 1e6;
    println!(
        "sha256: drover {:.0} MB/s, sha256sum {:.0} MB/s (ratio {:.2})",
        mb / ours,
        mb / sha256sum,
        sha256sum / ours
    );
    let untar_dir = dir.sub("untar");
    let tar = timed("tar", &["-xzf", &path, "-C", untar_dir.to_str().unwrap()]);
    let baseline = sha256sum + tar;

    let coord = Coordinator::start(&dir, "coord", &["--max-message-bytes", "4194304"]).await;
    coord.push(&artifact.path, "bench", "big");
    let agent =
        drover_tests::Agent::start(&dir, "bench-1", &[&coord], &["--heartbeat-interval", "1s"]);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("bench-1").await.is_ok()
    })
    .await;
    let started = Instant::now();
    let update = coord
        .send("bench-1", cmd("pull", 1, pull("bench", &artifact.digest)))
        .await
        .expect("pull");
    let pull_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        update.status(),
        drover_common::proto::CommandStatus::Succeeded,
        "{update:?}"
    );
    let started = Instant::now();
    let update = coord
        .send(
            "bench-1",
            cmd("verify", 1, verify("bench", &artifact.digest)),
        )
        .await
        .expect("verify");
    let verify_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        update.status(),
        drover_common::proto::CommandStatus::Succeeded,
        "{update:?}"
    );
    drop(agent);
    println!(
        "pull (download + sha256 + unpack) {pull_secs:.2}s, verify (re-hash + manifest) {verify_secs:.2}s; \
         sha256sum {sha256sum:.2}s + tar -xzf {tar:.2}s = {baseline:.2}s; \
         ratio pull/baseline {:.2}, (pull+verify)/baseline {:.2}",
        pull_secs / baseline,
        (pull_secs + verify_secs) / baseline
    );
}

async fn agent_idle(window: Duration) {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let agent =
        drover_tests::Agent::start(&dir, "idle-1", &[&coord], &["--heartbeat-interval", "1s"]);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord
            .host("idle-1")
            .await
            .is_ok_and(|h| h.heartbeat_sequence >= 3)
    })
    .await;
    let pid = agent.child.pid();
    let cpu_before = cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = (cpu_seconds(pid) - cpu_before) / t0.elapsed().as_secs_f64();
    println!(
        "idle agent at 1 heartbeat/s: cpu {:.3}% of one core, rss {:.1} MiB",
        cpu * 100.0,
        rss_bytes(pid) as f64 / (1 << 20) as f64
    );
}

/// Follows a deploy to its end; returns its final phase.
async fn wait_deploy(coord: &Coordinator, id: &str) -> drover_common::proto::DeployPhase {
    use drover_common::proto::DeployPhase as P;
    let mut client =
        drover_common::proto::deployer_client::DeployerClient::new(coord.channel().await)
            .max_decoding_message_size(64 << 20);
    let mut stream = client
        .watch_deploy(drover_common::proto::DeployRef {
            id: id.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut last = P::Unspecified;
    while let Some(event) = stream.message().await.expect("watch stream") {
        if let Some(d) = event.deploy {
            last = d.phase();
            if last.is_terminal() {
                break;
            }
        }
    }
    last
}

/// The stage every deploy benchmark rolls: all hosts labelled env=prod,
/// zero settle time, a gate of one sample (orchestrator overhead only).
fn bench_stage(batch_percent: u32, max_unavailable: u32) -> drover_common::proto::Stage {
    use drover_common::proto::{HealthGate, InconclusivePolicy, Stage};
    Stage {
        name: "prod".into(),
        selector: "env=prod".into(),
        batch_percent,
        max_unavailable,
        settle_ms: 0,
        stuck_timeout_ms: 60_000,
        gate: Some(HealthGate {
            samples: 1,
            bad_samples: 1,
            min_requests: 1,
            inconclusive: InconclusivePolicy::Pass as i32,
            max_error_rate: 0.05,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn deploy_bench(hosts: usize, heartbeat: Duration) {
    use drover_common::proto::{CreatePipelineRequest, DeployRef, Pipeline, StartDeployRequest};
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &["--log-format", "json"]).await;
    let mut cmd = Command::new(bins::bin("drover-fleetsim"));
    cmd.args([
        "--coordinator",
        &coord.addr_arg(),
        "--hosts",
        &hosts.to_string(),
        "--label",
        "env=prod",
    ])
    .args([
        "--heartbeat-interval",
        &format!("{}ms", heartbeat.as_millis()),
        "--connect-rate",
        "2000",
    ]);
    let _sim = ChildGuard::spawn("fleetsim", cmd, &dir.path().join("fleetsim.log"));
    wait_until_ok(
        "every simulated host connected",
        Duration::from_secs(120),
        || async { scrape(&coord).await.connected as usize == hosts },
    )
    .await;
    let v1 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v1", &[]);
    let v2 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v2", &[]);
    coord.push(&v1.path, "hello", "v1");
    coord.push(&v2.path, "hello", "v2");
    let mut api = drover_common::proto::deployer_client::DeployerClient::new(coord.channel().await)
        .max_decoding_message_size(64 << 20);
    let batch = (hosts / 10).max(1) as u32;
    let pipeline = Pipeline {
        name: "bench".into(),
        service: "hello".into(),
        stages: vec![bench_stage(10, batch)],
        ..Default::default()
    };
    api.create_pipeline(CreatePipelineRequest {
        pipeline: Some(pipeline),
    })
    .await
    .expect("pipeline");
    let run = |artifact: String| {
        let mut api = api.clone();
        async move {
            let started = Instant::now();
            let d = api
                .start_deploy(StartDeployRequest {
                    pipeline: "bench".into(),
                    artifact,
                    ..Default::default()
                })
                .await
                .expect("start")
                .into_inner();
            (d.id, started)
        }
    };
    let (id1, t1) = run(v1.digest.clone()).await;
    let phase = wait_deploy(&coord, &id1).await;
    let first = t1.elapsed();
    let (id2, t2) = run(v2.digest.clone()).await;
    let phase2 = wait_deploy(&coord, &id2).await;
    let second = t2.elapsed();
    let t3 = Instant::now();
    api.rollback_deploy(DeployRef {
        id: id2.clone(),
        requester: "bench".into(),
        ..Default::default()
    })
    .await
    .expect("rollback");
    let phase3 = wait_deploy(&coord, &id2).await;
    let rollback = t3.elapsed();
    let writes = api
        .get_deploy(DeployRef {
            id: id2,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
        .store_writes;
    println!(
        "hosts={hosts:>6} batches=10 ({batch} hosts each): first deploy {:.2}s ({phase:?}), upgrade {:.2}s ({phase2:?}), \
         rollback of all {hosts} hosts {:.2}s ({phase3:?}); {writes} store writes for the upgrade and its rollback",
        first.as_secs_f64(),
        second.as_secs_f64(),
        rollback.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    match Cli::parse().bench {
        Bench::Deploy { hosts, heartbeat } => {
            println!(
                "deploy benchmark: {} cores, simulated heartbeat {heartbeat:?}",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0)
            );
            for n in hosts {
                deploy_bench(n, heartbeat).await;
            }
        }
        Bench::Pull { size_mb } => pull(size_mb).await,
        Bench::Distribute {
            agents,
            size_mb,
            origin_mbit,
            agent_mbit,
        } => {
            if !distribute::distribute(agents, size_mb, origin_mbit, agent_mbit).await {
                std::process::exit(1);
            }
        }
        Bench::Canary { hosts, heartbeat } => {
            if !canary::canary(hosts, heartbeat).await {
                std::process::exit(1);
            }
        }
        Bench::Canaries { runs, bake_ms } => {
            if !canaries::canaries(runs, bake_ms).await {
                std::process::exit(1);
            }
        }
        Bench::Judge { runs, seed } => {
            if !judge::judge_bench(runs, seed) {
                std::process::exit(1);
            }
        }
        Bench::Failover { trials, ttl, hosts } => ha::failover(trials, ttl, hosts).await,
        Bench::EtcdWrites { agents, window } => ha::etcd_writes(agents, window).await,
        Bench::AgentIdle { window } => agent_idle(window).await,
        Bench::Storm { agents } => trust::storm(agents).await,
        Bench::Fleet {
            agents,
            window,
            settle,
            modes,
        } => {
            println!(
                "fleet benchmark: {} cores, window {window:?}, settle {settle:?}",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0)
            );
            for n in agents {
                for mode in &modes {
                    fleet(n, window, settle, mode == "tls").await;
                }
            }
        }
    }
}
