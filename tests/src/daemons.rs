//! Starting the real coordinator and agent binaries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    Deploy, DeployPhase, DeployRef, GetHostRequest, Host, ListDeploysRequest, ListHostsRequest,
    StartDeployRequest,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::pki::Pki;
use crate::{ChildGuard, TestDir, bins, wait_until};

/// How long a daemon may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `drover-coordinator` on a free loopback port.
pub struct Coordinator {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    name: String,
    /// The certificate the harness (and `droverctl`) calls it with; `None`:
    /// plaintext.
    pub client: Option<crate::pki::Creds>,
}

impl Coordinator {
    /// Starts a coordinator with mutual TLS: a coordinator certificate from
    /// `pki`, and the harness calling it as an admin user.
    pub async fn start_tls(dir: &TestDir, name: &str, pki: &Pki, extra: &[&str]) -> Coordinator {
        Self::start_tls_on(dir, name, pki, "127.0.0.1:0".parse().unwrap(), extra).await
    }

    /// A coordinator whose TLS material is in `extra` (an external CA);
    /// the harness calls it as `client`.
    pub async fn start_as(
        dir: &TestDir,
        name: &str,
        extra: &[&str],
        client: crate::pki::Creds,
    ) -> Coordinator {
        Self::start_with(
            dir,
            name,
            "127.0.0.1:0".parse().unwrap(),
            extra,
            Some(client),
            None,
        )
        .await
    }

    /// [`Coordinator::start_tls`] on a given address (a restart).
    pub async fn start_tls_on(
        dir: &TestDir,
        name: &str,
        pki: &Pki,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Coordinator {
        let own = pki.coordinator(name);
        let admin = pki.user("harness-admin", &["--role", "admin"]);
        let mut flags = own.daemon_flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Self::start_with(dir, name, listen, &flags, Some(admin), None).await
    }

    /// Starts a coordinator named `name` with its data in `dir/name`.
    pub async fn start(dir: &TestDir, name: &str, extra: &[&str]) -> Coordinator {
        Self::start_on(dir, name, "127.0.0.1:0".parse().unwrap(), extra).await
    }

    /// Starts it on a given address (a restart on the same port).
    pub async fn start_on(
        dir: &TestDir,
        name: &str,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Coordinator {
        Self::start_with(dir, name, listen, extra, None, None).await
    }

    /// A coordinator inside `host`'s network namespace, on `host`'s
    /// address (plaintext beyond loopback: `--insecure`).
    pub async fn start_in(
        dir: &TestDir,
        name: &str,
        host: &crate::netns::Host,
        extra: &[&str],
    ) -> Coordinator {
        let listen = SocketAddr::from((host.ip, 0));
        let mut flags = vec!["--insecure"];
        flags.extend_from_slice(extra);
        Self::start_with(dir, name, listen, &flags, None, Some(host)).await
    }

    async fn start_with(
        dir: &TestDir,
        name: &str,
        listen: SocketAddr,
        extra: &[&str],
        client: Option<crate::pki::Creds>,
        netns: Option<&crate::netns::Host>,
    ) -> Coordinator {
        let data_dir = dir.sub(name);
        let addr_file = data_dir.join("listen.addr");
        let metrics_file = data_dir.join("metrics.addr");
        let _ = std::fs::remove_file(&addr_file);
        let _ = std::fs::remove_file(&metrics_file);
        let mut cmd = match netns {
            Some(host) => crate::netns::Lab::command(host, &bins::bin("drover-coordinator")),
            None => Command::new(bins::bin("drover-coordinator")),
        };
        let metrics = SocketAddr::from((listen.ip(), 0)).to_string();
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--metrics-listen", &metrics, "--id", name])
            .args(extra);
        let child = ChildGuard::spawn(name, cmd, &dir.path().join(format!("{name}.log")));
        let (addr, metrics_addr) = wait_until(
            "the coordinator to write its addresses",
            START_TIMEOUT,
            || async { Ok((read_addr(&addr_file)?, read_addr(&metrics_file)?)) },
        )
        .await;
        let coordinator = Coordinator {
            child,
            addr,
            metrics_addr,
            data_dir,
            name: name.to_string(),
            client,
        };
        coordinator.wait_serving().await;
        coordinator
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address as agents and droverctl take it.
    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }

    /// How the harness dials this coordinator.
    pub fn dialer(&self) -> drover_common::tls::client::Dialer {
        match &self.client {
            Some(creds) => creds.dialer(),
            None => drover_common::tls::client::Dialer::plaintext(),
        }
    }

    pub async fn channel(&self) -> Channel {
        self.dialer()
            .connect(&self.addr_arg())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    pub async fn deployer(&self) -> DeployerClient<Channel> {
        DeployerClient::new(self.channel().await)
    }

    /// Waits until the standard health check answers SERVING.
    pub async fn wait_serving(&self) {
        wait_until(
            "the coordinator to report SERVING",
            START_TIMEOUT,
            || async {
                let channel = self
                    .dialer()
                    .connect(&self.addr_arg())
                    .await
                    .map_err(|e| e.to_string())?;
                let status = health_status(channel).await?;
                if status == ServingStatus::Serving {
                    Ok(())
                } else {
                    Err(format!("{status:?}"))
                }
            },
        )
        .await
    }

    /// A channel to the coordinator (for repeated calls on one connection).
    pub async fn connect(&self) -> Channel {
        self.channel().await
    }

    /// Every host matching `selector`, following ListHosts' pages.
    pub async fn hosts(&self, selector: &str) -> Vec<Host> {
        let mut api = self.deployer().await;
        let (mut hosts, mut token) = (Vec::new(), String::new());
        loop {
            let page = api
                .list_hosts(ListHostsRequest {
                    selector: selector.to_string(),
                    page_size: 0,
                    page_token: token,
                })
                .await
                .expect("ListHosts")
                .into_inner();
            hosts.extend(page.hosts);
            if page.next_page_token.is_empty() {
                return hosts;
            }
            token = page.next_page_token;
        }
    }

    pub async fn host(&self, host_id: &str) -> Result<Host, tonic::Status> {
        self.deployer()
            .await
            .get_host(GetHostRequest {
                host_id: host_id.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Waits until `host_id` is in `state`; returns the host as seen then.
    pub async fn wait_state(
        &self,
        host_id: &str,
        state: drover_common::proto::ConnectionState,
        timeout: Duration,
    ) -> Host {
        wait_until(&format!("{host_id} to be {state:?}"), timeout, || async {
            match self.host(host_id).await {
                Ok(h) if h.state() == state => Ok(h),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// Runs `droverctl --coordinator <this> ARGS`; returns (exit code, stdout, stderr).
    /// A deploy as this coordinator answers it.
    pub async fn get_deploy(&self, id: &str) -> Deploy {
        self.deployer()
            .await
            .get_deploy(DeployRef {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("deploy {id}: {s}"))
            .into_inner()
    }

    /// `service`'s audit log, oldest first.
    pub async fn audit(&self, service: &str) -> Vec<drover_common::proto::AuditEvent> {
        self.deployer()
            .await
            .get_audit(drover_common::proto::GetAuditRequest {
                service: service.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("audit of {service}: {s}"))
            .into_inner()
            .events
    }

    /// The newest deploy of `pipeline`.
    pub async fn latest_deploy(&self, pipeline: &str) -> Deploy {
        self.deployer()
            .await
            .list_deploys(ListDeploysRequest {
                pipeline: pipeline.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("deploys of {pipeline}: {s}"))
            .into_inner()
            .deploys
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no deploy of {pipeline}"))
    }

    /// Starts a deploy (no wait); returns its id.
    pub async fn start_deploy(&self, pipeline: &str, artifact: &str) -> String {
        self.deployer()
            .await
            .start_deploy(StartDeployRequest {
                pipeline: pipeline.into(),
                artifact: artifact.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("start {pipeline}: {s}"))
            .into_inner()
            .id
    }

    /// Waits until deploy `id` is in `phase`; returns it.
    pub async fn wait_phase(&self, id: &str, phase: DeployPhase) -> Deploy {
        wait_until(
            &format!("deploy {id} {phase:?}"),
            Duration::from_secs(60),
            || async {
                let d = self.get_deploy(id).await;
                if d.phase() == phase {
                    Ok(d)
                } else {
                    Err(format!("{:?}: {}", d.phase(), d.reason))
                }
            },
        )
        .await
    }

    /// `droverctl pipeline apply` of `spec` (written to a file in `dir`);
    /// panics when it fails.
    pub fn apply_pipeline(&self, dir: &TestDir, spec: &str) {
        let path = dir.path().join(format!(
            "pipeline-{}.toml",
            drover_common::time::now_unix_micros()
        ));
        std::fs::write(&path, spec).unwrap();
        let (code, _, err) = self.droverctl(&["pipeline", "apply", "-f", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }

    pub fn droverctl(&self, args: &[&str]) -> (i32, String, String) {
        self.droverctl_with(self.client.as_ref(), args)
    }

    /// droverctl as the holder of `creds`.
    pub fn droverctl_as(&self, creds: &crate::pki::Creds, args: &[&str]) -> (i32, String, String) {
        self.droverctl_with(Some(creds), args)
    }

    fn droverctl_with(
        &self,
        creds: Option<&crate::pki::Creds>,
        args: &[&str],
    ) -> (i32, String, String) {
        let out = Command::new(bins::bin("droverctl"))
            .arg("--coordinator")
            .arg(self.addr_arg())
            .args(creds.map(|c| c.ctl_flags()).unwrap_or_default())
            .args(args)
            .output()
            .expect("running droverctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn read_addr(path: &Path) -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim().parse().map_err(|e| format!("{text:?}: {e}"))
}

/// A running `drover-agent`.
pub struct Agent {
    pub child: ChildGuard,
    pub host_id: String,
    pub data_dir: PathBuf,
}

impl Agent {
    /// Starts an agent for `host_id` connected to `coordinators`, with
    /// `extra` flags (labels, intervals, backoff).
    pub fn start(
        dir: &TestDir,
        host_id: &str,
        coordinators: &[&Coordinator],
        extra: &[&str],
    ) -> Agent {
        let addrs: Vec<String> = coordinators.iter().map(|c| c.addr_arg()).collect();
        Self::start_with_addrs(dir, host_id, &addrs, extra)
    }

    /// An agent that can run the sample service on `port`.
    pub fn start_sample(
        dir: &TestDir,
        host_id: &str,
        coordinators: &[&Coordinator],
        port: u16,
        extra: &[&str],
    ) -> Agent {
        let sample = bins::bin("drover-sample");
        let port_env = format!("PORT={port}");
        let bin_env = format!("DROVER_SAMPLE_BIN={}", sample.display());
        let mut args = vec![
            "--heartbeat-interval",
            "200ms",
            "--env",
            &port_env,
            "--env",
            &bin_env,
        ];
        args.extend_from_slice(extra);
        Self::start(dir, host_id, coordinators, &args)
    }

    pub fn start_with_addrs(
        dir: &TestDir,
        host_id: &str,
        coordinators: &[String],
        extra: &[&str],
    ) -> Agent {
        Self::start_with_env(dir, host_id, coordinators, extra, &[])
    }

    /// An agent inside `host`'s network namespace, connected to
    /// `coordinator`, with `extra` flags.
    pub fn start_in(
        dir: &TestDir,
        host_id: &str,
        host: &crate::netns::Host,
        coordinator: &str,
        extra: &[&str],
    ) -> Agent {
        let cmd = crate::netns::Lab::command(host, &bins::bin("drover-agent"));
        Self::spawn(dir, host_id, cmd, &[coordinator.to_string()], extra)
    }

    /// An agent whose own environment also holds `env` (what must never
    /// reach its services).
    pub fn start_with_env(
        dir: &TestDir,
        host_id: &str,
        coordinators: &[String],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = Command::new(bins::bin("drover-agent"));
        cmd.envs(env.iter().copied());
        Self::spawn(dir, host_id, cmd, coordinators, extra)
    }

    /// Runs `cmd` (drover-agent, maybe behind a wrapper) as host `host_id`
    /// with its data in `dir/agent-<host_id>`.
    fn spawn(
        dir: &TestDir,
        host_id: &str,
        mut cmd: Command,
        coordinators: &[String],
        extra: &[&str],
    ) -> Agent {
        let data_dir = dir.sub(&format!("agent-{host_id}"));
        for c in coordinators {
            cmd.arg("--coordinator").arg(c);
        }
        cmd.arg("--host-id")
            .arg(host_id)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra);
        let child = ChildGuard::spawn(
            &format!("agent {host_id}"),
            cmd,
            &dir.path().join(format!("agent-{host_id}.log")),
        );
        Agent {
            child,
            host_id: host_id.to_string(),
            data_dir,
        }
    }
}

impl Drop for Agent {
    /// Services run in their own process groups and outlive a killed agent
    /// on purpose (the next agent adopts them); a test must not leave them
    /// behind, so everything whose working directory is inside this agent's
    /// data dir is killed too.
    fn drop(&mut self) {
        self.child.signal_quietly(nix::sys::signal::Signal::SIGKILL);
        kill_processes_under(&self.data_dir);
    }
}

/// SIGKILLs every process whose working directory is under `dir`.
pub fn kill_processes_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// One call of the standard health check on `channel`.
pub async fn health_status(channel: Channel) -> Result<ServingStatus, String> {
    Ok(HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .status())
}

/// `drover-fleetsim` connected to `coord` with `extra` flags, its log
/// `fleetsim-<name>.log`; stopped when dropped.
pub fn fleetsim(dir: &TestDir, coord: &Coordinator, name: &str, extra: &[&str]) -> ChildGuard {
    let mut cmd = std::process::Command::new(crate::bins::bin("drover-fleetsim"));
    cmd.args(["--coordinator", &coord.addr_arg()]).args(extra);
    ChildGuard::spawn(
        &format!("fleetsim {name}"),
        cmd,
        &dir.path().join(format!("fleetsim-{name}.log")),
    )
}
