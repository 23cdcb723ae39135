//! Environments end to end: stages as environments with their own
//! selectors, approval gates that wait, continue on approve and end on
//! their timeout, the ledger of what passed where (prod refuses what
//! skipped staging unless forced), and region waves.

use drover_common::proto::{DeployPhase, ListEnvironmentsRequest};
use drover_tests::sample_fleet::SampleFleet;

const PIPELINE: &str = "hello";

/// staging = web-0, prod = everything else (each host in its first stage).
const STAGED: &str = r#"
name = "hello"
service = "hello"

[[stages]]
name = "staging"
selector = "idx=0"
batch_size = 1
gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 2
requires_approval = true
approval_timeout_ms = 2000
on_approval_timeout = "APPROVAL_TIMEOUT_OUTCOME_ABORT"
gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

async fn environments(f: &SampleFleet) -> Vec<(String, String, bool)> {
    f.coord
        .deployer()
        .await
        .list_environments(ListEnvironmentsRequest {
            pipeline: PIPELINE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .environments
        .into_iter()
        .map(|e| (e.stage, e.artifact, e.forced))
        .collect()
}

/// `droverctl deploy start` (no wait): the deploy id.
fn start(f: &SampleFleet, digest: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "deploy",
        "start",
        "--pipeline",
        PIPELINE,
        "--artifact",
        digest,
    ];
    args.extend_from_slice(extra);
    f.coord.droverctl(&args)
}

#[tokio::test]
async fn approvals_wait_continue_and_time_out_and_prod_refuses_what_skipped_staging() {
    let f = SampleFleet::start(3, 30).await;
    f.apply(STAGED);

    // v1 through both environments: staging, then prod after an approval.
    let v1 = f.push("v1", &[]);
    let (code, id, err) = start(&f, &v1, &[]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    assert_eq!(f.starts("v1"), [1, 0, 0], "prod waits");
    let (code, _, err) = f
        .coord
        .droverctl(&["deploy", "approve", &id, "--requester", "sre-kim"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 0, "approved, it completes: {out}\n{err}");
    assert_eq!(
        environments(&f).await,
        [
            ("staging".into(), v1.clone(), false),
            ("prod".into(), v1.clone(), false)
        ]
    );

    // v2: nobody approves prod; the timeout ends the deploy cleanly, with
    // staging on v2 and prod still on v1.
    let v2 = f.push("v2", &[]);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 1, "aborted by the timeout: {out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    assert_eq!(d.phase(), DeployPhase::Aborted);
    assert!(
        d.reason.contains("nobody approved stage prod within 2s"),
        "{}",
        d.reason
    );
    assert_eq!(f.versions().await, ["v2", "v1", "v1"]);
    assert_eq!(
        environments(&f).await,
        [
            ("staging".into(), v2.clone(), false),
            ("prod".into(), v1.clone(), false)
        ]
    );
    let (_, audit, _) = f.coord.droverctl(&["audit", "--service", "hello"]);
    assert!(audit.contains("nobody approved stage prod"), "{audit}");

    // v2 passed staging: it may go to prod on its own (after approval).
    let (code, id, err) = start(&f, &v2, &["--from-stage", "prod"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id]).0, 0);
    assert_eq!(f.versions().await, ["v2"; 3]);
    assert_eq!(f.starts("v2"), [1, 1, 1], "staging was not deployed again");

    // v3 never went to staging: prod refuses it, and nothing runs it.
    let v3 = f.push("v3", &[]);
    let (code, _, err) = start(&f, &v3, &["--from-stage", "prod"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("FailedPrecondition") && err.contains("has not passed staging"),
        "{err}"
    );
    assert_eq!(f.starts("v3"), [0, 0, 0]);
    // Unless forced, which is recorded.
    let (code, id, err) = start(
        &f,
        &v3,
        &["--from-stage", "prod", "--force", "--requester", "sre-lee"],
    );
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id]).0, 0);
    let (_, status, _) = f.coord.droverctl(&["deploy", "status", &id]);
    assert!(
        status.contains("sre-lee forced the deploy past stages it had not passed: staging"),
        "{status}"
    );
    assert_eq!(
        environments(&f).await,
        [
            ("staging".into(), v2.clone(), false),
            ("prod".into(), v3.clone(), true)
        ]
    );
    assert_eq!(f.versions().await, ["v2", "v3", "v3"]);

    // A bad version caught in staging: staging returns to what it ran (v2),
    // not to the pipeline's last complete release (v3).
    let bad = f.push("bad", &["--error-rate", "0.5"]);
    let (code, out, err) = f.deploy_through(PIPELINE, &bad);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_eq!(f.versions().await, ["v2", "v3", "v3"]);
    assert_eq!(
        environments(&f).await,
        [
            ("staging".into(), v2.clone(), false),
            ("prod".into(), v3.clone(), true)
        ]
    );
}

const WAVES: &str = r#"
name = "hello"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 10
max_unavailable = 2
gate = { max_error_rate = 0.05, samples = 3, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }

[[stages.waves]]
name = "eu"
selectors = ["region=eu"]
bake_ms = 300

[[stages.waves]]
name = "us"
selectors = ["region=us", "region=ap"]
bake_ms = 300
"#;

#[tokio::test]
async fn waves_run_in_order_and_a_failure_in_the_second_rolls_back_the_first() {
    // web-0, web-1 in eu; web-2 in us, web-3 in ap. A version that fails
    // only where BAD is set: in us and ap.
    let f = SampleFleet::start_with(4, 30, |i| {
        let (region, bad) = match i {
            0 | 1 => ("eu", "0"),
            2 => ("us", "0.5"),
            _ => ("ap", "0.5"),
        };
        vec![
            "--label".into(),
            format!("region={region}"),
            "--env".into(),
            format!("BAD={bad}"),
        ]
    })
    .await;
    f.apply(WAVES);
    let v1 = f.push("v1", &[]);
    let (code, out, err) = f.deploy_through(PIPELINE, &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    let waves: Vec<Vec<String>> = d
        .batches
        .iter()
        .map(|b| b.hosts.iter().map(|h| h.host_id.clone()).collect())
        .collect();
    assert_eq!(
        waves,
        [vec!["web-0", "web-1"], vec!["web-2", "web-3"]],
        "eu, then us and ap"
    );

    let v2 = f.push("v2", &["--error-rate", "${BAD}"]);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    assert_eq!(d.batches[0].verdict, "passed", "eu passed first");
    assert!(
        d.batches[1].verdict.contains("error rate"),
        "{:?}",
        d.batches[1]
    );
    assert_eq!(f.starts("v2"), [1, 1, 1, 1]);
    assert_eq!(
        f.versions().await,
        ["v1"; 4],
        "the first wave was rolled back too"
    );
    let (_, audit, _) = f.coord.droverctl(&["audit", "--service", "hello"]);
    let eu = audit
        .find("stage 0 batch 0 (web-0,web-1) passed")
        .expect(&audit);
    let us = audit
        .find("stage 0 batch 1 (web-2,web-3) failed")
        .expect(&audit);
    assert!(eu < us, "{audit}");
}

/// STAGED with staging judging loosely and prod strictly (under load, no
/// inconclusive pass): a release with 20% errors passes staging and fails
/// in prod.
fn strict_prod() -> String {
    let gate = "max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\"";
    STAGED
        .replacen(gate, &gate.replace("0.05", "0.5"), 1)
        .replace(
            gate,
            &gate
                .replace("samples = 2, bad", "samples = 3, bad")
                .replace("POLICY_PASS", "POLICY_FAIL"),
        )
}

/// What ran in each environment at `at` (0: now), by the API.
async fn running_at(f: &SampleFleet, at: u64) -> (String, Vec<(String, String)>) {
    let r = f
        .coord
        .deployer()
        .await
        .what_was_running(drover_common::proto::WhatWasRunningRequest {
            service: "hello".into(),
            at_unix_ms: at,
        })
        .await
        .unwrap()
        .into_inner();
    let envs = r
        .environments
        .into_iter()
        .map(|e| (e.stage, e.artifact))
        .collect();
    (r.in_progress_deploy_id, envs)
}

#[tokio::test]
async fn a_release_failing_in_prod_returns_each_stage_to_its_own_release_and_running_says_when() {
    let f = SampleFleet::start(3, 30).await;
    let spec = strict_prod();
    assert_ne!(spec, STAGED);
    f.apply(&spec);
    let env = |staging: &str, prod: &str| {
        vec![
            ("staging".to_string(), staging.to_string()),
            ("prod".to_string(), prod.to_string()),
        ]
    };

    // v1 everywhere; then v2 in staging only (nobody approved prod).
    let v1 = f.push("v1", &[]);
    let (code, id, err) = start(&f, &v1, &[]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id]).0, 0);
    let v2 = f.push("v2", &[]);
    let (code, _, _) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 1, "aborted by the approval timeout");
    assert_eq!(f.versions().await, ["v2", "v1", "v1"]);
    let before = drover_common::time::now_unix_ms();

    // v3 passes staging, then fails prod's gate and rolls back.
    let v3 = f.push("v3", &["--error-rate", "0.2"]);
    let (code, id, err) = start(&f, &v3, &[]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    let during = drover_common::time::now_unix_ms();
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id]).0, 0);
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    assert_eq!(d.phase(), DeployPhase::RolledBack);
    assert!(d.reason.contains("error rate"), "{}", d.reason);

    // Each stage is back on its own release, started exactly once more.
    assert_eq!(f.versions().await, ["v2", "v1", "v1"]);
    assert_eq!(f.starts("v2"), [2, 0, 0]);
    assert_eq!(f.starts("v1"), [1, 2, 2]);
    assert_eq!(f.starts("v3"), [1, 1, 1]);
    assert_eq!(
        environments(&f).await,
        [
            ("staging".into(), v2.clone(), false),
            ("prod".into(), v1.clone(), false)
        ]
    );

    // What ran when, per environment, from the audit's structured events.
    assert_eq!(running_at(&f, before).await, (String::new(), env(&v2, &v1)));
    assert_eq!(running_at(&f, during).await, (id.clone(), env(&v3, &v1)));
    assert_eq!(running_at(&f, 0).await, (String::new(), env(&v2, &v1)));
    let (code, out, _) = f.coord.droverctl(&["running", "--service", "hello"]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("hello: {v1} since")), "{out}");
    assert!(out.contains(&format!("hello/staging: {v2} since")), "{out}");
    assert!(out.contains(&format!("hello/prod: {v1} since")), "{out}");
}
