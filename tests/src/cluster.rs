//! Several coordinators on one real etcd, and what tests ask of them: who
//! leads a shard, how many shards each leads, their metrics, restarts.

use std::net::SocketAddr;
use std::time::Duration;

use drover_common::proto::{Deploy, DeployRef};

use crate::{Coordinator, Etcd, TestDir, http_get, wait_until};

pub struct Cluster {
    pub etcd: Etcd,
    /// `None` while a coordinator is stopped (see [`Cluster::kill`]).
    pub coordinators: Vec<Option<Coordinator>>,
    names: Vec<String>,
    addrs: Vec<SocketAddr>,
    ttl: String,
    extra: Vec<String>,
}

/// A Prometheus sample of `text` by exact metric name; panics when the
/// page lacks it (a renamed metric must not read as zero).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

impl Cluster {
    /// etcd plus `n` coordinators `c1`..`cn` with lease TTL `ttl` and
    /// `extra` flags.
    pub async fn start(dir: &TestDir, n: usize, ttl: &str, extra: &[&str]) -> Cluster {
        let etcd = Etcd::start(dir, "etcd").await;
        let mut cluster = Cluster {
            etcd,
            coordinators: Vec::new(),
            names: Vec::new(),
            addrs: Vec::new(),
            ttl: ttl.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..n {
            cluster.add(dir).await;
        }
        cluster
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            self.etcd.endpoint.clone(),
            "--lease-ttl".into(),
            self.ttl.clone(),
            // Test agents reconnect within 500 ms.
            "--warmup".into(),
            "1s".into(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts one more coordinator (it joins the others); returns its index.
    pub async fn add(&mut self, dir: &TestDir) -> usize {
        let name = format!("c{}", self.names.len() + 1);
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let c = Coordinator::start(dir, &name, &args).await;
        self.names.push(name);
        self.addrs.push(c.addr);
        self.coordinators.push(Some(c));
        self.coordinators.len() - 1
    }

    /// The coordinators that are running.
    pub fn running(&self) -> impl Iterator<Item = &Coordinator> {
        self.coordinators.iter().flatten()
    }

    pub fn get(&self, i: usize) -> &Coordinator {
        self.coordinators[i]
            .as_ref()
            .unwrap_or_else(|| panic!("{} is stopped", self.names[i]))
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no coordinator {name}"))
    }

    /// Any running coordinator other than `not`.
    pub fn other_than(&self, not: usize) -> &Coordinator {
        self.coordinators
            .iter()
            .enumerate()
            .find_map(|(i, c)| c.as_ref().filter(|_| i != not))
            .expect("another coordinator is running")
    }

    /// Every coordinator's address (agents are given one or all of them).
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.iter().map(|a| a.to_string()).collect()
    }

    /// SIGKILLs coordinator `i`.
    pub fn kill(&mut self, i: usize) {
        self.coordinators[i] = None;
    }

    /// Starts coordinator `i` again on its old address and data dir.
    pub async fn restart(&mut self, dir: &TestDir, i: usize) {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let c = Coordinator::start_on(dir, &self.names[i], self.addrs[i], &args).await;
        self.coordinators[i] = Some(c);
    }

    /// The id and epoch of `shard`'s leader, read from etcd.
    pub async fn leader(&self, shard: u32) -> Option<(String, u64)> {
        let mut client = self.etcd.client().await.ok()?;
        let resp = client
            .get(format!("/drover/elections/shard-{shard}"), None)
            .await
            .ok()?;
        let kv = resp.kvs().first()?;
        Some((
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.create_revision() as u64,
        ))
    }

    /// Waits for a leader of `shard` other than `not` (None: any).
    pub async fn wait_leader(&self, shard: u32, not: Option<&str>) -> (String, u64) {
        wait_until(
            &format!("a leader of shard {shard} other than {not:?}"),
            Duration::from_secs(30),
            || async {
                match self.leader(shard).await {
                    Some((id, epoch)) if Some(id.as_str()) != not => Ok((id, epoch)),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// Shards led per coordinator id, read from etcd.
    pub async fn shares(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        let Ok(mut client) = self.etcd.client().await else {
            return out;
        };
        let Ok(resp) = client
            .get(
                "/drover/elections/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
        else {
            return out;
        };
        for kv in resp.kvs() {
            *out.entry(String::from_utf8_lossy(kv.value()).into_owned())
                .or_insert(0) += 1;
        }
        out
    }

    /// etcd's current revision: every write raises it by one.
    pub async fn revision(&self) -> i64 {
        let mut client = self.etcd.client().await.expect("etcd client");
        let resp = client.get("/drover/", None).await.expect("etcd read");
        resp.header().expect("header").revision()
    }

    /// Coordinator `i`'s metrics page.
    pub async fn metrics(&self, i: usize) -> String {
        http_get(self.get(i).metrics_addr, "/metrics").await
    }

    /// Deploy `id` as any running coordinator answers it.
    pub async fn deploy(&self, id: &str) -> Option<Deploy> {
        for c in self.coordinators.iter().flatten() {
            let Ok(channel) = drover_common::grpc::connect(&c.addr_arg()).await else {
                continue;
            };
            let mut api = drover_common::proto::deployer_client::DeployerClient::new(channel);
            if let Ok(d) = api
                .get_deploy(DeployRef {
                    id: id.to_string(),
                    ..Default::default()
                })
                .await
            {
                return Some(d.into_inner());
            }
        }
        None
    }

    /// Waits until deploy `id` is finished; returns it.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Deploy {
        wait_until(&format!("deploy {id} to finish"), timeout, || async {
            match self.deploy(id).await {
                Some(d) if d.phase().is_terminal() => Ok(d),
                Some(d) => Err(format!("{:?} batch {}", d.phase(), d.batch)),
                None => Err("no coordinator answers".into()),
            }
        })
        .await
    }
}
