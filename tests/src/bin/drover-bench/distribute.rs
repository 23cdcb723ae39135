//! `drover-bench distribute`: artifact distribution over a real (if
//! small) network. Each agent and the origin run in their own network
//! namespace joined by a bridge (`drover_tests::netns`); the origin's link
//! is capped by tc to `--origin-mbit` and each agent's to `--agent-mbit`,
//! so the figures depend on those links, not on loopback speed. Bytes are
//! the kernel's interface counters (what really crossed each link).
//!
//! Three rounds on the same hosts:
//! 1. Origin only: the coordinator in `--pull-mode whole`, every host
//!    pulls the whole artifact from it at once (one batch of all hosts).
//! 2. Peers: fresh agents (empty caches), default pull mode, a stage with
//!    `prefetch_all`: two hosts from the origin, the rest from peers in
//!    growing waves.
//! 3. A one-file change: the next release differs in one 1 MiB file;
//!    bytes received by all hosts as a share of the artifact per host.
//!
//! Targets (exit 1 on a miss): origin egress in round 2 at most 3x the
//! artifact; round 3 under 3% of the artifact per host.

use std::time::{Duration, Instant};

use drover_tests::artifacts::{BuiltArtifact, chunky_release};
use drover_tests::netns::{Host, Lab};
use drover_tests::{Agent, Coordinator, TestDir, bins, wait_until_ok};

fn release(dir: &TestDir, version: &str, files: usize, changed_seed: u64) -> BuiltArtifact {
    chunky_release(&dir.sub("artifacts"), version, files, (0, changed_seed))
}

fn pipeline(prefetch: bool, hosts: usize) -> String {
    format!(
        r#"
name = "bench"
service = "hello"

[[stages]]
name = "fleet"
selector = "env=bench"
batch_size = {hosts}
prefetch_all = {prefetch}
settle_ms = 0
stuck_timeout_ms = 600000
gate = {{ max_error_rate = 1.0, samples = 1, bad_samples = 1, min_requests = 0, inconclusive = "INCONCLUSIVE_POLICY_PASS" }}
"#
    )
}

/// The fleet's agents (`<prefix><i>`), each in its own namespace.
fn start_agents(
    dir: &TestDir,
    prefix: &str,
    hosts: &[Host],
    coordinator: &str,
    agent_mbit: u32,
) -> Vec<Agent> {
    let sample = bins::bin("drover-sample");
    let sample_env = format!("DROVER_SAMPLE_BIN={}", sample.display());
    let upload = (agent_mbit as u64 * 1_000_000 / 8).to_string();
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let listen = format!("{}:7070", h.ip);
            let zone = format!("zone=z{}", i % 2);
            Agent::start_in(
                dir,
                &format!("{prefix}{i}"),
                h,
                coordinator,
                &[
                    "--label",
                    "env=bench",
                    "--label",
                    &zone,
                    "--peer-listen",
                    &listen,
                    "--peer-upload-bytes-per-sec",
                    &upload,
                    "--env",
                    "PORT=8080",
                    "--env",
                    &sample_env,
                    "--keep-releases",
                    "2",
                ],
            )
        })
        .collect()
}

/// Deploys `digest` and waits until every agent holds it in `suffix`
/// form; returns the time that took and the bytes the origin sent.
async fn roll_out(
    coord: &Coordinator,
    origin: &Host,
    agents: &[Agent],
    digest: &str,
    suffix: &str,
) -> (Duration, u64) {
    let sent = Lab::bytes(origin, true);
    let started = Instant::now();
    let id = coord.start_deploy("bench", digest).await;
    wait_until_ok(
        "every host to hold the artifact",
        Duration::from_secs(1800),
        || async {
            agents
                .iter()
                .all(|a| a.data_dir.join(format!("cache/{digest}{suffix}")).exists())
        },
    )
    .await;
    let took = started.elapsed();
    let sent = Lab::bytes(origin, true) - sent;
    // Then every host restarts; a large fleet on two cores takes a while.
    wait_until_ok(
        "the deploy to complete",
        Duration::from_secs(1800),
        || async {
            coord.get_deploy(&id).await.phase() == drover_common::proto::DeployPhase::Complete
        },
    )
    .await;
    (took, sent)
}

pub async fn distribute(agents: usize, size_mb: usize, origin_mbit: u32, agent_mbit: u32) -> bool {
    let dir = TestDir::new();
    let mut lab = Lab::new("drvb");
    let origin = lab.host("origin", Some(origin_mbit));
    let hosts: Vec<Host> = (0..agents)
        .map(|i| lab.host(&format!("a{i}"), Some(agent_mbit)))
        .collect();
    let v1 = release(&dir, "v1", size_mb, 1);
    let v2 = release(&dir, "v2", size_mb, 2);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "distribute: {agents} agents, artifact {:.1} MB (tar.gz), origin link {origin_mbit} Mbit/s, agents' links {agent_mbit} Mbit/s",
        mb(v1.size)
    );

    // Round 1: every host from the origin.
    let (whole_took, whole_sent) = {
        let coord =
            Coordinator::start_in(&dir, "origin-whole", &origin, &["--pull-mode", "whole"]).await;
        coord.apply_pipeline(&dir, &pipeline(false, agents));
        let digest = coord.push(&v1.path, "hello", "v1");
        let fleet = start_agents(&dir, "whole-", &hosts, &coord.addr_arg(), agent_mbit);
        wait_until_ok("every agent", Duration::from_secs(60), || async {
            coord.hosts("env=bench").await.len() == agents
        })
        .await;
        let result = roll_out(&coord, &origin, &fleet, &digest, ".tar.gz").await;
        // Their disk back before the next round.
        let dirs: Vec<_> = fleet.iter().map(|a| a.data_dir.clone()).collect();
        drop(fleet);
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        result
    };
    println!(
        "  origin only: all hosts had it after {:.1} s; origin sent {:.0} MB = {:.2} x the artifact",
        whole_took.as_secs_f64(),
        mb(whole_sent),
        whole_sent as f64 / v1.size as f64
    );

    // Rounds 2 and 3: by chunks, from peers.
    let coord = Coordinator::start_in(&dir, "origin-peers", &origin, &[]).await;
    coord.apply_pipeline(&dir, &pipeline(true, agents));
    let d1 = coord.push(&v1.path, "hello", "v1");
    let d2 = coord.push(&v2.path, "hello", "v2");
    let fleet = start_agents(&dir, "peers-", &hosts, &coord.addr_arg(), agent_mbit);
    wait_until_ok("every agent", Duration::from_secs(60), || async {
        coord.hosts("env=bench").await.len() == agents
    })
    .await;
    let tar = |digest: &str| {
        std::fs::metadata(fleet[0].data_dir.join(format!("cache/{digest}.tar")))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let (peers_took, peers_sent) = roll_out(&coord, &origin, &fleet, &d1, ".tar").await;
    let multiple = peers_sent as f64 / tar(&d1) as f64;
    println!(
        "  peers: all hosts had it after {:.1} s ({:.2}x the origin-only time); origin sent {:.0} MB = {multiple:.2} x the artifact (target <= 3)",
        peers_took.as_secs_f64(),
        peers_took.as_secs_f64() / whole_took.as_secs_f64(),
        mb(peers_sent)
    );
    let received = |hs: &[Host]| hs.iter().map(|h| Lab::bytes(h, false)).sum::<u64>();
    let before = received(&hosts);
    let (delta_took, delta_sent) = roll_out(&coord, &origin, &fleet, &d2, ".tar").await;
    let moved = received(&hosts) - before;
    let share = moved as f64 / (agents as f64 * tar(&d2) as f64);
    println!(
        "  one-file change: {:.1} s; all hosts received {:.1} MB = {:.2}% of the artifact per host (target < 3%); the origin sent {:.1} MB",
        delta_took.as_secs_f64(),
        mb(moved),
        100.0 * share,
        mb(delta_sent)
    );
    let ok = multiple <= 3.0 && share < 0.03;
    println!("  {}", if ok { "PASS" } else { "FAIL" });
    ok
}
