//! The `outboxd` binary: parse the command line, set up logging, run the command, and map
//! the outcome to the exit codes of SPEC section 5 (0 ok, 1 runtime failure, 2 bad usage or
//! configuration).

use clap::Parser;
use outboxd::cli::{Cli, Command, LogFormat};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs would only repeat it.
    let default_log = if matches!(cli.command, Command::Demo(_)) {
        "off"
    } else {
        "info"
    };
    init_tracing(cli.log_format, cli.log.as_deref().unwrap_or(default_log));
    let mut builder = if cli.worker_threads > 1 {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(cli.worker_threads));
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(outboxd::app::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboxd: {}", outboxd::error::chain(&e));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
