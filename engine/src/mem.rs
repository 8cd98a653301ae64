//! The in-memory reference store: the same observable behaviour as
//! [`crate::store::Store`] in a few obvious lines, used as the test oracle
//! (every backend must agree with it) and by simulations that need blobs
//! without disks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::chunker::{Chunker, StreamChunker};
use crate::hash::{BlobId, ChunkHash, ContentHash};
use crate::manifest::{ChunkEntry, Manifest};
use crate::store::DeltaPlan;

#[derive(Debug)]
pub struct MemStore {
    chunker: Chunker,
    blobs: Mutex<BTreeMap<BlobId, (Manifest, Vec<u8>)>>,
}

impl MemStore {
    pub fn new(chunker: Chunker) -> Self {
        MemStore {
            chunker,
            blobs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Chunks and stores `data`; returns its manifest.
    pub fn add(&self, data: &[u8]) -> Manifest {
        let manifest = Self::manifest_of(&self.chunker, data);
        self.blobs
            .lock()
            .expect("mem store poisoned")
            .insert(manifest.id(), (manifest.clone(), data.to_vec()));
        manifest
    }

    /// The manifest `data` has under `chunker`, computed the simplest way.
    pub fn manifest_of(chunker: &Chunker, data: &[u8]) -> Manifest {
        let mut entries = Vec::new();
        let mut stream = StreamChunker::new(chunker.clone());
        let mut emit = |c: crate::chunker::FoundChunk| {
            entries.push(ChunkEntry {
                offset: c.offset,
                len: c.len,
                hash: c.hash,
            })
        };
        stream.push(data, &mut emit);
        stream.finish(&mut emit);
        let content = ContentHash(*blake3::hash(data).as_bytes());
        Manifest::from_entries(chunker.params(), content, &entries)
    }

    pub fn ids(&self) -> Vec<BlobId> {
        self.blobs
            .lock()
            .expect("mem store poisoned")
            .keys()
            .copied()
            .collect()
    }

    pub fn read(&self, id: &BlobId) -> Option<Vec<u8>> {
        self.blobs
            .lock()
            .expect("mem store poisoned")
            .get(id)
            .map(|(_, d)| d.clone())
    }

    pub fn manifest(&self, id: &BlobId) -> Option<Manifest> {
        self.blobs
            .lock()
            .expect("mem store poisoned")
            .get(id)
            .map(|(m, _)| m.clone())
    }

    pub fn remove(&self, id: &BlobId) -> bool {
        self.blobs
            .lock()
            .expect("mem store poisoned")
            .remove(id)
            .is_some()
    }

    /// Which chunks of `manifest` some other stored blob holds.
    pub fn plan(&self, manifest: &Manifest) -> DeltaPlan {
        let id = manifest.id();
        let blobs = self.blobs.lock().expect("mem store poisoned");
        let held: HashMap<ChunkHash, ()> = blobs
            .iter()
            .filter(|(other, _)| **other != id)
            .flat_map(|(_, (m, _))| m.entries().expect("own manifests decode"))
            .map(|e| (e.hash, ()))
            .collect();
        let mut plan = DeltaPlan::default();
        for e in manifest.entries().expect("caller passes a valid manifest") {
            if held.contains_key(&e.hash) {
                plan.held_chunks += 1;
                plan.held_bytes += u64::from(e.len);
            } else {
                plan.missing_chunks += 1;
                plan.missing_bytes += u64::from(e.len);
            }
        }
        plan
    }
}
