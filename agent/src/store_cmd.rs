//! `envoy store …` and `envoy status`, written once against a [`Ctx`] (where
//! stdout, stderr and progress go) so the same code runs in the CLI when it
//! opens the store itself and in the daemon on behalf of a control-socket
//! client (see `control`). Reports are in words a person can act on.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use engine::hash::BlobId;
use engine::manifest::{Manifest, ManifestLimits};
use engine::store::{BlobState, Owner, Progress, Store, StoreError, StoreOptions};
use serde_json::json;

use crate::cli::{Global, StoreCommand, exit};

/// Subsystem recorded as the owner of blobs added from the CLI.
const CLI_SUBSYSTEM: &str = "store";

fn default_store_dir() -> PathBuf {
    if engine::sys::current_uid() == 0 {
        return PathBuf::from("/var/lib/vigo/store");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("vigo/store")
}

fn exit_code(e: &StoreError) -> u8 {
    match e {
        StoreError::NotFound(_) => exit::NOT_FOUND,
        StoreError::Corrupt { .. }
        | StoreError::CorruptFile { .. }
        | StoreError::Quarantined(_) => exit::CORRUPT,
        _ => exit::ERROR,
    }
}

pub(crate) fn fail(err: &mut dyn Write, e: &StoreError) -> u8 {
    let _ = writeln!(err, "envoy: {e}");
    exit_code(e)
}

pub(crate) fn parse_id(err: &mut dyn Write, s: &str) -> Result<BlobId, u8> {
    s.parse().map_err(|e| {
        let _ = writeln!(err, "envoy: {s:?} is not a blob id: {e}");
        exit::USAGE
    })
}

/// Largest manifest bundle `store assemble` reads (36 bytes per chunk: a 4
/// GiB blob's is ~16 MiB at the default chunk size, this one ~60 GiB's): a
/// daemon reads what any local user hands it and must not be made to hold
/// an endless stream in memory.
const BUNDLE_BYTES_MAX: u64 = 256 << 20;

/// A bundle a daemon's client handed over: a regular file (a pipe could
/// hold a daemon thread forever) no larger than [`BUNDLE_BYTES_MAX`],
/// checked before reading.
fn handed_bundle(file: std::fs::File) -> std::io::Result<std::fs::File> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (through the daemon a bundle must be one)",
        ));
    }
    if meta.len() > BUNDLE_BYTES_MAX {
        return Err(bundle_too_large());
    }
    Ok(file)
}

/// Reads a manifest bundle of at most [`BUNDLE_BYTES_MAX`] bytes.
fn read_bundle(file: std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(BUNDLE_BYTES_MAX + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > BUNDLE_BYTES_MAX {
        return Err(bundle_too_large());
    }
    Ok(bytes)
}

fn bundle_too_large() -> std::io::Error {
    std::io::Error::other(format!(
        "larger than any manifest bundle ({BUNDLE_BYTES_MAX} bytes at most)"
    ))
}

/// Where a command's output goes: the terminal, or a control-socket client.
pub struct Ctx<'a> {
    pub json: bool,
    /// The user on whose behalf the command runs (owner of what it adds).
    pub uid: u32,
    pub out: &'a mut (dyn Write + Send),
    pub err: &'a mut (dyn Write + Send),
    pub progress: ProgressTo,
    /// The file `store add` or `store assemble` reads, opened by the user
    /// who asks (a daemon's client hands it over); `None`: open the path.
    pub input: Option<std::fs::File>,
}

/// Receives (label, bytes done, bytes total).
pub type ProgressFn = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Where progress of long work is shown.
#[derive(Clone)]
pub enum ProgressTo {
    /// A bar on stderr when it is a terminal, else nothing.
    Terminal,
    /// Reported to a callback (label, done, total) every 100 ms.
    Remote(ProgressFn),
}

pub(crate) fn store_dir(g: &Global) -> PathBuf {
    g.store.clone().unwrap_or_else(default_store_dir)
}

fn open_store(g: &Global) -> Result<Arc<Store>, u8> {
    let dir = store_dir(g);
    let options = StoreOptions {
        io: g.io,
        ..StoreOptions::default()
    };
    Store::open(&dir, options).map(Arc::new).map_err(|e| {
        eprintln!("envoy: cannot open store at {}: {e}", dir.display());
        exit::ERROR
    })
}

/// Runs `work` while showing `progress` where `to` says.
pub(crate) fn with_progress<T: Send>(
    to: &ProgressTo,
    label: &str,
    progress: &Progress,
    work: impl FnOnce() -> T + Send,
) -> T {
    let done = AtomicBool::new(false);
    if let ProgressTo::Remote(report) = to {
        return std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    report(
                        label,
                        progress.done.load(Ordering::Relaxed),
                        progress.total.load(Ordering::Relaxed),
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let out = work();
            done.store(true, Ordering::Relaxed);
            out
        });
    }
    if !io::stderr().is_terminal() {
        return work();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            let bar = crate::control::new_bar();
            bar.set_message(label.to_string());
            while !done.load(Ordering::Relaxed) {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.done.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let out = work();
        done.store(true, Ordering::Relaxed);
        out
    })
}

/// `envoy store …` without a daemon: opens the store itself.
pub fn run(g: &Global, cmd: StoreCommand) -> u8 {
    let store = match open_store(g) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut out = io::stdout();
    let mut err = io::stderr();
    let mut ctx = Ctx {
        json: g.json,
        uid: engine::sys::current_uid(),
        out: &mut out,
        err: &mut err,
        progress: ProgressTo::Terminal,
        input: None,
    };
    match execute(&store, &mut ctx, cmd) {
        Ok(()) => exit::OK,
        Err(code) => code,
    }
}

/// Runs one store command against an open store.
pub fn execute(store: &Arc<Store>, ctx: &mut Ctx<'_>, cmd: StoreCommand) -> Result<(), u8> {
    let g = &*ctx;
    let json_out = g.json;
    let to = g.progress.clone();
    let uid = g.uid;
    let input = ctx.input.take();
    let out = &mut *ctx.out;
    let err = &mut *ctx.err;
    match cmd {
        StoreCommand::Add { file } => {
            let owner = Owner::new(uid, CLI_SUBSYSTEM);
            let progress = Progress::default();
            let r = with_progress(&to, "ingesting", &progress, || match input {
                Some(source) => store.add_source(source, &file, &owner, Some(&progress)),
                None => store.add_file(&file, &owner, Some(&progress)),
            })
            .map_err(|e| fail(err, &e))?;
            if json_out {
                let v = json!({
                    "id": r.id.to_string(),
                    "content_blake3": r.content_hash.to_hex(),
                    "size": r.size,
                    "chunks": r.chunks,
                    "io_backend": r.io_backend.to_string(),
                });
                writeln!(out, "{v}").map_err(|e| stdout_err(err, e))?;
            } else {
                writeln!(out, "{}", r.id).map_err(|e| stdout_err(err, e))?;
                let _ = writeln!(
                    err,
                    "{} {}: {} bytes, {} chunks, BLAKE3 {}, io {}",
                    if r.already_present {
                        "already stored"
                    } else {
                        "added"
                    },
                    file.display(),
                    r.size,
                    r.chunks,
                    r.content_hash,
                    r.io_backend
                );
            }
        }
        StoreCommand::Ls => {
            let blobs = store.list().map_err(|e| fail(err, &e))?;
            if json_out {
                let v: Vec<_> = blobs
                    .iter()
                    .map(|b| {
                        json!({
                            "id": b.id.to_string(),
                            "state": b.state.to_string(),
                            "size": b.size,
                            "chunks": b.chunks,
                            "content_blake3": b.content_hash.to_hex(),
                            "owners": b.owners.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
                            "created_unix_s": b.created_unix_s,
                            "present_chunks": b.present_chunks,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(v)).map_err(|e| stdout_err(err, e))?;
            } else {
                for b in &blobs {
                    let owners: Vec<String> = b.owners.iter().map(|o| o.to_string()).collect();
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}",
                        b.id,
                        b.state,
                        b.size,
                        b.chunks,
                        owners.join(",")
                    )
                    .map_err(|e| stdout_err(err, e))?;
                }
            }
        }
        StoreCommand::Cat { id } => {
            let id = parse_id(err, &id)?;
            let progress = Progress::default();
            let result = with_progress(&to, "reading", &progress, || {
                store.read_verified(&id, Some(&progress), &mut |b| out.write_all(b))
            });
            if let Err(StoreError::Io { source, .. }) = &result
                && source.kind() == io::ErrorKind::BrokenPipe
            {
                return Ok(());
            }
            result.map_err(|e| fail(err, &e))?;
        }
        StoreCommand::Export { id, path } => {
            let id = parse_id(err, &id)?;
            let progress = Progress::default();
            let n = with_progress(&to, "exporting", &progress, || {
                store.export(&id, &path, Some(&progress))
            })
            .map_err(|e| fail(err, &e))?;
            let _ = writeln!(
                err,
                "exported {id} to {} ({n} bytes, every chunk verified)",
                path.display()
            );
        }
        StoreCommand::Verify { id, full } => {
            let id = id.as_deref().map(|s| parse_id(err, s)).transpose()?;
            let progress = Progress::default();
            let verdicts = with_progress(&to, "verifying", &progress, || {
                store.verify(id.as_ref(), full, Some(&progress))
            })
            .map_err(|e| fail(err, &e))?;
            let corrupt = verdicts.iter().filter(|v| !v.problems.is_empty()).count();
            if json_out {
                let v: Vec<_> = verdicts
                    .iter()
                    .map(|v| {
                        json!({
                            "id": v.id.to_string(),
                            "bytes": v.bytes,
                            "ok": v.problems.is_empty(),
                            "problems": v.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                writeln!(
                    out,
                    "{}",
                    json!({"blobs": v, "corrupt": corrupt, "full": full})
                )
                .map_err(|e| stdout_err(err, e))?;
            } else {
                for v in &verdicts {
                    if v.problems.is_empty() {
                        writeln!(out, "ok\t{}", v.id).map_err(|e| stdout_err(err, e))?;
                    } else {
                        for p in &v.problems {
                            writeln!(out, "CORRUPT\t{}\t{p}", v.id)
                                .map_err(|e| stdout_err(err, e))?;
                        }
                    }
                }
                let bytes: u64 = verdicts.iter().map(|v| v.bytes).sum();
                let _ = writeln!(
                    err,
                    "verified {} blob(s), {bytes} bytes{}: {corrupt} corrupt{}",
                    verdicts.len(),
                    if full {
                        " (chunks and whole-content BLAKE3)"
                    } else {
                        " (every chunk)"
                    },
                    if corrupt > 0 {
                        " (quarantined: not served until re-added or removed)"
                    } else {
                        ""
                    }
                );
            }
            if corrupt > 0 {
                return Err(exit::CORRUPT);
            }
        }
        StoreCommand::Rm { id } => {
            let id = parse_id(err, &id)?;
            store.remove(&id).map_err(|e| fail(err, &e))?;
            let _ = writeln!(err, "removed {id}");
        }
        StoreCommand::Manifest { id, bundle } => {
            let id = parse_id(err, &id)?;
            let m = store.manifest(&id).map_err(|e| fail(err, &e))?;
            if bundle {
                out.write_all(&m.to_bundle())
                    .map_err(|e| stdout_err(err, e))?;
            } else {
                print_manifest(out, &id, &m, json_out).map_err(|e| stdout_err(err, e))?;
            }
        }
        StoreCommand::Assemble { manifest } => {
            let file = match input {
                Some(f) => handed_bundle(f),
                None => std::fs::File::open(&manifest),
            };
            let bytes = file.and_then(read_bundle).map_err(|e| {
                let _ = writeln!(
                    err,
                    "envoy: cannot read manifest {}: {e}",
                    manifest.display()
                );
                exit::ERROR
            })?;
            let m = Manifest::from_bundle(&bytes, &ManifestLimits::default()).map_err(|e| {
                let _ = writeln!(
                    err,
                    "envoy: {} is not a valid manifest bundle: {e}",
                    manifest.display()
                );
                exit::ERROR
            })?;
            let id = m.id();
            let owner = Owner::new(uid, CLI_SUBSYSTEM);
            let state = store.begin_partial(&m, &owner).map_err(|e| fail(err, &e))?;
            let plan = if state == BlobState::Partial {
                let progress = Progress::default();
                let plan = with_progress(&to, "copying from local blobs", &progress, || {
                    store.assemble_local(&id, Some(&progress))
                })
                .map_err(|e| fail(err, &e))?;
                if plan.missing_chunks == 0 {
                    store.seal_partial(&id).map_err(|e| fail(err, &e))?;
                }
                plan
            } else {
                // Already complete here: every chunk is held.
                engine::store::DeltaPlan {
                    held_chunks: m.root.chunk_count,
                    held_bytes: m.root.total_bytes,
                    ..Default::default()
                }
            };
            let complete = plan.missing_chunks == 0;
            if json_out {
                let v = json!({
                    "id": id.to_string(),
                    "complete": complete,
                    "held_chunks": plan.held_chunks,
                    "held_bytes": plan.held_bytes,
                    "missing_chunks": plan.missing_chunks,
                    "missing_bytes": plan.missing_bytes,
                });
                writeln!(out, "{v}").map_err(|e| stdout_err(err, e))?;
            } else {
                writeln!(out, "{id}").map_err(|e| stdout_err(err, e))?;
                let _ = writeln!(
                    err,
                    "{}: {} chunks ({} bytes) held locally, {} chunks ({} bytes) still to fetch",
                    if complete { "complete" } else { "partial" },
                    plan.held_chunks,
                    plan.held_bytes,
                    plan.missing_chunks,
                    plan.missing_bytes
                );
            }
        }
    }
    Ok(())
}

fn print_manifest(
    out: &mut dyn Write,
    id: &BlobId,
    m: &Manifest,
    json_out: bool,
) -> io::Result<()> {
    let entries = m.entries().map_err(io::Error::other)?;
    let p = m.root.params;
    if json_out {
        let chunks: Vec<_> = entries
            .iter()
            .map(|e| json!({"offset": e.offset, "len": e.len, "hash": e.hash.to_hex()}))
            .collect();
        let v = json!({
            "id": id.to_string(),
            "format_version": engine::manifest::MANIFEST_FORMAT_VERSION,
            "hash": "blake3",
            "chunker": {"algorithm": "fastcdc-v2020", "min": p.min_bytes, "avg": p.avg_bytes, "max": p.max_bytes},
            "size": m.root.total_bytes,
            "content_blake3": m.root.content_hash.to_hex(),
            "pages": m.root.pages.len(),
            "chunks": chunks,
        });
        writeln!(out, "{v}")
    } else {
        writeln!(out, "id\t{id}")?;
        writeln!(out, "size\t{}", m.root.total_bytes)?;
        writeln!(out, "content_blake3\t{}", m.root.content_hash)?;
        writeln!(
            out,
            "chunker\tfastcdc-v2020 min {} avg {} max {}",
            p.min_bytes, p.avg_bytes, p.max_bytes
        )?;
        writeln!(
            out,
            "chunks\t{} in {} page(s)",
            m.root.chunk_count,
            m.root.pages.len()
        )?;
        for (i, e) in entries.iter().enumerate() {
            writeln!(out, "{i}\t{}\t{}\t{}", e.offset, e.len, e.hash)?;
        }
        Ok(())
    }
}

fn stdout_err(err: &mut dyn Write, e: io::Error) -> u8 {
    if e.kind() == io::ErrorKind::BrokenPipe {
        return exit::OK;
    }
    let _ = writeln!(err, "envoy: cannot write to stdout: {e}");
    exit::ERROR
}

pub fn status(g: &Global) -> u8 {
    let facts = engine::sys::probe::platform();
    let selection = engine::io::select(g.io);
    let (backend, reason) = match &selection {
        Ok(s) => (s.backend.to_string(), s.fallback_reason.clone()),
        Err(e) => ("unavailable".to_string(), Some(e.to_string())),
    };
    if g.json {
        let v = json!({
            "os": facts.os,
            "arch": facts.arch,
            "kernel": facts.kernel,
            "io_backend": backend,
            "io_fallback_reason": reason,
            "uring_opcodes": facts.uring_opcodes,
            "uring_error": facts.uring_error,
            "ktls": facts.ktls,
            "blake3_simd": facts.blake3_simd,
        });
        println!("{v}");
    } else {
        println!("os\t{} {}", facts.os, facts.arch);
        println!("kernel\t{}", facts.kernel.as_deref().unwrap_or("unknown"));
        println!(
            "io_backend\t{backend}{}",
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        match &facts.uring_opcodes {
            Some(ops) => println!("io_uring\t{}", ops.join(" ")),
            None => println!(
                "io_uring\tunavailable: {}",
                facts.uring_error.as_deref().unwrap_or("unknown")
            ),
        }
        println!("ktls\t{}", if facts.ktls { "available" } else { "absent" });
        println!("blake3\t{}", facts.blake3_simd);
    }
    if selection.is_err() {
        exit::ERROR
    } else {
        exit::OK
    }
}
