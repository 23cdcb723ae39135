//! The canary judge at fleet scale, end to end: one canary host against a
//! stage of 300 simulated hosts (drover-fleetsim, random traffic with
//! continuous latencies) keeps the coordinator responsive — its health
//! check answers within 100 ms throughout every look — and reaches a
//! verdict, judged host against hosts.

use std::time::{Duration, Instant};

use drover_common::proto::{AnalysisVerdict, DeployPhase};
use drover_tests::artifacts::sample_artifact;
use drover_tests::{Coordinator, TestDir, fleetsim, health_status, wait_until_ok};

const HOSTS: usize = 300;
const PIPELINE: &str = "hello-scale";

fn spec() -> String {
    drover_tests::specs::canary_pipeline(
        PIPELINE,
        &format!(
            "batch_percent = 100\nmax_unavailable = {HOSTS}\nsettle_ms = 0\nstuck_timeout_ms = 20000\n\
             gate = {{ samples = 1, bad_samples = 1, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}"
        ),
        "[{ count = 1, bake_ms = 8000 }]",
        "",
    )
}

#[tokio::test]
async fn one_canary_against_300_hosts_keeps_the_coordinator_responsive_and_reaches_a_verdict() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let hosts = HOSTS.to_string();
    let _sim = fleetsim(
        &dir,
        &coord,
        "stage",
        &[
            "--hosts",
            &hosts,
            "--label",
            "env=prod",
            "--heartbeat-interval",
            "1s",
            "--requests-per-interval",
            "200",
            "--seed",
            "13",
        ],
    );
    wait_until_ok("300 simulated hosts", Duration::from_secs(60), || async {
        coord.hosts("env=prod").await.len() == HOSTS
    })
    .await;
    coord.apply_pipeline(&dir, &spec());
    let artifacts = dir.sub("artifacts");
    let push = |v: &str| {
        let a = sample_artifact(&artifacts, "hello", v, &[]);
        coord.push(&a.path, "hello", v)
    };
    // v1 everywhere (a first deploy has no canary).
    let (code, out, err) = coord.droverctl(&[
        "deploy",
        "start",
        "--pipeline",
        PIPELINE,
        "--artifact",
        &push("v1"),
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");

    // v2: one canary host judged against the other 299, while the health
    // check is asked every 20 ms on one connection.
    let (code, id, err) = coord.droverctl(&[
        "deploy",
        "start",
        "--pipeline",
        PIPELINE,
        "--artifact",
        &push("v2"),
    ]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    let channel = coord.connect().await;
    let mut slowest = Duration::ZERO;
    let mut checks = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let d = loop {
        let asked = Instant::now();
        let status = health_status(channel.clone()).await;
        let took = asked.elapsed();
        assert!(status.is_ok(), "{status:?}");
        slowest = slowest.max(took);
        checks += 1;
        let d = coord
            .deployer()
            .await
            .get_deploy(drover_common::proto::DeployRef {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if !d.analyses.is_empty() || d.phase() != DeployPhase::Rolling {
            break d;
        }
        assert!(Instant::now() < deadline, "no verdict within 60 s: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("{checks} health checks during the bake, the slowest {slowest:?}");
    assert!(
        checks >= 100,
        "the bake was watched throughout ({checks} checks)"
    );
    assert!(
        slowest < Duration::from_millis(100),
        "a health check took {slowest:?} during a look"
    );
    let a = &d.analyses[0];
    assert!(
        matches!(a.verdict(), AnalysisVerdict::Pass | AnalysisVerdict::Fail),
        "a verdict: {a:?}"
    );
    assert_eq!(
        (a.canary_hosts.len(), a.baseline_hosts.len()),
        (1, HOSTS - 1)
    );
    let latency = a
        .metrics
        .iter()
        .find(|m| m.name == "latency_p99_ms")
        .unwrap();
    assert_eq!(latency.test, "t-test across hosts", "{latency:?}");
    assert_eq!(latency.baseline_hosts as usize, HOSTS - 1, "{latency:?}");
    let errors = a.metrics.iter().find(|m| m.name == "error_rate").unwrap();
    assert_eq!(errors.test, "exact binomial", "{errors:?}");
    assert!(errors.baseline_requests > 100_000, "{errors:?}");
}
