//! Received chunks on their way to the disk: the hot path of a fetch.
//!
//! A connection's reader decrypts and decodes; everything after that
//! (BLAKE3 of each chunk, the write at its offset) runs here, on tokio's
//! blocking pool, one batch at a time per connection. So the two halves of
//! receiving run on two cores at once, and a batch is verified and written
//! as one ([`PartialWriter::write_batch`]: SIMD lanes across its chunks, one
//! vectored write per run of consecutive chunks).
//!
//! Batches fill up to [`BATCH_BYTES`] shared among the connections of a
//! fetch (several sources: smaller batches each, at least
//! [`BATCH_BYTES_MIN`]), but never wait for that while the disk side is
//! idle: when the reader has decoded everything it read and no batch is
//! being written, it hands over what it has. At most [`BATCHES_MAX`]
//! batches exist per connection (one filling, one queued, one being
//! written), recycled, so memory is fixed and no buffer is allocated per
//! batch.
//!
//! Verdicts travel to the fetch in arrival order, after the chunk is
//! written (or found bad). Every other frame for the fetch that arrives
//! while chunks are pending travels behind them ([`Intake::push_frame`]):
//! the fetch must see a `Reject` acknowledging a cancel after the chunks the
//! peer sent before it, or the scheduler forgets the request first and
//! bans the peer for "data for a request not outstanding" (seen once on a
//! 16-core machine, three sources, in the endgame). [`Intake::finish`]
//! waits for the last batch, so a connection's `Closed` event always comes
//! after its `Data` events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use engine::store::PartialWriter;
use substrate::sched::Verdict;
use substrate::wire::RequestId;
use tokio::sync::mpsc;

use super::conn::{PeerEvent, Tap};

/// A batch is handed over once it holds this many payload bytes, divided by
/// the connections receiving for the same fetch: with three sources the
/// receiver holds three times the batches, and a third of the size each
/// keeps its memory that of one (measured: 2 GiB from three sources, peak
/// RssAnon 5.5 MiB above one source with 1 MiB each).
pub(crate) const BATCH_BYTES: usize = 1 << 20;
/// The smallest batch, however many connections share a fetch.
const BATCH_BYTES_MIN: usize = 256 << 10;
/// Batches per connection: one filling, one queued, one being written.
const BATCHES_MAX: usize = 3;

/// Received chunks, payloads back to back in `buf`.
pub(crate) struct Batch {
    buf: Vec<u8>,
    /// (request, chunk index, payload length), in arrival order.
    chunks: Vec<(RequestId, u64, u32)>,
    /// Encoded frames for the fetch that arrived after these chunks.
    frames: Vec<Vec<u8>>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            // A chunk may push a batch past BATCH_BYTES by up to its length.
            buf: Vec::with_capacity(
                BATCH_BYTES + substrate::wire::Limits::DEFAULT.chunk_bytes_max as usize,
            ),
            chunks: Vec::new(),
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
    /// Time readers waited for a free batch: the disk side was behind.
    reader_wait_ns: AtomicU64,
}

impl FetchIntakes {
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
        (BATCH_BYTES / self.0.live.load(Ordering::Relaxed).max(1)).max(BATCH_BYTES_MIN)
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

    /// Adds one received chunk; hands the batch over when it is full.
    /// `Err` when the worker stopped (a local write failed; it told the
    /// fetch).
    pub(crate) async fn push(
        &mut self,
        request: RequestId,
        index: u64,
        payload: &[u8],
    ) -> Result<(), String> {
        self.filling.buf.extend_from_slice(payload);
        self.filling
            .chunks
            .push((request, index, payload.len() as u32));
        if self.filling.buf.len() >= self.live.batch_bytes() {
            self.hand_over().await?;
        }
        Ok(())
    }

    /// A frame for the fetch other than `Data`: it must reach the fetch
    /// after the verdicts of the chunks received before it. Handed back
    /// when none are pending (the caller sends it at once); otherwise it
    /// goes behind them, with what is batched so far.
    pub(crate) async fn push_frame(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        if self.in_flight == 0 && self.filling.chunks.is_empty() {
            return Ok(Some(frame));
        }
        self.filling.frames.push(frame);
        self.hand_over().await?;
        Ok(None)
    }

    /// The reader decoded everything it had: hand over a partial batch if
    /// the worker is idle (so chunks never wait for more to arrive).
    pub(crate) async fn drained(&mut self) -> Result<(), String> {
        if self.in_flight == 0 && !self.filling.chunks.is_empty() {
            self.hand_over().await?;
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
    pub(crate) async fn on_returned(&mut self, b: Option<Batch>) -> Result<(), String> {
        let b = b.ok_or("the chunk writer stopped")?;
        self.take_back(b);
        self.drained().await
    }

    /// Hands over what is left and waits until every batch is written and
    /// its verdicts sent.
    pub(crate) async fn finish(mut self) {
        if !self.filling.chunks.is_empty() {
            let _ = self.hand_over().await;
        }
        drop(self.to_worker.take());
        let _ = self.worker.await;
    }

    fn take_back(&mut self, b: Batch) {
        self.in_flight -= 1;
        self.free.push(b);
    }

    async fn hand_over(&mut self) -> Result<(), String> {
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
        let full = std::mem::replace(&mut self.filling, next);
        let tx = self.to_worker.as_ref().ok_or("the chunk writer stopped")?;
        tx.send(full)
            .await
            .map_err(|_| "the chunk writer stopped".to_string())?;
        self.in_flight += 1;
        Ok(())
    }
}

/// Verifies and writes batches in order; reports each chunk's verdict.
async fn work(
    mut batches: mpsc::Receiver<Batch>,
    give_back: mpsc::UnboundedSender<Batch>,
    tap: Tap,
    writer: Arc<PartialWriter>,
) {
    while let Some(mut batch) = batches.recv().await {
        if batch.chunks.is_empty() {
            // Only frames, behind the batches before this one.
            send_frames(&tap, &mut batch);
            if give_back.send(batch).is_err() {
                return;
            }
            continue;
        }
        let w = Arc::clone(&writer);
        let done = tokio::task::spawn_blocking(move || {
            let mut at = 0usize;
            let chunks: Vec<(u64, &[u8])> = batch
                .chunks
                .iter()
                .map(|&(_, index, len)| {
                    let bytes = &batch.buf[at..at + len as usize];
                    at += len as usize;
                    (index, bytes)
                })
                .collect();
            let verdicts = w.write_batch(&chunks);
            drop(chunks);
            (batch, verdicts)
        })
        .await;
        let (mut batch, verdicts) = match done {
            Ok(d) => d,
            Err(e) => {
                let why = format!("chunk writer failed: {e}");
                let _ = tap.events.send((tap.peer, PeerEvent::LocalError(why)));
                return;
            }
        };
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(e) => {
                // Only local failures (disk full, IO error) reach here: a
                // chunk that does not match is a verdict, not an error.
                let _ = tap
                    .events
                    .send((tap.peer, PeerEvent::LocalError(e.to_string())));
                return;
            }
        };
        for (&(request, index, bytes), ok) in batch.chunks.iter().zip(verdicts) {
            let _ = tap.events.send((
                tap.peer,
                PeerEvent::Data {
                    request,
                    index,
                    verdict: if ok { Verdict::Ok } else { Verdict::Bad },
                    bytes,
                },
            ));
        }
        send_frames(&tap, &mut batch);
        batch.buf.clear();
        batch.chunks.clear();
        if give_back.send(batch).is_err() {
            return;
        }
    }
}

fn send_frames(tap: &Tap, batch: &mut Batch) {
    for frame in batch.frames.drain(..) {
        let _ = tap.events.send((tap.peer, PeerEvent::Frame(frame)));
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

    use super::*;

    /// A frame for the fetch that arrives while chunks are still being
    /// verified and written reaches the fetch behind their verdicts (a
    /// cancel's `Reject` must not overtake the chunks sent before it); with
    /// nothing pending it is handed back to be sent at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_reach_the_fetch_behind_pending_chunks() {
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
        let writer = Arc::new(store.partial_writer(&m.id()).unwrap());
        let (events, mut rx) = mpsc::unbounded_channel();
        let tap = Tap {
            peer: PeerId(7),
            events,
            writer: Arc::new(OnceLock::new()),
            intakes: Arc::default(),
        };
        let mut intake = Intake::start(&tap, writer);
        drop(tap);

        let early = intake.push_frame(b"early".to_vec()).await.unwrap();
        assert_eq!(early.as_deref(), Some(&b"early"[..]), "nothing pending");
        let entries = m.entries().unwrap();
        let middle = entries.len() / 2;
        for (i, e) in entries.iter().enumerate() {
            let bytes = &data[e.offset as usize..e.end() as usize];
            intake.push(RequestId(1), i as u64, bytes).await.unwrap();
            if i == middle {
                let f = intake.push_frame(b"middle".to_vec()).await.unwrap();
                assert_eq!(f, None, "queued behind the chunks before it");
            }
        }
        let f = intake.push_frame(b"last".to_vec()).await.unwrap();
        assert_eq!(f, None);
        intake.finish().await;

        let mut seen = Vec::new();
        while let Some((peer, event)) = rx.recv().await {
            assert_eq!(peer, PeerId(7));
            seen.push(match event {
                PeerEvent::Data { index, verdict, .. } => {
                    assert_eq!(verdict, Verdict::Ok, "chunk {index}");
                    index.to_string()
                }
                PeerEvent::Frame(f) => String::from_utf8(f).unwrap(),
                other => panic!("unexpected event {other:?}"),
            });
        }
        let mut expected: Vec<String> = (0..entries.len()).map(|i| i.to_string()).collect();
        expected.insert(middle + 1, "middle".into());
        expected.push("last".into());
        assert_eq!(seen, expected);
    }
}
