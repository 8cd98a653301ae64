//! Received chunks on their way to the disk: the hot path of a fetch.
//!
//! A connection's reader decrypts and decodes; everything after that
//! (BLAKE3 of each chunk, the write at its offset) runs here, on tokio's
//! blocking pool, up to [`WRITERS`] batches at a time per connection. So the
//! halves of receiving run on several cores at once, and a batch is verified
//! and written as one ([`PartialWriter::write_batch`]: SIMD lanes across its chunks, one
//! vectored write per run of consecutive chunks).
//!
//! A batch is the frame decoder's own buffer, handed out whole
//! ([`Decoder::take_consumed`]) with the positions of the `Data` payloads
//! in it: payloads stay where TLS decrypted them, and the decoder goes on in
//! a recycled buffer. (They were copied into a separate batch buffer until
//! session 8: 5.9% of a 2 GiB fetch's samples, the largest copy left on the
//! receiving side.)
//!
//! Batches fill up to [`BATCH_BYTES`] (with several sources of one fetch,
//! [`SHARED_BATCH_BYTES`] divided among them, at least [`BATCH_BYTES_MIN`];
//! each of a source's connections gets the source's size), but never wait
//! for that while the disk side is idle: when the reader has decoded
//! everything it read and a writer is free, it hands over what it has. At most [`BATCHES_MAX`] batches exist
//! per connection (one filling, one queued, [`WRITERS`] being written),
//! recycled, so memory is fixed and no buffer is allocated per batch.
//!
//! Verdicts travel to the fetch in arrival order, one event per batch
//! ([`PeerEvent::Chunks`]; per chunk, the fetch's loop ran 430 k times for a
//! 4 GiB blob), after the batch is written (or its chunks found bad): batches
//! written at once report in the order they were received. Every other frame
//! for the fetch that arrives while chunks are pending travels behind them
//! ([`Intake::push_frame`]): the fetch must see a `Reject` acknowledging a cancel after the chunks the
//! peer sent before it, or the scheduler forgets the request first and
//! bans the peer for "data for a request not outstanding" (seen once on a
//! 16-core machine, three sources, in the endgame). [`Intake::finish`]
//! waits for the last batch, so a connection's `Closed` event always comes
//! after its `Chunks` events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use engine::store::PartialWriter;
use substrate::sched::Verdict;
use substrate::wire::{Decoder, RequestId};
use tokio::sync::mpsc;

use super::conn::{ChunkVerdict, PeerEvent, Tap};

/// A batch is handed over once it holds this many payload bytes (see
/// [`SHARED_BATCH_BYTES`] for fetches from several sources). 2 MiB since
/// session 13: each batch cuts its runs at its ends (a partial block each
/// end through the page cache), and on a disk that pays per request those
/// small writes cost more than their bytes. 4 GiB from one source against
/// 1 MiB batches: 9.2 k write requests instead of 13 k, receiver CPU
/// 7.5–8.3 s against 9.1–10.4, sealed 11.3–15.9 s against 13.7–18.9,
/// peak RssAnon 53 MiB against 43 (`ARCHITECTURE.md`, "What the disk
/// wants").
pub(crate) const BATCH_BYTES: usize = 2 << 20;
/// The batch size all sources of one fetch share: each gets this divided
/// by their number, at most [`BATCH_BYTES`], so the receiver's batch memory
/// (one source: 4 × 2 MiB per connection) is at most that of three sources
/// with 1 MiB batches, what it was before batches grew to 2 MiB. Each batch
/// cuts the runs it holds at its ends (a partial block through the page
/// cache, one more direct write, one more task): dividing 1 MiB among three
/// capped sources (341 KiB batches, 12 k per 4 GiB instead of 4 k) cost the
/// receiver 15-20% more CPU, and the fetch 6.72/6.91 s against 5.68/5.82
/// with 1 MiB each (`/var/tmp/ab3.sh`, two alternating rounds), for 7.7 MiB
/// more peak RssAnon (55.1 MiB). With 2 MiB for up to three sources, three
/// capped sources peaked at 63.7 MiB (goal 64); for up to two (three get
/// 1.33 MiB each), at 54.7–60.0 MiB; with this, at 48.6–50.2 MiB.
const SHARED_BATCH_BYTES: usize = 3 << 20;
/// The smallest batch, however many sources share a fetch.
const BATCH_BYTES_MIN: usize = 256 << 10;
/// Batches verified and written at once per connection (on the blocking
/// pool). Two: on a 16-core machine one writer left the reader waiting
/// (4 GiB from one source: readers waited 1.2-2.0 s with one, ~0.1 s with
/// two; 6.1-6.4 s against 7.2-8.2 s); on two cores no difference.
const WRITERS: usize = 2;
/// The scheduling priority (nice) a batch is verified and written at
/// ([`crate::sys::Urgent`]): above the readers' and senders' (0), so that
/// a writer whose direct write completed runs at once and hands its batch
/// back, instead of waiting for a time slice while its reader waits for the
/// batch and the CPU idles. Its CPU use is bounded by what arrives (hashing
/// and copying each byte once). Alternating builds, 4 GiB from one source
/// on two cores: readers waited 4.3–6.3 s summed at 0, 3.1–3.7 s at −5,
/// 1.6–2.7 s at −10, 1.4–2.1 s at −19; the fetch took 4.1–5.4 s, 4.1–4.4,
/// 3.6–4.5 and 3.6–4.1 s (`ARCHITECTURE.md`, "Writer priority"). −10, not
/// −19: nearly all of the gain, at a weight (~9:1 against nice 0, not
/// ~70:1) that leaves serving, a second fetch and the commits their share
/// while peers drive how much these threads hash.
const WRITER_NICE: i32 = -10;
/// Batches per connection: one filling, one queued, [`WRITERS`] being written.
const BATCHES_MAX: usize = WRITERS + 2;
/// Chunks a batch holds at most, however small: a source sending tiny
/// `Data` frames would otherwise fill a batch's bytes only after millions
/// of entries (each with its frame kept in the decoder's buffer). 2 MiB of
/// 1 KiB chunks; the default chunker's smallest is 2 KiB.
const BATCH_CHUNKS_MAX: usize = 2048;

/// Received chunks: the frames they arrived in, as the decoder handed them
/// out, and where each payload lies there.
pub(crate) struct Batch {
    /// The decoder's buffer once handed over; while the batch fills, the
    /// spare buffer the decoder gets at the next hand-over.
    buf: Vec<u8>,
    /// (request, chunk index, payload start in `buf`, payload length), in
    /// arrival order.
    chunks: Vec<(RequestId, u64, usize, u32)>,
    /// Payload bytes in `chunks`.
    payload_bytes: usize,
    /// Encoded frames for the fetch that arrived after these chunks.
    frames: Vec<Vec<u8>>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            buf: Vec::new(),
            chunks: Vec::new(),
            payload_bytes: 0,
            frames: Vec::new(),
        }
    }
}

/// The intake of one connection.
pub(crate) struct Intake {
    filling: Batch,
    /// Spare batches (returned by the worker once written).
    free: Vec<Batch>,
    batches: usize,
    /// Batches handed to the worker and not yet returned.
    in_flight: usize,
    to_worker: Option<mpsc::Sender<Batch>>,
    returned: mpsc::UnboundedReceiver<Batch>,
    worker: tokio::task::JoinHandle<()>,
    live: Live,
}

/// What the intakes of one fetch share.
#[derive(Default)]
pub(crate) struct FetchIntakes {
    /// Intakes alive (they divide the batch size among them).
    live: AtomicUsize,
    /// Connections per source: that many intakes share one batch size.
    lanes: usize,
    /// Time readers waited for a free batch: the disk side was behind.
    reader_wait_ns: AtomicU64,
}

impl FetchIntakes {
    pub(crate) fn new(lanes: usize) -> Self {
        FetchIntakes {
            lanes,
            ..FetchIntakes::default()
        }
    }

    /// Connections per source.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.max(1)
    }

    /// Seconds readers waited for the disk side, summed over connections.
    pub(crate) fn reader_wait_s(&self) -> f64 {
        self.reader_wait_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// Counts an intake among its fetch's while it lives.
struct Live(Arc<FetchIntakes>);

impl Live {
    fn new(shared: &Arc<FetchIntakes>) -> Self {
        shared.live.fetch_add(1, Ordering::Relaxed);
        Live(Arc::clone(shared))
    }

    /// Batch size for each of the fetch's live intakes.
    fn batch_bytes(&self) -> usize {
        // Memory stays within SHARED_BATCH_BYTES × lanes × BATCHES_MAX
        // however many sources there are, down to the floor.
        // Smaller batches per connection cost more
        // than they save: 2 connections of 512 KiB batches took 4.6-6.9 s
        // starting writeback for 4 GiB on two cores, 1 MiB ones 1.3-2.2 s.
        let sources = self.0.live.load(Ordering::Relaxed).div_ceil(self.0.lanes());
        (SHARED_BATCH_BYTES / sources.max(1)).clamp(BATCH_BYTES_MIN, BATCH_BYTES)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Intake {
    pub(crate) fn start(tap: &Tap, writer: Arc<PartialWriter>) -> Self {
        let (to_worker, from_reader) = mpsc::channel(1);
        let (give_back, returned) = mpsc::unbounded_channel();
        let worker = tokio::spawn(work(from_reader, give_back, tap.clone(), writer));
        Intake {
            filling: Batch::new(),
            free: Vec::new(),
            batches: 1,
            in_flight: 0,
            to_worker: Some(to_worker),
            returned,
            worker,
            live: Live::new(&tap.intakes),
        }
    }

    /// Adds one received chunk: its payload is `len` bytes at `start` in
    /// the decoder's buffer, which keeps it there until the batch is handed
    /// over (the reader must then receive with
    /// [`Decoder::receive_buffer_keeping`], see [`Intake::holds_payloads`]).
    pub(crate) fn push(&mut self, request: RequestId, index: u64, start: usize, len: usize) {
        self.filling
            .chunks
            .push((request, index, start, len as u32));
        self.filling.payload_bytes += len;
    }

    /// A frame for the fetch other than `Data`: it must reach the fetch
    /// after the verdicts of the chunks received before it. Handed back
    /// when none are pending (the caller sends it at once); otherwise it
    /// goes behind them, with what is batched so far (see
    /// [`Intake::due`]).
    pub(crate) fn push_frame(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        if self.in_flight == 0 && self.filling.chunks.is_empty() {
            return Some(frame);
        }
        self.filling.frames.push(frame);
        None
    }

    /// Payload bytes the filling batch takes before it is full. The reader
    /// reads little more than this, so that a full batch is handed over near
    /// the end of a read: what the decoder's buffer holds beyond the batch is
    /// copied into the next one (`Decoder::take_consumed`), and with 256 KiB
    /// reads that was half a read per batch on average.
    pub(crate) fn room(&self) -> usize {
        self.live
            .batch_bytes()
            .saturating_sub(self.filling.payload_bytes)
    }

    /// Whether payloads of the filling batch lie in the decoder's buffer.
    pub(crate) fn holds_payloads(&self) -> bool {
        !self.filling.chunks.is_empty()
    }

    /// Whether the filling batch must be handed over now: full (in bytes
    /// or in chunks), or a frame waits behind its chunks.
    pub(crate) fn due(&self) -> bool {
        self.filling.payload_bytes >= self.live.batch_bytes()
            || self.filling.chunks.len() >= BATCH_CHUNKS_MAX
            || !self.filling.frames.is_empty()
    }

    /// Hands the filling batch over if [`Intake::due`]. `Err` when the
    /// worker stopped (a local write failed; it told the fetch).
    pub(crate) async fn hand_over_if_due(&mut self, decoder: &mut Decoder) -> Result<(), String> {
        if self.due() {
            self.hand_over(decoder).await?;
        }
        Ok(())
    }

    /// The reader decoded everything it had: hand over a partial batch if
    /// the worker is idle (so chunks never wait for more to arrive).
    pub(crate) async fn drained(&mut self, decoder: &mut Decoder) -> Result<(), String> {
        if self.in_flight < WRITERS && !self.filling.chunks.is_empty() {
            self.hand_over(decoder).await?;
        }
        Ok(())
    }

    /// Waits for the worker to return a batch (pending forever while none
    /// is in flight). Cancel-safe, for `select!` next to the reader's read;
    /// pass the result to [`Intake::on_returned`].
    pub(crate) async fn returned(&mut self) -> Option<Batch> {
        if self.in_flight == 0 {
            std::future::pending::<()>().await;
        }
        self.returned.recv().await
    }

    /// Takes a returned batch back, then behaves as [`Intake::drained`].
    pub(crate) async fn on_returned(
        &mut self,
        b: Option<Batch>,
        decoder: &mut Decoder,
    ) -> Result<(), String> {
        let b = b.ok_or("the chunk writer stopped")?;
        self.take_back(b);
        self.drained(decoder).await
    }

    /// Hands over what is left and waits until every batch is written and
    /// its verdicts sent.
    pub(crate) async fn finish(mut self, decoder: &mut Decoder) {
        if !self.filling.chunks.is_empty() || !self.filling.frames.is_empty() {
            let _ = self.hand_over(decoder).await;
        }
        drop(self.to_worker.take());
        let _ = self.worker.await;
    }

    fn take_back(&mut self, b: Batch) {
        self.in_flight -= 1;
        self.free.push(b);
    }

    /// Sends the filling batch, with the decoder's buffer holding its
    /// payloads, to the worker; the decoder goes on in the next batch's
    /// spare buffer.
    async fn hand_over(&mut self, decoder: &mut Decoder) -> Result<(), String> {
        let next = match self.free.pop() {
            Some(b) => b,
            None if self.batches < BATCHES_MAX => {
                self.batches += 1;
                Batch::new()
            }
            None => {
                let waiting = std::time::Instant::now();
                let b = self
                    .returned
                    .recv()
                    .await
                    .ok_or("the chunk writer stopped")?;
                let waited = waiting.elapsed().as_nanos() as u64;
                self.live
                    .0
                    .reader_wait_ns
                    .fetch_add(waited, Ordering::Relaxed);
                self.in_flight -= 1;
                b
            }
        };
        let mut full = std::mem::replace(&mut self.filling, next);
        let spare = std::mem::take(&mut full.buf);
        full.buf = decoder.take_consumed(spare);
        let tx = self.to_worker.as_ref().ok_or("the chunk writer stopped")?;
        tx.send(full)
            .await
            .map_err(|_| "the chunk writer stopped".to_string())?;
        self.in_flight += 1;
        Ok(())
    }
}

/// A batch the worker has taken: being written on the blocking pool, or
/// only frames (which wait for the batches before them).
enum Job {
    Writing(tokio::task::JoinHandle<(Batch, Result<Vec<bool>, engine::store::StoreError>)>),
    Frames(Option<Batch>),
}

impl Job {
    /// The batch back with its verdicts. Cancel-safe: a `Writing` job keeps
    /// its result until awaited again; a `Frames` job is ready at once.
    async fn done(&mut self) -> Result<(Batch, Vec<bool>), String> {
        match self {
            Job::Writing(h) => {
                let (batch, verdicts) = h.await.map_err(|e| format!("chunk writer failed: {e}"))?;
                // Only local failures (disk full, IO error) reach here: a
                // chunk that does not match is a verdict, not an error.
                verdicts.map(|v| (batch, v)).map_err(|e| e.to_string())
            }
            Job::Frames(b) => Ok((b.take().expect("a job is finished once"), Vec::new())),
        }
    }
}

/// Verifies and writes batches, up to [`WRITERS`] at once; reports each
/// chunk's verdict, and the frames behind them, in arrival order.
async fn work(
    mut batches: mpsc::Receiver<Batch>,
    give_back: mpsc::UnboundedSender<Batch>,
    tap: Tap,
    writer: Arc<PartialWriter>,
) {
    let mut jobs: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    let mut open = true;
    loop {
        let next = if open && jobs.len() < WRITERS {
            tokio::select! {
                biased;
                done = async { jobs.front_mut().expect("checked").done().await }, if !jobs.is_empty() => Err(done),
                batch = batches.recv() => Ok(batch),
            }
        } else if let Some(job) = jobs.front_mut() {
            Err(job.done().await)
        } else {
            return;
        };
        match next {
            Ok(Some(batch)) if batch.chunks.is_empty() => jobs.push_back(Job::Frames(Some(batch))),
            Ok(Some(batch)) => jobs.push_back(Job::Writing(start_write(batch, &writer))),
            Ok(None) => open = false,
            Err(done) => {
                jobs.pop_front();
                let (mut batch, verdicts) = match done {
                    Ok(d) => d,
                    Err(why) => {
                        let _ = tap
                            .events
                            .send((tap.peer, PeerEvent::LocalError(why)))
                            .await;
                        return;
                    }
                };
                if !batch.chunks.is_empty() {
                    let verdicts = batch
                        .chunks
                        .iter()
                        .zip(verdicts)
                        .map(|(&(request, index, _, bytes), ok)| ChunkVerdict {
                            request,
                            index,
                            verdict: if ok { Verdict::Ok } else { Verdict::Bad },
                            bytes,
                        })
                        .collect();
                    let _ = tap
                        .events
                        .send((tap.peer, PeerEvent::Chunks(verdicts)))
                        .await;
                }
                send_frames(&tap, &mut batch).await;
                batch.buf.clear();
                batch.chunks.clear();
                batch.payload_bytes = 0;
                if give_back.send(batch).is_err() {
                    return;
                }
            }
        }
    }
}

/// Verifies and writes `batch` on the blocking pool.
fn start_write(
    batch: Batch,
    writer: &Arc<PartialWriter>,
) -> tokio::task::JoinHandle<(Batch, Result<Vec<bool>, engine::store::StoreError>)> {
    let w = Arc::clone(writer);
    tokio::task::spawn_blocking(move || {
        let _urgent = crate::sys::Urgent::raise(WRITER_NICE);
        let chunks: Vec<(u64, &[u8])> = batch
            .chunks
            .iter()
            .map(|&(_, index, start, len)| (index, &batch.buf[start..start + len as usize]))
            .collect();
        let verdicts = w.write_batch(&chunks);
        drop(chunks);
        (batch, verdicts)
    })
}

async fn send_frames(tap: &Tap, batch: &mut Batch) {
    for frame in batch.frames.drain(..) {
        let _ = tap.events.send((tap.peer, PeerEvent::Frame(frame))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use engine::chunker::{Chunker, ChunkerParams};
    use engine::mem::MemStore;
    use engine::store::{Owner, Store, StoreOptions};
    use rand::{RngCore, SeedableRng};
    use substrate::sched::PeerId;
    use substrate::wire::{Frame, Limits, encode};

    use super::*;

    /// A 4 MiB blob begun in a fresh store, and an intake writing it whose
    /// events arrive on the receiver returned.
    fn setup() -> (
        tempfile::TempDir,
        engine::manifest::Manifest,
        Vec<u8>,
        Intake,
        mpsc::Receiver<(PeerId, PeerEvent)>,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let params = ChunkerParams::with_avg(4096).unwrap();
        let options = StoreOptions {
            chunker: params,
            ..StoreOptions::default()
        };
        let store = Arc::new(Store::open(&tmp.path().join("s"), options).unwrap());
        let mut data = vec![0u8; 4 << 20];
        rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut data);
        let m = MemStore::manifest_of(&Chunker::new(params).unwrap(), &data);
        store.begin_partial(&m, &Owner::new(0, "test")).unwrap();
        let writer = store.partial_writer(&m.id()).unwrap();
        // Room for every event of a test: nothing waits on the receiver.
        let (events, rx) = mpsc::channel(1 << 16);
        let tap = Tap {
            peer: PeerId(7),
            lane: 0,
            events,
            writer: Arc::new(OnceLock::new()),
            intakes: Arc::default(),
        };
        let intake = Intake::start(&tap, writer);
        (tmp, m, data, intake, rx)
    }

    /// A batch of tiny chunks is due at [`BATCH_CHUNKS_MAX`] of them, long
    /// before their bytes would fill it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_due_at_its_chunk_cap_however_small_the_chunks() {
        let (_tmp, _m, _data, mut intake, _rx) = setup();
        for i in 0..BATCH_CHUNKS_MAX - 1 {
            intake.push(RequestId(1), i as u64, 0, 1);
            assert!(!intake.due(), "due at {} chunks", i + 1);
        }
        intake.push(RequestId(1), 0, 0, 1);
        assert!(intake.due());
    }

    /// A frame for the fetch that arrives while chunks are still being
    /// verified and written reaches the fetch behind their verdicts (a
    /// cancel's `Reject` must not overtake the chunks sent before it); with
    /// nothing pending it is handed back to be sent at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_reach_the_fetch_behind_pending_chunks() {
        let (_tmp, m, data, mut intake, mut rx) = setup();

        let early = intake.push_frame(b"early".to_vec());
        assert_eq!(early.as_deref(), Some(&b"early"[..]), "nothing pending");
        let entries = m.entries().unwrap();
        let middle = entries.len() / 2;
        // Chunks arrive as `Data` frames through a decoder, as in the
        // reader: payloads stay in its buffer until a batch is handed over.
        let mut decoder = Decoder::new(Limits::DEFAULT);
        for (i, e) in entries.iter().enumerate() {
            let frame = Frame::Data {
                request: RequestId(1),
                chunk_index: i as u64,
                payload: &data[e.offset as usize..e.end() as usize],
            };
            let mut bytes = Vec::new();
            encode(&frame, &Limits::DEFAULT, &mut bytes).unwrap();
            let buf = if intake.holds_payloads() {
                decoder.receive_buffer_keeping(bytes.len())
            } else {
                decoder.receive_buffer(bytes.len())
            };
            buf.extend_from_slice(&bytes);
            let (at, frame) = decoder.poll_frame_at().unwrap().unwrap();
            let Frame::Data { payload, .. } = frame else {
                panic!("a Data frame")
            };
            let len = payload.len();
            intake.push(RequestId(1), i as u64, at.end - len, len);
            intake.hand_over_if_due(&mut decoder).await.unwrap();
            if i == middle {
                let f = intake.push_frame(b"middle".to_vec());
                assert_eq!(f, None, "queued behind the chunks before it");
                assert!(intake.due());
                intake.hand_over_if_due(&mut decoder).await.unwrap();
            }
            if i % 7 == 0 {
                intake.drained(&mut decoder).await.unwrap();
            }
        }
        let f = intake.push_frame(b"last".to_vec());
        assert_eq!(f, None);
        intake.finish(&mut decoder).await;

        let mut seen = Vec::new();
        while let Some((peer, event)) = rx.recv().await {
            assert_eq!(peer, PeerId(7));
            match event {
                PeerEvent::Chunks(verdicts) => {
                    for v in verdicts {
                        assert_eq!(v.verdict, Verdict::Ok, "chunk {}", v.index);
                        seen.push(v.index.to_string());
                    }
                }
                PeerEvent::Frame(f) => seen.push(String::from_utf8(f).unwrap()),
                other => panic!("unexpected event {other:?}"),
            }
        }
        let mut expected: Vec<String> = (0..entries.len()).map(|i| i.to_string()).collect();
        expected.insert(middle + 1, "middle".into());
        expected.push("last".into());
        assert_eq!(seen, expected);
    }
}
