//! What every bench shares: running a command under a stopwatch while a
//! thread samples its anonymous memory, medians over alternated runs, the
//! machine description, the JSON report and its human table, binary size
//! arguments, and finding the binaries we measure.
//!
//! The rules these follow are in BENCHMARKS.md: every figure is a ratio
//! against a baseline measured in the same run, both warm, median of the
//! counted runs after one warm-up; memory is the peak of `RssAnon` (mapped
//! file pages are the page cache's, not the program's).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde::Serialize;

/// How often the sampler reads `/proc/PID/status`. BENCHMARKS.md asks for at
/// least 10 Hz; 50 Hz catches shorter peaks and costs about 0.1 % of a core.
pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
const _: () = assert!(RSS_SAMPLE_INTERVAL.as_millis() <= 100);

/// Most counted runs a bench accepts; more only means waiting longer.
pub const RUNS_MAX: u32 = 1000;
/// Counted runs unless `--runs` says otherwise (BENCHMARKS.md: at least 5).
pub const RUNS_DEFAULT: u32 = 5;
/// Shortest deadline for one timed run, whatever its size.
const RUN_DEADLINE_MIN: Duration = Duration::from_secs(120);
/// Slowest rate at which a run still counts as alive (10 MB/s).
const RUN_RATE_BYTES_PER_S_MIN: u64 = 10_000_000;
/// Bytes of a child's stderr quoted in an error, from its end.
const STDERR_QUOTE_BYTES_MAX: usize = 2000;

const MIB: f64 = (1u64 << 20) as f64;
const GB: f64 = 1e9;

/// Options every bench takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Counted runs per contender, after one warm-up run each.
    #[arg(long, default_value_t = RUNS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(RUNS_MAX)))]
    pub runs: u32,
    /// Print exactly one JSON object on stdout (the table still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

// ---------------------------------------------------------------- sizes

/// Parses a binary size: `4G` = 4 GiB, `512M`, `8K`, `1T`, or plain bytes.
/// An optional `iB`/`B` after the unit is accepted (`4GiB`, `4GB` — both
/// binary, as BENCHMARKS.md says every size on the command line is).
pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        bail!("size {text:?} does not start with a number (examples: 4G, 512M, 8K, 1048576)");
    }
    let unit_upper = unit.to_ascii_uppercase();
    let unit_letter = unit_upper
        .strip_suffix("IB")
        .or_else(|| unit_upper.strip_suffix('B'))
        .unwrap_or(&unit_upper);
    let shift = match unit_letter {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("size {text:?} has an unknown unit {unit:?} (use K, M, G or T; binary)"),
    };
    let number: u64 = digits
        .parse()
        .with_context(|| format!("size {text:?} is too large"))?;
    number
        .checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} does not fit in 64 bits"))
}

/// `clap` adapter for [`parse_size`].
pub fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// The shortest label [`parse_size`] reads back as `bytes`: `4G`, `8K`,
/// `1536M`, or plain bytes. Used in figure names (`..._mib_1G`).
pub fn size_label(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

// ---------------------------------------------------------------- statistics

/// Median, min and max of a contender's counted runs, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no samples. The median of an even count is the mean of the
    /// two middle samples.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

/// `baseline / ours` where both exist: a "bigger is better" ratio.
pub fn ratio(baseline: Option<f64>, ours: Option<f64>) -> Option<f64> {
    match (baseline, ours) {
        (Some(b), Some(o)) if o > 0.0 => Some(b / o),
        _ => None,
    }
}

// ---------------------------------------------------------------- running

/// One finished run of a command.
#[derive(Debug)]
pub struct RunOutcome {
    pub seconds: f64,
    /// Peak `RssAnon` seen; `None` when not sampled or the process ended
    /// before the first sample.
    pub peak_rss_anon_bytes: Option<u64>,
    pub stdout: String,
}

/// Runs `command` to completion, timing it from spawn to exit; with
/// `sample_rss`, a thread reads the child's `RssAnon` every
/// [`RSS_SAMPLE_INTERVAL`]. Fails with the child's stderr when it exits
/// non-zero, since a failed contender has measured nothing, and kills it
/// (SIGKILL, this child only) when it runs past `deadline`, so a hung
/// contender stops the bench with a reason instead of stalling it.
///
/// Only the direct child is sampled: contenders whose memory matters are
/// spawned directly, never through a shell. The child is reaped only after
/// the sampler and the watchdog have stopped, so neither can ever touch a
/// recycled PID.
pub fn run_timed(
    command: &mut Command,
    sample_rss: bool,
    deadline: Duration,
) -> Result<RunOutcome> {
    let shown = display_command(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let pid = child.id();
    let raw_pid = Pid::from_raw(i32::try_from(pid).context("child PID out of range")?);

    // Pipes are drained by their own threads so a chatty child never blocks
    // on a full pipe while we wait for it.
    let stdout_pipe = child.stdout.take().context("child stdout was not piped")?;
    let stderr_pipe = child.stderr.take().context("child stderr was not piped")?;
    let stdout_reader = thread::spawn(move || read_all(stdout_pipe));
    let stderr_reader = thread::spawn(move || read_all(stderr_pipe));

    let (stop_sampler, sampler_stopped) = mpsc::channel::<()>();
    let sampler = sample_rss.then(|| {
        thread::spawn(move || {
            let mut peak: Option<u64> = None;
            loop {
                if let Some(now) = rss_anon_bytes(pid) {
                    peak = Some(peak.map_or(now, |p| p.max(now)));
                }
                match sampler_stopped.recv_timeout(RSS_SAMPLE_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break peak,
                }
            }
        })
    });
    let (stop_watchdog, watchdog_stopped) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || match watchdog_stopped.recv_timeout(deadline) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // The child is not reaped yet (see below), so the PID is still ours.
            let _ = signal::kill(raw_pid, Signal::SIGKILL);
            true
        }
        _ => false,
    });

    // Wait for the exit without reaping: the PID stays a zombie, owned by
    // us, until the threads that use it have stopped.
    let exited = loop {
        match waitid(
            Id::Pid(raw_pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    drop(stop_sampler);
    drop(stop_watchdog);
    let killed = watchdog
        .join()
        .map_err(|_| anyhow::anyhow!("watchdog thread panicked"))?;
    let peak_rss_anon_bytes = match sampler {
        Some(handle) => handle
            .join()
            .map_err(|_| anyhow::anyhow!("RSS sampler thread panicked"))?,
        None => None,
    };
    exited.with_context(|| format!("cannot wait for {shown}"))?;
    let status = child
        .wait()
        .with_context(|| format!("cannot reap {shown}"))?;
    let stdout = join_reader(stdout_reader)?;
    let stderr = join_reader(stderr_reader)?;
    if killed {
        bail!(
            "{shown} ran past its deadline of {} s and was killed{}",
            deadline.as_secs(),
            quote_stderr(&String::from_utf8_lossy(&stderr))
        );
    }
    if !status.success() {
        bail!(
            "{shown} failed ({status}){}",
            quote_stderr(&String::from_utf8_lossy(&stderr))
        );
    }
    Ok(RunOutcome {
        seconds,
        peak_rss_anon_bytes,
        stdout: String::from_utf8(stdout).with_context(|| format!("{shown} printed non-UTF-8"))?,
    })
}

/// How long one run over `bytes` may take before it counts as hung: far
/// beyond any plausible run (this machine copies and syncs 4 GiB in ~3 s),
/// yet bounded so a stuck contender ends the bench with a reason.
pub fn run_deadline(bytes: u64) -> Duration {
    let at_slowest_rate = bytes / RUN_RATE_BYTES_PER_S_MIN;
    RUN_DEADLINE_MIN.max(Duration::from_secs(at_slowest_rate))
}

fn read_all(mut pipe: impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    pipe.read_to_end(&mut buf)?;
    Ok(buf)
}

fn join_reader(handle: thread::JoinHandle<std::io::Result<Vec<u8>>>) -> Result<Vec<u8>> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("pipe reader thread panicked"))?
        .context("cannot read a child's output")
}

fn quote_stderr(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        return " with no message on stderr".to_owned();
    }
    let start = stderr.len().saturating_sub(STDERR_QUOTE_BYTES_MAX);
    let start = (start..stderr.len())
        .find(|&i| stderr.is_char_boundary(i))
        .unwrap_or(stderr.len());
    format!(": {}", &stderr[start..])
}

/// A command line as a person would type it, for messages.
pub fn display_command(command: &Command) -> String {
    let mut out = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Current `RssAnon` of `pid` in bytes; `None` once it has exited.
pub fn rss_anon_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss_anon(&status)
}

/// Reads the `RssAnon:  1234 kB` line of a `/proc/PID/status` text.
fn parse_rss_anon(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let mut fields = line["RssAnon:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => value.checked_mul(1024),
        _ => None,
    }
}

/// CPU time `pid` has used so far, all its threads, user and system, in
/// seconds (`/proc/PID/stat`); `None` once it has exited.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_process_ticks(&stat)? as f64 / clock_ticks_per_s()?)
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces or
/// parentheses itself: fields are counted after its last `)`.
fn parse_process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // fields 3..=13
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// CPU time all CPUs of this machine have spent busy so far (user, nice,
/// system, irq, softirq: not idle, iowait, nor steal, the time a VM's host
/// gave to others), in seconds (`/proc/stat`).
pub fn system_busy_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    Some(parse_busy_ticks(&stat)? as f64 / clock_ticks_per_s()?)
}

/// The busy ticks of the `cpu ` (all CPUs) line of `/proc/stat`.
fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice,
    // already counted in user and nice]
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6))
}

fn clock_ticks_per_s() -> Option<f64> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => Some(hz as f64),
        _ => None,
    }
}

/// Samples the `RssAnon` of a process other than the command being timed
/// (a daemon doing the work a client command asked for), every
/// [`RSS_SAMPLE_INTERVAL`], until [`RssSampler::finish`] or drop.
///
/// The caller must keep `pid` from being recycled while sampling: in the
/// benches it is a child of ours that is reaped only after the sampler
/// stopped.
#[derive(Debug)]
pub struct RssSampler {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<thread::JoinHandle<Option<u64>>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = thread::spawn(move || {
            let mut peak: Option<u64> = None;
            loop {
                if let Some(now) = rss_anon_bytes(pid) {
                    peak = Some(peak.map_or(now, |p| p.max(now)));
                }
                match stopped.recv_timeout(RSS_SAMPLE_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break peak,
                }
            }
        });
        RssSampler {
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Stops sampling; the peak seen, `None` when no sample was taken (the
    /// process was gone).
    pub fn finish(mut self) -> Result<Option<u64>> {
        self.stop.take();
        let handle = self.handle.take().context("RSS sampler already finished")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("RSS sampler thread panicked"))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The three load averages of `/proc/loadavg` (`"0.42 0.51 0.60"`), to label
/// figures measured on a shared machine.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

/// The 1-minute load average, for deciding whether the machine is quiet.
pub fn load_average_1min() -> Option<f64> {
    load_average()?.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------- page cache and hashes

/// Block size for warming and hashing files.
const FILE_BLOCK_BYTES: usize = 8 << 20;

/// Reads a file once so it is in the page cache.
pub fn warm_file(path: &Path) -> Result<()> {
    let mut reader =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut block = vec![0u8; FILE_BLOCK_BYTES];
    while reader
        .read(&mut block)
        .with_context(|| format!("cannot read {}", path.display()))?
        > 0
    {}
    Ok(())
}

/// [`warm_file`] for every regular file below `dir`.
pub fn warm_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            warm_dir(&entry.path())?;
        } else if kind.is_file() {
            warm_file(&entry.path())?;
        }
    }
    Ok(())
}

/// BLAKE3 of a file in hex, as `b3sum` prints it.
pub fn blake3_file(path: &Path) -> Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(
        &mut std::io::BufReader::with_capacity(FILE_BLOCK_BYTES, file),
        &mut hasher,
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (another process may
/// take it before the caller binds it).
pub fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a probe socket on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

// ---------------------------------------------------------------- machine and binaries

/// Where a figure came from (BENCHMARKS.md: record the machine of every figure).
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    /// The Vigo IO backend the bench's own contender ran on; `None` for
    /// benches that run no Vigo IO backend.
    pub io_backend: Option<String>,
    pub host: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned())
        };
        Machine {
            // Honours CPU affinity and cgroup quotas, like `nproc` does for affinity.
            cpus: thread::available_parallelism().map_or(1, |n| n.get()),
            // What `uname -r` prints.
            kernel: read("/proc/sys/kernel/osrelease"),
            io_backend: None,
            host: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// Finds `name` on `PATH`, as a shell would.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// `path` when it is an executable file (a tool installed off `PATH`).
pub fn executable_at(path: &Path) -> Option<PathBuf> {
    is_executable(path).then(|| path.to_owned())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `envoy` to measure: `--envoy PATH` (or `VIGO_ENVOY`, which clap folds
/// into the same option), else the `envoy` built next to this executable,
/// since `cargo build --release` puts both in `target/release`.
pub fn locate_envoy(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !is_executable(path) {
            bail!(
                "envoy binary {} (from --envoy or VIGO_ENVOY) is not an executable file",
                path.display()
            );
        }
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().context("cannot find the running vigo-perf executable")?;
    let beside = exe.with_file_name("envoy");
    if is_executable(&beside) {
        return Ok(beside);
    }
    bail!(
        "no envoy binary: looked for {} next to vigo-perf; build it with \
         `cargo build --release -p agent`, or pass --envoy PATH (or set VIGO_ENVOY)",
        beside.display()
    )
}

/// First line a program prints for `--version`, for the report's params.
pub fn tool_version(program: &Path) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|l| l.trim().to_owned())
}

// ---------------------------------------------------------------- work directory

/// `RAMFS_MAGIC` from `<linux/magic.h>`; nix does not name it.
const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6_u32 as _);
/// Filesystems that live in memory: a write bench on them measures memcpy.
const MEMORY_FS_MAGICS: [nix::sys::statfs::FsType; 2] =
    [nix::sys::statfs::TMPFS_MAGIC, RAMFS_MAGIC];

/// A fresh directory for one bench's files, removed when dropped, so that an
/// error anywhere (`?` unwinding through the bench) still cleans up.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `vigo-perf-<bench>-<pid>-<n>` under `base`. With
    /// `needs_disk`, refuses a base on tmpfs/ramfs, where writes and `sync`
    /// never reach a disk and the comparison would be meaningless.
    pub fn create(base: &Path, bench: &str, needs_disk: bool) -> Result<WorkDir> {
        let fs = nix::sys::statfs::statfs(base)
            .with_context(|| format!("cannot stat the filesystem of {}", base.display()))?;
        if needs_disk && MEMORY_FS_MAGICS.contains(&fs.filesystem_type()) {
            bail!(
                "{} is on a memory filesystem (tmpfs/ramfs); this bench writes to disk and \
                 must run on a real one: pass --dir on a disk-backed filesystem",
                base.display()
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!("vigo-perf-{bench}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create work directory {}", path.display()))?;
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes free for an unprivileged writer under this directory.
    pub fn available_bytes(&self) -> Result<u64> {
        let vfs = nix::sys::statvfs::statvfs(&self.path)
            .with_context(|| format!("cannot statvfs {}", self.path.display()))?;
        Ok(vfs.blocks_available() * vfs.fragment_size())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "vigo-perf: could not remove work directory {}: {e}",
                self.path.display()
            );
        }
    }
}

/// A durable-copy baseline: `(src, dest, deadline)` to seconds.
pub type DurableCopy = fn(&Path, &Path, Duration) -> Result<f64>;

/// The `cp SRC DEST && sync` baseline: seconds to make one durable copy of
/// `src` at `dest` the way an operator would, through the page cache and
/// the kernel's writeback. `dest` is removed, untimed, before and after.
/// `sync` flushes the whole system; callers flush (or fsync their inputs)
/// beforehand, so what it waits for is this copy.
pub fn cp_sync(src: &Path, dest: &Path, deadline: Duration) -> Result<f64> {
    timed_copy(r#"cp -- "$1" "$2" && sync"#, src, dest, deadline)
}

/// The `dd oflag=direct conv=fdatasync` baseline: seconds to write `src`'s
/// bytes (read from a warm page cache) with direct IO, 4 MiB per write, one
/// write at a time, into a new file `dest` allocated first (`fallocate`, as
/// a fetch allocates its partial file: extending direct writes make ext4
/// wait for each allocation, which took 13.6-14.9 s for 4 GiB on a VM where
/// `cp` + `sync` took 8.5), then `fdatasync` it: what this machine's disk
/// takes to hold that many bytes durably on the path a fetch writes by.
/// `dest` is removed, untimed, before and after.
pub fn dd_direct(src: &Path, dest: &Path, deadline: Duration) -> Result<f64> {
    timed_copy(
        r#"fallocate -l "$(stat -c %s "$1")" "$2" && dd if="$1" of="$2" bs=4M oflag=direct conv=notrunc,fdatasync status=none"#,
        src,
        dest,
        deadline,
    )
}

/// Seconds `sh -c SCRIPT sh SRC DEST` takes; `dest` removed, untimed,
/// before and after.
fn timed_copy(script: &str, src: &Path, dest: &Path, deadline: Duration) -> Result<f64> {
    remove_path(dest)?;
    let out = run_timed(
        Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(src)
            .arg(dest),
        false,
        deadline,
    );
    remove_path(dest)?;
    Ok(out?.seconds)
}

/// Removes a file or directory tree if it exists.
pub fn remove_path(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

// ---------------------------------------------------------------- report

/// One contender's line in `"results"`.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub name: String,
    pub seconds_median: Option<f64>,
    pub seconds_min: Option<f64>,
    pub seconds_max: Option<f64>,
    /// The Vigo IO backend that actually ran; `None` for baselines and
    /// in-process work that use no Vigo backend.
    pub io_backend: Option<String>,
    pub runs: usize,
    /// Bytes processed per run, when a rate makes sense.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `bytes / seconds_median` in 10^9 bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_anon_mib: Option<f64>,
    /// Bench-specific figures (chunk counts, byte counts).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ResultRow {
    pub fn new(name: impl Into<String>, seconds: &[f64]) -> ResultRow {
        let stats = Stats::of(seconds);
        ResultRow {
            name: name.into(),
            seconds_median: stats.map(|s| s.median),
            seconds_min: stats.map(|s| s.min),
            seconds_max: stats.map(|s| s.max),
            io_backend: None,
            runs: seconds.len(),
            bytes: None,
            gb_per_s: None,
            peak_rss_anon_mib: None,
            extra: serde_json::Map::new(),
        }
    }

    pub fn with_bytes(mut self, bytes: u64) -> ResultRow {
        self.bytes = Some(bytes);
        self.gb_per_s = self
            .seconds_median
            .filter(|s| *s > 0.0)
            .map(|s| bytes as f64 / s / GB);
        self
    }
}

/// A target from an issue, checked against a figure in `"ratios"`.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// `">="` for "bigger is better" figures, `"<="` for sizes.
    pub op: &'static str,
    pub target: f64,
    pub value: Option<f64>,
    /// `None` when the figure could not be measured.
    pub met: Option<bool>,
}

impl Goal {
    pub fn at_least(target: f64, value: Option<f64>) -> Goal {
        Goal {
            op: ">=",
            target,
            value,
            met: value.map(|v| v >= target),
        }
    }

    pub fn at_most(target: f64, value: Option<f64>) -> Goal {
        Goal {
            op: "<=",
            target,
            value,
            met: value.map(|v| v <= target),
        }
    }
}

/// The one JSON object a bench prints with `--json` (BENCHMARKS.md, "Output contract").
#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub machine: Machine,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub results: Vec<ResultRow>,
    pub ratios: BTreeMap<String, Option<f64>>,
    pub goals: BTreeMap<String, Goal>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(bench: &'static str) -> Report {
        Report {
            bench,
            machine: Machine::detect(),
            params: serde_json::Map::new(),
            results: Vec::new(),
            ratios: BTreeMap::new(),
            goals: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    pub fn param(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.params.insert(key.to_owned(), value);
    }

    /// Prints the human summary to stderr and, with `json`, the report to stdout.
    pub fn emit(&self, json: bool) -> Result<()> {
        eprint!("{}", self.render_summary());
        if json {
            let text = serde_json::to_string(self).context("cannot encode the report")?;
            println!("{text}");
        }
        Ok(())
    }

    fn render_summary(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "\n{} on {} ({} cpus, kernel {}, io backend {})\n",
            self.bench,
            m.host,
            m.cpus,
            m.kernel,
            m.io_backend.as_deref().unwrap_or("n/a"),
        );
        let rows: Vec<Vec<String>> = self
            .results
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    fmt_opt(r.seconds_median, 3),
                    fmt_opt(r.seconds_min, 3),
                    fmt_opt(r.seconds_max, 3),
                    fmt_opt(r.gb_per_s, 2),
                    fmt_opt(r.peak_rss_anon_mib, 1),
                    r.io_backend.clone().unwrap_or_else(|| "-".to_owned()),
                ]
            })
            .collect();
        out.push_str(&render_table(
            &[
                "contender",
                "median s",
                "min s",
                "max s",
                "GB/s",
                "RssAnon MiB",
                "io",
            ],
            &rows,
        ));
        let rows: Vec<Vec<String>> = self
            .ratios
            .iter()
            .map(|(name, value)| {
                let goal = self.goals.get(name).map_or_else(String::new, |g| {
                    let verdict = match g.met {
                        Some(true) => "met",
                        Some(false) => "MISSED",
                        None => "not measured",
                    };
                    format!("{} {} {verdict}", g.op, g.target)
                });
                vec![name.clone(), fmt_opt(*value, 3), goal]
            })
            .collect();
        out.push('\n');
        out.push_str(&render_table(&["figure", "value", "goal"], &rows));
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

pub fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// A plain aligned table: first column left-aligned, the rest right-aligned.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "  {cell:>w$}");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&mut rule.iter().map(String::as_str)));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GB").unwrap(), 4 << 30);
        assert_eq!(parse_size(" 12345 ").unwrap(), 12345);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in [
            "",
            "G",
            "4X",
            "4.5G",
            "-1G",
            "4 G",
            "99999999999999999999",
            "17000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn size_labels_round_trip() {
        for bytes in [
            0,
            1,
            1000,
            1024,
            8192,
            1536 << 20,
            4 << 30,
            1 << 40,
            (1 << 40) + 1024,
        ] {
            assert_eq!(parse_size(&size_label(bytes)).unwrap(), bytes, "{bytes}");
        }
        assert_eq!(size_label(4 << 30), "4G");
        assert_eq!(size_label(1536 << 20), "1536M");
        assert_eq!(size_label(1000), "1000");
    }

    #[test]
    fn median_min_max() {
        assert_eq!(Stats::of(&[]), None);
        let odd = Stats::of(&[3.0, 1.0, 2.0, 10.0, 0.5]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 0.5, 10.0));
        let even = Stats::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        let one = Stats::of(&[7.0]).unwrap();
        assert_eq!((one.median, one.min, one.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(3.0), Some(1.5)), Some(2.0));
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }

    #[test]
    fn rss_anon_line() {
        let status = "Name:\tenvoy\nVmRSS:\t  9000 kB\nRssAnon:\t    2048 kB\nRssFile:\t 100 kB\n";
        assert_eq!(parse_rss_anon(status), Some(2048 * 1024));
        assert_eq!(parse_rss_anon("Name:\tzombie\nState:\tZ\n"), None);
    }

    #[test]
    fn cpu_time_lines() {
        // A command name with a space and a parenthesis, as the kernel prints it.
        let stat = "4242 (envoy (x) y) S 1 4242 4242 0 -1 4194560 2291 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(parse_process_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_process_ticks("4242 (envoy) S 1"), None);
        let proc_stat = "cpu  100 5 40 9000 30 2 3 1 0 0\ncpu0 50 2 20 4500 15 1 1 0 0 0\n";
        assert_eq!(parse_busy_ticks(proc_stat), Some(100 + 5 + 40 + 2 + 3));
        assert_eq!(parse_busy_ticks("intr 1 2 3"), None);
        // Real reads: this test process and this machine have used some.
        let own = process_cpu_seconds(std::process::id()).expect("own CPU time");
        assert!(own >= 0.0);
        let busy = system_busy_cpu_seconds().expect("machine CPU time");
        assert!(busy > 0.0);
    }

    #[test]
    fn rss_of_this_process_is_sampled() {
        // A real read of /proc: this test process has some anonymous memory.
        let rss = rss_anon_bytes(std::process::id()).expect("RssAnon of self");
        assert!(rss > 0);
    }

    #[test]
    fn timed_run_captures_stdout_and_failure() {
        let deadline = Duration::from_secs(60);
        let ok = run_timed(
            Command::new("sh").args(["-c", "echo hello"]),
            true,
            deadline,
        )
        .unwrap();
        assert_eq!(ok.stdout, "hello\n");
        assert!(ok.seconds > 0.0);
        let err = run_timed(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            false,
            deadline,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("boom") && err.contains('3'), "{err}");
    }

    /// Both durable-copy baselines really copy (a failing copy is an error,
    /// not a time) and leave nothing behind.
    #[test]
    fn durable_copy_baselines_run_and_clean_up() {
        // Under the target directory: /tmp may be a tmpfs without O_DIRECT.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(&base).unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, vec![7u8; 5 << 20]).unwrap();
        let deadline = Duration::from_secs(60);
        for (name, copy) in [
            ("cp_sync", cp_sync as DurableCopy),
            ("dd_direct", dd_direct),
        ] {
            let dest = dir.path().join(format!("{name}.bin"));
            let seconds = copy(&src, &dest, deadline).unwrap();
            assert!(seconds > 0.0, "{name}");
            assert!(!dest.exists(), "{name} left its copy");
            let missing = dir.path().join("no-such-input");
            assert!(copy(&missing, &dest, deadline).is_err(), "{name}");
        }
    }

    #[test]
    fn a_hung_child_is_killed_at_its_deadline() {
        let started = Instant::now();
        let err = run_timed(
            Command::new("sleep").arg("30"),
            true,
            Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("deadline"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn peak_rss_of_a_child_is_seen() {
        // A child holding ~64 MiB of touched anonymous memory for a moment.
        let out = run_timed(
            Command::new("sh").args([
                "-c",
                "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.3",
            ]),
            true,
            Duration::from_secs(60),
        )
        .unwrap();
        let peak = out.peak_rss_anon_bytes.expect("sampled");
        assert!(peak > 32 << 20, "{peak}");
    }

    #[test]
    fn rss_sampler_sees_another_process() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.5",
            ])
            .spawn()
            .unwrap();
        let sampler = RssSampler::start(child.id());
        thread::sleep(Duration::from_millis(400));
        let peak = sampler.finish().unwrap().expect("sampled");
        child.wait().unwrap();
        assert!(peak > 0, "{peak}");
    }

    #[test]
    fn load_average_is_read() {
        let text = load_average().expect("/proc/loadavg");
        assert_eq!(text.split_whitespace().count(), 3);
        assert!(load_average_1min().unwrap() >= 0.0);
    }

    #[test]
    fn deadlines_grow_with_size() {
        assert_eq!(run_deadline(0), RUN_DEADLINE_MIN);
        assert!(run_deadline(100 << 30) > RUN_DEADLINE_MIN);
    }

    #[test]
    fn goals_compare_in_the_right_direction() {
        assert_eq!(Goal::at_least(1.0, Some(1.2)).met, Some(true));
        assert_eq!(Goal::at_least(1.0, Some(0.9)).met, Some(false));
        assert_eq!(Goal::at_most(128.0, Some(200.0)).met, Some(false));
        assert_eq!(Goal::at_most(128.0, None).met, None);
    }

    #[test]
    fn table_columns_align() {
        let table = render_table(
            &["name", "value"],
            &[
                vec!["a".into(), "1.0".into()],
                vec!["longer".into(), "10.25".into()],
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "name    value");
        assert_eq!(lines[2], "a         1.0");
        assert_eq!(lines[3], "longer  10.25");
    }
}
