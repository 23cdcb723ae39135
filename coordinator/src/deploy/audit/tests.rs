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
        Self::start_with(id, artifact, known_good, environments, None, at)
    }

    /// A config deploy of `config` to stage `stage` (staging 0, prod 1),
    /// whose environments run `configs`, all on release `code`.
    fn start_config(
        id: &str,
        code: char,
        stage: usize,
        configs: [&str; 2],
        config: &str,
        at: u64,
    ) -> Run {
        let c = release(code);
        Self::start_with(id, code, &c, [&c, &c], Some((stage, configs, config)), at)
    }

    fn start_with(
        id: &str,
        artifact: char,
        known_good: &str,
        environments: [&str; 2],
        config: Option<(usize, [&str; 2], &str)>,
        at: u64,
    ) -> Run {
        let p = pipeline();
        let (first_stage, environment_configs, config) = match config {
            None => (0, Vec::new(), String::new()),
            Some((stage, configs, config)) => (
                stage,
                configs.iter().map(|c| c.to_string()).collect(),
                config.to_string(),
            ),
        };
        let (rec, _) = new_record(NewDeploy {
            id: id.into(),
            pipeline: &p,
            hosts: vec![vec![host("s1")], vec![host("p1")]],
            artifact: release(artifact),
            git_sha: String::new(),
            known_good: known_good.into(),
            environments: environments.iter().map(|e| e.to_string()).collect(),
            live_slots: Vec::new(),
            first_stage,
            forced_past: Vec::new(),
            requester: "ci".into(),
            started_by: "ci".into(),
            idempotency_key: String::new(),
            train: None,
            config,
            environment_configs,
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
fn what_ran_when_names_the_config_with_the_code() {
    let (a, c1, c2) = (release('a'), release('1'), release('2'));
    let mut d1 = Run::start("d1", 'a', "", ["", ""], 1000);
    for _ in 0..2 {
        d1.switch();
        d1.apply(Event::BatchPassed);
    }
    // Prod takes config c1; then staging's c2 fails and goes back to none.
    let mut d2 = Run::start_config("d2", 'a', 1, ["", ""], &c1, 2000);
    assert!(d2.rec.plan[0].is_empty(), "prod only");
    d2.switch();
    d2.apply(Event::BatchPassed);
    assert_eq!(d2.rec.machine.phase, Phase::Complete);
    let mut d3 = Run::start_config("d3", 'a', 0, ["", &c1], &c2, 3000);
    d3.switch();
    let staging_switching = d3.at;
    d3.apply(Event::BatchFailed(Why::new(ReasonKind::GateFailed, "5xx")));
    d3.apply(Event::RollbackDone);
    let mut log = d1.log.clone();
    log.extend(d2.log.clone());
    log.extend(d3.log.clone());
    for e in &mut log {
        e.message = "(not read)".into();
        assert_eq!(e.artifact, a, "every event names the code");
    }
    let changed: Vec<(&str, &str, &str)> = log
        .iter()
        .filter(|e| e.event() == AuditKind::EnvironmentChanged)
        .map(|e| {
            (
                e.stage.as_str(),
                e.from_config.as_str(),
                e.to_config.as_str(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        [
            ("staging", "", ""),
            ("prod", "", ""),
            ("prod", "", c1.as_str()),
            ("staging", c2.as_str(), ""),
        ]
    );
    let during = what_was_running(&log, staging_switching);
    assert_eq!(
        (during.artifact.as_str(), during.config.as_str()),
        (a.as_str(), c1.as_str())
    );
    assert_eq!(env(&during, "staging").in_progress_deploy_id, "d3");
    let after = what_was_running(&log, u64::MAX);
    assert_eq!(
        (after.artifact.as_str(), after.config.as_str()),
        (a.as_str(), c1.as_str())
    );
    assert_eq!(env(&after, "staging").config, "");
    assert_eq!(env(&after, "prod").config, c1);
    assert_eq!(what_was_running(&log, 1999).config, "", "before any config");
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
