//! Manifests: what a blob is made of, in a canonical, versioned binary form.
//!
//! A manifest is a *root* plus *pages*. Each page lists up to
//! [`PAGE_CHUNKS`] chunks as (offset, length, BLAKE3); the root carries the
//! chunker parameters, the total size, the whole-content BLAKE3 and one
//! descriptor (offset, length, chunk count, hash) per page. The blob id is the
//! keyed BLAKE3 of the root, so a receiver that knows only the id can verify
//! the root, then every page as it arrives, before the next one — a 100 GiB
//! blob's manifest never has to be held, or trusted, whole. The byte layout is
//! documented in `docs/manifest-format.md`.
//!
//! Decoding is total: any byte string yields a value or a [`ManifestError`],
//! and every count is checked against the configured [`ManifestLimits`] and the
//! exact input length before anything is allocated.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::chunker::ChunkerParams;
use crate::hash::{BlobId, ChunkHash, ContentHash, HASH_BYTES};

pub const MANIFEST_FORMAT_VERSION: u8 = 1;
pub const HASH_ALG_BLAKE3: u8 = 1;
/// FastCDC v2020, normalization level 1, gear seed 0.
pub const CHUNKER_FASTCDC_2020: u8 = 1;
/// Chunks per page; every page but the last is full, which keeps paging canonical.
pub const PAGE_CHUNKS: u32 = 4096;

const ROOT_MAGIC: [u8; 4] = *b"VGMR";
const PAGE_MAGIC: [u8; 4] = *b"VGMP";
const ROOT_CONTEXT: &str = "vigo manifest root v1";
const PAGE_CONTEXT: &str = "vigo manifest page v1";

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RootHeader {
    magic: [u8; 4],
    format_version: u8,
    hash_alg: u8,
    chunker: u8,
    reserved0: u8,
    chunk_min: U32,
    chunk_avg: U32,
    chunk_max: U32,
    page_chunks: U32,
    total_bytes: U64,
    chunk_count: U64,
    content_blake3: [u8; HASH_BYTES],
    page_count: U32,
    reserved1: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct PageRefRaw {
    first_offset: U64,
    byte_len: U64,
    chunk_count: U32,
    hash: [u8; HASH_BYTES],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct PageHeader {
    magic: [u8; 4],
    format_version: u8,
    hash_alg: u8,
    reserved: [u8; 2],
    page_index: U32,
    chunk_count: U32,
    first_offset: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct EntryRaw {
    offset: U64,
    len: U32,
    hash: [u8; HASH_BYTES],
}

pub const ROOT_HEADER_BYTES: usize = size_of::<RootHeader>();
pub const PAGE_REF_BYTES: usize = size_of::<PageRefRaw>();
pub const PAGE_HEADER_BYTES: usize = size_of::<PageHeader>();
pub const ENTRY_BYTES: usize = size_of::<EntryRaw>();
const _: () = assert!(ROOT_HEADER_BYTES == 80);
const _: () = assert!(PAGE_REF_BYTES == 52);
const _: () = assert!(PAGE_HEADER_BYTES == 24);
const _: () = assert!(ENTRY_BYTES == 44);

/// Hash of one encoded manifest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageHash(pub [u8; HASH_BYTES]);

/// One chunk of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    pub offset: u64,
    pub len: u32,
    pub hash: ChunkHash,
}

impl ChunkEntry {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The root's description of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    pub first_offset: u64,
    pub byte_len: u64,
    pub chunk_count: u32,
    pub hash: PageHash,
}

/// Caps applied when decoding untrusted manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestLimits {
    /// Largest blob accepted, in bytes.
    pub total_bytes_max: u64,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        ManifestLimits {
            total_bytes_max: 4 << 40,
        }
    }
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest truncated or of the wrong length: {0}")]
    Length(&'static str),
    #[error("not a manifest {0} (bad magic)")]
    Magic(&'static str),
    #[error("manifest format version {0} is not supported (this build reads version 1)")]
    Version(u8),
    #[error("unsupported algorithm in manifest: {0}")]
    Algorithm(&'static str),
    #[error("blob of {total} bytes exceeds the configured cap of {cap} bytes")]
    TooLarge { total: u64, cap: u64 },
    #[error("inconsistent manifest: {0}")]
    Inconsistent(&'static str),
    #[error("manifest {0} does not match its hash")]
    HashMismatch(&'static str),
    #[error(transparent)]
    Params(#[from] crate::chunker::ChunkerParamsError),
}

/// The decoded root of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRoot {
    pub params: ChunkerParams,
    pub total_bytes: u64,
    pub chunk_count: u64,
    pub content_hash: ContentHash,
    pub pages: Vec<PageRef>,
}

impl ManifestRoot {
    /// Id of the blob this root describes (hash of its canonical encoding).
    pub fn id(&self) -> BlobId {
        blob_id_of(&self.encode())
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = RootHeader {
            magic: ROOT_MAGIC,
            format_version: MANIFEST_FORMAT_VERSION,
            hash_alg: HASH_ALG_BLAKE3,
            chunker: CHUNKER_FASTCDC_2020,
            reserved0: 0,
            chunk_min: self.params.min_bytes.into(),
            chunk_avg: self.params.avg_bytes.into(),
            chunk_max: self.params.max_bytes.into(),
            page_chunks: PAGE_CHUNKS.into(),
            total_bytes: self.total_bytes.into(),
            chunk_count: self.chunk_count.into(),
            content_blake3: self.content_hash.0,
            page_count: (self.pages.len() as u32).into(),
            reserved1: 0.into(),
        };
        let mut out = Vec::with_capacity(ROOT_HEADER_BYTES + self.pages.len() * PAGE_REF_BYTES);
        out.extend_from_slice(header.as_bytes());
        for page in &self.pages {
            let raw = PageRefRaw {
                first_offset: page.first_offset.into(),
                byte_len: page.byte_len.into(),
                chunk_count: page.chunk_count.into(),
                hash: page.hash.0,
            };
            out.extend_from_slice(raw.as_bytes());
        }
        out
    }

    /// Decodes a root whose bytes must hash to `id`.
    pub fn decode_verified(
        bytes: &[u8],
        id: &BlobId,
        limits: &ManifestLimits,
    ) -> Result<Self, ManifestError> {
        if blob_id_of(bytes) != *id {
            return Err(ManifestError::HashMismatch("root"));
        }
        Self::decode(bytes, limits)
    }

    /// Decodes and checks a root. Total: never panics, allocates only after
    /// the page count has been checked against the input length and limits.
    pub fn decode(bytes: &[u8], limits: &ManifestLimits) -> Result<Self, ManifestError> {
        let (header, rest) = RootHeader::read_from_prefix(bytes)
            .map_err(|_| ManifestError::Length("root header"))?;
        if header.magic != ROOT_MAGIC {
            return Err(ManifestError::Magic("root"));
        }
        if header.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::Version(header.format_version));
        }
        if header.hash_alg != HASH_ALG_BLAKE3 {
            return Err(ManifestError::Algorithm("hash is not BLAKE3"));
        }
        if header.chunker != CHUNKER_FASTCDC_2020 {
            return Err(ManifestError::Algorithm("chunker is not FastCDC v2020"));
        }
        if header.reserved0 != 0 || header.reserved1.get() != 0 {
            return Err(ManifestError::Inconsistent("reserved bytes are not zero"));
        }
        if header.page_chunks.get() != PAGE_CHUNKS {
            return Err(ManifestError::Inconsistent("page size is not 4096 chunks"));
        }
        let params = ChunkerParams {
            min_bytes: header.chunk_min.get(),
            avg_bytes: header.chunk_avg.get(),
            max_bytes: header.chunk_max.get(),
        };
        params.validate()?;
        let total = header.total_bytes.get();
        if total > limits.total_bytes_max {
            return Err(ManifestError::TooLarge {
                total,
                cap: limits.total_bytes_max,
            });
        }
        let chunk_count = header.chunk_count.get();
        let (fewest, most) = chunk_count_bounds(total, &params);
        if chunk_count < fewest || chunk_count > most {
            return Err(ManifestError::Inconsistent(
                "chunk count impossible for the size and chunker",
            ));
        }
        let page_count = header.page_count.get();
        if u64::from(page_count) != chunk_count.div_ceil(u64::from(PAGE_CHUNKS)) {
            return Err(ManifestError::Inconsistent(
                "page count does not match chunk count",
            ));
        }
        if rest.len() as u64 != u64::from(page_count) * PAGE_REF_BYTES as u64 {
            return Err(ManifestError::Length("page list"));
        }
        let raws =
            <[PageRefRaw]>::ref_from_bytes(rest).map_err(|_| ManifestError::Length("page list"))?;
        let mut pages = Vec::with_capacity(raws.len());
        let mut offset = 0u64;
        let mut chunks_left = chunk_count;
        for raw in raws {
            let count = raw.chunk_count.get();
            let expected = chunks_left.min(u64::from(PAGE_CHUNKS));
            if u64::from(count) != expected {
                return Err(ManifestError::Inconsistent("page chunk count"));
            }
            if raw.first_offset.get() != offset {
                return Err(ManifestError::Inconsistent("pages are not contiguous"));
            }
            let byte_len = raw.byte_len.get();
            if byte_len < u64::from(count)
                || byte_len > u64::from(count) * u64::from(params.max_bytes)
            {
                return Err(ManifestError::Inconsistent("page byte length"));
            }
            offset = offset
                .checked_add(byte_len)
                .ok_or(ManifestError::Inconsistent("page offsets overflow"))?;
            chunks_left -= u64::from(count);
            pages.push(PageRef {
                first_offset: raw.first_offset.get(),
                byte_len,
                chunk_count: count,
                hash: PageHash(raw.hash),
            });
        }
        if offset != total {
            return Err(ManifestError::Inconsistent(
                "page lengths do not sum to the total",
            ));
        }
        Ok(ManifestRoot {
            params,
            total_bytes: total,
            chunk_count,
            content_hash: ContentHash(header.content_blake3),
            pages,
        })
    }

    /// Decodes page `index`, checking its hash against the root first.
    pub fn decode_page(
        &self,
        index: usize,
        bytes: &[u8],
    ) -> Result<Vec<ChunkEntry>, ManifestError> {
        let page_ref = self
            .pages
            .get(index)
            .ok_or(ManifestError::Inconsistent("page index beyond the root"))?;
        if page_hash_of(bytes) != page_ref.hash {
            return Err(ManifestError::HashMismatch("page"));
        }
        let last_page = index + 1 == self.pages.len();
        decode_page_body(bytes, index as u32, page_ref, &self.params, last_page)
    }
}

/// Entry `slot` of an encoded page, read without decoding or checking the
/// rest (entries are fixed-width); `None` when the bytes are too short to
/// hold it. For lookups that check what they find by its hash.
pub fn page_entry(page: &[u8], slot: usize) -> Option<ChunkEntry> {
    let at = PAGE_HEADER_BYTES.checked_add(slot.checked_mul(ENTRY_BYTES)?)?;
    let raw = EntryRaw::read_from_prefix(page.get(at..)?).ok()?.0;
    Some(ChunkEntry::from(&raw))
}

impl From<&EntryRaw> for ChunkEntry {
    fn from(raw: &EntryRaw) -> Self {
        ChunkEntry {
            offset: raw.offset.get(),
            len: raw.len.get(),
            hash: ChunkHash(raw.hash),
        }
    }
}

fn chunk_count_bounds(total: u64, params: &ChunkerParams) -> (u64, u64) {
    if total == 0 {
        return (0, 0);
    }
    let fewest = total.div_ceil(u64::from(params.max_bytes));
    // Every chunk but the last is at least `min` bytes.
    let most = total / u64::from(params.min_bytes) + 1;
    (fewest, most)
}

fn decode_page_body(
    bytes: &[u8],
    index: u32,
    page_ref: &PageRef,
    params: &ChunkerParams,
    last_page: bool,
) -> Result<Vec<ChunkEntry>, ManifestError> {
    let (header, rest) =
        PageHeader::read_from_prefix(bytes).map_err(|_| ManifestError::Length("page header"))?;
    if header.magic != PAGE_MAGIC {
        return Err(ManifestError::Magic("page"));
    }
    if header.format_version != MANIFEST_FORMAT_VERSION {
        return Err(ManifestError::Version(header.format_version));
    }
    if header.hash_alg != HASH_ALG_BLAKE3 {
        return Err(ManifestError::Algorithm("hash is not BLAKE3"));
    }
    if header.reserved != [0, 0] {
        return Err(ManifestError::Inconsistent("reserved bytes are not zero"));
    }
    if header.page_index.get() != index
        || header.chunk_count.get() != page_ref.chunk_count
        || header.first_offset.get() != page_ref.first_offset
    {
        return Err(ManifestError::Inconsistent(
            "page header disagrees with the root",
        ));
    }
    if rest.len() != page_ref.chunk_count as usize * ENTRY_BYTES {
        return Err(ManifestError::Length("page entries"));
    }
    let raws =
        <[EntryRaw]>::ref_from_bytes(rest).map_err(|_| ManifestError::Length("page entries"))?;
    let mut entries = Vec::with_capacity(raws.len());
    let mut offset = page_ref.first_offset;
    for (i, raw) in raws.iter().enumerate() {
        let len = raw.len.get();
        let last_chunk = last_page && i + 1 == raws.len();
        if raw.offset.get() != offset {
            return Err(ManifestError::Inconsistent(
                "chunk offsets are not contiguous",
            ));
        }
        if len == 0 || len > params.max_bytes || (len < params.min_bytes && !last_chunk) {
            return Err(ManifestError::Inconsistent(
                "chunk length outside the chunker's bounds",
            ));
        }
        offset += u64::from(len);
        entries.push(ChunkEntry::from(raw));
    }
    if offset - page_ref.first_offset != page_ref.byte_len {
        return Err(ManifestError::Inconsistent(
            "chunk lengths do not sum to the page length",
        ));
    }
    Ok(entries)
}

pub fn blob_id_of(root_bytes: &[u8]) -> BlobId {
    let mut hasher = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    hasher.update(root_bytes);
    BlobId(*hasher.finalize().as_bytes())
}

pub fn page_hash_of(page_bytes: &[u8]) -> PageHash {
    let mut hasher = blake3::Hasher::new_derive_key(PAGE_CONTEXT);
    hasher.update(page_bytes);
    PageHash(*hasher.finalize().as_bytes())
}

/// One encoded page and its descriptor.
#[derive(Clone, Debug)]
pub struct EncodedPage {
    pub index: u32,
    pub page_ref: PageRef,
    pub bytes: Vec<u8>,
}

/// Encodes entries as page `index`.
pub fn encode_page(index: u32, entries: &[ChunkEntry]) -> EncodedPage {
    assert!(!entries.is_empty() && entries.len() <= PAGE_CHUNKS as usize);
    let first_offset = entries[0].offset;
    let header = PageHeader {
        magic: PAGE_MAGIC,
        format_version: MANIFEST_FORMAT_VERSION,
        hash_alg: HASH_ALG_BLAKE3,
        reserved: [0, 0],
        page_index: index.into(),
        chunk_count: (entries.len() as u32).into(),
        first_offset: first_offset.into(),
    };
    let mut bytes = Vec::with_capacity(PAGE_HEADER_BYTES + entries.len() * ENTRY_BYTES);
    bytes.extend_from_slice(header.as_bytes());
    for e in entries {
        let raw = EntryRaw {
            offset: e.offset.into(),
            len: e.len.into(),
            hash: e.hash.0,
        };
        bytes.extend_from_slice(raw.as_bytes());
    }
    let last = entries[entries.len() - 1];
    EncodedPage {
        index,
        page_ref: PageRef {
            first_offset,
            byte_len: last.end() - first_offset,
            chunk_count: entries.len() as u32,
            hash: page_hash_of(&bytes),
        },
        bytes,
    }
}

/// Builds a manifest incrementally, holding at most one page of entries.
#[derive(Debug)]
pub struct ManifestBuilder {
    params: ChunkerParams,
    pending: Vec<ChunkEntry>,
    pages: Vec<PageRef>,
    next_offset: u64,
    chunk_count: u64,
}

impl ManifestBuilder {
    pub fn new(params: ChunkerParams) -> Self {
        ManifestBuilder {
            params,
            pending: Vec::with_capacity(PAGE_CHUNKS as usize),
            pages: Vec::new(),
            next_offset: 0,
            chunk_count: 0,
        }
    }

    /// Appends the next chunk; returns a page when one fills up.
    pub fn push(&mut self, entry: ChunkEntry) -> Option<EncodedPage> {
        assert_eq!(
            entry.offset, self.next_offset,
            "chunks must be pushed in order"
        );
        assert!(entry.len > 0 && entry.len <= self.params.max_bytes);
        self.next_offset = entry.end();
        self.chunk_count += 1;
        self.pending.push(entry);
        if self.pending.len() == PAGE_CHUNKS as usize {
            Some(self.flush_page())
        } else {
            None
        }
    }

    fn flush_page(&mut self) -> EncodedPage {
        let page = encode_page(self.pages.len() as u32, &self.pending);
        self.pages.push(page.page_ref);
        self.pending.clear();
        page
    }

    /// Ends the manifest: the last partial page (if any) and the root.
    pub fn finish(mut self, content_hash: ContentHash) -> (Option<EncodedPage>, ManifestRoot) {
        let last = (!self.pending.is_empty()).then(|| self.flush_page());
        let root = ManifestRoot {
            params: self.params,
            total_bytes: self.next_offset,
            chunk_count: self.chunk_count,
            content_hash,
            pages: self.pages,
        };
        (last, root)
    }
}

/// A whole manifest in memory: convenient for tests, small blobs and the
/// in-memory store; large blobs are handled page by page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub root: ManifestRoot,
    pub pages: Vec<Vec<u8>>,
}

impl Manifest {
    pub fn from_entries(
        params: ChunkerParams,
        content_hash: ContentHash,
        entries: &[ChunkEntry],
    ) -> Self {
        let mut builder = ManifestBuilder::new(params);
        let mut pages = Vec::new();
        for e in entries {
            if let Some(p) = builder.push(*e) {
                pages.push(p.bytes);
            }
        }
        let (last, root) = builder.finish(content_hash);
        pages.extend(last.map(|p| p.bytes));
        Manifest { root, pages }
    }

    pub fn id(&self) -> BlobId {
        self.root.id()
    }

    /// Every chunk entry, decoding (and checking) each page.
    pub fn entries(&self) -> Result<Vec<ChunkEntry>, ManifestError> {
        let mut out = Vec::new();
        for (i, page) in self.pages.iter().enumerate() {
            out.extend(self.root.decode_page(i, page)?);
        }
        Ok(out)
    }

    /// A single self-delimiting byte string: root length (u32 LE), root,
    /// then each page as length (u32 LE) and bytes. Used to hand a whole
    /// manifest to a file or another process.
    pub fn to_bundle(&self) -> Vec<u8> {
        let root = self.root.encode();
        let mut out = Vec::new();
        out.extend_from_slice(&(root.len() as u32).to_le_bytes());
        out.extend_from_slice(&root);
        for p in &self.pages {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    /// Decodes and fully verifies a bundle written by [`Manifest::to_bundle`].
    pub fn from_bundle(bytes: &[u8], limits: &ManifestLimits) -> Result<Self, ManifestError> {
        let mut rest = bytes;
        let mut take = |what: &'static str| -> Result<&[u8], ManifestError> {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or(ManifestError::Length(what))?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(ManifestError::Length(what));
            }
            let (item, tail) = tail.split_at(len);
            rest = tail;
            Ok(item)
        };
        let root = ManifestRoot::decode(take("bundle root")?, limits)?;
        let mut pages = Vec::with_capacity(root.pages.len());
        for i in 0..root.pages.len() {
            let page = take("bundle page")?;
            root.decode_page(i, page)?;
            pages.push(page.to_vec());
        }
        if !rest.is_empty() {
            return Err(ManifestError::Length("trailing bytes after the last page"));
        }
        Ok(Manifest { root, pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries_from_lens(lens: &[u32]) -> Vec<ChunkEntry> {
        let mut offset = 0;
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let e = ChunkEntry {
                    offset,
                    len,
                    hash: ChunkHash(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes()),
                };
                offset += u64::from(len);
                e
            })
            .collect()
    }

    fn small_params() -> ChunkerParams {
        ChunkerParams::with_avg(1024).unwrap()
    }

    #[test]
    fn empty_blob_has_no_pages() {
        let m = Manifest::from_entries(small_params(), ContentHash([0; 32]), &[]);
        assert_eq!(m.root.chunk_count, 0);
        assert!(m.pages.is_empty());
        let back = Manifest::from_bundle(&m.to_bundle(), &ManifestLimits::default()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn rejects_oversized_total_before_allocating() {
        let lens = vec![2048u32; 10];
        let m = Manifest::from_entries(
            small_params(),
            ContentHash([1; 32]),
            &entries_from_lens(&lens),
        );
        let limits = ManifestLimits {
            total_bytes_max: 1000,
        };
        assert!(matches!(
            ManifestRoot::decode(&m.root.encode(), &limits),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn detects_tampered_page() {
        let lens = vec![1500u32; 5000];
        let m = Manifest::from_entries(
            small_params(),
            ContentHash([1; 32]),
            &entries_from_lens(&lens),
        );
        assert_eq!(m.pages.len(), 2);
        let mut bundle = m.to_bundle();
        let n = bundle.len();
        bundle[n - 1] ^= 1;
        assert_eq!(
            Manifest::from_bundle(&bundle, &ManifestLimits::default()),
            Err(ManifestError::HashMismatch("page"))
        );
        let root = m.root.encode();
        assert!(ManifestRoot::decode_verified(&root, &m.id(), &ManifestLimits::default()).is_ok());
        let mut bad = root.clone();
        bad[30] ^= 1;
        assert!(ManifestRoot::decode_verified(&bad, &m.id(), &ManifestLimits::default()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip(lens in prop::collection::vec(256u32..=4096, 0..9000), last in 1u32..256, content in any::<[u8; 32]>()) {
            let mut lens = lens;
            lens.push(last);
            let params = small_params();
            let entries = entries_from_lens(&lens);
            let m = Manifest::from_entries(params, ContentHash(content), &entries);
            let decoded = Manifest::from_bundle(&m.to_bundle(), &ManifestLimits::default()).unwrap();
            prop_assert_eq!(&decoded, &m);
            prop_assert_eq!(decoded.entries().unwrap(), entries);
            prop_assert_eq!(decoded.root.total_bytes, lens.iter().map(|&l| u64::from(l)).sum::<u64>());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let limits = ManifestLimits::default();
            let _ = ManifestRoot::decode(&bytes, &limits);
            let _ = Manifest::from_bundle(&bytes, &limits);
        }

        #[test]
        fn mutated_manifests_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let lens = vec![1024u32; 4100];
            let m = Manifest::from_entries(small_params(), ContentHash([3; 32]), &entries_from_lens(&lens));
            let mut root = m.root.encode();
            for (i, v) in &flips {
                let at = i.index(root.len());
                root[at] = *v;
            }
            if let Ok(r) = ManifestRoot::decode(&root, &ManifestLimits::default()) {
                for (i, p) in m.pages.iter().enumerate() {
                    let _ = r.decode_page(i, p);
                }
            }
        }
    }
}
