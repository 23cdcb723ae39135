use clap::Parser;
use drover_agent::config::{AgentConfig, Args};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    drover_common::logging::init(args.log_format);
    let cfg = AgentConfig::from_args(args)?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        match drover_common::grpc::shutdown_signal().await {
            Ok(signal) => tracing::info!(signal, "signal received"),
            Err(e) => tracing::error!(error = %e, "cannot listen for signals"),
        }
        trigger.cancel();
    });
    drover_agent::agent::run(cfg, shutdown).await
}
