//! Golden byte vectors: the wire format, version 1, may not change
//! silently. Each vector is written out field by field from
//! `docs/wire-format.md`, not captured from the encoder, so this test also
//! checks the document against the code. Changing a vector means a new
//! protocol version (and ALPN id).

use engine::hash::BlobId;
use substrate::wire::{
    self, CloseCode, Frame, HaveMap, Held, Hello, Limits, RejectCode, Request, RequestId, WireRun,
};

fn hex(parts: &[&str]) -> Vec<u8> {
    let joined: String = parts.concat().split_whitespace().collect();
    hex::decode(joined).expect("valid hex in a golden vector")
}

fn rep(byte: &str, n: usize) -> String {
    byte.repeat(n)
}

fn check(frame: Frame<'_>, golden: &[u8]) {
    let limits = Limits::DEFAULT;
    let mut out = Vec::new();
    wire::encode(&frame, &limits, &mut out).unwrap();
    assert_eq!(
        hex::encode(&out),
        hex::encode(golden),
        "encoding of {frame:?}"
    );
    let (back, len) = wire::decode_frame(golden, &limits).unwrap().unwrap();
    assert_eq!(len, golden.len());
    assert_eq!(back, frame);
}

#[test]
fn hello() {
    check(
        Frame::Hello(Hello {
            version: 1,
            requests_in_flight_max: 16,
            frame_bytes_max: (16 << 20) + 4096,
            credit_bytes: 32 << 20,
        }),
        &hex(&[
            "18000000 01 000000", // body 24 bytes, kind 1 Hello
            "56475750",           // magic "VGWP"
            "0100 0000",          // version 1, flags 0
            "10000000",           // requests_in_flight_max 16
            "00100001",           // frame_bytes_max 16 MiB + 4 KiB
            "0000000200000000",   // credit_bytes 32 MiB
        ]),
    );
}

#[test]
fn close() {
    check(
        Frame::Close {
            code: CloseCode::PROTOCOL,
            text: "bad",
        },
        &hex(&["07000000 02 000000", "0100 0000", "626164"]),
    );
}

#[test]
fn get_manifest_page() {
    check(
        Frame::GetManifestPage {
            blob: BlobId([0x55; 32]),
            page: 2,
        },
        &hex(&["24000000 05 000000", &rep("55", 32), "02000000"]),
    );
}

#[test]
fn request() {
    check(
        Frame::Request(Request {
            id: RequestId(0x0102_0304_0506_0708),
            blob: BlobId([0xab; 32]),
            first_chunk: 4096,
            chunk_count: 512,
        }),
        &hex(&[
            "34000000 09 000000", // body 52 bytes, kind 9 Request
            "0807060504030201",   // request id
            &rep("ab", 32),       // blob id
            "0010000000000000",   // first_chunk 4096
            "00020000",           // chunk_count 512
        ]),
    );
}

#[test]
fn cancel_and_reject() {
    check(
        Frame::Cancel {
            request: RequestId(7),
        },
        &hex(&["08000000 0a 000000", "0700000000000000"]),
    );
    check(
        Frame::Reject {
            request: RequestId(7),
            code: RejectCode::CANCELED,
        },
        &hex(&["0c000000 0c 000000", "0700000000000000", "0100 0000"]),
    );
}

#[test]
fn data_and_its_zero_copy_header() {
    let golden = hex(&[
        "15000000 0b 000000", // body 16 + 5 bytes, kind 11 Data
        "0700000000000000",   // request id 7
        "6300000000000000",   // chunk index 99
        "68656c6c6f",         // payload "hello"
    ]);
    check(
        Frame::Data {
            request: RequestId(7),
            chunk_index: 99,
            payload: b"hello",
        },
        &golden,
    );
    let header = wire::data_header(RequestId(7), 99, 5, &Limits::DEFAULT).unwrap();
    assert_eq!(&golden[..wire::DATA_HEADER_BYTES], &header);
}

#[test]
fn have_maps() {
    check(
        Frame::Have(HaveMap::all(BlobId([0x11; 32]), 0, 1000)),
        &hex(&[
            "34000000 08 000000", // body 52 bytes, kind 8 Have
            &rep("11", 32),
            "0000000000000000", // first_chunk 0
            "e803000000000000", // span_chunks 1000
            "01 000000",        // encoding 1 All
        ]),
    );
    let runs = [WireRun::new(4100, 10), WireRun::new(5000, 1)];
    check(
        Frame::Have(HaveMap {
            blob: BlobId([0x22; 32]),
            first_chunk: 4096,
            span_chunks: 4096,
            held: Held::Runs(&runs),
        }),
        &hex(&[
            "4c000000 08 000000", // body 52 + 2 × 12 bytes
            &rep("22", 32),
            "0010000000000000",
            "0010000000000000",
            "00 000000",                 // encoding 0 Runs
            "0410000000000000 0a000000", // 4100, 10 chunks
            "8813000000000000 01000000", // 5000, 1 chunk
        ]),
    );
    check(
        Frame::Have(HaveMap {
            blob: BlobId([0x33; 32]),
            first_chunk: 0,
            span_chunks: 10,
            held: Held::Bitmap(&[0b0000_0101, 0b0000_0010]),
        }),
        &hex(&[
            "36000000 08 000000", // body 52 + 2 bytes
            &rep("33", 32),
            "0000000000000000",
            "0a00000000000000", // span 10 chunks
            "02 000000",        // encoding 2 Bitmap
            "0502",             // chunks 0, 2 and 9
        ]),
    );
}

#[test]
fn bad_chunk() {
    check(
        Frame::BadChunk {
            blob: BlobId([0x44; 32]),
            chunk_index: 3,
        },
        &hex(&["28000000 0d 000000", &rep("44", 32), "0300000000000000"]),
    );
}

#[test]
fn protocol_constants() {
    assert_eq!(wire::PROTOCOL_VERSION, 1);
    assert_eq!(wire::ALPN_V1, b"vigo/1");
    assert_eq!(wire::HEADER_BYTES, 8);
    assert_eq!(wire::DATA_HEADER_BYTES, 24);
}
