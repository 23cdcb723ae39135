//! Several coordinators on a real etcd, sample agents under real load, one
//! pipeline: the set-up of the high-availability tests, and what they ask
//! of it (who leads the pipeline's shard, kill it, versions and starts per
//! host).
//!
//! ```no_run
//! # async fn t() {
//! use drover_tests::cluster_fleet::{ClusterFleet, rolling_spec};
//! let mut f = ClusterFleet::start(3, 4, &rolling_spec(300), 20).await;
//! let v1 = f.push(f.cluster.get(0), "v1", &[]);
//! let id = f.start_deploy(f.cluster.get(1), &v1).await;
//! let (killed, next) = f.kill_leader().await;
//! # }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use drover_common::proto::StartDeployRequest;
use drover_coordinator::ha::shards::shard_of;

use crate::artifacts::sample_artifact;
use crate::sample_fleet::start_load;
use crate::{
    Agent, ChildGuard, Cluster, Coordinator, TestDir, free_port, http_get_status, sample_starts,
    wait_until, wait_until_ok,
};

/// The pipeline every spec here defines.
pub const PIPELINE: &str = "hello-prod";

/// A rolling pipeline over every env=prod host, one host per batch, judged
/// under load: no inconclusive sample passes.
pub fn rolling_spec(settle_ms: u32) -> String {
    format!(
        "name = \"{PIPELINE}\"\nservice = \"hello\"\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\n\
         batch_size = 1\nsettle_ms = {settle_ms}\nstuck_timeout_ms = 6000\n\
         gate = {{ max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_FAIL\" }}\n"
    )
}

pub struct ClusterFleet {
    pub dir: TestDir,
    pub cluster: Cluster,
    pub agents: Vec<Agent>,
    /// The sample service's port per host (`web-<i>`).
    pub ports: Vec<u16>,
    /// Load on every host's service.
    pub load: Vec<ChildGuard>,
}

impl ClusterFleet {
    /// `coordinators` coordinators (lease TTL 2 s) and `hosts` agents
    /// given only the first coordinator's address (they discover the
    /// rest), each service under `rps` requests a second, `spec` applied,
    /// and the pipeline's shard led.
    pub async fn start(coordinators: usize, hosts: usize, spec: &str, rps: u32) -> ClusterFleet {
        let dir = TestDir::new();
        let cluster = Cluster::start(&dir, coordinators, "2s", &[]).await;
        Self::on(dir, cluster, hosts, spec, rps).await
    }

    /// Like [`ClusterFleet::start`] on a cluster already started in `dir`.
    pub async fn on(
        dir: TestDir,
        cluster: Cluster,
        hosts: usize,
        spec: &str,
        rps: u32,
    ) -> ClusterFleet {
        let mut agents = Vec::new();
        let mut ports = Vec::new();
        let mut load = Vec::new();
        for i in 0..hosts {
            let host = format!("web-{i}");
            let port = free_port();
            agents.push(Agent::start_sample(
                &dir,
                &host,
                &[cluster.get(0)],
                port,
                &["--label", "env=prod", "--reconnect-max", "500ms"],
            ));
            if rps > 0 {
                load.push(start_load(&dir, &host, port, rps));
            }
            ports.push(port);
        }
        let f = ClusterFleet {
            dir,
            cluster,
            agents,
            ports,
            load,
        };
        f.wait_everyone_sees_every_host().await;
        f.apply(spec);
        f.leader().await;
        f
    }

    /// Applies a pipeline spec through the last coordinator.
    pub fn apply(&self, spec: &str) {
        let last = self.cluster.coordinators.iter().flatten().last().unwrap();
        last.apply_pipeline(&self.dir, spec);
    }

    /// The pipeline's shard.
    pub fn shard(&self) -> u32 {
        shard_of(PIPELINE, 16)
    }

    /// Every running coordinator lists every agent as connected.
    pub async fn wait_everyone_sees_every_host(&self) {
        let n = self.agents.len();
        for c in self.cluster.coordinators.iter().flatten() {
            wait_until_ok(
                &format!("{} to see all {n} agents", c.name()),
                Duration::from_secs(30),
                || async {
                    let hosts = c.hosts("env=prod").await;
                    hosts.len() == n
                        && hosts
                            .iter()
                            .all(|h| h.state() == drover_common::proto::ConnectionState::Connected)
                },
            )
            .await;
        }
    }

    /// Pushes a sample version to `via` (not necessarily the shard leader:
    /// the leader copies the blob from it when agents fetch).
    pub fn push(&self, via: &Coordinator, version: &str, extra: &[&str]) -> String {
        let a = sample_artifact(self.dir.path(), "hello", version, extra);
        via.push(&a.path, "hello", version)
    }

    /// Starts a deploy through `via` as CI does: UNAVAILABLE (the shard
    /// is changing hands) is retried for a while, with one idempotency key.
    pub async fn start_deploy(&self, via: &Coordinator, artifact: &str) -> String {
        let key = format!("ci-{}", &artifact[..12]);
        wait_until(
            &format!("a deploy to start through {}", via.name()),
            Duration::from_secs(30),
            || async {
                let started = via
                    .deployer()
                    .await
                    .start_deploy(StartDeployRequest {
                        pipeline: PIPELINE.into(),
                        artifact: artifact.to_string(),
                        requester: "ci".into(),
                        idempotency_key: key.clone(),
                        ..Default::default()
                    })
                    .await;
                match started {
                    Ok(r) => Ok(r.into_inner().id),
                    Err(s) if s.code() == tonic::Code::Unavailable => Err(s.to_string()),
                    Err(s) => panic!("start through {}: {s}", via.name()),
                }
            },
        )
        .await
    }

    /// What every host's service answers on /version, in host order.
    pub async fn versions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for port in &self.ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            out.push(match http_get_status(addr, "/version").await {
                Ok((200, body)) => body.trim().to_string(),
                other => format!("{other:?}"),
            });
        }
        out
    }

    /// How many times each host (in order) started `version`.
    pub fn starts(&self, version: &str) -> Vec<usize> {
        (0..self.agents.len())
            .map(|i| sample_starts(&self.dir, &format!("web-{i}"), version))
            .collect()
    }

    /// Index of the coordinator leading the pipeline's shard now.
    /// The shard's leader once the cluster has settled: every coordinator
    /// past its warm-up and the same lease holding the shard for two
    /// seconds (fair-share rebalancing moves shards right after a start).
    pub async fn settled_leader(&self) -> usize {
        let seen: std::sync::Mutex<Option<((String, u64), std::time::Instant)>> =
            std::sync::Mutex::new(None);
        wait_until_ok("the shards to settle", Duration::from_secs(30), || async {
            let warm = self
                .cluster
                .running()
                .all(|c| c.child.log().contains("warm-up over"));
            let now = self.cluster.leader(self.shard()).await;
            let mut seen = seen.lock().unwrap();
            match (now, seen.as_ref()) {
                (Some(now), Some((before, since))) if *before == now => {
                    warm && since.elapsed() >= Duration::from_secs(2)
                }
                (Some(now), _) => {
                    *seen = Some((now, std::time::Instant::now()));
                    false
                }
                (None, _) => false,
            }
        })
        .await;
        self.leader().await
    }

    pub async fn leader(&self) -> usize {
        let (id, _) = self.cluster.wait_leader(self.shard(), None).await;
        self.cluster.index_of(&id)
    }

    /// kill -9 of the shard's leader: (its index, its id).
    pub async fn kill_leader_now(&mut self) -> (usize, String) {
        let leader = self.leader().await;
        let killed = self.cluster.get(leader).name().to_string();
        self.cluster.kill(leader);
        (leader, killed)
    }

    /// Waits for a standby to lead after `killed` (index `i`), then starts
    /// the killed one again (it rejoins); the new leader's id.
    pub async fn replace_killed(&mut self, i: usize, killed: &str) -> String {
        let (next, _) = self.cluster.wait_leader(self.shard(), Some(killed)).await;
        self.cluster.restart(&self.dir, i).await;
        next
    }

    /// Kills the shard's leader, waits for a standby to lead, starts the
    /// killed one again. Returns (killed, new leader) ids.
    pub async fn kill_leader(&mut self) -> (String, String) {
        let (i, killed) = self.kill_leader_now().await;
        let next = self.replace_killed(i, &killed).await;
        (killed, next)
    }
}
