use clap::Parser;

use drover_coordinator::config::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_args(Args::parse())?;
    drover_common::logging::init(cfg.log_format);
    match drover_common::limits::raise_fd_limit() {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    drover_coordinator::server::run(cfg, async {
        match drover_common::grpc::shutdown_signal().await {
            Ok(signal) => tracing::info!(signal, "signal received"),
            Err(e) => tracing::error!(error = %e, "cannot listen for signals"),
        }
    })
    .await
}
