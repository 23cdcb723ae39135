//! `droverctl hosts` and `droverctl host ID`.

use std::io::Write;

use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    ConnectionState, GetHostRequest, Host, ListHostsRequest, ListHostsResponse,
};
use tonic::transport::Channel;

use super::{print_json, status_error};

pub async fn list(
    client: &mut DeployerClient<Channel>,
    selector: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // Every page, in host id order.
    let mut response = ListHostsResponse::default();
    loop {
        let page = client
            .list_hosts(ListHostsRequest {
                selector: selector.to_string(),
                page_size: 0,
                page_token: response.next_page_token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        response.hosts.extend(page.hosts);
        response.next_page_token = page.next_page_token;
        if response.next_page_token.is_empty() {
            break;
        }
    }
    if json {
        return print_json(out, &response);
    }
    if response.hosts.is_empty() {
        writeln!(
            out,
            "no hosts{}",
            if selector.is_empty() {
                String::new()
            } else {
                format!(" match {selector}")
            }
        )?;
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "HOST",
        "STATE",
        "HEARTBEAT",
        "CPU",
        "MEM",
        "DISK FREE",
        "SERVICES",
        "LABELS",
        "AGENT",
    ]);
    for h in &response.hosts {
        table.add_row([
            h.host_id.clone(),
            state_name(h),
            heartbeat_age(h),
            h.metrics
                .map(|m| format!("{:.0}%", m.cpu_usage * 100.0))
                .unwrap_or_else(dash),
            h.metrics
                .filter(|m| m.memory_total_bytes > 0)
                .map(|m| {
                    format!(
                        "{:.0}%",
                        100.0 * m.memory_used_bytes as f64 / m.memory_total_bytes as f64
                    )
                })
                .unwrap_or_else(dash),
            h.metrics
                .filter(|m| m.disk_total_bytes > 0)
                .map(|m| bytes(m.disk_available_bytes))
                .unwrap_or_else(dash),
            services(h),
            labels(h),
            h.agent_version.clone(),
        ]);
    }
    writeln!(out, "{table}")?;
    Ok(())
}

pub async fn show(
    client: &mut DeployerClient<Channel>,
    host_id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let h = client
        .get_host(GetHostRequest {
            host_id: host_id.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &h);
    }
    writeln!(out, "host:        {}", h.host_id)?;
    writeln!(
        out,
        "state:       {}{}",
        state_name(&h),
        if h.state_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", h.state_reason)
        }
    )?;
    writeln!(
        out,
        "heartbeat:   {} (every {} ms, #{}, {} dropped)",
        heartbeat_age(&h),
        h.heartbeat_interval_ms,
        h.heartbeat_sequence,
        h.dropped_heartbeats
    )?;
    writeln!(
        out,
        "agent:       {} from {}",
        h.agent_version, h.peer_address
    )?;
    writeln!(out, "labels:      {}", labels(&h))?;
    for p in &h.problems {
        writeln!(out, "problem:     {p}")?;
    }
    if let Some(m) = h.metrics {
        writeln!(
            out,
            "resources:   cpu {:.0}% of {} cores, load {:.2}, mem {} of {}, disk {} free of {}",
            m.cpu_usage * 100.0,
            m.cpu_cores,
            m.load_average_1m,
            bytes(m.memory_used_bytes),
            bytes(m.memory_total_bytes),
            bytes(m.disk_available_bytes),
            bytes(m.disk_total_bytes)
        )?;
    }
    for s in &h.services {
        writeln!(
            out,
            "service:     {} current {} previous {}",
            unit_name(&s.service, s.slot()),
            short(&s.current_artifact),
            short(&s.previous_artifact)
        )?;
    }
    for s in &h.health {
        writeln!(
            out,
            "health:      {} ready={} live={} restarts={} requests={} errors={} p50={:.1}ms p99={:.1}ms",
            unit_name(&s.service, s.slot()),
            s.ready,
            s.live,
            s.restarts,
            s.request_count,
            s.error_count,
            s.latency_p50_ms,
            s.latency_p99_ms
        )?;
    }
    Ok(())
}

/// A service's process as shown: `hello`, or `hello(green)` for a slot.
fn unit_name(service: &str, slot: drover_common::proto::Slot) -> String {
    match slot {
        drover_common::proto::Slot::None => service.to_string(),
        slot => format!(
            "{service}({})",
            slot.as_str_name()
                .trim_start_matches("SLOT_")
                .to_lowercase()
        ),
    }
}

fn dash() -> String {
    "-".to_string()
}

fn state_name(h: &Host) -> String {
    match h.state() {
        ConnectionState::Connected if !h.problems.is_empty() => "DEGRADED",
        ConnectionState::Connected => "connected",
        ConnectionState::Late => "LATE",
        ConnectionState::Disconnected => "DISCONNECTED",
        ConnectionState::Gone => "gone",
        ConnectionState::Unspecified => "unknown",
    }
    .to_string()
}

fn heartbeat_age(h: &Host) -> String {
    format!("{:.1}s ago", h.last_heartbeat_age_ms as f64 / 1000.0)
}

fn short(digest: &str) -> &str {
    if digest.is_empty() {
        "-"
    } else {
        &digest[..digest.len().min(12)]
    }
}

fn services(h: &Host) -> String {
    if h.services.is_empty() {
        return dash();
    }
    h.services
        .iter()
        .map(|s| {
            let name = unit_name(&s.service, s.slot());
            format!("{name}@{}", short(&s.current_artifact))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn labels(h: &Host) -> String {
    let mut pairs: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() {
        dash()
    } else {
        pairs.join(",")
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
