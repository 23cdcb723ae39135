//! High availability building blocks: pipelines map to shards, and each
//! shard has one leader elected through a store lease. The leader's epoch
//! (the create revision of its election key) fences its writes and its
//! commands. Wiring these into the coordinator is the rest of issue 5.

pub mod election;
pub mod leases;
pub mod shards;
