//! Health of running services: readiness and liveness probes, and the
//! service's own Prometheus metrics turned into per-interval figures
//! (requests, errors, p50/p99 latency) for the heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_common::artifact::manifest::{MetricsSpec, Probe, ProbeCheck};
use drover_common::histogram;
use drover_common::proto::{LatencyBucket, ReportMetrics, ServiceHealth};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::{Launch, Runtime};

/// Runs one probe check.
pub async fn probe_once(probe: &Probe, launch: &Launch) -> Result<(), String> {
    match probe.check() {
        Some(ProbeCheck::Http(url)) => {
            let (status, _) = crate::http::get(url, probe.timeout).await?;
            if status == probe.expect_status {
                Ok(())
            } else {
                Err(format!(
                    "GET {url} answered {status}, expected {}",
                    probe.expect_status
                ))
            }
        }
        Some(ProbeCheck::Tcp(addr)) => {
            tokio::time::timeout(probe.timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connect {addr}: no answer within {:?}", probe.timeout))?
                .map(|_| ())
                .map_err(|e| format!("connect {addr}: {e}"))
        }
        Some(ProbeCheck::Exec(cmd)) => {
            // As the service itself runs: same user, same environment.
            let mut command = launch.command(std::path::Path::new(&cmd[0]));
            command.args(&cmd[1..]).kill_on_drop(true);
            let out = tokio::time::timeout(probe.timeout, command.output())
                .await
                .map_err(|_| format!("{} did not finish within {:?}", cmd[0], probe.timeout))?
                .map_err(|e| format!("running {}: {e}", cmd[0]))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{} exited with {}", cmd[0], out.status))
            }
        }
        None => Err("the probe names no check".into()),
    }
}

/// What to watch for one running service; every URL is already expanded.
#[derive(Debug, Clone)]
pub struct Watch {
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub metrics: Option<MetricsSpec>,
    /// How exec probes start (as the service does).
    pub launch: Launch,
}

#[derive(Debug, Clone, Default)]
struct Figures {
    ready: bool,
    live: bool,
    last_probe_error: String,
    requests: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    interval_ms: u32,
    /// The metrics coordinators asked for: rate/s (counters) or value.
    metrics: HashMap<String, f64>,
    /// The interval's cumulative latency buckets (ms bounds).
    latency_buckets: Vec<(f64, f64)>,
    /// Which scrape these figures are from (1, 2, …), so a coordinator
    /// counts an interval once however many heartbeats repeat it.
    scrape: u64,
}

/// Service → the metric names heartbeats must carry (ReportMetrics).
type Reported = Arc<Mutex<HashMap<String, Vec<String>>>>;

struct Watched {
    figures: Arc<Mutex<Figures>>,
    stop: CancellationToken,
    has_readiness: bool,
    has_liveness: bool,
}

/// The latest health of every service, read by the heartbeat. Keyed by
/// [`crate::unit::Unit::key`]: a blue-green slot has its own entry.
pub struct HealthBoard {
    services: Mutex<HashMap<String, Watched>>,
    /// Per service, the restarts of its earlier starts: a runtime counts
    /// restarts from each start, heartbeats count them for the agent's
    /// life, so a coordinator's baseline from before a restart holds.
    earlier_restarts: Mutex<HashMap<String, u32>>,
    runtime: Arc<dyn Runtime>,
    scrape_interval: Duration,
    reported: Reported,
}

impl HealthBoard {
    pub fn new(runtime: Arc<dyn Runtime>, scrape_interval: Duration) -> HealthBoard {
        HealthBoard {
            services: Mutex::new(HashMap::new()),
            earlier_restarts: Mutex::new(HashMap::new()),
            runtime,
            scrape_interval,
            reported: Reported::default(),
        }
    }

    /// Sets the metrics heartbeats carry per service (a coordinator's
    /// ReportMetrics replaces the earlier list).
    pub fn set_reported(&self, report: &ReportMetrics) {
        let mut reported = self.reported.lock().expect("reported lock");
        reported.clear();
        for s in &report.services {
            reported.insert(s.service.clone(), s.names.clone());
        }
    }

    /// Starts watching `service`, replacing an earlier watch.
    pub fn watch(&self, service: &str, watch: Watch) {
        self.unwatch(service);
        let figures = Arc::new(Mutex::new(Figures::default()));
        let stop = CancellationToken::new();
        if let Some(probe) = watch.readiness.clone() {
            tokio::spawn(probe_loop(
                service.to_string(),
                probe,
                watch.launch.clone(),
                figures.clone(),
                stop.clone(),
                None,
            ));
        }
        if let Some(probe) = watch.liveness.clone() {
            tokio::spawn(probe_loop(
                service.to_string(),
                probe,
                watch.launch.clone(),
                figures.clone(),
                stop.clone(),
                Some(self.runtime.clone()),
            ));
        }
        if let Some(metrics) = watch.metrics.clone() {
            tokio::spawn(scrape_loop(
                metrics,
                self.scrape_interval,
                Extra {
                    // Coordinators ask for metrics per service, whatever the slot.
                    service: crate::unit::Unit::from_key(service).service,
                    reported: self.reported.clone(),
                },
                figures.clone(),
                stop.clone(),
            ));
        }
        let watched = Watched {
            figures,
            stop,
            has_readiness: watch.readiness.is_some(),
            has_liveness: watch.liveness.is_some(),
        };
        self.services
            .lock()
            .expect("board lock")
            .insert(service.to_string(), watched);
    }

    /// Call right before the runtime (re)starts `service`: its restarts so
    /// far are kept, so the count heartbeats carry never goes back.
    pub fn before_start(&self, service: &str) {
        let now = self.runtime.status(service).restarts;
        *self
            .earlier_restarts
            .lock()
            .expect("restarts lock")
            .entry(service.to_string())
            .or_default() += now;
    }

    /// Restarts of `service` since the agent started (all its starts).
    fn restarts(&self, service: &str, current: u32) -> u32 {
        let earlier = self
            .earlier_restarts
            .lock()
            .expect("restarts lock")
            .get(service)
            .copied()
            .unwrap_or(0);
        earlier.saturating_add(current)
    }

    /// `service` passed a readiness check outside the probe loop (the
    /// restart's): heartbeats say ready until a probe says otherwise.
    pub fn mark_ready(&self, service: &str) {
        if let Some(w) = self.services.lock().expect("board lock").get(service) {
            w.figures.lock().expect("figures lock").ready = true;
        }
    }

    pub fn unwatch(&self, service: &str) {
        if let Some(w) = self.services.lock().expect("board lock").remove(service) {
            w.stop.cancel();
        }
    }

    /// Ready: the readiness probe passes, or (without one) the process runs.
    pub fn is_ready(&self, service: &str, has_probe: bool) -> bool {
        let running = self.runtime.status(service).running;
        if !has_probe {
            return running;
        }
        running
            && self
                .services
                .lock()
                .expect("board lock")
                .get(service)
                .is_some_and(|w| w.figures.lock().expect("figures lock").ready)
    }

    /// Health of every watched service, for a heartbeat.
    pub fn snapshot(&self) -> Vec<ServiceHealth> {
        let services = self.services.lock().expect("board lock");
        let mut out: Vec<ServiceHealth> = services
            .iter()
            .map(|(name, w)| {
                let f = w.figures.lock().expect("figures lock").clone();
                let status = self.runtime.status(name);
                // Without a probe, running is the best evidence there is.
                let unit = crate::unit::Unit::from_key(name);
                ServiceHealth {
                    service: unit.service,
                    slot: unit.slot as i32,
                    ready: status.running && (f.ready || !w.has_readiness),
                    live: status.running && (f.live || !w.has_liveness),
                    restarts: self.restarts(name, status.restarts),
                    request_count: f.requests,
                    error_count: f.errors,
                    latency_p50_ms: f.p50_ms,
                    latency_p99_ms: f.p99_ms,
                    interval_ms: f.interval_ms,
                    metrics: f.metrics,
                    latency_buckets: f
                        .latency_buckets
                        .iter()
                        .map(|&(le_ms, count)| LatencyBucket {
                            le_ms,
                            count: count as u64,
                        })
                        .collect(),
                    scrape: f.scrape,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.service, a.slot).cmp(&(&b.service, b.slot)));
        out
    }
}

/// Probes forever; readiness sets `ready`, liveness sets `live` and kills
/// the process after `failure_threshold` failures so it is started again.
async fn probe_loop(
    service: String,
    probe: Probe,
    launch: Launch,
    figures: Arc<Mutex<Figures>>,
    stop: CancellationToken,
    liveness_runtime: Option<Arc<dyn Runtime>>,
) {
    let mut failures = 0u32;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe_once(&probe, &launch) => r,
        };
        {
            let mut f = figures.lock().expect("figures lock");
            match &result {
                Ok(()) => {
                    failures = 0;
                    if liveness_runtime.is_some() {
                        f.live = true
                    } else {
                        f.ready = true
                    }
                }
                Err(e) => {
                    failures += 1;
                    f.last_probe_error = e.clone();
                    if failures >= probe.failure_threshold {
                        if liveness_runtime.is_some() {
                            f.live = false
                        } else {
                            f.ready = false
                        }
                    }
                }
            }
        }
        if let (Some(runtime), Err(e)) = (&liveness_runtime, &result)
            && failures >= probe.failure_threshold
        {
            warn!(%service, error = %e, "liveness failed; restarting the service");
            runtime.kill(&service).await;
            failures = 0;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(probe.interval) => {}
        }
    }
}

/// Cumulative figures of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scraped {
    pub requests: f64,
    pub errors: f64,
    /// (upper bound in seconds, cumulative count), summed over label sets.
    pub latency: Vec<(f64, f64)>,
    /// Asked-for metrics: (value summed over label sets, is a counter).
    pub extra: HashMap<String, (f64, bool)>,
}

/// Which extra metrics the scrape of one service reads.
struct Extra {
    service: String,
    reported: Reported,
}

impl Extra {
    fn names(&self) -> Vec<String> {
        self.reported
            .lock()
            .expect("reported lock")
            .get(&self.service)
            .cloned()
            .unwrap_or_default()
    }
}

fn counter_value(v: &prometheus_parse::Value) -> Option<f64> {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Untyped(x)
        | prometheus_parse::Value::Gauge(x) => Some(*x),
        _ => None,
    }
}

/// Reads the figures `spec` names, and the `extra` metrics, out of a
/// Prometheus text exposition.
pub fn parse_scrape(text: &str, spec: &MetricsSpec, extra: &[String]) -> Result<Scraped, String> {
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("unreadable metrics: {e}"))?;
    let base = spec.requests.trim_end_matches("_total");
    let mut out = Scraped::default();
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for sample in &parsed.samples {
        let name = sample.metric.trim_end_matches("_total");
        if name == base
            && let Some(v) = counter_value(&sample.value)
        {
            out.requests += v;
            if let Some(sel) = &spec.errors
                && sample
                    .labels
                    .get(&sel.label)
                    .is_some_and(|l| l.starts_with(&sel.prefix))
            {
                out.errors += v;
            }
        }
        if let Some(want) = extra
            .iter()
            .find(|w| *w == &sample.metric || w.trim_end_matches("_total") == name)
        {
            // OpenMetrics counters are `<name>_total` under `# TYPE <name>
            // counter`, which the parser reports untyped: the suffix says it.
            let value = match &sample.value {
                prometheus_parse::Value::Counter(x) => Some((*x, true)),
                prometheus_parse::Value::Untyped(x) => {
                    Some((*x, sample.metric.ends_with("_total")))
                }
                prometheus_parse::Value::Gauge(x) => Some((*x, false)),
                _ => None,
            };
            if let Some((v, counter)) = value {
                let entry = out.extra.entry(want.clone()).or_insert((0.0, counter));
                entry.0 += v;
            }
        }
        if spec.latency.as_deref() == Some(sample.metric.as_str())
            && let prometheus_parse::Value::Histogram(hist) = &sample.value
        {
            for b in hist {
                let entry = buckets
                    .entry(b.less_than.to_bits())
                    .or_insert((b.less_than, 0.0));
                entry.1 += b.count;
            }
        }
    }
    let mut latency: Vec<(f64, f64)> = buckets.into_values().collect();
    latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    out.latency = latency;
    Ok(out)
}

async fn scrape_loop(
    spec: MetricsSpec,
    interval: Duration,
    extra: Extra,
    figures: Arc<Mutex<Figures>>,
    stop: CancellationToken,
) {
    let mut last: Option<(Instant, Scraped)> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let scraped = match crate::http::get(&spec.url, interval.max(Duration::from_millis(500)))
            .await
        {
            Ok((200, body)) => parse_scrape(&String::from_utf8_lossy(&body), &spec, &extra.names()),
            Ok((status, _)) => Err(format!("GET {} answered {status}", spec.url)),
            Err(e) => Err(e),
        };
        let scraped = match scraped {
            Ok(s) => {
                if warned {
                    info!(url = %spec.url, "metrics readable again");
                    warned = false;
                }
                s
            }
            Err(e) => {
                if !warned {
                    warn!(url = %spec.url, error = %e, "cannot scrape the service's metrics");
                    warned = true;
                }
                continue;
            }
        };
        let now = Instant::now();
        if let Some((at, prev)) = &last {
            let window = histogram::delta(&prev.latency, &scraped.latency);
            let mut f = figures.lock().expect("figures lock");
            // A restarted service starts its counters at zero again.
            f.requests = (scraped.requests - prev.requests).max(0.0) as u64;
            f.errors = (scraped.errors - prev.errors).max(0.0) as u64;
            f.p50_ms = histogram::quantile(&window, 0.5).unwrap_or(0.0) * 1e3;
            f.p99_ms = histogram::quantile(&window, 0.99).unwrap_or(0.0) * 1e3;
            f.latency_buckets = window.iter().map(|&(le, n)| (le * 1e3, n)).collect();
            f.scrape += 1;
            f.interval_ms = now.duration_since(*at).as_millis() as u32;
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            f.metrics = scraped
                .extra
                .iter()
                .filter_map(|(name, (v, counter))| {
                    if !counter {
                        return Some((name.clone(), *v));
                    }
                    // A rate needs the previous scrape (and no counter reset).
                    let (before, _) = prev.extra.get(name)?;
                    (v >= before).then(|| (name.clone(), (v - before) / secs))
                })
                .collect();
        }
        last = Some((now, scraped));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::artifact::manifest::ErrorSelector;

    /// A runtime whose restart count is set by the test.
    struct Counting(std::sync::Mutex<u32>);

    #[async_trait::async_trait]
    impl Runtime for Counting {
        async fn start(
            &self,
            _: crate::runtime::ServiceSpec,
        ) -> Result<(), crate::runtime::RuntimeError> {
            *self.0.lock().unwrap() = 0; // a runtime counts from each start
            Ok(())
        }
        async fn stop(&self, _: &str) -> Result<(), crate::runtime::RuntimeError> {
            Ok(())
        }
        async fn kill(&self, _: &str) {}
        async fn signal(
            &self,
            _: &str,
            _: nix::sys::signal::Signal,
        ) -> Result<(), crate::runtime::RuntimeError> {
            Ok(())
        }
        fn status(&self, _: &str) -> crate::runtime::RuntimeStatus {
            crate::runtime::RuntimeStatus {
                running: true,
                restarts: *self.0.lock().unwrap(),
                pgid: None,
            }
        }
        fn output_tail(&self, _: &str, _: usize) -> String {
            String::new()
        }
        async fn stop_all(&self) {}
    }

    #[tokio::test]
    async fn heartbeats_count_restarts_for_the_agents_life_across_starts() {
        let runtime = Arc::new(Counting(std::sync::Mutex::new(0)));
        let board = HealthBoard::new(runtime.clone(), Duration::from_secs(1));
        board.watch(
            "web",
            Watch {
                readiness: None,
                liveness: None,
                metrics: None,
                launch: crate::runtime::Launch {
                    workdir: "/".into(),
                    env: Default::default(),
                    run_as: None,
                },
            },
        );
        let restarts = |b: &HealthBoard| b.snapshot()[0].restarts;
        *runtime.0.lock().unwrap() = 3; // three crashes of the old release
        assert_eq!(restarts(&board), 3);
        board.before_start("web");
        *runtime.0.lock().unwrap() = 0; // the runtime's count starts again
        assert_eq!(restarts(&board), 3, "never goes back");
        *runtime.0.lock().unwrap() = 2; // the new release crashes twice
        assert_eq!(restarts(&board), 5);
    }

    #[test]
    fn reads_requests_errors_and_latency() {
        let text = "# TYPE http_requests counter\n\
            http_requests_total{code=\"200\"} 90\n\
            http_requests_total{code=\"503\"} 7\n\
            http_requests_total{code=\"500\"} 3\n\
            # TYPE http_request_duration_seconds histogram\n\
            http_request_duration_seconds_bucket{le=\"0.01\"} 50\n\
            http_request_duration_seconds_bucket{le=\"0.1\"} 99\n\
            http_request_duration_seconds_bucket{le=\"+Inf\"} 100\n\
            http_request_duration_seconds_sum 3.2\n\
            http_request_duration_seconds_count 100\n\
            # TYPE queue_depth gauge\n\
            queue_depth{shard=\"a\"} 4\n\
            queue_depth{shard=\"b\"} 6\n";
        let spec = MetricsSpec {
            url: "http://x/metrics".into(),
            requests: "http_requests_total".into(),
            errors: Some(ErrorSelector {
                label: "code".into(),
                prefix: "5".into(),
            }),
            latency: Some("http_request_duration_seconds".into()),
        };
        let extra = vec![
            "queue_depth".to_string(),
            "http_requests_total".to_string(),
            "absent".to_string(),
        ];
        let s = parse_scrape(text, &spec, &extra).unwrap();
        assert_eq!((s.requests, s.errors), (100.0, 10.0));
        assert_eq!(
            s.extra.get("queue_depth"),
            Some(&(10.0, false)),
            "a gauge, summed"
        );
        assert_eq!(
            s.extra.get("http_requests_total"),
            Some(&(100.0, true)),
            "a counter"
        );
        assert_eq!(s.extra.get("absent"), None);
        assert_eq!(s.latency.len(), 3);
        assert_eq!(s.latency[1], (0.1, 99.0));
    }
}
