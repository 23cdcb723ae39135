//! The health gate of a batch, as pure judgement of one sample: the batch's
//! hosts against absolute limits and against the baseline (hosts of the
//! stage still on the old version).

use drover_common::proto::{HealthGate, ServiceHealth};

/// One heartbeat interval's figures of a group of hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub hosts: usize,
    pub not_ready: usize,
    /// Hosts with no health report for the service yet (no heartbeat since
    /// the restart): no evidence either way.
    pub unreported: usize,
    pub requests: u64,
    pub errors: u64,
    /// Worst host's p99.
    pub p99_ms: f64,
    /// Restarts since the batch started, summed.
    pub restarts: u32,
}

impl Sample {
    /// Adds one host's health for the service (`None`: the host reported none).
    pub fn add(&mut self, health: Option<&ServiceHealth>, restarts_at_start: u32) {
        self.hosts += 1;
        let Some(h) = health else {
            self.unreported += 1;
            return;
        };
        if !h.ready {
            self.not_ready += 1;
        }
        self.requests += h.request_count;
        self.errors += h.error_count;
        self.p99_ms = self.p99_ms.max(h.latency_p99_ms);
        self.restarts += h.restarts.saturating_sub(restarts_at_start);
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Good,
    Bad(String),
    /// Too little data to judge.
    Inconclusive(String),
}

/// Judges one sample of a batch.
pub fn judge(gate: &HealthGate, batch: &Sample, baseline: Option<&Sample>) -> Verdict {
    // Restarts first: a crash loop also makes hosts unready, but the
    // restarts say why.
    let max_restarts = gate.max_restarts * batch.hosts as u32;
    if batch.restarts > max_restarts {
        return Verdict::Bad(format!(
            "{} restarts (crash loop?), at most {max_restarts} allowed",
            batch.restarts
        ));
    }
    if batch.not_ready > 0 {
        return Verdict::Bad(format!(
            "{} of {} hosts not ready",
            batch.not_ready, batch.hosts
        ));
    }
    if batch.unreported > 0 {
        return Verdict::Inconclusive(format!(
            "{} of {} hosts have not reported since their restart",
            batch.unreported, batch.hosts
        ));
    }
    if batch.requests < u64::from(gate.min_requests.max(1)) {
        return Verdict::Inconclusive(format!(
            "{} requests in the sample, {} needed",
            batch.requests,
            gate.min_requests.max(1)
        ));
    }
    let rate = batch.error_rate();
    if gate.max_error_rate > 0.0 && rate > gate.max_error_rate {
        return Verdict::Bad(format!(
            "error rate {:.2}% over the limit {:.2}%",
            rate * 100.0,
            gate.max_error_rate * 100.0
        ));
    }
    if gate.max_p99_ms > 0.0 && batch.p99_ms > gate.max_p99_ms {
        return Verdict::Bad(format!(
            "p99 {:.0} ms over the limit {:.0} ms",
            batch.p99_ms, gate.max_p99_ms
        ));
    }
    if let Some(base) = baseline.filter(|b| b.requests > 0) {
        // A small floor keeps a near-perfect baseline from failing on noise.
        let base_rate = base.error_rate().max(0.001);
        if gate.max_error_rate_ratio > 0.0 && rate > base_rate * gate.max_error_rate_ratio {
            return Verdict::Bad(format!(
                "error rate {:.2}% is over {}x the baseline's {:.2}%",
                rate * 100.0,
                gate.max_error_rate_ratio,
                base.error_rate() * 100.0
            ));
        }
        let base_p99 = base.p99_ms.max(1.0);
        if gate.max_p99_ratio > 0.0 && batch.p99_ms > base_p99 * gate.max_p99_ratio {
            return Verdict::Bad(format!(
                "p99 {:.0} ms is over {}x the baseline's {:.0} ms",
                batch.p99_ms, gate.max_p99_ratio, base.p99_ms
            ));
        }
    }
    Verdict::Good
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> HealthGate {
        HealthGate {
            max_error_rate: 0.01,
            max_error_rate_ratio: 2.0,
            max_p99_ms: 500.0,
            max_p99_ratio: 1.5,
            max_restarts: 0,
            bad_samples: 3,
            samples: 5,
            min_requests: 10,
            inconclusive: 1,
        }
    }

    fn sample(requests: u64, errors: u64, p99: f64) -> Sample {
        Sample {
            hosts: 1,
            not_ready: 0,
            unreported: 0,
            requests,
            errors,
            p99_ms: p99,
            restarts: 0,
        }
    }

    #[test]
    fn judges_absolute_and_relative_limits() {
        let base = sample(1000, 1, 100.0);
        assert_eq!(
            judge(&gate(), &sample(100, 0, 90.0), Some(&base)),
            Verdict::Good
        );
        assert!(
            matches!(judge(&gate(), &sample(100, 3, 90.0), Some(&base)), Verdict::Bad(r) if r.contains("over the limit 1.00%"))
        );
        assert!(
            matches!(judge(&gate(), &sample(100, 0, 600.0), None), Verdict::Bad(r) if r.contains("p99 600 ms"))
        );
        assert!(
            matches!(judge(&gate(), &sample(100, 0, 180.0), Some(&base)), Verdict::Bad(r) if r.contains("1.5x the baseline"))
        );
        let mut g = gate();
        g.max_error_rate = 0.0;
        assert!(
            matches!(judge(&g, &sample(1000, 5, 90.0), Some(&base)), Verdict::Bad(r) if r.contains("2x the baseline"))
        );
        assert!(matches!(
            judge(&gate(), &sample(3, 0, 10.0), None),
            Verdict::Inconclusive(_)
        ));
        let mut not_ready = sample(100, 0, 10.0);
        not_ready.not_ready = 1;
        assert!(
            matches!(judge(&gate(), &not_ready, None), Verdict::Bad(r) if r.contains("not ready"))
        );
        let mut silent = sample(100, 0, 10.0);
        silent.unreported = 1;
        assert!(
            matches!(judge(&gate(), &silent, None), Verdict::Inconclusive(r) if r.contains("not reported"))
        );
        let mut crashing = sample(100, 0, 10.0);
        crashing.restarts = 2;
        assert!(
            matches!(judge(&gate(), &crashing, None), Verdict::Bad(r) if r.contains("restarts"))
        );
    }
}
