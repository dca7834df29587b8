//! The `hoist` command: a thin layer of argument parsing and output over the library
//! crates (`hoist-builder` converts, `hoist-reader` unpacks, checks and inspects).

mod args;
mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    match cmd::run(cli.command, &cli.registry) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoist: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
