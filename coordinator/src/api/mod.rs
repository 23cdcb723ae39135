//! gRPC handlers. They authorize, validate input, call into the fleet
//! registry, the deploy facade or the origin, and map every error through
//! [`crate::error::ApiError`] (no handler picks a status code itself).

pub mod agent_control;
mod artifact_gc;
pub mod artifacts;
pub mod chunks;
pub mod configs;
pub mod deployer;
pub mod deploys;
pub mod flags;
pub mod forward;
pub mod notifications;
pub mod store_backup;
pub mod trains;

pub use agent_control::AgentControlService;
pub use artifacts::ArtifactsService;
pub use deployer::DeployerService;
