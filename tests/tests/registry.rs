//! The fleet registry forgets and pages (issue 11, deliverable 5), end to
//! end with the real coordinator, drover-fleetsim and droverctl: hosts away
//! past the retention are dropped, the host limit refuses new hosts with a
//! clear status when every host held is connected, and droverctl follows
//! ListHosts' pages.

use std::time::Duration;

use drover_common::proto::ConnectionState;
use drover_tests::cluster::metric;
use drover_tests::{ChildGuard, Coordinator, TestDir, wait_until_ok};

const WAIT: Duration = Duration::from_secs(30);

fn fleetsim(dir: &TestDir, coord: &Coordinator, prefix: &str, hosts: usize) -> ChildGuard {
    let hosts = hosts.to_string();
    drover_tests::fleetsim(
        dir,
        coord,
        prefix,
        &[
            "--hosts",
            &hosts,
            "--prefix",
            prefix,
            "--reconnect-max",
            "1s",
        ],
    )
}

async fn metrics(coord: &Coordinator) -> String {
    drover_tests::http_get(coord.metrics_addr, "/metrics").await
}

#[tokio::test]
async fn away_hosts_are_forgotten_the_limit_holds_and_droverctl_follows_pages() {
    let dir = TestDir::new();
    let coord = Coordinator::start(
        &dir,
        "coord",
        &["--host-retention", "2s", "--max-hosts", "2400"],
    )
    .await;

    // 1. 300 hosts come and go: after the retention they are forgotten.
    let old = fleetsim(&dir, &coord, "old", 300);
    wait_until_ok("300 hosts connected", WAIT, || async {
        coord.hosts("").await.len() == 300
    })
    .await;
    drop(old);
    wait_until_ok("the departed hosts to be forgotten", WAIT, || async {
        coord.hosts("").await.is_empty()
    })
    .await;
    assert_eq!(
        metric(&metrics(&coord).await, "drover_hosts_forgotten_total"),
        300.0
    );

    // 2. 2,500 new hosts against a limit of 2,400: 2,400 are held, the rest
    // refused with RESOURCE_EXHAUSTED, and nobody connected is displaced.
    let _new = fleetsim(&dir, &coord, "new", 2500);
    wait_until_ok("2,400 hosts connected", WAIT, || async {
        let hosts = coord.hosts("").await;
        hosts.len() == 2400
            && hosts
                .iter()
                .all(|h| h.state() == ConnectionState::Connected)
    })
    .await;
    wait_until_ok("refusals to be counted", WAIT, || async {
        metrics(&coord)
            .await
            .contains("drover_streams_rejected_total{reason=\"registry_full\"}")
    })
    .await;
    let log = std::fs::read_to_string(dir.path().join("fleetsim-new.log")).unwrap();
    assert!(
        log.contains("holds its limit of 2400 hosts"),
        "fleetsim's log names the limit"
    );
    assert_eq!(coord.hosts("").await.len(), 2400, "still exactly the limit");

    // 3. droverctl follows the pages (1,000 a page): every host, once.
    let (code, out, err) = coord.droverctl(&["hosts"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("new-"))
        .collect();
    assert_eq!(rows.len(), 2400);
    let unique: std::collections::HashSet<&str> = rows.iter().copied().collect();
    assert_eq!(unique.len(), 2400);
}
