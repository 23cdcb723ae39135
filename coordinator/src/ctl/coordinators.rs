//! `droverctl coordinators`: who is live and which shards each leads.

use std::io::Write;

use comfy_table::{Table, presets};
use drover_common::proto::ListCoordinatorsRequest;
use drover_common::proto::deployer_client::DeployerClient;
use tonic::transport::Channel;

use super::{print_json, status_error};

pub async fn list(
    client: &mut DeployerClient<Channel>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let response = client
        .list_coordinators(ListCoordinatorsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &response);
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(["COORDINATOR", "ADDRESS", "STATE", "SHARDS"]);
    for c in &response.coordinators {
        let shards: Vec<String> = c.shards.iter().map(|s| s.shard.to_string()).collect();
        table.add_row([
            c.id.clone(),
            c.address.clone(),
            if c.ready { "ready" } else { "warming up" }.to_string(),
            format!("{} ({})", shards.len(), shards.join(",")),
        ]);
    }
    writeln!(out, "{table}")?;
    if !response.leaderless_shards.is_empty() {
        let shards: Vec<String> = response
            .leaderless_shards
            .iter()
            .map(|s| s.to_string())
            .collect();
        writeln!(
            out,
            "no leader right now (failover under way): shards {}",
            shards.join(",")
        )?;
    }
    Ok(())
}
