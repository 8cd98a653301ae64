//! Fuzzes the wire decoder: arbitrary bytes, fed whole and in pieces.
//!
//! Checks, beyond "never panics": every frame the stateless decoder accepts
//! re-encodes to exactly the bytes it was decoded from, and the streaming
//! `Decoder` fed in pieces (size taken from the first input byte) yields the
//! same frames and the same error, and so does one that keeps decoded frames
//! in its buffer (`receive_buffer_keeping`, as a receiver holding payloads
//! does) and hands them out every few pieces (`take_consumed`): each frame
//! is then where `poll_frame_at` said.
//!
//! Run: `cargo +nightly fuzz run frame_decoder -- -max_total_time=10`
//! (from `substrate/`). Seeds: `corpus/frame_decoder/seed-*`. Measured on
//! the 2-core machine: a cold build takes ~5.5 min with the default
//! AddressSanitizer, ~3 min with `-s none` (substrate forbids `unsafe`, so
//! ASan adds little here); 10 s then run ~0.26 M / ~1.4 M inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use substrate::wire::{self, Decoder, Limits};

fuzz_target!(|input: &[u8]| {
    let Some((&split, data)) = input.split_first() else {
        return;
    };
    let limits = Limits::DEFAULT;

    let mut whole = Vec::new();
    let mut rest = data;
    let whole_error = loop {
        match wire::decode_frame(rest, &limits) {
            Ok(Some((frame, len))) => {
                let mut again = Vec::new();
                wire::encode(&frame, &limits, &mut again).expect("a decoded frame re-encodes");
                assert_eq!(&again[..], &rest[..len], "re-encoding differs");
                whole.push(len);
                rest = &rest[len..];
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };

    let piece = usize::from(split % 64) + 1;
    let mut decoder = Decoder::new(limits);
    let mut streamed = Vec::new();
    let mut stream_error = None;
    'feed: for bytes in data.chunks(piece) {
        decoder.feed(bytes);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => {
                    let mut again = Vec::new();
                    streamed.push(wire::encode(&frame, &limits, &mut again).expect("re-encodes"));
                }
                Ok(None) => break,
                Err(e) => {
                    stream_error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(streamed, whole, "streaming and whole decoding disagree");
    assert_eq!(stream_error, whole_error);
    if stream_error.is_none() {
        assert_eq!(decoder.buffered_bytes(), rest.len());
    }

    // Keeping decoded frames, handing them out every `take_every` pieces.
    let take_every = usize::from(split >> 6) + 1;
    let mut keeper = Decoder::new(limits);
    let mut kept = Vec::new();
    let mut ranges = Vec::new();
    let mut keep_error = None;
    let mut check = |buf: Vec<u8>, ranges: &mut Vec<std::ops::Range<usize>>| {
        for r in ranges.drain(..) {
            let (frame, len) = wire::decode_frame(&buf[r.clone()], &limits)
                .expect("a kept frame decodes again")
                .expect("a kept frame is whole");
            assert_eq!(len, r.len());
            let mut again = Vec::new();
            kept.push(wire::encode(&frame, &limits, &mut again).expect("re-encodes"));
        }
    };
    'keep: for (i, bytes) in data.chunks(piece).enumerate() {
        keeper.receive_buffer_keeping(bytes.len()).extend_from_slice(bytes);
        loop {
            match keeper.poll_frame_at() {
                Ok(Some((range, _))) => ranges.push(range),
                Ok(None) => break,
                Err(e) => {
                    keep_error = Some(e);
                    break 'keep;
                }
            }
        }
        if i % take_every == 0 {
            check(keeper.take_consumed(Vec::new()), &mut ranges);
        }
    }
    check(keeper.take_consumed(Vec::new()), &mut ranges);
    assert_eq!(kept, whole, "keeping and whole decoding disagree");
    assert_eq!(keep_error, whole_error);
});
