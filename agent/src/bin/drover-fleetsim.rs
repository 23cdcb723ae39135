use clap::Parser;
use drover_agent::fleetsim::{Args, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    drover_common::logging::init(args.log_format);
    let limit = drover_common::limits::raise_fd_limit()?;
    anyhow::ensure!(
        limit as usize > args.hosts * args.coordinators.len() + 64,
        "the open-file limit ({limit}) is too low for {} streams; raise it (ulimit -n)",
        args.hosts * args.coordinators.len()
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        if drover_common::grpc::shutdown_signal().await.is_ok() {
            trigger.cancel();
        }
    });
    run(args, shutdown).await
}
