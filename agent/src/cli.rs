//! Command-line surface and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use engine::io::IoMode;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::control::{self, FetchRequest, Request, Sink};
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

Daemon:
  `envoy run` owns the store and serves it to peers over mTLS (port 1531).
  While it runs, `envoy store ...` (without --store) and `envoy fetch` go
  through its control socket (<state_dir>/envoy.sock, see --config).

Environment:
  VIGO_CONFIG envoy.yaml (same as --config)
  VIGO_STORE  store directory (same as --store)
  VIGO_IO     IO backend: auto, uring or portable (same as --io)
  VIGO_LOG    log filter, e.g. info or engine=debug (default: warn)

Default store: /var/lib/vigo/store for root, else $XDG_DATA_HOME/vigo/store
(~/.local/share/vigo/store).";

#[derive(Parser, Debug)]
#[command(name = "envoy", version, about = "Vigo envoy: blob store, daemon and envoy-to-envoy transfer", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Daemon configuration (envoy.yaml); documented defaults without it.
    #[arg(long, global = true, env = "VIGO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store directory (opened directly, not through a running daemon).
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
    /// What this platform offers (kernel, IO backend, io_uring opcodes,
    /// kernel TLS) and, when it runs, the daemon's state.
    Status,
    /// Run the daemon in the foreground until SIGTERM or Ctrl-C.
    Run,
    /// Fetch a blob from other envoys (through the running daemon).
    Fetch {
        id: String,
        /// Sources, HOST:PORT, comma-separated or repeated.
        #[arg(long, required = true, value_delimiter = ',')]
        from: Vec<String>,
        /// Also write the blob to PATH (by this process, atomically), as it
        /// arrives: the export overlaps the fetch.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Print this envoy's host key (created on first use), for peers' allow lists.
    Id,
}

#[derive(Subcommand, Debug, Serialize, Deserialize)]
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
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envoy: {e:#}");
            exit::ERROR
        }
    };
    ExitCode::from(code)
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let g = cli.global;
    let config = || Config::load(g.config.as_deref());
    match cli.command {
        Command::Store(cmd) => {
            // An explicit store is opened directly; otherwise a running
            // daemon owns the configured store and serves the command.
            if g.store.is_none() {
                let config = config()?;
                if let Some(stream) = control::connect(&config.control_socket())? {
                    return via_daemon(stream, cmd, g.json);
                }
                let g = Global {
                    store: Some(config.store_dir()),
                    ..g
                };
                return Ok(store_cmd::run(&g, cmd));
            }
            Ok(store_cmd::run(&g, cmd))
        }
        Command::Status => {
            let code = store_cmd::status(&g);
            let config = config()?;
            match control::connect(&config.control_socket())? {
                Some(stream) => {
                    let daemon = control::call(
                        stream,
                        &Request::Status { json: g.json },
                        Sink::Stdout,
                        None,
                    )?;
                    Ok(code.max(daemon))
                }
                None => {
                    if !g.json {
                        println!("daemon	not running ({})", config.control_socket().display());
                    }
                    Ok(code)
                }
            }
        }
        Command::Run => {
            let config = config()?;
            crate::daemon::run(config, g.io)?;
            Ok(exit::OK)
        }
        Command::Fetch { id, from, out } => {
            let config = config()?;
            let socket = config.control_socket();
            let Some(stream) = control::connect(&socket)? else {
                anyhow::bail!(
                    "no daemon is running (no answer on {}): start one with `envoy run`",
                    socket.display()
                );
            };
            // With --out the daemon hands this process the blob's file as it
            // verifies and writes it, and this process copies it out.
            let request = Request::Fetch(FetchRequest {
                id: id.clone(),
                from,
                json: g.json,
                stream: out.is_some(),
            });
            let sink = out.map_or(Sink::Stdout, Sink::Copy);
            match control::call(stream, &request, sink, None) {
                Err(e) if e.is::<control::CopyMismatch>() => {
                    reverify_after_bad_copy(&socket, &id, &e)
                }
                answer => answer,
            }
        }
        Command::Id => {
            let config = config()?;
            let key = crate::identity::HostKey::load_or_create(&config.state_dir)?;
            println!("{}", key.public());
            Ok(exit::OK)
        }
    }
}

/// A `fetch --out` copy did not hash to the blob's content hash, though the
/// daemon verified every chunk as it received it: its copy is most likely
/// damaged on its disk since. Has the daemon re-hash that blob (`store
/// verify --full`, which quarantines it if so: it is then no longer served,
/// and the next fetch rebuilds it from peers), its report on stderr, and
/// exits with the corruption code either way.
fn reverify_after_bad_copy(
    socket: &std::path::Path,
    blob: &str,
    mismatch: &anyhow::Error,
) -> anyhow::Result<u8> {
    eprintln!("envoy: {mismatch}");
    eprintln!(
        "envoy: re-verifying the daemon's copy of {blob} (`envoy store verify --full {blob}`):"
    );
    let verified = control::connect(socket).and_then(|stream| {
        let stream = stream.ok_or_else(|| anyhow::anyhow!("the daemon is gone"))?;
        let verify = StoreCommand::Verify {
            id: Some(blob.to_owned()),
            full: true,
        };
        control::call(
            stream,
            &Request::Store {
                cmd: verify,
                json: false,
            },
            Sink::Stderr,
            None,
        )
    });
    if let Err(e) = verified {
        eprintln!("envoy: could not re-verify it ({e:#}): run `envoy store verify --full {blob}`");
    }
    Ok(exit::CORRUPT)
}

/// Runs a store command through the daemon. Files the command reads are
/// opened here, as the calling user, and handed to the daemon with the
/// request (it never opens a user's path); paths that remain are made
/// absolute (the daemon has another working directory); `export` becomes a
/// verified stream this process writes itself.
fn via_daemon(
    stream: std::os::unix::net::UnixStream,
    cmd: StoreCommand,
    json: bool,
) -> anyhow::Result<u8> {
    let (mut cmd, sink) = match cmd {
        StoreCommand::Export { id, path } => (StoreCommand::Cat { id }, Sink::File(path)),
        other => (other, Sink::Stdout),
    };
    let input = match &mut cmd {
        StoreCommand::Add { file: path } | StoreCommand::Assemble { manifest: path } => {
            match engine::store::open_input(path) {
                Ok(f) => {
                    *path = std::path::absolute(&*path).unwrap_or_else(|_| path.clone());
                    Some(f)
                }
                Err(e) => return Ok(crate::store_cmd::fail(&mut std::io::stderr(), &e)),
            }
        }
        _ => None,
    };
    control::call(stream, &Request::Store { cmd, json }, sink, input)
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
