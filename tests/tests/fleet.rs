//! The fleet view end to end: real coordinator, real agents, real sockets.

use std::time::{Duration, Instant};

use drover_common::proto::ConnectionState;
use drover_tests::raw::{self, RawStream};
use drover_tests::{Agent, Coordinator, TestDir, wait_until, wait_until_ok};
use nix::sys::signal::Signal;

const FAST: &[&str] = &["--heartbeat-interval", "200ms", "--reconnect-max", "1s"];

#[tokio::test]
async fn three_agents_appear_with_labels_and_fresh_heartbeats() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let labels = [("web-1", "eu"), ("web-2", "eu"), ("web-3", "us")];
    let _agents: Vec<Agent> = labels
        .iter()
        .map(|(host, region)| {
            let label = format!("region={region}");
            let args = [FAST, &["--label", &label, "--label", "env=prod"]].concat();
            Agent::start(&dir, host, &[&coord], &args)
        })
        .collect();

    let hosts = wait_until(
        "three hosts with a few heartbeats",
        Duration::from_secs(20),
        || async {
            let hosts = coord.hosts("").await;
            let ready = hosts.len() == 3
                && hosts
                    .iter()
                    .all(|h| h.state() == ConnectionState::Connected && h.heartbeat_sequence >= 3);
            if ready {
                Ok(hosts)
            } else {
                Err(format!("{hosts:?}"))
            }
        },
    )
    .await;

    for (host, (id, region)) in hosts.iter().zip(labels) {
        assert_eq!(host.host_id, id);
        assert_eq!(host.labels.get("region").map(String::as_str), Some(region));
        assert_eq!(host.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(host.agent_version, drover_common::VERSION);
        assert_eq!(host.heartbeat_interval_ms, 200);
        assert!(host.last_heartbeat_age_ms < 600, "fresh: {host:?}");
        let m = host.metrics.expect("host metrics in heartbeats");
        assert!(m.memory_total_bytes > 0 && m.memory_used_bytes > 0, "{m:?}");
        assert!(m.disk_total_bytes > 0 && m.cpu_cores > 0, "{m:?}");
        assert_eq!(host.dropped_heartbeats, 0);
    }

    let eu = coord.hosts("region=eu").await;
    assert_eq!(
        eu.iter().map(|h| h.host_id.as_str()).collect::<Vec<_>>(),
        ["web-1", "web-2"]
    );
    let not_eu = coord.hosts("region!=eu").await;
    assert_eq!(
        not_eu
            .iter()
            .map(|h| h.host_id.as_str())
            .collect::<Vec<_>>(),
        ["web-3"]
    );

    let one = coord.host("web-2").await.unwrap();
    assert_eq!(one.host_id, "web-2");
    let missing = coord.host("web-9").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("web-9"), "{}", missing.message());
}

#[tokio::test]
async fn frozen_agent_turns_late_then_disconnected_when_killed() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let mut frozen = Agent::start(&dir, "frozen", &[&coord], FAST);
    let _steady = Agent::start(&dir, "steady", &[&coord], FAST);
    wait_until_ok("both hosts connected", Duration::from_secs(20), || async {
        let hosts = coord.hosts("").await;
        hosts.len() == 2
            && hosts
                .iter()
                .all(|h| h.state() == ConnectionState::Connected && h.heartbeat_sequence >= 2)
    })
    .await;

    frozen.child.signal(Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let late = coord
        .wait_state("frozen", ConnectionState::Late, Duration::from_secs(5))
        .await;
    // Late means three intervals (600 ms) without a heartbeat; allow one
    // interval of jitter for the heartbeat in flight when it froze.
    let waited = stopped_at.elapsed();
    assert!(
        waited <= Duration::from_millis(600 + 200 + 500),
        "late only after {waited:?}"
    );
    assert!(late.last_heartbeat_age_ms >= 600, "{late:?}");
    assert!(late.state_reason.contains("no heartbeat"), "{late:?}");

    frozen.child.signal(Signal::SIGKILL);
    frozen.child.wait_exit(Duration::from_secs(5)).await;
    let gone = coord
        .wait_state(
            "frozen",
            ConnectionState::Disconnected,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        !gone.state_reason.is_empty(),
        "a disconnected host says why: {gone:?}"
    );

    let steady = coord.host("steady").await.unwrap();
    assert_eq!(steady.state(), ConnectionState::Connected, "{steady:?}");
}

#[tokio::test]
async fn agents_reconnect_after_a_coordinator_restart_within_the_backoff_cap() {
    let dir = TestDir::new();
    let mut coord = Coordinator::start(&dir, "coord", &[]).await;
    let hosts = ["a-1", "a-2", "a-3"];
    let _agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::start(&dir, h, &[&coord], FAST))
        .collect();
    wait_until_ok("three hosts connected", Duration::from_secs(20), || async {
        let hosts = coord.hosts("").await;
        hosts.len() == 3
            && hosts
                .iter()
                .all(|h| h.state() == ConnectionState::Connected)
    })
    .await;

    let addr = coord.addr;
    coord.child.signal(Signal::SIGKILL);
    coord.child.wait_exit(Duration::from_secs(5)).await;
    drop(coord);
    // Let the agents' backoff climb to its cap (1 s) before the restart.
    let down_since = Instant::now();
    wait_until_ok(
        "agents to notice the coordinator is gone",
        Duration::from_secs(10),
        || async {
            hosts.iter().all(|h| {
                std::fs::read_to_string(dir.path().join(format!("agent-{h}.log")))
                    .is_ok_and(|log| log.matches("stream down").count() >= 3)
            })
        },
    )
    .await;
    assert!(down_since.elapsed() < Duration::from_secs(10));

    let back = Instant::now();
    let coord = Coordinator::start_on(&dir, "coord", addr, &[]).await;
    wait_until_ok(
        "every agent back after the restart",
        Duration::from_secs(10),
        || async {
            let hosts = coord.hosts("").await;
            hosts.len() == 3
                && hosts
                    .iter()
                    .all(|h| h.state() == ConnectionState::Connected)
        },
    )
    .await;
    let took = back.elapsed();
    // The cap (1 s) plus the coordinator's own start-up and one poll.
    assert!(
        took <= Duration::from_millis(1000 + 1000),
        "reconnect took {took:?}, cap is 1s"
    );
}

#[tokio::test]
async fn sigterm_agent_is_gone_and_sigterm_coordinator_stops_cleanly() {
    let dir = TestDir::new();
    let mut coord = Coordinator::start(&dir, "coord", &[]).await;
    let mut leaver = Agent::start(&dir, "leaver", &[&coord], FAST);
    let stayer = Agent::start(&dir, "stayer", &[&coord], FAST);
    wait_until_ok("both hosts connected", Duration::from_secs(20), || async {
        let hosts = coord.hosts("").await;
        hosts.len() == 2
            && hosts
                .iter()
                .all(|h| h.state() == ConnectionState::Connected)
    })
    .await;

    leaver.child.signal(Signal::SIGTERM);
    let status = leaver.child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "agent exit status {status:?}");
    let host = coord
        .wait_state("leaver", ConnectionState::Gone, Duration::from_secs(5))
        .await;
    assert_eq!(host.state_reason, "agent shutting down");

    coord.child.signal(Signal::SIGTERM);
    let status = coord.child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "coordinator exit status {status:?}");
    assert!(
        coord.child.log().contains("stopped"),
        "{}",
        coord.child.log()
    );
    wait_until_ok(
        "the agent to learn why its stream ended",
        Duration::from_secs(5),
        || async {
            stayer
                .child
                .log()
                .contains("shutting down; reconnect to another")
        },
    )
    .await;
}

#[tokio::test]
async fn a_second_stream_for_the_same_host_replaces_the_first() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let addr = coord.addr_arg();
    let mut first = RawStream::open(&addr, raw::hello("twin", &[("v", "1")]), 1 << 20)
        .await
        .unwrap();
    assert!(
        first.next(Duration::from_secs(5)).await.unwrap().is_some(),
        "welcome"
    );
    let mut second = RawStream::open(&addr, raw::hello("twin", &[("v", "2")]), 1 << 20)
        .await
        .unwrap();
    assert!(
        second.next(Duration::from_secs(5)).await.unwrap().is_some(),
        "welcome"
    );

    let status = first.next(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert!(
        status
            .message()
            .contains("replaced by a newer stream for host twin"),
        "{}",
        status.message()
    );

    second.outbound.send(raw::heartbeat(1)).await.unwrap();
    wait_until_ok(
        "the newer stream's heartbeat",
        Duration::from_secs(5),
        || async {
            coord
                .host("twin")
                .await
                .is_ok_and(|h| h.heartbeat_sequence == 1)
        },
    )
    .await;
    let host = coord.host("twin").await.unwrap();
    assert_eq!(host.state(), ConnectionState::Connected);
    assert_eq!(host.labels.get("v").map(String::as_str), Some("2"));
}

#[tokio::test]
async fn a_frozen_coordinator_costs_the_agent_a_bounded_queue_and_a_drop_count() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let agent = Agent::start(
        &dir,
        "busy",
        &[&coord],
        &["--heartbeat-interval", "10ms", "--queue-capacity", "8"],
    );
    let before = wait_until("the agent to connect", Duration::from_secs(20), || async {
        match coord.host("busy").await {
            Ok(h) if h.heartbeat_sequence >= 10 => Ok(h),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let rss_before = drover_tests::procstat::rss_bytes(agent.child.pid());

    // Freeze the coordinator: the stream's flow-control window fills, then
    // the agent's queue, and from then on the oldest heartbeats are dropped.
    coord.child.signal(Signal::SIGSTOP);
    wait_until_ok(
        "the agent to notice its queue is full",
        Duration::from_secs(30),
        || async {
            agent
                .child
                .log()
                .contains("a coordinator is not reading heartbeats; dropping the oldest")
        },
    )
    .await;
    let rss_frozen = drover_tests::procstat::rss_bytes(agent.child.pid());
    coord.child.signal(Signal::SIGCONT);

    let after = wait_until(
        "the drop count to reach the coordinator",
        Duration::from_secs(10),
        || async {
            match coord.host("busy").await {
                Ok(h) if h.dropped_heartbeats > 0 => Ok(h),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(after.state(), ConnectionState::Connected);
    assert_eq!(
        after.connected_at_unix_ms, before.connected_at_unix_ms,
        "the stream survived"
    );
    assert!(after.heartbeat_sequence > before.heartbeat_sequence + after.dropped_heartbeats);
    // Growth while frozen is bounded by the queue (8 heartbeats), not by time.
    let growth = rss_frozen.saturating_sub(rss_before);
    assert!(
        growth < 4 << 20,
        "agent grew by {growth} bytes while the coordinator was frozen"
    );
    let metrics = drover_tests::http_get(coord.metrics_addr, "/metrics").await;
    assert!(
        !metrics.contains("drover_agent_dropped_heartbeats_total 0\n"),
        "the coordinator exports the drops: {metrics}"
    );
}
