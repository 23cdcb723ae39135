//! The coordinator as tracker (issue 15): which hosts hold which
//! artifacts (from their Hellos and heartbeats, `Registry`), and which of
//! them a puller is handed as peers.
//!
//! Rules:
//! 1. Only connected hosts that serve chunks (a peer address) and hold
//!    the whole artifact are named; never the puller itself.
//! 2. Peers in the puller's zone first, then its region, then the rest
//!    (labels `zone` and `region`); within a tier the order is random, so
//!    pullers spread over the holders instead of all asking the first.
//! 3. A host a puller reported as bad (corrupt chunks, stalls,
//!    unreachable) is not named for [`BAD_PEER_PENALTY`]; it is named
//!    again afterwards (a restarted agent is not bad forever).
//! 4. At most `k` peers per pull.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_common::proto::PeerSource;
use rand::seq::SliceRandom;

/// How long a reported peer is left out (rule 3).
pub const BAD_PEER_PENALTY: Duration = Duration::from_secs(600);

/// A host that holds an artifact and serves chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host_id: String,
    pub address: String,
    pub zone: Option<String>,
    pub region: Option<String>,
}

/// Rules 2 and 4, pure: the peers for a puller in `zone`/`region`.
pub fn choose(
    mut holders: Vec<Holder>,
    zone: Option<&str>,
    region: Option<&str>,
    k: usize,
    rng: &mut impl rand::Rng,
) -> Vec<PeerSource> {
    holders.shuffle(rng);
    let tier = |h: &Holder| match (h.zone.as_deref(), h.region.as_deref()) {
        (Some(z), _) if Some(z) == zone => 0,
        (_, Some(r)) if Some(r) == region => 1,
        _ => 2,
    };
    // A stable sort keeps the shuffled order within each tier.
    holders.sort_by_key(tier);
    holders
        .into_iter()
        .take(k)
        .map(|h| PeerSource {
            host_id: h.host_id,
            address: h.address,
        })
        .collect()
}

/// Rule 3: peers reported bad, until when.
#[derive(Default)]
pub struct BadPeers {
    until: Mutex<HashMap<String, Instant>>,
}

impl BadPeers {
    pub fn report(&self, host_id: &str, now: Instant) {
        let mut until = self.until.lock().expect("bad peers lock");
        until.retain(|_, t| *t > now);
        until.insert(host_id.to_string(), now + BAD_PEER_PENALTY);
    }

    pub fn is_bad(&self, host_id: &str, now: Instant) -> bool {
        let until = self.until.lock().expect("bad peers lock");
        until.get(host_id).is_some_and(|t| *t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn holder(id: &str, zone: &str, region: &str) -> Holder {
        Holder {
            host_id: id.into(),
            address: format!("http://{id}:7070"),
            zone: Some(zone.into()),
            region: Some(region.into()),
        }
    }

    #[test]
    fn same_zone_then_region_then_others_at_most_k_in_random_order() {
        let holders = vec![
            holder("far", "z9", "r9"),
            holder("region-1", "z2", "r1"),
            holder("zone-1", "z1", "r1"),
            holder("zone-2", "z1", "r1"),
            holder("region-2", "z3", "r1"),
        ];
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..40 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let got = choose(holders.clone(), Some("z1"), Some("r1"), 4, &mut rng);
            let ids: Vec<&str> = got.iter().map(|p| p.host_id.as_str()).collect();
            assert_eq!(ids.len(), 4);
            assert!(ids[..2].iter().all(|i| i.starts_with("zone-")), "{ids:?}");
            assert!(ids[2..].iter().all(|i| i.starts_with("region-")), "{ids:?}");
            seen_first.insert(ids[0].to_string());
        }
        // Pullers spread over the holders of a tier.
        assert_eq!(seen_first.len(), 2);
        // No labels: everyone is "the rest".
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        assert_eq!(choose(holders, None, None, 9, &mut rng).len(), 5);
    }

    #[test]
    fn a_bad_peer_is_left_out_for_the_penalty_only() {
        let bad = BadPeers::default();
        let now = Instant::now();
        bad.report("web-3", now);
        assert!(bad.is_bad("web-3", now + Duration::from_secs(1)));
        assert!(!bad.is_bad("web-4", now));
        assert!(!bad.is_bad("web-3", now + BAD_PEER_PENALTY + Duration::from_secs(1)));
    }
}
