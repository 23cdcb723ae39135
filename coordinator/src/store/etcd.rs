//! The etcd backend (HA: several coordinators share one etcd cluster).
//! A thin mapping of the Store trait onto etcd's KV, Txn, Watch and Lease
//! APIs: revisions, compares and leases are etcd's own.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp, WatchOptions,
};

use super::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult,
    WatchEvent, WatchStream,
};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// etcd answers an unknown or expired lease with "requested lease not found".
fn lease_error(lease: LeaseId, e: etcd_client::Error) -> StoreError {
    if e.to_string().contains("lease not found") {
        StoreError::NoLease(lease)
    } else {
        backend(e)
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision() as u64,
        mod_revision: k.mod_revision() as u64,
        lease: k.lease() as u64,
    }
}

fn op(o: &Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease as i64));
            TxnOp::put(key.as_str(), value.clone(), options)
        }
        Op::Delete(key) => TxnOp::delete(key.as_str(), None),
        Op::DeletePrefix(prefix) => {
            TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))
        }
    }
}

fn compare(c: &Compare) -> EtcdCompare {
    match c {
        Compare::Exists(k) => EtcdCompare::create_revision(k.as_str(), CompareOp::Greater, 0),
        Compare::Missing(k) => EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, 0),
        Compare::CreateRevision(k, r) => {
            EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, *r as i64)
        }
        Compare::ModRevision(k, r) => {
            EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *r as i64)
        }
        Compare::Value(k, v) => EtcdCompare::value(k.as_str(), CompareOp::Equal, v.clone()),
        Compare::Lease(k, l) => EtcdCompare::lease(k.as_str(), CompareOp::Equal, *l as i64),
    }
}

impl EtcdStore {
    /// Connects to the cluster (any of `endpoints`), checking it answers.
    /// Connects to `endpoints`; `https://` ones use mutual TLS with `tls`
    /// (the coordinator's own certificate is its etcd client certificate).
    pub async fn connect(
        endpoints: &[String],
        tls: Option<&drover_common::tls::TlsFiles>,
    ) -> Result<EtcdStore> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5));
        if endpoints.iter().any(|e| e.starts_with("https://")) {
            let files = tls.ok_or_else(|| {
                StoreError::Backend(
                    "https:// etcd endpoints need the coordinator's --tls-cert, --tls-key and --tls-ca"
                        .into(),
                )
            })?;
            let read = |p: &std::path::Path| {
                std::fs::read(p)
                    .map_err(|e| StoreError::Backend(format!("reading {}: {e}", p.display())))
            };
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&files.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&files.cert)?,
                        read(&files.key)?,
                    )),
            );
        }
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(backend)?;
        client.status().await.map_err(backend)?;
        Ok(EtcdStore { client })
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.clone().get(key, None).await.map_err(backend)?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let revision = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        Ok((resp.kvs().iter().map(kv).collect(), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|o| match o {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            });
        let request = EtcdTxn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        let resp = self
            .client
            .clone()
            .txn(request)
            .await
            .map_err(|e| match lease {
                Some(l) => lease_error(l, e),
                None => backend(e),
            })?;
        let revision = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision,
        })
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        let mut stream = self
            .client
            .clone()
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let events = super::stream_from_task(move |tx| async move {
            // The last revision delivered: a compaction says where to re-read.
            let mut last = 0;
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(backend(e))).await;
                        return;
                    }
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    let after = if resp.compact_revision() > 0 {
                        (resp.compact_revision() as u64).saturating_sub(1).max(last)
                    } else {
                        last
                    };
                    let _ = tx.send(Err(StoreError::Lagged { after })).await;
                    return;
                }
                for e in resp.events() {
                    let Some(k) = e.kv() else { continue };
                    let event = match e.event_type() {
                        EventType::Put => WatchEvent::Put(kv(k)),
                        EventType::Delete => WatchEvent::Delete {
                            key: String::from_utf8_lossy(k.key()).into_owned(),
                            revision: k.mod_revision() as u64,
                        },
                    };
                    last = event.revision();
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(events)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts leases in whole seconds.
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let resp = self
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(backend)?;
        Ok(resp.id() as u64)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let (mut keeper, mut responses) = self
            .client
            .clone()
            .lease_keep_alive(lease as i64)
            .await
            .map_err(|e| lease_error(lease, e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_error(lease, e))?;
        match responses
            .message()
            .await
            .map_err(|e| lease_error(lease, e))?
        {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::NoLease(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.client
            .clone()
            .lease_revoke(lease as i64)
            .await
            .map_err(|e| lease_error(lease, e))?;
        Ok(())
    }
}
