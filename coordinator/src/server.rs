//! Binds the API port, serves every gRPC service on it, and shuts down
//! cleanly: health turns NOT_SERVING, every agent stream is closed with
//! UNAVAILABLE (so agents fail over at once), in-flight calls get
//! `shutdown_grace` to finish.

use crate::error::ApiError;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use drover_common::proto::agent_control_server::AgentControlServer;
use drover_common::proto::artifacts_server::ArtifactsServer;
use drover_common::proto::chunks_server::ChunksServer;
use drover_common::proto::deployer_server::DeployerServer;
use drover_common::proto::{
    CoordinatorMessage, FILE_DESCRIPTOR_SET, Fence, Peers, ReportMetrics, ShardEpoch,
    coordinator_message,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::api::forward::Forwarder;
use crate::api::trains::ForwardingMembers;
use crate::api::{AgentControlService, ArtifactsService, DeployerService};
use crate::config::Config;
use crate::config::StoreKind;
use crate::deploy::deployments::{Deployments, Parts};
use crate::deploy::pipeline::{Pipelines, report_metrics};
use crate::deploy::trains::Trains;
use crate::fleet::{PendingCommands, Registry};
use crate::ha::leases::{ShardEvent, ShardLeases};
use crate::ha::members::Member;
use crate::metrics::{self, Metrics};
use crate::origin::{BlobStore, Replicator};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;

/// File in the data dir holding the API address actually bound (useful
/// with port 0).
pub const LISTEN_ADDR_FILE: &str = "listen.addr";
/// File in the data dir holding the metrics address actually bound.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";

/// Runs the coordinator until `shutdown` resolves, then stops cleanly.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let metrics = Metrics::default();
    let embedded = match cfg.store {
        StoreKind::Embedded => Some(EmbeddedStore::open(&cfg.data_dir)?),
        StoreKind::Etcd => None,
    };
    let store: Arc<dyn Store> = match (&embedded, cfg.store) {
        (Some(e), _) => Arc::new(e.clone()),
        (None, _) => Arc::new(
            EtcdStore::connect(&cfg.etcd_endpoints, cfg.tls.as_ref())
                .await
                .with_context(|| {
                    format!("connecting to etcd at {}", cfg.etcd_endpoints.join(","))
                })?,
        ),
    };
    info!(store = ?cfg.store, prefix = %cfg.key_prefix, "store open");
    let blobs = Arc::new(
        BlobStore::open(
            &cfg.data_dir.join("artifacts"),
            store.clone(),
            &cfg.key_prefix,
        )
        .context("opening the artifact store")?,
    );
    let registry = Arc::new(Registry::new(metrics.clone(), cfg.retention));
    let pending = Arc::new(PendingCommands::default());
    let stop = CancellationToken::new();
    tokio::spawn(forget_away_hosts(
        registry.clone(),
        cfg.retention,
        stop.clone(),
    ));

    let trust = Trust::load(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the API address {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let incoming = drover_common::tls::server::incoming(
        listener,
        trust.server.clone(),
        metrics.handshake_observer(),
        stop.clone(),
    );
    write_addr_file(&cfg.data_dir.join(LISTEN_ADDR_FILE), addr)?;

    if let Some(metrics_listen) = cfg.metrics_listen {
        let (listener, metrics_addr) = metrics::bind(metrics_listen)
            .await
            .with_context(|| format!("binding the metrics address {metrics_listen}"))?;
        write_addr_file(&cfg.data_dir.join(METRICS_ADDR_FILE), metrics_addr)?;
        info!(%metrics_addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(metrics.clone().serve(listener, stop.clone()));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AgentControlServer<AgentControlService>>()
        .await;
    health
        .set_serving::<DeployerServer<DeployerService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl before 1.8.8 only speaks v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let origin_addr = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
    let pipelines = Arc::new(Pipelines::new(store.clone(), &cfg.key_prefix));
    // Join the coordinators and take this one's fair share of the shards
    // before the API serves: alone, that is every shard.
    let leases = ShardLeases::new(
        store.clone(),
        &cfg.key_prefix,
        Member {
            id: cfg.id.clone(),
            address: origin_addr.clone(),
            ready: false,
        },
        cfg.shards,
        cfg.lease_ttl,
        cfg.warmup,
        cfg.fault_ignore_lease_loss,
    );
    leases.campaign_once().await;
    metrics.shards_led.set(leases.epochs().len() as i64);
    // The metrics agents must report for canary analyses, kept current as
    // pipelines change (on any coordinator: a store watch).
    let report = Arc::new(std::sync::Mutex::new(report_metrics(
        &pipelines.list().await.unwrap_or_default(),
    )));
    tokio::spawn(keep_reporting_current(
        pipelines.clone(),
        report.clone(),
        registry.clone(),
        stop.clone(),
    ));
    let agent_control = AgentControlService {
        coordinator_id: cfg.id.clone(),
        registry: registry.clone(),
        pending: pending.clone(),
        metrics: metrics.clone(),
        hello_timeout: cfg.hello_timeout,
        shutdown: stop.clone(),
        leases: leases.clone(),
        report,
        cluster_id: cluster_id(store.as_ref(), &cfg.key_prefix).await?,
        auth: trust.auth.clone(),
    };
    let deployments = Deployments::new(Parts {
        store: store.clone(),
        registry: registry.clone(),
        pending: pending.clone(),
        pipelines: pipelines.clone(),
        blobs: blobs.clone(),
        origin: origin_addr.clone(),
        key_prefix: cfg.key_prefix.clone(),
        leases: leases.clone(),
        metrics: metrics.clone(),
        routers: cfg.routers.clone(),
        peers_per_pull: cfg.peers_per_pull,
        pull_mode: cfg.pull_mode,
    });
    let trains = Trains::new(
        deployments.clone(),
        Arc::new(ForwardingMembers {
            deployments: deployments.clone(),
            forward: Forwarder::new(leases.clone(), metrics.clone(), trust.dialer.clone()),
        }),
    );
    let notifier = crate::notify::Notifier::new(
        store.clone(),
        &cfg.key_prefix,
        leases.clone(),
        cfg.webhook_secrets.clone(),
    );
    tokio::spawn(notifier.clone().run(stop.clone()));
    let flags = crate::flags::Flags::new(
        deployments.ledger().clone(),
        pipelines.clone(),
        registry.clone(),
    );
    tokio::spawn(crate::flags::push::keep_hosts_current(
        flags.clone(),
        stop.clone(),
    ));
    tokio::spawn(crate::flags::judge::judge_forever(
        flags.clone(),
        leases.clone(),
        stop.clone(),
    ));
    let deployer = DeployerService {
        registry: registry.clone(),
        pending,
        pipelines: pipelines.clone(),
        deployments: deployments.clone(),
        origin_addr,
        forward: Forwarder::new(leases.clone(), metrics.clone(), trust.dialer.clone()),
        leases: leases.clone(),
        auth: trust.auth.clone(),
        embedded: embedded.clone(),
        trains: trains.clone(),
        notifier,
        flags,
        configs: crate::configs::Configs::new(
            store.clone(),
            crate::store::keys::Keys::new(&cfg.key_prefix),
            pipelines.clone(),
        ),
    };
    // Every artifact uploaded to another coordinator is copied here too.
    let replicator = Arc::new(Replicator::new(trust.dialer.clone()));
    {
        let leases = leases.clone();
        tokio::spawn(replicator.clone().sync(
            blobs.clone(),
            move || leases.peer_addresses(),
            stop.clone(),
        ));
    }
    let artifacts = Arc::new(ArtifactsService {
        store: blobs.clone(),
        metrics: metrics.clone(),
        max_artifact_bytes: cfg.max_artifact_bytes,
        leases: leases.clone(),
        replicator: replicator.clone(),
        auth: trust.auth.clone(),
        // The agents' default limits: what an agent with its defaults
        // would refuse is refused at push.
        unpack_limits: drover_common::artifact::Limits::default(),
        fault_origin_down_file: cfg.fault_origin_down_file.clone(),
        deployments: deployments.clone(),
        registry: registry.clone(),
        retention: cfg.retention_policy,
    });
    tokio::spawn(
        artifacts
            .clone()
            .sweep_forever(cfg.gc_interval, stop.clone()),
    );

    let serve_stop = stop.clone();
    let server = Server::builder()
        // Flow control sized for many small streams. A 64 KiB stream window
        // (HTTP/2's default; hyper's is 1 MiB) caps what one stalled agent
        // stream can park in our buffers. The 1 MiB connection window keeps
        // h2's small-DATA-frame budget (half the connection window) far above
        // one stream's backlog, so resuming from a pause does not trip h2's
        // flood guard (GOAWAY ENHANCE_YOUR_CALM) on a burst of heartbeats.
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentControlServer::new(agent_control).max_decoding_message_size(cfg.max_message_bytes),
        )
        .add_service(DeployerServer::new(deployer).max_decoding_message_size(cfg.max_message_bytes))
        .add_service(
            ArtifactsServer::from_arc(artifacts.clone())
                .max_decoding_message_size(cfg.max_message_bytes),
        )
        .add_service(
            ChunksServer::from_arc(artifacts).max_decoding_message_size(cfg.max_message_bytes),
        )
        .serve_with_incoming_shutdown(incoming, async move { serve_stop.cancelled().await });
    let mut server = tokio::spawn(server);
    info!(%addr, id = %cfg.id, data_dir = %cfg.data_dir.display(), "coordinator serving");
    let resumed = deployments.resume_all().await?;
    if resumed > 0 {
        info!(resumed, "resumed unfinished deploys");
    }
    let resumed = trains.resume(None).await?;
    if resumed > 0 {
        info!(resumed, "resumed unfinished release trains");
    }
    // A shard won later (a standby taking over, a rebalance): every agent
    // learns its new epoch at once, so a deposed leader's commands are
    // rejected everywhere, then its deploys resume.
    {
        let mut events = leases.subscribe();
        let (deployments, trains, leases, registry, metrics) = (
            deployments.clone(),
            trains.clone(),
            leases.clone(),
            registry.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                metrics.shards_led.set(leases.epochs().len() as i64);
                let shard = match event {
                    ShardEvent::Gained(shard) => shard,
                    ShardEvent::Lost(_) => continue,
                    ShardEvent::MembersChanged => {
                        registry.broadcast(CoordinatorMessage {
                            msg: Some(coordinator_message::Msg::Peers(Peers {
                                coordinators: leases.addresses(),
                            })),
                        });
                        continue;
                    }
                };
                if let Some(leadership) = leases.leadership(shard) {
                    registry.broadcast(CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Fence(Fence {
                            epochs: vec![ShardEpoch {
                                shard,
                                epoch: leadership.epoch,
                            }],
                        })),
                    });
                }
                if let Err(e) = deployments.resume_shard(shard).await {
                    tracing::warn!(shard, error = %e, "could not resume the shard's deploys");
                }
                if let Err(e) = trains.resume(Some(shard)).await {
                    tracing::warn!(shard, error = %e, "could not resume the shard's release trains");
                }
            }
        });
    }
    let lease_task = tokio::spawn(leases.clone().run(stop.clone()));
    // systemd (Type=notify): ready once serving; the watchdog is fed from
    // the runtime's timer.
    let _ = drover_common::systemd::notify("READY=1");
    drover_common::systemd::spawn_watchdog(stop.clone());
    tokio::spawn(
        trust
            .clone()
            .reload_on_sighup(metrics.clone(), stop.clone()),
    );

    tokio::select! {
        _ = shutdown => {}
        result = &mut server => {
            // The server stopped by itself: that is an error worth exiting on.
            result.context("API server task")??;
            anyhow::bail!("API server stopped unexpectedly");
        }
    }

    info!("shutting down");
    let _ = drover_common::systemd::notify("STOPPING=1");
    health
        .set_not_serving::<AgentControlServer<AgentControlService>>()
        .await;
    health
        .set_not_serving::<DeployerServer<DeployerService>>()
        .await;
    health
        .set_not_serving::<ArtifactsServer<ArtifactsService>>()
        .await;
    registry.close_all(Status::from(ApiError::Unavailable(format!(
        "coordinator {} is shutting down; reconnect to another",
        cfg.id
    ))));
    stop.cancel();
    // End the session (lease revoked): every shard is free for the
    // standbys at once.
    let _ = tokio::time::timeout(cfg.shutdown_grace, lease_task).await;
    match tokio::time::timeout(cfg.shutdown_grace, server).await {
        Ok(result) => result.context("API server task")??,
        Err(_) => {
            warn!(grace = ?cfg.shutdown_grace, "connections still open after the grace period; closing them")
        }
    }
    info!("stopped");
    Ok(())
}

/// Recomputes the metrics agents must report whenever a pipeline changes,
/// and tells every connected agent when the list changed.
/// Sweeps the registry of hosts away past the retention, a few times per
/// retention period (at most every minute, at least every second).
async fn forget_away_hosts(
    registry: Arc<Registry>,
    retention: crate::fleet::Retention,
    stop: CancellationToken,
) {
    use std::time::Duration;
    let every = (retention.forget_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        registry.sweep();
    }
}

async fn keep_reporting_current(
    pipelines: Arc<Pipelines>,
    report: Arc<std::sync::Mutex<ReportMetrics>>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    use tokio_stream::StreamExt;
    let Ok(mut changes) = pipelines.watch().await else {
        warn!("cannot watch pipelines; agents report the metrics known at start");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            change = changes.next() => match change {
                None => return,
                Some(Ok(_)) => {}
                // Fell behind: watch again; the list below is re-read anyway.
                Some(Err(e)) => {
                    warn!(error = %e, "pipeline watch: watching again");
                    match pipelines.watch().await {
                        Ok(again) => changes = again,
                        Err(_) => return,
                    }
                }
            },
        }
        let Ok(all) = pipelines.list().await else {
            continue;
        };
        let now = report_metrics(&all);
        let changed = {
            let mut current = report.lock().expect("report lock");
            let changed = *current != now;
            *current = now.clone();
            changed
        };
        if changed {
            registry.broadcast(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::ReportMetrics(now)),
            });
        }
    }
}

/// This coordinator's TLS material and policy, reloaded together on SIGHUP.
#[derive(Clone)]
struct Trust {
    /// `None`: plaintext (loopback, or `--insecure`).
    server: Option<Arc<drover_common::tls::ServerTls>>,
    /// How this coordinator dials its peers (its own certificate as a client).
    dialer: drover_common::tls::client::Dialer,
    auth: Arc<crate::auth::Authorizer>,
}

impl Trust {
    fn load(cfg: &Config) -> anyhow::Result<Trust> {
        let Some(files) = &cfg.tls else {
            if !cfg.listen.ip().is_loopback() {
                warn!(listen = %cfg.listen, "INSECURE: serving without TLS beyond loopback; anyone who reaches this port can deploy anything");
            }
            return Ok(Trust {
                server: None,
                dialer: drover_common::tls::client::Dialer::plaintext(),
                auth: Arc::new(crate::auth::Authorizer::open()),
            });
        };
        let own = files
            .own_identity()
            .context("the coordinator certificate")?;
        anyhow::ensure!(
            own.id.kind == drover_common::tls::identity::Kind::Coordinator,
            "{} is not a coordinator certificate ({})",
            files.cert.display(),
            own.id
        );
        let server = drover_common::tls::ServerTls::server(files.clone())?;
        let client = drover_common::tls::ClientTls::client(files.clone())?;
        let auth = crate::auth::Authorizer::enforcing(cfg.policy.clone())?;
        info!(identity = %own.id, policy = ?cfg.policy, "mutual TLS on every connection");
        Ok(Trust {
            server: Some(server),
            dialer: drover_common::tls::client::Dialer::tls(client),
            auth: Arc::new(auth),
        })
    }

    /// SIGHUP: new certificates, deny list and policy for what comes next.
    /// Existing connections keep the certificates they were made with.
    async fn reload_on_sighup(self, metrics: Metrics, stop: CancellationToken) {
        drover_common::systemd::on_sighup(stop, || self.reload(&metrics)).await
    }

    fn reload(&self, metrics: &Metrics) {
        info!("SIGHUP: reloading certificates, deny list and policy");
        if let Some(server) = &self.server
            && let Err(e) = server.reload()
        {
            metrics.reload_errors.inc();
            warn!(error = %e, "server certificate reload failed; the previous one stays in force");
        }
        if let Some(client) = self.dialer.client_tls()
            && let Err(e) = client.reload()
        {
            metrics.reload_errors.inc();
            warn!(error = %e, "client certificate reload failed; the previous one stays in force");
        }
        match self.auth.reload() {
            Ok(Some(grants)) => info!(grants, "policy reloaded"),
            Ok(None) => {}
            Err(e) => {
                metrics.reload_errors.inc();
                warn!(
                    error = format!("{e:#}"),
                    "policy reload failed; the previous policy stays in force"
                );
            }
        }
    }
}

/// The cluster id, written once in the store by the first coordinator
/// (a rebuilt or replaced store gets a new one; agents then reset epochs).
async fn cluster_id(store: &dyn Store, prefix: &str) -> anyhow::Result<String> {
    use crate::store::{Compare, Op, Txn};
    let key = crate::store::keys::Keys::new(prefix).cluster_id();
    store
        .txn(Txn {
            compares: vec![Compare::Missing(key.clone())],
            success: vec![Op::put(
                key.clone(),
                uuid::Uuid::new_v4().simple().to_string(),
            )],
            failure: vec![],
        })
        .await
        .context("writing the cluster id")?;
    let kv = store
        .get(&key)
        .await
        .context("reading the cluster id")?
        .context("the cluster id vanished")?;
    let id = String::from_utf8(kv.value).context("the cluster id is not UTF-8")?;
    info!(cluster_id = %id, "cluster");
    Ok(id)
}

/// Writes `addr` to `path` atomically, so a reader never sees half of it.
fn write_addr_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
