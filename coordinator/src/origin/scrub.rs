//! Scrubbing the origin's blobs (`droverctl artifact verify`).
//!
//! For each artifact in the store's metadata (or one):
//! 1. Its blob here is re-hashed. Bytes that hash to its sha256: OK (and a
//!    lost mark is cleared: the bytes are back).
//! 2. Damaged bytes are moved aside (`damaged/`), never served again.
//! 3. Missing or damaged, a verified copy is fetched from a live peer
//!    coordinator (the replicator checks the digest): REPAIRED.
//! 4. No peer has one: the artifact is marked lost. Lost artifacts are left
//!    out of listings and Fetch says so plainly; pushing the same bytes
//!    again restores them.

use drover_common::artifact::Digest;
use drover_common::proto::{ArtifactCheck, ArtifactInfo, BlobState};
use tracing::{info, warn};

use super::{BlobStore, Replicator};

/// Checks `artifacts` in turn (steps 1-4).
pub async fn scrub(
    blobs: &BlobStore,
    replicator: &Replicator,
    peers: &[String],
    artifacts: Vec<ArtifactInfo>,
) -> std::io::Result<Vec<ArtifactCheck>> {
    let mut checks = Vec::with_capacity(artifacts.len());
    for info in artifacts {
        let Ok(digest) = info.sha256.parse::<Digest>() else {
            continue;
        };
        let check = |state: BlobState, detail: String| ArtifactCheck {
            sha256: info.sha256.clone(),
            service: info.service.clone(),
            state: state as i32,
            detail,
        };
        // Step 1.
        let path = blobs.blob_path(&digest);
        let hashed = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Digest::of_file(&path))
                .await
                .map_err(std::io::Error::other)?
        };
        let problem = match hashed {
            Ok((actual, _)) if actual == digest => {
                if info.lost_at_unix_ms != 0 {
                    blobs.set_lost(&digest, 0).await?;
                    info!(%digest, "a lost artifact's bytes are back");
                }
                checks.push(check(BlobState::Ok, String::new()));
                continue;
            }
            Ok((actual, _)) => {
                // Step 2.
                let moved = blobs.quarantine(&digest).await?;
                format!(
                    "damaged: its bytes hash to {actual}; moved to {}",
                    moved.display()
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing".to_string(),
            Err(e) => format!("unreadable: {e}"),
        };
        // Step 3.
        match replicator.ensure(blobs, &digest, peers).await {
            Ok(()) => {
                blobs.set_lost(&digest, 0).await?;
                info!(%digest, %problem, "blob repaired from a peer coordinator");
                checks.push(check(
                    BlobState::Repaired,
                    format!("{problem}; a verified copy was fetched from a peer"),
                ));
            }
            Err(e) => {
                // Step 4.
                let at = match info.lost_at_unix_ms {
                    0 => drover_common::time::now_unix_ms(),
                    at => at,
                };
                blobs.set_lost(&digest, at).await?;
                warn!(%digest, service = %info.service, %problem, peers = peers.len(), "artifact lost");
                checks.push(check(
                    BlobState::Lost,
                    format!("{problem}; no peer coordinator had it ({e}); marked lost: push it again to restore"),
                ));
            }
        }
    }
    Ok(checks)
}
