//! The envoy daemon end to end: real `envoy run` processes on 127.0.0.1
//! talking mTLS to each other, driven through their control sockets the way
//! an operator would (`envoy --config F store add`, `envoy fetch --out`).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ERROR, OK, envoy};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

/// `common::run` for owned or borrowed commands.
fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> common::Out {
    common::run(cmd.borrow_mut())
}

/// One envoy: its state directory, config and (when started) process.
struct Envoy {
    dir: TempDir,
    config: PathBuf,
    child: Option<Child>,
    key: String,
    allow: Vec<String>,
    extra: String,
    listen: Option<String>,
}

impl Envoy {
    fn new() -> Envoy {
        Self::with_extra("")
    }

    /// `extra` is appended to the config (YAML).
    fn with_extra(extra: &str) -> Envoy {
        let dir = tempfile::Builder::new()
            .prefix("vigo-daemon-test-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let config = dir.path().join("envoy.yaml");
        let mut e = Envoy {
            config,
            dir,
            child: None,
            key: String::new(),
            allow: Vec::new(),
            extra: extra.to_owned(),
            listen: None,
        };
        e.write_config();
        let out = run(e.cmd(&["id"]));
        out.expect(OK);
        e.key = out.text().trim().to_owned();
        assert!(e.key.starts_with("ed25519:"), "host key: {}", e.key);
        e
    }

    fn write_config(&self) {
        let allow: Vec<String> = self.allow.iter().map(|k| format!("\"{k}\"")).collect();
        let text = format!(
            "state_dir: {}\nlisten: 127.0.0.1:0\npeers:\n  allow: [{}]\n{}",
            self.dir.path().display(),
            allow.join(", "),
            self.extra
        );
        fs::write(&self.config, text).unwrap();
    }

    fn allow(&mut self, others: &[&Envoy]) {
        self.allow = others.iter().map(|o| o.key.clone()).collect();
        self.write_config();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = envoy();
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .cmd(&["run"])
            .env("VIGO_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run(self.cmd(&["--json", "status"]));
            if out.code == Some(OK)
                && let Some(listen) = out
                    .text()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find_map(|v| v["daemon"]["listen"].as_str().map(str::to_owned))
            {
                self.listen = Some(listen);
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("envoy run exited {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> String {
        self.listen.clone().expect("started")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits; returns the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("started");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    /// `store add` through the daemon; the blob id.
    fn add(&self, path: &Path) -> String {
        let out = run(self.cmd(&["store", "add"]).arg(path));
        out.expect(OK);
        out.text().trim().to_owned()
    }

    fn fetch(&self, id: &str, from: &[String], out: &Path) -> common::Out {
        run(self
            .cmd(&["--json", "fetch", id, "--from", &from.join(","), "--out"])
            .arg(out))
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("started").id() as i32)
    }

    /// Chunk bytes this daemon has served so far (`status --json`).
    fn bytes_served(&self) -> u64 {
        let out = run(self.cmd(&["--json", "status"]));
        out.expect(OK);
        out.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v["daemon"]["bytes_served"].as_u64())
            .expect("status reports bytes_served")
    }

    fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of envoy {} ---\n{}", self.key, self.log());
        }
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Three envoys that all admit each other, started.
fn trio() -> (Envoy, Envoy, Envoy) {
    let (mut a, mut b, mut c) = (Envoy::new(), Envoy::new(), Envoy::new());
    a.allow(&[&b, &c]);
    b.allow(&[&a, &c]);
    c.allow(&[&a, &b]);
    a.start();
    b.start();
    c.start();
    (a, b, c)
}

fn pair() -> (Envoy, Envoy) {
    pair_with("", "")
}

/// Two envoys that admit each other, started, with `extra_a` and `extra_b`
/// appended to their configs.
fn pair_with(extra_a: &str, extra_b: &str) -> (Envoy, Envoy) {
    let (mut a, mut b) = (Envoy::with_extra(extra_a), Envoy::with_extra(extra_b));
    a.allow(&[&b]);
    b.allow(&[&a]);
    a.start();
    b.start();
    (a, b)
}

#[test]
fn fetch_from_one_peer_verifies_seals_and_exports() {
    let (a, b) = pair();
    let data = random(3 << 20, 1);
    let id = a.add(&a.file("blob", &data));
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr()], &out_path);
    out.expect(OK);
    let report: Value = out.json();
    assert_eq!(report["id"], id.as_str());
    assert_eq!(report["bytes_fetched"], data.len() as u64);
    assert_eq!(fs::read(&out_path).unwrap(), data, "exported bytes differ");
    // Sealed in B's store (listed through B's daemon).
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    ls.expect(OK);
    let blobs = ls.json();
    assert_eq!(blobs[0]["id"], id.as_str());
    assert_eq!(blobs[0]["state"], "complete");
    // Fetching again moves nothing.
    let again = b.fetch(&id, &[a.addr()], &b.dir.path().join("again.bin"));
    again.expect(OK);
    assert_eq!(again.json()["already_complete"], true);
    assert_eq!(fs::read(b.dir.path().join("again.bin")).unwrap(), data);
    // The client checks what it copies out of the daemon's file: a byte
    // damaged on B's disk (in place: B's daemon may map the file) fails the
    // export with the corruption code and leaves no file behind.
    let blob_file = find_file(&b.dir.path().join("store"), id.trim_start_matches("v1-b3-"))
        .expect("B's blob file");
    let at = data.len() as u64 / 2;
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new().write(true).open(&blob_file).unwrap(),
        &[data[at as usize] ^ 0x20],
        at,
    )
    .unwrap();
    let damaged = b.dir.path().join("damaged.bin");
    let out = b.fetch(&id, &[a.addr()], &damaged);
    out.expect(common::CORRUPT);
    assert!(out.stderr.contains("content BLAKE3"), "{}", out.stderr);
    assert!(!damaged.exists());
    assert!(!b.dir.path().join(".damaged.bin.vigo-partial").exists());
    // The client had B's daemon re-hash its copy, which found the damaged
    // chunk and quarantined the blob (no longer served), on stderr: stdout
    // is the fetch's alone.
    assert!(
        out.stderr.contains(&format!("CORRUPT\t{id}")) && out.stderr.contains("quarantined"),
        "{}",
        out.stderr
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("CORRUPT"), "{stdout}");
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    assert_eq!(ls.json()[0]["state"], "quarantined");
    // The next fetch rebuilds it from A.
    let repaired = b.dir.path().join("repaired.bin");
    b.fetch(&id, &[a.addr()], &repaired).expect(OK);
    assert_eq!(fs::read(&repaired).unwrap(), data);
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    assert_eq!(ls.json()[0]["state"], "complete");
}

/// An empty blob fetches, seals and exports like any other. (Its source
/// used to answer the manifest request with a `Have` spanning no chunk,
/// which the encoder refuses: the connection's writer panicked and the
/// fetch waited 60 s for a manifest that never came.)
#[test]
fn fetch_out_of_an_empty_blob_writes_an_empty_file() {
    let (a, b) = pair();
    let id = a.add(&a.file("empty", b""));
    let out_path = b.dir.path().join("empty.out");
    b.fetch(&id, &[a.addr()], &out_path).expect(OK);
    assert_eq!(fs::read(&out_path).unwrap(), b"");
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    ls.expect(OK);
    assert_eq!(ls.json()[0]["id"], id.as_str());
    assert_eq!(ls.json()[0]["state"], "complete");
    assert!(!a.log().contains("panicked"), "{}", a.log());
}

#[test]
fn fetch_pulls_from_two_sources_at_once() {
    let (a, b, c) = trio();
    let data = random(40 << 20, 2);
    let id = a.add(&a.file("blob", &data));
    assert_eq!(c.add(&c.file("blob", &data)), id);
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr(), c.addr()], &out_path);
    out.expect(OK);
    let report = out.json();
    let peers = report["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert!(
            p["bytes"].as_u64().unwrap() > 0,
            "a source sent nothing: {report}"
        );
    }
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

/// A fetch spreads its requests over `fetch_connections` connections to
/// its one source; a connection the source refuses (its
/// `connections_per_peer` reached) costs only that connection.
#[test]
fn fetch_spreads_over_several_connections_and_survives_a_refused_one() {
    let (a, b) = pair_with(
        "limits:\n  connections_per_peer: 2\n",
        "limits:\n  fetch_connections: 3\n",
    );
    let data = random(40 << 20, 4);
    let id = a.add(&a.file("blob", &data));
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr()], &out_path);
    out.expect(OK);
    assert_eq!(out.json()["bytes_fetched"], data.len() as u64);
    assert_eq!(fs::read(&out_path).unwrap(), data);
    assert!(
        a.wait_log("connections_per_peer (2) reached"),
        "the third connection was not refused: {}",
        a.log()
    );
    // Both admitted connections carried chunks (logged when they end).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.log().matches("ended: served").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "chunks did not go over two connections: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A source may refuse any of a fetch's connections when they race to its
/// `connections_per_peer`, the first one too, which carries the manifest
/// asks (seen under load: "no source sent the manifest … for 60s"). The
/// fetch asks again on another connection instead of waiting for answers
/// that cannot come.
#[test]
fn the_manifest_is_asked_again_when_the_first_connection_closes() {
    let (a, b) = pair_with("", "limits:\n  fetch_connections: 3\n");
    let data = random(8 << 20, 5);
    let id = a.add(&a.file("blob", &data));
    // The first connection reaches a stand-in holding A's key (so B takes
    // it for A) that closes it once B has asked on it; the others reach A.
    let key = agent::identity::HostKey::load_or_create(a.dir.path()).unwrap();
    assert_eq!(key.public().to_string(), a.key);
    let stand_in = hostile_server(key, &b, Duration::ZERO, Vec::new(), After::CloseOnceAsked);
    let via = divert_after_first(stand_in, a.addr());
    let out_path = b.dir.path().join("out.bin");
    let started = Instant::now();
    let out = b.fetch(&id, &[via], &out_path);
    out.expect(OK);
    assert_eq!(fs::read(&out_path).unwrap(), data);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the fetch waited {:?} for answers on the closed connection",
        started.elapsed()
    );
}

#[test]
fn corrupt_source_is_banned_told_and_quarantines() {
    let (a, b, c) = trio();
    let data = random(24 << 20, 3);
    let id = a.add(&a.file("blob", &data));
    assert_eq!(c.add(&c.file("blob", &data)), id);
    // Corrupt C's sealed copy every 512 KiB, so any run C serves is bad.
    let blob_file = find_file(&c.dir.path().join("store"), id.trim_start_matches("v1-b3-"))
        .expect("C's blob file");
    let mut bytes = fs::read(&blob_file).unwrap();
    for at in (1000..bytes.len()).step_by(512 << 10) {
        bytes[at] ^= 0xff;
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&blob_file)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr(), c.addr()], &out_path);
    out.expect(OK);
    assert_eq!(
        fs::read(&out_path).unwrap(),
        data,
        "a corrupt chunk got through"
    );
    let report = out.json();
    let bad = report["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == c.addr().as_str())
        .unwrap()
        .clone();
    assert_eq!(bad["banned"], true, "{report}");
    assert_eq!(bad["key"], c.key.as_str(), "{report}");
    assert!(
        b.log().contains(&c.key),
        "the ban must name the key: {}",
        b.log()
    );
    assert!(
        c.wait_log("blob quarantined"),
        "C never re-verified: {}",
        c.log()
    );
    let ls = run(c.cmd(&["--json", "store", "ls"]));
    assert_eq!(ls.json()[0]["state"], "quarantined");
}

/// Finds `<dir>/**/name`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(name))
        {
            return Some(p);
        }
    }
    None
}

#[test]
fn unknown_peer_is_refused_before_any_request() {
    let (mut a, mut b) = (Envoy::new(), Envoy::new());
    // A admits nobody; B admits A.
    b.allow(&[&a]);
    a.start();
    b.start();
    let id = a.add(&a.file("blob", &random(1 << 20, 4)));
    let out = b.fetch(&id, &[a.addr()], &b.dir.path().join("out.bin"));
    out.expect(ERROR);
    assert!(!b.dir.path().join("out.bin").exists());
    assert!(
        a.wait_log(&b.key),
        "A must log the refused key: {}",
        a.log()
    );
    let status = run(a.cmd(&["--json", "status"]));
    assert!(
        status.text().contains("\"chunks_served\":0"),
        "{}",
        status.text()
    );
}

#[test]
fn dead_source_is_skipped() {
    let (a, b) = pair();
    let data = random(2 << 20, 5);
    let id = a.add(&a.file("blob", &data));
    // Nothing listens on port 1 of 127.0.0.1.
    let dead = "127.0.0.1:1".to_string();
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[dead.clone(), a.addr()], &out_path);
    out.expect(OK);
    let report = out.json();
    let d = report["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == dead.as_str())
        .unwrap()
        .clone();
    assert!(d["error"].is_string(), "{report}");
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

#[test]
fn sigkill_mid_fetch_resumes_without_refetching() {
    // 8 MiB/s: a 48 MiB fetch takes ~6 s, killed after 4 s.
    let (a, mut b) = pair_with("", "rate:\n  download_bytes_per_s: 8388608\n");
    let data = random(48 << 20, 6);
    let id = a.add(&a.file("blob", &data));
    let out_path = b.dir.path().join("out.bin");
    let fetching = b
        .cmd(&["--json", "fetch", &id, "--from", &a.addr()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once some chunks are durable (a commit is due every 2 s): a
    // fixed delay was not enough under qemu-riscv64, where the handshake
    // and manifest alone can take seconds.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ls = b.cmd(&["--json", "store", "ls"]).output().unwrap();
        let listed: serde_json::Value =
            serde_json::from_slice(&ls.stdout).unwrap_or(serde_json::Value::Null);
        let present = listed
            .as_array()
            .and_then(|a| a.iter().find(|x| x["id"] == id.as_str()))
            .and_then(|x| x["present_chunks"].as_u64())
            .unwrap_or(0);
        if present > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no chunk became durable within 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.kill();
    let _ = fetching.wait_with_output();
    // Restart without the rate limit and fetch again.
    b.extra = String::new();
    b.write_config();
    b.start();
    let out = b.fetch(&id, &[a.addr()], &out_path);
    out.expect(OK);
    let report = out.json();
    let resumed = report["bytes_resumed"].as_u64().unwrap();
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    assert!(resumed > 0, "nothing survived the kill: {report}");
    assert_eq!(resumed + fetched, data.len() as u64, "{report}");
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

#[test]
fn delta_fetch_moves_only_missing_chunks() {
    let (a, b) = pair();
    let old = random(16 << 20, 7);
    let mut new = old.clone();
    // Change 64 KiB in the middle.
    for x in &mut new[8 << 20..(8 << 20) + (64 << 10)] {
        *x = x.wrapping_add(1);
    }
    b.add(&b.file("old", &old));
    let id = a.add(&a.file("new", &new));
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr()], &out_path);
    out.expect(OK);
    let report = out.json();
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    let local = report["bytes_local"].as_u64().unwrap();
    assert!(
        fetched < 1 << 20,
        "fetched {fetched} bytes for a 64 KiB change: {report}"
    );
    assert_eq!(fetched + local, new.len() as u64, "{report}");
    assert_eq!(fs::read(&out_path).unwrap(), new);
}

/// A local blob corrupt at rest is found out by the delta's check of each
/// copy: it is quarantined, and the chunks it should have given are fetched
/// from the peer instead; the blob fetched is right.
#[test]
fn delta_fetch_quarantines_a_local_blob_corrupt_at_rest_and_fetches_instead() {
    let (a, b) = pair();
    let old = random(16 << 20, 17);
    let mut new = old.clone();
    new[0] ^= 1;
    let old_id = b.add(&b.file("old", &old));
    let id = a.add(&a.file("new", &new));
    let blob_file = find_file(
        &b.dir.path().join("store"),
        old_id.trim_start_matches("v1-b3-"),
    )
    .expect("B's blob file");
    // One byte in place, 5 MiB in: past the first batch of local copies.
    let at = 5 << 20;
    let byte = fs::read(&blob_file).unwrap()[at] ^ 1;
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new().write(true).open(&blob_file).unwrap(),
        &[byte],
        at as u64,
    )
    .unwrap();
    let out_path = b.dir.path().join("out.bin");
    let out = b.fetch(&id, &[a.addr()], &out_path);
    out.expect(OK);
    assert_eq!(fs::read(&out_path).unwrap(), new);
    let report = out.json();
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    let local = report["bytes_local"].as_u64().unwrap();
    assert_eq!(fetched + local, new.len() as u64, "{report}");
    // The first chunk differs anyway; the corrupt one, and what was looked
    // up after it was found, came from A; the rest (at least the first
    // 4 MiB: two batches) was copied.
    assert!(local >= 4 << 20 && fetched > 64 << 10, "{report}");
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    ls.expect(OK);
    let blobs = ls.json();
    let state = blobs
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == old_id.as_str())
        .map(|x| x["state"].clone());
    assert_eq!(state, Some(Value::from("quarantined")), "{blobs}");
}

#[test]
fn store_commands_go_through_the_running_daemon() {
    let (a, _b) = pair();
    let data = random(1 << 20, 8);
    let id = a.add(&a.file("blob", &data));
    // The daemon owns the store: opening it directly is refused…
    let direct = run(envoy()
        .arg("--store")
        .arg(a.dir.path().join("store"))
        .args(["store", "ls"]));
    direct.expect(ERROR);
    assert!(direct.stderr.contains("in use by PID"), "{}", direct.stderr);
    // …while the same commands through the socket work.
    let cat = run(a.cmd(&["store", "cat", &id]));
    cat.expect(OK);
    assert_eq!(cat.stdout, data);
    let export = a.dir.path().join("export.bin");
    run(a.cmd(&["store", "export", &id]).arg(&export)).expect(OK);
    assert_eq!(fs::read(&export).unwrap(), data);
    run(a.cmd(&["store", "verify", "--full"])).expect(OK);
    run(a.cmd(&["store", "cat", "v1-b3-00"])).expect(common::USAGE);
}

/// Any local user may add a file they can read through the daemon, which
/// opens no path itself (it may run as root): the client opens the file and
/// hands the descriptor over. The blob is owned by that user; a file they
/// cannot read is refused before the daemon sees anything.
#[test]
fn other_users_add_what_they_can_read_through_the_daemon() {
    use std::os::unix::fs::{PermissionsExt, chown};
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    if !nix::unistd::geteuid().is_root() {
        return common::skip(
            "other_users_add_what_they_can_read_through_the_daemon",
            "running a client as another uid needs root",
        );
    }
    let mut a = Envoy::new();
    a.start();
    let open_up =
        |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    // The other user must reach the config and the socket (not the store).
    open_up(a.dir.path(), 0o755);
    open_up(&a.config, 0o644);
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    open_up(files.path(), 0o755);
    let data = random(2 << 20, 16);
    let theirs = files.path().join("theirs.bin");
    fs::write(&theirs, &data).unwrap();
    chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    open_up(&theirs, 0o600);
    let roots = files.path().join("roots.bin");
    fs::write(&roots, random(1 << 20, 17)).unwrap();
    open_up(&roots, 0o600);
    let as_nobody = |args: &[&str]| {
        let mut c = a.cmd(args);
        c.uid(NOBODY).gid(NOBODY);
        c
    };

    let added = run(as_nobody(&["--json", "store", "add"]).arg(&theirs));
    added.expect(OK);
    let id = added.json()["id"].as_str().unwrap().to_owned();
    let ls = run(a.cmd(&["--json", "store", "ls"]));
    ls.expect(OK);
    assert_eq!(ls.json()[0]["id"], id.as_str());
    assert_eq!(ls.json()[0]["owners"], serde_json::json!(["65534:store"]));
    let cat = run(a.cmd(&["store", "cat", &id]));
    cat.expect(OK);
    assert_eq!(cat.stdout, data);

    let refused = run(as_nobody(&["store", "add"]).arg(&roots));
    refused.expect(ERROR);
    assert!(
        refused.stderr.contains("permission denied"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        run(a.cmd(&["--json", "store", "ls"]))
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Root's own file goes the same way.
    run(a.cmd(&["store", "add"]).arg(&roots)).expect(OK);
    // So does the bundle `store assemble` reads.
    let bundle = run(a.cmd(&["store", "manifest", &id, "--bundle"]));
    bundle.expect(OK);
    let bundle_path = files.path().join("theirs.bundle");
    fs::write(&bundle_path, &bundle.stdout).unwrap();
    chown(&bundle_path, Some(NOBODY), Some(NOBODY)).unwrap();
    open_up(&bundle_path, 0o600);
    let assembled = run(as_nobody(&["store", "assemble"]).arg(&bundle_path));
    assembled.expect(OK);
    assert!(
        assembled
            .stderr
            .contains("0 chunks (0 bytes) still to fetch"),
        "{}",
        assembled.stderr
    );
}

/// What a client may hand the daemon is bounded: a second descriptor with
/// one request closes the connection at once, and a bundle that is a pipe
/// is refused (it could hold a daemon thread forever); the daemon goes on.
#[test]
fn raw_clients_hand_the_daemon_one_regular_file_at_most() {
    use std::io::{IoSlice, Read};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut a = Envoy::new();
    a.start();
    let socket = a.dir.path().join("envoy.sock");
    let request = |body: &str, fds: &[i32]| {
        let mut s = UnixStream::connect(&socket).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.push(b'R');
        frame.extend_from_slice(body.as_bytes());
        let cmsg = [ControlMessage::ScmRights(fds)];
        let n = sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        s.write_all(&frame[n..]).unwrap();
        let mut answer = Vec::new();
        // A connection closed with the request unread may end in a reset.
        let _ = s.read_to_end(&mut answer);
        answer
    };
    let assemble = r#"{"Store":{"cmd":{"Assemble":{"manifest":"/handed.bundle"}},"json":false}}"#;
    let (one, two) = (
        fs::File::open(&a.config).unwrap(),
        fs::File::open(&a.config).unwrap(),
    );
    let answer = request(assemble, &[one.as_raw_fd(), two.as_raw_fd()]);
    assert!(
        answer.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&answer)
    );

    let (pipe, _writer) = nix::unistd::pipe().unwrap();
    let answer = request(assemble, &[pipe.as_raw_fd()]);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("not a regular file"), "{text}");
    assert_eq!(answer[answer.len() - 6..], [1, 0, 0, 0, b'X', ERROR as u8]);
    run(a.cmd(&["status"])).expect(OK);
}

/// A fetch, and a file added through the daemon, that would leave less than
/// `limits.reserve_bytes` free are refused before anything is written.
#[test]
fn fetch_larger_than_free_space_is_refused_up_front() {
    // 1 PiB kept free: no disk here has that.
    let (a, b) = pair_with("", "limits:\n  reserve_bytes: 1125899906842624\n");
    let id = a.add(&a.file("blob", &random(1 << 20, 9)));
    let out = b.fetch(&id, &[a.addr()], &b.dir.path().join("out.bin"));
    out.expect(ERROR);
    assert!(
        out.stderr.contains("not enough space in") && out.stderr.contains("kept free"),
        "{}",
        out.stderr
    );
    // The same reserve holds for a file added through the daemon.
    let add = run(b
        .cmd(&["store", "add"])
        .arg(b.file("local", &random(1 << 20, 10))));
    add.expect(ERROR);
    assert!(add.stderr.contains("kept free"), "{}", add.stderr);
    let ls = run(b.cmd(&["--json", "store", "ls"]));
    assert_eq!(
        ls.json(),
        serde_json::json!([]),
        "nothing may be left behind"
    );
}

/// `fetch --out` to a filesystem that cannot hold the blob stops before
/// writing anything (the daemon announces the size first) and leaves no
/// temp file; the fetch itself still completes into the store.
#[test]
fn fetch_out_larger_than_its_filesystem_is_refused_up_front() {
    let small = match common::Tmpfs::mount("4m") {
        Ok(t) => t,
        Err(why) => {
            return common::skip(
                "fetch_out_larger_than_its_filesystem_is_refused_up_front",
                &why,
            );
        }
    };
    let (a, b) = pair();
    let data = random(8 << 20, 14);
    let id = a.add(&a.file("blob", &data));
    let out = b.fetch(&id, &[a.addr()], &small.dir.join("out.bin"));
    out.expect(ERROR);
    assert!(out.stderr.contains("not enough space in"), "{}", out.stderr);
    assert_eq!(common::entries(&small.dir), Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = run(b.cmd(&["--json", "store", "ls"]));
        if ls.json()[0]["state"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fetch did not complete: {}",
            ls.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let (mut a, _b) = pair();
    let socket = a.dir.path().join("envoy.sock");
    assert!(socket.exists());
    let status = a.stop();
    assert!(status.success(), "exit {status}: {}", a.log());
    assert!(!socket.exists());
    // Without the daemon, store commands open the store directly again.
    run(a.cmd(&["store", "ls"])).expect(OK);
    let fetch = run(a.cmd(&["fetch", "v1-b3-00", "--from", "127.0.0.1:1"]));
    fetch.expect(ERROR);
    assert!(
        fetch.stderr.contains("no daemon is running"),
        "{}",
        fetch.stderr
    );
}

/// A runtime for a test's own peer.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A test peer's encoded `Hello`: this protocol version, the default limits.
fn hello_frame() -> Vec<u8> {
    use substrate::wire::{self, Frame, Hello, Limits};
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        requests_in_flight_max: 16,
        frame_bytes_max: Limits::DEFAULT.frame_bytes_max,
        credit_bytes: 32 << 20,
    };
    encoded(&Frame::Hello(hello), 1)
}

/// `frame` encoded `times` times in a row.
fn encoded(frame: &substrate::wire::Frame<'_>, times: usize) -> Vec<u8> {
    use substrate::wire::{self, Limits};
    let mut bytes = Vec::new();
    for _ in 0..times {
        wire::encode(frame, &Limits::DEFAULT, &mut bytes).unwrap();
    }
    bytes
}

/// Connects to `to` over mTLS as `key` (which `to` admits) and checks that
/// it is talking to `to`.
async fn raw_connect(key: &agent::identity::HostKey, to: &Envoy) -> agent::tls::TlsStream {
    use agent::tls::{self, AllowList};
    let to_key: agent::identity::PeerKey = to.key.parse().unwrap();
    let verifier = std::sync::Arc::new(AllowList::new(vec![to_key]));
    let connector = tls::client_config(key, verifier).unwrap();
    let tcp = tokio::net::TcpStream::connect(to.addr()).await.unwrap();
    let (stream, peer) = tls::connect(&connector, tcp, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(peer, to_key);
    stream
}

/// [`raw_connect`], sends `bytes` and returns everything `to` sends until
/// it closes the connection or `wait` passes.
fn raw_exchange(
    key: &agent::identity::HostKey,
    to: &Envoy,
    bytes: &[u8],
    wait: Duration,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    runtime().block_on(async {
        let mut stream = raw_connect(key, to).await;
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(wait, stream.read_to_end(&mut got)).await;
        got
    })
}

/// A admitting B and `intruder` (authenticated, maybe hostile), B admitting
/// A, both started, A holding a 2 MiB blob: (A, B, its id, its bytes).
fn pair_admitting(
    intruder: &agent::identity::HostKey,
    seed: u64,
) -> (Envoy, Envoy, String, Vec<u8>) {
    let (mut a, mut b) = (Envoy::new(), Envoy::new());
    a.allow = vec![b.key.clone(), intruder.public().to_string()];
    a.write_config();
    b.allow(&[&a]);
    a.start();
    b.start();
    let data = random(2 << 20, seed);
    let id = a.add(&a.file("blob", &data));
    (a, b, id, data)
}

/// B fetches `id` from A and gets `data`: A still serves everyone else.
fn assert_still_served(a: &Envoy, b: &Envoy, id: &str, data: &[u8]) {
    let out_path = b.dir.path().join("out.bin");
    b.fetch(id, &[a.addr()], &out_path).expect(OK);
    assert!(fs::read(&out_path).unwrap() == data, "B's copy differs");
}

#[test]
fn hostile_frame_closes_only_that_connection() {
    use agent::identity::HostKey;

    let intruder = HostKey::generate().unwrap();
    let (a, b, id, data) = pair_admitting(&intruder, 10);

    // A header claiming a 4 GiB body of an unknown kind.
    let received = raw_exchange(
        &intruder,
        &a,
        &[0xff, 0xff, 0xff, 0xff, 0xee, 0, 0, 0],
        Duration::from_secs(10),
    );
    // A answered with its Hello and then closed (a Close frame follows).
    assert!(!received.is_empty());
    assert!(a.wait_log("malformed frame"), "{}", a.log());
    assert_still_served(&a, &b, &id, &data);
}

/// A flood of bad-chunk reports (each would make A read and hash a chunk)
/// is cut off with `LIMIT` after 16, re-checked at most one at a time, and
/// A still serves everyone else.
#[test]
fn a_flood_of_bad_chunk_reports_is_cut_off() {
    use agent::identity::HostKey;
    use substrate::wire::{CloseCode, Decoder, Frame, Limits};

    let intruder = HostKey::generate().unwrap();
    let (a, b, id, data) = pair_admitting(&intruder, 23);
    let mut bytes = hello_frame();
    let report = Frame::BadChunk {
        blob: id.parse().unwrap(),
        chunk_index: 0,
    };
    bytes.extend(encoded(&report, 40));
    let received = raw_exchange(&intruder, &a, &bytes, Duration::from_secs(10));
    let mut decoder = Decoder::new(Limits::DEFAULT);
    decoder.feed(&received);
    let mut last = None;
    while let Ok(Some(f)) = decoder.poll_frame() {
        if let Frame::Close { code, .. } = f {
            last = Some(code);
        }
    }
    assert_eq!(last, Some(CloseCode::LIMIT), "{}", a.log());
    assert!(a.wait_log("more than 16 bad-chunk reports"), "{}", a.log());
    let log = a.log();
    let checked = log.matches("as bad: re-verifying").count();
    assert!((1..=16).contains(&checked), "{checked} re-checks: {log}");
    assert_still_served(&a, &b, &id, &data);
}

/// Manifest requests are charged to `limits.requests_per_s` like chunk
/// requests: against 100/s (burst 64), 64 page requests are answered at
/// once, the 40 asked next no sooner than 0.4 s after the first.
#[test]
fn manifest_requests_are_paced_by_the_request_rate() {
    use agent::identity::HostKey;
    use substrate::wire::{Decoder, Frame, Limits};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The admission burst (64), then 40 more at 100 a second.
    const WAVES: [usize; 2] = [64, 40];
    let intruder = HostKey::generate().unwrap();
    let a = started_admitting(&intruder, "limits:\n  requests_per_s: 100\n");
    let id = a.add(&a.file("blob", &random(1 << 20, 24)));
    let ask = Frame::GetManifestPage {
        blob: id.parse().unwrap(),
        page: 0,
    };
    let took = runtime().block_on(async {
        let mut stream = raw_connect(&intruder, &a).await;
        let mut decoder = Decoder::new(Limits::DEFAULT);
        let mut buf = vec![0u8; 64 << 10];
        // From the first ask: the bucket refills while the first wave is
        // answered, whatever that takes.
        let start = Instant::now();
        for wave in WAVES {
            stream.write_all(&encoded(&ask, wave)).await.unwrap();
            stream.flush().await.unwrap();
            let mut pages = 0;
            while pages < wave {
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .expect("A answers")
                    .unwrap();
                assert!(n > 0, "A closed after {pages} pages");
                decoder.feed(&buf[..n]);
                while let Some(f) = decoder.poll_frame().unwrap() {
                    pages += usize::from(matches!(f, Frame::ManifestPage { .. }));
                }
            }
        }
        start.elapsed()
    });
    assert!(
        took >= Duration::from_millis(350),
        "{} pages past the burst of 64 answered {took:?} after the first ask, at 100 requests/s",
        WAVES[1],
    );
}

/// A peer that queues more manifest requests than the daemon answers
/// (here 1000 at once, past the burst at 100 a second) is cut off: the
/// connection's writer is not its to hold.
#[test]
fn a_flood_of_manifest_requests_is_cut_off() {
    use agent::identity::HostKey;
    use substrate::wire::{CloseCode, Decoder, Frame, Limits};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let intruder = HostKey::generate().unwrap();
    let a = started_admitting(&intruder, "limits:\n  requests_per_s: 100\n");
    let id = a.add(&a.file("blob", &random(1 << 20, 25)));
    let ask = Frame::GetManifest {
        blob: id.parse().unwrap(),
    };
    let asks = encoded(&ask, 1000);
    let close = runtime().block_on(async {
        let mut stream = raw_connect(&intruder, &a).await;
        stream.write_all(&asks).await.unwrap();
        stream.flush().await.unwrap();
        let mut decoder = Decoder::new(Limits::DEFAULT);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("A closes the connection")
                .unwrap_or(0);
            assert!(n > 0, "A ended the stream without a Close frame");
            decoder.feed(&buf[..n]);
            while let Some(f) = decoder.poll_frame().unwrap() {
                if let Frame::Close { code, text } = f {
                    return (code, text.to_owned());
                }
            }
        }
    });
    assert_eq!(close.0, CloseCode::PROTOCOL, "{}", close.1);
    assert!(
        close
            .1
            .contains("more than 64 manifest requests unanswered"),
        "{}",
        close.1
    );
}

/// A started envoy with `extra` config admitting only `key`.
fn started_admitting(key: &agent::identity::HostKey, extra: &str) -> Envoy {
    let mut a = Envoy::with_extra(extra);
    a.allow = vec![key.public().to_string()];
    a.write_config();
    a.start();
    a
}

/// A loopback TCP proxy whose first connection goes to `first` and every
/// later one to `rest`; returns its address.
fn divert_after_first(first: String, rest: String) -> String {
    proxy(first, rest, Duration::ZERO)
}

/// A loopback TCP proxy to `to` that holds back the first bytes `to` sends
/// on each connection for `delay` (its handshakes end that much later).
fn slow_to_answer(to: String, delay: Duration) -> String {
    proxy(to.clone(), to, delay)
}

/// A loopback TCP proxy: the first connection goes to `first`, every later
/// one to `rest`; what the server sends waits `delay` on each connection
/// before it is forwarded. Returns its address.
fn proxy(first: String, rest: String, delay: Duration) -> String {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(if n == 0 { &first } else { &rest }) else {
                continue;
            };
            let ways = [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    None,
                ),
                (server, client, Some(delay)),
            ];
            for (mut from, mut to, wait) in ways {
                std::thread::spawn(move || {
                    if let Some(wait) = wait {
                        std::thread::sleep(wait);
                    }
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// What a [`hostile_server`] does with a connection once it has sent its frames.
#[derive(Clone, Copy)]
enum After {
    HoldOpen,
    /// Close it (without a TLS close_notify, as a refused connection is)
    /// as soon as the peer sends anything.
    CloseOnceAsked,
}

/// A host `admits` lets in, holding `key`, on loopback: every connection
/// gets its Hello, then after `delay` the frames `then` (encoded), then
/// [`After`]. Returns its address.
fn hostile_server(
    key: agent::identity::HostKey,
    admits: &Envoy,
    delay: Duration,
    then: Vec<u8>,
    after: After,
) -> String {
    use agent::tls::{self, AllowList};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let admits: agent::identity::PeerKey = admits.key.parse().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let config = tls::server_config(&key, Arc::new(AllowList::new(vec![admits]))).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let config = Arc::clone(&config);
                let then = then.clone();
                tokio::spawn(async move {
                    let Ok((mut stream, _)) =
                        tls::accept(&config, tcp, Duration::from_secs(10)).await
                    else {
                        return;
                    };
                    let _ = stream.write_all(&hello_frame()).await;
                    let _ = stream.flush().await;
                    tokio::time::sleep(delay).await;
                    let _ = stream.write_all(&then).await;
                    let _ = stream.flush().await;
                    match after {
                        After::HoldOpen => {
                            let _ = stream.read_to_end(&mut Vec::new()).await;
                        }
                        After::CloseOnceAsked => {
                            let _ = stream.read(&mut [0u8; 4096]).await;
                        }
                    }
                });
            }
        });
    });
    addr
}

/// A source flooding `Have` frames (each costs the fetch a pass over every
/// chunk) is cut off as a protocol violation, and the fetch fails at once
/// instead of waiting on it.
#[test]
fn a_source_flooding_have_frames_is_cut_off() {
    use agent::identity::HostKey;
    use substrate::wire::{Frame, HaveMap};

    let source = HostKey::generate().unwrap();
    let mut b = Envoy::new();
    b.allow = vec![source.public().to_string()];
    b.write_config();
    b.start();
    let id = "v1-b3-".to_owned() + &"ab".repeat(32);
    let have = HaveMap::all(id.parse().unwrap(), 0, 1 << 20);
    let then = encoded(&Frame::Have(have), 200);
    let hostile = hostile_server(source, &b, Duration::ZERO, then, After::HoldOpen);
    let out_path = b.dir.path().join("out.bin");
    let started = Instant::now();
    let out = b.fetch(&id, &[hostile], &out_path);
    assert_ne!(out.code, Some(OK), "the fetch cannot succeed");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the fetch waited {:?} on the flooding source",
        started.elapsed()
    );
    assert!(
        b.wait_log("more than 16 Have frames a second"),
        "{}",
        b.log()
    );
}

/// A source that sends the manifest root and then never a page (its one
/// Hello keeps nothing alive here) is dropped after the page stall timeout
/// and the pages it owed are asked of the other source: the fetch completes
/// instead of waiting on it for good.
#[test]
fn a_source_that_sends_no_manifest_page_is_dropped_and_its_pages_asked_elsewhere() {
    use agent::identity::HostKey;
    use engine::manifest::{Manifest, ManifestLimits};
    use substrate::wire::Frame;

    let silent = HostKey::generate().unwrap();
    let mut a = Envoy::new();
    let mut b = Envoy::new();
    a.allow(&[&b]);
    b.allow = vec![a.key.clone(), silent.public().to_string()];
    b.write_config();
    a.start();
    b.start();
    let data = random(3 << 20, 22);
    let id = a.add(&a.file("blob", &data));
    let bundle = run(a.cmd(&["store", "manifest", &id, "--bundle"]));
    bundle.expect(OK);
    let manifest = Manifest::from_bundle(&bundle.stdout, &ManifestLimits::default()).unwrap();
    let root = Frame::ManifestRoot {
        blob: id.parse().unwrap(),
        root: &manifest.root.encode(),
    };
    let then = encoded(&root, 1);
    // Its root is there before B asks anyone (A's connections are only
    // ready half a second later): every page is asked of it.
    let silent = hostile_server(silent, &b, Duration::ZERO, then, After::HoldOpen);
    let late = slow_to_answer(a.addr(), Duration::from_millis(500));
    let out_path = b.dir.path().join("out.bin");
    let started = Instant::now();
    b.fetch(&id, &[silent.clone(), late], &out_path).expect(OK);
    assert!(fs::read(&out_path).unwrap() == data, "B's copy differs");
    let took = started.elapsed();
    assert!(
        b.log()
            .contains(&format!("source {silent} sent no manifest page for 10s")),
        "{}",
        b.log()
    );
    assert!(took < Duration::from_secs(40), "the fetch took {took:?}");
}

/// A source's second connection answered by another host B also admits
/// (a proxy diverts it to a hostile one): it is refused before it starts,
/// so the stray chunk that host sends later is not taken as the source's
/// protocol violation (which would ban the source and fail the fetch),
/// and the fetch completes over the first connection.
#[test]
fn a_connection_answered_by_another_host_does_not_speak_for_the_source() {
    use agent::identity::HostKey;
    use substrate::wire::{Frame, RequestId};
    let other = HostKey::generate().unwrap();
    let other_key = other.public().to_string();
    let mut a = Envoy::new();
    // ~2 s for 8 MiB: the stray chunk comes while the fetch runs.
    let mut b = Envoy::with_extra("rate:\n  download_bytes_per_s: 4194304\n");
    a.allow(&[&b]);
    b.allow = vec![a.key.clone(), other_key.clone()];
    b.write_config();
    a.start();
    b.start();
    let data = random(8 << 20, 21);
    let id = a.add(&a.file("blob", &data));
    let stray = Frame::Data {
        request: RequestId(1 << 62),
        chunk_index: 0,
        payload: &[0; 64],
    };
    let then = encoded(&stray, 1);
    let hostile = hostile_server(other, &b, Duration::from_millis(700), then, After::HoldOpen);
    let proxy = divert_after_first(a.addr(), hostile);
    let out_path = b.dir.path().join("out.bin");
    b.fetch(&id, &[proxy], &out_path).expect(OK);
    assert!(fs::read(&out_path).unwrap() == data, "B's copy differs");
    assert!(
        b.wait_log(&format!("answered as {other_key}, not as {}", a.key)),
        "{}",
        b.log()
    );
}

/// A TCP stream that flips the last byte of its next write once armed: a
/// TLS record changed on the way.
struct Corrupting {
    tcp: tokio::net::TcpStream,
    armed: bool,
}

impl tokio::io::AsyncRead for Corrupting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Corrupting {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.armed {
            return std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        }
        let mut changed = buf.to_vec();
        *changed.last_mut().expect("a record is never empty") ^= 1;
        let written = std::pin::Pin::new(&mut self.tcp).poll_write(cx, &changed);
        if let std::task::Poll::Ready(Ok(n)) = written {
            // The whole record or nothing changed reached the peer.
            assert_eq!(n, buf.len(), "a short write of the changed record");
            self.armed = false;
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A record that fails authentication (a byte changed on the wire) ends
/// that connection, and the daemon tells the peer why before closing (a
/// `Close` frame with the protocol code, in its own direction, which is
/// unharmed), then ends its direction with the `bad_record_mac` alert
/// RFC 8446 §5.2 asks for instead of just dropping it; everyone else is
/// still served.
#[test]
fn a_record_changed_on_the_wire_closes_that_connection_with_the_reason() {
    use agent::identity::HostKey;
    use agent::tls::{self, AllowList};
    use std::sync::Arc;
    use substrate::wire::{CloseCode, Decoder, Frame, Limits};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let peer = HostKey::generate().unwrap();
    let (a, b, id, data) = pair_admitting(&peer, 12);

    let a_key: agent::identity::PeerKey = a.key.parse().unwrap();
    let (received, ended) = runtime().block_on(async {
        // A plain rustls client with our key, over a stream that changes
        // the next record it is given to write.
        let config = tls::client_config(&peer, Arc::new(AllowList::new(vec![a_key]))).unwrap();
        let connector = tokio_rustls::TlsConnector::from(config);
        let tcp = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        let mut stream = connector
            .connect(name, Corrupting { tcp, armed: false })
            .await
            .unwrap();
        stream.get_mut().0.armed = true;
        stream.write_all(&[0u8; 100]).await.unwrap();
        stream.flush().await.unwrap();
        // rustls itself from here (tokio-rustls reports an alert before the
        // plaintext that came with it): every record A sends is opened and
        // its plaintext kept, up to the error that ends the stream.
        let (mut io, mut tls) = stream.into_inner();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let ended = 'read: loop {
            let n = tokio::time::timeout(Duration::from_secs(10), io.tcp.read(&mut buf))
                .await
                .expect("A closes the connection")
                .unwrap();
            if n == 0 {
                break "the end of the stream".to_owned();
            }
            let mut fed = &buf[..n];
            while !fed.is_empty() {
                tls.read_tls(&mut fed).unwrap();
                let processed = tls.process_new_packets();
                // Ends with WouldBlock once what was opened is taken.
                let _ = std::io::Read::read_to_end(&mut tls.reader(), &mut got);
                if let Err(e) = processed {
                    break 'read format!("{e:?}");
                }
            }
        };
        (got, ended)
    });
    assert!(ended.contains("BadRecordMac"), "A ends with: {ended}");
    let mut decoder = Decoder::new(Limits::DEFAULT);
    decoder
        .receive_buffer(received.len())
        .extend_from_slice(&received);
    let mut close = None;
    while let Some(frame) = decoder.poll_frame().unwrap() {
        if let Frame::Close { code, text } = frame {
            close = Some((code, text.to_owned()));
        }
    }
    let (code, text) = close.expect("A says why it closes");
    assert_eq!(code, CloseCode::PROTOCOL, "{text}");
    assert!(text.contains("failed authentication"), "{text}");
    assert!(a.wait_log("failed authentication"), "{}", a.log());
    assert_still_served(&a, &b, &id, &data);
}

/// Two sources A and C, each uploading at 8 MiB/s (32 MiB take ~2 s from
/// both), holding the same 32 MiB blob, and B fetching it from both with
/// `--json fetch --out` (spawned, not waited for).
struct TwoSlowSources {
    a: Envoy,
    b: Envoy,
    c: Envoy,
    data: Vec<u8>,
    out_path: PathBuf,
    fetch: Child,
}

impl TwoSlowSources {
    fn start(seed: u64) -> TwoSlowSources {
        let slow = "rate:\n  upload_bytes_per_s: 8388608\n";
        let (mut a, mut b, mut c) = (
            Envoy::with_extra(slow),
            Envoy::new(),
            Envoy::with_extra(slow),
        );
        a.allow(&[&b]);
        b.allow(&[&a, &c]);
        c.allow(&[&b]);
        a.start();
        b.start();
        c.start();
        let data = random(32 << 20, seed);
        let id = a.add(&a.file("blob", &data));
        assert_eq!(c.add(&c.file("blob", &data)), id);
        let out_path = b.dir.path().join("out.bin");
        let fetch = b
            .cmd(&[
                "--json",
                "fetch",
                &id,
                "--from",
                &format!("{},{}", a.addr(), c.addr()),
                "--out",
            ])
            .arg(&out_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        TwoSlowSources {
            a,
            b,
            c,
            data,
            out_path,
            fetch,
        }
    }
}

/// The entry for source `addr` in the `peers` of `envoy --json fetch`'s
/// output.
fn peer_report(stdout: &[u8], addr: &str) -> Value {
    let report: Value = serde_json::from_slice(stdout).unwrap();
    report["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == addr)
        .unwrap_or_else(|| panic!("no peer {addr} in {report}"))
        .clone()
}

#[test]
fn source_dying_mid_fetch_is_dropped_and_its_work_reissued() {
    // Every field bound: an `Envoy` dropped here would stop its daemon.
    let TwoSlowSources {
        mut a,
        b: _b,
        c,
        data,
        out_path,
        fetch,
    } = TwoSlowSources::start(11);
    let (a_addr, c_addr) = (a.addr(), c.addr());
    std::thread::sleep(Duration::from_millis(1000));
    a.kill();
    let out = fetch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (from_a, from_c) = (
        peer_report(&out.stdout, &a_addr),
        peer_report(&out.stdout, &c_addr),
    );
    assert!(from_a["error"].is_string(), "{from_a}");
    assert!(from_a["bytes"].as_u64().unwrap() < data.len() as u64);
    assert!(from_c["bytes"].as_u64().unwrap() > 0, "{from_c}");
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

/// A source that stops answering mid-transfer (SIGSTOP: its sockets stay
/// open, nothing more arrives) is a stall, not a death: the fetch must not
/// wait for it, and its outstanding runs come from the other source.
#[test]
fn source_stalling_mid_fetch_is_dropped_and_its_work_reissued() {
    use nix::sys::signal::{Signal, kill};
    let TwoSlowSources {
        a,
        b,
        c,
        data,
        out_path,
        mut fetch,
    } = TwoSlowSources::start(14);
    let (a_addr, c_addr) = (a.addr(), c.addr());
    // Freeze C once it is serving, so the stall is mid-transfer.
    assert!(
        common::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            c.bytes_served() > 0
        }),
        "C never served a byte: {}",
        b.log()
    );
    kill(c.pid(), Signal::SIGSTOP).unwrap();
    let finished = common::wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        fetch.try_wait().unwrap().is_some()
    });
    let _ = kill(c.pid(), Signal::SIGCONT);
    if !finished {
        let _ = fetch.kill();
    }
    let out = fetch.wait_with_output().unwrap();
    assert!(
        finished,
        "the fetch waited on the stalled source for 120 s: {}",
        b.log()
    );
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_c = peer_report(&out.stdout, &c_addr)["bytes"].as_u64().unwrap();
    assert!(from_c > 0, "C served nothing to this fetch");
    assert!(from_c < data.len() as u64, "C served everything");
    assert!(peer_report(&out.stdout, &a_addr)["bytes"].as_u64().unwrap() > 0);
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

/// A peer that requests more than the credit it was told is cut off with
/// `LIMIT` and a log line, without costing a fetch running beside it
/// anything.
#[test]
fn peer_exceeding_its_credit_is_cut_off_and_others_unaffected() {
    use agent::identity::HostKey;
    use substrate::wire::{CloseCode, Decoder, Frame, Limits, Request, RequestId};

    const CREDIT: u64 = 4 << 20;
    let intruder = HostKey::generate().unwrap();
    let (mut a, mut b) = (
        Envoy::with_extra(&format!("limits:\n  credit_bytes: {CREDIT}\n")),
        Envoy::with_extra("rate:\n  download_bytes_per_s: 8388608\n"),
    );
    a.allow = vec![b.key.clone(), intruder.public().to_string()];
    a.write_config();
    b.allow(&[&a]);
    a.start();
    b.start();
    let data = random(16 << 20, 15);
    let id = a.add(&a.file("blob", &data));
    let chunks = {
        let out = run(a.cmd(&["--json", "store", "manifest", &id]));
        out.expect(OK);
        out.json()["chunks"].as_array().unwrap().len() as u32
    };
    // B's fetch takes ~2 s at 8 MiB/s; the intruder misbehaves meanwhile.
    let out_path = b.dir.path().join("out.bin");
    let fetch = b
        .cmd(&["--json", "fetch", &id, "--from", &a.addr(), "--out"])
        .arg(&out_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let received = {
        let mut bytes = hello_frame();
        // Every chunk of a 16 MiB blob at once: four times the credit.
        let greedy = Request {
            id: RequestId(1),
            blob: id.parse().unwrap(),
            first_chunk: 0,
            chunk_count: chunks,
        };
        bytes.extend(encoded(&Frame::Request(greedy), 1));
        raw_exchange(&intruder, &a, &bytes, Duration::from_secs(30))
    };
    // A told its credit in its Hello, sent no chunk, and closed with LIMIT.
    let mut decoder = Decoder::new(Limits::DEFAULT);
    decoder.feed(&received);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = decoder.poll_frame() {
        frames.push(match f {
            Frame::Hello(h) => format!("hello credit {}", h.credit_bytes),
            Frame::Close { code, .. } => format!("close {}", code.0),
            other => format!("{:?}", other.kind()),
        });
    }
    assert_eq!(
        frames,
        [
            format!("hello credit {CREDIT}"),
            format!("close {}", CloseCode::LIMIT.0)
        ]
    );
    assert!(a.wait_log("exceeds the remaining credit"), "{}", a.log());
    let out = fetch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&out_path).unwrap(), data);
}

/// Once A has closed a connection (here for a request beyond its credit), a peer
/// that goes on sending is disconnected: what it sends is read for a second
/// at most (`CLOSING_READS`), and it does not keep the connection by
/// talking (the idle timeout is two minutes).
#[test]
fn a_peer_talking_on_after_our_close_is_disconnected() {
    use agent::identity::HostKey;
    use substrate::wire::{Frame, Request, RequestId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let intruder = HostKey::generate().unwrap();
    let a = started_admitting(&intruder, "limits:\n  credit_bytes: 4194304\n");
    let id = a.add(&a.file("blob", &random(8 << 20, 22)));
    let hello_bytes = hello_frame();
    let mut opening = hello_bytes.clone();
    // Every chunk of the 8 MiB blob: twice A's credit.
    let chunks = {
        let out = run(a.cmd(&["--json", "store", "manifest", &id]));
        out.expect(OK);
        out.json()["chunks"].as_array().unwrap().len() as u32
    };
    let greedy = Request {
        id: RequestId(1),
        blob: id.parse().unwrap(),
        first_chunk: 0,
        chunk_count: chunks,
    };
    opening.extend(encoded(&Frame::Request(greedy), 1));
    let talked = runtime().block_on(async {
        let mut stream = raw_connect(&intruder, &a).await;
        stream.write_all(&opening).await.unwrap();
        stream.flush().await.unwrap();
        // A's Hello and Close, then the end of A's direction.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
            .await
            .expect("A closes its direction")
            .unwrap();
        // Talk on: a Hello every 50 ms until A's socket is gone.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if stream.write_all(&hello_bytes).await.is_err() || stream.flush().await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    });
    assert!(
        talked < Duration::from_secs(5),
        "A kept reading a closed connection for {talked:?}"
    );
}

/// `fetch --out` writes the file while the fetch goes on: the receiver is
/// held to 4 MiB/s, so 32 MiB take ~7 s, and a quarter of the file must be
/// written while the blob is still partial in the receiver's store.
#[test]
fn fetch_out_writes_the_file_while_fetching() {
    let (a, b) = pair_with("", "rate:\n  download_bytes_per_s: 4194304\n");
    let data = random(32 << 20, 13);
    let id = a.add(&a.file("blob", &data));
    let out_path = b.dir.path().join("out.bin");
    let temp = b.dir.path().join(".out.bin.vigo-partial");
    let mut fetching = b
        .cmd(&["fetch", &id, "--from", &a.addr(), "--out"])
        .arg(&out_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut overlapped = false;
    while fetching.try_wait().unwrap().is_none() {
        let written = fs::metadata(&temp).map_or(0, |m| m.len());
        if written >= 8 << 20 {
            let ls = run(b.cmd(&["--json", "store", "ls"]));
            ls.expect(OK);
            let listed = ls.json();
            let state = listed
                .as_array()
                .and_then(|a| a.iter().find(|x| x["id"] == id.as_str()))
                .map(|x| x["state"].clone());
            assert_eq!(
                state,
                Some(Value::from("partial")),
                "{written} bytes written out: the blob should still be arriving"
            );
            overlapped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = fetching.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(overlapped, "the file was written only after the fetch");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    assert_eq!(fs::read(&out_path).unwrap(), data);
    assert!(!temp.exists());
}

#[test]
fn upload_limit_holds_across_all_peers_together() {
    // A uploads at most 4 MiB/s in total (burst 4 MiB). B and C fetch 8 MiB
    // each at the same time: 16 MiB need at least (16 - 4) / 4 = 3 s. A
    // per-connection limit would let them finish in about 1 s.
    let mut a = Envoy::with_extra("rate:\n  upload_bytes_per_s: 4194304\n");
    let (mut b, mut c) = (Envoy::new(), Envoy::new());
    a.allow(&[&b, &c]);
    b.allow(&[&a]);
    c.allow(&[&a]);
    a.start();
    b.start();
    c.start();
    let data = random(8 << 20, 12);
    let id = a.add(&a.file("blob", &data));
    let started = Instant::now();
    let spawn = |e: &Envoy| {
        e.cmd(&["fetch", &id, "--from", &a.addr()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (fb, fc) = (spawn(&b), spawn(&c));
    for f in [fb, fc] {
        let out = f.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "16 MiB left A in {took:?}: faster than its 4 MiB/s limit"
    );
}

#[test]
fn blob_quarantined_by_verify_is_no_longer_served() {
    let (a, b) = pair();
    let data = random(1 << 20, 13);
    let id = a.add(&a.file("blob", &data));
    // Serve it once, so the daemon has it mapped.
    b.fetch(&id, &[a.addr()], &b.dir.path().join("first.bin"))
        .expect(OK);
    run(b.cmd(&["store", "rm", &id])).expect(OK);
    let blob_file = find_file(&a.dir.path().join("store"), id.trim_start_matches("v1-b3-"))
        .expect("A's blob file");
    // Corrupt one byte in place (never truncate a file a daemon maps).
    let byte = fs::read(&blob_file).unwrap()[100] ^ 1;
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new().write(true).open(&blob_file).unwrap(),
        &[byte],
        100,
    )
    .unwrap();
    run(a.cmd(&["store", "verify"])).expect(common::CORRUPT);
    let out = b.fetch(&id, &[a.addr()], &b.dir.path().join("second.bin"));
    out.expect(ERROR);
    assert!(
        out.stderr.contains("none of the sources holds"),
        "{}",
        out.stderr
    );
}
