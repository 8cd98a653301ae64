//! The receiving side of a manifest transfer: verify each part against the
//! blob id as it arrives.
//!
//! The requester knows only the id. A `ManifestRoot` frame's bytes are
//! accepted only if they hash to the id (`ManifestRoot::decode_verified`,
//! which also checks every count against `ManifestLimits` before
//! allocating); each `ManifestPage` only if it hashes to the descriptor in
//! that verified root (`ManifestRoot::decode_page`). Pages may arrive in any
//! order and from any peer; nothing unverified is kept. The chunk lengths the
//! scheduler needs are collected as pages verify (4 bytes per chunk: 2 MiB
//! for 4 GiB of 8 KiB chunks).

use engine::hash::BlobId;
use engine::manifest::{Manifest, ManifestError, ManifestLimits, ManifestRoot, PAGE_CHUNKS};

/// Assembles and verifies one blob's manifest, part by part.
#[derive(Debug)]
pub struct ManifestAssembler {
    blob: BlobId,
    limits: ManifestLimits,
    root: Option<ManifestRoot>,
    pages: Vec<Option<Vec<u8>>>,
    pages_received: usize,
    chunk_lens: Vec<u32>,
}

impl ManifestAssembler {
    pub fn new(blob: BlobId, limits: ManifestLimits) -> Self {
        ManifestAssembler {
            blob,
            limits,
            root: None,
            pages: Vec::new(),
            pages_received: 0,
            chunk_lens: Vec::new(),
        }
    }

    pub fn blob(&self) -> BlobId {
        self.blob
    }

    /// The verified root, once it has arrived.
    pub fn root(&self) -> Option<&ManifestRoot> {
        self.root.as_ref()
    }

    /// Checks root bytes against the blob id. A second root (asked of several
    /// peers) is ignored once one has verified.
    pub fn handle_root(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        if self.root.is_some() {
            return Ok(());
        }
        let root = ManifestRoot::decode_verified(bytes, &self.blob, &self.limits)?;
        self.pages = vec![None; root.pages.len()];
        // The root verified against the id the user asked for, and its chunk
        // count passed the size cap: allocating per chunk is now safe.
        self.chunk_lens = vec![0; root.chunk_count as usize];
        self.root = Some(root);
        Ok(())
    }

    /// Pages still to fetch, ascending (empty until the root has verified).
    pub fn pages_missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| i as u32)
    }

    /// Whether page `page` has arrived and verified.
    pub fn has_page(&self, page: u32) -> bool {
        self.pages.get(page as usize).is_some_and(Option::is_some)
    }

    /// Checks page `page`'s bytes against the verified root. A page already
    /// received is ignored.
    pub fn handle_page(&mut self, page: u32, bytes: &[u8]) -> Result<(), ManifestError> {
        let Some(root) = &self.root else {
            return Err(ManifestError::Inconsistent("manifest page before its root"));
        };
        let index = page as usize;
        match self.pages.get(index) {
            None => return Err(ManifestError::Inconsistent("page index beyond the root")),
            Some(Some(_)) => return Ok(()),
            Some(None) => {}
        }
        let entries = root.decode_page(index, bytes)?;
        let first = index * PAGE_CHUNKS as usize;
        for (slot, e) in self.chunk_lens[first..first + entries.len()]
            .iter_mut()
            .zip(&entries)
        {
            *slot = e.len;
        }
        self.pages[index] = Some(bytes.to_vec());
        self.pages_received += 1;
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.root.is_some() && self.pages_received == self.pages.len()
    }

    /// The whole verified manifest (for `Store::begin_partial`) and every
    /// chunk's length (for `Scheduler::new`); `None` if it is incomplete.
    pub fn finish(self) -> Option<(Manifest, Vec<u32>)> {
        if !self.is_complete() {
            return None;
        }
        let root = self.root?;
        let pages = self.pages.into_iter().flatten().collect();
        Some((Manifest { root, pages }, self.chunk_lens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::chunker::ChunkerParams;
    use engine::hash::{ChunkHash, ContentHash};
    use engine::manifest::ChunkEntry;

    fn manifest(chunks: u64) -> Manifest {
        let params = ChunkerParams::with_avg(1024).unwrap();
        let entries: Vec<_> = (0..chunks)
            .map(|i| ChunkEntry {
                offset: i * 1000,
                len: 1000,
                hash: ChunkHash::of(&i.to_le_bytes()),
            })
            .collect();
        Manifest::from_entries(params, ContentHash([9; 32]), &entries)
    }

    #[test]
    fn verifies_every_part_in_any_order() {
        let m = manifest(9000);
        let mut a = ManifestAssembler::new(m.id(), ManifestLimits::default());
        assert!(a.handle_page(0, &m.pages[0]).is_err(), "page before root");
        let mut bad_root = m.root.encode();
        bad_root[30] ^= 1;
        assert_eq!(
            a.handle_root(&bad_root),
            Err(ManifestError::HashMismatch("root"))
        );
        a.handle_root(&m.root.encode()).unwrap();
        assert_eq!(a.pages_missing().collect::<Vec<_>>(), vec![0, 1, 2]);
        a.handle_page(2, &m.pages[2]).unwrap();
        assert_eq!(
            a.handle_page(1, &m.pages[0]),
            Err(ManifestError::HashMismatch("page"))
        );
        assert!(a.handle_page(3, &m.pages[0]).is_err());
        a.handle_page(0, &m.pages[0]).unwrap();
        assert!(!a.is_complete());
        a.handle_page(1, &m.pages[1]).unwrap();
        a.handle_page(1, &m.pages[1]).unwrap();
        let (back, lens) = a.finish().unwrap();
        assert_eq!(back, m);
        assert_eq!(lens, vec![1000; 9000]);
    }

    #[test]
    fn empty_blob_is_complete_after_its_root() {
        let m = manifest(0);
        let mut a = ManifestAssembler::new(m.id(), ManifestLimits::default());
        assert!(!a.is_complete());
        a.handle_root(&m.root.encode()).unwrap();
        let (back, lens) = a.finish().unwrap();
        assert_eq!(back, m);
        assert!(lens.is_empty());
    }
}
