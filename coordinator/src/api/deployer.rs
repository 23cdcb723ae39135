//! `drover.v1.Deployer`: the API of CI and SREs. Hosts for now.

use std::sync::Arc;

use drover_common::ids::validate_host_id;
use drover_common::labels::Selector;
use drover_common::proto::deployer_server::Deployer;
use drover_common::proto::{GetHostRequest, Host, ListHostsRequest, ListHostsResponse};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::fleet::Registry;

pub struct DeployerService {
    pub registry: Arc<Registry>,
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
}
