//! What a bake window has collected, host by host: each heartbeat interval
//! is folded into its host's running totals when it arrives, so memory is
//! bounded per host and a look costs one pass over the hosts, never over
//! every interval of the window (10,000 hosts × a 10-minute bake would
//! otherwise be six million intervals per look).
//!
//! Per host, over the window:
//! - requests and errors, summed (the error rate is judged on counts);
//! - latency: the cumulative histogram buckets heartbeats carry, merged
//!   (so a host's p99 is the p99 of all its requests in the window); a
//!   host whose heartbeats carry no buckets (or whose service changed its
//!   bucket bounds mid-window) falls back to the request-weighted
//!   geometric mean of its interval quantiles;
//! - each metric of the service's page: the mean of the intervals that
//!   carried it.

use std::collections::{BTreeMap, HashMap};

use drover_common::histogram;
use drover_common::proto::{BakeEvidence, HostTotals, ServiceHealth};

/// One host's figures for one heartbeat interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interval {
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cumulative latency buckets of the interval: (upper bound in ms,
    /// requests at or under it), bounds ascending; empty when the
    /// heartbeat carried none.
    pub latency_buckets: Vec<(f64, f64)>,
    /// Metrics of the service's page heartbeats carry on request.
    pub metrics: HashMap<String, f64>,
    /// The scrape the figures came from (0: not said).
    pub scrape: u64,
}

impl From<ServiceHealth> for Interval {
    /// What a heartbeat says of one interval, as the analysis takes it.
    fn from(health: ServiceHealth) -> Interval {
        Interval {
            requests: health.request_count,
            errors: health.error_count,
            p50_ms: health.latency_p50_ms,
            p99_ms: health.latency_p99_ms,
            latency_buckets: health
                .latency_buckets
                .iter()
                .map(|b| (b.le_ms, b.count as f64))
                .collect(),
            metrics: health.metrics,
            scrape: health.scrape,
        }
    }
}

/// One host's evidence over the window so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostEvidence {
    /// Heartbeat intervals folded in.
    pub intervals: u32,
    pub requests: u64,
    pub errors: u64,
    /// The merged latency histogram (cumulative, ms bounds); empty when no
    /// interval carried one.
    latency: Vec<(f64, f64)>,
    /// The bucket bounds changed mid-window: the histogram is unusable.
    latency_mixed: bool,
    /// Request-weighted sums of ln(interval p50) and ln(interval p99), and
    /// their weight (the fallback without histograms).
    ln_p50: f64,
    ln_p99: f64,
    latency_weight: f64,
    /// Per metric of the service's page: the sum of the intervals' values
    /// and how many intervals carried it.
    metrics: HashMap<String, (f64, u32)>,
    /// The scrape the last interval came from (0: not said).
    pub last_scrape: u64,
}

impl HostEvidence {
    /// Folds one interval in.
    pub fn add(&mut self, i: &Interval) {
        self.intervals += 1;
        self.last_scrape = i.scrape;
        self.requests += i.requests;
        self.errors += i.errors.min(i.requests);
        if i.requests > 0 && i.p99_ms > 0.0 && i.p50_ms > 0.0 {
            let w = i.requests as f64;
            self.ln_p50 += w * i.p50_ms.ln();
            self.ln_p99 += w * i.p99_ms.ln();
            self.latency_weight += w;
        }
        self.merge_latency(&i.latency_buckets);
        for (name, v) in &i.metrics {
            if v.is_finite() {
                let e = self.metrics.entry(name.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }

    fn merge_latency(&mut self, buckets: &[(f64, f64)]) {
        if buckets.is_empty() || self.latency_mixed {
            return;
        }
        if self.latency.is_empty() {
            self.latency = buckets.to_vec();
        } else if self.latency.len() == buckets.len()
            && self.latency.iter().zip(buckets).all(|(a, b)| a.0 == b.0)
        {
            for (mine, theirs) in self.latency.iter_mut().zip(buckets) {
                mine.1 += theirs.1;
            }
        } else {
            self.latency_mixed = true;
            self.latency.clear();
        }
    }

    /// The host's `q` latency quantile (ms) over the window: from its
    /// merged histogram, else the weighted geometric mean of its interval
    /// quantiles (p50 or p99, whichever `q` is nearer). `None` without
    /// latency evidence.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        if let Some(v) = histogram::quantile(&self.latency, q) {
            return Some(v);
        }
        if self.latency_weight <= 0.0 {
            return None;
        }
        let ln = if q >= 0.75 { self.ln_p99 } else { self.ln_p50 };
        Some((ln / self.latency_weight).exp())
    }

    fn totals(&self, host: &str) -> HostTotals {
        HostTotals {
            host: host.to_string(),
            intervals: self.intervals,
            requests: self.requests,
            errors: self.errors,
            latency_le_ms: self.latency.iter().map(|b| b.0).collect(),
            latency_count: self.latency.iter().map(|b| b.1).collect(),
            latency_mixed: self.latency_mixed,
            ln_p50: self.ln_p50,
            ln_p99: self.ln_p99,
            latency_weight: self.latency_weight,
            metric_sums: self.metrics.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
            metric_counts: self.metrics.iter().map(|(k, v)| (k.clone(), v.1)).collect(),
            last_scrape: self.last_scrape,
        }
    }

    fn from_totals(t: &HostTotals) -> HostEvidence {
        HostEvidence {
            intervals: t.intervals,
            requests: t.requests,
            errors: t.errors,
            latency: t
                .latency_le_ms
                .iter()
                .copied()
                .zip(t.latency_count.iter().copied())
                .collect(),
            latency_mixed: t.latency_mixed,
            ln_p50: t.ln_p50,
            ln_p99: t.ln_p99,
            latency_weight: t.latency_weight,
            metrics: t
                .metric_sums
                .iter()
                .map(|(k, sum)| {
                    (
                        k.clone(),
                        (*sum, t.metric_counts.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            last_scrape: t.last_scrape,
        }
    }

    /// The mean of `name` over the intervals that carried it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .get(name)
            .filter(|(_, n)| *n > 0)
            .map(|(sum, n)| sum / f64::from(*n))
    }
}

/// At most `cap` of `hosts`, spread evenly over them (they are in name
/// order, which says nothing of their figures).
pub fn sample(hosts: &BTreeMap<String, HostEvidence>, cap: usize) -> Vec<(&String, &HostEvidence)> {
    if hosts.len() <= cap {
        return hosts.iter().collect();
    }
    let step = hosts.len() as f64 / cap as f64;
    let mut next = 0.0;
    hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let take = *i as f64 >= next;
            if take {
                next += step;
            }
            take
        })
        .map(|(_, h)| h)
        .collect()
}

/// Which side of the comparison a host is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Canary,
    Baseline,
}

/// What a bake window collected so far.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// The canary cohort's hosts, by name.
    pub canary: BTreeMap<String, HostEvidence>,
    /// The baseline's hosts, by name.
    pub baseline: BTreeMap<String, HostEvidence>,
    /// Canary hosts that were not ready at the last look.
    pub canary_not_ready: Vec<String>,
    /// Canary hosts that restarted since the step began, with the count.
    pub canary_restarts: Vec<(String, u32)>,
}

impl Window {
    /// The window as stored for a new leader: every canary host, and a
    /// uniform sample of at most `baseline_cap` baseline hosts.
    pub fn stored(&self, baseline_cap: usize) -> BakeEvidence {
        BakeEvidence {
            canary: self.canary.iter().map(|(h, e)| e.totals(h)).collect(),
            baseline: sample(&self.baseline, baseline_cap)
                .into_iter()
                .map(|(h, e)| e.totals(h))
                .collect(),
        }
    }

    /// The window a leader stored (the hosts' readiness and restarts are
    /// the next look's to learn).
    pub fn restored(stored: &BakeEvidence) -> Window {
        let side = |hosts: &[HostTotals]| -> BTreeMap<String, HostEvidence> {
            hosts
                .iter()
                .map(|t| (t.host.clone(), HostEvidence::from_totals(t)))
                .collect()
        };
        Window {
            canary: side(&stored.canary),
            baseline: side(&stored.baseline),
            ..Default::default()
        }
    }

    /// Folds one heartbeat interval of `host` in.
    pub fn add(&mut self, side: Side, host: &str, i: &Interval) {
        let hosts = match side {
            Side::Canary => &mut self.canary,
            Side::Baseline => &mut self.baseline,
        };
        match hosts.get_mut(host) {
            Some(e) => e.add(i),
            None => hosts.entry(host.to_string()).or_default().add(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(requests: u64, errors: u64, p99: f64) -> Interval {
        Interval {
            requests,
            errors,
            p50_ms: p99 / 3.0,
            p99_ms: p99,
            ..Default::default()
        }
    }

    #[test]
    fn counts_add_up_and_quantiles_fall_back_to_a_weighted_geometric_mean() {
        let mut e = HostEvidence::default();
        e.add(&interval(100, 1, 10.0));
        e.add(&interval(300, 2, 40.0));
        e.add(&interval(0, 0, 0.0)); // an idle interval weighs nothing
        assert_eq!((e.intervals, e.requests, e.errors), (3, 400, 3));
        // exp((100 ln 10 + 300 ln 40) / 400) = 10^0.25 · 40^0.75
        let want = 10f64.powf(0.25) * 40f64.powf(0.75);
        assert!((e.latency_ms(0.99).unwrap() - want).abs() < 1e-9);
        assert!((e.latency_ms(0.5).unwrap() - want / 3.0).abs() < 1e-9);
        assert_eq!(HostEvidence::default().latency_ms(0.99), None);
    }

    #[test]
    fn histograms_merge_into_the_windows_quantile() {
        let mut e = HostEvidence::default();
        let buckets = |under_10: f64, under_100: f64| -> Vec<(f64, f64)> {
            vec![
                (10.0, under_10),
                (100.0, under_100),
                (f64::INFINITY, under_100),
            ]
        };
        // 99 fast requests, then one interval whose every request is slow:
        // neither interval's own p99 is the window's.
        e.add(&Interval {
            requests: 99,
            latency_buckets: buckets(99.0, 99.0),
            ..interval(99, 0, 10.0)
        });
        e.add(&Interval {
            requests: 99,
            latency_buckets: buckets(0.0, 99.0),
            ..interval(99, 0, 99.0)
        });
        let p50 = e.latency_ms(0.5).unwrap();
        assert!((p50 - 10.0).abs() < 1e-6, "{p50}");
        let p99 = e.latency_ms(0.99).unwrap();
        assert!(p99 > 95.0 && p99 <= 100.0, "{p99}");
        // New bounds mid-window: the histogram is dropped, the fallback used.
        e.add(&Interval {
            latency_buckets: vec![(5.0, 1.0), (f64::INFINITY, 1.0)],
            ..interval(1, 0, 5.0)
        });
        let fallback = e.latency_ms(0.99).unwrap();
        assert!(fallback < 40.0, "{fallback}");
    }

    #[test]
    fn a_stored_window_is_restored_as_it_was_with_the_baseline_sampled() {
        let mut w = Window::default();
        let buckets = vec![(10.0, 5.0), (f64::INFINITY, 6.0)];
        for n in 0..10 {
            let i = Interval {
                latency_buckets: buckets.clone(),
                metrics: [("queue_depth".to_string(), n as f64)].into(),
                scrape: n + 1,
                ..interval(100, n, 20.0)
            };
            w.add(Side::Canary, "c", &i);
            w.add(Side::Baseline, &format!("b{n}"), &i);
        }
        let back = Window::restored(&w.stored(1000));
        assert_eq!(back.canary, w.canary);
        assert_eq!(back.baseline, w.baseline);
        assert_eq!(back.canary["c"].last_scrape, 10);
        // Many baseline hosts: a uniform sample of them.
        let sampled = Window::restored(&w.stored(5));
        let names: Vec<&String> = sampled.baseline.keys().collect();
        assert_eq!(names, ["b0", "b2", "b4", "b6", "b8"]);
    }

    #[test]
    fn metrics_are_means_and_hosts_are_kept_per_side() {
        let mut w = Window::default();
        let with = |v: f64| Interval {
            metrics: [("queue_depth".to_string(), v)].into(),
            ..Default::default()
        };
        w.add(Side::Canary, "a", &with(2.0));
        w.add(Side::Canary, "a", &with(4.0));
        w.add(Side::Baseline, "b", &with(1.0));
        assert_eq!(w.canary["a"].metric("queue_depth"), Some(3.0));
        assert_eq!(w.canary["a"].metric("other"), None);
        assert_eq!(w.baseline["b"].intervals, 1);
        assert!(!w.baseline.contains_key("a"));
    }
}
