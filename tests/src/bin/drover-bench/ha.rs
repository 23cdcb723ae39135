//! HA benchmarks on a real etcd with three coordinators and drover-fleetsim
//! hosts connected to all of them.
//!
//! - `failover`: a deploy is always running; each trial kill -9s the leader
//!   of its shard and times, from the kill, until the deploy's record is
//!   written by a new leader (the deploy progressing again). The killed
//!   coordinator is restarted and the cluster left to settle before the
//!   next trial.
//! - `etcd-writes`: etcd's revision (every write raises it by one) over an
//!   idle window with the agents connected, then over one deploy.

use std::process::Command;
use std::time::{Duration, Instant};

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    CreatePipelineRequest, ListCoordinatorsRequest, Pipeline, StartDeployRequest,
};
use drover_coordinator::ha::shards::shard_of;
use drover_tests::{ChildGuard, Cluster, TestDir, bins, wait_until, wait_until_ok};
use tonic::transport::Channel;

const PIPELINE: &str = "bench";

/// Three coordinators, `hosts` simulated hosts connected to all of them.
async fn cluster(dir: &TestDir, ttl: &str, hosts: usize) -> (Cluster, ChildGuard) {
    let cluster = Cluster::start(dir, 3, ttl, &["--log-format", "json"]).await;
    let mut cmd = Command::new(bins::bin("drover-fleetsim"));
    for addr in cluster.addrs() {
        cmd.args(["--coordinator", &addr]);
    }
    cmd.args(["--hosts", &hosts.to_string(), "--label", "env=prod"])
        .args(["--heartbeat-interval", "250ms", "--connect-rate", "2000"])
        .args(["--reconnect-max", "500ms"]);
    let sim = ChildGuard::spawn("fleetsim", cmd, &dir.path().join("fleetsim.log"));
    for i in 0..3 {
        let c = cluster.get(i);
        wait_until_ok(
            &format!("{} to see every host", c.name()),
            Duration::from_secs(120),
            || async { c.hosts("env=prod").await.len() == hosts },
        )
        .await;
    }
    wait_settled(&cluster).await;
    (cluster, sim)
}

/// Every coordinator ready, every shard led.
async fn wait_settled(cluster: &Cluster) {
    let c = cluster.get(0);
    wait_until(
        "the shards shared by three ready coordinators",
        Duration::from_secs(60),
        || async {
            let r = api(c)
                .await
                .list_coordinators(ListCoordinatorsRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let ready = r.coordinators.iter().filter(|c| c.ready).count();
            let led: usize = r.coordinators.iter().map(|c| c.shards.len()).sum();
            if ready == 3 && led == 16 && r.coordinators.iter().all(|c| c.shards.len() <= 6) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    )
    .await;
}

async fn api(c: &drover_tests::Coordinator) -> DeployerClient<Channel> {
    DeployerClient::new(c.channel().await).max_decoding_message_size(64 << 20)
}

async fn create_pipeline(c: &drover_tests::Coordinator, batch_percent: u32) {
    let stage = super::bench_stage(batch_percent, 1);
    api(c)
        .await
        .create_pipeline(CreatePipelineRequest {
            pipeline: Some(Pipeline {
                name: PIPELINE.into(),
                service: "hello".into(),
                stages: vec![stage],
                ..Default::default()
            }),
        })
        .await
        .expect("pipeline");
}

async fn start(c: &drover_tests::Coordinator, artifact: &str) -> String {
    api(c)
        .await
        .start_deploy(StartDeployRequest {
            pipeline: PIPELINE.into(),
            artifact: artifact.into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .id
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn failover(trials: usize, ttl: Duration, hosts: usize) {
    let dir = TestDir::new();
    let ttl_arg = humantime::format_duration(ttl).to_string();
    let (mut cluster, _sim) = cluster(&dir, &ttl_arg, hosts).await;
    // One host per batch: the deploy writes its record every few hundred ms.
    create_pipeline(cluster.get(0), 1).await;
    let versions: Vec<String> = ["v1", "v2"]
        .iter()
        .map(|v| {
            let a = drover_tests::artifacts::sample_artifact(dir.path(), "hello", v, &[]);
            cluster.get(0).push(&a.path, "hello", v)
        })
        .collect();
    let shard = shard_of(PIPELINE, 16);
    let mut deploy: Option<String> = None;
    let mut next_version = 0;
    let mut times = Vec::new();
    let mut etcd = cluster.etcd.client().await.expect("etcd");
    for trial in 0..trials {
        // A deploy that is running and has a long way to go.
        let running = match &deploy {
            Some(id) => cluster
                .deploy(id)
                .await
                .is_some_and(|d| !d.phase().is_terminal() && d.batch as usize + 10 < hosts),
            None => false,
        };
        if !running {
            if let Some(id) = &deploy {
                cluster.wait_finished(id, Duration::from_secs(300)).await;
            }
            let id = start(cluster.get(0), &versions[next_version % 2]).await;
            next_version += 1;
            wait_until_ok(
                "the deploy past its first batch",
                Duration::from_secs(60),
                || async { cluster.deploy(&id).await.is_some_and(|d| d.batch >= 1) },
            )
            .await;
            deploy = Some(id);
        }
        let id = deploy.clone().expect("a deploy");
        let key = format!("/drover/deploys/{id}");
        let (leader, old_epoch) = cluster.wait_leader(shard, None).await;
        let mut events = etcd.watch(key.as_str(), None).await.expect("watch");
        let victim = cluster.index_of(&leader);
        let killed_at = Instant::now();
        cluster.kill(victim);
        // The first write of the record by a leader elected after the kill.
        let (_, new_epoch) = cluster.wait_leader(shard, Some(&leader)).await;
        assert!(new_epoch > old_epoch);
        let progressed = loop {
            let resp = events
                .message()
                .await
                .expect("watch stream")
                .expect("watch open");
            if resp
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .any(|kv| kv.mod_revision() as u64 > new_epoch)
            {
                break killed_at.elapsed();
            }
        };
        println!(
            "trial {:>2}: killed {leader}, deploy progressing again after {:.2}s",
            trial + 1,
            progressed.as_secs_f64()
        );
        times.push(progressed.as_secs_f64());
        cluster.restart(&dir, victim).await;
        wait_settled(&cluster).await;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover over {trials} kill -9s of the leader (lease TTL {ttl_arg}, {hosts} hosts): \
         p50 {:.2}s, p99 {:.2}s, min {:.2}s, max {:.2}s; target under TTL + 1s = {:.1}s",
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        times[0],
        times[times.len() - 1],
        ttl.as_secs_f64() + 1.0
    );
}

pub async fn etcd_writes(agents: usize, window: Duration) {
    let dir = TestDir::new();
    let (cluster, _sim) = cluster(&dir, "3s", agents).await;
    let before = cluster.revision().await;
    tokio::time::sleep(window).await;
    let idle = cluster.revision().await - before;
    println!(
        "{agents} simulated agents connected to each of 3 coordinators, idle for {:.0}s: \
         {idle} etcd writes ({:.2}/s)",
        window.as_secs_f64(),
        idle as f64 / window.as_secs_f64()
    );
    create_pipeline(cluster.get(0), 10).await;
    let a = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v1", &[]);
    let digest = cluster.get(1).push(&a.path, "hello", "v1");
    let before = cluster.revision().await;
    let started = Instant::now();
    let id = start(cluster.get(2), &digest).await;
    let d = cluster.wait_finished(&id, Duration::from_secs(300)).await;
    let writes = cluster.revision().await - before;
    println!(
        "one deploy of {agents} hosts in 10 batches ({:?}, {:.1}s): {writes} etcd writes in all \
         ({} of them writes of the deploy record, each with its audit events)",
        d.phase(),
        started.elapsed().as_secs_f64(),
        d.store_writes
    );
}
