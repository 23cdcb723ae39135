//! drover-common: what both sides of the wire share.
//!
//! - [`proto`]: the generated `drover.v1` types and services, the only wire types.
//! - [`histogram`]: quantiles from Prometheus histogram buckets.
//! - [`ids`]: validation of host ids.
//! - [`labels`]: label rules and selectors (`region=eu,env=prod`).
//! - [`artifact`]: the artifact format: digest, manifest, safe unpack, release records.
//! - [`config_bundle`]: configuration bundles: digest, checks, secret references.
//! - [`codec`]: the protobuf codec of every service, with small buffers.
//! - [`grpc`]: client endpoints and the shutdown signal.
//! - [`limits`]: process limits (open files).
//! - [`logging`]: the tracing subscriber of every binary.
//! - [`time`]: wall-clock helpers for the unix-epoch fields of the protocol.
//! - [`systemd`]: the notify protocol (ready, reloading, stopping, watchdog).
//! - [`tls`]: mutual TLS: identities, certificate checks, listener, dialer.

pub mod artifact;
pub mod codec;
pub mod config_bundle;
pub mod fuzzing;
pub mod grpc;
pub mod histogram;
pub mod ids;
pub mod labels;
pub mod limits;
pub mod logging;
pub mod systemd;
pub mod time;
pub mod tls;

/// Generated code for the `drover.v1` protobuf package.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("drover.v1");
    include!(concat!(env!("OUT_DIR"), "/drover.v1.serde.rs"));

    impl DeployPhase {
        /// A deploy in this phase will not change by itself any more.
        pub fn is_terminal(self) -> bool {
            matches!(
                self,
                DeployPhase::Complete
                    | DeployPhase::Failed
                    | DeployPhase::RolledBack
                    | DeployPhase::Aborted
            )
        }
    }

    /// Bytes of a CommandUpdate's reason and output tail at most: no update
    /// comes near the message limit, whatever a service or hook printed.
    pub const MAX_UPDATE_REASON: usize = 4 * 1024;
    pub const MAX_UPDATE_TAIL: usize = 16 * 1024;

    /// The first `max` bytes of `s` (at a character boundary).
    fn head(s: &str, max: usize) -> String {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    }

    /// The last `max` bytes of `s` (at a character boundary).
    fn tail(s: &str, max: usize) -> String {
        let mut start = s.len().saturating_sub(max);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s[start..].to_string()
    }

    impl Command {
        /// The agent's update about this command, ready to send; reason
        /// and output are bounded (MAX_UPDATE_REASON, MAX_UPDATE_TAIL).
        pub fn update(
            &self,
            status: CommandStatus,
            reason: &str,
            output_tail: &str,
        ) -> AgentMessage {
            AgentMessage {
                msg: Some(agent_message::Msg::CommandUpdate(CommandUpdate {
                    command_id: self.command_id.clone(),
                    shard: self.shard,
                    epoch: self.epoch,
                    status: status as i32,
                    reason: head(reason, MAX_UPDATE_REASON),
                    output_tail: tail(output_tail, MAX_UPDATE_TAIL),
                    pull: None,
                    deadline_exceeded: false,
                    progress_percent: if status == CommandStatus::Succeeded {
                        100
                    } else {
                        0
                    },
                })),
            }
        }
    }

    /// Encoded file descriptor set of `drover.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptor.bin"));
}

/// Version of this build, sent by agents in Hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
