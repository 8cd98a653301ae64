//! Encoding into caller-owned buffers.
//!
//! [`encode`] appends one whole frame to a `Vec<u8>` and then checks the
//! bytes it wrote with the decoder (a pass over the fixed parts and have-map
//! runs, never over payloads), so anything it accepts a peer with the same
//! [`Limits`] accepts too. [`data_header`] is the zero-copy path for chunk
//! payloads: 24 bytes on the stack, then the caller writes the payload slice.

use zerocopy::IntoBytes;

use super::Limits;
use super::decode::{DecodeError, decode_frame, frame_len};
use super::frame::*;
use super::have::Held;

/// A frame that its receiver would refuse; nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing to encode an invalid frame: {0}")]
pub struct EncodeError(pub DecodeError);

/// Appends `frame` to `out`; returns the bytes written. On error `out` is as
/// it was.
pub fn encode(frame: &Frame<'_>, limits: &Limits, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let kind = frame.kind();
    let body_bytes = body_len(frame);
    let frame_bytes = HEADER_BYTES as u64 + body_bytes;
    if frame_bytes > u64::from(limits.frame_bytes_max) {
        return Err(EncodeError(DecodeError::FrameTooLong {
            kind,
            frame_bytes,
            max: limits.frame_bytes_max,
        }));
    }
    let start = out.len();
    out.reserve(frame_bytes as usize);
    let header = HeaderRaw {
        // Fits: frame_bytes_max is a u32.
        body_len: (body_bytes as u32).into(),
        kind: kind as u8,
        reserved: [0; 3],
    };
    out.extend_from_slice(header.as_bytes());
    write_body(frame, out);
    debug_assert_eq!((out.len() - start) as u64, frame_bytes);
    // The decoder's rules are the format's rules: never send what it refuses.
    if let Err(e) = decode_frame(&out[start..], limits) {
        out.truncate(start);
        return Err(EncodeError(e));
    }
    Ok(frame_bytes as usize)
}

/// The 24 bytes in front of a chunk's payload in a `Data` frame. Send them,
/// then the `payload_len` payload bytes, and the peer decodes one `Data`
/// frame: the codec never touches the payload.
pub fn data_header(
    request: RequestId,
    chunk_index: u64,
    payload_len: usize,
    limits: &Limits,
) -> Result<[u8; DATA_HEADER_BYTES], EncodeError> {
    let body_bytes = (DATA_FIXED_BYTES as u64).saturating_add(payload_len as u64);
    let body_len = u32::try_from(body_bytes).map_err(|_| {
        EncodeError(DecodeError::FrameTooLong {
            kind: FrameKind::Data,
            frame_bytes: (HEADER_BYTES as u64).saturating_add(body_bytes),
            max: limits.frame_bytes_max,
        })
    })?;
    let mut out = [0u8; DATA_HEADER_BYTES];
    let header = HeaderRaw {
        body_len: body_len.into(),
        kind: FrameKind::Data as u8,
        reserved: [0; 3],
    };
    let body = DataRaw {
        request: request.0.into(),
        chunk_index: chunk_index.into(),
    };
    out[..HEADER_BYTES].copy_from_slice(header.as_bytes());
    out[HEADER_BYTES..].copy_from_slice(body.as_bytes());
    frame_len(&out, limits).map_err(EncodeError)?;
    Ok(out)
}

fn body_len(frame: &Frame<'_>) -> u64 {
    let var = |fixed: usize, n: usize| fixed as u64 + n as u64;
    match frame {
        Frame::Hello(_) => HELLO_BYTES as u64,
        Frame::Close { text, .. } => var(CLOSE_FIXED_BYTES, text.len()),
        Frame::GetManifest { .. } | Frame::NotFound { .. } => BLOB_BYTES as u64,
        Frame::ManifestRoot { root, .. } => var(MANIFEST_ROOT_FIXED_BYTES, root.len()),
        Frame::GetManifestPage { .. } => PAGE_REF_BYTES as u64,
        Frame::ManifestPage { bytes, .. } => var(MANIFEST_PAGE_FIXED_BYTES, bytes.len()),
        Frame::Have(map) => match map.held {
            Held::All => HAVE_FIXED_BYTES as u64,
            Held::Runs(runs) => var(HAVE_FIXED_BYTES, runs.len() * RUN_BYTES),
            Held::Bitmap(bits) => var(HAVE_FIXED_BYTES, bits.len()),
        },
        Frame::Request(_) => REQUEST_BYTES as u64,
        Frame::Cancel { .. } => CANCEL_BYTES as u64,
        Frame::Data { payload, .. } => var(DATA_FIXED_BYTES, payload.len()),
        Frame::Reject { .. } => REJECT_BYTES as u64,
        Frame::BadChunk { .. } => BAD_CHUNK_BYTES as u64,
    }
}

fn write_body(frame: &Frame<'_>, out: &mut Vec<u8>) {
    match frame {
        Frame::Hello(h) => out.extend_from_slice(
            HelloRaw {
                magic: HELLO_MAGIC,
                version: h.version.into(),
                flags: 0.into(),
                requests_in_flight_max: h.requests_in_flight_max.into(),
                frame_bytes_max: h.frame_bytes_max.into(),
                credit_bytes: h.credit_bytes.into(),
            }
            .as_bytes(),
        ),
        Frame::Close { code, text } => {
            out.extend_from_slice(
                CloseRaw {
                    code: code.0.into(),
                    reserved: 0.into(),
                }
                .as_bytes(),
            );
            out.extend_from_slice(text.as_bytes());
        }
        Frame::GetManifest { blob } | Frame::NotFound { blob } => out.extend_from_slice(&blob.0),
        Frame::ManifestRoot { blob, root } => {
            out.extend_from_slice(&blob.0);
            out.extend_from_slice(root);
        }
        Frame::GetManifestPage { blob, page } => out.extend_from_slice(
            PageRefRaw {
                blob: blob.0,
                page: (*page).into(),
            }
            .as_bytes(),
        ),
        Frame::ManifestPage { blob, page, bytes } => {
            out.extend_from_slice(
                PageRefRaw {
                    blob: blob.0,
                    page: (*page).into(),
                }
                .as_bytes(),
            );
            out.extend_from_slice(bytes);
        }
        Frame::Have(map) => {
            let encoding = match map.held {
                Held::Runs(_) => HAVE_RUNS,
                Held::All => HAVE_ALL,
                Held::Bitmap(_) => HAVE_BITMAP,
            };
            out.extend_from_slice(
                HaveRaw {
                    blob: map.blob.0,
                    first_chunk: map.first_chunk.into(),
                    span_chunks: map.span_chunks.into(),
                    encoding,
                    reserved: [0; 3],
                }
                .as_bytes(),
            );
            match map.held {
                Held::All => {}
                Held::Runs(runs) => out.extend_from_slice(runs.as_bytes()),
                Held::Bitmap(bits) => out.extend_from_slice(bits),
            }
        }
        Frame::Request(r) => out.extend_from_slice(
            RequestRaw {
                request: r.id.0.into(),
                blob: r.blob.0,
                first_chunk: r.first_chunk.into(),
                chunk_count: r.chunk_count.into(),
            }
            .as_bytes(),
        ),
        Frame::Cancel { request } => out.extend_from_slice(
            CancelRaw {
                request: request.0.into(),
            }
            .as_bytes(),
        ),
        Frame::Data {
            request,
            chunk_index,
            payload,
        } => {
            out.extend_from_slice(
                DataRaw {
                    request: request.0.into(),
                    chunk_index: (*chunk_index).into(),
                }
                .as_bytes(),
            );
            out.extend_from_slice(payload);
        }
        Frame::Reject { request, code } => out.extend_from_slice(
            RejectRaw {
                request: request.0.into(),
                code: code.0.into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        ),
        Frame::BadChunk { blob, chunk_index } => out.extend_from_slice(
            BadChunkRaw {
                blob: blob.0,
                chunk_index: (*chunk_index).into(),
            }
            .as_bytes(),
        ),
    }
}
