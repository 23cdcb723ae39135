//! `droverctl train ...`: start (and wait), status, list, watch, abort.
//! `start --wait` and `watch` exit 0 on COMPLETE, 2 on ROLLED_BACK and 1
//! on any other end (FAILED, ABORTED), like deploys.

use std::io::Write;

use clap::Subcommand;
use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    ListTrainsRequest, StartTrainRequest, Train, TrainFailurePolicy, TrainMemberSpec, TrainPhase,
    TrainRef,
};
use tonic::transport::Channel;

use super::deploys::phase_name;
use super::{Ended, print_json, status_error, through_failover};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Start a release train: members deploy as their dependencies allow;
    /// with --wait, follow it and exit 0 (COMPLETE), 2 (ROLLED_BACK) or 1.
    Start {
        #[arg(long, default_value = "")]
        name: String,
        /// A member: PIPELINE=SHA256 (repeat for each member).
        #[arg(long = "member", required = true, value_parser = pair)]
        members: Vec<(String, String)>,
        /// PIPELINE=DEP[,DEP…]: PIPELINE completes each environment after
        /// its DEPs did (repeat per member).
        #[arg(long = "after", value_parser = pair)]
        after: Vec<(String, String)>,
        /// What a failure does: rollback (every member already deployed
        /// goes back, dependents first) or stop.
        #[arg(long, default_value = "rollback", value_parser = ["rollback", "stop"])]
        on_failure: String,
        /// Retrying with the same key returns the same train.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        #[arg(long, env = "USER", default_value = "droverctl")]
        requester: String,
        #[arg(long)]
        wait: bool,
    },
    /// The train and each member: its deploy, where it is, what it waits for.
    Status {
        id: String,
    },
    List,
    /// Follow a train to its end (exit codes as start --wait).
    Watch {
        id: String,
    },
    /// Stop a running train: live members are aborted; with --rollback,
    /// every member already deployed goes back, dependents first.
    Abort {
        id: String,
        #[arg(long)]
        rollback: bool,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, env = "USER", default_value = "droverctl")]
        requester: String,
    },
}

fn pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

pub fn phase_label(p: TrainPhase) -> &'static str {
    match p {
        TrainPhase::Unspecified => "UNKNOWN",
        TrainPhase::Running => "RUNNING",
        TrainPhase::Complete => "COMPLETE",
        TrainPhase::Stopping => "STOPPING",
        TrainPhase::RollingBack => "ROLLING_BACK",
        TrainPhase::Failed => "FAILED",
        TrainPhase::RolledBack => "ROLLED_BACK",
        TrainPhase::Aborted => "ABORTED",
    }
}

pub async fn run(
    client: &mut DeployerClient<Channel>,
    cmd: TrainCommand,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match cmd {
        TrainCommand::Start {
            name,
            members,
            after,
            on_failure,
            idempotency_key,
            requester,
            wait,
        } => {
            let mut specs: Vec<TrainMemberSpec> = members
                .into_iter()
                .map(|(pipeline, artifact)| TrainMemberSpec {
                    pipeline,
                    artifact,
                    after: Vec::new(),
                })
                .collect();
            for (pipeline, deps) in after {
                let Some(m) = specs.iter_mut().find(|m| m.pipeline == pipeline) else {
                    anyhow::bail!("--after {pipeline}=…: {pipeline} is not a --member");
                };
                m.after.extend(
                    deps.split(',')
                        .filter(|d| !d.is_empty())
                        .map(str::to_string),
                );
            }
            let req = StartTrainRequest {
                name,
                members: specs,
                on_failure: if on_failure == "stop" {
                    TrainFailurePolicy::Stop
                } else {
                    TrainFailurePolicy::Rollback
                } as i32,
                requester,
                idempotency_key,
            };
            let t = through_failover(|| {
                let mut client = client.clone();
                let req = req.clone();
                async move { client.start_train(req).await }
            })
            .await
            .map_err(status_error)?
            .into_inner();
            if !wait {
                return if json {
                    print_json(out, &t)
                } else {
                    writeln!(out, "{}", t.id).map_err(Into::into)
                };
            }
            watch(client, &t.id, json, out).await
        }
        TrainCommand::Status { id } => {
            let t = client
                .get_train(TrainRef {
                    id,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                return print_json(out, &t);
            }
            show(&t, out)
        }
        TrainCommand::List => {
            let trains = client
                .list_trains(ListTrainsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .trains;
            if json {
                return print_json(out, &trains);
            }
            let mut table = Table::new();
            table
                .load_preset(presets::NOTHING)
                .set_header(["TRAIN", "NAME", "PHASE", "MEMBERS", "REASON"]);
            for t in &trains {
                let members: Vec<&str> = t.members.iter().map(|m| m.pipeline.as_str()).collect();
                table.add_row([
                    t.id.clone(),
                    t.name.clone(),
                    phase_label(t.phase()).to_string(),
                    members.join(" → "),
                    t.reason.clone(),
                ]);
            }
            writeln!(out, "{table}")?;
            Ok(())
        }
        TrainCommand::Watch { id } => watch(client, &id, json, out).await,
        TrainCommand::Abort {
            id,
            rollback,
            reason,
            requester,
        } => {
            let req = TrainRef {
                id,
                requester,
                reason,
                rollback,
            };
            let t = through_failover(|| {
                let mut client = client.clone();
                let req = req.clone();
                async move { client.abort_train(req).await }
            })
            .await
            .map_err(status_error)?
            .into_inner();
            if json {
                return print_json(out, &t);
            }
            writeln!(out, "{} {}", t.id, phase_label(t.phase()))?;
            Ok(())
        }
    }
}

fn member_line(t: &Train) -> String {
    t.members
        .iter()
        .map(|m| {
            let mut s = format!("{}:{}", m.pipeline, phase_name(m.phase()));
            if !m.stage.is_empty() && m.phase() != drover_common::proto::DeployPhase::Complete {
                s.push_str(&format!("@{}", m.stage));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn show(t: &Train, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(out, "{} {} {}", t.id, phase_label(t.phase()), t.name)?;
    if !t.reason.is_empty() {
        writeln!(out, "reason: {}", t.reason)?;
    }
    writeln!(
        out,
        "started by {}; on failure: {:?}",
        t.started_by,
        t.on_failure()
    )?;
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "MEMBER",
        "AFTER",
        "DEPLOY",
        "PHASE",
        "STAGE",
        "COMPLETED",
        "WAITING FOR",
    ]);
    for m in &t.members {
        table.add_row([
            m.pipeline.clone(),
            m.after.join(","),
            m.deploy_id.clone(),
            format!(
                "{}{}",
                phase_name(m.phase()),
                if m.rolled_back_by_train {
                    " (by the train)"
                } else {
                    ""
                }
            ),
            m.stage.clone(),
            m.completed.join(","),
            m.waiting_for.clone(),
        ]);
    }
    writeln!(out, "{table}")?;
    for line in &t.log {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

/// Follows a train to its end, a line per change.
pub async fn watch(
    client: &mut DeployerClient<Channel>,
    id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use tokio_stream::StreamExt;
    let mut stream = client
        .watch_train(TrainRef {
            id: id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut last = None;
    while let Some(t) = stream.next().await {
        let t = t.map_err(status_error)?;
        if json {
            serde_json::to_writer(&mut *out, &t).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{} {} {}",
                t.id,
                phase_label(t.phase()),
                member_line(&t)
            )?;
        }
        out.flush()?;
        last = Some(t);
    }
    let t =
        last.ok_or_else(|| anyhow::anyhow!("the watch of {id} ended before it said anything"))?;
    match t.phase() {
        TrainPhase::Complete => Ok(()),
        TrainPhase::Failed | TrainPhase::RolledBack | TrainPhase::Aborted => Err(Ended {
            what: "train",
            phase: phase_label(t.phase()),
            rolled_back: t.phase() == TrainPhase::RolledBack,
            reason: t.reason.clone(),
        }
        .into()),
        _ => anyhow::bail!(
            "the watch of {id} ended while the train was {}; watch it again",
            phase_label(t.phase())
        ),
    }
}
