//! High availability: pipelines map to shards; each coordinator holds one
//! session lease (membership and elections); each shard has one leader
//! whose epoch (the create revision of its election key) fences its writes
//! and its commands; shards are shared fairly between live coordinators.

pub mod election;
pub mod leases;
pub mod members;
pub mod session;
pub mod shards;
