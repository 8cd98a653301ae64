//! The matrix's result: one [`Row`] per target and variant, rendered as a
//! table for people and as one JSON object for comparing runs over time.
//! The JSON shape is versioned by [`Report::schema`]; add fields, never
//! change the meaning of one.

use serde::Serialize;

/// Bumped when a field changes meaning or goes away.
pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    /// `full` or `quick`.
    pub mode: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub host: Host,
    pub rows: Vec<Row>,
}

/// Where the matrix ran, so figures from different machines are not mixed up.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Host {
    pub kernel: Option<String>,
    pub cpus: usize,
    /// 1-minute load average when the run started (Linux): figures taken
    /// while other work ran are not comparable with quiet ones.
    pub load_avg_1m: Option<f64>,
    pub rustc: Option<String>,
    pub git_commit: Option<String>,
    /// Whether the working tree had uncommitted changes.
    pub git_dirty: Option<bool>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// Rust target triple.
    pub target: String,
    /// What distinguishes rows of one target: `io_uring`, `seccomp EPERM`, `qemu-user`, `check`.
    pub variant: String,
    /// Whether everything this row needs compiled; `None` when not attempted.
    pub built: Option<bool>,
    /// `None` when no tests run for this row.
    pub tests: Option<TestCounts>,
    /// The backend `envoy status` reports (`uring`, `portable`).
    pub io_backend: Option<String>,
    pub io_fallback_reason: Option<String>,
    pub ingest: Option<Ingest>,
    /// The BLAKE3 SIMD implementation `envoy status` reports.
    pub blake3: Option<String>,
    pub notes: Vec<String>,
    /// What the matrix itself found wrong (wrong backend, a step that could
    /// not run); each is also a `FAILED:` note.
    pub failures: Vec<String>,
    pub duration_s: f64,
}

/// Totals over every `test result:` line of a run, plus what libtest does not count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Distinct `SKIP ...` lines per test binary: tests that passed without exercising what they
    /// target because this host lacks it (io_uring, seccomp).
    pub skipped: u64,
    /// Test binaries that ran.
    pub suites: u64,
    /// Test binaries that exited without a `test result:` line (crashed,
    /// killed, or could not start).
    pub aborted_suites: u64,
}

impl TestCounts {
    pub fn add(&mut self, other: &TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.skipped += other.skipped;
        self.suites += other.suites;
        self.aborted_suites += other.aborted_suites;
    }

    pub fn ok(&self) -> bool {
        self.failed == 0 && self.aborted_suites == 0
    }
}

/// One timed `envoy store add` of a random file into a fresh store.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ingest {
    pub bytes: u64,
    /// Best of `runs`.
    pub seconds: f64,
    pub gb_per_s: f64,
    pub runs: u32,
    /// Under qemu-user: a figure about the emulator, not the architecture.
    pub emulated: bool,
    /// Cargo profile envoy was built with.
    pub profile: String,
}

impl Row {
    pub fn new(target: &str, variant: &str) -> Row {
        Row {
            target: target.to_string(),
            variant: variant.to_string(),
            ..Row::default()
        }
    }

    /// Whether this row shows nothing wrong: built, no failed or aborted
    /// tests, no failures. A row that could not be attempted fails.
    pub fn ok(&self) -> bool {
        self.built == Some(true)
            && self.tests.as_ref().is_none_or(TestCounts::ok)
            && self.failures.is_empty()
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.rows.iter().all(Row::ok)
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// A fixed-width table, then the notes it refers to by number.
    pub fn to_table(&self) -> String {
        let header = [
            "target",
            "variant",
            "built",
            "passed",
            "failed",
            "skipped",
            "io",
            "ingest GB/s",
            "blake3",
            "notes",
        ];
        let mut lines: Vec<[String; 10]> = vec![header.map(str::to_string)];
        let mut notes = Vec::new();
        for row in &self.rows {
            let first_note = notes.len() + 1;
            notes.extend(
                row.notes
                    .iter()
                    .map(|n| format!("{} {}: {n}", row.target, row.variant)),
            );
            let markers = (first_note..=notes.len())
                .map(|i| format!("[{i}]"))
                .collect::<String>();
            let dash = || "-".to_string();
            let count = |f: fn(&TestCounts) -> u64| {
                row.tests.as_ref().map_or_else(dash, |t| f(t).to_string())
            };
            lines.push([
                row.target.clone(),
                row.variant.clone(),
                match row.built {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => dash(),
                },
                count(|t| t.passed),
                count(|t| t.failed + t.aborted_suites),
                count(|t| t.skipped),
                row.io_backend.clone().unwrap_or_else(dash),
                row.ingest.as_ref().map_or_else(dash, |i| {
                    let emulated = if i.emulated { " (emulated)" } else { "" };
                    format!("{:.2}{emulated}", i.gb_per_s)
                }),
                row.blake3.clone().unwrap_or_else(dash),
                markers,
            ]);
        }
        let mut widths = [0usize; 10];
        for line in &lines {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&rule.join("  "));
                out.push('\n');
            }
        }
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            for (i, note) in notes.iter().enumerate() {
                out.push_str(&format!("[{}] {note}\n", i + 1));
            }
        }
        out.push_str(&format!(
            "\n{} mode, {:.1} min, load {} at start, {}\n",
            self.mode,
            self.duration_s / 60.0,
            self.host
                .load_avg_1m
                .map_or_else(|| "?".to_string(), |l| format!("{l:.1}")),
            if self.ok() { "all rows ok" } else { "FAILED" }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut uring = Row::new("x86_64-unknown-linux-gnu", "io_uring");
        uring.built = Some(true);
        uring.tests = Some(TestCounts {
            passed: 25,
            skipped: 1,
            suites: 4,
            ..TestCounts::default()
        });
        uring.io_backend = Some("uring".into());
        uring.blake3 = Some("avx2".into());
        uring.ingest = Some(Ingest {
            bytes: 256 << 20,
            seconds: 0.25,
            gb_per_s: 1.0737,
            runs: 3,
            emulated: false,
            profile: "dev".into(),
        });
        let mut arm = Row::new("aarch64-unknown-linux-gnu", "qemu-user");
        arm.built = Some(true);
        arm.tests = Some(TestCounts {
            passed: 20,
            failed: 1,
            suites: 3,
            ..TestCounts::default()
        });
        arm.io_backend = Some("portable".into());
        arm.ingest = Some(Ingest {
            bytes: 256 << 20,
            seconds: 2.0,
            gb_per_s: 0.134,
            runs: 1,
            emulated: true,
            profile: "dev".into(),
        });
        arm.notes = vec!["io_uring: ENOSYS under qemu-user".into()];
        let mut mac = Row::new("x86_64-apple-darwin", "check");
        mac.built = Some(false);
        mac.notes = vec!["substrate: error[E0583]".into(), "no SDK".into()];
        Report {
            schema: SCHEMA,
            mode: "full".into(),
            started_unix_s: 1_700_000_000,
            duration_s: 90.0,
            host: Host::default(),
            rows: vec![uring, arm, mac],
        }
    }

    #[test]
    fn table_has_one_line_per_row_and_numbered_notes() {
        let table = sample().to_table();
        let expect = "\
target                     variant    built  passed  failed  skipped  io        ingest GB/s      blake3  notes
-------------------------  ---------  -----  ------  ------  -------  --------  ---------------  ------  ------
x86_64-unknown-linux-gnu   io_uring   yes    25      0       1        uring     1.07             avx2
aarch64-unknown-linux-gnu  qemu-user  yes    20      1       0        portable  0.13 (emulated)  -       [1]
x86_64-apple-darwin        check      no     -       -       -        -         -                -       [2][3]

notes:
[1] aarch64-unknown-linux-gnu qemu-user: io_uring: ENOSYS under qemu-user
[2] x86_64-apple-darwin check: substrate: error[E0583]
[3] x86_64-apple-darwin check: no SDK

full mode, 1.5 min, load ? at start, FAILED
";
        assert_eq!(table, expect);
    }

    #[test]
    fn aborted_suites_count_as_failed_in_the_table() {
        let mut report = sample();
        report.rows.truncate(1);
        report.rows[0].tests.as_mut().unwrap().aborted_suites = 2;
        let table = report.to_table();
        let row = table.lines().nth(2).unwrap();
        assert!(row.contains("  25      2       1  "), "{row}");
        assert!(!report.ok());
    }

    #[test]
    fn json_keeps_every_field_with_stable_names() {
        let report = sample();
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["mode"], "full");
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["target"], "x86_64-unknown-linux-gnu");
        assert_eq!(rows[0]["built"], true);
        assert_eq!(rows[0]["tests"]["passed"], 25);
        assert_eq!(rows[0]["tests"]["skipped"], 1);
        assert_eq!(rows[0]["io_backend"], "uring");
        assert_eq!(rows[0]["ingest"]["bytes"], 256 << 20);
        assert_eq!(rows[0]["ingest"]["emulated"], false);
        assert_eq!(rows[1]["ingest"]["emulated"], true);
        assert_eq!(rows[2]["built"], false);
        assert!(rows[2]["tests"].is_null());
        assert_eq!(rows[2]["notes"][1], "no SDK");
    }

    #[test]
    fn a_row_is_ok_only_when_built_without_failures() {
        let report = sample();
        assert!(report.rows[0].ok());
        assert!(!report.rows[1].ok(), "a failed test");
        assert!(!report.rows[2].ok(), "not built");
        assert!(!Row::new("t", "v").ok(), "never attempted");
    }
}
