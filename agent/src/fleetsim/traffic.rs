//! What a simulated service answers, drawn at random so a benchmark can
//! fail: per heartbeat interval each virtual host serves a Poisson number
//! of requests, each an error with its release's error rate (times the
//! host's own offset), with a lognormal p99 around the release's latency
//! (times the host's offset) and each request's latency drawn from the
//! interval's lognormal into the buckets a service's histogram has; a
//! release just started runs slower and worse for the warm-up (a cold
//! process). The requests each release really answered are counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_common::proto::{LatencyBucket, ServiceHealth};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use statrs::distribution::{ContinuousCDF, DiscreteCDF, LogNormal, Normal, Poisson};

/// The latency histogram's upper bounds (ms), as the sample service's.
pub const LATENCY_BOUNDS_MS: [f64; 12] = [
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    75.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    f64::INFINITY,
];

/// Spread (lognormal sigma) of one interval's request latencies: its p50
/// is a third of its p99.
fn request_sigma() -> f64 {
    3f64.ln() / 2.326_347_874
}

/// The fleet's traffic: the same for every host, per release.
#[derive(Debug, Clone)]
pub struct Model {
    /// Mean requests per host per interval.
    pub requests: f64,
    /// Error rate of a release not named in `error_rates`.
    pub error_rate: f64,
    /// SHA256 → error rate (a bad release).
    pub error_rates: HashMap<String, f64>,
    /// Median p99 (ms) of a release not named in `latency_added`.
    pub p99_ms: f64,
    /// SHA256 → milliseconds added to its p99 (a slow release).
    pub latency_added: HashMap<String, f64>,
    /// Spread of hosts around each other (lognormal sigma of their
    /// latency and error offsets).
    pub host_spread: f64,
    /// How long a release just started runs cold: its first interval
    /// doubles latency and triples errors, fading linearly to nothing.
    pub warmup: Duration,
    /// Requests answered per release so far.
    pub served: Arc<Mutex<HashMap<String, u64>>>,
}

/// One interval's figures for one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cumulative requests at or under each of [`LATENCY_BOUNDS_MS`].
    pub latency_buckets: Vec<(f64, f64)>,
    /// This host's interval count (1, 2, …): the "scrape" it is.
    pub scrape: u64,
}

impl Interval {
    /// The interval as a heartbeat reports it for `service` (ready and
    /// live: the simulator's services do not crash).
    pub fn health(self, service: &str, interval_ms: u32) -> ServiceHealth {
        ServiceHealth {
            service: service.to_string(),
            ready: true,
            live: true,
            restarts: 0,
            request_count: self.requests,
            error_count: self.errors,
            latency_p50_ms: self.p50_ms,
            latency_p99_ms: self.p99_ms,
            interval_ms,
            metrics: Default::default(),
            latency_buckets: self
                .latency_buckets
                .iter()
                .map(|&(le_ms, n)| LatencyBucket {
                    le_ms,
                    count: n as u64,
                })
                .collect(),
            scrape: self.scrape,
            slot: 0,
        }
    }
}

/// A host's own random source and offsets.
pub struct Host {
    rng: SmallRng,
    latency_offset: f64,
    error_offset: f64,
    intervals: u64,
}

impl Host {
    /// Host `index` of a fleet seeded with `seed`.
    pub fn new(model: &Model, seed: u64, index: usize) -> Host {
        let mut rng =
            SmallRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let offset = |rng: &mut SmallRng| match LogNormal::new(0.0, model.host_spread.max(1e-9)) {
            Ok(d) => d.inverse_cdf(rng.random::<f64>().clamp(1e-9, 1.0 - 1e-9)),
            Err(_) => 1.0,
        };
        let latency_offset = offset(&mut rng);
        let error_offset = offset(&mut rng);
        Host {
            rng,
            latency_offset,
            error_offset,
            intervals: 0,
        }
    }

    /// One interval of `artifact`, started `since` ago; counted as served.
    pub fn interval(&mut self, model: &Model, artifact: &str, since: Instant) -> Interval {
        let i = self.draw(model, artifact, since);
        count(model, artifact, i.requests);
        i
    }

    /// One interval of `length` of `artifact`, started `since` ago after
    /// `previous`: when the switch fell inside the interval, the requests
    /// before it are counted as `previous`'s (the share of the interval
    /// each release ran), so a release's count is what it really served.
    pub fn interval_after(
        &mut self,
        model: &Model,
        (artifact, previous): (&str, &str),
        since: Instant,
        length: Duration,
    ) -> Interval {
        let i = self.draw(model, artifact, since);
        let ran = if length.is_zero() || previous.is_empty() {
            1.0
        } else {
            (since.elapsed().as_secs_f64() / length.as_secs_f64()).min(1.0)
        };
        let current = (i.requests as f64 * ran).round() as u64;
        count(model, artifact, current);
        if current < i.requests {
            count(model, previous, i.requests - current);
        }
        i
    }

    /// One interval's draws (not counted).
    fn draw(&mut self, model: &Model, artifact: &str, since: Instant) -> Interval {
        let cold = if model.warmup.is_zero() {
            0.0
        } else {
            (1.0 - since.elapsed().as_secs_f64() / model.warmup.as_secs_f64()).max(0.0)
        };
        let u = |rng: &mut SmallRng| rng.random::<f64>().clamp(1e-12, 1.0 - 1e-12);
        let requests = match Poisson::new(model.requests.max(1e-9)) {
            Ok(d) => d.inverse_cdf(u(&mut self.rng)),
            Err(_) => 0,
        };
        let rate = model
            .error_rates
            .get(artifact)
            .copied()
            .unwrap_or(model.error_rate)
            * self.error_offset
            * (1.0 + 2.0 * cold);
        let rate = rate.clamp(0.0, 1.0);
        // Each request an error or not: a binomial draw.
        let errors = (0..requests)
            .filter(|_| self.rng.random::<f64>() < rate)
            .count() as u64;
        let median = (model.p99_ms + model.latency_added.get(artifact).copied().unwrap_or(0.0))
            * self.latency_offset
            * (1.0 + cold);
        let p99_ms = match LogNormal::new(median.max(1e-3).ln(), 0.1) {
            Ok(d) => d.inverse_cdf(u(&mut self.rng)),
            Err(_) => median,
        };
        let latency_buckets = self.latency_buckets(requests, p99_ms);
        self.intervals += 1;
        Interval {
            requests,
            errors,
            p50_ms: p99_ms / 3.0,
            p99_ms,
            latency_buckets,
            scrape: self.intervals,
        }
    }

    /// `requests` latencies drawn from the lognormal whose p99 is `p99_ms`,
    /// counted into cumulative buckets.
    fn latency_buckets(&mut self, requests: u64, p99_ms: f64) -> Vec<(f64, f64)> {
        let sigma = request_sigma();
        let mu = p99_ms.max(1e-3).ln() - 2.326_347_874 * sigma;
        let Ok(unit) = Normal::new(0.0, 1.0) else {
            return Vec::new();
        };
        // Each bound's CDF once, then each request a uniform draw placed
        // among them (a multinomial draw).
        let cdf: Vec<f64> = LATENCY_BOUNDS_MS
            .iter()
            .map(|b| {
                if b.is_finite() {
                    unit.cdf((b.ln() - mu) / sigma)
                } else {
                    1.0
                }
            })
            .collect();
        let mut counts = [0u64; LATENCY_BOUNDS_MS.len()];
        for _ in 0..requests {
            let u = self.rng.random::<f64>();
            let k = cdf.partition_point(|c| *c < u).min(counts.len() - 1);
            counts[k] += 1;
        }
        let mut total = 0;
        LATENCY_BOUNDS_MS
            .iter()
            .zip(counts)
            .map(|(b, n)| {
                total += n;
                (*b, total as f64)
            })
            .collect()
    }
}

/// Counts `requests` as served by `artifact`.
fn count(model: &Model, artifact: &str, requests: u64) {
    if requests > 0 {
        *model
            .served
            .lock()
            .expect("served lock")
            .entry(artifact.to_string())
            .or_default() += requests;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            requests: 200.0,
            error_rate: 0.001,
            error_rates: [("bad".to_string(), 0.03)].into(),
            p99_ms: 20.0,
            latency_added: [("slow".to_string(), 50.0)].into(),
            host_spread: 0.1,
            warmup: Duration::ZERO,
            served: Arc::default(),
        }
    }

    #[test]
    fn draws_vary_and_average_to_the_model() {
        let m = model();
        let mut h = Host::new(&m, 1, 0);
        let since = Instant::now();
        let runs: Vec<Interval> = (0..2000).map(|_| h.interval(&m, "good", since)).collect();
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        let mean = requests as f64 / runs.len() as f64;
        assert!((mean - 200.0).abs() < 3.0, "{mean}");
        assert!(
            runs.iter().any(|r| r.requests != runs[0].requests),
            "random"
        );
        let rate = errors as f64 / requests as f64 / h.error_offset;
        assert!((rate - 0.001).abs() < 0.0004, "{rate}");
        assert_eq!(
            m.served.lock().unwrap()["good"],
            requests,
            "counted as drawn"
        );
        // A bad release errs more, a slow one is slower.
        let bad: u64 = (0..200).map(|_| h.interval(&m, "bad", since).errors).sum();
        assert!(bad > 500, "{bad}");
        let slow = h.interval(&m, "slow", since).p99_ms;
        assert!(slow > 40.0, "{slow}");
    }

    #[test]
    fn request_latencies_fill_the_buckets_around_the_intervals_quantiles() {
        let m = model();
        let mut h = Host::new(&m, 3, 0);
        let i = h.interval(&m, "good", Instant::now());
        let buckets = &i.latency_buckets;
        assert_eq!(buckets.len(), LATENCY_BOUNDS_MS.len());
        assert_eq!(
            buckets.last().unwrap().1,
            i.requests as f64,
            "every request counted"
        );
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
        // Over many intervals the merged quantiles are near the model's (p99
        // about 20 ms times the host's offset, p50 a third of it; within
        // the buckets' resolution), and a slow release's far above.
        let mut merged = |release: &str| -> Vec<(f64, f64)> {
            let mut sum = vec![0.0; LATENCY_BOUNDS_MS.len()];
            for _ in 0..100 {
                let i = h.interval(&m, release, Instant::now());
                for (s, b) in sum.iter_mut().zip(&i.latency_buckets) {
                    *s += b.1;
                }
            }
            LATENCY_BOUNDS_MS.iter().copied().zip(sum).collect()
        };
        let good = merged("good");
        let p99 = drover_common::histogram::quantile(&good, 0.99).unwrap();
        let p50 = drover_common::histogram::quantile(&good, 0.5).unwrap();
        assert!((15.0..35.0).contains(&p99), "{p99}");
        assert!((4.0..10.0).contains(&p50), "{p50}");
        let slow = drover_common::histogram::quantile(&merged("slow"), 0.99).unwrap();
        assert!(slow > 2.0 * p99, "{slow} against {p99}");
        let i = h.interval(&m, "good", Instant::now());
        assert_eq!(i.scrape, 202, "one scrape per interval");
    }

    #[test]
    fn an_interval_with_a_switch_is_counted_to_each_release_by_its_time() {
        let m = model();
        let mut h = Host::new(&m, 2, 0);
        let length = Duration::from_secs(3600);
        // Switched a quarter of an interval ago (as near as the clock is).
        let since = Instant::now() - length / 4;
        let i = h.interval_after(&m, ("new", "old"), since, length);
        let served = m.served.lock().unwrap().clone();
        let new = served["new"] as f64 / i.requests as f64;
        assert!((0.24..0.27).contains(&new), "{served:?}");
        assert_eq!(served["new"] + served["old"], i.requests);
        // Long enough ago: all of it.
        let i = h.interval_after(&m, ("new", "old"), since - length, length);
        assert_eq!(m.served.lock().unwrap()["new"], served["new"] + i.requests);
    }

    #[test]
    fn hosts_differ_and_a_cold_start_is_worse() {
        let m = Model {
            warmup: Duration::from_secs(3600),
            ..model()
        };
        let offsets: Vec<f64> = (0..20)
            .map(|i| Host::new(&m, 1, i).latency_offset)
            .collect();
        assert!(offsets.iter().any(|o| (o - offsets[0]).abs() > 0.01));
        let mut h = Host::new(&m, 1, 0);
        let cold = h.interval(&m, "good", Instant::now()).p99_ms;
        assert!(cold > 30.0, "twice as slow just after a start: {cold}");
    }
}
