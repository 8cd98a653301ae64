//! The ingest pipeline: read, chunk, hash and write overlapped across cores.
//!
//! ```text
//!  reader ──slabs──▶ chunker ──chunk jobs──▶ chunk hasher ──▶ manifest pages (spool)
//!  (pread + content      (FastCDC cuts)        (BLAKE3 per chunk,
//!   BLAKE3, in order)                           ManifestBuilder)
//!     └──────slabs──────────────────────────▶ writer (uring or portable)
//! ```
//!
//! Memory is flat whatever the file size: a fixed pool of [`SLAB_BYTES`]
//! slabs carries the data (the reader blocks when all are in use), manifest
//! pages go to a spool file as they fill, and a chunk that straddles two
//! slabs is copied once into a buffer of at most two windows. Every stage
//! ends when its input channel closes; the first error stops the reader,
//! which closes everything downstream.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunker::Chunker;
use crate::hash::{ChunkHash, ContentHash};
use crate::io::{INGEST_SLABS, IoBackend, SLAB_BYTES, SlabWriter};
use crate::manifest::{ChunkEntry, ManifestBuilder, ManifestRoot};
use crate::sys::DIRECT_ALIGN;
use crate::sys::pool::{Slab, SlabPool};

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
    fn hash(&self) -> ChunkHash {
        match &self.bytes {
            ChunkBytes::InSlab(slab, start) => {
                ChunkHash::of(&slab[*start..*start + self.len as usize])
            }
            ChunkBytes::Copied(v) => ChunkHash::of(v),
        }
    }
}

/// Where the data goes.
pub(crate) struct Sink<'a> {
    pub file: &'a File,
    /// The file was opened for direct IO: writes must be whole blocks.
    pub direct: bool,
    pub backend: IoBackend,
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
    #[error("writing the manifest spool: {0}")]
    Spool(io::Error),
}

/// Chunks, hashes and writes `source` into `sink`; encoded manifest pages go
/// to `spool` as `[u32 LE length][page]` records.
pub(crate) fn ingest(
    source: &File,
    sink: Sink<'_>,
    chunker: &Chunker,
    spool: &mut File,
    progress: &AtomicU64,
) -> Result<Ingested, IngestError> {
    let pool = SlabPool::new(INGEST_SLABS, SLAB_BYTES);
    let mut writer = SlabWriter::new(sink.backend, &pool).map_err(IngestError::Write)?;
    let (to_chunker, chunker_rx) = bounded::<Block>(INGEST_SLABS);
    let (to_writer, writer_rx) = bounded::<Block>(INGEST_SLABS);
    let (to_hasher, hasher_rx) = bounded::<Vec<ChunkJob>>(INGEST_SLABS);

    std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_stage(source, &pool, to_chunker, to_writer, progress));
        let chunk_stage = scope.spawn(|| chunk_stage(chunker, chunker_rx, to_hasher));
        let writer_stage = scope.spawn(move || write_stage(&sink, &mut writer, writer_rx));
        let pages = hash_stage(chunker, hasher_rx, spool);

        let content = reader.join().expect("reader stage panicked");
        chunk_stage.join().expect("chunker stage panicked");
        let written = writer_stage.join().expect("writer stage panicked");
        // Report the root cause: a write failure (e.g. ENOSPC) closes the
        // reader's channel, which would otherwise surface as a read error.
        written?;
        let content = content?;
        let builder = pages?;
        let (last, root) = builder.finish(content);
        if let Some(page) = last {
            write_page(spool, &page.bytes).map_err(IngestError::Spool)?;
        }
        spool.flush().map_err(IngestError::Spool)?;
        Ok(Ingested { root })
    })
}

fn read_stage(
    source: &File,
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

fn hash_stage(
    chunker: &Chunker,
    batches: Receiver<Vec<ChunkJob>>,
    spool: &mut File,
) -> Result<ManifestBuilder, IngestError> {
    let mut builder = ManifestBuilder::new(chunker.params());
    let mut out = BufWriter::with_capacity(1 << 20, &mut *spool);
    for jobs in batches.iter() {
        for job in jobs {
            let entry = ChunkEntry {
                offset: job.offset,
                len: job.len,
                hash: job.hash(),
            };
            if let Some(page) = builder.push(entry) {
                write_page(&mut out, &page.bytes).map_err(IngestError::Spool)?;
            }
        }
    }
    out.flush().map_err(IngestError::Spool)?;
    Ok(builder)
}

fn write_page(out: &mut impl Write, page: &[u8]) -> io::Result<()> {
    out.write_all(&(page.len() as u32).to_le_bytes())?;
    out.write_all(page)
}

fn write_stage(
    sink: &Sink<'_>,
    writer: &mut SlabWriter,
    blocks: Receiver<Block>,
) -> Result<(), IngestError> {
    let mut end = 0u64;
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
        writer
            .write(sink.file, block.slab, write_len, block.offset)
            .map_err(IngestError::Write)?;
    }
    writer.drain().map_err(IngestError::Write)?;
    if sink.direct && !end.is_multiple_of(DIRECT_ALIGN) {
        // Drop the zero padding of the last direct write. The file is still
        // private to this ingest (not yet sealed or mapped), so this
        // truncation cannot pull pages from under a reader.
        sink.file.set_len(end).map_err(IngestError::Write)?;
    }
    Ok(())
}
