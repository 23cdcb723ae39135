//! BackupStore: the embedded store streamed to a client while the
//! coordinator runs. One read transaction makes it consistent (one
//! revision); records go out in chunks well under the message limit. The
//! client writes them into a new store file (`store::embedded::write_file`).

use crate::error::ApiError;
use std::pin::Pin;

use drover_common::proto::{StoreBackupChunk, StoreRecord};
use tokio_stream::Stream;
use tonic::Status;

use crate::store::embedded::EmbeddedStore;

/// Bytes of keys and values per chunk (about).
const CHUNK_BYTES: usize = 1 << 20;

pub type BackupStream = Pin<Box<dyn Stream<Item = Result<StoreBackupChunk, Status>> + Send>>;

/// The whole store as a stream of chunks; `None`: not the embedded store.
pub async fn stream(store: Option<&EmbeddedStore>) -> Result<BackupStream, Status> {
    let store = store.cloned().ok_or_else(|| {
        Status::from(ApiError::Conflict(
            "this coordinator's store is etcd: back it up with `etcdctl snapshot save FILE`".into(),
        ))
    })?;
    let (kvs, revision) = tokio::task::spawn_blocking(move || store.snapshot())
        .await
        .map_err(|e| Status::from(ApiError::Internal(e.to_string())))?
        .map_err(|e| Status::from(ApiError::Internal(format!("reading the store: {e}"))))?;
    let mut chunks = Vec::new();
    let mut chunk = StoreBackupChunk {
        revision,
        records: Vec::new(),
    };
    let mut size = 0;
    // Keys bound to leases (members, elections) live only as long as
    // their coordinator: a backup has no use for them.
    for kv in kvs.into_iter().filter(|kv| kv.lease == 0) {
        size += kv.key.len() + kv.value.len();
        chunk.records.push(StoreRecord {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        });
        if size >= CHUNK_BYTES {
            chunks.push(Ok(std::mem::replace(
                &mut chunk,
                StoreBackupChunk {
                    revision,
                    records: Vec::new(),
                },
            )));
            size = 0;
        }
    }
    chunks.push(Ok(chunk));
    Ok(Box::pin(tokio_stream::iter(chunks)))
}
