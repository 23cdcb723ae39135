//! The audit log's events, built by pure functions from what happened: a
//! transition (state before, event, state and actions after), an approval,
//! an analysis, a command sent by hand. Each event has a kind
//! ([`AuditKind`]) and structured fields (deploy, pipeline, stage, hosts,
//! from and to release, actor, reason kind and text); the `message` is a
//! line for people and is never read back. [`what_was_running`] answers
//! from the structured fields alone.

use std::collections::BTreeMap;

use drover_common::proto::{
    AuditEvent, AuditKind, Command, EnvironmentAt, ReasonKind as ProtoReason, TrafficChange,
    WhatWasRunningResponse, command,
};

use super::machine::{Action, Event, Machine, Phase, ReasonKind};
use super::record::DeployRecord;

/// Who automatic decisions are attributed to.
pub const DROVER: &str = "drover";

/// The reason kind as it goes on the wire.
pub fn reason_proto(kind: ReasonKind) -> ProtoReason {
    match kind {
        ReasonKind::None => ProtoReason::Unspecified,
        ReasonKind::ByHand => ProtoReason::ByHand,
        ReasonKind::BudgetSpent => ProtoReason::BudgetSpent,
        ReasonKind::GateFailed => ProtoReason::GateFailed,
        ReasonKind::CanaryFailed => ProtoReason::CanaryFailed,
        ReasonKind::Inconclusive => ProtoReason::Inconclusive,
        ReasonKind::AwaitingPromotion => ProtoReason::AwaitingPromotion,
        ReasonKind::ApprovalTimeout => ProtoReason::ApprovalTimeout,
        ReasonKind::RollbackIncomplete => ProtoReason::RollbackIncomplete,
    }
}

/// The fields every event about deploy `rec` carries.
fn base(rec: &DeployRecord, kind: AuditKind, actor: &str, at: u64) -> AuditEvent {
    AuditEvent {
        at_unix_ms: at,
        service: rec.service.clone(),
        pipeline: rec.pipeline.clone(),
        deploy_id: rec.id.clone(),
        event: kind as i32,
        actor: actor.to_string(),
        artifact: rec.artifact.clone(),
        git_sha: rec.git_sha.clone(),
        pipeline_version: rec.snapshot.version,
        train_id: rec.train.as_ref().map(|t| t.id.clone()).unwrap_or_default(),
        config: rec.current_config().to_string(),
        ..Default::default()
    }
}

fn with_stage(mut e: AuditEvent, rec: &DeployRecord, stage: usize) -> AuditEvent {
    if let Some(s) = rec.snapshot.stages.get(stage) {
        e.stage = s.name.clone();
        e.config = rec.stage_config(stage).to_string();
        e.last_stage = stage + 1 == rec.snapshot.stages.len();
    }
    e
}

fn with_reason(mut e: AuditEvent, kind: ReasonKind, text: &str) -> AuditEvent {
    e.reason_kind = reason_proto(kind) as i32;
    e.reason = text.to_string();
    e
}

fn or_nothing(artifact: &str) -> &str {
    if artifact.is_empty() {
        "nothing"
    } else {
        artifact
    }
}

/// A deploy started.
pub fn started(rec: &DeployRecord, actor: &str, at: u64) -> AuditEvent {
    let mut e = base(rec, AuditKind::Started, actor, at);
    e.from_artifact = rec.known_good.clone();
    e.to_artifact = rec.artifact.clone();
    e.message = format!(
        "deploy of {} (git {}) replacing {} through {} stages",
        rec.artifact,
        if rec.git_sha.is_empty() {
            "unknown"
        } else {
            &rec.git_sha
        },
        or_nothing(&rec.known_good),
        rec.plan.len()
    );
    e
}

/// The hosts of batch `batch` of stage `stage` begin switching.
pub fn batch_started(rec: &DeployRecord, stage: usize, batch: usize, at: u64) -> AuditEvent {
    let hosts = rec.hosts_of(stage, batch);
    let mut e = with_stage(base(rec, AuditKind::BatchStarted, DROVER, at), rec, stage);
    e.from_artifact = rec.stage_rollback_target(stage).to_string();
    e.to_artifact = rec.artifact.clone();
    e.message = format!(
        "stage {} batch {batch} ({}) switching to {}",
        e.stage,
        hosts.join(","),
        rec.artifact
    );
    e.hosts = hosts;
    e
}

/// A router moved traffic in stage `stage` (`what`: "switched to green",
/// "switched back to blue"): every server that changed, before and after.
pub fn traffic_switched(
    rec: &DeployRecord,
    stage: usize,
    what: &str,
    hosts: Vec<String>,
    traffic: Vec<TrafficChange>,
    at: u64,
) -> AuditEvent {
    let mut e = with_stage(
        base(rec, AuditKind::TrafficSwitched, DROVER, at),
        rec,
        stage,
    );
    let changes: Vec<String> = traffic
        .iter()
        .map(|c| {
            format!(
                "{}/{} {} w{} → {} w{}",
                c.backend, c.server, c.state_before, c.weight_before, c.state_after, c.weight_after
            )
        })
        .collect();
    e.message = format!(
        "stage {}: traffic {what} on {} hosts ({})",
        e.stage,
        hosts.len(),
        changes.join(", ")
    );
    e.hosts = hosts;
    e.traffic = traffic;
    e
}

/// The events of a transition of `rec` (already holding the new state)
/// from `before` on `event` by `actor`, with the actions it returned.
pub fn transition(
    before: &Machine,
    rec: &DeployRecord,
    event: &Event,
    actions: &[Action],
    actor: &str,
    at: u64,
) -> Vec<AuditEvent> {
    let m = &rec.machine;
    let mut out = Vec::new();
    let stage_name = |s: usize| {
        rec.snapshot
            .stages
            .get(s)
            .map_or(String::new(), |s| s.name.clone())
    };
    match event {
        Event::Pause => {
            let mut e = base(rec, AuditKind::Paused, actor, at);
            e.message = "pause requested".into();
            out.push(e);
        }
        Event::Resume => {
            let mut e = base(rec, AuditKind::Resumed, actor, at);
            e.message = "resumed".into();
            out.push(e);
        }
        Event::Approve => {
            let mut e = with_stage(base(rec, AuditKind::Approved, actor, at), rec, before.stage);
            e.message = format!("approved stage {}", stage_name(before.stage));
            out.push(e);
        }
        Event::Abort { why, .. } => {
            let mut e = with_reason(
                base(rec, AuditKind::Aborted, actor, at),
                why.kind,
                &why.text,
            );
            e.message = why.text.clone();
            out.push(e);
        }
        Event::Hold(why) => {
            let e = base(rec, AuditKind::Held, actor, at);
            let mut e = with_reason(with_stage(e, rec, before.stage), why.kind, &why.text);
            e.hosts = rec.hosts_of(before.stage, before.batch);
            e.message = format!(
                "stage {} batch {} held: {}",
                e.stage, before.batch, why.text
            );
            out.push(e);
        }
        Event::BatchPassed | Event::BatchFailed(_) => {
            let (kind, why) = match event {
                Event::BatchFailed(why) => (AuditKind::BatchFailed, Some(why)),
                _ => (AuditKind::BatchPassed, None),
            };
            let mut e = with_stage(base(rec, kind, actor, at), rec, before.stage);
            e.hosts = rec.hosts_of(before.stage, before.batch);
            e.message = format!(
                "stage {} batch {} ({}) {}",
                before.stage,
                before.batch,
                e.hosts.join(","),
                why.map_or("passed".to_string(), |w| format!("failed: {}", w.text))
            );
            if let Some(why) = why {
                e = with_reason(e, why.kind, &why.text);
            }
            out.push(e);
        }
        _ => {}
    }
    if m.phase == Phase::RollingBack && before.phase != Phase::RollingBack {
        let mut e = with_reason(
            base(rec, AuditKind::RollbackStarted, actor, at),
            m.reason_kind,
            &m.reason,
        );
        e.from_artifact = rec.artifact.clone();
        e.to_artifact = rec.known_good.clone();
        e.message = if m.reason_kind == ReasonKind::ByHand {
            m.reason.clone()
        } else {
            format!("automatic rollback to {}: {}", rec.known_good, m.reason)
        };
        out.push(e);
    }
    for action in actions {
        match action {
            Action::PassStage { stage } => {
                out.push(environment_changed(
                    rec,
                    *stage,
                    (
                        rec.stage_rollback_target(*stage),
                        rec.stage_rollback_config(*stage),
                    ),
                    (&rec.artifact, rec.stage_config(*stage)),
                    ProtoReason::StagePassed,
                    at,
                ));
            }
            Action::RestorePrevious => {
                for stage in rec.touched_stages() {
                    out.push(environment_changed(
                        rec,
                        stage,
                        (&rec.artifact, rec.stage_config(stage)),
                        (
                            rec.stage_rollback_target(stage),
                            rec.stage_rollback_config(stage),
                        ),
                        ProtoReason::RolledBack,
                        at,
                    ));
                }
            }
            _ => {}
        }
    }
    if m.phase != before.phase {
        let end = match m.phase {
            Phase::Complete => Some((
                AuditKind::Complete,
                format!("{} runs everywhere", rec.artifact),
            )),
            Phase::RolledBack => {
                Some((AuditKind::RolledBack, format!("rolled back: {}", m.reason)))
            }
            Phase::Failed => Some((AuditKind::Failed, m.reason.clone())),
            _ => None,
        };
        if let Some((kind, message)) = end {
            // Where it ended (a subscription to an environment hears of it).
            let stage = m.stage.min(rec.snapshot.stages.len().saturating_sub(1));
            let e = with_stage(base(rec, kind, actor, at), rec, stage);
            let mut e = with_reason(e, m.reason_kind, &m.reason);
            e.message = message;
            out.push(e);
        }
    }
    if let Some(e) = awaiting_approval(before, rec, at) {
        out.push(e);
    }
    out
}

/// A deploy that has come to wait for people before a stage (not for its
/// release train only).
pub fn awaiting_approval(before: &Machine, rec: &DeployRecord, at: u64) -> Option<AuditEvent> {
    let m = &rec.machine;
    let entered = m.phase == Phase::AwaitingApproval
        && (before.phase != Phase::AwaitingApproval || before.stage != m.stage);
    let spec = rec.snapshot.stages.get(m.stage)?;
    if !entered || !spec.requires_approval {
        return None;
    }
    let mut e = with_stage(
        base(rec, AuditKind::AwaitingApproval, DROVER, at),
        rec,
        m.stage,
    );
    e.message = format!("stage {} waits for approval", spec.name);
    Some(e)
}

/// Environment `stage` now runs `to` instead of `from` (code, config).
fn environment_changed(
    rec: &DeployRecord,
    stage: usize,
    (from, from_config): (&str, &str),
    (to, to_config): (&str, &str),
    why: ProtoReason,
    at: u64,
) -> AuditEvent {
    let mut e = with_stage(
        base(rec, AuditKind::EnvironmentChanged, DROVER, at),
        rec,
        stage,
    );
    e.from_artifact = from.to_string();
    e.to_artifact = to.to_string();
    e.from_config = from_config.to_string();
    e.to_config = to_config.to_string();
    e.config = to_config.to_string();
    e.reason_kind = why as i32;
    let with_config = |artifact: &str, config: &str| match config {
        "" => or_nothing(artifact).to_string(),
        c => format!("{artifact} with config {}", &c[..c.len().min(12)]),
    };
    e.message = format!(
        "environment {} runs {} (was {}): {}",
        e.stage,
        with_config(to, to_config),
        with_config(from, from_config),
        if why == ProtoReason::RolledBack {
            "rolled back"
        } else {
            "stage passed"
        }
    );
    e
}

/// One approval of `required` for `stage`, not yet enough.
pub fn approval(
    rec: &DeployRecord,
    stage: usize,
    given: usize,
    required: usize,
    who: &str,
    at: u64,
) -> AuditEvent {
    let mut e = with_stage(base(rec, AuditKind::Approval, who, at), rec, stage);
    e.message = format!(
        "approval {given} of {required} for stage {} by {who}",
        e.stage
    );
    e
}

/// `host` of stage `stage` did not finish its restart in time.
pub fn host_stuck(
    rec: &DeployRecord,
    stage: usize,
    host: &str,
    reason: &str,
    at: u64,
) -> AuditEvent {
    let mut e = with_stage(base(rec, AuditKind::HostStuck, DROVER, at), rec, stage);
    e.hosts = vec![host.to_string()];
    e.reason = reason.to_string();
    e.message = format!("host {host} is stuck in stage {}: {reason}", e.stage);
    e
}

/// A canary step promoted by hand.
pub fn promoted(rec: &DeployRecord, stage: usize, step: usize, who: &str, at: u64) -> AuditEvent {
    let mut e = with_stage(base(rec, AuditKind::Promoted, who, at), rec, stage);
    e.message = format!("canary step {step} of stage {} promoted by hand", e.stage);
    e
}

/// A canary step's analysis.
pub fn analysis(
    rec: &DeployRecord,
    report: &drover_common::proto::CanaryAnalysis,
    at: u64,
) -> AuditEvent {
    let stage = report.stage as usize;
    let mut e = with_stage(base(rec, AuditKind::Analysis, DROVER, at), rec, stage);
    let verdict = report
        .verdict()
        .as_str_name()
        .trim_start_matches("ANALYSIS_VERDICT_");
    e.hosts = report.canary_hosts.clone();
    e.reason = report.reason.clone();
    e.message = format!(
        "stage {} canary step {} ({} canary, {} baseline hosts, {:.1}s): {verdict}: {}",
        report.stage,
        report.step,
        report.canary_hosts.len(),
        report.baseline_hosts.len(),
        report.baked_ms as f64 / 1000.0,
        report.reason
    );
    e
}

/// A command sent to `host` by hand, with its sender.
/// The origin removed `info` (artifact gc).
pub fn artifact_collected(
    info: &drover_common::proto::ArtifactInfo,
    actor: &str,
    why: &str,
    at: u64,
) -> AuditEvent {
    AuditEvent {
        at_unix_ms: at,
        service: info.service.clone(),
        event: AuditKind::ArtifactCollected as i32,
        actor: actor.to_string(),
        artifact: info.sha256.clone(),
        git_sha: info.git_sha.clone(),
        reason: why.to_string(),
        message: format!(
            "artifact {} ({} {}, {} bytes) collected: {why}",
            info.sha256, info.service, info.version, info.size_bytes
        ),
        ..Default::default()
    }
}

pub fn command_by_hand(
    service: &str,
    actor: &str,
    host: &str,
    cmd: &Command,
    at: u64,
) -> AuditEvent {
    let (action, artifact) = match &cmd.action {
        Some(command::Action::Pull(p)) => ("pull", p.artifact.as_str()),
        Some(command::Action::Verify(v)) => ("verify", v.artifact.as_str()),
        Some(command::Action::Restart(r)) => ("restart", r.artifact.as_str()),
        Some(command::Action::Rollback(r)) => ("rollback", r.artifact.as_str()),
        Some(command::Action::Stop(_)) => ("stop", ""),
        None => ("none", ""),
    };
    AuditEvent {
        at_unix_ms: at,
        service: service.to_string(),
        event: AuditKind::Command as i32,
        actor: actor.to_string(),
        artifact: artifact.to_string(),
        to_artifact: artifact.to_string(),
        hosts: vec![host.to_string()],
        reason_kind: ProtoReason::ByHand as i32,
        message: format!(
            "{action} sent to host {host} by hand (command {}, shard {}, epoch {})",
            cmd.command_id, cmd.shard, cmd.epoch
        ),
        ..Default::default()
    }
}

/// What ran at `at`, from `events` (a service's log in time order): per
/// environment, the last ENVIRONMENT_CHANGED by then; the service's answer
/// is its last environment's; deploys started and not finished by then are
/// in progress, per environment once they began switching hosts there.
pub fn what_was_running(events: &[AuditEvent], at: u64) -> WhatWasRunningResponse {
    let mut answer = WhatWasRunningResponse::default();
    let mut open: Vec<String> = Vec::new();
    // (pipeline, stage) → what it runs, in first-change order.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut envs: BTreeMap<(String, String), EnvironmentAt> = BTreeMap::new();
    for e in events.iter().filter(|e| e.at_unix_ms <= at) {
        let key = (e.pipeline.clone(), e.stage.clone());
        let mut env = |envs: &mut BTreeMap<_, EnvironmentAt>| {
            if !envs.contains_key(&key) {
                order.push(key.clone());
            }
            envs.entry(key.clone())
                .or_insert_with(|| EnvironmentAt {
                    pipeline: e.pipeline.clone(),
                    stage: e.stage.clone(),
                    ..Default::default()
                })
                .clone()
        };
        match e.event() {
            AuditKind::Started => open.push(e.deploy_id.clone()),
            AuditKind::BatchStarted => {
                let mut x = env(&mut envs);
                x.in_progress_deploy_id = e.deploy_id.clone();
                envs.insert(key, x);
            }
            AuditKind::EnvironmentChanged => {
                let mut x = env(&mut envs);
                x.artifact = e.to_artifact.clone();
                x.config = e.to_config.clone();
                x.since_unix_ms = e.at_unix_ms;
                x.deploy_id = e.deploy_id.clone();
                if x.in_progress_deploy_id == e.deploy_id {
                    x.in_progress_deploy_id.clear();
                }
                envs.insert(key, x);
                if e.last_stage {
                    answer.artifact = e.to_artifact.clone();
                    answer.config = e.to_config.clone();
                    answer.since_unix_ms = e.at_unix_ms;
                    answer.deploy_id = e.deploy_id.clone();
                }
            }
            AuditKind::Complete
            | AuditKind::RolledBack
            | AuditKind::Failed
            | AuditKind::Aborted => {
                open.retain(|d| d != &e.deploy_id);
                for x in envs.values_mut() {
                    if x.in_progress_deploy_id == e.deploy_id {
                        x.in_progress_deploy_id.clear();
                    }
                }
            }
            _ => {}
        }
    }
    answer.in_progress_deploy_id = open.pop().unwrap_or_default();
    answer.environments = order.iter().filter_map(|k| envs.remove(k)).collect();
    answer
}

#[cfg(test)]
mod tests;
