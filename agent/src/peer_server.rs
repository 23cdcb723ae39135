//! The agent's side of peer-to-peer distribution (issue 15): a small
//! `drover.v1.Chunks` service on `--peer-listen` serving the chunks of the
//! artifacts this host holds (`chunk_cache`) to other agents.
//!
//! Rules:
//! 1. Same identities as everything else: with TLS configured, the
//!    listener is mutual TLS with the agent's own certificate, and only
//!    certificates of the fleet's CA are accepted (`tls::server`).
//! 2. Only verified bytes leave: every chunk is hashed again as it is read
//!    (`chunk_cache` rule 2); a chunk that no longer matches is left out,
//!    as is one not held. The puller verifies again (it trusts no peer).
//! 3. Serving never hurts the service on the host: at most
//!    `--peer-max-connections` transfers at once (more are told
//!    RESOURCE_EXHAUSTED at once, so the puller moves on), and all of them
//!    together stay under `--peer-upload-bytes-per-sec` (a token bucket,
//!    async-speed-limit).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use async_speed_limit::Limiter;
use drover_common::artifact::Digest;
use drover_common::proto::chunks_server::{Chunks, ChunksServer};
use drover_common::proto::{ChunkData, ChunkIndex, ChunkIndexRequest, FetchChunksRequest};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::chunk_cache::ChunkCache;

/// `--peer-*` settings.
#[derive(Debug, Clone)]
pub struct PeerServing {
    pub listen: SocketAddr,
    /// What peers dial (default: the bound address).
    pub advertise: Option<String>,
    pub max_connections: usize,
    /// 0: unlimited.
    pub upload_bytes_per_sec: u64,
}

/// The Chunks service over this host's chunk cache.
pub struct PeerService {
    chunks: Arc<ChunkCache>,
    /// Rule 3: transfers under way.
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Rule 3: shared by every transfer.
    upload: Limiter,
}

impl PeerService {
    pub fn new(chunks: Arc<ChunkCache>, serving: &PeerServing) -> PeerService {
        let rate = match serving.upload_bytes_per_sec {
            0 => f64::INFINITY,
            n => n as f64,
        };
        PeerService {
            chunks,
            slots: Arc::new(Semaphore::new(serving.max_connections)),
            max_connections: serving.max_connections,
            upload: Limiter::new(rate),
        }
    }
}

fn artifact(hex: &str) -> Result<Digest, Status> {
    hex.parse()
        .map_err(|e| Status::invalid_argument(format!("sha256: {e}")))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl Chunks for PeerService {
    async fn get_chunk_index(
        &self,
        request: Request<ChunkIndexRequest>,
    ) -> Result<Response<ChunkIndex>, Status> {
        let digest = artifact(&request.get_ref().sha256)?;
        match self.chunks.index(&digest) {
            Some(index) => Ok(Response::new(index.to_proto(&digest))),
            None => Err(Status::not_found(format!(
                "this host does not hold artifact {digest}"
            ))),
        }
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        if req.chunks.len() > crate::pull::MAX_CHUNKS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {} chunks per call, got {}",
                crate::pull::MAX_CHUNKS_PER_CALL,
                req.chunks.len()
            )));
        }
        let mut wanted = Vec::with_capacity(req.chunks.len());
        for (i, c) in req.chunks.iter().enumerate() {
            wanted.push(Digest::from_slice(c).ok_or_else(|| {
                Status::invalid_argument(format!("chunk {i} is not a 32-byte sha256"))
            })?);
        }
        // Rule 3: a slot for the whole transfer, or go elsewhere now.
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "serving {} peers already; ask another",
                self.max_connections
            ))
        })?;
        let (tx, rx) = mpsc::channel(2);
        let (chunks, upload) = (self.chunks.clone(), self.upload.clone());
        tokio::spawn(async move {
            let _permit = permit;
            for digest in wanted {
                // Rule 2.
                let cache = chunks.clone();
                let read = tokio::task::spawn_blocking(move || cache.read_verified(&digest))
                    .await
                    .ok()
                    .flatten();
                let Some(data) = read else { continue };
                upload.consume(data.len()).await;
                let message = ChunkData {
                    sha256: digest.as_bytes().to_vec(),
                    data,
                };
                if tx.send(Ok(message)).await.is_err() {
                    return; // the puller went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Binds `serving.listen` and serves peers until `shutdown`; returns the
/// address to advertise.
pub async fn spawn(
    serving: &PeerServing,
    chunks: Arc<ChunkCache>,
    tls: Option<drover_common::tls::TlsFiles>,
    shutdown: CancellationToken,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(serving.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--peer-listen {}: {e}", serving.listen))?;
    let bound = listener.local_addr()?;
    // Rule 1.
    let server_tls = match &tls {
        Some(files) => Some(drover_common::tls::ServerTls::server(files.clone())?),
        None => None,
    };
    let scheme = if server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let advertise = serving
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{bound}"));
    let observe: drover_common::tls::server::HandshakeObserver = Arc::new(|_| {});
    let incoming =
        drover_common::tls::server::incoming(listener, server_tls, observe, shutdown.clone());
    let service =
        ChunksServer::new(PeerService::new(chunks, serving)).max_decoding_message_size(1 << 20);
    info!(listen = %bound, %advertise, max_connections = serving.max_connections, upload_bytes_per_sec = serving.upload_bytes_per_sec, "serving chunks to peers");
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "the peer chunk service stopped");
        }
    });
    Ok(advertise)
}
