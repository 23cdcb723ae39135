//! A hostile peer (issue 15), the way `raw.rs` is a hostile agent stream:
//! a `drover.v1.Chunks` server that misbehaves on purpose, announced to
//! the coordinator through a raw agent stream as a host holding the
//! artifact, so the tracker hands it to real pullers.
//!
//! ```ignore
//! let evil = FakePeer::start(&coord, "evil", Misbehaviour::Corrupt, &tar, &index, &digest).await;
//! // every pull of `digest` may now be told to ask "evil" for chunks
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use drover_common::artifact::Digest;
use drover_common::artifact::chunks::ChunkIndex;
use drover_common::proto::chunks_server::{Chunks, ChunksServer};
use drover_common::proto::{ChunkData, ChunkIndexRequest, FetchChunksRequest, agent_message};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Coordinator;
use crate::raw::RawStream;

/// How the peer misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Sends each chunk with one byte flipped.
    Corrupt,
    /// Sends each chunk cut short by one byte.
    Truncate,
    /// Accepts the call and never sends anything.
    Stall,
    /// Announces an address where nothing listens (a dead host).
    Dead,
    /// Serves an index whose chunks do not add up to the artifact (one
    /// dropped), and honest chunks.
    WrongIndex,
}

struct Server {
    how: Misbehaviour,
    index: drover_common::proto::ChunkIndex,
    chunks: HashMap<Digest, Vec<u8>>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl Chunks for Server {
    async fn get_chunk_index(
        &self,
        _: Request<ChunkIndexRequest>,
    ) -> Result<Response<drover_common::proto::ChunkIndex>, Status> {
        let mut index = self.index.clone();
        match self.how {
            Misbehaviour::Stall => std::future::pending::<()>().await,
            Misbehaviour::WrongIndex => {
                index.chunks.pop();
            }
            _ => {}
        }
        Ok(Response::new(index))
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut out = Vec::new();
        for c in &request.get_ref().chunks {
            let Some(d) = Digest::from_slice(c) else {
                continue;
            };
            let Some(data) = self.chunks.get(&d) else {
                continue;
            };
            let mut data = data.clone();
            match self.how {
                Misbehaviour::Corrupt => data[0] ^= 0xff,
                Misbehaviour::Truncate => {
                    data.pop();
                }
                Misbehaviour::Stall | Misbehaviour::Dead | Misbehaviour::WrongIndex => {}
            }
            out.push(Ok(ChunkData {
                sha256: c.clone(),
                data,
            }));
        }
        let stream: ChunkStream = match self.how {
            Misbehaviour::Stall => Box::pin(tokio_stream::pending()),
            _ => Box::pin(tokio_stream::iter(out)),
        };
        Ok(Response::new(stream))
    }
}

/// A running hostile peer; it is gone (stream and server) when dropped.
pub struct FakePeer {
    pub host_id: String,
    _stream: RawStream,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakePeer {
    /// Serves `tar` (an artifact's unpacked tar stream) as artifact
    /// `artifact`, misbehaving `how`, and tells `coord` that host `host_id`
    /// (labels `labels`) holds it.
    pub async fn start(
        coord: &Coordinator,
        host_id: &str,
        labels: &[(&str, &str)],
        how: Misbehaviour,
        tar: &[u8],
        artifact: &str,
    ) -> FakePeer {
        let index = ChunkIndex::of_reader(tar).unwrap();
        let digest: Digest = artifact.parse().unwrap();
        let mut chunks = HashMap::new();
        for (c, offset) in index.chunks.iter().zip(index.offsets()) {
            let at = offset as usize;
            chunks.insert(c.digest, tar[at..at + c.len as usize].to_vec());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server {
            how,
            index: index.to_proto(&digest),
            chunks,
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ChunksServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        let address = match how {
            // A port nothing listens on: bound, then released.
            Misbehaviour::Dead => {
                let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                format!("http://{}", gone.local_addr().unwrap())
            }
            _ => format!("http://{addr}"),
        };
        let mut hello = crate::raw::hello(host_id, labels);
        if let Some(agent_message::Msg::Hello(h)) = &mut hello.msg {
            h.agent_version = "fake-peer".into();
            // Never late within a test, without heartbeats.
            h.heartbeat_interval_ms = 3_600_000;
            h.peer_address = address;
            h.held_artifacts = vec![artifact.to_string()];
        }
        let stream = RawStream::open(&coord.addr_arg(), hello, 4 << 20)
            .await
            .expect("the fake peer's stream");
        let fake = FakePeer {
            host_id: host_id.to_string(),
            _stream: stream,
            server,
        };
        crate::wait_until_ok(
            "the fake peer to register",
            Duration::from_secs(10),
            || async { coord.host(host_id).await.is_ok() },
        )
        .await;
        fake
    }
}

/// The unpacked tar stream of a tar.gz file.
pub fn tar_of(artifact: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let file = std::fs::File::open(artifact).unwrap();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut out).unwrap();
    out
}
