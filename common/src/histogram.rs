//! Quantiles from cumulative histogram buckets (Prometheus style).

/// The q-quantile of the observations counted by cumulative `buckets`
/// (upper bound, count ≤ bound), interpolated linearly inside its bucket.
/// `None` when there are no observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last().map(|(_, c)| *c)?;
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let (mut lower_bound, mut lower_count) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= target {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let frac = if count > lower_count {
                (target - lower_count) / (count - lower_count)
            } else {
                1.0
            };
            return Some(lower_bound + frac * (bound - lower_bound));
        }
        lower_bound = bound;
        lower_count = count;
    }
    Some(lower_bound)
}

/// Bucket-wise difference of two cumulative snapshots with the same bounds
/// (`after - before`); bounds missing from `before` count from zero.
pub fn delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(bound, count)| {
            let prev = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (bound, (count - prev).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_inside_the_bucket() {
        let b = [
            (0.1, 50.0),
            (0.2, 90.0),
            (0.4, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(&b, 0.5), Some(0.1));
        let p75 = quantile(&b, 0.75).unwrap();
        assert!((p75 - 0.1625).abs() < 1e-9, "{p75}");
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.38).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
    }

    #[test]
    fn delta_subtracts_snapshots() {
        let before = [(0.1, 5.0), (f64::INFINITY, 6.0)];
        let after = [(0.1, 8.0), (f64::INFINITY, 10.0)];
        assert_eq!(
            delta(&before, &after),
            vec![(0.1, 3.0), (f64::INFINITY, 4.0)]
        );
    }
}
