//! A coordinator on a real etcd: while etcd cannot be reached it loses its
//! shard leases and issues no command; when etcd is back it wins them again
//! (with a higher epoch) and the deploy finishes.

use std::process::Command;
use std::time::Duration;

use drover_common::proto::{DeployRef, StartDeployRequest};
use drover_tests::artifacts::sample_artifact;
use drover_tests::{
    Agent, ChildGuard, Coordinator, Etcd, TestDir, bins, free_port, sample_starts, wait_until_ok,
};
use nix::sys::signal::Signal;

#[tokio::test]
async fn no_commands_while_etcd_is_down_and_the_deploy_completes_after() {
    let dir = TestDir::new();
    let etcd = Etcd::start(&dir, "etcd").await;
    let coord = Coordinator::start(
        &dir,
        "coord",
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            etcd.endpoint.as_str(),
            "--lease-ttl",
            "2s",
        ],
    )
    .await;
    let mut agents = Vec::new();
    let mut load = Vec::new();
    for i in 0..2 {
        let host = format!("web-{i}");
        let port = free_port();
        agents.push(Agent::start_sample(
            &dir,
            &host,
            &[&coord],
            port,
            &["--label", "env=prod"],
        ));
        let mut cmd = Command::new(bins::bin("drover-load"));
        cmd.args(["--url", &format!("http://127.0.0.1:{port}/"), "--rps", "30"]);
        load.push(ChildGuard::spawn(
            &format!("load {host}"),
            cmd,
            &dir.path().join(format!("load-{host}.log")),
        ));
    }
    wait_until_ok("agents", Duration::from_secs(20), || async {
        coord.hosts("env=prod").await.len() == 2
    })
    .await;
    let spec = dir.path().join("p.toml");
    std::fs::write(
        &spec,
        "name = \"hello-prod\"\nservice = \"hello\"\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\nbatch_size = 1\nsettle_ms = 4000\n\
         gate = { max_error_rate = 0.05, samples = 3, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }\n",
    )
    .unwrap();
    assert_eq!(
        coord
            .droverctl(&["pipeline", "apply", "-f", spec.to_str().unwrap()])
            .0,
        0
    );
    let v1 = sample_artifact(dir.path(), "hello", "v1", &[]);
    coord.push(&v1.path, "hello", "v1");
    let mut api = coord.deployer().await;
    let id = api
        .start_deploy(StartDeployRequest {
            pipeline: "hello-prod".into(),
            artifact: v1.digest.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    // The first host is updated and its batch settles: freeze etcd past the TTL.
    wait_until_ok("the first host on v1", Duration::from_secs(30), || async {
        sample_starts(&dir, "web-0", "v1") == 1
    })
    .await;
    etcd.child.signal(Signal::SIGSTOP);
    wait_until_ok(
        "the coordinator to step down",
        Duration::from_secs(20),
        || async { coord.child.log().contains("stepping down") },
    )
    .await;
    // Long enough for the settle time and the gate to have finished, had
    // the coordinator kept going.
    let frozen_for = std::time::Instant::now();
    while frozen_for.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            sample_starts(&dir, "web-1", "v1"),
            0,
            "no command reaches a host while etcd is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd.child.signal(Signal::SIGCONT);
    let (code, out, err) = coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(
        code, 0,
        "the deploy completes once etcd is back: {out}\n{err}"
    );
    assert_eq!(
        (
            sample_starts(&dir, "web-0", "v1"),
            sample_starts(&dir, "web-1", "v1")
        ),
        (1, 1),
        "each host started once"
    );
    let d = api
        .get_deploy(DeployRef {
            id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        d.batches.iter().all(|b| b.verdict == "passed"),
        "{:?}",
        d.batches
    );
}
