//! One election, as etcd's `concurrency` package does it: a key bound to the
//! candidate's lease, created only if absent. The winner's epoch is the
//! key's create revision; every write it makes as leader is guarded by
//! "my key still has that create revision", so a deposed leader (lease
//! expired, key gone or recreated by someone else) can write nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Compare, LeaseId, Op, Result, Store, Txn};

pub struct Election {
    store: Arc<dyn Store>,
    key: String,
    candidate: String,
    ttl: Duration,
}

/// Proof of leadership while `lost` is not cancelled.
#[derive(Clone)]
pub struct Leadership {
    pub epoch: u64,
    pub lease: LeaseId,
    /// Cancelled the moment leadership can no longer be proven.
    pub lost: CancellationToken,
}

impl Election {
    pub fn new(store: Arc<dyn Store>, key: String, candidate: String, ttl: Duration) -> Election {
        Election {
            store,
            key,
            candidate,
            ttl,
        }
    }

    /// Tries once to become leader. `None`: someone else leads.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(self.key.clone())],
                success: vec![Op::Put {
                    key: self.key.clone(),
                    value: self.candidate.clone().into_bytes(),
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            let _ = self.store.revoke(lease).await;
            return Ok(None);
        }
        info!(key = %self.key, candidate = %self.candidate, epoch = r.revision, "became leader");
        Ok(Some(Leadership {
            epoch: r.revision,
            lease,
            lost: CancellationToken::new(),
        }))
    }

    /// Keeps the lease alive every TTL/3. Leadership is given up (`lost`
    /// cancelled) as soon as one keep-alive fails or does not answer within
    /// TTL/3 — well before the lease could expire unnoticed.
    pub fn keep_alive(&self, leadership: &Leadership) -> tokio::task::JoinHandle<()> {
        let (store, lease, lost, period) = (
            self.store.clone(),
            leadership.lease,
            leadership.lost.clone(),
            self.ttl / 3,
        );
        let key = self.key.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                match tokio::time::timeout(period, store.keep_alive(lease)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(%key, error = %e, "lease lost; stepping down");
                        lost.cancel();
                        return;
                    }
                    Err(_) => {
                        warn!(%key, "lease keep-alive unanswered; stepping down");
                        lost.cancel();
                        return;
                    }
                }
            }
        })
    }

    /// The compare that fences a leader's writes.
    pub fn guard(&self, leadership: &Leadership) -> Compare {
        Compare::CreateRevision(self.key.clone(), leadership.epoch)
    }

    /// Gives leadership up at once (fair-share rebalancing, shutdown).
    pub async fn resign(&self, leadership: &Leadership) -> Result<()> {
        leadership.lost.cancel();
        self.store
            .txn(Txn {
                compares: vec![self.guard(leadership)],
                success: vec![Op::Delete(self.key.clone())],
                failure: vec![],
            })
            .await?;
        let _ = self.store.revoke(leadership.lease).await;
        Ok(())
    }

    /// The current leader and its epoch.
    pub async fn leader(&self) -> Result<Option<(String, u64)>> {
        Ok(self.store.get(&self.key).await?.map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.create_revision,
            )
        }))
    }
}

/// The behaviour an election must have on any store backend; run against
/// redb in unit tests and against a real etcd end to end.
pub async fn scenario(store: Arc<dyn Store>, ttl: Duration) {
    let key = "/test/elections/shard-3".to_string();
    let a = Election::new(store.clone(), key.clone(), "coord-a".into(), ttl);
    let b = Election::new(store.clone(), key.clone(), "coord-b".into(), ttl);
    let lead_a = a
        .try_acquire()
        .await
        .unwrap()
        .expect("the first candidate wins");
    assert!(
        b.try_acquire().await.unwrap().is_none(),
        "one leader at a time"
    );
    assert_eq!(
        b.leader().await.unwrap(),
        Some(("coord-a".to_string(), lead_a.epoch))
    );
    let _keeper = a.keep_alive(&lead_a);

    // A guarded write by the leader succeeds.
    let write = |election: &Election, l: &Leadership, value: &str| Txn {
        compares: vec![election.guard(l)],
        success: vec![Op::put("/test/state", value)],
        failure: vec![],
    };
    assert!(
        store
            .txn(write(&a, &lead_a, "from a"))
            .await
            .unwrap()
            .succeeded
    );

    // Kept alive past several TTLs, it stays leader.
    tokio::time::sleep(ttl * 2).await;
    assert!(!lead_a.lost.is_cancelled());
    assert!(b.try_acquire().await.unwrap().is_none());

    // The leader freezes (its keep-alives stop) and the lease expires: the
    // standby takes over with a higher epoch, and the old leader's guarded
    // writes are refused.
    lead_a.lost.cancel();
    let deadline = tokio::time::Instant::now() + ttl * 4 + Duration::from_secs(5);
    let lead_b = loop {
        if let Some(l) = b.try_acquire().await.unwrap() {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby takes over after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(lead_b.epoch > lead_a.epoch, "epochs only grow");
    assert!(
        !store
            .txn(write(&a, &lead_a, "stale"))
            .await
            .unwrap()
            .succeeded,
        "a deposed leader cannot write"
    );
    assert!(
        store
            .txn(write(&b, &lead_b, "from b"))
            .await
            .unwrap()
            .succeeded
    );
    assert_eq!(
        store.get("/test/state").await.unwrap().unwrap().value,
        b"from b"
    );

    // Resigning hands over at once.
    b.resign(&lead_b).await.unwrap();
    let again = a
        .try_acquire()
        .await
        .unwrap()
        .expect("free after a resignation");
    assert!(again.epoch > lead_b.epoch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn elections_on_the_embedded_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        scenario(store, Duration::from_millis(600)).await;
    }
}
