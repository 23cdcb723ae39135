//! Deploy orchestration: pipelines (what to roll out where, and how), the
//! deploy state machine, the judgements (batch gates, canary analysis) and
//! the driver that runs them.

pub mod analysis;
pub mod deployments;
pub mod gate;
pub mod machine;
pub mod pipeline;
pub mod record;
