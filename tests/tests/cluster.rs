//! Three coordinators on a real etcd with real agents: leaders killed and
//! frozen mid-rollout, coordinators joining and leaving. Every deploy must
//! end COMPLETE or ROLLED_BACK with every host on the planned version, each
//! host started once per version, and a deposed leader must be refused by
//! etcd and by the agents.

use std::time::Duration;

use drover_common::proto::{DeployPhase, GetAuditRequest, ListDeploysRequest};
use drover_tests::cluster::metric;
use drover_tests::cluster_fleet::{ClusterFleet, PIPELINE, rolling_spec};
use drover_tests::{Cluster, TestDir, wait_until, wait_until_ok};
use nix::sys::signal::Signal;

/// Requests a second on every host's service: the gates judge real traffic.
const RPS: u32 = 20;

/// `coordinators` coordinators and `hosts` agents under load, the rolling
/// pipeline applied.
async fn fleet(coordinators: usize, hosts: usize, settle_ms: u32) -> ClusterFleet {
    ClusterFleet::start(coordinators, hosts, &rolling_spec(settle_ms), RPS).await
}

async fn fleet_on(dir: TestDir, cluster: Cluster, hosts: usize, settle_ms: u32) -> ClusterFleet {
    ClusterFleet::on(dir, cluster, hosts, &rolling_spec(settle_ms), RPS).await
}

/// When a deploy's leader is killed.
#[derive(Clone, Copy)]
enum Kill {
    /// Once this many hosts started the new version.
    AfterStarts(usize),
    /// While the deploy rolls back.
    MidRollback,
}

#[tokio::test]
async fn kill_9_of_the_shard_leader_at_any_point_of_a_rollout_and_every_deploy_ends_right() {
    let mut f = fleet(3, 4, 300).await;
    // CI talks to whichever coordinator it reaches: pushes go to one,
    // deploys start on another, the leader may be the third.
    let v1 = f.push(f.cluster.get(2), "v1", &[]);
    let id = f.start_deploy(f.cluster.get(1), &v1).await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    assert_eq!(f.versions().await, ["v1"; 4]);

    // Versions rolled out with the leader killed at a different point each
    // time (hosts already on the new version before the kill), the last
    // one twice; a bad one is killed during its rollback, which is slow
    // (v3 takes 3 s to be ready, also when a host returns to it).
    let plan: [(&str, &[&str], Kill, usize); 4] = [
        ("v2", &[], Kill::AfterStarts(0), 1),
        ("v3", &["--ready-after", "3"], Kill::AfterStarts(2), 1),
        ("bad", &["--unready"], Kill::MidRollback, 1),
        ("v4", &[], Kill::AfterStarts(1), 2),
    ];
    let mut current = "v1";
    for (version, extra, kill, kills) in plan {
        let digest = f.push(f.cluster.get(0), version, extra);
        let via = f.leader().await;
        let via = f.cluster.other_than(via);
        let id = f.start_deploy(via, &digest).await;
        // The write reached the leader from the coordinator CI called.
        let forwarded = metric(
            &f.cluster.metrics(f.cluster.index_of(via.name())).await,
            "drover_forwarded_requests_total",
        );
        assert!(
            forwarded >= 1.0,
            "{version} was started through a non-leader"
        );
        let before = f.starts(current);
        for _ in 0..kills {
            match kill {
                Kill::MidRollback => {
                    wait_until_ok(
                        "the bad version to roll back",
                        Duration::from_secs(60),
                        || async {
                            f.cluster
                                .deploy(&id)
                                .await
                                .is_some_and(|d| d.phase() == DeployPhase::RollingBack)
                        },
                    )
                    .await;
                    let (i, killed) = f.kill_leader_now().await;
                    let d = f.cluster.deploy(&id).await.unwrap();
                    assert_eq!(
                        d.phase(),
                        DeployPhase::RollingBack,
                        "{killed} was killed in the middle of the rollback"
                    );
                    let next = f.replace_killed(i, &killed).await;
                    eprintln!("{version}: killed {killed} mid-rollback, {next} leads now");
                }
                Kill::AfterStarts(n) => {
                    wait_until_ok(
                        &format!("{n} hosts on {version}"),
                        Duration::from_secs(60),
                        || async { f.starts(version).iter().sum::<usize>() >= n },
                    )
                    .await;
                    let (killed, next) = f.kill_leader().await;
                    eprintln!("{version}: killed {killed}, {next} leads the shard now");
                }
            }
        }
        let d = f.cluster.wait_finished(&id, Duration::from_secs(90)).await;
        if extra.contains(&"--unready") {
            assert_eq!(d.phase(), DeployPhase::RolledBack, "{version}: {d:?}");
            assert_eq!(f.versions().await, [current; 4], "{version} rolled back");
            let bad = f.starts(version);
            assert!(
                bad.iter().all(|n| *n <= 1),
                "{version}: no host restarted twice: {bad:?}"
            );
            assert!(bad.iter().sum::<usize>() >= 1, "{bad:?}");
            // Each host it touched started the previous version exactly
            // once more, though its rollback was sent twice.
            let after = f.starts(current);
            for i in 0..4 {
                assert_eq!(
                    after[i],
                    before[i] + bad[i],
                    "web-{i}: {before:?} {after:?} {bad:?}"
                );
            }
        } else {
            assert_eq!(d.phase(), DeployPhase::Complete, "{version}: {d:?}");
            assert_eq!(f.versions().await, [version; 4], "{version}");
            assert_eq!(
                f.starts(version),
                [1; 4],
                "{version}: each host started once"
            );
            current = version;
        }
    }
    // Every coordinator answers reads with the same deploys and audit log.
    let mut views = Vec::new();
    for i in 0..3 {
        let mut api = f.cluster.get(i).deployer().await;
        let deploys = api
            .list_deploys(ListDeploysRequest {
                pipeline: PIPELINE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .deploys;
        let audit = api
            .get_audit(GetAuditRequest {
                service: "hello".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let phases: Vec<(String, DeployPhase)> =
            deploys.iter().map(|d| (d.id.clone(), d.phase())).collect();
        views.push((phases, audit.len()));
    }
    assert_eq!(views[0].0.len(), 5, "five deploys: {:?}", views[0]);
    assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
}

/// The frozen leader is started with `--fault-ignore-lease-loss`: when it
/// wakes it does not notice on its own that its lease is gone (as a leader
/// with a bug or a broken clock would not), so whatever it still does must
/// be refused by etcd and by the agents, and the counters prove it was.
#[tokio::test]
async fn a_frozen_leader_is_refused_by_etcd_and_by_the_agents() {
    let dir = TestDir::new();
    let cluster = Cluster::start(&dir, 3, "2s", &["--fault-ignore-lease-loss"]).await;
    let f = fleet_on(dir, cluster, 3, 0).await;
    // Two hosts in the first batch, restarted one at a time, each ready 3 s
    // after it starts: the leader is frozen while it waits for web-0.
    f.apply(
        &rolling_spec(0)
            .replace("batch_size = 1", "batch_size = 2")
            .replace("stuck_timeout_ms = 6000", "stuck_timeout_ms = 20000"),
    );
    let v1 = f.push(f.cluster.get(0), "v1", &["--ready-after", "3"]);
    let leader = f.settled_leader().await;
    let frozen = f.cluster.get(leader).name().to_string();
    let id = f.start_deploy(f.cluster.get(leader), &v1).await;
    wait_until_ok("web-0 starting v1", Duration::from_secs(30), || async {
        f.starts("v1")[0] == 1
    })
    .await;
    f.cluster.get(leader).child.signal(Signal::SIGSTOP);
    let (next, _) = f.cluster.wait_leader(f.shard(), Some(&frozen)).await;
    // The new leader fences every agent and carries the batch on.
    wait_until_ok(
        "the new leader to restart web-1",
        Duration::from_secs(30),
        || async { f.starts("v1")[1] == 1 },
    )
    .await;
    f.cluster.get(leader).child.signal(Signal::SIGCONT);
    // Woken, the old leader goes on with the batch: its restart of web-1
    // carries its old epoch and the agent refuses it; recording the batch is
    // a write etcd refuses; then it steps down.
    wait_until_ok(
        &format!("{frozen} to be refused by an agent and by etcd"),
        Duration::from_secs(30),
        || async {
            let text = f.cluster.metrics(leader).await;
            metric(&text, "drover_stale_commands_total") >= 1.0
                && metric(&text, "drover_fenced_writes_total") >= 1.0
        },
    )
    .await;
    let refused_by_agents: usize = f
        .agents
        .iter()
        .map(|a| a.child.log().matches("rejected stale command").count())
        .sum();
    assert!(
        refused_by_agents >= 1,
        "the agents logged the stale command they refused"
    );
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(
        d.phase(),
        DeployPhase::Complete,
        "{next} finished it: {d:?}"
    );
    assert_eq!(f.starts("v1"), [1, 1, 1], "each host started once");
    assert_eq!(f.versions().await, ["v1"; 3]);
    assert!(
        f.cluster.get(leader).child.log().contains("no longer lead"),
        "the old leader stepped down once etcd refused it"
    );
}

#[tokio::test]
async fn coordinators_joining_and_leaving_rebalance_the_shards_and_no_deploy_stalls() {
    let mut f = fleet(1, 3, 1500).await;
    assert_eq!(
        f.cluster.shares().await.into_iter().collect::<Vec<_>>(),
        [("c1".to_string(), 16)],
        "alone, c1 leads every shard"
    );
    let v1 = f.push(f.cluster.get(0), "v1", &[]);
    let id = f.start_deploy(f.cluster.get(0), &v1).await;

    // Two coordinators join mid-deploy: the shards spread.
    f.cluster.add(&f.dir).await;
    wait_shares(&f.cluster, &[("c1", 8), ("c2", 8)]).await;
    f.cluster.add(&f.dir).await;
    wait_until(
        "the shards to spread over three",
        Duration::from_secs(30),
        || async {
            let shares = f.cluster.shares().await;
            let total: usize = shares.values().sum();
            if shares.len() == 3 && total == 16 && shares.values().all(|n| *n <= 6) {
                Ok(())
            } else {
                Err(format!("{shares:?}"))
            }
        },
    )
    .await;
    // Agents learned of the newcomers and connected to them.
    f.wait_everyone_sees_every_host().await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    assert_eq!(f.starts("v1"), [1, 1, 1], "each host started once");

    // One leaves cleanly, one dies: the shards gather on the survivors.
    let v2 = f.push(f.cluster.get(1), "v2", &[]);
    let id = f.start_deploy(f.cluster.get(2), &v2).await;
    f.cluster.get(2).child.signal(Signal::SIGTERM);
    wait_shares(&f.cluster, &[("c1", 8), ("c2", 8)]).await;
    f.cluster.kill(2);
    f.cluster.kill(1);
    wait_shares(&f.cluster, &[("c1", 16)]).await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    assert_eq!(f.starts("v2"), [1, 1, 1], "each host started once");
}

async fn wait_shares(cluster: &Cluster, want: &[(&str, usize)]) {
    let want: std::collections::BTreeMap<String, usize> =
        want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    wait_until(
        &format!("shares {want:?}"),
        Duration::from_secs(30),
        || async {
            let shares = cluster.shares().await;
            if shares == want {
                Ok(())
            } else {
                Err(format!("{shares:?}"))
            }
        },
    )
    .await;
}

/// etcd killed for longer than the lease TTL mid-deploy: every coordinator
/// steps down (each reports leading no shard), no host is commanded while
/// etcd is away, and once it is back the deploy completes.
#[tokio::test]
async fn no_commands_while_etcd_is_down_and_the_deploy_completes_after() {
    let mut f = fleet(3, 2, 3000).await;
    let v1 = f.push(f.cluster.get(0), "v1", &[]);
    let id = f.start_deploy(f.cluster.get(1), &v1).await;
    // The first host is updated and its batch settles: etcd goes away.
    wait_until_ok("web-0 on v1", Duration::from_secs(30), || async {
        f.starts("v1")[0] == 1
    })
    .await;
    f.cluster.etcd.stop();
    for i in 0..3 {
        wait_until_ok(
            &format!("c{} to step down", i + 1),
            Duration::from_secs(20),
            || async { metric(&f.cluster.metrics(i).await, "drover_shards_led") == 0.0 },
        )
        .await;
    }
    // Long past the settle time and the gate, had anyone kept going.
    let away = std::time::Instant::now();
    while away.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            f.starts("v1")[1],
            0,
            "no command reaches a host while etcd is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.cluster.etcd.restart().await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    assert_eq!(f.starts("v1"), [1, 1], "each host started once");
    assert!(
        d.batches.iter().all(|b| b.verdict == "passed"),
        "{:?}",
        d.batches
    );
}

/// With other coordinators live, an upload is acknowledged only once a
/// second coordinator holds it: the one that took it can die right after.
#[tokio::test]
async fn an_acknowledged_upload_survives_the_loss_of_the_coordinator_that_took_it() {
    let mut f = fleet(3, 2, 300).await;
    let v1 = f.push(f.cluster.get(0), "v1", &[]);
    let holders: Vec<&str> = ["c2", "c3"]
        .into_iter()
        .filter(|c| {
            f.dir
                .path()
                .join(format!("{c}/artifacts/blobs/{v1}"))
                .exists()
        })
        .collect();
    assert!(
        !holders.is_empty(),
        "a peer holds the blob when the push returns"
    );
    f.cluster.kill(0);
    // Should c1 have led the pipeline's shard, a standby takes it first.
    f.cluster.wait_leader(f.shard(), Some("c1")).await;
    let id = f.start_deploy(f.cluster.get(1), &v1).await;
    let d = f.cluster.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(d.phase(), DeployPhase::Complete, "{d:?}");
    assert_eq!(f.versions().await, ["v1"; 2]);
}
