//! Canary analysis as pure judgement: the evidence of the canary hosts
//! against that of the baseline hosts (the stage's hosts still on the old
//! version, over the same window), metric by metric, the host being the
//! unit of evidence ([`Window`]: each host's intervals folded into running
//! totals as they arrive).
//!
//! Per metric: the minimum rule (fewer than `min_hosts` hosts that each
//! answered `min_requests` over the window, on either side, is
//! inconclusive), an absolute limit and a limit relative to the baseline
//! on the canary's value over the window, then a one-sided test whose
//! tolerance makes a significant but negligible difference pass:
//!
//! - the error rate is judged on counts: errors out of requests of the
//!   cohort against the baseline, an exact binomial test of "the canary's
//!   rate is at most (1 + tolerance) × the baseline's" ([`stats::binomial_excess`]);
//! - latencies and the service's own metrics one value per host (latency:
//!   the quantile of the host's merged histogram over the window, compared
//!   as logarithms; a metric: its mean): a rank test across hosts when both
//!   sides have many, else a t-test against the baseline hosts' spread
//!   ([`stats::hosts_greater`]); the baseline a uniform sample of at most
//!   [`BASELINE_CAP`] hosts, so a look at any stage costs a sort of at most
//!   that many values.
//!
//! Looks are sequential: each may spend only its share of the false-alarm
//! rate ([`Look::alpha`], the O'Brien-Fleming increments of `spending.rs`),
//! split evenly among the metrics judged (Bonferroni), so a healthy canary
//! is failed by any of them with probability at most `alpha` over the
//! whole bake. Only a window's end can pass; one that more windows may
//! follow (extensions) passes only on evidence that does not suggest harm
//! ([`settle_window_end`]).

use drover_common::proto::{
    Analysis, AnalysisVerdict, MetricCheck, MetricDirection, MetricVerdict,
};
use statrs::statistics::{Data, Median};

pub use super::evidence::{HostEvidence, Interval, Side, Window, sample};
use super::pipeline::{ERROR_RATE, LATENCY_P50, LATENCY_P99};
pub use super::spending::{Look, Spending};
use super::stats;

/// Baseline hosts a look uses at most (a uniform sample of them beyond).
pub const BASELINE_CAP: usize = 20_000;

/// The verdict of a look at a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: AnalysisVerdict,
    pub reason: String,
    pub metrics: Vec<MetricVerdict>,
}

/// Smallest baseline value ratios and effects are measured against, so a
/// near-perfect baseline does not turn noise into a large relative change.
fn floor_of(metric: &str) -> f64 {
    match metric {
        ERROR_RATE => 0.001,
        LATENCY_P99 | LATENCY_P50 => 1.0,
        _ => 1e-9,
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    Data::new(values.to_vec()).median()
}

/// Latencies are compared as logarithms (a slowdown is a ratio), with the
/// hosts taken to differ by at least 2% among themselves.
const LATENCY_SPREAD_FLOOR: f64 = 0.02;

/// One side's evidence on one metric: the hosts that count, their
/// intervals and requests, and one value per host (not for the error rate,
/// which is judged on the side's counts).
#[derive(Debug, Default)]
struct Evidence {
    hosts: u32,
    intervals: u32,
    requests: u64,
    errors: u64,
    /// One value per host (latency in ms, a metric's mean).
    values: Vec<f64>,
}

impl Evidence {
    /// The hosts of `hosts` that count for `metric`: those that answered
    /// `min_requests` over the window (any that carried it, for a metric
    /// of the service's page).
    fn of<'w>(
        metric: &str,
        hosts: impl Iterator<Item = &'w HostEvidence>,
        min_requests: u64,
    ) -> Evidence {
        let mut e = Evidence::default();
        for h in hosts {
            let value = match metric {
                ERROR_RATE => (h.requests >= min_requests).then_some(f64::NAN),
                LATENCY_P99 if h.requests >= min_requests => h.latency_ms(0.99),
                LATENCY_P50 if h.requests >= min_requests => h.latency_ms(0.5),
                LATENCY_P99 | LATENCY_P50 => None,
                _ => h.metric(metric),
            };
            let Some(v) = value else { continue };
            e.hosts += 1;
            e.intervals += h.intervals;
            e.requests += h.requests;
            e.errors += h.errors;
            if metric != ERROR_RATE && v.is_finite() {
                e.values.push(v);
            }
        }
        e
    }

    /// The side's value over the window.
    fn value(&self, metric: &str) -> f64 {
        match metric {
            ERROR_RATE if self.requests == 0 => 0.0,
            ERROR_RATE => self.errors as f64 / self.requests as f64,
            _ => median(&self.values),
        }
    }
}

fn judge_metric(check: &MetricCheck, a: &Analysis, w: &Window, look: Look) -> MetricVerdict {
    let min_requests = u64::from(a.min_requests.max(1));
    let name = check.name.as_str();
    let c = Evidence::of(name, w.canary.values(), min_requests);
    let b = Evidence::of(
        name,
        sample(&w.baseline, BASELINE_CAP)
            .into_iter()
            .map(|(_, h)| h),
        min_requests,
    );
    let higher_is_worse = check.direction() != MetricDirection::LowerIsWorse;
    let test = if name == ERROR_RATE {
        Test::Binomial(stats::binomial_excess(
            c.errors,
            c.requests,
            b.errors,
            b.requests,
            check.tolerance,
        ))
    } else {
        let latency = matches!(name, LATENCY_P99 | LATENCY_P50);
        let (cv, bv, floor) = if latency {
            let ln = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| x.max(1e-3).ln()).collect() };
            (ln(&c.values), ln(&b.values), LATENCY_SPREAD_FLOOR)
        } else {
            (c.values.clone(), b.values.clone(), floor_of(name))
        };
        // The canary stays the canary (a one-host canary is judged against
        // the baseline hosts' spread): lower-is-worse tests the negated
        // values.
        let sign = if higher_is_worse { 1.0 } else { -1.0 };
        let signed = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| sign * x).collect() };
        Test::AcrossHosts(stats::hosts_greater(&signed(cv), &signed(bv), floor))
    };
    let mut out = MetricVerdict {
        name: check.name.clone(),
        p_value: 1.0,
        canary_samples: c.intervals,
        baseline_samples: b.intervals,
        canary_value: c.value(name),
        baseline_value: b.value(name),
        canary_hosts: c.hosts,
        baseline_hosts: b.hosts,
        canary_requests: c.requests,
        baseline_requests: b.requests,
        alpha: look.alpha,
        max: check.max,
        max_ratio: check.max_ratio,
        tolerance: check.tolerance,
        test: match test {
            Test::Binomial(_) => "exact binomial".into(),
            Test::AcrossHosts(Some((_, t))) => t.name().into(),
            Test::AcrossHosts(None) => String::new(),
        },
        ..Default::default()
    };
    // Limits are judged on evidence too: past a limit is a failure only
    // when significant at this look (a noisy value is not proof).
    let limits = if name == ERROR_RATE {
        Limits {
            max_p: Some(stats::binomial_above(c.errors, c.requests, check.max)),
            ratio_p: Some(stats::binomial_excess(
                c.errors,
                c.requests,
                b.errors,
                b.requests,
                check.max_ratio - 1.0,
            )),
        }
    } else {
        // One value per host: the absolute limit as it is (a hard limit on
        // a host's window), the ratio only when the hosts differ
        // significantly.
        Limits {
            max_p: None,
            ratio_p: Some(match test {
                Test::AcrossHosts(Some((p, _))) => p,
                _ => 1.0,
            }),
        }
    };
    let (verdict, reason) = decide(check, a, look, test, limits, &out);
    if let Test::Binomial(p) | Test::AcrossHosts(Some((p, _))) = test {
        out.p_value = p;
    }
    out.verdict = verdict as i32;
    out.reason = reason;
    out
}

/// How significant passing a check's limits is: the p-value of "within
/// the absolute limit" and of "within the ratio to the baseline" (`None`:
/// the value is compared as it is).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    max_p: Option<f64>,
    ratio_p: Option<f64>,
}

/// The test a metric is judged by, with its p-value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Test {
    /// Counts (the error rate).
    Binomial(f64),
    /// One value per host; `None`: too few hosts for any test.
    AcrossHosts(Option<(f64, stats::HostTest)>),
}

/// The verdict on one metric from the evidence `m` sums up, checks in
/// order: minimum hosts, absolute limit, ratio to the baseline, the test
/// with its tolerance.
fn decide(
    check: &MetricCheck,
    a: &Analysis,
    look: Look,
    test: Test,
    limits: Limits,
    m: &MetricVerdict,
) -> (AnalysisVerdict, String) {
    use AnalysisVerdict::{Fail, Inconclusive, Pass};
    let (cv, bv) = (m.canary_value, m.baseline_value);
    let name = &check.name;
    let higher_is_worse = check.direction() != MetricDirection::LowerIsWorse;
    let min_hosts = a.min_hosts.max(1);
    let counted = if matches!(name.as_str(), ERROR_RATE | LATENCY_P99 | LATENCY_P50) {
        format!(" with {} requests", a.min_requests.max(1))
    } else {
        format!(" carrying {name}")
    };
    if m.canary_hosts < min_hosts {
        return (
            Inconclusive,
            format!(
                "{} canary hosts{counted}, {min_hosts} needed",
                m.canary_hosts
            ),
        );
    }
    let past_limit = if higher_is_worse {
        cv > check.max
    } else {
        cv < check.max
    };
    let alpha = look.alpha;
    let proven = |p: Option<f64>| p.is_none_or(|p| p < alpha);
    let shown_p =
        |p: Option<f64>| p.map_or(String::new(), |p| format!(", p={p:.2e} < {alpha:.2e}"));
    if check.max > 0.0 && past_limit && proven(limits.max_p) {
        let (v, limit) = (show(name, cv), show(name, check.max));
        return (
            Fail,
            format!(
                "{name} {v} is past the limit {limit}{}",
                shown_p(limits.max_p)
            ),
        );
    }
    if m.baseline_hosts < min_hosts {
        return (
            Inconclusive,
            format!(
                "{} baseline hosts{counted}, {min_hosts} needed",
                m.baseline_hosts
            ),
        );
    }
    let base = bv.abs().max(floor_of(name));
    let (c_shown, b_shown) = (show(name, cv), show(name, bv));
    let past_ratio = if higher_is_worse {
        cv > base * check.max_ratio
    } else {
        cv * check.max_ratio < bv
    };
    if check.max_ratio > 0.0 && past_ratio && proven(limits.ratio_p) {
        return (
            Fail,
            format!(
                "{name} {c_shown} against the baseline's {b_shown}: past {}x{}",
                check.max_ratio,
                shown_p(limits.ratio_p)
            ),
        );
    }
    let p = match test {
        Test::Binomial(p) | Test::AcrossHosts(Some((p, _))) => p,
        Test::AcrossHosts(None) => {
            return (
                Inconclusive,
                format!(
                    "too few hosts to compare one value per host (a canary host and {} baseline hosts, or {} on each side, are needed)",
                    stats::T_MIN_BASELINE,
                    stats::RANK_MIN_HOSTS
                ),
            );
        }
    };
    let effect = if higher_is_worse {
        (cv - bv) / base
    } else {
        (bv - cv) / base
    };
    if p < alpha && effect > check.tolerance {
        return (
            Fail,
            format!(
                "{name} {c_shown} against the baseline's {b_shown} ({:+.0}%, tolerance {:.0}%), {} p={p:.2e} < {alpha:.2e} (this look's share of alpha {})",
                effect * 100.0,
                check.tolerance * 100.0,
                m.test,
                a.alpha
            ),
        );
    }
    (
        Pass,
        format!("{name} {c_shown} against the baseline's {b_shown} (p={p:.2})"),
    )
}

/// Short human form of a value of `metric`.
fn show(metric: &str, v: f64) -> String {
    match metric {
        ERROR_RATE => format!("{:.2}%", v * 100.0),
        LATENCY_P99 | LATENCY_P50 => format!("{v:.1} ms"),
        _ => format!("{v:.3}"),
    }
}

/// Judges the window at `look` (an interim look can only fail; a pass
/// needs the last look).
pub fn judge(a: &Analysis, w: &Window, look: Look) -> Judgement {
    if let Some((host, n)) = w.canary_restarts.first() {
        return Judgement {
            verdict: AnalysisVerdict::Fail,
            reason: format!("canary host {host} restarted {n} times (crash loop?)"),
            metrics: Vec::new(),
        };
    }
    if !w.canary_not_ready.is_empty() {
        return Judgement {
            verdict: AnalysisVerdict::Fail,
            reason: format!("canary hosts not ready: {}", w.canary_not_ready.join(", ")),
            metrics: Vec::new(),
        };
    }
    // Each metric's share of the look's alpha (Bonferroni).
    let share = Look {
        alpha: look.alpha / a.metrics.len().max(1) as f64,
    };
    let metrics: Vec<MetricVerdict> = a
        .metrics
        .iter()
        .map(|m| judge_metric(m, a, w, share))
        .collect();
    let first = |v: AnalysisVerdict| metrics.iter().find(|m| m.verdict() == v);
    let (verdict, reason) = if let Some(m) = first(AnalysisVerdict::Fail) {
        (AnalysisVerdict::Fail, m.reason.clone())
    } else if let Some(m) = first(AnalysisVerdict::Inconclusive) {
        (
            AnalysisVerdict::Inconclusive,
            format!("{}: {}", m.name, m.reason),
        )
    } else {
        (
            AnalysisVerdict::Pass,
            metrics
                .iter()
                .map(|m| m.reason.clone())
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    Judgement {
        verdict,
        reason,
        metrics,
    }
}

/// A window's end that is not the bake's last look passes only if no
/// metric's test suggests harm: each p-value at or above the metric's
/// share of the whole `alpha`. Early looks spend a small share of alpha
/// (O'Brien-Fleming), so a clearly bad canary seen on thin evidence can
/// miss its look's share and would pass the window; with a p-value under
/// the whole alpha the evidence is too strong to pass on and too thin to
/// fail on, so the window's verdict is inconclusive and the policy
/// extends the bake (more evidence, more of the budget). False alarms stay
/// within `alpha`: no look fails on more than its share. The last look
/// passes on its own share, as before.
pub fn settle_window_end(j: Judgement, a: &Analysis, last: bool) -> Judgement {
    if last || j.verdict != AnalysisVerdict::Pass {
        return j;
    }
    let whole = a.alpha / a.metrics.len().max(1) as f64;
    let Some(m) = j.metrics.iter().find(|m| m.p_value < whole) else {
        return j;
    };
    Judgement {
        verdict: AnalysisVerdict::Inconclusive,
        reason: format!(
            "{}: p = {:.2e} passes this look's share of alpha ({:.2e}) but not the whole of it ({:.2e}): more evidence before it can pass",
            m.name, m.p_value, m.alpha, whole
        ),
        metrics: j.metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_end_passes_only_on_evidence_that_does_not_suggest_harm() {
        let a = analysis(); // alpha 0.05 over two metrics: 0.025 each
        let metric = |name: &str, p: f64| MetricVerdict {
            name: name.into(),
            verdict: AnalysisVerdict::Pass as i32,
            p_value: p,
            alpha: 0.0001,
            ..Default::default()
        };
        let pass = |ps: [f64; 2]| Judgement {
            verdict: AnalysisVerdict::Pass,
            reason: "passed".into(),
            metrics: vec![metric(ERROR_RATE, ps[0]), metric(LATENCY_P99, ps[1])],
        };
        // 5 errors in 25 requests against a clean baseline: far under the
        // whole alpha, over the first window's small share.
        let suggestive = settle_window_end(pass([7.9e-6, 0.6]), &a, false);
        assert_eq!(suggestive.verdict, AnalysisVerdict::Inconclusive);
        assert!(
            suggestive.reason.starts_with("error_rate: p = 7.90e-6"),
            "{}",
            suggestive.reason
        );
        assert_eq!(suggestive.metrics.len(), 2, "the evidence is kept");
        let clean = settle_window_end(pass([0.4, 0.03]), &a, false);
        assert_eq!(clean.verdict, AnalysisVerdict::Pass);
        // The last look has nothing after it: its own share decides.
        assert_eq!(
            settle_window_end(pass([7.9e-6, 0.6]), &a, true).verdict,
            AnalysisVerdict::Pass
        );
        let failed = Judgement {
            verdict: AnalysisVerdict::Fail,
            ..pass([1e-9, 0.6])
        };
        assert_eq!(
            settle_window_end(failed, &a, false).verdict,
            AnalysisVerdict::Fail
        );
    }

    /// An early look (a small share of the default alpha) and the last.
    const INTERIM: Look = Look { alpha: 0.005 };
    const LAST: Look = Look { alpha: 0.05 };

    fn analysis() -> Analysis {
        crate::deploy::pipeline::default_analysis()
    }

    /// `n` intervals of `requests` each with errors spread evenly at `rate`,
    /// and p99 `p99` (+ a little spread), from hosts `<prefix>0..` taking
    /// turns, `hosts` of them.
    fn cohort(
        prefix: &str,
        hosts: usize,
        n: usize,
        requests: u64,
        rate: f64,
        p99: f64,
    ) -> Vec<(String, Interval)> {
        let mut owed = 0.0;
        (0..n)
            .map(|i| {
                owed += requests as f64 * rate;
                let errors = owed.floor() as u64;
                owed -= errors as f64;
                let interval = Interval {
                    requests,
                    errors,
                    p50_ms: p99 / 3.0,
                    p99_ms: p99 + (i % 5) as f64,
                    ..Default::default()
                };
                (format!("{prefix}{}", i % hosts), interval)
            })
            .collect()
    }

    /// One canary host's intervals.
    fn obs(n: usize, requests: u64, rate: f64, p99: f64) -> Vec<(String, Interval)> {
        cohort("c", 1, n, requests, rate, p99)
    }

    /// Four baseline hosts' intervals.
    fn base(n: usize, requests: u64, rate: f64, p99: f64) -> Vec<(String, Interval)> {
        cohort("b", 4, n, requests, rate, p99)
    }

    fn window(canary: Vec<(String, Interval)>, baseline: Vec<(String, Interval)>) -> Window {
        let mut w = Window::default();
        for (side, intervals) in [(Side::Canary, canary), (Side::Baseline, baseline)] {
            for (host, i) in intervals {
                w.add(side, &host, &i);
            }
        }
        w
    }

    #[test]
    fn three_percent_errors_against_a_tenth_of_a_percent_fail_even_at_an_interim_look() {
        let w = window(obs(10, 40, 0.03, 20.0), base(32, 40, 0.001, 20.0));
        let j = judge(&analysis(), &w, INTERIM);
        assert_eq!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        assert!(j.reason.contains("error_rate"), "{}", j.reason);
        let m = &j.metrics[0];
        assert!(m.p_value < 0.005, "{m:?}");
        assert_eq!((m.canary_samples, m.baseline_samples), (10, 32));
        assert_eq!((m.canary_hosts, m.baseline_hosts), (1, 4));
        assert_eq!((m.canary_requests, m.baseline_requests), (400, 1280));
        assert_eq!(m.test, "exact binomial");
        // Two metrics share the look's alpha.
        assert_eq!(m.alpha, INTERIM.alpha / 2.0);
    }

    #[test]
    fn a_latency_regression_fails_and_equal_versions_pass() {
        // One canary host against four: judged host against hosts.
        let slow = window(obs(10, 40, 0.0, 100.0), base(20, 40, 0.0, 20.0));
        let j = judge(&analysis(), &slow, LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        assert!(j.reason.contains("latency_p99_ms"), "{}", j.reason);
        assert_eq!(j.metrics[1].test, "t-test across hosts");

        let same = window(obs(10, 40, 0.001, 20.0), base(20, 40, 0.001, 20.0));
        let j = judge(&analysis(), &same, LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Pass, "{j:?}");
    }

    #[test]
    fn a_significant_but_tolerated_difference_passes() {
        // 25 hosts each side, every canary host 5% slower: significant
        // (the rank test across hosts), but within the 10% tolerance.
        let six = |prefix: &str, p99: f64| -> Vec<(String, Interval)> {
            (0..25)
                .flat_map(|h| {
                    cohort(
                        &format!("{prefix}{h}-"),
                        1,
                        5,
                        40,
                        0.0,
                        p99 + h as f64 * 0.05,
                    )
                })
                .collect()
        };
        let w = window(six("c", 21.0), six("b", 20.0));
        let j = judge(&analysis(), &w, LAST);
        assert_eq!(j.metrics[1].test, "rank test across hosts");
        assert_eq!(j.metrics[1].name, "latency_p99_ms");
        assert!(j.metrics[1].p_value < 0.05, "{:?}", j.metrics[1]);
        assert_eq!(j.verdict, AnalysisVerdict::Pass, "{j:?}");
    }

    #[test]
    fn too_little_traffic_is_inconclusive() {
        // A host under min_requests over the window does not count.
        let w = window(obs(10, 2, 0.5, 20.0), base(32, 40, 0.001, 20.0));
        let j = judge(&analysis(), &w, LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Inconclusive, "{j:?}");
        assert!(
            j.reason
                .contains("0 canary hosts with 50 requests, 1 needed"),
            "{}",
            j.reason
        );
        // The hosts the window needs are a minimum too.
        let mut a = analysis();
        a.min_hosts = 2;
        let j = judge(
            &a,
            &window(obs(10, 40, 0.0, 20.0), base(32, 40, 0.0, 20.0)),
            LAST,
        );
        assert!(
            j.reason
                .contains("1 canary hosts with 50 requests, 2 needed"),
            "{}",
            j.reason
        );
        // Likewise a thin baseline.
        let w = window(obs(10, 40, 0.0, 20.0), base(2, 40, 0.0, 20.0));
        assert_eq!(
            judge(&analysis(), &w, LAST).verdict,
            AnalysisVerdict::Inconclusive
        );
    }

    #[test]
    fn limits_directions_and_hard_failures() {
        let mut a = analysis();
        a.metrics[0].max = 0.01;
        // Over the absolute limit with no usable baseline: still a failure.
        let w = window(obs(10, 100, 0.03, 20.0), Vec::new());
        let j = judge(&a, &w, INTERIM);
        assert_eq!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        assert!(j.reason.contains("past the limit 1.00%"), "{}", j.reason);
        // A noisy value over it is not proof: 4 errors in 300 requests.
        let w = window(obs(3, 100, 0.014, 20.0), Vec::new());
        let j = judge(&a, &w, LAST);
        assert_ne!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        // Lower is worse: a throughput-like metric dropping fails on ratio.
        a.metrics = vec![MetricCheck {
            name: LATENCY_P50.into(),
            direction: MetricDirection::LowerIsWorse as i32,
            max_ratio: 2.0,
            tolerance: 0.1,
            ..Default::default()
        }];
        let w = window(obs(10, 40, 0.0, 30.0), base(10, 40, 0.0, 90.0));
        let j = judge(&a, &w, LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        // One canary host against the baseline hosts' spread, as upward.
        assert_eq!(j.metrics[0].test, "t-test across hosts", "{j:?}");
        assert!(j.reason.contains("past 2x, p="), "{}", j.reason);
        // A metric of the service's page: judged on the values heartbeats
        // carry; none carried is inconclusive.
        a.metrics[0].name = "queue_depth".into();
        let j = judge(&a, &w, LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Inconclusive);
        assert!(
            j.reason.contains("0 canary hosts carrying queue_depth"),
            "{}",
            j.reason
        );
        let with = |n: usize, depth: f64| -> Vec<(String, Interval)> {
            (0..n)
                .map(|i| {
                    let metrics = [("queue_depth".to_string(), depth + (i % 3) as f64)].into();
                    let interval = Interval {
                        metrics,
                        ..Default::default()
                    };
                    (format!("h{}", i % 3), interval)
                })
                .collect()
        };
        a.metrics[0].direction = MetricDirection::HigherIsWorse as i32;
        let j = judge(&a, &window(with(10, 50.0), with(10, 5.0)), LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Fail, "{j:?}");
        let j = judge(&a, &window(with(10, 5.0), with(10, 5.0)), LAST);
        assert_eq!(j.verdict, AnalysisVerdict::Pass, "{j:?}");
        // Restarts and unready canaries fail outright.
        let mut w = window(obs(10, 40, 0.0, 20.0), base(10, 40, 0.0, 20.0));
        w.canary_not_ready = vec!["web-0".into()];
        assert!(judge(&analysis(), &w, INTERIM).reason.contains("not ready"));
        w.canary_restarts = vec![("web-0".into(), 2)];
        assert!(
            judge(&analysis(), &w, INTERIM)
                .reason
                .contains("restarted 2 times")
        );
    }
}
