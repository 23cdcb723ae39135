//! Deploy orchestration: pipelines (what to roll out where, and how) and,
//! next, the deploy state machine that drives them.

pub mod deployments;
pub mod gate;
pub mod machine;
pub mod pipeline;
pub mod record;
