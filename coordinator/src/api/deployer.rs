//! `drover.v1.Deployer`: the API of CI and SREs: hosts, single commands and
//! pipelines (deploys next).

use std::sync::Arc;
use std::time::Duration;

use drover_common::ids::validate_host_id;
use drover_common::labels::Selector;
use drover_common::proto::deployer_server::Deployer;
use drover_common::proto::{
    Command, CommandUpdate, CoordinatorInfo, CreatePipelineRequest, Deploy, DeployEvent, DeployRef,
    GetAuditRequest, GetAuditResponse, GetHostRequest, GetPipelineRequest, Host,
    ListCoordinatorsRequest, ListCoordinatorsResponse, ListDeploysRequest, ListDeploysResponse,
    ListEnvironmentsRequest, ListEnvironmentsResponse, ListHostsRequest, ListHostsResponse,
    ListPipelinesRequest, ListPipelinesResponse, Pipeline, SendCommandRequest, StartDeployRequest,
    UpdatePipelineRequest, WhatWasRunningRequest, WhatWasRunningResponse, command,
};
use tokio_stream::{Stream, StreamExt};

use crate::deploy::deployments::Deployments;
use crate::deploy::machine::Event;
use tonic::{Request, Response, Status};

use crate::api::forward::{Forwarder, Route};
use crate::deploy::pipeline::Pipelines;
use crate::error::ApiError;
use crate::fleet::{PendingCommands, Registry, SendError};

const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub struct DeployerService {
    pub registry: Arc<Registry>,
    pub pending: Arc<PendingCommands>,
    /// Where agents fetch artifacts from this origin (Pull sources default).
    pub origin_addr: String,
    pub pipelines: Arc<Pipelines>,
    pub deployments: Arc<Deployments>,
    /// Writes for a shard another coordinator leads go to that leader.
    pub forward: Forwarder,
    /// Shard leadership and membership (epochs for hand-sent commands,
    /// ListCoordinators).
    pub leases: Arc<crate::ha::leases::ShardLeases>,
}

impl DeployerService {
    /// The shard of deploy `id`'s pipeline.
    async fn deploy_shard(&self, id: &str) -> Result<u32, Status> {
        let (rec, _) = self.deployments.load(id).await.map_err(ApiError::from)?;
        Ok(self.deployments.shard_of_pipeline(&rec.pipeline))
    }
}

type WatchStream = std::pin::Pin<Box<dyn Stream<Item = Result<DeployEvent, Status>> + Send>>;

fn who(r: &DeployRef) -> &str {
    if r.requester.is_empty() {
        "someone"
    } else {
        &r.requester
    }
}

fn validate_command(cmd: &Command) -> Result<(), ApiError> {
    if cmd.command_id.is_empty() || cmd.command_id.len() > 256 {
        return Err(ApiError::Invalid(
            "command.command_id must be 1-256 characters".into(),
        ));
    }
    match &cmd.action {
        None => Err(ApiError::Invalid(
            "command has no action (pull, verify, restart or rollback)".into(),
        )),
        Some(command::Action::Pull(p)) if p.artifact.is_empty() => Err(ApiError::Invalid(
            "pull.artifact (a sha256) is required".into(),
        )),
        Some(command::Action::Restart(r)) if r.artifact.is_empty() => Err(ApiError::Invalid(
            "restart.artifact (a sha256) is required".into(),
        )),
        Some(_) => Ok(()),
    }
}

#[tonic::async_trait]
impl Deployer for DeployerService {
    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let selector = Selector::parse(&request.get_ref().selector).map_err(ApiError::from)?;
        let hosts = self.registry.list(&selector);
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let host_id = &request.get_ref().host_id;
        validate_host_id(host_id).map_err(ApiError::from)?;
        let host = self.registry.get(host_id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no host {host_id:?} has connected to this coordinator since it started"
            ))
        })?;
        Ok(Response::new(host))
    }

    async fn send_command(
        &self,
        request: Request<SendCommandRequest>,
    ) -> Result<Response<CommandUpdate>, Status> {
        let req = request.into_inner();
        validate_host_id(&req.host_id).map_err(ApiError::from)?;
        let mut cmd = req
            .command
            .ok_or_else(|| ApiError::Invalid("command is required".into()))?;
        validate_command(&cmd)?;
        // A command sent by hand without an epoch carries its shard's
        // current leader epoch, so agents that know that leader accept it.
        if cmd.epoch == 0
            && let Some(epoch) = self.leases.current_epoch(cmd.shard).await
        {
            cmd.epoch = epoch;
        }
        if let Some(command::Action::Pull(p)) = &mut cmd.action
            && p.sources.is_empty()
        {
            p.sources.push(self.origin_addr.clone());
        }
        let timeout = match req.timeout_ms {
            0 => DEFAULT_COMMAND_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        match self
            .pending
            .send(&self.registry, &req.host_id, cmd, timeout)
            .await
        {
            Ok(update) => Ok(Response::new(update)),
            Err(e @ (SendError::NotConnected(_) | SendError::StreamClosed(_))) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e @ SendError::Timeout(..)) => Err(Status::deadline_exceeded(e.to_string())),
        }
    }

    async fn create_pipeline(
        &self,
        request: Request<CreatePipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        let spec = request
            .into_inner()
            .pipeline
            .ok_or_else(|| ApiError::Invalid("pipeline is required".into()))?;
        let p = self.pipelines.create(spec).await.map_err(ApiError::from)?;
        tracing::info!(pipeline = %p.name, version = p.version, "pipeline created");
        Ok(Response::new(p))
    }

    async fn update_pipeline(
        &self,
        request: Request<UpdatePipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        let req = request.into_inner();
        let spec = req
            .pipeline
            .ok_or_else(|| ApiError::Invalid("pipeline is required".into()))?;
        let p = self
            .pipelines
            .update(spec, req.expected_version)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(pipeline = %p.name, version = p.version, "pipeline updated");
        Ok(Response::new(p))
    }

    async fn get_pipeline(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        let p = self
            .pipelines
            .get(&request.get_ref().name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(p))
    }

    async fn list_pipelines(
        &self,
        _: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let pipelines = self.pipelines.list().await.map_err(ApiError::from)?;
        Ok(Response::new(ListPipelinesResponse { pipelines }))
    }

    async fn start_deploy(
        &self,
        request: Request<StartDeployRequest>,
    ) -> Result<Response<Deploy>, Status> {
        let shard = self
            .deployments
            .shard_of_pipeline(&request.get_ref().pipeline);
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.start_deploy(self.forward.forwarded(request)).await;
        }
        let rec = self
            .deployments
            .start(request.into_inner())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn get_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        let (rec, _) = self
            .deployments
            .load(&request.get_ref().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_deploys(
        &self,
        request: Request<ListDeploysRequest>,
    ) -> Result<Response<ListDeploysResponse>, Status> {
        let deploys = self
            .deployments
            .list(&request.get_ref().pipeline)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListDeploysResponse {
            deploys: deploys.iter().map(|r| r.to_proto()).collect(),
        }))
    }

    type WatchDeployStream = WatchStream;

    async fn watch_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = request.into_inner().id;
        let records = self.deployments.watch(&id).await.map_err(ApiError::from)?;
        // The stream ends after the first terminal state.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut records = std::pin::pin!(records);
            while let Some(rec) = records.next().await {
                let terminal = rec.machine.phase.is_terminal();
                let event = DeployEvent {
                    message: format!(
                        "{:?} stage {} batch {}",
                        rec.machine.phase, rec.machine.stage, rec.machine.batch
                    ),
                    deploy: Some(rec.to_proto()),
                };
                if tx.send(Ok(event)).await.is_err() || terminal {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.pause_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let rec = self
            .deployments
            .control(&r.id, Event::Pause, who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn resume_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.resume_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let rec = self
            .deployments
            .control(&r.id, Event::Resume, who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn approve_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.approve_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let rec = self
            .deployments
            .control(&r.id, Event::Approve, who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn abort_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.abort_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let reason = format!(
            "aborted by {}{}",
            who(&r),
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        );
        let event = Event::Abort {
            rollback: r.rollback,
            reason,
        };
        let rec = self
            .deployments
            .control(&r.id, event, who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn rollback_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader
                .rollback_deploy(self.forward.forwarded(request))
                .await;
        }
        let r = request.into_inner();
        let reason = format!(
            "rolled back by {}{}",
            who(&r),
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        );
        let rec = self
            .deployments
            .control(&r.id, Event::Rollback(reason), who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn promote_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let shard = self.deploy_shard(&request.get_ref().id).await?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.promote_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let rec = self
            .deployments
            .promote(&r.id, who(&r))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_environments(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        let environments = self
            .deployments
            .environments(&request.get_ref().pipeline)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListEnvironmentsResponse { environments }))
    }

    async fn list_coordinators(
        &self,
        _: Request<ListCoordinatorsRequest>,
    ) -> Result<Response<ListCoordinatorsResponse>, Status> {
        let (members, leaderless) = self
            .leases
            .overview()
            .await
            .map_err(|e| ApiError::from(crate::deploy::deployments::DeployError::from(e)))?;
        Ok(Response::new(ListCoordinatorsResponse {
            coordinators: members
                .into_iter()
                .map(|(m, shards)| CoordinatorInfo {
                    id: m.id,
                    address: m.address,
                    ready: m.ready,
                    shards,
                })
                .collect(),
            shard_count: self.leases.shards,
            leaderless_shards: leaderless,
        }))
    }

    async fn get_audit(
        &self,
        request: Request<GetAuditRequest>,
    ) -> Result<Response<GetAuditResponse>, Status> {
        let r = request.into_inner();
        drover_common::ids::validate_service(&r.service).map_err(ApiError::Invalid)?;
        let events = self
            .deployments
            .audit_log(&r.service, r.since_unix_ms, r.until_unix_ms)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetAuditResponse { events }))
    }

    async fn what_was_running(
        &self,
        request: Request<WhatWasRunningRequest>,
    ) -> Result<Response<WhatWasRunningResponse>, Status> {
        let r = request.into_inner();
        drover_common::ids::validate_service(&r.service).map_err(ApiError::Invalid)?;
        let at = if r.at_unix_ms == 0 {
            drover_common::time::now_unix_ms()
        } else {
            r.at_unix_ms
        };
        let answer = self
            .deployments
            .what_was_running(&r.service, at)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(answer))
    }
}
