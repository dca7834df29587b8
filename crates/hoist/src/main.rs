//! The `hoist` command: a thin layer of argument parsing and output over the library
//! crates (`hoist-builder` converts, `hoist-reader` unpacks, checks and inspects).

mod args;
mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    // Diagnostics (retries, cache decisions) go to stderr at the level HOIST_LOG names,
    // e.g. HOIST_LOG=debug; warnings by default, and mounts too in the daemon's log.
    // fuser's own warnings (an unmount of a mount detached already, requests hoist
    // leaves to the kernel's defaults) are noise there.
    let default = match cli.command {
        args::Command::Daemon {
            op: args::DaemonOp::Run | args::DaemonOp::Serve,
        }
        | args::Command::Snapshotter(_) => "info,fuser=error",
        _ => "warn,fuser=error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOIST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cmd::run(cli.command, &cli.registry) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoist: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
