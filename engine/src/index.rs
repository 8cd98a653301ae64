//! The store's embedded index (redb). Tables, their encodings and the
//! transactions that keep them consistent with the blob files; the byte
//! layouts are in `docs/store-format.md`.
//!
//! - `meta`: `"format_version"` → u64. Checked at open.
//! - `blobs`: blob id → record (`[record version u8][state u8][created u64 LE][manifest root]`).
//! - `pages`: (blob id, page index) → encoded manifest page.
//! - `chunks` (multimap): chunk hash → `[blob id 32][offset u64 LE][len u32 LE]`,
//!   one value per (chunk, sealed blob holding it). Exact under dedup:
//!   removing a blob removes exactly its own values.
//! - `presence`: (blob id, page index) → bitmap of chunks written, for partial blobs.
//! - `owners` (multimap): blob id → `"uid:subsystem"`.
//! - `sealing`: blob id → manifest root, while a seal or removal is writing
//!   rows in unsynced batches; `Store::open` removes the rows of any blob
//!   still listed (the operation did not finish).

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use crate::hash::{BlobId, ChunkHash};
use crate::manifest::{ChunkEntry, ManifestLimits, ManifestRoot};
use crate::store::{BlobState, Owner, StoreError};

/// Version of the store layout (directories + these tables). Bump on any
/// incompatible change; `Store::open` refuses other versions.
pub const STORE_FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BLOBS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("blobs");
const PAGES: TableDefinition<(&[u8; 32], u32), &[u8]> = TableDefinition::new("pages");
const CHUNKS: MultimapTableDefinition<&[u8; 32], &[u8; 44]> =
    MultimapTableDefinition::new("chunks");
const PRESENCE: TableDefinition<(&[u8; 32], u32), &[u8]> = TableDefinition::new("presence");
const OWNERS: MultimapTableDefinition<&[u8; 32], &str> = MultimapTableDefinition::new("owners");
const SEALING: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("sealing");

const RECORD_VERSION: u8 = 1;
/// redb page cache: enough for the hot B-tree levels; kept small so the
/// store's anonymous memory stays flat.
const CACHE_BYTES: usize = 16 << 20;

/// A blob's row in `blobs`.
#[derive(Clone, Debug)]
pub struct BlobRecord {
    pub state: BlobState,
    pub created_unix_s: u64,
    pub root: ManifestRoot,
}

/// Where a chunk's bytes can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub blob: BlobId,
    pub offset: u64,
    pub len: u32,
}

fn encode_location(l: &ChunkLocation) -> [u8; 44] {
    let mut v = [0u8; 44];
    v[..32].copy_from_slice(&l.blob.0);
    v[32..40].copy_from_slice(&l.offset.to_le_bytes());
    v[40..].copy_from_slice(&l.len.to_le_bytes());
    v
}

fn decode_location(v: &[u8; 44]) -> ChunkLocation {
    ChunkLocation {
        blob: BlobId(v[..32].try_into().expect("32 bytes")),
        offset: u64::from_le_bytes(v[32..40].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(v[40..].try_into().expect("4 bytes")),
    }
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

fn ierr(e: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptIndex(e.to_string())
}

impl Index {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| {
                StoreError::CorruptIndex(format!("cannot open index {}: {e}", path.display()))
            })?;
        let index = Index { db };
        let tx = index.db.begin_write().map_err(ierr)?;
        {
            let mut meta = tx.open_table(META).map_err(ierr)?;
            let found = meta.get("format_version").map_err(ierr)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format_version", STORE_FORMAT_VERSION)
                        .map_err(ierr)?;
                }
                Some(v) if v == STORE_FORMAT_VERSION => {}
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
            tx.open_multimap_table(CHUNKS).map_err(ierr)?;
            tx.open_table(PRESENCE).map_err(ierr)?;
            tx.open_multimap_table(OWNERS).map_err(ierr)?;
            tx.open_table(SEALING).map_err(ierr)?;
        }
        tx.commit().map_err(ierr)?;
        Ok(index)
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
        let t = tx.open_table(PAGES).map_err(ierr)?;
        Ok(t.get((&id.0, i)).map_err(ierr)?.map(|v| v.value().to_vec()))
    }

    /// Blobs whose seal or removal did not finish, with their roots.
    pub fn sealing(&self) -> Result<Vec<(BlobId, ManifestRoot)>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let t = tx.open_table(SEALING).map_err(ierr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(ierr)? {
            let (k, v) = row.map_err(ierr)?;
            let id = BlobId(*k.value());
            let limits = ManifestLimits {
                total_bytes_max: u64::MAX,
            };
            let root = ManifestRoot::decode(v.value(), &limits)
                .map_err(|e| StoreError::CorruptIndex(format!("sealing marker of {id}: {e}")))?;
            out.push((id, root));
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

    /// A sealed, servable copy of `hash`, skipping `exclude`.
    pub fn find_chunk(
        &self,
        hash: &ChunkHash,
        exclude: &BlobId,
    ) -> Result<Option<ChunkLocation>, StoreError> {
        let tx = self.db.begin_read().map_err(ierr)?;
        let chunks = tx.open_multimap_table(CHUNKS).map_err(ierr)?;
        let blobs = tx.open_table(BLOBS).map_err(ierr)?;
        for v in chunks.get(&hash.0).map_err(ierr)? {
            let loc = decode_location(v.map_err(ierr)?.value());
            if loc.blob == *exclude {
                continue;
            }
            let complete = blobs
                .get(&loc.blob.0)
                .map_err(ierr)?
                .is_some_and(|r| r.value().get(1) == Some(&(BlobState::Complete as u8)));
            if complete {
                return Ok(Some(loc));
            }
        }
        Ok(None)
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

    pub fn put_page(&self, id: &BlobId, i: u32, bytes: &[u8]) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(PAGES).map_err(ierr)?;
        t.insert((&id.0, i), bytes).map_err(ierr)?;
        Ok(())
    }

    /// Records where each chunk of a sealed blob lives.
    /// Inserts in key order: chunk hashes are uniformly random, and sorted
    /// inserts walk the B-tree once instead of touching a random leaf each.
    pub fn put_chunks(&self, id: &BlobId, entries: &mut [ChunkEntry]) -> Result<(), StoreError> {
        entries.sort_unstable_by_key(|e| e.hash);
        let mut t = self.tx.open_multimap_table(CHUNKS).map_err(ierr)?;
        for e in entries.iter() {
            let loc = ChunkLocation {
                blob: *id,
                offset: e.offset,
                len: e.len,
            };
            t.insert(&e.hash.0, &encode_location(&loc)).map_err(ierr)?;
        }
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

    /// Removes page `i` of `id` with its chunk locations and presence bits.
    pub fn remove_page(
        &self,
        id: &BlobId,
        i: u32,
        entries: &[ChunkEntry],
    ) -> Result<(), StoreError> {
        {
            let mut chunks = self.tx.open_multimap_table(CHUNKS).map_err(ierr)?;
            for e in entries {
                let loc = ChunkLocation {
                    blob: *id,
                    offset: e.offset,
                    len: e.len,
                };
                chunks
                    .remove(&e.hash.0, &encode_location(&loc))
                    .map_err(ierr)?;
            }
        }
        self.tx
            .open_table(PAGES)
            .map_err(ierr)?
            .remove((&id.0, i))
            .map_err(ierr)?;
        self.tx
            .open_table(PRESENCE)
            .map_err(ierr)?
            .remove((&id.0, i))
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
