//! A torn release is never started, end to end with the real agent: the
//! agent records each release file by file when it unpacks it (fsynced
//! before it can become current); Verify names a file that differs; a
//! Restart or Rollback to a damaged release makes it again from the
//! verified archive (never downloading); an agent killed with its current
//! release torn starts it again only once made whole.

use std::net::SocketAddr;
use std::time::Duration;

use drover_common::proto::{CommandStatus, ConnectionState};
use drover_tests::artifacts::sample_artifact;
use drover_tests::commands::{cmd, ok, pull, restart, rollback, verify};
use drover_tests::{Agent, Coordinator, TestDir, free_port, http_get_status, wait_until};

const SERVICE: &str = "hello";

/// What the sample service answers on /version, once it answers.
async fn version(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(
        "the sample service to answer",
        Duration::from_secs(20),
        || async {
            match http_get_status(addr, "/version").await {
                Ok((200, body)) => Ok(body.trim().to_string()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_torn_release_is_named_by_verify_and_never_started() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let port = free_port();
    let mut agent = Agent::start_sample(&dir, "web-1", &[&coord], port, &[]);
    coord
        .wait_state("web-1", ConnectionState::Connected, Duration::from_secs(20))
        .await;
    let artifacts = dir.sub("artifacts");
    let v1 = sample_artifact(&artifacts, SERVICE, "v1", &[]).digest;
    let v2 = sample_artifact(&artifacts, SERVICE, "v2", &[]).digest;
    for (v, d) in [("v1", &v1), ("v2", &v2)] {
        coord.push(&artifacts.join(format!("{SERVICE}-{v}.tar.gz")), SERVICE, v);
        ok(&coord
            .send("web-1", cmd(&format!("p-{v}"), 0, pull(SERVICE, d)))
            .await
            .unwrap());
        ok(&coord
            .send("web-1", cmd(&format!("r-{v}"), 0, restart(SERVICE, d)))
            .await
            .unwrap());
    }
    assert_eq!(version(port).await, "v2");
    let releases = agent.data_dir.join("services/hello/releases");
    assert!(
        releases.join(format!("{v1}.tree")).is_file(),
        "each release has its record"
    );
    let start_of = |d: &str| releases.join(d).join("bin/start");
    let whole = std::fs::read(start_of(&v1)).unwrap();

    // v1 (the previous release) torn: its start script cut short.
    std::fs::write(start_of(&v1), &whole[..whole.len() / 2]).unwrap();
    let u = coord
        .send("web-1", cmd("verify-torn", 0, verify(SERVICE, &v1)))
        .await
        .unwrap();
    assert_eq!(u.status(), CommandStatus::Failed, "{u:?}");
    assert!(
        u.reason.contains("is damaged") && u.reason.contains("bin/start differs"),
        "{}",
        u.reason
    );

    // A rollback to it makes it again from the archive, then starts it.
    let fetched_before = fetched_bytes(&coord).await;
    ok(&coord
        .send("web-1", cmd("rb-v1", 0, rollback(SERVICE, &v1)))
        .await
        .unwrap());
    assert_eq!(version(port).await, "v1");
    assert_eq!(
        std::fs::read(start_of(&v1)).unwrap(),
        whole,
        "made whole again"
    );
    ok(&coord
        .send("web-1", cmd("verify-whole", 0, verify(SERVICE, &v1)))
        .await
        .unwrap());
    assert_eq!(
        fetched_before,
        fetched_bytes(&coord).await,
        "nothing was downloaded"
    );

    // The agent dies with its current release torn: back up, it starts the
    // release only once made whole again.
    std::fs::write(start_of(&v1), b"#!/bin/sh\nexit 3\n").unwrap();
    agent.child.signal(nix::sys::signal::Signal::SIGKILL);
    agent.child.wait_exit(Duration::from_secs(5)).await;
    drop(agent);
    let _agent = Agent::start_sample(&dir, "web-1", &[&coord], port, &[]);
    coord
        .wait_state("web-1", ConnectionState::Connected, Duration::from_secs(20))
        .await;
    assert_eq!(version(port).await, "v1");
    assert_eq!(std::fs::read(start_of(&v1)).unwrap(), whole);
}

/// Artifact bytes the origin served to agents so far.
async fn fetched_bytes(coord: &Coordinator) -> f64 {
    let page = drover_tests::http_get(coord.metrics_addr, "/metrics").await;
    drover_tests::cluster::metric(&page, "drover_artifact_fetched_bytes_total")
}
