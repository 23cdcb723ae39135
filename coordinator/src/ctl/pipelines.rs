//! `droverctl pipeline apply|get|list`.

use std::io::Write;
use std::path::Path;

use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    CreatePipelineRequest, GetPipelineRequest, ListPipelinesRequest, Pipeline, Stage,
    UpdatePipelineRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use super::{print_json, status_error};

/// Reads a pipeline spec: TOML with the proto's field names.
pub fn read_spec(path: &Path) -> anyhow::Result<Pipeline> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    toml::from_str::<Pipeline>(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))
}

/// Creates the pipeline, or updates it when it exists (compare-and-swap on
/// the version read just before).
pub async fn apply(
    client: &mut DeployerClient<Channel>,
    file: &Path,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let spec = read_spec(file)?;
    let existing = match client
        .get_pipeline(GetPipelineRequest {
            name: spec.name.clone(),
        })
        .await
    {
        Ok(p) => Some(p.into_inner()),
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(status_error(s)),
    };
    let (verb, p) = match existing {
        None => (
            "created",
            client
                .create_pipeline(CreatePipelineRequest {
                    pipeline: Some(spec),
                })
                .await
                .map_err(status_error)?
                .into_inner(),
        ),
        Some(current) => (
            "updated",
            client
                .update_pipeline(UpdatePipelineRequest {
                    pipeline: Some(spec),
                    expected_version: current.version,
                })
                .await
                .map_err(status_error)?
                .into_inner(),
        ),
    };
    if json {
        return print_json(out, &p);
    }
    writeln!(out, "pipeline {} {verb} (version {})", p.name, p.version)?;
    Ok(())
}

pub async fn get(
    client: &mut DeployerClient<Channel>,
    name: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let p = client
        .get_pipeline(GetPipelineRequest {
            name: name.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &p);
    }
    writeln!(out, "pipeline:  {} (version {})", p.name, p.version)?;
    writeln!(out, "service:   {}", p.service)?;
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "STAGE",
        "SELECTOR",
        "BATCH",
        "MAX UNAVAIL",
        "SETTLE",
        "APPROVAL",
        "GATE",
    ]);
    for s in &p.stages {
        table.add_row([
            s.name.clone(),
            s.selector.clone(),
            batch(s),
            s.max_unavailable.to_string(),
            format!("{}ms", s.settle_ms),
            if s.requires_approval {
                "required".into()
            } else {
                "-".into()
            },
            gate(s),
        ]);
    }
    writeln!(out, "{table}")?;
    Ok(())
}

pub async fn list(
    client: &mut DeployerClient<Channel>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let r = client
        .list_pipelines(ListPipelinesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &r);
    }
    if r.pipelines.is_empty() {
        writeln!(out, "no pipelines")?;
        return Ok(());
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(["PIPELINE", "SERVICE", "STAGES", "VERSION"]);
    for p in &r.pipelines {
        let stages: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        table.add_row([
            p.name.clone(),
            p.service.clone(),
            stages.join(" -> "),
            p.version.to_string(),
        ]);
    }
    writeln!(out, "{table}")?;
    Ok(())
}

fn batch(s: &Stage) -> String {
    if s.batch_percent > 0 {
        format!("{}%", s.batch_percent)
    } else {
        s.batch_size.to_string()
    }
}

fn gate(s: &Stage) -> String {
    let Some(g) = &s.gate else { return "-".into() };
    let mut parts = Vec::new();
    if g.max_error_rate > 0.0 {
        parts.push(format!("err<={}", g.max_error_rate));
    }
    if g.max_error_rate_ratio > 0.0 {
        parts.push(format!("err<={}x", g.max_error_rate_ratio));
    }
    if g.max_p99_ms > 0.0 {
        parts.push(format!("p99<={}ms", g.max_p99_ms));
    }
    if g.max_p99_ratio > 0.0 {
        parts.push(format!("p99<={}x", g.max_p99_ratio));
    }
    parts.push(format!("{}/{} bad", g.bad_samples, g.samples));
    parts.join(" ")
}
