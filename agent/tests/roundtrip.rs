//! Round trips through a real `envoy`: what goes in with `store add` comes
//! out byte for byte with `cat` and `export`, on every IO backend, and the
//! store's bookkeeping commands (`ls`, `manifest`, `rm`, `verify`) agree
//! with the bytes. Also the CLI's contract on ids, flags and bad input.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Runs `test` against one backend, skipping (with a printed reason) where
/// that backend cannot run.
fn with_backend(io: &str, name: &str, test: fn(&str)) {
    if io == "uring"
        && let Err(why) = uring_available()
    {
        skip(&format!("{name}[{io}]"), &why);
        return;
    }
    test(io);
}

/// The same suite for every backend (ripgrep's `SearcherTester` idea).
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::with_backend("uring", stringify!($name), super::$name) } )*
        }
        mod portable {
            $( #[test] fn $name() { super::with_backend("portable", stringify!($name), super::$name) } )*
        }
    };
}

per_backend!(
    sizes_round_trip,
    ls_manifest_rm,
    dedup_rm_keeps_sharer,
    bad_inputs
);

const MIB: usize = 1 << 20;
/// Empty, one byte, both sides of the 4096-byte direct-IO block, many
/// chunks inside one 4 MiB ingest slab, and many slabs.
const SIZES: [usize; 6] = [0, 1, 4095, 4096, MIB + 13, 20 * MIB + 7];

/// Checks a manifest against the bytes it describes: chunks tile the content
/// from 0 without gaps, each hashes to its entry, and the whole-content hash
/// is the plain BLAKE3 of the bytes.
#[track_caller]
fn check_manifest(m: &Manifest, id: &str, bytes: &[u8]) {
    assert_eq!(m.id, id);
    assert_eq!(m.size, bytes.len() as u64, "manifest size");
    assert_eq!(
        m.content_blake3,
        blake3_hex(bytes),
        "manifest content_blake3"
    );
    let mut next = 0u64;
    for (i, c) in m.chunks.iter().enumerate() {
        assert_eq!(
            c.offset,
            next,
            "chunk {i} does not start where chunk {} ends",
            i.wrapping_sub(1)
        );
        assert!(c.len > 0, "chunk {i} is empty");
        let slice = &bytes[c.offset as usize..(c.offset + c.len) as usize];
        assert_eq!(c.hash, blake3_hex(slice), "chunk {i} hash");
        next += c.len;
    }
    assert_eq!(
        next,
        bytes.len() as u64,
        "chunk lengths must sum to the size"
    );
}

fn sizes_round_trip(io: &str) {
    let s = Store::new(io);
    let mut ids = Vec::new();
    for (n, &size) in SIZES.iter().enumerate() {
        let (file, bytes) = s.random_file(&format!("in-{size}"), size, size as u64);
        let r = s.add_json(&file);
        let id = r["id"].as_str().expect("id").to_string();
        assert_blob_id(&id);
        assert_eq!(
            r["content_blake3"],
            blake3_hex(&bytes),
            "size {size}: content_blake3"
        );
        assert_eq!(r["size"], size as u64, "size {size}");
        assert_eq!(r["io_backend"], io, "size {size}: backend that ran");
        let m = s.manifest(&id);
        check_manifest(&m, &id, &bytes);
        assert_eq!(
            r["chunks"],
            m.chunks.len() as u64,
            "size {size}: chunk count"
        );

        assert_same_bytes(&s.cat(&id), &bytes, &format!("cat of {size} bytes"));
        let target = s.path(&format!("out-{n}"));
        let out = run(s.cmd(&["store", "export", &id]).arg(&target));
        out.expect(OK);
        let exported = fs::read(&target).expect("exported file");
        assert_same_bytes(&exported, &bytes, &format!("export of {size} bytes"));

        // Adding the same bytes again: same id, printed alone on stdout.
        let again = run(s.cmd(&["store", "add"]).arg(&file));
        again.expect(OK);
        assert_eq!(
            again.text(),
            format!("{id}\n"),
            "plain add prints the id alone"
        );
        ids.push((id, size));
    }
    assert_eq!(
        s.entries("tmp"),
        Vec::<String>::new(),
        "temp files left behind"
    );
    assert!(
        entries(s.tmp.path())
            .iter()
            .all(|n| !n.contains("vigo-export")),
        "export temp files left behind: {:?}",
        entries(s.tmp.path())
    );
    let listed = s.ls();
    assert_eq!(listed.len(), ids.len(), "ls: {listed:?}");
    for (id, size) in &ids {
        let b = listed
            .iter()
            .find(|b| b["id"] == id.as_str())
            .unwrap_or_else(|| panic!("ls does not list {id}"));
        assert_eq!(b["state"], "complete");
        assert_eq!(b["size"], *size as u64);
    }
    s.run(&["store", "verify"]).expect(OK);
    s.run(&["store", "verify", "--full"]).expect(OK);
}

#[test]
fn ids_agree_across_backends() {
    if let Err(why) = uring_available() {
        skip("ids_agree_across_backends", &why);
        return;
    }
    let stores = BACKENDS.map(Store::new);
    for &size in &[0, 4096, MIB + 13, 20 * MIB + 7] {
        let bytes = random_bytes(size, 1000 + size as u64);
        let ids: Vec<String> = stores
            .iter()
            .map(|s| {
                let f = s.write_file("in", &bytes);
                let r = s.add_json(&f);
                assert_eq!(r["io_backend"], s.io.as_str());
                r["id"].as_str().expect("id").to_string()
            })
            .collect();
        assert_eq!(ids[0], ids[1], "size {size}: backends disagree on the id");
    }
}

fn ls_manifest_rm(io: &str) {
    let s = Store::new(io);
    let (fa, a) = s.random_file("a", 3 * MIB + 5, 7);
    let (fb, b) = s.random_file("b", 200_000, 8);
    let ida = s.add(&fa);
    let idb = s.add(&fb);
    assert_ne!(ida, idb);

    // Plain ls: one tab-separated line per blob: id, state, size, chunks, owners.
    let ls = s.run(&["store", "ls"]);
    ls.expect(OK);
    let text = ls.text();
    assert_eq!(text.lines().count(), 2, "ls:\n{text}");
    for (id, len) in [(&ida, a.len()), (&idb, b.len())] {
        let line = text
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("ls does not list {id}:\n{text}"));
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields[1], "complete", "{line}");
        assert_eq!(fields[2], len.to_string(), "{line}");
    }

    let ma = s.manifest(&ida);
    check_manifest(&ma, &ida, &a);
    assert!(ma.chunks.len() > 10, "3 MiB should make many chunks");
    check_manifest(&s.manifest(&idb), &idb, &b);
    // The plain form lists the same chunks.
    let plain = s.run(&["store", "manifest", &ida]);
    plain.expect(OK);
    let rows = plain
        .text()
        .lines()
        .filter(|l| {
            l.split('\t')
                .next()
                .is_some_and(|f| f.parse::<u64>().is_ok())
        })
        .count();
    assert_eq!(rows, ma.chunks.len(), "plain manifest rows");

    s.run(&["store", "rm", &ida]).expect(OK);
    s.run(&["store", "cat", &ida]).expect(NOT_FOUND);
    s.run(&["store", "rm", &ida]).expect(NOT_FOUND);
    s.run(&["store", "manifest", &ida]).expect(NOT_FOUND);
    assert!(!s.blob_file(&ida).exists(), "rm left the blob file");
    let listed = s.ls();
    assert_eq!(listed.len(), 1, "ls after rm: {listed:?}");
    assert_eq!(listed[0]["id"], idb.as_str());
    assert_same_bytes(&s.cat(&idb), &b, "the other blob after rm");
    s.run(&["store", "verify"]).expect(OK);
}

fn dedup_rm_keeps_sharer(io: &str) {
    let s = Store::new(io);
    // B is A with a different tail: they share most chunks.
    let a = random_bytes(4 * MIB, 21);
    let mut b = a[..(3 * MIB + MIB / 2)].to_vec();
    b.extend(random_bytes(MIB / 2 + 333, 22));
    let fa = s.write_file("a", &a);
    let fb = s.write_file("b", &b);
    let ida = s.add(&fa);
    let idb = s.add(&fb);
    let ma = s.manifest(&ida);
    let mb = s.manifest(&idb);
    let b_hashes: HashSet<&str> = mb.chunks.iter().map(|c| c.hash.as_str()).collect();
    let shared = ma
        .chunks
        .iter()
        .filter(|c| b_hashes.contains(c.hash.as_str()))
        .count();
    assert!(
        shared * 10 >= ma.chunks.len() * 8,
        "precondition: A and B should share most chunks ({shared} of {})",
        ma.chunks.len()
    );
    let bundle = s.bundle(&ida, "a.bundle");

    s.run(&["store", "rm", &ida]).expect(OK);
    assert_same_bytes(&s.cat(&idb), &b, "B after removing A");
    s.run(&["store", "verify", &idb]).expect(OK);
    s.run(&["store", "verify", &idb, "--full"]).expect(OK);
    s.run(&["store", "verify"]).expect(OK);

    // The chunk index must still know where B's chunks are: assembling A
    // again finds exactly the chunks it shares with B.
    let out = run(s.cmd(&["--json", "store", "assemble"]).arg(&bundle));
    out.expect(OK);
    let plan = out.json();
    assert_eq!(plan["id"], ida.as_str());
    assert_eq!(plan["held_chunks"], shared as u64, "{plan}");
    assert_eq!(
        plan["missing_chunks"],
        (ma.chunks.len() - shared) as u64,
        "{plan}"
    );
    assert_eq!(plan["complete"], false);
    // A partial blob is never served.
    let cat = s.run(&["store", "cat", &ida]);
    assert_ne!(cat.code, Some(OK), "cat of a partial blob must fail");
    assert!(cat.stdout.is_empty(), "cat of a partial blob printed bytes");
    // Completing it from the original file, then removing B, leaves A whole.
    assert_eq!(s.add(&fa), ida);
    s.run(&["store", "rm", &idb]).expect(OK);
    assert_same_bytes(&s.cat(&ida), &a, "A after removing B");
    s.run(&["store", "verify", "--full"]).expect(OK);
}

fn bad_inputs(io: &str) {
    let s = Store::new(io);
    let dir = s.path("a-directory");
    fs::create_dir(&dir).expect("mkdir");
    let missing = s.path("no-such-file");
    let mut cases = vec![("directory", dir), ("missing file", missing)];
    let unreadable = s.write_file("unreadable", b"secret");
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).expect("chmod");
    if euid_is_root() {
        skip(
            &format!("bad_inputs[{io}] (unreadable file)"),
            "running as root: mode 000 does not stop reads",
        );
    } else {
        cases.push(("unreadable file", unreadable));
    }
    for (what, path) in cases {
        let out = run(s.cmd(&["store", "add"]).arg(&path));
        out.expect(ERROR);
        assert!(
            out.stderr.contains(&*path.to_string_lossy()),
            "adding a {what}: stderr does not name {}: {}",
            path.display(),
            out.stderr
        );
        assert!(
            out.stdout.is_empty(),
            "adding a {what} printed {:?}",
            out.text()
        );
    }
    assert_eq!(s.entries("tmp"), Vec::<String>::new());
    assert!(s.ls().is_empty());
}

/// A FIFO is not a regular file: `add` must refuse it promptly, not block
/// forever in `open` while holding the store lock.
#[test]
fn add_fifo_is_refused_not_hung() {
    let s = Store::new("portable");
    let fifo = s.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut child = s
        .cmd(&["store", "add"])
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn envoy");
    let mut status = None;
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`envoy store add FIFO` was still blocked after 5 s (holding the store lock); \
             it should refuse a non-regular file with exit 1"
        );
    }
    let stderr =
        String::from_utf8_lossy(&read_all(child.stderr.take().expect("stderr"))).into_owned();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(ERROR),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains(&*fifo.to_string_lossy()),
        "stderr: {stderr}"
    );
}

#[test]
fn ids_unknown_and_malformed() {
    let s = Store::new("portable");
    let (f, _) = s.random_file("f", 1000, 3);
    s.add(&f);
    let unknown = format!("v1-b3-{}", "0".repeat(64));
    let target = s.path("target");
    let target = target.to_str().expect("utf-8 path");
    for args in [
        vec!["store", "cat", &unknown],
        vec!["store", "rm", &unknown],
        vec!["store", "manifest", &unknown],
        vec!["store", "export", &unknown, target],
        vec!["store", "verify", &unknown],
    ] {
        let out = s.run(&args);
        out.expect(NOT_FOUND);
        assert!(
            out.stderr.contains(&unknown),
            "{args:?}: stderr does not name the id: {}",
            out.stderr
        );
    }
    assert!(
        !Path::new(target).exists(),
        "export of an unknown id created the target"
    );
    let upper = format!("v1-b3-{}", "AB".repeat(32));
    let short = format!("v1-b3-{}", "0".repeat(63));
    let v2 = format!("v2-b3-{}", "0".repeat(64));
    for bad in [
        "hello",
        "",
        short.as_str(),
        upper.as_str(),
        v2.as_str(),
        "v1-b3-zz",
    ] {
        for cmd in ["cat", "rm", "manifest", "verify"] {
            s.run(&["store", cmd, bad]).expect(USAGE);
        }
        s.run(&["store", "export", bad, target]).expect(USAGE);
    }
    // Usage errors from the parser itself.
    s.run(&["store", "frobnicate"]).expect(USAGE);
    s.run(&["store", "cat"]).expect(USAGE);
    s.run(&["--io", "fast", "store", "ls"]).expect(USAGE);
    s.run(&["store", "manifest", &unknown, "--json", "--bundle"])
        .expect(USAGE);
    assert_eq!(s.ls().len(), 1);
}

#[test]
fn store_flag_after_subcommand_and_env() {
    let s = Store::new("portable");
    let (f, bytes) = s.random_file("f", 70_000, 4);
    // `--store` is global: accepted after the subcommand too.
    let out = run(envoy()
        .args(["--io", "portable", "store", "add"])
        .arg(&f)
        .arg("--store")
        .arg(&s.dir));
    out.expect(OK);
    let id = out.text().trim_end().to_string();
    assert_blob_id(&id);
    assert!(
        s.blob_file(&id).exists(),
        "blob not in the --store directory"
    );
    assert_same_bytes(&s.cat(&id), &bytes, "cat via --store before the subcommand");

    // VIGO_STORE names the store when --store is absent.
    let other = s.path("env-store");
    let out = run(envoy()
        .env("VIGO_STORE", &other)
        .args(["store", "cat", &id]));
    out.expect(NOT_FOUND);
    let out = run(envoy()
        .env("VIGO_STORE", &other)
        .env("VIGO_IO", "portable")
        .args(["--json", "store", "add"])
        .arg(&f));
    out.expect(OK);
    assert_eq!(out.json()["id"], id.as_str());
    assert_eq!(
        out.json()["io_backend"],
        "portable",
        "VIGO_IO selects the backend"
    );
    assert!(
        other.join("blobs").join(hex_of(&id)).exists(),
        "blob not in $VIGO_STORE"
    );
    let out = run(envoy()
        .env("VIGO_STORE", &other)
        .args(["store", "cat", &id]));
    out.expect(OK);
    assert_same_bytes(&out.stdout, &bytes, "cat via VIGO_STORE");
    // --store wins over VIGO_STORE.
    let third = s.path("flag-store");
    let out = run(envoy()
        .env("VIGO_STORE", &other)
        .arg("--store")
        .arg(&third)
        .args(["--json", "store", "ls"]));
    out.expect(OK);
    assert_eq!(out.json(), serde_json::json!([]));
}

/// `assemble` of a blob this store already holds complete: nothing is left
/// to fetch, and every chunk is held locally.
#[test]
fn assemble_of_complete_blob_reports_it_held() {
    let s = Store::new("portable");
    let (f, x) = s.random_file("x", 600_000, 61);
    let id = s.add(&f);
    let chunks = s.manifest(&id).chunks.len() as u64;
    let bundle = s.bundle(&id, "x.bundle");
    let out = run(s.cmd(&["--json", "store", "assemble"]).arg(&bundle));
    out.expect(OK);
    let plan = out.json();
    assert_eq!(plan["id"], id.as_str());
    assert_eq!(plan["complete"], true, "{plan}");
    assert_eq!(plan["missing_chunks"], 0, "{plan}");
    assert_eq!(plan["missing_bytes"], 0, "{plan}");
    assert_eq!(
        plan["held_chunks"], chunks,
        "a complete blob holds all its chunks: {plan}"
    );
    assert_eq!(plan["held_bytes"], x.len() as u64, "{plan}");
    assert_same_bytes(&s.cat(&id), &x, "cat after a no-op assemble");
}
