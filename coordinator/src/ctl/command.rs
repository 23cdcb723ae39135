//! `droverctl command HOST ...`: one command to one host, for SREs.

use std::io::Write;
use std::time::Duration;

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    Command, CommandStatus, PullCommand, RestartCommand, RollbackCommand, SendCommandRequest, Slot,
    StopCommand, VerifyCommand, command,
};
use tonic::transport::Channel;

use super::{print_json, status_error};

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Download (from the origin), check and unpack an artifact.
    Pull {
        #[arg(long)]
        service: String,
        #[arg(long)]
        artifact: String,
    },
    /// Re-check a pulled artifact's digest and manifest.
    Verify {
        #[arg(long)]
        service: String,
        #[arg(long)]
        artifact: String,
    },
    /// Switch the service to a pulled artifact and restart it.
    Restart {
        #[arg(long)]
        service: String,
        #[arg(long)]
        artifact: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ready_timeout: Duration,
        /// Start it in a blue-green slot (the other slot keeps running).
        #[arg(long, value_enum)]
        slot: Option<SlotArg>,
    },
    /// Stop the service's process, or one blue-green slot's (its release
    /// stays on the host; a restart starts it again).
    Stop {
        #[arg(long)]
        service: String,
        #[arg(long, value_enum)]
        slot: Option<SlotArg>,
    },
    /// Switch back to the previous release (or --artifact); never downloads.
    Rollback {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "")]
        artifact: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ready_timeout: Duration,
    },
}

/// A blue-green slot on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SlotArg {
    Blue,
    Green,
}

impl From<SlotArg> for Slot {
    fn from(s: SlotArg) -> Slot {
        match s {
            SlotArg::Blue => Slot::Blue,
            SlotArg::Green => Slot::Green,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Send {
    pub host_id: String,
    /// Command id; the same id again returns the recorded result (default: a new id).
    #[arg(long)]
    pub id: Option<String>,
    #[command(subcommand)]
    pub action: Action,
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// Sends the command; exits non-zero unless it succeeded.
pub async fn send(
    client: &mut DeployerClient<Channel>,
    send: Send,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let action = match send.action {
        Action::Pull { service, artifact } => command::Action::Pull(PullCommand {
            service,
            artifact,
            ..Default::default()
        }),
        Action::Verify { service, artifact } => {
            command::Action::Verify(VerifyCommand { service, artifact })
        }
        Action::Restart {
            service,
            artifact,
            ready_timeout,
            slot,
        } => command::Action::Restart(RestartCommand {
            service,
            artifact,
            ready_timeout_ms: millis(ready_timeout),
            slot: slot.map_or(Slot::None, Slot::from) as i32,
            ..Default::default()
        }),
        Action::Stop { service, slot } => command::Action::Stop(StopCommand {
            service,
            slot: slot.map_or(Slot::None, Slot::from) as i32,
        }),
        Action::Rollback {
            service,
            artifact,
            ready_timeout,
        } => command::Action::Rollback(RollbackCommand {
            service,
            artifact,
            ready_timeout_ms: millis(ready_timeout),
            ..Default::default()
        }),
    };
    let command_id = send
        .id
        .unwrap_or_else(|| format!("manual-{}", uuid::Uuid::new_v4()));
    let update = client
        .send_command(SendCommandRequest {
            host_id: send.host_id.clone(),
            command: Some(Command {
                command_id,
                // Stamped by the service's shard leader.
                shard: 0,
                epoch: 0,
                action: Some(action),
            }),
            timeout_ms: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        print_json(out, &update)?;
    } else {
        writeln!(
            out,
            "{}: {:?}: {}",
            send.host_id,
            update.status(),
            update.reason
        )?;
        if !update.output_tail.is_empty() {
            writeln!(out, "--- output tail ---\n{}", update.output_tail)?;
        }
    }
    match update.status() {
        CommandStatus::Succeeded => Ok(()),
        other => Err(anyhow::anyhow!(
            "command {} ended {other:?}",
            update.command_id
        )),
    }
}
