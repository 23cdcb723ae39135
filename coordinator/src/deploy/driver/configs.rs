//! The config bundle a deploy's commands carry (issue 16): with the
//! deploy's release, a stage's hosts get the stage's config
//! (`DeployRecord::stage_config`); on rollback, and for a canary's fresh
//! baseline, the config the environment ran before
//! (`stage_rollback_config`), or "none" when it ran none and the deploy
//! brought one. Bundles are read whole from the store when a batch or a
//! rollback begins; a deploy never starts with a bundle that is not there.

use drover_common::proto::{ConfigBundle, RestartCommand, RollbackCommand};

use super::Driver;
use crate::deploy::deployments::DeployError;
use crate::deploy::record::DeployRecord;

/// What a restart or rollback command says about the host's config.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct HostConfig {
    /// Run with this bundle.
    pub bundle: Option<ConfigBundle>,
    /// Run with none (when `bundle` is absent).
    pub none: bool,
}

impl HostConfig {
    pub fn on_restart(&self, mut r: RestartCommand) -> RestartCommand {
        r.config = self.bundle.clone();
        r.no_config = self.none;
        r
    }

    pub fn on_rollback(&self, mut r: RollbackCommand) -> RollbackCommand {
        r.config = self.bundle.clone();
        r.no_config = self.none;
        r
    }
}

impl Driver {
    /// The config stage `stage`'s hosts get with the deploy's release.
    pub(super) async fn target_config(
        &self,
        rec: &DeployRecord,
        stage: usize,
    ) -> Result<HostConfig, DeployError> {
        Ok(HostConfig {
            bundle: self.bundle(rec, stage, rec.stage_config(stage)).await?,
            none: false,
        })
    }

    /// The config stage `stage`'s hosts return to.
    pub(super) async fn rollback_config(
        &self,
        rec: &DeployRecord,
        stage: usize,
    ) -> Result<HostConfig, DeployError> {
        let back = rec.stage_rollback_config(stage);
        Ok(HostConfig {
            bundle: self.bundle(rec, stage, back).await?,
            none: back.is_empty() && !rec.stage_config(stage).is_empty(),
        })
    }

    async fn bundle(
        &self,
        rec: &DeployRecord,
        stage: usize,
        digest: &str,
    ) -> Result<Option<ConfigBundle>, DeployError> {
        let Some(env) = rec.snapshot.stages.get(stage) else {
            return Ok(None);
        };
        let found = crate::configs::load(
            self.ledger.store().as_ref(),
            self.ledger.keys(),
            &rec.service,
            &env.name,
            digest,
        )
        .await?;
        if found.is_none() && !digest.is_empty() {
            return Err(DeployError::NotFound(format!(
                "config bundle {digest} of {} in {} is not in the store",
                rec.service, env.name
            )));
        }
        Ok(found)
    }
}
