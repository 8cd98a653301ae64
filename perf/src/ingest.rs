//! `vigo-perf ingest`: how fast `envoy store add` turns a cached file into a
//! durable blob, against copying the same file and syncing it (`cp && sync`),
//! and how fast `store verify` re-hashes it, against `b3sum`.
//!
//! Both sides start from a warm page cache and write to the same real disk,
//! so the comparison is "our pipeline (chunk + hash + write + fsync)" against
//! "the least a copy can do (write + sync)". Every contender runs once as a
//! warm-up, then `--runs` times, alternated within each round. The store is
//! removed between add runs outside the timed region, so every add starts
//! from an empty store and really writes every byte.
//!
//! The input file is generated here from a seeded PRNG: incompressible, so
//! nothing in the path can win by compressing, and reproducible. It is
//! fsynced before any timing, so `sync` in the baseline pays only for its own
//! copy, not for our generation.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde::Deserialize;

use crate::harness::{
    self, CommonArgs, Goal, Report, ResultRow, RunOutcome, WorkDir, mib, ratio, size_arg,
    size_label,
};

/// Block size for generating, warming and hashing files.
const IO_BLOCK_BYTES: usize = 8 << 20;
/// Blocks circulating between the input generator and its writer.
const GENERATE_BLOCKS_IN_FLIGHT: usize = 3;
/// Peak anonymous memory an add may use, whatever the blob size (goal).
const INGEST_PEAK_RSS_MIB_MAX: f64 = 128.0;
/// `envoy store add` must keep up with `cp && sync` (goal).
const INGEST_VS_CP_SYNC_MIN: f64 = 1.0;
/// `envoy store verify` must reach 0.8 of `b3sum` with default threads (goal).
const VERIFY_VS_B3SUM_MIN: f64 = 0.8;
/// The portable backend must reach 0.8 of io_uring (goal).
const PORTABLE_VS_URING_MIN: f64 = 0.8;
/// Room kept free on the work filesystem beyond what the bench writes.
const DISK_SLACK_BYTES: u64 = 1 << 30;
/// Seed of the main input; the extra RSS inputs use the following seeds.
const INPUT_SEED: u64 = 0x5649_474f; // "VIGO"

/// Arguments of `vigo-perf ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Size of the generated input file (binary: 4G = 4 GiB).
    #[arg(long, value_parser = size_arg, default_value = "4G")]
    size: u64,
    /// Extra sizes at which to measure the peak RssAnon of one add each,
    /// to show memory does not grow with the blob (e.g. 1G,4G).
    #[arg(long, value_parser = size_arg, value_delimiter = ',')]
    rss_sizes: Vec<u64>,
    /// Base directory for the work files. Must be a real disk, not tmpfs:
    /// the bench measures writes that reach the disk (`sync`, fsync). The
    /// default, /var/tmp, is disk-backed on these machines where /tmp may
    /// not be.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The envoy binary to measure (default: `envoy` next to vigo-perf).
    #[arg(long, env = "VIGO_ENVOY")]
    envoy: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// What `envoy --json store add` prints.
#[derive(Debug, Deserialize)]
struct AddOutput {
    id: String,
    content_blake3: String,
    size: u64,
    chunks: u64,
    io_backend: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    CpSync,
    B3sum,
    B3sumOneThread,
    /// `store add` with the backend of [`Ingest::primary_io`] (uring, or auto
    /// when uring cannot run here).
    AddPrimary,
    AddPortable,
    Verify,
    Export,
}

/// One contender and its counted runs.
#[derive(Debug)]
struct Contender {
    kind: Kind,
    name: String,
    seconds: Vec<f64>,
    peak_rss_anon_bytes: Option<u64>,
    io_backend: Option<String>,
    chunks: Option<u64>,
}

/// One run's measurements beyond the time.
#[derive(Debug, Default)]
struct Sample {
    seconds: f64,
    peak_rss_anon_bytes: Option<u64>,
    io_backend: Option<String>,
    chunks: Option<u64>,
}

/// A generated input file and what it must hash to.
#[derive(Debug)]
pub(crate) struct InputFile {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    /// BLAKE3 in hex, computed while generating: what `b3sum` must print.
    pub(crate) content_blake3: String,
}

/// Everything a run needs.
#[derive(Debug)]
struct Ingest {
    envoy: PathBuf,
    b3sum: Option<PathBuf>,
    work: WorkDir,
    input: InputFile,
    /// `--io` value for the main add contender, verify and export.
    primary_io: String,
    /// The backend envoy reported for `primary_io` on the setup add.
    primary_backend: String,
    /// Store holding the input as one blob, for verify and export.
    main_store: PathBuf,
    blob_id: String,
}

pub fn run(args: IngestArgs) -> Result<()> {
    let mut report = Report::new("ingest");
    let envoy = harness::locate_envoy(args.envoy.as_deref())?;
    let b3sum = harness::find_on_path("b3sum");
    for tool in ["sh", "cp", "sync"] {
        harness::find_on_path(tool).with_context(|| format!("{tool} is not on PATH"))?;
    }
    let work = WorkDir::create(&args.dir, "ingest", true)?;
    let rss_size_max = args.rss_sizes.iter().copied().max().unwrap_or(0);
    // Input, main store, one run's copy or store; then one extra input and its store.
    let needed = args
        .size
        .saturating_mul(3)
        .saturating_add(rss_size_max.saturating_mul(2))
        .saturating_add(DISK_SLACK_BYTES);
    let available = work.available_bytes()?;
    ensure!(
        available >= needed,
        "{} has {} MiB free; ingest of {} needs about {} MiB (pass a smaller --size or another --dir)",
        work.path().display(),
        available >> 20,
        size_label(args.size),
        needed >> 20
    );

    report.param("size_bytes", args.size);
    report.param("runs", args.common.runs);
    report.param("work_dir", work.path());
    report.param("envoy", &envoy);
    report.param("b3sum", b3sum.as_deref().and_then(harness::tool_version));
    report.param("rss_sizes_bytes", &args.rss_sizes);

    let started = Instant::now();
    let input = generate_file(&work.path().join("input.bin"), args.size, INPUT_SEED)?;
    eprintln!(
        "generated {} of incompressible input in {:.1} s; warming the page cache",
        size_label(args.size),
        started.elapsed().as_secs_f64()
    );
    harness::warm_file(&input.path)?;

    let mut ingest = Ingest {
        main_store: work.path().join("store-main"),
        envoy,
        b3sum,
        work,
        input,
        primary_io: String::new(),
        primary_backend: String::new(),
        blob_id: String::new(),
    };
    ingest.set_up_main_store(&mut report)?;
    report.machine.io_backend = Some(ingest.primary_backend.clone());

    let mut contenders: Vec<Contender> = [
        (Kind::CpSync, "cp+sync".to_owned()),
        (Kind::B3sum, "b3sum".to_owned()),
        (Kind::B3sumOneThread, "b3sum --num-threads 1".to_owned()),
        (
            Kind::AddPrimary,
            format!("envoy add ({})", ingest.primary_io),
        ),
        (Kind::AddPortable, "envoy add (portable)".to_owned()),
        (Kind::Verify, "envoy verify".to_owned()),
        (Kind::Export, "envoy export".to_owned()),
    ]
    .into_iter()
    .filter(|(kind, _)| {
        ingest.b3sum.is_some() || !matches!(kind, Kind::B3sum | Kind::B3sumOneThread)
    })
    .map(|(kind, name)| Contender {
        kind,
        name,
        seconds: Vec::new(),
        peak_rss_anon_bytes: None,
        io_backend: None,
        chunks: None,
    })
    .collect();
    if ingest.b3sum.is_none() {
        report.notes.push(
            "b3sum is not installed (Debian package b3sum): its results and verify_vs_b3sum are null"
                .to_owned(),
        );
    }

    // Round 0 is the warm-up; its times are not counted.
    for round in 0..=args.common.runs {
        let label = if round == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {round}/{}", args.common.runs)
        };
        for contender in &mut contenders {
            let sample = ingest
                .run_once(contender.kind, round == 0)
                .with_context(|| format!("{} ({label})", contender.name))?;
            eprintln!(
                "{label:>9}  {:<24} {:8.3} s",
                contender.name, sample.seconds
            );
            if let Some(rss) = sample.peak_rss_anon_bytes {
                contender.peak_rss_anon_bytes =
                    Some(contender.peak_rss_anon_bytes.map_or(rss, |p| p.max(rss)));
            }
            contender.io_backend = sample.io_backend.or(contender.io_backend.take());
            contender.chunks = sample.chunks.or(contender.chunks);
            if round > 0 {
                contender.seconds.push(sample.seconds);
            }
        }
    }

    let mut rss_by_size = Vec::new();
    for (i, &size) in args.rss_sizes.iter().enumerate() {
        let seed = INPUT_SEED + 1 + i as u64;
        let peak = ingest
            .peak_rss_at(size, seed)
            .with_context(|| format!("peak RSS of an add of {}", size_label(size)))?;
        rss_by_size.push((size, peak));
    }

    summarize(&mut report, &ingest, &contenders, &rss_by_size);
    report.emit(args.common.json)
}

impl Ingest {
    /// Adds the input once, untimed, into the store that verify and export
    /// read. This is also the probe for the main add contender: it asks for
    /// io_uring, and when uring cannot run here, falls back to `--io auto`
    /// with a note, since forcing a backend that cannot run is an error.
    fn set_up_main_store(&mut self, report: &mut Report) -> Result<()> {
        let uring = self.add(&self.main_store, &self.input, "uring", false);
        let (outcome, io) = match uring {
            Ok(out) => (out, "uring"),
            Err(uring_err) => match harness::remove_path(&self.main_store)
                .and_then(|()| self.add(&self.main_store, &self.input, "auto", false))
            {
                Ok(out) => {
                    report.notes.push(format!(
                        "io_uring could not run ({uring_err:#}); the main add contender used --io auto, \
                         and portable_vs_uring is null unless auto chose uring"
                    ));
                    (out, "auto")
                }
                Err(auto_err) => bail!(
                    "envoy store add failed with --io uring ({uring_err:#}) and with --io auto ({auto_err:#})"
                ),
            },
        };
        let (_, add) = outcome;
        self.primary_io = io.to_owned();
        self.primary_backend = add.io_backend;
        self.blob_id = add.id;
        Ok(())
    }

    fn run_once(&self, kind: Kind, warm_up: bool) -> Result<Sample> {
        let work = self.work.path();
        let deadline = harness::run_deadline(self.input.size);
        match kind {
            Kind::CpSync => Ok(Sample {
                seconds: harness::cp_sync(&self.input.path, &work.join("cp-dest.bin"), deadline)?,
                ..Sample::default()
            }),
            Kind::B3sum | Kind::B3sumOneThread => {
                let program = self.b3sum.as_deref().context("b3sum is not installed")?;
                // Untimed: the adds in between may have pushed it out.
                harness::warm_file(&self.input.path)?;
                let mut command = Command::new(program);
                if kind == Kind::B3sumOneThread {
                    command.args(["--num-threads", "1"]);
                }
                let out = harness::run_timed(command.arg(&self.input.path), false, deadline)?;
                let printed = out.stdout.split_whitespace().next().unwrap_or_default();
                ensure!(
                    printed == self.input.content_blake3,
                    "b3sum printed {printed:?} but the generated input hashes to {}",
                    self.input.content_blake3
                );
                Ok(Sample {
                    seconds: out.seconds,
                    ..Sample::default()
                })
            }
            Kind::AddPrimary | Kind::AddPortable => {
                let io = if kind == Kind::AddPrimary {
                    self.primary_io.as_str()
                } else {
                    "portable"
                };
                let store = work.join("store-add");
                harness::remove_path(&store)?;
                let (out, add) = self.add(&store, &self.input, io, true)?;
                harness::remove_path(&store)?;
                Ok(Sample {
                    seconds: out.seconds,
                    peak_rss_anon_bytes: out.peak_rss_anon_bytes,
                    io_backend: Some(add.io_backend),
                    chunks: Some(add.chunks),
                })
            }
            Kind::Verify => {
                // Untimed, like b3sum's input: the store's files are read
                // from the page cache by both verify and the baseline.
                harness::warm_dir(&self.main_store)?;
                let out = harness::run_timed(
                    self.envoy_command(&self.main_store, &self.primary_io)
                        .args(["store", "verify"]),
                    true,
                    deadline,
                )?;
                Ok(Sample {
                    seconds: out.seconds,
                    peak_rss_anon_bytes: out.peak_rss_anon_bytes,
                    io_backend: Some(self.primary_backend.clone()),
                    chunks: None,
                })
            }
            Kind::Export => {
                let dest = work.join("export.bin");
                harness::remove_path(&dest)?;
                let out = harness::run_timed(
                    self.envoy_command(&self.main_store, &self.primary_io)
                        .args(["store", "export", &self.blob_id])
                        .arg(&dest),
                    true,
                    deadline,
                )?;
                let len = std::fs::metadata(&dest)
                    .with_context(|| format!("export did not create {}", dest.display()))?
                    .len();
                ensure!(
                    len == self.input.size,
                    "export wrote {len} bytes, the blob has {}",
                    self.input.size
                );
                // Hashing 4 GiB costs about a second: check the bytes once.
                if warm_up {
                    let exported = harness::blake3_file(&dest)?;
                    ensure!(
                        exported == self.input.content_blake3,
                        "CORRECTNESS BUG: export wrote content hashing to {exported}, the input hashes to {}",
                        self.input.content_blake3
                    );
                }
                harness::remove_path(&dest)?;
                Ok(Sample {
                    seconds: out.seconds,
                    peak_rss_anon_bytes: out.peak_rss_anon_bytes,
                    io_backend: Some(self.primary_backend.clone()),
                    chunks: None,
                })
            }
        }
    }

    /// `envoy --store S --io IO [--json] store add FILE`, checked against the
    /// input: a wrong content hash is a correctness bug and stops the bench.
    fn add(
        &self,
        store: &Path,
        input: &InputFile,
        io: &str,
        sample_rss: bool,
    ) -> Result<(RunOutcome, AddOutput)> {
        let (expected, size) = (&input.content_blake3, input.size);
        let out = harness::run_timed(
            self.envoy_command(store, io)
                .args(["--json", "store", "add"])
                .arg(&input.path),
            sample_rss,
            harness::run_deadline(size),
        )?;
        let add: AddOutput = serde_json::from_str(out.stdout.trim()).with_context(|| {
            format!(
                "envoy --json store add printed {:?}, not one JSON object with id, content_blake3, size, chunks, io_backend",
                out.stdout
            )
        })?;
        ensure!(
            add.content_blake3 == *expected,
            "CORRECTNESS BUG: envoy store add (--io {io}) reported content_blake3 {}, b3sum of the input is {expected}",
            add.content_blake3
        );
        ensure!(
            add.size == size,
            "CORRECTNESS BUG: envoy store add (--io {io}) reported size {}, the input has {size} bytes",
            add.size
        );
        ensure!(!add.id.is_empty(), "envoy store add reported an empty id");
        if io != "auto" {
            ensure!(
                add.io_backend == io,
                "envoy was asked for --io {io} but reports io_backend {:?}",
                add.io_backend
            );
        }
        Ok((out, add))
    }

    fn envoy_command(&self, store: &Path, io: &str) -> Command {
        let mut command = Command::new(&self.envoy);
        command.arg("--store").arg(store).args(["--io", io]);
        command
    }

    /// Peak RssAnon of one add of a freshly generated `size`-byte file.
    fn peak_rss_at(&self, size: u64, seed: u64) -> Result<Option<u64>> {
        let store = self.work.path().join("store-rss");
        let input = generate_file(&self.work.path().join("rss-input.bin"), size, seed)?;
        harness::remove_path(&store)?;
        let (out, _) = self.add(&store, &input, &self.primary_io, true)?;
        harness::remove_path(&store)?;
        harness::remove_path(&input.path)?;
        eprintln!(
            "rss probe  add of {:<8} {:8.3} s, peak RssAnon {} MiB",
            size_label(size),
            out.seconds,
            harness::fmt_opt(out.peak_rss_anon_bytes.map(mib), 1)
        );
        Ok(out.peak_rss_anon_bytes)
    }
}

fn summarize(
    report: &mut Report,
    ingest: &Ingest,
    contenders: &[Contender],
    rss_by_size: &[(u64, Option<u64>)],
) {
    let find = |kind| contenders.iter().find(|c| c.kind == kind);
    let median = |kind| find(kind).and_then(|c| harness::Stats::of(&c.seconds).map(|s| s.median));

    for kind in [
        Kind::CpSync,
        Kind::B3sum,
        Kind::B3sumOneThread,
        Kind::AddPrimary,
        Kind::AddPortable,
        Kind::Verify,
        Kind::Export,
    ] {
        let row = match find(kind) {
            Some(c) => {
                let mut row =
                    ResultRow::new(c.name.clone(), &c.seconds).with_bytes(ingest.input.size);
                row.io_backend = c.io_backend.clone();
                row.peak_rss_anon_mib = c.peak_rss_anon_bytes.map(mib);
                if let Some(chunks) = c.chunks {
                    row.extra.insert("chunks".to_owned(), chunks.into());
                }
                row
            }
            // Only the b3sum rows can be missing (not installed).
            None if kind == Kind::B3sum => ResultRow::new("b3sum", &[]),
            None if kind == Kind::B3sumOneThread => ResultRow::new("b3sum --num-threads 1", &[]),
            None => continue,
        };
        report.results.push(row);
    }

    let add_primary = median(Kind::AddPrimary);
    let add_portable = median(Kind::AddPortable);
    let ingest_vs_cp = ratio(median(Kind::CpSync), add_primary);
    let verify_vs_b3sum = ratio(median(Kind::B3sum), median(Kind::Verify));
    let primary_is_uring = ingest.primary_backend == "uring";
    let portable_vs_uring = ratio(add_primary, add_portable).filter(|_| primary_is_uring);
    if !primary_is_uring {
        report.notes.push(format!(
            "the main add ran on {:?}, not uring: portable_vs_uring is null",
            ingest.primary_backend
        ));
    }
    let peak_rss = [Kind::AddPrimary, Kind::AddPortable]
        .into_iter()
        .filter_map(|k| find(k).and_then(|c| c.peak_rss_anon_bytes))
        .max()
        .map(mib);
    if peak_rss.is_none() {
        report
            .notes
            .push("no RssAnon sample of an add run (it ended before the first sample)".to_owned());
    }

    let ratios = &mut report.ratios;
    ratios.insert("ingest_vs_cp_sync".to_owned(), ingest_vs_cp);
    ratios.insert(
        "ingest_portable_vs_cp_sync".to_owned(),
        ratio(median(Kind::CpSync), add_portable),
    );
    ratios.insert("verify_vs_b3sum".to_owned(), verify_vs_b3sum);
    ratios.insert("portable_vs_uring".to_owned(), portable_vs_uring);
    ratios.insert("ingest_peak_rss_mib".to_owned(), peak_rss);
    for &(size, peak) in rss_by_size {
        ratios.insert(
            format!("ingest_peak_rss_mib_{}", size_label(size)),
            peak.map(mib),
        );
    }

    let goals = &mut report.goals;
    goals.insert(
        "ingest_vs_cp_sync".to_owned(),
        Goal::at_least(INGEST_VS_CP_SYNC_MIN, ingest_vs_cp),
    );
    goals.insert(
        "verify_vs_b3sum".to_owned(),
        Goal::at_least(VERIFY_VS_B3SUM_MIN, verify_vs_b3sum),
    );
    goals.insert(
        "portable_vs_uring".to_owned(),
        Goal::at_least(PORTABLE_VS_URING_MIN, portable_vs_uring),
    );
    goals.insert(
        "ingest_peak_rss_mib".to_owned(),
        Goal::at_most(INGEST_PEAK_RSS_MIB_MAX, peak_rss),
    );
    report.notes.push(
        "io_backend is null for baselines (cp, b3sum): they run no Vigo IO backend".to_owned(),
    );
}

/// Writes `size` bytes from a PRNG seeded with `seed` in [`IO_BLOCK_BYTES`]
/// blocks, hashing as it goes, and fsyncs the file. Generating and hashing
/// run on one thread, writing on another, so a 4 GiB input costs about what
/// the disk takes to absorb it.
pub(crate) fn generate_file(path: &Path, size: u64, seed: u64) -> Result<InputFile> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(GENERATE_BLOCKS_IN_FLIGHT);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(GENERATE_BLOCKS_IN_FLIGHT);
    for _ in 0..GENERATE_BLOCKS_IN_FLIGHT {
        empty_tx
            .send(vec![0u8; IO_BLOCK_BYTES])
            .expect("the receiver is alive in this scope");
    }
    let content_blake3 = thread::scope(|s| {
        // Owned by this closure so that an early return drops it and the
        // generator, waiting for an empty block, sees the hang-up.
        let empty_tx = empty_tx;
        let generator = s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut hasher = blake3::Hasher::new();
            let mut left = size;
            while left > 0 {
                // The writer hung up: it failed, and reports why.
                let Ok(mut block) = empty_rx.recv() else {
                    break;
                };
                let len = usize::try_from(left).map_or(IO_BLOCK_BYTES, |l| l.min(IO_BLOCK_BYTES));
                block.truncate(len);
                rng.fill_bytes(&mut block);
                hasher.update(&block);
                left -= len as u64;
                if full_tx.send(block).is_err() {
                    break;
                }
            }
            hasher.finalize().to_hex().to_string()
        });
        for mut block in full_rx {
            file.write_all(&block)
                .with_context(|| format!("cannot write {}", path.display()))?;
            block.resize(IO_BLOCK_BYTES, 0);
            // The generator stops asking once it has produced `size` bytes.
            let _ = empty_tx.send(block);
        }
        generator
            .join()
            .map_err(|_| anyhow::anyhow!("input generator thread panicked"))
    })?;
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))?;
    Ok(InputFile {
        path: path.to_owned(),
        size,
        content_blake3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_input_is_reproducible_and_hash_matches() {
        let dir = std::env::temp_dir().join(format!("vigo-perf-gen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        // Not a multiple of the block size, to cover the short last block.
        let size = IO_BLOCK_BYTES as u64 + 12_345;
        let hash_a = generate_file(&a, size, 7).unwrap().content_blake3;
        let hash_b = generate_file(&b, size, 7).unwrap().content_blake3;
        assert_eq!(std::fs::metadata(&a).unwrap().len(), size);
        assert_eq!(hash_a, hash_b);
        assert_eq!(hash_a, harness::blake3_file(&a).unwrap());
        assert_ne!(hash_a, generate_file(&b, size, 8).unwrap().content_blake3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn add_output_contract_parses() {
        let text =
            r#"{"id":"v1-b3-00","content_blake3":"ab","size":3,"chunks":1,"io_backend":"uring"}"#;
        let add: AddOutput = serde_json::from_str(text).unwrap();
        assert_eq!(
            (add.size, add.chunks, add.io_backend.as_str()),
            (3, 1, "uring")
        );
    }
}
