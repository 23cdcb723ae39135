//! `drover.v1.Chunks` on the coordinator: the origin agents fall back to
//! when no peer has a chunk ("back-to-source", issue 15). Chunks are cut
//! out of the stored tar.gz in one decompression pass (`origin::chunks_of`)
//! and hashed again before they leave.

use std::collections::HashMap;
use std::pin::Pin;

use drover_common::artifact::Digest;
use drover_common::proto::chunks_server::Chunks;
use drover_common::proto::{ChunkData, ChunkIndex, ChunkIndexRequest, FetchChunksRequest};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::artifacts::ArtifactsService;
use crate::auth::{Permission, Scope};
use crate::error::ApiError;

/// Chunks one FetchChunks call may ask for (as the agents' peer service).
const MAX_CHUNKS_PER_CALL: usize = 4096;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

impl ArtifactsService {
    /// The stored artifact's index (made now if this coordinator has none).
    async fn chunk_index<T>(
        &self,
        hex: &str,
        request: &Request<T>,
    ) -> Result<(Digest, drover_common::artifact::chunks::ChunkIndex), Status> {
        self.origin_reachable()?;
        let digest: Digest = hex
            .parse()
            .map_err(|e| ApiError::Invalid(format!("sha256: {e}")))?;
        self.read_through(&digest, request).await?;
        if !tokio::fs::try_exists(self.store.blob_path(&digest))
            .await
            .unwrap_or(false)
        {
            return Err(ApiError::NotFound(format!("no artifact {digest} on this origin")).into());
        }
        let store = self.store.clone();
        let index = tokio::task::spawn_blocking(move || store.index(&digest))
            .await
            .map_err(|e| Status::from(ApiError::Internal(e.to_string())))?
            .map_err(|e| {
                warn!(%digest, error = %e, "chunk index unavailable");
                Status::from(ApiError::Internal(format!(
                    "the chunk index of {digest} could not be made: {e}"
                )))
            })?;
        Ok((digest, index))
    }
}

#[tonic::async_trait]
impl Chunks for ArtifactsService {
    async fn get_chunk_index(
        &self,
        request: Request<ChunkIndexRequest>,
    ) -> Result<Response<ChunkIndex>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        let (digest, index) = self
            .chunk_index(&request.get_ref().sha256, &request)
            .await?;
        Ok(Response::new(index.to_proto(&digest)))
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        if request.get_ref().chunks.len() > MAX_CHUNKS_PER_CALL {
            return Err(ApiError::Invalid(format!(
                "at most {MAX_CHUNKS_PER_CALL} chunks per call, got {}",
                request.get_ref().chunks.len()
            ))
            .into());
        }
        let (digest, index) = self
            .chunk_index(&request.get_ref().sha256, &request)
            .await?;
        let mut asked = Vec::new();
        for (i, c) in request.get_ref().chunks.iter().enumerate() {
            asked.push(
                Digest::from_slice(c).ok_or_else(|| {
                    ApiError::Invalid(format!("chunk {i} is not a 32-byte sha256"))
                })?,
            );
        }
        // Where each asked chunk first lies; unknown ones are left out.
        let mut first: HashMap<Digest, (u64, u32)> = HashMap::new();
        for (c, offset) in index.chunks.iter().zip(index.offsets()) {
            first.entry(c.digest).or_insert((offset, c.len));
        }
        let mut wanted: Vec<(u64, u32, Digest)> = asked
            .iter()
            .filter_map(|d| first.get(d).map(|&(o, l)| (o, l, *d)))
            .collect();
        wanted.sort();
        wanted.dedup();
        let blob = self.store.blob_path(&digest);
        self.metrics.artifact_fetches.inc();
        let metrics = self.metrics.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let sent = send_chunks(&tx, &metrics, &blob, &wanted);
            if let Err(e) = sent {
                warn!(%digest, error = %e, "serving chunks failed");
                let _ = tx.blocking_send(Err(Status::from(ApiError::Internal(format!(
                    "reading artifact {digest}: {e}"
                )))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The blocking side of FetchChunks: the pass over the blob, each chunk
/// sent as it is reached (false from a send: the client went away).
fn send_chunks(
    tx: &mpsc::Sender<Result<ChunkData, Status>>,
    metrics: &crate::metrics::Metrics,
    blob: &std::path::Path,
    wanted: &[(u64, u32, Digest)],
) -> std::io::Result<()> {
    crate::origin::chunks_of(blob, wanted, |digest, data| {
        metrics.artifact_fetched_bytes.inc_by(data.len() as u64);
        tx.blocking_send(Ok(ChunkData {
            sha256: digest.as_bytes().to_vec(),
            data,
        }))
        .is_ok()
    })
}
