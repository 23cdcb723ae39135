//! Blue-green deploys end to end (issue 14): real agents run the sample
//! service in two slots per host, a real haproxy on loopback holds a
//! `<host>-blue` and a `<host>-green` server per host in its main backend
//! and in a preview backend, and the coordinator moves traffic through
//! haproxy's runtime API. Every request is real and counted.

use std::time::Duration;

use drover_common::proto::{DeployPhase, Slot};
use drover_tests::blue_green::{BlueGreenFleet, traffic_switches};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::wait_until_ok;

const WAIT: Duration = Duration::from_secs(60);

fn deploy(f: &SampleFleet, digest: &str) -> (i32, String, String) {
    tokio::task::block_in_place(|| f.deploy_through("hello-bg", digest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_every_host_at_once_and_a_rollback_is_an_instant_switch_back() {
    let bg = BlueGreenFleet::start(2).await;
    let f = &bg.f;
    bg.apply("scale_down_delay_ms = 500", 20_000);
    // A first deploy starts in green.
    let v1 = f.push("v1", &[]);
    let (code, out, err) = deploy(f, &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(bg.answers(0, 20).await, ["v1"]);
    assert_eq!(bg.live_slot().await, Slot::Green);

    // v2 in blue under steady load: no request fails, green is stopped
    // after the scale-down delay.
    let v2 = f.push("v2", &[]);
    let ((code, out, err), seen) = bg.under_load(async { deploy(f, &v2) }).await;
    assert_eq!(code, 0, "{out}\n{err}");
    eprintln!("v1 → v2 under load: {seen:?}");
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert!(seen.ok() > 50, "the load ran throughout: {seen:?}");
    assert_eq!(bg.answers(0, 20).await, ["v2"]);
    assert_eq!(bg.live_slot().await, Slot::Blue);
    for i in 0..2 {
        assert!(
            !bg.slot_answers(i, false).await,
            "web-{i}'s green is stopped"
        );
        assert_eq!(bg.slot_starts(i, "blue", "v2"), 1);
    }

    // v3 in green, kept warm for a minute: a rollback during the delay
    // switches back at once, with no process restarted.
    bg.apply("scale_down_delay_ms = 60000", 20_000);
    let v3 = f.push("v3", &[]);
    let id = f.coord.start_deploy("hello-bg", &v3).await;
    wait_until_ok("every host switched to green", WAIT, || async {
        let d = f.coord.get_deploy(&id).await;
        d.blue_green
            .first()
            .is_some_and(|s| s.switched_hosts.len() == 2)
            && d.batch == 2
            && d.phase() == DeployPhase::Rolling
    })
    .await;
    assert_eq!(bg.answers(0, 20).await, ["v3"]);
    for i in 0..2 {
        assert!(
            bg.slot_answers(i, true).await,
            "web-{i}'s blue is kept warm"
        );
    }
    let (_, status, _) = f.coord.droverctl(&["deploy", "status", &id]);
    assert!(
        status.contains("(2/2 hosts updated)"),
        "each host once: {status}"
    );
    assert!(
        status.contains("blue-green stage 0: blue → green; traffic on green for 2 hosts")
            && status.contains("blue kept warm for"),
        "{status}"
    );
    let (_, seen) = bg
        .under_load(async {
            let (code, out, err) = f
                .coord
                .droverctl(&["deploy", "rollback", &id, "--reason", "bad v3"]);
            assert_eq!(code, 0, "{out}\n{err}");
            f.coord.wait_phase(&id, DeployPhase::RolledBack).await
        })
        .await;
    eprintln!("switch back under load: {seen:?}");
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert_eq!(bg.answers(0, 20).await, ["v2"]);
    assert_eq!(bg.live_slot().await, Slot::Blue);
    for i in 0..2 {
        assert_eq!(
            bg.slot_starts(i, "blue", "v2"),
            1,
            "web-{i}'s blue never restarted"
        );
        assert!(
            !bg.slot_answers(i, false).await,
            "web-{i}'s green is stopped"
        );
    }

    // The audit has every switch, each server's state and weight before
    // and after.
    let events = traffic_switches(&f.coord, "hello").await;
    let switches: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(switches.len(), 4, "{switches:#?}");
    let back = events.last().unwrap();
    assert!(
        back.message.contains("switched back to blue"),
        "{}",
        back.message
    );
    let blue = back
        .traffic
        .iter()
        .find(|c| c.server == "web-0-blue")
        .unwrap();
    assert_eq!(
        (blue.state_before.as_str(), blue.state_after.as_str()),
        ("drain", "ready"),
        "{back:?}"
    );
    assert_eq!((blue.weight_before, blue.weight_after), (100, 100));
    let green = back
        .traffic
        .iter()
        .find(|c| c.server == "web-1-green")
        .unwrap();
    assert_eq!(
        (green.state_before.as_str(), green.state_after.as_str()),
        ("ready", "drain")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_slot_that_never_gets_ready_or_cannot_bind_moves_no_traffic() {
    let bg = BlueGreenFleet::on_v1(2, "scale_down_delay_ms = 300", 3_000).await;
    let f = &bg.f;

    // v2 is never ready: the deploy fails before the switch, traffic never
    // leaves v1 and the half-started blue slots are stopped.
    let v2 = f.push("v2", &["--unready"]);
    let ((code, out, err), seen) = bg.under_load(async { deploy(f, &v2) }).await;
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert_eq!(seen.answered.keys().collect::<Vec<_>>(), ["v1"]);
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains("not ready in the blue slot")
            && d.reason.contains("traffic stays on green"),
        "{}",
        d.reason
    );
    for i in 0..2 {
        assert!(!bg.slot_answers(i, true).await, "web-{i}'s blue is stopped");
    }

    // Another process holds web-1's blue port: the deploy fails naming it.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", bg.slots[1].0)).unwrap();
    let v3 = f.push("v3", &[]);
    let (code, out, err) = deploy(f, &v3);
    assert_ne!(code, 0, "{out}\n{err}");
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains(&format!(
            "port {} of hello's blue slot is in use",
            bg.slots[1].0
        )),
        "{}",
        d.reason
    );
    assert_eq!(bg.answers(0, 20).await, ["v1"]);
    drop(squatter);

    // A blue-green stage without a router is refused when applied.
    let path = f.dir.path().join("no-router.toml");
    std::fs::write(
        &path,
        "name = \"hello-bg\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\n\
         selector = \"env=prod\"\nbatch_size = 1\nstrategy = \"STRATEGY_BLUE_GREEN\"\n",
    )
    .unwrap();
    let (code, _, err) = f
        .coord
        .droverctl(&["pipeline", "apply", "-f", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("stages[0].router"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_promotion_holds_with_the_new_slot_on_the_preview_until_promoted_or_timed_out() {
    let bg = BlueGreenFleet::on_v1(2, "scale_down_delay_ms = 300", 20_000).await;
    let f = &bg.f;

    let gate = "pre_promotion = { samples = 2, bad_samples = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }";
    bg.apply(
        &format!("scale_down_delay_ms = 300, manual_promotion = true, {gate}"),
        20_000,
    );
    let v2 = f.push("v2", &[]);
    let id = f.coord.start_deploy("hello-bg", &v2).await;
    let held = f.coord.wait_phase(&id, DeployPhase::Paused).await;
    assert!(
        held.reason.contains("waiting for promote"),
        "{}",
        held.reason
    );
    // Testers see v2 on the preview; users still get v1.
    assert_eq!(bg.answers(1, 20).await, ["v2"]);
    assert_eq!(bg.answers(0, 20).await, ["v1"]);
    let (code, out, err) = f.coord.droverctl(&["deploy", "promote", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    f.coord.wait_phase(&id, DeployPhase::Complete).await;
    assert_eq!(bg.answers(0, 20).await, ["v2"]);

    // Nobody promotes v3 within its limit: rolled back as the pipeline
    // says, traffic never left v2.
    bg.apply(
        "scale_down_delay_ms = 300, manual_promotion = true, promotion_timeout_ms = 1500, \
         on_promotion_timeout = \"APPROVAL_TIMEOUT_OUTCOME_ROLLBACK\"",
        20_000,
    );
    let v3 = f.push("v3", &[]);
    let id = f.coord.start_deploy("hello-bg", &v3).await;
    let d = f.coord.wait_phase(&id, DeployPhase::RolledBack).await;
    assert!(
        d.reason.contains("nobody promoted stage prod"),
        "{}",
        d.reason
    );
    assert_eq!(bg.answers(0, 20).await, ["v2"]);
    assert_eq!(bg.live_slot().await, Slot::Blue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_puts_the_recorded_traffic_back_and_finishes() {
    use drover_coordinator::router::haproxy::{Haproxy, RuntimeAddr};
    use drover_coordinator::router::{Router, ServerState};

    let mut bg = BlueGreenFleet::start(2).await;
    bg.apply("scale_down_delay_ms = 3000", 20_000);
    let v1 = bg.f.push("v1", &[]);
    let (code, out, err) = deploy(&bg.f, &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    let v2 = bg.f.push("v2", &[]);
    let id = bg.f.coord.start_deploy("hello-bg", &v2).await;
    wait_until_ok("every host switched to blue", WAIT, || async {
        let d = bg.f.coord.get_deploy(&id).await;
        d.blue_green
            .first()
            .is_some_and(|s| s.switched_hosts.len() == 2)
            && d.batch == 2
    })
    .await;
    assert_eq!(bg.answers(0, 20).await, ["v2"]);

    // The coordinator dies during the scale-down delay, and meanwhile
    // someone sends the traffic back to green by hand.
    let addr = bg.f.coord.addr;
    bg.f.coord.child.signal(nix::sys::signal::Signal::SIGKILL);
    bg.f.coord.child.wait_exit(Duration::from_secs(5)).await;
    let router = Haproxy::new(RuntimeAddr::Unix(bg.lb.socket.clone()));
    for host in ["web-0", "web-1"] {
        let green = format!("{host}-green");
        let blue = format!("{host}-blue");
        router
            .set_state("web", &green, ServerState::Ready)
            .await
            .unwrap();
        router
            .set_state("web", &blue, ServerState::Maint)
            .await
            .unwrap();
    }
    assert_eq!(bg.answers(0, 20).await, ["v1"]);

    // Started again, it re-asserts what the record says, then finishes.
    bg.f.coord = drover_tests::Coordinator::start_on(&bg.f.dir, "coord", addr, &[]).await;
    wait_until_ok("the recorded traffic re-asserted", WAIT, || async {
        bg.answers(0, 10).await == ["v2"]
    })
    .await;
    bg.f.coord.wait_phase(&id, DeployPhase::Complete).await;
    assert_eq!(bg.answers(0, 20).await, ["v2"]);
    assert_eq!(bg.live_slot().await, Slot::Blue);
    for i in 0..2 {
        assert!(
            !bg.slot_answers(i, false).await,
            "web-{i}'s green is stopped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_post_promotion_gate_switches_back_by_itself() {
    let bg = BlueGreenFleet::on_v1(2, "scale_down_delay_ms = 300", 20_000).await;
    let f = &bg.f;
    // The post-promotion gate judges the new slot on real traffic: at
    // most 5% errors, 2 bad samples fail it; blue would stay warm for 30 s.
    bg.apply(
        "scale_down_delay_ms = 30000, post_promotion = { max_error_rate = 0.05, samples = 4, \
         bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }",
        20_000,
    );
    // v2 is ready, but half its answers to `/` are errors: nobody sees
    // that until traffic reaches it.
    let _errors = drover_tests::sample_fleet::start_load(&f.dir, "lb", bg.lb.frontend.port(), 100);
    let v2 = f.push("v2", &["--error-rate", "0.5"]);
    let ((code, out, err), seen) = bg.under_load(async { deploy(f, &v2) }).await;
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains("post-promotion gate") && d.reason.contains("switching back to green"),
        "{}",
        d.reason
    );
    eprintln!("a bad v2 switched in and back: {seen:?}");
    assert!(seen.answered.contains_key("v1"), "{seen:?}");
    assert_eq!(bg.answers(0, 40).await, ["v1"], "every request back on v1");
    assert_eq!(bg.live_slot().await, Slot::Green);
    for i in 0..2 {
        assert_eq!(
            bg.slot_starts(i, "green", "v1"),
            1,
            "web-{i}'s v1 never restarted"
        );
        assert!(!bg.slot_answers(i, true).await, "web-{i}'s blue is stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_switch_region_by_region_and_a_missing_router_moves_nothing() {
    let bg = BlueGreenFleet::start(2).await;
    let f = &bg.f;
    // Two waves: web-0 (idx=0) first, then web-1.
    let router = format!(
        "{{ haproxy = \"unix:{}\", backend = \"web\" }}\n\
         waves = [{{ name = \"first\", selectors = [\"idx=0\"] }}, {{ name = \"second\", selectors = [\"idx=1\"] }}]",
        bg.lb.socket.display()
    );
    bg.apply_through(&router, "scale_down_delay_ms = 300", 20_000);
    let v1 = f.push("v1", &[]);
    let (code, out, err) = deploy(f, &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    let d = f.coord.latest_deploy("hello-bg").await;
    let sizes: Vec<usize> = d.batches.iter().map(|b| b.hosts.len()).collect();
    assert_eq!(
        sizes,
        [2, 1, 1, 2],
        "stand up, a switch per wave, scale down"
    );
    let events = traffic_switches(&f.coord, "hello").await;
    let switched: Vec<Vec<String>> = events.iter().map(|e| e.hosts.clone()).collect();
    assert_eq!(
        switched,
        [vec!["web-0".to_string()], vec!["web-1".to_string()]]
    );
    assert_eq!(bg.answers(0, 20).await, ["v1"]);

    // A router socket that does not exist: the deploy fails before any
    // slot starts, traffic stays on v1.
    let missing = bg.f.dir.path().join("no-such.sock");
    bg.apply_through(
        &format!(
            "{{ haproxy = \"unix:{}\", backend = \"web\" }}",
            missing.display()
        ),
        "scale_down_delay_ms = 300",
        20_000,
    );
    let v2 = f.push("v2", &[]);
    let (code, _, _) = deploy(f, &v2);
    assert_ne!(code, 0);
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains("unreachable") && d.reason.contains("no-such.sock"),
        "{}",
        d.reason
    );
    assert_eq!(bg.slot_starts(0, "blue", "v2"), 0, "no slot started");
    assert_eq!(bg.answers(0, 20).await, ["v1"]);
}
