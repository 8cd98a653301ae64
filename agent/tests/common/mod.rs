//! Helpers shared by the `envoy` integration tests: spawning the real binary
//! (through `VIGO_TEST_RUNNER` when set, e.g. qemu-user), temporary stores,
//! seeded random files and captured runs.
//!
//! Each test file is its own crate and uses a different subset of these.
#![allow(dead_code)] // reason: each test crate uses only some helpers

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

/// Exit codes `envoy --help` documents.
pub const OK: i32 = 0;
pub const ERROR: i32 = 1;
pub const USAGE: i32 = 2;
pub const NOT_FOUND: i32 = 3;
pub const CORRUPT: i32 = 4;

/// A command that runs `envoy`, prefixed by the runner in `VIGO_TEST_RUNNER`
/// (split on whitespace) when that is set. The store, IO and log settings of
/// the caller's environment are cleared so that only what a test passes counts.
pub fn envoy() -> Command {
    let bin = env!("CARGO_BIN_EXE_envoy");
    let runner = runner();
    let mut cmd = match runner.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.env_remove("VIGO_STORE")
        .env_remove("VIGO_IO")
        .env_remove("VIGO_LOG")
        .stdin(Stdio::null());
    cmd
}

fn runner() -> Vec<String> {
    std::env::var("VIGO_TEST_RUNNER")
        .map(|r| r.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether envoy runs under an emulator (`VIGO_TEST_RUNNER` set): then
/// seccomp filters installed here would bind the emulator, not envoy.
pub fn under_runner() -> bool {
    !runner().is_empty()
}

/// Prints the line the test log is searched for and lets the caller return.
/// Written to the real stderr, past libtest's capture (which only hooks the
/// print macros), so a skip shows in every `cargo test` run, not just
/// failing ones.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

/// Whether `envoy --io uring` can run here; `Err` says why not.
pub fn uring_available() -> Result<(), String> {
    let out = run(envoy().args(["--io", "uring", "status"]));
    if out.code == Some(OK) {
        Ok(())
    } else {
        Err(format!(
            "`envoy --io uring status` exited {:?}: {}",
            out.code,
            out.stderr.trim()
        ))
    }
}

/// The IO backends every store test runs against.
pub const BACKENDS: [&str; 2] = ["uring", "portable"];

/// What a finished `envoy` run left behind.
pub struct Out {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub what: String,
}

impl Out {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}): {}", self.what, self.text()))
    }

    /// Asserts the exit code, showing the run's output when it differs.
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "{} exited {:?}, wanted {code}\nstderr: {}\nstdout (first 2000 bytes): {}",
            self.what,
            self.code,
            self.stderr,
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)])
        );
        self
    }
}

/// Runs `cmd` to completion, capturing stdout and stderr.
pub fn run(cmd: &mut Command) -> Out {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Out {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        what,
    }
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A store in a fresh temporary directory, opened with one IO backend.
pub struct Store {
    /// Holds the store and any scratch files the test writes.
    pub tmp: TempDir,
    pub dir: PathBuf,
    pub io: String,
}

impl Store {
    pub fn new(io: &str) -> Store {
        let tmp = tempfile::Builder::new()
            .prefix("envoy-test-")
            .tempdir()
            .expect("create temp dir");
        let dir = tmp.path().join("store");
        Store {
            tmp,
            dir,
            io: io.to_string(),
        }
    }

    /// A store at `dir` (say, on a filesystem the test mounted).
    pub fn at(dir: &Path, io: &str) -> Store {
        let mut s = Store::new(io);
        s.dir = dir.to_path_buf();
        s
    }

    /// `envoy --store DIR --io IO ARGS…`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_io(&self.io, args)
    }

    /// Like [`Store::cmd`] with another IO backend.
    pub fn cmd_io(&self, io: &str, args: &[&str]) -> Command {
        let mut c = envoy();
        c.arg("--store").arg(&self.dir).args(["--io", io]);
        c.args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Out {
        run(&mut self.cmd(args))
    }

    /// A scratch path beside the store.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `len` seeded random bytes to a scratch file.
    pub fn random_file(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let bytes = random_bytes(len, seed);
        let path = self.path(name);
        fs::write(&path, &bytes).expect("write test file");
        (path, bytes)
    }

    pub fn write_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).expect("write test file");
        path
    }

    /// `store add --json FILE`, asserted to succeed.
    #[track_caller]
    pub fn add_json(&self, file: &Path) -> Value {
        let out = run(self.cmd(&["--json", "store", "add"]).arg(file));
        out.expect(OK);
        out.json()
    }

    /// `store add FILE`, asserted to succeed; the id.
    #[track_caller]
    pub fn add(&self, file: &Path) -> String {
        let out = run(self.cmd(&["store", "add"]).arg(file));
        out.expect(OK);
        let id = out.text().trim_end().to_string();
        assert_blob_id(&id);
        id
    }

    /// `store cat ID`, asserted to succeed; the bytes.
    #[track_caller]
    pub fn cat(&self, id: &str) -> Vec<u8> {
        let out = self.run(&["store", "cat", id]);
        out.expect(OK);
        out.stdout
    }

    /// `store ls --json`, asserted to succeed.
    #[track_caller]
    pub fn ls(&self) -> Vec<Value> {
        let out = self.run(&["--json", "store", "ls"]);
        out.expect(OK);
        match out.json() {
            Value::Array(v) => v,
            other => panic!("ls --json printed {other}"),
        }
    }

    /// `store manifest ID --json`, asserted to succeed.
    #[track_caller]
    pub fn manifest(&self, id: &str) -> Manifest {
        let out = self.run(&["--json", "store", "manifest", id]);
        out.expect(OK);
        Manifest::from_json(&out.json())
    }

    /// `store manifest ID --bundle` written to a scratch file.
    #[track_caller]
    pub fn bundle(&self, id: &str, name: &str) -> PathBuf {
        let out = self.run(&["store", "manifest", id, "--bundle"]);
        out.expect(OK);
        assert!(!out.stdout.is_empty(), "empty manifest bundle");
        self.write_file(name, &out.stdout)
    }

    pub fn blob_file(&self, id: &str) -> PathBuf {
        self.dir.join("blobs").join(hex_of(id))
    }

    /// Names in one of the store's subdirectories, sorted.
    pub fn entries(&self, sub: &str) -> Vec<String> {
        entries(&self.dir.join(sub))
    }
}

/// Sorted file names in `dir` (empty when it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("read dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// One chunk as `manifest --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub hash: String,
}

/// A manifest as `manifest --json` prints it.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub id: String,
    pub size: u64,
    pub content_blake3: String,
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    pub fn from_json(v: &Value) -> Manifest {
        let chunks = v["chunks"]
            .as_array()
            .unwrap_or_else(|| panic!("manifest without chunks: {v}"))
            .iter()
            .map(|c| Chunk {
                offset: c["offset"].as_u64().expect("chunk offset"),
                len: c["len"].as_u64().expect("chunk len"),
                hash: c["hash"].as_str().expect("chunk hash").to_string(),
            })
            .collect();
        Manifest {
            id: v["id"].as_str().expect("manifest id").to_string(),
            size: v["size"].as_u64().expect("manifest size"),
            content_blake3: v["content_blake3"]
                .as_str()
                .expect("manifest content_blake3")
                .to_string(),
            chunks,
        }
    }
}

/// `len` bytes from a ChaCha generator seeded with `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The 64 hex digits of a `v1-b3-<hex>` id: its file name in the store.
pub fn hex_of(id: &str) -> &str {
    id.strip_prefix("v1-b3-")
        .unwrap_or_else(|| panic!("{id:?} is not a v1-b3 blob id"))
}

#[track_caller]
pub fn assert_blob_id(id: &str) {
    let hex = hex_of(id);
    assert!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id:?} is not v1-b3- followed by 64 lowercase hex digits"
    );
}

/// Asserts two byte strings are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_same_bytes(found: &[u8], expected: &[u8], what: &str) {
    if found == expected {
        return;
    }
    let first = found
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(found.len().min(expected.len()));
    panic!(
        "{what}: {} bytes, expected {}; first difference at byte {first}",
        found.len(),
        expected.len()
    );
}

/// Polls `cond` every `step` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(step);
    }
}

/// Reads what a child wrote to a piped stream, to the end.
pub fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).expect("read child output");
    v
}

pub fn euid_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tmpfs mounted on a fresh temp directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount syntax, "16m"), or says why not.
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        if !euid_is_root() {
            return Err("mounting tmpfs needs root".into());
        }
        let tmp = tempfile::Builder::new()
            .prefix("envoy-tmpfs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).map_err(|e| e.to_string())?;
        let opts = format!("size={size},mode=0755");
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| format!("mount -t tmpfs -o {opts}: {e}"))?;
        Ok(Tmpfs { dir, _tmp: tmp })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("warning: cannot unmount {}: {e}", self.dir.display());
        }
    }
}
