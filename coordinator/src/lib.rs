//! drover-coordinator: the coordinator (API server, fleet registry, deploy
//! engine, artifact origin, high availability) and `droverctl`.
//!
//! - [`config`]: flags, config file, defaults.
//! - [`configs`]: config bundles per service and environment, as pushed.
//! - [`server`]: binds the port, serves every gRPC service, shuts down cleanly.
//! - [`api`]: the gRPC handlers (AgentControl streams, Deployer, Artifacts).
//! - [`fleet`]: the in-memory registry of hosts, fed by agent streams.
//! - [`origin`]: content-addressed artifact blobs (the origin agents pull from).
//! - [`store`]: durable state behind one trait (embedded redb or etcd).
//! - [`ha`]: shards and leader elections (fencing epochs).
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`deploy`]: pipelines, the deploy state machine, its ledger, driver and analyses.
//! - [`router`]: traffic routers (load balancers) a deploy moves traffic through.
//! - [`auth`]: callers' identities (from certificates) and the authorization policy.
//! - [`ctl`]: `droverctl`, the command-line client.
//! - [`error`]: errors and their mapping to gRPC status codes.

pub mod api;
pub mod auth;
pub mod config;
pub mod configs;
pub mod ctl;
pub mod deploy;
pub mod error;
pub mod flags;
pub mod fleet;
pub mod fuzzing;
pub mod ha;
pub mod metrics;
pub mod notify;
pub mod origin;
pub mod router;
pub mod server;
pub mod store;
