//! `droverctl deploy ...`: start (and wait), status, list, watch, and the
//! controls. `start --wait` and `watch` exit 0 on COMPLETE, 2 on
//! ROLLED_BACK and 1 on any other end, so CI can branch on them.

use std::io::{IsTerminal, Write};

use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    BaselineKind, Deploy, DeployPhase, DeployRef, HostOutcome, ListDeploysRequest,
    StartDeployRequest,
};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use super::{Ended, print_json, status_error};

pub fn phase_name(p: DeployPhase) -> &'static str {
    match p {
        DeployPhase::Unspecified => "UNKNOWN",
        DeployPhase::Pending => "PENDING",
        DeployPhase::Rolling => "ROLLING",
        DeployPhase::AwaitingApproval => "AWAITING_APPROVAL",
        DeployPhase::Paused => "PAUSED",
        DeployPhase::Complete => "COMPLETE",
        DeployPhase::Failed => "FAILED",
        DeployPhase::RollingBack => "ROLLING_BACK",
        DeployPhase::RolledBack => "ROLLED_BACK",
        DeployPhase::Aborted => "ABORTED",
    }
}

/// (hosts updated, hosts): each host once, though a blue-green stage
/// lists its hosts in each of its steps.
fn updated(d: &Deploy) -> (u64, u64) {
    let mut hosts = std::collections::BTreeMap::new();
    for h in d.batches.iter().flat_map(|b| &b.hosts) {
        hosts.insert(h.host_id.as_str(), h.outcome() == HostOutcome::Updated);
    }
    let done = hosts.values().filter(|u| **u).count() as u64;
    (done, hosts.len() as u64)
}

fn summary(d: &Deploy) -> String {
    let (done, all) = updated(d);
    let mut line = format!(
        "{} {} stage {} batch {} ({done}/{all} hosts updated)",
        d.id,
        phase_name(d.phase()),
        d.stage,
        d.batch
    );
    if !d.config.is_empty() {
        line.push_str(&format!(" [config {}, code stays]", d.config));
    }
    if !d.reason.is_empty() {
        line.push_str(&format!(": {}", d.reason));
    }
    line
}

/// Exit status of a finished deploy: Ok for COMPLETE.
fn outcome(d: &Deploy) -> anyhow::Result<()> {
    match d.phase() {
        DeployPhase::Complete => Ok(()),
        phase => Err(Ended {
            what: "deploy",
            phase: phase_name(phase),
            rolled_back: phase == DeployPhase::RolledBack,
            reason: d.reason.clone(),
        }
        .into()),
    }
}

pub async fn start(
    client: &mut DeployerClient<Channel>,
    req: StartDeployRequest,
    wait: bool,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let d = super::through_failover(|| {
        let mut client = client.clone();
        let req = req.clone();
        async move { client.start_deploy(req).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    if !wait {
        return if json {
            print_json(out, &d)
        } else {
            writeln!(out, "{}", d.id).map_err(Into::into)
        };
    }
    watch(client, &d.id, json, out).await
}

/// Follows a deploy to its end: a progress bar on a terminal, plain lines otherwise.
pub async fn watch(
    client: &mut DeployerClient<Channel>,
    id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_deploy(DeployRef {
            id: id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = if !json && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} hosts")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut last_line = String::new();
    let mut last = None;
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let Some(d) = event.deploy else { continue };
        if json {
            print_json(out, &d)?;
        } else {
            let (done, all) = updated(&d);
            bar.set_length(all);
            bar.set_position(done);
            bar.set_message(format!("{} {}", d.id, phase_name(d.phase())));
            let line = summary(&d);
            if line != last_line && bar.is_hidden() {
                writeln!(out, "{line}")?;
            }
            last_line = line;
        }
        let end = d.phase().is_terminal();
        last = Some(d);
        if end {
            break;
        }
    }
    bar.finish_and_clear();
    let d = last.ok_or_else(|| anyhow::anyhow!("the watch ended before any update"))?;
    if !json && !bar.is_hidden() {
        writeln!(out, "{}", summary(&d))?;
    }
    if !d.phase().is_terminal() {
        anyhow::bail!(
            "the watch ended while the deploy was {}",
            phase_name(d.phase())
        );
    }
    outcome(&d)
}

pub async fn status(
    client: &mut DeployerClient<Channel>,
    id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let d = client
        .get_deploy(DeployRef {
            id: id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &d);
    }
    writeln!(out, "{}", summary(&d))?;
    writeln!(
        out,
        "pipeline {} service {} artifact {} (replacing {})",
        d.pipeline,
        d.service,
        &d.artifact[..12.min(d.artifact.len())],
        if d.known_good.is_empty() {
            "nothing"
        } else {
            &d.known_good[..12]
        }
    )?;
    for a in &d.approvals {
        writeln!(out, "approval: {a}")?;
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(["STAGE", "BATCH", "HOSTS", "VERDICT"]);
    for b in &d.batches {
        let hosts: Vec<String> = b
            .hosts
            .iter()
            .map(|h| format!("{}:{:?}", h.host_id, h.outcome()))
            .collect();
        table.add_row([
            b.stage.to_string(),
            b.index.to_string(),
            hosts.join(" "),
            b.verdict.clone(),
        ]);
    }
    writeln!(out, "{table}")?;
    for b in &d.blue_green {
        write_blue_green(out, b)?;
    }
    for a in &d.analyses {
        write_analysis(out, a)?;
    }
    Ok(())
}

/// "blue", "green".
fn slot_name(s: drover_common::proto::Slot) -> String {
    s.as_str_name().trim_start_matches("SLOT_").to_lowercase()
}

/// Where a blue-green stage's traffic is, and its old slot.
fn write_blue_green(
    out: &mut impl Write,
    b: &drover_common::proto::BlueGreenStatus,
) -> anyhow::Result<()> {
    let (from, to) = (slot_name(b.from_slot()), slot_name(b.to_slot()));
    let old = if b.scaled_down {
        format!("{from} stopped")
    } else if b.scale_down_at_unix_ms > 0 {
        let left = b
            .scale_down_at_unix_ms
            .saturating_sub(drover_common::time::now_unix_ms());
        format!(
            "{from} kept warm for {} more (rollback switches back at once)",
            humantime::format_duration(std::time::Duration::from_secs(left.div_ceil(1000)))
        )
    } else {
        format!("{from} serving")
    };
    writeln!(
        out,
        "blue-green stage {}: {from} → {to}; traffic on {to} for {} hosts{}; {old}",
        b.stage,
        b.switched_hosts.len(),
        if b.switched_hosts.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.switched_hosts.join(","))
        },
    )?;
    Ok(())
}

/// "pass", "fail", "inconclusive", "promoted".
fn verdict_name(v: drover_common::proto::AnalysisVerdict) -> String {
    v.as_str_name()
        .trim_start_matches("ANALYSIS_VERDICT_")
        .to_lowercase()
}

/// A canary step's verdict and the evidence per metric.
fn write_analysis(
    out: &mut impl Write,
    a: &drover_common::proto::CanaryAnalysis,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "canary stage {} step {}: {} after {:.1}s{} ({} canary, {} baseline hosts{}): {}",
        a.stage,
        a.step,
        verdict_name(a.verdict()),
        a.baked_ms as f64 / 1000.0,
        if a.extensions > 0 {
            format!(", {} extensions", a.extensions)
        } else {
            String::new()
        },
        a.canary_hosts.len(),
        a.baseline_hosts.len(),
        match a.baseline() {
            BaselineKind::Fresh =>
                ", a fresh baseline: restarted on the old release with the canary",
            _ => ", the live baseline: the stage's hosts still on the old release",
        },
        a.reason
    )?;
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "  METRIC",
        "VERDICT",
        "CANARY",
        "BASELINE",
        "HOSTS",
        "REQUESTS",
        "TEST",
        "P-VALUE",
        "ALPHA",
        "THRESHOLDS",
    ]);
    for m in &a.metrics {
        table.add_row([
            format!("  {}", m.name),
            verdict_name(m.verdict()),
            metric_value(&m.name, m.canary_value),
            metric_value(&m.name, m.baseline_value),
            format!("{}/{}", m.canary_hosts, m.baseline_hosts),
            format!("{}/{}", m.canary_requests, m.baseline_requests),
            if m.test.is_empty() {
                "-".to_string()
            } else {
                m.test.clone()
            },
            format!("{:.2e}", m.p_value),
            format!("{:.2e}", m.alpha),
            thresholds(m),
        ]);
    }
    if !a.metrics.is_empty() {
        writeln!(out, "{table}")?;
    }
    Ok(())
}

/// A metric check's thresholds, short: "max 1.00%, 3x baseline, ±20%".
fn thresholds(m: &drover_common::proto::MetricVerdict) -> String {
    let mut parts = Vec::new();
    if m.max > 0.0 {
        parts.push(format!("max {}", metric_value(&m.name, m.max)));
    }
    if m.max_ratio > 0.0 {
        parts.push(format!("{}x baseline", m.max_ratio));
    }
    parts.push(format!("±{:.0}%", m.tolerance * 100.0));
    parts.join(", ")
}

/// `droverctl environments --pipeline P`.
pub async fn environments(
    client: &mut DeployerClient<Channel>,
    pipeline: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let r = client
        .list_environments(drover_common::proto::ListEnvironmentsRequest {
            pipeline: pipeline.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &r);
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(["STAGE", "ARTIFACT", "DEPLOY", "SINCE", ""]);
    for e in &r.environments {
        table.add_row([
            e.stage.clone(),
            e.artifact.chars().take(12).collect(),
            e.deploy_id.clone(),
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.since_unix_ms),
            )
            .to_string(),
            if e.forced { "forced" } else { "" }.to_string(),
        ]);
    }
    writeln!(out, "{table}")?;
    Ok(())
}

pub async fn list(
    client: &mut DeployerClient<Channel>,
    pipeline: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let r = client
        .list_deploys(ListDeploysRequest {
            pipeline: pipeline.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &r);
    }
    for d in &r.deploys {
        writeln!(out, "{}", summary(d))?;
    }
    Ok(())
}

/// A metric's value as people read it: error rates in percent, latencies
/// in milliseconds, anything else as it is.
fn metric_value(name: &str, v: f64) -> String {
    match name {
        "error_rate" => format!("{:.3}%", v * 100.0),
        n if n.starts_with("latency_") => format!("{v:.1} ms"),
        _ => format!("{v:.4}"),
    }
}
