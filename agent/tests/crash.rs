//! Crash consistency with real processes: `envoy` is SIGKILLed at random
//! points of an add and of an assembly, and every time the store must reopen
//! clean (`verify` exit 0, nothing left in `tmp/`), never list a blob whose
//! bytes are wrong, and finish the interrupted work when it is run again.
//!
//! Two deterministic crash images complete the random ones: the process is
//! stopped exactly inside the seal steps of `engine/src/store.rs` (a FIFO or
//! SIGSTOP holds it, a blocker directory makes the next step fail) and the
//! store is left as a crash at that point would leave it.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::*;

const MIB: usize = 1 << 20;
/// Kill points in the add test (spread over the backends that run here).
const ADD_KILLS: usize = 50;
/// Rounds and kills per round in the assembly test.
const ASSEMBLE_ROUNDS: usize = 6;
const ASSEMBLE_KILLS_PER_ROUND: usize = 2;
/// Kill delays range over this multiple of an uninterrupted run, so some
/// land after the work is done (the kill must be harmless then too).
const DELAY_SPREAD: f64 = 1.15;

/// Input sizes, cut to a sixth under an emulator (`VIGO_TEST_RUNNER`),
/// where hashing runs an order of magnitude slower: the number of kill
/// points stays, the time per point shrinks.
fn scaled(bytes: usize) -> usize {
    if under_runner() { bytes / 6 } else { bytes }
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("VIGO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c7a5);
    eprintln!("{test}: seed {seed} (set VIGO_TEST_SEED to replay)");
    StdRng::seed_from_u64(seed)
}

/// Runs `cmd` to completion and says how long it took.
fn timed(cmd: &mut Command) -> (Out, Duration) {
    let start = Instant::now();
    let out = run(cmd);
    (out, start.elapsed())
}

/// Spawns `cmd`, SIGKILLs it after `delay` (a no-op if it already exited).
fn kill_after(cmd: &mut Command, delay: Duration) -> ExitStatus {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn envoy");
    std::thread::sleep(delay);
    let _ = child.kill();
    child.wait().expect("wait for envoy")
}

fn random_delay(rng: &mut StdRng, uninterrupted: Duration) -> Duration {
    uninterrupted.mul_f64(rng.random_range(0.0..DELAY_SPREAD))
}

/// What every reopen after a crash must show. `expected` are the blobs whose
/// content the test knows; any listed complete blob must read back as it.
/// Returns the states of the expected blobs (absent ones are left out).
#[track_caller]
fn check_after_crash(
    s: &Store,
    expected: &[(&str, &[u8])],
    context: &str,
) -> Vec<(String, String)> {
    let v = s.run(&["store", "verify"]);
    assert_eq!(
        v.code,
        Some(OK),
        "{context}: verify after reopen: {}{}",
        v.text(),
        v.stderr
    );
    assert_eq!(
        s.entries("tmp"),
        Vec::<String>::new(),
        "{context}: tmp/ not emptied by reopen"
    );
    let listed = s.ls();
    let mut states = Vec::new();
    let mut sealed_hexes = Vec::new();
    let mut partial_hexes = Vec::new();
    for b in &listed {
        let id = b["id"].as_str().expect("id").to_string();
        let state = b["state"].as_str().expect("state").to_string();
        let Some((_, bytes)) = expected.iter().find(|(e, _)| *e == id) else {
            panic!("{context}: ls shows a blob nobody added: {b}");
        };
        match state.as_str() {
            "complete" => {
                let out = s.run(&["store", "cat", &id]);
                out.expect(OK);
                assert_same_bytes(
                    &out.stdout,
                    bytes,
                    &format!("{context}: cat of listed {id}"),
                );
                sealed_hexes.push(hex_of(&id).to_string());
            }
            "partial" => partial_hexes.push(hex_of(&id).to_string()),
            other => panic!("{context}: {id} is {other} after a crash"),
        }
        states.push((id, state));
    }
    sealed_hexes.sort();
    assert_eq!(
        s.entries("blobs"),
        sealed_hexes,
        "{context}: blobs/ holds files the index does not list as complete"
    );
    partial_hexes.sort();
    assert_eq!(
        s.entries("partial"),
        partial_hexes,
        "{context}: partial/ does not match the partial blobs listed"
    );
    states
}

#[test]
fn sigkill_during_add() {
    let mut rng = rng("sigkill_during_add");
    let mut backends = vec!["portable"];
    match uring_available() {
        Ok(()) => backends.push("uring"),
        Err(why) => skip("sigkill_during_add[uring]", &why),
    }
    let mut s = Store::new("portable");
    let (file, bytes) = s.random_file("input", scaled(48 * MIB), 48);

    // One uninterrupted add per backend measures the span to kill inside.
    let mut measured = Vec::new();
    let mut id = String::new();
    for io in &backends {
        s.io = io.to_string();
        let (out, took) = timed(s.cmd(&["store", "add"]).arg(&file));
        out.expect(OK);
        id = out.text().trim_end().to_string();
        s.run(&["store", "rm", &id]).expect(OK);
        eprintln!(
            "uninterrupted add of {} bytes with {io}: {took:?}",
            bytes.len()
        );
        measured.push(took);
    }

    let mut interrupted = 0;
    for i in 0..ADD_KILLS {
        let b = i % backends.len();
        s.io = backends[b].to_string();
        let delay = random_delay(&mut rng, measured[b]);
        kill_after(s.cmd(&["store", "add"]).arg(&file), delay);
        let context = format!("kill {i} ({} after {delay:?})", s.io);
        let states = check_after_crash(&s, &[(&id, &bytes)], &context);
        assert!(
            states.iter().all(|(_, st)| st == "complete"),
            "{context}: an add left a blob that is not complete: {states:?}"
        );
        if states.is_empty() {
            interrupted += 1;
        }
        // The add can simply be run again, and then it is whole.
        let out = s.run(&["store", "add", file.to_str().expect("utf-8 path")]);
        out.expect(OK);
        assert_eq!(
            out.text().trim_end(),
            id,
            "{context}: re-add gave another id"
        );
        assert_same_bytes(&s.cat(&id), &bytes, &format!("{context}: cat after re-add"));
        s.run(&["store", "rm", &id]).expect(OK);
    }
    eprintln!("sigkill_during_add: {interrupted} of {ADD_KILLS} kills left no blob behind");
    // Enough kills must land inside the add for the test to mean anything.
    assert!(
        interrupted >= ADD_KILLS / 5,
        "only {interrupted} of {ADD_KILLS} kills interrupted the add; the kill points are mis-spread"
    );
}

/// Store A holds X; store B holds X's chunks inside another file (X, some
/// other bytes, X again: the first copy holds X's leading chunks, the second,
/// ending at end of file, its trailing ones).
struct AssembleSetup {
    a: Store,
    b: Store,
    x: Vec<u8>,
    id: String,
    z_id: String,
    z: Vec<u8>,
    chunks: usize,
}

fn assemble_setup(x_len: usize, seed: u64) -> AssembleSetup {
    let a = Store::new("portable");
    let b = Store::new("portable");
    let (fx, x) = a.random_file("x", x_len, seed);
    let id = a.add(&fx);
    let mut z = x.clone();
    z.extend(random_bytes(300_001, seed + 1));
    z.extend_from_slice(&x);
    let fz = b.write_file("z", &z);
    let z_id = b.add(&fz);
    let mx = a.manifest(&id);
    let mz = b.manifest(&z_id);
    let held: HashSet<&str> = mz.chunks.iter().map(|c| c.hash.as_str()).collect();
    let lacking = mx
        .chunks
        .iter()
        .filter(|c| !held.contains(c.hash.as_str()))
        .count();
    assert_eq!(
        lacking, 0,
        "precondition: store B should hold every chunk of X"
    );
    AssembleSetup {
        a,
        b,
        x,
        id,
        z_id,
        z,
        chunks: mx.chunks.len(),
    }
}

#[test]
fn sigkill_during_assemble_resumes() {
    let mut rng = rng("sigkill_during_assemble_resumes");
    let t = assemble_setup(scaled(12 * MIB), 12);
    let bundle = t.a.bundle(&t.id, "x.bundle");
    let assemble = || {
        let mut c = t.b.cmd(&["--json", "store", "assemble"]);
        c.arg(&bundle);
        c
    };
    let (out, measured) = timed(&mut assemble());
    out.expect(OK);
    assert_eq!(out.json()["complete"], true, "{}", out.text());
    eprintln!(
        "uninterrupted assembly of {} bytes: {measured:?}",
        t.x.len()
    );
    t.b.run(&["store", "rm", &t.id]).expect(OK);

    let expected: [(&str, &[u8]); 2] = [(&t.id, &t.x), (&t.z_id, &t.z)];
    let mut seen_partial = 0;
    for round in 0..ASSEMBLE_ROUNDS {
        let mut complete_before = false;
        for k in 0..ASSEMBLE_KILLS_PER_ROUND {
            let delay = random_delay(&mut rng, measured);
            kill_after(&mut assemble(), delay);
            let context = format!("round {round} kill {k} after {delay:?}");
            let states = check_after_crash(&t.b, &expected, &context);
            assert!(
                states
                    .iter()
                    .any(|(id, st)| *id == t.z_id && st == "complete"),
                "{context}: the source blob is no longer complete: {states:?}"
            );
            if states.iter().any(|(id, st)| *id == t.id && st == "partial") {
                seen_partial += 1;
            }
            complete_before = states
                .iter()
                .any(|(id, st)| *id == t.id && st == "complete");
        }
        // Resuming completes it from the chunks held locally.
        let out = run(&mut assemble());
        out.expect(OK);
        let plan = out.json();
        assert_eq!(plan["id"], t.id.as_str());
        assert_eq!(plan["complete"], true, "round {round}: {plan}");
        assert_eq!(plan["missing_chunks"], 0, "round {round}: {plan}");
        if !complete_before {
            // (`assemble_of_complete_blob_reports_it_held` covers the other case.)
            assert_eq!(
                plan["held_chunks"], t.chunks as u64,
                "round {round}: {plan}"
            );
        }
        assert_same_bytes(
            &t.b.cat(&t.id),
            &t.x,
            &format!("round {round}: cat after resume"),
        );
        t.b.run(&["store", "verify", &t.id, "--full"]).expect(OK);
        t.b.run(&["store", "rm", &t.id]).expect(OK);
    }
    eprintln!(
        "sigkill_during_assemble_resumes: {seen_partial} of {} kills left a partial blob to resume",
        ASSEMBLE_ROUNDS * ASSEMBLE_KILLS_PER_ROUND
    );
}

/// Opens the write end of a FIFO once a reader has opened the other end,
/// without blocking forever if the reader never comes.
fn open_fifo_writer(fifo: &Path, child: &mut Child) -> fs::File {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(f) => return f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => panic!("open {}: {e}", fifo.display()),
        }
        if let Some(st) = child.try_wait().expect("wait") {
            panic!("envoy exited ({st}) before reading the bundle FIFO");
        }
        assert!(
            Instant::now() < deadline,
            "envoy never opened the bundle FIFO"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Crash image: `seal_partial` renamed `partial/<hex>` to `blobs/<hex>` and
/// synced both directories, then died before committing the blob complete.
/// The index still says partial with every chunk present. Reopening must
/// keep the assembly resumable; rerunning it must finish the blob.
#[test]
fn crash_after_seal_rename_keeps_assembly_resumable() {
    let t = assemble_setup(2 * MIB, 3);
    let bundle = fs::read(t.a.bundle(&t.id, "x.bundle")).expect("bundle");
    let fifo = t.b.path("bundle.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let blocker = t.b.blob_file(&t.id);

    // envoy reads the bundle after opening (and repairing) the store; the
    // FIFO holds it there while a directory takes the seal's rename target.
    let mut child =
        t.b.cmd(&["--json", "store", "assemble"])
            .arg(&fifo)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn envoy");
    let mut w = open_fifo_writer(&fifo, &mut child);
    fs::create_dir_all(blocker.join("blocker")).expect("mkdir blocker");
    w.write_all(&bundle).expect("write bundle into the FIFO");
    drop(w);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(ERROR),
        "the blocked seal should fail: {stderr}"
    );
    fs::remove_dir_all(&blocker).expect("remove blocker");

    // The failed seal left: index partial (every chunk present), file in partial/.
    let partial = t.b.dir.join("partial").join(hex_of(&t.id));
    assert!(
        partial.exists(),
        "precondition: partial file after the failed seal"
    );
    let state =
        t.b.ls()
            .into_iter()
            .find(|b| b["id"] == t.id.as_str())
            .map(|b| b["state"].clone());
    assert_eq!(
        state,
        Some("partial".into()),
        "precondition: blob still partial"
    );

    // Crash image one step later: the rename happened, the commit did not.
    fs::rename(&partial, t.b.blob_file(&t.id)).expect("emulate the seal's rename");

    let out = run(t
        .b
        .cmd(&["--json", "store", "assemble"])
        .arg(t.a.bundle(&t.id, "x2.bundle")));
    out.expect(OK);
    let plan = out.json();
    assert_eq!(plan["complete"], true, "{plan}");
    assert_same_bytes(&t.b.cat(&t.id), &t.x, "cat after resuming the crashed seal");
    t.b.run(&["store", "verify", "--full"]).expect(OK);
}

/// Crash image: `store add` of a blob that is partial in this store deletes
/// `partial/<hex>` before its index transaction commits. If it dies there
/// (here: its rename is made to fail, which aborts the transaction just as a
/// crash would), the index still says partial with presence bits set while
/// the partial file is gone. The assembly must stay resumable.
#[test]
fn failed_add_over_partial_keeps_assembly_resumable() {
    // B holds only X plus a different tail: all of X's chunks but the last.
    let a = Store::new("portable");
    let b = Store::new("portable");
    let (fx, x) = a.random_file("x", 32 * MIB, 32);
    let id = a.add(&fx);
    let bundle = a.bundle(&id, "x.bundle");
    let mut y = x.clone();
    y.extend(random_bytes(200_000, 33));
    b.add(&b.write_file("y", &y));
    let fx_b = b.write_file("x", &x);
    let first = run(b.cmd(&["--json", "store", "assemble"]).arg(&bundle));
    first.expect(OK);
    let first = first.json();
    assert_eq!(
        first["complete"], false,
        "precondition: some chunks must be missing: {first}"
    );
    assert!(
        first["held_chunks"].as_u64().unwrap_or(0) > 0,
        "precondition: {first}"
    );

    let blocker = b.blob_file(&id);
    let mut constructed = false;
    for attempt in 0..5 {
        let mut child = b
            .cmd(&["store", "add"])
            .arg(&fx_b)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn envoy");
        let pid = Pid::from_raw(child.id() as i32);
        // The add's temp file appears after the store is opened; stop the
        // process while it is still ingesting and block its rename target.
        let saw_temp = wait_until(Duration::from_secs(20), Duration::from_micros(500), || {
            b.entries("tmp").iter().any(|n| n.starts_with("add-"))
                || child.try_wait().ok().flatten().is_some()
        });
        assert!(saw_temp, "the add neither started ingesting nor exited");
        let _ = kill(pid, Signal::SIGSTOP);
        let still_ingesting = b.entries("tmp").iter().any(|n| n.starts_with("add-"));
        if still_ingesting {
            fs::create_dir_all(blocker.join("blocker")).expect("mkdir blocker");
        }
        let _ = kill(pid, Signal::SIGCONT);
        let out = child.wait_with_output().expect("wait");
        if still_ingesting {
            assert_eq!(
                out.status.code(),
                Some(ERROR),
                "the blocked add should fail: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            fs::remove_dir_all(&blocker).expect("remove blocker");
            constructed = true;
            break;
        }
        // Too late: the add finished. Start over from the partial state.
        eprintln!("attempt {attempt}: the add finished before it could be stopped; retrying");
        b.run(&["store", "rm", &id]).expect(OK);
        run(b.cmd(&["store", "assemble"]).arg(&bundle)).expect(OK);
    }
    assert!(constructed, "could not stop the add while it was ingesting");

    // Rerunning the assembly must resume: same chunks held, same missing.
    let again = run(b.cmd(&["--json", "store", "assemble"]).arg(&bundle));
    again.expect(OK);
    let again = again.json();
    assert_eq!(again["held_chunks"], first["held_chunks"], "{again}");
    assert_eq!(again["missing_chunks"], first["missing_chunks"], "{again}");
    b.run(&["store", "verify"]).expect(OK);
    // And the plain add still completes it.
    assert_eq!(b.add(&fx_b), id);
    assert_same_bytes(&b.cat(&id), &x, "cat after add");
}
