//! Content-defined chunking: FastCDC v2020 (normalization level 1, gear seed 0).
//!
//! Chunk boundaries depend only on the bytes, never on how they were fed: a
//! cut is decided only over a window that reaches `max` bytes past the chunk
//! start, or the end of the input. Within such a window FastCDC's answer is a
//! function of the bytes alone, so any feeding (one buffer, 4 MiB slabs, one
//! byte at a time) yields the same chunks. `tests/chunker_golden.rs` pins the
//! exact boundaries and hashes so the chunker can never change silently.

use fastcdc::v2020::{self, Normalization};

use crate::hash::ChunkHash;

/// Parameters of the chunker, recorded in every manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkerParams {
    pub min_bytes: u32,
    pub avg_bytes: u32,
    pub max_bytes: u32,
}

/// Why a set of chunker parameters is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunker parameters {min}/{avg}/{max}: {why}")]
pub struct ChunkerParamsError {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    pub why: &'static str,
}

impl ChunkerParams {
    /// Default sizes, chosen with `vigo-perf delta` (see ARCHITECTURE.md,
    /// "Chunk size"): small enough that an upgraded image moves few bytes,
    /// large enough that per-chunk index and hashing overhead stays small.
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        min_bytes: 2 * 1024,
        avg_bytes: 8 * 1024,
        max_bytes: 32 * 1024,
    };

    /// Largest chunk any accepted parameter set may produce; bounds buffers
    /// that must hold a whole chunk.
    pub const MAX_CHUNK_BYTES_MAX: u32 = 4 * 1024 * 1024;

    /// Sets with `avg` as the average and the usual ¼× / 4× bounds.
    pub fn with_avg(avg_bytes: u32) -> Result<Self, ChunkerParamsError> {
        let params = ChunkerParams {
            min_bytes: avg_bytes / 4,
            avg_bytes,
            max_bytes: avg_bytes.saturating_mul(4),
        };
        params.validate()?;
        Ok(params)
    }

    pub fn validate(&self) -> Result<(), ChunkerParamsError> {
        let err = |why| ChunkerParamsError {
            min: self.min_bytes,
            avg: self.avg_bytes,
            max: self.max_bytes,
            why,
        };
        let (min, avg, max) = (
            self.min_bytes as usize,
            self.avg_bytes as usize,
            self.max_bytes as usize,
        );
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            return Err(err("min out of FastCDC's range 64 B..1 MiB"));
        }
        if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg) {
            return Err(err("avg out of FastCDC's range 256 B..4 MiB"));
        }
        if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) {
            return Err(err("max out of FastCDC's range 1 KiB..16 MiB"));
        }
        if self.max_bytes > Self::MAX_CHUNK_BYTES_MAX {
            return Err(err("max above the engine's 4 MiB chunk cap"));
        }
        if !(min < avg && avg < max) {
            return Err(err("need min < avg < max"));
        }
        if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            return Err(err("sizes must be even"));
        }
        Ok(())
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The cut function with its masks precomputed.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    pub fn new(params: ChunkerParams) -> Result<Self, ChunkerParamsError> {
        params.validate()?;
        let (mask_s, mask_l) =
            v2020::select_masks(params.avg_bytes as usize, Normalization::Level1);
        Ok(Chunker {
            params,
            mask_s,
            mask_l,
        })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Bytes past a chunk start that must be visible before a cut can be
    /// decided (unless the input ends first).
    pub fn window_bytes(&self) -> usize {
        self.params.max_bytes as usize
    }

    /// Length of the chunk starting at `window[0]`, or `None` when the window
    /// is too short to decide and more input may follow (`eof == false`).
    /// Returns `None` for an empty window at end of input.
    pub fn next_cut(&self, window: &[u8], eof: bool) -> Option<usize> {
        if window.is_empty() || (!eof && window.len() < self.window_bytes()) {
            return None;
        }
        let window = &window[..window.len().min(self.window_bytes())];
        let (_, len) = v2020::cut(
            window,
            self.params.min_bytes as usize,
            self.params.avg_bytes as usize,
            self.params.max_bytes as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        debug_assert!(len > 0 && len <= window.len());
        Some(len)
    }

    /// All chunk lengths of an in-memory input.
    pub fn cuts(&self, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(len) = self.next_cut(&data[start..], true) {
            out.push(len);
            start += len;
        }
        out
    }
}

/// A chunk found by [`StreamChunker`]: where it is and what it hashes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundChunk {
    pub offset: u64,
    pub len: u32,
    pub hash: ChunkHash,
}

/// Chunks a stream fed in pieces of any size, holding at most one window of
/// bytes. Used where input arrives incrementally and throughput is secondary
/// (tests, delta planning); the ingest pipeline uses [`Chunker::next_cut`]
/// directly over its slabs.
#[derive(Debug)]
pub struct StreamChunker {
    chunker: Chunker,
    pending: Vec<u8>,
    offset: u64,
}

impl StreamChunker {
    pub fn new(chunker: Chunker) -> Self {
        let capacity = 2 * chunker.window_bytes();
        StreamChunker {
            chunker,
            pending: Vec::with_capacity(capacity),
            offset: 0,
        }
    }

    /// Feeds `data`; calls `emit` for every chunk that is now decided.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(FoundChunk)) {
        let window = self.chunker.window_bytes();
        while !data.is_empty() {
            let take = (2 * window - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.drain(false, emit);
        }
    }

    /// Ends the stream, emitting the remaining chunks.
    pub fn finish(mut self, emit: &mut impl FnMut(FoundChunk)) {
        self.drain(true, emit);
    }

    fn drain(&mut self, eof: bool, emit: &mut impl FnMut(FoundChunk)) {
        let mut start = 0;
        while let Some(len) = self.chunker.next_cut(&self.pending[start..], eof) {
            let bytes = &self.pending[start..start + len];
            emit(FoundChunk {
                offset: self.offset,
                len: len as u32,
                hash: ChunkHash::of(bytes),
            });
            self.offset += len as u64;
            start += len;
        }
        self.pending.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

    #[test]
    fn matches_fastcdc_reference_iterator() {
        let data = pseudo_random(3 << 20, 7);
        let p = ChunkerParams::DEFAULT;
        let reference: Vec<usize> = v2020::FastCDC::new(
            &data,
            p.min_bytes as usize,
            p.avg_bytes as usize,
            p.max_bytes as usize,
        )
        .map(|c| c.length)
        .collect();
        assert_eq!(Chunker::new(p).unwrap().cuts(&data), reference);
    }

    #[test]
    fn rejects_bad_params() {
        assert!(ChunkerParams::with_avg(100).is_err());
        assert!(
            ChunkerParams {
                min_bytes: 4096,
                avg_bytes: 4096,
                max_bytes: 8192
            }
            .validate()
            .is_err()
        );
        assert!(ChunkerParams::with_avg(8 * 1024 * 1024).is_err());
        ChunkerParams::DEFAULT.validate().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn boundaries_independent_of_feed_sizes(
            len in 0usize..600_000,
            seed in any::<u64>(),
            feeds in prop::collection::vec(1usize..70_000, 1..40),
        ) {
            let data = pseudo_random(len, seed);
            let chunker = Chunker::new(ChunkerParams::with_avg(8192).unwrap()).unwrap();
            let whole: Vec<usize> = chunker.cuts(&data);

            let mut streamed = Vec::new();
            let mut stream = StreamChunker::new(chunker.clone());
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = feeds[i % feeds.len()].min(rest.len());
                stream.push(&rest[..n], &mut |c| streamed.push(c));
                rest = &rest[n..];
                i += 1;
            }
            stream.finish(&mut |c| streamed.push(c));
            let lens: Vec<usize> = streamed.iter().map(|c| c.len as usize).collect();
            prop_assert_eq!(&lens, &whole);
            let mut offset = 0u64;
            for c in &streamed {
                prop_assert_eq!(c.offset, offset);
                prop_assert_eq!(c.hash, ChunkHash::of(&data[offset as usize..offset as usize + c.len as usize]));
                offset += u64::from(c.len);
            }
            prop_assert_eq!(offset, len as u64);
        }
    }
}
