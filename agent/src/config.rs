//! Agent settings from the command line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use drover_common::logging::LogFormat;

use crate::connection::Backoff;

#[derive(Debug, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "Drover agent: runs on every server of the fleet",
    // A setting given again wins (a systemd drop-in appending to the
    // unit's arguments); list flags such as --label still add up.
    args_override_self = true
)]
pub struct Args {
    /// Coordinator address (host:port or http://host:port). Repeat it for every coordinator.
    #[arg(long = "coordinator", required = true)]
    pub coordinators: Vec<String>,
    /// The name this host registers under (default: the host name).
    #[arg(long)]
    pub host_id: Option<String>,
    /// A label of this host, key=value (region=eu, env=prod). Repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Directory for releases and the local state journal.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// How often to push a heartbeat.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// First reconnect delay; it doubles (with jitter) up to --reconnect-max.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub reconnect_min: Duration,
    /// Longest delay between reconnect attempts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,
    /// Heartbeats queued per coordinator while it reads slowly; older ones are dropped first.
    #[arg(long, default_value_t = 16)]
    pub queue_capacity: usize,
    /// Environment for every service this agent runs, KEY=VALUE (PORT=8081). Repeatable.
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The ports of a service's two blue-green slots, SERVICE=BLUE,GREEN
    /// (web=8081,8082): each slot's process gets its port as ${PORT}.
    /// Repeatable, once per service.
    #[arg(long = "slot-ports", value_parser = crate::unit::parse_slot_ports)]
    pub slot_ports: Vec<(String, (u16, u16))>,
    /// The unprivileged user services run as when their manifest names none
    /// (`[start] user`). Used only when the agent runs as root.
    #[arg(long, default_value = "nobody")]
    pub service_user: String,
    /// Let a manifest (or --service-user) run a service as root.
    #[arg(long)]
    pub allow_root_services: bool,
    /// How often the data dir's disk is probed (a small write, fsync and
    /// remove) and its free space checked; problems go out in heartbeats.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub disk_check_interval: Duration,
    /// How services run: supervised by the agent, or as systemd units.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Process)]
    pub runtime: RuntimeKind,
    /// Where the systemd runtime writes its units.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub systemd_unit_dir: PathBuf,
    /// Releases kept per service (never fewer than current and previous).
    #[arg(long, default_value_t = 3)]
    pub keep_releases: usize,
    /// Largest artifact this agent downloads, in bytes.
    #[arg(long, default_value_t = 2 << 30)]
    pub max_artifact_bytes: u64,
    /// Largest unpacked size of one artifact, in bytes.
    #[arg(long, default_value_t = 4 << 30)]
    pub max_unpacked_bytes: u64,
    /// Unpacked bytes allowed per compressed byte of an artifact (gzip bombs
    /// are refused before they fill the disk); 0 turns the check off.
    #[arg(long, default_value_t = 100)]
    pub max_compression_ratio: u64,
    /// Most entries in one artifact.
    #[arg(long, default_value_t = 100_000)]
    pub max_entries: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// This host's certificate (`droverctl ca issue agent HOST`); with
    /// --tls-key and --tls-ca every connection is mutual TLS, and only
    /// coordinator certificates of that CA are accepted. Reloaded on SIGHUP.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// A public key (`droverctl artifact keygen`) whose signatures this host
    /// trusts; repeatable. With any, nothing starts without a valid one.
    #[arg(long = "trust-signer")]
    pub trust_signers: Vec<PathBuf>,
    /// Serve the chunks of artifacts this host holds to its peers on this
    /// address (host:port; port 0 picks one). Off when absent.
    #[arg(long)]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers reach this host at (default: the bound address).
    #[arg(long)]
    pub peer_advertise: Option<String>,
    /// Most peers served at once; more are told to go elsewhere.
    #[arg(long, default_value_t = 4)]
    pub peer_max_connections: usize,
    /// Upload bandwidth given to peers, bytes per second, all peers
    /// together (0: unlimited), so serving never starves the host's service.
    #[arg(long, default_value_t = 50 << 20)]
    pub peer_upload_bytes_per_sec: u64,
    /// Secrets for config bundles' `secret://NAME` references: a file of
    /// NAME=VALUE lines, read at each use (keep it 0600, the agent's own).
    #[arg(long)]
    pub secrets_file: Option<PathBuf>,
    /// Also resolve `secret://NAME` from the agent's environment variable
    /// PREFIX+NAME (e.g. DROVER_SECRET_), after the file.
    #[arg(long)]
    pub secrets_env_prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    Process,
    Systemd,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() || k.contains('\0') {
        return Err(format!("{s:?} has an empty or invalid key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    drover_common::labels::parse_label(s).map_err(|e| e.to_string())
}

/// Resolved agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub coordinators: Vec<String>,
    pub host_id: String,
    pub labels: HashMap<String, String>,
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub backoff: Backoff,
    pub queue_capacity: usize,
    pub env: std::collections::BTreeMap<String, String>,
    /// Blue-green slot ports per service (`--slot-ports`).
    pub slot_ports: crate::unit::SlotPorts,
    pub users: crate::runtime::UserPolicy,
    pub disk_check_interval: Duration,
    pub runtime: RuntimeKind,
    pub systemd_unit_dir: PathBuf,
    pub keep_releases: usize,
    pub limits: crate::pull::PullLimits,
    /// Mutual TLS material; `None`: plaintext.
    pub tls: Option<drover_common::tls::TlsFiles>,
    /// Public keys of trusted artifact signers.
    pub signers: drover_common::artifact::signature::TrustedSigners,
    /// Serving chunks to peers; `None`: not serving.
    pub peer: Option<crate::peer_server::PeerServing>,
    /// Where config bundles' secrets come from.
    pub secrets: crate::config_bundles::Secrets,
}

impl AgentConfig {
    pub fn from_args(args: Args) -> anyhow::Result<AgentConfig> {
        let host_id = match args.host_id {
            Some(id) => id,
            None => nix::unistd::gethostname()?
                .into_string()
                .map_err(|_| anyhow::anyhow!("the host name is not UTF-8; pass --host-id"))?,
        };
        drover_common::ids::validate_host_id(&host_id)?;
        let mut labels = HashMap::new();
        for (k, v) in args.labels {
            if labels.insert(k.clone(), v).is_some() {
                anyhow::bail!("label {k:?} is given twice");
            }
        }
        anyhow::ensure!(
            args.heartbeat_interval >= Duration::from_millis(10),
            "--heartbeat-interval must be at least 10ms"
        );
        anyhow::ensure!(
            args.reconnect_min <= args.reconnect_max,
            "--reconnect-min must not exceed --reconnect-max"
        );
        anyhow::ensure!(
            !args.disk_check_interval.is_zero(),
            "--disk-check-interval must be above zero"
        );
        anyhow::ensure!(
            args.queue_capacity > 0,
            "--queue-capacity must be at least 1"
        );
        let mut slot_ports = std::collections::BTreeMap::new();
        for (service, ports) in args.slot_ports {
            if slot_ports.insert(service.clone(), ports).is_some() {
                anyhow::bail!("--slot-ports names {service} twice");
            }
        }
        Ok(AgentConfig {
            slot_ports: crate::unit::SlotPorts(slot_ports),
            coordinators: args.coordinators,
            host_id,
            labels,
            data_dir: args.data_dir,
            heartbeat_interval: args.heartbeat_interval,
            backoff: Backoff {
                min: args.reconnect_min,
                max: args.reconnect_max,
            },
            queue_capacity: args.queue_capacity,
            env: args.env.into_iter().collect(),
            users: crate::runtime::UserPolicy {
                default_user: args.service_user,
                allow_root: args.allow_root_services,
            },
            disk_check_interval: args.disk_check_interval,
            runtime: args.runtime,
            systemd_unit_dir: args.systemd_unit_dir,
            keep_releases: args.keep_releases.max(2),
            limits: crate::pull::PullLimits {
                max_artifact_bytes: args.max_artifact_bytes,
                unpack: drover_common::artifact::Limits {
                    max_entries: args.max_entries,
                    max_unpacked_bytes: args.max_unpacked_bytes,
                    max_ratio: args.max_compression_ratio,
                    compressed_bytes: 0,
                    keep_free_bytes: 0, // set per pull from the file system (disk.rs)
                },
            },
            signers: drover_common::artifact::signature::TrustedSigners::load(&args.trust_signers)?,
            secrets: crate::config_bundles::Secrets {
                file: args.secrets_file,
                env_prefix: args.secrets_env_prefix,
            },
            peer: args
                .peer_listen
                .map(|listen| crate::peer_server::PeerServing {
                    listen,
                    advertise: args.peer_advertise,
                    max_connections: args.peer_max_connections.max(1),
                    upload_bytes_per_sec: args.peer_upload_bytes_per_sec,
                }),
            tls: match (args.tls_cert, args.tls_key, args.tls_ca) {
                (None, None, None) => None,
                (Some(cert), Some(key), Some(ca)) => Some(drover_common::tls::TlsFiles {
                    cert,
                    key,
                    ca,
                    deny_list: None,
                }),
                _ => anyhow::bail!("TLS needs all three of --tls-cert, --tls-key and --tls-ca"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_given_again_wins_and_repeated_lists_add_up() {
        let args = Args::try_parse_from([
            "drover-agent",
            "--coordinator",
            "a:1",
            "--coordinator",
            "b:2",
            "--data-dir",
            "/d",
            "--label",
            "env=prod",
            "--label",
            "zone=a",
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-interval",
            "1s",
        ])
        .unwrap();
        assert_eq!(args.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(args.coordinators, ["a:1", "b:2"]);
        assert_eq!(args.labels.len(), 2);
    }
}
