//! The fleet: which hosts exist, how they are connected and how healthy they
//! are. Held in memory only: heartbeats are never written to any store.

mod commands;
mod registry;
pub mod tracker;

pub use commands::{PendingCommands, SendError, is_final};
pub use registry::{Departure, OutboundItem, Registry, RegistryFull, Retention, SessionHandle};
