//! Rolling deploys end to end: real agents, the sample service under real
//! load, health gates, automatic rollback.

use std::time::Duration;

use drover_common::proto::{DeployPhase, DeployRef, HostOutcome, StartDeployRequest};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::{Coordinator, sample_starts, wait_until_ok};

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

/// The sample fleet of `n` hosts under 30 requests a second, with the
/// pipeline applied.
async fn fleet(n: usize) -> Fleet {
    let f = SampleFleet::start(n, 30).await;
    f.apply(PIPELINE);
    Fleet(f)
}

/// The sample fleet, deploying through `hello-prod`.
struct Fleet(SampleFleet);

impl std::ops::Deref for Fleet {
    type Target = SampleFleet;
    fn deref(&self) -> &SampleFleet {
        &self.0
    }
}

impl std::ops::DerefMut for Fleet {
    fn deref_mut(&mut self) -> &mut SampleFleet {
        &mut self.0
    }
}

impl Fleet {
    fn deploy(&self, digest: &str) -> (i32, String, String) {
        self.deploy_through("hello-prod", digest)
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
    let deploys = list(&f.coord).await;
    let d = &deploys.deploys[0];
    assert_eq!(d.phase(), DeployPhase::Complete);
    assert_eq!(d.known_good, v1, "it replaced the last known good");
    assert_eq!(d.batches.len(), 2);
    assert!(
        d.batches.iter().all(|b| b.verdict == "passed"),
        "{:?}",
        d.batches
    );

    // A command sent by hand is fenced like the deploy: the leader of the
    // pipeline's shard stamps its epoch (which every agent now holds), and
    // the audit records it.
    let (code, out, err) = f.coord.droverctl(&[
        "command",
        "web-0",
        "verify",
        "--service",
        "hello",
        "--artifact",
        &v2,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (_, audit, _) = f.coord.droverctl(&["audit", "--service", "hello"]);
    assert!(
        audit.contains("verify sent to host web-0 by hand"),
        "{audit}"
    );

    // What ran when, from the audit log.
    let (code, out, _) = f.coord.droverctl(&["running", "--service", "hello"]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("hello: {v2} since")), "{out}");
    let before_v2 = std::time::UNIX_EPOCH + Duration::from_millis(d.created_at_unix_ms - 1);
    let at = humantime::format_rfc3339_millis(before_v2).to_string();
    let (code, out, _) = f
        .coord
        .droverctl(&["running", "--service", "hello", "--at", &at]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("hello: {v1} since")), "{out}");

    // Store writes grow with batches, not hosts: 2 hosts in 2 batches cost
    // what 4 hosts in 2 batches cost.
    let half = PIPELINE
        .replace("name = \"hello-prod\"", "name = \"hello-half\"")
        .replace(
            "selector = \"env=prod\"",
            "selector = \"env=prod,idx!=2,idx!=3\"",
        )
        .replace("batch_size = 2", "batch_size = 1");
    f.apply(&half);
    let (code, _, err) = f.coord.droverctl(&[
        "deploy",
        "start",
        "--pipeline",
        "hello-half",
        "--artifact",
        &v1,
        "--wait",
    ]);
    assert_eq!(code, 0, "{err}");
    let all = list(&f.coord).await;
    let small = all
        .deploys
        .iter()
        .find(|x| x.pipeline == "hello-half")
        .unwrap();
    let big = all.deploys.iter().find(|x| x.id == d.id).unwrap();
    let hosts =
        |x: &drover_common::proto::Deploy| x.batches.iter().map(|b| b.hosts.len()).sum::<usize>();
    assert_eq!((small.batches.len(), hosts(small)), (2, 2));
    assert_eq!((big.batches.len(), hosts(big)), (2, 4));
    assert_eq!(
        small.store_writes, big.store_writes,
        "same batches, same writes, whatever the hosts"
    );
}

#[tokio::test]
async fn a_version_serving_5xx_is_stopped_at_the_first_batch_and_rolled_back() {
    let f = fleet(4).await;
    let bad = f.push("bad", &["--error-rate", "0.5"]);
    // A first deploy has nothing to roll back to: it stops as FAILED.
    let (code, _, err) = f.deploy(&bad);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("FAILED") && err.contains("no known-good release to roll back to"),
        "{err}"
    );
    let v1 = f.push("v1", &[]);
    assert_eq!(f.deploy(&v1).0, 0);
    let (code, out, err) = f.deploy(&bad);
    assert_eq!(code, 2, "ROLLED_BACK exits 2: {out}\n{err}");
    assert!(
        err.contains("ROLLED_BACK") && err.contains("error rate"),
        "{err}"
    );
    assert_eq!(f.versions().await, ["v1", "v1", "v1", "v1"]);
    let deploys = list(&f.coord).await;
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

    // The audit says what happened and why.
    let (code, out, _) = f.coord.droverctl(&["audit", "--service", "hello"]);
    assert_eq!(code, 0);
    let kinds: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(&d.id))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "batch_started",
            "batch_failed",
            "rollback_started",
            "environment_changed",
            "rolled_back"
        ],
        "{out}"
    );
    assert!(
        out.contains("stage 0 batch 0 (web-0,web-1) failed: health gate failed"),
        "{out}"
    );
    assert!(out.contains("automatic rollback to"), "{out}");
    let (_, out, _) = f.coord.droverctl(&["running", "--service", "hello"]);
    assert!(
        out.starts_with(&format!("hello: {v1} since")),
        "back on v1: {out}"
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
        ..Default::default()
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

/// Every deploy, newest first.
async fn list(coord: &Coordinator) -> drover_common::proto::ListDeploysResponse {
    coord
        .deployer()
        .await
        .list_deploys(drover_common::proto::ListDeploysRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_coordinator_killed_mid_rollout_and_mid_rollback_finishes_the_deploy_after_restart() {
    let mut f = fleet(4).await;
    f.apply(
        &PIPELINE
            .replace("batch_size = 2", "batch_size = 1")
            .replace("settle_ms = 0", "settle_ms = 300"),
    );
    let v1 = f.push("v1", &[]);
    assert_eq!(f.deploy(&v1).0, 0);
    let v2 = f.push("v2", &[]);
    let mut api = f.coord.deployer().await;
    let id = api
        .start_deploy(StartDeployRequest {
            pipeline: "hello-prod".into(),
            artifact: v2.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    // Kill it in the middle of the rollout (batch 2 of 4 in flight).
    wait_until_ok("the second batch", Duration::from_secs(30), || async {
        f.coord.get_deploy(&id).await.batch >= 1
    })
    .await;
    let addr = f.coord.addr;
    f.coord.child.signal(nix::sys::signal::Signal::SIGKILL);
    f.coord.child.wait_exit(Duration::from_secs(5)).await;
    f.coord = Coordinator::start_on(&f.dir, "coord", addr, &[]).await;
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(f.versions().await, ["v2", "v2", "v2", "v2"]);
    for (host, _) in &f.ports {
        assert_eq!(
            sample_starts(&f.dir, host, "v2"),
            1,
            "{host} restarted exactly once"
        );
    }

    // A bad version, and a kill while it rolls back.
    let bad = f.push("bad", &["--error-rate", "0.5"]);
    let mut api = f.coord.deployer().await;
    let id = api
        .start_deploy(StartDeployRequest {
            pipeline: "hello-prod".into(),
            artifact: bad,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    wait_until_ok("the rollback to begin", Duration::from_secs(30), || async {
        matches!(
            f.coord.get_deploy(&id).await.phase(),
            DeployPhase::RollingBack | DeployPhase::RolledBack
        )
    })
    .await;
    f.coord.child.signal(nix::sys::signal::Signal::SIGKILL);
    f.coord.child.wait_exit(Duration::from_secs(5)).await;
    f.coord = Coordinator::start_on(&f.dir, "coord", addr, &[]).await;
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 2, "ends ROLLED_BACK: {out}\n{err}");
    assert_eq!(f.versions().await, ["v2", "v2", "v2", "v2"]);
    assert_eq!(
        sample_starts(&f.dir, "web-0", "bad"),
        1,
        "the bad version started once on the first host"
    );
    assert_eq!(
        sample_starts(&f.dir, "web-1", "bad"),
        0,
        "and never reached the second"
    );
}

#[tokio::test]
async fn pause_resume_approve_abort_and_rollback_after_complete() {
    let f = fleet(2).await;
    f.apply(
        &PIPELINE
            .replace("batch_size = 2", "batch_size = 1")
            .replace("settle_ms = 0", "settle_ms = 300")
            .replace(
                "[[stages]]\nname = \"prod\"",
                "[[stages]]\nname = \"prod\"\nrequires_approval = true",
            ),
    );
    let v1 = f.push("v1", &[]);
    let mut api = f.coord.deployer().await;
    let start = |artifact: &str| StartDeployRequest {
        pipeline: "hello-prod".into(),
        artifact: artifact.into(),
        ..Default::default()
    };
    let id = api.start_deploy(start(&v1)).await.unwrap().into_inner().id;
    assert_eq!(
        f.coord.get_deploy(&id).await.phase(),
        DeployPhase::AwaitingApproval,
        "the stage waits for approval"
    );
    let (code, out, _) = f.coord.droverctl(&["deploy", "pause", &id]);
    assert_eq!((code, out.trim().ends_with("PAUSED")), (0, true), "{out}");
    let (code, out, _) = f.coord.droverctl(&["deploy", "resume", &id]);
    assert_eq!(
        (code, out.trim().ends_with("AWAITING_APPROVAL")),
        (0, true),
        "resume returns to the approval: {out}"
    );
    let (code, _, err) = f.coord.droverctl(&["deploy", "resume", &id]);
    assert_eq!(code, 1);
    assert!(
        err.contains("FailedPrecondition") && err.contains("cannot resume"),
        "{err}"
    );
    let (code, _, _) = f
        .coord
        .droverctl(&["deploy", "approve", &id, "--requester", "alice"]);
    assert_eq!(code, 0);
    // Pause after the batch in flight, then resume to the end.
    let (code, _, _) = f.coord.droverctl(&["deploy", "pause", &id]);
    assert_eq!(code, 0);
    wait_until_ok(
        "the pause to take effect after the batch",
        Duration::from_secs(30),
        || async { f.coord.get_deploy(&id).await.phase() == DeployPhase::Paused },
    )
    .await;
    let paused = f.coord.get_deploy(&id).await;
    assert_eq!(paused.batch, 1, "paused between batches");
    assert!(
        paused.approvals[0].contains("alice approved stage prod"),
        "{:?}",
        paused.approvals
    );
    assert_eq!(f.coord.droverctl(&["deploy", "resume", &id]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id]).0, 0);
    assert_eq!(f.versions().await, ["v1", "v1"]);

    // v2 completes; then a rollback straight back to v1.
    let v2 = f.push("v2", &[]);
    let id2 = api.start_deploy(start(&v2)).await.unwrap().into_inner().id;
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id2]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id2]).0, 0);
    assert_eq!(f.versions().await, ["v2", "v2"]);
    let (code, _, _) = f
        .coord
        .droverctl(&["deploy", "rollback", &id2, "--reason", "bad in prod"]);
    assert_eq!(code, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id2]).0, 2);
    assert_eq!(f.versions().await, ["v1", "v1"]);

    // Abort stops where it is.
    let v3 = f.push("v3", &[]);
    let id3 = api.start_deploy(start(&v3)).await.unwrap().into_inner().id;
    let (code, out, _) = f
        .coord
        .droverctl(&["deploy", "abort", &id3, "--reason", "wrong build"]);
    assert_eq!((code, out.trim().ends_with("ABORTED")), (0, true), "{out}");
    let aborted = f.coord.get_deploy(&id3).await;
    assert!(aborted.reason.contains("wrong build"), "{aborted:?}");
    assert_eq!(f.versions().await, ["v1", "v1"], "nothing changed");
    // The pipeline is free again.
    assert!(api.start_deploy(start(&v3)).await.is_ok());
}

#[tokio::test]
async fn failing_readiness_crash_loops_and_latency_regressions_are_caught_at_the_first_batch() {
    let f = fleet(4).await;
    f.apply(
        &PIPELINE
            .replace("stuck_timeout_ms = 20000", "stuck_timeout_ms = 3000")
            .replace(
                "max_error_rate = 0.05,",
                "max_error_rate = 0.05, max_p99_ms = 60,",
            ),
    );
    let v1 = f.push("v1", &[]);
    assert_eq!(f.deploy(&v1).0, 0);
    for (version, args, why) in [
        ("unready", vec!["--unready"], "not ready"),
        ("crashy", vec!["--crash-after", "0.5"], "restart"),
        ("slow", vec!["--latency-ms", "150"], "p99"),
    ] {
        let digest = f.push(version, &args);
        let (code, out, err) = f.deploy(&digest);
        assert_eq!(code, 2, "{version} is rolled back: {out}\n{err}");
        assert!(
            err.contains(why),
            "{version}: the reason names {why:?}: {err}"
        );
        assert_eq!(f.versions().await, ["v1", "v1", "v1", "v1"], "{version}");
        assert_eq!(
            sample_starts(&f.dir, "web-2", version),
            0,
            "{version} never reached the second batch"
        );
    }
}

#[tokio::test]
async fn an_inconclusive_gate_under_the_pause_policy_holds_the_deploy_for_a_person() {
    // No load: no sample ever counts enough requests to judge.
    let f = SampleFleet::start(2, 0).await;
    f.apply(&PIPELINE.replace("INCONCLUSIVE_POLICY_PASS", "INCONCLUSIVE_POLICY_PAUSE"));
    let v1 = f.push("v1", &[]);
    let id = f.coord.start_deploy("hello-prod", &v1).await;
    let d = f.coord.wait_phase(&id, DeployPhase::Paused).await;
    assert!(
        d.batches[0]
            .verdict
            .starts_with("paused: inconclusive health gate"),
        "{:?}",
        d.batches
    );
    // It waits for a person (here: abort); the gate neither failed the
    // batch nor rolled anything back.
    let (code, _, err) = f.coord.droverctl(&["deploy", "abort", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        f.coord.wait_phase(&id, DeployPhase::Aborted).await.phase(),
        DeployPhase::Aborted
    );
}
