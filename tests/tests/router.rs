//! The HAProxy router against a real haproxy on loopback: a blue-green
//! switch moves every request and back, weights split traffic as a
//! weighted canary needs, and bad input is refused with traffic left where
//! it was. Real sample services answer behind it; every request is real.

use std::net::SocketAddr;
use std::time::Duration;

use drover_coordinator::router::haproxy::{Haproxy, RuntimeAddr};
use drover_coordinator::router::{Router, RouterError, ServerState};
use drover_tests::haproxy::{HaproxyLb, steady_load};
use drover_tests::{ChildGuard, TestDir, bins, free_port, http_get_status, wait_until};

/// A sample service answering `/version` with `label`.
async fn service(dir: &TestDir, label: &str) -> (u16, ChildGuard) {
    let port = free_port();
    let mut cmd = std::process::Command::new(bins::bin("drover-sample"));
    cmd.args(["--port", &port.to_string(), "--version-label", label]);
    let child = ChildGuard::spawn(label, cmd, &dir.path().join(format!("{label}.log")));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(
        &format!("{label} listening"),
        Duration::from_secs(20),
        || async { http_get_status(addr, "/healthz").await.map(|_| ()) },
    )
    .await;
    (port, child)
}

/// Who answered `n` requests through the frontend: (blue, green).
async fn answers(lb: &HaproxyLb, n: usize) -> (usize, usize) {
    let (mut blue, mut green) = (0, 0);
    for _ in 0..n {
        match lb.get("/version").await.as_deref() {
            Ok("blue") => blue += 1,
            Ok("green") => green += 1,
            other => panic!("an unexpected answer: {other:?}"),
        }
    }
    (blue, green)
}

/// Blue serving, green idle (in maintenance), behind one haproxy.
async fn blue_and_green(dir: &TestDir) -> (HaproxyLb, Haproxy, Vec<ChildGuard>) {
    let (blue, b) = service(dir, "blue").await;
    let (green, g) = service(dir, "green").await;
    let lb = HaproxyLb::start(dir, "web", &[("blue", blue, 100), ("green", green, 100)]).await;
    let router = Haproxy::new(RuntimeAddr::Unix(lb.socket.clone()));
    router
        .set_state("web", "green", ServerState::Maint)
        .await
        .unwrap();
    (lb, router, vec![b, g])
}

#[tokio::test]
async fn a_blue_green_switch_moves_every_request_and_back() {
    let dir = TestDir::new();
    let (lb, router, _services) = blue_and_green(&dir).await;
    assert_eq!(answers(&lb, 50).await, (50, 0));
    // Switch: green takes traffic, blue drains.
    router
        .set_state("web", "green", ServerState::Ready)
        .await
        .unwrap();
    router
        .set_state("web", "blue", ServerState::Drain)
        .await
        .unwrap();
    assert_eq!(answers(&lb, 50).await, (0, 50));
    let servers = router.servers("web").await.unwrap();
    let state = |name: &str| servers.iter().find(|s| s.server == name).unwrap().state;
    assert_eq!(
        (state("blue"), state("green")),
        (ServerState::Drain, ServerState::Ready)
    );
    // And back, at once, no process restarted.
    router
        .set_state("web", "blue", ServerState::Ready)
        .await
        .unwrap();
    router
        .set_state("web", "green", ServerState::Maint)
        .await
        .unwrap();
    assert_eq!(answers(&lb, 50).await, (50, 0));
    // Idempotent: asserting the same state again changes nothing.
    router
        .set_state("web", "green", ServerState::Maint)
        .await
        .unwrap();
    assert_eq!(answers(&lb, 20).await, (20, 0));
}

#[tokio::test]
async fn weights_split_traffic_for_a_weighted_canary() {
    let dir = TestDir::new();
    let (lb, router, _services) = blue_and_green(&dir).await;
    router
        .set_state("web", "green", ServerState::Ready)
        .await
        .unwrap();
    for (blue_weight, green_weight, green_share) in [(99, 1, 0.01), (95, 5, 0.05), (75, 25, 0.25)] {
        router.set_weight("web", "blue", blue_weight).await.unwrap();
        router
            .set_weight("web", "green", green_weight)
            .await
            .unwrap();
        let (blue, green) = answers(&lb, 400).await;
        let share = green as f64 / (blue + green) as f64;
        assert!(
            (share - green_share).abs() <= 0.02,
            "green answered {green} of 400 at weights {blue_weight}/{green_weight}"
        );
    }
    // Back to 0% at once.
    router.set_weight("web", "green", 0).await.unwrap();
    assert_eq!(answers(&lb, 100).await, (100, 0));
    let servers = router.servers("web").await.unwrap();
    let weights: Vec<(String, u32)> = servers
        .iter()
        .map(|s| (s.server.clone(), s.weight))
        .collect();
    assert_eq!(
        weights,
        [("blue".to_string(), 75), ("green".to_string(), 0)]
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_traffic_stays_where_it_was() {
    let dir = TestDir::new();
    let (lb, router, _services) = blue_and_green(&dir).await;
    let before = router.servers("web").await.unwrap();
    assert_eq!(
        router.set_state("api", "blue", ServerState::Ready).await,
        Err(RouterError::UnknownBackend("api".into()))
    );
    assert_eq!(
        router.set_state("web", "purple", ServerState::Ready).await,
        Err(RouterError::UnknownServer {
            backend: "web".into(),
            server: "purple".into()
        })
    );
    assert_eq!(
        router.servers("api").await,
        Err(RouterError::UnknownBackend("api".into()))
    );
    assert_eq!(
        router.set_weight("web", "green", 300).await,
        Err(RouterError::BadWeight(300))
    );
    // A name carrying a second command is refused before it is sent.
    assert!(matches!(
        router
            .set_state(
                "web",
                "green state ready\nset server web/blue",
                ServerState::Maint
            )
            .await,
        Err(RouterError::Refused { .. })
    ));
    // A socket that does not exist.
    let missing = Haproxy::new(RuntimeAddr::Unix(dir.path().join("no-such.sock")));
    let err = missing
        .set_state("web", "green", ServerState::Ready)
        .await
        .unwrap_err();
    assert!(matches!(err, RouterError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("no-such.sock"), "{err}");
    // Nothing moved.
    assert_eq!(router.servers("web").await.unwrap(), before);
    assert_eq!(answers(&lb, 30).await, (30, 0));
}

/// The state of every server of backend "web", in order.
async fn states(lb: &HaproxyLb) -> Vec<ServerState> {
    let router = Haproxy::new(RuntimeAddr::Unix(lb.socket.clone()));
    let servers = router.servers("web").await.unwrap();
    servers.iter().map(|s| s.state).collect()
}

/// A rolling stage over the three hosts, one at a time, through `router`
/// (TOML, or empty).
fn rolling(router: &str) -> String {
    format!(
        "name = \"hello-lb\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\n\
         batch_size = 1\nsettle_ms = 300\nstuck_timeout_ms = 20000\n\
         gate = {{ inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}\n{router}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_through_haproxy_drains_each_host_and_drops_no_requests() {
    let f = drover_tests::sample_fleet::SampleFleet::start(3, 0).await;
    let servers: Vec<(&str, u16, u32)> =
        f.ports.iter().map(|(h, p)| (h.as_str(), *p, 100)).collect();
    let lb = HaproxyLb::start(&f.dir, "web", &servers).await;
    f.apply(&rolling(""));
    let v1 = f.push("v1", &["--latency-ms", "200"]);
    let (code, out, err) = f.deploy_through("hello-lb", &v1);
    assert_eq!(code, 0, "{out}\n{err}");

    // Under steady load through the balancer, a deploy of v2 without the
    // router, then v3 with it.
    let through = |router: String, version: &'static str| {
        let f = &f;
        let lb = lb.frontend;
        async move {
            f.apply(&rolling(&router));
            // Each request takes 200 ms: some are always in flight.
            let digest = f.push(version, &["--latency-ms", "200"]);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let load = tokio::spawn(steady_load(lb, "/", stop_rx));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (code, out, err) =
                tokio::task::block_in_place(|| f.deploy_through("hello-lb", &digest));
            assert_eq!(code, 0, "{version}: {out}\n{err}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = stop_tx.send(true);
            let seen = load.await.unwrap();
            (seen.ok(), seen.failed)
        }
    };
    let (ok, failed) = through(String::new(), "v2").await;
    eprintln!("without the router: {ok} answered, {failed} failed");
    assert!(
        failed > 0,
        "restarts in place drop requests behind a balancer: {ok} answered, {failed} failed"
    );
    let router = format!(
        "router = {{ haproxy = \"unix:{}\", backend = \"web\", drain_timeout_ms = 5000 }}",
        lb.socket.display()
    );
    let (ok, failed) = through(router, "v3").await;
    eprintln!("through the router: {ok} answered, {failed} failed");
    assert_eq!(failed, 0, "{ok} answered");
    assert!(ok > 100, "the load ran throughout: {ok}");
    assert_eq!(f.versions().await, ["v3"; 3]);
    // Every server takes traffic again.
    assert_eq!(states(&lb).await, [ServerState::Ready; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_does_not_know_the_host_fails_it_and_its_process_is_not_touched() {
    let f = drover_tests::sample_fleet::SampleFleet::start(2, 0).await;
    // The balancer knows web-0 only.
    let lb = HaproxyLb::start(&f.dir, "web", &[(f.ports[0].0.as_str(), f.ports[0].1, 100)]).await;
    f.apply(&rolling(""));
    let v1 = f.push("v1", &[]);
    let (code, out, err) = f.deploy_through("hello-lb", &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    f.apply(&rolling(&format!(
        "router = {{ haproxy = \"unix:{}\", backend = \"web\" }}",
        lb.socket.display()
    )));
    let v2 = f.push("v2", &[]);
    let (code, _, _) = tokio::task::block_in_place(|| f.deploy_through("hello-lb", &v2));
    assert_ne!(code, 0);
    let d = f.coord.latest_deploy("hello-lb").await;
    assert!(
        d.reason
            .contains("web-1: router: draining before the restart")
            && d.reason.contains("no server \"web-1\""),
        "{}",
        d.reason
    );
    assert_eq!(f.starts("v2")[1], 0, "web-1 never ran v2");
    assert_eq!(f.starts("v1")[1], 1, "web-1's process was not restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_fails_behind_haproxy_is_rolled_back_and_takes_traffic_again() {
    let f = drover_tests::sample_fleet::SampleFleet::start(2, 0).await;
    let servers: Vec<(&str, u16, u32)> =
        f.ports.iter().map(|(h, p)| (h.as_str(), *p, 100)).collect();
    let lb = HaproxyLb::start(&f.dir, "web", &servers).await;
    let router = format!(
        "router = {{ haproxy = \"unix:{}\", backend = \"web\" }}",
        lb.socket.display()
    );
    let spec = rolling(&router).replace("stuck_timeout_ms = 20000", "stuck_timeout_ms = 3000");
    f.apply(&spec);
    let v1 = f.push("v1", &[]);
    let (code, out, err) = f.deploy_through("hello-lb", &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    // v2 never gets ready: its first host fails, is rolled back to v1, and
    // no request meets it meanwhile.
    let v2 = f.push("v2", &["--unready"]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady_load(lb.frontend, "/", stop_rx));
    let (code, out, err) = tokio::task::block_in_place(|| f.deploy_through("hello-lb", &v2));
    let _ = stop_tx.send(true);
    let seen = load.await.unwrap();
    let (ok, failed) = (seen.ok(), seen.failed);
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    assert_eq!(failed, 0, "{ok} answered");
    assert!(ok > 100, "{ok}");
    assert_eq!(f.versions().await, ["v1"; 2]);
    assert_eq!(
        states(&lb).await,
        [ServerState::Ready; 2],
        "both take traffic again"
    );
}
