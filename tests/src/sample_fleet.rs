//! A coordinator (embedded store) and agents that run the sample service
//! under steady real load: what deploy and canary tests roll versions onto.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::artifacts::sample_artifact;
use crate::{
    Agent, ChildGuard, Coordinator, TestDir, bins, free_service_port, http_get_status,
    wait_until_ok,
};

pub struct SampleFleet {
    pub dir: TestDir,
    pub coord: Coordinator,
    pub agents: Vec<Agent>,
    pub load: Vec<ChildGuard>,
    /// (host id, port of its sample service)
    pub ports: Vec<(String, u16)>,
    /// The CA of a fleet started with [`SampleFleet::start_tls`].
    pub pki: Option<crate::pki::Pki>,
    /// Agents' data dirs in memory ([`SampleFleet::start_in_memory`]);
    /// unmounted after the agents stop.
    pub mounts: Vec<crate::tmpfs::Tmpfs>,
}

impl SampleFleet {
    /// `n` agents `web-0`.. labelled env=prod and idx=<i>, each service
    /// under `rps` requests a second (0: no load).
    pub async fn start(n: usize, rps: u32) -> SampleFleet {
        Self::start_with(n, rps, |_| Vec::new()).await
    }

    /// Like [`SampleFleet::start`], with `extra(i)` more agent flags for
    /// host `i` (labels such as region=eu, `--env` values).
    pub async fn start_with(
        n: usize,
        rps: u32,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> SampleFleet {
        Self::start_inner(n, rps, extra, None, &[], None).await
    }

    /// Like [`SampleFleet::start_with`], the coordinator started with
    /// `coordinator` flags too (a `--config` file).
    pub async fn start_configured(
        n: usize,
        rps: u32,
        extra: impl Fn(usize) -> Vec<String>,
        coordinator: &[&str],
    ) -> SampleFleet {
        Self::start_inner(n, rps, extra, None, coordinator, None).await
    }

    /// Like [`SampleFleet::start_configured`], each agent's data dir a
    /// tmpfs of `size` (tests that put gigabytes through many agents use
    /// memory, not the CI machine's disk).
    pub async fn start_in_memory(
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
        coordinator: &[&str],
        size: &str,
    ) -> SampleFleet {
        Self::start_inner(n, 0, extra, None, coordinator, Some(size)).await
    }

    /// Like [`SampleFleet::start_with`], every connection mutual TLS with
    /// certificates from a CA made for the test; `coordinator` are more
    /// coordinator flags (a `--policy`).
    pub async fn start_tls(
        n: usize,
        rps: u32,
        extra: impl Fn(usize) -> Vec<String>,
        coordinator: &[&str],
    ) -> SampleFleet {
        Self::start_inner(n, rps, extra, Some(coordinator), &[], None).await
    }

    async fn start_inner(
        n: usize,
        rps: u32,
        extra: impl Fn(usize) -> Vec<String>,
        tls: Option<&[&str]>,
        plain_flags: &[&str],
        tmpfs: Option<&str>,
    ) -> SampleFleet {
        let dir = TestDir::new();
        let pki = tls.map(|_| crate::pki::Pki::new(&dir));
        let coord = match (&pki, tls) {
            (Some(pki), Some(flags)) => Coordinator::start_tls(&dir, "coord", pki, flags).await,
            _ => Coordinator::start(&dir, "coord", plain_flags).await,
        };
        let mut agents = Vec::new();
        let mut load = Vec::new();
        let mut ports = Vec::new();
        let mut mounts = Vec::new();
        for i in 0..n {
            let host = format!("web-{i}");
            if let Some(size) = tmpfs {
                mounts.push(crate::tmpfs::Tmpfs::mount(
                    &dir.path().join(format!("agent-{host}")),
                    size,
                ));
            }
            let port = free_service_port();
            let idx = format!("idx={i}");
            let mut more = extra(i);
            if let Some(pki) = &pki {
                more.extend(pki.agent_flags(&host));
            }
            let mut flags = vec!["--label", "env=prod", "--label", &idx];
            flags.extend(more.iter().map(String::as_str));
            agents.push(Agent::start_sample(&dir, &host, &[&coord], port, &flags));
            if rps > 0 {
                load.push(start_load(&dir, &host, port, rps));
            }
            ports.push((host, port));
        }
        wait_until_ok("every agent connected", Duration::from_secs(20), || async {
            coord.hosts("env=prod").await.len() == n
        })
        .await;
        SampleFleet {
            dir,
            coord,
            agents,
            load,
            ports,
            pki,
            mounts,
        }
    }

    /// Applies a pipeline spec with droverctl.
    pub fn apply(&self, spec: &str) {
        self.coord.apply_pipeline(&self.dir, spec);
    }

    /// Builds and pushes a sample-service version; returns its sha256.
    pub fn push(&self, version: &str, extra: &[&str]) -> String {
        let a = sample_artifact(self.dir.path(), "hello", version, extra);
        self.coord.push(&a.path, "hello", version)
    }

    /// `droverctl deploy start --wait` on `pipeline`: (exit code, stdout, stderr).
    pub fn deploy_through(&self, pipeline: &str, digest: &str) -> (i32, String, String) {
        self.coord.droverctl(&[
            "deploy",
            "start",
            "--pipeline",
            pipeline,
            "--artifact",
            digest,
            "--wait",
        ])
    }

    /// How many times each host (in order) started `version` of the sample.
    pub fn starts(&self, version: &str) -> Vec<usize> {
        self.ports
            .iter()
            .map(|(h, _)| crate::sample_starts(&self.dir, h, version))
            .collect()
    }

    /// What every host's sample service answers on /version, in host order.
    pub async fn versions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (_, port) in &self.ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            out.push(match http_get_status(addr, "/version").await {
                Ok((200, body)) => body.trim().to_string(),
                other => format!("{other:?}"),
            });
        }
        out
    }
}

/// `drover-load` sending `rps` requests a second to the sample service of
/// `host` on `port`, until dropped.
pub fn start_load(dir: &TestDir, host: &str, port: u16, rps: u32) -> ChildGuard {
    let mut cmd = Command::new(bins::bin("drover-load"));
    cmd.args([
        "--url",
        &format!("http://127.0.0.1:{port}/"),
        "--rps",
        &rps.to_string(),
    ]);
    ChildGuard::spawn(
        &format!("load {host}"),
        cmd,
        &dir.path().join(format!("load-{host}.log")),
    )
}
