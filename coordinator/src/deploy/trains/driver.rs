//! A release train's task, on the leader of its first member's shard:
//!
//! 1. Load the train and its members' deploys; if the train has finished,
//!    stop.
//! 2. Ask the pure model (`train::decide`) for the next steps and take
//!    each: start a member's deploy (the same train starts the same
//!    deploy, so a new leader repeating it starts nothing twice), release
//!    a held member into an environment (recorded in the train; the
//!    member's own driver sees it and moves on), abort or roll back a
//!    member deploy through [`Members`](super::Members), or move the train
//!    to a new phase. Every change of the train is one guarded write with
//!    its audit.
//! 3. With nothing to do, look again after [`LOOK_EVERY`](super::LOOK_EVERY)
//!    (or when a control wakes it).
//! 4. Everything belongs to the leader's term: when the shard is lost the
//!    task stops, and the new leader resumes from the record (rule 1).

use std::sync::Arc;

use drover_common::proto::AuditKind;
use tracing::{info, warn};

use super::record::TrainRecord;
use super::{LOOK_EVERY, MemberError, Trains};
use crate::deploy::audit::DROVER;
use crate::deploy::deployments::DeployError;
use crate::deploy::train::{self, Step, TrainPhase};

/// Drives train `id` until it has finished, or until this coordinator no
/// longer leads its shard (rule 4).
pub async fn drive(trains: &Arc<Trains>, id: &str) -> Result<(), DeployError> {
    let (rec, _) = trains.load(id).await?;
    let (shard, leadership) = trains.ledger().leadership(rec.home())?;
    tokio::select! {
        _ = leadership.lost.cancelled() => Err(DeployError::NotLeader(format!(
            "stopped driving train {id}: this coordinator no longer leads shard {shard}"
        ))),
        done = run(trains, id) => done,
    }
}

/// Rules 1 to 3.
async fn run(trains: &Arc<Trains>, id: &str) -> Result<(), DeployError> {
    loop {
        let (rec, _) = trains.load(id).await?;
        if rec.phase.is_terminal() {
            info!(train = %id, phase = ?rec.phase, "release train finished");
            return Ok(());
        }
        let deploys = trains.deploys_of(&rec).await?;
        let steps = train::decide(rec.phase, rec.stop(), &rec.members(), &rec.views(&deploys));
        let mut acted = false;
        for step in steps {
            acted |= take(trains, &rec, step).await?;
        }
        if !acted {
            tokio::select! {
                _ = trains.woken().notified() => {}
                _ = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
    }
}

/// Takes one step; whether it changed anything.
async fn take(trains: &Arc<Trains>, rec: &TrainRecord, step: Step) -> Result<bool, DeployError> {
    let members = trains.members();
    match step {
        Step::Start(pipeline) => {
            let member = rec.member(&pipeline).expect("a step names a member");
            match members.start(rec, member).await {
                Ok(deploy) => {
                    trains
                        .update(&rec.id, |t| {
                            if let Some(m) = t.members.iter_mut().find(|m| m.pipeline == pipeline)
                                && m.deploy_id.is_empty()
                            {
                                m.deploy_id = deploy.clone();
                                t.log.push(format!("started {pipeline}: deploy {deploy}"));
                            }
                            Ok(None)
                        })
                        .await?;
                    Ok(true)
                }
                Err(MemberError::Refused(why)) => {
                    let why = format!("could not start member {pipeline}: {why}");
                    stop(trains, &rec.id, why).await?;
                    Ok(true)
                }
                Err(MemberError::Retry(why)) => {
                    warn!(train = %rec.id, member = %pipeline, %why, "starting a member: will retry");
                    Ok(false)
                }
            }
        }
        Step::Release { member, env } => {
            trains
                .update(&rec.id, |t| {
                    if t.phase != TrainPhase::Running
                        || !t
                            .released
                            .entry(member.clone())
                            .or_default()
                            .insert(env.clone())
                    {
                        return Ok(None);
                    }
                    let line = format!("released {member} into {env}");
                    t.log.push(line.clone());
                    Ok(Some((
                        AuditKind::TrainReleased,
                        Some(member.clone()),
                        env.clone(),
                        format!("release train {}: {line}", t.id),
                        DROVER.to_string(),
                    )))
                })
                .await?;
            info!(train = %rec.id, %member, %env, "member released");
            Ok(true)
        }
        Step::Abort { member, rollback } => {
            let deploy = &rec
                .member(&member)
                .expect("a step names a member")
                .deploy_id;
            let reason = format!("release train {} stopped: {}", rec.id, rec.reason);
            match members.abort(rec, deploy, rollback, &reason).await {
                Ok(()) => {
                    let line = format!(
                        "aborted {member}'s deploy {deploy}{}",
                        if rollback {
                            ", rolling back what it changed"
                        } else {
                            ""
                        }
                    );
                    trains
                        .update(&rec.id, |t| {
                            t.log.push(line.clone());
                            Ok(None)
                        })
                        .await?;
                    Ok(true)
                }
                Err(e) => {
                    warn!(train = %rec.id, %member, error = %e, "aborting a member: will look again");
                    Ok(false)
                }
            }
        }
        Step::RollBack(member) => {
            let deploy = &rec
                .member(&member)
                .expect("a step names a member")
                .deploy_id;
            let reason = format!("release train {} rolls back: {}", rec.id, rec.reason);
            match members.roll_back(rec, deploy, &reason).await {
                Ok(()) => {
                    trains
                        .update(&rec.id, |t| {
                            if t.rolled_back.insert(member.clone()) {
                                t.log
                                    .push(format!("rolling back {member} (deploy {deploy})"));
                            }
                            Ok(None)
                        })
                        .await?;
                    Ok(true)
                }
                Err(e) => {
                    warn!(train = %rec.id, %member, error = %e, "rolling back a member: will look again");
                    Ok(false)
                }
            }
        }
        Step::Become(phase, why) => {
            if phase == TrainPhase::Stopping {
                stop(trains, &rec.id, why).await?;
                return Ok(true);
            }
            let kind = match phase {
                TrainPhase::Complete => AuditKind::TrainComplete,
                TrainPhase::RolledBack => AuditKind::TrainRolledBack,
                TrainPhase::Aborted => AuditKind::TrainAborted,
                TrainPhase::Failed => AuditKind::TrainFailed,
                _ => AuditKind::Unspecified,
            };
            trains
                .update(&rec.id, |t| {
                    if t.phase == phase {
                        return Ok(None);
                    }
                    t.phase = phase;
                    let line = if why.is_empty() {
                        format!("{phase:?}")
                    } else {
                        format!("{phase:?}: {why}")
                    };
                    t.log.push(line.clone());
                    Ok((kind != AuditKind::Unspecified).then(|| {
                        (
                            kind,
                            None,
                            String::new(),
                            format!("release train {}: {line}", t.id),
                            DROVER.to_string(),
                        )
                    }))
                })
                .await?;
            info!(train = %rec.id, ?phase, "release train phase");
            Ok(true)
        }
    }
}

/// Rule 3: the train stops (a member failed, or could not start).
async fn stop(trains: &Arc<Trains>, id: &str, why: String) -> Result<(), DeployError> {
    trains
        .update(id, |t| {
            if t.phase != TrainPhase::Running {
                return Ok(None);
            }
            t.phase = TrainPhase::Stopping;
            t.reason = why.clone();
            t.log.push(format!("stopping: {why}"));
            Ok(Some((
                AuditKind::TrainStopping,
                None,
                String::new(),
                format!("release train {} stops: {why}", t.id),
                DROVER.to_string(),
            )))
        })
        .await?;
    warn!(train = %id, %why, "release train stops");
    Ok(())
}
