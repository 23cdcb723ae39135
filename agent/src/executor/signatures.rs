//! Rule 5 of the executor: trusted signers. A Pull accepts an artifact
//! only with a valid signature from one of them (checked before any byte
//! is fetched) and keeps it beside the cached archive; Restart and
//! Rollback check that kept signature again before anything starts.

use drover_common::artifact::Digest;

use super::Executor;

impl Executor {
    /// Rule 5 at pull time: the accepted signature, kept for activation.
    pub(super) fn accept_signature(
        &self,
        service: &str,
        digest: &Digest,
        signatures: &[drover_common::proto::ArtifactSignature],
    ) -> Result<(), String> {
        if self.cfg.signers.is_empty() {
            return Ok(());
        }
        let key = self
            .cfg
            .signers
            .verify(service, &digest.hex(), signatures)
            .map_err(|e| format!("refused: {e}"))?;
        let sig = signatures
            .iter()
            .find(|s| s.key_id == key)
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
        self.cfg
            .signers
            .verify(service, &digest.hex(), &[sig])
            .map(|_| ())
            .map_err(|e| format!("not activated: {e}"))
    }
}
