//! Decoding: the stateless [`decode_frame`] over a contiguous buffer, and
//! the streaming [`Decoder`] that accepts bytes in pieces of any size.
//!
//! Order of checks, so that nothing is buffered on a peer's say-so: the 8
//! header bytes are checked first (known kind, zero reserved bytes, frame
//! length within `frame_bytes_max`, body length within the kind's bounds);
//! only then does the [`Decoder`] reserve room for the body. The body is then
//! checked field by field; variable parts are borrowed, never copied.

use engine::hash::BlobId;
use zerocopy::FromBytes;

use super::Limits;
use super::frame::*;
use super::have::{HaveMap, Held};

/// Why bytes are not a valid frame. The connection should be closed with
/// [`DecodeError::close_code`] and the error's text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {frame_bytes} bytes exceeds frame_bytes_max ({max})")]
    FrameTooLong {
        kind: FrameKind,
        frame_bytes: u64,
        max: u32,
    },
    #[error("{kind:?} frame body of {body_bytes} bytes, expected exactly {expected}")]
    WrongLength {
        kind: FrameKind,
        body_bytes: u32,
        expected: u64,
    },
    #[error("{kind:?} frame body of {body_bytes} bytes is shorter than its minimum of {min}")]
    TooShort {
        kind: FrameKind,
        body_bytes: u32,
        min: u64,
    },
    #[error("{kind:?} frame body of {body_bytes} bytes exceeds its limit of {max}")]
    TooLong {
        kind: FrameKind,
        body_bytes: u32,
        max: u64,
    },
    #[error("{kind:?} frame: {what} ({value}) exceeds the limit of {max}")]
    OverLimit {
        kind: FrameKind,
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{kind:?} frame: {what}")]
    Malformed { kind: FrameKind, what: &'static str },
    #[error("hello frame has the wrong magic: not a Vigo wire protocol peer")]
    BadMagic,
}

impl DecodeError {
    /// The close code to send the peer.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::FrameTooLong { .. }
            | DecodeError::TooLong { .. }
            | DecodeError::OverLimit { .. } => CloseCode::LIMIT,
            _ => CloseCode::PROTOCOL,
        }
    }
}

/// Checks the header at the start of `bytes`: `Ok(None)` if fewer than
/// [`HEADER_BYTES`] are there, else the whole frame's length in bytes
/// (header included), within every limit.
pub fn frame_len(bytes: &[u8], limits: &Limits) -> Result<Option<usize>, DecodeError> {
    Ok(header(bytes, limits)?.map(|(_, body)| HEADER_BYTES + body as usize))
}

fn header(bytes: &[u8], limits: &Limits) -> Result<Option<(FrameKind, u32)>, DecodeError> {
    let Ok((raw, _)) = HeaderRaw::read_from_prefix(bytes) else {
        return Ok(None);
    };
    let kind = FrameKind::from_u8(raw.kind).ok_or(DecodeError::UnknownKind(raw.kind))?;
    if raw.reserved != [0; 3] {
        return Err(DecodeError::Malformed {
            kind,
            what: "header reserved bytes are not zero",
        });
    }
    let body_bytes = raw.body_len.get();
    let frame_bytes = HEADER_BYTES as u64 + u64::from(body_bytes);
    if frame_bytes > u64::from(limits.frame_bytes_max) {
        return Err(DecodeError::FrameTooLong {
            kind,
            frame_bytes,
            max: limits.frame_bytes_max,
        });
    }
    let len = u64::from(body_bytes);
    match body_bounds(kind, limits) {
        Bounds::Exact(expected) if len != expected => Err(DecodeError::WrongLength {
            kind,
            body_bytes,
            expected,
        }),
        Bounds::Range(min, _) if len < min => Err(DecodeError::TooShort {
            kind,
            body_bytes,
            min,
        }),
        Bounds::Range(_, max) if len > max => Err(DecodeError::TooLong {
            kind,
            body_bytes,
            max,
        }),
        _ => Ok(Some((kind, body_bytes))),
    }
}

enum Bounds {
    Exact(u64),
    Range(u64, u64),
}

/// Body length bounds per kind: fixed kinds exactly, variable kinds between
/// their fixed part (plus a minimum payload) and fixed part + named limit.
fn body_bounds(kind: FrameKind, limits: &Limits) -> Bounds {
    let exact = |n: usize| Bounds::Exact(n as u64);
    let var = |n: usize, min_var: u64, max_var: u32| {
        Bounds::Range(n as u64 + min_var, n as u64 + u64::from(max_var))
    };
    match kind {
        FrameKind::Hello => exact(HELLO_BYTES),
        FrameKind::Close => var(CLOSE_FIXED_BYTES, 0, limits.close_text_bytes_max),
        FrameKind::GetManifest | FrameKind::NotFound => exact(BLOB_BYTES),
        FrameKind::ManifestRoot => {
            var(MANIFEST_ROOT_FIXED_BYTES, 0, limits.manifest_root_bytes_max)
        }
        FrameKind::GetManifestPage => exact(PAGE_REF_BYTES),
        FrameKind::ManifestPage => {
            var(MANIFEST_PAGE_FIXED_BYTES, 0, limits.manifest_page_bytes_max)
        }
        FrameKind::Have => {
            let runs = u64::from(limits.have_runs_max) * RUN_BYTES as u64;
            let bitmap = u64::from(limits.have_bitmap_bytes_max);
            Bounds::Range(
                HAVE_FIXED_BYTES as u64,
                HAVE_FIXED_BYTES as u64 + runs.max(bitmap),
            )
        }
        FrameKind::Request => exact(REQUEST_BYTES),
        FrameKind::Cancel => exact(CANCEL_BYTES),
        FrameKind::Data => var(DATA_FIXED_BYTES, 1, limits.chunk_bytes_max),
        FrameKind::Reject => exact(REJECT_BYTES),
        FrameKind::BadChunk => exact(BAD_CHUNK_BYTES),
    }
}

/// Decodes one frame from the start of `bytes`: `Ok(None)` until the whole
/// frame is there, else the frame (borrowing from `bytes`) and its length.
/// Use it directly where plaintext is already contiguous (e.g. the buffer
/// rustls's unbuffered API decrypts into), to skip the [`Decoder`]'s copy.
pub fn decode_frame<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Frame<'a>, usize)>, DecodeError> {
    let Some((kind, body_bytes)) = header(bytes, limits)? else {
        return Ok(None);
    };
    let len = HEADER_BYTES + body_bytes as usize;
    let Some(body) = bytes.get(HEADER_BYTES..len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(kind, body, limits)?, len)))
}

fn decode_body<'a>(
    kind: FrameKind,
    body: &'a [u8],
    limits: &Limits,
) -> Result<Frame<'a>, DecodeError> {
    let malformed = |what| DecodeError::Malformed { kind, what };
    // The header check fixed the body length, so these prefixes are there;
    // a failure would still only be an error, never a panic.
    let short = || malformed("body shorter than its fixed part");
    let frame = match kind {
        FrameKind::Hello => {
            let raw = HelloRaw::read_from_bytes(body).map_err(|_| short())?;
            if raw.magic != HELLO_MAGIC {
                return Err(DecodeError::BadMagic);
            }
            if raw.flags.get() != 0 {
                return Err(malformed("flags are not zero"));
            }
            Frame::Hello(Hello {
                version: raw.version.get(),
                requests_in_flight_max: raw.requests_in_flight_max.get(),
                frame_bytes_max: raw.frame_bytes_max.get(),
                credit_bytes: raw.credit_bytes.get(),
            })
        }
        FrameKind::Close => {
            let (raw, text) = CloseRaw::read_from_prefix(body).map_err(|_| short())?;
            if raw.reserved.get() != 0 {
                return Err(malformed("reserved bytes are not zero"));
            }
            let text = std::str::from_utf8(text).map_err(|_| malformed("reason is not UTF-8"))?;
            Frame::Close {
                code: CloseCode(raw.code.get()),
                text,
            }
        }
        FrameKind::GetManifest | FrameKind::NotFound => {
            let raw = BlobRaw::read_from_bytes(body).map_err(|_| short())?;
            let blob = BlobId(raw.blob);
            if kind == FrameKind::GetManifest {
                Frame::GetManifest { blob }
            } else {
                Frame::NotFound { blob }
            }
        }
        FrameKind::ManifestRoot => {
            let (raw, root) = BlobRaw::read_from_prefix(body).map_err(|_| short())?;
            Frame::ManifestRoot {
                blob: BlobId(raw.blob),
                root,
            }
        }
        FrameKind::GetManifestPage => {
            let raw = PageRefRaw::read_from_bytes(body).map_err(|_| short())?;
            Frame::GetManifestPage {
                blob: BlobId(raw.blob),
                page: raw.page.get(),
            }
        }
        FrameKind::ManifestPage => {
            let (raw, bytes) = PageRefRaw::read_from_prefix(body).map_err(|_| short())?;
            Frame::ManifestPage {
                blob: BlobId(raw.blob),
                page: raw.page.get(),
                bytes,
            }
        }
        FrameKind::Have => Frame::Have(decode_have(body, limits)?),
        FrameKind::Request => {
            let raw = RequestRaw::read_from_bytes(body).map_err(|_| short())?;
            let (first, count) = (raw.first_chunk.get(), raw.chunk_count.get());
            if count == 0 {
                return Err(malformed("request for zero chunks"));
            }
            if count > limits.request_chunks_max {
                return Err(DecodeError::OverLimit {
                    kind,
                    what: "chunks in one request",
                    value: u64::from(count),
                    max: u64::from(limits.request_chunks_max),
                });
            }
            if first.checked_add(u64::from(count)).is_none() {
                return Err(malformed("run overflows the chunk index"));
            }
            Frame::Request(Request {
                id: RequestId(raw.request.get()),
                blob: BlobId(raw.blob),
                first_chunk: first,
                chunk_count: count,
            })
        }
        FrameKind::Cancel => {
            let raw = CancelRaw::read_from_bytes(body).map_err(|_| short())?;
            Frame::Cancel {
                request: RequestId(raw.request.get()),
            }
        }
        FrameKind::Data => {
            let (raw, payload) = DataRaw::read_from_prefix(body).map_err(|_| short())?;
            Frame::Data {
                request: RequestId(raw.request.get()),
                chunk_index: raw.chunk_index.get(),
                payload,
            }
        }
        FrameKind::Reject => {
            let raw = RejectRaw::read_from_bytes(body).map_err(|_| short())?;
            if raw.reserved.get() != 0 {
                return Err(malformed("reserved bytes are not zero"));
            }
            Frame::Reject {
                request: RequestId(raw.request.get()),
                code: RejectCode(raw.code.get()),
            }
        }
        FrameKind::BadChunk => {
            let raw = BadChunkRaw::read_from_bytes(body).map_err(|_| short())?;
            Frame::BadChunk {
                blob: BlobId(raw.blob),
                chunk_index: raw.chunk_index.get(),
            }
        }
    };
    Ok(frame)
}

fn decode_have<'a>(body: &'a [u8], limits: &Limits) -> Result<HaveMap<'a>, DecodeError> {
    let kind = FrameKind::Have;
    let malformed = |what| DecodeError::Malformed { kind, what };
    let (raw, rest) = HaveRaw::read_from_prefix(body)
        .map_err(|_| malformed("body shorter than its fixed part"))?;
    if raw.reserved != [0; 3] {
        return Err(malformed("reserved bytes are not zero"));
    }
    let first = raw.first_chunk.get();
    let span = raw.span_chunks.get();
    if span == 0 {
        return Err(malformed("empty window"));
    }
    let end = first
        .checked_add(span)
        .ok_or(malformed("window overflows the chunk index"))?;
    let held = match raw.encoding {
        HAVE_ALL => {
            if !rest.is_empty() {
                return Err(malformed("an All map carries a body"));
            }
            Held::All
        }
        HAVE_RUNS => {
            let runs = <[WireRun]>::ref_from_bytes(rest)
                .map_err(|_| malformed("runs are not a whole number of 12-byte entries"))?;
            if runs.len() as u64 > u64::from(limits.have_runs_max) {
                return Err(DecodeError::OverLimit {
                    kind,
                    what: "runs",
                    value: runs.len() as u64,
                    max: u64::from(limits.have_runs_max),
                });
            }
            let mut prev_end = first;
            for run in runs {
                if run.count() == 0 {
                    return Err(malformed("empty run"));
                }
                let run_end = run
                    .first()
                    .checked_add(u64::from(run.count()))
                    .ok_or(malformed("run overflows the chunk index"))?;
                if run.first() < prev_end {
                    return Err(malformed(
                        "runs overlap, descend or start before the window",
                    ));
                }
                if run_end > end {
                    return Err(malformed("run ends beyond the window"));
                }
                prev_end = run_end;
            }
            Held::Runs(runs)
        }
        HAVE_BITMAP => {
            let need = span.div_ceil(8);
            if need > u64::from(limits.have_bitmap_bytes_max) {
                return Err(DecodeError::OverLimit {
                    kind,
                    what: "bitmap bytes",
                    value: need,
                    max: u64::from(limits.have_bitmap_bytes_max),
                });
            }
            if rest.len() as u64 != need {
                return Err(malformed("bitmap length does not match the window"));
            }
            let tail_bits = span % 8;
            if tail_bits != 0 && rest.last().is_some_and(|b| b >> tail_bits != 0) {
                return Err(malformed("bitmap padding bits are not zero"));
            }
            Held::Bitmap(rest)
        }
        _ => return Err(malformed("unknown have-map encoding")),
    };
    Ok(HaveMap {
        blob: BlobId(raw.blob),
        first_chunk: first,
        span_chunks: span,
        held,
    })
}

/// A streaming decoder: [`feed`](Decoder::feed) it bytes as they arrive, in
/// pieces of any size, and [`poll_frame`](Decoder::poll_frame) frames out.
///
/// Memory: the buffer holds the unconsumed bytes. It grows to a frame's size
/// only once that frame's header has passed every check, so a hostile length
/// prefix costs nothing. Between feeds the caller drains frames until
/// `Ok(None)`; the buffer then never exceeds one frame plus the last piece
/// fed (`frame_bytes_max` + the socket read size).
///
/// After an error the decoder stays failed: every later poll returns the
/// same error and fed bytes are dropped (a byte stream cannot be
/// resynchronized; the connection must close).
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// Bytes at the end of `buf` that belong to the transport, not yet to the
    /// frame stream (see [`Decoder::set_transport_held`]).
    held: usize,
    failed: Option<DecodeError>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            buf: Vec::new(),
            start: 0,
            held: 0,
            failed: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends received bytes (with no transport tail held: they would land
    /// behind it).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() || bytes.is_empty() {
            return;
        }
        assert_eq!(self.held, 0, "feed behind a transport's held bytes");
        if self.start > 0 {
            // Drop consumed frames; what moves is less than one frame.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to receive at least `min` more bytes into, straight from
    /// the socket (e.g. tokio's `read_buf`, which appends into spare
    /// capacity): saves the staging copy [`Decoder::feed`] makes. The caller
    /// may only append; what is already in it belongs to the decoder.
    pub fn receive_buffer(&mut self, min: usize) -> &mut Vec<u8> {
        if self.failed.is_some() {
            // Nothing fed after a failure is ever decoded: keep it empty.
            self.buf.clear();
            self.start = 0;
            self.held = 0;
        } else if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(min);
        &mut self.buf
    }

    /// [`Decoder::receive_buffer`] that leaves the frames decoded so far
    /// where they are: ranges from [`Decoder::poll_frame_at`] stay valid
    /// until [`Decoder::take_consumed`] hands them out. The buffer grows
    /// until then; the caller bounds it by taking them regularly.
    pub fn receive_buffer_keeping(&mut self, min: usize) -> &mut Vec<u8> {
        if self.failed.is_some() {
            // Nothing fed after a failure is ever decoded; what was decoded
            // before it stays for `take_consumed`.
            self.buf.truncate(self.start);
            self.held = 0;
        }
        self.buf.reserve(min);
        &mut self.buf
    }

    /// Hands out the buffer holding every frame decoded so far, at the
    /// positions [`Decoder::poll_frame_at`] reported (its length is where
    /// the next frame starts), and goes on in `fresh` (emptied first; pass
    /// a recycled buffer), into which the bytes not yet decoded (less than
    /// one frame) are moved. A receiver can so keep payloads where they
    /// were received instead of copying them out of the decoder.
    /// A transport tail held at the end of the buffer moves with those bytes.
    pub fn take_consumed(&mut self, mut fresh: Vec<u8>) -> Vec<u8> {
        fresh.clear();
        fresh.extend_from_slice(&self.buf[self.start..]);
        let mut consumed = std::mem::replace(&mut self.buf, fresh);
        consumed.truncate(self.start);
        self.start = 0;
        consumed
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn poll_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        Ok(self.poll_frame_at()?.map(|(_, frame)| frame))
    }

    /// [`Decoder::poll_frame`], with where the frame lies in the buffer
    /// (valid until the buffer is compacted by [`Decoder::feed`] or
    /// [`Decoder::receive_buffer`], or handed out by
    /// [`Decoder::take_consumed`]). A `Data` frame's payload is the last
    /// `payload.len()` bytes of its range.
    pub fn poll_frame_at(
        &mut self,
    ) -> Result<Option<(std::ops::Range<usize>, Frame<'_>)>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.start..self.buf.len() - self.held];
        let len = match frame_len(pending, &self.limits) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        if pending.len() < len {
            // The header passed every check: room for exactly this frame,
            // counting what `receive_buffer` frees by dropping the decoded
            // frames before it (growing only when that is not enough: a
            // reallocation per read would churn the allocator).
            if self.buf.capacity() - self.start < len + self.held {
                let missing = len - pending.len();
                self.buf.reserve_exact(missing);
            }
            return Ok(None);
        }
        let at = self.start;
        match decode_frame(&self.buf[at..at + len], &self.limits) {
            Ok(Some((frame, _))) => {
                self.start = at + len;
                Ok(Some((at..at + len, frame)))
            }
            // Not reached: the header passed and all `len` bytes are here.
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                self.held = 0;
                Err(e)
            }
        }
    }

    /// Fails for good. The bytes after the last good frame go; the frames
    /// decoded before it stay where [`Decoder::poll_frame_at`] said, for
    /// [`Decoder::take_consumed`] (a receiver may still hold payloads there).
    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.failed = Some(e.clone());
        self.buf.truncate(self.start);
        self.held = 0;
        e
    }

    /// Declares the last `held` bytes of the buffer the transport's own: bytes
    /// it appended through [`Decoder::receive_buffer`] or
    /// [`Decoder::receive_buffer_keeping`] that are not frame bytes yet (a TLS
    /// record not complete, and the room its plaintext will move into once it
    /// is). Frames are decoded only from the bytes before them; the buffer's
    /// compaction and [`Decoder::take_consumed`] keep them, in order, at the
    /// buffer's end. After a failure the decoder holds nothing.
    pub fn set_transport_held(&mut self, held: usize) {
        if self.failed.is_some() {
            return;
        }
        assert!(
            held <= self.buf.len() - self.start,
            "the transport holds only bytes not yet decoded"
        );
        self.held = held;
    }

    /// What [`Decoder::set_transport_held`] last declared (0 after a failure).
    pub fn transport_held(&self) -> usize {
        self.held
    }

    /// Bytes received and not yet returned as frames (the transport's held
    /// bytes not counted).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.held - self.start
    }

    /// Bytes the buffer has room for (what it costs in memory).
    pub fn capacity_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// The error the decoder failed with, if it has.
    pub fn error(&self) -> Option<&DecodeError> {
        self.failed.as_ref()
    }
}
