//! Pre-seeding a stage (issue 15, `Stage.prefetch_all`): before the
//! stage's first restart, every host of the stage pulls the artifact, in
//! growing waves so that the origin sends about one copy.
//!
//! 1. The first wave is [`ORIGIN_SEEDS`] hosts: nobody else holds the
//!    artifact yet, so they pull from the origin.
//! 2. Each later wave is up to [`FANOUT`] hosts per host that holds it by
//!    then: the tracker hands them those holders as peers, and each
//!    holder serves a few pullers at once (the agents' own connection and
//!    bandwidth caps, `peer_server.rs`, still apply).
//! 3. A host whose pull fails is not a holder; its own batch pulls again
//!    and fails there, counted against the budget like any failed host.
//!    The prefetch itself never fails a deploy.
//! 4. Pulls are idempotent: a host that holds the artifact answers at
//!    once, so a prefetch repeated after a failover costs nothing.

use std::time::{Duration, Instant};

use tracing::info;

use super::Driver;
use crate::deploy::record::DeployRecord;

/// Hosts of the first wave (rule 1).
pub const ORIGIN_SEEDS: usize = 2;
/// New pullers per holder in each later wave (rule 2).
pub const FANOUT: usize = 3;

/// Rules 1 and 2, pure: how many hosts the next wave has when `holders`
/// hosts hold the artifact.
pub fn next_wave(holders: usize) -> usize {
    match holders {
        0 => ORIGIN_SEEDS,
        h => h * FANOUT,
    }
}

impl Driver {
    /// Pulls the artifact onto every host of `stage` in waves (rules 1–4).
    pub(super) async fn prefetch_stage(
        &self,
        rec: &DeployRecord,
        stage: usize,
        fence: (u32, u64),
        patience: Duration,
    ) {
        let hosts: Vec<String> = rec.plan[stage].iter().flatten().cloned().collect();
        let started = Instant::now();
        let mut pending = hosts.iter();
        let mut holders = 0usize;
        let mut failed = 0usize;
        let mut rounds = 0usize;
        loop {
            let wave: Vec<String> = pending.by_ref().take(next_wave(holders)).cloned().collect();
            if wave.is_empty() {
                break;
            }
            rounds += 1;
            let outcomes = self
                .pull_batch(rec, (stage, 0), &wave, fence, patience)
                .await;
            let ok = outcomes.values().filter(|o| o.is_ok()).count();
            holders += ok;
            failed += wave.len() - ok;
            if holders == 0 && failed >= hosts.len() {
                break;
            }
        }
        info!(
            deploy = %rec.id,
            stage,
            hosts = hosts.len(),
            holders,
            failed,
            waves = rounds,
            took = ?started.elapsed(),
            "stage prefetched"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes of the waves for `hosts` hosts when every pull succeeds.
    fn waves(hosts: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut holders = 0usize;
        while holders < hosts {
            let size = next_wave(holders).min(hosts - holders);
            out.push(size);
            holders += size;
        }
        out
    }

    #[test]
    fn waves_grow_by_the_fanout_from_the_origin_seeds() {
        assert_eq!(waves(1), vec![1]);
        assert_eq!(waves(2), vec![2]);
        assert_eq!(waves(20), vec![2, 6, 12]);
        assert_eq!(waves(50), vec![2, 6, 24, 18]);
        assert_eq!(waves(50).iter().sum::<usize>(), 50);
        assert!(waves(10_000).len() <= 9);
    }
}
