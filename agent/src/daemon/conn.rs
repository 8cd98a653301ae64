//! One peer connection: a reader task and a writer task around a TLS stream.
//!
//! Both directions of a connection speak the same protocol, so every
//! connection serves (its writer runs an `Uploader` for the peer's
//! requests) and may carry one fetch (a [`Tap`]: the fetch that dialed it).
//!
//! # Reader
//! Reads TLS records straight into the `Decoder`'s buffer and opens them there
//! (`record::RecordReader::read_into`), then decodes frames.
//! Requests for us (`GetManifest*`, `Request`, `Cancel`) go to the writer;
//! answers (`ManifestRoot`, `ManifestPage`, `NotFound`, `Have`, `Reject`)
//! go to the tap's fetch as encoded frames. `Data` is the hot path: the
//! payload stays where it was decrypted, in the decoder's buffer, which is
//! handed to the connection's `Intake` as a batch, verified against the
//! manifest and written at its offset on the blocking pool while this reader
//! decrypts the next frames; only verdicts travel to the fetch.
//!
//! # Writer
//! Owns the write half (`record::RecordWriter`, which buffers records like the
//! `BufWriter` it replaced), the `Uploader` (credit, request
//! rate, upload rate) and the queue of outgoing frames. Between chunks it
//! takes new messages (so a `Cancel` is seen promptly) and flushes when it
//! has nothing more to send.
//!
//! # Copies per payload byte
//! See ARCHITECTURE.md ("The transfer data path"): serving, mapped file →
//! the record being filled (encrypted in place) → kernel; receiving, kernel →
//! the `Decoder`'s buffer (decrypted in place there), which becomes the intake
//! batch → the aligned slab of a direct write.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use engine::hash::BlobId;
use engine::store::PartialWriter;
use substrate::rate::TokenBucket;
use substrate::sched::{PeerId, Verdict};
use substrate::serve::{Transmit, Uploader};
use substrate::wire::{
    self, CloseCode, DecodeError, Decoder, Frame, HaveMap, Limits, RejectCode, Request,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};

use super::intake::Intake;
use super::{Daemon, instant, now};
use crate::identity::PeerKey;
use crate::record::RecordReader;
use crate::tls::TlsStream;

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 256 << 10;
/// Bytes read at a time at least, however little room the intake's batch has
/// left (`Intake::room`).
const READ_BYTES_MIN: usize = 32 << 10;
/// Messages queued for a writer before senders wait.
const WRITER_QUEUE: usize = 1024;

/// What a connection tells the fetch it carries.
#[derive(Debug)]
pub(crate) enum PeerEvent {
    /// A non-`Data` frame for the fetch, encoded.
    Frame(Vec<u8>),
    /// Chunks arrived (a batch of them, in arrival order); `Ok` means the
    /// chunk verified and was written.
    Chunks(Vec<ChunkVerdict>),
    /// Writing a verified chunk failed locally (disk full, IO error): the
    /// fetch must stop, the peer is not at fault.
    LocalError(String),
    /// The connection ended: lane `lane` of its source ([`Tap::lane`]).
    Closed { lane: u32, why: String },
}

/// One received chunk's outcome.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkVerdict {
    pub request: wire::RequestId,
    pub index: u64,
    pub verdict: Verdict,
    pub bytes: u32,
}

/// The fetch side of a connection: where its answers go.
#[derive(Clone)]
pub(crate) struct Tap {
    pub peer: PeerId,
    /// Which of the fetch's connections to this source this is.
    pub lane: u32,
    /// Bounded ([`super::fetch::EVENTS_QUEUE`]): a connection whose
    /// fetch lags waits, instead of queueing what its peer sends without end.
    pub events: mpsc::Sender<(PeerId, PeerEvent)>,
    /// Set once the manifest is known and the partial blob exists.
    pub writer: Arc<OnceLock<Arc<PartialWriter>>>,
    /// Intakes receiving for this fetch (they share its batch memory).
    pub intakes: Arc<super::intake::FetchIntakes>,
}

/// Messages for a connection's writer.
enum Out {
    /// An encoded frame to send as is.
    Frame(Vec<u8>),
    /// A request from the peer, for the uploader.
    Request(Request),
    Cancel(wire::RequestId),
    /// `GetManifest` (page `None`) or `GetManifestPage`, counted while
    /// queued ([`ManifestQueue`]).
    Manifest(BlobId, Option<u32>, Queued),
    /// Close with a code and reason after what is queued.
    Close(CloseCode, String),
}

/// A running connection.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    pub peer: PeerKey,
    out: mpsc::Sender<Out>,
    done: Arc<Notify>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<Mutex<Vec<Box<dyn Send>>>>,
}

impl ConnHandle {
    /// Queues an encoded frame; `false` when the connection is gone.
    pub async fn send(&self, frame: Vec<u8>) -> bool {
        self.out.send(Out::Frame(frame)).await.is_ok()
    }

    /// Closes after what is queued.
    pub async fn close(&self, code: CloseCode, why: &str) {
        let _ = self.out.send(Out::Close(code, why.to_owned())).await;
    }

    /// Waits until both tasks ended.
    pub async fn closed(&self) {
        loop {
            let notified = self.done.notified();
            if self.finished.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Keeps `thing` alive as long as the connection (its slot).
    pub fn hold(&self, thing: impl Send + 'static) {
        self.held.lock().expect("poisoned").push(Box::new(thing));
    }
}

/// Encodes a frame with the default limits (frames we build are valid).
pub(crate) fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode(frame, &Limits::DEFAULT, &mut out).expect("frames built here are valid");
    out
}

/// Starts the tasks of a connection that completed its handshake.
pub(crate) fn start(
    daemon: &Arc<Daemon>,
    stream: TlsStream,
    peer: PeerKey,
    remote: SocketAddr,
    tap: Option<Tap>,
) -> ConnHandle {
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let handle = ConnHandle {
        peer,
        out: tx.clone(),
        done: Arc::new(Notify::new()),
        finished: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        held: Arc::new(Mutex::new(Vec::new())),
    };
    let uploader = Uploader::new(
        substrate::Timestamp::ZERO,
        daemon.config.serve_limits().expect("validated at load"),
    );
    let epoch = Instant::now();
    let writer = tokio::spawn(write_loop(
        Arc::clone(daemon),
        write,
        rx,
        uploader,
        epoch,
        peer,
        remote,
    ));
    let reader = tokio::spawn(read_loop(Arc::clone(daemon), read, tx, tap.clone(), peer));
    let h = handle.clone();
    tokio::spawn(async move {
        // The reader ends on EOF, error, a bad frame or the writer's end;
        // the writer ends when every sender is gone (the reader's clone and
        // all handles) or on Close. Either way, tell the fetch and release
        // the slot.
        let why = match reader.await {
            Ok(why) => why,
            Err(e) => format!("reader task failed: {e}"),
        };
        let _ = h
            .out
            .send(Out::Close(CloseCode::NORMAL, String::new()))
            .await;
        let _ = writer.await;
        if let Some(tap) = tap {
            let lane = tap.lane;
            let _ = tap
                .events
                .send((tap.peer, PeerEvent::Closed { lane, why }))
                .await;
        }
        h.held.lock().expect("poisoned").clear();
        h.finished.store(true, Ordering::Release);
        h.done.notify_waiters();
    });
    handle
}

async fn read_loop(
    daemon: Arc<Daemon>,
    mut read: RecordReader<OwnedReadHalf>,
    out: mpsc::Sender<Out>,
    tap: Option<Tap>,
    peer: PeerKey,
) -> String {
    let mut decoder = Decoder::new(Limits::DEFAULT);
    let mut intake: Option<Intake> = None;
    let why = read_frames(
        &daemon,
        &mut read,
        &out,
        tap.as_ref(),
        peer,
        &mut decoder,
        &mut intake,
    )
    .await;
    // Verdicts of what was received reach the fetch before `Closed`.
    if let Some(i) = intake {
        i.finish(&mut decoder).await;
    }
    why
}

async fn read_frames(
    daemon: &Arc<Daemon>,
    read: &mut RecordReader<OwnedReadHalf>,
    out: &mpsc::Sender<Out>,
    tap: Option<&Tap>,
    peer: PeerKey,
    decoder: &mut Decoder,
    intake: &mut Option<Intake>,
) -> String {
    let idle = daemon.config.idle_timeout();
    let mut shutdown = daemon.shutting_down();
    let mut reports = BadChunkReports::default();
    let manifests = ManifestQueue::default();
    let epoch = Instant::now();
    let mut haves = TokenBucket::new(substrate::Timestamp::ZERO, HAVES_PER_S, HAVES_BURST);
    // Once this side has closed: reading ends then (see `CLOSING_READS`).
    let mut closing: Option<Instant> = None;
    loop {
        // Payloads of the batch being filled stay in the decoder's buffer
        // until it is handed over (see `intake`).
        let keep = intake.as_ref().is_some_and(Intake::holds_payloads);
        // At most READ_BYTES a read (a kept buffer grows by doubling), and
        // little more than the batch being filled has room for.
        let max = intake
            .as_ref()
            .map_or(READ_BYTES, |i| i.room().clamp(READ_BYTES_MIN, READ_BYTES));
        let wait = closing.map_or(idle, |end| end.saturating_duration_since(Instant::now()));
        tokio::select! {
            r = tokio::time::timeout(wait, read.read_into(decoder, keep, max)) => match r {
                Err(_) if closing.is_some() => return "closed from this side".into(),
                Err(_) => {
                    let why = format!("idle for {idle:?}");
                    let _ = out.send(Out::Close(CloseCode::IDLE, why.clone())).await;
                    return why;
                }
                Ok(Ok(false)) => return "closed by peer".into(),
                Ok(Ok(true)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // A TLS record the peer should not have sent, or one
                    // changed on the way: say why (our sending direction
                    // is unharmed), so that the peer's log has the reason
                    // too, not just a connection that ended.
                    tracing::warn!("closing connection to {peer}: {e}");
                    let _ = out.send(Out::Close(CloseCode::PROTOCOL, e.to_string())).await;
                    return format!("read failed: {e}");
                }
                Ok(Err(e)) => return format!("read failed: {e}"),
            },
            b = async { intake.as_mut().expect("guarded").returned().await }, if intake.is_some() => {
                if let Err(why) = intake.as_mut().expect("guarded").on_returned(b, decoder).await {
                    return why;
                }
                continue;
            }
            _ = shutdown.changed() => {
                let _ = out.send(Out::Close(CloseCode::SHUTDOWN, "shutting down".into())).await;
                return "shutting down".into();
            }
            // This side has closed (the writer sent `Close`, or failed): a
            // peer that talks on must not keep the connection, its slot and
            // its intake for as long as it likes; what it sent before it
            // saw the close (a bad-chunk report) is still read.
            () = out.closed(), if closing.is_none() => {
                closing = Some(Instant::now() + CLOSING_READS);
                continue;
            }
        };
        loop {
            let (at, frame) = match decoder.poll_frame_at() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return refuse(out, peer, &e).await,
            };
            let handled = match frame {
                Frame::BadChunk { blob, chunk_index } => {
                    reports.report(daemon, out, peer, blob, chunk_index).await
                }
                Frame::GetManifest { blob } => manifests.queue(out, peer, blob, None).await,
                Frame::GetManifestPage { blob, page } => {
                    manifests.queue(out, peer, blob, Some(page)).await
                }
                Frame::Have(_) if !within_rate(&mut haves, epoch) => {
                    let why = format!("more than {HAVES_PER_S} Have frames a second");
                    violation(out, peer, &why).await
                }
                frame => on_frame(out, tap, peer, intake, at, frame).await,
            };
            if let Err(why) = handled {
                return why;
            }
            if let Some(i) = intake.as_mut()
                && let Err(why) = i.hand_over_if_due(decoder).await
            {
                return why;
            }
        }
        if let Some(i) = intake.as_mut()
            && let Err(why) = i.drained(decoder).await
        {
            return why;
        }
    }
}

async fn refuse(out: &mpsc::Sender<Out>, peer: PeerKey, e: &DecodeError) -> String {
    tracing::warn!("closing connection to {peer}: malformed frame: {e}");
    let _ = out.send(Out::Close(e.close_code(), e.to_string())).await;
    format!("malformed frame: {e}")
}

/// Handles one frame, which lies at `at` in the decoder's buffer; `Err(reason)`
/// closes the connection.
async fn on_frame(
    out: &mpsc::Sender<Out>,
    tap: Option<&Tap>,
    peer: PeerKey,
    intake: &mut Option<Intake>,
    at: std::ops::Range<usize>,
    frame: Frame<'_>,
) -> Result<(), String> {
    let to_writer = |m| async { out.send(m).await.map_err(|_| "writer gone".to_string()) };
    match frame {
        Frame::Hello(h) => {
            if h.version != wire::PROTOCOL_VERSION {
                let why = format!("peer speaks protocol version {}", h.version);
                let _ = out.send(Out::Close(CloseCode::VERSION, why.clone())).await;
                return Err(why);
            }
            if let Some(t) = tap {
                let _ = t
                    .events
                    .send((t.peer, PeerEvent::Frame(encode(&frame))))
                    .await;
            }
        }
        Frame::Close { code, text } => {
            if code != CloseCode::NORMAL && code != CloseCode::SHUTDOWN {
                tracing::warn!("peer {peer} closed the connection: code {} {text}", code.0);
            }
            return Err(format!("peer closed: code {} {text}", code.0));
        }
        Frame::Request(r) => to_writer(Out::Request(r)).await?,
        Frame::Cancel { request } => to_writer(Out::Cancel(request)).await?,
        // `read_frames` takes these first (`BadChunkReports`, `ManifestQueue`).
        Frame::BadChunk { .. } | Frame::GetManifest { .. } | Frame::GetManifestPage { .. } => {}
        Frame::ManifestRoot { .. }
        | Frame::ManifestPage { .. }
        | Frame::NotFound { .. }
        | Frame::Have(_)
        | Frame::Reject { .. } => {
            let Some(t) = tap else {
                return violation(out, peer, "answer frame on a connection that asked nothing")
                    .await;
            };
            // Behind the verdicts of the chunks that arrived before it.
            let frame = match intake {
                Some(i) => i.push_frame(encode(&frame)),
                None => Some(encode(&frame)),
            };
            if let Some(f) = frame {
                let _ = t.events.send((t.peer, PeerEvent::Frame(f))).await;
            }
        }
        Frame::Data {
            request,
            chunk_index,
            payload,
        } => {
            let Some(t) = tap else {
                return violation(out, peer, "data on a connection that requested nothing").await;
            };
            let intake = match intake {
                Some(i) => i,
                None => {
                    let Some(writer) = t.writer.get() else {
                        return violation(out, peer, "data before any request").await;
                    };
                    intake.insert(Intake::start(t, Arc::clone(writer)))
                }
            };
            // The payload is the frame's last bytes; it stays there.
            intake.push(request, chunk_index, at.end - payload.len(), payload.len());
        }
    }
    Ok(())
}

async fn violation(out: &mpsc::Sender<Out>, peer: PeerKey, why: &str) -> Result<(), String> {
    tracing::warn!("closing connection to {peer}: protocol violation: {why}");
    let _ = out
        .send(Out::Close(CloseCode::PROTOCOL, why.to_owned()))
        .await;
    Err(format!("protocol violation: {why}"))
}

/// How long a connection's reader goes on after its writer ended (this side
/// closed, or the peer stopped taking what it sends): frames the peer sent
/// before it saw the close are still handled. A source that a fetch bans
/// for a corrupt chunk sends `BadChunk` and closes; the source, still
/// sending, gets a broken pipe, and its reader used to stop at once with
/// the report unread in its socket (the blob was never re-checked: seen
/// once in CI, `corrupt_source_is_banned_told_and_quarantines`).
const CLOSING_READS: Duration = Duration::from_secs(1);

/// Manifest requests a peer may have waiting for answers on one connection.
/// Answers are paced by the request and upload rates, and the writer works
/// through them one by one: a peer queueing more would hold the writer (and
/// whatever else is queued for it, a `Close` too) for as long as it likes.
/// A fetch asks [`super::fetch`]'s `PAGE_WINDOW` (16) pages of a source at
/// once.
const MANIFEST_REQUESTS_QUEUED_MAX: usize = 64;

/// The manifest requests of one connection waiting for the writer.
#[derive(Default)]
struct ManifestQueue(Arc<ManifestQueueState>);

#[derive(Default)]
struct ManifestQueueState {
    queued: AtomicUsize,
    /// The peer queued too many: those still queued are not answered.
    refused: AtomicBool,
}

/// One of them: counted until the writer is done with it.
struct Queued(Arc<ManifestQueueState>);

impl Queued {
    /// Whether the connection is being closed for queueing too many.
    fn refused(&self) -> bool {
        self.0.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ManifestQueue {
    /// Queues a manifest request for the writer, or closes the connection
    /// past [`MANIFEST_REQUESTS_QUEUED_MAX`].
    async fn queue(
        &self,
        out: &mpsc::Sender<Out>,
        peer: PeerKey,
        blob: BlobId,
        page: Option<u32>,
    ) -> Result<(), String> {
        if self.0.queued.load(Ordering::Relaxed) >= MANIFEST_REQUESTS_QUEUED_MAX {
            self.0.refused.store(true, Ordering::Relaxed);
            let why =
                format!("more than {MANIFEST_REQUESTS_QUEUED_MAX} manifest requests unanswered");
            return violation(out, peer, &why).await;
        }
        self.0.queued.fetch_add(1, Ordering::Relaxed);
        let queued = Queued(Arc::clone(&self.0));
        out.send(Out::Manifest(blob, page, queued))
            .await
            .map_err(|_| "writer gone".to_string())
    }
}

/// `Have` frames a connection may send per second, and in a burst: each
/// makes the fetch's scheduler go over every chunk of the blob (~500 k for
/// 4 GiB), so a flood of them would keep it from everything else. More is
/// a protocol violation.
const HAVES_PER_S: u64 = 16;
const HAVES_BURST: u64 = 64;

/// Takes one token from `bucket` if it has one (time since `epoch`).
fn within_rate(bucket: &mut TokenBucket, epoch: Instant) -> bool {
    let at = now(epoch);
    let ready = bucket.is_ready(at);
    if ready {
        bucket.charge(at, 1);
    }
    ready
}

/// Bad-chunk reports one connection may make; the next one closes it with
/// `LIMIT`. A peer that received a bad chunk from us bans us for that blob,
/// so an honest one reports about one per blob it fetches.
const BAD_CHUNK_REPORTS_MAX: u32 = 16;

/// A connection's bad-chunk reports: each re-verifies a chunk (reads and
/// hashes up to 4 MiB on the blocking pool every fetch shares), so there
/// are at most [`BAD_CHUNK_REPORTS_MAX`], re-checked one at a time: one
/// that comes while the last is being checked is logged and not checked.
#[derive(Default)]
struct BadChunkReports {
    made: u32,
    checking: Arc<std::sync::atomic::AtomicBool>,
}

impl BadChunkReports {
    async fn report(
        &mut self,
        daemon: &Arc<Daemon>,
        out: &mpsc::Sender<Out>,
        peer: PeerKey,
        blob: BlobId,
        index: u64,
    ) -> Result<(), String> {
        self.made += 1;
        if self.made > BAD_CHUNK_REPORTS_MAX {
            let why = format!("more than {BAD_CHUNK_REPORTS_MAX} bad-chunk reports");
            tracing::warn!("closing connection to {peer}: {why}");
            let _ = out.send(Out::Close(CloseCode::LIMIT, why.clone())).await;
            return Err(why);
        }
        if self.checking.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "peer {peer} reports chunk {index} of {blob} as bad: not re-verified, \
                 its previous report still is"
            );
            return Ok(());
        }
        tracing::warn!("peer {peer} reports chunk {index} of {blob} as bad: re-verifying");
        let d = Arc::clone(daemon);
        let checking = Arc::clone(&self.checking);
        tokio::task::spawn_blocking(move || {
            recheck(&d, &blob, index);
            checking.store(false, Ordering::Release);
        });
        Ok(())
    }
}

/// Re-verifies one chunk a peer reported bad; quarantines the blob (stops
/// serving it) when our copy really is corrupt.
fn recheck(daemon: &Daemon, blob: &BlobId, index: u64) {
    match daemon.store.recheck_chunk(blob, index) {
        Ok(true) => tracing::info!("chunk {index} of {blob} re-verified fine; still serving"),
        Ok(false) => {
            daemon.forget_served(blob);
            tracing::error!(
                "chunk {index} of {blob} is corrupt here: blob quarantined, no longer served"
            );
        }
        Err(e) => tracing::warn!("cannot re-verify chunk {index} of {blob}: {e}"),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    daemon: Arc<Daemon>,
    write: W,
    mut rx: mpsc::Receiver<Out>,
    mut uploader: Uploader,
    epoch: Instant,
    peer: PeerKey,
    remote: SocketAddr,
) {
    let mut w = write;
    // (bytes, chunks) served on this connection, for its last log line.
    let mut served = (0u64, 0u64);
    let hello = uploader.hello(Limits::DEFAULT.frame_bytes_max);
    if w.write_all(&encode(&Frame::Hello(hello))).await.is_err() || w.flush().await.is_err() {
        return;
    }
    let mut serving: Option<(BlobId, Arc<super::Served>)> = None;
    // The stretch of a served blob last mapped ahead (`PREFETCH_BYTES`).
    let mut mapped: Option<(BlobId, std::ops::Range<u64>)> = None;
    let result: Result<(), String> = async {
        loop {
            // Take what is queued without waiting.
            loop {
                match rx.try_recv() {
                    Ok(m) => {
                        if handle_out(&daemon, &mut w, &mut uploader, epoch, m).await? {
                            return Ok(());
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            // Send a few chunks, then look at the queue again.
            let mut sent = 0;
            let mut upload_wait = None;
            while sent < 16 {
                if uploader.requests_in_flight() > 0 {
                    upload_wait = daemon.upload_wait();
                    if upload_wait.is_some() {
                        break;
                    }
                }
                let Some(t) = uploader.poll_transmit(now(epoch)) else {
                    break;
                };
                sent += 1;
                match t {
                    Transmit::Reject { request, code } => {
                        w.write_all(&encode(&Frame::Reject { request, code }))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Transmit::Chunk {
                        request,
                        blob,
                        chunk_index,
                    } => {
                        if serving.as_ref().map(|(b, _)| *b) != Some(blob) {
                            let Some(served) = daemon.served_blob(&blob) else {
                                // Removed or quarantined since admission.
                                uploader.handle_cancel(now(epoch), request);
                                w.write_all(&encode(&Frame::Reject {
                                    request,
                                    code: RejectCode::UNAVAILABLE,
                                }))
                                .await
                                .map_err(|e| e.to_string())?;
                                continue;
                            };
                            serving = Some((blob, served));
                        }
                        let (_, s) = serving.as_ref().expect("set above");
                        let Some(e) = s.entry(&daemon.store, chunk_index) else {
                            return Err(format!("chunk {chunk_index} of {blob} has no entry"));
                        };
                        let within = |(b, r): &(BlobId, std::ops::Range<u64>)| {
                            *b == blob && r.start <= e.offset && e.end() <= r.end
                        };
                        if !mapped.as_ref().is_some_and(within) {
                            s.reader.prefetch(e.offset, PREFETCH_BYTES);
                            s.reader
                                .read_ahead(e.offset + PREFETCH_BYTES, PREFETCH_BYTES);
                            mapped = Some((blob, e.offset..e.offset + PREFETCH_BYTES));
                        }
                        let Some(payload) = s.reader.range(e.offset, u64::from(e.len)) else {
                            return Err(format!(
                                "chunk {chunk_index} of {blob} is beyond its file"
                            ));
                        };
                        let header = wire::data_header(
                            request,
                            chunk_index,
                            payload.len(),
                            &Limits::DEFAULT,
                        )
                        .map_err(|e| e.to_string())?;
                        w.write_all(&header).await.map_err(|e| e.to_string())?;
                        w.write_all(payload).await.map_err(|e| e.to_string())?;
                        uploader.handle_sent(now(epoch), request, u64::from(e.len));
                        daemon.upload_sent(u64::from(e.len));
                        served.0 += u64::from(e.len);
                        served.1 += 1;
                        daemon.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
                        daemon
                            .stats
                            .bytes_served
                            .fetch_add(u64::from(e.len), Ordering::Relaxed);
                    }
                }
            }
            if sent > 0 {
                continue;
            }
            // Nothing to send right now: flush, then wait for a message or
            // the uploader's next deadline (upload rate limit).
            w.flush().await.map_err(|e| e.to_string())?;
            let deadline = uploader
                .next_timeout()
                .map(|t| instant(epoch, t))
                .into_iter()
                .chain(upload_wait)
                .min();
            let m = match deadline {
                Some(at) => tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(at.into()) => {
                        uploader.handle_timeout(now(epoch));
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(m) = m else { return Ok(()) };
            if handle_out(&daemon, &mut w, &mut uploader, epoch, m).await? {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(why) = result {
        tracing::warn!("connection to {peer}: {why}");
        let _ = w
            .write_all(&encode(&Frame::Close {
                code: CloseCode::INTERNAL,
                text: &why,
            }))
            .await;
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    if served.1 > 0 {
        tracing::info!(
            "connection with {peer} ({remote}) ended: served {} bytes in {} chunks",
            served.0,
            served.1
        );
    }
}

/// Bytes of a served blob mapped at once ahead of serving them
/// (`BlobReader::prefetch`): one `madvise` instead of a page fault per 16
/// pages of the mapped file as the chunks are copied out. The stretch after
/// it is read ahead meanwhile (`BlobReader::read_ahead`), so that a blob
/// not in the page cache is read while the one before is sent: 4 GiB from
/// a source whose cache was dropped, alternating, 5.5–7.8 s (median 6.6)
/// against 6.6–7.9 s (median 7.7), faster in all five pairs.
const PREFETCH_BYTES: u64 = 4 << 20;

/// Handles one writer message; `Ok(true)` ends the connection.
async fn handle_out<W: AsyncWrite + Unpin>(
    daemon: &Daemon,
    w: &mut W,
    uploader: &mut Uploader,
    epoch: Instant,
    m: Out,
) -> Result<bool, String> {
    let io = |e: std::io::Error| e.to_string();
    match m {
        Out::Frame(bytes) => w.write_all(&bytes).await.map_err(io)?,
        Out::Close(code, text) => {
            let mut text = text;
            text.truncate(Limits::DEFAULT.close_text_bytes_max as usize);
            while !text.is_char_boundary(text.len()) {
                text.pop();
            }
            w.write_all(&encode(&Frame::Close { code, text: &text }))
                .await
                .map_err(io)?;
            return Ok(true);
        }
        Out::Request(r) => {
            let admitted = uploader.handle_request(now(epoch), &r, |r| resolve(daemon, r));
            if let Err(e) = admitted {
                let why = e.to_string();
                tracing::warn!("closing connection: {why}");
                w.write_all(&encode(&Frame::Close {
                    code: e.close_code(),
                    text: &why,
                }))
                .await
                .map_err(io)?;
                return Ok(true);
            }
        }
        Out::Cancel(id) => uploader.handle_cancel(now(epoch), id),
        // Closing for too many of them: the `Close` behind them goes out
        // without their answers.
        Out::Manifest(_, _, queued) if queued.refused() => {}
        Out::Manifest(blob, page, _queued) => {
            answer_manifest_request(daemon, w, uploader, epoch, blob, page).await?
        }
    }
    Ok(false)
}

/// Answers `GetManifest` (the root and what we hold; `page` `None`) or
/// `GetManifestPage` once the request is within the peer's request rate and
/// the upload rates allow (the connection waits meanwhile: only its own
/// flood is slowed); the reply is charged as upload.
async fn answer_manifest_request<W: AsyncWrite + Unpin>(
    daemon: &Daemon,
    w: &mut W,
    uploader: &mut Uploader,
    epoch: Instant,
    blob: BlobId,
    page: Option<u32>,
) -> Result<(), String> {
    let paced = uploader
        .admit_manifest_request(now(epoch))
        .map(|at| instant(epoch, at));
    if let Some(at) = paced.into_iter().chain(daemon.upload_wait()).max() {
        tokio::time::sleep_until(at.into()).await;
    }
    let reply = manifest_reply(daemon, blob, page);
    w.write_all(&reply).await.map_err(|e| e.to_string())?;
    uploader.handle_manifest_sent(now(epoch), reply.len() as u64);
    daemon.upload_sent(reply.len() as u64);
    Ok(())
}

/// The encoded answer to a manifest request (see [`answer_manifest_request`]).
fn manifest_reply(daemon: &Daemon, blob: BlobId, page: Option<u32>) -> Vec<u8> {
    let Some(served) = daemon.served_blob(&blob) else {
        return encode(&Frame::NotFound { blob });
    };
    match page {
        None => {
            let root = served.reader.root().encode();
            let mut bytes = encode(&Frame::ManifestRoot { blob, root: &root });
            // An empty blob has nothing to hold (a `Have` spans at least one
            // chunk): its root is the whole answer.
            let chunks = served.reader.root().chunk_count;
            if chunks > 0 {
                let have = HaveMap::all(blob, 0, chunks);
                bytes.extend_from_slice(&encode(&Frame::Have(have)));
            }
            bytes
        }
        Some(page) => match daemon.store.page_bytes(&blob, page) {
            Ok(b) => encode(&Frame::ManifestPage {
                blob,
                page,
                bytes: &b,
            }),
            Err(_) => encode(&Frame::NotFound { blob }),
        },
    }
}

/// The uploader's admission lookup: the run's bytes, or why not.
fn resolve(daemon: &Daemon, r: &Request) -> Result<u64, RejectCode> {
    let served = daemon.served_blob(&r.blob).ok_or(RejectCode::NOT_HELD)?;
    let end = r
        .first_chunk
        .checked_add(u64::from(r.chunk_count))
        .ok_or(RejectCode::NOT_HELD)?;
    if r.chunk_count == 0 || end > served.reader.root().chunk_count {
        return Err(RejectCode::NOT_HELD);
    }
    // Offsets are contiguous: the run's bytes are end offset − start offset.
    let entry = |i: u64| {
        served
            .entry(&daemon.store, i)
            .ok_or(RejectCode::UNAVAILABLE)
    };
    let first = entry(r.first_chunk)?;
    let last = entry(end - 1)?;
    Ok(last.end() - first.offset)
}
