//! The shards this coordinator leads. It campaigns for every shard it does
//! not hold (one election each), keeps the leases alive, and notices the
//! moment a lease can no longer be proven. With one coordinator it simply
//! leads every shard; fair-share rebalancing between several is issue 5's
//! next step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::election::{Election, Leadership};
use crate::store::{Compare, Store};

/// A change of leadership of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    Gained(u32),
    Lost(u32),
}

pub struct ShardLeases {
    store: Arc<dyn Store>,
    prefix: String,
    candidate: String,
    pub shards: u32,
    ttl: Duration,
    held: Mutex<HashMap<u32, (Arc<Election>, Leadership)>>,
    events: broadcast::Sender<ShardEvent>,
}

impl ShardLeases {
    pub fn new(
        store: Arc<dyn Store>,
        key_prefix: &str,
        candidate: &str,
        shards: u32,
        ttl: Duration,
    ) -> Arc<ShardLeases> {
        Arc::new(ShardLeases {
            store,
            prefix: format!("{key_prefix}/elections/shard-"),
            candidate: candidate.to_string(),
            shards: shards.max(1),
            ttl,
            held: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ShardEvent> {
        self.events.subscribe()
    }

    /// Leadership of `shard`, while it can be proven.
    pub fn leadership(&self, shard: u32) -> Option<Leadership> {
        self.held
            .lock()
            .expect("held lock")
            .get(&shard)
            .map(|(_, l)| l.clone())
            .filter(|l| !l.lost.is_cancelled())
    }

    /// The compare that fences a write for `shard` (None: not the leader).
    pub fn guard(&self, shard: u32) -> Option<Compare> {
        let held = self.held.lock().expect("held lock");
        held.get(&shard)
            .filter(|(_, l)| !l.lost.is_cancelled())
            .map(|(e, l)| e.guard(l))
    }

    /// Checks with the store that our election key for `shard` is still the
    /// one we created; if not, steps down (a frozen leader learns it here).
    pub async fn still_leader(&self, shard: u32) -> bool {
        let Some(leadership) = self.leadership(shard) else {
            return false;
        };
        let current = self.store.get(&format!("{}{shard}", self.prefix)).await;
        let ours = matches!(&current, Ok(Some(kv)) if kv.create_revision == leadership.epoch);
        if !ours && current.is_ok() {
            warn!(
                shard,
                "our election key is gone or another's: stepping down"
            );
            leadership.lost.cancel();
        }
        ours
    }

    /// Who leads `shard`, for error messages and forwarding.
    pub async fn leader_of(&self, shard: u32) -> Option<String> {
        let e = Election::new(
            self.store.clone(),
            format!("{}{shard}", self.prefix),
            self.candidate.clone(),
            self.ttl,
        );
        e.leader().await.ok().flatten().map(|(id, _)| id)
    }

    /// One round: drop lost shards, campaign for free ones.
    pub async fn campaign_once(&self) {
        let lost: Vec<u32> = {
            let mut held = self.held.lock().expect("held lock");
            let lost: Vec<u32> = held
                .iter()
                .filter(|(_, (_, l))| l.lost.is_cancelled())
                .map(|(s, _)| *s)
                .collect();
            for s in &lost {
                held.remove(s);
            }
            lost
        };
        for s in lost {
            let _ = self.events.send(ShardEvent::Lost(s));
        }
        for shard in 0..self.shards {
            if self.held.lock().expect("held lock").contains_key(&shard) {
                continue;
            }
            let election = Arc::new(Election::new(
                self.store.clone(),
                format!("{}{shard}", self.prefix),
                self.candidate.clone(),
                self.ttl,
            ));
            match election.try_acquire().await {
                Ok(Some(leadership)) => {
                    election.keep_alive(&leadership);
                    self.held
                        .lock()
                        .expect("held lock")
                        .insert(shard, (election, leadership));
                    let _ = self.events.send(ShardEvent::Gained(shard));
                }
                Ok(None) => {}
                Err(e) => warn!(shard, error = %e, "campaign failed"),
            }
        }
    }

    /// Campaigns every TTL/3 until `stop`; then resigns every shard so a
    /// standby takes over at once.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.campaign_once().await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
        }
        let held: Vec<(Arc<Election>, Leadership)> = self
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(_, v)| v)
            .collect();
        for (election, leadership) in held {
            let _ = election.resign(&leadership).await;
        }
    }
}
