//! drover-agent: runs on every server, keeps one stream to each coordinator
//! and pushes heartbeats with host metrics and service health.
//!
//! - [`config`]: flags and defaults.
//! - [`agent`]: wires sampling, heartbeats and one connection per coordinator; clean shutdown.
//! - [`connection`]: one coordinator stream: Hello, heartbeats, Goodbye, reconnect with backoff.
//! - [`heartbeat`]: the heartbeat producer and its bounded, drop-oldest queue.
//! - [`host_metrics`]: CPU, memory and disk figures of the host.
//! - [`fleetsim`]: many virtual agents in one process, for benchmarks and tests.

pub mod agent;
pub mod config;
pub mod connection;
pub mod fleetsim;
pub mod heartbeat;
pub mod host_metrics;
