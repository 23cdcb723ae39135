//! Artifacts end to end: CI pushes with droverctl, agents pull, verify,
//! restart and roll back for real, with the sample service answering;
//! a command twice, failing hooks, crashes and retention. Hostile archives
//! are in `hostile_archives.rs`, an agent's recovery in `agent_recovery.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use drover_common::proto::ConnectionState;
use drover_tests::artifacts::{
    artifact_with, origin_fetches as fetches, sample_artifact, sample_manifest,
};
use drover_tests::commands::{cmd, failed, ok, pull, restart, rollback, verify};
use drover_tests::one_agent::{artifacts_dir, one_agent, sample_answer as answers};
use drover_tests::{
    Agent, Coordinator, TestDir, free_port, http_get_status, wait_until, wait_until_ok,
};

const SERVICE: &str = "hello";

#[tokio::test]
async fn push_pull_restart_on_three_agents_then_rollback_without_a_fetch() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let v1 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v1", &[]);
    let v2 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v2", &[]);
    assert_eq!(coord.push(&v1.path, SERVICE, "v1"), v1.digest);
    assert_eq!(coord.push(&v2.path, SERVICE, "v2"), v2.digest);

    let hosts = ["web-1", "web-2", "web-3"];
    let ports: Vec<u16> = hosts.iter().map(|_| free_port()).collect();
    let _agents: Vec<Agent> = hosts
        .iter()
        .zip(&ports)
        .map(|(h, p)| Agent::start_sample(&dir, h, &[&coord], *p, &[]))
        .collect();
    wait_until_ok("three agents", Duration::from_secs(20), || async {
        coord.hosts("").await.len() == 3
    })
    .await;

    for (step, version) in [(1, &v1), (2, &v2)] {
        for host in hosts {
            ok(&coord
                .send(
                    host,
                    cmd(
                        &format!("pull-{step}-{host}"),
                        1,
                        pull(SERVICE, &version.digest),
                    ),
                )
                .await
                .unwrap());
            ok(&coord
                .send(
                    host,
                    cmd(
                        &format!("restart-{step}-{host}"),
                        1,
                        restart(SERVICE, &version.digest),
                    ),
                )
                .await
                .unwrap());
        }
        for port in &ports {
            assert_eq!(answers(*port).await, format!("hello from v{step}\n"));
        }
    }
    // Heartbeats carry the truth: v2 current, v1 previous, ready.
    wait_until_ok(
        "heartbeats to show v2 active and ready",
        Duration::from_secs(10),
        || async {
            coord.hosts("").await.iter().all(|h| {
                h.services.first().is_some_and(|s| {
                    s.current_artifact == v2.digest && s.previous_artifact == v1.digest
                }) && h.health.first().is_some_and(|s| s.ready && s.live)
            })
        },
    )
    .await;

    let before = fetches(&coord).await;
    assert_eq!(before, 6, "two pulls on three hosts");
    for host in hosts {
        ok(&coord
            .send(
                host,
                cmd(&format!("rollback-{host}"), 1, rollback(SERVICE, "")),
            )
            .await
            .unwrap());
    }
    for port in &ports {
        assert_eq!(answers(*port).await, "hello from v1\n");
    }
    assert_eq!(fetches(&coord).await, before, "rollback fetched nothing");
    let host = coord.host("web-1").await.unwrap();
    assert_eq!(host.state(), ConnectionState::Connected);
    wait_until_ok(
        "heartbeats to show v1 back",
        Duration::from_secs(10),
        || async {
            coord
                .host("web-1")
                .await
                .unwrap()
                .services
                .first()
                .is_some_and(|s| s.current_artifact == v1.digest)
        },
    )
    .await;
}

#[tokio::test]
async fn heartbeats_report_real_request_errors_and_latency() {
    let dir = TestDir::new();
    let (coord, _agent, port) = one_agent(&dir, &[]).await;
    let bad = sample_artifact(
        &artifacts_dir(&dir),
        SERVICE,
        "bad",
        &["--error-rate", "0.25", "--latency-ms", "20"],
    );
    coord.push(&bad.path, SERVICE, "bad");
    ok(&coord
        .send("web-1", cmd("p", 1, pull(SERVICE, &bad.digest)))
        .await
        .unwrap());
    ok(&coord
        .send("web-1", cmd("r", 1, restart(SERVICE, &bad.digest)))
        .await
        .unwrap());
    let mut load = std::process::Command::new(drover_tests::bins::bin("drover-load"));
    load.args([
        "--url",
        &format!("http://127.0.0.1:{port}/"),
        "--rps",
        "40",
        "--duration",
        "30s",
    ]);
    let _load = drover_tests::ChildGuard::spawn("load", load, &dir.path().join("load.log"));
    let health = wait_until(
        "a heartbeat with traffic figures",
        Duration::from_secs(20),
        || async {
            let h = coord.host("web-1").await.unwrap();
            match h.health.first() {
                Some(s) if s.request_count >= 4 && s.error_count > 0 => Ok(s.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let rate = health.error_count as f64 / health.request_count as f64;
    assert!(
        (0.1..=0.4).contains(&rate),
        "error rate {rate} from {health:?}"
    );
    assert!(
        health.latency_p50_ms >= 15.0 && health.latency_p99_ms >= health.latency_p50_ms,
        "{health:?}"
    );
}

#[tokio::test]
async fn corrupt_bytes_fail_verify_and_nothing_is_activated() {
    let dir = TestDir::new();
    let (coord, agent, port) = one_agent(&dir, &[]).await;
    let v1 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v1", &[]);
    coord.push(&v1.path, SERVICE, "v1");

    // Corrupted on the host after the pull: Verify and Restart refuse it.
    ok(&coord
        .send("web-1", cmd("p1", 1, pull(SERVICE, &v1.digest)))
        .await
        .unwrap());
    // Pulled by chunks: the cache holds the tar stream (and its index).
    let cached = agent
        .data_dir
        .join("cache")
        .join(format!("{}.tar", v1.digest));
    let mut bytes = std::fs::read(&cached).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&cached, &bytes).unwrap();
    failed(
        &coord
            .send("web-1", cmd("v1", 1, verify(SERVICE, &v1.digest)))
            .await
            .unwrap(),
        "cached artifact is corrupt",
    );
    failed(
        &coord
            .send("web-1", cmd("r1", 1, restart(SERVICE, &v1.digest)))
            .await
            .unwrap(),
        "not activated",
    );
    assert!(
        http_get_status(SocketAddr::from(([127, 0, 0, 1], port)), "/")
            .await
            .is_err(),
        "nothing runs"
    );
    assert!(
        !agent.data_dir.join("services/hello/current").exists(),
        "nothing was switched"
    );

    // Corrupted at the origin: its chunks fail their check at the origin
    // (or the digest check of a whole-file pull): nothing is held.
    let v2 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v2", &[]);
    coord.push(&v2.path, SERVICE, "v2");
    let blob = coord.data_dir.join("artifacts/blobs").join(&v2.digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    failed(
        &coord
            .send("web-1", cmd("p2", 1, pull(SERVICE, &v2.digest)))
            .await
            .unwrap(),
        "were found nowhere",
    );
    let cache: Vec<String> = std::fs::read_dir(agent.data_dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Only verified chunks may wait in a part file for the next attempt.
    assert!(
        !cache
            .iter()
            .any(|n| n.starts_with(&v2.digest) && !n.ends_with(".tar.part")),
        "nothing of it is held: {cache:?}"
    );
    assert!(
        !agent
            .data_dir
            .join("services/hello/releases")
            .join(&v2.digest)
            .exists()
    );
}

#[tokio::test]
async fn the_same_command_twice_gives_one_restart_and_the_callers_epoch_is_ignored() {
    let dir = TestDir::new();
    let (coord, mut agent, port) = one_agent(&dir, &[]).await;
    let v1 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v1", &[]);
    coord.push(&v1.path, SERVICE, "v1");

    ok(&coord
        .send("web-1", cmd("pull-1", 7, pull(SERVICE, &v1.digest)))
        .await
        .unwrap());
    let first = coord
        .send("web-1", cmd("restart-1", 7, restart(SERVICE, &v1.digest)))
        .await
        .unwrap();
    ok(&first);
    let again = coord
        .send("web-1", cmd("restart-1", 7, restart(SERVICE, &v1.digest)))
        .await
        .unwrap();
    assert_eq!(
        (again.status, &again.reason),
        (first.status, &first.reason),
        "the recorded result"
    );
    // A new id for the same release: a no-op success, no restart either.
    let noop = coord
        .send("web-1", cmd("restart-2", 7, restart(SERVICE, &v1.digest)))
        .await
        .unwrap();
    ok(&noop);
    assert!(noop.reason.contains("already active and ready"), "{noop:?}");
    let log = agent.data_dir.join("services/hello/logs/service.log");
    let starts = std::fs::read_to_string(&log)
        .unwrap()
        .matches("drover-sample v1 listening")
        .count();
    assert_eq!(starts, 1, "one start of the service");

    // The caller's shard and epoch are never used: the shard leader stamps
    // its own, so a forged epoch cannot poison the host for later commands.
    let mut forged = cmd("restart-3", u64::MAX, restart(SERVICE, &v1.digest));
    forged.shard = 3;
    let stamped = coord.send("web-1", forged).await.unwrap();
    ok(&stamped);
    assert_eq!(
        (stamped.shard, stamped.epoch),
        (first.shard, first.epoch),
        "the leader's shard and epoch, not the caller's"
    );
    let journal = std::fs::read_to_string(agent.data_dir.join("state.json")).unwrap();
    assert!(
        !journal.contains(&u64::MAX.to_string()),
        "the forged epoch never reached the journal: {journal}"
    );

    // The epoch the agent holds survives its restart, and commands from the
    // leader keep being accepted.
    agent.child.signal(nix::sys::signal::Signal::SIGTERM);
    agent.child.wait_exit(Duration::from_secs(10)).await;
    let _agent = Agent::start_sample(&dir, "web-1", &[&coord], port, &[]);
    wait_until_ok("the agent back", Duration::from_secs(20), || async {
        coord
            .host("web-1")
            .await
            .is_ok_and(|h| h.state() == ConnectionState::Connected)
    })
    .await;
    let after = coord
        .send("web-1", cmd("verify-9", 0, verify(SERVICE, &v1.digest)))
        .await
        .unwrap();
    ok(&after);
    assert_eq!(after.epoch, first.epoch);
    assert_eq!(
        answers(port).await,
        "hello from v1\n",
        "the restarted agent started its service again"
    );
}

#[tokio::test]
async fn failing_hooks_crashes_and_retention_are_reported_truthfully() {
    let dir = TestDir::new();
    let (coord, agent, port) = one_agent(&dir, &["--keep-releases", "3"]).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    // A validate hook that fails: the restart fails with the hook's output.
    let manifest = sample_manifest(SERVICE, "badcheck", &[])
        + "\n[hooks]\nvalidate = { command = [\"/bin/sh\", \"-c\", \"echo smoke test: 3 of 5 checks failed; exit 1\"] }\n";
    let badcheck = artifact_with(&artifacts_dir(&dir), "badcheck.tar.gz", &manifest, &[]);
    coord.push(&badcheck.path, SERVICE, "badcheck");
    ok(&coord
        .send("web-1", cmd("p-bad", 1, pull(SERVICE, &badcheck.digest)))
        .await
        .unwrap());
    let update = coord
        .send("web-1", cmd("r-bad", 1, restart(SERVICE, &badcheck.digest)))
        .await
        .unwrap();
    failed(&update, "validate hook failed");
    assert!(
        update.output_tail.contains("3 of 5 checks failed"),
        "{update:?}"
    );

    // A version that crashes: restarts are counted and reported.
    let crashy = sample_artifact(
        &artifacts_dir(&dir),
        SERVICE,
        "crashy",
        &["--crash-after", "1"],
    );
    coord.push(&crashy.path, SERVICE, "crashy");
    ok(&coord
        .send("web-1", cmd("p-crash", 1, pull(SERVICE, &crashy.digest)))
        .await
        .unwrap());
    ok(&coord
        .send("web-1", cmd("r-crash", 1, restart(SERVICE, &crashy.digest)))
        .await
        .unwrap());
    wait_until_ok(
        "heartbeats to count the crash restarts",
        Duration::from_secs(20),
        || async {
            coord
                .host("web-1")
                .await
                .unwrap()
                .health
                .first()
                .is_some_and(|h| h.restarts >= 2)
        },
    )
    .await;

    // Versions that never start in time: not ready, with the reason.
    let unready = sample_artifact(&artifacts_dir(&dir), SERVICE, "unready", &["--unready"]);
    coord.push(&unready.path, SERVICE, "unready");
    ok(&coord
        .send("web-1", cmd("p-unready", 1, pull(SERVICE, &unready.digest)))
        .await
        .unwrap());
    let mut short = cmd("r-unready", 1, restart(SERVICE, &unready.digest));
    if let Some(drover_common::proto::command::Action::Restart(r)) = &mut short.action {
        r.ready_timeout_ms = 1500;
    }
    let update = coord.send("web-1", short).await.unwrap();
    failed(&update, "not ready within 1.5s");
    assert!(update.reason.contains("answered 503"), "{update:?}");

    // Good versions again: only the newest three releases stay on disk.
    let mut digests = Vec::new();
    for v in ["g1", "g2", "g3"] {
        let a = sample_artifact(&artifacts_dir(&dir), SERVICE, v, &[]);
        coord.push(&a.path, SERVICE, v);
        ok(&coord
            .send("web-1", cmd(&format!("p-{v}"), 1, pull(SERVICE, &a.digest)))
            .await
            .unwrap());
        ok(&coord
            .send(
                "web-1",
                cmd(&format!("r-{v}"), 1, restart(SERVICE, &a.digest)),
            )
            .await
            .unwrap());
        digests.push(a.digest);
    }
    assert_eq!(answers(port).await, "hello from g3\n");
    let mut left: Vec<String> = std::fs::read_dir(agent.data_dir.join("services/hello/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected: Vec<String> = digests
        .iter()
        .flat_map(|d| [d.clone(), format!("{d}.tree")])
        .collect();
    expected.sort();
    assert_eq!(left, expected, "older releases (and their records) pruned");
    assert!(http_get_status(addr, "/version").await.is_ok());
}
