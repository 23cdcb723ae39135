//! Feature flags on the Deployer API (SetFlag, RollbackFlag, ListFlags;
//! the trait impl in `deployer.rs` calls these). Changing a flag needs
//! deploys.control on its pipeline and environment. Flags are not sharded:
//! any coordinator writes them (compared on the flag's revision).

use drover_common::proto::{
    FlagRef, FlagState, ListFlagsRequest, ListFlagsResponse, SetFlagRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::{Authorizer, Permission, Scope, actor_with_note, validate_text};
use crate::error::ApiError;
use crate::flags::Flags;

pub struct FlagApi<'a> {
    pub flags: &'a Flags,
    pub auth: &'a Authorizer,
}

impl FlagApi<'_> {
    pub async fn set(
        &self,
        request: Request<SetFlagRequest>,
    ) -> Result<Response<FlagState>, Status> {
        let r = request.get_ref();
        validate_text("requester", &r.requester, 128)?;
        let caller = self.auth.caller(
            &request,
            Permission::DeploysControl,
            Scope {
                pipeline: Some(&r.pipeline),
                environment: Some(&r.environment),
            },
        )?;
        let who = actor_with_note(&caller, &r.requester);
        let state = self
            .flags
            .set(request.into_inner(), &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(state))
    }

    pub async fn rollback(&self, request: Request<FlagRef>) -> Result<Response<FlagState>, Status> {
        let r = request.get_ref();
        validate_text("requester", &r.requester, 128)?;
        let caller = self.auth.caller(
            &request,
            Permission::DeploysControl,
            Scope {
                pipeline: Some(&r.pipeline),
                environment: Some(&r.environment),
            },
        )?;
        let who = actor_with_note(&caller, &r.requester);
        let state = self
            .flags
            .rollback(request.into_inner(), &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(state))
    }

    pub async fn list(
        &self,
        request: Request<ListFlagsRequest>,
    ) -> Result<Response<ListFlagsResponse>, Status> {
        let caller = self
            .auth
            .caller(&request, Permission::DeploysRead, Scope::default())?;
        let mut flags = self
            .flags
            .list(&request.get_ref().pipeline)
            .await
            .map_err(ApiError::from)?;
        flags.retain(|f| {
            self.auth.allows(
                &caller,
                Permission::DeploysRead,
                Scope {
                    pipeline: Some(&f.pipeline),
                    environment: None,
                },
            )
        });
        Ok(Response::new(ListFlagsResponse { flags }))
    }
}
