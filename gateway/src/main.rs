//! The `egress-gateway` command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use egress_gateway::cli;

#[derive(Parser)]
#[command(
    name = "egress-gateway",
    version,
    about = "SPIFFE-aware egress gateway for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: the mTLS egress proxy and the admin endpoints.
    Run(cli::run::RunArgs),
    /// Work with policy files: check, test, explain, schema.
    #[command(subcommand)]
    Policy(cli::policy::PolicyCommand),
    /// Plain-HTTP proxy beside an agent, forwarding over mTLS to the gateway.
    Sidecar(cli::sidecar::SidecarArgs),
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let args = Cli::parse();
    match args.command {
        Command::Run(args) => cli::run::run(args),
        Command::Policy(cmd) => cli::policy::run(cmd),
        Command::Sidecar(args) => cli::sidecar::run(args),
        Command::Version => {
            println!("egress-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
