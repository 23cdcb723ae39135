//! `drover.v1.Deployer`: the API of CI and SREs: hosts, single commands and
//! pipelines (deploys next).

use std::sync::Arc;
use std::time::Duration;

use drover_common::ids::validate_host_id;
use drover_common::labels::Selector;
use drover_common::proto::deployer_server::Deployer;
use drover_common::proto::{
    Command, CommandUpdate, CoordinatorMessage, CreatePipelineRequest, GetHostRequest,
    GetPipelineRequest, Host, ListHostsRequest, ListHostsResponse, ListPipelinesRequest,
    ListPipelinesResponse, Pipeline, SendCommandRequest, UpdatePipelineRequest, command,
    coordinator_message,
};
use tonic::{Request, Response, Status};

use crate::deploy::pipeline::Pipelines;
use crate::error::ApiError;
use crate::fleet::{PendingCommands, Registry};

const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub struct DeployerService {
    pub registry: Arc<Registry>,
    pub pending: Arc<PendingCommands>,
    /// Where agents fetch artifacts from this origin (Pull sources default).
    pub origin_addr: String,
    pub pipelines: Arc<Pipelines>,
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
        if let Some(command::Action::Pull(p)) = &mut cmd.action
            && p.sources.is_empty()
        {
            p.sources.push(self.origin_addr.clone());
        }
        let session = self.registry.session(&req.host_id).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "host {} is not connected to this coordinator",
                req.host_id
            ))
        })?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_COMMAND_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        let command_id = cmd.command_id.clone();
        let done = self.pending.wait(&req.host_id, &command_id);
        let message = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Command(cmd)),
        };
        if session.outbound.send(Box::new(Ok(message))).await.is_err() {
            self.pending.forget(&req.host_id, &command_id);
            return Err(ApiError::Unavailable(format!(
                "the stream of host {} closed",
                req.host_id
            ))
            .into());
        }
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(update)) => Ok(Response::new(update)),
            Ok(Err(_)) => Err(Status::internal("the command's waiter was dropped")),
            Err(_) => {
                self.pending.forget(&req.host_id, &command_id);
                Err(Status::deadline_exceeded(format!(
                    "no final result from host {} within {timeout:?}; the command may still finish: send the same command_id again to get its result",
                    req.host_id
                )))
            }
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
}
