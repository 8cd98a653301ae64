//! Reading libtest's output: the `test result:` summary line each test
//! binary prints, and the `SKIP ...` lines our tests print when the host
//! lacks what they exercise.

use crate::report::TestCounts;

/// The counts of one `test result:` line, e.g.
/// `test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.36s`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultLine {
    pub ok: bool,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Parses one line; `None` unless it is a libtest summary.
pub fn parse_result_line(line: &str) -> Option<ResultLine> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (verdict, counts) = rest.split_once(". ")?;
    let ok = match verdict {
        "ok" => true,
        "FAILED" => false,
        _ => return None,
    };
    let mut result = ResultLine {
        ok,
        ..ResultLine::default()
    };
    let mut seen_passed = false;
    for part in counts.split(';') {
        let Some((n, what)) = part.trim().split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => {
                result.passed = n;
                seen_passed = true;
            }
            "failed" => result.failed = n,
            "ignored" => result.ignored = n,
            _ => {}
        }
    }
    seen_passed.then_some(result)
}

/// Whether `line` reports a skipped test (`SKIP <what>: <reason>`).
pub fn is_skip_line(line: &str) -> bool {
    line.trim_start().starts_with("SKIP ")
}

/// What the engine suite says when its backend probe refuses io_uring:
/// the reason after `SKIP uring backend in this run: `.
pub fn uring_skip_reason(output: &str) -> Option<&str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("SKIP uring backend in this run: "))
}

/// Whether `line` is cargo's announcement of a test binary
/// (`     Running tests/x.rs (target/debug/deps/x-1)`, `   Doc-tests engine`);
/// the matrix writes the same line before each binary it runs itself.
pub fn is_suite_start(line: &str) -> bool {
    let line = line.trim_start();
    (line.starts_with("Running ") && line.trim_end().ends_with(')'))
        || line.starts_with("Doc-tests ")
}

/// Totals over a whole log: every summary line and every distinct skip
/// line of each binary.
/// `suites` counts announced binaries; one announced without a summary
/// line after it (crashed, killed, could not start) is an aborted suite.
pub fn tally(output: &str) -> TestCounts {
    let mut counts = TestCounts::default();
    let mut started = 0u64;
    let mut results = 0u64;
    // A test may print the same skip once per case; count it once per binary.
    let mut skips = std::collections::HashSet::new();
    for line in output.lines() {
        if is_suite_start(line) {
            started += 1;
            skips.clear();
        } else if let Some(r) = parse_result_line(line) {
            results += 1;
            counts.passed += r.passed;
            counts.failed += r.failed;
            counts.ignored += r.ignored;
        } else if is_skip_line(line) && skips.insert(line.trim()) {
            counts.skipped += 1;
        }
    }
    counts.suites = started.max(results);
    counts.aborted_suites = started.saturating_sub(results);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expect: Option<(bool, u64, u64, u64)>) {
        let got = parse_result_line(line).map(|r| (r.ok, r.passed, r.failed, r.ignored));
        assert_eq!(got, expect, "{line:?}");
    }

    #[test]
    fn result_lines() {
        check(
            "test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.36s",
            Some((true, 13, 0, 0)),
        );
        check(
            "test result: FAILED. 9 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 35.88s",
            Some((false, 9, 2, 1)),
        );
        check(
            "   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\r",
            Some((true, 0, 0, 0)),
        );
        // Older libtest without the timing, and a merged doctest summary.
        check(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            Some((true, 1, 0, 0)),
        );
    }

    #[test]
    fn lines_that_are_not_summaries() {
        check("test store_matrix::lock ... ok", None);
        check("test result: maybe. 1 passed", None);
        check("test result: ok.", None);
        check("test result: ok. many passed; 0 failed", None);
        check("running 13 tests", None);
        check("", None);
    }

    #[test]
    fn tally_sums_suites_and_counts_skips() {
        let log = "\
     Running unittests src/lib.rs (target/debug/deps/engine-1)

running 13 tests
test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.36s

     Running tests/store_matrix.rs (target/debug/deps/store_matrix-2)
SKIP uring backend in this run: Operation not permitted (os error 1)
running 11 tests
SKIP uring backend in this run: Operation not permitted (os error 1)
test lock ... FAILED
test result: FAILED. 10 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 35.88s
  SKIP fallback: VIGO_TEST_RUNNER is set
";
        assert_eq!(
            tally(log),
            TestCounts {
                passed: 23,
                failed: 1,
                ignored: 0,
                skipped: 2,
                suites: 2,
                aborted_suites: 0,
            }
        );
        assert_eq!(tally(""), TestCounts::default());
    }

    #[test]
    fn uring_skip_reason_is_the_engine_suites_words() {
        let log = "running 11 tests\nSKIP uring backend in this run: Function not implemented (os error 38)\n";
        assert_eq!(
            uring_skip_reason(log),
            Some("Function not implemented (os error 38)")
        );
        assert_eq!(uring_skip_reason("SKIP bad_inputs[uring]: x"), None);
    }

    #[test]
    fn a_suite_without_a_summary_is_aborted() {
        let log = "\
     Running tests/a.rs (target/debug/deps/a-1)
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
     Running tests/b.rs (target/debug/deps/b-2)
running 3 tests
error: test failed, to rerun pass `-p agent --test b`
Caused by:
  process didn't exit successfully: `target/debug/deps/b-2` (signal: 9, SIGKILL: kill)
   Doc-tests engine
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        let counts = tally(log);
        assert_eq!(
            (counts.passed, counts.suites, counts.aborted_suites),
            (2, 3, 1)
        );
        assert!(!counts.ok());
    }
}
