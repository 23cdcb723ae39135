//! Trust benchmarks: the reconnect storm under mutual TLS.

use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::pki::Pki;
use drover_tests::procstat::cpu_seconds;
use drover_tests::{ChildGuard, Coordinator, TestDir, bins, http_get, wait_until_ok};

/// A counter (or gauge) of the coordinator's /metrics.
async fn metric(coord: &Coordinator, name: &str) -> f64 {
    let text = http_get(coord.metrics_addr, "/metrics").await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Every simulated agent (mutual TLS, its own certificate) connected, then
/// the coordinator killed with -9 and restarted on the same port: the time
/// from its restart (serving) until every agent is back, the handshakes it
/// completed meanwhile (counted by the coordinator) and their rate, and the
/// coordinator's CPU over the storm.
pub async fn storm(agents: usize) {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let coord = Coordinator::start_tls(&dir, "coord", &pki, &[]).await;
    let addr = coord.addr;
    let mut cmd = Command::new(bins::bin("drover-fleetsim"));
    cmd.arg("--coordinator")
        .arg(coord.addr_arg())
        .args(["--hosts", &agents.to_string(), "--heartbeat-interval", "1s"])
        .args(["--connect-rate", "2000", "--reconnect-max", "5s"])
        .arg("--tls-ca-dir")
        .arg(&pki.dir);
    let _sim = ChildGuard::spawn("fleetsim", cmd, &dir.path().join("fleetsim.log"));
    wait_until_ok(
        "every simulated agent connected",
        Duration::from_secs(180),
        || async { metric(&coord, "drover_connected_agents").await as usize == agents },
    )
    .await;
    drop(coord); // SIGKILL
    let started = Instant::now();
    let coord = Coordinator::start_tls_on(&dir, "coord", &pki, addr, &[]).await;
    let serving = started.elapsed();
    let pid = coord.child.pid();
    let cpu_before = cpu_seconds(pid);
    let t0 = Instant::now();
    wait_until_ok(
        "every simulated agent back",
        Duration::from_secs(180),
        || async { metric(&coord, "drover_connected_agents").await as usize == agents },
    )
    .await;
    let back = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu_before) / back;
    let handshakes = metric(&coord, "drover_tls_handshakes_total").await;
    let refused = metric(&coord, "drover_tls_handshakes_refused_total").await;
    assert!(
        handshakes >= agents as f64,
        "every agent came back through a handshake: {handshakes}"
    );
    println!(
        "storm agents={agents}  restart_to_serving={:.2}s  all_back_after={back:.2}s  handshakes={handshakes:.0} \
         (refused {refused:.0})  rate={:.0}/s  coordinator_cpu={:.0}% of one core during the storm \
         (agents back off up to 5 s with jitter)",
        serving.as_secs_f64(),
        handshakes / back,
        cpu * 100.0,
    );
}
