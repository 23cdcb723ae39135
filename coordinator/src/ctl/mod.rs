//! `droverctl`: the command-line client of CI pipelines and SREs.
//!
//! Every command talks gRPC to one coordinator. Output is a readable table
//! by default and the canonical proto3 JSON (the same as grpcurl prints)
//! with `--json`. Exit codes: 0 success, 1 any error (printed to stderr).

mod artifacts;
mod audit;
mod ca;
mod command;
mod configs;
mod coordinators;
pub mod deploys;
mod flags;
mod hosts;
mod notifications;
mod pipelines;
pub mod trains;

use clap::{Parser, Subcommand};
use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::proto::deployer_client::DeployerClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "droverctl", version, about = "Control a Drover fleet")]
pub struct Cli {
    /// Coordinator address (host:port or http://host:port).
    #[arg(long, global = true, env = "DROVER_COORDINATOR", default_value = crate::config::DEFAULT_LISTEN)]
    pub coordinator: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// CA certificate the coordinator's certificate must chain to (mutual TLS; with --cert and --key).
    #[arg(long, global = true, env = "DROVER_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// Your certificate (`droverctl ca issue user NAME`).
    #[arg(long, global = true, env = "DROVER_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// Your certificate's private key.
    #[arg(long, global = true, env = "DROVER_KEY")]
    pub key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts with their state, versions and health.
    Hosts {
        /// Only hosts whose labels match, e.g. region=eu,env=prod (also key!=value).
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
    },
    /// Show one host in detail.
    Host { host_id: String },
    /// The live coordinators and the shards each leads.
    Coordinators,
    /// Which artifact runs in each stage (environment) of a pipeline.
    Environments {
        #[arg(long)]
        pipeline: String,
    },
    /// Artifacts on the origin: push from CI, list, show.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// The coordinator's embedded store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Send one command (pull, verify, restart, rollback) to one host and wait for its result.
    Command(command::Send),
    /// Pipelines: apply a TOML spec, get, list.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Deploys: start (and wait), status, list, watch, pause, resume, approve, abort, rollback.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Release trains: several pipelines in dependency order; start (and wait), status, list, watch, abort.
    #[command(subcommand)]
    Train(trains::TrainCommand),
    /// Config bundles per service and environment: push (prints the digest to deploy), list.
    #[command(subcommand)]
    Config(configs::ConfigCommand),
    /// Feature flags per environment, without a deploy: set, rollback, list.
    #[command(subcommand)]
    Flag(flags::FlagCommand),
    /// Webhooks told about deploys and trains: subscribe, unsubscribe, list, status.
    #[command(subcommand)]
    Notifications(notifications::NotificationsCommand),
    /// The audit log of a service: every deploy, batch, approval and rollback, and why.
    Audit {
        #[arg(long)]
        service: String,
        /// Only the last DURATION (e.g. 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
    },
    /// The built-in certificate authority: create it, issue certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// What ran for a service at a time (default: now).
    Running {
        #[arg(long)]
        service: String,
        /// RFC 3339 time, e.g. 2026-11-21T10:00:00Z.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        at: Option<std::time::SystemTime>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Start a deploy; with --wait, follow it and exit 0 (COMPLETE), 2 (ROLLED_BACK) or 1.
    Start {
        #[arg(long)]
        pipeline: String,
        /// sha256 of a pushed artifact (with --config: the code of the
        /// config's environment, which may be left out).
        #[arg(long, default_value = "", required_unless_present = "config")]
        artifact: String,
        /// A config-only deploy: the digest of a pushed config bundle
        /// (`droverctl config push`), through its environment's stage.
        #[arg(long, default_value = "")]
        config: String,
        /// Retrying with the same key returns the same deploy.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        #[arg(long, default_value = "")]
        git_sha: String,
        #[arg(long, env = "USER", default_value = "droverctl")]
        requester: String,
        #[arg(long)]
        wait: bool,
        /// Start at this stage; refused unless the artifact passed every earlier stage.
        #[arg(long, default_value = "")]
        from_stage: String,
        /// With --from-stage: go past stages the artifact did not pass (recorded).
        #[arg(long)]
        force: bool,
    },
    Status {
        id: String,
    },
    List {
        #[arg(long, default_value = "")]
        pipeline: String,
    },
    /// Follow a deploy to its end (exit codes as start --wait).
    Watch {
        id: String,
    },
    /// Pause after the batch in flight.
    Pause(Control),
    Resume(Control),
    /// Let a stage that requires approval start.
    Approve(Control),
    /// Stop where it is (--rollback: and roll back what changed).
    Abort {
        #[command(flatten)]
        control: Control,
        #[arg(long)]
        rollback: bool,
    },
    /// Return every touched host to the last known-good release now.
    Rollback(Control),
    /// Pass the canary step in flight (or on hold) now, skipping the rest of its bake.
    Promote(Control),
}

#[derive(Debug, clap::Args)]
pub struct Control {
    pub id: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(long, env = "USER", default_value = "droverctl")]
    pub requester: String,
}

impl Control {
    fn to_ref(&self, rollback: bool) -> drover_common::proto::DeployRef {
        drover_common::proto::DeployRef {
            id: self.id.clone(),
            requester: self.requester.clone(),
            reason: self.reason.clone(),
            rollback,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Create the pipeline in the file, or update it if it exists.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
    },
    /// Show one pipeline.
    Get { name: String },
    /// List pipelines.
    List,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the running coordinator's embedded store to a new file (admin).
    Backup {
        #[arg(long)]
        to: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    /// Upload a tar.gz, or a directory (built into one, drover.toml first);
    /// prints its sha256 (the artifact's identity).
    Push {
        file: std::path::PathBuf,
        /// The sha256 CI built: the push fails, uploading nothing, unless
        /// the file's bytes hash to it.
        #[arg(long)]
        expect_sha256: Option<String>,
        /// The service it belongs to; must match its drover.toml.
        #[arg(long)]
        service: String,
        /// A version label, for people.
        #[arg(long, default_value = "")]
        version: String,
        /// The commit it was built from.
        #[arg(long, default_value = "")]
        git_sha: String,
        /// Sign the digest with this ed25519 key (`droverctl artifact keygen`).
        #[arg(long)]
        sign_key: Option<std::path::PathBuf>,
    },
    /// Sign a stored artifact (adds the signature on the origin).
    Sign {
        sha256: String,
        #[arg(long)]
        sign_key: std::path::PathBuf,
    },
    /// Make an ed25519 signing key pair: NAME.key (CI keeps it) and NAME.pub (agents trust it).
    Keygen {
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
        #[arg(long, default_value = "signer")]
        name: String,
    },
    /// Re-hash the origin's blobs (one, or all): a blob missing or damaged
    /// is re-fetched from a peer coordinator, else marked lost (exit 1).
    Verify {
        #[arg(default_value = "")]
        sha256: String,
    },
    /// Remove artifacts nothing runs or can roll back to, beyond each
    /// service's last releases and older than the retention period (the
    /// coordinator's --artifact-keep-last, --artifact-retention); every
    /// removal is audited. Prints what is kept and why.
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// List stored artifacts, newest first.
    List {
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Show one artifact.
    Show { sha256: String },
}

/// Runs one droverctl invocation; output goes to `out`.
pub async fn run(cli: Cli, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if let Command::Ca(cmd) = cli.command {
        return ca::run(cmd, out);
    }
    if let Command::Artifact(ArtifactCommand::Keygen { out: dir, name }) = &cli.command {
        return artifacts::keygen(dir, name, out);
    }
    let dialer = dialer(&cli)?;
    let channel = connect(&dialer, &cli.coordinator).await?;
    let mut deployer = DeployerClient::new(channel.clone());
    let mut origin = ArtifactsClient::new(channel).max_encoding_message_size(1 << 20);
    match cli.command {
        Command::Hosts { selector } => hosts::list(&mut deployer, &selector, cli.json, out).await,
        Command::Host { host_id } => hosts::show(&mut deployer, &host_id, cli.json, out).await,
        Command::Coordinators => coordinators::list(&mut deployer, cli.json, out).await,
        Command::Environments { pipeline } => {
            deploys::environments(&mut deployer, &pipeline, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::Push {
            file,
            expect_sha256,
            service,
            version,
            git_sha,
            sign_key,
        }) => {
            let push = artifacts::Push {
                file: &file,
                expect_sha256: expect_sha256.as_deref(),
                service: &service,
                version: &version,
                git_sha: &git_sha,
                sign_key: sign_key.as_deref(),
            };
            artifacts::push(&mut origin, push, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::Verify { sha256 }) => {
            artifacts::verify(&mut origin, &sha256, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::Gc { dry_run }) => {
            artifacts::gc(&mut origin, dry_run, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::List { service }) => {
            artifacts::list(&mut origin, &service, cli.json, out).await
        }
        Command::Command(send) => command::send(&mut deployer, send, cli.json, out).await,
        Command::Store(StoreCommand::Backup { to }) => {
            let summary = crate::store::tool::backup_online(&mut deployer, &to).await?;
            writeln!(
                out,
                "backed up {} keys at revision {} to {}",
                summary.keys,
                summary.revision,
                to.display()
            )?;
            Ok(())
        }
        Command::Pipeline(PipelineCommand::Apply { file }) => {
            pipelines::apply(&mut deployer, &file, cli.json, out).await
        }
        Command::Pipeline(PipelineCommand::Get { name }) => {
            pipelines::get(&mut deployer, &name, cli.json, out).await
        }
        Command::Pipeline(PipelineCommand::List) => {
            pipelines::list(&mut deployer, cli.json, out).await
        }
        Command::Deploy(cmd) => deploy(&mut deployer, cmd, cli.json, out).await,
        Command::Train(cmd) => trains::run(&mut deployer, cmd, cli.json, out).await,
        Command::Flag(cmd) => flags::run(&mut deployer, cmd, cli.json, out).await,
        Command::Config(cmd) => configs::run(&mut deployer, cmd, cli.json, out).await,
        Command::Notifications(cmd) => notifications::run(&mut deployer, cmd, cli.json, out).await,
        Command::Audit { service, since } => {
            audit::log(&mut deployer, &service, since, cli.json, out).await
        }
        Command::Running { service, at } => {
            audit::running(&mut deployer, &service, at, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::Show { sha256 }) => {
            artifacts::show(&mut origin, &sha256, cli.json, out).await
        }
        Command::Artifact(ArtifactCommand::Sign { sha256, sign_key }) => {
            artifacts::sign(&mut origin, &sha256, &sign_key, cli.json, out).await
        }
        Command::Ca(_) | Command::Artifact(ArtifactCommand::Keygen { .. }) => {
            unreachable!("handled before connecting")
        }
    }
}

/// Mutual TLS when --cacert, --cert and --key are given (all three or none).
fn dialer(cli: &Cli) -> anyhow::Result<drover_common::tls::client::Dialer> {
    client_dialer(cli.cert.clone(), cli.key.clone(), cli.cacert.clone())
}

/// How a client (droverctl, `drover-coordinator store backup`) dials:
/// mutual TLS with all three files, plaintext with none.
pub(crate) fn client_dialer(
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
    cacert: Option<std::path::PathBuf>,
) -> anyhow::Result<drover_common::tls::client::Dialer> {
    use drover_common::tls::client::Dialer;
    match crate::config::tls_files(cert, key, cacert, None)
        .map_err(|_| anyhow::anyhow!("mutual TLS needs all three of --cacert, --cert and --key"))?
    {
        None => Ok(Dialer::plaintext()),
        Some(files) => Ok(Dialer::tls(drover_common::tls::ClientTls::client(files)?)),
    }
}

pub(crate) async fn connect(
    dialer: &drover_common::tls::client::Dialer,
    addr: &str,
) -> anyhow::Result<Channel> {
    dialer.connect(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach coordinator {addr}: {}",
            drover_common::grpc::error_chain(&e)
        )
    })
}

/// One deploy control (pause, resume, ...), retried through a failover.
async fn steer<F, Fut>(
    client: &DeployerClient<Channel>,
    req: drover_common::proto::DeployRef,
    call: F,
) -> anyhow::Result<drover_common::proto::Deploy>
where
    F: Fn(DeployerClient<Channel>, drover_common::proto::DeployRef) -> Fut,
    Fut: std::future::Future<
            Output = Result<tonic::Response<drover_common::proto::Deploy>, tonic::Status>,
        >,
{
    through_failover(|| call(client.clone(), req.clone()))
        .await
        .map(tonic::Response::into_inner)
        .map_err(status_error)
}

async fn deploy(
    client: &mut DeployerClient<Channel>,
    cmd: DeployCommand,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    use drover_common::proto::StartDeployRequest;
    let control =
        |d: drover_common::proto::Deploy, out: &mut dyn std::io::Write| -> anyhow::Result<()> {
            if json {
                serde_json::to_writer_pretty(&mut *out, &d).map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{} {}", d.id, deploys::phase_name(d.phase()))?;
            }
            Ok(())
        };
    match cmd {
        DeployCommand::Start {
            pipeline,
            artifact,
            idempotency_key,
            git_sha,
            requester,
            wait,
            from_stage,
            force,
            config,
        } => {
            let req = StartDeployRequest {
                pipeline,
                artifact,
                config,
                idempotency_key,
                requester,
                git_sha,
                from_stage,
                force,
                train_id: String::new(),
            };
            deploys::start(client, req, wait, json, out).await
        }
        DeployCommand::Status { id } => deploys::status(client, &id, json, out).await,
        DeployCommand::List { pipeline } => deploys::list(client, &pipeline, json, out).await,
        DeployCommand::Watch { id } => deploys::watch(client, &id, json, out).await,
        DeployCommand::Pause(c) => control(
            steer(client, c.to_ref(false), |mut cl, r| async move {
                cl.pause_deploy(r).await
            })
            .await?,
            out,
        ),
        DeployCommand::Resume(c) => control(
            steer(client, c.to_ref(false), |mut cl, r| async move {
                cl.resume_deploy(r).await
            })
            .await?,
            out,
        ),
        DeployCommand::Approve(c) => control(
            steer(client, c.to_ref(false), |mut cl, r| async move {
                cl.approve_deploy(r).await
            })
            .await?,
            out,
        ),
        DeployCommand::Abort {
            control: c,
            rollback,
        } => control(
            steer(client, c.to_ref(rollback), |mut cl, r| async move {
                cl.abort_deploy(r).await
            })
            .await?,
            out,
        ),
        DeployCommand::Promote(c) => control(
            steer(client, c.to_ref(false), |mut cl, r| async move {
                cl.promote_deploy(r).await
            })
            .await?,
            out,
        ),
        DeployCommand::Rollback(c) => control(
            steer(client, c.to_ref(false), |mut cl, r| async move {
                cl.rollback_deploy(r).await
            })
            .await?,
            out,
        ),
    }
}

/// Calls `call` again while it answers UNAVAILABLE (a coordinator shutting
/// down, a shard between leaders), for up to about 30 s. Safe for writes:
/// UNAVAILABLE means the write was not applied, and starts carry their
/// idempotency key.
pub(crate) async fn through_failover<T, F, Fut>(call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    use backon::Retryable;
    call.retry(
        backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(2))
            .with_max_times(20)
            .with_jitter(),
    )
    .when(|s: &tonic::Status| s.code() == tonic::Code::Unavailable)
    .notify(|s, after| eprintln!("{}; retrying in {after:?}", s.message()))
    .await
}

/// How a followed deploy or train (`--wait`, `watch`) ended other than
/// complete: droverctl exits 2 when it rolled back, 1 otherwise, so CI
/// can branch on it.
#[derive(Debug)]
pub struct Ended {
    /// "deploy" or "train".
    pub what: &'static str,
    pub phase: &'static str,
    pub rolled_back: bool,
    pub reason: String,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ended {}: {}", self.what, self.phase, self.reason)
    }
}

impl std::error::Error for Ended {}

impl Ended {
    pub fn exit_code(&self) -> u8 {
        if self.rolled_back { 2 } else { 1 }
    }
}

/// Turns a gRPC status into an error line that names the code.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

pub(crate) fn print_json(
    out: &mut impl std::io::Write,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}
