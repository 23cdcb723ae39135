//! `droverctl audit` and `droverctl running`: who did what, and what ran when.

use std::io::Write;
use std::time::{Duration, SystemTime};

use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{GetAuditRequest, WhatWasRunningRequest};
use tonic::transport::Channel;

use super::{print_json, status_error};

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// " with config DIGEST", or nothing when none was deployed.
fn with_config(config: &str) -> String {
    if config.is_empty() {
        String::new()
    } else {
        format!(" with config {config}")
    }
}

pub async fn log(
    client: &mut DeployerClient<Channel>,
    service: &str,
    since: Option<Duration>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let since_unix_ms = since
        .map(|d| drover_common::time::now_unix_ms().saturating_sub(d.as_millis() as u64))
        .unwrap_or(0);
    let r = client
        .get_audit(GetAuditRequest {
            service: service.to_string(),
            since_unix_ms,
            until_unix_ms: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &r);
    }
    for e in &r.events {
        let kind = e
            .event()
            .as_str_name()
            .trim_start_matches("AUDIT_KIND_")
            .to_lowercase();
        writeln!(
            out,
            "{} {:<19} {:<10} {} {}",
            rfc3339(e.at_unix_ms),
            kind,
            e.actor,
            e.deploy_id,
            e.message
        )?;
    }
    Ok(())
}

pub async fn running(
    client: &mut DeployerClient<Channel>,
    service: &str,
    at: Option<SystemTime>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let at_unix_ms = at.map(drover_common::time::unix_ms).unwrap_or(0);
    let r = client
        .what_was_running(WhatWasRunningRequest {
            service: service.to_string(),
            at_unix_ms,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &r);
    }
    if r.artifact.is_empty() {
        writeln!(out, "nothing deployed for {service} by then")?;
    } else {
        writeln!(
            out,
            "{service}: {}{} since {} (deploy {})",
            r.artifact,
            with_config(&r.config),
            rfc3339(r.since_unix_ms),
            r.deploy_id
        )?;
    }
    if !r.in_progress_deploy_id.is_empty() {
        writeln!(
            out,
            "deploy {} was in progress (hosts may have been mixed)",
            r.in_progress_deploy_id
        )?;
    }
    for env in &r.environments {
        write!(
            out,
            "  {}/{}: {}{} since {} (deploy {})",
            env.pipeline,
            env.stage,
            if env.artifact.is_empty() {
                "nothing"
            } else {
                &env.artifact
            },
            with_config(&env.config),
            rfc3339(env.since_unix_ms),
            env.deploy_id
        )?;
        if !env.in_progress_deploy_id.is_empty() {
            write!(
                out,
                "; deploy {} switching hosts",
                env.in_progress_deploy_id
            )?;
        }
        writeln!(out)?;
    }
    Ok(())
}
