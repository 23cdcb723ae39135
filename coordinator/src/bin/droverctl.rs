use std::process::ExitCode;

use clap::Parser;
use drover_coordinator::ctl::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match run(cli, &mut stdout).await {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`droverctl hosts | head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<drover_coordinator::ctl::Ended>() {
                Some(ended) => ExitCode::from(ended.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}
