//! `vigo-perf delta`: how many bytes a host holding version A of an image
//! must receive to build version B, with the engine's own chunker, against
//! rsync's delta transfer of the same pair.
//!
//! Ours: chunk A and B with [`StreamChunker`] (the same cut function and
//! hashes the store uses, so the figures are the engine's); what B needs is
//! every distinct chunk of B whose hash A does not have, plus B's manifest,
//! which must also move. Measured at the default parameters and at each
//! `--avg-sizes` average (min = avg/4, max = 4·avg), because the chunk size
//! trades delta size against per-chunk overhead (DESIGN.md §3, "Delta").
//!
//! Baseline: rsync pushing B over loopback TCP to an `rsync --daemon` whose
//! module holds a copy of A under B's name, with `--no-whole-file` so the
//! delta algorithm runs (local copies default to whole-file). rsync's
//! "Literal data" is what it sends beyond what the receiver already has:
//! the same quantity as our missing bytes. Its block checksums, which the
//! receiver sends back, are reported beside it but not counted in the ratio.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use engine::chunker::{Chunker, ChunkerParams, FoundChunk, StreamChunker};
use engine::hash::ChunkHash;
use engine::manifest::{
    ENTRY_BYTES, PAGE_CHUNKS, PAGE_HEADER_BYTES, PAGE_REF_BYTES, ROOT_HEADER_BYTES,
};

use crate::harness::{
    self, CommonArgs, Goal, Report, ResultRow, Stats, WorkDir, ratio, render_table, size_arg,
    size_label,
};

/// Read size when chunking a file.
const READ_BLOCK_BYTES: usize = 8 << 20;
/// We should move no more than rsync's literal data (goal).
const DELTA_VS_RSYNC_MIN: f64 = 1.0;
/// How long the rsync daemon may take to accept connections.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
const DAEMON_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Ports tried for the daemon; another process may take a free port between
/// our probe and the daemon's bind.
const DAEMON_START_ATTEMPTS_MAX: u32 = 5;
/// rsync module the daemon serves.
const RSYNC_MODULE: &str = "vigo";

/// Arguments of `vigo-perf delta`.
#[derive(Args, Debug)]
pub struct DeltaArgs {
    /// The version the receiving host already holds.
    #[arg(long)]
    old: PathBuf,
    /// The version it needs.
    #[arg(long)]
    new: PathBuf,
    /// Average chunk sizes to compare, besides the engine's default parameters.
    #[arg(long, value_parser = size_arg, value_delimiter = ',',
          default_value = "8K,16K,32K,64K,128K,256K,1M")]
    avg_sizes: Vec<u64>,
    /// Base directory for rsync's copy of the old version.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
}

/// What version B costs a holder of version A, for one chunker setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaFigures {
    pub chunks_old: u64,
    pub chunks_new: u64,
    /// Chunks of B counted once each, however often they repeat.
    pub chunks_new_distinct: u64,
    /// Bytes of the distinct chunks of B whose hash A lacks.
    pub missing_bytes: u64,
    /// Encoded size of B's manifest (root and pages), which moves whole.
    pub manifest_bytes: u64,
    pub total_to_move: u64,
}

/// Encoded size of a manifest of `chunks` chunks, from the engine's layout:
/// the root header, one page reference per page in the root, and per page
/// its header and one entry per chunk.
pub fn manifest_bytes(chunks: u64) -> u64 {
    let pages = chunks.div_ceil(u64::from(PAGE_CHUNKS));
    ROOT_HEADER_BYTES as u64
        + pages * (PAGE_REF_BYTES + PAGE_HEADER_BYTES) as u64
        + chunks * ENTRY_BYTES as u64
}

/// The delta arithmetic over two chunk lists.
pub fn delta_figures(old: &[FoundChunk], new: &[FoundChunk]) -> DeltaFigures {
    let have: HashSet<ChunkHash> = old.iter().map(|c| c.hash).collect();
    let mut seen: HashSet<ChunkHash> = HashSet::with_capacity(new.len());
    let mut missing_bytes = 0u64;
    for chunk in new {
        if seen.insert(chunk.hash) && !have.contains(&chunk.hash) {
            missing_bytes += u64::from(chunk.len);
        }
    }
    let chunks_new = new.len() as u64;
    let manifest = manifest_bytes(chunks_new);
    DeltaFigures {
        chunks_old: old.len() as u64,
        chunks_new,
        chunks_new_distinct: seen.len() as u64,
        missing_bytes,
        manifest_bytes: manifest,
        total_to_move: missing_bytes + manifest,
    }
}

/// Chunks everything `reader` yields, fed in [`READ_BLOCK_BYTES`] pieces.
pub fn chunk_stream(mut reader: impl Read, params: ChunkerParams) -> Result<Vec<FoundChunk>> {
    let chunker = Chunker::new(params).context("invalid chunker parameters")?;
    let mut stream = StreamChunker::new(chunker);
    let mut chunks = Vec::new();
    let mut emit = |c: FoundChunk| chunks.push(c);
    let mut block = vec![0u8; READ_BLOCK_BYTES];
    loop {
        let n = reader.read(&mut block)?;
        if n == 0 {
            break;
        }
        stream.push(&block[..n], &mut emit);
    }
    stream.finish(&mut emit);
    Ok(chunks)
}

fn chunk_file(path: &Path, params: ChunkerParams) -> Result<Vec<FoundChunk>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    chunk_stream(file, params).with_context(|| format!("cannot chunk {}", path.display()))
}

/// Chunks both versions, one thread each (the two cores), and diffs them.
fn plan(old: &Path, new: &Path, params: ChunkerParams) -> Result<DeltaFigures> {
    let (old_chunks, new_chunks) = thread::scope(|s| {
        let old_thread = s.spawn(|| chunk_file(old, params));
        let new_chunks = chunk_file(new, params);
        let old_chunks = old_thread
            .join()
            .map_err(|_| anyhow::anyhow!("chunking thread panicked"))?;
        anyhow::Ok((old_chunks?, new_chunks?))
    })?;
    Ok(delta_figures(&old_chunks, &new_chunks))
}

/// One chunker setting under test.
#[derive(Debug)]
struct Setting {
    /// `None` for the engine's default parameters.
    avg_label: Option<String>,
    params: ChunkerParams,
    seconds: Vec<f64>,
    figures: Option<DeltaFigures>,
}

impl Setting {
    fn name(&self) -> String {
        let p = self.params;
        let sizes = format!(
            "{}/{}/{}",
            size_label(p.min_bytes.into()),
            size_label(p.avg_bytes.into()),
            size_label(p.max_bytes.into())
        );
        match &self.avg_label {
            None => format!("vigo default {sizes}"),
            Some(_) => format!("vigo {sizes}"),
        }
    }

    fn ratio_name(&self) -> String {
        match &self.avg_label {
            None => "delta_vs_rsync".to_owned(),
            Some(label) => format!("delta_vs_rsync_{label}"),
        }
    }
}

pub fn run(args: DeltaArgs) -> Result<()> {
    let mut report = Report::new("delta");
    let old_size = file_size(&args.old)?;
    let new_size = file_size(&args.new)?;

    let mut settings = vec![Setting {
        avg_label: None,
        params: ChunkerParams::DEFAULT,
        seconds: Vec::new(),
        figures: None,
    }];
    for &avg in &args.avg_sizes {
        let avg_bytes = u32::try_from(avg)
            .ok()
            .with_context(|| format!("--avg-sizes {} is too large", size_label(avg)))?;
        let params = ChunkerParams::with_avg(avg_bytes)
            .with_context(|| format!("--avg-sizes {}", size_label(avg)))?;
        settings.push(Setting {
            avg_label: Some(size_label(avg)),
            params,
            seconds: Vec::new(),
            figures: None,
        });
    }

    let rsync = harness::find_on_path("rsync");
    let work = WorkDir::create(&args.dir, "delta", false)?;
    let mut daemon = match &rsync {
        Some(program) => Some(RsyncDaemon::start(program, work.path())?),
        None => {
            report.notes.push(
                "rsync is not installed (Debian package rsync): the rsync baseline and every delta_vs_rsync figure are null"
                    .to_owned(),
            );
            None
        }
    };

    report.param("old", &args.old);
    report.param("new", &args.new);
    report.param("old_bytes", old_size);
    report.param("new_bytes", new_size);
    report.param("avg_sizes_bytes", &args.avg_sizes);
    report.param("runs", args.common.runs);
    report.param("rsync", rsync.as_deref().and_then(harness::tool_version));

    let mut rsync_seconds = Vec::new();
    let mut rsync_stats: Option<RsyncStats> = None;
    // Round 0 is the warm-up (it also pulls both files into the page cache).
    for round in 0..=args.common.runs {
        let label = if round == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {round}/{}", args.common.runs)
        };
        if let Some(daemon) = daemon.as_mut() {
            let (seconds, stats) = daemon
                .push(&args.old, &args.new, round == 0)
                .with_context(|| format!("rsync push ({label})"))?;
            eprintln!(
                "{label:>9}  {:<28} {seconds:8.3} s  literal {} bytes",
                "rsync", stats.literal_bytes
            );
            if round > 0 {
                rsync_seconds.push(seconds);
            }
            if let Some(first) = rsync_stats
                && first.literal_bytes != stats.literal_bytes
            {
                report.notes.push(format!(
                    "rsync's literal data varied between runs ({} and {} bytes); the first is reported",
                    first.literal_bytes, stats.literal_bytes
                ));
            }
            rsync_stats.get_or_insert(stats);
        }
        for setting in &mut settings {
            let started = Instant::now();
            let figures = plan(&args.old, &args.new, setting.params)?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "{label:>9}  {:<28} {seconds:8.3} s  missing {} bytes",
                setting.name(),
                figures.missing_bytes
            );
            // Chunking is a function of the bytes alone: any difference
            // between runs is a bug in the chunker or in this bench.
            if let Some(previous) = setting.figures {
                ensure!(
                    previous == figures,
                    "chunking {} gave different figures in two runs: {previous:?} vs {figures:?}",
                    setting.name()
                );
            }
            setting.figures = Some(figures);
            if round > 0 {
                setting.seconds.push(seconds);
            }
        }
    }
    drop(daemon);

    let literal = rsync_stats.map(|s| s.literal_bytes as f64);
    let mut rsync_row = ResultRow::new("rsync --no-whole-file (loopback daemon)", &rsync_seconds)
        .with_bytes(new_size);
    if let Some(stats) = rsync_stats {
        for (key, value) in [
            ("literal_bytes", stats.literal_bytes),
            ("matched_bytes", stats.matched_bytes),
            ("sent_bytes", stats.sent_bytes),
            ("received_bytes", stats.received_bytes),
        ] {
            rsync_row.extra.insert(key.to_owned(), value.into());
        }
    }
    if rsync.is_some() {
        report.results.push(rsync_row);
    } else {
        report.results.push(ResultRow::new(
            "rsync --no-whole-file (loopback daemon)",
            &[],
        ));
    }

    let mut table = Vec::new();
    for setting in &settings {
        let figures = setting
            .figures
            .context("every setting runs at least once")?;
        let vs_rsync = ratio(literal, Some(figures.total_to_move as f64));
        report.ratios.insert(setting.ratio_name(), vs_rsync);
        let median = Stats::of(&setting.seconds).map(|s| s.median);
        let mut row =
            ResultRow::new(setting.name(), &setting.seconds).with_bytes(old_size + new_size);
        for (key, value) in [
            ("min_bytes", u64::from(setting.params.min_bytes)),
            ("avg_bytes", u64::from(setting.params.avg_bytes)),
            ("max_bytes", u64::from(setting.params.max_bytes)),
            ("chunks_old", figures.chunks_old),
            ("chunks_new", figures.chunks_new),
            ("chunks_new_distinct", figures.chunks_new_distinct),
            ("missing_bytes", figures.missing_bytes),
            ("manifest_bytes", figures.manifest_bytes),
            ("total_to_move", figures.total_to_move),
        ] {
            row.extra.insert(key.to_owned(), value.into());
        }
        report.results.push(row);
        table.push(vec![
            match &setting.avg_label {
                None => format!("default {}", size_label(setting.params.avg_bytes.into())),
                Some(label) => label.clone(),
            },
            figures.chunks_new.to_string(),
            figures.missing_bytes.to_string(),
            figures.manifest_bytes.to_string(),
            figures.total_to_move.to_string(),
            format!(
                "{:.4}",
                figures.total_to_move as f64 / new_size.max(1) as f64
            ),
            harness::fmt_opt(vs_rsync, 3),
            harness::fmt_opt(median, 3),
        ]);
    }
    let default = settings[0]
        .figures
        .context("the default setting runs at least once")?;
    let vs_rsync = report.ratios.get("delta_vs_rsync").copied().flatten();
    report.goals.insert(
        "delta_vs_rsync".to_owned(),
        Goal::at_least(DELTA_VS_RSYNC_MIN, vs_rsync),
    );
    report.ratios.insert(
        "delta_vs_full".to_owned(),
        ratio(Some(new_size as f64), Some(default.total_to_move as f64)),
    );
    report.notes.push(
        "total_to_move = missing chunk bytes + manifest bytes; delta_vs_rsync* = rsync literal data / total_to_move; \
         delta_vs_full = size of new / total_to_move"
            .to_owned(),
    );
    report.notes.push(
        "vigo rows time chunking and diffing both files (one thread each) from the page cache, and their GB/s counts \
         both files; the rsync row's GB/s counts the new file; io_backend is null: reads go through std::fs, \
         no Vigo IO backend runs"
            .to_owned(),
    );

    eprintln!(
        "\nold {} ({old_size} bytes), new {} ({new_size} bytes); rsync literal data: {}",
        args.old.display(),
        args.new.display(),
        rsync_stats.map_or_else(|| "-".to_owned(), |s| format!("{} bytes", s.literal_bytes)),
    );
    eprint!(
        "{}",
        render_table(
            &[
                "avg",
                "chunks",
                "missing B",
                "manifest B",
                "total B",
                "total/new",
                "rsync/total",
                "chunk s"
            ],
            &table
        )
    );
    report.emit(args.common.json)
}

fn file_size(path: &Path) -> Result<u64> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    ensure!(meta.is_file(), "{} is not a regular file", path.display());
    Ok(meta.len())
}

// ---------------------------------------------------------------- rsync baseline

/// The figures of rsync's `--stats` this bench uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsyncStats {
    pub literal_bytes: u64,
    pub matched_bytes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// Reads `Literal data: 1,234,567 bytes` and its siblings from `--stats`
/// output (run under `LC_ALL=C`, so the separator is a comma).
pub fn parse_rsync_stats(text: &str) -> Result<RsyncStats> {
    let field = |label: &str| -> Result<u64> {
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(label))
            .with_context(|| format!("rsync --stats output has no {label:?} line"))?;
        let number = line.split_whitespace().next().unwrap_or_default();
        let digits: String = number.chars().filter(|&c| c != ',').collect();
        ensure!(
            !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()),
            "cannot read a byte count from rsync's {label:?} line: {line:?}"
        );
        digits
            .parse()
            .with_context(|| format!("byte count {number:?} out of range"))
    };
    Ok(RsyncStats {
        literal_bytes: field("Literal data:")?,
        matched_bytes: field("Matched data:")?,
        sent_bytes: field("Total bytes sent:")?,
        received_bytes: field("Total bytes received:")?,
    })
}

/// An `rsync --daemon` on 127.0.0.1 serving one writable module in the work
/// directory; killed and reaped when dropped.
#[derive(Debug)]
struct RsyncDaemon {
    program: PathBuf,
    child: Child,
    port: u16,
    module_dir: PathBuf,
}

impl RsyncDaemon {
    fn start(program: &Path, work: &Path) -> Result<RsyncDaemon> {
        let module_dir = work.join("module");
        std::fs::create_dir_all(&module_dir)
            .with_context(|| format!("cannot create {}", module_dir.display()))?;
        let config = work.join("rsyncd.conf");
        // Run the module as ourselves: as root the daemon would otherwise
        // switch to `nobody`, who cannot write in our work directory.
        let text = format!(
            "use chroot = no\nlog file = {log}\n[{RSYNC_MODULE}]\n    path = {module}\n    read only = no\n    uid = {uid}\n    gid = {gid}\n",
            log = work.join("rsyncd.log").display(),
            module = module_dir.display(),
            uid = nix::unistd::geteuid(),
            gid = nix::unistd::getegid(),
        );
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;

        let mut last_error = None;
        for _ in 0..DAEMON_START_ATTEMPTS_MAX {
            let port = free_port()?;
            let mut child = Command::new(program)
                .arg("--daemon")
                .arg("--no-detach")
                .arg(format!("--config={}", config.display()))
                .arg(format!("--port={port}"))
                .arg("--address=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot start {} --daemon", program.display()))?;
            match wait_until_listening(&mut child, port) {
                Ok(()) => {
                    return Ok(RsyncDaemon {
                        program: program.to_owned(),
                        child,
                        port,
                        module_dir,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt was made")))
            .context("cannot start an rsync daemon on 127.0.0.1")
    }

    /// Puts a fresh copy of `old` in the module under `new`'s name (untimed),
    /// then times pushing `new` onto it. With `check`, also confirms the
    /// daemon ended up with exactly `new`.
    fn push(&mut self, old: &Path, new: &Path, check: bool) -> Result<(f64, RsyncStats)> {
        let name = new
            .file_name()
            .with_context(|| format!("{} has no file name", new.display()))?;
        let dest = self.module_dir.join(name);
        harness::remove_path(&dest)?;
        std::fs::copy(old, &dest)
            .with_context(|| format!("cannot copy {} to {}", old.display(), dest.display()))?;
        let url = format!(
            "rsync://127.0.0.1:{}/{RSYNC_MODULE}/{}",
            self.port,
            name.to_string_lossy()
        );
        let out = harness::run_timed(
            Command::new(&self.program)
                .env("LC_ALL", "C")
                // --ignore-times: never skip the file on size and mtime.
                .args(["--no-whole-file", "--ignore-times", "--stats"])
                .arg(new)
                .arg(&url),
            false,
            harness::run_deadline(std::fs::metadata(new)?.len()),
        )?;
        let stats = parse_rsync_stats(&out.stdout)?;
        if check {
            ensure!(
                files_equal(new, &dest)?,
                "after rsync, {} differs from {}",
                dest.display(),
                new.display()
            );
        }
        harness::remove_path(&dest)?;
        Ok((out.seconds, stats))
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        // Our own child, by its handle: nothing else is signalled.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a probe socket on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn wait_until_listening(child: &mut Child, port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            bail!("rsync daemon exited ({status}): {}", stderr.trim());
        }
        if TcpStream::connect_timeout(&addr, DAEMON_POLL_INTERVAL).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "rsync daemon did not listen on port {port} within {} s",
                DAEMON_START_TIMEOUT.as_secs()
            );
        }
        thread::sleep(DAEMON_POLL_INTERVAL);
    }
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; READ_BLOCK_BYTES];
    let mut bb = vec![0u8; READ_BLOCK_BYTES];
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::hash::ContentHash;
    use engine::manifest::{ChunkEntry, Manifest};
    use rand::rngs::SmallRng;
    use rand::{RngCore, SeedableRng};

    /// Small chunks so a few hundred KiB give hundreds of chunks.
    fn small_params() -> ChunkerParams {
        ChunkerParams::with_avg(1024).unwrap()
    }

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        SmallRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        bytes
    }

    fn figures(old: &[u8], new: &[u8]) -> DeltaFigures {
        let old = chunk_stream(old, small_params()).unwrap();
        let new = chunk_stream(new, small_params()).unwrap();
        delta_figures(&old, &new)
    }

    #[test]
    fn identical_versions_need_only_the_manifest() {
        let data = random_bytes(300_000, 1);
        let f = figures(&data, &data);
        assert_eq!(f.missing_bytes, 0);
        assert!(f.chunks_new > 100, "{f:?}");
        assert_eq!(f.chunks_new, f.chunks_old);
        assert_eq!(f.total_to_move, f.manifest_bytes);
    }

    #[test]
    fn unrelated_versions_need_everything() {
        let old = random_bytes(200_000, 2);
        let new = random_bytes(250_000, 3);
        let f = figures(&old, &new);
        assert_eq!(f.missing_bytes, new.len() as u64);
        assert_eq!(
            f.total_to_move,
            new.len() as u64 + manifest_bytes(f.chunks_new)
        );
    }

    #[test]
    fn an_insertion_costs_about_the_chunks_around_it() {
        let old = random_bytes(400_000, 4);
        let mut new = old.clone();
        let insert = random_bytes(100, 5);
        new.splice(200_000..200_000, insert);
        let f = figures(&old, &new);
        // Content-defined cuts resynchronise: at most the chunk holding the
        // insertion and its neighbours change, each at most 4 KiB.
        let max = u64::from(small_params().max_bytes);
        assert!(f.missing_bytes >= 100, "{f:?}");
        assert!(f.missing_bytes <= 3 * max + 100, "{f:?}");
    }

    #[test]
    fn repeated_chunks_are_counted_once() {
        let block = random_bytes(100_000, 6);
        let twice = [block.as_slice(), block.as_slice()].concat();
        let once = figures(&[], &block);
        let doubled = figures(&[], &twice);
        // The second copy repeats almost every chunk of the first; only
        // chunks straddling the seam are new.
        assert!(
            doubled.chunks_new_distinct < doubled.chunks_new,
            "{doubled:?}"
        );
        let max = u64::from(small_params().max_bytes);
        assert!(
            doubled.missing_bytes <= once.missing_bytes + 2 * max,
            "{doubled:?}"
        );
        assert!(
            doubled.missing_bytes >= once.missing_bytes - max,
            "{doubled:?}"
        );
    }

    #[test]
    fn chunking_does_not_depend_on_read_sizes() {
        // `chunk_stream` reads in 8 MiB pieces; a reader that returns 1 KiB
        // at a time must give the same chunks.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1024);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = random_bytes(123_457, 7);
        let whole = chunk_stream(data.as_slice(), small_params()).unwrap();
        let dribbled = chunk_stream(Dribble(&data), small_params()).unwrap();
        assert_eq!(whole, dribbled);
        assert_eq!(
            whole.iter().map(|c| u64::from(c.len)).sum::<u64>(),
            data.len() as u64
        );
    }

    #[test]
    fn manifest_size_matches_the_engines_encoding() {
        for chunks in [0u64, 1, 4095, 4096, 4097, 10_000] {
            let entries: Vec<ChunkEntry> = (0..chunks)
                .map(|i| ChunkEntry {
                    offset: i * 1000,
                    len: 1000,
                    hash: ChunkHash([i as u8; 32]),
                })
                .collect();
            let manifest =
                Manifest::from_entries(ChunkerParams::DEFAULT, ContentHash([0; 32]), &entries);
            let encoded = manifest.root.encode().len() as u64
                + manifest.pages.iter().map(|p| p.len() as u64).sum::<u64>();
            assert_eq!(manifest_bytes(chunks), encoded, "{chunks} chunks");
        }
        assert_eq!(manifest_bytes(1), 80 + 52 + 24 + 44);
    }

    #[test]
    fn rsync_stats_with_thousands_separators() {
        let text = "\
Number of files: 1 (reg: 1)
Total file size: 806,400,000 bytes
Literal data: 123,456,789 bytes
Matched data: 682,943,211 bytes
File list size: 0
Total bytes sent: 123,789,012
Total bytes received: 1,234,567

sent 123,789,012 bytes  received 1,234,567 bytes  12,345.67 bytes/sec
";
        let stats = parse_rsync_stats(text).unwrap();
        assert_eq!(
            stats,
            RsyncStats {
                literal_bytes: 123_456_789,
                matched_bytes: 682_943_211,
                sent_bytes: 123_789_012,
                received_bytes: 1_234_567,
            }
        );
        let plain = text.replace("123,456,789", "42");
        assert_eq!(parse_rsync_stats(&plain).unwrap().literal_bytes, 42);
    }

    #[test]
    fn rsync_stats_refuse_what_they_cannot_read() {
        assert!(parse_rsync_stats("sent 10 bytes  received 20 bytes").is_err());
        let human = "Literal data: 1.23M bytes\nMatched data: 0 bytes\nTotal bytes sent: 1\nTotal bytes received: 1\n";
        assert!(parse_rsync_stats(human).is_err());
    }
}
