//! A canary by traffic weight (issue 14, deliverable 4), end to end: the
//! new release runs in each host's idle slot and takes 10% → 25% → 50% of
//! the backend's real traffic through haproxy's server weights, judged at
//! each step by the canary analysis (the new slot against the old slot on
//! the same hosts); a bad release goes back to 0% at once.

use std::time::Duration;

use drover_common::proto::{AnalysisVerdict, DeployPhase};
use drover_coordinator::router::haproxy::{Haproxy, RuntimeAddr};
use drover_coordinator::router::{Router, ServerState};
use drover_tests::blue_green::BlueGreenFleet;
use drover_tests::sample_fleet::start_load;

/// The weighted canary: three shares of 1.5 s each, an analysis that needs
/// 5 requests per host, at alpha 0.01 (healthy versions here serve no
/// errors at all, so only latency could raise a false alarm).
fn settings(bg: &BlueGreenFleet) {
    bg.f.apply(&format!(
        "name = \"hello-bg\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\n\
         selector = \"env=prod\"\nbatch_size = 1\nstuck_timeout_ms = 20000\n\
         strategy = \"STRATEGY_WEIGHTED_CANARY\"\n\
         gate = {{ samples = 2, bad_samples = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}\n\
         router = {{ haproxy = \"unix:{}\", backend = \"web\" }}\n\
         blue_green = {{ scale_down_delay_ms = 300 }}\n\n\
         [stages.canary]\nsteps = [{{ percent = 10, bake_ms = 1500 }}, {{ percent = 25, bake_ms = 1500 }}, {{ percent = 50, bake_ms = 1500 }}]\n\n\
         [stages.canary.analysis]\nmin_requests = 5\nalpha = 0.01\n",
        bg.lb.socket.display()
    ));
}

/// The weights haproxy gave `server` of backend "web" while it was ready,
/// read every 50 ms until `stop` (distinct, in order).
async fn weights_seen(
    socket: std::path::PathBuf,
    server: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u32> {
    let router = Haproxy::new(RuntimeAddr::Unix(socket));
    let mut seen = Vec::new();
    while !*stop.borrow() {
        if let Ok(servers) = router.servers("web").await
            && let Some(s) = servers.iter().find(|s| s.server == server)
            && s.state == ServerState::Ready
            && seen.last() != Some(&s.weight)
        {
            seen.push(s.weight);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_canary_shifts_traffic_step_by_step_and_goes_back_to_zero_on_failure() {
    let bg = BlueGreenFleet::start(2).await;
    let f = &bg.f;
    settings(&bg);
    // 400 requests a second: the first share (10%, 1.5 s) sees about 60
    // requests of the new slot, enough for the analysis to tell a 30% error
    // rate from none (at 200 it saw about 25, and once passed v3 on 5
    // errors of 25: p = 7.9e-6 against a share of alpha of 7.6e-6).
    let _load = start_load(&f.dir, "lb", bg.lb.frontend.port(), 400);
    // A first deploy has no old slot to share with: straight to green.
    let v1 = f.push("v1", &[]);
    let (code, out, err) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v1));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(f.coord.latest_deploy("hello-bg").await.analyses.is_empty());

    // v2 in blue: 10%, 25%, 50% of the traffic, each judged, then all.
    let v2 = f.push("v2", &[]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watch = tokio::spawn(weights_seen(bg.lb.socket.clone(), "web-0-blue", stop_rx));
    let (code, out, err) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v2));
    let _ = stop_tx.send(true);
    assert_eq!(code, 0, "{out}\n{err}");
    let weights = watch.await.unwrap();
    assert_eq!(
        weights,
        [10, 25, 50, 100],
        "web-0-blue's weights, step by step"
    );
    let d = f.coord.latest_deploy("hello-bg").await;
    let verdicts: Vec<AnalysisVerdict> = d.analyses.iter().map(|a| a.verdict()).collect();
    assert_eq!(verdicts, [AnalysisVerdict::Pass; 3], "{:?}", d.analyses);
    for a in &d.analyses {
        assert_eq!(a.canary_hosts, ["web-0", "web-1"]);
        assert_eq!(a.baseline_hosts, ["web-0", "web-1"]);
    }
    assert_eq!(bg.answers(0, 20).await, ["v2"]);
    assert_eq!(bg.live_slot().await, drover_common::proto::Slot::Blue);

    // v3 serves 30% errors: its analysis fails at the first share, and
    // green goes back to 0% at once while blue's weights are restored.
    let v3 = f.push("v3", &["--error-rate", "0.3", "--random-errors"]);
    let (code, out, err) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v3));
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let d = f.coord.latest_deploy("hello-bg").await;
    assert_eq!(d.phase(), DeployPhase::RolledBack);
    assert_eq!(
        d.analyses.len(),
        1,
        "decided at the first share: {:#?}",
        d.analyses
    );
    assert_eq!(d.analyses[0].verdict(), AnalysisVerdict::Fail);
    assert!(
        d.analyses[0].reason.contains("error_rate"),
        "{}",
        d.analyses[0].reason
    );
    assert_eq!(bg.answers(0, 40).await, ["v2"]);
    let router = Haproxy::new(RuntimeAddr::Unix(bg.lb.socket.clone()));
    let servers = router.servers("web").await.unwrap();
    for s in &servers {
        let expected = if s.server.ends_with("-blue") {
            ServerState::Ready
        } else {
            ServerState::Maint
        };
        assert_eq!((s.state, s.weight), (expected, 100), "{s:?}");
    }
}
