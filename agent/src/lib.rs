//! drover-agent: runs on every server, keeps one stream to each coordinator,
//! pushes heartbeats with host metrics and service health, and executes the
//! coordinators' commands.
//!
//! - [`config`]: flags and defaults.
//! - [`agent`]: wires everything; recovery at start; clean shutdown.
//! - [`connection`]: one coordinator stream: Hello, heartbeats, commands, Goodbye, reconnect.
//! - [`directory`]: which coordinators to keep a stream to (configured and discovered).
//! - [`heartbeat`]: the heartbeat producer and its bounded, drop-oldest queue.
//! - [`executor`]: Pull, Verify, Restart, Rollback: fenced and idempotent.
//! - [`pull`]: resumable, verified downloads and unpacking into releases.
//! - [`config_bundles`]: config bundles placed per service, secrets resolved on the host.
//! - [`releases`]: the on-disk layout of releases and the `current` switch.
//! - [`state`]: the local state journal (atomic writes).
//! - [`unit`]: a service's process or one of its blue-green slots, and the slots' ports.
//! - [`runtime`]: running services: supervised processes or systemd units.
//! - [`health`]: probes and Prometheus scrapes of running services.
//! - [`host_metrics`]: CPU, memory and disk figures of the host.
//! - [`http`]: the small HTTP/1 client probes and scrapes use.
//! - [`fleetsim`]: many virtual agents in one process, for benchmarks and tests.

pub mod agent;
pub mod chunk_cache;
pub mod config;
pub mod config_bundles;
pub mod connection;
pub mod directory;
pub mod disk;
pub mod executor;
pub mod flags;
pub mod fleetsim;
pub mod health;
pub mod heartbeat;
pub mod host_metrics;
pub mod http;
pub mod output;
pub mod peer_server;
pub mod pull;
pub mod releases;
pub mod runtime;
pub mod state;
pub mod unit;
