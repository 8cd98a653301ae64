//! The envoy-to-envoy wire protocol, version 1: frames, their codec, and
//! the receiving side's manifest check. Byte layout: `docs/wire-format.md`.
//!
//! # Shape
//! A connection is a stream of frames in each direction. Every frame is an
//! 8-byte [header](HEADER_BYTES) (body length `u32`, kind `u8`, three zero
//! bytes) followed by a body whose fixed part is a `zerocopy` little-endian
//! struct. Decoding never copies or allocates: a [`Frame`] borrows its
//! variable parts (payloads, manifest bytes, have-map runs as a
//! `&[WireRun]`) from the buffer it was decoded from. The only allocation is
//! the streaming [`Decoder`]'s own buffer, and that grows to a frame's size
//! only after the header has been checked.
//!
//! # Bounds (all in [`Limits`], checked before allocation)
//! The length prefix is checked against [`Limits::frame_bytes_max`] and
//! against the body bounds of its kind (fixed-size kinds must match exactly;
//! variable kinds have a named maximum) as soon as the 8 header bytes are
//! present: a 4 GiB length prefix is an error after 8 bytes, with nothing
//! reserved. Counts inside bodies (have-map runs, chunks per request, text)
//! have their own named maxima.
//!
//! # Zero-copy sending
//! [`data_header`] encodes only the 24 bytes in front of a chunk's payload;
//! the caller writes the header and then the borrowed payload slice (from the
//! store's sealed file) straight into the TLS layer, so the codec adds no
//! pass over payload bytes. [`encode`] writes any frame, payload included,
//! into a caller-owned `Vec<u8>`, and checks it with the decoder's own rules
//! so the two can never disagree.
//!
//! # Errors
//! A malformed frame yields a [`DecodeError`] naming the kind and the reason,
//! and the [`CloseCode`] to close the connection with; the [`Decoder`] stays
//! failed after that (a stream cannot be resynchronized). Nothing here panics
//! on peer input: the unit tests, proptests and the `frame_decoder` fuzz
//! target feed it arbitrary bytes.

mod decode;
mod encode;
mod frame;
mod have;
mod manifest;

pub use decode::{DecodeError, Decoder, decode_frame, frame_len};
pub use encode::{EncodeError, data_header, encode};
pub use frame::{
    CloseCode, DATA_HEADER_BYTES, Frame, FrameKind, HEADER_BYTES, HELLO_MAGIC, Hello, RejectCode,
    Request, RequestId, WireRun,
};
pub use have::{HaveBuf, HaveMap, Held, HeldRuns};
pub use manifest::ManifestAssembler;

use engine::chunker::ChunkerParams;
use engine::manifest::{ENTRY_BYTES, PAGE_CHUNKS, PAGE_HEADER_BYTES};

/// The protocol version this build speaks, carried in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The ALPN protocol id of version 1. TLS negotiates the version through
/// ALPN; [`Hello`] carries it again so a captured stream is self-describing.
pub const ALPN_V1: &[u8] = b"vigo/1";

/// Largest encoded manifest page (a full page of 4096 entries), fixed by the
/// manifest format: 24 + 44 × 4096 = 180 248 bytes.
pub const MANIFEST_PAGE_BYTES_MAX: u32 =
    (PAGE_HEADER_BYTES + ENTRY_BYTES * PAGE_CHUNKS as usize) as u32;

/// Bounds on everything a peer can make us buffer or iterate. Every length
/// on the wire is checked against one of these before it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, header included, in bytes. Checked on the length
    /// prefix as soon as the header is complete, before the kind's own
    /// bound (a `Data` frame is further held to `chunk_bytes_max`).
    /// Default 16 MiB + 4 KiB: a maximal manifest root plus its header.
    pub frame_bytes_max: u32,
    /// Largest chunk payload in a `Data` frame, in bytes. Default 4 MiB, the
    /// engine's cap on any chunk (`ChunkerParams::MAX_CHUNK_BYTES_MAX`).
    pub chunk_bytes_max: u32,
    /// Largest manifest root in a `ManifestRoot` frame, in bytes. Default
    /// 16 MiB: 80 + 52 × 322 000 pages, i.e. ~1.3 G chunks: 10 TiB at the
    /// default 8 KiB average, beyond the engine's default 4 TiB blob cap
    /// (a 4 GiB blob's root is ~7 KB).
    pub manifest_root_bytes_max: u32,
    /// Largest manifest page in a `ManifestPage` frame, in bytes. Default
    /// [`MANIFEST_PAGE_BYTES_MAX`], the largest page the format allows.
    pub manifest_page_bytes_max: u32,
    /// Most runs in one `Have` frame. Default 16 384 (192 KiB of runs). A
    /// sender with a more fragmented map splits it into windows (one per
    /// manifest page needs at most 2048).
    pub have_runs_max: u32,
    /// Largest bitmap in one `Have` frame, in bytes. Default 128 KiB
    /// (1 Mi chunks, ~8 GiB at 8 KiB chunks).
    pub have_bitmap_bytes_max: u32,
    /// Most chunks one `Request` may ask for. Default 4096: a 4 MiB run of
    /// the smallest chunks the default chunker makes (2 KiB) needs 2048.
    pub request_chunks_max: u32,
    /// Longest UTF-8 reason text in a `Close` frame, in bytes. Default 1024.
    pub close_text_bytes_max: u32,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        frame_bytes_max: (16 << 20) + 4096,
        chunk_bytes_max: ChunkerParams::MAX_CHUNK_BYTES_MAX,
        manifest_root_bytes_max: 16 << 20,
        manifest_page_bytes_max: MANIFEST_PAGE_BYTES_MAX,
        have_runs_max: 16_384,
        have_bitmap_bytes_max: 128 << 10,
        request_chunks_max: 4096,
        close_text_bytes_max: 1024,
    };

    /// Whether the limits are usable: positive, and a frame may carry the
    /// largest chunk, root and page they allow.
    pub fn validate(&self) -> Result<(), &'static str> {
        let frame = u64::from(self.frame_bytes_max);
        let fits = |fixed: usize, var: u32| (HEADER_BYTES + fixed) as u64 + u64::from(var) <= frame;
        if self.chunk_bytes_max == 0 || self.request_chunks_max == 0 {
            return Err("chunk_bytes_max and request_chunks_max must be positive");
        }
        if !fits(frame::DATA_FIXED_BYTES, self.chunk_bytes_max) {
            return Err("frame_bytes_max cannot carry a chunk of chunk_bytes_max");
        }
        if !fits(
            frame::MANIFEST_ROOT_FIXED_BYTES,
            self.manifest_root_bytes_max,
        ) {
            return Err("frame_bytes_max cannot carry a root of manifest_root_bytes_max");
        }
        if !fits(
            frame::MANIFEST_PAGE_FIXED_BYTES,
            self.manifest_page_bytes_max,
        ) {
            return Err("frame_bytes_max cannot carry a page of manifest_page_bytes_max");
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

const _: () = assert!(Limits::DEFAULT.chunk_bytes_max == ChunkerParams::MAX_CHUNK_BYTES_MAX);
const _: () = assert!(
    (HEADER_BYTES + frame::DATA_FIXED_BYTES) as u64 + Limits::DEFAULT.chunk_bytes_max as u64
        <= Limits::DEFAULT.frame_bytes_max as u64
);
const _: () = assert!(
    (HEADER_BYTES + frame::MANIFEST_ROOT_FIXED_BYTES) as u64
        + Limits::DEFAULT.manifest_root_bytes_max as u64
        <= Limits::DEFAULT.frame_bytes_max as u64
);
const _: () = assert!(MANIFEST_PAGE_BYTES_MAX == 180_248);
// One manifest page's worth of have-map fits either encoding.
const _: () = assert!(PAGE_CHUNKS / 2 <= Limits::DEFAULT.have_runs_max);
const _: () = assert!(PAGE_CHUNKS / 8 <= Limits::DEFAULT.have_bitmap_bytes_max);

#[cfg(test)]
mod tests;
