//! Rule 5 of the executor: trusted signers. A Pull accepts an artifact
//! only with a valid signature from one of them (checked before any byte
//! is fetched) and keeps it beside the cached archive; Restart and
//! Rollback check that kept signature again before anything starts. A
//! pull by chunks never sees the tar.gz, so it needs a signature that
//! also covers the chunk index (signature rule 4); without one the agent
//! fetches the whole file.

use drover_common::artifact::Digest;

use super::Executor;

impl Executor {
    /// Rule 5 for a chunked pull: without trusted signers any index will
    /// do (the coordinator's word, like the digest's); with them, only one
    /// a trusted signature covers.
    pub(super) fn signature_covers_index(
        &self,
        service: &str,
        digest: &Digest,
        index: &Digest,
        signatures: &[drover_common::proto::ArtifactSignature],
    ) -> bool {
        self.cfg.signers.is_empty()
            || self
                .cfg
                .signers
                .verify_for(service, &digest.hex(), Some(&index.hex()), signatures)
                .is_ok()
    }

    /// Rule 5 at pull time: the accepted signature (one covering `index`
    /// for a chunked pull), kept for activation.
    pub(super) fn accept_signature(
        &self,
        service: &str,
        digest: &Digest,
        index: Option<&Digest>,
        signatures: &[drover_common::proto::ArtifactSignature],
    ) -> Result<(), String> {
        if self.cfg.signers.is_empty() {
            return Ok(());
        }
        let index = index.map(|i| i.hex());
        let key = self
            .cfg
            .signers
            .verify_for(service, &digest.hex(), index.as_deref(), signatures)
            .map_err(|e| format!("refused: {e}"))?;
        let sig = signatures
            .iter()
            .find(|s| s.key_id == key && index.as_ref().is_none_or(|i| s.index_sha256 == *i))
            .expect("verify returned the id of one of them");
        let path = self.cfg.layout.signature(digest);
        crate::releases::create_private_dir(&self.cfg.layout.cache_dir())
            .map_err(|e| e.to_string())?;
        let json = serde_json::to_vec(sig).map_err(|e| e.to_string())?;
        crate::state::write_durably(&path, &json)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Rule 5 at activation: the kept signature must still verify.
    pub(super) fn check_signature(&self, service: &str, digest: &Digest) -> Result<(), String> {
        if self.cfg.signers.is_empty() {
            return Ok(());
        }
        let path = self.cfg.layout.signature(digest);
        let sig: drover_common::proto::ArtifactSignature = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                format!(
                    "not activated: no trusted signature was accepted for {digest} when it was pulled"
                )
            })?;
        // Held by chunks: the kept signature must cover the index held.
        let layout = &self.cfg.layout;
        let index = match layout.cached(digest).exists() {
            true => None,
            false => Some(
                crate::chunk_cache::read_index(layout, digest)
                    .map_err(|e| format!("not activated: {e}"))?
                    .digest()
                    .hex(),
            ),
        };
        self.cfg
            .signers
            .verify_for(service, &digest.hex(), index.as_deref(), &[sig])
            .map(|_| ())
            .map_err(|e| format!("not activated: {e}"))
    }
}
