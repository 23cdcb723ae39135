//! The deploy engine's test world (unit tests only): one coordinator
//! leading every shard on the embedded store in a temp dir, a scripted
//! fleet ([`FakeFleet`]), and a clock that follows tokio's paused time.

use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{AuditKind, Host, Pipeline};

use super::clock::TokioClock;
use super::driver::Driver;
use super::driver::fake::{FakeFleet, FakeHost};
use super::ledger::Ledger;
use super::machine::{Action, Event};
use super::record::DeployRecord;
use super::start::{NewDeploy, new_record};
use crate::ha::leases::ShardLeases;
use crate::ha::members::Member;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

/// The release every scripted host runs at first (the known good).
pub fn old() -> String {
    "a".repeat(64)
}

/// The release deployed.
pub fn new() -> String {
    "b".repeat(64)
}

/// Pipeline "hello" of service "hello": `stages` in order, one host a batch.
pub fn staged_pipeline(stages: &[&str]) -> Pipeline {
    Pipeline {
        name: "hello".into(),
        service: "hello".into(),
        stages: stages
            .iter()
            .map(|n| drover_common::proto::Stage {
                name: n.to_string(),
                batch_size: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A new deploy's record of `new()` over `p` (id "hello-1"), its stages'
/// hosts given, made at `now`; and its first actions.
pub fn record_of(p: &Pipeline, hosts: &[&[&str]], now: u64) -> (DeployRecord, Vec<Action>) {
    new_record(NewDeploy {
        id: "hello-1".into(),
        pipeline: p,
        hosts: hosts
            .iter()
            .map(|s| {
                s.iter()
                    .map(|h| Host {
                        host_id: h.to_string(),
                        ..Default::default()
                    })
                    .collect()
            })
            .collect(),
        artifact: new(),
        git_sha: String::new(),
        known_good: old(),
        environments: vec![old(); p.stages.len()],
        live_slots: Vec::new(),
        first_stage: 0,
        forced_past: Vec::new(),
        requester: "ci".into(),
        started_by: "ci".into(),
        idempotency_key: String::new(),
        train: None,
        config: String::new(),
        environment_configs: Vec::new(),
        now,
    })
    .expect("a deploy with hosts")
}

/// The driver's world: one coordinator leading every shard.
pub struct World {
    _dir: tempfile::TempDir,
    pub ledger: Arc<Ledger>,
    pub fleet: Arc<FakeFleet>,
}

impl World {
    pub async fn new(hosts: &[&str]) -> World {
        Self::with_watch_buffer(hosts, 4096).await
    }

    /// A world whose store buffers `events` changes per watcher.
    pub async fn with_watch_buffer(hosts: &[&str], events: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open_with_watch_buffer(dir.path(), events).unwrap());
        let leases = ShardLeases::new(
            store.clone(),
            "/t",
            Member {
                id: "c1".into(),
                address: "c1:1".into(),
                ready: true,
            },
            4,
            Duration::from_secs(3600),
            Duration::ZERO,
            false,
        );
        leases.campaign_once().await;
        let ledger = Arc::new(Ledger::new(
            store,
            "/t",
            leases,
            Default::default(),
            Arc::new(TokioClock::new(1_000_000)),
        ));
        let scripted: Vec<(&str, FakeHost)> =
            hosts.iter().map(|h| (*h, FakeHost::new(&old()))).collect();
        World {
            _dir: dir,
            ledger,
            fleet: Arc::new(FakeFleet::with_hosts(&scripted)),
        }
    }

    /// A coordinator's driver (a new one stands for a restart or a new leader).
    pub fn driver(&self) -> Arc<Driver> {
        Driver::new(self.ledger.clone(), self.fleet.clone())
    }

    /// Starts a deploy of `new()` over `p`, its stages' hosts given.
    pub async fn start(&self, p: &Pipeline, hosts: &[&[&str]]) -> String {
        let (rec, actions) = record_of(p, hosts, self.ledger.now());
        assert!(
            self.ledger
                .create(&rec, &actions, Vec::new())
                .await
                .unwrap()
        );
        rec.id
    }

    pub async fn record(&self, id: &str) -> DeployRecord {
        self.ledger.load(id).await.unwrap().0
    }

    /// Drives `id` to its end on a fresh driver.
    pub async fn drive(&self, id: &str) -> DeployRecord {
        self.driver().drive(id).await.unwrap();
        self.record(id).await
    }

    /// Applies a control as the facade does.
    pub async fn control(&self, driver: &Driver, id: &str, event: Event) {
        self.ledger
            .apply(id, &event, "alice", |_| {})
            .await
            .unwrap()
            .unwrap();
        driver.wake(id);
    }

    pub async fn kinds(&self) -> Vec<AuditKind> {
        self.ledger
            .audit_log("hello", 0, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event())
            .collect()
    }

    pub async fn wait_for(&self, id: &str, what: impl Fn(&DeployRecord) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while !what(&self.record(id).await) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                self.record(id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
