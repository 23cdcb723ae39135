//! Starting a deploy: what may be deployed through a pipeline (the
//! pipeline, the artifact on the origin and of its service), the link of
//! a release train's member, where the deploy starts (`from_stage`,
//! forced past stages it had not passed), and the start itself:
//! idempotent by key, one active deploy per pipeline, the record built by
//! `deploy::start::new_record` and written with its first audit events.

use drover_common::labels::Selector;
use drover_common::proto::{ConnectionState, Slot, StartDeployRequest};
use tracing::info;

use super::{DeployError, Deployments};
use crate::deploy::audit;
use crate::deploy::record::{DeployRecord, TrainLink};
use crate::deploy::start::{NewDeploy, new_record};

impl Deployments {
    /// The pipeline and the artifact's digest, if `artifact` may be
    /// deployed through `pipeline`: the pipeline exists, the artifact is
    /// on the origin and is of the pipeline's service.
    pub async fn startable(
        &self,
        pipeline: &str,
        artifact: &str,
    ) -> Result<
        (
            drover_common::proto::Pipeline,
            drover_common::artifact::Digest,
        ),
        DeployError,
    > {
        let (pipeline, digest, _) = self.startable_info(pipeline, artifact).await?;
        Ok((pipeline, digest))
    }

    pub(super) async fn startable_info(
        &self,
        pipeline: &str,
        artifact: &str,
    ) -> Result<
        (
            drover_common::proto::Pipeline,
            drover_common::artifact::Digest,
            drover_common::proto::ArtifactInfo,
        ),
        DeployError,
    > {
        let pipeline = self.pipelines.get(pipeline).await?;
        let digest: drover_common::artifact::Digest = artifact
            .parse()
            .map_err(|e| DeployError::Invalid(format!("artifact: {e}")))?;
        let info = self
            .blobs
            .info(&digest)
            .await
            .map_err(|e| DeployError::Invalid(e.to_string()))?
            .ok_or_else(|| {
                DeployError::Invalid(format!(
                    "artifact {digest} is not on the origin; push it first"
                ))
            })?;
        if info.service != pipeline.service {
            return Err(DeployError::Invalid(format!(
                "artifact {digest} is for service {:?}, pipeline {} deploys {:?}",
                info.service, pipeline.name, pipeline.service
            )));
        }
        Ok((pipeline, digest, info))
    }

    /// The link of a member deploy of `pipeline` with `artifact` to its
    /// release train: the train must name that pipeline with that
    /// artifact and still be running.
    async fn train_link(
        &self,
        train_id: &str,
        pipeline: &str,
        artifact: &str,
    ) -> Result<Option<TrainLink>, DeployError> {
        if train_id.is_empty() {
            return Ok(None);
        }
        let (train, _) = crate::deploy::trains::load(&self.ledger, train_id).await?;
        let member = train
            .member(pipeline)
            .filter(|m| m.artifact == artifact)
            .ok_or_else(|| {
                DeployError::Invalid(format!(
                    "release train {train_id} has no member {pipeline} with artifact {artifact}"
                ))
            })?;
        if train.phase != crate::deploy::train::TrainPhase::Running {
            return Err(DeployError::Conflict(format!(
                "release train {train_id} is {:?}; it starts nothing more",
                train.phase
            )));
        }
        Ok(Some(TrainLink {
            id: train_id.to_string(),
            holds: member.holds.clone(),
        }))
    }

    /// Starts a deploy of `artifact` through `pipeline`.
    pub async fn start(
        &self,
        req: StartDeployRequest,
        started_by: &str,
    ) -> Result<DeployRecord, DeployError> {
        // A config deploy's first stage is its bundle's environment, and
        // its only one.
        let (pipeline, digest, info, config_stage) = if req.config.is_empty() {
            let (p, d, i) = self.startable_info(&req.pipeline, &req.artifact).await?;
            (p, d, i, None)
        } else {
            let (p, d, i, stage) = self.config_startable(&req).await?;
            (p, d, i, Some(stage))
        };
        self.ledger.check_leader(&pipeline.name)?;
        if req.idempotency_key.len() > 128 {
            return Err(DeployError::Invalid(
                "idempotency_key is longer than 128 characters".into(),
            ));
        }
        if !req.idempotency_key.is_empty()
            && let Some(id) = self
                .ledger
                .by_idempotency_key(&pipeline.name, &req.idempotency_key)
                .await?
        {
            return Ok(self.ledger.load(&id).await?.0);
        }
        if let Some(active) = self.ledger.active(&pipeline.name).await? {
            return Err(DeployError::Conflict(format!(
                "pipeline {} already has an active deploy: {active}",
                pipeline.name
            )));
        }
        let train = self
            .train_link(&req.train_id, &pipeline.name, &digest.hex())
            .await?;
        let (first_stage, forced_past) = match config_stage {
            Some(stage) => (stage, Vec::new()),
            None => self.first_stage(&pipeline, &req, &digest).await?,
        };
        let mut environments = Vec::new();
        let mut environment_configs = Vec::new();
        let mut live_slots = Vec::new();
        let mut hosts = Vec::new();
        for stage in &pipeline.stages {
            let running = self.ledger.environment(&pipeline.name, &stage.name).await?;
            live_slots.push(running.as_ref().map_or(Slot::None, |e| e.live_slot()));
            environment_configs.push(
                running
                    .as_ref()
                    .map(|e| e.config.clone())
                    .unwrap_or_default(),
            );
            environments.push(running.map(|e| e.artifact).unwrap_or_default());
            let selector = Selector::parse(&stage.selector)
                .map_err(|e| DeployError::Invalid(e.to_string()))?;
            hosts.push(
                self.registry
                    .list(&selector)
                    .into_iter()
                    .filter(|h| h.state() == ConnectionState::Connected)
                    .collect(),
            );
        }
        let requester = req.requester.clone();
        let new = NewDeploy {
            id: format!(
                "{}-{}",
                pipeline.name,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            pipeline: &pipeline,
            hosts,
            artifact: digest.hex(),
            git_sha: if req.git_sha.is_empty() {
                info.git_sha
            } else {
                req.git_sha.clone()
            },
            known_good: self.ledger.known_good(&pipeline.name).await?,
            environments,
            live_slots,
            first_stage,
            forced_past,
            requester: requester.clone(),
            started_by: started_by.to_string(),
            idempotency_key: req.idempotency_key.clone(),
            train,
            config: req.config.clone(),
            environment_configs,
            now: self.ledger.now(),
        };
        let Some((rec, actions)) = new_record(new) else {
            return Err(DeployError::Invalid(format!(
                "no connected host matches any stage of pipeline {}",
                pipeline.name
            )));
        };
        let actor = if requester.is_empty() {
            "someone"
        } else {
            &requester
        };
        let mut events = vec![audit::started(&rec, actor, rec.created_at_unix_ms)];
        let pending = crate::deploy::machine::Machine::new(
            rec.machine.batches.clone(),
            rec.machine.approvals.clone(),
            false,
        );
        events.extend(audit::awaiting_approval(
            &pending,
            &rec,
            rec.created_at_unix_ms,
        ));
        if !self.ledger.create(&rec, &actions, events).await? {
            // Lost a race with another start: answer as if we had been second.
            return Box::pin(self.start(req, started_by)).await;
        }
        info!(deploy = %rec.id, pipeline = %rec.pipeline, artifact = %rec.artifact, "deploy started");
        self.driver.spawn(rec.id.clone());
        Ok(rec)
    }

    /// Where a deploy of `digest` starts: the first stage, or `from_stage`
    /// when the artifact passed every stage before it (or `force`); and the
    /// stages it was forced past.
    async fn first_stage(
        &self,
        pipeline: &drover_common::proto::Pipeline,
        req: &StartDeployRequest,
        digest: &drover_common::artifact::Digest,
    ) -> Result<(usize, Vec<String>), DeployError> {
        if req.from_stage.is_empty() {
            return Ok((0, Vec::new()));
        }
        let index = pipeline
            .stages
            .iter()
            .position(|s| s.name == req.from_stage)
            .ok_or_else(|| {
                let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
                DeployError::Invalid(format!(
                    "from_stage: pipeline {} has no stage {:?} (its stages: {})",
                    pipeline.name,
                    req.from_stage,
                    names.join(", ")
                ))
            })?;
        let mut unpassed = Vec::new();
        for stage in &pipeline.stages[..index] {
            if !self
                .ledger
                .passed(&pipeline.name, &stage.name, &digest.hex())
                .await?
            {
                unpassed.push(stage.name.clone());
            }
        }
        if !unpassed.is_empty() && !req.force {
            return Err(DeployError::Conflict(format!(
                "artifact {digest} has not passed {} of pipeline {}; deploy it there first, or force it (recorded)",
                unpassed.join(", "),
                pipeline.name
            )));
        }
        Ok((index, unpassed))
    }
}
