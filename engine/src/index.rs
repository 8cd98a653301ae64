//! The store's embedded index (redb). Tables, their encodings and the
//! transactions that keep them consistent with the blob files; the byte
//! layouts are in `docs/store-format.md`.
//!
//! - `meta`: `"format_version"` → u64. Checked at open.
//! - `blobs`: blob id → record (`[record version u8][state u8][created u64 LE][manifest root]`).
//! - `pages`: (row key, page index) → encoded manifest page.
//! - `chunk_rows`: (first 8 bytes of a chunk hash as a big-endian u64, row
//!   number, chunk index) → nothing: one row per (chunk, position in a blob).
//!   Exact under dedup: removing a blob removes exactly its own rows. A lookup
//!   reads the candidate's entry in its manifest page for the full hash, the
//!   offset and the length. See "Chunk rows" in `ARCHITECTURE.md` for why so
//!   small.
//! - `row_numbers`: row key → row number (`u64`, given out by
//!   `meta.next_row_number`), and `numbered_rows`, the reverse.
//! - `presence`: (blob id, page index) → bitmap of chunks written, for partial blobs.
//! - `owners` (multimap): blob id → `"uid:subsystem"`.
//! - `sealing`: blob id → manifest root, while a seal or removal is writing
//!   rows in unsynced batches; `Store::open` removes the rows of any blob
//!   still listed (the operation did not finish).
//! - `ingests`: row key → manifest root of the pages written so far by an
//!   ingest in progress; `Store::open` removes those rows (it did not finish).
//! - `row_keys`: blob id → row key, and `row_key_blobs`, the reverse.
//!
//! A blob's pages and chunk locations are stored under its *row key*: its
//! id, except for a blob ingested from a local file, whose rows are written
//! while its bytes are still being hashed (the id is the hash of the
//! manifest, known only at the end) under a random provisional key that the
//! seal then links to the id. A chunk row is served only through a complete
//! blob, so rows of an ingest in progress are never found.

use std::collections::HashSet;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition,
    TableHandle, WriteTransaction,
};

use crate::hash::{BlobId, ChunkHash};
use crate::index_file::IndexFile;
use crate::manifest::{ChunkEntry, ManifestLimits, ManifestRoot, PAGE_CHUNKS, page_entry};
use crate::store::{BlobState, Owner, StoreError};

/// Version of the store layout (directories + these tables). Bump on any
/// incompatible change; `Store::open` refuses other versions.
pub const STORE_FORMAT_VERSION: u64 = 3;
/// Versions `Index::open` upgrades in place. Version 1 lacks the row-key
/// tables, which is exactly a version 2 store where every row key is its
/// blob id; version 2 kept chunk locations in the `chunks` multimap, which
/// the upgrade replaces by `chunk_rows` built from the stored pages.
const UPGRADABLE_FORMAT_VERSIONS: [u64; 2] = [1, 2];

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BLOBS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("blobs");
const PAGES: TableDefinition<(&[u8; 32], u32), &[u8]> = TableDefinition::new("pages");
const CHUNK_ROWS: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("chunk_rows");
/// Versions 1 and 2's chunk locations, dropped by the upgrade.
const CHUNKS_V2: MultimapTableDefinition<&[u8; 32], &[u8; 44]> =
    MultimapTableDefinition::new("chunks");
const ROW_NUMBERS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("row_numbers");
const NUMBERED_ROWS: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("numbered_rows");
/// `meta` key: the row number the next row key gets.
const NEXT_ROW_NUMBER: &str = "next_row_number";
const PRESENCE: TableDefinition<(&[u8; 32], u32), &[u8]> = TableDefinition::new("presence");
const OWNERS: MultimapTableDefinition<&[u8; 32], &str> = MultimapTableDefinition::new("owners");
const SEALING: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("sealing");
const INGESTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("ingests");
const ROW_KEYS: TableDefinition<&[u8; 32], &[u8; 32]> = TableDefinition::new("row_keys");
const ROW_KEY_BLOBS: TableDefinition<&[u8; 32], &[u8; 32]> = TableDefinition::new("row_key_blobs");

const RECORD_VERSION: u8 = 1;
/// redb page cache: enough for the hot B-tree levels; kept small so the
/// store's anonymous memory stays flat.
const CACHE_BYTES: usize = 8 << 20;

/// A blob's row in `blobs`.
#[derive(Clone, Debug)]
pub struct BlobRecord {
    pub state: BlobState,
    pub created_unix_s: u64,
    pub root: ManifestRoot,
}

/// The key under which a blob's pages and chunk locations are stored (see
/// the module docs): its id, or an ingest's provisional key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowKey(pub [u8; 32]);

impl From<&BlobId> for RowKey {
    fn from(id: &BlobId) -> Self {
        RowKey(id.0)
    }
}

impl RowKey {
    /// A fresh provisional key: 256 random-looking bits, unique per process,
    /// call and instant, so it can name no blob and no other ingest.
    pub fn provisional(salt: &[u8]) -> Self {
        let mut h = blake3::Hasher::new_derive_key("vigo ingest row key v1");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(&std::process::id().to_le_bytes());
        h.update(&now.to_le_bytes());
        h.update(salt);
        RowKey(*h.finalize().as_bytes())
    }
}

/// Where a chunk's bytes can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub blob: BlobId,
    pub offset: u64,
    pub len: u32,
}

/// One chunk's row in `chunk_rows`, before its row key is numbered: the
/// first 8 bytes of its hash, big-endian (so rows sort as hashes do), and
/// its index in the blob. 16 bytes, so a big batch of them is cheap to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkRow {
    prefix: u64,
    index: u64,
}

impl ChunkRow {
    /// The rows of manifest page `page`, whose chunks are `entries`.
    pub fn of_page(page: u32, entries: &[ChunkEntry]) -> impl Iterator<Item = ChunkRow> + '_ {
        let first = u64::from(page) * u64::from(PAGE_CHUNKS);
        entries.iter().zip(first..).map(|(e, index)| ChunkRow {
            prefix: hash_prefix(&e.hash),
            index,
        })
    }
}

fn hash_prefix(hash: &ChunkHash) -> u64 {
    u64::from_be_bytes(hash.0[..8].try_into().expect("8 bytes"))
}

fn encode_record(r: &BlobRecord) -> Vec<u8> {
    let mut v = vec![RECORD_VERSION, r.state as u8];
    v.extend_from_slice(&r.created_unix_s.to_le_bytes());
    v.extend_from_slice(&r.root.encode());
    v
}

fn decode_record(id: &BlobId, v: &[u8]) -> Result<BlobRecord, StoreError> {
    let corrupt = |why: &str| StoreError::CorruptIndex(format!("blob {id}: {why}"));
    if v.len() < 10 || v[0] != RECORD_VERSION {
        return Err(corrupt("unreadable record"));
    }
    let state = BlobState::from_u8(v[1]).ok_or_else(|| corrupt("unknown state"))?;
    let created_unix_s = u64::from_le_bytes(v[2..10].try_into().expect("8 bytes"));
    let root = ManifestRoot::decode(
        &v[10..],
        &ManifestLimits {
            total_bytes_max: u64::MAX,
        },
    )
    .map_err(|e| corrupt(&e.to_string()))?;
    if root.id() != *id {
        return Err(corrupt("manifest root does not hash to the blob id"));
    }
    Ok(BlobRecord {
        state,
        created_unix_s,
        root,
    })
}

pub(crate) struct Index {
    db: Database,
}

/// Where sealed copies of chunks are, as of one read snapshot of the index:
/// one transaction and its opened tables for any number of lookups. Delta
/// planning looks up every chunk of a manifest; a transaction per lookup
/// cost 0.77 s for the 215k chunks of a 2 GiB blob (an empty store, two
/// cores), paid before a fetch requested anything. Take a new finder to see
/// later commits.
pub struct ChunkFinder {
    rows: redb::ReadOnlyTable<(u64, u64, u64), ()>,
    numbered: redb::ReadOnlyTable<u64, &'static [u8; 32]>,
    blobs: redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    owners: redb::ReadOnlyTable<&'static [u8; 32], &'static [u8; 32]>,
    pages: redb::ReadOnlyTable<(&'static [u8; 32], u32), &'static [u8]>,
    /// The manifest pages lookups read last, by (row number, page index),
    /// newest first: a blob that shares content shares runs of chunks, so
    /// consecutive lookups mostly land in the same page.
    cache: std::cell::RefCell<std::collections::VecDeque<(u64, u32, Vec<u8>)>>,
    /// The last copy found: the next lookup tries the chunk after it
    /// before scanning rows.
    last: std::cell::Cell<Option<FoundRow>>,
}

/// Where a [`ChunkFinder`] found a copy: chunk `index` of the pages under
/// row key `key` (numbered `number`), held by sealed `blob`.
#[derive(Clone, Copy)]
struct FoundRow {
    number: u64,
    key: [u8; 32],
    blob: BlobId,
    index: u64,
}

/// Manifest pages a [`ChunkFinder`] keeps (~180 KB each).
const FINDER_PAGES: usize = 4;

impl ChunkFinder {
    /// A sealed, servable copy of `hash` in a blob other than `exclude`
    /// and not in `skip`.
    pub fn find(
        &self,
        hash: &ChunkHash,
        exclude: &BlobId,
        skip: &HashSet<BlobId>,
    ) -> Result<Option<ChunkLocation>, StoreError> {
        // Content shared between blobs comes in runs: the chunk after the
        // last one found is the likeliest copy, and its page entry (cached)
        // is checked without scanning rows or looking up its blob again (it
        // was complete in this snapshot).
        if let Some(last) = self.last.get()
            && last.blob != *exclude
            && !skip.contains(&last.blob)
            && let Some(e) = self.entry(last.number, &last.key, last.index + 1)?
            && e.hash == *hash
        {
            self.last.set(Some(FoundRow {
                index: last.index + 1,
                ..last
            }));
            return Ok(Some(ChunkLocation {
                blob: last.blob,
                offset: e.offset,
                len: e.len,
            }));
        }
        let prefix = hash_prefix(hash);
        for row in self
            .rows
            .range((prefix, 0, 0)..=(prefix, u64::MAX, u64::MAX))
            .map_err(ierr)?
        {
            let (_, number, index) = row.map_err(ierr)?.0.value();
            let Some(key) = self.numbered.get(number).map_err(ierr)?.map(|k| *k.value()) else {
                // Not written so: a row key's number is removed with its
                // last row. A stray row costs only this lookup.
                tracing::warn!("chunk row {prefix:016x}/{number}/{index} names no row key");
                continue;
            };
            // A provisional key names its blob once sealed; until then it
            // names nothing, and the lookup below finds no complete blob.
            let blob = match self.owners.get(&key).map_err(ierr)? {
                Some(id) => BlobId(*id.value()),
                None => BlobId(key),
            };
            if blob == *exclude || skip.contains(&blob) {
                continue;
            }
            let complete = self
                .blobs
                .get(&blob.0)
                .map_err(ierr)?
                .is_some_and(|r| r.value().get(1) == Some(&(BlobState::Complete as u8)));
            if !complete {
                continue;
            }
            // The row holds 8 bytes of the hash: the page entry has the rest.
            if let Some(e) = self.entry(number, &key, index)?
                && e.hash == *hash
            {
                self.last.set(Some(FoundRow {
                    number,
                    key,
                    blob,
                    index,
                }));
                return Ok(Some(ChunkLocation {
                    blob,
                    offset: e.offset,
                    len: e.len,
                }));
            }
        }
        Ok(None)
    }

    /// Chunk `index` of the pages stored under `key` (row number `number`).
    fn entry(
        &self,
        number: u64,
        key: &[u8; 32],
        index: u64,
    ) -> Result<Option<ChunkEntry>, StoreError> {
        let per_page = u64::from(PAGE_CHUNKS);
        let Ok(page) = u32::try_from(index / per_page) else {
            return Ok(None);
        };
        let slot = (index % per_page) as usize;
        let mut cache = self.cache.borrow_mut();
        if let Some(at) = cache
            .iter()
            .position(|(n, p, _)| (*n, *p) == (number, page))
        {
            let hit = cache.remove(at).expect("found");
            let entry = page_entry(&hit.2, slot);
            cache.push_front(hit);
            return Ok(entry);
        }
        let Some(bytes) = self.pages.get((key, page)).map_err(ierr)? else {
            return Ok(None);
        };
        let bytes = bytes.value().to_vec();
        let entry = page_entry(&bytes, slot);
        cache.truncate(FINDER_PAGES - 1);
        cache.push_front((number, page, bytes));
        Ok(entry)
    }
}

/// Test builds only: SIGKILLs this process at the point named by
/// `VIGO_TEST_CRASH`, for tests that run a store in a child process and
/// check what the next open makes of it.
#[cfg(test)]
pub(crate) fn crash_point(name: &str) {
    if std::env::var("VIGO_TEST_CRASH").as_deref() == Ok(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(test))]
fn crash_point(_: &str) {}

fn ierr(e: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptIndex(e.to_string())
}

impl Index {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let cannot = |e: &dyn std::fmt::Display| {
            StoreError::CorruptIndex(format!("cannot open index {}: {e}", path.display()))
        };
        // What `Builder::create` opens, behind the grow-sync deferral.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| cannot(&e))?;
        let backend = redb::backends::FileBackend::new(file).map_err(|e| cannot(&e))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(IndexFile::new(backend))
            .map_err(|e| cannot(&e))?;
        let index = Index { db };
        let tx = index.db.begin_write().map_err(ierr)?;
        let mut upgrade_from = None;
        {
            let mut meta = tx.open_table(META).map_err(ierr)?;
            let found = meta.get("format_version").map_err(ierr)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format_version", STORE_FORMAT_VERSION)
                        .map_err(ierr)?;
                }
                Some(v) if v == STORE_FORMAT_VERSION => {}
                // The new version is written once the upgrade is done.
                Some(v) if UPGRADABLE_FORMAT_VERSIONS.contains(&v) => upgrade_from = Some(v),
                Some(v) => {
                    return Err(StoreError::FormatVersion {
                        found: v,
                        supported: STORE_FORMAT_VERSION,
                    });
                }
            }
            // Create every table so readers never meet a missing one.
            tx.open_table(BLOBS).map_err(ierr)?;
            tx.open_table(PAGES).map_err(ierr)?;
            tx.open_table(CHUNK_ROWS).map_err(ierr)?;
            tx.open_table(ROW_NUMBERS).map_err(ierr)?;
            tx.open_table(NUMBERED_ROWS).map_err(ierr)?;
            tx.open_table(PRESENCE).map_err(ierr)?;
            tx.open_multimap_table(OWNERS).map_err(ierr)?;
            tx.open_table(SEALING).map_err(ierr)?;
            tx.open_table(INGESTS).map_err(ierr)?;
            tx.open_table(ROW_KEYS).map_err(ierr)?;
            tx.open_table(ROW_KEY_BLOBS).map_err(ierr)?;
        }
        tx.commit().map_err(ierr)?;
        if let Some(from) = upgrade_from {
            index.upgrade(from)?;
        }
        Ok(index)
    }

    /// Upgrades a version 1 or 2 index (see [`UPGRADABLE_FORMAT_VERSIONS`]):
    /// `chunk_rows` is built from the pages of every blob, in unsynced
    /// batches, and one durable commit at the end drops `chunks` and writes
    /// the new version. A crash before it leaves the old index as it was
    /// (unsynced commits do not survive one); a rerun inserts the same rows
    /// again. Pages that no longer decode are left out with a warning (their
    /// chunks are then not found for delta; `store verify` reports them).
    fn upgrade(&self, from: u64) -> Result<(), StoreError> {
        tracing::info!(
            "upgrading the store index from format version {from} to {STORE_FORMAT_VERSION}: indexing the chunks of every blob"
        );
        let started = std::time::Instant::now();
        let mut tx = self.write()?;
        let (mut rows, mut pages) = (Vec::new(), 0u32);
        for (id, record) in self.blobs()? {
            let key = self.row_key(&id)?;
            for i in 0..record.root.pages.len() as u32 {
                let Some(bytes) = self.page_bytes_at(&key, i)? else {
                    continue;
                };
                match record.root.decode_page(i as usize, &bytes) {
                    Ok(entries) => rows.extend(ChunkRow::of_page(i, &entries)),
                    Err(e) => tracing::warn!(
                        "blob {id}: manifest page {i} does not decode ({e}); its chunks are left out of the chunk index"
                    ),
                }
                pages += 1;
                if pages.is_multiple_of(crate::store::PAGES_PER_TX) {
                    tx.put_chunks(key, &mut rows)?;
                    rows.clear();
                    tx.commit_unsynced()?;
                    crash_point("upgrade-batch");
                    tx = self.write()?;
                }
            }
            tx.put_chunks(key, &mut rows)?;
            rows.clear();
        }
        tx.tx.delete_multimap_table(CHUNKS_V2).map_err(ierr)?;
        tx.tx
            .open_table(META)
            .map_err(ierr)?
            .insert("format_version", STORE_FORMAT_VERSION)
            .map_err(ierr)?;
        crash_point("upgrade-final");
        tx.commit()?;
        tracing::info!(
            "store index upgraded: {pages} manifest pages indexed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    pub fn blob(&self, id: &BlobId) -> Result<Option<BlobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(BLOBS).map_err(ierr)?;
        match t.get(&id.0).map_err(ierr)? {
            Some(v) => Ok(Some(decode_record(id, v.value())?)),
            None => Ok(None),
        }
    }

    pub fn blobs(&self) -> Result<Vec<(BlobId, BlobRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(BLOBS).map_err(ierr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(ierr)? {
            let (k, v) = row.map_err(ierr)?;
            let id = BlobId(*k.value());
            out.push((id, decode_record(&id, v.value())?));
        }
        Ok(out)
    }

    /// Decoded entries of page `i`, checked against the root.
    pub fn page(
        &self,
        id: &BlobId,
        root: &ManifestRoot,
        i: u32,
    ) -> Result<Vec<ChunkEntry>, StoreError> {
        let bytes = self.page_bytes(id, i)?;
        root.decode_page(i as usize, &bytes)
            .map_err(|e| StoreError::CorruptIndex(format!("blob {id} page {i}: {e}")))
    }

    pub fn page_bytes(&self, id: &BlobId, i: u32) -> Result<Vec<u8>, StoreError> {
        self.page_bytes_opt(id, i)?.ok_or_else(|| {
            StoreError::CorruptIndex(format!("blob {id}: manifest page {i} missing"))
        })
    }

    pub fn page_bytes_opt(&self, id: &BlobId, i: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let key = row_key_in(&tx.open_table(ROW_KEYS).map_err(ierr)?, id)?;
        let t = tx.open_table(PAGES).map_err(ierr)?;
        Ok(t.get((&key.0, i))
            .map_err(ierr)?
            .map(|v| v.value().to_vec()))
    }

    /// Page `i` stored under `key`, whichever blob (or ingest) it belongs to.
    pub fn page_bytes_at(&self, key: &RowKey, i: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(PAGES).map_err(ierr)?;
        Ok(t.get((&key.0, i))
            .map_err(ierr)?
            .map(|v| v.value().to_vec()))
    }

    /// The key `id`'s rows are stored under.
    pub fn row_key(&self, id: &BlobId) -> Result<RowKey, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        row_key_in(&tx.open_table(ROW_KEYS).map_err(ierr)?, id)
    }

    /// Blobs whose seal or removal did not finish, with their roots.
    pub fn sealing(&self) -> Result<Vec<(BlobId, ManifestRoot)>, StoreError> {
        Ok(self
            .markers(SEALING)?
            .into_iter()
            .map(|(k, root)| (BlobId(k), root))
            .collect())
    }

    /// Ingests that did not finish, with the pages they wrote.
    pub fn ingests(&self) -> Result<Vec<(RowKey, ManifestRoot)>, StoreError> {
        Ok(self
            .markers(INGESTS)?
            .into_iter()
            .map(|(k, root)| (RowKey(k), root))
            .collect())
    }

    fn markers(
        &self,
        table: TableDefinition<&[u8; 32], &[u8]>,
    ) -> Result<Vec<([u8; 32], ManifestRoot)>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(table).map_err(ierr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(ierr)? {
            let (k, v) = row.map_err(ierr)?;
            let limits = ManifestLimits {
                total_bytes_max: u64::MAX,
            };
            let root = ManifestRoot::decode(v.value(), &limits).map_err(|e| {
                StoreError::CorruptIndex(format!(
                    "{} marker {}: {e}",
                    table.name(),
                    hex::encode(k.value())
                ))
            })?;
            out.push((*k.value(), root));
        }
        Ok(out)
    }

    pub fn owners(&self, id: &BlobId) -> Result<Vec<Owner>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_multimap_table(OWNERS).map_err(ierr)?;
        let mut out = Vec::new();
        for v in t.get(&id.0).map_err(ierr)? {
            if let Some(o) = Owner::parse(v.map_err(ierr)?.value()) {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Chunk lookups against one read snapshot (see [`ChunkFinder`]).
    pub fn chunk_finder(&self) -> Result<ChunkFinder, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        Ok(ChunkFinder {
            rows: tx.open_table(CHUNK_ROWS).map_err(ierr)?,
            numbered: tx.open_table(NUMBERED_ROWS).map_err(ierr)?,
            blobs: tx.open_table(BLOBS).map_err(ierr)?,
            owners: tx.open_table(ROW_KEY_BLOBS).map_err(ierr)?,
            pages: tx.open_table(PAGES).map_err(ierr)?,
            cache: Default::default(),
            last: Default::default(),
        })
    }

    #[cfg(test)]
    pub fn db_for_tests(&self) -> &Database {
        &self.db
    }

    /// Rows in `chunk_rows` and row keys numbered.
    #[cfg(test)]
    pub fn chunk_rows_for_tests(&self) -> (u64, u64) {
        let tx = self.db.begin_read().unwrap();
        (
            redb::ReadableTableMetadata::len(&tx.open_table(CHUNK_ROWS).unwrap()).unwrap(),
            redb::ReadableTableMetadata::len(&tx.open_table(ROW_NUMBERS).unwrap()).unwrap(),
        )
    }

    pub fn write(&self) -> Result<Tx, StoreError> {
        Ok(Tx {
            tx: self.db.begin_write().map_err(ierr)?,
        })
    }

    pub fn presence(&self, id: &BlobId, page: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(PRESENCE).map_err(ierr)?;
        Ok(t.get((&id.0, page))
            .map_err(ierr)?
            .map(|v| v.value().to_vec()))
    }
}

/// One write transaction; commits durably (fsync) on [`Tx::commit`], and
/// rolls back when dropped uncommitted.
pub(crate) struct Tx {
    tx: WriteTransaction,
}

impl Tx {
    pub fn put_blob(&self, id: &BlobId, record: &BlobRecord) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(BLOBS).map_err(ierr)?;
        t.insert(&id.0, encode_record(record).as_slice())
            .map_err(ierr)?;
        Ok(())
    }

    pub fn put_page(&self, key: impl Into<RowKey>, i: u32, bytes: &[u8]) -> Result<(), StoreError> {
        let key = key.into();
        let mut t = self.tx.open_table(PAGES).map_err(ierr)?;
        t.insert((&key.0, i), bytes).map_err(ierr)?;
        Ok(())
    }

    /// Records which chunks the pages stored under a row key list (rows
    /// from [`ChunkRow::of_page`]). Inserts in key order: chunk hashes are
    /// uniformly random, and sorted inserts walk the B-tree once instead of
    /// touching a random leaf each.
    pub fn put_chunks(
        &self,
        key: impl Into<RowKey>,
        rows: &mut [ChunkRow],
    ) -> Result<(), StoreError> {
        let number = self.row_number(&key.into())?;
        rows.sort_unstable();
        let mut t = self.tx.open_table(CHUNK_ROWS).map_err(ierr)?;
        for r in rows.iter() {
            t.insert((r.prefix, number, r.index), ()).map_err(ierr)?;
        }
        Ok(())
    }

    /// The number of `key`'s chunk rows: its own, or a new one.
    fn row_number(&self, key: &RowKey) -> Result<u64, StoreError> {
        if let Some(n) = self.existing_row_number(key)? {
            return Ok(n);
        }
        let mut meta = self.tx.open_table(META).map_err(ierr)?;
        let n = meta
            .get(NEXT_ROW_NUMBER)
            .map_err(ierr)?
            .map_or(0, |v| v.value());
        meta.insert(NEXT_ROW_NUMBER, n + 1).map_err(ierr)?;
        self.tx
            .open_table(ROW_NUMBERS)
            .map_err(ierr)?
            .insert(&key.0, n)
            .map_err(ierr)?;
        self.tx
            .open_table(NUMBERED_ROWS)
            .map_err(ierr)?
            .insert(n, &key.0)
            .map_err(ierr)?;
        Ok(n)
    }

    fn existing_row_number(&self, key: &RowKey) -> Result<Option<u64>, StoreError> {
        let numbers = self.tx.open_table(ROW_NUMBERS).map_err(ierr)?;
        Ok(numbers.get(&key.0).map_err(ierr)?.map(|n| n.value()))
    }

    /// Forgets `key`'s row number (its chunk rows must be gone).
    pub fn forget_row_number(&self, key: &RowKey) -> Result<(), StoreError> {
        let n = self
            .tx
            .open_table(ROW_NUMBERS)
            .map_err(ierr)?
            .remove(&key.0)
            .map_err(ierr)?
            .map(|n| n.value());
        if let Some(n) = n {
            self.tx
                .open_table(NUMBERED_ROWS)
                .map_err(ierr)?
                .remove(n)
                .map_err(ierr)?;
        }
        Ok(())
    }

    /// Names `id` as the blob whose rows are stored under `key`.
    pub fn link_rows(&self, id: &BlobId, key: &RowKey) -> Result<(), StoreError> {
        if *key == RowKey::from(id) {
            return Ok(());
        }
        self.tx
            .open_table(ROW_KEYS)
            .map_err(ierr)?
            .insert(&id.0, &key.0)
            .map_err(ierr)?;
        self.tx
            .open_table(ROW_KEY_BLOBS)
            .map_err(ierr)?
            .insert(&key.0, &id.0)
            .map_err(ierr)?;
        Ok(())
    }

    /// Forgets `id`'s row key (its rows must be gone).
    pub fn unlink_rows(&self, id: &BlobId) -> Result<(), StoreError> {
        let key = self
            .tx
            .open_table(ROW_KEYS)
            .map_err(ierr)?
            .remove(&id.0)
            .map_err(ierr)?
            .map(|k| *k.value());
        if let Some(key) = key {
            self.tx
                .open_table(ROW_KEY_BLOBS)
                .map_err(ierr)?
                .remove(&key)
                .map_err(ierr)?;
        }
        Ok(())
    }

    /// Marks (with the root of the pages written so far) or unmarks an
    /// ingest writing rows under `key`.
    pub fn set_ingest(&self, key: &RowKey, root: Option<&ManifestRoot>) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(INGESTS).map_err(ierr)?;
        match root {
            Some(r) => t.insert(&key.0, r.encode().as_slice()).map_err(ierr)?,
            None => t.remove(&key.0).map_err(ierr)?,
        };
        Ok(())
    }

    pub fn add_owner(&self, id: &BlobId, owner: &Owner) -> Result<(), StoreError> {
        let mut t = self.tx.open_multimap_table(OWNERS).map_err(ierr)?;
        t.insert(&id.0, owner.to_string().as_str()).map_err(ierr)?;
        Ok(())
    }

    pub fn put_presence(&self, id: &BlobId, page: u32, bits: &[u8]) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(PRESENCE).map_err(ierr)?;
        t.insert((&id.0, page), bits).map_err(ierr)?;
        Ok(())
    }

    pub fn clear_presence(&self, id: &BlobId, pages: u32) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(PRESENCE).map_err(ierr)?;
        for p in 0..pages {
            t.remove((&id.0, p)).map_err(ierr)?;
        }
        Ok(())
    }

    /// Marks (with its root) or unmarks a blob whose rows are being written
    /// or removed in unsynced batches.
    pub fn set_sealing(&self, id: &BlobId, root: Option<&ManifestRoot>) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(SEALING).map_err(ierr)?;
        match root {
            Some(r) => t.insert(&id.0, r.encode().as_slice()).map_err(ierr)?,
            None => t.remove(&id.0).map_err(ierr)?,
        };
        Ok(())
    }

    /// Removes a blob's record and owners (it is no longer listed or served).
    pub fn remove_record(&self, id: &BlobId) -> Result<(), StoreError> {
        self.tx
            .open_multimap_table(OWNERS)
            .map_err(ierr)?
            .remove_all(&id.0)
            .map_err(ierr)?;
        self.tx
            .open_table(BLOBS)
            .map_err(ierr)?
            .remove(&id.0)
            .map_err(ierr)?;
        Ok(())
    }

    /// Removes page `i` stored under `key` with its chunk locations, and the
    /// presence bits of blob `key` (a partial blob's key is its id).
    pub fn remove_page(
        &self,
        key: &RowKey,
        i: u32,
        entries: &[ChunkEntry],
    ) -> Result<(), StoreError> {
        if let Some(number) = self.existing_row_number(key)? {
            let mut rows = self.tx.open_table(CHUNK_ROWS).map_err(ierr)?;
            for r in ChunkRow::of_page(i, entries) {
                rows.remove((r.prefix, number, r.index)).map_err(ierr)?;
            }
        }
        self.tx
            .open_table(PAGES)
            .map_err(ierr)?
            .remove((&key.0, i))
            .map_err(ierr)?;
        self.tx
            .open_table(PRESENCE)
            .map_err(ierr)?
            .remove((&key.0, i))
            .map_err(ierr)?;
        Ok(())
    }

    /// Commits without fsync: lost on a crash unless a later durable commit
    /// follows (redb `Durability::None`).
    pub fn commit_unsynced(mut self) -> Result<(), StoreError> {
        self.tx
            .set_durability(redb::Durability::None)
            .map_err(ierr)?;
        self.tx.commit().map_err(ierr)
    }

    pub fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().map_err(ierr)
    }
}

fn row_key_in(
    row_keys: &impl ReadableTable<&'static [u8; 32], &'static [u8; 32]>,
    id: &BlobId,
) -> Result<RowKey, StoreError> {
    Ok(match row_keys.get(&id.0).map_err(ierr)? {
        Some(k) => RowKey(*k.value()),
        None => RowKey::from(id),
    })
}
