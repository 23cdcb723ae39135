//! `droverctl flag ...`: set a feature flag of an environment, roll it
//! back to its previous setting, list flags with the hosts each is on for.

use std::io::Write;

use clap::Subcommand;
use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{Flag, FlagRef, FlagState, ListFlagsRequest, SetFlagRequest};
use tonic::transport::Channel;

use super::{print_json, status_error};

#[derive(Debug, Subcommand)]
pub enum FlagCommand {
    /// Turn a flag on for PERCENT of the environment's hosts (matching --selector).
    Set {
        #[arg(long)]
        pipeline: String,
        /// The environment (a stage of the pipeline).
        #[arg(long = "env")]
        environment: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        percent: u32,
        #[arg(long, default_value = "")]
        selector: String,
        #[arg(long, env = "USER", default_value = "droverctl")]
        requester: String,
    },
    /// Return a flag to its previous setting (off if it had none).
    Rollback {
        #[arg(long)]
        pipeline: String,
        #[arg(long = "env")]
        environment: String,
        #[arg(long)]
        name: String,
        #[arg(long, env = "USER", default_value = "droverctl")]
        requester: String,
    },
    List {
        #[arg(long, default_value = "")]
        pipeline: String,
    },
}

fn line(s: &FlagState) -> String {
    let f = s.flag.clone().unwrap_or_default();
    format!(
        "{}/{} {} {}%{}: on for {} of {} hosts",
        s.pipeline,
        s.environment,
        f.name,
        f.percent,
        if f.selector.is_empty() {
            String::new()
        } else {
            format!(" of {}", f.selector)
        },
        s.hosts_on,
        s.hosts_eligible
    )
}

pub async fn run(
    client: &mut DeployerClient<Channel>,
    cmd: FlagCommand,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let state = match cmd {
        FlagCommand::Set {
            pipeline,
            environment,
            name,
            percent,
            selector,
            requester,
        } => client
            .set_flag(SetFlagRequest {
                pipeline,
                environment,
                flag: Some(Flag {
                    name,
                    percent,
                    selector,
                    ..Default::default()
                }),
                requester,
            })
            .await
            .map_err(status_error)?
            .into_inner(),
        FlagCommand::Rollback {
            pipeline,
            environment,
            name,
            requester,
        } => client
            .rollback_flag(FlagRef {
                pipeline,
                environment,
                name,
                requester,
            })
            .await
            .map_err(status_error)?
            .into_inner(),
        FlagCommand::List { pipeline } => {
            let flags = client
                .list_flags(ListFlagsRequest { pipeline })
                .await
                .map_err(status_error)?
                .into_inner()
                .flags;
            if json {
                return print_json(out, &flags);
            }
            let mut table = Table::new();
            table.load_preset(presets::NOTHING).set_header([
                "PIPELINE",
                "ENVIRONMENT",
                "FLAG",
                "PERCENT",
                "SELECTOR",
                "ON",
                "OF",
                "SET BY",
            ]);
            for s in &flags {
                let f = s.flag.clone().unwrap_or_default();
                table.add_row([
                    s.pipeline.clone(),
                    s.environment.clone(),
                    f.name,
                    f.percent.to_string(),
                    f.selector,
                    s.hosts_on.to_string(),
                    s.hosts_eligible.to_string(),
                    f.updated_by,
                ]);
            }
            writeln!(out, "{table}")?;
            return Ok(());
        }
    };
    if json {
        return print_json(out, &state);
    }
    writeln!(out, "{}", line(&state))?;
    Ok(())
}
