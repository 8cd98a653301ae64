//! Command-line surface and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use engine::io::IoMode;

use crate::store_cmd;

/// Exit codes, documented in `envoy --help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const CORRUPT: u8 = 4;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (IO failure, no space, store in use, backend unavailable, ...)
  2  bad usage
  3  not found (unknown blob id)
  4  verification failed (corruption detected; corrupt bytes are never output)

Environment:
  VIGO_STORE  store directory (same as --store)
  VIGO_IO     IO backend: auto, uring or portable (same as --io)
  VIGO_LOG    log filter, e.g. info or engine=debug (default: warn)

Default store: /var/lib/vigo/store for root, else $XDG_DATA_HOME/vigo/store
(~/.local/share/vigo/store).";

#[derive(Parser, Debug)]
#[command(name = "envoy", version, about = "Vigo envoy: blob store and (soon) swarm agent", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Store directory.
    #[arg(long, global = true, env = "VIGO_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// IO backend: auto probes io_uring and falls back to portable;
    /// forcing one that cannot run is an error.
    #[arg(long = "io", global = true, env = "VIGO_IO", default_value = "auto", value_parser = parse_io)]
    pub io: IoMode,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

fn parse_io(s: &str) -> Result<IoMode, String> {
    s.parse()
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Work with the local blob store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// What this platform offers: kernel, IO backend, io_uring opcodes, kernel TLS.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Ingest a file; prints the blob id alone on stdout.
    Add { file: PathBuf },
    /// List blobs.
    Ls,
    /// Write a blob's bytes to stdout, verifying every chunk first.
    Cat { id: String },
    /// Write a verified copy of a blob to PATH (atomically, via rename).
    Export { id: String, path: PathBuf },
    /// Re-hash chunks against their manifests (all blobs, or one).
    Verify {
        id: Option<String>,
        /// Also recompute the whole-content BLAKE3.
        #[arg(long)]
        full: bool,
    },
    /// Remove a blob; chunks other blobs use are kept.
    Rm { id: String },
    /// Show a blob's manifest.
    Manifest {
        id: String,
        /// Write the manifest's canonical binary bundle to stdout instead.
        #[arg(long, conflicts_with = "json")]
        bundle: bool,
    },
    /// Assemble a blob from a manifest bundle using chunks already held
    /// locally; reports what would still have to be fetched. Resumable.
    Assemble { manifest: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    let code = match cli.command {
        Command::Store(cmd) => store_cmd::run(&cli.global, cmd),
        Command::Status => store_cmd::status(&cli.global),
    };
    ExitCode::from(code)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
