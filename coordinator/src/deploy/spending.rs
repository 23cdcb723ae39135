//! The false-alarm budget of a canary bake, spent look by look.
//!
//! The bake looks every heartbeat interval; each look may spend only its
//! share of `alpha`: the O'Brien-Fleming spending function (Lan and DeMets,
//! [`stats::obrien_fleming_spent`]) over the planned bake, each look the
//! increment since the previous one, so by the union bound the looks of a
//! bake together raise a false alarm with probability at most `alpha`.
//! Early looks get almost nothing (only overwhelming evidence fails
//! there); extensions are part of the planned bake and spend from the same
//! budget; the last possible look gets what is left. Chosen over
//! always-valid p-values (mSPRT) because it works with the tests we
//! already run (an exact binomial, a rank test, a t-test) and needs no
//! prior on the effect size.

use drover_common::proto::{Analysis, InconclusiveAction};

use super::stats;

/// One look at the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Look {
    /// The false-alarm rate this look may spend (its share of `alpha`).
    pub alpha: f64,
}

/// The false-alarm budget of one bake, spent look by look: each look gets
/// the O'Brien-Fleming increment since the previous one over the planned
/// bake (extensions included); the last possible look gets what is left.
#[derive(Debug, Clone, PartialEq)]
pub struct Spending {
    alpha: f64,
    /// The planned bake, extensions included (ms).
    horizon_ms: u64,
    /// Spent so far.
    spent: f64,
}

impl Spending {
    /// The budget of a bake of `bake_ms` under `a`, `baked_ms` into it (a
    /// new leader forgoes what its predecessor's looks may have spent).
    pub fn new(a: &Analysis, bake_ms: u64, baked_ms: u64) -> Spending {
        let horizon_ms = (bake_ms * u64::from(1 + Self::extensions_planned(a))).max(1);
        Spending {
            alpha: a.alpha,
            horizon_ms,
            spent: stats::obrien_fleming_spent(a.alpha, baked_ms as f64 / horizon_ms as f64),
        }
    }

    /// Extensions the budget is planned over.
    pub fn extensions_planned(a: &Analysis) -> u32 {
        match a.inconclusive() {
            InconclusiveAction::Extend => a.max_extensions,
            _ => 0,
        }
    }

    /// The look at `baked_ms`; `last`: no look can follow it.
    pub fn look(&mut self, baked_ms: u64, last: bool) -> Look {
        let cumulative = if last {
            self.alpha
        } else {
            stats::obrien_fleming_spent(self.alpha, baked_ms as f64 / self.horizon_ms as f64)
        };
        let look = Look {
            alpha: (cumulative - self.spent).max(0.0),
        };
        self.spent = self.spent.max(cumulative);
        look
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis() -> Analysis {
        crate::deploy::pipeline::default_analysis()
    }

    #[test]
    fn a_bakes_looks_spend_at_most_alpha_and_early_ones_almost_nothing() {
        let mut a = analysis();
        a.inconclusive = InconclusiveAction::Extend as i32;
        a.max_extensions = 1;
        let mut spending = Spending::new(&a, 10_000, 0);
        let looks: Vec<f64> = (1..=20)
            .map(|k| spending.look(k * 1000, k == 20).alpha)
            .collect();
        assert!(looks[0] < 1e-9, "{looks:?}");
        assert!((looks.iter().sum::<f64>() - a.alpha).abs() < 1e-12);
        // The end of the first window (half the planned bake) has spent
        // about a tenth of alpha, not all of it.
        let half: f64 = looks[..10].iter().sum();
        assert!(half < a.alpha / 5.0, "{half}");
    }
}
