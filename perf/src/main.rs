//! `vigo-perf`: benchmarks against named baselines measured in the same run.
//!
//! Each bench prints a human table on stderr and, with `--json`, exactly one
//! JSON object on stdout (BENCHMARKS.md, "Output contract"). The exit status
//! says whether the measurement completed, not whether its goals were met:
//! goals are reported in the table and under `"goals"`.
#![forbid(unsafe_code)]

mod delta;
mod demo;
mod harness;
mod ingest;
mod p2p;
mod tls;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vigo-perf",
    version,
    about = "Vigo benchmarks against named baselines measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// `envoy store add/verify/export` of a generated file against `cp && sync` and `b3sum`.
    Ingest(ingest::IngestArgs),
    /// Bytes a new version needs beyond an old one, per chunk size, against rsync.
    Delta(delta::DeltaArgs),
    /// The main job: generate an image, ingest, verify, export and check it.
    Demo(demo::DemoArgs),
    /// One blob envoy-to-envoy over loopback mTLS, against iperf3 and sendme.
    P2p(p2p::P2pArgs),
    /// The TLS layer alone: how to drive rustls for the data path (buffered,
    /// unbuffered, or an own record layer over rustls's secrets).
    Tls(tls::TlsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Ingest(args) => ingest::run(args),
        Bench::Delta(args) => delta::run(args),
        Bench::Demo(args) => demo::run(args),
        Bench::P2p(args) => p2p::run(args),
        Bench::Tls(args) => tls::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigo-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}
