//! One election, as etcd's `concurrency` package does it: a key bound to the
//! candidate's lease, created only if absent. The winner's epoch is the
//! key's create revision; every write it makes as leader is guarded by
//! "my key still has that create revision", so a deposed leader (lease
//! expired, key gone or recreated by someone else) can write nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::session::Session;
use crate::store::{Compare, Op, Result, Store, Txn};

pub struct Election {
    store: Arc<dyn Store>,
    key: String,
    candidate: String,
}

/// Proof of leadership while `lost` is not cancelled.
#[derive(Clone)]
pub struct Leadership {
    pub epoch: u64,
    /// Cancelled the moment leadership can no longer be proven: the
    /// session's lease is lost, or the shard was resigned.
    pub lost: CancellationToken,
}

impl Election {
    pub fn new(store: Arc<dyn Store>, key: String, candidate: String) -> Election {
        Election {
            store,
            key,
            candidate,
        }
    }

    /// Tries once to become leader, binding the key to `session`'s lease.
    /// `None`: someone else leads.
    pub async fn try_acquire(&self, session: &Session) -> Result<Option<Leadership>> {
        if session.is_lost() {
            return Ok(None);
        }
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(self.key.clone())],
                success: vec![Op::Put {
                    key: self.key.clone(),
                    value: self.candidate.clone().into_bytes(),
                    lease: session.lease,
                }],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Ok(None);
        }
        info!(key = %self.key, candidate = %self.candidate, epoch = r.revision, "became leader");
        Ok(Some(Leadership {
            epoch: r.revision,
            lost: session.lost.child_token(),
        }))
    }

    /// The compare that fences a leader's writes.
    pub fn guard(&self, leadership: &Leadership) -> Compare {
        Compare::CreateRevision(self.key.clone(), leadership.epoch)
    }

    /// Gives leadership up at once (fair-share rebalancing): the key is
    /// deleted, so a standby can win the shard on its next campaign.
    pub async fn resign(&self, leadership: &Leadership) -> Result<()> {
        leadership.lost.cancel();
        self.store
            .txn(Txn {
                compares: vec![self.guard(leadership)],
                success: vec![Op::Delete(self.key.clone())],
                failure: vec![],
            })
            .await?;
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
    let a = Election::new(store.clone(), key.clone(), "coord-a".into());
    let b = Election::new(store.clone(), key.clone(), "coord-b".into());
    let session_a = Session::open(store.clone(), ttl, false).await.unwrap();
    let session_b = Session::open(store.clone(), ttl, false).await.unwrap();
    let lead_a = a
        .try_acquire(&session_a)
        .await
        .unwrap()
        .expect("the first candidate wins");
    assert!(
        b.try_acquire(&session_b).await.unwrap().is_none(),
        "one leader at a time"
    );
    assert_eq!(
        b.leader().await.unwrap(),
        Some(("coord-a".to_string(), lead_a.epoch))
    );

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
    assert!(b.try_acquire(&session_b).await.unwrap().is_none());

    // The leader freezes (its keep-alives stop) and the lease expires: the
    // standby takes over with a higher epoch, and the old leader's guarded
    // writes are refused.
    session_a.lost.cancel();
    assert!(
        lead_a.lost.is_cancelled(),
        "leadership ends with its session"
    );
    let deadline = tokio::time::Instant::now() + ttl * 4 + Duration::from_secs(5);
    let lead_b = loop {
        if let Some(l) = b.try_acquire(&session_b).await.unwrap() {
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

    // Resigning hands over at once, and the session lives on.
    b.resign(&lead_b).await.unwrap();
    assert!(!session_b.is_lost());
    let session_a = Session::open(store.clone(), ttl, false).await.unwrap();
    let again = a
        .try_acquire(&session_a)
        .await
        .unwrap()
        .expect("free after a resignation");
    assert!(again.epoch > lead_b.epoch);

    // Closing a session frees everything bound to it at once.
    session_a.close().await;
    assert!(again.lost.is_cancelled());
    assert_eq!(a.leader().await.unwrap(), None);
    session_b.close().await;
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
