//! Forwarding writes to the leader of their shard, so droverctl and grpcurl
//! can talk to any coordinator. Reads never need it: every coordinator
//! reads the same store and sees every agent.

use crate::error::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::tls::client::Dialer;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tracing::debug;

use crate::ha::leases::ShardLeases;
use crate::metrics::Metrics;

/// Metadata naming the coordinator that forwarded a request; a request
/// carrying it is never forwarded again (no loops while leadership moves).
pub const FORWARDED_BY: &str = "x-drover-forwarded-by";

pub struct Forwarder {
    leases: Arc<ShardLeases>,
    metrics: Metrics,
    /// How leaders are dialled (with this coordinator's certificate under TLS).
    dialer: Dialer,
    /// One lazily connected channel per leader address.
    channels: Mutex<HashMap<String, Channel>>,
}

/// Where a write for a shard is served.
pub enum Route {
    /// This coordinator leads the shard.
    Here,
    /// The leader's client and the request to send it.
    Leader(DeployerClient<Channel>),
}

impl Forwarder {
    pub fn new(leases: Arc<ShardLeases>, metrics: Metrics, dialer: Dialer) -> Forwarder {
        Forwarder {
            leases,
            metrics,
            dialer,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Decides where a write for `shard` goes.
    pub async fn route<T>(&self, shard: u32, request: &Request<T>) -> Result<Route, Status> {
        if self.leases.leadership(shard).is_some() {
            return Ok(Route::Here);
        }
        if let Some(by) = request.metadata().get(FORWARDED_BY) {
            return Err(Status::from(ApiError::Unavailable(format!(
                "coordinator {} forwarded this request for shard {shard} here, but {} does not lead it (leadership is moving); retry",
                by.to_str().unwrap_or("?"),
                self.leases.id()
            ))));
        }
        let leader = self.leases.leader_of(shard).await.ok_or_else(|| {
            Status::from(ApiError::Unavailable(format!(
                "no coordinator leads shard {shard} right now (a failover is under way); retry in a few seconds"
            )))
        })?;
        if leader.id == self.leases.id() || leader.address.is_empty() {
            return Err(Status::from(ApiError::Unavailable(format!(
                "shard {shard} is changing hands (leader {}); retry in a few seconds",
                leader.id
            ))));
        }
        let channel = {
            let mut channels = self.channels.lock().expect("channels lock");
            match channels.get(&leader.address) {
                Some(c) => c.clone(),
                None => {
                    let c = self.dialer.connect_lazy(&leader.address).map_err(|e| {
                        Status::from(ApiError::Internal(format!(
                            "bad address {:?} for leader {}: {e}",
                            leader.address, leader.id
                        )))
                    })?;
                    channels.insert(leader.address.clone(), c.clone());
                    c
                }
            }
        };
        debug!(shard, leader = %leader.id, address = %leader.address, "forwarding to the shard's leader");
        self.metrics.forwarded_requests.inc();
        Ok(Route::Leader(DeployerClient::new(channel)))
    }

    /// A request this coordinator sends to a leader on behalf of
    /// `caller` (a [`crate::auth::CALLER_HEADER`] value; none without
    /// TLS): a release train's control of a member deploy.
    pub fn on_behalf_of<T>(&self, message: T, caller: Option<&str>) -> Request<T> {
        let mut out = Request::new(message);
        if let Ok(v) = self.leases.id().parse() {
            out.metadata_mut().insert(FORWARDED_BY, v);
        }
        if let Some(v) = caller.and_then(|c| c.parse().ok()) {
            out.metadata_mut().insert(crate::auth::CALLER_HEADER, v);
        }
        out
    }

    /// The request as forwarded: the same message, marked, carrying its
    /// original caller (which the leader believes only from a coordinator
    /// certificate).
    pub fn forwarded<T>(&self, request: Request<T>) -> Request<T> {
        let caller = crate::auth::caller_of(&request)
            .ok()
            .and_then(|c| c.header());
        let mut out = Request::new(request.into_inner());
        if let Ok(v) = self.leases.id().parse() {
            out.metadata_mut().insert(FORWARDED_BY, v);
        }
        if let Some(v) = caller.and_then(|c| c.parse().ok()) {
            out.metadata_mut().insert(crate::auth::CALLER_HEADER, v);
        }
        out
    }
}
