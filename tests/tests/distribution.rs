//! Artifact distribution end to end (issue 15): real agents pull by
//! content-defined chunks from what they already hold, from their peers
//! (each agent's Chunks service, found through the coordinator as tracker)
//! and, for the rest, from the origin. Every figure asserted here is a
//! count of real bytes: the agents' own pull statistics (`PullStats` in
//! the Pull's final update) and the origin's `drover_artifact_fetched_bytes_total`.

use std::time::Duration;

use drover_common::proto::{CommandStatus, CommandUpdate, PullStats};
use drover_tests::artifacts::{BuiltArtifact, chunky_release, noise_seeded, origin_bytes};
use drover_tests::commands::{cmd, pull, restart, verify};
use drover_tests::fake_peer::{FakePeer, Misbehaviour, tar_of};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::{Agent, Coordinator, TestDir, free_service_port, wait_until_ok};

const SERVICE: &str = "hello";
const MB: u64 = 1 << 20;

/// A release of `files` 1 MiB files, file `changed.0` from seed `changed.1`.
fn release(dir: &TestDir, version: &str, files: usize, changed: (usize, u64)) -> BuiltArtifact {
    chunky_release(&dir.sub("artifacts"), version, files, changed)
}

fn stats(update: &CommandUpdate) -> PullStats {
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    update
        .pull
        .clone()
        .expect("a pull's final update has its stats")
}

#[tokio::test]
async fn a_one_file_change_in_200_mb_moves_under_5_mb_to_a_host_that_had_the_last() {
    let dir = TestDir::new();
    let _memory = drover_tests::tmpfs::Tmpfs::mount(&dir.path().join("agent-web-1"), "1g");
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let agent = Agent::start_sample(&dir, "web-1", &[&coord], free_service_port(), &[]);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("web-1").await.is_ok()
    })
    .await;
    let v1 = release(&dir, "v1", 200, (77, 1));
    let v2 = release(&dir, "v2", 200, (77, 2));
    coord.push(&v1.path, SERVICE, "v1");
    coord.push(&v2.path, SERVICE, "v2");

    let first = stats(
        &coord
            .send("web-1", cmd("p1", 0, pull(SERVICE, &v1.digest)))
            .await
            .unwrap(),
    );
    assert!(first.origin_bytes >= 200 * MB, "{first:?}");
    assert_eq!(first.reused_bytes, 0);

    let before = origin_bytes(&coord).await;
    let second = stats(
        &coord
            .send("web-1", cmd("p2", 0, pull(SERVICE, &v2.digest)))
            .await
            .unwrap(),
    );
    let moved = second.origin_bytes + second.peer_bytes;
    let served = origin_bytes(&coord).await - before;
    eprintln!(
        "one 1 MiB file of 200 changed: {moved} bytes moved ({:.2}% of the release), {} reused; the origin counted {served}",
        100.0 * moved as f64 / (second.reused_bytes + moved) as f64,
        second.reused_bytes
    );
    assert!(moved < 5_000_000, "{second:?}");
    assert!(moved >= MB, "the changed file itself travels: {second:?}");
    assert_eq!(
        served, moved,
        "what the agent counted is what the origin sent"
    );
    assert!(second.reused_bytes >= 195 * MB, "{second:?}");

    // Rebuilt from old and new chunks, the release verifies and runs.
    let verified = coord
        .send("web-1", cmd("v2", 0, verify(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(verified.status(), CommandStatus::Succeeded, "{verified:?}");
    let started = coord
        .send("web-1", cmd("r2", 0, restart(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(started.status(), CommandStatus::Succeeded, "{started:?}");
    let data = agent.data_dir.join(format!(
        "services/hello/releases/{}/data/0077.bin",
        v2.digest
    ));
    assert_eq!(std::fs::read(data).unwrap(), noise_seeded(MB as usize, 2));
}

const PREFETCHED: &str = r#"
name = "hello-prod"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 5
prefetch_all = true
settle_ms = 0
stuck_timeout_ms = 120000
gate = { max_error_rate = 0.5, samples = 1, bad_samples = 1, min_requests = 0, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

/// Agents that serve their chunks to peers, in two zones.
fn peer_flags(i: usize) -> Vec<String> {
    vec![
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--label".into(),
        format!("zone=z{}", i % 2),
    ]
}

#[tokio::test]
async fn twenty_agents_pull_100_mb_mostly_from_each_other() {
    let fleet = SampleFleet::start_in_memory(20, peer_flags, &[], "260m").await;
    fleet.apply(PREFETCHED);
    let v1 = release(&fleet.dir, "v1", 100, (0, 0));
    let digest = fleet.coord.push(&v1.path, SERVICE, "v1");
    let before = origin_bytes(&fleet.coord).await;
    let started = std::time::Instant::now();
    let (code, out, err) = fleet.deploy_through("hello-prod", &digest);
    assert_eq!(code, 0, "{out}\n{err}");
    let took = started.elapsed();
    let served = origin_bytes(&fleet.coord).await - before;
    let tar = std::fs::metadata(fleet.agents[0].data_dir.join(format!("cache/{digest}.tar")))
        .unwrap()
        .len();
    let pulled = 20 * tar;
    eprintln!(
        "20 hosts x {tar} bytes in {took:?}: the origin sent {served} ({:.2} copies), peers the other {:.1}%",
        served as f64 / tar as f64,
        100.0 * (pulled - served) as f64 / pulled as f64
    );
    // Every host holds it whole (and runs it), yet the origin sent at most
    // three copies: the other seventeen or more came from peers.
    for agent in &fleet.agents {
        assert!(agent.data_dir.join(format!("cache/{digest}.tar")).exists());
    }
    assert!(served <= 3 * tar, "the origin sent {served} bytes");
    assert!(served >= tar, "the first hosts pull from the origin");
    assert_eq!(fleet.versions().await, vec!["v1".to_string(); 20]);
}

#[tokio::test]
async fn bad_peers_are_caught_dropped_and_reported_and_the_pull_succeeds() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let start = |host: &str| {
        Agent::start_sample(
            &dir,
            host,
            &[&coord],
            free_service_port(),
            &["--peer-listen", "127.0.0.1:0", "--label", "zone=a"],
        )
    };
    let (_good, _puller, _later) = (start("good"), start("puller"), start("later"));
    wait_until_ok("the agents", Duration::from_secs(20), || async {
        coord.hosts("zone=a").await.len() == 3
    })
    .await;
    // 12 MiB: some 48 chunks, so every peer gets a share.
    let v1 = release(&dir, "v1", 12, (0, 0));
    coord.push(&v1.path, SERVICE, "v1");
    stats(
        &coord
            .send("good", cmd("p0", 0, pull(SERVICE, &v1.digest)))
            .await
            .unwrap(),
    );

    // Three liars in the same zone, all claiming to hold it.
    let tar = tar_of(&v1.path);
    let zone = [("zone", "a")];
    let mut fakes = Vec::new();
    for (host, how) in [
        ("corrupt", Misbehaviour::Corrupt),
        ("truncate", Misbehaviour::Truncate),
        ("stall", Misbehaviour::Stall),
        ("dead", Misbehaviour::Dead),
    ] {
        fakes.push(FakePeer::start(&coord, host, &zone, how, &tar, &v1.digest).await);
    }
    let before = origin_bytes(&coord).await;
    let update = coord
        .send("puller", cmd("p1", 0, pull(SERVICE, &v1.digest)))
        .await
        .unwrap();
    let got = stats(&update);
    let reasons: std::collections::BTreeMap<String, String> = got
        .bad_peers
        .iter()
        .map(|b| (b.host_id.clone(), b.reason.clone()))
        .collect();
    eprintln!("{got:?}");
    // The tracker hands out four of the five holders: whichever liars the
    // puller was given are each caught for what they did.
    let expected = [
        ("corrupt", "do not hash"),
        ("truncate", "do not hash"),
        ("stall", "stalled"),
        ("dead", "unreachable"),
    ];
    for (host, why) in expected {
        if let Some(reason) = reasons.get(host) {
            assert!(reason.contains(why), "{host}: {reason}");
        }
    }
    assert!(
        reasons.len() >= 3,
        "at least three liars were named: {reasons:?}"
    );
    assert!(!reasons.contains_key("good"), "{reasons:?}");
    assert_eq!(
        got.origin_bytes + got.peer_bytes,
        tar.len() as u64,
        "every byte came verified from somewhere: {got:?}"
    );
    assert_eq!(origin_bytes(&coord).await - before, got.origin_bytes);
    let verified = coord
        .send("puller", cmd("v1", 0, verify(SERVICE, &v1.digest)))
        .await
        .unwrap();
    assert_eq!(verified.status(), CommandStatus::Succeeded, "{verified:?}");

    // Reported, the liars are no longer handed out: the next pull meets
    // none of them and is served by the two honest holders.
    let next = stats(
        &coord
            .send("later", cmd("p2", 0, pull(SERVICE, &v1.digest)))
            .await
            .unwrap(),
    );
    let named: Vec<&str> = next.bad_peers.iter().map(|b| b.host_id.as_str()).collect();
    assert!(
        named.iter().all(|h| !reasons.contains_key(*h)),
        "reported peers were handed out again: {next:?}"
    );
    assert_eq!(next.peer_bytes, tar.len() as u64, "{next:?}");
}

#[tokio::test]
async fn an_index_that_does_not_add_up_is_refused_and_the_origin_serves_the_pull() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let _puller = Agent::start_sample(&dir, "puller", &[&coord], free_service_port(), &[]);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("puller").await.is_ok()
    })
    .await;
    let v1 = release(&dir, "v1", 4, (0, 0));
    coord.push(&v1.path, SERVICE, "v1");
    let tar = tar_of(&v1.path);
    // The only holder the tracker knows serves an index missing a chunk.
    let _liar = FakePeer::start(
        &coord,
        "liar",
        &[],
        Misbehaviour::WrongIndex,
        &tar,
        &v1.digest,
    )
    .await;
    let got = stats(
        &coord
            .send("puller", cmd("p1", 0, pull(SERVICE, &v1.digest)))
            .await
            .unwrap(),
    );
    assert_eq!(got.bad_peers.len(), 1, "{got:?}");
    assert_eq!(got.bad_peers[0].host_id, "liar");
    assert!(
        got.bad_peers[0].reason.contains("sent a bad chunk index"),
        "{got:?}"
    );
    assert_eq!(got.origin_bytes, tar.len() as u64, "{got:?}");
    assert_eq!(got.peer_bytes, 0);
}

#[tokio::test]
async fn peers_speak_mutual_tls_with_their_agent_certificates() {
    let fleet = SampleFleet::start_tls(3, 0, peer_flags, &[]).await;
    let v1 = release(&fleet.dir, "v1", 4, (0, 0));
    let digest = fleet.coord.push(&v1.path, SERVICE, "v1");
    let first = stats(
        &fleet
            .coord
            .send("web-0", cmd("p0", 0, pull(SERVICE, &digest)))
            .await
            .unwrap(),
    );
    assert!(first.origin_bytes > 0, "{first:?}");
    let second = stats(
        &fleet
            .coord
            .send("web-1", cmd("p1", 0, pull(SERVICE, &digest)))
            .await
            .unwrap(),
    );
    assert!(second.bad_peers.is_empty(), "{second:?}");
    assert_eq!(
        second.origin_bytes, 0,
        "every chunk from the peer, over mTLS: {second:?}"
    );
    assert_eq!(second.peer_bytes, first.origin_bytes);
    // Someone without a certificate of the fleet's CA gets nothing.
    let log = std::fs::read_to_string(fleet.dir.path().join("agent-web-0.log")).unwrap();
    let peer = log
        .lines()
        .find_map(|l| l.split("advertise=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .expect("web-0 logs where it serves peers");
    assert!(peer.starts_with("https://"), "{peer}");
    let plain = drover_common::tls::client::Dialer::plaintext();
    let open = plain.connect(&peer.replace("https://", "http://")).await;
    let refused = match open {
        Err(_) => true,
        Ok(channel) => drover_common::proto::chunks_client::ChunksClient::new(channel)
            .get_chunk_index(drover_common::proto::ChunkIndexRequest {
                sha256: digest.clone(),
            })
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was served");
}

const ROLLING: &str = r#"
name = "hello-prod"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
settle_ms = 0
stuck_timeout_ms = 60000
gate = { max_error_rate = 0.5, samples = 1, bad_samples = 1, min_requests = 0, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

#[tokio::test]
async fn with_the_origin_cut_off_after_the_first_batch_the_deploy_completes_from_peers() {
    // While this file exists the origin refuses every fetch (the
    // coordinator's fault-injection feature, which scripts/test builds).
    let switch = tempfile::tempdir().unwrap();
    let down_path = switch.path().join("origin-down");
    let flag = down_path.to_str().unwrap().to_string();
    let fleet =
        SampleFleet::start_configured(4, 0, peer_flags, &["--fault-origin-down-file", &flag]).await;
    fleet.apply(ROLLING);
    let v1 = release(&fleet.dir, "v1", 8, (0, 0));
    let digest = fleet.coord.push(&v1.path, SERVICE, "v1");
    let coord = &fleet.coord;
    let id = coord.start_deploy("hello-prod", &digest).await;
    // As soon as the first host holds it, the origin is gone.
    let first = fleet
        .agents
        .iter()
        .map(|a| a.data_dir.join(format!("cache/{digest}.tar")));
    let first: Vec<_> = first.collect();
    wait_until_ok(
        "the first batch's pull",
        Duration::from_secs(60),
        || async { first.iter().any(|p| p.exists()) },
    )
    .await;
    std::fs::write(&down_path, b"down").unwrap();
    let served_then = origin_bytes(coord).await;
    let deploy = coord
        .wait_phase(&id, drover_common::proto::DeployPhase::Complete)
        .await;
    assert_eq!(deploy.phase(), drover_common::proto::DeployPhase::Complete);
    assert_eq!(
        origin_bytes(coord).await,
        served_then,
        "nothing came from the origin once it was cut off"
    );
    assert_eq!(fleet.versions().await, vec!["v1".to_string(); 4]);
    // The cut is real: a pull that has no peer to turn to fails.
    let lone =
        drover_tests::artifacts::sample_artifact(&fleet.dir.sub("lone"), SERVICE, "lone", &[]);
    std::fs::remove_file(&down_path).unwrap();
    coord.push(&lone.path, SERVICE, "lone");
    std::fs::write(&down_path, b"down").unwrap();
    let update = coord
        .send("web-0", cmd("lone", 0, pull(SERVICE, &lone.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed, "{update:?}");
    assert!(
        update.reason.contains("no source gave the chunk index"),
        "{}",
        update.reason
    );
}
