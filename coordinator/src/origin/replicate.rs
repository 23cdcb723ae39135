//! Blobs this coordinator lacks, copied from its peers. With several
//! coordinators an artifact is uploaded to one of them; every other one
//! copies it as soon as its metadata appears in the store (a watch, plus a
//! sweep at start and every minute for what was missed while down), and a
//! Fetch of a blob not copied yet copies it first (read-through). Copies
//! are verified against the sha256 like uploads. So an artifact survives
//! the loss of the coordinator it was uploaded to, and agents can pull from
//! whichever coordinator they reach.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use drover_common::artifact::Digest;
use drover_common::proto::FetchRequest;
use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::tls::client::Dialer;
use tracing::{info, warn};

use super::BlobStore;

/// One copy at a time per blob, however many agents ask at once.
#[derive(Default)]
pub struct Replicator {
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// How peers are dialled (with this coordinator's certificate under TLS).
    dialer: Dialer,
}

impl Replicator {
    pub fn new(dialer: Dialer) -> Replicator {
        Replicator {
            in_flight: Mutex::default(),
            dialer,
        }
    }
}

impl Replicator {
    /// Makes sure `digest` is on local disk, fetching it from the first of
    /// `peers` that has it. Err when none could provide verified bytes.
    pub async fn ensure(
        &self,
        blobs: &BlobStore,
        digest: &Digest,
        peers: &[String],
    ) -> io::Result<()> {
        let lock = self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .entry(digest.hex())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let result = self.copy(blobs, digest, peers).await;
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&digest.hex());
        result
    }

    async fn copy(&self, blobs: &BlobStore, digest: &Digest, peers: &[String]) -> io::Result<()> {
        if tokio::fs::try_exists(blobs.blob_path(digest)).await? {
            return Ok(()); // another request copied it meanwhile
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no peer coordinator is known");
        for peer in peers {
            match self.copy_from(blobs, digest, peer).await {
                Ok(size) => {
                    info!(%digest, %peer, size, "artifact copied from a peer coordinator");
                    return Ok(());
                }
                Err(e) => {
                    warn!(%digest, %peer, error = %e, "could not copy the artifact from this peer");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn copy_from(&self, blobs: &BlobStore, digest: &Digest, peer: &str) -> io::Result<u64> {
        let channel = self
            .dialer
            .connect(peer)
            .await
            .map_err(|e| io::Error::other(format!("connecting: {e}")))?;
        let mut stream = ArtifactsClient::new(channel)
            // Peers do not read-through from each other: a blob nobody has
            // ends here instead of bouncing around.
            .fetch(peer_request(digest))
            .await
            .map_err(|s| io::Error::other(s.message().to_string()))?
            .into_inner();
        let mut pending = blobs.begin().await?;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| io::Error::other(s.message().to_string()))?
        {
            pending.write(&chunk.data).await?;
        }
        let (actual, size) = pending.digest();
        if actual != *digest {
            return Err(io::Error::other(format!(
                "the peer's bytes hash to {actual}, not {digest}; discarded"
            )));
        }
        blobs.commit_replica(pending, digest).await?;
        Ok(size)
    }
}

impl Replicator {
    /// Makes sure one of `peers` holds a verified copy of `digest` (`size`
    /// bytes) too, so an acknowledged upload survives the loss of this
    /// coordinator: a Fetch from the blob's end asks a peer to copy it
    /// (read-through) without sending the bytes back.
    pub async fn place_on_peer(
        &self,
        digest: &Digest,
        size: u64,
        peers: &[String],
    ) -> io::Result<String> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no peer coordinator is live");
        for peer in peers {
            let attempt = async {
                let channel = self
                    .dialer
                    .connect(peer)
                    .await
                    .map_err(|e| io::Error::other(format!("connecting: {e}")))?;
                let mut stream = ArtifactsClient::new(channel)
                    .fetch(FetchRequest {
                        sha256: digest.hex(),
                        offset: size,
                    })
                    .await
                    .map_err(|s| io::Error::other(s.message().to_string()))?
                    .into_inner();
                while stream
                    .message()
                    .await
                    .map_err(|s| io::Error::other(s.message().to_string()))?
                    .is_some()
                {}
                Ok::<(), io::Error>(())
            };
            match attempt.await {
                Ok(()) => return Ok(peer.clone()),
                Err(e) => {
                    warn!(%digest, %peer, error = %e, "this peer could not take a copy");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// How often the full sweep runs besides the watch.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Replicator {
    /// Keeps every blob whose metadata is in the store on local disk, until
    /// `stop`. `peers` lists the other coordinators' addresses.
    pub async fn sync(
        self: Arc<Self>,
        blobs: Arc<BlobStore>,
        peers: impl Fn() -> Vec<String> + Send + Sync + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut changes = None;
        loop {
            if changes.is_none() {
                changes = blobs.watch_metadata().await.ok();
            }
            self.sweep(&blobs, &peers()).await;
            let next = async {
                match changes.as_mut() {
                    Some(c) => tokio_stream::StreamExt::next(c).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                change = next => {
                    if change.is_none() {
                        changes = None;
                    }
                }
            }
        }
    }

    /// Copies every blob that has metadata but is not on local disk.
    async fn sweep(&self, blobs: &BlobStore, peers: &[String]) {
        if peers.is_empty() {
            return;
        }
        let Ok(all) = blobs.list().await else {
            return;
        };
        for info in all {
            let Ok(digest) = info.sha256.parse::<Digest>() else {
                continue;
            };
            if !tokio::fs::try_exists(blobs.blob_path(&digest))
                .await
                .unwrap_or(true)
            {
                let _ = self.ensure(blobs, &digest, peers).await;
            }
        }
    }
}

/// Metadata marking a Fetch from a peer coordinator.
pub const PEER_FETCH: &str = "x-drover-peer-fetch";

fn peer_request(digest: &Digest) -> tonic::Request<FetchRequest> {
    let mut r = tonic::Request::new(FetchRequest {
        sha256: digest.hex(),
        offset: 0,
    });
    r.metadata_mut()
        .insert(PEER_FETCH, tonic::metadata::MetadataValue::from_static("1"));
    r
}
