//! Frame kinds, their in-memory form ([`Frame`]) and their byte layouts
//! (the `*Raw` structs, read and written with `zerocopy`).

use engine::hash::BlobId;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::have::HaveMap;

/// Bytes of the header in front of every frame.
pub const HEADER_BYTES: usize = size_of::<HeaderRaw>();
/// Bytes in front of a chunk's payload in a `Data` frame (header + fixed body).
pub const DATA_HEADER_BYTES: usize = HEADER_BYTES + DATA_FIXED_BYTES;
/// First bytes of every `Hello` body: "Vigo Wire Protocol".
pub const HELLO_MAGIC: [u8; 4] = *b"VGWP";

pub(crate) const HELLO_BYTES: usize = size_of::<HelloRaw>();
pub(crate) const CLOSE_FIXED_BYTES: usize = size_of::<CloseRaw>();
pub(crate) const BLOB_BYTES: usize = size_of::<BlobRaw>();
pub(crate) const MANIFEST_ROOT_FIXED_BYTES: usize = BLOB_BYTES;
pub(crate) const PAGE_REF_BYTES: usize = size_of::<PageRefRaw>();
pub(crate) const MANIFEST_PAGE_FIXED_BYTES: usize = PAGE_REF_BYTES;
pub(crate) const HAVE_FIXED_BYTES: usize = size_of::<HaveRaw>();
pub(crate) const RUN_BYTES: usize = size_of::<WireRun>();
pub(crate) const REQUEST_BYTES: usize = size_of::<RequestRaw>();
pub(crate) const CANCEL_BYTES: usize = size_of::<CancelRaw>();
pub(crate) const DATA_FIXED_BYTES: usize = size_of::<DataRaw>();
pub(crate) const REJECT_BYTES: usize = size_of::<RejectRaw>();
pub(crate) const BAD_CHUNK_BYTES: usize = size_of::<BadChunkRaw>();

const _: () = assert!(HEADER_BYTES == 8);
const _: () = assert!(HELLO_BYTES == 24);
const _: () = assert!(CLOSE_FIXED_BYTES == 4);
const _: () = assert!(PAGE_REF_BYTES == 36);
const _: () = assert!(HAVE_FIXED_BYTES == 52);
const _: () = assert!(RUN_BYTES == 12);
const _: () = assert!(REQUEST_BYTES == 52);
const _: () = assert!(DATA_HEADER_BYTES == 24);
const _: () = assert!(REJECT_BYTES == 12);
const _: () = assert!(BAD_CHUNK_BYTES == 40);

/// The kind byte of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Close = 2,
    GetManifest = 3,
    ManifestRoot = 4,
    GetManifestPage = 5,
    ManifestPage = 6,
    NotFound = 7,
    Have = 8,
    Request = 9,
    Cancel = 10,
    Data = 11,
    Reject = 12,
    BadChunk = 13,
}

impl FrameKind {
    pub const ALL: [FrameKind; 13] = [
        FrameKind::Hello,
        FrameKind::Close,
        FrameKind::GetManifest,
        FrameKind::ManifestRoot,
        FrameKind::GetManifestPage,
        FrameKind::ManifestPage,
        FrameKind::NotFound,
        FrameKind::Have,
        FrameKind::Request,
        FrameKind::Cancel,
        FrameKind::Data,
        FrameKind::Reject,
        FrameKind::BadChunk,
    ];

    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        FrameKind::ALL
            .get(usize::from(byte).checked_sub(1)?)
            .copied()
    }
}

/// Identifies one request on one connection, chosen by the requester. Must
/// not be reused while a request with that id is outstanding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Why a connection is being closed. Unknown codes are kept as they are so a
/// newer peer's reason can still be logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Nothing more to say; no error.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// A malformed or unexpected frame.
    pub const PROTOCOL: CloseCode = CloseCode(1);
    /// No protocol version in common.
    pub const VERSION: CloseCode = CloseCode(2);
    /// A named resource limit was exceeded (frame size, credit, request rate…).
    pub const LIMIT: CloseCode = CloseCode(3);
    /// The connection was idle for too long.
    pub const IDLE: CloseCode = CloseCode(4);
    /// The sender is shutting down.
    pub const SHUTDOWN: CloseCode = CloseCode(5);
    /// The sender failed internally (not the receiver's fault).
    pub const INTERNAL: CloseCode = CloseCode(6);
    /// The peer is not (or no longer) allowed to talk to the sender.
    pub const REFUSED: CloseCode = CloseCode(7);
}

/// Why a request is answered without (more) data. After a `Reject` no `Data`
/// frame for that request follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RejectCode(pub u16);

impl RejectCode {
    /// Acknowledges a `Cancel`.
    pub const CANCELED: RejectCode = RejectCode(1);
    /// The sender does not hold the blob or some chunk of the run.
    pub const NOT_HELD: RejectCode = RejectCode(2);
    /// The sender's request rate limit: try again later.
    pub const BUSY: RejectCode = RejectCode(3);
    /// The blob is held but not served (quarantined after a failed check).
    pub const UNAVAILABLE: RejectCode = RejectCode(4);
}

/// The first frame each side sends: protocol version and the sender's own
/// receive limits, so a well-behaved peer never exceeds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    pub version: u16,
    /// Most requests the sender serves at once for this connection.
    pub requests_in_flight_max: u32,
    /// Largest frame the sender accepts, in bytes.
    pub frame_bytes_max: u32,
    /// Bytes the peer may have requested from the sender and not yet
    /// received (the connection's credit).
    pub credit_bytes: u64,
}

/// A request for a run of consecutive chunks of one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub id: RequestId,
    pub blob: BlobId,
    pub first_chunk: u64,
    pub chunk_count: u32,
}

impl Request {
    /// Chunk indices `first_chunk..first_chunk + chunk_count`.
    pub fn chunks(&self) -> std::ops::Range<u64> {
        self.first_chunk..self.first_chunk.saturating_add(u64::from(self.chunk_count))
    }
}

/// One decoded frame. Variable parts borrow from the bytes it was decoded
/// from (or, when encoding, from the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    /// Closes the connection: a code and a short UTF-8 reason for the log.
    Close {
        code: CloseCode,
        text: &'a str,
    },
    /// Asks for the manifest root of `blob`.
    GetManifest {
        blob: BlobId,
    },
    /// Root bytes of `blob`'s manifest; the receiver checks them against the
    /// id (`ManifestRoot::decode_verified`) before using them.
    ManifestRoot {
        blob: BlobId,
        root: &'a [u8],
    },
    /// Asks for page `page` of `blob`'s manifest.
    GetManifestPage {
        blob: BlobId,
        page: u32,
    },
    /// Bytes of manifest page `page`; checked against the verified root.
    ManifestPage {
        blob: BlobId,
        page: u32,
        bytes: &'a [u8],
    },
    /// The sender does not hold `blob` (answers `GetManifest*`).
    NotFound {
        blob: BlobId,
    },
    /// Which chunks of a window of a blob the sender holds.
    Have(HaveMap<'a>),
    Request(Request),
    /// Asks the peer to stop serving a request; answered by
    /// `Reject { code: CANCELED }` unless the request had already finished.
    Cancel {
        request: RequestId,
    },
    /// One chunk of a request's run. A request's chunks are sent in
    /// ascending order, each once; requests may interleave.
    Data {
        request: RequestId,
        chunk_index: u64,
        payload: &'a [u8],
    },
    /// Ends a request early (see [`RejectCode`]).
    Reject {
        request: RequestId,
        code: RejectCode,
    },
    /// The sender received chunk `chunk_index` of `blob` from the peer and it
    /// failed verification: the peer should re-verify its copy.
    BadChunk {
        blob: BlobId,
        chunk_index: u64,
    },
}

impl Frame<'_> {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Close { .. } => FrameKind::Close,
            Frame::GetManifest { .. } => FrameKind::GetManifest,
            Frame::ManifestRoot { .. } => FrameKind::ManifestRoot,
            Frame::GetManifestPage { .. } => FrameKind::GetManifestPage,
            Frame::ManifestPage { .. } => FrameKind::ManifestPage,
            Frame::NotFound { .. } => FrameKind::NotFound,
            Frame::Have(_) => FrameKind::Have,
            Frame::Request(_) => FrameKind::Request,
            Frame::Cancel { .. } => FrameKind::Cancel,
            Frame::Data { .. } => FrameKind::Data,
            Frame::Reject { .. } => FrameKind::Reject,
            Frame::BadChunk { .. } => FrameKind::BadChunk,
        }
    }
}

// ---- byte layouts ---------------------------------------------------------

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct HeaderRaw {
    pub body_len: U32,
    pub kind: u8,
    pub reserved: [u8; 3],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct HelloRaw {
    pub magic: [u8; 4],
    pub version: U16,
    pub flags: U16,
    pub requests_in_flight_max: U32,
    pub frame_bytes_max: U32,
    pub credit_bytes: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct CloseRaw {
    pub code: U16,
    pub reserved: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlobRaw {
    pub blob: [u8; 32],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct PageRefRaw {
    pub blob: [u8; 32],
    pub page: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct HaveRaw {
    pub blob: [u8; 32],
    pub first_chunk: U64,
    pub span_chunks: U64,
    pub encoding: u8,
    pub reserved: [u8; 3],
}

/// One run of a `Have` frame in its wire form (chunks `first..first+count`),
/// borrowed straight from the frame bytes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct WireRun {
    first: U64,
    count: U32,
}

impl WireRun {
    pub fn new(first: u64, count: u32) -> Self {
        WireRun {
            first: first.into(),
            count: count.into(),
        }
    }
    pub fn first(&self) -> u64 {
        self.first.get()
    }
    pub fn count(&self) -> u32 {
        self.count.get()
    }
    /// One past the last chunk (saturating; decoding rejects overflow).
    pub fn end(&self) -> u64 {
        self.first().saturating_add(u64::from(self.count()))
    }
}

impl std::fmt::Debug for WireRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.first(), self.end())
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct RequestRaw {
    pub request: U64,
    pub blob: [u8; 32],
    pub first_chunk: U64,
    pub chunk_count: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct CancelRaw {
    pub request: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct DataRaw {
    pub request: U64,
    pub chunk_index: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct RejectRaw {
    pub request: U64,
    pub code: U16,
    pub reserved: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(crate) struct BadChunkRaw {
    pub blob: [u8; 32],
    pub chunk_index: U64,
}

/// Have-map encodings (the `encoding` byte).
pub(crate) const HAVE_RUNS: u8 = 0;
pub(crate) const HAVE_ALL: u8 = 1;
pub(crate) const HAVE_BITMAP: u8 = 2;
