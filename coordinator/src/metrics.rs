//! Prometheus metrics of the coordinator and the HTTP endpoint that serves
//! them (`--metrics-listen`, path `/metrics`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric the coordinator exports. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub connected_agents: Gauge,
    /// Hosts in the registry (connected or not).
    pub hosts_known: Gauge,
    /// Hosts dropped from the registry: away past the retention, or
    /// displaced at the host limit.
    pub hosts_forgotten: Counter,
    pub heartbeats: Counter,
    /// From the agent producing a heartbeat to the registry holding it.
    pub heartbeat_lag_seconds: Histogram,
    pub agent_dropped_heartbeats: Counter,
    pub streams_replaced: Counter,
    pub streams_rejected: Family<ReasonLabel, Counter>,
    pub artifact_uploads: Counter,
    /// Artifacts removed by gc (by hand or swept).
    pub artifacts_collected: Counter,
    pub artifact_fetches: Counter,
    pub artifact_fetched_bytes: Counter,
    /// Shards this coordinator leads now.
    pub shards_led: Gauge,
    /// Guarded writes the store refused because this coordinator no longer
    /// led the shard (fencing at work).
    pub fenced_writes: Counter,
    /// Commands agents answered REJECTED_STALE (a newer leader's epoch).
    pub stale_commands: Counter,
    /// Requests forwarded to the leader of their pipeline's shard.
    pub forwarded_requests: Counter,
    /// Mutual TLS handshakes completed and refused.
    pub tls_handshakes: Counter,
    pub tls_handshakes_refused: Counter,
    /// SIGHUP reloads (certificates, deny list, policy) that failed.
    pub reload_errors: Counter,
}

/// Bucket bounds from 50 µs growing by √2 to about 3 s, fine enough to read
/// a p99 off the histogram.
fn lag_buckets() -> impl Iterator<Item = f64> {
    (0..32).map(|i| 0.000_05 * 2f64.powf(i as f64 / 2.0))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("drover");
        let connected_agents = Gauge::default();
        let hosts_known = Gauge::default();
        let hosts_forgotten = Counter::default();
        registry.register(
            "hosts_known",
            "Hosts in the registry, connected or not",
            hosts_known.clone(),
        );
        registry.register(
            "hosts_forgotten",
            "Hosts dropped from the registry (away past --host-retention, or displaced at --max-hosts)",
            hosts_forgotten.clone(),
        );
        let heartbeats = Counter::default();
        let heartbeat_lag_seconds = Histogram::new(lag_buckets());
        let agent_dropped_heartbeats = Counter::default();
        let streams_replaced = Counter::default();
        let streams_rejected = Family::<ReasonLabel, Counter>::default();
        let artifact_uploads = Counter::default();
        let artifacts_collected = Counter::default();
        let artifact_fetches = Counter::default();
        let artifact_fetched_bytes = Counter::default();
        let shards_led = Gauge::default();
        let fenced_writes = Counter::default();
        let stale_commands = Counter::default();
        let forwarded_requests = Counter::default();
        let tls_handshakes = Counter::default();
        let tls_handshakes_refused = Counter::default();
        let reload_errors = Counter::default();
        registry.register(
            "tls_handshakes",
            "Mutual TLS handshakes completed",
            tls_handshakes.clone(),
        );
        registry.register(
            "tls_handshakes_refused",
            "TLS handshakes refused (no, expired, revoked or foreign certificate; too slow)",
            tls_handshakes_refused.clone(),
        );
        registry.register(
            "reload_errors",
            "SIGHUP reloads of certificates, deny list or policy that failed (the previous ones stay)",
            reload_errors.clone(),
        );
        registry.register(
            "shards_led",
            "Shards this coordinator leads now",
            shards_led.clone(),
        );
        registry.register(
            "fenced_writes",
            "Writes the store refused because this coordinator no longer led the shard",
            fenced_writes.clone(),
        );
        registry.register(
            "stale_commands",
            "Commands agents rejected because a newer leader's epoch had reached them",
            stale_commands.clone(),
        );
        registry.register(
            "forwarded_requests",
            "API requests forwarded to the leader of their pipeline's shard",
            forwarded_requests.clone(),
        );
        registry.register(
            "artifact_uploads",
            "Artifacts stored by uploads",
            artifact_uploads.clone(),
        );
        registry.register(
            "artifacts_collected",
            "Artifacts removed by gc (droverctl artifact gc or the periodic sweep)",
            artifacts_collected.clone(),
        );
        registry.register(
            "artifact_fetches",
            "Fetch and FetchChunks calls served (each resume counts)",
            artifact_fetches.clone(),
        );
        registry.register(
            "artifact_fetched_bytes",
            "Artifact bytes served",
            artifact_fetched_bytes.clone(),
        );
        registry.register(
            "connected_agents",
            "Agent streams open now",
            connected_agents.clone(),
        );
        registry.register("heartbeats", "Heartbeats received", heartbeats.clone());
        registry.register(
            "heartbeat_lag_seconds",
            "Time from an agent producing a heartbeat to the registry holding it",
            heartbeat_lag_seconds.clone(),
        );
        registry.register(
            "agent_dropped_heartbeats",
            "Heartbeats agents report they dropped because this coordinator read too slowly",
            agent_dropped_heartbeats.clone(),
        );
        registry.register(
            "streams_replaced",
            "Agent streams closed because a newer stream for the same host arrived",
            streams_replaced.clone(),
        );
        registry.register(
            "streams_rejected",
            "Agent streams refused before registration, by reason",
            streams_rejected.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            connected_agents,
            hosts_known,
            hosts_forgotten,
            heartbeats,
            heartbeat_lag_seconds,
            agent_dropped_heartbeats,
            streams_replaced,
            streams_rejected,
            artifact_uploads,
            artifacts_collected,
            artifact_fetches,
            artifact_fetched_bytes,
            shards_led,
            fenced_writes,
            stale_commands,
            forwarded_requests,
            tls_handshakes,
            tls_handshakes_refused,
            reload_errors,
        }
    }
}

impl Metrics {
    /// Counts the listener's handshakes.
    pub fn handshake_observer(&self) -> drover_common::tls::server::HandshakeObserver {
        let (ok, refused) = (
            self.tls_handshakes.clone(),
            self.tls_handshakes_refused.clone(),
        );
        Arc::new(move |h| match h {
            drover_common::tls::server::Handshake::Accepted => {
                ok.inc();
            }
            drover_common::tls::server::Handshake::Refused => {
                refused.inc();
            }
        })
    }

    pub fn reject(&self, reason: &str) {
        self.streams_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Serves `/metrics` on `listener` until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener accept failed");
                        continue;
                    }
                },
            };
            let metrics = self.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, Infallible>(metrics.respond(req.uri().path())) }
                    });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/metrics" => (StatusCode::OK, self.encode()),
            _ => (
                StatusCode::NOT_FOUND,
                "only /metrics is served here\n".to_string(),
            ),
        };
        Response::builder()
            .status(status)
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    }
}

/// Binds the metrics endpoint; returns the bound address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
