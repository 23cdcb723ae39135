//! Config bundles on the Deployer API (PushConfig, ListConfigs; the trait
//! impl in `deployer.rs` calls these). Pushing needs artifacts.push in the
//! bundle's environment; listing needs artifacts.read. Bundles are not
//! sharded: any coordinator writes one (once, compared on its key).

use drover_common::proto::{
    ConfigVersion, ListConfigsRequest, ListConfigsResponse, PushConfigRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::{Authorizer, Permission, Scope};
use crate::configs::Configs;
use crate::error::ApiError;

pub struct ConfigApi<'a> {
    pub configs: &'a Configs,
    pub auth: &'a Authorizer,
    /// Now, unix ms (when a version was first pushed).
    pub now: u64,
}

impl ConfigApi<'_> {
    pub async fn push(
        &self,
        request: Request<PushConfigRequest>,
    ) -> Result<Response<ConfigVersion>, Status> {
        let environment = request
            .get_ref()
            .bundle
            .as_ref()
            .map(|b| b.environment.clone())
            .unwrap_or_default();
        let caller = self.auth.caller(
            &request,
            Permission::ArtifactsPush,
            Scope {
                pipeline: None,
                environment: Some(&environment),
            },
        )?;
        let bundle = request
            .into_inner()
            .bundle
            .ok_or_else(|| ApiError::Invalid("bundle: missing".into()))?;
        let version = self
            .configs
            .push(bundle, &caller.actor(), self.now)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(version))
    }

    pub async fn list(
        &self,
        request: Request<ListConfigsRequest>,
    ) -> Result<Response<ListConfigsResponse>, Status> {
        self.auth
            .caller(&request, Permission::ArtifactsRead, Scope::default())?;
        let r = request.get_ref();
        if let Err(e) = drover_common::ids::validate_service(&r.service) {
            return Err(ApiError::Invalid(format!("service: {e}")).into());
        }
        let versions = self
            .configs
            .list(&r.service, &r.environment)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListConfigsResponse { versions }))
    }
}
