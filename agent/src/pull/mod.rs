//! Pulling an artifact: a resumable, verified download into the cache, then
//! a safe unpack into the service's releases.
//!
//! Bytes stream into `cache/<sha256>.part` and through the hasher; a broken
//! stream resumes from the part file's length (on the same or the next
//! source). Only a file whose sha256 matches is renamed to
//! `cache/<sha256>.tar.gz`; a mismatch deletes it. Unpacking goes to a temp
//! dir renamed into `releases/<sha256>` when complete.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_common::artifact::unpack::unpack_tar;
use drover_common::artifact::{Digest, Hasher, Limits, Manifest, UnpackError, tree, unpack};
use drover_common::proto::FetchRequest;
use drover_common::proto::artifacts_client::ArtifactsClient;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::releases::Layout;
use drover_common::tls::client::Dialer;

mod chunked;
pub use chunked::{ChunkedPull, MAX_CHUNKS_PER_CALL, PEER_STALL};

/// Why a pull failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// A disk fault (see `disk`): the download or release could not be
    /// written; nothing partial is left; retrying cannot help.
    #[error("{0}")]
    Disk(String),
    #[error("{0}")]
    Other(String),
}

impl From<String> for PullError {
    fn from(s: String) -> Self {
        PullError::Other(s)
    }
}

/// Attempts per pull, over all sources, before giving up.
const MAX_ATTEMPTS: usize = 6;

#[derive(Debug, Clone)]
pub struct PullLimits {
    pub max_artifact_bytes: u64,
    pub unpack: Limits,
}

/// The host's disk first: a download that cannot fit (`size_bytes` to
/// download and at least as much to unpack) is not started.
fn check_space(layout: &Layout, size_bytes: u64) -> Result<(), PullError> {
    let free = crate::disk::space(&layout.cache_dir()).map(|(_, free)| free);
    if let Some(free) = free
        && size_bytes > 0
        && size_bytes.saturating_mul(2) > free
    {
        return Err(PullError::Disk(format!(
            "disk: {} has {free} bytes free; the artifact needs {size_bytes} for the download and at least as much to unpack; nothing was downloaded",
            layout.cache_dir().display()
        )));
    }
    Ok(())
}

/// Re-hashes what a previous attempt left in the part file.
fn resume_hasher(part: &Path) -> std::io::Result<Hasher> {
    let mut hasher = Hasher::default();
    let mut file = match std::fs::File::open(part) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(hasher),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

/// Downloads `digest` into the cache (no-op when it is there). Returns the
/// number of bytes fetched over the network.
pub async fn download(
    layout: &Layout,
    digest: &Digest,
    sources: &[String],
    size_bytes: u64,
    limits: &PullLimits,
    dialer: &Dialer,
) -> Result<u64, PullError> {
    let cached = layout.cached(digest);
    if cached.exists() {
        return Ok(0);
    }
    if sources.is_empty() {
        return Err(PullError::Other("the Pull command lists no sources".into()));
    }
    crate::releases::create_private_dir(&layout.cache_dir())
        .map_err(|e| disk_error(&layout.cache_dir(), &e))?;
    check_space(layout, size_bytes)?;
    let part = layout.partial(digest);
    let mut hasher = {
        let part2 = part.clone();
        tokio::task::spawn_blocking(move || resume_hasher(&part2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading {}: {e}", part.display()))?
    };
    let mut fetched = 0u64;
    let mut last_error = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        let source = &sources[attempt % sources.len()];
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            info!(%digest, %source, offset = hasher.len(), "resuming download");
        }
        match fetch_into(
            dialer,
            source,
            digest,
            &part,
            &mut hasher,
            limits,
            &mut fetched,
        )
        .await
        {
            Ok(()) => {
                let (actual, size) = hasher.finish();
                if actual != *digest {
                    let _ = std::fs::remove_file(&part);
                    return Err(PullError::Other(format!(
                        "digest mismatch: expected {digest}, the {size} bytes received hash to {actual}; download deleted"
                    )));
                }
                tokio::fs::rename(&part, &cached)
                    .await
                    .map_err(|e| disk_error(&cached, &e))?;
                return Ok(fetched);
            }
            Err(PullError::Disk(e)) => {
                // A full or read-only disk: retrying cannot help, and the
                // part file must not stay behind to fill it.
                let _ = std::fs::remove_file(&part);
                warn!(%digest, error = %e, "download stopped by the host's disk");
                return Err(PullError::Disk(format!(
                    "{e}; the partial download was removed"
                )));
            }
            Err(PullError::Other(e)) => {
                warn!(%digest, %source, error = %e, "download interrupted");
                last_error = e;
            }
        }
    }
    Err(PullError::Other(format!(
        "download failed after {MAX_ATTEMPTS} attempts: {last_error}"
    )))
}

async fn fetch_into(
    dialer: &Dialer,
    source: &str,
    digest: &Digest,
    part: &Path,
    hasher: &mut Hasher,
    limits: &PullLimits,
    fetched: &mut u64,
) -> Result<(), PullError> {
    let channel = dialer
        .connect(source)
        .await
        .map_err(|e| format!("{source}: {e}"))?;
    let mut client = ArtifactsClient::new(channel).max_decoding_message_size(4 << 20);
    let offset = hasher.len();
    let mut stream = client
        .fetch(FetchRequest {
            sha256: digest.hex(),
            offset,
        })
        .await
        .map_err(|s| format!("{source}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .await
        .map_err(|e| disk_error(part, &e))?;
    loop {
        let chunk = match stream.message().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(s) => {
                file.flush().await.map_err(|e| disk_error(part, &e))?;
                return Err(PullError::Other(format!(
                    "{source}: {:?}: {}",
                    s.code(),
                    s.message()
                )));
            }
        };
        if chunk.offset != hasher.len() {
            return Err(PullError::Other(format!(
                "{source} sent offset {} while {} was expected",
                chunk.offset,
                hasher.len()
            )));
        }
        if hasher.len() + chunk.data.len() as u64 > limits.max_artifact_bytes {
            let _ = std::fs::remove_file(part);
            *hasher = Hasher::default();
            return Err(PullError::Other(format!(
                "artifact is larger than the limit of {} bytes",
                limits.max_artifact_bytes
            )));
        }
        file.write_all(&chunk.data)
            .await
            .map_err(|e| disk_error(part, &e))?;
        hasher.update(&chunk.data);
        *fetched += chunk.data.len() as u64;
    }
    file.flush().await.map_err(|e| disk_error(part, &e))?;
    file.sync_all().await.map_err(|e| disk_error(part, &e))?;
    Ok(())
}

/// An I/O error writing `path`: a disk fault (see `disk`) or another.
fn disk_error(path: &Path, e: &std::io::Error) -> PullError {
    match crate::disk::Fault::of(e) {
        Some(fault) => PullError::Disk(fault.describe(path)),
        None => PullError::Other(format!("writing {}: {e}", path.display())),
    }
}

/// Unpacks the cached artifact into `releases/<sha256>` (no-op when the
/// release is there) and returns its manifest, which must be for `service`.
pub async fn unpack_release(
    layout: &Layout,
    service: &str,
    digest: &Digest,
    limits: &PullLimits,
) -> Result<Manifest, PullError> {
    let release = layout.release(service, digest);
    if release.is_dir() {
        return Ok(read_release_manifest(&release, service)?);
    }
    let releases = layout.releases_dir(service);
    std::fs::create_dir_all(&releases).map_err(|e| disk_error(&releases, &e))?;
    let tmp: PathBuf = releases.join(format!(
        ".{}.unpacking-{}",
        digest.hex(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    // A tar.gz fetched whole, or a tar rebuilt from verified chunks.
    let (archive, chunked) = match layout.cached(digest) {
        gz if gz.exists() => (gz, false),
        _ => (layout.cached_tar(digest), true),
    };
    // The disk keeps its floor of free space while the release grows.
    let unpack_limits = Limits {
        keep_free_bytes: crate::disk::space(&releases)
            .map(|(total, _)| crate::disk::low_space_floor(total))
            .unwrap_or(0),
        ..limits.unpack
    };
    let tmp2 = tmp.clone();
    let result = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&archive)
            .map_err(|e| PullError::Other(format!("opening {}: {e}", archive.display())))?;
        let compressed = file.metadata().map(|m| m.len()).unwrap_or(0);
        let reader = std::io::BufReader::new(file);
        match chunked {
            true => unpack_tar(reader, &tmp2, &unpack_limits),
            false => unpack(reader, &tmp2, &unpack_limits.for_archive(compressed)),
        }
        .map_err(
            |e| match (&e, e.write_error().and_then(crate::disk::Fault::of)) {
                (_, Some(fault)) => PullError::Disk(fault.describe(&tmp2)),
                (UnpackError::NoSpace { .. }, None) => PullError::Disk(format!("disk: {e}")),
                _ => PullError::Other(format!("refused to unpack: {e}")),
            },
        )
    })
    .await
    .map_err(|e| PullError::Other(e.to_string()))?;
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(match e {
                PullError::Disk(d) => {
                    PullError::Disk(format!("{d}; the partial release was removed"))
                }
                other => other,
            });
        }
    };
    if manifest.service != service {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(PullError::Other(format!(
            "the artifact is for service {:?}, not {service:?}",
            manifest.service
        )));
    }
    // Durable before it can become current: every file and directory is
    // fsynced while its record is made; the record goes first, then the
    // release is renamed into place (and its directory fsynced).
    let record = {
        let tmp = tmp.clone();
        tokio::task::spawn_blocking(move || tree::record(&tmp))
            .await
            .map_err(|e| PullError::Other(e.to_string()))?
    };
    let record = match record {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(PullError::Other(format!("recording the release: {e}")));
        }
    };
    let record_path = layout.release_tree(service, digest);
    let json = serde_json::to_vec(&record).map_err(|e| PullError::Other(e.to_string()))?;
    crate::state::write_durably(&record_path, &json).map_err(|e| disk_error(&record_path, &e))?;
    std::fs::rename(&tmp, &release).map_err(|e| disk_error(&release, &e))?;
    std::fs::File::open(&releases)
        .and_then(|d| d.sync_all())
        .map_err(|e| disk_error(&releases, &e))?;
    Ok(manifest)
}

/// Why a release may not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The cached archive is missing or its bytes are not the digest's.
    Archive(String),
    /// The unpacked release is missing or differs from its record; the
    /// verified archive can make it again.
    Release(String),
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyError::Archive(e) | VerifyError::Release(e) => f.write_str(e),
        }
    }
}

/// Checks the unpacked release against the record made when it was
/// unpacked. A release from before records were kept is recorded now.
async fn verify_tree(layout: &Layout, service: &str, digest: &Digest) -> Result<(), String> {
    let release = layout.release(service, digest);
    let record_path = layout.release_tree(service, digest);
    let recorded: Option<tree::Tree> = match std::fs::read(&record_path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("the record {} is unreadable: {e}", record_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", record_path.display())),
    };
    tokio::task::spawn_blocking(move || match recorded {
        Some(tree) => tree::verify(&release, &tree).map_err(|e| e.to_string()),
        None => {
            tracing::warn!(release = %release.display(), "a release without a record: recording it now");
            let tree = tree::record(&release).map_err(|e| e.to_string())?;
            let json = serde_json::to_vec(&tree).map_err(|e| e.to_string())?;
            crate::state::write_durably(&record_path, &json).map_err(|e| e.to_string())
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Reads and validates the manifest of an unpacked release.
pub fn read_release_manifest(release: &Path, service: &str) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(release.join(drover_common::artifact::MANIFEST_FILE))
        .map_err(|e| {
            format!(
                "release {} has no readable manifest: {e}",
                release.display()
            )
        })?;
    let manifest = Manifest::parse(&text).map_err(|e| e.to_string())?;
    if manifest.service != service {
        return Err(format!(
            "release is for service {:?}, not {service:?}",
            manifest.service
        ));
    }
    Ok(manifest)
}

/// Re-hashes the cached artifact, checks its release against the record
/// made at unpack, and re-reads the release's manifest.
pub async fn verify(layout: &Layout, service: &str, digest: &Digest) -> Result<(), VerifyError> {
    let cached = layout.cached(digest);
    if !cached.exists() && layout.cached_tar(digest).exists() {
        let (layout2, digest2) = (layout.clone(), *digest);
        tokio::task::spawn_blocking(move || verify_chunked(&layout2, &digest2))
            .await
            .map_err(|e| VerifyError::Archive(e.to_string()))?
            .map_err(VerifyError::Archive)?;
        return verify_release(layout, service, digest).await;
    }
    let (actual, _) = {
        let cached = cached.clone();
        tokio::task::spawn_blocking(move || Digest::of_file(&cached))
            .await
            .map_err(|e| VerifyError::Archive(e.to_string()))?
            .map_err(|e| {
                VerifyError::Archive(format!(
                    "artifact {digest} is not on this host ({e}); send Pull first"
                ))
            })?
    };
    if actual != *digest {
        return Err(VerifyError::Archive(format!(
            "cached artifact is corrupt: expected {digest}, its bytes hash to {actual}"
        )));
    }
    verify_release(layout, service, digest).await
}

/// An artifact pulled by chunks: every chunk of its tar hashes to its
/// index entry again (blocking).
fn verify_chunked(layout: &Layout, digest: &Digest) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let index = crate::chunk_cache::read_index(layout, digest)
        .map_err(|e| format!("artifact {digest} is cached by chunks, but {e}"))?;
    let path = layout.cached_tar(digest);
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len != index.total_len() {
        return Err(format!(
            "cached artifact is corrupt: {} holds {len} bytes, its index {}",
            path.display(),
            index.total_len()
        ));
    }
    let mut buf = Vec::new();
    for (chunk, offset) in index.chunks.iter().zip(index.offsets()) {
        buf.resize(chunk.len as usize, 0);
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if Digest::of_bytes(&buf) != chunk.digest {
            return Err(format!(
                "cached artifact is corrupt: the chunk at byte {offset} of {} does not hash to {}",
                path.display(),
                chunk.digest
            ));
        }
    }
    Ok(())
}

/// The unpacked release against its record, and its manifest.
async fn verify_release(
    layout: &Layout,
    service: &str,
    digest: &Digest,
) -> Result<(), VerifyError> {
    let release = layout.release(service, digest);
    if !release.is_dir() {
        return Err(VerifyError::Release(format!(
            "artifact {digest} is cached but not unpacked; send Pull"
        )));
    }
    verify_tree(layout, service, digest)
        .await
        .map_err(|e| VerifyError::Release(format!("release {digest} is damaged: {e}")))?;
    read_release_manifest(&release, service)
        .map(|_| ())
        .map_err(VerifyError::Release)
}
