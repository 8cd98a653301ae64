//! Probe, then degrade: where io_uring is refused to this one process (a
//! seccomp filter makes `io_uring_setup` fail, as container runtimes do),
//! `--io auto` falls back to the portable backend and says why once,
//! `--io uring` fails saying why, and `status` reports both.
#![cfg(target_os = "linux")]

mod common;

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

use common::*;

/// A filter that fails `io_uring_setup` with `errno` and allows the rest.
fn uring_refusing_filter(errno: i32) -> Result<BpfProgram, String> {
    let rules = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
    let arch = std::env::consts::ARCH.try_into().map_err(|e| {
        format!(
            "seccompiler does not support {}: {e}",
            std::env::consts::ARCH
        )
    })?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(|e| format!("cannot build filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("cannot compile filter: {e}"))
}

/// Installs `program` in the child between fork and exec. The program is
/// built before the fork; the child only makes the two system calls of
/// `apply_filter` (prctl, seccomp), which allocate nothing.
fn filtered(mut cmd: Command, program: &BpfProgram) -> Command {
    let program = program.clone();
    // SAFETY: the closure runs in the forked child and only calls
    // `apply_filter` on memory allocated before the fork; on failure it reads
    // errno. No locks are taken, nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&program).map_err(|_| io::Error::last_os_error())
        });
    }
    cmd
}

/// Runs a filtered command; `Err` when the filter could not be installed.
fn try_run(mut cmd: Command) -> Result<Out, String> {
    let what = describe(&cmd);
    match cmd.output() {
        Ok(o) => Ok(Out {
            code: o.status.code(),
            stdout: o.stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            what,
        }),
        Err(e) => Err(format!("cannot install a seccomp filter in the child: {e}")),
    }
}

/// What envoy should say about the refusal, per errno.
struct Refusal {
    errno: i32,
    /// `strerror` text and std's `(os error N)`.
    text: &'static str,
    /// The hint `engine::io` adds for this errno.
    hint: &'static str,
}

const EPERM: Refusal = Refusal {
    errno: libc::EPERM,
    text: "Operation not permitted (os error 1)",
    hint: "seccomp",
};
const ENOSYS: Refusal = Refusal {
    errno: libc::ENOSYS,
    text: "Function not implemented (os error 38)",
    hint: "without io_uring",
};

#[test]
fn uring_refused_with_eperm_falls_back() {
    check_refusal("uring_refused_with_eperm_falls_back", &EPERM);
}

#[test]
fn uring_refused_with_enosys_falls_back() {
    check_refusal("uring_refused_with_enosys_falls_back", &ENOSYS);
}

fn check_refusal(name: &str, r: &Refusal) {
    if under_runner() {
        return skip(
            name,
            "VIGO_TEST_RUNNER is set: a seccomp filter would bind the emulator, not envoy",
        );
    }
    // Our filter must be the only reason io_uring fails.
    if let Err(why) = uring_available() {
        return skip(
            name,
            &format!("io_uring is unavailable even without a filter ({why})"),
        );
    }
    let program = match uring_refusing_filter(r.errno) {
        Ok(p) => p,
        Err(why) => return skip(name, &why),
    };
    let s = Store::new("auto");
    let (file, bytes) = s.random_file("f", (2 << 20) + 3, 17);

    // auto: falls back, says why exactly once, and works.
    let out = match try_run(filtered(
        s.cmd(&["--json", "store", "add", file.to_str().expect("utf-8")]),
        &program,
    )) {
        Ok(o) => o,
        Err(why) => return skip(name, &why),
    };
    out.expect(OK);
    let report = out.json();
    assert_eq!(report["io_backend"], "portable", "{report}");
    assert_eq!(
        out.stderr.matches("io_uring unavailable").count(),
        1,
        "fallback not logged exactly once: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(r.text),
        "fallback log lacks the reason {:?}: {}",
        r.text,
        out.stderr
    );
    assert!(
        out.stderr.contains(r.hint),
        "fallback log lacks the hint {:?}: {}",
        r.hint,
        out.stderr
    );
    let id = report["id"].as_str().expect("id").to_string();
    let cat =
        try_run(filtered(s.cmd(&["store", "cat", &id]), &program)).expect("filter applied before");
    cat.expect(OK);
    assert_same_bytes(&cat.stdout, &bytes, "cat under the filter");

    // uring forced: an error that says the backend cannot run, and why.
    let out = try_run(filtered(
        s.cmd_io("uring", &["store", "add", file.to_str().expect("utf-8")]),
        &program,
    ))
    .expect("filter applied before");
    out.expect(ERROR);
    assert!(
        out.stderr.contains("uring IO backend cannot run"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(r.text),
        "forced uring error lacks the reason: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());

    // status reports the fallback and its reason.
    let st = try_run(filtered(envoy_json_status(), &program)).expect("filter applied before");
    st.expect(OK);
    let st = st.json();
    assert_eq!(st["io_backend"], "portable", "{st}");
    let reason = st["io_fallback_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no io_fallback_reason: {st}"));
    assert!(
        reason.contains(r.text) && reason.contains(r.hint),
        "io_fallback_reason: {reason}"
    );
    assert!(st["uring_opcodes"].is_null(), "{st}");
    let forced = try_run(filtered(
        {
            let mut c = envoy();
            c.args(["--io", "uring", "status"]);
            c
        },
        &program,
    ))
    .expect("filter applied before");
    forced.expect(ERROR);

    // Without the filter, auto picks io_uring again.
    let out = run(s.cmd(&["--json", "store", "add"]).arg(&file));
    out.expect(OK);
    assert_eq!(out.json()["io_backend"], "uring", "auto without a filter");
    assert_eq!(out.json()["id"], id.as_str(), "the backend changed the id");
    assert!(
        !out.stderr.contains("io_uring unavailable"),
        "{}",
        out.stderr
    );
    let st = run(&mut envoy_json_status());
    st.expect(OK);
    assert_eq!(st.json()["io_backend"], "uring");
    assert!(st.json()["io_fallback_reason"].is_null());
}

fn envoy_json_status() -> Command {
    let mut c = envoy();
    c.args(["--io", "auto", "status", "--json"]);
    c
}
