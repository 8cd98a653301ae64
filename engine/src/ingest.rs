//! The ingest pipeline: read, chunk, hash, write and index overlapped across cores.
//!
//! ```text
//!  reader ──slabs──▶ chunker ──chunk jobs──▶ chunk hasher ──pages──▶ page sink
//!  (pread + content      (FastCDC cuts)        (sys::hash_batch,       (index rows,
//!   BLAKE3, in order)                           ManifestBuilder)        unsynced)
//!     └──────slabs──────────────────────────▶ writer (uring or portable,
//!                                              allocates ahead, fsyncs at the end)
//! ```
//!
//! Memory is flat whatever the file size: a fixed pool of [`SLAB_BYTES`]
//! slabs carries the data (the reader blocks when all are in use), at most
//! [`PAGES_IN_FLIGHT`] manifest pages wait for the page sink, and a chunk
//! that straddles two slabs is copied once into a buffer of at most two
//! windows. Every stage ends when its input channel closes; the first error
//! stops the reader, which closes everything downstream.
//!
//! The page sink writes each page's index rows while the data is still being
//! written (see `Store::add_file`), so sealing the blob afterwards commits
//! only its record. The writer keeps the file's allocated size one pool of
//! slabs ahead of its writes: on ext4 a direct write that extends the file
//! waits for completion under the inode lock, one at a time, while writes
//! into allocated space run in parallel.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunker::Chunker;
use crate::hash::{ChunkHash, ContentHash};
use crate::io::{INGEST_SLABS, IoBackend, SLAB_BYTES, SlabWriter};
use crate::manifest::{ChunkEntry, EncodedPage, ManifestBuilder, ManifestRoot};
use crate::store::StoreError;
use crate::sys::DIRECT_ALIGN;
use crate::sys::hash_batch::hash_batch;
use crate::sys::pool::{Slab, SlabPool};

/// Manifest pages (4096 chunks each) queued between the hasher and the page
/// sink: enough to ride out one index commit, ~0.4 MiB each.
pub(crate) const PAGES_IN_FLIGHT: usize = 4;
/// Bytes the writer allocates ahead of its writes: what the slab pool can
/// have in flight, so no queued write extends the file.
const ALLOCATE_AHEAD_BYTES: u64 = (INGEST_SLABS * SLAB_BYTES) as u64;

/// A slab's worth of the input at a file offset.
struct Block {
    offset: u64,
    slab: Slab,
    /// A short read: nothing follows.
    last: bool,
}

/// Bytes of one chunk: inside one slab, or copied because it straddles two.
enum ChunkBytes {
    InSlab(Slab, usize),
    Copied(Vec<u8>),
}

struct ChunkJob {
    offset: u64,
    len: u32,
    bytes: ChunkBytes,
}

impl ChunkJob {
    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            ChunkBytes::InSlab(slab, start) => &slab[*start..*start + self.len as usize],
            ChunkBytes::Copied(v) => v,
        }
    }
}

/// Where the data goes.
pub(crate) struct Sink<'a> {
    pub file: &'a File,
    /// The file was opened for direct IO: writes must be whole blocks.
    pub direct: bool,
    pub backend: IoBackend,
    /// Expected size of the input (its size when opened): the writer does
    /// not allocate beyond it, bar one block of padding.
    pub expected_bytes: u64,
}

/// Receives the manifest pages of an ingest, in order, on a thread of its
/// own while the data is still being read, hashed and written.
pub(crate) trait PageSink: Send {
    fn page(&mut self, page: EncodedPage, entries: Vec<ChunkEntry>) -> Result<(), StoreError>;
    /// Every page has been delivered.
    fn finish(&mut self) -> Result<(), StoreError>;
}

pub(crate) struct Ingested {
    pub root: ManifestRoot,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error("reading the input: {0}")]
    Read(io::Error),
    #[error("writing the blob: {0}")]
    Write(io::Error),
    #[error("syncing the blob: {0}")]
    Sync(io::Error),
    #[error("indexing the blob: {0}")]
    Index(Box<StoreError>),
}

/// Chunks, hashes and writes `source` into `sink` and makes it durable
/// (fsync); manifest pages go to `pages` as they fill.
pub(crate) fn ingest(
    source: &File,
    sink: Sink<'_>,
    chunker: &Chunker,
    pages: &mut dyn PageSink,
    progress: &AtomicU64,
) -> Result<Ingested, IngestError> {
    let pool = SlabPool::new(INGEST_SLABS, SLAB_BYTES);
    let mut writer = SlabWriter::new(sink.backend, &pool).map_err(IngestError::Write)?;
    let (to_chunker, chunker_rx) = bounded::<Block>(INGEST_SLABS);
    let (to_writer, writer_rx) = bounded::<Block>(INGEST_SLABS);
    let (to_hasher, hasher_rx) = bounded::<Vec<ChunkJob>>(INGEST_SLABS);
    let (to_pages, pages_rx) = bounded::<(EncodedPage, Vec<ChunkEntry>)>(PAGES_IN_FLIGHT);

    let size = sink.expected_bytes;
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        // Named, so profiles and `top -H` show the stages.
        let stage = |name: &str| std::thread::Builder::new().name(format!("ingest-{name}"));
        let spawned = "spawning an ingest thread";
        let reader = stage("read")
            .spawn_scoped(scope, || {
                read_stage(source, size, &pool, to_chunker, to_writer, progress)
            })
            .expect(spawned);
        let chunk_stage = stage("chunk")
            .spawn_scoped(scope, || chunk_stage(chunker, chunker_rx, to_hasher))
            .expect(spawned);
        let writer_stage = stage("write")
            .spawn_scoped(scope, move || write_stage(&sink, &mut writer, writer_rx))
            .expect(spawned);
        let page_stage = stage("index")
            .spawn_scoped(scope, move || -> Result<(), StoreError> {
                for (page, entries) in pages_rx.iter() {
                    pages.page(page, entries)?;
                }
                pages.finish()
            })
            .expect(spawned);
        let hashed = hash_stage(chunker, hasher_rx, &to_pages);

        let content = reader.join().expect("reader stage panicked");
        chunk_stage.join().expect("chunker stage panicked");
        // The last page can only be cut once the reader is done (its
        // content hash completes the root); send it before waiting on the
        // writer, so indexing overlaps the last writes and the fsync.
        let finished = match (&content, hashed) {
            (Ok(content), Some((builder, entries))) => {
                let (last, root) = builder.finish(*content);
                let sent = match last {
                    Some(page) => to_pages.send((page, entries)).is_ok(),
                    None => true,
                };
                sent.then_some(root)
            }
            _ => None,
        };
        drop(to_pages);
        let hashed_s = started.elapsed().as_secs_f64();
        let indexed = page_stage.join().expect("page stage panicked");
        let indexed_s = started.elapsed().as_secs_f64();
        let written = writer_stage.join().expect("writer stage panicked");
        tracing::debug!(
            "ingest: hashed {hashed_s:.3}s, indexed {indexed_s:.3}s, durable {:.3}s",
            started.elapsed().as_secs_f64()
        );
        // Report the root cause: a write failure (e.g. ENOSPC) closes the
        // reader's channel, which would otherwise surface as a read error,
        // and a failed page sink stops the hasher.
        written?;
        indexed.map_err(|e| IngestError::Index(Box::new(e)))?;
        content?;
        let root = finished.expect("every stage succeeded, so the root was built");
        Ok(Ingested { root })
    })
}

/// Reads `source` (of `size` bytes when it was checked) into slabs for the
/// chunker and the writer, hashing the whole content. A file that grows
/// past `size` meanwhile is refused: the size was checked against the
/// store's cap and free space, and a user handing the daemon a file must
/// not get past those by appending to it.
fn read_stage(
    source: &File,
    size: u64,
    pool: &Arc<SlabPool>,
    to_chunker: Sender<Block>,
    to_writer: Sender<Block>,
    progress: &AtomicU64,
) -> Result<ContentHash, IngestError> {
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    loop {
        let mut lease = pool.lease();
        let buf = lease.as_mut_slice();
        let mut filled = 0;
        while filled < buf.len() {
            match source.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(IngestError::Read(e)),
            }
        }
        if offset + filled as u64 > size {
            return Err(IngestError::Read(io::Error::other(format!(
                "the file grew past the {size} bytes it had when the add began; \
                 add it again once it is complete"
            ))));
        }
        let last = filled < buf.len();
        // Direct writes cover whole blocks: zero the padding of the last one.
        let padded = (filled as u64).next_multiple_of(DIRECT_ALIGN) as usize;
        buf[filled..padded].fill(0);
        hasher.update(&buf[..filled]);
        if filled == 0 {
            break;
        }
        let slab = lease.freeze(filled);
        let block = |slab| Block { offset, slab, last };
        if to_writer.send(block(slab.clone())).is_err() || to_chunker.send(block(slab)).is_err() {
            // A later stage failed and will report why.
            break;
        }
        offset += filled as u64;
        progress.store(offset, Ordering::Relaxed);
        if last {
            break;
        }
    }
    Ok(ContentHash(*hasher.finalize().as_bytes()))
}

fn chunk_stage(chunker: &Chunker, blocks: Receiver<Block>, to_hasher: Sender<Vec<ChunkJob>>) {
    let window = chunker.window_bytes();
    // The previous block and where its undecided tail starts.
    let mut prev: Option<(Block, usize)> = None;
    for block in blocks.iter() {
        let mut jobs = Vec::new();
        let mut start = 0usize;
        if let Some((p, tail)) = prev.take() {
            // Chunks that begin in the previous block's tail: cut over a
            // scratch copy of the tail plus up to one window of this block.
            let head = block.slab.len().min(window);
            let mut scratch = Vec::with_capacity(p.slab.len() - tail + head);
            scratch.extend_from_slice(&p.slab[tail..]);
            scratch.extend_from_slice(&block.slab[..head]);
            let tail_len = p.slab.len() - tail;
            let eof = block.last && head == block.slab.len();
            let mut at = 0;
            while at < tail_len {
                let len = chunker
                    .next_cut(&scratch[at..], eof)
                    .expect("a full block follows the tail, so the window is complete");
                jobs.push(ChunkJob {
                    offset: p.offset + (tail + at) as u64,
                    len: len as u32,
                    bytes: ChunkBytes::Copied(scratch[at..at + len].to_vec()),
                });
                at += len;
            }
            start = at - tail_len;
        }
        let data = &block.slab[..];
        while let Some(len) = chunker.next_cut(&data[start..], block.last) {
            jobs.push(ChunkJob {
                offset: block.offset + start as u64,
                len: len as u32,
                bytes: ChunkBytes::InSlab(block.slab.clone(), start),
            });
            start += len;
        }
        if to_hasher.send(jobs).is_err() {
            return;
        }
        if start < data.len() {
            prev = Some((block, start));
        }
    }
    // Input ended on a full block: its tail is the final chunk(s).
    if let Some((p, mut tail)) = prev {
        let mut jobs = Vec::new();
        while let Some(len) = chunker.next_cut(&p.slab[tail..], true) {
            jobs.push(ChunkJob {
                offset: p.offset + tail as u64,
                len: len as u32,
                bytes: ChunkBytes::InSlab(p.slab.clone(), tail),
            });
            tail += len;
        }
        let _ = to_hasher.send(jobs);
    }
}

/// Hashes chunks and builds the manifest; full pages go to `pages` with
/// their entries. Returns the builder and the entries of its unfinished
/// page, or `None` when the page sink stopped (it reports why).
fn hash_stage(
    chunker: &Chunker,
    batches: Receiver<Vec<ChunkJob>>,
    pages: &Sender<(EncodedPage, Vec<ChunkEntry>)>,
) -> Option<(ManifestBuilder, Vec<ChunkEntry>)> {
    let mut builder = ManifestBuilder::new(chunker.params());
    let page_chunks = crate::manifest::PAGE_CHUNKS as usize;
    let mut entries = Vec::with_capacity(page_chunks);
    let mut hashes = Vec::new();
    for jobs in batches.iter() {
        // One slab's chunks at once: SIMD lanes across chunks (sys::hash_batch).
        let msgs: Vec<&[u8]> = jobs.iter().map(ChunkJob::bytes).collect();
        hashes.resize(msgs.len(), [0u8; 32]);
        hash_batch(&msgs, &mut hashes);
        for (job, hash) in jobs.iter().zip(&hashes) {
            let entry = ChunkEntry {
                offset: job.offset,
                len: job.len,
                hash: ChunkHash(*hash),
            };
            entries.push(entry);
            if let Some(page) = builder.push(entry) {
                let full = std::mem::replace(&mut entries, Vec::with_capacity(page_chunks));
                pages.send((page, full)).ok()?;
            }
        }
    }
    Some((builder, entries))
}

fn write_stage(
    sink: &Sink<'_>,
    writer: &mut SlabWriter,
    blocks: Receiver<Block>,
) -> Result<(), IngestError> {
    let mut end = 0u64;
    let expected = sink.expected_bytes.next_multiple_of(DIRECT_ALIGN);
    let mut allocated = 0u64;
    loop {
        // Never wait for input while holding completed writes: their slabs
        // are what the reader needs to make progress.
        let block = match blocks.try_recv() {
            Ok(b) => b,
            Err(crossbeam_channel::TryRecvError::Empty) if writer.in_flight() > 0 => {
                writer.reap_one().map_err(IngestError::Write)?;
                continue;
            }
            Err(crossbeam_channel::TryRecvError::Empty) => match blocks.recv() {
                Ok(b) => b,
                Err(_) => break,
            },
            Err(crossbeam_channel::TryRecvError::Disconnected) => break,
        };
        let len = block.slab.len();
        end = block.offset + len as u64;
        let write_len = if sink.direct {
            (len as u64).next_multiple_of(DIRECT_ALIGN) as usize
        } else {
            len
        };
        let write_end = block.offset + write_len as u64;
        if write_end > allocated {
            // Space for this write and the pool's worth after it. Also
            // where a full disk shows up (ENOSPC), before the data is sent.
            let upto = (allocated + ALLOCATE_AHEAD_BYTES)
                .min(expected)
                .max(write_end);
            crate::sys::allocate(sink.file, allocated, upto - allocated)
                .map_err(IngestError::Write)?;
            allocated = upto;
        }
        writer
            .write(sink.file, block.slab, write_len, block.offset)
            .map_err(IngestError::Write)?;
    }
    writer.drain().map_err(IngestError::Write)?;
    if allocated != end {
        // Drop the zero padding of the last direct write and any space
        // allocated for input that did not come (the file shrank). The file
        // is still private to this ingest (not yet sealed or mapped), so
        // this truncation cannot pull pages from under a reader.
        sink.file.set_len(end).map_err(IngestError::Write)?;
    }
    sink.file.sync_all().map_err(IngestError::Sync)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader stops at the size the add checked: a file that grew past
    /// it meanwhile is refused; one of that size goes through whole.
    #[test]
    fn a_file_larger_than_its_checked_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input");
        let len = SLAB_BYTES + 1000;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let source = File::open(&path).unwrap();
        let read = |size: u64| {
            let pool = SlabPool::new(INGEST_SLABS, SLAB_BYTES);
            let (to_chunker, chunks) = bounded::<Block>(INGEST_SLABS);
            let (to_writer, writes) = bounded::<Block>(INGEST_SLABS);
            let count = |rx: Receiver<Block>| {
                std::thread::spawn(move || rx.iter().map(|b| b.slab.len() as u64).sum::<u64>())
            };
            let (chunked, written) = (count(chunks), count(writes));
            let r = read_stage(
                &source,
                size,
                &pool,
                to_chunker,
                to_writer,
                &AtomicU64::new(0),
            );
            let bytes = chunked.join().unwrap();
            assert_eq!(
                written.join().unwrap(),
                bytes,
                "both stages get every block"
            );
            (r, bytes)
        };
        let (whole, bytes) = read(len as u64);
        assert_eq!(whole.unwrap().0, *blake3::hash(&vec![7u8; len]).as_bytes());
        assert_eq!(bytes, len as u64);
        match read(len as u64 - 1).0 {
            Err(IngestError::Read(e)) => assert!(e.to_string().contains("grew"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
