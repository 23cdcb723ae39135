//! Blue-green across host groups (a replacement fleet, issue 14
//! deliverable 1): the stage's hosts labelled grp=green are the green
//! group, the rest blue; each host runs the sample service's one process
//! behind its own server in a real haproxy. A deploy starts the new release
//! on the idle group, switches the backend from one group to the other and
//! stops the old group after the delay; a rollback meanwhile switches back
//! with no restart.

use std::time::Duration;

use drover_common::proto::{DeployPhase, Slot};
use drover_coordinator::router::haproxy::{Haproxy, RuntimeAddr};
use drover_coordinator::router::{Router, ServerState};
use drover_tests::haproxy::{HaproxyLb, steady_load};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::{sample_starts, wait_until_ok};

fn pipeline(lb: &HaproxyLb, delay_ms: u32) -> String {
    format!(
        "name = \"hello-bg\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\n\
         selector = \"env=prod\"\nbatch_size = 1\nstuck_timeout_ms = 20000\n\
         strategy = \"STRATEGY_BLUE_GREEN\"\n\
         gate = {{ samples = 2, bad_samples = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}\n\
         router = {{ haproxy = \"unix:{}\", backend = \"web\" }}\n\
         blue_green = {{ green_selector = \"grp=green\", scale_down_delay_ms = {delay_ms} }}\n",
        lb.socket.display()
    )
}

/// The state of each host's server, in host order.
async fn states(lb: &HaproxyLb) -> Vec<ServerState> {
    let router = Haproxy::new(RuntimeAddr::Unix(lb.socket.clone()));
    let servers = router.servers("web").await.unwrap();
    servers.iter().map(|s| s.state).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_moves_traffic_from_one_host_group_to_the_other_and_back() {
    use ServerState::*;
    // web-0, web-1 are blue; web-2, web-3 green.
    let f = SampleFleet::start_with(4, 0, |i| {
        if i >= 2 {
            vec!["--label".into(), "grp=green".into()]
        } else {
            Vec::new()
        }
    })
    .await;
    let servers: Vec<(&str, u16, u32)> =
        f.ports.iter().map(|(h, p)| (h.as_str(), *p, 100)).collect();
    let lb = HaproxyLb::start(&f.dir, "web", &servers).await;
    f.apply(&pipeline(&lb, 300));
    let deploy = |digest: String| {
        let f = &f;
        tokio::task::block_in_place(move || f.deploy_through("hello-bg", &digest))
    };
    let live = || drover_tests::blue_green::live_slot(&f.coord, "hello-bg");

    // A first deploy goes to the green group.
    let (code, out, err) = deploy(f.push("v1", &[]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(states(&lb).await, [Maint, Maint, Ready, Ready]);
    assert_eq!(live().await, Slot::Green);
    let versions = f.versions().await;
    assert_eq!(versions[2..], ["v1", "v1"], "{versions:?}");
    assert!(
        versions[0].starts_with("Err"),
        "blue runs nothing: {versions:?}"
    );

    // v2 to the blue group under steady load: no request fails; green is
    // stopped after the delay.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady_load(lb.frontend, "/version", stop_rx));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, out, err) = deploy(f.push("v2", &[]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    let seen = load.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    eprintln!("green group v1 → blue group v2 under load: {seen:?}");
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert!(seen.answered.contains_key("v2"), "{seen:?}");
    assert_eq!(states(&lb).await, [Ready, Ready, Maint, Maint]);
    assert_eq!(live().await, Slot::Blue);
    let versions = f.versions().await;
    assert_eq!(versions[..2], ["v2", "v2"], "{versions:?}");
    assert!(
        versions[2].starts_with("Err"),
        "the old group is stopped: {versions:?}"
    );

    // v3 to green, kept warm: a rollback switches back to blue's v2 at
    // once, no process restarted.
    f.apply(&pipeline(&lb, 60_000));
    let v3 = f.push("v3", &[]);
    let id = f.coord.start_deploy("hello-bg", &v3).await;
    wait_until_ok(
        "traffic on the green group",
        Duration::from_secs(60),
        || async {
            let d = f.coord.get_deploy(&id).await;
            d.phase() == DeployPhase::Rolling
                && d.blue_green
                    .first()
                    .is_some_and(|b| !b.switched_hosts.is_empty())
        },
    )
    .await;
    assert_eq!(states(&lb).await, [Drain, Drain, Ready, Ready]);
    let (code, out, err) = f.coord.droverctl(&["deploy", "rollback", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    f.coord.wait_phase(&id, DeployPhase::RolledBack).await;
    assert_eq!(states(&lb).await, [Ready, Ready, Maint, Maint]);
    let versions = f.versions().await;
    assert_eq!(versions[..2], ["v2", "v2"], "{versions:?}");
    assert!(
        versions[2].starts_with("Err"),
        "green is stopped again: {versions:?}"
    );
    for host in ["web-0", "web-1"] {
        assert_eq!(
            sample_starts(&f.dir, host, "v2"),
            1,
            "{host} never restarted"
        );
    }
    assert_eq!(live().await, Slot::Blue);
}
