//! Release trains on the Deployer API (StartTrain, GetTrain, ListTrains,
//! WatchTrain, AbortTrain; the trait impl in `deployer.rs` calls these),
//! and [`ForwardingMembers`]: how a train's driver starts and controls
//! its member deploys on their shards' leaders, here or forwarded, on the
//! authority of whoever started the train.

use std::sync::Arc;

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    DeployRef, ListTrainsRequest, ListTrainsResponse, StartDeployRequest, StartTrainRequest, Train,
    TrainRef,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::api::forward::{Forwarder, Route};
use crate::auth::{
    Authorizer, Caller, Permission, Scope, actor_with_note, identity_or_note,
    validate_idempotency_key, validate_text,
};
use crate::deploy::deployments::{DeployError, Deployments};
use crate::deploy::machine::{Event, ReasonKind, Why};
use crate::deploy::train::{Member, TrainError};
use crate::deploy::trains::record::{MemberRecord, TrainRecord};
use crate::deploy::trains::{MemberError, Members, Trains};
use crate::error::ApiError;

/// What the train handlers need of the Deployer service.
pub struct TrainApi<'a> {
    pub trains: &'a Arc<Trains>,
    pub deployments: &'a Deployments,
    pub forward: &'a Forwarder,
    pub auth: &'a Authorizer,
}

impl TrainApi<'_> {
    pub async fn start(
        &self,
        request: Request<StartTrainRequest>,
    ) -> Result<Response<Train>, Status> {
        let r = request.get_ref();
        validate_text("name", &r.name, 128)?;
        validate_text("requester", &r.requester, 128)?;
        validate_idempotency_key(&r.idempotency_key)?;
        let members: Vec<Member> = r.members.iter().map(Member::from).collect();
        for m in &r.members {
            validate_text("members.pipeline", &m.pipeline, 253)?;
        }
        // Starting a train starts each member's deploy: the caller must be
        // allowed that for every one.
        let caller = self.caller_for_all(
            &request,
            r.members.iter().map(|m| m.pipeline.as_str()),
            Permission::DeploysStart,
        )?;
        let shard = self.trains.shard_of(&members).map_err(ApiError::from)?;
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.start_train(self.forward.forwarded(request)).await;
        }
        let mut req = request.into_inner();
        let started_by = identity_or_note(&caller, &req.requester);
        req.requester = actor_with_note(&caller, &req.requester);
        let rec = self
            .trains
            .start(req, &started_by, caller.header())
            .await
            .map_err(ApiError::from)?;
        let train = self.trains.get(&rec.id).await.map_err(ApiError::from)?;
        Ok(Response::new(train))
    }

    /// The caller, if it has `permission` on every one of `pipelines`
    /// (none: refused, as a train without members is).
    fn caller_for_all<'p, T>(
        &self,
        request: &Request<T>,
        pipelines: impl Iterator<Item = &'p str>,
        permission: Permission,
    ) -> Result<Caller, Status> {
        let mut caller = None;
        for pipeline in pipelines {
            caller = Some(self.auth.caller(
                request,
                permission,
                Scope {
                    pipeline: Some(pipeline),
                    environment: None,
                },
            )?);
        }
        caller.ok_or_else(|| Status::from(ApiError::Invalid(TrainError::Empty.to_string())))
    }

    /// Train `id` and the caller, if it has `permission` on every member.
    async fn may<T>(
        &self,
        request: &Request<T>,
        id: &str,
        permission: Permission,
    ) -> Result<(TrainRecord, Caller), Status> {
        let (rec, _) = self.trains.load(id).await.map_err(ApiError::from)?;
        let caller = self.caller_for_all(
            request,
            rec.members.iter().map(|m| m.pipeline.as_str()),
            permission,
        )?;
        Ok((rec, caller))
    }

    pub async fn get(&self, request: Request<TrainRef>) -> Result<Response<Train>, Status> {
        let id = request.get_ref().id.clone();
        self.may(&request, &id, Permission::DeploysRead).await?;
        Ok(Response::new(
            self.trains.get(&id).await.map_err(ApiError::from)?,
        ))
    }

    pub async fn list(
        &self,
        request: Request<ListTrainsRequest>,
    ) -> Result<Response<ListTrainsResponse>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
        let mut trains = self.trains.list().await.map_err(ApiError::from)?;
        trains.retain(|t| {
            t.members.iter().all(|m| {
                self.auth.allows(
                    &caller,
                    Permission::DeploysRead,
                    Scope {
                        pipeline: Some(&m.pipeline),
                        environment: None,
                    },
                )
            })
        });
        Ok(Response::new(ListTrainsResponse { trains }))
    }

    pub async fn watch(
        &self,
        request: Request<TrainRef>,
    ) -> Result<tokio::sync::mpsc::Receiver<Train>, Status> {
        let id = request.get_ref().id.clone();
        self.may(&request, &id, Permission::DeploysRead).await?;
        Ok(self.trains.watch(&id).await.map_err(ApiError::from)?)
    }

    pub async fn abort(&self, request: Request<TrainRef>) -> Result<Response<Train>, Status> {
        let r = request.get_ref();
        validate_text("requester", &r.requester, 128)?;
        validate_text("reason", &r.reason, 512)?;
        let id = r.id.clone();
        let (rec, caller) = self.may(&request, &id, Permission::DeploysControl).await?;
        let shard = self.deployments.shard_of_pipeline(rec.home());
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.abort_train(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let who = actor_with_note(&caller, &r.requester);
        self.trains
            .abort(&id, r.rollback, &who, &r.reason)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(
            self.trains.get(&id).await.map_err(ApiError::from)?,
        ))
    }
}

/// [`Members`] through the shard leaders: this coordinator's deploys
/// facade when it leads the member's shard, else the leader's Deployer API
/// with the train starter as the caller (believed from a coordinator's
/// certificate only).
pub struct ForwardingMembers {
    pub deployments: Arc<Deployments>,
    pub forward: Forwarder,
}

impl ForwardingMembers {
    /// Where a control of a `pipeline` deploy goes.
    async fn route(&self, pipeline: &str) -> Result<Option<DeployerClient<Channel>>, MemberError> {
        let shard = self.deployments.shard_of_pipeline(pipeline);
        match self.forward.route(shard, &Request::new(())).await {
            Ok(Route::Here) => Ok(None),
            Ok(Route::Leader(client)) => Ok(Some(client)),
            Err(status) => Err(MemberError::Retry(status.message().to_string())),
        }
    }

    fn actor(train: &TrainRecord) -> String {
        format!("{} (release train {})", train.started_by, train.id)
    }
}

fn local(e: DeployError) -> MemberError {
    match e {
        DeployError::NotLeader(t) => MemberError::Retry(t),
        DeployError::Store(s) => MemberError::Retry(s.to_string()),
        other => MemberError::Refused(other.to_string()),
    }
}

fn remote(s: Status) -> MemberError {
    match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated => MemberError::Refused(s.message().to_string()),
        _ => MemberError::Retry(s.message().to_string()),
    }
}

#[async_trait::async_trait]
impl Members for ForwardingMembers {
    async fn start(
        &self,
        train: &TrainRecord,
        member: &MemberRecord,
    ) -> Result<String, MemberError> {
        let req = StartDeployRequest {
            pipeline: member.pipeline.clone(),
            artifact: member.artifact.clone(),
            // One deploy per member per train, whoever asks and how often.
            idempotency_key: train.id.clone(),
            requester: format!("release train {}", train.id),
            train_id: train.id.clone(),
            ..Default::default()
        };
        match self.route(&member.pipeline).await? {
            None => self
                .deployments
                .start(req, &train.started_by)
                .await
                .map(|rec| rec.id)
                .map_err(local),
            Some(mut leader) => leader
                .start_deploy(self.forward.on_behalf_of(req, train.caller.as_deref()))
                .await
                .map(|r| r.into_inner().id)
                .map_err(remote),
        }
    }

    async fn abort(
        &self,
        train: &TrainRecord,
        deploy: &str,
        rollback: bool,
        reason: &str,
    ) -> Result<(), MemberError> {
        let (rec, _) = self.deployments.load(deploy).await.map_err(local)?;
        match self.route(&rec.pipeline).await? {
            None => {
                let event = Event::Abort {
                    rollback,
                    why: Why::new(ReasonKind::ByHand, reason),
                };
                self.deployments
                    .control(deploy, event, &Self::actor(train))
                    .await
                    .map(|_| ())
                    .map_err(local)
            }
            Some(mut leader) => {
                let req = DeployRef {
                    id: deploy.to_string(),
                    requester: format!("release train {}", train.id),
                    reason: reason.to_string(),
                    rollback,
                };
                leader
                    .abort_deploy(self.forward.on_behalf_of(req, train.caller.as_deref()))
                    .await
                    .map(|_| ())
                    .map_err(remote)
            }
        }
    }

    async fn roll_back(
        &self,
        train: &TrainRecord,
        deploy: &str,
        reason: &str,
    ) -> Result<(), MemberError> {
        let (rec, _) = self.deployments.load(deploy).await.map_err(local)?;
        match self.route(&rec.pipeline).await? {
            None => self
                .deployments
                .control(
                    deploy,
                    Event::Rollback(Why::new(ReasonKind::ByHand, reason)),
                    &Self::actor(train),
                )
                .await
                .map(|_| ())
                .map_err(local),
            Some(mut leader) => {
                let req = DeployRef {
                    id: deploy.to_string(),
                    requester: format!("release train {}", train.id),
                    reason: reason.to_string(),
                    rollback: true,
                };
                leader
                    .rollback_deploy(self.forward.on_behalf_of(req, train.caller.as_deref()))
                    .await
                    .map(|_| ())
                    .map_err(remote)
            }
        }
    }
}
