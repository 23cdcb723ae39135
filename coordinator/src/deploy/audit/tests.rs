//! The audit's events from transitions, and `what_was_running` from them
//! alone.

use drover_common::proto::{AuditKind, Host, Pipeline};

use super::*;
use crate::deploy::machine::Why;
use crate::deploy::start::{NewDeploy, new_record};

fn pipeline() -> Pipeline {
    crate::deploy::testing::staged_pipeline(&["staging", "prod"])
}

fn host(id: &str) -> Host {
    Host {
        host_id: id.into(),
        ..Default::default()
    }
}

fn release(c: char) -> String {
    c.to_string().repeat(64)
}

/// A deploy of `artifact` over staging (s1) and prod (p1), starting with
/// `environments` running, its events at `at` onwards.
struct Run {
    rec: DeployRecord,
    log: Vec<AuditEvent>,
    at: u64,
}

impl Run {
    fn start(id: &str, artifact: char, known_good: &str, environments: [&str; 2], at: u64) -> Run {
        let p = pipeline();
        let (rec, _) = new_record(NewDeploy {
            id: id.into(),
            pipeline: &p,
            hosts: vec![vec![host("s1")], vec![host("p1")]],
            artifact: release(artifact),
            git_sha: String::new(),
            known_good: known_good.into(),
            environments: environments.iter().map(|e| e.to_string()).collect(),
            live_slots: Vec::new(),
            first_stage: 0,
            forced_past: Vec::new(),
            requester: "ci".into(),
            started_by: "ci".into(),
            idempotency_key: String::new(),
            train: None,
            config: String::new(),
            environment_configs: Vec::new(),
            now: at,
        })
        .unwrap();
        let log = vec![started(&rec, "ci", at)];
        Run { rec, log, at }
    }

    /// The batch in flight starts switching its hosts.
    fn switch(&mut self) {
        self.at += 10;
        let (s, b) = (self.rec.machine.stage, self.rec.machine.batch);
        for h in self.rec.hosts_of(s, b) {
            self.rec.touched.push(h);
        }
        self.log.push(batch_started(&self.rec, s, b, self.at));
    }

    fn apply(&mut self, event: Event) {
        self.at += 10;
        let before = self.rec.machine.clone();
        let (m, actions) = before.apply(event.clone()).unwrap();
        self.rec.machine = m;
        self.log.extend(transition(
            &before, &self.rec, &event, &actions, DROVER, self.at,
        ));
    }
}

fn env<'a>(r: &'a WhatWasRunningResponse, stage: &str) -> &'a EnvironmentAt {
    r.environments
        .iter()
        .find(|e| e.stage == stage)
        .unwrap_or_else(|| panic!("no {stage} in {r:?}"))
}

#[test]
fn a_staged_rollback_returns_each_environment_to_its_own_release() {
    let (a, b) = (release('a'), release('b'));
    // Deploy 1: a everywhere.
    let mut d1 = Run::start("d1", 'a', "", ["", ""], 1000);
    for _ in 0..2 {
        d1.switch();
        d1.apply(Event::BatchPassed);
    }
    assert_eq!(d1.rec.machine.phase, Phase::Complete);
    // Deploy 2: b passes staging, then is aborted before prod.
    let mut d2 = Run::start("d2", 'b', &a, [&a, &a], 2000);
    d2.switch();
    d2.apply(Event::BatchPassed);
    d2.apply(Event::Abort {
        rollback: false,
        why: Why::new(ReasonKind::ByHand, "not today"),
    });
    // Deploy 3: c passes staging, fails in prod, rolls back.
    let mut d3 = Run::start("d3", 'c', &a, [&b, &a], 3000);
    d3.switch();
    d3.apply(Event::BatchPassed);
    let staging_passed = d3.at;
    d3.switch();
    let prod_switching = d3.at;
    d3.apply(Event::BatchFailed(Why::new(ReasonKind::GateFailed, "5xx")));
    d3.apply(Event::RollbackDone);
    assert_eq!(d3.rec.machine.phase, Phase::RolledBack);

    let mut log = d1.log.clone();
    log.extend(d2.log.clone());
    log.extend(d3.log.clone());
    // Nothing in it is read from text.
    for e in &mut log {
        e.message = "(not read)".into();
    }

    let before = what_was_running(&log, 2999);
    assert_eq!(env(&before, "staging").artifact, b);
    assert_eq!(env(&before, "prod").artifact, a);
    assert_eq!(
        (before.artifact.as_str(), before.deploy_id.as_str()),
        (a.as_str(), "d1")
    );
    assert!(before.in_progress_deploy_id.is_empty());

    let during = what_was_running(&log, prod_switching);
    assert_eq!(env(&during, "staging").artifact, release('c'));
    assert_eq!(env(&during, "staging").since_unix_ms, staging_passed);
    assert_eq!(env(&during, "prod").artifact, a);
    assert_eq!(env(&during, "prod").in_progress_deploy_id, "d3");
    assert!(env(&during, "staging").in_progress_deploy_id.is_empty());
    assert_eq!(during.in_progress_deploy_id, "d3");
    assert_eq!(during.artifact, a);

    let after = what_was_running(&log, u64::MAX);
    assert_eq!(
        env(&after, "staging").artifact,
        b,
        "staging returns to its own release"
    );
    assert_eq!(env(&after, "prod").artifact, a);
    assert_eq!(env(&after, "staging").deploy_id, "d3");
    assert!(after.in_progress_deploy_id.is_empty());
    assert!(
        after
            .environments
            .iter()
            .all(|e| e.in_progress_deploy_id.is_empty())
    );
    assert_eq!(after.artifact, a);
    // Nothing had run before the first deploy.
    assert!(what_was_running(&log, 999).artifact.is_empty());
}

#[test]
fn events_carry_their_kind_and_structured_fields() {
    let a = release('a');
    let mut d = Run::start("d", 'b', &a, [&a, &a], 1000);
    d.switch();
    d.apply(Event::BatchFailed(Why::new(
        ReasonKind::BudgetSpent,
        "2 hosts failed",
    )));
    let kinds: Vec<AuditKind> = d.log.iter().map(|e| e.event()).collect();
    assert_eq!(
        kinds,
        vec![
            AuditKind::Started,
            AuditKind::BatchStarted,
            AuditKind::BatchFailed,
            AuditKind::RollbackStarted
        ]
    );
    let failed = &d.log[2];
    assert_eq!(failed.stage, "staging");
    assert_eq!(failed.hosts, vec!["s1".to_string()]);
    assert_eq!(failed.reason_kind(), ProtoReason::BudgetSpent);
    assert_eq!(failed.reason, "2 hosts failed");
    let rollback = &d.log[3];
    assert_eq!(
        (
            rollback.from_artifact.as_str(),
            rollback.to_artifact.as_str()
        ),
        (release('b').as_str(), a.as_str())
    );
    assert_eq!(rollback.actor, DROVER);
    let started = &d.log[1];
    assert_eq!(
        (started.from_artifact.as_str(), started.to_artifact.as_str()),
        (a.as_str(), release('b').as_str())
    );
}
