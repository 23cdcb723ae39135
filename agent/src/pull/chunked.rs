//! Pulling an artifact by chunks (issue 15): the unpacked tar stream is
//! rebuilt from chunks this host already holds, its peers' and, for what
//! nobody else has, the origin's.
//!
//! Rules:
//! 1. The index comes from whoever has it (peers first, then the origin)
//!    and is used only if it hashes to the `index_sha256` the Pull named;
//!    its chunks must add up to the Pull's `unpacked_bytes` (when given)
//!    and fit the artifact size limit.
//! 2. Chunks this host already holds (earlier releases) are copied first,
//!    each hashed again (`chunk_cache` rule 2).
//! 3. Missing chunks are split among the peers and asked of them in
//!    parallel. Every chunk received is hashed before it is written; a
//!    chunk that does not match, or was never asked for, drops that peer
//!    for the rest of the pull and reports it (`PullStats.bad_peers`), as
//!    does a peer that says nothing for [`PEER_STALL`] or cannot be
//!    reached. A peer that lacks a chunk is not at fault, nor is one that
//!    is busy (RESOURCE_EXHAUSTED: serving its limit of peers). Rounds go
//!    on while they make progress, each giving what is still missing to
//!    the peers left, rotated (so free peers take over busy ones' shares);
//!    a round in which only busy peers held things up waits (growing, up
//!    to 2 s) and tries again, for up to [`BUSY_PATIENCE`] in all; a round
//!    in which nobody had anything ends the asking.
//! 4. What no peer delivered comes from the origin (back-to-source): the
//!    coordinators in `sources`, in turn.
//! 5. Only when every chunk is in place is the index written and the tar
//!    renamed into the cache (`chunk_cache` rule 1); nothing is unpacked
//!    before that.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_common::artifact::Digest;
use drover_common::artifact::chunks::ChunkIndex;
use drover_common::proto::chunks_client::ChunksClient;
use drover_common::proto::{BadPeer, ChunkIndexRequest, FetchChunksRequest, PeerSource, PullStats};
use drover_common::tls::client::Dialer;
use tracing::{info, warn};

use super::{PullError, PullLimits, disk_error};
use crate::chunk_cache::{ChunkCache, write_index};
use crate::releases::Layout;

/// A peer silent this long while chunks are owed is dropped (rule 3).
pub const PEER_STALL: Duration = Duration::from_secs(5);
/// The origin reads its archive from the start to reach a chunk: more
/// patience.
const ORIGIN_STALL: Duration = Duration::from_secs(60);
/// Connecting to a peer or the origin.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Chunks asked for in one FetchChunks call.
pub const MAX_CHUNKS_PER_CALL: usize = 4096;
/// The first wait after a round held up by busy peers (doubles, to 2 s).
const BUSY_WAIT: Duration = Duration::from_millis(250);
/// How long a puller waits for busy peers in all before the origin.
pub const BUSY_PATIENCE: Duration = Duration::from_secs(120);

/// One chunked pull's inputs.
pub struct ChunkedPull<'a> {
    pub layout: &'a Layout,
    pub cache: &'a ChunkCache,
    /// The origin's dialer (coordinators only, under TLS).
    pub dialer: &'a Dialer,
    /// Peers' dialer (agents of the fleet's CA, under TLS).
    pub peer_dialer: &'a Dialer,
    pub artifact: Digest,
    pub index: Digest,
    pub unpacked_bytes: u64,
    /// The tar.gz's size (the Pull's `size_bytes`; 0: unknown).
    pub size_bytes: u64,
    /// The origin: coordinators serving Chunks.
    pub sources: &'a [String],
    pub peers: &'a [PeerSource],
    pub limits: &'a PullLimits,
}

/// Where the chunks still missing go, shared by the tasks fetching them.
struct Sink {
    file: std::fs::File,
    /// Each missing chunk: its length and every offset it fills.
    missing: Mutex<HashMap<Digest, (u32, Vec<u64>)>>,
}

/// Why a source stopped giving chunks.
enum Stop {
    /// It sent what it had (maybe nothing).
    Ended,
    /// It is serving its limit of peers: ask again later (rule 3).
    Busy,
    /// Rule 3: it misbehaved or was unreachable; the reason.
    Fault(String),
    /// Our own disk failed: the whole pull stops.
    Disk(PullError),
}

impl Sink {
    fn missing(&self) -> Vec<Digest> {
        let mut m: Vec<Digest> = self.missing.lock().expect("sink").keys().copied().collect();
        m.sort();
        m
    }

    /// Rule 2 for a resumed part file (blocking): every missing chunk whose
    /// bytes are already in place is no longer missing. Returns their bytes.
    fn keep_written(&self) -> u64 {
        let mut missing = self.missing.lock().expect("sink");
        let mut kept = 0u64;
        let mut buf = Vec::new();
        missing.retain(|digest, (len, offsets)| {
            buf.resize(*len as usize, 0);
            let in_place = offsets.iter().all(|o| {
                self.file.read_exact_at(&mut buf, *o).is_ok() && Digest::of_bytes(&buf) == *digest
            });
            if in_place {
                kept += u64::from(*len) * offsets.len() as u64;
            }
            !in_place
        });
        kept
    }

    /// Writes a chunk received (blocking): hashed first (rule 3). Ok(bytes
    /// written), or why the sender is at fault.
    fn accept(&self, part: &Path, digest: &Digest, data: &[u8]) -> Result<u64, Stop> {
        let Some((len, offsets)) = self.missing.lock().expect("sink").get(digest).cloned() else {
            // Already written (a duplicate, or another source was first)
            // or never asked for.
            return Ok(0);
        };
        if data.len() != len as usize || Digest::of_bytes(data) != *digest {
            return Err(Stop::Fault(format!(
                "sent {} bytes for chunk {digest} that do not hash to it",
                data.len()
            )));
        }
        for offset in &offsets {
            self.file
                .write_all_at(data, *offset)
                .map_err(|e| Stop::Disk(disk_error(part, &e)))?;
        }
        self.missing.lock().expect("sink").remove(digest);
        Ok(u64::from(len))
    }
}

impl ChunkedPull<'_> {
    /// Pulls the artifact into `cache/<sha256>.tar` (no-op when held).
    pub async fn run(&self) -> Result<PullStats, PullError> {
        let mut stats = PullStats::default();
        if self.cache.index(&self.artifact).is_some() {
            return Ok(stats);
        }
        crate::releases::create_private_dir(&self.layout.cache_dir())
            .map_err(|e| disk_error(&self.layout.cache_dir(), &e))?;
        super::check_space(self.layout, self.unpacked_bytes)?;
        // Rule 1.
        let index = self.fetch_index(&mut stats).await?;
        let total = index.total_len();
        if self.unpacked_bytes != 0 && total != self.unpacked_bytes {
            return Err(PullError::Other(format!(
                "the chunk index of {} adds up to {total} bytes, not the {} the artifact unpacks to",
                self.artifact, self.unpacked_bytes
            )));
        }
        // The unpacker's limits, judged from the index before a chunk is
        // fetched (they are judged again while unpacking).
        if let Some(e) = self.limits.unpack.refuses(self.size_bytes, total) {
            return Err(PullError::Other(format!("refused to unpack: {e}")));
        }
        // Rule 2: a part file an interrupted attempt left (of this very
        // length) is kept; its chunks are checked like any held ones.
        let part = self.layout.partial_tar(&self.artifact);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| disk_error(&part, &e))?;
        let resumed = file.metadata().map(|m| m.len()).unwrap_or(0) == total;
        if !resumed {
            file.set_len(0).map_err(|e| disk_error(&part, &e))?;
            file.set_len(total).map_err(|e| disk_error(&part, &e))?;
        }
        let mut missing: HashMap<Digest, (u32, Vec<u64>)> = HashMap::new();
        for (chunk, offset) in index.chunks.iter().zip(index.offsets()) {
            missing
                .entry(chunk.digest)
                .or_insert((chunk.len, Vec::new()))
                .1
                .push(offset);
        }
        let sink = Arc::new(Sink {
            file,
            missing: Mutex::new(missing),
        });
        if resumed {
            let sink = sink.clone();
            stats.reused_bytes += tokio::task::spawn_blocking(move || sink.keep_written())
                .await
                .expect("checking a part file does not panic");
        }
        let result = self.fill(&sink, &part, &mut stats).await;
        match result {
            // Chunks in place stay for the next attempt (rule 2).
            Err(PullError::Other(e)) => return Err(PullError::Other(e)),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            Ok(()) => {}
        }
        // Rule 5.
        let sink = Arc::into_inner(sink).expect("every fetch task has ended");
        sink.file.sync_all().map_err(|e| disk_error(&part, &e))?;
        write_index(self.layout, &self.artifact, &index)
            .map_err(|e| disk_error(&self.layout.chunk_index(&self.artifact), &e))?;
        let tar = self.layout.cached_tar(&self.artifact);
        std::fs::rename(&part, &tar).map_err(|e| disk_error(&tar, &e))?;
        self.cache.rescan();
        info!(
            artifact = %self.artifact,
            reused = stats.reused_bytes,
            peers = stats.peer_bytes,
            origin = stats.origin_bytes,
            bad_peers = stats.bad_peers.len(),
            "pulled by chunks"
        );
        Ok(stats)
    }

    /// Rules 2–4, until nothing is missing.
    async fn fill(
        &self,
        sink: &Arc<Sink>,
        part: &Path,
        stats: &mut PullStats,
    ) -> Result<(), PullError> {
        // Rule 2.
        for digest in sink.missing() {
            let Some(data) = self.cache.read_verified(&digest) else {
                continue;
            };
            match sink.accept(part, &digest, &data) {
                Ok(n) => stats.reused_bytes += n,
                Err(Stop::Disk(e)) => return Err(e),
                Err(_) => {}
            }
        }
        // Rule 3.
        let mut good: Vec<PeerSource> = self
            .peers
            .iter()
            .filter(|p| !stats.bad_peers.iter().any(|b| b.host_id == p.host_id))
            .cloned()
            .collect();
        let mut waited = Duration::ZERO;
        let mut wait = BUSY_WAIT;
        for round in 0.. {
            let pending = sink.missing();
            if pending.is_empty() || good.is_empty() {
                break;
            }
            let mut shares: Vec<Vec<Digest>> = vec![Vec::new(); good.len()];
            for (i, d) in pending.iter().enumerate() {
                shares[(i + round) % good.len()].push(*d);
            }
            let mut tasks = tokio::task::JoinSet::new();
            for (peer, share) in good.iter().cloned().zip(shares) {
                if share.is_empty() {
                    continue;
                }
                let (sink, dialer, artifact) =
                    (sink.clone(), self.peer_dialer.clone(), self.artifact);
                let part = part.to_path_buf();
                tasks.spawn(async move {
                    let (bytes, stop) = fetch_chunks(
                        &dialer,
                        &peer.address,
                        &artifact,
                        share,
                        PEER_STALL,
                        &sink,
                        &part,
                    )
                    .await;
                    (peer, bytes, stop)
                });
            }
            let before = pending.len();
            let mut disk = None;
            let mut busy = false;
            while let Some(done) = tasks.join_next().await {
                let (peer, bytes, stop) = done.expect("fetch task does not panic");
                stats.peer_bytes += bytes;
                match stop {
                    Stop::Ended => {}
                    Stop::Busy => busy = true,
                    Stop::Fault(reason) => {
                        warn!(peer = %peer.host_id, address = %peer.address, %reason, "peer dropped");
                        good.retain(|p| p.host_id != peer.host_id);
                        stats.bad_peers.push(BadPeer {
                            host_id: peer.host_id,
                            reason,
                        });
                    }
                    Stop::Disk(e) => disk = Some(e),
                }
            }
            if let Some(e) = disk {
                return Err(e);
            }
            match (sink.missing().len() < before, busy) {
                (true, _) => wait = BUSY_WAIT, // progress: ask again at once
                (false, false) => break,       // nobody had any of what is left
                (false, true) if waited >= BUSY_PATIENCE => break,
                (false, true) => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        // Rule 4.
        let mut origin_errors = Vec::new();
        for source in self.sources {
            let pending = sink.missing();
            if pending.is_empty() {
                break;
            }
            let (bytes, stop) = fetch_chunks(
                self.dialer,
                source,
                &self.artifact,
                pending,
                ORIGIN_STALL,
                sink,
                part,
            )
            .await;
            stats.origin_bytes += bytes;
            match stop {
                Stop::Ended => {}
                Stop::Busy => origin_errors.push(format!("{source}: busy")),
                Stop::Fault(reason) => origin_errors.push(format!("{source}: {reason}")),
                Stop::Disk(e) => return Err(e),
            }
        }
        let left = sink.missing();
        if left.is_empty() {
            return Ok(());
        }
        Err(PullError::Other(format!(
            "{} chunks of {} were found nowhere (peers asked: {}, dropped: {}; origin: {})",
            left.len(),
            self.artifact,
            self.peers.len(),
            stats.bad_peers.len(),
            if origin_errors.is_empty() {
                "does not have them".to_string()
            } else {
                origin_errors.join("; ")
            }
        )))
    }

    /// Rule 1: the index from the first peer or source that has it right.
    async fn fetch_index(&self, stats: &mut PullStats) -> Result<ChunkIndex, PullError> {
        let mut errors = Vec::new();
        let peers = self
            .peers
            .iter()
            .map(|p| (Some(&p.host_id), &p.address, self.peer_dialer));
        let sources = self.sources.iter().map(|s| (None, s, self.dialer));
        for (peer, address, dialer) in peers.chain(sources) {
            let fault = match self.index_from(dialer, address).await {
                Ok(wire) => match ChunkIndex::from_proto(&wire, &self.index) {
                    Ok(index) => return Ok(index),
                    Err(e) => format!("sent a bad chunk index: {e}"),
                },
                Err(IndexAnswer::NotHeld(why)) => {
                    errors.push(format!("{address}: {why}"));
                    continue;
                }
                Err(IndexAnswer::Fault(e)) => e,
            };
            errors.push(format!("{address}: {fault}"));
            if let Some(host) = peer {
                stats.bad_peers.push(BadPeer {
                    host_id: host.clone(),
                    reason: fault,
                });
            }
        }
        Err(PullError::Other(format!(
            "no source gave the chunk index {} of {}: {}",
            self.index,
            self.artifact,
            errors.join("; ")
        )))
    }
}

/// Why an index was not had from a source.
enum IndexAnswer {
    /// It does not hold the artifact (its words): not its fault.
    NotHeld(String),
    Fault(String),
}

impl ChunkedPull<'_> {
    async fn index_from(
        &self,
        dialer: &Dialer,
        address: &str,
    ) -> Result<drover_common::proto::ChunkIndex, IndexAnswer> {
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, dialer.connect(address))
            .await
            .map_err(|_| {
                IndexAnswer::Fault(format!(
                    "unreachable: no connection within {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| IndexAnswer::Fault(format!("unreachable: {e}")))?;
        let mut client = ChunksClient::new(channel).max_decoding_message_size(16 << 20);
        let request = ChunkIndexRequest {
            sha256: self.artifact.hex(),
        };
        match tokio::time::timeout(PEER_STALL, client.get_chunk_index(request)).await {
            Err(_) => Err(IndexAnswer::Fault(format!(
                "stalled: no index within {PEER_STALL:?}"
            ))),
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                Err(IndexAnswer::NotHeld(s.message().to_string()))
            }
            Ok(Err(s)) => Err(IndexAnswer::Fault(format!(
                "{:?}: {}",
                s.code(),
                s.message()
            ))),
        }
    }
}

/// Asks `address` for `wanted` (in calls of at most
/// [`MAX_CHUNKS_PER_CALL`]) and writes what it sends into `sink`. Returns
/// the bytes written and how it stopped.
async fn fetch_chunks(
    dialer: &Dialer,
    address: &str,
    artifact: &Digest,
    wanted: Vec<Digest>,
    stall: Duration,
    sink: &Arc<Sink>,
    part: &Path,
) -> (u64, Stop) {
    let mut written = 0u64;
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, dialer.connect(address)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return (0, Stop::Fault(format!("unreachable: {e}"))),
        Err(_) => {
            return (
                0,
                Stop::Fault(format!(
                    "unreachable: no connection within {CONNECT_TIMEOUT:?}"
                )),
            );
        }
    };
    let mut client = ChunksClient::new(channel).max_decoding_message_size(4 << 20);
    for call in wanted.chunks(MAX_CHUNKS_PER_CALL) {
        let asked: HashSet<Digest> = call.iter().copied().collect();
        let request = FetchChunksRequest {
            sha256: artifact.hex(),
            chunks: call.iter().map(|d| d.as_bytes().to_vec()).collect(),
        };
        let mut stream = match tokio::time::timeout(stall, client.fetch_chunks(request)).await {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => continue,
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => {
                return (written, Stop::Busy);
            }
            Ok(Err(s)) => {
                return (
                    written,
                    Stop::Fault(format!("{:?}: {}", s.code(), s.message())),
                );
            }
            Err(_) => return (written, Stop::Fault(format!("stalled for {stall:?}"))),
        };
        loop {
            let message = match tokio::time::timeout(stall, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(s)) => {
                    return (
                        written,
                        Stop::Fault(format!("{:?}: {}", s.code(), s.message())),
                    );
                }
                Err(_) => return (written, Stop::Fault(format!("stalled for {stall:?}"))),
            };
            let Some(digest) = Digest::from_slice(&message.sha256).filter(|d| asked.contains(d))
            else {
                return (
                    written,
                    Stop::Fault("sent a chunk that was not asked for".to_string()),
                );
            };
            let (sink, part) = (sink.clone(), part.to_path_buf());
            let accepted =
                tokio::task::spawn_blocking(move || sink.accept(&part, &digest, &message.data))
                    .await
                    .expect("writing a chunk does not panic");
            match accepted {
                Ok(n) => written += n,
                Err(stop) => return (written, stop),
            }
        }
    }
    (written, Stop::Ended)
}
