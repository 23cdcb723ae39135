//! The HAProxy router against a real haproxy on loopback: a blue-green
//! switch moves every request and back, weights split traffic as a
//! weighted canary needs, and bad input is refused with traffic left where
//! it was. Real sample services answer behind it; every request is real.

use std::net::SocketAddr;
use std::time::Duration;

use drover_coordinator::router::haproxy::{Haproxy, RuntimeAddr};
use drover_coordinator::router::{Router, RouterError, ServerState};
use drover_tests::haproxy::HaproxyLb;
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
