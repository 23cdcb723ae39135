//! Rolling deploys end to end: real agents, the sample service under real
//! load, health gates, automatic rollback.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use drover_common::proto::{DeployPhase, DeployRef, HostOutcome, StartDeployRequest};
use drover_tests::artifacts::sample_artifact;
use drover_tests::{
    Agent, ChildGuard, Coordinator, TestDir, bins, free_port, http_get_status, wait_until_ok,
};

const PIPELINE: &str = r#"
name = "hello-prod"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 2
settle_ms = 0
stuck_timeout_ms = 20000
gate = { max_error_rate = 0.05, samples = 3, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

struct Fleet {
    dir: TestDir,
    coord: Coordinator,
    _agents: Vec<Agent>,
    _load: Vec<ChildGuard>,
    ports: Vec<(String, u16)>,
}

/// A coordinator, `n` agents with env=prod under steady load, the pipeline applied.
async fn fleet(n: usize) -> Fleet {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let mut agents = Vec::new();
    let mut load = Vec::new();
    let mut ports = Vec::new();
    for i in 0..n {
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
        ports.push((host, port));
    }
    wait_until_ok("every agent connected", Duration::from_secs(20), || async {
        coord.hosts("env=prod").await.len() == n
    })
    .await;
    let spec = dir.path().join("pipeline.toml");
    std::fs::write(&spec, PIPELINE).unwrap();
    let (code, _, err) = coord.droverctl(&["pipeline", "apply", "-f", spec.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    Fleet {
        dir,
        coord,
        _agents: agents,
        _load: load,
        ports,
    }
}

impl Fleet {
    fn push(&self, version: &str, extra: &[&str]) -> String {
        let a = sample_artifact(self.dir.path(), "hello", version, extra);
        self.coord.push(&a.path, "hello", version)
    }

    /// `droverctl deploy start --wait`: (exit code, stdout, stderr).
    fn deploy(&self, digest: &str) -> (i32, String, String) {
        self.coord.droverctl(&[
            "deploy",
            "start",
            "--pipeline",
            "hello-prod",
            "--artifact",
            digest,
            "--wait",
        ])
    }

    async fn versions(&self) -> Vec<String> {
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

#[tokio::test]
async fn a_good_version_rolls_through_every_batch() {
    let f = fleet(4).await;
    let v1 = f.push("v1", &[]);
    let (code, out, err) = f.deploy(&v1);
    assert_eq!(code, 0, "first deploy: {out}\n{err}");
    assert_eq!(f.versions().await, ["v1", "v1", "v1", "v1"]);

    let v2 = f.push("v2", &[]);
    let (code, out, err) = f.deploy(&v2);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("COMPLETE"), "{out}");
    assert_eq!(f.versions().await, ["v2", "v2", "v2", "v2"]);
    let deploys = f
        .coord
        .deployer()
        .await
        .list_deploys(drover_common::proto::ListDeploysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let d = &deploys.deploys[0];
    assert_eq!(d.phase(), DeployPhase::Complete);
    assert_eq!(d.known_good, v1, "it replaced the last known good");
    assert_eq!(d.batches.len(), 2);
    assert!(
        d.batches.iter().all(|b| b.verdict == "passed"),
        "{:?}",
        d.batches
    );
}

#[tokio::test]
async fn a_version_serving_5xx_is_stopped_at_the_first_batch_and_rolled_back() {
    let f = fleet(4).await;
    let v1 = f.push("v1", &[]);
    assert_eq!(f.deploy(&v1).0, 0);
    let bad = f.push("bad", &["--error-rate", "0.5"]);
    let (code, out, err) = f.deploy(&bad);
    assert_eq!(code, 2, "ROLLED_BACK exits 2: {out}\n{err}");
    assert!(
        err.contains("ROLLED_BACK") && err.contains("error rate"),
        "{err}"
    );
    assert_eq!(f.versions().await, ["v1", "v1", "v1", "v1"]);
    let deploys = f
        .coord
        .deployer()
        .await
        .list_deploys(drover_common::proto::ListDeploysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let d = &deploys.deploys[0];
    assert_eq!(d.phase(), DeployPhase::RolledBack);
    assert!(
        d.batches[0].verdict.contains("error rate"),
        "{:?}",
        d.batches[0]
    );
    assert!(
        d.batches[0]
            .hosts
            .iter()
            .all(|h| h.outcome() == HostOutcome::RolledBack),
        "{:?}",
        d.batches[0]
    );
    assert!(
        d.batches[1]
            .hosts
            .iter()
            .all(|h| h.outcome() == HostOutcome::Pending),
        "the second batch was never touched"
    );
}

#[tokio::test]
async fn starts_are_idempotent_and_one_deploy_runs_per_pipeline() {
    let f = fleet(2).await;
    let v1 = f.push("v1", &[]);
    let mut api = f.coord.deployer().await;
    let start = |key: &str| StartDeployRequest {
        pipeline: "hello-prod".into(),
        artifact: v1.clone(),
        idempotency_key: key.into(),
        requester: "ci".into(),
        git_sha: String::new(),
    };
    let first = api
        .start_deploy(start("build-42"))
        .await
        .unwrap()
        .into_inner();
    let again = api
        .start_deploy(start("build-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.id, again.id, "same key, same deploy");
    let other = api.start_deploy(start("build-43")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition);
    assert!(
        other.message().contains(&first.id),
        "names the active deploy: {}",
        other.message()
    );
    let unknown = api
        .start_deploy(StartDeployRequest {
            artifact: "0".repeat(64),
            ..start("x")
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    let (code, _, _) = f.coord.droverctl(&["deploy", "watch", &first.id]);
    assert_eq!(code, 0);
    let done = api
        .get_deploy(DeployRef {
            id: first.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.phase(), DeployPhase::Complete);
}
