use clap::Parser;

use drover_coordinator::config::{Args, Config, Tool};
use drover_coordinator::store::StoreError;

/// Exit status for a damaged store: the unit's RestartPreventExitStatus, so
/// systemd does not restart into the same damage again and again.
const EXIT_STORE_DAMAGED: i32 = 65;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(Tool::Store(tool)) = args.tool.take() {
        let result = drover_coordinator::store::tool::run(tool, &mut std::io::stdout()).await;
        if let Err(e) = &result {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let cfg = Config::from_args(args)?;
    drover_common::logging::init(cfg.log_format);
    match drover_common::limits::raise_fd_limit() {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let served = drover_coordinator::server::run(cfg, async {
        match drover_common::grpc::shutdown_signal().await {
            Ok(signal) => tracing::info!(signal, "signal received"),
            Err(e) => tracing::error!(error = %e, "cannot listen for signals"),
        }
    })
    .await;
    if let Err(e) = &served
        && let Some(damaged @ StoreError::Corrupt { .. }) = e.downcast_ref::<StoreError>()
    {
        tracing::error!(error = %damaged, "not starting on a damaged store");
        eprintln!("error: {damaged}");
        std::process::exit(EXIT_STORE_DAMAGED);
    }
    served
}
