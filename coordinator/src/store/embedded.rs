//! The embedded backend: one redb file in the data dir, for a single
//! coordinator. redb holds an exclusive lock on the file, so two
//! coordinators can never share a data dir. Every transaction is one redb
//! write transaction (durable on commit) that bumps the global revision.
//! Watches are live (events after the call); leases live in memory and end
//! with the process, so keys bound to leases are deleted when the store
//! opens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::broadcast;

use super::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult,
    WatchEvent, WatchStream,
};

const VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("values");
/// key -> (create_revision, mod_revision, lease)
const META: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("meta");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const REVISION: &str = "revision";

/// File name of the store inside the data dir.
pub const FILE: &str = "store.redb";

/// What a full read of a store file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    pub keys: usize,
    pub revision: Revision,
}

/// Opens `path` (creating it when `create`) with redb's integrity check
/// (every page's checksum) and then reads every entry of every table; a
/// panic inside redb on a damaged page is caught. Either way a damaged
/// file is [`StoreError::Corrupt`].
fn open_checked(path: &Path, create: bool) -> Result<Database> {
    let corrupt = |why: String| StoreError::Corrupt {
        path: path.display().to_string(),
        why,
    };
    let opened = std::panic::catch_unwind(|| {
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(true);
        if create {
            builder.create(path)
        } else {
            builder.open(path)
        }
    });
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => {
            return Err(StoreError::Locked(path.display().to_string()));
        }
        Ok(Err(DatabaseError::Storage(redb::StorageError::Corrupted(why)))) => {
            return Err(corrupt(why));
        }
        // redb's header checks (the magic number, …) say InvalidData.
        Ok(Err(DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            return Err(corrupt(e.to_string()));
        }
        Ok(Err(other)) => return Err(backend(format!("opening {}: {other}", path.display()))),
        Err(_) => return Err(corrupt("redb panicked opening it".into())),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scan(&db))) {
        Ok(Ok(_)) => Ok(db),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(_) => Err(corrupt("redb panicked reading it".into())),
    }
}

/// Reads every entry of every table (a table not created yet is empty).
fn scan(db: &Database) -> Result<FileSummary> {
    let txn = db.begin_read().map_err(backend)?;
    let missing = |e: &redb::TableError| matches!(e, redb::TableError::TableDoesNotExist(_));
    let mut keys = 0;
    match txn.open_table(VALUES) {
        Ok(values) => {
            for entry in values.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let _ = (k.value().len(), v.value().len());
                keys += 1;
            }
        }
        Err(e) if missing(&e) => {}
        Err(e) => return Err(backend(e)),
    }
    match txn.open_table(META) {
        Ok(meta) => {
            for entry in meta.iter().map_err(backend)? {
                let (k, m) = entry.map_err(backend)?;
                let _ = (k.value().len(), m.value());
            }
        }
        Err(e) if missing(&e) => {}
        Err(e) => return Err(backend(e)),
    }
    let revision = match txn.open_table(STATE) {
        Ok(state) => state
            .get(REVISION)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0),
        Err(e) if missing(&e) => 0,
        Err(e) => return Err(backend(e)),
    };
    Ok(FileSummary { keys, revision })
}

/// Every key of `db`, read in one transaction, and its revision.
fn snapshot_of(db: &Database) -> Result<(Vec<KeyValue>, Revision)> {
    let txn = db.begin_read().map_err(backend)?;
    let values = txn.open_table(VALUES).map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    let state = txn.open_table(STATE).map_err(backend)?;
    let revision = state
        .get(REVISION)
        .map_err(backend)?
        .map(|v| v.value())
        .unwrap_or(0);
    let mut out = Vec::new();
    for entry in values.iter().map_err(backend)? {
        let (k, _) = entry.map_err(backend)?;
        if let Some(kv) = read_kv(&values, &meta, k.value())? {
            out.push(kv);
        }
    }
    Ok((out, revision))
}

/// Every key of a store file no coordinator has open (checked first).
pub fn read_file(path: &Path) -> Result<(Vec<KeyValue>, Revision)> {
    snapshot_of(&open_existing(path)?)
}

/// Opens (checked) a store file that must exist.
fn open_existing(path: &Path) -> Result<Database> {
    if !path.is_file() {
        return Err(backend(format!("{} does not exist", path.display())));
    }
    open_checked(path, false)
}

/// Checks a store file that no coordinator has open (`store check`).
pub fn check_file(path: &Path) -> Result<FileSummary> {
    scan(&open_existing(path)?)
}

/// Writes `kvs` at `revision` as a new store file at `path` (a backup; it
/// must not exist yet), then checks what was written.
pub fn write_file(path: &Path, kvs: &[KeyValue], revision: Revision) -> Result<FileSummary> {
    if path.exists() {
        return Err(backend(format!(
            "{} exists; not overwriting it",
            path.display()
        )));
    }
    {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut values = txn.open_table(VALUES).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            let mut state = txn.open_table(STATE).map_err(backend)?;
            for kv in kvs {
                values
                    .insert(kv.key.as_str(), kv.value.as_slice())
                    .map_err(backend)?;
                meta.insert(
                    kv.key.as_str(),
                    (kv.create_revision, kv.mod_revision, kv.lease),
                )
                .map_err(backend)?;
            }
            state.insert(REVISION, revision).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
    }
    check_file(path)
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

/// Changes buffered for watchers: one that falls further behind is told
/// (`StoreError::Lagged`) and re-reads.
const WATCH_BUFFER: usize = 4096;

struct Inner {
    db: Database,
    /// Held from a write's start until its events are published, so
    /// watchers receive them in revision order.
    writer: Mutex<()>,
    events: broadcast::Sender<WatchEvent>,
    leases: Mutex<HashMap<LeaseId, Lease>>,
    next_lease: AtomicU64,
}

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn read_kv(
    values: &impl ReadableTable<&'static str, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, (u64, u64, u64)>,
    key: &str,
) -> Result<Option<KeyValue>> {
    let Some(value) = values.get(key).map_err(backend)? else {
        return Ok(None);
    };
    let (create_revision, mod_revision, lease) = meta
        .get(key)
        .map_err(backend)?
        .map(|m| m.value())
        .unwrap_or((0, 0, 0));
    Ok(Some(KeyValue {
        key: key.to_string(),
        value: value.value().to_vec(),
        create_revision,
        mod_revision,
        lease,
    }))
}

impl EmbeddedStore {
    /// Opens (creating) the store in `data_dir`. Fails with
    /// [`StoreError::Locked`] when another coordinator has it open.
    ///
    /// Damage is an error, never a panic ([`StoreError::Corrupt`]): the
    /// file is checked page by page as it opens and then read in full
    /// (see [`check_file`]).
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore> {
        Self::open_buffered(data_dir, WATCH_BUFFER)
    }

    /// [`EmbeddedStore::open`] with a smaller watch buffer, so tests can
    /// make a watcher fall behind with a few hundred writes.
    #[cfg(test)]
    pub fn open_with_watch_buffer(data_dir: &Path, events: usize) -> Result<EmbeddedStore> {
        Self::open_buffered(data_dir, events)
    }

    fn open_buffered(data_dir: &Path, buffer: usize) -> Result<EmbeddedStore> {
        let path = data_dir.join(FILE);
        let db = open_checked(&path, true).map_err(|e| match e {
            StoreError::Locked(_) => StoreError::Locked(data_dir.display().to_string()),
            other => other,
        })?;
        let (events, _) = broadcast::channel(buffer);
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                writer: Mutex::new(()),
                events,
                leases: Mutex::new(HashMap::new()),
                next_lease: AtomicU64::new(1),
            }),
        };
        store.delete_leased_keys()?;
        tokio::spawn(expire_leases(Arc::downgrade(&store.inner)));
        Ok(store)
    }

    /// Every key, at one revision: what a backup holds.
    pub fn snapshot(&self) -> Result<(Vec<KeyValue>, Revision)> {
        snapshot_of(&self.inner.db)
    }

    /// Leases end with the process that held them: drop their keys.
    fn delete_leased_keys(&self) -> Result<()> {
        let txn = self.inner.db.begin_write().map_err(backend)?;
        let leased: Vec<String> = {
            let meta = txn.open_table(META).map_err(backend)?;
            meta.iter()
                .map_err(backend)?
                .filter_map(|e| e.ok())
                .filter(|(_, m)| m.value().2 != 0)
                .map(|(k, _)| k.value().to_string())
                .collect()
        };
        {
            txn.open_table(VALUES).map_err(backend)?;
            txn.open_table(STATE).map_err(backend)?;
        }
        if !leased.is_empty() {
            let revision = next_revision(&txn)?;
            for key in &leased {
                delete(&txn, key)?;
            }
            set_revision(&txn, revision)?;
        }
        txn.commit().map_err(backend)
    }

    fn apply(&self, txn_spec: Txn) -> Result<(TxnResult, Vec<WatchEvent>)> {
        let txn = self.inner.db.begin_write().map_err(backend)?;
        let holds = {
            let values = txn.open_table(VALUES).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let mut holds = true;
            for c in &txn_spec.compares {
                let ok = match c {
                    Compare::Exists(k) => values.get(k.as_str()).map_err(backend)?.is_some(),
                    Compare::Missing(k) => values.get(k.as_str()).map_err(backend)?.is_none(),
                    Compare::CreateRevision(k, rev) => {
                        meta.get(k.as_str())
                            .map_err(backend)?
                            .map(|m| m.value().0)
                            .unwrap_or(0)
                            == *rev
                    }
                    Compare::ModRevision(k, rev) => {
                        meta.get(k.as_str())
                            .map_err(backend)?
                            .map(|m| m.value().1)
                            .unwrap_or(0)
                            == *rev
                    }
                    Compare::Value(k, v) => values
                        .get(k.as_str())
                        .map_err(backend)?
                        .is_some_and(|x| x.value() == v.as_slice()),
                    Compare::Lease(k, lease) => {
                        meta.get(k.as_str())
                            .map_err(backend)?
                            .map(|m| m.value().2)
                            .unwrap_or(0)
                            == *lease
                    }
                };
                if !ok {
                    holds = false;
                    break;
                }
            }
            holds
        };
        let ops = if holds {
            &txn_spec.success
        } else {
            &txn_spec.failure
        };
        let current = current_revision(&txn)?;
        if ops.is_empty() {
            txn.abort().map_err(backend)?;
            return Ok((
                TxnResult {
                    succeeded: holds,
                    revision: current,
                },
                Vec::new(),
            ));
        }
        let revision = current + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if *lease != 0
                        && !self
                            .inner
                            .leases
                            .lock()
                            .expect("leases lock")
                            .contains_key(lease)
                    {
                        txn.abort().map_err(backend)?;
                        return Err(StoreError::NoLease(*lease));
                    }
                    let mut values = txn.open_table(VALUES).map_err(backend)?;
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    let create = meta
                        .get(key.as_str())
                        .map_err(backend)?
                        .map(|m| m.value().0)
                        .unwrap_or(revision);
                    values
                        .insert(key.as_str(), value.as_slice())
                        .map_err(backend)?;
                    meta.insert(key.as_str(), (create, revision, *lease))
                        .map_err(backend)?;
                    events.push(WatchEvent::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create,
                        mod_revision: revision,
                        lease: *lease,
                    }));
                }
                Op::Delete(key) => {
                    if delete(&txn, key)? {
                        events.push(WatchEvent::Delete {
                            key: key.clone(),
                            revision,
                        });
                    }
                }
                Op::DeletePrefix(prefix) => {
                    let keys: Vec<String> = {
                        let values = txn.open_table(VALUES).map_err(backend)?;
                        values
                            .range(prefix.as_str()..)
                            .map_err(backend)?
                            .filter_map(|e| e.ok())
                            .map(|(k, _)| k.value().to_string())
                            .take_while(|k| k.starts_with(prefix.as_str()))
                            .collect()
                    };
                    for key in keys {
                        delete(&txn, &key)?;
                        events.push(WatchEvent::Delete { key, revision });
                    }
                }
            }
        }
        set_revision(&txn, revision)?;
        txn.commit().map_err(backend)?;
        Ok((
            TxnResult {
                succeeded: holds,
                revision,
            },
            events,
        ))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(backend)?
    }

    fn publish(&self, events: Vec<WatchEvent>) {
        for e in events {
            let _ = self.inner.events.send(e);
        }
    }
}

fn current_revision(txn: &WriteTransaction) -> Result<Revision> {
    let state = txn.open_table(STATE).map_err(backend)?;
    Ok(state
        .get(REVISION)
        .map_err(backend)?
        .map(|v| v.value())
        .unwrap_or(0))
}

fn next_revision(txn: &WriteTransaction) -> Result<Revision> {
    Ok(current_revision(txn)? + 1)
}

fn set_revision(txn: &WriteTransaction, revision: Revision) -> Result<()> {
    let mut state = txn.open_table(STATE).map_err(backend)?;
    state.insert(REVISION, revision).map_err(backend)?;
    Ok(())
}

/// Deletes one key; true when it existed.
fn delete(txn: &WriteTransaction, key: &str) -> Result<bool> {
    let mut values = txn.open_table(VALUES).map_err(backend)?;
    let mut meta = txn.open_table(META).map_err(backend)?;
    let existed = values.remove(key).map_err(backend)?.is_some();
    meta.remove(key).map_err(backend)?;
    Ok(existed)
}

async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = inner.upgrade() else { return };
        let store = EmbeddedStore { inner };
        let expired: Vec<LeaseId> = {
            let leases = store.inner.leases.lock().expect("leases lock");
            let now = Instant::now();
            leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in expired {
            tracing::debug!(lease = id, "lease expired");
            let _ = store.revoke(id).await;
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |s| {
            let txn = s.inner.db.begin_read().map_err(backend)?;
            let values = match txn.open_table(VALUES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(backend(e)),
            };
            let meta = txn.open_table(META).map_err(backend)?;
            read_kv(&values, &meta, &key)
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.blocking(move |s| {
            let txn = s.inner.db.begin_read().map_err(backend)?;
            let revision = match txn.open_table(STATE) {
                Ok(t) => t
                    .get(REVISION)
                    .map_err(backend)?
                    .map(|v| v.value())
                    .unwrap_or(0),
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
                Err(e) => return Err(backend(e)),
            };
            let values = txn.open_table(VALUES).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let mut out = Vec::new();
            for entry in values.range(prefix.as_str()..).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (create_revision, mod_revision, lease) = meta
                    .get(key)
                    .map_err(backend)?
                    .map(|m| m.value())
                    .unwrap_or((0, 0, 0));
                out.push(KeyValue {
                    key: key.to_string(),
                    value: v.value().to_vec(),
                    create_revision,
                    mod_revision,
                    lease,
                });
            }
            Ok((out, revision))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.blocking(move |s| {
            let _writer = s.inner.writer.lock().expect("writer lock");
            let (result, events) = s.apply(txn)?;
            s.publish(events);
            Ok(result)
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        let prefix = prefix.to_string();
        // The revision the watch starts after: what a watcher that lags
        // before its first event re-reads from.
        let (_, start) = self.range("\u{10ffff}").await?;
        let mut rx = self.inner.events.subscribe();
        Ok(super::stream_from_task(move |tx| async move {
            let (mut last, mut received) = (start, false);
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        last = last.max(event.revision());
                        received = true;
                        if event.key().starts_with(&prefix) && tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(dropped)) => {
                        // The last revision may have been cut short: re-read it.
                        let after = if received { last - 1 } else { start };
                        tracing::warn!(prefix, after, dropped, "a watcher fell behind");
                        let _ = tx.send(Err(StoreError::Lagged { after })).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let id = self.inner.next_lease.fetch_add(1, Ordering::Relaxed);
        self.inner.leases.lock().expect("leases lock").insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut leases = self.inner.leases.lock().expect("leases lock");
        match leases.get_mut(&lease) {
            Some(l) if l.deadline > Instant::now() => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::NoLease(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        if self
            .inner
            .leases
            .lock()
            .expect("leases lock")
            .remove(&lease)
            .is_none()
        {
            return Err(StoreError::NoLease(lease));
        }
        self.blocking(move |s| {
            let _writer = s.inner.writer.lock().expect("writer lock");
            let txn = s.inner.db.begin_write().map_err(backend)?;
            let keys: Vec<String> = {
                let meta = txn.open_table(META).map_err(backend)?;
                meta.iter()
                    .map_err(backend)?
                    .filter_map(|e| e.ok())
                    .filter(|(_, m)| m.value().2 == lease)
                    .map(|(k, _)| k.value().to_string())
                    .collect()
            };
            if keys.is_empty() {
                txn.abort().map_err(backend)?;
                return Ok(());
            }
            let revision = next_revision(&txn)?;
            let mut events = Vec::new();
            for key in keys {
                delete(&txn, &key)?;
                events.push(WatchEvent::Delete { key, revision });
            }
            set_revision(&txn, revision)?;
            txn.commit().map_err(backend)?;
            s.publish(events);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_behaviour_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        super::super::suite::run(&store).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_watcher_that_falls_behind_is_told_where_to_re_read_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(
            super::super::suite::watches_keep_revision_order_and_never_skip(&store).await,
            "5,000 unread changes overflow the buffer: the watcher must be told"
        );
    }

    #[tokio::test]
    async fn data_and_revision_survive_a_reopen_and_leased_keys_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
            store
                .txn(Txn {
                    success: vec![Op::put("/a", "1")],
                    ..Default::default()
                })
                .await
                .unwrap();
            let r = store
                .txn(Txn {
                    success: vec![Op::Put {
                        key: "/leased".into(),
                        value: b"x".to_vec(),
                        lease,
                    }],
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(r.revision, 2);
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let a = store.get("/a").await.unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.create_revision), (&b"1"[..], 1));
        assert!(store.get("/leased").await.unwrap().is_none());
        let (_, revision) = store.range("/").await.unwrap();
        assert_eq!(revision, 3, "the lease cleanup is a revision too");
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
        assert!(err.to_string().contains("in use by another coordinator"));
    }
}
