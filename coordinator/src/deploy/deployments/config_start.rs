//! What a config-only deploy starts from (`StartDeployRequest.config`):
//! the pushed bundle, found among the pipeline's environments; the stage
//! of that environment, the only one the deploy runs (its canary, gates
//! and rollback are the deploy's); and the code that environment runs,
//! which stays.

use drover_common::artifact::Digest;
use drover_common::proto::{ArtifactInfo, Pipeline, StartDeployRequest, Strategy};

use super::{DeployError, Deployments};

impl Deployments {
    /// The pipeline, the code running in the bundle's environment (digest
    /// and info) and that environment's stage, for the config deploy `req`
    /// asks for; bad input is refused naming the field.
    pub(super) async fn config_startable(
        &self,
        req: &StartDeployRequest,
    ) -> Result<(Pipeline, Digest, ArtifactInfo, usize), DeployError> {
        let config = req.config.as_str();
        if config.len() != 64
            || !config
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(DeployError::Invalid(format!(
                "config: {config:?} is not a config bundle digest (64 lowercase hex)"
            )));
        }
        if !req.train_id.is_empty() {
            return Err(DeployError::Invalid(
                "config: a config deploy cannot be a release train's member".into(),
            ));
        }
        if !req.from_stage.is_empty() {
            return Err(DeployError::Invalid(
                "from_stage: a config deploy runs through its bundle's environment only".into(),
            ));
        }
        let full = self.pipelines.get(&req.pipeline).await?;
        let mut found = None;
        for (i, stage) in full.stages.iter().enumerate() {
            let bundle = crate::configs::load(
                self.ledger.store().as_ref(),
                self.ledger.keys(),
                &full.service,
                &stage.name,
                config,
            )
            .await?;
            if bundle.is_some() {
                found = Some((i, stage.clone()));
                break;
            }
        }
        let (index, stage) = found.ok_or_else(|| {
            DeployError::Invalid(format!(
                "config: no config bundle {config} of {} for an environment of pipeline {}; push it first (droverctl config push)",
                full.service, full.name
            ))
        })?;
        if matches!(
            stage.strategy(),
            Strategy::BlueGreen | Strategy::WeightedCanary
        ) {
            return Err(DeployError::Invalid(format!(
                "config: environment {} is a blue-green stage; config deploys run through rolling and canary stages",
                stage.name
            )));
        }
        let running = self
            .ledger
            .environment(&full.name, &stage.name)
            .await?
            .filter(|e| !e.artifact.is_empty())
            .ok_or_else(|| {
                DeployError::Conflict(format!(
                    "environment {} of {} runs no code yet; deploy code there before its config",
                    stage.name, full.name
                ))
            })?;
        if !req.artifact.is_empty() && req.artifact != running.artifact {
            return Err(DeployError::Invalid(format!(
                "artifact: environment {} runs {}; a config deploy keeps its code (leave artifact out)",
                stage.name, running.artifact
            )));
        }
        let (_, digest, info) = self.startable_info(&full.name, &running.artifact).await?;
        Ok((full, digest, info, index))
    }
}
