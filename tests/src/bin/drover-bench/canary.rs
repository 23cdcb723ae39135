//! `drover-bench canary`: how fast a bad canary is caught and how much
//! traffic it served. A coordinator and `hosts` simulated hosts (each
//! serving a steady 100 requests per heartbeat); v1 rolls everywhere, then
//! v2 — which answers 3% of its requests with errors against v1's 0.1% —
//! goes to a 1% canary cohort with a 30 s bake. Measured: from the step's
//! start to the rollback decision (the analysis' bake time), the whole
//! deploy, and the share of all requests the fleet served during the deploy
//! that v2 served (counted by the simulator per release).

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

pub async fn canary(hosts: usize, heartbeat: Duration) {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &["--log-format", "json"]).await;
    let v1 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v1", &[]);
    let v2 = drover_tests::artifacts::sample_artifact(dir.path(), "hello", "v2", &[]);
    coord.push(&v1.path, "hello", "v1");
    coord.push(&v2.path, "hello", "v2");
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
    // The simulator rewrites its counts every 100 ms: the share below is
    // exact to about one rewrite at each end of the deploy.
    let before = wait_until("fresh request counts", Duration::from_secs(5), || async {
        let s = served(&served_file);
        if s.get(&v1.digest).copied().unwrap_or(0) > 0 {
            Ok(s)
        } else {
            Err("none yet".to_string())
        }
    })
    .await;
    let started = Instant::now();
    let id = start(v2.digest.clone()).await;
    let phase = super::wait_deploy(&coord, &id).await;
    let deploy_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(150)).await; // the rewrite after the end
    let after = served(&served_file);
    let delta =
        |sha: &str| after.get(sha).copied().unwrap_or(0) - before.get(sha).copied().unwrap_or(0);
    let bad = delta(&v2.digest);
    let all: u64 = after.keys().map(|k| delta(k)).sum();
    let d = api
        .get_deploy(drover_common::proto::DeployRef {
            id,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    let a = d.analyses.first().expect("the canary's analysis");
    println!(
        "canary of a 3%-error version on {} of {hosts} simulated hosts (heartbeat {heartbeat:?}, bake window 30s): \
         {phase:?}; rollback decided {:.2}s after the step started ({}), deploy start to rolled back {:.2}s; \
         the bad version served {bad} of {all} requests = {:.3}% (target under 1%)",
        a.canary_hosts.len(),
        a.baked_ms as f64 / 1000.0,
        a.reason,
        deploy_secs,
        100.0 * bad as f64 / all.max(1) as f64
    );
}
