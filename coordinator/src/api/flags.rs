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
    /// Who changes a flag of `pipeline`'s `environment`, if they may
    /// (deploys.control there); the requester's note validated.
    fn changer<T>(
        &self,
        request: &Request<T>,
        requester: &str,
        pipeline: &str,
        environment: &str,
    ) -> Result<String, Status> {
        validate_text("requester", requester, 128)?;
        let caller = self.auth.caller(
            request,
            Permission::DeploysControl,
            Scope {
                pipeline: Some(pipeline),
                environment: Some(environment),
            },
        )?;
        Ok(actor_with_note(&caller, requester))
    }

    pub async fn set(
        &self,
        request: Request<SetFlagRequest>,
    ) -> Result<Response<FlagState>, Status> {
        let r = request.get_ref();
        let who = self.changer(&request, &r.requester, &r.pipeline, &r.environment)?;
        let state = self
            .flags
            .set(request.into_inner(), &who)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(state))
    }

    pub async fn rollback(&self, request: Request<FlagRef>) -> Result<Response<FlagState>, Status> {
        let r = request.get_ref();
        let who = self.changer(&request, &r.requester, &r.pipeline, &r.environment)?;
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
