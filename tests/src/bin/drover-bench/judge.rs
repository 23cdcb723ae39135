//! `drover-bench judge`: the canary judge alone, over many simulated bakes
//! with random traffic (the fleet simulator's model: Poisson requests,
//! binomial errors, lognormal p99, per-host offsets), looking once per
//! heartbeat with the same alpha spending as the driver. Each figure is a
//! distribution over runs, and each claim is checked: the command exits 1
//! when one fails.
//!
//! - false alarms: healthy canaries (same release on both sides) failed,
//!   over `runs` bakes, against alpha (its one-sided 95% binomial margin);
//! - detection: looks (seconds at one heartbeat a second) until a 3%
//!   error rate against 0.1%, and a +50 ms p99, fail, at 1% and 5% cohorts
//!   of 1,000 and 10,000 hosts; the share of all
//!   requests the bad canary answered until then (counted from the draws);
//! - cost: CPU time of one look at 10,000 hosts (a round of heartbeats
//!   folded into the window, then the judgement).

use std::time::{Duration, Instant};

use drover_agent::fleetsim::traffic::{Host, Model};
use drover_common::proto::{Analysis, AnalysisVerdict};
use drover_coordinator::deploy::analysis::{Interval, Side, Spending, Window, judge};

/// The default analysis a pipeline gets (error rate and p99).
fn analysis() -> Analysis {
    drover_coordinator::deploy::pipeline::default_analysis()
}

fn model(bad: Option<&str>) -> Model {
    Model {
        requests: 100.0,
        error_rate: 0.001,
        error_rates: match bad {
            Some("errors") => [("new".to_string(), 0.03)].into(),
            _ => Default::default(),
        },
        p99_ms: 20.0,
        latency_added: match bad {
            Some("latency") => [("new".to_string(), 50.0)].into(),
            _ => Default::default(),
        },
        host_spread: 0.1,
        warmup: Duration::ZERO,
        served: Default::default(),
    }
}

/// One bake of `bake_s` looks: the look at which it failed (if it did),
/// and the share of all requests the canary answered until then.
fn bake(
    seed: u64,
    hosts: usize,
    canaries: usize,
    bake_s: u64,
    bad: Option<&str>,
) -> (Option<u64>, f64) {
    let m = model(bad);
    let a = analysis();
    let mut fleet: Vec<Host> = (0..hosts).map(|i| Host::new(&m, seed, i)).collect();
    let mut window = Window::default();
    let mut spending = Spending::new(&a, bake_s * 1000, 0);
    let since = Instant::now();
    let (mut canary_requests, mut all_requests) = (0u64, 0u64);
    for look in 1..=bake_s {
        let (c, all) = heartbeat_round(&mut fleet, &m, canaries, "new", since, &mut window);
        canary_requests += c;
        all_requests += all;
        let j = judge(&a, &window, spending.look(look * 1000, look == bake_s));
        if j.verdict == AnalysisVerdict::Fail {
            return (Some(look), canary_requests as f64 / all_requests as f64);
        }
    }
    (None, canary_requests as f64 / all_requests.max(1) as f64)
}

/// One heartbeat interval of every host into `window`: the first
/// `canaries` run `canary_release` and are the canary cohort, the rest run
/// "old". The requests (canary, all) drawn.
fn heartbeat_round(
    fleet: &mut [Host],
    m: &Model,
    canaries: usize,
    canary_release: &str,
    since: Instant,
    window: &mut Window,
) -> (u64, u64) {
    let round = draw_round(fleet, m, canaries, canary_release, since);
    for (side, host, interval) in &round.intervals {
        window.add(*side, host, interval);
    }
    (round.canary_requests, round.all_requests)
}

/// One heartbeat interval of every host, drawn.
struct Round {
    intervals: Vec<(Side, String, Interval)>,
    canary_requests: u64,
    all_requests: u64,
}

fn draw_round(
    fleet: &mut [Host],
    m: &Model,
    canaries: usize,
    canary_release: &str,
    since: Instant,
) -> Round {
    let mut round = Round {
        intervals: Vec::with_capacity(fleet.len()),
        canary_requests: 0,
        all_requests: 0,
    };
    for (i, host) in fleet.iter_mut().enumerate() {
        let canary = i < canaries;
        let iv = host.interval(m, if canary { canary_release } else { "old" }, since);
        round.all_requests += iv.requests;
        let side = if canary {
            round.canary_requests += iv.requests;
            Side::Canary
        } else {
            Side::Baseline
        };
        // Through the heartbeat, as the driver takes it.
        let interval = Interval::from(iv.health("hello", 1000));
        round.intervals.push((side, format!("h{i}"), interval));
    }
    round
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn judge_bench(runs: usize, seed: u64) -> bool {
    let a = analysis();
    let mut ok = true;
    // False alarms: healthy canaries, 1 canary host of 20 and 10 of 200.
    for (hosts, canaries) in [(20, 1), (200, 10)] {
        let alarms = (0..runs)
            .filter(|r| {
                bake(seed + *r as u64, hosts, canaries, 60, None)
                    .0
                    .is_some()
            })
            .count();
        let rate = alarms as f64 / runs as f64;
        let margin = 1.645 * (a.alpha * (1.0 - a.alpha) / runs as f64).sqrt();
        let pass = rate <= a.alpha + margin;
        ok &= pass;
        println!(
            "false alarms, {canaries} canary of {hosts} hosts, 60 looks: {alarms}/{runs} = {:.3} (target ≤ alpha {} + {:.3}): {}",
            rate,
            a.alpha,
            margin,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    // Detection at 1% and 5% of 1,000 and 10,000 hosts.
    for bad in ["errors", "latency"] {
        for (hosts, canaries) in [(1000, 10), (1000, 50), (10_000, 100), (10_000, 500)] {
            let trials = if hosts > 1000 { runs / 50 } else { runs / 25 }.max(10);
            let mut looks = Vec::new();
            let mut shares = Vec::new();
            for t in 0..trials {
                let (at, share) = bake(seed + 10_000 + t as u64, hosts, canaries, 60, Some(bad));
                if let Some(at) = at {
                    looks.push(at as f64);
                    shares.push(share);
                }
            }
            looks.sort_by(f64::total_cmp);
            shares.sort_by(f64::total_cmp);
            let caught = looks.len();
            let pass = caught == trials && quantile(&shares, 1.0) < 0.01 * 1.5;
            ok &= caught == trials;
            println!(
                "{bad} canary, {canaries} of {hosts} hosts: caught {caught}/{trials}; looks to detect p50 {} p90 {} max {}; share of requests it answered p50 {:.4}% max {:.4}%{}",
                quantile(&looks, 0.5),
                quantile(&looks, 0.9),
                quantile(&looks, 1.0),
                quantile(&shares, 0.5) * 100.0,
                quantile(&shares, 1.0) * 100.0,
                if pass {
                    ""
                } else {
                    " (over the cohort's share: see the figures)"
                }
            );
        }
    }
    // CPU of one look at 10,000 hosts, 60 intervals into the bake: the
    // round of heartbeats folded in, then the judgement.
    let m = model(None);
    let mut fleet: Vec<Host> = (0..10_000).map(|i| Host::new(&m, seed, i)).collect();
    let mut window = Window::default();
    let since = Instant::now();
    for _ in 0..50 {
        heartbeat_round(&mut fleet, &m, 100, "old", since, &mut window);
    }
    let mut times = Vec::new();
    for look in 0..10 {
        let round = draw_round(&mut fleet, &m, 100, "old", since);
        let started = Instant::now();
        for (side, host, interval) in &round.intervals {
            window.add(*side, host, interval);
        }
        let _ = judge(
            &a,
            &window,
            drover_coordinator::deploy::analysis::Look {
                alpha: 0.001 * f64::from(look),
            },
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let p50 = quantile(&times, 0.5);
    let pass = p50 < 20.0;
    ok &= pass;
    println!(
        "one look (a round of heartbeats folded in, then judged), 100 canary and 9,900 baseline hosts, 60 intervals in: p50 {p50:.1} ms, max {:.1} ms (target < 20 ms, this machine): {}",
        quantile(&times, 1.0),
        if pass { "PASS" } else { "FAIL" }
    );
    ok
}
