//! Coordinator settings: clap flags over an optional TOML file over defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use drover_common::logging::LogFormat;
use serde::Deserialize;

use crate::router::RouterConfig;

/// Default API port of a coordinator.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Command line of `drover-coordinator`. Every setting may also come from
/// the `--config` file; a flag wins over the file.
#[derive(Debug, Parser)]
#[command(
    name = "drover-coordinator",
    version,
    about = "Drover coordinator: fleet registry and deploy API"
)]
pub struct Args {
    /// Maintenance tools instead of serving (`store check|backup|restore`).
    #[command(subcommand)]
    pub tool: Option<Tool>,
    /// TOML file with the same settings as the flags (snake_case keys).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the gRPC API (AgentControl, Deployer, health, reflection). Port 0 picks a free one.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory for the coordinator's state. It also receives `listen.addr`, the bound address.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Name of this coordinator in logs and Welcome messages (default: the host name).
    #[arg(long)]
    pub id: Option<String>,
    /// Serve Prometheus metrics over HTTP at this address (`/metrics`).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// How long a new agent stream may take to send its Hello.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub hello_timeout: Option<Duration>,
    /// Largest message accepted from a client, in bytes.
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// How long a clean shutdown may take before connections are dropped.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Largest artifact accepted by Upload, in bytes.
    #[arg(long)]
    pub max_artifact_bytes: Option<u64>,
    /// Address agents use to reach this coordinator's origin (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Peers (hosts holding the artifact) handed to each pull, best first
    /// (default 4); 0: every host pulls from the origin.
    #[arg(long)]
    pub peers_per_pull: Option<usize>,
    /// How agents pull: `chunks` (default: only what they lack, from peers
    /// first, the origin for the rest) or `whole` (every agent fetches the
    /// whole file from the origin, as before chunk indexes).
    #[arg(long, value_enum)]
    pub pull_mode: Option<PullMode>,
    /// Artifacts younger than this are never collected (default 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub artifact_retention: Option<Duration>,
    /// The last uploads of each service never collected (default 5).
    #[arg(long)]
    pub artifact_keep_last: Option<usize>,
    /// How often the origin collects unused artifacts (default 1h; 0s:
    /// never, only `droverctl artifact gc`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub gc_interval: Option<Duration>,
    /// Where webhook signing secrets are: a subscription's `secret` names a
    /// file here (same directory on every coordinator).
    #[arg(long)]
    pub webhook_secrets: Option<PathBuf>,
    /// A host disconnected or gone this long is dropped from the registry
    /// (default 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub host_retention: Option<Duration>,
    /// The most hosts the registry holds (default 250000); at the limit a
    /// new host displaces the one away longest, or is refused when all are
    /// connected.
    #[arg(long)]
    pub max_hosts: Option<usize>,
    /// Prefix of every key this coordinator writes to its store.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Where state lives: `embedded` (on disk in --data-dir, one coordinator)
    /// or `etcd` (--etcd-endpoints).
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// etcd client URLs (http://host:2379), comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Number of shards pipelines are spread over (every coordinator must agree).
    #[arg(long)]
    pub shards: Option<u32>,
    /// TTL of shard leader leases; keep-alive every TTL/3.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Time after start before this coordinator takes a share of the shards
    /// from ready peers: long enough for agents to reconnect (their
    /// --reconnect-max), so it never plans a deploy on half a fleet.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// This coordinator's certificate (PEM; `droverctl ca issue coordinator ID`).
    /// With --tls-key and --tls-ca, every connection is mutual TLS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA every peer's certificate must chain to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Certificates refused although valid: serial numbers or spiffe:// ids, one a line (reloaded on SIGHUP).
    #[arg(long)]
    pub tls_deny_list: Option<PathBuf>,
    /// Authorization policy (TOML, reloaded on SIGHUP); default: each built-in role to the group of its name.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Serve without TLS on a non-loopback address (nobody is authenticated; never in production).
    #[arg(long)]
    pub insecure: bool,
    /// Fault injection, never in production: keep acting as a shard leader
    /// after the lease keep-alive fails, so tests can prove that etcd and
    /// the agents refuse a deposed leader on their own.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_ignore_lease_loss: bool,
    /// Fault injection, never in production: while this file exists, the
    /// origin answers every chunk and file fetch with UNAVAILABLE (an
    /// origin cut off from the fleet; pulls must go on from peers).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_origin_down_file: Option<PathBuf>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    id: Option<String>,
    metrics_listen: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde_opt")]
    hello_timeout: Option<Duration>,
    max_message_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    shutdown_grace: Option<Duration>,
    max_artifact_bytes: Option<u64>,
    advertise: Option<String>,
    peers_per_pull: Option<usize>,
    pull_mode: Option<PullMode>,
    #[serde(default, with = "humantime_serde_opt")]
    artifact_retention: Option<Duration>,
    artifact_keep_last: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    gc_interval: Option<Duration>,
    webhook_secrets: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    host_retention: Option<Duration>,
    max_hosts: Option<usize>,
    key_prefix: Option<String>,
    store: Option<StoreKind>,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    shards: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    lease_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    warmup: Option<Duration>,
    log_format: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_deny_list: Option<PathBuf>,
    policy: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    /// Routers pipelines may name (`[routers.NAME]`), file only.
    #[serde(default)]
    routers: BTreeMap<String, RouterConfig>,
}

/// The backend of the coordinator's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Etcd,
}

/// Durations in the file are written as in the flags: "10s", "500ms".
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `drover-coordinator <tool>`.
#[derive(Debug, clap::Subcommand)]
pub enum Tool {
    /// Check, back up or restore the embedded store.
    #[command(subcommand)]
    Store(crate::store::tool::StoreTool),
}

/// How agents pull artifacts (`--pull-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullMode {
    /// By content-defined chunks: reused, from peers, the origin for the rest.
    #[default]
    Chunks,
    /// The whole file from the origin.
    Whole,
}

/// Resolved settings of a running coordinator.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub id: String,
    pub metrics_listen: Option<SocketAddr>,
    pub hello_timeout: Duration,
    pub max_message_bytes: usize,
    pub shutdown_grace: Duration,
    pub max_artifact_bytes: u64,
    pub advertise: Option<String>,
    /// Peers handed to each pull (tracker; 0: origin only).
    pub peers_per_pull: usize,
    pub pull_mode: PullMode,
    /// What artifact gc keeps.
    pub retention_policy: crate::origin::retention::RetentionPolicy,
    /// The periodic gc sweep (zero: off).
    pub gc_interval: Duration,
    /// Webhook signing secrets (`--webhook-secrets`).
    pub webhook_secrets: Option<PathBuf>,
    /// What the host registry keeps.
    pub retention: crate::fleet::Retention,
    pub key_prefix: String,
    pub store: StoreKind,
    pub etcd_endpoints: Vec<String>,
    pub shards: u32,
    pub lease_ttl: Duration,
    pub warmup: Duration,
    pub log_format: LogFormat,
    /// Mutual TLS material; `None`: plaintext (loopback or `--insecure`).
    pub tls: Option<drover_common::tls::TlsFiles>,
    /// The authorization policy file (with TLS).
    pub policy: Option<PathBuf>,
    /// Plaintext beyond loopback was asked for explicitly.
    pub insecure: bool,
    /// See `--fault-ignore-lease-loss` (only with the `fault-injection`
    /// cargo feature; always false in release builds).
    pub fault_ignore_lease_loss: bool,
    /// See `--fault-origin-down-file` (only with `fault-injection`).
    pub fault_origin_down_file: Option<PathBuf>,
    /// Routers pipelines may name (`[routers.NAME]` in the config file).
    pub routers: BTreeMap<String, RouterConfig>,
}

impl Config {
    /// Settings for tests and embedding: everything default but the two
    /// things every coordinator needs.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen,
            data_dir: data_dir.into(),
            id: default_id(),
            metrics_listen: None,
            hello_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            max_artifact_bytes: 2 << 30,
            peers_per_pull: 4,
            pull_mode: PullMode::Chunks,
            retention_policy: Default::default(),
            gc_interval: Duration::from_secs(3600),
            webhook_secrets: None,
            advertise: None,
            retention: crate::fleet::Retention::default(),
            key_prefix: "/drover".into(),
            store: StoreKind::Embedded,
            etcd_endpoints: Vec::new(),
            shards: crate::ha::shards::DEFAULT_SHARDS,
            lease_ttl: Duration::from_secs(3),
            warmup: Duration::from_secs(6),
            log_format: LogFormat::Text,
            tls: None,
            policy: None,
            insecure: false,
            fault_ignore_lease_loss: false,
            fault_origin_down_file: None,
            routers: BTreeMap::new(),
        }
    }

    /// Merges flags over the file named by `--config` over defaults.
    pub fn from_args(args: Args) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = match args.listen.or(file.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN.parse()?,
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .context("--data-dir (or data_dir in the config file) is required")?;
        let mut cfg = Config::new(listen, data_dir);
        for (name, router) in &file.routers {
            anyhow::ensure!(
                crate::router::valid_name(name),
                "routers.{name}: not a router name (letters, digits, '-', '_', '.', ':')"
            );
            if let Some(problem) = router.problem() {
                anyhow::bail!("routers.{name}.{problem}");
            }
        }
        cfg.routers = file.routers.clone();
        if let Some(id) = args.id.or(file.id) {
            cfg.id = id;
        }
        cfg.metrics_listen = args.metrics_listen.or(file.metrics_listen);
        if let Some(t) = args.hello_timeout.or(file.hello_timeout) {
            cfg.hello_timeout = t;
        }
        if let Some(n) = args.max_message_bytes.or(file.max_message_bytes) {
            anyhow::ensure!(
                n >= 4096,
                "max_message_bytes must be at least 4096, got {n}"
            );
            cfg.max_message_bytes = n;
        }
        if let Some(t) = args.shutdown_grace.or(file.shutdown_grace) {
            cfg.shutdown_grace = t;
        }
        if let Some(age) = args.artifact_retention.or(file.artifact_retention) {
            cfg.retention_policy.max_age = age;
        }
        if let Some(n) = args.artifact_keep_last.or(file.artifact_keep_last) {
            anyhow::ensure!(n >= 1, "artifact_keep_last must be at least 1");
            cfg.retention_policy.keep_last = n;
        }
        if let Some(every) = args.gc_interval.or(file.gc_interval) {
            cfg.gc_interval = every;
        }
        cfg.webhook_secrets = args
            .webhook_secrets
            .clone()
            .or(file.webhook_secrets.clone());
        if let Some(mode) = args.pull_mode.or(file.pull_mode) {
            cfg.pull_mode = mode;
        }
        if let Some(n) = args.peers_per_pull.or(file.peers_per_pull) {
            anyhow::ensure!(n <= 32, "peers_per_pull must be at most 32");
            cfg.peers_per_pull = n;
        }
        if let Some(n) = args.max_artifact_bytes.or(file.max_artifact_bytes) {
            cfg.max_artifact_bytes = n;
        }
        cfg.advertise = args.advertise.or(file.advertise);
        if let Some(t) = args.host_retention.or(file.host_retention) {
            anyhow::ensure!(
                t >= Duration::from_secs(1),
                "host_retention must be at least 1s"
            );
            cfg.retention.forget_after = t;
        }
        if let Some(n) = args.max_hosts.or(file.max_hosts) {
            anyhow::ensure!(n >= 1, "max_hosts must be at least 1");
            cfg.retention.max_hosts = n;
        }
        if let Some(prefix) = args.key_prefix.or(file.key_prefix) {
            anyhow::ensure!(
                prefix.starts_with('/') && !prefix.ends_with('/'),
                "key_prefix must start with '/' and not end with one, got {prefix:?}"
            );
            cfg.key_prefix = prefix;
        }
        cfg.store = args.store.or(file.store).unwrap_or_default();
        cfg.etcd_endpoints = if args.etcd_endpoints.is_empty() {
            file.etcd_endpoints
        } else {
            args.etcd_endpoints
        };
        if let Some(n) = args.shards.or(file.shards) {
            anyhow::ensure!(
                (1..=1024).contains(&n),
                "shards must be between 1 and 1024, got {n}"
            );
            cfg.shards = n;
        }
        #[cfg(feature = "fault-injection")]
        {
            cfg.fault_ignore_lease_loss = args.fault_ignore_lease_loss;
            cfg.fault_origin_down_file = args.fault_origin_down_file;
        }
        if let Some(w) = args.warmup.or(file.warmup) {
            cfg.warmup = w;
        }
        if let Some(t) = args.lease_ttl.or(file.lease_ttl) {
            anyhow::ensure!(t >= Duration::from_secs(1), "lease_ttl must be at least 1s");
            cfg.lease_ttl = t;
        }
        if cfg.store == StoreKind::Etcd {
            anyhow::ensure!(
                !cfg.etcd_endpoints.is_empty(),
                "--store etcd needs --etcd-endpoints"
            );
        }
        cfg.tls = tls_files(
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            args.tls_ca.or(file.tls_ca),
            args.tls_deny_list.or(file.tls_deny_list),
        )?;
        cfg.policy = args.policy.or(file.policy);
        cfg.insecure = args.insecure || file.insecure;
        anyhow::ensure!(
            cfg.policy.is_none() || cfg.tls.is_some(),
            "--policy needs TLS (--tls-cert, --tls-key, --tls-ca): without certificates nobody has an identity to authorize"
        );
        anyhow::ensure!(
            cfg.tls.is_some() || cfg.listen.ip().is_loopback() || cfg.insecure,
            "refusing to serve {} without TLS: give --tls-cert, --tls-key and --tls-ca (or --insecure to accept anyone who can reach the port)",
            cfg.listen
        );
        cfg.log_format = match (args.log_format, file.log_format.as_deref()) {
            (Some(f), _) => f,
            (None, Some("json")) => LogFormat::Json,
            (None, Some("text") | None) => LogFormat::Text,
            (None, Some(other)) => {
                anyhow::bail!("log_format must be \"text\" or \"json\", got {other:?}")
            }
        };
        Ok(cfg)
    }
}

/// The TLS files: all of cert, key and CA, or none of them.
pub fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    deny_list: Option<PathBuf>,
) -> anyhow::Result<Option<drover_common::tls::TlsFiles>> {
    match (cert, key, ca) {
        (None, None, None) => {
            anyhow::ensure!(deny_list.is_none(), "--tls-deny-list needs TLS");
            Ok(None)
        }
        (Some(cert), Some(key), Some(ca)) => Ok(Some(drover_common::tls::TlsFiles {
            cert,
            key,
            ca,
            deny_list,
        })),
        _ => anyhow::bail!("TLS needs all three of --tls-cert, --tls-key and --tls-ca"),
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

fn default_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/var/lib/drover\"\nhello_timeout = \"3s\"\nid = \"c1\"\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "drover-coordinator",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9100",
        ]);
        let cfg = Config::from_args(args).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/drover"));
        assert_eq!(cfg.hello_timeout, Duration::from_secs(3));
        assert_eq!(cfg.id, "c1");
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_and_missing_data_dir_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let args = Args::parse_from(["x", "--config", file.to_str().unwrap()]);
        let err = format!("{:#}", Config::from_args(args).unwrap_err());
        assert!(err.contains("lisen"), "{err}");
        let err = Config::from_args(Args::parse_from(["x"])).unwrap_err();
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }

    #[test]
    fn plaintext_beyond_loopback_needs_insecure() {
        let args = |extra: &[&str]| {
            let mut v = vec!["x", "--data-dir", "/tmp/d", "--listen", "0.0.0.0:7070"];
            v.extend_from_slice(extra);
            Config::from_args(Args::parse_from(v))
        };
        let err = args(&[]).unwrap_err().to_string();
        assert!(err.contains("without TLS"), "{err}");
        assert!(args(&["--insecure"]).unwrap().insecure);
        let err = args(&["--tls-cert", "c.pem"]).unwrap_err().to_string();
        assert!(err.contains("all three"), "{err}");
        let cfg = args(&["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "ca"]).unwrap();
        assert!(cfg.tls.is_some());
    }
}
