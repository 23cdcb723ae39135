//! `drover-bench canary`: end to end, how fast a bad canary is caught, how
//! much traffic it served, and whether the coordinator stays responsive
//! while it judges. A coordinator and `hosts` simulated hosts (random
//! traffic: Poisson requests, binomial errors, request latencies into
//! histogram buckets, per-host offsets); v1 rolls everywhere, then two bad
//! versions each go to a 1% canary cohort with a 30 s bake: v2 answers 3%
//! of its requests with errors (v1: 0.1%), v3 is 50 ms slower. Measured per
//! bad version: from the step's start to the rollback decision, the whole
//! deploy, the share of all requests the fleet served during the deploy
//! that the bad version served (counted by the simulator per release), and
//! the coordinator's health-check latency (asked every 20 ms throughout).
//! Checked (exit 1 otherwise): rolled back inside the bake, the share
//! under 1%, the health check's p99 under 100 ms.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    Canary, CanaryStep, CreatePipelineRequest, DeployPhase, Pipeline, StartDeployRequest,
};
use drover_tests::{ChildGuard, Coordinator, TestDir, bins, wait_until, wait_until_ok};

fn served(path: &std::path::Path) -> HashMap<String, u64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Health checks asked every 20 ms on one connection until `stop`: each
/// answer's latency (an error counts as 10 s).
async fn watch_health(coord: &Coordinator, stop: tokio::sync::watch::Receiver<bool>) -> Vec<f64> {
    let channel = coord.connect().await;
    let mut took = Vec::new();
    while !*stop.borrow() {
        let asked = Instant::now();
        let ok = drover_tests::health_status(channel.clone()).await.is_ok();
        took.push(if ok {
            asked.elapsed().as_secs_f64() * 1000.0
        } else {
            10_000.0
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    took
}

pub async fn canary(hosts: usize, heartbeat: Duration) -> bool {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &["--log-format", "json"]).await;
    let v1 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v1", &[]);
    let v2 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v2", &[]);
    let v3 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v3", &[]);
    for (a, v) in [(&v1, "v1"), (&v2, "v2"), (&v3, "v3")] {
        coord.push(&a.path, "hello", v);
    }
    let served_file = dir.path().join("served.json");
    let mut cmd = Command::new(bins::bin("drover-fleetsim"));
    cmd.args(["--coordinator", &coord.addr_arg()])
        .args(["--hosts", &hosts.to_string(), "--label", "env=prod"])
        .args([
            "--heartbeat-interval",
            &format!("{}ms", heartbeat.as_millis()),
        ])
        .args(["--error-rate-of", &format!("{}=0.001", v1.digest)])
        .args(["--error-rate-of", &format!("{}=0.03", v2.digest)])
        .args(["--latency-of", &format!("{}=50", v3.digest)])
        .arg("--served-file")
        .arg(&served_file);
    let _sim = ChildGuard::spawn("fleetsim", cmd, &dir.path().join("fleetsim.log"));
    wait_until_ok(
        "every simulated host connected",
        Duration::from_secs(120),
        || async { coord.hosts("env=prod").await.len() == hosts },
    )
    .await;
    let mut stage = super::bench_stage(10, (hosts / 10).max(1) as u32);
    stage.canary = Some(Canary {
        steps: vec![CanaryStep {
            percent: 1,
            count: 0,
            bake_ms: 30_000,
        }],
        ..Default::default()
    });
    let mut api = DeployerClient::new(coord.channel().await).max_decoding_message_size(64 << 20);
    api.create_pipeline(CreatePipelineRequest {
        pipeline: Some(Pipeline {
            name: "bench".into(),
            service: "hello".into(),
            stages: vec![stage],
            ..Default::default()
        }),
    })
    .await
    .expect("pipeline");
    let start = |artifact: String| {
        let mut api = api.clone();
        async move {
            api.start_deploy(StartDeployRequest {
                pipeline: "bench".into(),
                artifact,
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner()
            .id
        }
    };
    let id = start(v1.digest.clone()).await;
    assert_eq!(super::wait_deploy(&coord, &id).await, DeployPhase::Complete);
    let mut ok = true;
    for (bad_version, what) in [(&v2, "3% errors against 0.1%"), (&v3, "+50 ms p99")] {
        // The simulator rewrites its counts every 100 ms: the share below
        // is exact to about one rewrite at each end of the deploy.
        let before = wait_until("fresh request counts", Duration::from_secs(5), || async {
            let s = served(&served_file);
            if s.get(&v1.digest).copied().unwrap_or(0) > 0 {
                Ok(s)
            } else {
                Err("none yet".to_string())
            }
        })
        .await;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let health = watch_health(&coord, stop_rx);
        let deploy = async {
            let started = Instant::now();
            let id = start(bad_version.digest.clone()).await;
            let phase = super::wait_deploy(&coord, &id).await;
            let _ = stop_tx.send(true);
            (id, phase, started.elapsed().as_secs_f64())
        };
        let (mut took, (id, phase, deploy_secs)) = tokio::join!(health, deploy);
        tokio::time::sleep(Duration::from_millis(150)).await; // the rewrite after the end
        let after = served(&served_file);
        let delta = |sha: &str| {
            after.get(sha).copied().unwrap_or(0) - before.get(sha).copied().unwrap_or(0)
        };
        let bad = delta(&bad_version.digest);
        let all: u64 = after.keys().map(|k| delta(k)).sum();
        let share = bad as f64 / all.max(1) as f64;
        took.sort_by(f64::total_cmp);
        let p99 = took[((took.len() - 1) as f64 * 0.99).round() as usize];
        let slowest = took.last().copied().unwrap_or(f64::NAN);
        let d = api
            .clone()
            .get_deploy(drover_common::proto::DeployRef {
                id,
                ..Default::default()
            })
            .await
            .expect("get")
            .into_inner();
        let a = d.analyses.first().expect("the canary's analysis");
        let caught = phase == DeployPhase::RolledBack
            && a.verdict() == drover_common::proto::AnalysisVerdict::Fail
            && a.baked_ms < 30_000;
        let pass = caught && share < 0.01 && p99 < 100.0;
        ok &= pass;
        println!(
            "canary of a version with {what} on {} of {hosts} simulated hosts (heartbeat {heartbeat:?}, bake window 30s): \
             {phase:?}; rollback decided {:.2}s after the step started ({}), deploy start to rolled back {:.2}s; \
             the bad version served {bad} of {all} requests = {:.3}% (target under 1%); \
             health checks during the deploy: {} asked, p99 {p99:.1} ms, slowest {slowest:.1} ms (target p99 < 100 ms): {}",
            a.canary_hosts.len(),
            a.baked_ms as f64 / 1000.0,
            a.reason,
            deploy_secs,
            100.0 * share,
            took.len(),
            if pass { "PASS" } else { "FAIL" }
        );
    }
    ok
}
