//! Deploys on the Deployer API: start, reads, the watch and the controls
//! (pause, resume, approve, abort, rollback, promote) and environments.
//! Every call is authorized against the deploy's pipeline and the stage it
//! stands at; writes go to the leader of the pipeline's shard. The trait
//! impl in `deployer.rs` calls these.

use std::future::Future;

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    Deploy, DeployEvent, DeployRef, ListDeploysRequest, ListDeploysResponse,
    ListEnvironmentsRequest, ListEnvironmentsResponse, StartDeployRequest,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::forward::{Forwarder, Route};
use crate::auth::{
    Authorizer, Caller, Permission, Scope, actor_with_note, identity_or_note,
    validate_idempotency_key, validate_text,
};
use crate::deploy::deployments::Deployments;
use crate::deploy::machine::{Event, ReasonKind, Why};
use crate::deploy::pipeline::Pipelines;
use crate::error::ApiError;

pub type WatchStream = std::pin::Pin<Box<dyn Stream<Item = Result<DeployEvent, Status>> + Send>>;

/// What the deploy handlers need of the Deployer service.
pub struct DeployApi<'a> {
    pub deployments: &'a Deployments,
    pub pipelines: &'a Pipelines,
    pub forward: &'a Forwarder,
    pub auth: &'a Authorizer,
}

/// Where a deploy control applies: its shard, pipeline and current stage
/// (with the roles that stage asks of its approvers).
struct DeployAt {
    shard: u32,
    pipeline: String,
    stage: String,
    approver_roles: Vec<String>,
}

impl DeployApi<'_> {
    /// The shard, pipeline and current stage of deploy `id`.
    async fn deploy_at(&self, id: &str) -> Result<DeployAt, Status> {
        let (rec, _) = self.deployments.load(id).await.map_err(ApiError::from)?;
        let stage = rec
            .snapshot
            .stages
            .get(rec.machine.stage)
            .or(rec.snapshot.stages.last());
        Ok(DeployAt {
            shard: self.deployments.shard_of_pipeline(&rec.pipeline),
            stage: stage.map(|s| s.name.clone()).unwrap_or_default(),
            approver_roles: stage.map(|s| s.approver_roles.clone()).unwrap_or_default(),
            pipeline: rec.pipeline,
        })
    }

    /// Checks `permission` on deploy `r.id` where it stands now, and the
    /// free-text fields; returns where it is and who asks (identity plus
    /// note, for the audit).
    async fn control_at(
        &self,
        request: &Request<DeployRef>,
        permission: Permission,
    ) -> Result<(DeployAt, Caller, String), Status> {
        let r = request.get_ref();
        validate_text("requester", &r.requester, 128)?;
        validate_text("reason", &r.reason, 512)?;
        let at = self.deploy_at(&r.id).await?;
        let caller = self.auth.caller(
            request,
            permission,
            Scope {
                pipeline: Some(&at.pipeline),
                environment: Some(&at.stage),
            },
        )?;
        let who = actor_with_note(&caller, &r.requester);
        Ok((at, caller, who))
    }

    pub async fn start_deploy(
        &self,
        request: Request<StartDeployRequest>,
    ) -> Result<Response<Deploy>, Status> {
        let r = request.get_ref();
        validate_text("requester", &r.requester, 128)?;
        validate_idempotency_key(&r.idempotency_key)?;
        validate_text("git_sha", &r.git_sha, 64)?;
        // Starting is checked against the first stage it would run.
        let first_stage = if r.from_stage.is_empty() {
            self.pipelines
                .get(&r.pipeline)
                .await
                .ok()
                .and_then(|p| p.stages.first().map(|s| s.name.clone()))
                .unwrap_or_default()
        } else {
            r.from_stage.clone()
        };
        let caller = self.auth.caller(
            &request,
            Permission::DeploysStart,
            Scope {
                pipeline: Some(&r.pipeline),
                environment: Some(&first_stage),
            },
        )?;
        let shard = self.deployments.shard_of_pipeline(&r.pipeline);
        if let Route::Leader(mut leader) = self.forward.route(shard, &request).await? {
            return leader.start_deploy(self.forward.forwarded(request)).await;
        }
        let mut req = request.into_inner();
        let started_by = identity_or_note(&caller, &req.requester);
        req.requester = actor_with_note(&caller, &req.requester);
        let rec = self
            .deployments
            .start(req, &started_by)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    pub async fn get_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let (rec, _) = self
            .deployments
            .load(&request.get_ref().id)
            .await
            .map_err(ApiError::from)?;
        self.auth.caller(
            &request,
            Permission::DeploysRead,
            Scope {
                pipeline: Some(&rec.pipeline),
                environment: None,
            },
        )?;
        Ok(Response::new(rec.to_proto()))
    }

    pub async fn list_deploys(
        &self,
        request: Request<ListDeploysRequest>,
    ) -> Result<Response<ListDeploysResponse>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
        let mut deploys = self
            .deployments
            .list(&request.get_ref().pipeline)
            .await
            .map_err(ApiError::from)?;
        deploys.retain(|d| {
            self.auth.allows(
                &caller,
                Permission::DeploysRead,
                Scope {
                    pipeline: Some(&d.pipeline),
                    environment: None,
                },
            )
        });
        Ok(Response::new(ListDeploysResponse {
            deploys: deploys.iter().map(|r| r.to_proto()).collect(),
        }))
    }

    pub async fn watch_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<WatchStream>, Status> {
        let at = self.deploy_at(&request.get_ref().id).await?;
        self.auth.caller(
            &request,
            Permission::DeploysRead,
            Scope {
                pipeline: Some(&at.pipeline),
                environment: None,
            },
        )?;
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

    /// Pause, resume, abort and rollback: deploys.control at the deploy's
    /// stage, then `forward` to the shard's leader when another
    /// coordinator leads it, else the machine `event` of the request and
    /// the one who asks, applied here.
    async fn by_control<Fut>(
        &self,
        request: Request<DeployRef>,
        forward: impl FnOnce(DeployerClient<Channel>, Request<DeployRef>) -> Fut,
        event: impl FnOnce(&DeployRef, &str) -> Event,
    ) -> Result<Response<Deploy>, Status>
    where
        Fut: Future<Output = Result<Response<Deploy>, Status>>,
    {
        let (at, _, who) = self
            .control_at(&request, Permission::DeploysControl)
            .await?;
        if let Route::Leader(leader) = self.forward.route(at.shard, &request).await? {
            return forward(leader, self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let event = event(&r, &who);
        let rec = self
            .deployments
            .control(&r.id, event, &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    pub async fn pause_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.by_control(
            request,
            |mut leader, r| async move { leader.pause_deploy(r).await },
            |_, _| Event::Pause,
        )
        .await
    }

    pub async fn resume_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.by_control(
            request,
            |mut leader, r| async move { leader.resume_deploy(r).await },
            |_, _| Event::Resume,
        )
        .await
    }

    pub async fn approve_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let (at, caller, who) = self
            .control_at(&request, Permission::DeploysApprove)
            .await?;
        // A stage may name the roles its approvers must hold.
        let roles = &at.approver_roles;
        let scope = Scope {
            pipeline: Some(&at.pipeline),
            environment: Some(&at.stage),
        };
        if !self.auth.holds_any_role(&caller, roles, scope) {
            return Err(ApiError::PermissionDenied(format!(
                "{} holds none of the roles stage {} requires of approvers ({})",
                caller.actor(),
                at.stage,
                roles.join(", ")
            ))
            .into());
        }
        if let Route::Leader(mut leader) = self.forward.route(at.shard, &request).await? {
            return leader.approve_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let approver = identity_or_note(&caller, &r.requester);
        let rec = self
            .deployments
            .approve(&r.id, &approver, &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    pub async fn abort_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.by_control(
            request,
            |mut leader, r| async move { leader.abort_deploy(r).await },
            |r, who| Event::Abort {
                rollback: r.rollback,
                why: by_hand("aborted", who, &r.reason),
            },
        )
        .await
    }

    pub async fn rollback_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        self.by_control(
            request,
            |mut leader, r| async move { leader.rollback_deploy(r).await },
            |r, who| Event::Rollback(by_hand("rolled back", who, &r.reason)),
        )
        .await
    }

    pub async fn promote_deploy(
        &self,
        request: Request<DeployRef>,
    ) -> Result<Response<Deploy>, Status> {
        let (at, _, who) = self
            .control_at(&request, Permission::DeploysControl)
            .await?;
        if let Route::Leader(mut leader) = self.forward.route(at.shard, &request).await? {
            return leader.promote_deploy(self.forward.forwarded(request)).await;
        }
        let r = request.into_inner();
        let rec = self
            .deployments
            .promote(&r.id, &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rec.to_proto()))
    }

    pub async fn list_environments(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        self.auth.caller(
            &request,
            Permission::DeploysRead,
            Scope {
                pipeline: Some(&request.get_ref().pipeline),
                environment: None,
            },
        )?;
        let environments = self
            .deployments
            .environments(&request.get_ref().pipeline)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListEnvironmentsResponse { environments }))
    }
}

/// Why a deploy was aborted or rolled back by hand: "{done} by {who}",
/// and their reason if they gave one.
fn by_hand(done: &str, who: &str, reason: &str) -> Why {
    let text = if reason.is_empty() {
        format!("{done} by {who}")
    } else {
        format!("{done} by {who}: {reason}")
    };
    Why::new(ReasonKind::ByHand, text)
}
