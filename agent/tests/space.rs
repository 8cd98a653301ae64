//! Running out of space: refused up front when the store's filesystem
//! cannot hold the blob, and cleaned up when the disk fills mid-write. Uses
//! small tmpfs mounts, so it needs root; elsewhere it is skipped.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::*;

const MIB: usize = 1 << 20;

/// Writes zeros to a new file at `path` until the filesystem is full.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).expect("create filler");
    let mut total = 0u64;
    for block in [MIB, 64 << 10, 4096] {
        let buf = vec![0u8; block];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    total
}

#[track_caller]
fn assert_nothing_left(s: &Store, context: &str) {
    assert_eq!(
        s.entries("tmp"),
        Vec::<String>::new(),
        "{context}: tmp/ not cleaned"
    );
    assert_eq!(
        s.entries("blobs"),
        Vec::<String>::new(),
        "{context}: blobs/ not cleaned"
    );
    assert_eq!(
        s.entries("partial"),
        Vec::<String>::new(),
        "{context}: partial/ not cleaned"
    );
}

#[test]
fn add_larger_than_free_space_is_refused() {
    let small = match Tmpfs::mount("16m") {
        Ok(t) => t,
        Err(why) => return skip("add_larger_than_free_space_is_refused", &why),
    };
    let s = Store::at(&small.dir.join("store"), "portable");
    let (file, bytes) = s.random_file("big", 32 * MIB, 32);
    let out = run(s.cmd(&["store", "add"]).arg(&file));
    out.expect(ERROR);
    assert!(
        out.stderr.to_lowercase().contains("space"),
        "stderr does not mention space: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    assert_nothing_left(&s, "refused add");
    assert!(s.ls().is_empty());

    // The same file fits a filesystem with room for it and the margin.
    let roomy = Tmpfs::mount("80m").expect("second tmpfs");
    let s = Store::at(&roomy.dir.join("store"), "portable");
    let id = s.add(&file);
    assert_same_bytes(&s.cat(&id), &bytes, "cat from the roomy tmpfs");
    s.run(&["store", "verify"]).expect(OK);
}

#[test]
fn disk_full_mid_write_cleans_up() {
    let mut messages = Vec::new();
    for io in BACKENDS {
        let name = format!("disk_full_mid_write_cleans_up[{io}]");
        if io == "uring"
            && let Err(why) = uring_available()
        {
            skip(&name, &why);
            continue;
        }
        if let Some(stderr) = disk_full_mid_write(io, &name) {
            messages.push((name, stderr));
        }
    }
    // Checked last, so both backends' cleanup is checked first. A person
    // reading the message must learn something true.
    for (name, stderr) in messages {
        assert!(
            !stderr.contains("0 bytes needed, 0 available"),
            "{name}: the no-space message gives made-up numbers: {stderr}"
        );
    }
}

/// The precheck passes (free space is above size + margin); then the
/// filesystem is filled while the add is stopped mid-ingest, so a write
/// fails with ENOSPC.
/// Returns envoy's error message, or `None` when skipped.
fn disk_full_mid_write(io: &str, name: &str) -> Option<String> {
    let fs_ = match Tmpfs::mount("64m") {
        Ok(t) => t,
        Err(why) => {
            skip(name, &why);
            return None;
        }
    };
    let s = Store::at(&fs_.dir.join("store"), io);
    let (file, bytes) = s.random_file("big", 40 * MIB, 40);
    s.run(&["store", "ls"]).expect(OK); // create the store before measuring
    let filler = fs_.dir.join("filler");
    // Leave room for size + 16 MiB margin + a little, so the precheck passes.
    for attempt in 0..5 {
        let mut child = s
            .cmd(&["store", "add"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn envoy");
        let pid = Pid::from_raw(child.id() as i32);
        let started = wait_until(Duration::from_secs(20), Duration::from_micros(500), || {
            s.entries("tmp").iter().any(|n| n.starts_with("add-"))
                || child.try_wait().ok().flatten().is_some()
        });
        assert!(started, "{name}: the add neither started nor exited");
        let _ = kill(pid, Signal::SIGSTOP);
        // The temp file exists only after the precheck passed; it must not
        // be fully written yet.
        let temp_size: Option<u64> = s
            .entries("tmp")
            .iter()
            .filter(|n| n.starts_with("add-"))
            .filter_map(|n| fs::metadata(s.dir.join("tmp").join(n)).ok())
            .map(|m| m.len())
            .next();
        let mid_write = temp_size.is_some_and(|n| n < bytes.len() as u64);
        if mid_write {
            fill(&filler);
        }
        let _ = kill(pid, Signal::SIGCONT);
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !mid_write {
            eprintln!(
                "{name}: attempt {attempt}: stopped with {temp_size:?} bytes written; retrying"
            );
            if out.status.success() {
                let ids: Vec<String> = s
                    .ls()
                    .iter()
                    .map(|b| b["id"].as_str().unwrap_or("").to_string())
                    .collect();
                for id in ids {
                    s.run(&["store", "rm", &id]).expect(OK);
                }
            }
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(ERROR),
            "{name}: add on a full disk: {stderr}"
        );
        assert!(
            stderr.to_lowercase().contains("space"),
            "{name}: stderr does not mention space: {stderr}"
        );
        // Cleaned up by the failing process itself, before any reopen.
        assert_nothing_left(&s, name);
        fs::remove_file(&filler).expect("remove filler");
        assert!(s.ls().is_empty(), "{name}: ls after the failed add");
        s.run(&["store", "verify"]).expect(OK);
        let id = s.add(&file);
        assert_same_bytes(
            &s.cat(&id),
            &bytes,
            &format!("{name}: cat after freeing space"),
        );
        return Some(stderr);
    }
    skip(
        name,
        "could not stop the add in the middle of writing in 5 attempts",
    );
    None
}
