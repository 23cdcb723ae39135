//! `drover-load`: steady HTTP load against a service, so the error rates and
//! latencies tests and demos look at come from real requests.
//!
//! `drover-load --url http://127.0.0.1:8081/ --rps 50 --duration 10s`
//! prints one line per second and a summary: requests by status, p50/p99.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "drover-load",
    about = "Steady HTTP GET load for Drover tests and demos"
)]
struct Args {
    /// Target: http://HOST:PORT/PATH (an IP address).
    #[arg(long)]
    url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 20)]
    rps: u32,
    /// How long to run (default: until killed).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url must start with http://"))?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr: SocketAddr = authority
        .parse()
        .map_err(|e| anyhow::anyhow!("{authority}: {e} (use IP:PORT)"))?;
    anyhow::ensure!(args.rps > 0, "--rps must be at least 1");
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rps);
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Duration)>();
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if args.duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let tx = tx.clone();
                let path = path.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let status = match drover_tests::http_get_status(addr, &path).await {
                        Ok((code, _)) => code.to_string(),
                        Err(_) => "error".to_string(),
                    };
                    let _ = tx.send((status, t0.elapsed()));
                });
            }
            Some((status, took)) = rx.recv() => {
                *by_status.entry(status).or_default() += 1;
                latencies.push(took);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            println!("{:>5.1}s {by_status:?}", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    drop(tx);
    while let Some((status, took)) = rx.recv().await {
        *by_status.entry(status).or_default() += 1;
        latencies.push(took);
    }
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
    };
    println!(
        "total {} requests {by_status:?} p50 {:?} p99 {:?}",
        latencies.len(),
        pick(0.5).copied().unwrap_or_default(),
        pick(0.99).copied().unwrap_or_default()
    );
    Ok(())
}
