//! One process owns a store at a time: a second opener is refused with the
//! PID of the holder, and the lock dies with the holder (even by SIGKILL).

mod common;

use std::fs;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

/// Waits until the store's lock file names `child` (the holder writes its
/// PID right after taking the lock).
fn wait_for_holder(s: &Store, child: &mut Child) {
    let pid = child.id().to_string();
    let lock = s.dir.join("lock");
    let held = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
        fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid)
            || child.try_wait().ok().flatten().is_some()
    });
    assert!(held, "holder never wrote its PID to {}", lock.display());
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the holder exited before the test could use its lock"
    );
}

#[track_caller]
fn assert_refused(out: &Out, pid: u32) {
    out.expect(ERROR);
    assert!(
        out.stderr.contains(&format!("in use by PID {pid}")),
        "{}: refusal does not name the holder (PID {pid}): {}",
        out.what,
        out.stderr
    );
}

#[test]
fn second_opener_is_told_the_holder_pid() {
    let s = Store::new("portable");
    // Bigger than any pipe buffer, so `cat` blocks writing it.
    let (file, bytes) = s.random_file("f", 4 << 20, 5);
    let id = s.add(&file);
    let mut holder = s
        .cmd(&["store", "cat", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    wait_for_holder(&s, &mut holder);
    let pid = holder.id();

    assert_refused(&s.run(&["store", "ls"]), pid);
    assert_refused(&run(s.cmd(&["store", "add"]).arg(&file)), pid);
    assert_refused(&s.run(&["store", "cat", &id]), pid);
    // The refusal must not have disturbed the holder: it still streams all.
    let out = read_all(holder.stdout.take().expect("stdout"));
    assert!(holder.wait().expect("wait").success());
    assert_same_bytes(&out, &bytes, "the holder's cat");
    // Released on exit.
    assert_eq!(s.ls().len(), 1);
}

#[test]
fn lock_dies_with_a_killed_holder() {
    let s = Store::new("portable");
    let (file, _) = s.random_file("f", 4 << 20, 6);
    let id = s.add(&file);
    let mut holder = s
        .cmd(&["store", "cat", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    wait_for_holder(&s, &mut holder);
    assert_refused(&s.run(&["store", "verify"]), holder.id());
    holder.kill().expect("kill holder");
    holder.wait().expect("wait");
    // No stale lock: the next opener gets the store at once.
    s.run(&["store", "verify"]).expect(OK);
    assert_eq!(s.ls().len(), 1);
}
