//! An agent's recovery end to end: killed with -9 in the middle of a
//! restart it converges on what its journal says; a pull resumes from the
//! bytes it already has.

use std::time::Duration;

use drover_common::proto::ConnectionState;
use drover_tests::artifacts::{artifact_with, sample_artifact, sample_manifest};
use drover_tests::commands::{cmd, ok, pull, restart, verify};
use drover_tests::one_agent::{artifacts_dir, one_agent, sample_answer as answers};
use drover_tests::{Agent, Coordinator, TestDir, free_port, wait_until_ok};

const SERVICE: &str = "hello";

#[tokio::test]
async fn kill_9_of_the_agent_mid_restart_converges_on_the_truth() {
    let dir = TestDir::new();
    let (coord, mut agent, port) = one_agent(&dir, &[]).await;
    let v1 = sample_artifact(&artifacts_dir(&dir), SERVICE, "v1", &[]);
    // v2's pre_start hook signals it has begun, then takes its time, until
    // the test lets later runs through.
    // The hook runs as the unprivileged service user: its markers live in
    // a directory anyone may write, as /tmp.
    let markers = dir.sub("markers");
    std::fs::set_permissions(
        &markers,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let marker = markers.join("pre-start-began");
    let release_hook = markers.join("pre-start-quick");
    let hook = format!(
        "[ -e {q} ] || {{ touch {m}; sleep 30; }}",
        q = release_hook.display(),
        m = marker.display()
    );
    let manifest = sample_manifest(SERVICE, "v2", &[])
        + &format!(
            "\n[hooks]\npre_start = {{ command = [\"/bin/sh\", \"-c\", {hook:?}], timeout = \"60s\" }}\n"
        );
    let v2 = artifact_with(&artifacts_dir(&dir), "v2.tar.gz", &manifest, &[]);
    coord.push(&v1.path, SERVICE, "v1");
    coord.push(&v2.path, SERVICE, "v2");
    for (id, action) in [
        ("p1", pull(SERVICE, &v1.digest)),
        ("r1", restart(SERVICE, &v1.digest)),
        ("p2", pull(SERVICE, &v2.digest)),
    ] {
        ok(&coord.send("web-1", cmd(id, 1, action)).await.unwrap());
    }
    assert_eq!(answers(port).await, "hello from v1\n");

    // Start the restart to v2 and kill the agent while its hook runs.
    let sender = {
        let addr = coord.addr_arg();
        let command = cmd("r2", 1, restart(SERVICE, &v2.digest));
        tokio::spawn(async move {
            let channel = drover_common::grpc::connect(&addr).await.unwrap();
            drover_common::proto::deployer_client::DeployerClient::new(channel)
                .send_command(drover_common::proto::SendCommandRequest {
                    host_id: "web-1".into(),
                    command: Some(command),
                    timeout_ms: 60_000,
                })
                .await
        })
    };
    wait_until_ok(
        "the pre_start hook to begin",
        Duration::from_secs(20),
        || async { marker.exists() },
    )
    .await;
    agent.child.signal(nix::sys::signal::Signal::SIGKILL);
    agent.child.wait_exit(Duration::from_secs(5)).await;
    drop(agent);
    sender.abort();

    // Back up: it reports v1 (the switch never happened) and serves it.
    let _agent = Agent::start_sample(&dir, "web-1", &[&coord], port, &[]);
    wait_until_ok(
        "the restarted agent to report v1",
        Duration::from_secs(20),
        || async {
            coord.host("web-1").await.is_ok_and(|h| {
                h.state() == ConnectionState::Connected
                    && h.services
                        .first()
                        .is_some_and(|s| s.current_artifact == v1.digest)
            })
        },
    )
    .await;
    assert_eq!(answers(port).await, "hello from v1\n");

    // The coordinator re-sends the command: it runs now and converges on v2.
    std::fs::write(&release_hook, b"").unwrap();
    let update = tokio::time::timeout(
        Duration::from_secs(60),
        coord.send("web-1", cmd("r2", 1, restart(SERVICE, &v2.digest))),
    )
    .await
    .expect("the re-sent restart finishes")
    .unwrap();
    ok(&update);
    assert_eq!(answers(port).await, "hello from v2\n");
    wait_until_ok(
        "heartbeats to report v2 over v1",
        Duration::from_secs(10),
        || async {
            coord
                .host("web-1")
                .await
                .unwrap()
                .services
                .first()
                .is_some_and(|s| {
                    s.current_artifact == v2.digest && s.previous_artifact == v1.digest
                })
        },
    )
    .await;
}

#[tokio::test]
async fn a_pull_resumes_from_the_bytes_it_already_has() {
    let dir = TestDir::new();
    // Whole files (a pull by chunks resumes too: distribution.rs).
    let coord = Coordinator::start(&dir, "coord", &["--pull-mode", "whole"]).await;
    let agent = Agent::start_sample(&dir, "web-1", &[&coord], free_port(), &[]);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("web-1").await.is_ok()
    })
    .await;
    // A larger artifact: a 3 MB incompressible file beside the manifest.
    let noise = drover_tests::artifacts::noise(3_000_000);
    let big = artifact_with(
        &artifacts_dir(&dir),
        "big.tar.gz",
        &sample_manifest(SERVICE, "big", &[]),
        &[("data/noise", &noise)],
    );
    coord.push(&big.path, SERVICE, "big");
    // An earlier pull broke off after the first 1,000,000 bytes.
    let bytes = std::fs::read(&big.path).unwrap();
    let cache = agent.data_dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join(format!("{}.part", big.digest)),
        &bytes[..1_000_000],
    )
    .unwrap();
    let served_before = drover_tests::artifacts::origin_bytes(&coord).await;
    ok(&coord
        .send("web-1", cmd("pull", 1, pull(SERVICE, &big.digest)))
        .await
        .unwrap());
    let served = drover_tests::artifacts::origin_bytes(&coord).await - served_before;
    assert_eq!(
        served,
        big.size - 1_000_000,
        "only the missing bytes were fetched"
    );
    ok(&coord
        .send("web-1", cmd("verify", 1, verify(SERVICE, &big.digest)))
        .await
        .unwrap());
}
