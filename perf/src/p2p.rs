//! `vigo-perf p2p`: one blob from one envoy to another over loopback mTLS,
//! against loopback TCP (`iperf3`) and iroh's `sendme`.
//!
//! Two `envoy run` daemons, each with its own state directory, admit each
//! other's host key. The sender holds the blob (added to its store before it
//! starts; its sealed file read once before every run, so it serves from a
//! warm page cache); the receiver starts empty and the blob is removed from
//! it (`envoy store rm`, untimed) after every run, so every run fetches
//! every byte. Contenders, alternated within each round after one warm-up
//! round:
//!
//! - `envoy fetch`: ends when the blob is verified and sealed (durably) in
//!   the receiver's store: `p2p_gb_per_s`.
//! - `envoy fetch --out`: the same, then the calling CLI process streams the
//!   verified blob from the daemon and writes the file (temp, fsync,
//!   rename). This is the contender `sendme` is compared with.
//! - `iperf3`: one loopback TCP stream of the same size; its own measured
//!   transfer time (JSON `end.sum_received`), which leaves out process start
//!   and connection setup: the ceiling of a single stream here.
//! - `sendme receive` (when installed) from one long-running `sendme send`
//!   of the input file, followed by `sync` inside the timed region, so both
//!   `sendme` and `fetch --out` end with the written file on disk.
//! - `cp` + `sync`: the input (page cache warm) copied to a new file beside
//!   the receiver's store, then `sync`: what this machine takes to make one
//!   local copy of the blob durable, the floor under every contender that
//!   ends on the disk when the disk is the limit (`p2p_vs_cp_sync`: its time
//!   / `envoy fetch`'s; `p2p_out_vs_cp_sync`: / `fetch --out`'s, which
//!   writes two copies).
//! - `dd oflag=direct conv=fdatasync`: the input's bytes written to a new,
//!   allocated (`fallocate`) file beside the receiver's store with direct
//!   IO and flushed, the way a fetch writes them: the disk's durable write rate
//!   (`disk_durable_gb_per_s`), which bounds `p2p_gb_per_s`
//!   (`p2p_vs_dd_direct`: its time / `envoy fetch`'s).
//!
//! The receiving daemon's `RssAnon` is sampled during every fetch (it is
//! the process that holds transfer state; the CLI only relays).
//!
//! Then, unless `--no-multi-source`, the multi-source phase
//! (`multi_source_speedup`): `sendme send` is stopped (its store goes), two
//! more sending envoys are set up as the first one was (`source-2`,
//! `source-3`, each with its own store holding the blob), the first sender
//! is restarted, and each of the three runs with `rate.upload_bytes_per_s`
//! (its daemon-wide upload token bucket) at one third of the rate of this
//! run's median uncapped `envoy fetch`. The receiver is restarted admitting
//! all three keys, and one warm-up plus `--runs` counted runs of
//! `envoy fetch --from A,B,C` follow (sealed, no `--out`), each removed
//! again afterwards. `multi_source_speedup` = the uncapped one-source median
//! time / the three-source median time: 1.0 when three capped sources
//! together deliver what one uncapped source does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::harness::{
    self, CommonArgs, Goal, Report, ResultRow, RssSampler, Stats, WorkDir, mib, ratio, size_arg,
    size_label,
};
use crate::ingest::{InputFile, generate_file};

/// 10⁹ bytes: rates in figure names are decimal (BENCHMARKS.md).
const GB: f64 = 1e9;
/// Verified bytes per second into the receiver's sealed store (goal, issue 3).
const P2P_GB_PER_S_MIN: f64 = 1.2;
/// sendme's time over ours, both ending with the file written (goal, issue 3).
const P2P_VS_SENDME_MIN: f64 = 3.0;
/// Peak anonymous memory of the receiving daemon during a fetch (goal, issue 3).
const RECEIVER_ANON_RSS_MIB_MAX: f64 = 64.0;
/// One uncapped source's time over three sources' each capped at a third
/// of that source's rate (goal, issue 3).
const MULTI_SOURCE_SPEEDUP_MIN: f64 = 0.83;
/// Sources of the multi-source phase; each is capped at this share of the
/// uncapped rate, so together they could match one uncapped source.
const MULTI_SOURCES: u64 = 3;
/// State directories and roles of the sources the multi-source phase adds
/// to the first sender.
const EXTRA_SOURCES: [(&str, &str); 2] = [("source-2", "source 2"), ("source-3", "source 3")];
/// Room kept free beyond what the bench writes: the receiver's own fetch
/// reserve (`limits.reserve_bytes`, 1 GiB by default) plus slack.
const DISK_SLACK_BYTES: u64 = 2 << 30;
/// Copies of the blob on disk at the worst moment: during a three-source
/// fetch, the input, the three senders' stores and the receiver's store.
/// The first rounds hold at most 4: the input, the sender's store, and
/// either the receiver's store with the exported file (`fetch --out`) or
/// sendme's receive store with its export (the receiver's copy is removed
/// after every run; `sendme send` references the input, its store holds
/// the outboard only, and is removed before the extra sources fill theirs).
/// The delta phase holds as many: the input, the blob in the sender's and
/// the receiver's stores, and the changed copy in both (its input file is
/// removed once the sender has added it).
const DISK_COPIES_MAX: u64 = 5;
/// What the delta phase's copy of the input starts with instead.
const DELTA_CHANGE: &[u8] = b"changed!";
/// Bytes a fetch of that copy may move: the chunks the change touches
/// (FastCDC's largest is 32 KiB; a change at the start touches one or two).
const DELTA_FETCHED_MAX: u64 = 1 << 20;
/// How long a daemon may take to answer `status` with its daemon line.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM before it is killed.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of the short envoy commands (`id`, `status`, `store rm`).
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
/// How long `sendme send` may take to import the file and print its ticket.
const SENDME_TICKET_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `iperf3 -s` may take to listen, and to exit after its one test.
const IPERF3_SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried for the iperf3 server (another process may take a free port).
const IPERF3_START_ATTEMPTS_MAX: u32 = 5;
/// Least share of the sent bytes iperf3's receiver side must report.
const IPERF3_RECEIVED_FRACTION_MIN: f64 = 0.95;
/// Bytes of a daemon's log quoted in an error.
const LOG_QUOTE_BYTES_MAX: usize = 3000;
/// Seed of the generated input (differs from ingest's so the files differ).
const INPUT_SEED: u64 = 0x5032_5020; // "P2P "
/// A 1-minute load average from which the machine counts as busy.
const BUSY_LOAD_MIN: f64 = 0.5;
/// Where `cargo install --root /opt/sendme` puts sendme, used
/// when it is not on PATH.
const SENDME_INSTALL_ROOT_BIN: &str = "/opt/sendme/bin/sendme";
/// sendme on loopback only: no relay or discovery servers, IPv4 socket on
/// 127.0.0.1 (so its ticket names loopback), no progress bars.
const SENDME_LOOPBACK_ARGS: [&str; 5] = [
    "--relay",
    "disabled",
    "--magic-ipv4-addr",
    "127.0.0.1:0",
    "--no-progress",
];
/// The Debian package and crate the baselines come from, for notes.
const IPERF3_INSTALL: &str = "apt-get install iperf3";
const SENDME_INSTALL: &str = "cargo install sendme --version 0.37.0 --locked";

/// Arguments of `vigo-perf p2p`.
#[derive(Args, Debug)]
pub struct P2pArgs {
    /// Size of the generated blob (binary: 4G = 4 GiB).
    #[arg(long, value_parser = size_arg, default_value = "4G")]
    size: u64,
    /// Base directory for the work files (stores, input, received files).
    /// Must be a real disk, not tmpfs: the fetch ends with a durable seal.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The envoy binary to measure (default: `envoy` next to vigo-perf).
    #[arg(long, env = "VIGO_ENVOY")]
    envoy: Option<PathBuf>,
    /// The iperf3 baseline (default: `iperf3` on PATH; none: null ratio).
    #[arg(long, env = "VIGO_IPERF3")]
    iperf3: Option<PathBuf>,
    /// The sendme baseline (default: `sendme` on PATH, else
    /// /opt/sendme/bin/sendme; none: null ratio).
    #[arg(long, env = "VIGO_SENDME")]
    sendme: Option<PathBuf>,
    /// Skip the multi-source phase (three capped sources):
    /// `multi_source_speedup` is then null.
    #[arg(long)]
    no_multi_source: bool,
    /// Skip the delta phase (a copy of the blob with its first bytes
    /// changed, fetched by a receiver holding the blob): `delta_vs_full` is
    /// then null.
    #[arg(long)]
    no_delta: bool,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Iperf3,
    Fetch,
    FetchOut,
    Sendme,
    /// `cp` of the input to a new file beside the receiver's store, `sync`.
    CpSync,
    /// `dd oflag=direct conv=fdatasync` of the input to a new file beside
    /// the receiver's store: the disk's durable write rate.
    DdDirect,
    /// `envoy fetch` from three sources, each capped (multi-source phase).
    MultiSource,
    /// `envoy fetch` of a copy of the blob whose first bytes differ, by a
    /// receiver that holds the blob (delta phase): local copies, then the
    /// few chunks that differ.
    Delta,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Iperf3 => "iperf3 (loopback TCP)",
            Kind::Fetch => "envoy fetch (sealed)",
            Kind::FetchOut => "envoy fetch --out (+fsync)",
            Kind::Sendme => "sendme receive (+sync)",
            Kind::CpSync => "cp + sync (local copy)",
            Kind::DdDirect => "dd direct + fdatasync (disk)",
            Kind::MultiSource => "envoy fetch, 3 capped sources",
            Kind::Delta => "envoy fetch, 8 bytes changed",
        }
    }

    fn is_ours(self) -> bool {
        matches!(
            self,
            Kind::Fetch | Kind::FetchOut | Kind::MultiSource | Kind::Delta
        )
    }
}

/// One contender and its counted runs.
#[derive(Debug)]
struct Contender {
    kind: Kind,
    seconds: Vec<f64>,
    /// Peak RssAnon of the receiving daemon over all of this contender's
    /// runs (warm-up included: a peak is a peak).
    peak_rss_anon_bytes: Option<u64>,
    /// What the daemon itself reported as the fetch's duration.
    daemon_seconds: Vec<f64>,
    /// CPU seconds the receiving daemon used per run (all its threads).
    receiver_cpu_seconds: Vec<f64>,
    /// CPU seconds this whole machine was busy per run.
    system_cpu_seconds: Vec<f64>,
    /// Set when a baseline failed: its runs are dropped, its ratio is null.
    failed: Option<String>,
}

impl Contender {
    fn new(kind: Kind) -> Contender {
        Contender {
            kind,
            seconds: Vec::new(),
            peak_rss_anon_bytes: None,
            daemon_seconds: Vec::new(),
            receiver_cpu_seconds: Vec::new(),
            system_cpu_seconds: Vec::new(),
            failed: None,
        }
    }
}

/// One run's measurements.
#[derive(Debug, Default)]
struct Sample {
    seconds: f64,
    peak_rss_anon_bytes: Option<u64>,
    daemon_seconds: Option<f64>,
    /// Of our fetches: CPU seconds of the receiving daemon during the run.
    receiver_cpu_seconds: Option<f64>,
    /// Of our fetches: CPU seconds the machine was busy during the run.
    system_cpu_seconds: Option<f64>,
}

/// What `envoy --json fetch` prints (one JSON line). Only the fields the
/// bench checks are required.
#[derive(Debug, Deserialize)]
struct FetchOutput {
    id: String,
    size: u64,
    #[serde(default)]
    chunks: Option<u64>,
    already_complete: bool,
    bytes_fetched: u64,
    #[serde(default)]
    bytes_local: Option<u64>,
    #[serde(default)]
    bytes_resumed: Option<u64>,
    #[serde(default)]
    seconds: Option<f64>,
    /// What each source delivered (printed after warm-up runs only).
    #[serde(default)]
    peers: Vec<FetchPeer>,
}

/// One source of `envoy --json fetch`'s `peers`.
#[derive(Debug, Deserialize)]
struct FetchPeer {
    addr: String,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    error: Option<String>,
}

/// What `envoy --json store add` prints.
#[derive(Debug, Deserialize)]
struct AddOutput {
    id: String,
    content_blake3: String,
    size: u64,
}

/// The daemon line of `envoy --json status`, plus the platform's backend.
#[derive(Debug, Clone, PartialEq)]
struct DaemonStatus {
    pid: u32,
    listen: String,
    host_key: String,
    io_backend: Option<String>,
}

/// Everything the rounds need. Fields drop in declaration order: the
/// processes stop before the work directory is removed.
#[derive(Debug)]
struct P2p {
    sendme_sender: Option<SendmeSender>,
    receiver: EnvoyDaemon,
    sender: EnvoyDaemon,
    /// The sources the multi-source phase adds (`source-2`, `source-3`).
    extra_sources: Vec<EnvoyDaemon>,
    envoy: PathBuf,
    iperf3: Option<PathBuf>,
    sendme: Option<PathBuf>,
    input: InputFile,
    blob_id: String,
    /// The delta phase's blob: the input with its first bytes changed.
    delta_blob: Option<String>,
    work: WorkDir,
}

pub fn run(args: P2pArgs) -> Result<()> {
    let mut report = Report::new("p2p");
    let envoy = harness::locate_envoy(args.envoy.as_deref())?;
    for tool in ["sh", "sync"] {
        harness::find_on_path(tool).with_context(|| format!("{tool} is not on PATH"))?;
    }
    let iperf3 = locate_tool(
        args.iperf3.as_deref(),
        "iperf3",
        None,
        "--iperf3/VIGO_IPERF3",
    )?;
    let sendme = locate_tool(
        args.sendme.as_deref(),
        "sendme",
        Some(Path::new(SENDME_INSTALL_ROOT_BIN)),
        "--sendme/VIGO_SENDME",
    )?;
    let work = WorkDir::create(&args.dir, "p2p", true)?;
    let needed = args
        .size
        .saturating_mul(DISK_COPIES_MAX)
        .saturating_add(DISK_SLACK_BYTES);
    let available = work.available_bytes()?;
    ensure!(
        available >= needed,
        "{} has {} MiB free; p2p of {} needs about {} MiB (pass a smaller --size or another --dir)",
        work.path().display(),
        available >> 20,
        size_label(args.size),
        needed >> 20
    );

    let load_start = harness::load_average();
    if let Some(load) = harness::load_average_1min().filter(|l| *l >= BUSY_LOAD_MIN) {
        let note = format!(
            "the machine was busy when the bench started (1-minute load average {load:.2} >= \
             {BUSY_LOAD_MIN}): other work shared the CPUs, so treat the figures as indicative"
        );
        eprintln!("vigo-perf: {note}");
        report.notes.push(note);
    }
    report.param("size_bytes", args.size);
    report.param("runs", args.common.runs);
    report.param("work_dir", work.path());
    report.param("envoy", &envoy);
    report.param("iperf3", iperf3.as_deref().and_then(harness::tool_version));
    report.param("sendme", sendme.as_deref().and_then(harness::tool_version));
    report.param("load_average_start", &load_start);

    let started = Instant::now();
    let input = generate_file(&work.path().join("input.bin"), args.size, INPUT_SEED)?;
    eprintln!(
        "generated {} of incompressible input in {:.1} s; starting two envoys",
        size_label(args.size),
        started.elapsed().as_secs_f64()
    );

    let (sender, receiver, blob_id) = start_envoys(&envoy, work.path(), &input)?;
    eprintln!(
        "sender {} on {} (io {}), receiver {} on {} (io {}); blob {blob_id}",
        sender.status.host_key,
        sender.status.listen,
        sender.io_backend(),
        receiver.status.host_key,
        receiver.status.listen,
        receiver.io_backend(),
    );
    report.param("sender_io_backend", sender.io_backend());
    report.param("receiver_io_backend", receiver.io_backend());
    report.machine.io_backend = Some(receiver.io_backend().to_owned());

    let mut p2p = P2p {
        sendme_sender: None,
        receiver,
        sender,
        extra_sources: Vec::new(),
        envoy,
        iperf3,
        sendme,
        input,
        blob_id,
        delta_blob: None,
        work,
    };

    let mut kinds = Vec::new();
    match &p2p.iperf3 {
        Some(_) => kinds.push(Kind::Iperf3),
        None => report.notes.push(format!(
            "iperf3 is not installed ({IPERF3_INSTALL}): p2p_vs_iperf3 is null"
        )),
    }
    kinds.extend([Kind::Fetch, Kind::FetchOut, Kind::CpSync, Kind::DdDirect]);
    match &p2p.sendme {
        Some(program) => {
            let program = program.clone();
            match SendmeSender::start(&program, &p2p.work.path().join("sendme-send"), &p2p.input) {
                Ok(sender) => {
                    p2p.sendme_sender = Some(sender);
                    kinds.push(Kind::Sendme);
                }
                Err(e) => report.notes.push(format!(
                    "sendme send could not start ({e:#}): p2p_vs_sendme is null"
                )),
            }
        }
        None => report.notes.push(format!(
            "sendme is not on PATH nor at {SENDME_INSTALL_ROOT_BIN} ({SENDME_INSTALL}): \
             p2p_vs_sendme is null"
        )),
    }
    let mut contenders: Vec<Contender> = kinds.into_iter().map(Contender::new).collect();
    run_rounds(&mut p2p, &mut contenders, args.common.runs)?;

    if args.no_delta {
        report.notes.push(
            "--no-delta: the delta phase did not run, delta_vs_full was not measured (null)"
                .to_owned(),
        );
    } else {
        eprintln!(
            "delta phase: the receiver holds the blob, the sender also a copy whose first {} bytes differ",
            DELTA_CHANGE.len()
        );
        p2p.start_delta().context("setting up the delta phase")?;
        let mut delta = vec![Contender::new(Kind::Delta)];
        run_rounds(&mut p2p, &mut delta, args.common.runs)?;
        p2p.stop_delta().context("ending the delta phase")?;
        contenders.extend(delta);
    }

    let mut cap_used = None;
    if args.no_multi_source {
        report.notes.push(
            "--no-multi-source: the multi-source phase did not run, multi_source_speedup was \
             not measured (null)"
                .to_owned(),
        );
    } else {
        let fetch = contenders
            .iter()
            .find(|c| c.kind == Kind::Fetch && c.failed.is_none())
            .and_then(|c| Stats::of(&c.seconds));
        match fetch.and_then(|s| multi_source_cap(p2p.input.size, s.median)) {
            Some(cap) => {
                eprintln!(
                    "multi-source phase: three sources, each capped at {cap} bytes/s \
                     (a third of the uncapped fetch's rate)"
                );
                p2p.start_capped_sources(cap)
                    .context("setting up the multi-source phase")?;
                let mut multi = vec![Contender::new(Kind::MultiSource)];
                run_rounds(&mut p2p, &mut multi, args.common.runs)?;
                contenders.extend(multi);
                cap_used = Some(cap);
            }
            None => report.notes.push(format!(
                "{} has no counted run, so there is no uncapped rate to cap the sources at: \
                 the multi-source phase did not run, multi_source_speedup is null",
                Kind::Fetch.name()
            )),
        }
    }
    report.param("multi_source_cap_bytes_per_s", cap_used);

    let load_end = harness::load_average();
    report.param("load_average_end", &load_end);
    summarize(&mut report, &p2p, &contenders, cap_used);
    report.notes.push(format!(
        "load average (1, 5, 15 min) at start {}, at end {}",
        load_start.as_deref().unwrap_or("unknown"),
        load_end.as_deref().unwrap_or("unknown")
    ));
    drop(p2p);
    report.emit(args.common.json)
}

/// One warm-up round, then `runs` counted rounds, alternating the
/// contenders within each round. A failing baseline is marked failed and
/// skipped from then on; a failure of ours ends the bench.
fn run_rounds(p2p: &mut P2p, contenders: &mut [Contender], runs: u32) -> Result<()> {
    // Round 0 is the warm-up; its times are not counted.
    for round in 0..=runs {
        let label = if round == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {round}/{runs}")
        };
        for contender in contenders.iter_mut() {
            if contender.failed.is_some() {
                continue;
            }
            let kind = contender.kind;
            let sample = match p2p.run_once(kind, round == 0) {
                Ok(sample) => sample,
                Err(e) if kind.is_ours() => {
                    return Err(e.context(format!("{} ({label})", kind.name())));
                }
                Err(e) => {
                    // A baseline that breaks measured nothing; ours still counts.
                    eprintln!("{label:>9}  {:<28} FAILED: {e:#}", kind.name());
                    contender.failed = Some(format!("{e:#}"));
                    contender.seconds.clear();
                    continue;
                }
            };
            eprintln!(
                "{label:>9}  {:<28} {:8.3} s{}{}",
                kind.name(),
                sample.seconds,
                sample
                    .receiver_cpu_seconds
                    .zip(sample.system_cpu_seconds)
                    .map_or_else(String::new, |(r, m)| format!(
                        "  CPU s receiver {r:.2} machine {m:.2}"
                    )),
                sample
                    .peak_rss_anon_bytes
                    .map_or_else(String::new, |b| format!(
                        "  receiver RssAnon {:.1} MiB",
                        mib(b)
                    ))
            );
            if let Some(rss) = sample.peak_rss_anon_bytes {
                contender.peak_rss_anon_bytes =
                    Some(contender.peak_rss_anon_bytes.map_or(rss, |p| p.max(rss)));
            }
            if round > 0 {
                contender.seconds.push(sample.seconds);
                contender.daemon_seconds.extend(sample.daemon_seconds);
                contender
                    .receiver_cpu_seconds
                    .extend(sample.receiver_cpu_seconds);
                contender
                    .system_cpu_seconds
                    .extend(sample.system_cpu_seconds);
            }
        }
    }
    Ok(())
}

/// The upload cap of each of the [`MULTI_SOURCES`] sources: a third of the
/// uncapped rate (`size` bytes in `seconds`), in whole bytes per second
/// (rounded down, at least 1); `None` without a positive, finite time.
fn multi_source_cap(size: u64, seconds: f64) -> Option<u64> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return None;
    }
    // `as` saturates: a huge rate stays a huge cap.
    let cap = (size as f64 / seconds / MULTI_SOURCES as f64).floor() as u64;
    Some(cap.max(1))
}

/// An explicit path (must be executable), else `name` on PATH, else
/// `fallback`; `None` when there is none.
fn locate_tool(
    explicit: Option<&Path>,
    name: &str,
    fallback: Option<&Path>,
    option: &str,
) -> Result<Option<PathBuf>> {
    if let Some(path) = explicit {
        return match harness::executable_at(path) {
            Some(p) => Ok(Some(p)),
            None => bail!(
                "{name} binary {} (from {option}) is not an executable file",
                path.display()
            ),
        };
    }
    Ok(harness::find_on_path(name).or_else(|| fallback.and_then(harness::executable_at)))
}

/// Creates both state directories and host keys, writes configs in which
/// each admits the other, adds the input to the sender's store (before its
/// daemon owns the store), and starts both daemons.
fn start_envoys(
    envoy: &Path,
    work: &Path,
    input: &InputFile,
) -> Result<(EnvoyDaemon, EnvoyDaemon, String)> {
    let sender = StateDir::create(envoy, &work.join("sender"))?;
    let receiver = StateDir::create(envoy, &work.join("receiver"))?;
    sender.write_config(std::slice::from_ref(&receiver.key), None)?;
    receiver.write_config(std::slice::from_ref(&sender.key), None)?;
    let blob_id = add_to_store(envoy, &sender.dir.join("store"), input)?;

    let sender_daemon = EnvoyDaemon::start(envoy, "sender", &sender.config, &sender.dir)?;
    let receiver_daemon = EnvoyDaemon::start(envoy, "receiver", &receiver.config, &receiver.dir)?;
    ensure!(
        sender_daemon.status.host_key == sender.key
            && receiver_daemon.status.host_key == receiver.key,
        "the daemons report host keys {} and {}, but `envoy id` printed {} and {}",
        sender_daemon.status.host_key,
        receiver_daemon.status.host_key,
        sender.key,
        receiver.key
    );
    Ok((sender_daemon, receiver_daemon, blob_id))
}

/// A daemon's state directory, its config file, and its host key.
#[derive(Debug)]
struct StateDir {
    dir: PathBuf,
    config: PathBuf,
    key: String,
}

impl StateDir {
    /// Creates `dir` (it must not exist), a config admitting nobody, and
    /// the host key (`envoy id`).
    fn create(envoy: &Path, dir: &Path) -> Result<StateDir> {
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut state = StateDir {
            dir: dir.to_owned(),
            config: dir.join("envoy.yaml"),
            key: String::new(),
        };
        state.write_config(&[], None)?;
        state.key = host_key(envoy, &state.config)?;
        Ok(state)
    }

    /// (Re)writes the config: the keys it admits and its upload cap.
    fn write_config(&self, allow: &[String], upload_bytes_per_s: Option<u64>) -> Result<()> {
        write_config(&self.config, &self.dir, allow, upload_bytes_per_s)
    }
}

fn write_config(
    config: &Path,
    state_dir: &Path,
    allow: &[String],
    upload_bytes_per_s: Option<u64>,
) -> Result<()> {
    std::fs::write(config, render_config(state_dir, allow, upload_bytes_per_s))
        .with_context(|| format!("cannot write {}", config.display()))
}

/// `envoy --store <store> --json store add <input>`, straight into a store
/// no daemon owns yet; checks what it reports against the input and
/// returns the blob id.
fn add_to_store(envoy: &Path, store: &Path, input: &InputFile) -> Result<String> {
    let out = harness::run_timed(
        Command::new(envoy)
            // Straight into the store, never through a daemon named by the environment.
            .env_remove("VIGO_CONFIG")
            .arg("--store")
            .arg(store)
            .args(["--json", "store", "add"])
            .arg(&input.path),
        false,
        harness::run_deadline(input.size),
    )?;
    let add: AddOutput = serde_json::from_str(out.stdout.trim()).with_context(|| {
        format!(
            "envoy --json store add printed {:?}, not a JSON object with id, content_blake3, size",
            out.stdout
        )
    })?;
    ensure!(
        add.content_blake3 == input.content_blake3 && add.size == input.size,
        "CORRECTNESS BUG: envoy store add reported {} bytes hashing to {}, the input has {} bytes hashing to {}",
        add.size,
        add.content_blake3,
        input.size,
        input.content_blake3
    );
    Ok(add.id)
}

/// An envoy config: its own state directory, an ephemeral loopback port,
/// the host keys it admits, and optionally a cap on what it uploads to all
/// peers together (`rate.upload_bytes_per_s`). Strings are written as JSON
/// strings, which YAML reads as the same strings whatever they contain.
fn render_config(state_dir: &Path, allow: &[String], upload_bytes_per_s: Option<u64>) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string always encodes");
    let allow: Vec<String> = allow.iter().map(|k| quote(k)).collect();
    let mut text = format!(
        "state_dir: {}\nlisten: \"127.0.0.1:0\"\npeers:\n  allow: [{}]\n",
        quote(&state_dir.to_string_lossy()),
        allow.join(", ")
    );
    if let Some(rate) = upload_bytes_per_s {
        text.push_str(&format!("rate:\n  upload_bytes_per_s: {rate}\n"));
    }
    text
}

/// `envoy --config F id`: the host key, created on first use.
fn host_key(envoy: &Path, config: &Path) -> Result<String> {
    let out = harness::run_timed(
        Command::new(envoy).arg("--config").arg(config).arg("id"),
        false,
        COMMAND_DEADLINE,
    )?;
    parse_host_key(&out.stdout).with_context(|| {
        format!(
            "envoy --config {} id printed {:?}, not a key ed25519:<hex>",
            config.display(),
            out.stdout
        )
    })
}

fn parse_host_key(stdout: &str) -> Option<String> {
    let key = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    let hex = key.strip_prefix("ed25519:")?;
    (!hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| key.to_owned())
}

/// Finds the `{"daemon": {...}}` line of `envoy --json status`; the
/// platform line before it gives the backend when the daemon line lacks it.
fn parse_status(stdout: &str) -> Result<Option<DaemonStatus>> {
    let mut platform_backend = None;
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("envoy --json status printed a non-JSON line {line:?}"))?;
        let Some(daemon) = value.get("daemon") else {
            if let Some(b) = value.get("io_backend").and_then(|b| b.as_str()) {
                platform_backend = Some(b.to_owned());
            }
            continue;
        };
        let field = |name: &str| {
            daemon
                .get(name)
                .with_context(|| format!("the daemon line of envoy status has no {name:?}: {line}"))
        };
        let pid = field("pid")?
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .with_context(|| format!("daemon pid is not a process id: {line}"))?;
        let text = |name: &str| -> Result<String> {
            field(name)?
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("daemon {name:?} is not a string: {line}"))
        };
        return Ok(Some(DaemonStatus {
            pid,
            listen: text("listen")?,
            host_key: text("host_key")?,
            io_backend: daemon
                .get("io_backend")
                .and_then(|b| b.as_str())
                .map(str::to_owned)
                .or(platform_backend),
        }));
    }
    Ok(None)
}

/// A running `envoy run`, stopped with SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
struct EnvoyDaemon {
    role: &'static str,
    child: Child,
    config: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    status: DaemonStatus,
}

impl EnvoyDaemon {
    fn start(envoy: &Path, role: &'static str, config: &Path, state_dir: &Path) -> Result<Self> {
        let log = state_dir.with_extension("log");
        // Appended to: a restarted daemon keeps its earlier log.
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = Command::new(envoy)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("VIGO_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} --config {} run",
                    envoy.display(),
                    config.display()
                )
            })?;
        let mut daemon = EnvoyDaemon {
            role,
            child,
            config: config.to_owned(),
            state_dir: state_dir.to_owned(),
            log,
            status: DaemonStatus {
                pid: 0,
                listen: String::new(),
                host_key: String::new(),
                io_backend: None,
            },
        };
        daemon.status = daemon.wait_ready(envoy)?;
        Ok(daemon)
    }

    /// Polls `envoy --json status` until it shows this daemon running.
    fn wait_ready(&mut self, envoy: &Path) -> Result<DaemonStatus> {
        let started = Instant::now();
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the {} envoy exited ({status}) before it was ready{}",
                    self.role,
                    self.log_tail()
                );
            }
            match Command::new(envoy)
                .arg("--config")
                .arg(&self.config)
                .args(["--json", "status"])
                .stdin(Stdio::null())
                .output()
            {
                Ok(out) if out.status.success() => {
                    match parse_status(&String::from_utf8_lossy(&out.stdout)) {
                        Ok(Some(status)) => {
                            ensure!(
                                status.pid == self.child.id(),
                                "envoy status reports a daemon with PID {}, but the {} daemon we started is PID {} \
                                 (another daemon on {}?)",
                                status.pid,
                                self.role,
                                self.child.id(),
                                self.state_dir.display()
                            );
                            return Ok(status);
                        }
                        Ok(None) => last = "status shows no daemon line yet".to_owned(),
                        Err(e) => last = format!("{e:#}"),
                    }
                }
                Ok(out) => {
                    last = format!(
                        "status failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Err(e) => last = format!("cannot run envoy status: {e}"),
            }
            if started.elapsed() > DAEMON_READY_TIMEOUT {
                bail!(
                    "the {} envoy was not ready after {} s ({last}){}",
                    self.role,
                    DAEMON_READY_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn io_backend(&self) -> &str {
        self.status.io_backend.as_deref().unwrap_or("unknown")
    }

    fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    fn command(&self, envoy: &Path) -> Command {
        let mut command = Command::new(envoy);
        command.arg("--config").arg(&self.config);
        command
    }

    /// The end of the daemon's log, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            return format!("; the {} log is empty", self.role);
        }
        let start = text.len().saturating_sub(LOG_QUOTE_BYTES_MAX);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        format!("; end of the {} log:\n{}", self.role, &text[start..])
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) and restarts it from its
    /// config file, which may have changed; its host key must not.
    fn restart(&mut self, envoy: &Path) -> Result<()> {
        // The store lock is exclusive: the old process goes first.
        stop_child(&mut self.child, Signal::SIGTERM, self.role);
        let fresh = EnvoyDaemon::start(envoy, self.role, &self.config, &self.state_dir)
            .with_context(|| format!("restarting the {} envoy", self.role))?;
        ensure!(
            fresh.status.host_key == self.status.host_key,
            "the restarted {} envoy reports host key {}, it had {}",
            self.role,
            fresh.status.host_key,
            self.status.host_key
        );
        // The old value's Drop finds its process already reaped.
        *self = fresh;
        Ok(())
    }

    /// Fails with the log when the daemon has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the {} envoy exited ({status}){}",
                self.role,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for EnvoyDaemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::SIGTERM, self.role);
    }
}

/// Sends `signal`, waits [`DAEMON_STOP_TIMEOUT`], then SIGKILLs; always
/// reaps. Only this child is signalled.
fn stop_child(child: &mut Child, signal: Signal, what: &str) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // Not reaped yet (try_wait said so), so the PID is still ours.
        let _ = signal::kill(Pid::from_raw(pid), signal);
    }
    let started = Instant::now();
    while started.elapsed() < DAEMON_STOP_TIMEOUT {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    eprintln!(
        "vigo-perf: {what} did not exit {} s after {signal}; killing it",
        DAEMON_STOP_TIMEOUT.as_secs()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `sendme send` of the input, stopped with SIGINT when dropped.
#[derive(Debug)]
struct SendmeSender {
    child: Child,
    ticket: String,
    /// Its working directory, where it keeps its blob store (`.sendme-send-*`).
    dir: PathBuf,
}

impl SendmeSender {
    fn start(program: &Path, dir: &Path, input: &InputFile) -> Result<SendmeSender> {
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = dir.with_extension("log");
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(program)
            .current_dir(dir)
            .args(["send"])
            .args(SENDME_LOOPBACK_ARGS)
            .arg(&input.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {} send", program.display()))?;
        let stdout = child.stdout.take().context("sendme stdout was not piped")?;
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        // Drains stdout for the sender's whole life; ends at its exit.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so it never blocks.
                    continue;
                }
            }
        });
        let mut sender = SendmeSender {
            child,
            ticket: String::new(),
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        let mut printed = Vec::new();
        loop {
            match lines_rx.recv_timeout(POLL_INTERVAL) {
                Ok(line) => {
                    if let Some(ticket) = parse_sendme_ticket(&line) {
                        sender.ticket = ticket;
                        eprintln!(
                            "sendme send imported the input in {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                        return Ok(sender);
                    }
                    printed.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = sender.child.wait()?;
                    bail!(
                        "sendme send exited ({status}) without printing a ticket; stdout {:?}; stderr {:?}",
                        printed.join("\n"),
                        tail(&std::fs::read_to_string(&log).unwrap_or_default())
                    );
                }
            }
            if started.elapsed() > SENDME_TICKET_TIMEOUT {
                bail!(
                    "sendme send printed no ticket within {} s; stdout {:?}; stderr {:?}",
                    SENDME_TICKET_TIMEOUT.as_secs(),
                    printed.join("\n"),
                    tail(&std::fs::read_to_string(&log).unwrap_or_default())
                );
            }
        }
    }
}

impl Drop for SendmeSender {
    fn drop(&mut self) {
        // sendme removes its store on Ctrl-C.
        stop_child(&mut self.child, Signal::SIGINT, "sendme send");
    }
}

fn tail(text: &str) -> &str {
    let text = text.trim();
    let start = text.len().saturating_sub(LOG_QUOTE_BYTES_MAX);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// The ticket of `sendme send`'s `sendme receive <ticket>` line.
fn parse_sendme_ticket(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("sendme receive ")?;
    let ticket = rest.trim();
    let valid = ticket.starts_with("blob")
        && ticket.len() > "blob".len()
        && ticket.chars().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| ticket.to_owned())
}

/// Bytes and seconds of one iperf3 test, from `iperf3 -c … -J`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Iperf3Result {
    bytes: u64,
    seconds: f64,
}

/// Reads the receiver's side (`end.sum_received`) of `iperf3 -J` output:
/// the bytes that arrived and the time they took.
fn parse_iperf3(json: &str) -> Result<Iperf3Result> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("iperf3 -J did not print one JSON object")?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 reported an error: {error}");
    }
    let sum = value
        .pointer("/end/sum_received")
        .context("iperf3 JSON has no end.sum_received")?;
    let bytes = sum
        .get("bytes")
        .and_then(serde_json::Value::as_u64)
        .context("iperf3 end.sum_received has no integer bytes")?;
    let seconds = sum
        .get("seconds")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 end.sum_received has no seconds")?;
    ensure!(
        bytes > 0 && seconds > 0.0,
        "iperf3 received {bytes} bytes in {seconds} s: nothing was measured"
    );
    Ok(Iperf3Result { bytes, seconds })
}

/// Whether `/proc/net/tcp` or `/proc/net/tcp6` text shows a socket in
/// LISTEN state (`0A`) on `port`, on any address.
fn proc_net_tcp_listens(table: &str, port: u16) -> bool {
    let port_hex = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_slot), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        state == "0A" && local.rsplit_once(':').is_some_and(|(_, p)| p == port_hex)
    })
}

fn port_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path).is_ok_and(|table| proc_net_tcp_listens(&table, port))
    })
}

impl P2p {
    fn run_once(&mut self, kind: Kind, warm_up: bool) -> Result<Sample> {
        // Anything a previous contender left dirty is flushed untimed, so a
        // contender's own sync pays only for its own writes.
        sync()?;
        let first_sender = [self.sender.status.listen.clone()];
        match kind {
            Kind::Iperf3 => self.iperf3_once(),
            Kind::Fetch => self.fetch_once(&first_sender, None, warm_up, false),
            Kind::FetchOut => {
                let out = self.work.path().join("fetched.bin");
                self.fetch_once(&first_sender, Some(&out), warm_up, false)
            }
            Kind::Sendme => self.sendme_once(warm_up),
            Kind::CpSync | Kind::DdDirect => {
                // A durable local copy beside the receiver's store.
                let (copy, name): (harness::DurableCopy, _) = match kind {
                    Kind::CpSync => (harness::cp_sync, "cp-copy.bin"),
                    _ => (harness::dd_direct, "dd-copy.bin"),
                };
                Ok(Sample {
                    seconds: copy(
                        &self.input.path,
                        &self.receiver.state_dir.join(name),
                        harness::run_deadline(self.input.size),
                    )?,
                    ..Sample::default()
                })
            }
            Kind::MultiSource => {
                ensure!(
                    !self.extra_sources.is_empty(),
                    "the multi-source phase has no extra sources running"
                );
                let all: Vec<String> = self.sources().map(|s| s.status.listen.clone()).collect();
                self.fetch_once(&all, None, warm_up, false)
            }
            Kind::Delta => self.fetch_once(&first_sender, None, warm_up, true),
        }
    }

    /// Sets up the delta phase: the receiver fetches the blob and keeps it
    /// (untimed), and the sender adds a copy of the input whose first bytes
    /// are [`DELTA_CHANGE`] (through its daemon; the copy is removed once
    /// added, so the disk holds no more copies than [`DISK_COPIES_MAX`]).
    fn start_delta(&mut self) -> Result<()> {
        let size = self.input.size;
        let fetched = harness::run_timed(
            self.receiver
                .command(&self.envoy)
                .args(["--json", "fetch", &self.blob_id, "--from"])
                .arg(&self.sender.status.listen),
            false,
            harness::run_deadline(size),
        )
        .context("the receiver fetching the blob it is to hold")?;
        let fetched = parse_fetch_output(&fetched.stdout)?;
        ensure!(
            fetched.id == self.blob_id && fetched.size == size,
            "CORRECTNESS BUG: envoy fetch reported blob {} of {} bytes, we asked for {} of {size}",
            fetched.id,
            fetched.size,
            self.blob_id
        );
        let copy = self.work.path().join("input-delta.bin");
        std::fs::copy(&self.input.path, &copy)
            .with_context(|| format!("cannot copy the input to {}", copy.display()))?;
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&copy)?,
            &DELTA_CHANGE[..DELTA_CHANGE.len().min(size as usize)],
            0,
        )
        .with_context(|| format!("cannot change {}", copy.display()))?;
        let added = harness::run_timed(
            self.sender
                .command(&self.envoy)
                .args(["--json", "store", "add"])
                .arg(&copy),
            false,
            harness::run_deadline(size),
        )
        .context("the sender adding the changed copy")?;
        let add: AddOutput = serde_json::from_str(added.stdout.trim())
            .with_context(|| format!("envoy --json store add printed {:?}", added.stdout))?;
        ensure!(
            add.size == size && add.id != self.blob_id,
            "CORRECTNESS BUG: the changed copy was added as {} of {} bytes (the blob is {} of {size})",
            add.id,
            add.size,
            self.blob_id
        );
        harness::remove_path(&copy)?;
        self.delta_blob = Some(add.id);
        Ok(())
    }

    /// Ends the delta phase: the changed copy leaves the sender, the blob
    /// the receiver (untimed), before the multi-source phase fills stores.
    fn stop_delta(&mut self) -> Result<()> {
        let Some(changed) = self.delta_blob.take() else {
            return Ok(());
        };
        for (daemon, id) in [(&self.sender, &changed), (&self.receiver, &self.blob_id)] {
            harness::run_timed(
                daemon.command(&self.envoy).args(["store", "rm", id]),
                false,
                COMMAND_DEADLINE,
            )
            .with_context(|| format!("removing {id} from the {}", daemon.role))?;
        }
        Ok(())
    }

    /// Every sending daemon: the first sender, then the extra sources.
    fn sources(&self) -> impl Iterator<Item = &EnvoyDaemon> {
        std::iter::once(&self.sender).chain(&self.extra_sources)
    }

    fn sources_mut(&mut self) -> impl Iterator<Item = &mut EnvoyDaemon> {
        std::iter::once(&mut self.sender).chain(self.extra_sources.iter_mut())
    }

    /// Sets up the multi-source phase: frees sendme's store, adds two
    /// sources holding the blob (set up as the first sender was), restarts
    /// the first sender, and starts the others, each capped at `cap` bytes
    /// per second of upload; restarts the receiver admitting all three.
    fn start_capped_sources(&mut self, cap: u64) -> Result<()> {
        // Its Drop stops it and sendme removes its store, before the extra
        // sources' stores fill (DISK_COPIES_MAX).
        self.sendme_sender = None;
        let receiver_key = self.receiver.status.host_key.clone();
        let mut extra = Vec::new();
        for (name, _) in EXTRA_SOURCES {
            let state = StateDir::create(&self.envoy, &self.work.path().join(name))?;
            state.write_config(std::slice::from_ref(&receiver_key), Some(cap))?;
            let id = add_to_store(&self.envoy, &state.dir.join("store"), &self.input)
                .with_context(|| format!("adding the input to {name}'s store"))?;
            ensure!(
                id == self.blob_id,
                "CORRECTNESS BUG: {name}'s store gives the input blob id {id}, the sender's gave {}",
                self.blob_id
            );
            extra.push(state);
        }

        write_config(
            &self.sender.config,
            &self.sender.state_dir,
            std::slice::from_ref(&receiver_key),
            Some(cap),
        )?;
        self.sender.restart(&self.envoy)?;
        for (state, (_, role)) in extra.iter().zip(EXTRA_SOURCES) {
            let daemon = EnvoyDaemon::start(&self.envoy, role, &state.config, &state.dir)?;
            ensure!(
                daemon.status.host_key == state.key,
                "the {role} envoy reports host key {}, but `envoy id` printed {}",
                daemon.status.host_key,
                state.key
            );
            self.extra_sources.push(daemon);
        }

        let keys: Vec<String> = self.sources().map(|s| s.status.host_key.clone()).collect();
        write_config(&self.receiver.config, &self.receiver.state_dir, &keys, None)?;
        self.receiver.restart(&self.envoy)?;
        let sources: Vec<String> = self
            .sources()
            .map(|s| format!("{} on {}", s.role, s.status.listen))
            .collect();
        eprintln!(
            "capped sources: {}; receiver on {}",
            sources.join(", "),
            self.receiver.status.listen
        );
        Ok(())
    }

    /// One `envoy fetch` of the blob from the sending daemons listening on
    /// `from`, into the receiver's store (and to `out_path`), checked, then
    /// removed from the receiver again.
    /// One timed `envoy fetch` of the blob, or with `delta` of the delta
    /// phase's changed copy (most of it then copied from the blob the
    /// receiver holds), removed from the receiver afterwards.
    fn fetch_once(
        &mut self,
        from: &[String],
        out_path: Option<&Path>,
        warm_up: bool,
        delta: bool,
    ) -> Result<Sample> {
        let blob_id = match delta {
            true => self
                .delta_blob
                .clone()
                .context("the delta phase has no changed copy")?,
            false => self.blob_id.clone(),
        };
        self.receiver.check_alive()?;
        let mut named = 0;
        for source in self.sources_mut() {
            if from.contains(&source.status.listen) {
                source.check_alive()?;
                // Sources serve from a warm page cache (untimed).
                harness::warm_dir(&source.store_dir().join("blobs"))?;
                named += 1;
            }
        }
        ensure!(
            named == from.len(),
            "fetch from {from:?}: only {named} of them are sending envoys of this bench"
        );
        if let Some(path) = out_path {
            harness::remove_path(path)?;
        }
        let mut command = self.receiver.command(&self.envoy);
        command
            .args(["--json", "fetch", &blob_id, "--from"])
            .arg(from.join(","));
        if let Some(path) = out_path {
            command.arg("--out").arg(path);
        }
        let receiver_cpu = || harness::process_cpu_seconds(self.receiver.pid());
        let cpu_before = (receiver_cpu(), harness::system_busy_cpu_seconds());
        let sampler = RssSampler::start(self.receiver.pid());
        let outcome =
            harness::run_timed(&mut command, false, harness::run_deadline(self.input.size));
        let peak = sampler.finish()?;
        let cpu_after = (receiver_cpu(), harness::system_busy_cpu_seconds());
        let used = |before: Option<f64>, after: Option<f64>| Some(after? - before?);
        let outcome = outcome.map_err(|e| {
            let mut tails = self.receiver.log_tail();
            for source in self.sources() {
                if from.contains(&source.status.listen) {
                    tails.push_str(&source.log_tail());
                }
            }
            e.context(tails)
        })?;
        let fetched = parse_fetch_output(&outcome.stdout)?;
        ensure!(
            fetched.id == blob_id,
            "envoy fetch reported blob {}, we asked for {blob_id}",
            fetched.id,
        );
        ensure!(
            fetched.size == self.input.size,
            "CORRECTNESS BUG: envoy fetch reported {} bytes, the blob has {}",
            fetched.size,
            self.input.size
        );
        let local = fetched.bytes_local.unwrap_or(0);
        ensure!(
            !delta
                || (!fetched.already_complete
                    && fetched.bytes_fetched + local == self.input.size
                    && fetched.bytes_fetched <= DELTA_FETCHED_MAX),
            "the delta fetch moved {} bytes and copied {local} locally (already_complete {}): \
             a copy differing in its first {} bytes should move at most {DELTA_FETCHED_MAX}",
            fetched.bytes_fetched,
            fetched.already_complete,
            DELTA_CHANGE.len()
        );
        ensure!(
            delta || (!fetched.already_complete && fetched.bytes_fetched >= self.input.size),
            "the receiver did not fetch the whole blob (already_complete {}, bytes_fetched {}, \
             bytes_local {:?}, bytes_resumed {:?}): `store rm` between runs left it or its chunks \
             behind, so the run measured no full transfer",
            fetched.already_complete,
            fetched.bytes_fetched,
            fetched.bytes_local,
            fetched.bytes_resumed
        );
        if let Some(path) = out_path {
            let len = std::fs::metadata(path)
                .with_context(|| format!("envoy fetch --out did not create {}", path.display()))?
                .len();
            ensure!(
                len == self.input.size,
                "CORRECTNESS BUG: envoy fetch --out wrote {len} bytes, the blob has {}",
                self.input.size
            );
            // Hashing 4 GiB costs about a second: check the bytes once.
            if warm_up {
                let written = harness::blake3_file(path)?;
                ensure!(
                    written == self.input.content_blake3,
                    "CORRECTNESS BUG: envoy fetch --out wrote content hashing to {written}, the input hashes to {}",
                    self.input.content_blake3
                );
            }
            harness::remove_path(path)?;
        }
        if warm_up && out_path.is_none() {
            eprintln!(
                "{:>9}  fetch reported {} chunks, {} bytes fetched in {} s (daemon's clock)",
                "",
                fetched
                    .chunks
                    .map_or_else(|| "?".to_owned(), |c| c.to_string()),
                fetched.bytes_fetched,
                harness::fmt_opt(fetched.seconds, 3)
            );
            if from.len() > 1 {
                for peer in &fetched.peers {
                    eprintln!(
                        "{:>9}  from {}: {} bytes{}",
                        "",
                        peer.addr,
                        peer.bytes,
                        peer.error
                            .as_deref()
                            .map_or_else(String::new, |e| format!(" (error: {e})"))
                    );
                }
            }
        }
        // Untimed: the next run must fetch every byte again.
        harness::run_timed(
            self.receiver
                .command(&self.envoy)
                .args(["store", "rm", &blob_id]),
            false,
            COMMAND_DEADLINE,
        )
        .context("removing the fetched blob from the receiver")?;
        Ok(Sample {
            seconds: outcome.seconds,
            peak_rss_anon_bytes: peak,
            daemon_seconds: fetched.seconds,
            receiver_cpu_seconds: used(cpu_before.0, cpu_after.0),
            system_cpu_seconds: used(cpu_before.1, cpu_after.1),
        })
    }

    fn iperf3_once(&mut self) -> Result<Sample> {
        let program = self.iperf3.clone().context("iperf3 is not installed")?;
        let mut attempt = 0;
        let (mut server, port) = loop {
            attempt += 1;
            let port = harness::free_loopback_port()?;
            let mut server = Command::new(&program)
                .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot start {} -s", program.display()))?;
            let started = Instant::now();
            let listening = loop {
                if port_listening(port) {
                    break true;
                }
                if !matches!(server.try_wait(), Ok(None))
                    || started.elapsed() > IPERF3_SERVER_TIMEOUT
                {
                    break false;
                }
                thread::sleep(Duration::from_millis(10));
            };
            if listening {
                break (server, port);
            }
            let _ = server.kill();
            let output = server.wait_with_output()?;
            if attempt >= IPERF3_START_ATTEMPTS_MAX {
                bail!(
                    "iperf3 -s did not listen on 127.0.0.1 after {attempt} tries: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        };
        let client = harness::run_timed(
            Command::new(&program).args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-n",
                &self.input.size.to_string(),
                "-J",
            ]),
            false,
            harness::run_deadline(self.input.size),
        );
        // The one-off server exits after its test; a stuck one is killed.
        let started = Instant::now();
        while matches!(server.try_wait(), Ok(None)) && started.elapsed() < IPERF3_SERVER_TIMEOUT {
            thread::sleep(POLL_INTERVAL);
        }
        let _ = server.kill();
        let _ = server.wait();
        let result = parse_iperf3(&client?.stdout)?;
        // iperf3's receiver side counts a little less than was sent (the
        // last buffers arrive after its final interval): a rate, not a total.
        ensure!(
            result.bytes as f64 >= self.input.size as f64 * IPERF3_RECEIVED_FRACTION_MIN,
            "iperf3 received {} bytes of the {} sent",
            result.bytes,
            self.input.size
        );
        // The time the asked-for size takes at the measured rate.
        Ok(Sample {
            seconds: self.input.size as f64 * result.seconds / result.bytes as f64,
            ..Sample::default()
        })
    }

    fn sendme_once(&mut self, warm_up: bool) -> Result<Sample> {
        let program = self.sendme.clone().context("sendme is not installed")?;
        let sender = self
            .sendme_sender
            .as_mut()
            .context("sendme send is not running")?;
        if let Some(status) = sender.child.try_wait()? {
            bail!("sendme send exited ({status})");
        }
        // Its store references the input file (and holds the outboard): warm both.
        harness::warm_file(&self.input.path)?;
        harness::warm_dir(&sender.dir)?;
        let dir = self.work.path().join("sendme-recv");
        harness::remove_path(&dir)?;
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let outcome = harness::run_timed(
            Command::new("sh")
                .current_dir(&dir)
                .args(["-c", r#""$0" receive "$@" && sync"#])
                .arg(&program)
                .args(SENDME_LOOPBACK_ARGS)
                .arg(&sender.ticket),
            false,
            harness::run_deadline(self.input.size),
        )?;
        let name = self
            .input
            .path
            .file_name()
            .context("the input has no file name")?;
        let received = dir.join(name);
        let len = std::fs::metadata(&received)
            .with_context(|| format!("sendme receive did not create {}", received.display()))?
            .len();
        ensure!(
            len == self.input.size,
            "sendme receive wrote {len} bytes, the input has {}",
            self.input.size
        );
        if warm_up {
            let written = harness::blake3_file(&received)?;
            ensure!(
                written == self.input.content_blake3,
                "sendme receive wrote content hashing to {written}, the input hashes to {}",
                self.input.content_blake3
            );
        }
        harness::remove_path(&dir)?;
        Ok(Sample {
            seconds: outcome.seconds,
            ..Sample::default()
        })
    }
}

/// The JSON line of `envoy --json fetch` (the last non-empty line, should
/// anything precede it).
fn parse_fetch_output(stdout: &str) -> Result<FetchOutput> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .context("envoy --json fetch printed nothing")?;
    serde_json::from_str(line).with_context(|| {
        format!(
            "envoy --json fetch printed {line:?}, not a JSON object with id, size, \
             already_complete, bytes_fetched"
        )
    })
}

fn sync() -> Result<()> {
    let status = Command::new("sync").status().context("cannot run sync")?;
    ensure!(status.success(), "sync failed ({status})");
    Ok(())
}

/// `multi_source_cap`: each source's upload cap in the multi-source phase,
/// `None` when it did not run.
fn summarize(
    report: &mut Report,
    p2p: &P2p,
    contenders: &[Contender],
    multi_source_cap: Option<u64>,
) {
    let size = p2p.input.size;
    let find = |kind| contenders.iter().find(|c| c.kind == kind);
    let median = |kind| {
        find(kind)
            .filter(|c| c.failed.is_none())
            .and_then(|c| Stats::of(&c.seconds).map(|s| s.median))
    };
    let both_backends = if p2p.sender.io_backend() == p2p.receiver.io_backend() {
        p2p.receiver.io_backend().to_owned()
    } else {
        format!(
            "sender {}, receiver {}",
            p2p.sender.io_backend(),
            p2p.receiver.io_backend()
        )
    };

    for kind in [
        Kind::Fetch,
        Kind::FetchOut,
        Kind::Iperf3,
        Kind::Sendme,
        Kind::CpSync,
        Kind::DdDirect,
        Kind::MultiSource,
        Kind::Delta,
    ] {
        let Some(c) = find(kind) else {
            report.results.push(ResultRow::new(kind.name(), &[]));
            continue;
        };
        let mut row = ResultRow::new(kind.name(), &c.seconds).with_bytes(size);
        if kind.is_ours() {
            row.io_backend = Some(both_backends.clone());
            row.peak_rss_anon_mib = c.peak_rss_anon_bytes.map(mib);
            row.extra.insert(
                "rss_of".to_owned(),
                "receiving envoy daemon".to_owned().into(),
            );
            if let Some(s) = Stats::of(&c.daemon_seconds) {
                row.extra
                    .insert("daemon_seconds_median".to_owned(), s.median.into());
            }
            for (name, values) in [
                ("receiver_cpu_s_median", &c.receiver_cpu_seconds),
                ("machine_cpu_s_median", &c.system_cpu_seconds),
            ] {
                if let Some(s) = Stats::of(values) {
                    row.extra.insert(name.to_owned(), s.median.into());
                }
            }
        }
        if kind == Kind::MultiSource {
            row.extra
                .insert("sources".to_owned(), (p2p.sources().count() as u64).into());
            row.extra.insert(
                "upload_cap_bytes_per_s_each".to_owned(),
                multi_source_cap.into(),
            );
        }
        if let Some(reason) = &c.failed {
            row.extra.insert("failed".to_owned(), reason.clone().into());
        }
        report.results.push(row);
    }

    for c in contenders {
        if let Some(reason) = &c.failed {
            let (figure, package) = match c.kind {
                Kind::Sendme => ("p2p_vs_sendme", SENDME_INSTALL),
                Kind::CpSync => ("p2p_vs_cp_sync", "coreutils"),
                Kind::DdDirect => ("p2p_vs_dd_direct", "coreutils"),
                _ => ("p2p_vs_iperf3", IPERF3_INSTALL),
            };
            report.notes.push(format!(
                "{} failed ({reason}); {figure} is null (baseline from `{package}`)",
                c.kind.name()
            ));
        }
    }

    let fetch = median(Kind::Fetch);
    let fetch_out = median(Kind::FetchOut);
    let gb_per_s = fetch.filter(|s| *s > 0.0).map(|s| size as f64 / s / GB);
    let vs_iperf3 = ratio(median(Kind::Iperf3), fetch);
    let vs_sendme = ratio(median(Kind::Sendme), fetch_out);
    let multi_source_speedup = ratio(fetch, median(Kind::MultiSource));
    let vs_cp_sync = ratio(median(Kind::CpSync), fetch);
    let out_vs_cp_sync = ratio(median(Kind::CpSync), fetch_out);
    let vs_dd_direct = ratio(median(Kind::DdDirect), fetch);
    let delta_vs_full = ratio(fetch, median(Kind::Delta));
    let fetch_cpu = |of: fn(&Contender) -> &Vec<f64>| {
        find(Kind::Fetch)
            .and_then(|c| Stats::of(of(c)))
            .map(|s| s.median / (size as f64 / GB))
    };
    let receiver_cpu_s_per_gb = fetch_cpu(|c| &c.receiver_cpu_seconds);
    let machine_cpu_s_per_gb = fetch_cpu(|c| &c.system_cpu_seconds);
    let dd_gb_per_s = median(Kind::DdDirect)
        .filter(|s| *s > 0.0)
        .map(|s| size as f64 / s / GB);
    let rss = [Kind::Fetch, Kind::FetchOut, Kind::MultiSource, Kind::Delta]
        .into_iter()
        .filter_map(|k| find(k).and_then(|c| c.peak_rss_anon_bytes))
        .max()
        .map(mib);
    if rss.is_none() {
        report.notes.push(
            "no RssAnon sample of the receiving daemon (its /proc entry was unreadable)".to_owned(),
        );
    }

    let mut ratios = BTreeMap::new();
    ratios.insert("p2p_gb_per_s".to_owned(), gb_per_s);
    ratios.insert("p2p_vs_iperf3".to_owned(), vs_iperf3);
    ratios.insert("p2p_vs_sendme".to_owned(), vs_sendme);
    ratios.insert("receiver_anon_rss_mib".to_owned(), rss);
    ratios.insert("multi_source_speedup".to_owned(), multi_source_speedup);
    ratios.insert("p2p_vs_cp_sync".to_owned(), vs_cp_sync);
    ratios.insert("p2p_out_vs_cp_sync".to_owned(), out_vs_cp_sync);
    ratios.insert("p2p_vs_dd_direct".to_owned(), vs_dd_direct);
    ratios.insert("disk_durable_gb_per_s".to_owned(), dd_gb_per_s);
    ratios.insert("delta_vs_full".to_owned(), delta_vs_full);
    ratios.insert("receiver_cpu_s_per_gb".to_owned(), receiver_cpu_s_per_gb);
    ratios.insert("machine_cpu_s_per_gb".to_owned(), machine_cpu_s_per_gb);
    report.ratios.extend(ratios);
    report.goals.insert(
        "p2p_gb_per_s".to_owned(),
        Goal::at_least(P2P_GB_PER_S_MIN, gb_per_s),
    );
    report.goals.insert(
        "p2p_vs_sendme".to_owned(),
        Goal::at_least(P2P_VS_SENDME_MIN, vs_sendme),
    );
    report.goals.insert(
        "receiver_anon_rss_mib".to_owned(),
        Goal::at_most(RECEIVER_ANON_RSS_MIB_MAX, rss),
    );
    report.goals.insert(
        "multi_source_speedup".to_owned(),
        Goal::at_least(MULTI_SOURCE_SPEEDUP_MIN, multi_source_speedup),
    );

    report.notes.push(
        "fsync: `envoy fetch` ends with the blob durable in the receiver's store (fdatasync at \
         each commit, every 256 MiB or 2 s, and at seal); `envoy fetch --out` also fsyncs the exported file before its \
         rename; sendme's time includes a `sync` after `sendme receive` exits (an untimed `sync` \
         precedes every run), so both sides of p2p_vs_sendme end with the file on disk"
            .to_owned(),
    );
    report.notes.push(
        "times are wall time of the client command (`envoy fetch`, `sh -c 'sendme receive … && \
         sync'`); iperf3's is its own transfer time (end.sum_received), without process start \
         or connection setup; p2p_vs_iperf3 = iperf3's time / `envoy fetch`'s"
            .to_owned(),
    );
    report.notes.push(
        "receiver_anon_rss_mib is the peak RssAnon of the receiving `envoy run` process, sampled \
         every 20 ms during every fetch (warm-up included, the three-source fetches too), not of \
         the fetch CLI"
            .to_owned(),
    );
    if let Some(cap) = multi_source_cap {
        report.notes.push(format!(
            "multi_source_speedup = the median time of the uncapped `envoy fetch` (one source) / \
             the median time of `envoy fetch --from A,B,C` (sealed, no --out) from three sources \
             each holding the blob in its own store, run after the other contenders (`sendme \
             send` stopped first) with one warm-up run; each source is capped by its own \
             daemon-wide upload token bucket (rate.upload_bytes_per_s) at {cap} bytes/s, one \
             third of this run's uncapped fetch rate (size / median time, rounded down), so the \
             three together could deliver what one uncapped source did: 1.0 is parity"
        ));
    }
    report.notes.push(
        "sendme runs with --relay disabled --magic-ipv4-addr 127.0.0.1:0 (loopback, no relay or \
         discovery servers) from one `sendme send` started before the rounds, as the sending \
         envoy is; its receive writes the data into its own store, then copies it out"
            .to_owned(),
    );
    report.notes.push(
        "p2p_vs_cp_sync = the time of `cp INPUT COPY && sync` (one durable local copy of the \
         blob on the receiver's disk, from a warm page cache, through the kernel's writeback) / \
         `envoy fetch`'s: near 1.0 the fetch is as fast as this machine makes one copy \
         durable, whatever the network could do; p2p_out_vs_cp_sync = cp+sync's time / `envoy \
         fetch --out`'s, which writes two copies (the store's and the exported file)"
            .to_owned(),
    );
    report.notes.push(
        "p2p_vs_dd_direct = the time of `fallocate -l SIZE COPY && dd if=INPUT of=COPY bs=4M \
         oflag=direct conv=notrunc,fdatasync` (the blob's bytes written durably beside the \
         receiver's store with direct IO into an allocated file, the way a fetch writes them, \
         then flushed) / `envoy fetch`'s; \
         disk_durable_gb_per_s = size / dd's time. Every byte of a sealed fetch reaches the disk \
         and is flushed, so p2p_gb_per_s cannot exceed what this disk does (near 1.0 the fetch \
         is disk-bound); on a VM whose virtual disk caches writes in the host, the flush is \
         where the cost shows"
            .to_owned(),
    );
    report.notes.push(
        "receiver_cpu_s_per_gb / machine_cpu_s_per_gb = the median CPU seconds of a sealed \
         `envoy fetch` (one source), per 10^9 bytes: of the receiving daemon (all its threads, \
         user + system, /proc/PID/stat) and of the whole machine (every CPU's busy time, steal excluded, \
         /proc/stat: sender, receiver, kernel); what a fetch costs when the disk, not the CPU, \
         sets its pace"
            .to_owned(),
    );
    if delta_vs_full.is_some() {
        report.notes.push(format!(
            "delta_vs_full = the median time of the uncapped `envoy fetch` (one source) / the \
             median time of `envoy fetch` (sealed) of a copy of the blob whose first {} bytes \
             differ, by a receiver that holds the blob (fetched before, untimed; written with \
             direct IO, so not in its page cache): the receiver copies every chunk but the first \
             from its own blob, checking each, and fetches the rest; run after the first \
             contenders with one warm-up run",
            DELTA_CHANGE.len()
        ));
    }
    report.notes.push(
        "io_backend is null for baselines (iperf3, sendme): they run no Vigo IO backend".to_owned(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from real `iperf3 3.12 -c 127.0.0.1 -n 1073741824 -J` output (here).
    const IPERF3_JSON: &str = r#"{
        "start": {"connected": [{"socket": 5, "local_host": "127.0.0.1", "local_port": 40000,
                  "remote_host": "127.0.0.1", "remote_port": 5201}],
                  "version": "iperf 3.12", "test_start": {"protocol": "TCP", "num_streams": 1,
                  "blksize": 131072, "bytes": 1073741824}},
        "intervals": [],
        "end": {
            "streams": [],
            "sum_sent": {"start": 0, "end": 0.273379, "seconds": 0.273379, "bytes": 1073741824,
                         "bits_per_second": 31421340307.777847, "retransmits": 0, "sender": true},
            "sum_received": {"start": 0, "end": 0.279267, "seconds": 0.279267, "bytes": 1070858240,
                             "bits_per_second": 30676255769.56819, "sender": true},
            "cpu_utilization_percent": {"host_total": 60.1}
        }
    }"#;

    #[test]
    fn iperf3_json_gives_received_bytes_and_seconds() {
        let r = parse_iperf3(IPERF3_JSON).unwrap();
        // The receiver's side, which counts a little less than was sent.
        assert_eq!(r.bytes, 1_070_858_240);
        assert!((r.seconds - 0.279267).abs() < 1e-9);
    }

    #[test]
    fn iperf3_errors_and_empty_runs_are_refused() {
        let err = parse_iperf3(r#"{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Connection refused"), "{err}");
        assert!(parse_iperf3(r#"{"end": {}}"#).is_err());
        assert!(
            parse_iperf3(r#"{"end": {"sum_received": {"bytes": 0, "seconds": 0.0}}}"#).is_err()
        );
        assert!(parse_iperf3("iperf3: error - unable to connect").is_err());
    }

    #[test]
    fn sendme_ticket_line() {
        // The shape `sendme send` 0.37 prints.
        let stdout = "imported file /var/tmp/x/input.bin, 256.00 MiB, hash 5f2a\n\
                      to get this data, use\n\
                      sendme receive blobadxkwa3aaaaaaqaaaaaaaf7dnkiwu3c2fsc5c7\n";
        let tickets: Vec<String> = stdout.lines().filter_map(parse_sendme_ticket).collect();
        assert_eq!(tickets, ["blobadxkwa3aaaaaaqaaaaaaaf7dnkiwu3c2fsc5c7"]);
        for not_a_ticket in [
            "to get this data, use",
            "sendme receive ",
            "sendme receive blob",
            "sendme receive blob abc",
            "sendme receive notaticket",
            "sendme receive blob$(rm -rf)",
        ] {
            assert_eq!(parse_sendme_ticket(not_a_ticket), None, "{not_a_ticket:?}");
        }
    }

    #[test]
    fn daemon_status_line_is_found() {
        let stdout = concat!(
            r#"{"kernel":"6.18.44","io_backend":"uring","ktls":false}"#,
            "\n",
            r#"{"daemon":{"pid":4242,"listen":"127.0.0.1:39123","host_key":"ed25519:ab01","store":"/x/store","connections":0}}"#,
            "\n"
        );
        let status = parse_status(stdout).unwrap().unwrap();
        assert_eq!(
            status,
            DaemonStatus {
                pid: 4242,
                listen: "127.0.0.1:39123".to_owned(),
                host_key: "ed25519:ab01".to_owned(),
                io_backend: Some("uring".to_owned()),
            }
        );
        let with_own = stdout.replace(r#""store""#, r#""io_backend":"portable","store""#);
        assert_eq!(
            parse_status(&with_own)
                .unwrap()
                .unwrap()
                .io_backend
                .as_deref(),
            Some("portable")
        );
        // No daemon yet: only the platform line.
        assert_eq!(parse_status(r#"{"io_backend":"uring"}"#).unwrap(), None);
        assert!(parse_status(r#"{"daemon":{"pid":"x"}}"#).is_err());
        assert!(parse_status("not json").is_err());
    }

    #[test]
    fn fetch_output_parses() {
        let line = r#"{"id":"v1-b3-00ff","size":268435456,"chunks":32768,"already_complete":false,"bytes_fetched":268435456,"chunks_fetched":32768,"bytes_local":0,"bytes_resumed":0,"seconds":0.41,"peers":[{"addr":"127.0.0.1:1"}]}"#;
        let out = parse_fetch_output(&format!("{line}\n")).unwrap();
        assert_eq!(out.id, "v1-b3-00ff");
        assert_eq!((out.size, out.bytes_fetched), (256 << 20, 256 << 20));
        assert!(!out.already_complete);
        assert_eq!(out.chunks, Some(32768));
        assert_eq!(out.seconds, Some(0.41));
        assert_eq!(out.peers.len(), 1);
        assert_eq!(
            (out.peers[0].addr.as_str(), out.peers[0].bytes),
            ("127.0.0.1:1", 0)
        );
        assert!(parse_fetch_output("").is_err());
        assert!(parse_fetch_output(r#"{"id":"x"}"#).is_err());
    }

    #[test]
    fn host_key_line() {
        assert_eq!(
            parse_host_key("ed25519:00ffAB\n").as_deref(),
            Some("ed25519:00ffAB")
        );
        assert_eq!(parse_host_key("ed25519:\n"), None);
        assert_eq!(parse_host_key("rsa:00\n"), None);
        assert_eq!(parse_host_key(""), None);
    }

    #[test]
    fn config_admits_the_peer_and_listens_on_loopback() {
        let text = render_config(
            Path::new("/var/tmp/a \"b\""),
            &["ed25519:ab".to_owned()],
            None,
        );
        assert_eq!(
            text,
            "state_dir: \"/var/tmp/a \\\"b\\\"\"\nlisten: \"127.0.0.1:0\"\npeers:\n  allow: [\"ed25519:ab\"]\n"
        );
        assert!(render_config(Path::new("/x"), &[], None).contains("allow: []"));
    }

    #[test]
    fn config_with_an_upload_cap() {
        let keys = ["ed25519:ab".to_owned(), "ed25519:cd".to_owned()];
        let text = render_config(Path::new("/x"), &keys, Some(447_392_426));
        assert_eq!(
            text,
            "state_dir: \"/x\"\nlisten: \"127.0.0.1:0\"\npeers:\n  allow: [\"ed25519:ab\", \
             \"ed25519:cd\"]\nrate:\n  upload_bytes_per_s: 447392426\n"
        );
    }

    #[test]
    fn multi_source_cap_is_a_third_of_the_rate_rounded_down() {
        // 256 MiB in 0.2 s: 1342177280 B/s, a third is 447392426.67.
        assert_eq!(multi_source_cap(256 << 20, 0.2), Some(447_392_426));
        assert_eq!(multi_source_cap(300, 1.0), Some(100));
        assert_eq!(multi_source_cap(299, 1.0), Some(99));
        // Never 0 (a rate the daemon refuses).
        assert_eq!(multi_source_cap(2, 1.0), Some(1));
        assert_eq!(multi_source_cap(0, 1.0), Some(1));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(multi_source_cap(1 << 20, bad), None, "{bad}");
        }
    }

    #[test]
    fn listening_sockets_are_found_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
           1: 0100007F:9C40 0100007F:1451 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(proc_net_tcp_listens(table, 0x1451));
        // Established, not listening.
        assert!(!proc_net_tcp_listens(table, 0x9C40));
        assert!(!proc_net_tcp_listens(table, 80));
        let table6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A 0 0 0\n";
        assert!(proc_net_tcp_listens(table6, 0x1451));
    }

    #[test]
    fn a_real_listener_is_seen() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(port_listening(port));
        drop(listener);
        assert!(!port_listening(port));
    }
}
