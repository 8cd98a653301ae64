//! Codec tests: round trips, arbitrary input, split independence, limits.
//! Golden byte vectors live in `tests/wire_golden.rs`.

use engine::hash::BlobId;
use proptest::prelude::*;

use super::*;

/// An owned frame, so tests can compare frames decoded from different buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Hello(Hello),
    Close(CloseCode, String),
    GetManifest(BlobId),
    ManifestRoot(BlobId, Vec<u8>),
    GetManifestPage(BlobId, u32),
    ManifestPage(BlobId, u32, Vec<u8>),
    NotFound(BlobId),
    Have(BlobId, u64, u64, OwnedHeld),
    Request(Request),
    Cancel(RequestId),
    Data(RequestId, u64, Vec<u8>),
    Reject(RequestId, RejectCode),
    BadChunk(BlobId, u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OwnedHeld {
    Runs(Vec<WireRun>),
    All,
    Bitmap(Vec<u8>),
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self {
            Owned::Hello(h) => Frame::Hello(*h),
            Owned::Close(code, text) => Frame::Close { code: *code, text },
            Owned::GetManifest(blob) => Frame::GetManifest { blob: *blob },
            Owned::ManifestRoot(blob, root) => Frame::ManifestRoot { blob: *blob, root },
            Owned::GetManifestPage(blob, page) => Frame::GetManifestPage {
                blob: *blob,
                page: *page,
            },
            Owned::ManifestPage(blob, page, bytes) => Frame::ManifestPage {
                blob: *blob,
                page: *page,
                bytes,
            },
            Owned::NotFound(blob) => Frame::NotFound { blob: *blob },
            Owned::Have(blob, first, span, held) => Frame::Have(HaveMap {
                blob: *blob,
                first_chunk: *first,
                span_chunks: *span,
                held: match held {
                    OwnedHeld::Runs(r) => Held::Runs(r),
                    OwnedHeld::All => Held::All,
                    OwnedHeld::Bitmap(b) => Held::Bitmap(b),
                },
            }),
            Owned::Request(r) => Frame::Request(*r),
            Owned::Cancel(id) => Frame::Cancel { request: *id },
            Owned::Data(id, chunk, payload) => Frame::Data {
                request: *id,
                chunk_index: *chunk,
                payload,
            },
            Owned::Reject(id, code) => Frame::Reject {
                request: *id,
                code: *code,
            },
            Owned::BadChunk(blob, chunk) => Frame::BadChunk {
                blob: *blob,
                chunk_index: *chunk,
            },
        }
    }

    fn of(frame: &Frame<'_>) -> Owned {
        match *frame {
            Frame::Hello(h) => Owned::Hello(h),
            Frame::Close { code, text } => Owned::Close(code, text.to_owned()),
            Frame::GetManifest { blob } => Owned::GetManifest(blob),
            Frame::ManifestRoot { blob, root } => Owned::ManifestRoot(blob, root.to_vec()),
            Frame::GetManifestPage { blob, page } => Owned::GetManifestPage(blob, page),
            Frame::ManifestPage { blob, page, bytes } => {
                Owned::ManifestPage(blob, page, bytes.to_vec())
            }
            Frame::NotFound { blob } => Owned::NotFound(blob),
            Frame::Have(m) => Owned::Have(
                m.blob,
                m.first_chunk,
                m.span_chunks,
                match m.held {
                    Held::Runs(r) => OwnedHeld::Runs(r.to_vec()),
                    Held::All => OwnedHeld::All,
                    Held::Bitmap(b) => OwnedHeld::Bitmap(b.to_vec()),
                },
            ),
            Frame::Request(r) => Owned::Request(r),
            Frame::Cancel { request } => Owned::Cancel(request),
            Frame::Data {
                request,
                chunk_index,
                payload,
            } => Owned::Data(request, chunk_index, payload.to_vec()),
            Frame::Reject { request, code } => Owned::Reject(request, code),
            Frame::BadChunk { blob, chunk_index } => Owned::BadChunk(blob, chunk_index),
        }
    }
}

fn blob() -> impl Strategy<Value = BlobId> {
    any::<[u8; 32]>().prop_map(BlobId)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

/// Held sets built from a random bit pattern, in each encoding.
fn have() -> impl Strategy<Value = Owned> {
    (
        blob(),
        0u64..u64::MAX / 2,
        prop::collection::vec(any::<bool>(), 1..300),
        0..3u8,
    )
        .prop_map(|(blob, first, bits, encoding)| {
            let span = bits.len() as u64;
            let held = match encoding {
                0 => {
                    let mut runs = Vec::new();
                    let mut i = 0;
                    while i < bits.len() {
                        if bits[i] {
                            let s = i;
                            while i < bits.len() && bits[i] {
                                i += 1;
                            }
                            runs.push(WireRun::new(first + s as u64, (i - s) as u32));
                        } else {
                            i += 1;
                        }
                    }
                    OwnedHeld::Runs(runs)
                }
                1 => OwnedHeld::All,
                _ => {
                    let mut b = vec![0u8; bits.len().div_ceil(8)];
                    for (i, _) in bits.iter().enumerate().filter(|(_, x)| **x) {
                        b[i / 8] |= 1 << (i % 8);
                    }
                    OwnedHeld::Bitmap(b)
                }
            };
            Owned::Have(blob, first, span, held)
        })
}

fn frame() -> impl Strategy<Value = Owned> {
    let limits = Limits::DEFAULT;
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(v, r, f, c)| {
            Owned::Hello(Hello {
                version: v,
                requests_in_flight_max: r,
                frame_bytes_max: f,
                credit_bytes: c,
            })
        }),
        (any::<u16>(), "\\PC{0,40}").prop_map(|(c, t)| Owned::Close(CloseCode(c), t)),
        blob().prop_map(Owned::GetManifest),
        (blob(), bytes(300)).prop_map(|(b, r)| Owned::ManifestRoot(b, r)),
        (blob(), any::<u32>()).prop_map(|(b, p)| Owned::GetManifestPage(b, p)),
        (blob(), any::<u32>(), bytes(300)).prop_map(|(b, p, x)| Owned::ManifestPage(b, p, x)),
        blob().prop_map(Owned::NotFound),
        have(),
        (
            any::<u64>(),
            blob(),
            0..u64::MAX / 2,
            1..=limits.request_chunks_max
        )
            .prop_map(|(id, blob, first, count)| Owned::Request(Request {
                id: RequestId(id),
                blob,
                first_chunk: first,
                chunk_count: count,
            })),
        any::<u64>().prop_map(|id| Owned::Cancel(RequestId(id))),
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 1..2000)
        )
            .prop_map(|(id, c, p)| Owned::Data(RequestId(id), c, p)),
        (any::<u64>(), any::<u16>())
            .prop_map(|(id, c)| Owned::Reject(RequestId(id), RejectCode(c))),
        (blob(), any::<u64>()).prop_map(|(b, c)| Owned::BadChunk(b, c)),
    ]
}

fn encode_all(frames: &[Owned]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(&f.frame(), &Limits::DEFAULT, &mut out).unwrap();
    }
    out
}

/// Feeds `bytes` cut at `cuts` and collects every frame (or the error).
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Owned>, DecodeError> {
    let mut d = Decoder::new(Limits::DEFAULT);
    let mut out = Vec::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(0);
    cuts.push(bytes.len());
    cuts.sort_unstable();
    for w in cuts.windows(2) {
        d.feed(&bytes[w[0]..w[1]]);
        while let Some(f) = d.poll_frame()? {
            out.push(Owned::of(&f));
        }
    }
    assert_eq!(
        d.buffered_bytes(),
        0,
        "a whole stream leaves nothing behind"
    );
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let mut out = vec![0xEE; 3]; // encoding appends after existing bytes
        let n = encode(&f.frame(), &Limits::DEFAULT, &mut out).unwrap();
        prop_assert_eq!(n, out.len() - 3);
        let (back, len) = decode_frame(&out[3..], &Limits::DEFAULT).unwrap().unwrap();
        prop_assert_eq!(len, n);
        prop_assert_eq!(Owned::of(&back), f.clone());
        prop_assert_eq!(frame_len(&out[3..], &Limits::DEFAULT).unwrap(), Some(n));
        // Every strict prefix is "need more bytes", never an error.
        for cut in [0, 1, 7, 8, n / 2, n - 1] {
            prop_assert_eq!(decode_frame(&out[3..3 + cut.min(n - 1)], &Limits::DEFAULT), Ok(None));
        }
    }

    #[test]
    fn decoding_is_independent_of_how_bytes_are_split(
        frames in prop::collection::vec(frame(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let bytes = encode_all(&frames);
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts).unwrap(), frames.clone());
        // One byte at a time, too.
        let singles: Vec<usize> = (0..bytes.len()).collect();
        prop_assert_eq!(decode_in_pieces(&bytes, &singles).unwrap(), frames);
    }

    /// A receiver that keeps payloads where they arrived: fed with
    /// `receive_buffer_keeping`, the buffers `take_consumed` hands out at
    /// arbitrary points hold every frame at the range `poll_frame_at`
    /// reported, and decoding goes on from the carried-over rest.
    #[test]
    fn kept_frames_are_where_poll_frame_at_said(
        frames in prop::collection::vec(frame(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        takes in prop::collection::vec(any::<bool>(), 0..40),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.extend([0, bytes.len()]);
        cuts.sort_unstable();
        let mut d = Decoder::new(Limits::DEFAULT);
        // Frames decoded since the last take: (range, frame).
        let mut pending: Vec<(std::ops::Range<usize>, Owned)> = Vec::new();
        let mut out = Vec::new();
        let mut check = |buf: Vec<u8>, pending: &mut Vec<(std::ops::Range<usize>, Owned)>| {
            for (range, f) in pending.drain(..) {
                let (again, len) = decode_frame(&buf[range.clone()], &Limits::DEFAULT)
                    .unwrap()
                    .unwrap();
                assert_eq!(len, range.len());
                if let Frame::Data { payload, .. } = again {
                    assert_eq!(&buf[range.end - payload.len()..range.end], payload);
                }
                assert_eq!(Owned::of(&again), f.clone());
                out.push(f);
            }
        };
        for (i, w) in cuts.windows(2).enumerate() {
            d.receive_buffer_keeping(w[1] - w[0]).extend_from_slice(&bytes[w[0]..w[1]]);
            while let Some((range, f)) = d.poll_frame_at().unwrap() {
                pending.push((range, Owned::of(&f)));
            }
            if takes.get(i).copied().unwrap_or(false) {
                let buf = d.take_consumed(vec![0xEE; 5]);
                check(buf, &mut pending);
            }
        }
        let buf = d.take_consumed(Vec::new());
        check(buf, &mut pending);
        prop_assert_eq!(d.buffered_bytes(), 0);
        prop_assert_eq!(out, frames);
    }

    /// A transport that keeps bytes of its own at the buffer's end (a TLS
    /// record not yet complete): frames decode from the bytes before them
    /// only, the held bytes stay at the end through compaction and
    /// `take_consumed`, and the transport turns them into stream bytes later.
    #[test]
    fn bytes_a_transport_holds_are_never_decoded(
        frames in prop::collection::vec(frame(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        tails in prop::collection::vec(0usize..64, 0..40),
        takes in prop::collection::vec(any::<bool>(), 0..40),
        keeping in any::<bool>(),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.extend([0, bytes.len()]);
        cuts.sort_unstable();
        let mut d = Decoder::new(Limits::DEFAULT);
        let mut out = Vec::new();
        for (i, w) in cuts.windows(2).enumerate() {
            let held = d.transport_held();
            let buf = if keeping {
                d.receive_buffer_keeping(w[1] - w[0] + 64)
            } else {
                d.receive_buffer(w[1] - w[0] + 64)
            };
            // The held tail is the transport's: it ends in the junk it left.
            prop_assert!(buf[buf.len() - held..].iter().all(|&b| b == 0xA5));
            buf.truncate(buf.len() - held);
            buf.extend_from_slice(&bytes[w[0]..w[1]]);
            let tail = tails.get(i).copied().unwrap_or(0);
            buf.resize(buf.len() + tail, 0xA5);
            d.set_transport_held(tail);
            while let Some((_, f)) = d.poll_frame_at().unwrap() {
                out.push(Owned::of(&f));
            }
            if keeping && takes.get(i).copied().unwrap_or(false) {
                let _ = d.take_consumed(vec![0xEE; 5]);
            }
        }
        prop_assert_eq!(d.buffered_bytes(), 0);
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn random_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = decode_frame(&data, &Limits::DEFAULT);
        // The streaming decoder gives the same verdict whatever the split.
        let whole = decode_in_pieces_lenient(&data, &[]);
        let split = decode_in_pieces_lenient(&data, &cuts);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn mutated_frames_never_panic(
        frames in prop::collection::vec(frame(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encode_all(&frames);
        for (i, v) in &flips {
            let at = i.index(bytes.len());
            bytes[at] = *v;
        }
        let _ = decode_in_pieces_lenient(&bytes, &[]);
        // Whatever still decodes re-encodes to exactly the same bytes.
        let mut rest = &bytes[..];
        while let Ok(Some((f, len))) = decode_frame(rest, &Limits::DEFAULT) {
            let mut again = Vec::new();
            encode(&f, &Limits::DEFAULT, &mut again).unwrap();
            prop_assert_eq!(&again[..], &rest[..len]);
            rest = &rest[len..];
        }
    }
}

/// Like `decode_in_pieces` but for arbitrary input: frames decoded before the
/// first error, the error, and the leftover byte count.
fn decode_in_pieces_lenient(
    bytes: &[u8],
    cuts: &[usize],
) -> (Vec<Owned>, Option<DecodeError>, usize) {
    let mut d = Decoder::new(Limits::DEFAULT);
    let mut out = Vec::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(0);
    cuts.push(bytes.len());
    cuts.sort_unstable();
    for w in cuts.windows(2) {
        d.feed(&bytes[w[0]..w[1]]);
        loop {
            match d.poll_frame() {
                Ok(Some(f)) => out.push(Owned::of(&f)),
                Ok(None) => break,
                Err(e) => {
                    // Stays failed, and ignores further input.
                    assert_eq!(d.poll_frame(), Err(e.clone()));
                    return (out, Some(e), 0);
                }
            }
        }
    }
    let left = d.buffered_bytes();
    (out, None, left)
}

fn header(body_len: u32, kind: u8) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&body_len.to_le_bytes());
    h[4] = kind;
    h
}

#[test]
fn oversized_length_prefix_is_refused_without_allocating() {
    let mut d = Decoder::new(Limits::DEFAULT);
    // A Data frame claiming a 4 GiB body: refused as soon as its 8 header
    // bytes are in, before any room is made for the body.
    d.feed(&header(u32::MAX, FrameKind::Data as u8));
    let before = d.capacity_bytes();
    let e = d.poll_frame().unwrap_err();
    assert_eq!(
        e,
        DecodeError::FrameTooLong {
            kind: FrameKind::Data,
            frame_bytes: 8 + u64::from(u32::MAX),
            max: Limits::DEFAULT.frame_bytes_max,
        }
    );
    assert_eq!(e.close_code(), CloseCode::LIMIT);
    assert!(before <= 64, "only the header was buffered: {before}");
    assert!(
        d.capacity_bytes() <= before,
        "nothing reserved for the body"
    );
    // Later input is dropped, the error sticks.
    d.feed(&[0u8; 4096]);
    assert!(d.capacity_bytes() <= before);
    assert_eq!(d.poll_frame().unwrap_err(), e);

    // The same through the stateless entry points.
    let h = header(u32::MAX, FrameKind::Data as u8);
    assert_eq!(frame_len(&h, &Limits::DEFAULT), Err(e.clone()));
    assert_eq!(decode_frame(&h, &Limits::DEFAULT), Err(e));
}

/// A malformed frame after good ones: the good ones stay where
/// `poll_frame_at` said for `take_consumed` (a receiver keeping payloads in
/// the decoder's buffer still writes what it verified), the rest is dropped.
#[test]
fn failure_keeps_the_frames_decoded_before_it() {
    let good = Owned::Data(RequestId(3), 9, vec![7u8; 100]);
    let mut bytes = encode_all(std::slice::from_ref(&good));
    bytes.extend_from_slice(&header(u32::MAX, FrameKind::Data as u8));
    let mut d = Decoder::new(Limits::DEFAULT);
    d.receive_buffer_keeping(bytes.len())
        .extend_from_slice(&bytes);
    let (range, f) = d.poll_frame_at().unwrap().unwrap();
    assert_eq!(Owned::of(&f), good);
    assert!(d.poll_frame_at().is_err());
    // Later input is dropped, the error sticks, the good frame stays.
    d.receive_buffer_keeping(64).extend_from_slice(&[1u8; 64]);
    assert!(d.poll_frame_at().is_err());
    let kept = d.take_consumed(Vec::new());
    assert_eq!(kept.len(), range.end);
    let (again, _) = decode_frame(&kept[range], &Limits::DEFAULT)
        .unwrap()
        .unwrap();
    assert_eq!(Owned::of(&again), good);
}

#[test]
fn each_kind_is_bounded_on_its_header() {
    let limits = Limits::DEFAULT;
    // Fixed-size kinds must match exactly, even when far below frame_bytes_max.
    assert!(matches!(
        frame_len(&header(9, FrameKind::Cancel as u8), &limits),
        Err(DecodeError::WrongLength {
            kind: FrameKind::Cancel,
            body_bytes: 9,
            expected: 8
        })
    ));
    // A manifest page larger than any page the format allows.
    let too_big = 36 + MANIFEST_PAGE_BYTES_MAX + 1;
    assert!(matches!(
        frame_len(&header(too_big, FrameKind::ManifestPage as u8), &limits),
        Err(DecodeError::TooLong {
            kind: FrameKind::ManifestPage,
            ..
        })
    ));
    // An empty chunk.
    assert!(matches!(
        frame_len(&header(16, FrameKind::Data as u8), &limits),
        Err(DecodeError::TooShort {
            kind: FrameKind::Data,
            ..
        })
    ));
    // A Data frame of exactly the largest chunk passes the header check.
    let max = 16 + limits.chunk_bytes_max;
    assert_eq!(
        frame_len(&header(max, FrameKind::Data as u8), &limits),
        Ok(Some(8 + max as usize))
    );
    assert!(matches!(
        frame_len(&header(max + 1, FrameKind::Data as u8), &limits),
        Err(DecodeError::TooLong { .. })
    ));
    assert_eq!(
        frame_len(&header(0, 0), &limits),
        Err(DecodeError::UnknownKind(0))
    );
    assert_eq!(
        frame_len(&header(0, 14), &limits),
        Err(DecodeError::UnknownKind(14))
    );
    let mut reserved = header(8, FrameKind::Cancel as u8);
    reserved[7] = 1;
    assert!(matches!(
        frame_len(&reserved, &limits),
        Err(DecodeError::Malformed { .. })
    ));
    assert_eq!(frame_len(&reserved[..7], &limits), Ok(None));
}

#[test]
fn largest_chunk_round_trips_and_the_decoder_reserves_exactly() {
    let limits = Limits::DEFAULT;
    let payload = vec![0xA5u8; limits.chunk_bytes_max as usize];
    let header = data_header(RequestId(7), 99, payload.len(), &limits).unwrap();
    let mut d = Decoder::new(limits);
    d.feed(&header);
    assert_eq!(d.poll_frame(), Ok(None));
    // Room for exactly this frame was made once the header checked out.
    assert!(d.capacity_bytes() >= DATA_HEADER_BYTES + payload.len());
    assert!(d.capacity_bytes() < DATA_HEADER_BYTES + payload.len() + 4096);
    for piece in payload.chunks(16 * 1024) {
        d.feed(piece);
    }
    let f = d.poll_frame().unwrap().unwrap();
    assert_eq!(
        f,
        Frame::Data {
            request: RequestId(7),
            chunk_index: 99,
            payload: &payload,
        }
    );
    assert!(data_header(RequestId(7), 99, payload.len() + 1, &limits).is_err());
    assert!(data_header(RequestId(7), 99, 0, &limits).is_err());
    assert!(data_header(RequestId(7), 99, usize::MAX, &limits).is_err());
}

#[test]
fn data_header_matches_the_full_encoding() {
    let payload = b"chunk bytes";
    let mut full = Vec::new();
    encode(
        &Frame::Data {
            request: RequestId(3),
            chunk_index: 5,
            payload,
        },
        &Limits::DEFAULT,
        &mut full,
    )
    .unwrap();
    let header = data_header(RequestId(3), 5, payload.len(), &Limits::DEFAULT).unwrap();
    assert_eq!(&full[..DATA_HEADER_BYTES], &header);
    assert_eq!(&full[DATA_HEADER_BYTES..], payload);
}

#[test]
fn encoder_refuses_what_the_decoder_would() {
    let limits = Limits::DEFAULT;
    let blob = BlobId([1; 32]);
    let mut out = vec![1, 2, 3];
    let bad = [
        Frame::Request(Request {
            id: RequestId(1),
            blob,
            first_chunk: 0,
            chunk_count: 0,
        }),
        Frame::Request(Request {
            id: RequestId(1),
            blob,
            first_chunk: u64::MAX,
            chunk_count: 2,
        }),
        Frame::Request(Request {
            id: RequestId(1),
            blob,
            first_chunk: 0,
            chunk_count: limits.request_chunks_max + 1,
        }),
        Frame::Data {
            request: RequestId(1),
            chunk_index: 0,
            payload: &[],
        },
        Frame::Have(HaveMap {
            blob,
            first_chunk: 10,
            span_chunks: 10,
            held: Held::Runs(&[WireRun::new(5, 2)]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Runs(&[WireRun::new(4, 2), WireRun::new(5, 1)]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Runs(&[WireRun::new(8, 3)]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Runs(&[WireRun::new(1, 0)]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Bitmap(&[0xff, 0x04]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Bitmap(&[0xff]),
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: 0,
            held: Held::All,
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: u64::MAX,
            span_chunks: 2,
            held: Held::All,
        }),
        Frame::Have(HaveMap {
            blob,
            first_chunk: 0,
            span_chunks: u64::MAX,
            held: Held::Bitmap(&[]),
        }),
    ];
    for f in bad {
        assert!(encode(&f, &limits, &mut out).is_err(), "{f:?}");
        assert_eq!(out, vec![1, 2, 3], "nothing appended for {f:?}");
    }
    let long = "x".repeat(limits.close_text_bytes_max as usize + 1);
    assert!(
        encode(
            &Frame::Close {
                code: CloseCode::NORMAL,
                text: &long,
            },
            &limits,
            &mut out,
        )
        .is_err()
    );
}

#[test]
fn malformed_bodies_name_their_reason() {
    let limits = Limits::DEFAULT;
    let decode = |kind: FrameKind, body: &[u8]| {
        let mut bytes = header(body.len() as u32, kind as u8).to_vec();
        bytes.extend_from_slice(body);
        decode_frame(&bytes, &limits).map(|o| o.map(|(f, _)| Owned::of(&f)))
    };
    let mut hello = vec![0u8; 24];
    hello[..4].copy_from_slice(b"HTTP");
    assert_eq!(decode(FrameKind::Hello, &hello), Err(DecodeError::BadMagic));
    hello[..4].copy_from_slice(&HELLO_MAGIC);
    hello[6] = 1;
    assert!(matches!(
        decode(FrameKind::Hello, &hello),
        Err(DecodeError::Malformed {
            what: "flags are not zero",
            ..
        })
    ));
    assert!(matches!(
        decode(FrameKind::Close, &[0, 0, 0, 0, 0xff, 0xfe]),
        Err(DecodeError::Malformed {
            what: "reason is not UTF-8",
            ..
        })
    ));
    let mut have = vec![0u8; 52];
    have[40] = 1; // span 1
    have[48] = 9; // encoding
    assert!(matches!(
        decode(FrameKind::Have, &have),
        Err(DecodeError::Malformed {
            what: "unknown have-map encoding",
            ..
        })
    ));
    have[48] = 0; // runs, with a body that is not whole runs
    have.extend_from_slice(&[0; 5]);
    assert!(matches!(
        decode(FrameKind::Have, &have),
        Err(DecodeError::Malformed { .. })
    ));
    // A bitmap window larger than have_bitmap_bytes_max.
    let mut have = vec![0u8; 52];
    have[40..48].copy_from_slice(&(u64::from(limits.have_bitmap_bytes_max) * 8 + 1).to_le_bytes());
    have[48] = 2;
    assert!(matches!(
        decode(FrameKind::Have, &have),
        Err(DecodeError::OverLimit {
            what: "bitmap bytes",
            ..
        })
    ));
    // Too many runs.
    let small = Limits {
        have_runs_max: 2,
        ..limits
    };
    let runs = [WireRun::new(0, 1), WireRun::new(2, 1), WireRun::new(4, 1)];
    let map = Frame::Have(HaveMap {
        blob: BlobId([0; 32]),
        first_chunk: 0,
        span_chunks: 10,
        held: Held::Runs(&runs),
    });
    let mut out = Vec::new();
    encode(&map, &limits, &mut out).unwrap();
    assert!(matches!(
        decode_frame(&out, &small),
        Err(DecodeError::TooLong { .. }) | Err(DecodeError::OverLimit { .. })
    ));
}

#[test]
fn default_limits_are_consistent() {
    assert_eq!(Limits::default().validate(), Ok(()));
    let bad = Limits {
        frame_bytes_max: 1 << 20,
        ..Limits::DEFAULT
    };
    assert!(bad.validate().is_err());
}

#[test]
fn receive_buffer_appends_like_feed() {
    let limits = Limits::DEFAULT;
    let mut bytes = Vec::new();
    for i in 0..5u64 {
        encode(
            &Frame::Cancel {
                request: RequestId(i),
            },
            &limits,
            &mut bytes,
        )
        .unwrap();
    }
    let mut d = Decoder::new(limits);
    let mut got = Vec::new();
    // Append in odd-sized pieces, draining frames between appends.
    for piece in bytes.chunks(7) {
        d.receive_buffer(piece.len()).extend_from_slice(piece);
        while let Some(f) = d.poll_frame().unwrap() {
            got.push(f.kind());
        }
    }
    assert_eq!(got, vec![FrameKind::Cancel; 5]);
    assert_eq!(d.buffered_bytes(), 0);
}
