//! Blue-green slots on one host (agent rule 6), end to end with a real
//! agent and the sample service: two releases run side by side on the
//! slots' own ports, the host reports each slot's release and health, Stop
//! ends one slot and leaves the other serving, and a slot whose port
//! another process holds is refused before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use drover_common::proto::{CommandStatus, Slot};
use drover_tests::artifacts::sample_artifact;
use drover_tests::commands::{cmd, ok, pull, restart_slot, stop};
use drover_tests::{
    Agent, Coordinator, TestDir, free_service_port, http_get_status, wait_until_ok,
};

const WAIT: Duration = Duration::from_secs(20);

/// What the sample service on `port` answers on /version.
async fn version_on(port: u16) -> Option<String> {
    match http_get_status(SocketAddr::from(([127, 0, 0, 1], port)), "/version").await {
        Ok((200, body)) => Some(body.trim().to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn two_slots_run_side_by_side_and_stop_one_at_a_time() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let (blue, green) = (free_service_port(), free_service_port());
    let slots = format!("hello={blue},{green}");
    let _agent = Agent::start_sample(
        &dir,
        "web-0",
        &[&coord],
        free_service_port(),
        &["--slot-ports", &slots],
    );
    wait_until_ok("the agent connected", WAIT, || async {
        coord.host("web-0").await.is_ok()
    })
    .await;
    let mut digests = Vec::new();
    for version in ["v1", "v2"] {
        let a = sample_artifact(dir.path(), "hello", version, &[]);
        let digest = coord.push(&a.path, "hello", version);
        ok(&coord
            .send(
                "web-0",
                cmd(&format!("pull-{version}"), 0, pull("hello", &digest)),
            )
            .await
            .unwrap());
        digests.push(digest);
    }
    let send = |id: &'static str, action| {
        let coord = &coord;
        async move { coord.send("web-0", cmd(id, 0, action)).await.unwrap() }
    };

    // Blue runs v1, then green starts v2 beside it.
    ok(&send("blue-v1", restart_slot("hello", &digests[0], Slot::Blue)).await);
    ok(&send("green-v2", restart_slot("hello", &digests[1], Slot::Green)).await);
    assert_eq!(version_on(blue).await.as_deref(), Some("v1"));
    assert_eq!(version_on(green).await.as_deref(), Some("v2"));

    // The host reports each slot: its release and its health.
    wait_until_ok("both slots reported", WAIT, || async {
        let host = coord.host("web-0").await.unwrap();
        let running = |slot: Slot, digest: &str| {
            host.services
                .iter()
                .any(|s| s.service == "hello" && s.slot() == slot && s.current_artifact == digest)
        };
        let ready = |slot: Slot| {
            host.health
                .iter()
                .any(|h| h.service == "hello" && h.slot() == slot && h.ready)
        };
        running(Slot::Blue, &digests[0])
            && running(Slot::Green, &digests[1])
            && ready(Slot::Blue)
            && ready(Slot::Green)
    })
    .await;

    let (code, shown, _) = coord.droverctl(&["host", "web-0"]);
    assert_eq!(code, 0);
    assert!(
        shown.contains("service:     hello(blue) current")
            && shown.contains("health:      hello(green) ready=true"),
        "{shown}"
    );

    // Stop blue: green keeps serving; stopping it again succeeds.
    ok(&send("stop-blue", stop("hello", Slot::Blue)).await);
    assert_eq!(version_on(blue).await, None, "blue's port is closed");
    assert_eq!(version_on(green).await.as_deref(), Some("v2"));
    let again = send("stop-blue-again", stop("hello", Slot::Blue)).await;
    ok(&again);
    assert!(again.reason.contains("not running"), "{}", again.reason);
    wait_until_ok("blue no longer reported", WAIT, || async {
        let host = coord.host("web-0").await.unwrap();
        !host.services.iter().any(|s| s.slot() == Slot::Blue)
    })
    .await;

    // Another process takes blue's port: starting blue is refused, green
    // is untouched.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", blue)).unwrap();
    let refused = send(
        "blue-v1-again",
        restart_slot("hello", &digests[0], Slot::Blue),
    )
    .await;
    assert_eq!(refused.status(), CommandStatus::Failed, "{refused:?}");
    assert!(
        refused.reason.contains(&format!("port {blue}")) && refused.reason.contains("in use"),
        "{}",
        refused.reason
    );
    assert_eq!(version_on(green).await.as_deref(), Some("v2"));
    drop(squatter);

    // The service's one process is not running here: stopping it succeeds.
    let plain = send("stop-plain", stop("hello", Slot::None)).await;
    ok(&plain);
    assert!(plain.reason.contains("not running"), "{}", plain.reason);
    assert_eq!(
        version_on(green).await.as_deref(),
        Some("v2"),
        "slots untouched"
    );
}
