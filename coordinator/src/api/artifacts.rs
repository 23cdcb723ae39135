//! `drover.v1.Artifacts` on the coordinator: the origin CI uploads to and
//! agents pull from.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Permission, Scope};
use drover_common::artifact::Digest;
use drover_common::proto::artifacts_server::Artifacts;
use drover_common::proto::{
    AddSignatureRequest, ArtifactInfo, FetchChunk, FetchRequest, ListArtifactsRequest,
    ListArtifactsResponse, StatRequest, UploadHeader, UploadRequest, VerifyArtifactsRequest,
    VerifyArtifactsResponse, upload_request,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::ha::leases::ShardLeases;
use crate::metrics::Metrics;
use crate::origin::{BlobStore, Inspection, PEER_FETCH, Replicator, scrub};

/// Size of each chunk of a Fetch.
pub const FETCH_CHUNK: usize = 256 * 1024;

pub struct ArtifactsService {
    pub store: Arc<BlobStore>,
    pub metrics: Metrics,
    pub max_artifact_bytes: u64,
    /// Live coordinators: where a blob missing here is copied from.
    pub leases: Arc<ShardLeases>,
    pub replicator: Arc<Replicator>,
    /// Who may push and read.
    pub auth: Arc<crate::auth::Authorizer>,
    /// The unpacker's limits uploads are inspected with (the agents' defaults).
    pub unpack_limits: drover_common::artifact::Limits,
    /// Fault injection (`--fault-origin-down-file`; always `None` without
    /// the `fault-injection` feature).
    pub fault_origin_down_file: Option<std::path::PathBuf>,
    /// What artifact gc keeps: deploy state (environments, known good,
    /// live deploys), hosts' releases, and the policy.
    pub deployments: Arc<crate::deploy::deployments::Deployments>,
    pub registry: Arc<crate::fleet::Registry>,
    pub retention: crate::origin::retention::RetentionPolicy,
}

impl ArtifactsService {
    /// Fault injection: the origin is cut off while the file exists.
    pub(super) fn origin_reachable(&self) -> Result<(), Status> {
        match &self.fault_origin_down_file {
            Some(f) if f.exists() => {
                Err(Status::unavailable("the origin is down (fault injection)"))
            }
            _ => Ok(()),
        }
    }

    /// With other coordinators live, an upload is acknowledged only once
    /// two of them hold it (this one and a peer), so losing one loses no
    /// acknowledged artifact. Alone, this coordinator's fsynced copy is it.
    async fn second_copy(&self, digest: &Digest, size: u64) -> Result<(), Status> {
        let peers = self.leases.peer_addresses();
        if peers.is_empty() {
            return Ok(());
        }
        // Generous: a copy over the network at 20 MB/s, plus a minute.
        let limit = Duration::from_secs(60) + Duration::from_secs(size / 20_000_000);
        let here = tokio::fs::try_exists(self.store.blob_path(digest))
            .await
            .unwrap_or(false);
        let placed = if here {
            tokio::time::timeout(limit, self.replicator.place_on_peer(digest, size, &peers))
                .await
                .map_err(|_| std::io::Error::other(format!("no copy within {limit:?}")))
                .and_then(|r| r)
                .map(|_| ())
        } else {
            // Deduplicated here but held elsewhere: copying it makes two.
            tokio::time::timeout(limit, self.replicator.ensure(&self.store, digest, &peers))
                .await
                .map_err(|_| std::io::Error::other(format!("no copy within {limit:?}")))
                .and_then(|r| r)
        };
        placed.map_err(|e| {
            Status::from(ApiError::Unavailable(format!(
                "artifact {digest} is stored, but no second coordinator holds a copy yet ({e}); retry the push (it is idempotent)"
            )))
        })
    }

    /// Copies `digest` from a peer when its metadata exists (it was
    /// uploaded to another coordinator) but its blob is not here. Requests
    /// from peers are not passed on, so a blob nobody has ends at once.
    pub(super) async fn read_through<T>(
        &self,
        digest: &Digest,
        request: &Request<T>,
    ) -> Result<(), Status> {
        if request.metadata().contains_key(PEER_FETCH) {
            return Ok(());
        }
        if tokio::fs::try_exists(self.store.blob_path(digest))
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        let Some(info) = self
            .store
            .info(digest)
            .await
            .map_err(|e| io_status("reading metadata", e))?
        else {
            return Ok(());
        };
        if info.lost_at_unix_ms != 0 {
            return Err(ApiError::NotFound(format!(
                "artifact {digest} is lost: no coordinator held verified bytes at the last scrub; push it again to restore it"
            ))
            .into());
        }
        let peers = self.leases.peer_addresses();
        if peers.is_empty() {
            return Err(Status::from(ApiError::DataLoss(format!(
                "the blob of artifact {digest} is missing from this coordinator's disk and no peer coordinator is live; `droverctl artifact verify` checks every blob, and pushing it again restores it"
            ))));
        }
        self.replicator
            .ensure(&self.store, digest, &peers)
            .await
            .map_err(|e| {
                Status::from(ApiError::Unavailable(format!(
                    "artifact {digest} was uploaded to another coordinator and could not be copied here: {e}"
                )))
            })
    }
}

/// How the chunks of an upload ended.
enum Received {
    /// Every chunk arrived (and went to the blob and the inspection).
    All,
    /// The inspection stopped reading: it refused the archive.
    RefusedEarly,
}

impl ArtifactsService {
    /// Reads an upload's chunks into the pending blob and the inspection.
    async fn receive(
        &self,
        stream: &mut Streaming<UploadRequest>,
        pending: &mut crate::origin::PendingBlob,
        inspection: &mut Inspection,
    ) -> Result<Received, Status> {
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(upload_request::Part::Chunk(bytes)) => {
                    if pending.len() + bytes.len() as u64 > self.max_artifact_bytes {
                        return Err(ApiError::Invalid(format!(
                            "artifact is larger than the limit of {} bytes; nothing was stored",
                            self.max_artifact_bytes
                        ))
                        .into());
                    }
                    pending
                        .write(&bytes)
                        .await
                        .map_err(|e| io_status("writing the upload", e))?;
                    if !inspection.feed(&bytes).await {
                        return Ok(Received::RefusedEarly);
                    }
                }
                Some(upload_request::Part::Header(_)) => {
                    return Err(Status::from(ApiError::Malformed(
                        "the header was sent twice".into(),
                    )));
                }
                None => {
                    return Err(Status::from(ApiError::Malformed(
                        "an Upload message carried nothing".into(),
                    )));
                }
            }
        }
        Ok(Received::All)
    }
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>()
        .map_err(|e| ApiError::Invalid(format!("sha256: {e}")))
}

fn validate_header(h: &UploadHeader, max: u64) -> Result<Digest, ApiError> {
    let digest = parse_digest(&h.sha256)?;
    drover_common::ids::validate_service(&h.service).map_err(ApiError::Invalid)?;
    if h.version.len() > 128 || h.version.chars().any(char::is_control) {
        return Err(ApiError::Invalid(
            "version must be at most 128 printable characters".into(),
        ));
    }
    if h.git_sha.len() > 64 || !h.git_sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::Invalid(format!(
            "git_sha {:?} must be up to 64 hex characters",
            h.git_sha
        )));
    }
    for sig in &h.signatures {
        drover_common::artifact::signature::validate_shape(sig)
            .map_err(|e| ApiError::Invalid(format!("signature: {e}")))?;
    }
    if h.size_bytes > max {
        return Err(ApiError::Invalid(format!(
            "declared size {} bytes is over the limit of {max} bytes",
            h.size_bytes
        )));
    }
    Ok(digest)
}

fn io_status(context: &str, e: std::io::Error) -> Status {
    warn!(error = %e, context, "artifact store I/O failed");
    Status::from(ApiError::Internal(format!("{context}: {e}")))
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Artifacts for ArtifactsService {
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<ArtifactInfo>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsPush, Scope::default())?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(UploadRequest {
                part: Some(upload_request::Part::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::from(ApiError::Malformed(
                    "the first Upload message must be the header".into(),
                )));
            }
            None => {
                return Err(Status::from(ApiError::Malformed(
                    "the upload ended before its header".into(),
                )));
            }
        };
        let digest = validate_header(&header, self.max_artifact_bytes)?;
        let stored = self
            .store
            .info(&digest)
            .await
            .map_err(|e| io_status("reading metadata", e))?;
        // A lost artifact is uploaded again in full (that restores it).
        let live = stored.filter(|i| i.lost_at_unix_ms == 0);
        if let Some(existing) = &live
            && existing.service != header.service
        {
            return Err(ApiError::Conflict(format!(
                "artifact {digest} is stored for service {:?}; the same bytes cannot be pushed as {:?} (nothing changed)",
                existing.service, header.service
            ))
            .into());
        }
        if live.is_some()
            && let Some(mut existing) = self
                .store
                .add_signatures(&digest, &header.signatures)
                .await
                .map_err(|e| io_status("reading metadata", e))?
        {
            info!(%digest, service = %existing.service, "upload deduplicated: artifact already stored");
            existing.deduplicated = true;
            self.second_copy(&digest, existing.size_bytes).await?;
            return Ok(Response::new(existing));
        }

        let mut pending = self
            .store
            .begin()
            .await
            .map_err(|e| io_status("creating a temp file", e))?;
        // The agents' checks, run on the bytes as they arrive.
        let mut inspection = Inspection::start(
            pending.path().with_extension("inspect"),
            self.unpack_limits.for_archive(header.size_bytes),
        );
        let refused = |e: drover_common::artifact::UnpackError| -> Status {
            ApiError::Invalid(format!(
                "refused: {e}; an agent would refuse it too; nothing was stored"
            ))
            .into()
        };
        let received = self
            .receive(&mut stream, &mut pending, &mut inspection)
            .await;
        // Always wait for the inspection, whatever happened: when it ends,
        // its scratch dir is gone, so nothing outlives the call.
        let verdict = inspection.finish().await;
        match received {
            Err(status) => return Err(status),
            Ok(Received::RefusedEarly) => {
                return Err(match verdict {
                    Err(e) => refused(e),
                    Ok(_) => Status::from(ApiError::Internal(
                        "the inspection ended before the upload".into(),
                    )),
                });
            }
            Ok(Received::All) => {}
        }
        let (actual, size) = pending.digest();
        if header.size_bytes != 0 && size != header.size_bytes {
            return Err(ApiError::Invalid(format!(
                "declared size {} bytes but {size} bytes arrived; nothing was stored",
                header.size_bytes
            ))
            .into());
        }
        if actual != digest {
            return Err(ApiError::Invalid(format!(
                "declared sha256 {digest} but the uploaded bytes hash to {actual}; nothing was stored"
            ))
            .into());
        }
        let manifest = verdict.map_err(refused)?;
        pending
            .flush()
            .await
            .map_err(|e| io_status("flushing the upload", e))?;
        if manifest.service != header.service {
            return Err(ApiError::Invalid(format!(
                "the upload is for service {:?} but its drover.toml says {:?}; nothing was stored",
                header.service, manifest.service
            ))
            .into());
        }
        // The chunk index (issue 15), made from the checked bytes.
        let index = {
            let (store, blob) = (self.store.clone(), pending.path().to_path_buf());
            tokio::task::spawn_blocking(move || store.make_index(&blob, &digest))
                .await
                .map_err(|e| Status::from(ApiError::Internal(e.to_string())))?
                .map_err(|e| io_status("indexing the upload's chunks", e))?
        };
        let info = ArtifactInfo {
            index_sha256: index.digest().hex(),
            unpacked_bytes: index.total_len(),
            sha256: digest.hex(),
            service: header.service,
            version: header.version,
            git_sha: header.git_sha,
            size_bytes: size,
            uploaded_at_unix_ms: drover_common::time::now_unix_ms(),
            manifest_version: manifest.version,
            deduplicated: false,
            signatures: header.signatures,
            lost_at_unix_ms: 0,
        };
        self.store
            .commit(pending, &digest, &info)
            .await
            .map_err(|e| io_status("storing the upload", e))?;
        self.second_copy(&digest, size).await?;
        self.metrics.artifact_uploads.inc();
        info!(%digest, service = %info.service, version = %info.version, size, "artifact stored");
        Ok(Response::new(info))
    }

    type FetchStream = FetchStream;

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<FetchStream>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        self.origin_reachable()?;
        let digest = parse_digest(&request.get_ref().sha256)?;
        self.read_through(&digest, &request).await?;
        let req = request.into_inner();
        let path = self.store.blob_path(&digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(
                    ApiError::NotFound(format!("no artifact {digest} on this origin")).into(),
                );
            }
            Err(e) => return Err(io_status("opening the blob", e)),
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| io_status("reading blob size", e))?
            .len();
        if req.offset > size {
            return Err(Status::from(ApiError::OutOfRange(format!(
                "offset {} is past the end of artifact {digest} ({size} bytes)",
                req.offset
            ))));
        }
        file.seek(std::io::SeekFrom::Start(req.offset))
            .await
            .map_err(|e| io_status("seeking the blob", e))?;
        self.metrics.artifact_fetches.inc();
        let metrics = self.metrics.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut offset = req.offset;
            loop {
                let mut buf = vec![0u8; FETCH_CHUNK];
                let n = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(io_status("reading the blob", e))).await;
                        return;
                    }
                };
                buf.truncate(n);
                metrics.artifact_fetched_bytes.inc_by(n as u64);
                if tx.send(Ok(FetchChunk { offset, data: buf })).await.is_err() {
                    return; // the client went away
                }
                offset += n as u64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<ArtifactInfo>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        let digest = parse_digest(&request.get_ref().sha256)?;
        match self
            .store
            .info(&digest)
            .await
            .map_err(|e| io_status("reading metadata", e))?
        {
            Some(info) => Ok(Response::new(info)),
            None => Err(ApiError::NotFound(format!("no artifact {digest} on this origin")).into()),
        }
    }

    async fn add_signature(
        &self,
        request: Request<AddSignatureRequest>,
    ) -> Result<Response<ArtifactInfo>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsPush, Scope::default())?;
        let req = request.into_inner();
        let digest = parse_digest(&req.sha256)?;
        let sig = req
            .signature
            .ok_or_else(|| ApiError::Invalid("signature is required".into()))?;
        drover_common::artifact::signature::validate_shape(&sig)
            .map_err(|e| ApiError::Invalid(format!("signature: {e}")))?;
        let info = self
            .store
            .add_signatures(&digest, std::slice::from_ref(&sig))
            .await
            .map_err(|e| io_status("updating metadata", e))?
            .ok_or_else(|| ApiError::NotFound(format!("no artifact {digest} is stored")))?;
        info!(%digest, key_id = %sig.key_id, "signature added");
        Ok(Response::new(info))
    }

    async fn list(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        let req = request.get_ref();
        let mut artifacts = self
            .store
            .list()
            .await
            .map_err(|e| io_status("listing artifacts", e))?;
        artifacts.retain(|a| {
            (req.service.is_empty() || a.service == req.service)
                && (req.include_lost || a.lost_at_unix_ms == 0)
        });
        Ok(Response::new(ListArtifactsResponse { artifacts }))
    }

    async fn collect_garbage(
        &self,
        request: Request<drover_common::proto::CollectGarbageRequest>,
    ) -> Result<Response<drover_common::proto::CollectGarbageResponse>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::ArtifactsPush, Scope::default())?;
        let dry_run = request.get_ref().dry_run;
        Ok(Response::new(self.collect(dry_run, &caller.actor()).await?))
    }

    async fn verify(
        &self,
        request: Request<VerifyArtifactsRequest>,
    ) -> Result<Response<VerifyArtifactsResponse>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsPush, Scope::default())?;
        let sha256 = &request.get_ref().sha256;
        let artifacts = if sha256.is_empty() {
            self.store
                .list()
                .await
                .map_err(|e| io_status("listing artifacts", e))?
        } else {
            let digest = parse_digest(sha256)?;
            let info = self
                .store
                .info(&digest)
                .await
                .map_err(|e| io_status("reading metadata", e))?
                .ok_or_else(|| ApiError::NotFound(format!("no artifact {digest} is stored")))?;
            vec![info]
        };
        let checks = scrub(
            &self.store,
            &self.replicator,
            &self.leases.peer_addresses(),
            artifacts,
        )
        .await
        .map_err(|e| io_status("scrubbing", e))?;
        Ok(Response::new(VerifyArtifactsResponse { checks }))
    }
}
