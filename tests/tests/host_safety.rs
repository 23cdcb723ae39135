//! Host safety (issue 11, first part), end to end with the real binaries:
//! whatever a hook prints, the agent's memory and every CommandUpdate stay
//! bounded and the host stays connected; the data dir is the agent's alone.

use std::time::Duration;

use drover_common::proto::{CommandStatus, ConnectionState};
use drover_tests::artifacts::{artifact_with, sample_manifest};
use drover_tests::commands::{cmd, pull, restart};
use drover_tests::tmpfs::Tmpfs;
use drover_tests::{Agent, Coordinator, TestDir, free_port, wait_until_ok};

const SERVICE: &str = "hello";
const WAIT: Duration = Duration::from_secs(20);

/// An artifact whose pre_start hook runs `script` with /bin/sh.
fn with_hook(dir: &TestDir, version: &str, script: &str) -> drover_tests::artifacts::BuiltArtifact {
    let manifest = sample_manifest(SERVICE, version, &[])
        + &format!(
            "\n[hooks]\npre_start = {{ command = [\"/bin/sh\", \"-c\", {script:?}], timeout = \"60s\" }}\n"
        );
    artifact_with(
        &dir.sub("artifacts"),
        &format!("{version}.tar.gz"),
        &manifest,
        &[],
    )
}

/// A coordinator and agent `web-1` (the sample service, with `extra`
/// flags), connected.
async fn web1(dir: &TestDir, extra: &[&str]) -> (Coordinator, Agent) {
    web1_pulling(dir, "chunks", extra).await
}

/// web-1, with the coordinator's `--pull-mode` set.
async fn web1_pulling(dir: &TestDir, mode: &str, extra: &[&str]) -> (Coordinator, Agent) {
    let coord = Coordinator::start(dir, "coord", &["--pull-mode", mode]).await;
    let agent = Agent::start_sample(dir, "web-1", &[&coord], free_port(), extra);
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
    (coord, agent)
}

/// The peak resident memory of `pid` (VmHWM), in bytes.
fn peak_rss(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[tokio::test]
async fn hooks_that_print_without_end_cost_bounded_memory_and_bounded_updates() {
    let dir = TestDir::new();
    let (coord, agent) = web1(&dir, &[]).await;
    let host = coord.host("web-1").await.unwrap();

    // Twenty lines of 200 KB, then exit 3: the failure names the hook and
    // its exit status; the tail is bounded and says what it dropped.
    let flood = with_hook(
        &dir,
        "v1",
        "i=0; while [ $i -lt 20 ]; do head -c 200000 /dev/zero | tr '\\0' x; echo; i=$((i+1)); done; exit 3",
    );
    coord.push(&flood.path, SERVICE, "v1");
    let update = coord
        .send("web-1", cmd("p1", 0, pull(SERVICE, &flood.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    let update = coord
        .send("web-1", cmd("r1", 0, restart(SERVICE, &flood.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update
            .reason
            .contains("pre_start hook failed: exit status: 3"),
        "{}",
        update.reason
    );
    assert!(
        update.output_tail.len() <= 16 * 1024,
        "{}",
        update.output_tail.len()
    );
    assert!(
        update.output_tail.contains("[output truncated: ")
            && update.output_tail.contains("more characters]"),
        "{}",
        &update.output_tail[..200.min(update.output_tail.len())]
    );

    // 120 MB of output: the agent's peak memory stays far below it.
    let torrent = with_hook(&dir, "v2", "head -c 120000000 /dev/zero; exit 1");
    coord.push(&torrent.path, SERVICE, "v2");
    let update = coord
        .send("web-1", cmd("p2", 0, pull(SERVICE, &torrent.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    let update = coord
        .send("web-1", cmd("r2", 0, restart(SERVICE, &torrent.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed, "{}", update.reason);
    let peak = peak_rss(agent.child.pid());
    assert!(peak < 64 << 20, "agent peak RSS {} MiB", peak >> 20);

    // The stream was never dropped.
    let now = coord.host("web-1").await.unwrap();
    assert_eq!(now.state(), ConnectionState::Connected);
    assert_eq!(now.connected_at_unix_ms, host.connected_at_unix_ms);
}

#[tokio::test]
async fn the_data_dir_is_private_and_one_agents_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let first = Agent::start(&dir, "web-1", &[&coord], &[]);
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
    let mode = std::fs::metadata(&first.data_dir)
        .unwrap()
        .permissions()
        .mode();
    // Services (other users) pass through to their releases, never list.
    assert_eq!(mode & 0o777, 0o711, "{mode:o}");

    // A second agent on the same data dir refuses to start, naming the first.
    let out = std::process::Command::new(drover_tests::bins::bin("drover-agent"))
        .args([
            "--coordinator",
            &coord.addr_arg(),
            "--host-id",
            "web-2",
            "--data-dir",
        ])
        .arg(&first.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "another agent (pid {}) is using data dir",
            first.child.pid()
        )),
        "{err}"
    );
    assert!(coord.host("web-2").await.is_err(), "web-2 never connected");
    wait_until_ok("web-1 still connected", WAIT, || async {
        coord
            .host("web-1")
            .await
            .is_ok_and(|h| h.state() == ConnectionState::Connected)
    })
    .await;
}

/// A small tmpfs mounted over `path` (tests run as root, as CI does), lazily
/// unmounted on drop.
#[tokio::test]
async fn a_pull_that_cannot_fit_on_the_hosts_disk_is_refused_before_a_byte() {
    let dir = TestDir::new();
    let _disk = Tmpfs::mount(&dir.path().join("agent-web-1"), "4m");
    let (coord, agent) = web1(&dir, &[]).await;
    // 3 MB that gzip cannot shrink: 6 MB to download and unpack on a 4 MB disk.
    let noise = drover_tests::artifacts::noise(3 << 20);
    let manifest = sample_manifest(SERVICE, "big", &[]);
    let big = artifact_with(
        &dir.sub("artifacts"),
        "big.tar.gz",
        &manifest,
        &[("noise.bin", &noise)],
    );
    coord.push(&big.path, SERVICE, "big");
    let update = coord
        .send("web-1", cmd("big", 0, pull(SERVICE, &big.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update.reason.starts_with("disk: ")
            && update.reason.contains("bytes free; the artifact needs"),
        "{}",
        update.reason
    );
    let cache: Vec<String> = std::fs::read_dir(agent.data_dir.join("cache"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(cache.is_empty(), "nothing downloaded: {cache:?}");
    // The host goes on working: a small release pulls and starts.
    let small = drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), SERVICE, "v1", &[]);
    coord.push(&small.path, SERVICE, "v1");
    for (id, action) in [
        ("p1", pull(SERVICE, &small.digest)),
        ("r1", restart(SERVICE, &small.digest)),
    ] {
        let update = coord.send("web-1", cmd(id, 0, action)).await.unwrap();
        assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    }
}

#[tokio::test]
async fn pulls_prune_releases_and_cache_as_they_go() {
    let dir = TestDir::new();
    let (coord, agent) = web1(&dir, &["--keep-releases", "3"]).await;
    let mut digests = Vec::new();
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        let a = drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), SERVICE, v, &[]);
        coord.push(&a.path, SERVICE, v);
        let update = coord
            .send("web-1", cmd(&format!("p-{v}"), 0, pull(SERVICE, &a.digest)))
            .await
            .unwrap();
        assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
        digests.push(a.digest);
    }
    let names = |path: std::path::PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let releases = names(agent.data_dir.join("services/hello/releases"));
    let mut newest: Vec<String> = digests[2..].to_vec();
    newest.sort();
    let mut with_records: Vec<String> = newest
        .iter()
        .flat_map(|d| [d.clone(), format!("{d}.tree")])
        .collect();
    with_records.sort();
    assert_eq!(
        releases, with_records,
        "the three newest pulls are kept, each with its record"
    );
    // Pulled by chunks: each kept artifact is its tar stream and index.
    let cache = names(agent.data_dir.join("cache"));
    assert_eq!(cache.len(), 6, "{cache:?}");
    assert!(
        newest
            .iter()
            .all(|d| cache.contains(&format!("{d}.tar")) && cache.contains(&format!("{d}.chunks"))),
        "{cache:?}"
    );
}

#[tokio::test]
async fn a_compression_bomb_is_refused_before_it_is_written() {
    let dir = TestDir::new();
    let (coord, agent) = web1(&dir, &["--max-compression-ratio", "3"]).await;
    // 20 MB of zeros gzip to ~20 KB: about 1000:1, over the default 100:1.
    // The origin refuses it while it arrives.
    let zeros = vec![0u8; 20 << 20];
    let bomb = artifact_with(
        &dir.sub("artifacts"),
        "bomb.tar.gz",
        &sample_manifest(SERVICE, "bomb", &[]),
        &[("zeros.bin", &zeros)],
    );
    assert!(std::fs::metadata(&bomb.path).unwrap().len() < 200 << 10);
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "push",
        bomb.path.to_str().unwrap(),
        "--service",
        SERVICE,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("declares more than 100 times as much unpacked")
            && err.contains("nothing was stored"),
        "{err}"
    );

    // Within the origin's ratio, over this agent's (3:1): refused on pull.
    let dense = artifact_with(
        &dir.sub("artifacts"),
        "dense.tar.gz",
        &sample_manifest(SERVICE, "dense", &[]),
        &[("data.txt", &four_lines(3 << 20))],
    );
    let ratio = (3 << 20) as f64 / dense.size as f64;
    assert!((3.5..100.0).contains(&ratio), "ratio {ratio}");
    coord.push(&dense.path, SERVICE, "dense");
    let update = coord
        .send("web-1", cmd("dense", 0, pull(SERVICE, &dense.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update
            .reason
            .contains("declares more than 3 times as much unpacked"),
        "{}",
        update.reason
    );
    let releases = agent.data_dir.join("services/hello/releases");
    let left = std::fs::read_dir(&releases).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "nothing unpacked is left behind");
}

/// A pipeline of one stage and one host per batch, with a short stuck timeout.
const QUICK_PIPELINE: &str = r#"
name = "hello-quick"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
settle_ms = 0
stuck_timeout_ms = 3000
gate = { samples = 1, bad_samples = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

#[tokio::test]
async fn a_hanging_hook_fails_the_deploy_within_stuck_timeout_and_is_named() {
    let dir = TestDir::new();
    let (coord, _agent) = web1(&dir, &["--label", "env=prod"]).await;
    coord.apply_pipeline(&dir, QUICK_PIPELINE);
    let good = drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), SERVICE, "v1", &[]);
    coord.push(&good.path, SERVICE, "v1");
    let first = coord.start_deploy("hello-quick", &good.digest).await;
    coord
        .wait_phase(&first, drover_common::proto::DeployPhase::Complete)
        .await;

    // The hook allows itself 300 s; the stage allows a restart 3 s.
    let hanging = with_hook(&dir, "v2", "echo migrating table users; sleep 67");
    coord.push(&hanging.path, SERVICE, "v2");
    let started = std::time::Instant::now();
    let id = coord.start_deploy("hello-quick", &hanging.digest).await;
    let deploy = coord
        .wait_phase(&id, drover_common::proto::DeployPhase::RolledBack)
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the deploy waited {took:?} for a 3 s stuck timeout"
    );
    assert!(
        deploy
            .reason
            .contains("pre_start hook did not finish within the restart's deadline of 3s"),
        "{}",
        deploy.reason
    );
    assert!(
        deploy.reason.contains("migrating table users"),
        "the hook's output is in the reason: {}",
        deploy.reason
    );
    // The host is named stuck in the audit (and so to subscriptions).
    let stuck: Vec<_> = coord
        .audit(SERVICE)
        .await
        .into_iter()
        .filter(|e| e.event() == drover_common::proto::AuditKind::HostStuck)
        .collect();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0].hosts, ["web-1"]);
    assert!(
        stuck[0]
            .reason
            .contains("did not finish within the restart's deadline"),
        "{}",
        stuck[0].reason
    );
    // The hook's whole process group was killed: nothing of it lingers.
    let lingering = std::process::Command::new("pgrep")
        .args(["-f", "migrating table users|^sleep 67$"])
        .output()
        .unwrap();
    assert!(
        lingering.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&lingering.stdout)
    );
}

/// About `len` bytes of four distinct lines in random order: roughly 10:1
/// under gzip, far under the ratio limit, so only the disk can stop it.
fn four_lines(len: usize) -> Vec<u8> {
    const LINES: [&[u8]; 4] = [
        b"alpha bravo charlie delta echo 1\n",
        b"foxtrot golf hotel india juliet\n",
        b"kilo lima mike november oscar 3\n",
        b"papa quebec romeo sierra tango\n",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len + 40);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(LINES[(x & 3) as usize]);
    }
    out
}

#[tokio::test]
async fn a_full_disk_is_the_hosts_problem_and_shows_degraded() {
    let dir = TestDir::new();
    let disk_dir = dir.path().join("agent-web-1");
    let _disk = Tmpfs::mount(&disk_dir, "4m");
    // Whole files: a release that fits compressed grows past the disk while
    // unpacking (a pull by chunks knows the unpacked size and is refused
    // before it fetches anything: distribution.rs).
    let (coord, agent) = web1_pulling(&dir, "whole", &["--disk-check-interval", "200ms"]).await;
    let degraded = |problem: &'static str| {
        let coord = &coord;
        async move {
            let h = coord.host("web-1").await.unwrap();
            h.problems.iter().any(|p| p.contains(problem))
        }
    };

    // 1. A release that grows past the disk while unpacking: refused before
    // the disk fills, said as the disk's problem, nothing left behind.
    let grows = artifact_with(
        &dir.sub("artifacts"),
        "grows.tar.gz",
        &sample_manifest(SERVICE, "grows", &[]),
        &[("data.txt", &four_lines(6 << 20))],
    );
    assert!(grows.size < 1536 << 10, "{} bytes compressed", grows.size);
    coord.push(&grows.path, SERVICE, "grows");
    let update = coord
        .send("web-1", cmd("grows", 0, pull(SERVICE, &grows.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update.reason.starts_with("disk: no space to unpack")
            && update.reason.contains("the partial release was removed"),
        "{}",
        update.reason
    );
    let releases = agent.data_dir.join("services/hello/releases");
    let left = std::fs::read_dir(&releases).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no partial release is left");
    wait_until_ok("the host to report the failed pull", WAIT, || {
        degraded("disk: no space to unpack")
    })
    .await;
    let (_, out, _) = coord.droverctl(&["hosts"]);
    assert!(out.contains("DEGRADED"), "{out}");
    let (_, out, _) = coord.droverctl(&["host", "web-1"]);
    assert!(
        out.contains("problem:     disk: no space to unpack"),
        "{out}"
    );

    // A pull that fits clears it.
    let small = drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), SERVICE, "v1", &[]);
    coord.push(&small.path, SERVICE, "v1");
    let update = coord
        .send("web-1", cmd("p1", 0, pull(SERVICE, &small.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    wait_until_ok("the problem to clear", WAIT, || async {
        coord.host("web-1").await.unwrap().problems.is_empty()
    })
    .await;

    // 2. Something else fills the disk: the probe sees it while the host is
    // idle, pulls say so, the agent stays connected; freed, it all clears.
    let filler = disk_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
    }
    wait_until_ok("the probe to find the disk full", WAIT, || {
        degraded("disk: no space left on the device writing")
    })
    .await;
    wait_until_ok("the free-space floor to be reported", WAIT, || {
        degraded("bytes free (under the floor of")
    })
    .await;
    let v2 = drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), SERVICE, "v2", &[]);
    coord.push(&v2.path, SERVICE, "v2");
    let update = coord
        .send("web-1", cmd("p2", 0, pull(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(update.reason.starts_with("disk: "), "{}", update.reason);
    assert!(
        !agent
            .data_dir
            .join(format!("cache/{}.part", v2.digest))
            .exists(),
        "no part file is left"
    );
    // A restart must record its switch first: the journal cannot be
    // written, so nothing switches, and the host says why.
    let update = coord
        .send("web-1", cmd("r1", 0, restart(SERVICE, &small.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update.reason.contains("cannot write the state journal"),
        "{}",
        update.reason
    );
    wait_until_ok("the journal problem to be reported", WAIT, || {
        degraded("journal: cannot write the state journal")
    })
    .await;
    assert_eq!(
        coord.host("web-1").await.unwrap().state(),
        ConnectionState::Connected
    );
    std::fs::remove_file(&filler).unwrap();
    let update = coord
        .send("web-1", cmd("p2-again", 0, pull(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
    wait_until_ok("every problem to clear", WAIT, || async {
        coord.host("web-1").await.unwrap().problems.is_empty()
    })
    .await;
    let (_, out, _) = coord.droverctl(&["hosts"]);
    assert!(
        out.contains("connected") && !out.contains("DEGRADED"),
        "{out}"
    );
}
