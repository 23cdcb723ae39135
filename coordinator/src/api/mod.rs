//! gRPC handlers. They validate input, call into the fleet registry and map
//! errors through [`crate::error::ApiError`].

pub mod agent_control;
pub mod artifacts;
pub mod deployer;
pub mod forward;
pub mod store_backup;

pub use agent_control::AgentControlService;
pub use artifacts::ArtifactsService;
pub use deployer::DeployerService;
