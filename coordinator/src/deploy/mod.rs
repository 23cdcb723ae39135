//! Deploy orchestration: pipelines (what to roll out where, and how), the
//! deploy state machine, the judgements (batch gates, canary analysis),
//! the ledger that stores deploys, and the driver that runs them.
//!
//! The pure core — `machine`, `gate`, `analysis`, `evidence`, `spending`, `audit`, `start`,
//! `record` — does no I/O and imports nothing of `store`, `fleet` or `ha`;
//! `ledger` (the store), `driver` (hosts, through `driver::effects`) and
//! `deployments` (the facade the API calls) do the effects.

pub mod analysis;
pub mod audit;
pub mod blue_green;
pub mod clock;
pub mod deployments;
pub mod driver;
pub mod evidence;
pub mod gate;
pub mod ledger;
pub mod machine;
pub mod pipeline;
pub mod record;
pub mod spending;
pub mod start;
pub mod stats;
#[cfg(test)]
mod testing;
pub mod train;
pub mod trains;
