//! `drover.v1.Deployer`: the API of CI and SREs. Hosts, single commands,
//! pipelines, coordinators, audit and backups are served here; deploys and
//! their controls in `deploys.rs`, release trains in `trains.rs`,
//! notification subscriptions in `notifications.rs` (this trait impl
//! delegates to them). Every call is authorized first ([`crate::auth`]);
//! writes go to their shard's leader.

use std::sync::Arc;
use std::time::Duration;

use drover_common::ids::validate_host_id;
use drover_common::labels::Selector;
use drover_common::proto::deployer_server::Deployer;
use drover_common::proto::{
    Command, CommandUpdate, CoordinatorInfo, CreatePipelineRequest, DeleteSubscriptionRequest,
    Deploy, DeployRef, GetAuditRequest, GetAuditResponse, GetHostRequest, GetPipelineRequest, Host,
    ListCoordinatorsRequest, ListCoordinatorsResponse, ListDeploysRequest, ListDeploysResponse,
    ListEnvironmentsRequest, ListEnvironmentsResponse, ListHostsRequest, ListHostsResponse,
    ListPipelinesRequest, ListPipelinesResponse, ListSubscriptionsRequest,
    ListSubscriptionsResponse, ListTrainsRequest, ListTrainsResponse, NotificationsStatusRequest,
    NotificationsStatusResponse, Pipeline, PutSubscriptionRequest, SendCommandRequest,
    StartDeployRequest, StartTrainRequest, Subscription, Train, TrainRef, UpdatePipelineRequest,
    WhatWasRunningRequest, WhatWasRunningResponse, command,
};
use tokio_stream::{Stream, StreamExt};

use crate::deploy::deployments::Deployments;
use tonic::{Request, Response, Status};

use crate::api::forward::{Forwarder, Route};
use crate::auth::{Authorizer, Permission, Scope};
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
    /// Who may do what.
    pub auth: Arc<Authorizer>,
    /// The embedded store, for BackupStore (`None` with etcd).
    pub embedded: Option<crate::store::embedded::EmbeddedStore>,
    /// Release trains.
    pub trains: Arc<crate::deploy::trains::Trains>,
    /// Notification subscriptions.
    pub notifier: Arc<crate::notify::Notifier>,
    /// Feature flags.
    pub flags: Arc<crate::flags::Flags>,
    /// Config bundles.
    pub configs: Arc<crate::configs::Configs>,
}

impl DeployerService {
    /// Checks pipelines.write on the pipeline a create or update names.
    fn may_write_pipeline<T>(
        &self,
        request: &Request<T>,
        spec: Option<&Pipeline>,
    ) -> Result<(), ApiError> {
        let name = spec.map(|p| p.name.as_str()).unwrap_or_default();
        self.auth.caller(
            request,
            Permission::PipelinesWrite,
            Scope {
                pipeline: Some(name),
                environment: None,
            },
        )?;
        Ok(())
    }

    fn deploy_api(&self) -> crate::api::deploys::DeployApi<'_> {
        crate::api::deploys::DeployApi {
            deployments: &self.deployments,
            pipelines: &self.pipelines,
            forward: &self.forward,
            auth: &self.auth,
        }
    }

    fn config_api(&self) -> crate::api::configs::ConfigApi<'_> {
        crate::api::configs::ConfigApi {
            configs: &self.configs,
            auth: &self.auth,
            now: self.deployments.ledger().now(),
        }
    }

    fn flag_api(&self) -> crate::api::flags::FlagApi<'_> {
        crate::api::flags::FlagApi {
            flags: &self.flags,
            auth: &self.auth,
        }
    }

    fn notification_api(&self) -> crate::api::notifications::NotificationApi<'_> {
        crate::api::notifications::NotificationApi {
            notifier: &self.notifier,
            pipelines: &self.pipelines,
            auth: &self.auth,
        }
    }

    fn train_api(&self) -> crate::api::trains::TrainApi<'_> {
        crate::api::trains::TrainApi {
            trains: &self.trains,
            deployments: &self.deployments,
            forward: &self.forward,
            auth: &self.auth,
        }
    }

    /// The shard that fences hand-sent commands for `service`: that of a
    /// pipeline deploying it, else of the service's name.
    async fn shard_of_service(&self, service: &str) -> u32 {
        let pipelines = self.pipelines.list().await.unwrap_or_default();
        let name = pipelines
            .iter()
            .filter(|p| p.service == service)
            .map(|p| p.name.as_str())
            .min()
            .unwrap_or(service);
        self.deployments.shard_of_pipeline(name)
    }
}

/// The service a command acts on.
fn service_of(cmd: &Command) -> &str {
    match &cmd.action {
        Some(command::Action::Pull(p)) => &p.service,
        Some(command::Action::Verify(v)) => &v.service,
        Some(command::Action::Restart(r)) => &r.service,
        Some(command::Action::Rollback(r)) => &r.service,
        Some(command::Action::Stop(s)) => &s.service,
        None => "",
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
            "command has no action (pull, verify, restart, rollback or stop)".into(),
        )),
        Some(command::Action::Pull(p)) if p.artifact.is_empty() => Err(ApiError::Invalid(
            "pull.artifact (a sha256) is required".into(),
        )),
        Some(command::Action::Restart(r)) if r.artifact.is_empty() => Err(ApiError::Invalid(
            "restart.artifact (a sha256) is required".into(),
        )),
        Some(_) => drover_common::ids::validate_service(service_of(cmd)).map_err(ApiError::Invalid),
    }
}

/// Hosts per ListHosts page when the request says 0, and the most.
const DEFAULT_HOSTS_PAGE: usize = 1000;
const MAX_HOSTS_PAGE: usize = 5000;

#[tonic::async_trait]
impl Deployer for DeployerService {
    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.auth
            .caller(&request, Permission::HostsRead, Scope::default())?;
        let req = request.get_ref();
        let selector = Selector::parse(&req.selector).map_err(ApiError::from)?;
        let page_size = match req.page_size {
            0 => DEFAULT_HOSTS_PAGE,
            n if n as usize > MAX_HOSTS_PAGE => {
                return Err(ApiError::Invalid(format!(
                    "page_size {n} is over the most, {MAX_HOSTS_PAGE}"
                ))
                .into());
            }
            n => n as usize,
        };
        // The token is the last host id of the previous page: a host id
        // (validated), so a page never starts anywhere a client made up.
        if !req.page_token.is_empty() {
            validate_host_id(&req.page_token)
                .map_err(|e| ApiError::Invalid(format!("page_token: {e}")))?;
        }
        let (hosts, next) = self.registry.page(&selector, &req.page_token, page_size);
        Ok(Response::new(ListHostsResponse {
            hosts,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        self.auth
            .caller(&request, Permission::HostsRead, Scope::default())?;
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
        let caller = self
            .auth
            .caller(&request, Permission::CommandsSend, Scope::default())?;
        let req = request.get_ref();
        validate_host_id(&req.host_id).map_err(ApiError::from)?;
        let cmd = req
            .command
            .as_ref()
            .ok_or_else(|| ApiError::Invalid("command is required".into()))?;
        validate_command(cmd)?;
        // Fenced like a deploy: the leader of the service's shard sends it
        // with its own epoch; shard, epoch and sources from the caller are
        // never used.
        let shard = self.shard_of_service(service_of(cmd)).await;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.send_command(self.forward.forwarded(request)).await;
        }
        let req = request.into_inner();
        let mut cmd = req.command.expect("checked above");
        let epoch = self
            .leases
            .leadership(shard)
            .map(|l| l.epoch)
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "this coordinator stopped leading shard {shard}; retry"
                ))
            })?;
        cmd.shard = shard;
        cmd.epoch = epoch;
        if let Some(command::Action::Pull(p)) = &mut cmd.action {
            *p = self
                .deployments
                .pull_command(&p.service, &p.artifact, &req.host_id)
                .await;
        }
        tracing::info!(
            actor = %caller.actor(),
            host = %req.host_id,
            command = %cmd.command_id,
            service = service_of(&cmd),
            shard,
            epoch,
            "command sent by hand"
        );
        self.deployments
            .audit_command(service_of(&cmd), &caller.actor(), &req.host_id, &cmd)
            .await
            .map_err(ApiError::from)?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_COMMAND_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        let pulled = match &cmd.action {
            Some(command::Action::Pull(p)) => Some(p.artifact.clone()),
            _ => None,
        };
        match self
            .pending
            .send(&self.registry, &req.host_id, cmd, timeout)
            .await
        {
            Ok(update) => {
                // The tracker may name the host at once (tracker rule 1).
                if let Some(artifact) = pulled
                    && update.status() == drover_common::proto::CommandStatus::Succeeded
                {
                    self.registry.add_held(&req.host_id, &artifact);
                }
                Ok(Response::new(update))
            }
            Err(e @ (SendError::NotConnected(_) | SendError::StreamClosed(_))) => {
                Err(Status::from(ApiError::Unavailable(e.to_string())))
            }
            Err(e @ SendError::Timeout(..)) => Err(Status::from(ApiError::TimedOut(e.to_string()))),
            Err(e @ SendError::Unfenced(..)) => {
                Err(Status::from(ApiError::Conflict(e.to_string())))
            }
        }
    }

    async fn create_pipeline(
        &self,
        request: Request<CreatePipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        self.may_write_pipeline(&request, request.get_ref().pipeline.as_ref())?;
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
        self.may_write_pipeline(&request, request.get_ref().pipeline.as_ref())?;
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
        self.auth.caller(
            &request,
            Permission::PipelinesRead,
            Scope {
                pipeline: Some(&request.get_ref().name),
                environment: None,
            },
        )?;
        let p = self
            .pipelines
            .get(&request.get_ref().name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(p))
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::PipelinesRead, Scope::default())?;
        let mut pipelines = self.pipelines.list().await.map_err(ApiError::from)?;
        // Only what the caller may see.
        pipelines.retain(|p| {
            self.auth.allows(
                &caller,
                Permission::PipelinesRead,
                Scope {
                    pipeline: Some(&p.name),
                    environment: None,
                },
            )
        });
        Ok(Response::new(ListPipelinesResponse { pipelines }))
    }

    async fn start_deploy(
        &self,
        request: Request<StartDeployRequest>,
    ) -> Result<Response<Deploy>, Status> {
        self.deploy_api().start_deploy(request).await
    }

    async fn get_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        self.deploy_api().get_deploy(request).await
    }

    async fn list_deploys(
        &self,
        request: Request<ListDeploysRequest>,
    ) -> Result<Response<ListDeploysResponse>, Status> {
        self.deploy_api().list_deploys(request).await
    }

    async fn start_train(
        &self,
        request: Request<StartTrainRequest>,
    ) -> Result<Response<Train>, Status> {
        self.train_api().start(request).await
    }

    async fn get_train(&self, request: Request<TrainRef>) -> Result<Response<Train>, Status> {
        self.train_api().get(request).await
    }

    async fn list_trains(
        &self,
        request: Request<ListTrainsRequest>,
    ) -> Result<Response<ListTrainsResponse>, Status> {
        self.train_api().list(request).await
    }

    type WatchTrainStream = std::pin::Pin<Box<dyn Stream<Item = Result<Train, Status>> + Send>>;

    async fn watch_train(
        &self,
        request: Request<TrainRef>,
    ) -> Result<Response<Self::WatchTrainStream>, Status> {
        let rx = self.train_api().watch(request).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        )))
    }

    async fn set_flag(
        &self,
        request: Request<drover_common::proto::SetFlagRequest>,
    ) -> Result<Response<drover_common::proto::FlagState>, Status> {
        self.flag_api().set(request).await
    }

    async fn rollback_flag(
        &self,
        request: Request<drover_common::proto::FlagRef>,
    ) -> Result<Response<drover_common::proto::FlagState>, Status> {
        self.flag_api().rollback(request).await
    }

    async fn push_config(
        &self,
        request: Request<drover_common::proto::PushConfigRequest>,
    ) -> Result<Response<drover_common::proto::ConfigVersion>, Status> {
        self.config_api().push(request).await
    }

    async fn list_configs(
        &self,
        request: Request<drover_common::proto::ListConfigsRequest>,
    ) -> Result<Response<drover_common::proto::ListConfigsResponse>, Status> {
        self.config_api().list(request).await
    }

    async fn list_flags(
        &self,
        request: Request<drover_common::proto::ListFlagsRequest>,
    ) -> Result<Response<drover_common::proto::ListFlagsResponse>, Status> {
        self.flag_api().list(request).await
    }

    async fn put_subscription(
        &self,
        request: Request<PutSubscriptionRequest>,
    ) -> Result<Response<Subscription>, Status> {
        self.notification_api().put(request).await
    }

    async fn delete_subscription(
        &self,
        request: Request<DeleteSubscriptionRequest>,
    ) -> Result<Response<Subscription>, Status> {
        self.notification_api().delete(request).await
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        self.notification_api().list(request).await
    }

    async fn notifications_status(
        &self,
        request: Request<NotificationsStatusRequest>,
    ) -> Result<Response<NotificationsStatusResponse>, Status> {
        self.notification_api().status(request).await
    }

    async fn abort_train(&self, request: Request<TrainRef>) -> Result<Response<Train>, Status> {
        self.train_api().abort(request).await
    }

    type WatchDeployStream = crate::api::deploys::WatchStream;

    async fn watch_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Self::WatchDeployStream>, Status> {
        self.deploy_api().watch_deploy(request).await
    }

    async fn pause_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        self.deploy_api().pause_deploy(request).await
    }

    async fn resume_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        self.deploy_api().resume_deploy(request).await
    }

    async fn approve_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.deploy_api().approve_deploy(request).await
    }

    async fn abort_deploy(&self, request: Request<DeployRef>) -> Result<Response<Deploy>, Status> {
        self.deploy_api().abort_deploy(request).await
    }

    async fn rollback_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.deploy_api().rollback_deploy(request).await
    }

    async fn promote_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.deploy_api().promote_deploy(request).await
    }

    async fn list_environments(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        self.deploy_api().list_environments(request).await
    }

    type BackupStoreStream = crate::api::store_backup::BackupStream;

    async fn backup_store(
        &self,
        request: Request<drover_common::proto::BackupStoreRequest>,
    ) -> Result<Response<Self::BackupStoreStream>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::StoreBackup, Scope::default())?;
        tracing::info!(actor = %caller.actor(), "store backup");
        crate::api::store_backup::stream(self.embedded.as_ref())
            .await
            .map(Response::new)
    }

    async fn list_coordinators(
        &self,
        request: Request<ListCoordinatorsRequest>,
    ) -> Result<Response<ListCoordinatorsResponse>, Status> {
        self.auth
            .caller(&request, Permission::HostsRead, Scope::default())?;
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
        self.auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
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
        self.auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
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
