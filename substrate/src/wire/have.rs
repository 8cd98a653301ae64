//! Have-maps: which chunks of a blob a peer holds, compactly.
//!
//! A `Have` frame describes one *window* of chunk indices
//! `first_chunk..first_chunk + span_chunks` and **replaces** what the
//! receiver believed about that window; chunks outside it are unchanged.
//! Before any `Have` a peer is assumed to hold nothing. So a sealed blob is
//! announced with one 52-byte frame (`All` over every chunk), a partial blob
//! with one window per manifest page (4096 chunks), and a newly verified
//! chunk with a one-chunk `All` window.
//!
//! Three encodings, chosen by size when building ([`HaveBuf::from_ranges`]):
//! - `All`: no body, the whole window is held.
//! - `Runs`: sorted, non-overlapping `(first u64, count u32)` runs, 12 bytes
//!   each: best when held chunks are clustered.
//! - `Bitmap`: one bit per chunk of the window, least significant bit first
//!   (like the store's presence bits): best when they are scattered. A page
//!   window is at most 512 bytes.

use std::ops::Range;

use engine::hash::BlobId;

use super::frame::WireRun;

/// A decoded (or to-be-encoded) have-map window; borrows its runs or bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaveMap<'a> {
    pub blob: BlobId,
    pub first_chunk: u64,
    pub span_chunks: u64,
    pub held: Held<'a>,
}

/// The held chunks of a window, in one of the three encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held<'a> {
    /// Sorted, non-overlapping runs of absolute chunk indices, inside the
    /// window (adjacent runs are allowed: a run counts at most 2³²−1 chunks).
    Runs(&'a [WireRun]),
    /// Every chunk of the window.
    All,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) is chunk `first_chunk + i`;
    /// exactly `ceil(span / 8)` bytes, padding bits zero.
    Bitmap(&'a [u8]),
}

impl<'a> HaveMap<'a> {
    /// A window held entirely.
    pub fn all(blob: BlobId, first_chunk: u64, span_chunks: u64) -> HaveMap<'static> {
        HaveMap {
            blob,
            first_chunk,
            span_chunks,
            held: Held::All,
        }
    }

    /// The chunk indices this map speaks about.
    pub fn window(&self) -> Range<u64> {
        self.first_chunk..self.first_chunk.saturating_add(self.span_chunks)
    }

    /// Held chunks as ascending, non-overlapping ranges (adjacent ranges are
    /// possible in the `Runs` encoding).
    pub fn held_runs(&self) -> HeldRuns<'a> {
        let inner = match self.held {
            Held::Runs(runs) => Inner::Runs(runs.iter()),
            Held::All => Inner::All((self.span_chunks > 0).then(|| self.window())),
            Held::Bitmap(bytes) => Inner::Bitmap {
                bytes,
                first_chunk: self.first_chunk,
                span: self.span_chunks.min(bytes.len() as u64 * 8),
                pos: 0,
            },
        };
        HeldRuns { inner }
    }

    /// How many chunks of the window are held.
    pub fn held_chunks(&self) -> u64 {
        self.held_runs().map(|r| r.end - r.start).sum()
    }

    /// Whether chunk `index` is held according to this map.
    pub fn contains(&self, index: u64) -> bool {
        if !self.window().contains(&index) {
            return false;
        }
        match self.held {
            Held::All => true,
            Held::Runs(runs) => {
                let at = runs.partition_point(|r| r.end() <= index);
                runs.get(at).is_some_and(|r| r.first() <= index)
            }
            Held::Bitmap(bytes) => bit(bytes, index - self.first_chunk),
        }
    }
}

fn bit(bytes: &[u8], i: u64) -> bool {
    usize::try_from(i / 8)
        .ok()
        .and_then(|at| bytes.get(at))
        .is_some_and(|b| b >> (i % 8) & 1 == 1)
}

/// Iterator over the held ranges of a [`HaveMap`].
#[derive(Clone, Debug)]
pub struct HeldRuns<'a> {
    inner: Inner<'a>,
}

#[derive(Clone, Debug)]
enum Inner<'a> {
    Runs(std::slice::Iter<'a, WireRun>),
    All(Option<Range<u64>>),
    Bitmap {
        bytes: &'a [u8],
        first_chunk: u64,
        span: u64,
        pos: u64,
    },
}

impl Iterator for HeldRuns<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        match &mut self.inner {
            Inner::Runs(it) => it.next().map(|r| r.first()..r.end()),
            Inner::All(r) => r.take(),
            Inner::Bitmap {
                bytes,
                first_chunk,
                span,
                pos,
            } => {
                let byte_at = |i: u64| bytes.get((i / 8) as usize).copied().unwrap_or(0);
                let mut i = *pos;
                // Skip clear bits, a whole zero byte at a time where aligned.
                while i < *span {
                    let b = byte_at(i);
                    if i % 8 == 0 && b == 0 {
                        i += 8;
                    } else if b >> (i % 8) & 1 == 1 {
                        break;
                    } else {
                        i += 1;
                    }
                }
                if i >= *span {
                    *pos = *span;
                    return None;
                }
                let start = i;
                while i < *span {
                    let b = byte_at(i);
                    if i % 8 == 0 && b == 0xff {
                        i += 8;
                    } else if b >> (i % 8) & 1 == 0 {
                        break;
                    } else {
                        i += 1;
                    }
                }
                let end = i.min(*span);
                *pos = end;
                Some(*first_chunk + start..*first_chunk + end)
            }
        }
    }
}

/// An owned have-map window, built from held ranges in the smallest
/// encoding; [`HaveBuf::as_map`] lends it to the encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaveBuf {
    blob: BlobId,
    first_chunk: u64,
    span_chunks: u64,
    held: HeldBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HeldBuf {
    Runs(Vec<WireRun>),
    All,
    Bitmap(Vec<u8>),
}

impl HaveBuf {
    /// The window `first_chunk..first_chunk + span_chunks` holding exactly
    /// `held` (ascending, non-overlapping ranges inside the window; adjacent
    /// ones are merged). Picks `All`, `Runs` or `Bitmap`, whichever is
    /// smallest. The input is local data: violating its order is a bug and
    /// panics.
    pub fn from_ranges(
        blob: BlobId,
        first_chunk: u64,
        span_chunks: u64,
        held: impl IntoIterator<Item = Range<u64>>,
    ) -> HaveBuf {
        let end = first_chunk
            .checked_add(span_chunks)
            .expect("have window overflows u64");
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in held {
            assert!(
                first_chunk <= r.start && r.start <= r.end && r.end <= end,
                "held range {r:?} outside the window {first_chunk}..{end}"
            );
            if r.is_empty() {
                continue;
            }
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                Some(last) => {
                    assert!(last.end < r.start, "held ranges must ascend");
                    merged.push(r);
                }
                None => merged.push(r),
            }
        }
        let held = if merged.len() == 1 && merged[0] == (first_chunk..end) {
            HeldBuf::All
        } else {
            let runs_needed: u64 = merged
                .iter()
                .map(|r| (r.end - r.start).div_ceil(u64::from(u32::MAX)))
                .sum();
            let bitmap_bytes = span_chunks.div_ceil(8);
            if runs_needed * 12 <= bitmap_bytes {
                let mut runs = Vec::with_capacity(runs_needed as usize);
                for r in merged {
                    let mut at = r.start;
                    while at < r.end {
                        let count = (r.end - at).min(u64::from(u32::MAX));
                        runs.push(WireRun::new(at, count as u32));
                        at += count;
                    }
                }
                HeldBuf::Runs(runs)
            } else {
                let mut bits = vec![0u8; bitmap_bytes as usize];
                for r in merged {
                    for i in r.start - first_chunk..r.end - first_chunk {
                        bits[(i / 8) as usize] |= 1 << (i % 8);
                    }
                }
                HeldBuf::Bitmap(bits)
            }
        };
        HaveBuf {
            blob,
            first_chunk,
            span_chunks,
            held,
        }
    }

    /// Have-map windows of `window_chunks` chunks (use `PAGE_CHUNKS`) for a
    /// blob of `chunk_count` chunks that lacks exactly `missing` (ascending,
    /// as `Store::missing_chunks` returns it). Nothing missing gives one `All`
    /// window over the blob; windows holding nothing are left out (a peer
    /// starts out holding nothing).
    pub fn windows_from_missing(
        blob: BlobId,
        chunk_count: u64,
        missing: &[u64],
        window_chunks: u64,
    ) -> Vec<HaveBuf> {
        assert!(window_chunks > 0);
        if chunk_count == 0 {
            return Vec::new();
        }
        if missing.is_empty() {
            return vec![HaveBuf::from_ranges(
                blob,
                0,
                chunk_count,
                std::iter::once(0..chunk_count),
            )];
        }
        let mut out = Vec::new();
        let mut m = missing.iter().copied().peekable();
        let mut start = 0;
        while start < chunk_count {
            let end = (start + window_chunks).min(chunk_count);
            let mut held = Vec::new();
            let mut at = start;
            while let Some(&gap) = m.peek() {
                if gap >= end {
                    break;
                }
                m.next();
                assert!(gap >= at, "missing chunks must ascend");
                if gap > at {
                    held.push(at..gap);
                }
                at = gap + 1;
            }
            if at < end {
                held.push(at..end);
            }
            if !held.is_empty() {
                out.push(HaveBuf::from_ranges(blob, start, end - start, held));
            }
            start = end;
        }
        out
    }

    pub fn as_map(&self) -> HaveMap<'_> {
        HaveMap {
            blob: self.blob,
            first_chunk: self.first_chunk,
            span_chunks: self.span_chunks,
            held: match &self.held {
                HeldBuf::Runs(runs) => Held::Runs(runs),
                HeldBuf::All => Held::All,
                HeldBuf::Bitmap(bits) => Held::Bitmap(bits),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOB: BlobId = BlobId([7; 32]);

    #[test]
    fn picks_the_smallest_encoding() {
        let all = HaveBuf::from_ranges(BLOB, 10, 100, [10..50, 50..110]);
        assert_eq!(all.as_map().held, Held::All);
        let runs = HaveBuf::from_ranges(BLOB, 0, 4096, [0..1000, 2000..3000]);
        assert!(matches!(runs.as_map().held, Held::Runs(r) if r.len() == 2));
        let scattered: Vec<_> = (0..4096).step_by(2).map(|i| i..i + 1).collect();
        let bitmap = HaveBuf::from_ranges(BLOB, 0, 4096, scattered);
        assert!(matches!(bitmap.as_map().held, Held::Bitmap(b) if b.len() == 512));
        assert_eq!(bitmap.as_map().held_chunks(), 2048);
        assert!(bitmap.as_map().contains(4094) && !bitmap.as_map().contains(4095));
    }

    #[test]
    fn windows_from_missing_cover_what_is_held() {
        let missing = [0, 1, 5, 4096, 9000];
        let windows = HaveBuf::windows_from_missing(BLOB, 9001, &missing, 4096);
        assert_eq!(windows.len(), 3);
        for i in 0..9001 {
            let held = windows.iter().any(|w| w.as_map().contains(i));
            assert_eq!(held, !missing.contains(&i), "chunk {i}");
        }
        let sealed = HaveBuf::windows_from_missing(BLOB, 9001, &[], 4096);
        assert_eq!(
            sealed,
            vec![HaveBuf::from_ranges(
                BLOB,
                0,
                9001,
                std::iter::once(0..9001)
            )]
        );
    }

    proptest! {
        #[test]
        fn every_encoding_describes_the_same_set(
            first in 0u64..1 << 40,
            bits in prop::collection::vec(any::<bool>(), 1..600),
        ) {
            let span = bits.len() as u64;
            let mut ranges = Vec::new();
            let mut i = 0;
            while i < bits.len() {
                if bits[i] {
                    let s = i;
                    while i < bits.len() && bits[i] { i += 1; }
                    ranges.push(first + s as u64..first + i as u64);
                } else {
                    i += 1;
                }
            }
            let buf = HaveBuf::from_ranges(BLOB, first, span, ranges.clone());
            let map = buf.as_map();
            prop_assert_eq!(map.held_runs().collect::<Vec<_>>(), ranges);
            for (i, &b) in bits.iter().enumerate() {
                prop_assert_eq!(map.contains(first + i as u64), b);
            }
        }
    }
}
