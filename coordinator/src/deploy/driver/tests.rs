//! The driver without I/O: a scripted fleet ([`FakeFleet`]), the embedded
//! store in a temp dir, and tokio's paused clock (sleeps advance at once).

use std::time::Duration;

use drover_common::proto::{
    Analysis, AuditKind, Canary, CanaryStep, HealthGate, HostOutcome, InconclusiveAction,
    InconclusivePolicy, Pipeline, Stage,
};

use super::fake::Reply;
use crate::deploy::machine::{Event, Phase, ReasonKind, Why};
use crate::deploy::testing::{World, new, old};

/// A stage of `hosts` in batches of `batch`, judged quickly: two good
/// samples pass, one bad fails, no restart allowed.
fn stage(name: &str, batch: u32, budget: u32) -> Stage {
    Stage {
        name: name.into(),
        batch_size: batch,
        failure_budget: budget,
        stuck_timeout_ms: 10_000,
        gate: Some(HealthGate {
            samples: 2,
            bad_samples: 1,
            min_requests: 1,
            max_error_rate: 0.1,
            max_restarts: 0,
            inconclusive: InconclusivePolicy::Fail as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn canary_stage(bake_ms: u32) -> Stage {
    Stage {
        canary: Some(Canary {
            steps: vec![CanaryStep {
                count: 1,
                bake_ms,
                ..Default::default()
            }],
            analysis: Some(Analysis {
                inconclusive: InconclusiveAction::Fail as i32,
                min_hosts: 1,
                ..Default::default()
            }),
            manual_promotion: false,
        }),
        ..stage("prod", 2, 0)
    }
}

fn pipeline(stages: Vec<Stage>) -> Pipeline {
    Pipeline {
        name: "hello".into(),
        service: "hello".into(),
        stages,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_good_deploy_runs_each_host_once_and_writes_its_ledger() {
    let w = World::new(&["s1", "s2", "p1", "p2"]).await;
    let p = pipeline(vec![stage("staging", 1, 0), stage("prod", 2, 0)]);
    let id = w.start(&p, &[&["s1", "s2"], &["p1", "p2"]]).await;
    let rec = w.drive(&id).await;
    assert_eq!(rec.machine.phase, Phase::Complete, "{rec:?}");
    for h in ["s1", "s2", "p1", "p2"] {
        assert_eq!(
            (w.fleet.ran(h, "pull"), w.fleet.ran(h, "restart")),
            (1, 1),
            "{h}"
        );
        assert_eq!(w.fleet.running(h), new());
    }
    assert_eq!(w.ledger.known_good("hello").await.unwrap(), new());
    for s in ["staging", "prod"] {
        let env = w.ledger.environment("hello", s).await.unwrap().unwrap();
        assert_eq!(env.artifact, new(), "{s}");
        assert!(w.ledger.passed("hello", s, &new()).await.unwrap());
    }
    assert_eq!(w.ledger.active("hello").await.unwrap(), None, "released");
    let kinds = w.kinds().await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == AuditKind::EnvironmentChanged)
            .count(),
        2
    );
    assert_eq!(kinds.last(), Some(&AuditKind::Complete));
}

/// Failures within the budget pass (the failed host charged), over it the
/// deploy rolls back: (hosts whose restart fails, budget) → end.
#[tokio::test(start_paused = true)]
async fn failures_within_the_budget_pass_and_over_it_roll_back() {
    let cases: [(&[&str], u32, Phase); 4] = [
        (&[], 0, Phase::Complete),
        (&["h2"], 1, Phase::Complete),
        (&["h2"], 0, Phase::RolledBack),
        (&["h1", "h3"], 1, Phase::RolledBack),
    ];
    for (failing, budget, end) in cases {
        let w = World::new(&["h1", "h2", "h3", "h4"]).await;
        for h in failing {
            w.fleet
                .host_mut(h, |h| h.restart = Reply::Fail("exit 1".into()));
        }
        let p = pipeline(vec![stage("prod", 2, budget)]);
        let id = w.start(&p, &[&["h1", "h2", "h3", "h4"]]).await;
        let rec = w.drive(&id).await;
        assert_eq!(
            rec.machine.phase, end,
            "{failing:?} budget {budget}: {rec:?}"
        );
        if end == Phase::Complete {
            for h in failing {
                assert_eq!(rec.results[*h].outcome, HostOutcome::Failed as i32);
            }
        } else {
            // The batch that spent the budget names its failed host.
            let last = failing.last().unwrap();
            assert!(
                rec.machine
                    .reason
                    .contains(&format!("{last}: restart: exit 1")),
                "{rec:?}"
            );
            assert_eq!(rec.machine.reason_kind, ReasonKind::BudgetSpent);
            // Every touched host returned to the old release exactly once.
            for h in &rec.touched {
                assert_eq!(w.fleet.ran(h, "rollback"), 1, "{h}");
                assert_eq!(w.fleet.running(h), old(), "{h}");
            }
            assert_eq!(w.ledger.known_good("hello").await.unwrap(), old());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_host_fails_at_its_deadline_and_is_charged_to_the_budget() {
    let w = World::new(&["h1", "h2"]).await;
    w.fleet.host_mut("h2", |h| h.restart = Reply::Hang);
    let p = pipeline(vec![stage("prod", 2, 0)]);
    let id = w.start(&p, &[&["h1", "h2"]]).await;
    let began = tokio::time::Instant::now();
    let rec = w.drive(&id).await;
    assert_eq!(rec.machine.phase, Phase::RolledBack);
    assert!(
        rec.machine.reason.contains("h2: no result from h2"),
        "{rec:?}"
    );
    // The stuck timeout (10 s) plus the network's slack (5 s), no more.
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(15) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    // The audit names the stuck host (and so notifications do); h1 is not.
    let stuck: Vec<Vec<String>> = w
        .ledger
        .audit_log(&rec.service, 0, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event() == drover_common::proto::AuditKind::HostStuck)
        .map(|e| e.hosts)
        .collect();
    assert_eq!(stuck, [vec!["h2".to_string()]]);
}

#[tokio::test(start_paused = true)]
async fn a_bad_release_fails_its_gate_and_the_reason_says_why() {
    let w = World::new(&["h1", "h2", "h3"]).await;
    for h in ["h1", "h2", "h3"] {
        w.fleet.host_mut(h, |h| h.bad = vec![new()]);
    }
    let p = pipeline(vec![stage("prod", 1, 0)]);
    let id = w.start(&p, &[&["h1", "h2", "h3"]]).await;
    let rec = w.drive(&id).await;
    assert_eq!(rec.machine.phase, Phase::RolledBack);
    assert_eq!(rec.machine.reason_kind, ReasonKind::GateFailed);
    assert!(
        rec.machine.reason.contains("error rate"),
        "{}",
        rec.machine.reason
    );
    assert_eq!(rec.touched, vec!["h1".to_string()], "the first batch only");
    assert_eq!(w.fleet.ran("h1", "rollback"), 1);
    assert_eq!(w.fleet.ran("h2", "restart"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_pause_during_a_batch_stops_after_it_and_resume_goes_on() {
    let w = World::new(&["h1", "h2"]).await;
    w.fleet
        .host_mut("h1", |h| h.restart = Reply::After(Duration::from_secs(3)));
    let p = pipeline(vec![stage("prod", 1, 0)]);
    let id = w.start(&p, &[&["h1", "h2"]]).await;
    let driver = w.driver();
    let task = tokio::spawn({
        let (driver, id) = (driver.clone(), id.clone());
        async move { driver.drive(&id).await }
    });
    // The restart of h1 is in flight: pause.
    w.wait_for(&id, |r| r.touched.contains(&"h1".to_string()))
        .await;
    w.control(&driver, &id, Event::Pause).await;
    w.wait_for(&id, |r| r.machine.phase == Phase::Paused).await;
    let rec = w.record(&id).await;
    assert_eq!(
        (rec.machine.batch, rec.verdicts["0/0"].as_str()),
        (1, "passed")
    );
    assert_eq!(w.fleet.ran("h2", "restart"), 0, "nothing past the pause");
    w.control(&driver, &id, Event::Resume).await;
    task.await.unwrap().unwrap();
    assert_eq!(w.record(&id).await.machine.phase, Phase::Complete);
    assert_eq!(w.fleet.ran("h2", "restart"), 1);
}

#[tokio::test(start_paused = true)]
async fn abort_and_rollback_overtake_a_bake_at_once() {
    for rollback in [true, false] {
        let w = World::new(&["h1", "h2", "h3"]).await;
        let p = pipeline(vec![canary_stage(600_000)]);
        let id = w.start(&p, &[&["h1", "h2", "h3"]]).await;
        let driver = w.driver();
        let task = tokio::spawn({
            let (driver, id) = (driver.clone(), id.clone());
            async move { driver.drive(&id).await }
        });
        w.wait_for(&id, |r| !r.bakes.is_empty()).await;
        let began = tokio::time::Instant::now();
        let why = Why::new(ReasonKind::ByHand, "stop");
        let event = if rollback {
            Event::Rollback(why)
        } else {
            Event::Abort {
                rollback: false,
                why,
            }
        };
        w.control(&driver, &id, event).await;
        task.await.unwrap().unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        let rec = w.record(&id).await;
        assert!(rec.analyses.is_empty(), "no verdict for an overtaken bake");
        if rollback {
            assert_eq!(rec.machine.phase, Phase::RolledBack);
            assert_eq!(w.fleet.ran("h1", "rollback"), 1);
        } else {
            assert_eq!(rec.machine.phase, Phase::Aborted);
            assert_eq!(w.fleet.ran("h1", "rollback"), 0);
        }
        assert_eq!(w.fleet.ran("h2", "restart"), 0);
    }
}

/// A coordinator killed after any number of commands, then a new one
/// resuming from the record, ends where an uninterrupted run ends, and no
/// host runs a command twice.
#[tokio::test(start_paused = true)]
async fn a_crash_at_any_point_resumes_to_the_same_end_without_running_twice() {
    let hosts = ["s1", "p1", "p2", "p3"];
    let p = pipeline(vec![stage("staging", 1, 0), stage("prod", 1, 0)]);
    let plan: [&[&str]; 2] = [&["s1"], &["p1", "p2", "p3"]];
    for bad_in_prod in [false, true] {
        let script = |w: &World| {
            if bad_in_prod {
                w.fleet.host_mut("p2", |h| h.bad = vec![new()]);
            }
        };
        let reference = World::new(&hosts).await;
        script(&reference);
        let id = reference.start(&p, &plan).await;
        let end = reference.drive(&id).await;
        let total = *reference.fleet.sends.lock().unwrap();
        let expected = if bad_in_prod {
            Phase::RolledBack
        } else {
            Phase::Complete
        };
        assert_eq!(end.machine.phase, expected);
        for crash_at in 1..=total {
            let w = World::new(&hosts).await;
            script(&w);
            let id = w.start(&p, &plan).await;
            *w.fleet.crash_at.lock().unwrap() = Some(crash_at);
            let first = w.driver();
            tokio::select! {
                _ = w.fleet.crash.notified() => {}
                done = first.drive(&id) => { done.unwrap(); }
            }
            drop(first);
            let rec = w.drive(&id).await;
            assert_eq!(rec.machine.phase, expected, "crash after {crash_at} sends");
            assert_eq!(rec.touched, end.touched, "crash after {crash_at} sends");
            for h in hosts {
                for verb in ["pull", "restart", "rollback"] {
                    assert!(
                        w.fleet.ran(h, verb) <= 1,
                        "{h} {verb} twice (crash at {crash_at})"
                    );
                }
            }
            let kinds = w.kinds().await;
            let ends = kinds
                .iter()
                .filter(|k| matches!(k, AuditKind::Complete | AuditKind::RolledBack))
                .count();
            assert_eq!(ends, 1, "one ending in the audit (crash at {crash_at})");
        }
    }
}

/// A new leader continues a canary bake to its original deadline, not a
/// fresh one.
#[tokio::test(start_paused = true)]
async fn a_failover_continues_the_bake_where_it_was() {
    let w = World::new(&["h1", "h2", "h3"]).await;
    let p = pipeline(vec![canary_stage(60_000)]);
    let id = w.start(&p, &[&["h1", "h2", "h3"]]).await;
    let first = w.driver();
    tokio::select! {
        _ = async {
            w.wait_for(&id, |r| !r.bakes.is_empty()).await;
            tokio::time::sleep(Duration::from_secs(40)).await;
        } => {}
        _ = first.drive(&id) => panic!("the bake ended before the failover"),
    }
    drop(first);
    let began = w.record(&id).await.bakes["0/0"].started_unix_ms;
    w.drive(&id).await;
    let rec = w.record(&id).await;
    let analysis = &rec.analyses[0];
    let decided_after = analysis.decided_at_unix_ms - began;
    assert!(
        (60_000..65_000).contains(&decided_after),
        "decided {decided_after} ms after the bake began"
    );
    assert!(analysis.baked_ms >= 60_000, "{analysis:?}");
}

/// A crash loop that began (and calmed down) before a failover is still
/// counted after it: restarts are counted from before the batch, as
/// recorded, not from when the new leader took over.
#[tokio::test(start_paused = true)]
async fn a_crash_loop_that_began_before_a_failover_still_fails_the_batch() {
    let w = World::new(&["h1", "h2"]).await;
    w.fleet.host_mut("h1", |h| {
        h.crashing = vec![new()];
        h.crash_limit = Some(2); // crashes twice, then stays up
        h.restarts = 4; // restarts of the old release, before the deploy
    });
    let mut prod = stage("prod", 1, 0);
    prod.settle_ms = 5_000; // the loop runs 5 beats before the gate looks
    let p = pipeline(vec![prod]);
    let id = w.start(&p, &[&["h1", "h2"]]).await;
    let first = w.driver();
    tokio::select! {
        _ = async {
            w.wait_for(&id, |r| r.results.contains_key("h1")).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        } => {}
        _ = first.drive(&id) => panic!("judged before the failover"),
    }
    drop(first);
    let rec = w.drive(&id).await;
    assert_eq!(rec.restarts_before["h1"], 4);
    assert_eq!(rec.machine.phase, Phase::RolledBack, "{rec:?}");
    assert!(
        rec.machine.reason.contains("restarts"),
        "{}",
        rec.machine.reason
    );
}

/// The heartbeat that was on its way when a canary's restart answered
/// says "not ready": the judge reads only what came after the restart.
#[tokio::test(start_paused = true)]
async fn a_canary_is_judged_only_on_heartbeats_after_its_restart() {
    let w = World::new(&["h1", "h2", "h3"]).await;
    for h in ["h1", "h2", "h3"] {
        w.fleet.host_mut(h, |h| h.stale_first_beat = true);
    }
    let p = pipeline(vec![canary_stage(5_000)]);
    let id = w.start(&p, &[&["h1", "h2", "h3"]]).await;
    let rec = w.drive(&id).await;
    assert!(
        !rec.analyses.iter().any(|a| a.reason.contains("not ready")),
        "{:?}",
        rec.analyses
    );
    assert_ne!(rec.machine.phase, Phase::RolledBack, "{rec:?}");
}

/// A canary on thin evidence that suggests harm (1 error in 50 requests
/// a heartbeat against a clean baseline) is not passed at the end of its
/// first window, where the look's share of alpha is small: the window is
/// inconclusive, the bake extends, and the extension's evidence fails it.
#[tokio::test(start_paused = true)]
async fn suggestive_thin_evidence_at_a_window_end_extends_the_bake_instead_of_passing() {
    let w = World::new(&["h1", "h2", "h3", "h4"]).await;
    w.fleet.host_mut("h1", |h| {
        h.bad = vec![new()];
        h.requests = 50;
        h.bad_errors = 1;
    });
    let mut stage = canary_stage(3_000);
    let canary = stage.canary.as_mut().unwrap();
    let analysis = canary.analysis.as_mut().unwrap();
    analysis.inconclusive = InconclusiveAction::Extend as i32;
    analysis.max_extensions = 2;
    crate::deploy::pipeline::analysis_defaults(analysis);
    let p = pipeline(vec![stage]);
    let id = w.start(&p, &[&["h1", "h2", "h3", "h4"]]).await;
    let rec = w.drive(&id).await;
    let a = &rec.analyses[0];
    assert_eq!(
        a.verdict(),
        drover_common::proto::AnalysisVerdict::Fail,
        "{a:?}"
    );
    assert!(a.extensions >= 1, "decided after extending: {a:?}");
    assert_eq!(rec.machine.phase, Phase::RolledBack, "{rec:?}");
}
