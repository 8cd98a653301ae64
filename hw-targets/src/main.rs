//! `hw-targets matrix [--quick] [--json] [--targets a,b] [--sysctl]`: see
//! hw-targets/README.md. Exits 0 when every row is ok, 1 when one is not,
//! 2 on bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hw_targets::matrix::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "hw-targets",
    about = "Vigo target matrix: cross builds, qemu-user runs, hosts without io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install what the targets need, build, test, measure; print one table.
    Matrix {
        /// What CI runs: aarch64 engine tests under qemu, the seccomp
        /// io_uring refusals, the darwin/FreeBSD checks; no ingest figures.
        #[arg(long)]
        quick: bool,
        /// Print the report as one JSON object on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Only these target triples (comma-separated).
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// Also run the host suites with kernel.io_uring_disabled=2. This is
        /// system-wide: every process on the machine loses io_uring until
        /// the row ends (the previous value is restored on every exit but SIGKILL,
        /// and by the next run after that).
        #[arg(long)]
        sysctl: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cmd::Matrix {
        quick,
        json,
        targets,
        sysctl,
    } = cli.command;
    let opts = Options {
        quick,
        targets,
        sysctl,
    };
    let report = match matrix::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hw-targets: {e:#}");
            return ExitCode::from(2);
        }
    };
    if json {
        eprint!("{}", report.to_table());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
