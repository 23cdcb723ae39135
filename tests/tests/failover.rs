//! Nothing a deploy has learnt is lost when its leader is killed: a canary
//! step keeps its bake deadline (a bad canary would otherwise serve a whole
//! bake longer) and the evidence its analysis had collected, and a batch
//! keeps its restart baseline (a crash loop that began, and calmed down,
//! before the failover still fails it). Real coordinators on a real etcd,
//! real agents under load, kill -9.

use std::time::Duration;

use drover_common::proto::{AnalysisVerdict, DeployPhase};
use drover_tests::cluster_fleet::{ClusterFleet, PIPELINE, rolling_spec};
use drover_tests::{Coordinator, wait_until_ok};

/// Heartbeats of `host` seen by `via` so far.
async fn heartbeats(via: &Coordinator, host: &str) -> u64 {
    via.host(host).await.map_or(0, |h| h.heartbeat_sequence)
}

const BAKE_MS: u64 = 10_000;

fn canary_spec() -> String {
    drover_tests::specs::canary_pipeline(
        PIPELINE,
        "batch_percent = 50\nstuck_timeout_ms = 20000\n\
         gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_FAIL\" }",
        &format!("[{{ count = 1, bake_ms = {BAKE_MS} }}]"),
        "",
    )
}

#[tokio::test]
async fn a_leader_killed_mid_bake_leaves_the_bake_its_deadline() {
    let mut f = ClusterFleet::start(2, 4, &canary_spec(), 50).await;
    let v1 = f.push(f.cluster.get(0), "v1", &["--error-rate", "0.001"]);
    let id = f.start_deploy(f.cluster.get(0), &v1).await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "v1, no canary: {d:?}");

    let v2 = f.push(f.cluster.get(0), "v2", &["--error-rate", "0.001"]);
    let id = f.start_deploy(f.cluster.get(1), &v2).await;
    wait_until_ok("the canary on v2", Duration::from_secs(30), || async {
        f.starts("v2").iter().sum::<usize>() == 1
    })
    .await;
    let began = drover_common::time::now_unix_ms();
    let canary = format!(
        "web-{}",
        f.starts("v2").iter().position(|n| *n == 1).unwrap()
    );
    // Well into the bake (25 heartbeats of 200 ms), the leader dies.
    let watcher = f.cluster.other_than(f.leader().await);
    let seen = heartbeats(watcher, &canary).await;
    wait_until_ok("5 s of the bake", Duration::from_secs(30), || async {
        heartbeats(watcher, &canary).await >= seen + 25
    })
    .await;
    let (killed, next) = f.kill_leader().await;
    eprintln!("killed {killed} mid-bake; {next} leads now");
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    let a = &d.analyses[0];
    assert_eq!(a.verdict(), AnalysisVerdict::Pass, "{a:?}");
    // The new leader judged at the first leader's deadline (plus a look),
    // not a whole bake after it took over (5 s + the lease + 10 s).
    let decided = a.decided_at_unix_ms - began;
    assert!(
        (BAKE_MS - 500..BAKE_MS + 3000).contains(&decided),
        "decided {decided} ms after the canary started (bake {BAKE_MS} ms): {a:?}"
    );
    assert!(a.baked_ms >= BAKE_MS, "{a:?}");
    // The same analysis: what the first leader saw before it died is in
    // the verdict (the new leader alone could have seen at most the 5 s
    // left, less the 2 s lease: 15 intervals).
    let m = &a.metrics[0];
    assert!(m.canary_samples >= 23, "{m:?}");
    assert_eq!(f.starts("v2"), [1; 4], "each host started once");
}

#[tokio::test]
async fn a_crash_loop_that_calmed_down_before_a_failover_still_fails_the_batch() {
    // The gate looks 8 s after the batch restarted: the leader is killed
    // before, once the loop is over.
    let mut f = ClusterFleet::start(2, 3, &rolling_spec(0), 20).await;
    let v1 = f.push(f.cluster.get(0), "v1", &[]);
    let id = f.start_deploy(f.cluster.get(0), &v1).await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    f.apply(&rolling_spec(8000));

    // v2 crashes twice, 1 s after each of its first two starts on a host
    // (it is ready before: the restart itself succeeds), then stays up.
    let counts = f.dir.path().join("crash-counts");
    std::fs::create_dir(&counts).unwrap();
    std::fs::set_permissions(&counts, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let count_file = format!("{}/${{PORT}}", counts.display());
    let v2 = f.push(
        f.cluster.get(0),
        "v2",
        &[
            "--crash-after",
            "1",
            "--crash-times",
            "2",
            "--crash-count-file",
            &count_file,
        ],
    );
    let id = f.start_deploy(f.cluster.get(1), &v2).await;
    // web-0 (the first batch) crashed twice and is up again.
    wait_until_ok(
        "web-0's crash loop to end",
        Duration::from_secs(30),
        || async {
            f.starts("v2")[0] >= 3
                && f.cluster
                    .get(f.leader().await)
                    .host("web-0")
                    .await
                    .is_ok_and(|h| h.health.iter().any(|s| s.restarts >= 2 && s.ready))
        },
    )
    .await;
    let d = f.cluster.deploy(&id).await.unwrap();
    assert_eq!(
        (d.phase(), d.batch),
        (DeployPhase::Rolling, 0),
        "the gate has not looked yet"
    );
    // The survivor leads (the killed one stays down): it has had web-0's
    // heartbeats all along, so it knows the count is 2 now — and must
    // still count from before the batch.
    let (_, killed) = f.kill_leader_now().await;
    let (next, _) = f.cluster.wait_leader(f.shard(), Some(&killed)).await;
    eprintln!("killed {killed} after the crash loop; {next} leads now");
    let d = f.cluster.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(d.phase(), DeployPhase::RolledBack, "{d:?}");
    assert!(d.reason.contains("restarts"), "{}", d.reason);
    assert_eq!(f.versions().await, ["v1"; 3]);
    assert_eq!(
        f.starts("v2"),
        [3, 0, 0],
        "one deploy start and two crashes"
    );
}
