//! The agent process: restores its services, samples the host, produces
//! heartbeats, executes commands and keeps one connection per coordinator
//! until shutdown.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use drover_common::proto::Hello;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AgentConfig, RuntimeKind};
use crate::connection::{CommandSink, Connection, FenceSink, FlagSink, HelloSource, ReportSink};
use crate::directory::Directory;
use crate::disk::DiskHealth;
use crate::executor::{Executor, ExecutorConfig};
use crate::health::HealthBoard;
use crate::heartbeat;
use crate::host_metrics::HostSampler;
use crate::releases::Layout;
use crate::runtime::Runtime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::systemd::SystemdRuntime;
use crate::state::Journal;

/// SIGHUP: new certificate files for the connections made afterwards;
/// streams already open keep working.
async fn reload_on_sighup(tls: Arc<drover_common::tls::ClientTls>, shutdown: CancellationToken) {
    drover_common::systemd::on_sighup(shutdown, || match tls.reload() {
        Ok(()) => info!("SIGHUP: certificates reloaded"),
        Err(e) => {
            warn!(error = %e, "SIGHUP: certificate reload failed; the previous ones stay in force")
        }
    })
    .await
}

/// How long shutdown waits for every connection to say Goodbye.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The data dir is the agent's: 0711 (services, running as other users,
    // pass through to their releases but list nothing; see releases.rs),
    // and locked (a second agent on it refuses to start, naming the holder).
    std::fs::create_dir_all(&cfg.data_dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let _lock = crate::state::lock_data_dir(&cfg.data_dir)?;
    let journal = Journal::open(&cfg.data_dir)?;
    let runtime: Arc<dyn Runtime> = match cfg.runtime {
        RuntimeKind::Process => Arc::new(ProcessRuntime::new()),
        RuntimeKind::Systemd => Arc::new(SystemdRuntime {
            unit_dir: cfg.systemd_unit_dir.clone(),
        }),
    };
    let dialer = match &cfg.tls {
        None => drover_common::tls::client::Dialer::plaintext(),
        Some(files) => {
            let tls = drover_common::tls::ClientTls::client(files.clone())?;
            let own = files.own_identity()?;
            anyhow::ensure!(
                own.id.kind == drover_common::tls::identity::Kind::Agent
                    && own.id.name == cfg.host_id,
                "{} names {}, but this agent is host {:?}",
                files.cert.display(),
                own.id,
                cfg.host_id
            );
            tokio::spawn(reload_on_sighup(tls.clone(), shutdown.clone()));
            drover_common::tls::client::Dialer::tls(tls)
        }
    };
    let peer_dialer = match &cfg.tls {
        None => drover_common::tls::client::Dialer::plaintext(),
        Some(files) => drover_common::tls::client::Dialer::tls(
            drover_common::tls::ClientTls::peer_client(files.clone())?,
        ),
    };
    let board = Arc::new(HealthBoard::new(runtime.clone(), cfg.heartbeat_interval));
    let disk = Arc::new(DiskHealth::default());
    tokio::spawn(crate::disk::watch(
        cfg.data_dir.clone(),
        disk.clone(),
        cfg.disk_check_interval,
        shutdown.clone(),
    ));
    let layout = Layout {
        data_dir: cfg.data_dir.clone(),
    };
    let flag_files = Arc::new(crate::flags::FlagFiles::new(layout.clone()));
    let chunks = crate::chunk_cache::ChunkCache::open(layout.clone());
    // Serving peers before the first Hello, so it can name the address.
    let peer_address = match &cfg.peer {
        Some(serving) => Some(
            crate::peer_server::spawn(serving, chunks.clone(), cfg.tls.clone(), shutdown.clone())
                .await?,
        ),
        None => None,
    };
    let executor = Executor::new(
        ExecutorConfig {
            layout,
            env: cfg.env.clone(),
            slot_ports: cfg.slot_ports.clone(),
            users: cfg.users.clone(),
            keep_releases: cfg.keep_releases,
            limits: cfg.limits.clone(),
            kill_leftovers: cfg.runtime == RuntimeKind::Process,
            dialer: dialer.clone(),
            peer_dialer,
            signers: cfg.signers.clone(),
            disk: disk.clone(),
            chunks: chunks.clone(),
            secrets: cfg.secrets.clone(),
        },
        journal,
        runtime.clone(),
        board.clone(),
    );
    executor.recover().await;

    let hello: HelloSource = {
        let cfg = cfg.clone();
        let executor = executor.clone();
        let chunks = chunks.clone();
        let peer_address = peer_address.clone().unwrap_or_default();
        Arc::new(move || Hello {
            host_id: cfg.host_id.clone(),
            labels: cfg.labels.clone(),
            agent_version: drover_common::VERSION.to_string(),
            services: executor.services(),
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u32,
            peer_address: peer_address.clone(),
            held_artifacts: chunks.held(),
        })
    };
    let commands: CommandSink = {
        let executor = executor.clone();
        Arc::new(move |cmd, reply| {
            let executor = executor.clone();
            tokio::spawn(async move { executor.handle(cmd, reply).await });
        })
    };
    let mut sampler = HostSampler::new(cfg.data_dir.clone())?;
    let health = board.clone();
    let versions = executor.clone();
    let heartbeats = heartbeat::spawn_producer(
        cfg.heartbeat_interval,
        cfg.heartbeat_interval,
        cfg.queue_capacity,
        move || heartbeat::Sample {
            host: sampler.sample(),
            health: health.snapshot(),
            versions: versions.services(),
            problems: disk.problems(),
            held_artifacts: chunks.held(),
        },
        shutdown.clone(),
    );
    let fence: FenceSink = {
        let executor = executor.clone();
        Arc::new(move |epochs| executor.raise_epochs(epochs))
    };
    let cluster: crate::connection::ClusterSink = {
        let executor = executor.clone();
        Arc::new(move |id, authenticated| executor.join_cluster(id, authenticated))
    };
    let report: ReportSink = {
        let board = board.clone();
        Arc::new(move |r| board.set_reported(r))
    };
    let flags: FlagSink = Arc::new(move |f| flag_files.apply(f));
    // systemd (Type=notify): ready after the first connection attempt
    // (connected or not: a coordinator being down must not fail the boot).
    let contact = Arc::new(tokio::sync::Notify::new());
    {
        let contact = contact.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            contact.notified().await;
            let _ = drover_common::systemd::notify("READY=1");
            drover_common::systemd::spawn_watchdog(shutdown);
        });
    }
    let (directory, mut discovered) = Directory::new();
    let directory = Arc::new(directory);
    let mut tasks = tokio::task::JoinSet::new();
    let mut connect = |coordinator: String| {
        tasks.spawn(
            Connection {
                coordinator,
                hello: hello.clone(),
                heartbeats: heartbeats.clone(),
                backoff: cfg.backoff,
                shutdown: shutdown.clone(),
                dropped: Arc::new(AtomicU64::new(0)),
                commands: commands.clone(),
                fence: fence.clone(),
                cluster: cluster.clone(),
                contact: contact.clone(),
                report: report.clone(),
                flags: flags.clone(),
                directory: Some(directory.clone()),
                dialer: dialer.clone(),
            }
            .run(),
        );
    };
    for coordinator in &cfg.coordinators {
        if directory.claim(coordinator) {
            connect(coordinator.clone());
        }
    }
    if cfg.signers.is_empty() {
        warn!(
            "no --trust-signer: artifacts are not checked for signatures; a coordinator can run any artifact here"
        );
    }
    info!(host_id = %cfg.host_id, coordinators = ?cfg.coordinators, signers = ?cfg.signers.ids(), "agent started");
    // Coordinators named in a Welcome get a connection too.
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(found) = discovered.recv() => connect(found),
        }
    }
    info!("shutting down: saying goodbye to every coordinator");
    let _ = drover_common::systemd::notify("STOPPING=1");
    if tokio::time::timeout(SHUTDOWN_WAIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!("some coordinators did not close their streams in time");
    }
    executor.shutdown().await;
    info!("stopped");
    Ok(())
}
