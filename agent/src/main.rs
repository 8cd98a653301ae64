//! `envoy`: the Vigo agent. Today its store commands open the store directly;
//! the transfer issue adds the daemon (`envoy run`) and routes them through
//! its control socket while it runs.

use std::process::ExitCode;

mod cli;
mod store_cmd;

fn main() -> ExitCode {
    cli::main()
}
