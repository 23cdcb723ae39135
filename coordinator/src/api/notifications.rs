//! Notification subscriptions on the Deployer API (PutSubscription,
//! DeleteSubscription, ListSubscriptions, NotificationsStatus; the trait
//! impl in `deployer.rs` calls these). Subscriptions are not sharded: any
//! coordinator writes them; the leader of shard 0 delivers.

use drover_common::proto::{
    DeleteSubscriptionRequest, ListSubscriptionsRequest, ListSubscriptionsResponse,
    NotificationsStatusRequest, NotificationsStatusResponse, PutSubscriptionRequest, Subscription,
};
use tonic::{Request, Response, Status};

use crate::auth::{Authorizer, Permission, Scope};
use crate::deploy::pipeline::Pipelines;
use crate::error::ApiError;
use crate::notify::Notifier;

pub struct NotificationApi<'a> {
    pub notifier: &'a Notifier,
    pub pipelines: &'a Pipelines,
    pub auth: &'a Authorizer,
}

impl NotificationApi<'_> {
    pub async fn put(
        &self,
        request: Request<PutSubscriptionRequest>,
    ) -> Result<Response<Subscription>, Status> {
        let sub = request
            .get_ref()
            .subscription
            .clone()
            .ok_or_else(|| ApiError::Invalid("subscription: missing".into()))?;
        self.auth.caller(
            &request,
            Permission::PipelinesWrite,
            Scope {
                pipeline: Some(&sub.pipeline),
                environment: None,
            },
        )?;
        if !sub.pipeline.is_empty() {
            self.pipelines
                .get(&sub.pipeline)
                .await
                .map_err(|e| ApiError::Invalid(format!("pipeline: {e}")))?;
        }
        Ok(Response::new(
            self.notifier.put(sub).await.map_err(ApiError::from)?,
        ))
    }

    pub async fn delete(
        &self,
        request: Request<DeleteSubscriptionRequest>,
    ) -> Result<Response<Subscription>, Status> {
        self.auth
            .caller(&request, Permission::PipelinesWrite, Scope::default())?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.notifier.delete(&name).await.map_err(ApiError::from)?,
        ))
    }

    pub async fn list(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        self.auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
        let subscriptions = self.notifier.list().await.map_err(ApiError::from)?;
        Ok(Response::new(ListSubscriptionsResponse { subscriptions }))
    }

    pub async fn status(
        &self,
        request: Request<NotificationsStatusRequest>,
    ) -> Result<Response<NotificationsStatusResponse>, Status> {
        self.auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
        Ok(Response::new(
            self.notifier.status().await.map_err(ApiError::from)?,
        ))
    }
}
