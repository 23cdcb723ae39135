//! `drover-sample`: the service the tests and the demo deploy. It serves
//! real HTTP and can be made bad on purpose, so every error rate, latency
//! and crash a test sees is real.
//!
//! - `GET /`: "hello from VERSION", or 503 for `--error-rate` of requests,
//!   after `--latency-ms`.
//! - `GET /healthz`: 200, or 503 with `--unready`.
//! - `GET /version`: the version label.
//! - `GET /metrics`: `http_requests_total{code}` and the
//!   `http_request_duration_seconds` histogram (OpenMetrics text).
//! - `GET /config`: what `--config` (a TOML file, the config bundle's
//!   document) gave it: `greeting`, `error_rate` (over `--error-rate`),
//!   whether `password` is set, how many times it was loaded, and the pid.
//!   It is read at start and again on SIGHUP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Parser, Debug)]
#[command(
    name = "drover-sample",
    about = "A sample service for Drover tests and demos"
)]
struct Args {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "v1")]
    version_label: String,
    /// Share of `/` requests answered 503 (spread evenly, unless
    /// --random-errors).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Each `/` request is an error with probability --error-rate, drawn at
    /// random (a real service's errors), not every 1/rate-th.
    #[arg(long)]
    random_errors: bool,
    /// Added to every `/` request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Exit with status 1 this many seconds after start.
    #[arg(long)]
    crash_after: Option<f64>,
    /// With --crash-after: crash on the first N starts only, then stay up;
    /// starts are counted in --crash-count-file.
    #[arg(long, requires = "crash_count_file")]
    crash_times: Option<u32>,
    /// Where --crash-times counts starts (one file per host).
    #[arg(long)]
    crash_count_file: Option<std::path::PathBuf>,
    /// /healthz answers 503.
    #[arg(long)]
    unready: bool,
    /// The value of the gauge `sample_queue_depth` (a metric of the
    /// service's own that canary analyses can name).
    #[arg(long, default_value_t = 0)]
    queue_depth: i64,
    /// /healthz answers 503 for this many seconds after start.
    #[arg(long)]
    ready_after: Option<f64>,
    /// NAME=RATE: while feature flag NAME is on ($DROVER_FLAGS_FILE, read
    /// at each request), RATE of `/` requests are errors instead of
    /// --error-rate (a feature that breaks the service when turned on).
    #[arg(long, value_parser = flag_errors)]
    flag_errors: Option<(String, f64)>,
    /// A TOML config (`greeting`, `error_rate`, `password`), read at
    /// start and on SIGHUP; absent or missing: the flags' values.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

/// What `--config` says.
#[derive(Debug, Default, Clone)]
struct SampleConfig {
    greeting: Option<String>,
    error_rate: Option<f64>,
    password_set: bool,
    /// Times `--config` was read (at start, on each SIGHUP), found or not.
    loaded: u64,
}

impl SampleConfig {
    /// Reads `path`; a missing file is no config, a bad one an error.
    fn read(path: &std::path::Path, loaded: u64) -> Result<SampleConfig, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SampleConfig {
                    loaded: loaded + 1,
                    ..Default::default()
                });
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let t: toml::Table = text
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(SampleConfig {
            greeting: t.get("greeting").and_then(|v| v.as_str()).map(String::from),
            error_rate: t.get("error_rate").and_then(|v| v.as_float()),
            password_set: t
                .get("password")
                .and_then(|v| v.as_str())
                .is_some_and(|p| !p.is_empty()),
            loaded: loaded + 1,
        })
    }
}

fn flag_errors(s: &str) -> Result<(String, f64), String> {
    let (name, rate) = s.split_once('=').ok_or("not NAME=RATE")?;
    Ok((name.to_string(), rate.parse().map_err(|e| format!("{e}"))?))
}

/// Whether feature flag `name` is on in the agent's flags file.
fn flag_on(name: &str) -> bool {
    std::env::var_os("DROVER_FLAGS_FILE")
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v["flags"][name].as_bool())
        .unwrap_or(false)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

struct App {
    args: Args,
    started: std::time::Instant,
    served: AtomicU64,
    /// Draws for --random-errors.
    rng: std::sync::Mutex<rand::rngs::SmallRng>,
    requests: Family<CodeLabel, Counter>,
    latency: Histogram,
    registry: Registry,
    config: std::sync::RwLock<SampleConfig>,
}

impl App {
    /// (Re)reads `--config`; a bad file keeps what was loaded before.
    fn load_config(&self) {
        let Some(path) = &self.args.config else {
            return;
        };
        let before = self.config.read().expect("config lock").loaded;
        match SampleConfig::read(path, before) {
            Ok(c) => {
                eprintln!("drover-sample: config loaded ({c:?})");
                *self.config.write().expect("config lock") = c;
            }
            Err(e) => eprintln!("drover-sample: config not loaded: {e}"),
        }
    }
}

impl App {
    async fn handle(&self, path: &str) -> (StatusCode, String) {
        match path {
            "/healthz"
                if self.args.unready
                    || self
                        .args
                        .ready_after
                        .is_some_and(|s| self.started.elapsed().as_secs_f64() < s) =>
            {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
            "/healthz" => (StatusCode::OK, "ok\n".into()),
            "/version" => (StatusCode::OK, format!("{}\n", self.args.version_label)),
            "/config" => {
                let c = self.config.read().expect("config lock").clone();
                (
                    StatusCode::OK,
                    format!(
                        "greeting={}\nerror_rate={}\npassword_set={}\nloaded={}\npid={}\n",
                        c.greeting.unwrap_or_default(),
                        c.error_rate.unwrap_or(self.args.error_rate),
                        c.password_set,
                        c.loaded,
                        std::process::id()
                    ),
                )
            }
            // Its feature flags, read as a service reads them: the file the
            // agent keeps current ($DROVER_FLAGS_FILE).
            "/flags" => match std::env::var_os("DROVER_FLAGS_FILE").map(std::fs::read_to_string) {
                Some(Ok(text)) => (StatusCode::OK, text),
                Some(Err(e)) => (StatusCode::NOT_FOUND, format!("{e}\n")),
                None => (StatusCode::NOT_FOUND, "no DROVER_FLAGS_FILE\n".into()),
            },
            "/metrics" => {
                let mut out = String::new();
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
                    .expect("encoding to a String");
                (StatusCode::OK, out)
            }
            "/" => {
                let started = Instant::now();
                if self.args.latency_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(self.args.latency_ms)).await;
                }
                let n = self.served.fetch_add(1, Ordering::Relaxed);
                let config = self.config.read().expect("config lock").clone();
                let rate = match &self.args.flag_errors {
                    Some((name, rate)) if flag_on(name) => *rate,
                    _ => config.error_rate.unwrap_or(self.args.error_rate),
                };
                let error = if self.args.random_errors {
                    use rand::RngExt;
                    self.rng.lock().expect("rng lock").random::<f64>() < rate
                } else {
                    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
                };
                let (status, body) = if error {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "injected error\n".to_string(),
                    )
                } else {
                    (
                        StatusCode::OK,
                        match &config.greeting {
                            Some(g) => format!("{g} from {}\n", self.args.version_label),
                            None => format!("hello from {}\n", self.args.version_label),
                        },
                    )
                };
                self.requests
                    .get_or_create(&CodeLabel {
                        code: status.as_u16().to_string(),
                    })
                    .inc();
                self.latency.observe(started.elapsed().as_secs_f64());
                (status, body)
            }
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut registry = Registry::default();
    let requests = Family::<CodeLabel, Counter>::default();
    let latency = Histogram::new(
        [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
        ]
        .into_iter(),
    );
    registry.register("http_requests", "Requests served", requests.clone());
    registry.register(
        "http_request_duration_seconds",
        "Request latency",
        latency.clone(),
    );
    let queue_depth = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    queue_depth.set(args.queue_depth);
    registry.register("sample_queue_depth", "Jobs waiting", queue_depth);
    let crashes = crash_now(args.crash_times, args.crash_count_file.as_deref());
    if let Some(secs) = args.crash_after.filter(|_| crashes) {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            eprintln!("drover-sample: crashing as asked (--crash-after {secs})");
            std::process::exit(1);
        });
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("drover-sample {} listening on {addr}", args.version_label);
    let app = Arc::new(App {
        args,
        started: std::time::Instant::now(),
        served: AtomicU64::new(0),
        rng: std::sync::Mutex::new(rand::SeedableRng::seed_from_u64(seed())),
        requests,
        latency,
        registry,
        config: Default::default(),
    });
    app.load_config();
    if app.args.config.is_some() {
        let app = app.clone();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                app.load_config();
            }
        });
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    let (status, body) = app.handle(req.uri().path()).await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .expect("valid response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Whether this start crashes: always without a limit, else while fewer
/// than `limit` starts were counted before this one.
fn crash_now(limit: Option<u32>, count_file: Option<&std::path::Path>) -> bool {
    let (Some(limit), Some(path)) = (limit, count_file) else {
        return true;
    };
    let before: u32 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write(path, (before + 1).to_string());
    before < limit
}

/// A seed that differs per process: the clock and the process id.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}
