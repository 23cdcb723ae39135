//! Pipeline → shard, by a stable hash (the same on every coordinator and
//! every version: sha256 of the name, not Rust's randomized hasher).

use drover_common::artifact::Digest;

/// Default number of shards.
pub const DEFAULT_SHARDS: u32 = 16;

/// The first 64 bits of sha256(`bytes`).
fn hash64(bytes: &[u8]) -> u64 {
    let (digest, _) = Digest::of_reader(bytes).expect("hashing bytes in memory cannot fail");
    u64::from_str_radix(&digest.hex()[..16], 16).expect("hex")
}

pub fn shard_of(pipeline: &str, shards: u32) -> u32 {
    // The first 32 bits of the digest.
    ((hash64(pipeline.as_bytes()) >> 32) as u32) % shards.max(1)
}

/// How much coordinator `member` prefers `shard` (rendezvous hashing):
/// stable, and different coordinators prefer different shards.
pub fn preference(member: &str, shard: u32) -> u64 {
    hash64(format!("{member}/{shard}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        assert_eq!(shard_of("hello-prod", 16), shard_of("hello-prod", 16));
        // Fixed forever (first 32 bits of sha256, mod shards): changing it
        // would move every pipeline's leader during an upgrade.
        assert_eq!(shard_of("hello-prod", 16), 6);
        let mut used = std::collections::HashSet::new();
        for i in 0..200 {
            used.insert(shard_of(&format!("pipeline-{i}"), 16));
        }
        assert_eq!(used.len(), 16, "200 pipelines cover all 16 shards");
        assert_eq!(shard_of("anything", 1), 0);
    }
}
