//! Canary analysis end to end: real agents, the sample service under real
//! load, a cohort judged against the live baseline (the hosts still on the
//! old version) by the statistics of their heartbeats.

use std::time::Duration;

use drover_common::proto::{AnalysisVerdict, BaselineKind, DeployPhase};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::wait_until;

const PIPELINE: &str = "hello-canary";

/// A canary stage over every env=prod host: `steps` (TOML array of
/// tables), then batches of half the rest; `analysis` extra TOML keys.
fn spec(steps: &str, analysis: &str) -> String {
    drover_tests::specs::canary_pipeline(
        PIPELINE,
        "batch_percent = 50\nsettle_ms = 0\nstuck_timeout_ms = 20000\n\
         gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }",
        steps,
        analysis,
    )
}

/// A healthy version's errors: 0.1%, drawn at random (noisy hosts).
const HEALTHY: [&str; 3] = ["--error-rate", "0.001", "--random-errors"];

/// Five hosts under 100 requests a second each, v1 (random 0.1% errors)
/// on all of them through the canary pipeline (a first deploy: no canary).
async fn fleet_on_v1(steps: &str, analysis: &str) -> SampleFleet {
    let f = SampleFleet::start(5, 100).await;
    f.apply(&spec(steps, analysis));
    let v1 = f.push("v1", &HEALTHY);
    let (code, out, err) = f.deploy_through(PIPELINE, &v1);
    assert_eq!(code, 0, "v1: {out}\n{err}");
    assert!(
        f.coord.latest_deploy(PIPELINE).await.analyses.is_empty(),
        "a first deploy has no canary"
    );
    f
}

#[tokio::test]
async fn a_bad_canary_fails_its_analysis_inside_the_first_bake_window_and_is_rolled_back() {
    let f = fleet_on_v1("[{ count = 1, bake_ms = 20000 }]", "").await;
    for (version, args, metric, test) in [
        (
            "bad",
            vec!["--error-rate", "0.03", "--random-errors"],
            "error_rate",
            "exact binomial",
        ),
        (
            "slow",
            vec![
                "--error-rate",
                "0.001",
                "--random-errors",
                "--latency-ms",
                "50",
            ],
            "latency_p99_ms",
            "t-test across hosts",
        ),
    ] {
        let digest = f.push(version, &args);
        let (code, out, err) = f.deploy_through(PIPELINE, &digest);
        assert_eq!(code, 2, "{version} is rolled back: {out}\n{err}");
        let d = f.coord.latest_deploy(PIPELINE).await;
        assert_eq!(d.phase(), DeployPhase::RolledBack);
        let a = &d.analyses[0];
        assert_eq!(a.verdict(), AnalysisVerdict::Fail, "{version}: {a:?}");
        assert!(a.reason.contains(metric), "{version}: {}", a.reason);
        assert!(
            a.baked_ms < 20_000,
            "{version}: decided inside the first bake window, after {} ms",
            a.baked_ms
        );
        let m = a.metrics.iter().find(|m| m.name == metric).unwrap();
        assert_eq!(m.verdict(), AnalysisVerdict::Fail, "{m:?}");
        assert!(m.canary_samples >= 1 && m.baseline_samples >= 4, "{m:?}");
        // Judged host against hosts, on this look's share of alpha.
        assert_eq!((m.canary_hosts, m.baseline_hosts), (1, 4), "{m:?}");
        assert_eq!(m.test, test, "{m:?}");
        assert!(m.p_value < m.alpha && m.alpha <= 0.05, "{m:?}");
        eprintln!(
            "{version}: rollback decided after {} ms: {}",
            a.baked_ms, a.reason
        );
        assert_eq!(a.canary_hosts, ["web-0"]);
        assert_eq!(
            f.starts(version),
            [1, 0, 0, 0, 0],
            "only the canary ran {version}"
        );
        assert_eq!(f.versions().await, ["v1"; 5]);
        // The verdict and its evidence are in the status and the audit.
        let (_, status, _) = f.coord.droverctl(&["deploy", "status", &d.id]);
        assert!(
            status.contains("canary stage 0 step 0: fail")
                && status.contains(metric)
                && status.contains(test)
                && status.contains("ALPHA"),
            "{status}"
        );
        let (_, audit, _) = f.coord.droverctl(&["audit", "--service", "hello"]);
        assert!(
            audit.contains("canary step 0") && audit.contains("FAIL"),
            "{audit}"
        );
    }
}

#[tokio::test]
async fn a_healthy_canary_is_promoted_through_every_step() {
    let f = fleet_on_v1(
        "[{ count = 1, bake_ms = 2000 }, { count = 2, bake_ms = 2000 }, { percent = 60, bake_ms = 2000 }]",
        "",
    )
    .await;
    let v2 = f.push("v2", &HEALTHY);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    assert_eq!(d.analyses.len(), 3, "{:?}", d.analyses);
    for (k, a) in d.analyses.iter().enumerate() {
        assert_eq!(a.verdict(), AnalysisVerdict::Pass, "step {k}: {a:?}");
        assert_eq!(a.canary_hosts.len(), k + 1, "cumulative cohorts");
        assert_eq!(a.baseline_hosts.len(), 4 - k);
        assert!(a.baked_ms >= 2000, "step {k} baked its window: {a:?}");
        assert!(a.metrics.iter().all(|m| m.canary_samples >= 5), "{a:?}");
    }
    assert_eq!(f.versions().await, ["v2"; 5]);
    assert_eq!(f.starts("v2"), [1; 5]);
}

#[tokio::test]
async fn too_little_traffic_is_inconclusive_and_the_policy_is_followed() {
    // More requests per sample than the load gives: never conclusive.
    let f = fleet_on_v1(
        "[{ count = 1, bake_ms = 1500 }]",
        "min_requests = 100000\ninconclusive = \"INCONCLUSIVE_ACTION_EXTEND\"\nmax_extensions = 1",
    )
    .await;
    // Extend once, then fail: rolled back, saying why.
    let v2 = f.push("v2", &[]);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 2, "{out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    let a = &d.analyses[0];
    assert_eq!(
        (a.verdict(), a.extensions),
        (AnalysisVerdict::Inconclusive, 1)
    );
    assert!(a.baked_ms >= 3000, "two windows: {a:?}");
    assert!(
        d.reason.contains("inconclusive")
            && d.reason.contains("0 canary hosts with 100000 requests"),
        "{}",
        d.reason
    );
    assert_eq!(f.versions().await, ["v1"; 5]);

    // Pause for a human, who promotes the step by hand.
    f.apply(&spec(
        "[{ count = 1, bake_ms = 1500 }]",
        "min_requests = 100000\ninconclusive = \"INCONCLUSIVE_ACTION_PAUSE\"",
    ));
    let v3 = f.push("v3", &[]);
    let id = f.coord.start_deploy(PIPELINE, &v3).await;
    let held = f.coord.wait_phase(&id, DeployPhase::Paused).await;
    assert!(held.reason.contains("inconclusive"), "{}", held.reason);
    assert_eq!(held.analyses[0].verdict(), AnalysisVerdict::Inconclusive);
    let (code, _, err) = f
        .coord
        .droverctl(&["deploy", "promote", &id, "--requester", "sre-ana"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.get_deploy(&id).await;
    assert!(
        d.approvals
            .iter()
            .any(|a| a.contains("sre-ana promoted canary step 0")),
        "{:?}",
        d.approvals
    );
    assert_eq!(f.versions().await, ["v3"; 5]);
}

/// Starts a deploy of a healthy v2 and waits until its canary runs it.
async fn canary_of_v2_running(f: &SampleFleet) -> String {
    let v2 = f.push("v2", &HEALTHY);
    let id = f.coord.start_deploy(PIPELINE, &v2).await;
    wait_until("the canary running v2", Duration::from_secs(30), || async {
        if f.starts("v2")[0] == 1 {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    id
}

#[tokio::test]
async fn promote_skips_the_rest_of_a_bake() {
    let f = fleet_on_v1("[{ count = 1, bake_ms = 600000 }]", "").await;
    let id = canary_of_v2_running(&f).await;
    let (code, _, err) = f
        .coord
        .droverctl(&["deploy", "promote", &id, "--requester", "sre-bo"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.get_deploy(&id).await;
    let a = &d.analyses[0];
    assert_eq!(a.verdict(), AnalysisVerdict::Promoted, "{a:?}");
    assert!(a.baked_ms < 600_000);
    let (code, _, err) = f.coord.droverctl(&["deploy", "promote", &id]);
    assert_eq!(code, 1, "a finished deploy has nothing to promote");
    assert!(
        err.contains("FailedPrecondition") && err.contains("not in a canary step"),
        "{err}"
    );

    // With manual promotion a step that passed its analysis waits for it.
    f.apply(&spec(
        "[{ count = 1, bake_ms = 1500 }]\nmanual_promotion = true",
        "",
    ));
    let v3 = f.push("v3", &HEALTHY);
    let id = f.coord.start_deploy(PIPELINE, &v3).await;
    let held = f.coord.wait_phase(&id, DeployPhase::Paused).await;
    assert_eq!(held.analyses[0].verdict(), AnalysisVerdict::Pass);
    assert!(
        held.reason.contains("waiting for promote"),
        "{}",
        held.reason
    );
    assert_eq!(f.coord.droverctl(&["deploy", "promote", &id]).0, 0);
    assert_eq!(f.coord.droverctl(&["deploy", "watch", &id]).0, 0);
    assert_eq!(f.versions().await, ["v3"; 5]);
}

#[tokio::test]
async fn a_metric_of_the_services_own_page_judges_the_canary() {
    // Judged on the service's own gauge only (agents report it because the
    // pipeline names it).
    let f = fleet_on_v1(
        "[{ count = 1, bake_ms = 3000 }]",
        "metrics = [{ name = \"sample_queue_depth\", max_ratio = 3.0 }]",
    )
    .await;
    // v1 runs with an empty queue (depth 0).
    let v2 = f.push("v2", &["--queue-depth", "0"]);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 0, "the same depth passes: {out}\n{err}");
    let bad = f.push("backlog", &["--queue-depth", "50"]);
    let (code, out, err) = f.deploy_through(PIPELINE, &bad);
    assert_eq!(code, 2, "a backlog fails: {out}\n{err}");
    let a = &f.coord.latest_deploy(PIPELINE).await.analyses[0];
    assert_eq!(a.verdict(), AnalysisVerdict::Fail, "{a:?}");
    let m = &a.metrics[0];
    assert_eq!(m.name, "sample_queue_depth");
    assert_eq!((m.canary_value, m.baseline_value), (50.0, 0.0), "{m:?}");
    assert_eq!((m.canary_hosts, m.baseline_hosts), (1, 4), "{m:?}");
    assert!(a.reason.contains("past 3x"), "{}", a.reason);
}

#[tokio::test]
async fn a_rollback_during_a_long_bake_takes_effect_at_once() {
    let f = fleet_on_v1("[{ count = 1, bake_ms = 600000 }]", "").await;
    let id = canary_of_v2_running(&f).await;
    let asked = std::time::Instant::now();
    let (code, _, err) = f
        .coord
        .droverctl(&["deploy", "rollback", &id, "--reason", "not today"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = f.coord.droverctl(&["deploy", "watch", &id]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "rolled back in {:?}, not after the 10-minute bake",
        asked.elapsed()
    );
    assert_eq!(f.versions().await, ["v1"; 5]);
}

#[tokio::test]
async fn a_fresh_baseline_is_restarted_on_the_old_release_with_the_canary() {
    let f = fleet_on_v1(
        "[{ count = 1, bake_ms = 2500 }, { count = 2, bake_ms = 2500 }]",
        "baseline = \"BASELINE_KIND_FRESH\"",
    )
    .await;
    let v2 = f.push("v2", &HEALTHY);
    let (code, out, err) = f.deploy_through(PIPELINE, &v2);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.latest_deploy(PIPELINE).await;
    assert_eq!(d.analyses.len(), 2, "{:?}", d.analyses);
    // The baseline is taken from the end of the stage.
    for (k, a) in d.analyses.iter().enumerate() {
        assert_eq!(a.verdict(), AnalysisVerdict::Pass, "step {k}: {a:?}");
        assert_eq!(a.baseline(), BaselineKind::Fresh, "{a:?}");
        assert_eq!(a.canary_hosts.len(), k + 1);
        // As many as the cohort, and at least three (a one-host canary
        // is judged against their spread).
        assert_eq!(a.baseline_hosts.len(), 3, "{a:?}");
        let m = &a.metrics[0];
        assert_eq!(
            (m.canary_hosts, m.baseline_hosts),
            (k as u32 + 1, 3),
            "{m:?}"
        );
    }
    let fresh = &d.analyses[1].baseline_hosts;
    assert!(!fresh.iter().any(|h| d.analyses[1].canary_hosts.contains(h)));
    // Each fresh host started v1 once more (with the canary), then v2 in
    // its own batch; the others started v1 once.
    let v1_starts = f.starts("v1");
    for (i, n) in v1_starts.iter().enumerate() {
        let host = format!("web-{i}");
        let want = if fresh.contains(&host) { 2 } else { 1 };
        assert_eq!(*n, want, "{host}: {v1_starts:?} (fresh: {fresh:?})");
    }
    assert_eq!(f.starts("v2"), [1; 5]);
    assert_eq!(f.versions().await, ["v2"; 5]);
    let (_, status, _) = f.coord.droverctl(&["deploy", "status", &d.id]);
    assert!(
        status.contains("a fresh baseline: restarted on the old release with the canary")
            && status.contains("THRESHOLDS"),
        "{status}"
    );
}
