//! The `detector` command. See `detector --help`.

use std::process::ExitCode;

use clap::Parser;
use detector::cli::{Cli, Command, LogFormat, dump, inspect, run, targets};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cli.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from);
    let result = match cli.command {
        Command::Dump(args) => runtime().and_then(|rt| rt.block_on(dump::run(args))),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run::run(args))),
        Command::Targets(args) => runtime().and_then(|rt| rt.block_on(targets::run(args))),
        Command::Inspect(args) => inspect::run(args),
        Command::BenchFloor { pid } => runtime().and_then(|rt| rt.block_on(dump::bench_floor(pid))),
        Command::Calibrate => dump::calibrate(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detector: {e:#}");
            ExitCode::FAILURE
        }
    }
}
