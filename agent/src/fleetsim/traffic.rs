//! What a simulated service answers, drawn at random so a benchmark can
//! fail: per heartbeat interval each virtual host serves a Poisson number
//! of requests, each an error with its release's error rate (times the
//! host's own offset), with a lognormal p99 around the release's latency
//! (times the host's offset); a release just started runs slower and
//! worse for the warm-up (a cold process). The requests each release
//! really answered are counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use statrs::distribution::{ContinuousCDF, DiscreteCDF, LogNormal, Poisson};

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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A host's own random source and offsets.
pub struct Host {
    rng: SmallRng,
    latency_offset: f64,
    error_offset: f64,
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
        }
    }

    /// One interval of `artifact`, started `since` ago; counted as served.
    pub fn interval(&mut self, model: &Model, artifact: &str, since: Instant) -> Interval {
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
        *model
            .served
            .lock()
            .expect("served lock")
            .entry(artifact.to_string())
            .or_default() += requests;
        Interval {
            requests,
            errors,
            p50_ms: p99_ms / 3.0,
            p99_ms,
        }
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
