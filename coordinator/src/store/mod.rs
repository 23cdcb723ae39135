//! The coordinator's durable state, behind one trait with etcd's semantics:
//! a global revision, per-key create/mod revisions, compare-and-swap
//! transactions, prefix reads, watches and leases. Two backends:
//! [`embedded`] (redb, one coordinator, on disk) and [`etcd`] (HA).
//! Callers are written against [`Store`] only, so both behave the same —
//! one behaviour suite ([`suite`]) runs against each.

pub mod embedded;
pub mod etcd;
pub mod keys;
/// The behaviour suite, public so every backend's tests (and the end-to-end
/// tests against a real etcd) can run it.
pub mod suite;
pub mod tool;

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;

pub type Revision = u64;
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (etcd's
    /// create_revision); fencing compares it.
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// The lease the key is bound to (deleted when it ends), 0 for none.
    pub lease: LeaseId,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Missing(String),
    /// The key's create revision equals (0: the key is missing).
    CreateRevision(String, Revision),
    /// The key's mod revision equals (0: the key is missing).
    ModRevision(String, Revision),
    /// The key's value equals.
    Value(String, Vec<u8>),
    /// The key is bound to this lease (0: no lease, or missing).
    Lease(String, LeaseId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete(String),
    DeletePrefix(String),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
}

/// If every compare holds, apply `success`, else `failure`; atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

/// Changes in revision order. A watcher that fell behind gets one
/// [`StoreError::Lagged`] and the stream ends: it re-reads what it watches
/// and watches again. Never a silent gap.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A watch stream fed by a task: `produce` sends into the channel until
/// it is closed (the watcher dropped the stream).
pub(crate) fn stream_from_task<F, Fut>(produce: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<WatchEvent>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another coordinator")]
    Locked(String),
    #[error("lease {0} does not exist or has expired")]
    NoLease(LeaseId),
    #[error("store: {0}")]
    Backend(String),
    /// A watcher fell behind and changes after revision `after` were
    /// dropped (or compacted away): re-read, then watch again.
    #[error(
        "the watch fell behind after revision {after}; re-read from revision {} and watch again",
        after + 1
    )]
    Lagged { after: Revision },
    /// The embedded store's file is damaged: the coordinator must not start
    /// on it (and must not crash-loop): restore a backup.
    #[error(
        "the embedded store {path} is damaged ({why}); stop here and restore a backup: `drover-coordinator store restore --data-dir DIR --from BACKUP` (`drover-coordinator store check --data-dir DIR` tells a good file)"
    )]
    Corrupt { path: String, why: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key under `prefix`, sorted, and the revision they were read at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;
    /// Changes under `prefix` committed from now on.
    async fn watch(&self, prefix: &str) -> Result<WatchStream>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Extends the lease by its TTL; fails once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Ends the lease and deletes its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
}
