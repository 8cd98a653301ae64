//! `vigo-noring` refuses io_uring to the command it runs: envoy, probing
//! under it, falls back to the portable backend and says why.
//!
//! envoy is the `agent` package's binary, which this package cannot depend
//! on; it is taken from the same target dir (`cargo test --workspace` builds
//! it). Where it is missing, or seccomp cannot be used here, a test skips
//! with a printed reason.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

fn noring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigo-noring"))
}

/// `target/<profile>/envoy`, next to this test's `deps/` directory.
fn envoy() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let envoy = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("envoy"))
        .ok_or("no target dir above the test binary")?;
    if envoy.is_file() {
        Ok(envoy)
    } else {
        Err(format!(
            "{} not built (cargo test --workspace or cargo build -p agent builds it)",
            envoy.display()
        ))
    }
}

fn skip(test: &str, reason: &str) {
    // Past libtest's capture, so the skip shows in every run.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `envoy --json status` under `vigo-noring --errno ERRNO`; `None` after a skip.
fn status_under(test: &str, errno: &str) -> Option<(Output, serde_json::Value)> {
    if std::env::var_os("VIGO_TEST_RUNNER").is_some() {
        skip(
            test,
            "VIGO_TEST_RUNNER is set: a filter would bind the emulator",
        );
        return None;
    }
    let envoy = match envoy() {
        Ok(e) => e,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let out = noring()
        .args(["--errno", errno, "--"])
        .arg(envoy)
        .args(["--json", "status"])
        .env_remove("VIGO_IO")
        .output()
        .expect("run vigo-noring");
    if out.status.code() == Some(125) {
        skip(
            test,
            &format!("seccomp unavailable here: {}", text(&out.stderr).trim()),
        );
        return None;
    }
    assert!(
        out.status.success(),
        "status exited {}: {}",
        out.status,
        text(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).expect("status prints JSON");
    Some((out, v))
}

#[test]
fn eperm_makes_envoy_fall_back_to_portable() {
    let Some((out, v)) = status_under("eperm_makes_envoy_fall_back_to_portable", "EPERM") else {
        return;
    };
    assert_eq!(v["io_backend"], "portable", "{v}");
    let reason = v["io_fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains("Operation not permitted"), "{reason}");
    assert!(v["uring_opcodes"].is_null(), "{v}");
    // The fallback is announced once, on stderr.
    assert!(
        text(&out.stderr).contains("portable"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn enosys_makes_envoy_fall_back_to_portable() {
    let Some((_, v)) = status_under("enosys_makes_envoy_fall_back_to_portable", "ENOSYS") else {
        return;
    };
    assert_eq!(v["io_backend"], "portable", "{v}");
    let reason = v["io_fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains("Function not implemented"), "{reason}");
}

#[test]
fn bad_usage_and_missing_commands_have_distinct_exit_codes() {
    let out = noring()
        .args(["--errno", "EWHAT", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("EPERM or ENOSYS"));

    let out = noring().args(["--errno", "EPERM"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no command");

    let out = noring()
        .args(["--errno", "EPERM", "--", "/nonexistent/vigo-cmd"])
        .output()
        .unwrap();
    match out.status.code() {
        Some(127) => assert!(text(&out.stderr).contains("cannot run")),
        Some(125) => skip("bad_usage...", "seccomp unavailable here"),
        other => panic!("exit {other:?}: {}", text(&out.stderr)),
    }
}

#[test]
fn the_command_runs_with_its_arguments_and_exit_code() {
    let out = noring()
        .args([
            "--errno",
            "ENOSYS",
            "--",
            "sh",
            "-c",
            "echo \"$0\" --x; exit 7",
            "arg0",
        ])
        .output()
        .unwrap();
    if out.status.code() == Some(125) {
        skip("the_command_runs...", "seccomp unavailable here");
        return;
    }
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "arg0 --x\n");
}
