//! Running the matrix: per target, build, run what can run here, measure.
//!
//! Everything goes through `cargo` in the workspace root with the usual
//! target dir (`CARGO_TARGET_DIR` is honoured), so what the matrix builds is
//! what a developer's `cargo test --target X` builds. Logs of every step go
//! to `<target dir>/hw-targets/logs/`; the rows keep only counts and facts.
//!
//! Rows, in order (`--quick` keeps those marked q):
//! - host `io_uring`: engine and agent suites, `envoy status`, ingest;
//! - host `portable forced`: agent suite with every envoy forced to
//!   `VIGO_IO=portable`, status and ingest with `--io portable`;
//! - host `seccomp EPERM` and `seccomp ENOSYS` (q): engine and agent test
//!   binaries under `vigo-noring`, status (and ingest) under it;
//! - host `io_uring_disabled=2` (only with `--sysctl`): the same, serialized,
//!   with the system-wide switch set and restored;
//! - aarch64 (q: engine suite only, no ingest) and riscv64 under qemu-user;
//! - darwin and FreeBSD (q): `cargo check` of engine, substrate and agent.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::report::{Host, Ingest, Report, Row, TestCounts};
use crate::setup;
use crate::sys;
use crate::targets::{self, HOST, Reach, Target};
use crate::testlog;

/// Size of the random file `envoy store add` ingests.
pub const INGEST_BYTES: u64 = 256 << 20;
/// Seed of the ingest file's bytes: fixed, so every run ingests the same file.
const INGEST_SEED: u64 = 0x5eed_0000_0000_0004;
/// Timed ingests per native row (best counts); one under emulation.
const INGEST_RUNS_NATIVE: u32 = 3;
/// How the matrix builds: the workspace's dev profile with line tables
/// instead of full debug info and no incremental state. Measured on an
/// aarch64 engine test build from a cold target dir: 356 instead of 500
/// CPU-seconds. Nothing the tests or ingest figures depend on changes.
pub const BUILD_ENV: [(&str, &str); 2] = [
    ("CARGO_PROFILE_DEV_DEBUG", "line-tables-only"),
    ("CARGO_INCREMENTAL", "0"),
];
/// Crates `cargo check` covers on targets that cannot build or run here.
const CHECK_PACKAGES: [&str; 3] = ["engine", "substrate", "agent"];

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub quick: bool,
    /// Only these triples (all of the mode's when `None`).
    pub targets: Option<Vec<String>>,
    /// Add the serialized `kernel.io_uring_disabled=2` row (system-wide!).
    pub sysctl: bool,
}

/// Runs the selected rows; progress goes to stderr.
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let selected = select(opts)?;
    let m = Matrix::new(opts.quick)?;
    let host = host_facts(&m.root);
    if let Some(v) = sys::restore_leftover(&m.sysctl_saved())? {
        eprintln!(
            "hw-targets: restored kernel.io_uring_disabled={v} left set by an interrupted run"
        );
    }

    let missing = setup::ensure(&selected);
    let mut rows = Vec::new();
    for t in &selected {
        let lacking = missing.get(t.triple);
        match t.reach {
            Reach::Native => rows.extend(m.host_rows(opts, lacking)),
            Reach::Emulated => rows.push(m.emulated_row(t, lacking)),
            Reach::Check => rows.push(m.check_row(t, lacking)),
        }
    }

    let report = Report {
        schema: crate::report::SCHEMA,
        mode: if opts.quick { "quick" } else { "full" }.into(),
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        host,
        rows,
    };
    let saved = m
        .work
        .join("reports")
        .join(format!("{started_unix_s}.json"));
    if fs::create_dir_all(saved.parent().expect("has parent")).is_ok() {
        let _ = fs::write(&saved, report.to_json());
        eprintln!("hw-targets: report saved to {}", saved.display());
    }
    Ok(report)
}

fn select(opts: &Options) -> Result<Vec<&'static Target>> {
    if let Some(wanted) = &opts.targets {
        for w in wanted {
            if targets::find(w).is_none() {
                let known: Vec<&str> = targets::TARGETS.iter().map(|t| t.triple).collect();
                bail!("unknown target {w}; known: {}", known.join(", "));
            }
        }
    }
    Ok(targets::TARGETS
        .iter()
        .filter(|t| !opts.quick || targets::QUICK.contains(&t.triple))
        .filter(|t| {
            opts.targets
                .as_ref()
                .is_none_or(|w| w.iter().any(|w| w == t.triple))
        })
        .collect())
}

/// A binary cargo built.
#[derive(Clone, Debug)]
struct Artifact {
    /// Cargo target name (`envoy`, `store_matrix`, `engine`).
    name: String,
    /// A test harness binary (unit or integration tests).
    test: bool,
    executable: PathBuf,
    /// The package's directory: cargo runs tests there.
    package_dir: PathBuf,
}

/// The outcome of one `cargo build/test --no-run/check --message-format=json`.
#[derive(Debug, Default)]
struct Build {
    ok: bool,
    artifacts: Vec<Artifact>,
    /// `crate: message` of each error, in order.
    errors: Vec<String>,
    /// `crate: message` of each warning.
    warnings: Vec<String>,
}

impl Build {
    fn tests(&self) -> Vec<Artifact> {
        self.artifacts.iter().filter(|a| a.test).cloned().collect()
    }

    fn binary(&self, name: &str) -> Option<PathBuf> {
        self.artifacts
            .iter()
            .find(|a| !a.test && a.name == name)
            .map(|a| a.executable.clone())
    }

    /// Notes for a row: the first errors, and warnings in short.
    fn notes(&self, what: &str) -> Vec<String> {
        let mut notes: Vec<String> = self
            .errors
            .iter()
            .take(3)
            .map(|e| format!("{what}: {e}"))
            .collect();
        if self.errors.len() > 3 {
            notes.push(format!("{what}: {} more errors", self.errors.len() - 3));
        }
        if !self.warnings.is_empty() {
            let mut distinct = self.warnings.clone();
            distinct.dedup();
            notes.push(format!(
                "{what}: {} warning(s), e.g. {}",
                self.warnings.len(),
                distinct[0]
            ));
        }
        notes
    }
}

/// Facts `envoy --json status` reports that the table shows.
#[derive(Clone, Debug, Default)]
struct Status {
    io_backend: Option<String>,
    io_fallback_reason: Option<String>,
    uring_error: Option<String>,
    blake3: Option<String>,
}

struct Matrix {
    root: PathBuf,
    cargo: OsString,
    /// `<target dir>/hw-targets`: logs, the ingest file, scratch stores.
    work: PathBuf,
    logs: PathBuf,
    quick: bool,
}

impl Matrix {
    fn new(quick: bool) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("hw-targets sits in the workspace")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run cargo metadata")?;
        if !out.status.success() {
            bail!("cargo metadata failed");
        }
        let meta: Value = serde_json::from_slice(&out.stdout)?;
        let target_dir = meta["target_directory"]
            .as_str()
            .context("cargo metadata without target_directory")?;
        let work = Path::new(target_dir).join("hw-targets");
        let logs = work.join("logs");
        fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
        fs::create_dir_all(work.join("tmp"))?;
        Ok(Matrix {
            root,
            cargo,
            work,
            logs,
            quick,
        })
    }

    fn sysctl_saved(&self) -> PathBuf {
        self.work.join("io_uring_disabled.saved")
    }

    fn log_path(&self, step: &str) -> PathBuf {
        self.logs.join(format!("{step}.log"))
    }

    /// Creates (or empties) the log of `step`, open for appending: the
    /// commands a step runs append to it too.
    fn log_file(&self, step: &str) -> Result<File> {
        let path = self.log_path(step);
        File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(OpenOptions::new().append(true).open(&path)?)
    }

    /// `cargo` in the workspace root, with [`BUILD_ENV`] unless the caller's
    /// environment already sets those.
    fn cargo(&self) -> Command {
        let mut c = Command::new(&self.cargo);
        c.current_dir(&self.root);
        for (k, v) in BUILD_ENV {
            if std::env::var_os(k).is_none() {
                c.env(k, v);
            }
        }
        c
    }

    // ---- steps -------------------------------------------------------------

    /// Runs a cargo command that takes `--message-format=json`; stderr goes to
    /// the step's log, diagnostics are collected.
    fn build(&self, step: &str, args: &[&str]) -> Build {
        eprintln!("hw-targets: [{step}] cargo {}", args.join(" "));
        let t = Instant::now();
        let mut build = Build::default();
        let log = match self.log_file(step) {
            Ok(l) => l,
            Err(e) => {
                build.errors.push(format!("{e:#}"));
                return build;
            }
        };
        let mut log_stderr = log.try_clone().expect("dup a log fd");
        let _ = writeln!(log_stderr, "$ cargo {}", args.join(" "));
        let out = self
            .cargo()
            .args(args)
            .arg("--message-format=json")
            .stdin(Stdio::null())
            .stderr(log_stderr)
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                build.errors.push(format!("cannot run cargo: {e}"));
                return build;
            }
        };
        let mut log = BufWriter::new(log);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            match msg["reason"].as_str() {
                Some("compiler-artifact") => {
                    if let Some(a) = artifact(&msg) {
                        build.artifacts.push(a);
                    }
                }
                Some("compiler-message") => {
                    let m = &msg["message"];
                    let _ = write!(log, "{}", m["rendered"].as_str().unwrap_or(""));
                    let text = m["message"].as_str().unwrap_or("?");
                    let code = m["code"]["code"]
                        .as_str()
                        .map(|c| format!("[{c}]"))
                        .unwrap_or_default();
                    let krate = msg["target"]["name"].as_str().unwrap_or("?");
                    let summary = format!(
                        "{krate}: {}{code}: {text}",
                        m["level"].as_str().unwrap_or("")
                    );
                    match m["level"].as_str() {
                        Some("error") => build.errors.push(summary),
                        Some("warning") => build.warnings.push(summary),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        drop(log);
        build.ok = out.status.success();
        if !build.ok && build.errors.is_empty() {
            // Not a rustc diagnostic (a build script, the resolver): cargo's own words.
            let text = fs::read_to_string(self.log_path(step)).unwrap_or_default();
            let first = text
                .lines()
                .find(|l| l.starts_with("error"))
                .unwrap_or("cargo failed; see the log");
            build.errors.push(first.to_string());
        }
        eprintln!(
            "hw-targets: [{step}] {} in {:.0} s",
            if build.ok { "ok" } else { "FAILED" },
            t.elapsed().as_secs_f64()
        );
        build
    }

    /// Runs `cargo test` (already built) and tallies its output.
    fn cargo_test(
        &self,
        step: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(TestCounts, String)> {
        eprintln!("hw-targets: [{step}] cargo {}", args.join(" "));
        let t = Instant::now();
        let mut log = self.log_file(step)?;
        writeln!(log, "$ {} cargo {}", show_env(env), args.join(" "))?;
        let mut cmd = self.cargo();
        cmd.args(args).envs(env.iter().copied());
        let output = run_into_log(&mut cmd, &self.log_path(step))?;
        let counts = testlog::tally(&output);
        eprintln!(
            "hw-targets: [{step}] {} passed, {} failed in {:.0} s",
            counts.passed,
            counts.failed + counts.aborted_suites,
            t.elapsed().as_secs_f64()
        );
        Ok((counts, output))
    }

    /// Runs test binaries the way cargo does (in their package directory,
    /// one after another), each prefixed by `prefix`, and tallies them.
    fn run_tests(
        &self,
        step: &str,
        bins: &[Artifact],
        prefix: &[String],
        env: &[(&str, &str)],
    ) -> Result<TestCounts> {
        eprintln!(
            "hw-targets: [{step}] {} test binaries{}",
            bins.len(),
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" under {}", prefix.join(" "))
            }
        );
        let t = Instant::now();
        let mut text = String::new();
        let mut log = self.log_file(step)?;
        for bin in bins {
            let line = format!(
                "     Running {}{} ({})\n",
                if env.is_empty() {
                    String::new()
                } else {
                    format!("{} ", show_env(env))
                },
                prefix
                    .iter()
                    .map(String::as_str)
                    .chain([bin.name.as_str()])
                    .collect::<Vec<_>>()
                    .join(" "),
                bin.executable.display()
            );
            log.write_all(line.as_bytes())?;
            text.push_str(&line);
            let mut cmd = command(prefix, &bin.executable);
            cmd.arg("--nocapture")
                .current_dir(&bin.package_dir)
                .env("CARGO_MANIFEST_DIR", &bin.package_dir)
                .envs(env.iter().copied());
            match run_into_log(&mut cmd, &self.log_path(step)) {
                Ok(out) => text.push_str(&out),
                Err(e) => writeln!(log, "cannot run: {e:#}")?,
            }
            if sys::interrupted().is_some() {
                break;
            }
        }
        let counts = testlog::tally(&text);
        eprintln!(
            "hw-targets: [{step}] {} passed, {} failed, {} skipped in {:.0} s",
            counts.passed,
            counts.failed + counts.aborted_suites,
            counts.skipped,
            t.elapsed().as_secs_f64()
        );
        Ok(counts)
    }

    fn status(
        &self,
        step: &str,
        prefix: &[String],
        envoy: &Path,
        io: Option<&str>,
    ) -> Result<Status> {
        let mut cmd = command(prefix, envoy);
        if let Some(io) = io {
            cmd.args(["--io", io]);
        }
        cmd.args(["--json", "status"]);
        let mut log = self.log_file(step)?;
        writeln!(log, "$ {cmd:?}")?;
        let out = cmd
            .env_remove("VIGO_IO")
            .stdin(Stdio::null())
            .stderr(log)
            .output()
            .context("cannot run envoy status")?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "envoy status ({}) printed no JSON: {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let s = |k: &str| v[k].as_str().map(str::to_string);
        Ok(Status {
            io_backend: s("io_backend"),
            io_fallback_reason: s("io_fallback_reason"),
            uring_error: s("uring_error"),
            blake3: s("blake3_simd"),
        })
    }

    /// Times `envoy --store NEW store add FILE` (a fresh store each run, so
    /// nothing dedups); the best of `runs`.
    fn ingest(
        &self,
        step: &str,
        prefix: &[String],
        envoy: &Path,
        io: Option<&str>,
        runs: u32,
        emulated: bool,
    ) -> Result<Ingest> {
        let file = self.ingest_file()?;
        let mut log = self.log_file(step)?;
        let mut best = f64::INFINITY;
        for i in 0..runs {
            let store = self.work.join("tmp").join(format!("store-{step}-{i}"));
            let _ = fs::remove_dir_all(&store);
            let mut cmd = command(prefix, envoy);
            cmd.arg("--store").arg(&store);
            if let Some(io) = io {
                cmd.args(["--io", io]);
            }
            cmd.args(["store", "add"]).arg(&file);
            writeln!(log, "$ {cmd:?}")?;
            let t = Instant::now();
            let out = cmd
                .env_remove("VIGO_IO")
                .stdin(Stdio::null())
                .stderr(log.try_clone()?)
                .output()
                .context("cannot run envoy store add")?;
            let secs = t.elapsed().as_secs_f64();
            let _ = fs::remove_dir_all(&store);
            writeln!(
                log,
                "{} {:.3} s",
                String::from_utf8_lossy(&out.stdout).trim(),
                secs
            )?;
            if !out.status.success() {
                bail!("envoy store add exited {} (see {step}.log)", out.status);
            }
            best = best.min(secs);
        }
        Ok(Ingest {
            bytes: INGEST_BYTES,
            seconds: best,
            gb_per_s: INGEST_BYTES as f64 / best / 1e9,
            runs,
            emulated,
            profile: format!(
                "dev, debug={}",
                std::env::var("CARGO_PROFILE_DEV_DEBUG")
                    .unwrap_or_else(|_| BUILD_ENV[0].1.to_string())
            ),
        })
    }

    /// The random file to ingest, made once (a fixed seed: the same bytes
    /// every run, so figures compare).
    fn ingest_file(&self) -> Result<PathBuf> {
        let path = self.work.join("tmp").join("ingest-256MiB.bin");
        if fs::metadata(&path).is_ok_and(|m| m.len() == INGEST_BYTES) {
            return Ok(path);
        }
        let tmp = path.with_extension("partial");
        let mut out = BufWriter::new(File::create(&tmp)?);
        let mut state = INGEST_SEED;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..INGEST_BYTES / block.len() as u64 {
            for word in block.chunks_exact_mut(8) {
                word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
            }
            out.write_all(&block)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    // ---- rows --------------------------------------------------------------

    fn host_rows(&self, opts: &Options, lacking: Option<&Vec<String>>) -> Vec<Row> {
        let t = Instant::now();
        let mut variants: Vec<&str> = Vec::new();
        if !self.quick {
            variants.extend(["io_uring", "portable forced"]);
        }
        variants.extend(["seccomp EPERM", "seccomp ENOSYS"]);
        if opts.sysctl {
            variants.push("io_uring_disabled=2");
        }
        let mut rows: Vec<Row> = variants.iter().map(|v| Row::new(HOST, v)).collect();
        if let Some(l) = lacking {
            for row in &mut rows {
                row.notes.push(format!("not set up: {}", l.join(", ")));
            }
            return rows;
        }

        let build = self.build(
            "host-build",
            &[
                "test", "--no-run", "--locked", "-p", "engine", "-p", "agent",
            ],
        );
        let noring = self.build(
            "host-noring",
            &[
                "build",
                "--locked",
                "-p",
                "hw-targets",
                "--bin",
                "vigo-noring",
            ],
        );
        let envoy = build.binary("envoy");
        let noring_bin = noring.binary("vigo-noring");
        let bins = build.tests();
        let agent_bins: Vec<Artifact> = bins
            .iter()
            .filter(|a| a.package_dir.ends_with("agent"))
            .cloned()
            .collect();
        let build_secs = t.elapsed().as_secs_f64();

        for row in &mut rows {
            let t = Instant::now();
            row.built = Some(build.ok && envoy.is_some());
            row.notes.extend(build.notes("build"));
            let Some(envoy) = &envoy else {
                row.duration_s = build_secs;
                continue;
            };
            let result = match row.variant.as_str() {
                "io_uring" => self.uring_row(row, envoy),
                "portable forced" => self.portable_row(row, envoy, &agent_bins),
                "seccomp EPERM" | "seccomp ENOSYS" => {
                    let errno = row.variant.trim_start_matches("seccomp ").to_string();
                    row.built = Some(row.built == Some(true) && noring.ok && noring_bin.is_some());
                    row.notes.extend(noring.notes("vigo-noring"));
                    match &noring_bin {
                        Some(n) => self.seccomp_row(row, envoy, n, &errno, &bins),
                        None => Ok(()),
                    }
                }
                "io_uring_disabled=2" => self.sysctl_row(row, envoy, &bins),
                other => unreachable!("unknown host variant {other}"),
            };
            if let Err(e) = result {
                row.fail(format!("{e:#}"));
            }
            row.duration_s = t.elapsed().as_secs_f64();
        }
        if let Some(first) = rows.first_mut() {
            first.duration_s += build_secs;
        }
        rows
    }

    fn uring_row(&self, row: &mut Row, envoy: &Path) -> Result<()> {
        row.tests = Some(
            self.cargo_test(
                "host-uring-tests",
                &[
                    "test",
                    "--locked",
                    "--no-fail-fast",
                    "-p",
                    "engine",
                    "-p",
                    "agent",
                    "--",
                    "--nocapture",
                ],
                &[],
            )?
            .0,
        );
        let st = self.status("host-uring-status", &[], envoy, None)?;
        if st.io_backend.as_deref() != Some("uring") {
            row.notes.push(format!(
                "io_uring unavailable on this host: {}",
                st.io_fallback_reason
                    .as_deref()
                    .or(st.uring_error.as_deref())
                    .unwrap_or("?")
            ));
        }
        row.apply(st);
        if !self.quick {
            row.ingest = Some(self.ingest(
                "host-uring-ingest",
                &[],
                envoy,
                None,
                INGEST_RUNS_NATIVE,
                false,
            )?);
        }
        Ok(())
    }

    fn portable_row(&self, row: &mut Row, envoy: &Path, agent_bins: &[Artifact]) -> Result<()> {
        // The engine's store_matrix already runs portable+direct and
        // portable+buffered in the io_uring row. Here every envoy the agent
        // suite spawns is forced: the runner prefix sets VIGO_IO (tests clear
        // it from their own environment). Seccomp tests skip under a runner.
        row.tests = Some(self.run_tests(
            "host-portable-tests",
            agent_bins,
            &[],
            &[("VIGO_TEST_RUNNER", "env VIGO_IO=portable")],
        )?);
        row.notes
            .push("agent suite with VIGO_TEST_RUNNER='env VIGO_IO=portable'; engine backends are in the io_uring row".into());
        let st = self.status("host-portable-status", &[], envoy, Some("portable"))?;
        row.expect_backend(&st, "portable");
        row.apply(st);
        row.ingest = Some(self.ingest(
            "host-portable-ingest",
            &[],
            envoy,
            Some("portable"),
            INGEST_RUNS_NATIVE,
            false,
        )?);
        Ok(())
    }

    fn seccomp_row(
        &self,
        row: &mut Row,
        envoy: &Path,
        noring: &Path,
        errno: &str,
        bins: &[Artifact],
    ) -> Result<()> {
        let prefix = vec![
            noring.display().to_string(),
            "--errno".into(),
            errno.into(),
            "--".into(),
        ];
        let step = format!("host-{}", errno.to_lowercase());
        let st = self.status(&format!("{step}-status"), &prefix, envoy, None)?;
        row.expect_backend(&st, "portable");
        if !st
            .io_fallback_reason
            .as_deref()
            .is_some_and(|r| r.contains(errno_text(errno)))
        {
            row.fail(format!(
                "fallback reason should name {errno}: {:?}",
                st.io_fallback_reason
            ));
        }
        row.apply(st);
        row.tests = Some(self.run_tests(&format!("{step}-tests"), bins, &prefix, &[])?);
        if !self.quick {
            row.ingest =
                Some(self.ingest(&format!("{step}-ingest"), &prefix, envoy, None, 1, false)?);
        }
        Ok(())
    }

    fn sysctl_row(&self, row: &mut Row, envoy: &Path, bins: &[Artifact]) -> Result<()> {
        if !sys::uring_switch_exists() {
            row.notes
                .push("kernel.io_uring_disabled does not exist (Linux < 6.6)".into());
            return Ok(());
        }
        let guard = sys::UringDisabled::set(2, &self.sysctl_saved())
            .context("cannot set kernel.io_uring_disabled=2 (needs root)")?;
        row.notes.push(format!(
            "system-wide: kernel.io_uring_disabled was {}, set to 2 for this row, restored after",
            guard.previous()
        ));
        let st = self.status("host-sysctl-status", &[], envoy, None);
        let tests = if sys::interrupted().is_none() {
            Some(self.run_tests("host-sysctl-tests", bins, &[], &[]))
        } else {
            None
        };
        drop(guard);
        if let Some(signal) = sys::interrupted() {
            eprintln!(
                "hw-targets: interrupted by signal {signal}; kernel.io_uring_disabled restored"
            );
            std::process::exit(128 + signal);
        }
        let st = st?;
        row.expect_backend(&st, "portable");
        row.apply(st);
        row.tests = tests.transpose()?;
        Ok(())
    }

    fn emulated_row(&self, t: &Target, lacking: Option<&Vec<String>>) -> Row {
        let started = Instant::now();
        let mut row = Row::new(t.triple, "qemu-user");
        if let Some(l) = lacking {
            row.notes.push(format!("not set up: {}", l.join(", ")));
            return row;
        }
        let runner = t.runner.expect("emulated targets have runners");
        let name = t.triple.split('-').next().expect("triple");
        // --quick: the engine suite only. The agent suite under qemu is the
        // long part, and envoy alone resolves features differently from the
        // engine suite, which rebuilds most dependencies (minutes on 2 cores).
        let mut packages = vec!["-p", "engine"];
        if !self.quick {
            packages.extend(["-p", "agent"]);
        }
        let mut args = vec!["test", "--no-run", "--locked", "--target", t.triple];
        args.extend(&packages);
        let tests = self.build(&format!("{name}-build"), &args);
        row.notes.extend(tests.notes("build"));
        let envoy = tests.binary("envoy");
        row.built = Some(tests.ok && (self.quick || envoy.is_some()));
        row.notes.push(if self.quick {
            "--quick: engine suite only; no envoy, so no status or ingest".into()
        } else {
            "ingest runs under qemu-user: it measures the emulator, not the architecture".into()
        });
        let result = (|| -> Result<()> {
            if tests.ok {
                let mut args = vec!["test", "--locked", "--no-fail-fast", "--target", t.triple];
                args.extend(&packages);
                args.extend(["--", "--nocapture"]);
                let (counts, output) = self.cargo_test(
                    &format!("{name}-tests"),
                    &args,
                    &[("VIGO_TEST_RUNNER", runner)],
                )?;
                row.tests = Some(counts);
                if envoy.is_none() {
                    // The engine suite probes like envoy does and says so.
                    if let Some(reason) = testlog::uring_skip_reason(&output) {
                        row.io_backend = Some("portable".into());
                        row.io_fallback_reason = Some(reason.to_string());
                        row.notes
                            .push(format!("io: the engine suite's probe: {reason}"));
                    }
                }
            }
            let Some(envoy) = &envoy else { return Ok(()) };
            let prefix = targets::runner_argv(runner);
            let st = self.status(&format!("{name}-status"), &prefix, envoy, None)?;
            row.expect_backend(&st, "portable");
            row.apply(st);
            if !self.quick {
                row.ingest =
                    Some(self.ingest(&format!("{name}-ingest"), &prefix, envoy, None, 1, true)?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            row.fail(format!("{e:#}"));
        }
        row.duration_s = started.elapsed().as_secs_f64();
        row
    }

    fn check_row(&self, t: &Target, lacking: Option<&Vec<String>>) -> Row {
        let started = Instant::now();
        let mut row = Row::new(t.triple, "check");
        if let Some(l) = lacking {
            row.notes.push(format!("not set up: {}", l.join(", ")));
            return row;
        }
        let mut args = vec!["check", "--locked", "--target", t.triple];
        for p in CHECK_PACKAGES {
            args.extend(["-p", p]);
        }
        let build = self.build(&format!("{}-check", t.triple), &args);
        row.built = Some(build.ok);
        row.notes.extend(build.notes("check"));
        row.notes.push(check_only_reason(t.triple).into());
        row.duration_s = started.elapsed().as_secs_f64();
        row
    }
}

impl Row {
    /// Something the matrix itself found wrong: shown as a note, fails the row.
    fn fail(&mut self, why: String) {
        self.notes.push(format!("FAILED: {why}"));
        self.failures.push(why);
    }

    fn expect_backend(&mut self, st: &Status, want: &str) {
        if st.io_backend.as_deref() != Some(want) {
            self.fail(format!(
                "expected the {want} backend, envoy status says {:?} ({:?})",
                st.io_backend, st.io_fallback_reason
            ));
        }
    }

    fn apply(&mut self, st: Status) {
        self.io_backend = st.io_backend;
        self.io_fallback_reason = st.io_fallback_reason;
        self.blake3 = st.blake3;
    }
}

/// Why a target is only checked, for its row and the README.
pub fn check_only_reason(triple: &str) -> &'static str {
    if triple.contains("apple") {
        "check only: linking and running need Apple's SDK and ld64, which are not \
         redistributable to Linux; io backend there is portable (no io_uring off Linux)"
    } else {
        "check only: no FreeBSD sysroot, linker or emulator here; io backend there \
         is portable (no io_uring off Linux)"
    }
}

/// The text `std::io::Error` gives for an errno name (what envoy's reason quotes).
fn errno_text(name: &str) -> &'static str {
    match name {
        "EPERM" => "Operation not permitted",
        "ENOSYS" => "Function not implemented",
        _ => "",
    }
}

fn artifact(msg: &Value) -> Option<Artifact> {
    let executable = msg["executable"].as_str()?;
    let manifest = msg["manifest_path"].as_str()?;
    Some(Artifact {
        name: msg["target"]["name"].as_str()?.to_string(),
        test: msg["profile"]["test"].as_bool().unwrap_or(false),
        executable: executable.into(),
        package_dir: Path::new(manifest).parent()?.to_path_buf(),
    })
}

fn command(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn show_env(env: &[(&str, &str)]) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}='{v}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with stdout and stderr appended to the file at `log`;
/// returns what it wrote there.
fn run_into_log(cmd: &mut Command, log: &Path) -> Result<String> {
    let file = OpenOptions::new().append(true).create(true).open(log)?;
    let from = file.metadata()?.len();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let bytes = fs::read(log)?;
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[from..]).into_owned())
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn host_facts(root: &Path) -> Host {
    let text = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(root)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    Host {
        // Others' work on a shared machine depresses every figure.
        load_avg_1m: fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok()),
        kernel: text("uname", &["-r"]),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rustc: text("rustc", &["--version"]),
        git_commit: text("git", &["rev-parse", "HEAD"]),
        git_dirty: text("git", &["status", "--porcelain"]).map(|s| !s.is_empty()),
    }
}
