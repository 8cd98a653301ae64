//! `envoy fetch`: one blob from one or more peers at once.
//!
//! 1. Dial every source (mTLS, the verifier seam decides), ask each for the
//!    manifest root; verify the first root against the id, fetch the pages
//!    round robin from the peers that answered, verifying each against the
//!    root (`wire::ManifestAssembler`). A partial blob left by an earlier
//!    run (resume) already has its manifest.
//! 2. Check free space (blob + `limits.reserve_bytes`: `Store::check_room`), register the partial
//!    blob (its blocks are reserved up front), copy every chunk already held
//!    locally by any blob (delta), and list what is still missing.
//! 3. Drive `substrate::sched::Scheduler`: requests go out through each
//!    connection's writer; chunks are verified and written by the
//!    connections' readers; verdicts come back here. A bad chunk bans its
//!    sender for this blob (logged with its key; it is told with
//!    `BadChunk`); a stalled or dead peer is dropped and its work reissued.
//! 4. Every `COMMIT_BYTES` or `COMMIT_INTERVAL`, what was written is made
//!    durable and recorded present (one fsync for many chunks): a SIGKILL
//!    loses at most that window, and a new fetch resumes from the rest.
//! 5. When complete: final commit, seal, report.
//!
//! A fetch asked to stream (`fetch --out`) takes equally rare pieces in blob
//! order and publishes how far its blob is written without a gap
//! ([`Written`]), so the export can follow the fetch instead of starting
//! after the seal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use engine::hash::BlobId;
use engine::manifest::{Manifest, ManifestLimits};
use engine::store::{BlobState, Owner, PartialWriter, Progress, Store, StoreError};
use serde::Serialize;
use substrate::sched::{BanReason, DataOutcome, Event, PeerCredit, PeerId, SchedConfig, Scheduler};
use substrate::wire::{self, CloseCode, Frame, Hello, Limits, ManifestAssembler};
use tokio::sync::{mpsc, watch};

use super::Daemon;
use super::conn::{ConnHandle, PeerEvent, Tap, encode};
use super::intake::FetchIntakes;
use crate::control::FetchRequest;

/// Bytes written between two commits (fsync + presence).
const COMMIT_BYTES: u64 = 256 << 20;
/// Longest time between two commits while chunks arrive.
const COMMIT_INTERVAL: Duration = Duration::from_secs(2);
/// A fetch with no progress for this long gives up: no verified manifest
/// part (manifest phase), no chunk and no have-map (chunk phase). Frames
/// that only keep a connection alive (`Hello`) do not count.
const NO_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Events a fetch's connections may have queued for it. Each is at most a
/// frame (a manifest page, ~150 KB, is the largest) or a batch's verdicts:
/// while the fetch is busy (copying local chunks can take seconds), its
/// connections wait and their peers with them, instead of memory growing
/// with whatever a peer sends.
pub(crate) const EVENTS_QUEUE: usize = 128;
/// Subsystem recorded as the owner of fetched blobs.
const FETCH_SUBSYSTEM: &str = "fetch";

/// What a fetch did, for the CLI (`--json` prints it).
#[derive(Debug, Serialize)]
pub struct FetchOutcome {
    pub id: String,
    pub size: u64,
    pub chunks: u64,
    /// Already complete here before this fetch.
    pub already_complete: bool,
    /// Chunk bytes received from peers and kept.
    pub bytes_fetched: u64,
    pub chunks_fetched: u64,
    /// Bytes copied from blobs already held here (delta).
    pub bytes_local: u64,
    /// Bytes already present from an earlier, interrupted fetch (resume).
    pub bytes_resumed: u64,
    pub seconds: f64,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub addr: String,
    pub key: Option<String>,
    pub bytes: u64,
    pub chunks: u64,
    pub banned: bool,
    pub error: Option<String>,
}

struct Peer {
    addr: String,
    key: Option<String>,
    /// The live connections to this source, by lane (see
    /// [`crate::config::Limits::fetch_connections`]): the first
    /// carries the manifest exchange, requests go round robin. Empty once
    /// the source is gone.
    conns: Vec<(u32, ConnHandle)>,
    hello: Option<Hello>,
    /// The peer's latest `Have` for this blob, encoded.
    have: Option<Vec<u8>>,
    root_answered: bool,
    not_found: bool,
    joined: bool,
    banned: bool,
    bytes: u64,
    chunks: u64,
    error: Option<String>,
}

impl Peer {
    fn alive(&self) -> bool {
        !self.conns.is_empty()
    }

    /// The connection for frames that are not about one request.
    fn first(&self) -> Option<&ConnHandle> {
        self.conns.first().map(|(_, c)| c)
    }

    /// Asks for `blob`'s manifest root (answered with the root and a `Have`)
    /// on the first connection.
    async fn ask_root(&self, blob: BlobId) {
        if let Some(c) = self.first() {
            c.send(encode(&Frame::GetManifest { blob })).await;
        }
    }

    /// The connection carrying `request` (and its cancel): chunks and the
    /// `Reject` acknowledging a cancel then arrive in order on one connection.
    fn lane(&self, request: wire::RequestId) -> Option<&ConnHandle> {
        let n = self.conns.len() as u64;
        (n > 0).then(|| &self.conns[(request.0 % n) as usize].1)
    }

    /// Forgets lane `lane` (its connection ended); `false` if it was not live.
    fn drop_lane(&mut self, lane: u32) -> bool {
        let before = self.conns.len();
        self.conns.retain(|(l, _)| *l != lane);
        self.conns.len() < before
    }

    /// Closes every connection to this source; `false` if none was open.
    async fn close(&mut self, code: CloseCode, why: &str) -> bool {
        let had = self.alive();
        for (_, c) in self.conns.drain(..) {
            c.close(code, why).await;
        }
        had
    }
}

type Events = mpsc::Receiver<(PeerId, PeerEvent)>;

/// How far a fetch has its blob in the file without a gap: chunks
/// `0..prefix`, the first `prefix_bytes` bytes, are verified and written
/// (not necessarily durable yet).
#[derive(Clone, Default)]
pub(crate) struct Written {
    /// The blob's writer; `None` until the partial blob exists (and for a
    /// blob that was already complete).
    pub writer: Option<Arc<PartialWriter>>,
    pub prefix: u64,
    pub prefix_bytes: u64,
}

/// Fetches `req.id`; with `written`, publishes its in-order progress there
/// (see [`Written`]) and fetches equally rare pieces in blob order.
pub(crate) async fn fetch(
    daemon: Arc<Daemon>,
    req: FetchRequest,
    uid: u32,
    progress: impl Fn(&str, u64, u64) + Send + Sync,
    written: Option<watch::Sender<Written>>,
) -> Result<FetchOutcome> {
    let started = Instant::now();
    let id: BlobId = req
        .id
        .parse()
        .map_err(|e| anyhow!("{:?} is not a blob id: {e}", req.id))?;
    let _busy = daemon.begin_fetch(id)?;
    let owner = Owner::new(uid, FETCH_SUBSYSTEM);
    let store = Arc::clone(&daemon.store);
    let known = match store.info(&id) {
        Ok(info) => Some(info),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(info) = &known
        && info.state == BlobState::Complete
    {
        let s = Arc::clone(&store);
        let m = s.manifest(&id)?;
        blocking(move || s.begin_partial(&m, &owner)).await?;
        return Ok(FetchOutcome {
            id: id.to_string(),
            size: info.size,
            chunks: info.chunks,
            already_complete: true,
            bytes_fetched: 0,
            chunks_fetched: 0,
            bytes_local: 0,
            bytes_resumed: 0,
            seconds: started.elapsed().as_secs_f64(),
            peers: Vec::new(),
        });
    }

    // 1. Sources.
    let (events_tx, mut events) = mpsc::channel(EVENTS_QUEUE);
    let writer_slot: Arc<OnceLock<Arc<PartialWriter>>> = Arc::new(OnceLock::new());
    let lanes = (daemon.config.limits.fetch_connections as usize)
        .div_ceil(req.from.len().max(1))
        .max(1);
    let intakes = Arc::new(FetchIntakes::new(lanes));
    let mut peers = dial_all(&daemon, &req.from, &events_tx, &writer_slot, &intakes).await?;
    drop(events_tx);
    for p in peers.values() {
        p.ask_root(id).await;
    }

    // 2. Manifest, then the partial blob.
    let resumed = known.is_some_and(|i| i.state == BlobState::Partial);
    let manifest = if resumed {
        store.manifest(&id)?
    } else {
        receive_manifest(&id, &mut peers, &mut events).await?
    };
    let manifest_seconds = started.elapsed().as_secs_f64();
    let total = manifest.root.total_bytes;
    if !resumed {
        // Before any chunk is asked for (`begin_partial` checks again).
        store
            .check_room(total)
            .context("refused up front (limits.reserve_bytes), nothing was fetched")?;
    }
    let lens = chunk_lens(&manifest)?;
    let (before, writer, any_local) = {
        let s = Arc::clone(&store);
        blocking(move || {
            // Whether this store holds any of the chunks is looked up while
            // the partial blob is made (at 4 GiB each takes ~50 ms, and the
            // other mostly writes pages): a blob with none held here skips
            // the local copy pass, which would look every chunk up again.
            std::thread::scope(|scope| {
                let lookup = (!resumed).then(|| scope.spawn(|| s.holds_any(&manifest)));
                s.begin_partial(&manifest, &owner)?;
                let before = s.missing_chunks(&id)?;
                // The fetch goes on with the writer that copies local chunks:
                // the pages it completes already have their chunk rows.
                let writer = s.partial_writer(&id)?;
                let any_local = match lookup {
                    Some(l) => l.join().expect("the lookup thread panicked")?,
                    None => true,
                };
                Ok::<_, StoreError>((before, writer, any_local))
            })
        })
        .await?
    };
    // The whole manifest (tens of MB for a large blob) was just freed.
    crate::sys::release_free_heap();
    let sum = |chunks: &[u64]| -> u64 { chunks.iter().map(|&i| u64::from(lens[i as usize])).sum() };
    let before_bytes = sum(&before);
    let bytes_resumed = total - before_bytes;
    let missing = if any_local {
        copy_local(&store, &writer, &progress).await?
    } else {
        before
    };
    let _ = writer_slot.set(Arc::clone(&writer));
    let missing_bytes = sum(&missing);
    let bytes_local = before_bytes - missing_bytes;
    tracing::info!(
        "fetching {id}: {total} bytes, {} chunks; {bytes_local} bytes copied from local blobs, {bytes_resumed} resumed, {missing_bytes} to fetch; sources and manifest took {manifest_seconds:.2} s, preparing the partial blob {:.2} s",
        lens.len(),
        started.elapsed().as_secs_f64() - manifest_seconds,
    );

    // 3. Schedule.
    let epoch = Instant::now();
    let now = || super::now(epoch);
    let config = SchedConfig {
        download_bytes_per_s: daemon.config.rate.download_bytes_per_s,
        seed: u64::from_le_bytes(daemon.host.0[..8].try_into().expect("8 bytes"))
            ^ epoch.elapsed().as_nanos() as u64,
        in_order: written.is_some(),
        ..SchedConfig::DEFAULT
    };
    let chunk_count = lens.len() as u64;
    let mut sched = Scheduler::new(now(), config, id, lens, missing)
        .map_err(|e| anyhow!("cannot schedule {id}: {e}"))?;
    if let Some(w) = &written {
        w.send_replace(Written {
            writer: Some(Arc::clone(&writer)),
            prefix: 0,
            prefix_bytes: 0,
        });
    }
    // (chunks, bytes) written without a gap from the start.
    let mut prefix = (0u64, 0u64);
    let publish = |sched: &Scheduler, (chunks, bytes): &mut (u64, u64)| {
        let Some(w) = &written else { return };
        let before = *chunks;
        while *chunks < chunk_count && sched.is_done(*chunks) {
            *bytes += u64::from(sched.chunk_len(*chunks).expect("below chunk_count"));
            *chunks += 1;
        }
        if *chunks > before {
            w.send_modify(|w| (w.prefix, w.prefix_bytes) = (*chunks, *bytes));
        }
    };
    publish(&sched, &mut prefix);
    for (&pid, p) in peers.iter_mut() {
        try_join(&mut sched, now(), pid, p);
    }

    let mut pending: Vec<u64> = Vec::new();
    let mut pending_bytes = 0u64;
    let mut last_commit = Instant::now();
    let mut commit: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
    let mut fetched = (0u64, 0u64);
    let mut last_progress = Instant::now();
    let mut failure: Option<anyhow::Error> = None;
    let mut last_event = Instant::now();
    loop {
        // Outputs first.
        while let Some((pid, r)) = sched.poll_request(now()) {
            if let Some(c) = peers.get(&pid).and_then(|p| p.lane(r.id)) {
                c.send(encode(&Frame::Request(r))).await;
            }
        }
        while let Some((pid, request)) = sched.poll_cancel() {
            if let Some(c) = peers.get(&pid).and_then(|p| p.lane(request)) {
                c.send(encode(&Frame::Cancel { request })).await;
            }
        }
        let mut complete = false;
        while let Some(ev) = sched.poll_event() {
            match ev {
                Event::Complete => complete = true,
                Event::Banned { peer, reason } => {
                    let p = peers.get_mut(&peer).expect("known peer");
                    p.banned = true;
                    let key = p.key.clone().unwrap_or_default();
                    match reason {
                        BanReason::BadChunk { chunk_index } => {
                            tracing::warn!(
                                "peer {} ({key}) sent a corrupt chunk {chunk_index} of {id}: banned for this blob",
                                p.addr
                            );
                            if let Some(c) = p.first() {
                                c.send(encode(&Frame::BadChunk {
                                    blob: id,
                                    chunk_index,
                                }))
                                .await;
                            }
                            p.close(CloseCode::REFUSED, "sent a corrupt chunk").await;
                        }
                        BanReason::Protocol(why) => {
                            tracing::warn!(
                                "peer {} ({key}) broke the protocol ({why}): banned for this blob",
                                p.addr
                            );
                            p.close(CloseCode::PROTOCOL, why).await;
                        }
                    }
                    p.error = Some("banned".into());
                }
                Event::PeerDropped { peer, reason } => {
                    let p = peers.get_mut(&peer).expect("known peer");
                    tracing::warn!(
                        "dropping peer {} from the fetch of {id}: {reason:?}",
                        p.addr
                    );
                    p.error = Some(format!("{reason:?}"));
                    p.close(CloseCode::IDLE, "stalled").await;
                }
                Event::Stalled { chunks_unavailable } => {
                    if peers
                        .values()
                        .all(|p| !p.alive() || p.joined || p.not_found)
                    {
                        failure = Some(anyhow!(
                            "no reachable source holds the remaining {chunks_unavailable} chunks of {id}{}",
                            peer_errors(&peers)
                        ));
                    }
                }
            }
        }
        if complete || failure.is_some() {
            break;
        }
        let stats = sched.stats();
        if last_progress.elapsed() >= Duration::from_millis(100) {
            progress("fetching", stats.bytes_done, stats.bytes_total);
            last_progress = Instant::now();
        }
        // Commit when enough was written, or it has been a while.
        if commit.as_ref().is_some_and(|c| c.is_finished()) {
            commit.take().expect("checked").await??;
        }
        if commit.is_none()
            && !pending.is_empty()
            && (pending_bytes >= COMMIT_BYTES || last_commit.elapsed() >= COMMIT_INTERVAL)
        {
            let w = Arc::clone(&writer);
            let batch = std::mem::take(&mut pending);
            pending_bytes = 0;
            last_commit = Instant::now();
            commit = Some(tokio::task::spawn_blocking(move || w.commit(&batch)));
        }
        let deadline = sched
            .next_timeout()
            .map(|t| super::instant(epoch, t))
            .unwrap_or_else(|| Instant::now() + NO_PROGRESS_TIMEOUT)
            .min(Instant::now() + COMMIT_INTERVAL);
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::time::sleep_until(deadline.into()) => {
                sched.handle_timeout(now());
                if !peers.values().any(Peer::alive) {
                    failure = Some(anyhow!("every source is gone{}", peer_errors(&peers)));
                } else if last_event.elapsed() >= NO_PROGRESS_TIMEOUT {
                    failure = Some(anyhow!(
                        "no chunk and no have-map arrived for {NO_PROGRESS_TIMEOUT:?}{}",
                        peer_errors(&peers)
                    ));
                }
                continue;
            }
        };
        let Some((pid, ev)) = ev else {
            failure = Some(anyhow!("every source is gone{}", peer_errors(&peers)));
            break;
        };
        let p = peers.get_mut(&pid).expect("known peer");
        match ev {
            PeerEvent::Chunks(verdicts) => {
                last_event = Instant::now();
                let at = now();
                for v in verdicts {
                    match sched.handle_data(at, pid, v.request, v.index, v.verdict) {
                        DataOutcome::Accepted => {
                            pending.push(v.index);
                            pending_bytes += u64::from(v.bytes);
                            p.bytes += u64::from(v.bytes);
                            p.chunks += 1;
                            fetched.0 += u64::from(v.bytes);
                            fetched.1 += 1;
                        }
                        DataOutcome::Duplicate | DataOutcome::Stale | DataOutcome::Banned => {}
                        DataOutcome::Violation(why) => {
                            tracing::warn!("peer {} broke the protocol: {why}", p.addr);
                            p.close(CloseCode::PROTOCOL, why).await;
                        }
                    }
                }
                publish(&sched, &mut prefix);
            }
            PeerEvent::Frame(bytes) => {
                if on_frame(&mut sched, now(), &id, pid, p, &bytes) {
                    last_event = Instant::now();
                }
            }
            PeerEvent::LocalError(e) => {
                failure = Some(anyhow!("cannot write {id}: {e}"));
                break;
            }
            PeerEvent::Closed { lane, why } => {
                let was_live = p.drop_lane(lane);
                // A lane no longer live was closed by the fetch itself (the
                // scheduler banned or dropped the source, or knows it left).
                if was_live {
                    sched.handle_peer_lost(now(), pid);
                }
                if was_live && p.alive() {
                    // The requests on that connection are lost: the source
                    // leaves and joins again over the others (chunks still
                    // arriving for its earlier requests are then stale).
                    tracing::info!(
                        "source {}: a connection closed ({why}); going on with {}",
                        p.addr,
                        p.conns.len()
                    );
                    p.joined = false;
                    try_join(&mut sched, now(), pid, p);
                } else if was_live {
                    tracing::info!("source {} closed: {why}", p.addr);
                    p.error.get_or_insert(why);
                }
            }
        }
    }

    // 4./5. Commit what was written (also on failure: resume keeps it).
    drop(sched);
    // Nothing reads them from here on: the connections are closed (what
    // they still receive is not recorded), and none waits for room to tell
    // the fetch more.
    drop(events);
    for p in peers.values_mut() {
        p.close(CloseCode::NORMAL, "").await;
    }
    if let Some(c) = commit.take() {
        c.await??;
    }
    let w = Arc::clone(&writer);
    blocking(move || w.commit(&pending)).await?;
    // The scheduler's per-chunk state is gone: hand its memory back before
    // the seal's index transaction needs some (the receiver's peak).
    crate::sys::release_free_heap();
    if let Some(f) = failure {
        return Err(f);
    }
    let received = started.elapsed();
    let (batches, hash_s, write_s, writeback_s) = writer.timings().seconds();
    let (written, direct) = writer.bytes_written();
    let direct_pct = direct as f64 * 100.0 / written.max(1) as f64;
    blocking(move || writer.seal()).await?;
    tracing::info!(
        "fetched {id}: received in {:.2} s, sealed in {:.2} s; {batches} batches: hashing {hash_s:.2} s, \
         writing {write_s:.2} s ({direct_pct:.0}% of {written} bytes direct), starting writeback {writeback_s:.2} s; readers waited {:.2} s for them",
        received.as_secs_f64(),
        (started.elapsed() - received).as_secs_f64(),
        intakes.reader_wait_s(),
    );
    progress("fetching", total, total);
    Ok(FetchOutcome {
        id: id.to_string(),
        size: total,
        chunks: chunk_count,
        already_complete: false,
        bytes_fetched: fetched.0,
        chunks_fetched: fetched.1,
        bytes_local,
        bytes_resumed,
        seconds: started.elapsed().as_secs_f64(),
        peers: peers
            .into_values()
            .map(|p| PeerReport {
                key: p.key,
                addr: p.addr,
                bytes: p.bytes,
                chunks: p.chunks,
                banned: p.banned,
                error: p.error,
            })
            .collect(),
    })
}

async fn blocking<T: Send + 'static, E: Into<anyhow::Error> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("store task failed")?
        .map_err(Into::into)
}

fn peer_errors(peers: &BTreeMap<PeerId, Peer>) -> String {
    let errs: Vec<String> = peers
        .values()
        .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.addr)))
        .collect();
    if errs.is_empty() {
        String::new()
    } else {
        format!(" ({})", errs.join("; "))
    }
}

async fn dial_all(
    daemon: &Arc<Daemon>,
    from: &[String],
    events: &mpsc::Sender<(PeerId, PeerEvent)>,
    writer: &Arc<OnceLock<Arc<PartialWriter>>>,
    intakes: &Arc<FetchIntakes>,
) -> Result<BTreeMap<PeerId, Peer>> {
    if from.is_empty() {
        bail!("no source given (--from HOST:PORT[,HOST:PORT…])");
    }
    let lanes = intakes.lanes() as u32;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, addr) in from.iter().enumerate() {
        let pid = PeerId(i as u64);
        let tap = Tap {
            peer: pid,
            lane: 0,
            events: events.clone(),
            writer: Arc::clone(writer),
            intakes: Arc::clone(intakes),
        };
        let daemon = Arc::clone(daemon);
        let addr = addr.clone();
        tasks.spawn(async move {
            let r = async {
                let sock: SocketAddr = tokio::net::lookup_host(&addr)
                    .await
                    .with_context(|| format!("cannot resolve {addr}"))?
                    .next()
                    .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
                // The first connection decides whether the source is usable;
                // the others only add lanes (a refused one is logged).
                let first = daemon.dial(sock, None, tap.clone()).await?;
                let key = first.peer;
                let mut extra = tokio::task::JoinSet::new();
                for lane in 1..lanes {
                    let daemon = Arc::clone(&daemon);
                    let tap = Tap {
                        lane,
                        ..tap.clone()
                    };
                    extra.spawn(async move { (lane, daemon.dial(sock, Some(key), tap).await) });
                }
                let mut conns = vec![(0, first)];
                while let Some(r) = extra.join_next().await {
                    match r.context("dial task failed")? {
                        (lane, Ok(c)) => conns.push((lane, c)),
                        (_, Err(e)) => tracing::warn!("source {addr}: one connection fewer: {e:#}"),
                    }
                }
                conns.sort_by_key(|(lane, _)| *lane);
                Ok::<_, anyhow::Error>(conns)
            }
            .await;
            (pid, addr, r)
        });
    }
    let mut peers = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (pid, addr, r) = joined.context("dial task failed")?;
        let (conns, error) = match r {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::warn!("cannot use source {addr}: {e:#}");
                (Vec::new(), Some(format!("{e:#}")))
            }
        };
        peers.insert(
            pid,
            Peer {
                addr,
                key: conns.first().map(|(_, c)| c.peer.to_string()),
                conns,
                hello: None,
                have: None,
                root_answered: false,
                not_found: false,
                joined: false,
                banned: false,
                bytes: 0,
                chunks: 0,
                error,
            },
        );
    }
    if !peers.values().any(Peer::alive) {
        bail!("could not reach any source{}", peer_errors(&peers));
    }
    Ok(peers)
}

/// How long a source owing manifest pages may send none before its pages
/// are asked of another source that sent the root (as long as a source
/// owing chunks may, in the scheduler). It is then dropped from the fetch;
/// the only source that can send them is not (a slow source is still one).
const PAGE_STALL: Duration = SchedConfig::DEFAULT.peer_stall_timeout;
/// Manifest pages asked of one source at once (each up to ~176 KiB):
/// asking for all pages of a large blob at once queued them in both
/// daemons' connection queues, where neither side could drain them (the
/// fetch's events are bounded, [`EVENTS_QUEUE`]).
const PAGE_WINDOW: usize = 16;

/// Which manifest pages are to ask, asked and not yet received, and since
/// when each source owing some has sent none.
#[derive(Default)]
struct PageAsks {
    /// Pages from here on were never asked.
    next: u32,
    /// Pages asked of a source that then left, to ask again.
    again: std::collections::BTreeSet<u32>,
    owed: BTreeMap<u32, PeerId>,
    since: BTreeMap<PeerId, Instant>,
}

impl PageAsks {
    /// The next page to ask for, of `pages`, that is not here (`has`).
    fn next_page(&mut self, pages: u32, has: impl Fn(u32) -> bool) -> Option<u32> {
        while let Some(page) = self.again.pop_first() {
            if !has(page) {
                return Some(page);
            }
        }
        while self.next < pages {
            self.next += 1;
            if !has(self.next - 1) {
                return Some(self.next - 1);
            }
        }
        None
    }

    fn ask(&mut self, page: u32, from: PeerId, now: Instant) {
        self.owed.insert(page, from);
        self.since.entry(from).or_insert(now);
    }

    /// Pages `pid` owes.
    fn owed_by(&self, pid: PeerId) -> usize {
        self.owed.values().filter(|&&p| p == pid).count()
    }

    /// `from` sent `page`, which was missing (asked of it or of another
    /// source).
    fn received(&mut self, page: u32, from: PeerId, now: Instant) {
        let owner = self.owed.remove(&page);
        for pid in owner.into_iter().chain([from]) {
            if self.owed_by(pid) == 0 {
                self.since.remove(&pid);
            } else if pid == from {
                self.since.insert(pid, now);
            }
        }
    }

    /// `pid`'s stall clock starts again at `now` (it is let be slow).
    fn wait_longer(&mut self, pid: PeerId, now: Instant) {
        self.since.insert(pid, now);
    }

    /// `pid` will send no more pages: what it owed is to be asked again.
    fn forget(&mut self, pid: PeerId) {
        let again = &mut self.again;
        self.owed.retain(|&page, &mut p| {
            if p == pid {
                again.insert(page);
            }
            p != pid
        });
        self.since.remove(&pid);
    }

    /// When the next source owing pages is overdue.
    fn next_overdue(&self) -> Option<Instant> {
        self.since.values().min().map(|&t| t + PAGE_STALL)
    }

    /// Sources owing pages that sent none for [`PAGE_STALL`].
    fn overdue(&self, now: Instant) -> Vec<PeerId> {
        self.since
            .iter()
            .filter(|&(_, &t)| now >= t + PAGE_STALL)
            .map(|(&p, _)| p)
            .collect()
    }
}

/// Sources that sent the root and may still send pages.
fn page_holders(peers: &BTreeMap<PeerId, Peer>) -> Vec<PeerId> {
    peers
        .iter()
        .filter(|(_, p)| p.alive() && p.root_answered && !p.not_found)
        .map(|(&k, _)| k)
        .collect()
}

/// Copies the chunks of the fetch's blob that sealed local blobs hold (see
/// `PartialWriter::assemble_local`); returns what is still missing. For a
/// large blob this takes a while (the disk reads and writes every byte): the
/// progress bar follows it.
async fn copy_local(
    store: &Arc<Store>,
    writer: &Arc<PartialWriter>,
    progress: &(impl Fn(&str, u64, u64) + Send + Sync),
) -> Result<Vec<u64>> {
    let copying = Arc::new(Progress::default());
    let assembling = {
        let (w, p) = (Arc::clone(writer), Arc::clone(&copying));
        tokio::task::spawn_blocking(move || w.assemble_local(Some(&p)))
    };
    tokio::pin!(assembling);
    loop {
        tokio::select! {
            done = &mut assembling => {
                done.context("store task failed")??;
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => progress(
                "copying from local blobs",
                copying.done.load(Ordering::Relaxed),
                copying.total.load(Ordering::Relaxed),
            ),
        }
    }
    let (s, id) = (Arc::clone(store), *writer.id());
    blocking(move || s.missing_chunks(&id)).await
}

/// Step 1: the manifest, verified part by part. Pages are asked round robin
/// of the sources that sent the root, [`PAGE_WINDOW`] at a time each; a
/// source that leaves or sends a bad page is dropped, one that stops
/// sending them ([`PAGE_STALL`]) too when another can, and what it owed is
/// asked of the others. Only a verified root or page counts as progress: a
/// source that just keeps its connection alive does not hold the fetch.
async fn receive_manifest(
    id: &BlobId,
    peers: &mut BTreeMap<PeerId, Peer>,
    events: &mut Events,
) -> Result<Manifest> {
    let mut asm = ManifestAssembler::new(*id, ManifestLimits::default());
    let mut asks = PageAsks::default();
    let mut progress = Instant::now();
    let mut turn = 0usize;
    loop {
        if asm.is_complete() {
            return asm
                .finish()
                .map(|(m, _)| m)
                .ok_or_else(|| anyhow!("manifest of {id} does not assemble"));
        }
        if peers.values().all(|p| !p.alive() || p.not_found) {
            bail!("none of the sources holds {id}{}", peer_errors(peers));
        }
        if let Some(pages) = asm.root().map(|r| r.pages.len() as u32) {
            let holders = page_holders(peers);
            let may_answer = peers
                .values()
                .any(|p| p.alive() && !p.root_answered && !p.not_found);
            if holders.is_empty() && !may_answer {
                bail!(
                    "every source that sent the manifest root of {id} is gone{}",
                    peer_errors(peers)
                );
            }
            let now = Instant::now();
            let mut room: Vec<usize> = holders
                .iter()
                .map(|&h| PAGE_WINDOW.saturating_sub(asks.owed_by(h)))
                .collect();
            while room.iter().any(|&r| r > 0) {
                let Some(page) = asks.next_page(pages, |p| asm.has_page(p)) else {
                    break;
                };
                while room[turn % holders.len()] == 0 {
                    turn += 1;
                }
                let k = turn % holders.len();
                turn += 1;
                room[k] -= 1;
                if let Some(c) = peers[&holders[k]].first() {
                    c.send(encode(&Frame::GetManifestPage { blob: *id, page }))
                        .await;
                }
                asks.ask(page, holders[k], now);
            }
        }
        let give_up = progress + NO_PROGRESS_TIMEOUT;
        let wake = asks.next_overdue().map_or(give_up, |t| t.min(give_up));
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if now >= give_up {
                    bail!(
                        "no source sent the manifest of {id} for {NO_PROGRESS_TIMEOUT:?}{}",
                        peer_errors(peers)
                    );
                }
                let overdue = asks.overdue(now);
                let mut holders = page_holders(peers);
                for pid in overdue.iter().copied() {
                    if !holders.iter().any(|h| *h != pid && !overdue.contains(h)) {
                        // No source sending pages to give them to: a slow
                        // one is still one (NO_PROGRESS_TIMEOUT decides).
                        asks.wait_longer(pid, now);
                        continue;
                    }
                    holders.retain(|&h| h != pid);
                    let p = peers.get_mut(&pid).expect("known peer");
                    let why = format!("sent no manifest page for {PAGE_STALL:?}");
                    tracing::warn!("source {} {why}: dropped from the fetch of {id}", p.addr);
                    p.close(CloseCode::IDLE, &why).await;
                    p.error = Some(why);
                    asks.forget(pid);
                }
                continue;
            }
        };
        let Some((pid, ev)) = ev else {
            bail!("every source is gone{}", peer_errors(peers));
        };
        let p = peers.get_mut(&pid).expect("known peer");
        let bytes = match ev {
            PeerEvent::Frame(b) => b,
            PeerEvent::Closed { lane, why } => {
                // Its root and pages were asked on its first connection: if
                // that is the one that closed (a source may refuse any of
                // a fetch's connections, the first too, when they race to
                // its `connections_per_peer`), ask them again on the next.
                let carried_asks = p.conns.first().is_some_and(|(l, _)| *l == lane);
                if carried_asks {
                    asks.forget(pid);
                }
                p.drop_lane(lane);
                if !p.alive() {
                    p.error.get_or_insert(why);
                } else if carried_asks
                    // The `Have` follows the root in the same answer.
                    && (!p.root_answered || p.have.is_none())
                    && !p.not_found
                {
                    p.ask_root(*id).await;
                }
                continue;
            }
            PeerEvent::Chunks(_) | PeerEvent::LocalError(_) => continue,
        };
        let Some(frame) = decode_one(&bytes) else {
            continue;
        };
        let mut bad = async |p: &mut Peer, why: String| {
            tracing::warn!("source {} sent a bad manifest part for {id}: {why}", p.addr);
            p.close(CloseCode::PROTOCOL, "bad manifest part").await;
            p.error = Some(why);
            p.banned = true;
            asks.forget(pid);
        };
        match frame {
            Frame::Hello(h) => p.hello = Some(h),
            Frame::ManifestRoot { blob, root } if blob == *id => {
                p.root_answered = true;
                let first = asm.root().is_none();
                match asm.handle_root(root) {
                    Err(e) => bad(p, format!("root: {e}")).await,
                    Ok(()) if first => progress = Instant::now(),
                    Ok(()) => {}
                }
            }
            Frame::ManifestPage { blob, page, bytes } if blob == *id => {
                // A page already here is not checked again: it proves
                // nothing, and counts for nothing.
                let missing = !asm.has_page(page);
                match asm.handle_page(page, bytes) {
                    Err(e) => bad(p, format!("page {page}: {e}")).await,
                    Ok(()) if missing => {
                        progress = Instant::now();
                        asks.received(page, pid, progress);
                    }
                    Ok(()) => {}
                }
            }
            Frame::NotFound { blob } if blob == *id => {
                p.not_found = true;
                p.error
                    .get_or_insert_with(|| "does not hold the blob".into());
                asks.forget(pid);
            }
            Frame::Have(h) if h.blob == *id => p.have = Some(bytes),
            _ => {}
        }
    }
}

/// Decodes one encoded frame (as connections forward them).
fn decode_one(bytes: &[u8]) -> Option<Frame<'_>> {
    match wire::decode_frame(bytes, &Limits::DEFAULT) {
        Ok(Some((frame, _))) => Some(frame),
        _ => None,
    }
}

/// Lengths of every chunk, page by page (4 bytes per chunk).
fn chunk_lens(m: &Manifest) -> Result<Vec<u32>> {
    let mut lens = Vec::with_capacity(m.root.chunk_count as usize);
    for (i, page) in m.pages.iter().enumerate() {
        for e in m.root.decode_page(i, page)? {
            lens.push(e.len);
        }
    }
    Ok(lens)
}

/// Joins a peer to the scheduler once it has both sent `Hello` and a `Have`.
fn try_join(sched: &mut Scheduler, now: substrate::Timestamp, pid: PeerId, p: &mut Peer) {
    if p.joined || p.banned || !p.alive() {
        return;
    }
    let (Some(hello), Some(have)) = (p.hello, p.have.as_ref()) else {
        return;
    };
    let Some(Frame::Have(map)) = decode_one(have) else {
        return;
    };
    match sched.handle_peer_joined(now, pid, PeerCredit::from_hello(&hello), &map) {
        Ok(()) => p.joined = true,
        Err(e) => {
            tracing::warn!("source {} cannot join the fetch: {e}", p.addr);
            p.error = Some(e.to_string());
        }
    }
}

/// Handles a frame from a source during the chunk phase; `true` if it tells
/// what the source holds (which counts as the fetch going on).
fn on_frame(
    sched: &mut Scheduler,
    now: substrate::Timestamp,
    id: &BlobId,
    pid: PeerId,
    p: &mut Peer,
    bytes: &[u8],
) -> bool {
    let Some(frame) = decode_one(bytes) else {
        return false;
    };
    match frame {
        Frame::Hello(h) => {
            p.hello = Some(h);
            try_join(sched, now, pid, p);
        }
        Frame::Have(map) if map.blob == *id => {
            if p.joined {
                if let Err(e) = sched.handle_have_update(now, pid, &map) {
                    tracing::warn!("source {} sent an unusable have-map: {e}", p.addr);
                }
            } else {
                p.have = Some(bytes.to_vec());
                try_join(sched, now, pid, p);
            }
            return true;
        }
        Frame::Reject { request, code } => sched.handle_reject(now, pid, request, code),
        Frame::NotFound { blob } if blob == *id => {
            p.not_found = true;
            p.error
                .get_or_insert_with(|| "does not hold the blob".into());
        }
        // Late manifest parts (we had them already) and anything else.
        _ => {}
    }
    false
}

impl Daemon {
    /// Marks `id` as being fetched; a second fetch of it waits for nothing
    /// and fails (two fetches would write the same partial blob).
    pub(crate) fn begin_fetch(self: &Arc<Self>, id: BlobId) -> Result<FetchGuard> {
        let mut f = self.fetching.lock().expect("poisoned");
        if !f.insert(id) {
            bail!("{id} is already being fetched");
        }
        self.stats.fetches_started.fetch_add(1, Ordering::Relaxed);
        Ok(FetchGuard {
            daemon: Arc::clone(self),
            id,
        })
    }
}

pub(crate) struct FetchGuard {
    daemon: Arc<Daemon>,
    id: BlobId,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        self.daemon
            .fetching
            .lock()
            .expect("poisoned")
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages go out in order, each once; what a source that left owed comes
    /// back first; a page sent by another source than the one asked is
    /// no longer owed by either, and only the sender's clock restarts.
    #[test]
    fn page_asks_track_who_owes_what() {
        let (a, b) = (PeerId(0), PeerId(1));
        let t0 = Instant::now();
        let mut asks = PageAsks::default();
        let here = |p: u32| p == 2;
        let mut asked = Vec::new();
        while let Some(p) = asks.next_page(6, here) {
            asks.ask(p, if p % 2 == 0 { a } else { b }, t0);
            asked.push(p);
        }
        assert_eq!(asked, [0, 1, 3, 4, 5], "page 2 is here already");
        assert_eq!((asks.owed_by(a), asks.owed_by(b)), (2, 3));
        assert_eq!(asks.next_overdue(), Some(t0 + PAGE_STALL));
        let t1 = t0 + Duration::from_secs(3);
        // B sends page 0, which A owed.
        asks.received(0, b, t1);
        assert_eq!((asks.owed_by(a), asks.owed_by(b)), (1, 3));
        assert_eq!(asks.overdue(t0 + PAGE_STALL), [a], "B sent one since");
        asks.forget(a);
        assert_eq!(asks.owed_by(a), 0);
        assert_eq!(asks.next_page(6, here), Some(4), "A's page again");
        assert_eq!(asks.next_page(6, here), None);
        // B's last owed page arrives: it owes nothing, no clock runs.
        for p in [1, 3, 5] {
            asks.received(p, b, t1);
        }
        assert_eq!(asks.next_overdue(), None);
    }
}
