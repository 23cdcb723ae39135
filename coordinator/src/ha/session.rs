//! A coordinator's session with the store, as etcd's `concurrency.Session`:
//! one lease, kept alive every TTL/3, that every key proving this
//! coordinator's liveness is bound to (its membership and the election key
//! of each shard it leads). When the process dies or freezes the lease
//! expires and all of them vanish in one revision.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::{LeaseId, Result, Store};

pub struct Session {
    store: Arc<dyn Store>,
    pub lease: LeaseId,
    /// Cancelled the moment the lease can no longer be proven; every
    /// leadership won in this session is a child of it.
    pub lost: CancellationToken,
}

impl Session {
    /// Grants the lease and keeps it alive every TTL/3. The session is lost
    /// as soon as one keep-alive fails or does not answer within TTL/3, so
    /// the coordinator steps down well before the lease could expire
    /// unnoticed (at worst 2/3 of the TTL after the last proof).
    ///
    /// `ignore_loss` is fault injection for tests: a failed or unanswered
    /// keep-alive is logged and ignored, as a leader with a broken clock or
    /// a bug would.
    pub async fn open(
        store: Arc<dyn Store>,
        ttl: Duration,
        ignore_loss: bool,
    ) -> Result<Arc<Session>> {
        let lease = store.grant_lease(ttl).await?;
        let session = Arc::new(Session {
            store: store.clone(),
            lease,
            lost: CancellationToken::new(),
        });
        let (lost, period) = (session.lost.clone(), ttl / 3);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                match tokio::time::timeout(period, store.keep_alive(lease)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if ignore_loss => {
                        warn!(lease, error = %e, "fault injection: ignoring the lost lease and acting on");
                    }
                    Ok(Err(e)) => {
                        warn!(lease, error = %e, "session lease lost; stepping down");
                        lost.cancel();
                    }
                    // A process woken from SIGSTOP finds the keep-alive it
                    // was waiting for timed out: the same loss, ignored too.
                    Err(_) if ignore_loss => {
                        warn!(
                            lease,
                            "fault injection: ignoring an unanswered keep-alive and acting on"
                        );
                    }
                    Err(_) => {
                        warn!(lease, "session keep-alive unanswered; stepping down");
                        lost.cancel();
                    }
                }
            }
        });
        Ok(session)
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Ends the session: the lease is revoked, so every key bound to it
    /// (membership, election keys) disappears at once and standbys take
    /// over without waiting for the TTL.
    pub async fn close(&self) {
        self.lost.cancel();
        let _ = self.store.revoke(self.lease).await;
    }
}
