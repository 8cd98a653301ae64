//! The blob store: sealed, immutable blob files plus the redb index.
//!
//! Layout of a store directory (`docs/store-format.md` has the details):
//!
//! ```text
//! DIR/lock           flock'd by the owning process; holds its PID
//! DIR/index.redb     the index (see `index`)
//! DIR/blobs/<hex>    sealed blobs: the whole content, immutable
//! DIR/partial/<hex>  blobs being assembled or fetched (resumable)
//! DIR/tmp/           ingest temp files
//! ```
//!
//! Durability order for a new blob: write the temp file, fsync it, rename it
//! into `blobs/`, fsync `blobs/`, then commit the index (fsync'd by redb).
//! While the file is written, its manifest pages and chunk locations already
//! go to the index, unsynced, under a provisional row key that names no blob
//! (see `IngestRows`); the commit links the blob id to them.
//! What a crash leaves behind, and how `open` repairs it:
//! - before the rename: a file in `tmp/`, deleted at open, and maybe rows
//!   under a provisional key, removed at open (the `ingests` marker);
//! - after the rename, before the commit: also a file in `blobs/` the index
//!   does not know, deleted at open (the add is simply not done);
//! - after the commit: the blob is complete and durable.
//!
//! Partial blobs keep a presence bit per chunk. A chunk's bit is committed
//! only after its bytes were verified and the partial file fsync'd, so after
//! a crash every set bit names good bytes and the rest are fetched again.
//!
//! Sealed files are never written, truncated or replaced in place — only
//! unlinked whole — which is what makes mapping them safe (see `sys::SealedMap`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::chunker::{Chunker, ChunkerParams};
use crate::hash::{BlobId, ChunkHash, ContentHash};
use crate::index::{BlobRecord, ChunkRow, Index, RowKey};
use crate::ingest::{self, IngestError, PageSink, Sink};
use crate::io::{BackendUnavailable, IoBackend, IoMode, IoSelection};
use crate::manifest::{
    ChunkEntry, EncodedPage, Manifest, ManifestError, ManifestLimits, ManifestRoot, PageRef,
};
use crate::partial_io::{Claims, RunWriter};
use crate::sys::{self, SealedMap};

/// Lifecycle of a blob in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlobState {
    /// Some chunks missing; never served.
    Partial = 1,
    /// Sealed and verified on write; served.
    Complete = 2,
    /// Found corrupt at rest; never served until re-added or removed.
    Quarantined = 3,
}

impl BlobState {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(BlobState::Partial),
            2 => Some(BlobState::Complete),
            3 => Some(BlobState::Quarantined),
            _ => None,
        }
    }
}

impl fmt::Display for BlobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobState::Partial => "partial",
            BlobState::Complete => "complete",
            BlobState::Quarantined => "quarantined",
        })
    }
}

/// Who holds a blob: a Unix user and the subsystem that stored it. A blob
/// may have several; scrubbing one owner leaves the others' data intact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u32,
    pub subsystem: String,
}

impl Owner {
    pub fn new(uid: u32, subsystem: &str) -> Self {
        assert!(!subsystem.contains(':') && !subsystem.is_empty());
        Owner {
            uid,
            subsystem: subsystem.to_string(),
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (uid, sub) = s.split_once(':')?;
        Some(Owner {
            uid: uid.parse().ok()?,
            subsystem: sub.to_string(),
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.subsystem)
    }
}

/// Errors of store operations. Each names what a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {dir} is in use by {}", pid.map(|p| format!("PID {p}")).unwrap_or_else(|| "another process".into()))]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("no blob {0} in this store")]
    NotFound(BlobId),
    #[error("blob {0} is not complete (partial): it cannot be read yet")]
    Incomplete(BlobId),
    #[error("blob {0} is quarantined as corrupt: re-add it or remove it")]
    Quarantined(BlobId),
    #[error(
        "blob {id} is corrupt: chunk {index} at offset {offset} ({len} bytes) does not match its hash"
    )]
    Corrupt {
        id: BlobId,
        index: u64,
        offset: u64,
        len: u32,
    },
    #[error("blob {id} is corrupt: {why}")]
    CorruptFile { id: BlobId, why: String },
    #[error(
        "not enough space in {}: {needed} bytes needed{}, {available} available",
        path.display(),
        if *kept_free > 0 { format!(" ({kept_free} of them kept free by the store's reserve)") } else { String::new() }
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
        /// Of `needed`, what the store keeps free ([`StoreOptions::reserve_bytes`]
        /// and a small fixed margin); 0 for a file outside the store.
        kept_free: u64,
    },
    #[error("cannot write {}: no space left on the filesystem (nothing half-written was kept)", path.display())]
    DiskFull { path: PathBuf },
    #[error("{}: {why}", path.display())]
    Input { path: PathBuf, why: String },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store index is damaged: {0}")]
    CorruptIndex(String),
    #[error("store format version {found} is not supported (this build reads version {supported})")]
    FormatVersion { found: u64, supported: u64 },
    #[error(transparent)]
    Backend(#[from] BackendUnavailable),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("chunk {index} of blob {id} does not match its hash")]
    BadChunk { id: BlobId, index: u64 },
    #[error("blob {0} is not partial (nothing to receive)")]
    NotPartial(BlobId),
}

impl StoreError {
    /// A reader's sink (the output of `cat`, an export stream) failed.
    fn output(source: io::Error) -> StoreError {
        StoreError::Io {
            op: "cannot write output",
            path: PathBuf::from("-"),
            source,
        }
    }

    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return StoreError::DiskFull {
                    path: path.to_path_buf(),
                };
            }
            StoreError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub io: IoMode,
    pub chunker: ChunkerParams,
    pub limits: ManifestLimits,
    /// Write blob files with direct IO (bypassing the page cache) where the
    /// filesystem allows it. Faster durable ingest; later reads come from disk.
    pub direct_writes: bool,
    /// Free space every new blob (an add, a fetch's partial blob) must leave
    /// on the store's filesystem, on top of a small fixed margin: the store
    /// refuses one up front rather than fill the disk. Default 0; the daemon
    /// sets its `limits.reserve_bytes`.
    pub reserve_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            io: IoMode::Auto,
            chunker: ChunkerParams::DEFAULT,
            limits: ManifestLimits::default(),
            direct_writes: true,
            reserve_bytes: 0,
        }
    }
}

/// What `add_file` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddReport {
    pub id: BlobId,
    pub content_hash: ContentHash,
    pub size: u64,
    pub chunks: u64,
    pub io_backend: IoBackend,
    /// The blob was already complete in the store; nothing new was kept.
    pub already_present: bool,
}

/// One blob as `ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub id: BlobId,
    pub state: BlobState,
    pub size: u64,
    pub chunks: u64,
    pub content_hash: ContentHash,
    pub owners: Vec<Owner>,
    pub created_unix_s: u64,
    /// Chunks held durably: all of them unless the blob is partial.
    pub present_chunks: u64,
}

/// A problem `verify` found in one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    MissingFile,
    WrongLength { expected: u64, found: u64 },
    CorruptChunk { index: u64, offset: u64, len: u32 },
    ContentMismatch,
    Unreadable(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingFile => f.write_str("blob file is missing"),
            Problem::WrongLength { expected, found } => {
                write!(f, "blob file has {found} bytes, manifest says {expected}")
            }
            Problem::CorruptChunk { index, offset, len } => {
                write!(
                    f,
                    "chunk {index} at offset {offset} ({len} bytes) does not match its hash"
                )
            }
            Problem::ContentMismatch => {
                f.write_str("whole-content BLAKE3 does not match the manifest")
            }
            Problem::Unreadable(why) => write!(f, "unreadable: {why}"),
        }
    }
}

/// The verdict on one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobVerdict {
    pub id: BlobId,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

/// Which chunks of a manifest the store already holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaPlan {
    pub held_chunks: u64,
    pub held_bytes: u64,
    pub missing_chunks: u64,
    pub missing_bytes: u64,
}

/// Progress of long operations, in bytes; read from another thread.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// The blob store. `Sync`: operations may run concurrently from many threads
/// of the one process that owns the store.
pub struct Store {
    dir: PathBuf,
    index: Index,
    options: StoreOptions,
    io: IoSelection,
    chunker: Chunker,
    /// Serializes the seal step (rename + commit) so two adds of the same
    /// content cannot both rename.
    seal_lock: Mutex<()>,
    /// Serializes writes to one partial blob (presence read-modify-write).
    partial_lock: Mutex<()>,
    /// The live writer of each partial blob: everyone writing one blob (a
    /// fetch, its local copies, `store assemble`) shares its claims and its
    /// sealed flag, so no one writes a file another has sealed.
    writers: Mutex<HashMap<BlobId, std::sync::Weak<PartialWriter>>>,
    temp_seq: AtomicU64,
    _lock: sys::DirLock,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.dir.display())
    }
}

const LOCK_FILE: &str = "lock";
const INDEX_FILE: &str = "index.redb";
const BLOBS_DIR: &str = "blobs";
const PARTIAL_DIR: &str = "partial";
const TMP_DIR: &str = "tmp";
/// Room for index growth beyond the content itself.
const SPACE_MARGIN_BYTES: u64 = 16 << 20;
/// Manifest pages per index transaction when sealing or removing: bounds the
/// transaction's memory: 2 MiB of rows for 32 pages of 4096 chunks, and
/// redb's dirty pages.
pub(crate) const PAGES_PER_TX: u32 = 32;
/// How an add's last index transactions shrink: one is cut short when only
/// this many pages (~40 MB each) are still expected, so the last one, written
/// after the last byte has been hashed, holds at most the last step's pages.
/// The first step leaves the cut transaction time to finish while the rest
/// is hashed (a 9-page transaction took ~0.7 s while the other stages ran).
const INGEST_TAIL_STEPS: [u64; 2] = [8, 2];
/// Chunks hashed together by `verify` (~2.5 MiB at the default chunk size):
/// enough to keep every SIMD lane busy across chunk lengths.
const VERIFY_BATCH_CHUNKS: usize = 256;

impl Store {
    /// Opens (creating if needed) the store at `dir`, takes its lock, checks
    /// its format version, probes the IO backend and repairs what a crash
    /// left behind.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(StoreError::io("cannot create store directory", dir))?;
        let lock = match sys::lock_exclusive(&dir.join(LOCK_FILE)) {
            Ok(l) => l,
            Err(sys::LockError::Held(pid)) => {
                return Err(StoreError::InUse {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            Err(sys::LockError::Io(e)) => return Err(StoreError::io("cannot lock store", dir)(e)),
        };
        for sub in [BLOBS_DIR, PARTIAL_DIR, TMP_DIR] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(StoreError::io("cannot create", &p))?;
        }
        let index = Index::open(&dir.join(INDEX_FILE))?;
        let io = crate::io::select(options.io)?;
        let chunker = Chunker::new(options.chunker).map_err(|e| StoreError::Input {
            path: dir.to_path_buf(),
            why: e.to_string(),
        })?;
        let store = Store {
            dir: dir.to_path_buf(),
            index,
            options,
            io,
            chunker,
            seal_lock: Mutex::new(()),
            partial_lock: Mutex::new(()),
            writers: Mutex::new(HashMap::new()),
            temp_seq: AtomicU64::new(0),
            _lock: lock,
        };
        store.recover()?;
        Ok(store)
    }

    /// Whether a new blob of `bytes` fits: the store's filesystem must keep
    /// [`StoreOptions::reserve_bytes`] and a small margin free after it.
    /// Every new blob (`add_file`, `begin_partial`) is checked here first.
    pub fn check_room(&self, bytes: u64) -> Result<(), StoreError> {
        let kept_free = SPACE_MARGIN_BYTES.saturating_add(self.options.reserve_bytes);
        let available = sys::free_bytes(&self.dir)
            .map_err(StoreError::io("cannot stat filesystem of", &self.dir))?;
        let needed = bytes.saturating_add(kept_free);
        if available < needed {
            return Err(StoreError::NoSpace {
                path: self.dir.clone(),
                needed,
                available,
                kept_free,
            });
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn io_selection(&self) -> &IoSelection {
        &self.io
    }

    fn blob_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(BLOBS_DIR).join(id.to_hex())
    }

    fn partial_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(PARTIAL_DIR).join(id.to_hex())
    }

    /// Deletes what a crash left half-done (see the module docs).
    fn recover(&self) -> Result<(), StoreError> {
        let tmp = self.dir.join(TMP_DIR);
        for entry in fs::read_dir(&tmp).map_err(StoreError::io("cannot list", &tmp))? {
            let entry = entry.map_err(StoreError::io("cannot list", &tmp))?;
            let _ = fs::remove_file(entry.path());
        }
        for (key, root) in self.index.ingests()? {
            tracing::info!("removing the index rows of an interrupted add");
            self.remove_page_rows(&key, &root)?;
            let tx = self.index.write()?;
            tx.set_ingest(&key, None)?;
            tx.commit()?;
        }
        for (id, root) in self.index.sealing()? {
            tracing::info!("undoing the interrupted seal or removal of {id}");
            self.remove_page_rows(&self.index.row_key(&id)?, &root)?;
            let tx = self.index.write()?;
            tx.remove_record(&id)?;
            tx.set_sealing(&id, None)?;
            tx.unlink_rows(&id)?;
            tx.commit()?;
        }
        let known: HashMap<BlobId, BlobState> = self
            .index
            .blobs()?
            .into_iter()
            .map(|(id, r)| (id, r.state))
            .collect();
        // A crash inside `seal_partial` between its rename and its commit
        // leaves a partial record whose file already sits in `blobs/`: move
        // it back (its presence bits are all set, so sealing just repeats).
        // A partial record with no file at all restarts from nothing.
        for (id, state) in &known {
            if *state != BlobState::Partial || self.partial_path(id).exists() {
                continue;
            }
            if self.blob_path(id).exists() {
                fs::rename(self.blob_path(id), self.partial_path(id))
                    .map_err(StoreError::io("cannot restore", &self.partial_path(id)))?;
            } else {
                let r = self.record(id)?;
                self.create_partial_file(id, r.root.total_bytes)?;
                let tx = self.index.write()?;
                tx.clear_presence(id, r.root.pages.len() as u32)?;
                tx.commit()?;
            }
        }
        for (sub, wanted) in [(BLOBS_DIR, false), (PARTIAL_DIR, true)] {
            let d = self.dir.join(sub);
            for entry in fs::read_dir(&d).map_err(StoreError::io("cannot list", &d))? {
                let entry = entry.map_err(StoreError::io("cannot list", &d))?;
                let name = entry.file_name();
                let id = name.to_str().and_then(|n| {
                    format!("{}{n}", crate::hash::BLOB_ID_PREFIX)
                        .parse::<BlobId>()
                        .ok()
                });
                let keep = id
                    .and_then(|id| known.get(&id))
                    .is_some_and(|state| (*state == BlobState::Partial) == wanted);
                if !keep {
                    tracing::info!(
                        "removing {} left by an interrupted operation",
                        entry.path().display()
                    );
                    fs::remove_file(entry.path())
                        .map_err(StoreError::io("cannot remove", &entry.path()))?;
                }
            }
        }
        Ok(())
    }

    fn temp_path(&self, what: &str) -> PathBuf {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(TMP_DIR)
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Ingests a file: chunks, hashes and stores it durably.
    pub fn add_file(
        &self,
        path: &Path,
        owner: &Owner,
        progress: Option<&Progress>,
    ) -> Result<AddReport, StoreError> {
        self.add_source(open_input(path)?, path, owner, progress)
    }

    /// [`Store::add_file`] of a file already open for reading ([`open_input`]
    /// by whoever may read it: a daemon is handed the descriptor by its
    /// client); `path` names it in errors.
    pub fn add_source(
        &self,
        source: File,
        path: &Path,
        owner: &Owner,
        progress: Option<&Progress>,
    ) -> Result<AddReport, StoreError> {
        let input_err = |why: String| StoreError::Input {
            path: path.to_path_buf(),
            why,
        };
        let meta = source
            .metadata()
            .map_err(|e| input_err(format!("cannot stat: {e}")))?;
        if meta.is_dir() {
            return Err(input_err("is a directory; add files one at a time".into()));
        }
        if !meta.is_file() {
            return Err(input_err("is not a regular file".into()));
        }
        let size = meta.len();
        if size > self.options.limits.total_bytes_max {
            return Err(input_err(format!(
                "{size} bytes exceeds the store's blob size cap of {} bytes",
                self.options.limits.total_bytes_max
            )));
        }
        self.check_room(size)?;
        if let Some(p) = progress {
            p.total.store(size, Ordering::Relaxed);
        }

        let temp = TempFiles::new(vec![self.temp_path("add")]);
        let (file, direct) = sys::create_for_writing(&temp.paths[0], self.options.direct_writes)
            .map_err(StoreError::io("cannot create", &temp.paths[0]))?;
        let dummy = AtomicU64::new(0);
        let counter = progress.map(|p| &p.done).unwrap_or(&dummy);
        let sink = Sink {
            file: &file,
            direct,
            backend: self.io.backend,
            expected_bytes: size,
        };
        let started = std::time::Instant::now();
        let mut rows = IngestRows::new(
            &self.index,
            self.chunker.params(),
            size,
            temp.paths[0].as_os_str().as_encoded_bytes(),
        );
        let ingested = ingest::ingest(&source, sink, &self.chunker, &mut rows, counter);
        drop(file);
        let ingested = match ingested {
            Ok(i) => i,
            Err(e) => {
                // Best effort: a marker left behind is cleared at the next open.
                if let Err(why) = rows.discard(self) {
                    tracing::warn!("cannot remove the index rows of a failed add: {why}");
                }
                return Err(match e {
                    IngestError::Read(e) => input_err(format!("read failed: {e}")),
                    IngestError::Write(e) => StoreError::io("cannot write", &temp.paths[0])(e),
                    IngestError::Sync(e) => StoreError::io("cannot sync", &temp.paths[0])(e),
                    IngestError::Index(e) => *e,
                });
            }
        };
        let root = ingested.root;
        let id = root.id();
        let ingest_s = started.elapsed().as_secs_f64();
        let sealed = self.seal_ingested(&id, &root, &rows, &temp.paths[0], owner);
        let already_present = match sealed {
            Ok(present) => present,
            Err(e) => {
                if let Err(why) = rows.discard(self) {
                    tracing::warn!("cannot remove the index rows of a failed add: {why}");
                }
                return Err(e);
            }
        };
        tracing::info!(
            "added {id}: {} bytes, {} chunks; chunk+hash+write+index+fsync {ingest_s:.2}s, seal {:.2}s",
            root.total_bytes,
            root.chunk_count,
            started.elapsed().as_secs_f64() - ingest_s
        );
        Ok(AddReport {
            id,
            content_hash: root.content_hash,
            size: root.total_bytes,
            chunks: root.chunk_count,
            io_backend: self.io.backend,
            already_present,
        })
    }

    /// Moves a fully written, fsync'd file into `blobs/` and commits its
    /// record, linking it to the rows the ingest wrote. Returns whether the
    /// blob was already complete, in which case the file and the rows are
    /// discarded.
    fn seal_ingested(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        rows: &IngestRows<'_>,
        file: &Path,
        owner: &Owner,
    ) -> Result<bool, StoreError> {
        let _guard = self.seal_lock.lock().expect("seal lock poisoned");
        let existing = self.index.blob(id)?;
        if existing
            .as_ref()
            .is_some_and(|r| r.state == BlobState::Complete)
        {
            let tx = self.index.write()?;
            tx.add_owner(id, owner)?;
            tx.commit()?;
            rows.discard(self)?;
            return Ok(true);
        }
        if let Some(old) = &existing {
            // A quarantined or partial copy: drop its rows wholesale first.
            self.remove_rows(id, &old.root)?;
            let _ = fs::remove_file(self.partial_path(id));
        }
        assert_eq!(
            rows.written.pages, root.pages,
            "the page sink wrote every page of the manifest"
        );
        let target = self.blob_path(id);
        // A quarantined copy is replaced by rename: readers that still map
        // the old file keep its (old) inode; nothing is truncated.
        fs::rename(file, &target).map_err(StoreError::io("cannot move blob into", &target))?;
        let blobs = self.dir.join(BLOBS_DIR);
        sys::sync_dir(&blobs).map_err(StoreError::io("cannot sync", &blobs))?;
        let tx = self.index.write()?;
        tx.put_blob(
            id,
            &BlobRecord {
                state: BlobState::Complete,
                created_unix_s: now_unix_s(),
                root: root.clone(),
            },
        )?;
        tx.add_owner(id, owner)?;
        tx.link_rows(id, &rows.key)?;
        tx.set_ingest(&rows.key, None)?;
        tx.commit()?;
        Ok(false)
    }

    /// Writes the chunk-location rows of the manifest pages `pages` of blob
    /// `id` (manifest `root`), each group of [`PAGES_PER_TX`] pages sorted
    /// and committed unsynced (bounded memory: the rows and redb's dirty
    /// pages of one group). Starts in `tx`, and returns the open
    /// transaction (with the last group) for the caller's final, durable
    /// commit.
    fn put_chunk_rows(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        mut tx: crate::index::Tx,
        pages: impl IntoIterator<Item = u32>,
    ) -> Result<crate::index::Tx, StoreError> {
        let mut batch = Vec::new();
        let mut in_batch = 0;
        for i in pages {
            if in_batch == PAGES_PER_TX {
                tx.put_chunks(id, &mut batch)?;
                batch.clear();
                in_batch = 0;
                tx.commit_unsynced()?;
                tx = self.index.write()?;
            }
            batch.extend(ChunkRow::of_page(i, &self.index.page(id, root, i)?));
            in_batch += 1;
        }
        tx.put_chunks(id, &mut batch)?;
        Ok(tx)
    }

    /// Removes every index row of a blob: the record first (so a crash
    /// midway leaves nothing listed or served), then its pages in bounded
    /// batches. The sealing marker lets `open` finish an interrupted removal.
    fn remove_rows(&self, id: &BlobId, root: &ManifestRoot) -> Result<(), StoreError> {
        let tx = self.index.write()?;
        tx.set_sealing(id, Some(root))?;
        tx.remove_record(id)?;
        tx.commit()?;
        self.remove_page_rows(&self.index.row_key(id)?, root)?;
        let tx = self.index.write()?;
        tx.set_sealing(id, None)?;
        tx.unlink_rows(id)?;
        tx.commit()
    }

    /// Removes the pages, chunk locations and presence bits stored under
    /// `key` and listed by `root`, tolerating rows that were never written.
    fn remove_page_rows(&self, key: &RowKey, root: &ManifestRoot) -> Result<(), StoreError> {
        let mut tx = self.index.write()?;
        for i in 0..root.pages.len() as u32 {
            if let Some(bytes) = self.index.page_bytes_at(key, i)? {
                let entries = root.decode_page(i as usize, &bytes).unwrap_or_default();
                tx.remove_page(key, i, &entries)?;
            }
            if (i + 1) % PAGES_PER_TX == 0 {
                tx.commit_unsynced()?;
                tx = self.index.write()?;
            }
        }
        tx.forget_row_number(key)?;
        tx.commit()
    }

    fn record(&self, id: &BlobId) -> Result<BlobRecord, StoreError> {
        self.index.blob(id)?.ok_or(StoreError::NotFound(*id))
    }

    pub fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        self.index
            .blobs()?
            .into_iter()
            .map(|(id, r)| self.info_of(id, r))
            .collect()
    }

    pub fn info(&self, id: &BlobId) -> Result<BlobInfo, StoreError> {
        self.info_of(*id, self.record(id)?)
    }

    fn info_of(&self, id: BlobId, r: BlobRecord) -> Result<BlobInfo, StoreError> {
        let present_chunks = match r.state {
            BlobState::Partial => self.present_chunks(&id, &r.root)?,
            _ => r.root.chunk_count,
        };
        Ok(BlobInfo {
            id,
            state: r.state,
            size: r.root.total_bytes,
            chunks: r.root.chunk_count,
            content_hash: r.root.content_hash,
            owners: self.index.owners(&id)?,
            created_unix_s: r.created_unix_s,
            present_chunks,
        })
    }

    /// The whole manifest (root and every page).
    pub fn manifest(&self, id: &BlobId) -> Result<Manifest, StoreError> {
        let r = self.record(id)?;
        let mut pages = Vec::with_capacity(r.root.pages.len());
        for i in 0..r.root.pages.len() as u32 {
            let bytes = self.index.page_bytes(id, i)?;
            r.root.decode_page(i as usize, &bytes)?;
            pages.push(bytes);
        }
        Ok(Manifest {
            root: r.root,
            pages,
        })
    }

    pub fn manifest_root(&self, id: &BlobId) -> Result<ManifestRoot, StoreError> {
        Ok(self.record(id)?.root)
    }

    /// Entries of manifest page `page` of `id` (checked against its root).
    pub fn page(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        page: u32,
    ) -> Result<Vec<ChunkEntry>, StoreError> {
        self.index.page(id, root, page)
    }

    /// Encoded bytes of manifest page `page` of `id`, as stored (and as sent
    /// to peers, who check them against the root).
    pub fn page_bytes(&self, id: &BlobId, page: u32) -> Result<Vec<u8>, StoreError> {
        self.index.page_bytes(id, page)
    }

    /// A complete blob's file opened afresh, read-only, with its manifest
    /// root: a descriptor of its own to hand to an exporting client
    /// (`envoy fetch --out`), which verifies what it reads against the
    /// manifest's content hash. Refuses partial and quarantined blobs, and a
    /// file whose size is not the manifest's.
    pub fn open_blob_file(&self, id: &BlobId) -> Result<(File, ManifestRoot), StoreError> {
        let r = self.record(id)?;
        match r.state {
            BlobState::Complete => {}
            BlobState::Partial => return Err(StoreError::Incomplete(*id)),
            BlobState::Quarantined => return Err(StoreError::Quarantined(*id)),
        }
        let path = self.blob_path(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::CorruptFile {
                    id: *id,
                    why: "blob file is missing".into(),
                });
            }
            Err(e) => return Err(StoreError::io("cannot open", &path)(e)),
        };
        let found = file
            .metadata()
            .map_err(StoreError::io("cannot stat", &path))?
            .len();
        if found != r.root.total_bytes {
            return Err(StoreError::CorruptFile {
                id: *id,
                why: format!(
                    "blob file has {found} bytes, manifest says {}",
                    r.root.total_bytes
                ),
            });
        }
        Ok((file, r.root))
    }

    /// Opens a complete blob for reading (mapped); refuses partial and
    /// quarantined ones.
    pub fn open_blob(&self, id: &BlobId) -> Result<BlobReader, StoreError> {
        let (file, root) = self.open_blob_file(id)?;
        let map = SealedMap::new(&file, root.total_bytes)
            .map_err(StoreError::io("cannot map", &self.blob_path(id)))?;
        Ok(BlobReader { id: *id, root, map })
    }

    /// Streams a blob's bytes to `sink`, verifying every chunk before it is
    /// handed out; stops with [`StoreError::Corrupt`] at the first bad one
    /// (which is never passed to `sink`) and quarantines the blob.
    pub fn read_verified(
        &self,
        id: &BlobId,
        progress: Option<&Progress>,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, StoreError> {
        let reader = self.open_blob(id)?;
        if let Some(p) = progress {
            p.total.store(reader.root.total_bytes, Ordering::Relaxed);
        }
        let mut index = 0u64;
        for page in 0..reader.root.pages.len() as u32 {
            let entries = self.index.page(id, &reader.root, page)?;
            let page_ref = reader.root.pages[page as usize];
            reader
                .map
                .prefetch(page_ref.first_offset, page_ref.byte_len);
            let bytes = reader.map.bytes();
            // Verify a page's chunks in parallel, then hand them out in order.
            let bad = entries.par_iter().position_first(|e| {
                ChunkHash::of(&bytes[e.offset as usize..e.end() as usize]) != e.hash
            });
            let good = bad.unwrap_or(entries.len());
            if good > 0 {
                let from = entries[0].offset as usize;
                let to = entries[good - 1].end() as usize;
                sink(&bytes[from..to]).map_err(StoreError::output)?;
                if let Some(p) = progress {
                    p.done.store(to as u64, Ordering::Relaxed);
                }
            }
            if let Some(b) = bad {
                let e = entries[b];
                self.quarantine(id)?;
                return Err(StoreError::Corrupt {
                    id: *id,
                    index: index + b as u64,
                    offset: e.offset,
                    len: e.len,
                });
            }
            index += entries.len() as u64;
        }
        Ok(reader.root.total_bytes)
    }

    /// Writes a verified copy of a blob to `target` (via a temp file in the
    /// same directory and a rename, so `target` is never half-written).
    pub fn export(
        &self,
        id: &BlobId,
        target: &Path,
        progress: Option<&Progress>,
    ) -> Result<u64, StoreError> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if target.is_dir() {
            return Err(StoreError::Input {
                path: target.to_path_buf(),
                why: "is a directory; give the file name to write".into(),
            });
        }
        let total = self.record(id)?.root.total_bytes;
        let available =
            sys::free_bytes(dir).map_err(StoreError::io("cannot stat filesystem of", dir))?;
        if available < total {
            return Err(StoreError::NoSpace {
                path: dir.to_path_buf(),
                needed: total,
                available,
                kept_free: 0,
            });
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = TempFiles::new(vec![
            dir.join(format!(".{name}.vigo-export-{}", std::process::id())),
        ]);
        let _ = fs::remove_file(&temp.paths[0]);
        let mut out = crate::io::SequentialFile::create(&temp.paths[0])
            .map_err(StoreError::io("cannot create", &temp.paths[0]))?;
        let written = self.read_verified(id, progress, &mut |bytes| out.write_all(bytes))?;
        // Durable before it is visible: a crash must never leave `target`
        // replaced by an empty or partial file.
        out.finish()
            .map_err(StoreError::io("cannot write", &temp.paths[0]))?;
        fs::rename(&temp.paths[0], target)
            .map_err(StoreError::io("cannot rename export to", target))?;
        sys::sync_dir(dir).map_err(StoreError::io("cannot sync", dir))?;
        temp.disarm();
        Ok(written)
    }

    /// Re-hashes one chunk of a sealed blob (a peer reported it bad):
    /// `Ok(true)` when it matches its manifest entry; when it does not, the
    /// blob is quarantined (never served again until re-fetched or re-added)
    /// and `Ok(false)`. A blob already quarantined or partial reports `false`.
    pub fn recheck_chunk(&self, id: &BlobId, index: u64) -> Result<bool, StoreError> {
        let reader = match self.open_blob(id) {
            Ok(r) => r,
            Err(StoreError::Quarantined(_) | StoreError::Incomplete(_)) => return Ok(false),
            Err(StoreError::CorruptFile { .. }) => {
                self.quarantine(id)?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let per_page = u64::from(crate::manifest::PAGE_CHUNKS);
        let page = index / per_page;
        if page >= reader.root().pages.len() as u64 {
            return Err(StoreError::BadChunk { id: *id, index });
        }
        let entries = self.index.page(id, reader.root(), page as u32)?;
        let Some(e) = entries.get((index % per_page) as usize) else {
            return Err(StoreError::BadChunk { id: *id, index });
        };
        let ok = reader
            .range(e.offset, u64::from(e.len))
            .is_some_and(|bytes| ChunkHash::of(bytes) == e.hash);
        if !ok {
            self.quarantine(id)?;
        }
        Ok(ok)
    }

    fn quarantine(&self, id: &BlobId) -> Result<(), StoreError> {
        self.set_state(id, BlobState::Quarantined)
    }

    fn set_state(&self, id: &BlobId, state: BlobState) -> Result<(), StoreError> {
        let _guard = self.seal_lock.lock().expect("seal lock poisoned");
        let mut r = self.record(id)?;
        if r.state == state {
            return Ok(());
        }
        if state == BlobState::Quarantined {
            tracing::warn!("quarantining corrupt blob {id}");
        }
        r.state = state;
        let tx = self.index.write()?;
        tx.put_blob(id, &r)?;
        tx.commit()
    }

    /// Re-hashes every chunk of one blob (or of all sealed blobs) in parallel
    /// against its manifest; with `full`, also the whole-content BLAKE3.
    /// Corrupt blobs are quarantined; a quarantined blob that verifies clean
    /// (say, after its file was repaired by re-adding) is served again.
    pub fn verify(
        &self,
        only: Option<&BlobId>,
        full: bool,
        progress: Option<&Progress>,
    ) -> Result<Vec<BlobVerdict>, StoreError> {
        let targets: Vec<(BlobId, BlobRecord)> = match only {
            Some(id) => vec![(*id, self.record(id)?)],
            None => self.index.blobs()?,
        };
        let targets: Vec<_> = targets
            .into_iter()
            .filter(|(_, r)| r.state != BlobState::Partial)
            .collect();
        if let Some(p) = progress {
            p.total.store(
                targets.iter().map(|(_, r)| r.root.total_bytes).sum(),
                Ordering::Relaxed,
            );
        }
        let mut verdicts = Vec::new();
        for (id, record) in targets {
            let problems = self.verify_one(&id, &record.root, full, progress)?;
            let wanted = if problems.is_empty() {
                BlobState::Complete
            } else {
                BlobState::Quarantined
            };
            self.set_state(&id, wanted)?;
            verdicts.push(BlobVerdict {
                id,
                bytes: record.root.total_bytes,
                problems,
            });
        }
        Ok(verdicts)
    }

    fn verify_one(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        full: bool,
        progress: Option<&Progress>,
    ) -> Result<Vec<Problem>, StoreError> {
        let path = self.blob_path(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![Problem::MissingFile]),
            Err(e) => return Ok(vec![Problem::Unreadable(e.to_string())]),
        };
        let found = file
            .metadata()
            .map_err(StoreError::io("cannot stat", &path))?
            .len();
        if found != root.total_bytes {
            return Ok(vec![Problem::WrongLength {
                expected: root.total_bytes,
                found,
            }]);
        }
        let map = SealedMap::new(&file, found).map_err(StoreError::io("cannot map", &path))?;
        let bytes = map.bytes();
        let firsts: Vec<u64> = root
            .pages
            .iter()
            .scan(0u64, |next, p| {
                let first = *next;
                *next += u64::from(p.chunk_count);
                Some(first)
            })
            .collect();
        // One task per manifest page (4096 chunks, ~32 MiB): it maps its own
        // range and hashes its chunks in SIMD batches, so both cores fault
        // pages in and hash without waiting for each other between pages.
        let pages: Vec<Result<Vec<Problem>, String>> = (0..root.pages.len() as u32)
            .into_par_iter()
            .map(|page| {
                let entries = self.index.page(id, root, page).map_err(|e| e.to_string())?;
                let page_ref = root.pages[page as usize];
                map.prefetch(page_ref.first_offset, page_ref.byte_len);
                let first_index = firsts[page as usize];
                let mut bad = Vec::new();
                let mut hashes = vec![[0u8; 32]; VERIFY_BATCH_CHUNKS];
                for (b, batch) in entries.chunks(VERIFY_BATCH_CHUNKS).enumerate() {
                    let msgs: Vec<&[u8]> = batch
                        .iter()
                        .map(|e| &bytes[e.offset as usize..e.end() as usize])
                        .collect();
                    sys::hash_batch::hash_batch(&msgs, &mut hashes[..batch.len()]);
                    for (i, (e, h)) in batch.iter().zip(&hashes).enumerate() {
                        if *h != e.hash.0 {
                            bad.push(Problem::CorruptChunk {
                                index: first_index + (b * VERIFY_BATCH_CHUNKS + i) as u64,
                                offset: e.offset,
                                len: e.len,
                            });
                        }
                    }
                }
                if let Some(p) = progress {
                    p.done.fetch_add(page_ref.byte_len, Ordering::Relaxed);
                }
                Ok(bad)
            })
            .collect();
        let mut problems = Vec::new();
        for page in pages {
            match page {
                Ok(mut bad) => problems.append(&mut bad),
                Err(why) => {
                    problems.push(Problem::Unreadable(why));
                    return Ok(problems);
                }
            }
        }
        if full {
            let mut hasher = blake3::Hasher::new();
            hasher.update_rayon(bytes);
            if ContentHash(*hasher.finalize().as_bytes()) != root.content_hash {
                problems.push(Problem::ContentMismatch);
            }
        }
        Ok(problems)
    }

    /// Removes a blob: its index rows first (so it is never served again),
    /// then its file, deleted whole. Chunks other blobs hold stay with them.
    pub fn remove(&self, id: &BlobId) -> Result<(), StoreError> {
        let _guard = self.seal_lock.lock().expect("seal lock poisoned");
        let r = self.record(id)?;
        self.remove_rows(id, &r.root)?;
        for path in [self.blob_path(id), self.partial_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("cannot remove", &path)(e)),
            }
        }
        Ok(())
    }

    // ---- delta assembly and partial blobs ------------------------------

    /// Which chunks of `manifest` are already held by some sealed blob.
    pub fn plan(&self, manifest: &Manifest) -> Result<DeltaPlan, StoreError> {
        let mut plan = DeltaPlan::default();
        self.each_held(manifest, |e, held| {
            if held {
                plan.held_chunks += 1;
                plan.held_bytes += u64::from(e.len);
            } else {
                plan.missing_chunks += 1;
                plan.missing_bytes += u64::from(e.len);
            }
            ControlFlow::Continue(())
        })?;
        Ok(plan)
    }

    /// Whether some sealed blob holds any chunk of `manifest` (it stops at
    /// the first one found). A fetch asks this while it makes the partial
    /// blob, and skips the local copy pass when the answer is no.
    pub fn holds_any(&self, manifest: &Manifest) -> Result<bool, StoreError> {
        let mut any = false;
        self.each_held(manifest, |_, held| {
            any = held;
            if held {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(any)
    }

    /// Calls `f(entry, held)` for the chunks of `manifest` in order, one
    /// page decoded at a time, until it breaks; `held` when a sealed blob
    /// other than the manifest's own holds the chunk (one index snapshot).
    fn each_held(
        &self,
        manifest: &Manifest,
        mut f: impl FnMut(&ChunkEntry, bool) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let id = manifest.id();
        let finder = self.index.chunk_finder()?;
        let none = HashSet::new();
        for (i, page) in manifest.pages.iter().enumerate() {
            for e in manifest.root.decode_page(i, page)? {
                let held = finder.find(&e.hash, &id, &none)?.is_some();
                if f(&e, held).is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Registers a blob to be assembled: a partial file of the full size and
    /// an all-clear presence map. Idempotent: an existing partial blob keeps
    /// its progress; a complete one is left alone. A new partial blob is
    /// durable from the first commit of its chunks on (until then a crash
    /// loses only the empty blob).
    pub fn begin_partial(
        &self,
        manifest: &Manifest,
        owner: &Owner,
    ) -> Result<BlobState, StoreError> {
        let id = manifest.id();
        let limits = &self.options.limits;
        // Re-check what came from outside against this store's limits, part
        // by part (no copy of the whole manifest: it is ~23 MB at 4 GiB).
        ManifestRoot::decode_verified(&manifest.root.encode(), &id, limits)?;
        if manifest.pages.len() != manifest.root.pages.len() {
            return Err(ManifestError::Inconsistent("page count differs from the root").into());
        }
        for (i, page) in manifest.pages.iter().enumerate() {
            manifest.root.decode_page(i, page)?;
        }
        let _guard = self.seal_lock.lock().expect("seal lock poisoned");
        if let Some(r) = self.index.blob(&id)?
            && r.state == BlobState::Quarantined
        {
            // The local copy is corrupt and worthless: assemble it afresh.
            tracing::warn!("rebuilding quarantined blob {id} from scratch");
            self.remove_rows(&id, &r.root)?;
            let _ = fs::remove_file(self.blob_path(&id));
        }
        if let Some(r) = self.index.blob(&id)? {
            if r.state != BlobState::Partial {
                let tx = self.index.write()?;
                tx.add_owner(&id, owner)?;
                tx.commit()?;
            }
            return Ok(r.state);
        }
        let total = manifest.root.total_bytes;
        self.check_room(total)?;
        self.create_partial_file(&id, total)?;
        let tx = self.index.write()?;
        for (i, page) in manifest.pages.iter().enumerate() {
            tx.put_page(&id, i as u32, page)?;
        }
        tx.put_blob(
            &id,
            &BlobRecord {
                state: BlobState::Partial,
                created_unix_s: now_unix_s(),
                root: manifest.root.clone(),
            },
        )?;
        tx.add_owner(&id, owner)?;
        // Not flushed here (~40 ms at 4 GiB, the 23 MB of pages): the first
        // chunk commit, flushed, carries it to the disk with it. A crash
        // before that leaves no record, and `open` removes the file.
        tx.commit_unsynced()?;
        Ok(BlobState::Partial)
    }

    fn create_partial_file(&self, id: &BlobId, total: u64) -> Result<(), StoreError> {
        let path = self.partial_path(id);
        let file = File::create(&path).map_err(StoreError::io("cannot create", &path))?;
        // Reserve the blocks now: a fetch that started must not fill the
        // disk halfway (ENOSPC here is reported before anything is fetched).
        if let Err(e) = sys::preallocate(&file, total) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(StoreError::io("cannot reserve space for", &path)(e));
        }
        file.sync_all()
            .map_err(StoreError::io("cannot sync", &path))?;
        let partial_dir = self.dir.join(PARTIAL_DIR);
        sys::sync_dir(&partial_dir).map_err(StoreError::io("cannot sync", &partial_dir))
    }

    /// Indices of the chunks a partial blob still lacks.
    pub fn missing_chunks(&self, id: &BlobId) -> Result<Vec<u64>, StoreError> {
        let r = self.record(id)?;
        if r.state != BlobState::Partial {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        self.each_presence(id, &r.root, |index, held| {
            if !held {
                out.push(index);
            }
        })?;
        Ok(out)
    }

    /// Calls `f(chunk index, held)` for every chunk of partial blob `id`,
    /// from its presence bits.
    fn each_presence(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        mut f: impl FnMut(u64, bool),
    ) -> Result<(), StoreError> {
        let mut first = 0u64;
        for (p, page) in root.pages.iter().enumerate() {
            let bits = self.index.presence(id, p as u32)?.unwrap_or_default();
            for i in 0..page.chunk_count as usize {
                f(first + i as u64, bit(&bits, i));
            }
            first += u64::from(page.chunk_count);
        }
        Ok(())
    }

    /// How many chunks of a partial blob are held (its presence bits set).
    fn present_chunks(&self, id: &BlobId, root: &ManifestRoot) -> Result<u64, StoreError> {
        let mut held = 0u64;
        self.each_presence(id, root, |_, h| held += u64::from(h))?;
        Ok(held)
    }

    /// Writes verified chunks of a partial blob: each must hash to its
    /// manifest entry (else [`StoreError::BadChunk`] and nothing of it is
    /// recorded). Durable on return: bytes are fsync'd before their presence
    /// bits are committed.
    pub fn write_chunks(
        self: &std::sync::Arc<Self>,
        id: &BlobId,
        chunks: &[(u64, &[u8])],
    ) -> Result<(), StoreError> {
        let writer = match self.partial_writer(id) {
            // Sealed meanwhile: nothing left to write.
            Err(StoreError::NotPartial(_)) => return Ok(()),
            w => w?,
        };
        let verdicts = writer.write_batch(chunks)?;
        if let Some(i) = verdicts.iter().position(|ok| !ok) {
            return Err(StoreError::BadChunk {
                id: *id,
                index: chunks[i].0,
            });
        }
        let written: Vec<u64> = chunks.iter().map(|&(index, _)| index).collect();
        writer.commit(&written)
    }

    /// Sets the presence bits of `indices` in `tx`; returns the pages these
    /// bits completed (every chunk of the page now present).
    fn mark_present_in(
        &self,
        tx: &crate::index::Tx,
        id: &BlobId,
        indices: &[u64],
    ) -> Result<Vec<u32>, StoreError> {
        let per_page = u64::from(crate::manifest::PAGE_CHUNKS);
        let mut by_page: HashMap<u32, Vec<usize>> = HashMap::new();
        for &i in indices {
            by_page
                .entry((i / per_page) as u32)
                .or_default()
                .push((i % per_page) as usize);
        }
        let root = self.record(id)?.root;
        let mut completed = Vec::new();
        for (page, bits_set) in by_page {
            let mut bits = self
                .index
                .presence(id, page)?
                .unwrap_or_else(|| vec![0u8; per_page as usize / 8]);
            let was = bits.iter().map(|b| b.count_ones()).sum::<u32>();
            for b in bits_set {
                bits[b / 8] |= 1 << (b % 8);
            }
            let now = bits.iter().map(|b| b.count_ones()).sum::<u32>();
            let chunks = root.pages.get(page as usize).map(|p| p.chunk_count);
            if now != was && Some(now) == chunks {
                completed.push(page);
            }
            tx.put_presence(id, page, &bits)?;
        }
        Ok(completed)
    }

    /// Fills partial blob `id` from chunks already held by sealed blobs (see
    /// [`PartialWriter::assemble_local`]); returns what is still missing.
    pub fn assemble_local(
        self: &std::sync::Arc<Self>,
        id: &BlobId,
        progress: Option<&Progress>,
    ) -> Result<DeltaPlan, StoreError> {
        match self.partial_writer(id) {
            Ok(writer) => writer.assemble_local(progress),
            Err(StoreError::NotPartial(_)) => Ok(DeltaPlan::default()),
            Err(e) => Err(e),
        }
    }

    /// Seals a partial blob whose chunks are all present: fsync, rename into
    /// `blobs/`, fsync the directory, then commit it complete with its chunk
    /// locations. Refuses while chunks are missing.
    ///
    /// Through the blob's live writer if it has one, so that none of its
    /// users writes the file once sealed.
    pub fn seal_partial(&self, id: &BlobId) -> Result<(), StoreError> {
        let writers = self.writers.lock().expect("writers poisoned");
        match writers.get(id).and_then(std::sync::Weak::upgrade) {
            Some(writer) => {
                drop(writers);
                writer.seal()
            }
            // Held while sealing: no writer starts on the file meanwhile.
            None => self.seal_partial_with_rows(id, &[]),
        }
    }

    /// [`Store::seal_partial`] for a blob whose pages flagged in `rows_done`
    /// already have their chunk rows (written by [`PartialWriter::commit`]).
    fn seal_partial_with_rows(&self, id: &BlobId, rows_done: &[bool]) -> Result<(), StoreError> {
        let _p = self.partial_lock.lock().expect("partial lock poisoned");
        let missing = self.missing_chunks(id)?;
        let r = self.record(id)?;
        if r.state != BlobState::Partial {
            return Ok(());
        }
        if !missing.is_empty() {
            return Err(StoreError::Incomplete(*id));
        }
        let _s = self.seal_lock.lock().expect("seal lock poisoned");
        let path = self.partial_path(id);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(StoreError::io("cannot sync", &path))?;
        let target = self.blob_path(id);
        fs::rename(&path, &target).map_err(StoreError::io("cannot move blob into", &target))?;
        for d in [BLOBS_DIR, PARTIAL_DIR] {
            let d = self.dir.join(d);
            sys::sync_dir(&d).map_err(StoreError::io("cannot sync", &d))?;
        }
        // Chunk locations in bounded unsynced batches; rows left by a crash
        // before the final commit point at a partial blob, which lookups
        // skip, and are rewritten by the next seal.
        let pages = r.root.pages.len() as u32;
        let todo = (0..pages).filter(|&i| rows_done.get(i as usize) != Some(&true));
        let tx = self.put_chunk_rows(id, &r.root, self.index.write()?, todo)?;
        tx.clear_presence(id, r.root.pages.len() as u32)?;
        tx.put_blob(
            id,
            &BlobRecord {
                state: BlobState::Complete,
                created_unix_s: r.created_unix_s,
                root: r.root,
            },
        )?;
        tx.commit()
    }
}

/// Where a [`PartialWriter`]'s time went, summed over every batch (from
/// several threads at once): what a slow fetch's log points at.
#[derive(Default, Debug)]
pub struct WriteTimings {
    pub batches: std::sync::atomic::AtomicU64,
    /// BLAKE3 of the received chunks.
    pub hash_ns: std::sync::atomic::AtomicU64,
    /// The positional writes (into the page cache).
    pub write_ns: std::sync::atomic::AtomicU64,
    /// Starting writeback of what was written (`sync_file_range`).
    pub writeback_ns: std::sync::atomic::AtomicU64,
    /// Bytes written through the page cache since writeback was last
    /// started (direct writes need none).
    unstarted: std::sync::atomic::AtomicU64,
    /// Bytes written (each chunk once, however many peers sent it).
    pub bytes: std::sync::atomic::AtomicU64,
}

impl WriteTimings {
    fn add(
        counter: &std::sync::atomic::AtomicU64,
        since: std::time::Instant,
    ) -> std::time::Instant {
        let now = std::time::Instant::now();
        counter.fetch_add(
            (now - since).as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        now
    }

    /// (batches, hash s, write s, writeback s).
    pub fn seconds(&self) -> (u64, f64, f64, f64) {
        let s = |c: &std::sync::atomic::AtomicU64| {
            c.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
        };
        (
            self.batches.load(std::sync::atomic::Ordering::Relaxed),
            s(&self.hash_ns),
            s(&self.write_ns),
            s(&self.writeback_ns),
        )
    }
}

/// Decoded manifest pages of one blob, the `capacity` most recently
/// loaded: chunk lookups while receiving or serving hit the same few pages.
pub struct PageCache {
    capacity: usize,
    pages: Mutex<Vec<(u32, std::sync::Arc<Vec<ChunkEntry>>)>>,
}

impl PageCache {
    pub fn new(capacity: usize) -> Self {
        PageCache {
            capacity: capacity.max(1),
            pages: Mutex::new(Vec::new()),
        }
    }

    /// Manifest entry of chunk `index` of blob `id` (with manifest `root`)
    /// in `store`; `None` beyond the blob.
    pub fn entry(
        &self,
        store: &Store,
        id: &BlobId,
        root: &ManifestRoot,
        index: u64,
    ) -> Result<Option<ChunkEntry>, StoreError> {
        let per_page = u64::from(crate::manifest::PAGE_CHUNKS);
        let Ok(page) = u32::try_from(index / per_page) else {
            return Ok(None);
        };
        if page as usize >= root.pages.len() {
            return Ok(None);
        }
        let entries = self.page(store, id, root, page)?;
        Ok(entries.get((index % per_page) as usize).copied())
    }

    /// Every entry of page `page` (which must exist) of blob `id`.
    pub fn page(
        &self,
        store: &Store,
        id: &BlobId,
        root: &ManifestRoot,
        page: u32,
    ) -> Result<std::sync::Arc<Vec<ChunkEntry>>, StoreError> {
        let cached = {
            let pages = self.pages.lock().expect("page cache poisoned");
            pages
                .iter()
                .find(|(p, _)| *p == page)
                .map(|(_, e)| std::sync::Arc::clone(e))
        };
        let entries = match cached {
            Some(e) => e,
            None => {
                let e = std::sync::Arc::new(store.page(id, root, page)?);
                let mut pages = self.pages.lock().expect("page cache poisoned");
                if pages.len() >= self.capacity {
                    pages.remove(0);
                }
                pages.push((page, std::sync::Arc::clone(&e)));
                e
            }
        };
        Ok(entries)
    }
}

/// Manifest pages a [`PartialWriter`] keeps decoded (48 bytes per chunk,
/// 4096 chunks per page: 16 pages ≈ 3 MiB). Runs arrive a few MiB at a time
/// and rarely span more than two pages, so a handful covers every request in
/// flight; more would only grow the receiver's memory.
const WRITER_PAGES_CACHED: usize = 16;

/// Receives the chunks of one partial blob as they arrive from peers, from
/// several threads at once: [`PartialWriter::write_batch`] checks chunks
/// against their manifest entries (length and BLAKE3) and writes it at its offset;
/// [`PartialWriter::commit`] makes everything written so far durable (one
/// fsync for many chunks) and only then records those chunks present. A
/// crash between the two loses only unrecorded work: presence never claims
/// bytes that are not on disk.
pub struct PartialWriter {
    store: std::sync::Arc<Store>,
    id: BlobId,
    root: ManifestRoot,
    path: PathBuf,
    file: File,
    runs: RunWriter,
    claims: Claims,
    pages: PageCache,
    rows: Mutex<RowsState>,
    timings: WriteTimings,
    /// False once sealing began: no more writes.
    open: std::sync::RwLock<bool>,
}

impl fmt::Debug for PartialWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartialWriter({})", self.id)
    }
}

/// Bytes a partial blob's writers write through the page cache between two
/// starts of its writeback.
const WRITEBACK_START_BYTES: u64 = 8 << 20;

/// Verifies received chunks against their manifest entries (`None`: no such
/// chunk) and writes the ones that match; returns the verdict per chunk. A
/// chunk another writer claimed first is not written again: this waits
/// until it is in the file.
///
/// A batch because both halves are cheaper that way: the hashes are computed
/// together, one SIMD lane per chunk ([`sys::hash_batch`]), and chunks
/// consecutive in the blob go out as one run ([`RunWriter::write_run`]: the
/// run's block-aligned middle with direct IO, its ends through the page
/// cache). Chunks start at arbitrary offsets, and a buffered write that
/// covers part of a block not yet in the page cache first zeroes that block
/// (and ext4 the rest of its folio): one `pwrite` per ~10 KiB chunk spent as
/// much time in that `memset` as in the copy itself (perf, 4 GiB fetch, all
/// writes buffered then).
fn verify_and_write(
    w: &PartialWriter,
    chunks: &[(u64, &[u8])],
    entries: &[Option<ChunkEntry>],
) -> Result<Vec<bool>, StoreError> {
    let (file, path, timings) = (&w.file, &w.path, &w.timings);
    let started = std::time::Instant::now();
    debug_assert_eq!(chunks.len(), entries.len());
    let mut verdicts: Vec<bool> = chunks
        .iter()
        .zip(entries)
        .map(|((_, bytes), e)| e.is_some_and(|e| bytes.len() == e.len as usize))
        .collect();
    let candidates: Vec<usize> = (0..chunks.len()).filter(|&i| verdicts[i]).collect();
    let msgs: Vec<&[u8]> = candidates.iter().map(|&i| chunks[i].1).collect();
    let mut hashes = vec![[0u8; 32]; msgs.len()];
    sys::hash_batch::hash_batch(&msgs, &mut hashes);
    let hashed = WriteTimings::add(&timings.hash_ns, started);
    for (&i, h) in candidates.iter().zip(&hashes) {
        verdicts[i] = entries[i].is_some_and(|e| *h == e.hash.0);
    }
    // Each matching chunk is written by the first writer to claim it; the
    // others wait for it below (see `partial_io`).
    let mut mine: Vec<u64> = Vec::new();
    let mut theirs: Vec<u64> = Vec::new();
    // Runs of claimed chunks that are contiguous in the file.
    let mut run: Vec<&[u8]> = Vec::new();
    let mut run_start = 0u64;
    let mut run_end = 0u64;
    let mut written_bytes = 0u64;
    let mut cached_bytes = 0u64;
    let mut write = |start: u64, run: &[&[u8]]| {
        cached_bytes += w.runs.write_run(file, start, run).map_err(|e| {
            w.claims.fail();
            StoreError::io("cannot write", path)(e)
        })?;
        Ok::<(), StoreError>(())
    };
    for (i, &(index, bytes)) in chunks.iter().enumerate() {
        let Some(e) = entries[i].filter(|_| verdicts[i]) else {
            continue;
        };
        if !w.claims.claim(index) {
            theirs.push(index);
            continue;
        }
        mine.push(index);
        if run.is_empty() || e.offset != run_end || run.len() == sys::IOV_MAX {
            if !run.is_empty() {
                write(run_start, &run)?;
                run.clear();
            }
            run_start = e.offset;
        }
        run.push(bytes);
        run_end = e.end();
        written_bytes += u64::from(e.len);
    }
    if !run.is_empty() {
        write(run_start, &run)?;
    }
    w.claims.mark_written(mine);
    if !theirs.is_empty() && !w.claims.wait_written(&theirs) {
        return Err(StoreError::io("cannot write", path)(io::Error::other(
            "another writer of this blob failed",
        )));
    }
    let written = WriteTimings::add(&timings.write_ns, hashed);
    // Writeback of the page-cache part (the ends of runs) is started for the
    // whole file every WRITEBACK_START_BYTES of it, not per batch: with three
    // sources batches average ~200 KiB, and one `sync_file_range` each took
    // ~10 s of 19 s summed over the writers (all writes buffered then).
    timings
        .bytes
        .fetch_add(written_bytes, std::sync::atomic::Ordering::Relaxed);
    let unstarted = timings
        .unstarted
        .fetch_add(cached_bytes, std::sync::atomic::Ordering::Relaxed)
        + cached_bytes;
    if unstarted >= WRITEBACK_START_BYTES {
        timings
            .unstarted
            .store(0, std::sync::atomic::Ordering::Relaxed);
        sys::start_writeback(file, 0, 0);
    }
    WriteTimings::add(&timings.writeback_ns, written);
    timings
        .batches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(verdicts)
}

impl Store {
    /// The writer of partial blob `id` (see [`Store::begin_partial`]): the
    /// one already in use if there is one, so that all who write the blob
    /// share it.
    pub fn partial_writer(
        self: &std::sync::Arc<Self>,
        id: &BlobId,
    ) -> Result<std::sync::Arc<PartialWriter>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let mut writers = self.writers.lock().expect("writers poisoned");
        writers.retain(|_, w| w.strong_count() > 0);
        let r = self.record(id)?;
        if r.state != BlobState::Partial {
            return Err(StoreError::NotPartial(*id));
        }
        let path = self.partial_path(id);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(StoreError::io("cannot open", &path))?;
        // The live writer of this very file, not of one removed since whose
        // id came back (an unlinked file's inode number may be reused).
        let inode = |f: &File| {
            f.metadata()
                .ok()
                .filter(|m| m.nlink() > 0)
                .map(|m| (m.dev(), m.ino()))
        };
        if let Some(w) = writers.get(id).and_then(std::sync::Weak::upgrade)
            && inode(&w.file).is_some()
            && inode(&w.file) == inode(&file)
        {
            return Ok(w);
        }
        let runs = RunWriter::open(&path, self.io.backend == IoBackend::Uring)
            .map_err(StoreError::io("cannot open", &path))?;
        let chunk_count = r.root.chunk_count;
        let rows = RowsState {
            done: vec![false; r.root.pages.len()],
            completed: Vec::new(),
        };
        let writer = std::sync::Arc::new(PartialWriter {
            store: std::sync::Arc::clone(self),
            id: *id,
            root: r.root,
            path,
            file,
            runs,
            claims: Claims::new(chunk_count),
            pages: PageCache::new(WRITER_PAGES_CACHED),
            rows: Mutex::new(rows),
            timings: WriteTimings::default(),
            open: std::sync::RwLock::new(true),
        });
        writers.insert(*id, std::sync::Arc::downgrade(&writer));
        Ok(writer)
    }
}

impl PartialWriter {
    pub fn id(&self) -> &BlobId {
        &self.id
    }

    pub fn root(&self) -> &ManifestRoot {
        &self.root
    }

    /// Manifest entry of chunk `index`; `None` beyond the blob.
    pub fn entry(&self, index: u64) -> Result<Option<ChunkEntry>, StoreError> {
        self.pages.entry(&self.store, &self.id, &self.root, index)
    }

    /// Checks received chunks against their manifest entries (length and
    /// BLAKE3) and writes the ones that match at their offsets. Returns, per
    /// chunk, whether it matched (and was written); a chunk that does not
    /// match, or lies beyond the blob, is not written. Not durable until
    /// [`PartialWriter::commit`]. See [`verify_and_write`] for why a batch.
    ///
    /// After [`PartialWriter::seal`] (a late endgame duplicate), nothing is
    /// written and the answer is [`StoreError::NotPartial`]: a sealed file
    /// is never written again.
    pub fn write_batch(&self, chunks: &[(u64, &[u8])]) -> Result<Vec<bool>, StoreError> {
        let open = self.open.read().expect("open flag poisoned");
        if !*open {
            return Err(StoreError::NotPartial(self.id));
        }
        let entries = chunks
            .iter()
            .map(|&(index, _)| self.entry(index))
            .collect::<Result<Vec<_>, _>>()?;
        verify_and_write(self, chunks, &entries)
    }

    /// The blob's file opened afresh, read-only: a descriptor of its own for
    /// an export that follows the fetch (`envoy fetch --out` hands it to the
    /// client), the partial file or, once sealed, the sealed one — the same
    /// file either way. Only chunks the fetch reports written hold the
    /// blob's bytes.
    pub fn open_for_reading(&self) -> Result<File, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let ours = self
            .file
            .metadata()
            .map_err(StoreError::io("cannot stat", &self.path))?;
        for path in [&self.path, &self.store.blob_path(&self.id)] {
            match File::open(path) {
                Ok(f) => {
                    let m = f.metadata().map_err(StoreError::io("cannot stat", path))?;
                    if (m.dev(), m.ino()) == (ours.dev(), ours.ino()) {
                        return Ok(f);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("cannot open", path)(e)),
            }
        }
        Err(StoreError::CorruptFile {
            id: self.id,
            why: "the file being written is gone from the store".into(),
        })
    }

    /// Where [`PartialWriter::write_batch`] spent its time so far.
    pub fn timings(&self) -> &WriteTimings {
        &self.timings
    }

    /// Bytes [`PartialWriter::write_batch`] wrote so far, and how many of
    /// them with direct IO.
    pub fn bytes_written(&self) -> (u64, u64) {
        let total = self
            .timings
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        (total, self.runs.direct_bytes())
    }

    /// Makes the chunks `indices` (each written by [`PartialWriter::write_batch`])
    /// durable, then records them present. Pages this completes get their
    /// chunk rows here, [`ROWS_PAGES_MIN`] at a time, so that sealing is left
    /// with few (rows of a partial blob are never served: lookups skip it).
    pub fn commit(&self, indices: &[u64]) -> Result<(), StoreError> {
        if indices.is_empty() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(StoreError::io("cannot sync", &self.path))?;
        let _guard = self
            .store
            .partial_lock
            .lock()
            .expect("partial lock poisoned");
        let tx = self.store.index.write()?;
        let completed = self.store.mark_present_in(&tx, &self.id, indices)?;
        let mut rows = self.rows.lock().expect("rows poisoned");
        rows.completed.extend(completed);
        if rows.completed.len() < ROWS_PAGES_MIN {
            return tx.commit();
        }
        // Pieces are fetched in a random order, so pages complete together
        // near the end of a fetch (up to all of them in its last commit):
        // their rows go PAGES_PER_TX pages per transaction, which bounds
        // the memory. Not fewer: every transaction rewrites about every
        // leaf its random hashes fall in (8 per transaction cost ~12% more
        // time on a 2 GiB fetch on two cores than one transaction).
        let pages = std::mem::take(&mut rows.completed);
        let tx = self
            .store
            .put_chunk_rows(&self.id, &self.root, tx, pages.iter().copied())?;
        tx.commit()?;
        for page in pages {
            rows.done[page as usize] = true;
        }
        Ok(())
    }

    /// Fills the blob from chunks already held by sealed blobs: their bytes
    /// are read from the sealed files a batch at a time, checked against
    /// this blob's manifest and written as a fetch writes them (one run per
    /// batch, its middle with direct IO), then committed about every
    /// [`LOCAL_COMMIT_BYTES`]. A copy that does not match is corrupt at
    /// rest: its blob is quarantined (never served or copied from again)
    /// and the chunk is left missing. Returns what is still missing.
    ///
    /// Three threads, so that the disk is never idle: this one looks chunks
    /// up and reads them, one checks and writes the batch before, one
    /// commits (the chunk rows of the pages a commit completes cost ~3 s
    /// for 2 GiB). It replaced a `copy_file_range`, a read back and a hash
    /// per ~8 KiB chunk, then an fdatasync and a durable commit per manifest
    /// page, which spent ~8 CPU-s on the 2 GiB of a delta fetch (perf: half
    /// of it in ext4's buffered write path) and left the disk idle meanwhile:
    /// 14.9/15.1 s → 8.1/8.2 s on this VM (ARCHITECTURE.md, "Local copies").
    ///
    /// A batch's chunks are looked up before the batch two ahead of them is
    /// checked: a source found corrupt is still copied from (each copy
    /// checked all the same) in the batch after the one that found it.
    pub fn assemble_local(&self, progress: Option<&Progress>) -> Result<DeltaPlan, StoreError> {
        if let Some(p) = progress {
            p.done.store(0, Ordering::Relaxed);
            p.total.store(self.root.total_bytes, Ordering::Relaxed);
        }
        std::thread::scope(|scope| {
            let (to_writer, batches) = std::sync::mpsc::sync_channel::<LocalBatch>(1);
            let (to_reader, results) = std::sync::mpsc::channel();
            scope.spawn(move || {
                for batch in batches {
                    let verdicts = self.write_local(&batch);
                    if to_reader.send((batch, verdicts)).is_err() {
                        break;
                    }
                }
            });
            let (to_committer, commits) = std::sync::mpsc::sync_channel::<Vec<u64>>(1);
            let (committed, commit_results) = std::sync::mpsc::channel();
            scope.spawn(move || {
                for chunks in commits {
                    if committed.send(self.commit(&chunks)).is_err() {
                        break;
                    }
                }
            });
            let mut copy = LocalCopy {
                filling: LocalBatch::default(),
                spare: None,
                in_flight: false,
                to_writer,
                results,
                to_committer,
                commit_results,
                committing: false,
                sources: HashMap::new(),
                quarantined: HashSet::new(),
                copied: Vec::new(),
                uncommitted: 0,
                plan: DeltaPlan::default(),
                progress,
                times: LocalTimes::default(),
            };
            let started = std::time::Instant::now();
            self.assemble_pages(&mut copy)?;
            let t = &copy.times;
            if copy.plan.held_bytes > 0 {
                tracing::info!(
                    "{}: {} bytes held locally ({} copied now) in {:.2} s: reading {:.2} s, waiting for checks and writes {:.2} s, for commits {:.2} s",
                    self.id,
                    copy.plan.held_bytes,
                    t.copied_bytes,
                    started.elapsed().as_secs_f64(),
                    t.read.as_secs_f64(),
                    t.wait.as_secs_f64(),
                    t.commit.as_secs_f64(),
                );
            }
            Ok(copy.plan)
        })
    }

    fn assemble_pages(&self, copy: &mut LocalCopy<'_>) -> Result<(), StoreError> {
        let store = &self.store;
        let mut first = 0u64;
        for page in 0..self.root.pages.len() as u32 {
            let entries = store.index.page(&self.id, &self.root, page)?;
            let bits = store.index.presence(&self.id, page)?.unwrap_or_default();
            // One snapshot per page: it sees the previous page's commits.
            let finder = store.index.chunk_finder()?;
            for (i, e) in entries.iter().enumerate() {
                if bit(&bits, i) {
                    copy.count(true, e.len);
                    continue;
                }
                // A blob quarantined by this call is still complete in the
                // finder's snapshot.
                match finder.find(&e.hash, &self.id, &copy.quarantined)? {
                    Some(loc) => {
                        copy.filling.push(first + i as u64, *e, loc);
                        copy.uncommitted += u64::from(e.len);
                    }
                    None => copy.count(false, e.len),
                }
                if copy.filling.bytes >= LOCAL_COPY_BATCH_BYTES {
                    self.hand_over_local(copy)?;
                }
            }
            first += entries.len() as u64;
            let last = page + 1 == self.root.pages.len() as u32;
            if last {
                self.hand_over_local(copy)?;
                self.settle_local(copy)?;
            }
            if last || copy.uncommitted >= LOCAL_COMMIT_BYTES {
                self.commit_local(copy)?;
                copy.uncommitted = 0;
            }
        }
        self.wait_commit_local(copy)
    }

    /// The error for a local copy thread (`writer`, `committer`) found
    /// gone while there was work for it.
    fn local_thread_stopped(&self, action: &'static str, thread: &str) -> StoreError {
        StoreError::io(action, &self.path)(io::Error::other(format!(
            "the local copy {thread} stopped"
        )))
    }

    /// Hands the chunks written since the last commit to the committing
    /// thread, once the commit before is done: the chunk rows of the pages
    /// they complete take it seconds (2 GiB: ~3 s in all), while the reads
    /// and writes of the next batches go on.
    fn commit_local(&self, copy: &mut LocalCopy) -> Result<(), StoreError> {
        self.wait_commit_local(copy)?;
        let chunks = std::mem::take(&mut copy.copied);
        if chunks.is_empty() {
            return Ok(());
        }
        copy.to_committer
            .send(chunks)
            .map_err(|_| self.local_thread_stopped("cannot commit", "committer"))?;
        copy.committing = true;
        Ok(())
    }

    fn wait_commit_local(&self, copy: &mut LocalCopy) -> Result<(), StoreError> {
        if !std::mem::take(&mut copy.committing) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let result = copy
            .commit_results
            .recv()
            .map_err(|_| self.local_thread_stopped("cannot commit", "committer"))?;
        copy.times.commit += started.elapsed();
        result
    }

    /// Reads the batch being filled and hands it to the writing thread,
    /// once the batch before it is settled.
    fn hand_over_local(&self, copy: &mut LocalCopy) -> Result<(), StoreError> {
        if copy.filling.chunks.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        copy.filling.read(&self.store, &mut copy.sources)?;
        copy.times.read += started.elapsed();
        self.settle_local(copy)?;
        let next = copy.spare.take().unwrap_or_default();
        let batch = std::mem::replace(&mut copy.filling, next);
        copy.to_writer
            .send(batch)
            .map_err(|_| self.local_thread_stopped("cannot write", "writer"))?;
        copy.in_flight = true;
        Ok(())
    }

    /// Waits for the batch the writing thread has, if any, and counts its
    /// chunks: written ones into `copied`, the others missing, their sources
    /// quarantined.
    fn settle_local(&self, copy: &mut LocalCopy) -> Result<(), StoreError> {
        if !std::mem::take(&mut copy.in_flight) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (mut batch, verdicts) = copy
            .results
            .recv()
            .map_err(|_| self.local_thread_stopped("cannot write", "writer"))?;
        copy.times.wait += started.elapsed();
        for (c, ok) in batch.chunks.iter().zip(verdicts?) {
            copy.count(ok, c.entry.len);
            if ok {
                copy.copied.push(c.index);
                copy.times.copied_bytes += u64::from(c.entry.len);
                continue;
            }
            if copy.quarantined.insert(c.loc.blob) {
                tracing::warn!(
                    "blob {} does not hold what its manifest says at offset {} (corrupt or cut short): quarantined",
                    c.loc.blob,
                    c.loc.offset
                );
                copy.sources.remove(&c.loc.blob);
                self.store.set_state(&c.loc.blob, BlobState::Quarantined)?;
            }
        }
        batch.clear();
        copy.spare = Some(batch);
        Ok(())
    }

    /// Checks a read batch of local copies and writes the chunks that
    /// match (on the writing thread of [`PartialWriter::assemble_local`]).
    fn write_local(&self, batch: &LocalBatch) -> Result<Vec<bool>, StoreError> {
        let open = self.open.read().expect("open flag poisoned");
        if !*open {
            return Err(StoreError::NotPartial(self.id));
        }
        let mut chunks = Vec::with_capacity(batch.chunks.len());
        let mut entries = Vec::with_capacity(batch.chunks.len());
        let mut at = 0usize;
        for c in &batch.chunks {
            let len = c.entry.len as usize;
            chunks.push((c.index, &batch.buf[at..at + len]));
            entries.push(Some(c.entry).filter(|_| !batch.unreadable.contains(&c.loc.blob)));
            at += len;
        }
        verify_and_write(self, &chunks, &entries)
    }

    /// Seals the blob (see [`Store::seal_partial`]) once every chunk is
    /// committed, writing only the chunk rows [`PartialWriter::commit`] has
    /// not.
    pub fn seal(&self) -> Result<(), StoreError> {
        // Waits for writes in progress and holds off new ones; once sealed,
        // they are refused. A seal that fails (chunks missing) leaves the
        // blob partial and writable.
        let mut open = self.open.write().expect("open flag poisoned");
        let done = self.rows.lock().expect("rows poisoned").done.clone();
        self.store.seal_partial_with_rows(&self.id, &done)?;
        *open = false;
        Ok(())
    }
}

/// Completed pages a [`PartialWriter::commit`] collects before writing their
/// chunk rows, [`PAGES_PER_TX`] per transaction (few large transactions cost
/// far less than many small ones, see [`IngestRows`]); sealing writes the
/// rest.
const ROWS_PAGES_MIN: usize = 8;

/// Which pages of a partial blob have their chunk rows.
struct RowsState {
    /// Per page: rows written.
    done: Vec<bool>,
    /// Complete pages whose rows are not written yet.
    completed: Vec<u32>,
}

/// Chunk bytes [`PartialWriter::assemble_local`] reads from local blobs and
/// writes at once: as much as a fetch's batch from one source, so the
/// writes are as large.
pub const LOCAL_COPY_BATCH_BYTES: u64 = 2 << 20;

/// Bytes of local copies [`PartialWriter::assemble_local`] makes durable and
/// records present at once (at the end of a manifest page): a crash loses
/// at most this much local copying, redone from the local blobs. Commits of
/// 1 GiB took a 2 GiB assembly 8.1/8.2 s, of 256 MiB 8.6–9.1 s: each commit
/// writes the chunk rows of the pages it completes, and a transaction
/// rewrites about every leaf its random hashes fall in.
const LOCAL_COMMIT_BYTES: u64 = 1 << 30;

/// One local copy of a chunk to make.
struct LocalChunk {
    index: u64,
    entry: ChunkEntry,
    loc: crate::index::ChunkLocation,
}

/// A batch of local copies: the chunks, their bytes once read, and the
/// sources found too short to hold them.
#[derive(Default)]
struct LocalBatch {
    chunks: Vec<LocalChunk>,
    bytes: u64,
    buf: Vec<u8>,
    unreadable: HashSet<BlobId>,
}

impl LocalBatch {
    fn push(&mut self, index: u64, entry: ChunkEntry, loc: crate::index::ChunkLocation) {
        self.bytes += u64::from(entry.len);
        self.chunks.push(LocalChunk { index, entry, loc });
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
        self.unreadable.clear();
    }

    /// Reads the chunks' bytes, each range contiguous in one file at once.
    /// A file too short for its manifest is corrupt like a bad chunk: its
    /// chunks are left to fail their check.
    fn read(
        &mut self,
        store: &Store,
        sources: &mut HashMap<BlobId, File>,
    ) -> Result<(), StoreError> {
        // Every byte of the batch is read (or its source marked unreadable)
        // before it is used: the buffer is only grown, not cleared.
        if self.buf.len() < self.bytes as usize {
            self.buf.resize(self.bytes as usize, 0);
        }
        let chunks = &self.chunks;
        let (mut at, mut i) = (0usize, 0usize);
        while i < chunks.len() {
            let (blob, start) = (chunks[i].loc.blob, chunks[i].loc.offset);
            let mut end = i + 1;
            let mut len = chunks[i].entry.len as usize;
            while end < chunks.len()
                && chunks[end].loc.blob == blob
                && chunks[end].loc.offset == start + len as u64
            {
                len += chunks[end].entry.len as usize;
                end += 1;
            }
            let path = store.blob_path(&blob);
            let file = match sources.entry(blob) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(File::open(&path).map_err(StoreError::io("cannot open", &path))?)
                }
            };
            match file.read_exact_at(&mut self.buf[at..at + len], start) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.unreadable.insert(blob);
                }
                Err(e) => return Err(StoreError::io("cannot read", &path)(e)),
            }
            at += len;
            i = end;
        }
        Ok(())
    }
}

/// What [`PartialWriter::assemble_local`] carries between batches.
struct LocalCopy<'p> {
    /// The batch being looked up.
    filling: LocalBatch,
    /// A settled batch's buffers, for the next one.
    spare: Option<LocalBatch>,
    /// Whether the writing thread has a batch not settled yet.
    in_flight: bool,
    to_writer: std::sync::mpsc::SyncSender<LocalBatch>,
    results: std::sync::mpsc::Receiver<(LocalBatch, Result<Vec<bool>, StoreError>)>,
    to_committer: std::sync::mpsc::SyncSender<Vec<u64>>,
    commit_results: std::sync::mpsc::Receiver<Result<(), StoreError>>,
    /// Whether the committing thread has chunks not committed yet.
    committing: bool,
    sources: HashMap<BlobId, File>,
    /// Blobs found corrupt by this assembly.
    quarantined: HashSet<BlobId>,
    /// Chunks written since the last commit.
    copied: Vec<u64>,
    /// Bytes of the chunks looked up since the last commit.
    uncommitted: u64,
    plan: DeltaPlan,
    /// `plan`'s bytes, held and missing: how far the assembly got.
    progress: Option<&'p Progress>,
    times: LocalTimes,
}

impl LocalCopy<'_> {
    /// Counts a chunk of `len` bytes held (or missing) once assembled.
    fn count(&mut self, held: bool, len: u32) {
        let p = &mut self.plan;
        match held {
            true => {
                (p.held_chunks, p.held_bytes) = (p.held_chunks + 1, p.held_bytes + u64::from(len))
            }
            false => {
                (p.missing_chunks, p.missing_bytes) =
                    (p.missing_chunks + 1, p.missing_bytes + u64::from(len))
            }
        }
        if let Some(progress) = self.progress {
            progress.done.fetch_add(u64::from(len), Ordering::Relaxed);
        }
    }
}

/// Where [`PartialWriter::assemble_local`]'s own thread spent its time
/// (what is left of the total went to looking chunks up), for its log line.
#[derive(Default)]
struct LocalTimes {
    copied_bytes: u64,
    read: std::time::Duration,
    wait: std::time::Duration,
    commit: std::time::Duration,
}

/// Opens a file to add ([`Store::add_source`]) without blocking: a FIFO or
/// device is then refused, not waited on.
pub fn open_input(path: &Path) -> Result<File, StoreError> {
    let input_err = |why: String| StoreError::Input {
        path: path.to_path_buf(),
        why,
    };
    sys::open_input(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => input_err("no such file".into()),
        io::ErrorKind::PermissionDenied => input_err("permission denied".into()),
        _ => input_err(format!("cannot open: {e}")),
    })
}

/// The page sink of `add_file`: writes each manifest page and its chunk
/// locations while the data is still being written, under a provisional row
/// key (the blob id is known only at the end), in unsynced transactions of
/// up to [`PAGES_PER_TX`] pages. Each transaction also records in
/// `ingests` which pages exist so far, so `open` can remove them if the add
/// never seals. Rows under a key no blob is linked to are never served.
///
/// Chunk hashes are random, so a transaction rewrites about every leaf of
/// the chunk table that its rows fall in, up to all of them: few large
/// transactions cost far less than many small ones (measured on a 4 GiB add:
/// 4-page transactions cost ~5 CPU-s more than 32-page ones, and ~13
/// transactions shrinking geometrically toward the end ~1.5 CPU-s more than
/// 4). So transactions take [`PAGES_PER_TX`] pages, and near the end of the
/// input they are cut short at [`INGEST_TAIL_STEPS`], so that little is left
/// to write once the last byte has been hashed.
struct IngestRows<'a> {
    index: &'a Index,
    key: RowKey,
    /// Input size expected when the add started.
    expected_bytes: u64,
    /// Bytes covered by the pages received so far.
    received_bytes: u64,
    /// The pages committed so far, as a root (no content hash yet): what the
    /// `ingests` marker holds.
    written: ManifestRoot,
    pending: Vec<EncodedPage>,
    rows: Vec<ChunkRow>,
}

impl<'a> IngestRows<'a> {
    fn new(index: &'a Index, params: ChunkerParams, expected_bytes: u64, salt: &[u8]) -> Self {
        IngestRows {
            index,
            key: RowKey::provisional(salt),
            expected_bytes,
            received_bytes: 0,
            written: ManifestRoot {
                params,
                total_bytes: 0,
                chunk_count: 0,
                content_hash: ContentHash([0; 32]),
                pages: Vec::new(),
            },
            pending: Vec::new(),
            rows: Vec::new(),
        }
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let tx = self.index.write()?;
        for page in &self.pending {
            tx.put_page(self.key, page.index, &page.bytes)?;
        }
        tx.put_chunks(self.key, &mut self.rows)?;
        let mut written = self.written.clone();
        for page in &self.pending {
            let r: PageRef = page.page_ref;
            written.total_bytes += r.byte_len;
            written.chunk_count += u64::from(r.chunk_count);
            written.pages.push(r);
        }
        tx.set_ingest(&self.key, Some(&written))?;
        tx.commit_unsynced()?;
        tracing::debug!(
            "add: index rows of {} pages in {:.3}s",
            self.pending.len(),
            started.elapsed().as_secs_f64()
        );
        self.written = written;
        self.pending.clear();
        self.rows.clear();
        Ok(())
    }

    /// Removes every row committed so far and the marker (a failed add, or
    /// content the store already holds).
    fn discard(&self, store: &Store) -> Result<(), StoreError> {
        if self.written.pages.is_empty() {
            return Ok(());
        }
        store.remove_page_rows(&self.key, &self.written)?;
        let tx = self.index.write()?;
        tx.set_ingest(&self.key, None)?;
        tx.commit()
    }
}

impl PageSink for IngestRows<'_> {
    fn page(&mut self, page: EncodedPage, entries: Vec<ChunkEntry>) -> Result<(), StoreError> {
        self.received_bytes += page.page_ref.byte_len;
        self.rows.extend(ChunkRow::of_page(page.index, &entries));
        self.pending.push(page);
        let received = self.written.pages.len() + self.pending.len();
        let page_bytes = self.received_bytes / received as u64;
        let expected_pages = self
            .expected_bytes
            .saturating_sub(self.received_bytes)
            .div_ceil(page_bytes.max(1));
        let pending = self.pending.len() as u64;
        // Cut a transaction short when the rest of the input would
        // otherwise leave more than `step` pages for the last one.
        let cut = INGEST_TAIL_STEPS
            .iter()
            .any(|&step| expected_pages <= step && pending + expected_pages > step);
        if pending >= u64::from(PAGES_PER_TX) || cut {
            self.commit()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.commit()
    }
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read access to a sealed blob, handing out borrowed bytes (so a network
/// layer can encrypt straight from them). Owned, so a daemon can keep one
/// per served blob across tasks; chunk entries come from [`Store::page`].
/// Reading does not re-hash: chunks were verified when written, receivers
/// verify again, and `verify` re-hashes at rest.
pub struct BlobReader {
    id: BlobId,
    root: ManifestRoot,
    map: SealedMap,
}

impl BlobReader {
    pub fn id(&self) -> &BlobId {
        &self.id
    }

    pub fn root(&self) -> &ManifestRoot {
        &self.root
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// Bytes `[offset, offset + len)`; `None` when out of range.
    pub fn range(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        self.map.bytes().get(offset as usize..end as usize)
    }

    /// Maps `[offset, offset + len)` (cut at the blob's end) ahead of
    /// reading it, so that reading takes no page faults (see
    /// [`SealedMap::prefetch`]). Advisory.
    pub fn prefetch(&self, offset: u64, len: u64) {
        self.map.prefetch(offset, len);
    }

    /// Starts reading `[offset, offset + len)` (cut at the blob's end) into
    /// the page cache, without waiting (see [`SealedMap::read_ahead`]).
    pub fn read_ahead(&self, offset: u64, len: u64) {
        self.map.read_ahead(offset, len);
    }
}

/// Files deleted on drop unless disarmed: nothing half-written stays visible.
struct TempFiles {
    paths: Vec<PathBuf>,
    armed: bool,
}

impl TempFiles {
    fn new(paths: Vec<PathBuf>) -> Self {
        TempFiles { paths, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        if self.armed {
            for p in &self.paths {
                let _ = fs::remove_file(p);
            }
        }
    }
}

// Keep the store shareable across threads (the daemon serves from many).
const _: fn() = || {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Store>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn small_chunks() -> StoreOptions {
        StoreOptions {
            chunker: ChunkerParams::with_avg(1024).unwrap(),
            ..StoreOptions::default()
        }
    }

    /// Feeds the manifest of `bytes` to an ingest's page sink, as the
    /// pipeline would, and returns the whole manifest.
    fn feed(store: &Store, rows: &mut IngestRows<'_>, bytes: &[u8]) -> Manifest {
        let manifest = crate::mem::MemStore::manifest_of(&store.chunker, bytes);
        let entries = manifest.entries().unwrap();
        for (i, page) in manifest.pages.iter().enumerate() {
            let page_chunks = PAGE_CHUNKS_USIZE;
            let part =
                entries[i * page_chunks..((i + 1) * page_chunks).min(entries.len())].to_vec();
            let encoded = EncodedPage {
                index: i as u32,
                page_ref: manifest.root.pages[i],
                bytes: page.clone(),
            };
            rows.page(encoded, part).unwrap();
        }
        rows.finish().unwrap();
        manifest
    }

    const PAGE_CHUNKS_USIZE: usize = crate::manifest::PAGE_CHUNKS as usize;

    /// Another blob made of `manifest`'s chunks: only its content hash differs.
    fn same_chunks_other_blob(manifest: &Manifest) -> Manifest {
        Manifest {
            root: ManifestRoot {
                content_hash: ContentHash([1; 32]),
                ..manifest.root.clone()
            },
            pages: manifest.pages.clone(),
        }
    }

    #[test]
    fn rows_of_an_unsealed_add_are_never_found_and_open_removes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = data(3 * PAGE_CHUNKS_USIZE * 1024, 3);
        let (key, manifest) = {
            let store = Store::open(tmp.path(), small_chunks()).unwrap();
            let mut rows = IngestRows::new(
                &store.index,
                store.chunker.params(),
                bytes.len() as u64,
                b"t",
            );
            let manifest = feed(&store, &mut rows, &bytes);
            assert!(manifest.root.pages.len() >= 3, "several pages");
            assert_eq!(rows.written.pages, manifest.root.pages);
            assert_eq!(store.index.ingests().unwrap().len(), 1);
            assert!(store.index.page_bytes_at(&rows.key, 0).unwrap().is_some());
            // The rows exist but name no blob: nothing is held.
            assert_eq!(store.plan(&manifest).unwrap().held_chunks, 0);
            // A durable commit by anyone makes the unsynced batches durable
            // too: what a crash would then leave behind.
            let tx = store.index.write().unwrap();
            tx.add_owner(&BlobId([7; 32]), &Owner::new(0, "test"))
                .unwrap();
            tx.commit().unwrap();
            (rows.key, manifest)
        };
        {
            // Left on disk: the marker (so the repair below is real).
            let db = redb::Database::open(tmp.path().join(INDEX_FILE)).unwrap();
            let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
            let t = tx
                .open_table(redb::TableDefinition::<&[u8; 32], &[u8]>::new("ingests"))
                .unwrap();
            assert!(redb::ReadableTable::get(&t, &key.0).unwrap().is_some());
        }
        let store = Store::open(tmp.path(), small_chunks()).unwrap();
        assert!(store.index.ingests().unwrap().is_empty());
        for i in 0..manifest.root.pages.len() as u32 {
            assert!(store.index.page_bytes_at(&key, i).unwrap().is_none());
        }
        assert_eq!(
            store.index.chunk_rows_for_tests(),
            (0, 0),
            "chunk rows or a row number left behind"
        );
    }

    #[test]
    fn a_failed_add_removes_its_rows_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), small_chunks()).unwrap();
        let bytes = data(2 * PAGE_CHUNKS_USIZE * 1024, 4);
        let mut rows = IngestRows::new(
            &store.index,
            store.chunker.params(),
            bytes.len() as u64,
            b"f",
        );
        feed(&store, &mut rows, &bytes);
        rows.discard(&store).unwrap();
        assert!(store.index.ingests().unwrap().is_empty());
        assert!(store.index.page_bytes_at(&rows.key, 0).unwrap().is_none());
    }

    #[test]
    fn an_added_blob_is_found_through_its_row_key_and_removed_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s"), small_chunks()).unwrap();
        let bytes = data(PAGE_CHUNKS_USIZE * 1024 + 12345, 5);
        let path = tmp.path().join("in");
        fs::write(&path, &bytes).unwrap();
        let id = store
            .add_file(&path, &Owner::new(0, "test"), None)
            .unwrap()
            .id;
        let key = store.index.row_key(&id).unwrap();
        assert_ne!(key, RowKey::from(&id), "rows live under the add's own key");
        let manifest = store.manifest(&id).unwrap();
        // The plan for another blob with the same chunks must find every
        // chunk in `id`.
        let other = same_chunks_other_blob(&manifest);
        assert_eq!(store.plan(&other).unwrap().missing_chunks, 0);
        assert!(
            store.verify(Some(&id), true, None).unwrap()[0]
                .problems
                .is_empty()
        );
        store.remove(&id).unwrap();
        assert_eq!(store.index.row_key(&id).unwrap(), RowKey::from(&id));
        assert!(store.index.page_bytes_at(&key, 0).unwrap().is_none());
        assert_eq!(store.plan(&other).unwrap().held_chunks, 0);
        assert_eq!(store.index.chunk_rows_for_tests(), (0, 0));
    }

    #[test]
    fn holds_any_finds_a_single_shared_chunk_on_any_page() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s"), small_chunks()).unwrap();
        let path = tmp.path().join("in");
        fs::write(&path, data(3 * PAGE_CHUNKS_USIZE * 1024 + 777, 9)).unwrap();
        let id = store
            .add_file(&path, &Owner::new(0, "test"), None)
            .unwrap()
            .id;
        let manifest = store.manifest(&id).unwrap();
        assert!(manifest.pages.len() >= 2, "the blob spans pages");
        // A blob's own chunks do not count for it.
        assert!(!store.holds_any(&manifest).unwrap());
        let entries = manifest.entries().unwrap();
        // Another blob sharing exactly one chunk: the first, one on the
        // second page, the last, or none.
        let sharing = |keep: Option<usize>| {
            let mut es = entries.clone();
            for (i, e) in es.iter_mut().enumerate() {
                if Some(i) != keep {
                    e.hash.0[0] ^= 0x5a;
                    e.hash.0[31] ^= 0xa5;
                }
            }
            Manifest::from_entries(store.chunker.params(), ContentHash([2; 32]), &es)
        };
        for keep in [0, PAGE_CHUNKS_USIZE + 1, entries.len() - 1] {
            let other = sharing(Some(keep));
            assert!(store.holds_any(&other).unwrap(), "chunk {keep} shared");
            assert_eq!(store.plan(&other).unwrap().held_chunks, 1);
        }
        let none = sharing(None);
        assert!(!store.holds_any(&none).unwrap());
        assert_eq!(store.plan(&none).unwrap().held_chunks, 0);
        let other = same_chunks_other_blob(&manifest);
        assert!(store.holds_any(&other).unwrap());
        store.remove(&id).unwrap();
        assert!(
            !store.holds_any(&other).unwrap(),
            "removed blobs hold nothing"
        );
    }

    #[test]
    fn a_chunk_is_found_only_where_its_whole_hash_matches() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s"), small_chunks()).unwrap();
        let path = tmp.path().join("in");
        fs::write(&path, data(300 * 1024, 8)).unwrap();
        let id = store
            .add_file(&path, &Owner::new(0, "test"), None)
            .unwrap()
            .id;
        let entries = store.manifest(&id).unwrap().entries().unwrap();
        let finder = store.index.chunk_finder().unwrap();
        let none = HashSet::new();
        let other = BlobId([9; 32]);
        for e in &entries {
            let loc = finder.find(&e.hash, &other, &none).unwrap().unwrap();
            assert_eq!((loc.blob, loc.offset, loc.len), (id, e.offset, e.len));
            // Same first 8 bytes (the row's key), another hash: not found.
            let mut near = e.hash;
            near.0[31] ^= 1;
            assert_eq!(finder.find(&near, &other, &none).unwrap(), None);
            assert_eq!(finder.find(&e.hash, &id, &none).unwrap(), None);
        }
    }

    const CHUNKS_V2_FOR_TESTS: redb::MultimapTableDefinition<&[u8; 32], &[u8; 44]> =
        redb::MultimapTableDefinition::new("chunks");
    const META_FOR_TESTS: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

    /// A store at `dir` holding one blob of `len` bytes, its index as format
    /// `version` (1 or 2) left it: chunk locations in the `chunks` multimap,
    /// no chunk rows, no row numbers. Returns the blob and its manifest
    /// pages.
    fn older_store(dir: &Path, options: StoreOptions, len: usize, version: u64) -> (BlobId, usize) {
        let path = dir.with_extension("in");
        fs::write(&path, data(len, version)).unwrap();
        let (id, pages) = {
            let store = Store::open(dir, options).unwrap();
            let id = store
                .add_file(&path, &Owner::new(0, "test"), None)
                .unwrap()
                .id;
            (id, store.manifest(&id).unwrap().root.pages.len())
        };
        let db = redb::Database::open(dir.join(INDEX_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        for table in ["chunk_rows", "row_numbers", "numbered_rows"] {
            assert!(
                tx.delete_table(redb::TableDefinition::<(), ()>::new(table))
                    .unwrap()
            );
        }
        tx.open_multimap_table(CHUNKS_V2_FOR_TESTS)
            .unwrap()
            .insert(&[1; 32], &[2; 44])
            .unwrap();
        let mut m = tx.open_table(META_FOR_TESTS).unwrap();
        m.insert("format_version", version).unwrap();
        m.remove("next_row_number").unwrap();
        drop(m);
        tx.commit().unwrap();
        (id, pages)
    }

    /// `store` is at format 3 and finds every chunk of blob `id` (and, once
    /// it is removed, holds no chunk row or row number).
    fn assert_upgraded(store: &Store, id: &BlobId, why: &str) {
        let manifest = store.manifest(id).unwrap();
        let other = same_chunks_other_blob(&manifest);
        let plan = store.plan(&other).unwrap();
        assert_eq!(
            (plan.held_chunks, plan.missing_chunks),
            (manifest.root.chunk_count, 0),
            "{why}"
        );
        {
            let tx = redb::ReadableDatabase::begin_read(store.index.db_for_tests()).unwrap();
            let found =
                redb::ReadableTable::get(&tx.open_table(META_FOR_TESTS).unwrap(), "format_version")
                    .unwrap()
                    .unwrap()
                    .value();
            assert_eq!(found, crate::index::STORE_FORMAT_VERSION, "{why}");
            assert!(
                tx.open_multimap_table(CHUNKS_V2_FOR_TESTS).is_err(),
                "{why}: `chunks` dropped"
            );
        }
        store.remove(id).unwrap();
        assert_eq!(store.index.chunk_rows_for_tests(), (0, 0), "{why}");
    }

    #[test]
    fn older_stores_are_upgraded_in_place() {
        for version in [1, 2] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s");
            let (id, _) = older_store(
                &dir,
                small_chunks(),
                PAGE_CHUNKS_USIZE * 1024 + 4321,
                version,
            );
            let store = Store::open(&dir, small_chunks()).unwrap();
            assert_upgraded(&store, &id, &format!("from version {version}"));
        }
    }

    /// An upgrade killed midway (after a batch of rows, or just before its
    /// final commit) leaves a store the next open upgrades again, whole.
    /// The kill is a SIGKILL of a child process (this test binary again) at
    /// the named crash point.
    #[test]
    fn an_upgrade_killed_midway_is_done_again_at_the_next_open() {
        let options = || StoreOptions {
            // Many manifest pages from little data: more than one batch.
            chunker: ChunkerParams::with_avg(256).unwrap(),
            ..StoreOptions::default()
        };
        if let Ok(dir) = std::env::var("VIGO_TEST_UPGRADE_DIR") {
            // The child: the open upgrades, and is killed on the way.
            let opened = Store::open(Path::new(&dir), options()).map(|_| ());
            panic!("the child was not killed (open: {opened:?})");
        }
        // FastCDC's chunks average ~300 bytes with these parameters: more
        // pages than one batch for the kill after a batch, one page else.
        let pages_for = |point| match point {
            "upgrade-batch" => PAGES_PER_TX as usize + 4,
            _ => 1,
        };
        for point in ["upgrade-batch", "upgrade-final"] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s");
            let len = pages_for(point) * PAGE_CHUNKS_USIZE * 300;
            let (id, pages) = older_store(&dir, options(), len, 2);
            if point == "upgrade-batch" {
                assert!(pages > PAGES_PER_TX as usize, "{pages} pages");
            }
            // This test binary again, under the emulator the suite runs
            // under (`VIGO_TEST_RUNNER`, as the agent's tests use it).
            let runner = std::env::var("VIGO_TEST_RUNNER").unwrap_or_default();
            let mut argv: Vec<std::ffi::OsString> =
                runner.split_whitespace().map(Into::into).collect();
            argv.push(std::env::current_exe().unwrap().into());
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .args([
                    "--exact",
                    "store::tests::an_upgrade_killed_midway_is_done_again_at_the_next_open",
                    "--test-threads=1",
                ])
                .env("VIGO_TEST_UPGRADE_DIR", &dir)
                .env("VIGO_TEST_CRASH", point)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(nix::sys::signal::Signal::SIGKILL as i32),
                "the child was killed at {point}: {status:?}"
            );
            let store = Store::open(&dir, options()).unwrap();
            assert_upgraded(&store, &id, &format!("killed at {point}"));
        }
    }
}
