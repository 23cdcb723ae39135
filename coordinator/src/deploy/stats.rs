//! The statistics the canary judge uses, written for bounded cost: nothing
//! here is worse than O(n log n) in the samples, or O(m·n·min(m,n)) with
//! m + n ≤ [`EXACT_MAX`] for an exact distribution. statrs' Mann-Whitney is
//! not used: it compares every pair (O(n²)) and, with one side of eight
//! samples or fewer, enumerates every arrangement — ~10^11 steps for one
//! canary host against a few hundred baseline samples.
//!
//! - [`rank_sum_greater`]: one-sided Mann-Whitney U (Wilcoxon rank-sum):
//!   sort once, mid-ranks for ties; the exact distribution (dynamic
//!   programming) when both samples are small and untied; a permutation
//!   test of the rank sum (seeded, [`PERMUTATIONS`] draws of the small
//!   side's ranks: O(draws × small side)) when one side is small — the
//!   normal approximation is badly wrong there (one canary value above
//!   100,000 baseline values is p ≈ 1e-5, not 0.04); the normal
//!   approximation with tie and continuity corrections otherwise.
//! - [`binomial_excess`]: errors out of requests, canary against baseline,
//!   exact: given the total errors, the canary's share is binomial under
//!   "the canary's rate is at most (1 + tolerance) × the baseline's".
//! - [`hosts_greater`]: one value per host, canary hosts against baseline
//!   hosts: the rank test when each side has more than [`SMALL_SIDE`]
//!   hosts (below that its p-values are coarse — one canary host among
//!   five is p ≥ 0.2 however slow it is, ten among a thousand floor at the
//!   permutation's resolution); else a t-test of the canary hosts against
//!   the baseline hosts' spread (a prediction interval for one canary
//!   host, Welch's test for several), which needs [`T_MIN_BASELINE`]
//!   baseline hosts.
//! - [`obrien_fleming_spent`]: how much of the false-alarm rate a look at a
//!   given fraction of the bake may spend (Lan-DeMets, O'Brien-Fleming).

use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal, StudentsT};

/// Largest m + n for which the rank test is exact (no ties).
pub const EXACT_MAX: usize = 24;
/// A side this small (or smaller) makes the rank test a permutation test.
pub const SMALL_SIDE: usize = 20;
/// Draws of the permutation test: p-values resolve to 1/(draws + 1).
pub const PERMUTATIONS: usize = 20_000;

fn standard_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("the standard normal exists")
}

/// One-sided p-value that values of `a` tend to be greater than those of
/// `b` (Mann-Whitney U). 1.0 when either side is empty or all values are
/// equal.
pub fn rank_sum_greater(a: &[f64], b: &[f64]) -> f64 {
    let (m, n) = (a.len(), b.len());
    if m == 0 || n == 0 {
        return 1.0;
    }
    // Sort all values once, tagged by side; NaN sorts last and is dropped
    // by the callers before they get here.
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|v| (*v, true))
        .chain(b.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    // Mid-ranks, the rank sum of `a`, and the tie correction term.
    let mut rank_sum_a = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_a += mid * all[i..=j].iter().filter(|(_, from_a)| *from_a).count() as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    let (mf, nf) = (m as f64, n as f64);
    let u = rank_sum_a - mf * (mf + 1.0) / 2.0;
    let total = mf + nf;
    if ties == total * total * total - total {
        return 1.0; // every value the same: no evidence either way
    }
    if ties == 0.0 && m + n <= EXACT_MAX {
        return exact_upper_tail(m, n, u.round() as usize);
    }
    if m.min(n) <= SMALL_SIDE {
        let mut ranks = Vec::with_capacity(all.len());
        let mut i = 0;
        while i < all.len() {
            let mut j = i;
            while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
                j += 1;
            }
            let mid = (i + j) as f64 / 2.0 + 1.0;
            ranks.extend(std::iter::repeat_n(mid, j - i + 1));
            i = j + 1;
        }
        return permutation_upper_tail(&ranks, m, rank_sum_a);
    }
    let mean = mf * nf / 2.0;
    let var = mf * nf / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    // Continuity correction towards the null.
    let z = (u - mean - 0.5) / var.sqrt();
    1.0 - standard_normal().cdf(z)
}

/// P(rank sum of `m` values drawn at random ≥ `observed`), estimated from
/// [`PERMUTATIONS`] seeded draws of the smaller side's ranks; (hits + 1) /
/// (draws + 1), never zero. `ranks` are the mid-ranks of all values.
fn permutation_upper_tail(ranks: &[f64], m: usize, observed: f64) -> f64 {
    use rand::SeedableRng;
    let total: f64 = ranks.iter().sum();
    let n = ranks.len() - m;
    // Draw the smaller side; a's rank sum is the total minus b's.
    let (draw, a_is_drawn) = if m <= n { (m, true) } else { (n, false) };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x0d12_0ee5);
    let mut hits = 0usize;
    // A tiny tolerance: mid-ranks are halves, sums exact in f64.
    let at_least = observed - 1e-9;
    for _ in 0..PERMUTATIONS {
        let drawn: f64 = rand::seq::index::sample(&mut rng, ranks.len(), draw)
            .iter()
            .map(|i| ranks[i])
            .sum();
        let a_sum = if a_is_drawn { drawn } else { total - drawn };
        if a_sum >= at_least {
            hits += 1;
        }
    }
    (hits as f64 + 1.0) / (PERMUTATIONS as f64 + 1.0)
}

/// P(U ≥ u) for sizes m and n without ties: the number of arrangements
/// with each U, by the recurrence c(m, n, u) = c(m-1, n, u-n) + c(m, n-1, u).
fn exact_upper_tail(m: usize, n: usize, u: usize) -> f64 {
    let max_u = m * n;
    // counts[i][j][k]: arrangements of i values of a and j of b with U = k,
    // built row by row over i to keep two layers.
    let mut prev: Vec<Vec<f64>> = vec![vec![0.0; max_u + 1]; n + 1];
    for row in prev.iter_mut() {
        row[0] = 1.0; // no value of a: U = 0
    }
    for i in 1..=m {
        let mut cur: Vec<Vec<f64>> = vec![vec![0.0; max_u + 1]; n + 1];
        cur[0][0] = 1.0; // no value of b: U = 0
        for j in 1..=n {
            for k in 0..=i * j {
                // The largest value is from a (it beats all j of b) or from b.
                let from_a = if k >= j { prev[j][k - j] } else { 0.0 };
                let from_b = cur[j - 1][k];
                cur[j][k] = from_a + from_b;
            }
        }
        prev = cur;
    }
    let counts = &prev[n];
    let total: f64 = counts.iter().sum();
    let tail: f64 = counts.iter().skip(u.min(max_u + 1)).sum();
    (tail / total).clamp(0.0, 1.0)
}

/// One-sided exact p-value that the canary's error rate exceeds the
/// baseline's by more than `tolerance` (relative): given the errors seen
/// in all, the canary's share of them is binomial with the canary's share
/// of the requests, weighted by 1 + tolerance.
pub fn binomial_excess(
    canary_errors: u64,
    canary_requests: u64,
    baseline_errors: u64,
    baseline_requests: u64,
    tolerance: f64,
) -> f64 {
    let errors = canary_errors + baseline_errors;
    if errors == 0 || canary_requests == 0 || baseline_requests == 0 || canary_errors == 0 {
        return 1.0;
    }
    let weighted = canary_requests as f64 * (1.0 + tolerance.max(0.0));
    let p = weighted / (weighted + baseline_requests as f64);
    match Binomial::new(p, errors) {
        // P(X ≥ canary_errors), as the survival function (1 - cdf would
        // round tiny p-values to zero).
        Ok(b) => b.sf(canary_errors - 1).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// One-sided exact p-value that a rate of `errors` out of `requests` is
/// above `limit`: P(X ≥ errors) for X ~ Binomial(requests, limit).
pub fn binomial_above(errors: u64, requests: u64, limit: f64) -> f64 {
    if errors == 0 || requests == 0 {
        return 1.0;
    }
    match Binomial::new(limit.clamp(0.0, 1.0), requests) {
        Ok(b) => b.sf(errors - 1).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// Hosts each side needs for the rank test across hosts.
pub const RANK_MIN_HOSTS: usize = 5;
/// Baseline hosts the t-test needs (to know their spread at all; with so
/// few, its heavy tails keep it honest and only large effects show).
pub const T_MIN_BASELINE: usize = 2;

/// Which test compared the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostTest {
    Rank,
    T,
}

impl HostTest {
    pub fn name(self) -> &'static str {
        match self {
            HostTest::Rank => "rank test across hosts",
            HostTest::T => "t-test across hosts",
        }
    }
}

/// One-sided p-value that the canary hosts' values are greater than the
/// baseline hosts' (see the module doc for the choice of test); `None`
/// when there are too few hosts for either. `min_spread` is the smallest
/// standard deviation the hosts are taken to have (identical hosts would
/// otherwise make any difference infinitely significant).
pub fn hosts_greater(c: &[f64], b: &[f64], min_spread: f64) -> Option<(f64, HostTest)> {
    if c.is_empty() {
        return None;
    }
    // The rank test where its p-values are fine-grained (both sides past
    // the permutation regime); a small side against a large one would be
    // floored at 1/(PERMUTATIONS + 1), above what early looks may spend.
    if c.len().min(b.len()) > SMALL_SIDE.max(RANK_MIN_HOSTS) {
        return Some((rank_sum_greater(c, b), HostTest::Rank));
    }
    if b.len() < T_MIN_BASELINE {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var =
        |v: &[f64], m: f64| v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64;
    let (mc, mb) = (mean(c), mean(b));
    let floor = min_spread * min_spread;
    let vb = var(b, mb).max(floor);
    let (nc, nb) = (c.len() as f64, b.len() as f64);
    let (se2, df) = if c.len() == 1 {
        // One canary host: is it outside the baseline hosts' spread?
        (vb * (1.0 + 1.0 / nb), nb - 1.0)
    } else {
        let vc = var(c, mc).max(floor);
        let (a, bb) = (vc / nc, vb / nb);
        let df = (a + bb).powi(2) / (a * a / (nc - 1.0) + bb * bb / (nb - 1.0));
        (a + bb, df)
    };
    let t = (mc - mb) / se2.sqrt();
    let p = match StudentsT::new(0.0, 1.0, df.max(1.0)) {
        Ok(dist) => 1.0 - dist.cdf(t),
        Err(_) => 1.0,
    };
    Some((p.clamp(0.0, 1.0), HostTest::T))
}

/// The false-alarm rate a look at `fraction` (0 to 1) of the planned bake
/// may have spent in all (O'Brien-Fleming-like spending, Lan and DeMets):
/// 2 − 2Φ(z(α/2) / √t). Early looks spend almost nothing; the final look
/// spends `alpha` in all.
pub fn obrien_fleming_spent(alpha: f64, fraction: f64) -> f64 {
    if fraction <= 0.0 {
        return 0.0;
    }
    let t = fraction.min(1.0);
    let normal = standard_normal();
    let z = normal.inverse_cdf(1.0 - alpha / 2.0);
    // The tail itself (2Φ(-x)), not 2 - 2Φ(x): early looks spend amounts
    // far below f64's resolution near 1, which would round to nothing.
    (2.0 * normal.cdf(-z / t.sqrt())).clamp(0.0, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for the calibration checks.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Every arrangement, counted directly (tiny sizes only).
    fn brute_upper_tail(a: &[f64], b: &[f64]) -> f64 {
        let all: Vec<f64> = a.iter().chain(b).copied().collect();
        let m = a.len();
        let u_of = |pick: &[usize]| -> usize {
            let (xa, xb): (Vec<f64>, Vec<f64>) = {
                let xa: Vec<f64> = pick.iter().map(|i| all[*i]).collect();
                let xb: Vec<f64> = (0..all.len())
                    .filter(|i| !pick.contains(i))
                    .map(|i| all[i])
                    .collect();
                (xa, xb)
            };
            xa.iter()
                .map(|x| xb.iter().filter(|y| x > *y).count())
                .sum()
        };
        let observed = u_of(&(0..m).collect::<Vec<_>>());
        let mut hits = 0;
        let mut total = 0;
        let n = all.len();
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize != m {
                continue;
            }
            let pick: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
            total += 1;
            if u_of(&pick) >= observed {
                hits += 1;
            }
        }
        hits as f64 / total as f64
    }

    #[test]
    fn the_exact_rank_test_counts_every_arrangement() {
        let a = [3.1, 5.2, 9.9];
        let b = [1.0, 2.5, 4.0, 6.1, 0.3];
        assert!((rank_sum_greater(&a, &b) - brute_upper_tail(&a, &b)).abs() < 1e-12);
        let a = [10.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        assert!((rank_sum_greater(&a, &b) - 1.0 / 8.0).abs() < 1e-12);
        assert_eq!(rank_sum_greater(&[], &b), 1.0);
        assert_eq!(rank_sum_greater(&[2.0, 2.0], &[2.0]), 1.0);
    }

    #[test]
    fn the_rank_test_is_fast_and_right_on_large_or_tied_samples() {
        // One canary value against 100,000 baseline values with many ties:
        // one sort, no enumeration.
        let b: Vec<f64> = (0..100_000).map(|i| (i % 1000) as f64).collect();
        let started = std::time::Instant::now();
        let p = rank_sum_greater(&[2000.0], &b);
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        assert!(
            p < 1e-4,
            "a permutation test, not the normal approximation: {p}"
        );
        // A value in the middle is no evidence.
        assert!(rank_sum_greater(&[500.0], &b) > 0.4);
        // Shifted samples are significant; equal ones are not.
        let mut r = Lcg(7);
        let a: Vec<f64> = (0..200).map(|_| r.next() + 0.3).collect();
        let b: Vec<f64> = (0..200).map(|_| r.next()).collect();
        assert!(rank_sum_greater(&a, &b) < 1e-6);
        assert!(rank_sum_greater(&b, &a) > 0.99);
    }

    /// Under the null, p-values are (at least) uniform: p < α about α of
    /// the time, never much more.
    #[test]
    fn under_the_null_the_false_alarm_rate_is_at_most_alpha() {
        let mut r = Lcg(42);
        // Exact, exact, permutation, normal.
        for (m, n, trials) in [(1, 7, 4000), (3, 9, 4000), (5, 40, 300), (30, 300, 4000)] {
            let mut alarms = 0;
            for _ in 0..trials {
                let a: Vec<f64> = (0..m).map(|_| r.next()).collect();
                let b: Vec<f64> = (0..n).map(|_| r.next()).collect();
                if rank_sum_greater(&a, &b) < 0.05 {
                    alarms += 1;
                }
            }
            let rate = alarms as f64 / trials as f64;
            // 0.05 plus three binomial standard errors.
            assert!(
                rate < 0.05 + 3.0 * (0.05f64 * 0.95 / trials as f64).sqrt(),
                "{m}x{n}: {rate}"
            );
        }
        // The error-rate test: a healthy canary (same true rate) against
        // its baseline, counts drawn at random.
        let trials = 4000;
        let mut alarms = 0;
        for _ in 0..trials {
            let draw = |r: &mut Lcg, n: u64| (0..n).filter(|_| r.next() < 0.001).count() as u64;
            let (cn, bn) = (700, 5000);
            let (ce, be) = (draw(&mut r, cn), draw(&mut r, bn));
            if binomial_excess(ce, cn, be, bn, 0.1) < 0.05 {
                alarms += 1;
            }
        }
        assert!(alarms as f64 / trials as f64 <= 0.05, "{alarms}");
    }

    /// A standard normal draw (Box-Muller) from the test generator.
    fn normal(r: &mut Lcg) -> f64 {
        let (u, v) = (r.next().max(1e-12), r.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    #[test]
    fn hosts_are_compared_by_the_test_their_numbers_allow() {
        // One slow canary host against four steady ones: a t-test says so.
        let b = [20.1, 19.8, 20.4, 20.0];
        let (p, test) = hosts_greater(&[70.0], &b, 0.01).unwrap();
        assert_eq!(test, HostTest::T);
        assert!(p < 1e-4, "{p}");
        // As slow as the others: no evidence.
        assert!(hosts_greater(&[20.2], &b, 0.01).unwrap().0 > 0.2);
        // Too few baseline hosts for any test.
        assert!(hosts_greater(&[70.0], &[20.0], 0.01).is_none());
        // Two are enough to see a large effect.
        assert!(hosts_greater(&[70.0], &[20.0, 20.1], 0.01).unwrap().0 < 0.05);
        // Identical baseline hosts: the spread floor keeps a tiny
        // difference from being "infinitely" significant.
        let (p, _) = hosts_greater(&[20.05], &[20.0; 5], 0.5).unwrap();
        assert!(p > 0.4, "{p}");
        // Enough hosts on both sides: the rank test.
        let many: Vec<f64> = (0..60).map(|i| 20.0 + (i % 7) as f64 * 0.1).collect();
        assert_eq!(
            hosts_greater(&many[..25], &many, 0.01).unwrap().1,
            HostTest::Rank
        );
        // Ten against many: the t-test (the rank test's p-values would be
        // floored by the permutation's resolution).
        assert_eq!(
            hosts_greater(&many[..10], &many, 0.01).unwrap().1,
            HostTest::T
        );
        // Calibration: healthy hosts drawn at random (each host its own
        // offset), one or three canary hosts against 4 to 9: alarms at
        // most alpha of the time.
        let mut r = Lcg(9);
        for (m, n) in [(1, 2), (1, 4), (1, 9), (2, 2), (3, 6), (10, 990)] {
            let trials = 4000;
            let mut alarms = 0;
            for _ in 0..trials {
                let host = |r: &mut Lcg| 3.0 + 0.05 * normal(r);
                let c: Vec<f64> = (0..m).map(|_| host(&mut r)).collect();
                let b: Vec<f64> = (0..n).map(|_| host(&mut r)).collect();
                if hosts_greater(&c, &b, 0.0).unwrap().0 < 0.05 {
                    alarms += 1;
                }
            }
            let rate = alarms as f64 / trials as f64;
            assert!(
                rate < 0.05 + 3.0 * (0.05f64 * 0.95 / trials as f64).sqrt(),
                "{m}x{n}: {rate}"
            );
        }
    }

    #[test]
    fn the_binomial_test_catches_a_real_excess_and_honours_the_tolerance() {
        // 3% against 0.1% over a few hundred requests: overwhelming.
        assert!(binomial_excess(12, 400, 8, 8000, 0.1) < 1e-6);
        // Far past f64's resolution near 1, still a p-value, not zero.
        let p = binomial_excess(300, 10_000, 990, 990_000, 0.1);
        assert!(p > 0.0 && p < 1e-100, "{p}");
        // 3 errors in 712 against 0.1% of 5000: not evidence.
        assert!(binomial_excess(3, 712, 5, 5000, 0.1) > 0.05);
        // A 5% excess inside a 10% tolerance passes, even on huge counts.
        assert!(binomial_excess(1050, 1_000_000, 1000, 1_000_000, 0.1) > 0.5);
        assert_eq!(binomial_excess(0, 100, 5, 100, 0.1), 1.0);
        // Against a fixed limit: 2 errors in 300 is not proof of a rate
        // above 0.1% (0.67% seen), 30 in 1000 is proof of one above 1%.
        assert!(binomial_above(2, 300, 0.001) > 0.03);
        assert!(binomial_above(30, 1000, 0.01) < 1e-6);
        assert_eq!(binomial_above(0, 1000, 0.01), 1.0);
    }

    #[test]
    fn spending_is_small_early_and_all_of_alpha_at_the_end() {
        let a = 0.05;
        assert_eq!(obrien_fleming_spent(a, 0.0), 0.0);
        assert!(obrien_fleming_spent(a, 0.1) < 1e-6);
        // Tiny, never rounded to nothing: an overwhelming effect can be
        // caught at an early look.
        assert!(obrien_fleming_spent(a, 1.0 / 180.0) > 0.0);
        assert!(obrien_fleming_spent(a, 0.5) < 0.006);
        assert!((obrien_fleming_spent(a, 1.0) - a).abs() < 1e-9);
        let mut last = 0.0;
        for k in 1..=20 {
            let s = obrien_fleming_spent(a, k as f64 / 20.0);
            assert!(s >= last);
            last = s;
        }
    }
}
