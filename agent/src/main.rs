//! `envoy`: the Vigo agent (see the library crate for the modules).

use std::process::ExitCode;

fn main() -> ExitCode {
    agent::cli::main()
}
