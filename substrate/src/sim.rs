//! A seeded, single-threaded simulation of one receiver fetching a blob
//! from several sources over a fake network, with a fake clock (in the
//! spirit of quinn-proto's in-memory `Pair` and TigerBeetle's VOPR).
//!
//! Everything real runs: frames are encoded and decoded by the wire codec,
//! the manifest is fetched and verified part by part by the
//! `ManifestAssembler`, the receiver runs the `Scheduler`, each source
//! runs an `Uploader`, and every chunk is checked against its BLAKE3 from
//! the manifest. Only the network and the clock are fake:
//!
//! - each direction of each source's connection is a link with a bandwidth
//!   and a one-way latency; a frame occupies its link for
//!   `len / bandwidth` and arrives `latency` after it has left;
//! - a source queues frames on its link only while less than a send buffer
//!   (64 KiB) is waiting, so cancels take effect quickly;
//! - time jumps from event to event (a `BTreeMap` ordered by time, then
//!   insertion), so the same seed always gives the same run, to the
//!   microsecond.
//!
//! Sources can be honest, corrupt (flip a byte of every chunk they send) or
//! stall (go silent at a given time, connection left open), hold all of the
//! blob or a range of chunks, and have an upload rate limit.
//!
//! Built for this crate's tests, and for other crates (`vigo-perf`) with
//! the `sim` feature.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use engine::chunker::ChunkerParams;
use engine::hash::{BlobId, ChunkHash, ContentHash};
use engine::manifest::{ChunkEntry, Manifest, ManifestLimits};

use crate::rng::SplitMix64;
use crate::sched::{
    BanReason, DataOutcome, Event, PeerCredit, PeerId, SchedConfig, SchedStats, Scheduler, Verdict,
};
use crate::serve::{ServeLimits, Transmit, Uploader};
use crate::time::{Timestamp, duration_micros};
use crate::wire::{
    self, CloseCode, Decoder, Frame, HaveBuf, Hello, Limits, ManifestAssembler, PROTOCOL_VERSION,
    RejectCode, Request,
};

/// How a simulated source behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    Honest,
    /// Every chunk it sends has one byte flipped.
    Corrupt,
    /// Goes silent at this simulated time (connection stays open).
    StallAfter(Duration),
}

/// One source envoy and its link to the receiver.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    /// Bandwidth of the source → receiver link, bytes per second.
    pub uplink_bytes_per_s: u64,
    /// One-way latency of both directions.
    pub latency: Duration,
    /// The source's configured upload limit (its `Uploader` bucket).
    pub upload_bytes_per_s: Option<u64>,
    /// Chunks it holds; `None` for the whole blob.
    pub holds: Option<Range<u64>>,
    pub behavior: Behavior,
}

impl SourceSpec {
    /// An honest source holding everything.
    pub fn honest(uplink_bytes_per_s: u64, latency: Duration) -> Self {
        SourceSpec {
            uplink_bytes_per_s,
            latency,
            upload_bytes_per_s: None,
            holds: None,
            behavior: Behavior::Honest,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Blob size; chunk lengths are drawn uniformly around the chunker's
    /// average, between its min and max.
    pub blob_bytes: u64,
    pub chunker: ChunkerParams,
    pub sources: Vec<SourceSpec>,
    /// Bandwidth of every receiver → source link, bytes per second.
    pub receiver_uplink_bytes_per_s: u64,
    pub sched: SchedConfig,
    pub serve: ServeLimits,
    pub wire: Limits,
    /// The run gives up at this simulated time.
    pub time_limit: Duration,
    /// Check the scheduler's invariants after every step (slow; tests).
    pub check_invariants: bool,
}

impl SimConfig {
    pub fn new(seed: u64, blob_bytes: u64, sources: Vec<SourceSpec>) -> Self {
        SimConfig {
            seed,
            blob_bytes,
            chunker: ChunkerParams::DEFAULT,
            sources,
            receiver_uplink_bytes_per_s: 1_000_000_000,
            sched: SchedConfig {
                seed,
                ..SchedConfig::DEFAULT
            },
            serve: ServeLimits::DEFAULT,
            wire: Limits::DEFAULT,
            time_limit: Duration::from_secs(3600),
            check_invariants: false,
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    pub completed: bool,
    /// Simulated time from start to `Complete` (or to giving up).
    pub elapsed: Duration,
    pub blob_bytes: u64,
    pub chunks: u64,
    /// Chunk payload bytes received from each source.
    pub bytes_from: Vec<u64>,
    pub banned: Vec<usize>,
    pub dropped: Vec<usize>,
    pub stats: SchedStats,
    /// Frames that crossed the network, both directions.
    pub frames: u64,
    /// Notable events, in order, with their simulated time.
    pub log: Vec<String>,
}

impl SimReport {
    /// Content bytes per simulated second (10⁹ bytes/s units: GB/s).
    pub fn gb_per_s(&self) -> f64 {
        self.blob_bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// What a source may have queued on its uplink beyond the frame being sent
/// (a socket send buffer): enough to keep the link busy between wake-ups,
/// small enough that a cancel still takes effect quickly.
const SEND_BUFFER_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
enum Ev {
    /// Bytes arrive at the receiver (`to_receiver`) or at the source.
    Arrive {
        source: usize,
        to_receiver: bool,
        bytes: Vec<u8>,
    },
    /// The source's uplink finished sending a frame.
    UplinkFree {
        source: usize,
    },
    ReceiverTimer,
    SourceTimer {
        source: usize,
    },
}

#[derive(Debug)]
struct Link {
    bytes_per_s: u64,
    latency: Duration,
    /// When the link finishes its current frame, in nanoseconds: frames of
    /// a few KiB take a few microseconds, and rounding each to whole
    /// microseconds would cost percents of bandwidth.
    busy_until_ns: u128,
}

impl Link {
    fn busy_until(&self) -> Timestamp {
        Timestamp(self.busy_until_ns.div_ceil(1000) as u64)
    }
}

struct Source {
    spec: SourceSpec,
    uploader: Uploader,
    decoder: Decoder,
    outbox: VecDeque<Vec<u8>>,
    up: Link,
    down: Link,
    uplink_wake: bool,
    closed: bool,
}

struct Receiver {
    decoders: Vec<Option<Decoder>>,
    hellos: Vec<Option<Hello>>,
    haves: Vec<Vec<HaveBuf>>,
    joined: Vec<bool>,
    closed: Vec<bool>,
    assembler: Option<ManifestAssembler>,
    hashes: Vec<ChunkHash>,
    sched: Option<Scheduler>,
    timer_at: Option<Timestamp>,
}

struct Sim {
    config: SimConfig,
    blob: BlobId,
    manifest: Manifest,
    content: Vec<u8>,
    entries: Vec<ChunkEntry>,
    sources: Vec<Source>,
    rx: Receiver,
    queue: BTreeMap<(Timestamp, u64), Ev>,
    seq: u64,
    now: Timestamp,
    completed_at: Option<Timestamp>,
    report: SimReport,
}

/// Runs one simulation to completion (or `time_limit`).
pub fn run(config: SimConfig) -> SimReport {
    let mut sim = Sim::new(config);
    sim.start();
    let limit = Timestamp(duration_micros(sim.config.time_limit));
    while sim.completed_at.is_none() {
        let Some(((at, _), ev)) = sim.queue.pop_first() else {
            break;
        };
        if at > limit {
            break;
        }
        sim.now = at;
        sim.step(ev);
    }
    sim.finish()
}

/// Deterministic content: chunk lengths and bytes from the seed.
fn make_blob(seed: u64, blob_bytes: u64, params: ChunkerParams) -> (Vec<u8>, Vec<ChunkEntry>) {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_b10b);
    let mut content = Vec::with_capacity(blob_bytes as usize + 8);
    while (content.len() as u64) < blob_bytes {
        content.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    content.truncate(blob_bytes as usize);
    let (min, avg) = (u64::from(params.min_bytes), u64::from(params.avg_bytes));
    let mut entries = Vec::new();
    let mut offset = 0u64;
    while offset < blob_bytes {
        let len = rng.range(min, 2 * avg - min).min(blob_bytes - offset);
        let bytes = &content[offset as usize..(offset + len) as usize];
        entries.push(ChunkEntry {
            offset,
            len: len as u32,
            hash: ChunkHash::of(bytes),
        });
        offset += len;
    }
    (content, entries)
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let (content, entries) = make_blob(config.seed, config.blob_bytes, config.chunker);
        // The whole-content hash is not checked by transfers; a fixed value
        // keeps blob construction cheap.
        let manifest = Manifest::from_entries(config.chunker, ContentHash([0; 32]), &entries);
        let blob = manifest.id();
        let t0 = Timestamp::ZERO;
        let k = config.sources.len();
        let sources = config
            .sources
            .iter()
            .map(|spec| {
                let serve = ServeLimits {
                    upload_bytes_per_s: spec.upload_bytes_per_s,
                    ..config.serve
                };
                Source {
                    uploader: Uploader::new(t0, serve),
                    decoder: Decoder::new(config.wire),
                    outbox: VecDeque::new(),
                    up: Link {
                        bytes_per_s: spec.uplink_bytes_per_s,
                        latency: spec.latency,
                        busy_until_ns: 0,
                    },
                    down: Link {
                        bytes_per_s: config.receiver_uplink_bytes_per_s,
                        latency: spec.latency,
                        busy_until_ns: 0,
                    },
                    spec: spec.clone(),
                    uplink_wake: false,
                    closed: false,
                }
            })
            .collect();
        let rx = Receiver {
            decoders: (0..k).map(|_| Some(Decoder::new(config.wire))).collect(),
            hellos: vec![None; k],
            haves: vec![Vec::new(); k],
            joined: vec![false; k],
            closed: vec![false; k],
            assembler: Some(ManifestAssembler::new(blob, ManifestLimits::default())),
            hashes: Vec::new(),
            sched: None,
            timer_at: None,
        };
        let report = SimReport {
            completed: false,
            elapsed: Duration::ZERO,
            blob_bytes: config.blob_bytes,
            chunks: entries.len() as u64,
            bytes_from: vec![0; k],
            banned: Vec::new(),
            dropped: Vec::new(),
            stats: SchedStats::default(),
            frames: 0,
            log: Vec::new(),
        };
        Sim {
            config,
            blob,
            manifest,
            content,
            entries,
            sources,
            rx,
            queue: BTreeMap::new(),
            seq: 0,
            now: t0,
            completed_at: None,
            report,
        }
    }

    fn log(&mut self, what: String) {
        let line = format!("{:?} {what}", self.now);
        self.report.log.push(line);
    }

    fn schedule(&mut self, at: Timestamp, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn encode(&self, frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode(frame, &self.config.wire, &mut out)
            .expect("the simulation sends valid frames");
        out
    }

    /// Puts bytes on a link; returns when the link is free again.
    fn transmit(&mut self, source: usize, to_receiver: bool, bytes: Vec<u8>) -> Timestamp {
        let now = self.now;
        let link = if to_receiver {
            &mut self.sources[source].up
        } else {
            &mut self.sources[source].down
        };
        let start_ns = link.busy_until_ns.max(u128::from(now.as_micros()) * 1000);
        let ns = (bytes.len() as u128 * 1_000_000_000).div_ceil(u128::from(link.bytes_per_s));
        link.busy_until_ns = start_ns + ns;
        let done = link.busy_until();
        let arrive = done + link.latency;
        self.report.frames += 1;
        self.schedule(
            arrive,
            Ev::Arrive {
                source,
                to_receiver,
                bytes,
            },
        );
        done
    }

    fn send_down(&mut self, source: usize, frame: &Frame<'_>) {
        let bytes = self.encode(frame);
        self.transmit(source, false, bytes);
    }

    fn start(&mut self) {
        let n = self.entries.len() as u64;
        for s in 0..self.sources.len() {
            let hello = self.sources[s]
                .uploader
                .hello(self.config.wire.frame_bytes_max);
            let have = match &self.sources[s].spec.holds {
                None => HaveBuf::from_ranges(self.blob, 0, n.max(1), std::iter::once(0..n)),
                Some(r) => {
                    let held = r.start.min(n)..r.end.min(n);
                    HaveBuf::from_ranges(self.blob, 0, n.max(1), std::iter::once(held))
                }
            };
            let frames = [
                self.encode(&Frame::Hello(hello)),
                self.encode(&Frame::Have(have.as_map())),
            ];
            self.sources[s].outbox.extend(frames);
            self.pump_source(s);
            let hello = Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                requests_in_flight_max: 0,
                frame_bytes_max: self.config.wire.frame_bytes_max,
                credit_bytes: 0,
            });
            self.send_down(s, &hello);
            self.send_down(s, &Frame::GetManifest { blob: self.blob });
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive {
                source,
                to_receiver: true,
                bytes,
            } => self.receiver_input(source, &bytes),
            Ev::Arrive {
                source,
                to_receiver: false,
                bytes,
            } => self.source_input(source, &bytes),
            Ev::UplinkFree { source } => {
                self.sources[source].uplink_wake = false;
                self.pump_source(source);
            }
            Ev::SourceTimer { source } => {
                self.sources[source].uploader.handle_timeout(self.now);
                self.pump_source(source);
            }
            Ev::ReceiverTimer => {
                if self.rx.timer_at.is_some_and(|t| t <= self.now) {
                    self.rx.timer_at = None;
                }
                if let Some(s) = &mut self.rx.sched {
                    s.handle_timeout(self.now);
                }
                self.drive_receiver();
            }
        }
    }

    fn stalled(&self, source: usize) -> bool {
        let src = &self.sources[source];
        src.closed
            || matches!(src.spec.behavior, Behavior::StallAfter(d) if self.now >= Timestamp(duration_micros(d)))
    }

    // ---- sources -----------------------------------------------------------

    fn source_input(&mut self, s: usize, bytes: &[u8]) {
        if self.stalled(s) {
            return;
        }
        let mut decoder =
            std::mem::replace(&mut self.sources[s].decoder, Decoder::new(self.config.wire));
        decoder.feed(bytes);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => self.source_frame(s, frame),
                Ok(None) => break,
                Err(e) => {
                    self.log(format!("source {s}: bad frame from receiver: {e}"));
                    self.sources[s].closed = true;
                    break;
                }
            }
            if self.sources[s].closed {
                break;
            }
        }
        self.sources[s].decoder = decoder;
        self.pump_source(s);
    }

    fn source_frame(&mut self, s: usize, frame: Frame<'_>) {
        let now = self.now;
        match frame {
            Frame::GetManifest { blob } if blob == self.blob => {
                let root = self.manifest.root.encode();
                let f = self.encode(&Frame::ManifestRoot { blob, root: &root });
                self.sources[s].outbox.push_back(f);
            }
            Frame::GetManifestPage { blob, page } if blob == self.blob => {
                let f = match self.manifest.pages.get(page as usize) {
                    Some(bytes) => self.encode(&Frame::ManifestPage { blob, page, bytes }),
                    None => self.encode(&Frame::NotFound { blob }),
                };
                self.sources[s].outbox.push_back(f);
            }
            Frame::GetManifest { blob } | Frame::GetManifestPage { blob, .. } => {
                let f = self.encode(&Frame::NotFound { blob });
                self.sources[s].outbox.push_back(f);
            }
            Frame::Request(r) => {
                let entries = &self.entries;
                let blob = self.blob;
                let holds = self.sources[s].spec.holds.clone();
                let resolve = |r: &Request| {
                    let run = r.chunks();
                    let held = holds
                        .as_ref()
                        .is_none_or(|h| h.start <= run.start && run.end <= h.end);
                    if r.blob != blob || run.end > entries.len() as u64 || !held {
                        return Err(RejectCode::NOT_HELD);
                    }
                    Ok(run.map(|c| u64::from(entries[c as usize].len)).sum())
                };
                if let Err(e) = self.sources[s].uploader.handle_request(now, &r, resolve) {
                    self.log(format!("source {s}: closing: {e}"));
                    let close = self.encode(&Frame::Close {
                        code: e.close_code(),
                        text: "limit",
                    });
                    self.sources[s].outbox.push_back(close);
                }
            }
            Frame::Cancel { request } => self.sources[s].uploader.handle_cancel(now, request),
            Frame::BadChunk { chunk_index, .. } => {
                self.log(format!(
                    "source {s}: told chunk {chunk_index} failed verification (would re-verify)"
                ));
            }
            Frame::Close { code, text } => {
                self.log(format!("source {s}: receiver closed ({code:?}: {text})"));
                self.sources[s].closed = true;
            }
            _ => {}
        }
    }

    /// Puts frames on the uplink while its backlog is under the socket's
    /// send buffer.
    fn pump_source(&mut self, s: usize) {
        if self.stalled(s) || self.sources[s].uplink_wake {
            return;
        }
        let now = self.now;
        let now_ns = u128::from(now.as_micros()) * 1000;
        loop {
            let up = &self.sources[s].up;
            let buffer_ns =
                u128::from(SEND_BUFFER_BYTES) * 1_000_000_000 / u128::from(up.bytes_per_s);
            if up.busy_until_ns > now_ns + buffer_ns {
                let at = Timestamp((up.busy_until_ns - buffer_ns).div_ceil(1000) as u64);
                self.sources[s].uplink_wake = true;
                self.schedule(at, Ev::UplinkFree { source: s });
                return;
            }
            let Some(bytes) = self.next_uplink_frame(s) else {
                return;
            };
            self.transmit(s, true, bytes);
        }
    }

    fn next_uplink_frame(&mut self, s: usize) -> Option<Vec<u8>> {
        let now = self.now;
        if let Some(f) = self.sources[s].outbox.pop_front() {
            return Some(f);
        }
        match self.sources[s].uploader.poll_transmit(now) {
            Some(Transmit::Reject { request, code }) => {
                Some(self.encode(&Frame::Reject { request, code }))
            }
            Some(Transmit::Chunk {
                request,
                chunk_index,
                ..
            }) => {
                let e = self.entries[chunk_index as usize];
                let payload = &self.content[e.offset as usize..e.end() as usize];
                let header =
                    wire::data_header(request, chunk_index, payload.len(), &self.config.wire)
                        .expect("chunks fit the limits");
                let mut bytes = Vec::with_capacity(header.len() + payload.len());
                bytes.extend_from_slice(&header);
                bytes.extend_from_slice(payload);
                if self.sources[s].spec.behavior == Behavior::Corrupt {
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x40;
                }
                self.sources[s]
                    .uploader
                    .handle_sent(now, request, u64::from(e.len));
                Some(bytes)
            }
            None => {
                if let Some(t) = self.sources[s].uploader.next_timeout() {
                    self.schedule(
                        t.max(now + Duration::from_micros(1)),
                        Ev::SourceTimer { source: s },
                    );
                }
                None
            }
        }
    }

    // ---- receiver ----------------------------------------------------------

    fn receiver_input(&mut self, s: usize, bytes: &[u8]) {
        if self.rx.closed[s] {
            return;
        }
        let Some(mut decoder) = self.rx.decoders[s].take() else {
            return;
        };
        decoder.feed(bytes);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => self.receiver_frame(s, frame),
                Ok(None) => break,
                Err(e) => {
                    self.log(format!("receiver: bad frame from source {s}: {e}"));
                    self.close_source(s, e.close_code());
                    break;
                }
            }
            if self.rx.closed[s] {
                break;
            }
        }
        self.rx.decoders[s] = Some(decoder);
        self.drive_receiver();
    }

    fn close_source(&mut self, s: usize, code: CloseCode) {
        self.rx.closed[s] = true;
        if let Some(sched) = &mut self.rx.sched {
            sched.handle_peer_lost(self.now, PeerId(s as u64));
        }
        self.send_down(
            s,
            &Frame::Close {
                code,
                text: "closing",
            },
        );
    }

    fn receiver_frame(&mut self, s: usize, frame: Frame<'_>) {
        let now = self.now;
        let peer = PeerId(s as u64);
        match frame {
            Frame::Hello(h) => {
                self.rx.hellos[s] = Some(h);
                self.try_join(s);
            }
            Frame::ManifestRoot { root, .. } => {
                let Some(a) = &mut self.rx.assembler else {
                    return;
                };
                let first = a.root().is_none();
                match a.handle_root(root) {
                    Ok(()) if first => {
                        let pages: Vec<u32> = a.pages_missing().collect();
                        for page in pages {
                            self.send_down(
                                s,
                                &Frame::GetManifestPage {
                                    blob: self.blob,
                                    page,
                                },
                            );
                        }
                        self.log(format!("receiver: manifest root verified, from source {s}"));
                        self.maybe_start();
                    }
                    Ok(()) => {}
                    Err(e) => self.log(format!("receiver: root from source {s} refused: {e}")),
                }
            }
            Frame::ManifestPage { page, bytes, .. } => {
                if let Some(a) = &mut self.rx.assembler
                    && let Err(e) = a.handle_page(page, bytes)
                {
                    self.log(format!(
                        "receiver: page {page} from source {s} refused: {e}"
                    ));
                }
                self.maybe_start();
            }
            Frame::Have(map) => {
                let buf = HaveBuf::from_ranges(
                    map.blob,
                    map.first_chunk,
                    map.span_chunks,
                    map.held_runs(),
                );
                match &mut self.rx.sched {
                    Some(sched) if self.rx.joined[s] => {
                        if let Err(e) = sched.handle_have_update(now, peer, &buf.as_map()) {
                            self.log(format!("receiver: have-map from source {s} refused: {e}"));
                        }
                    }
                    _ => {
                        self.rx.haves[s].push(buf);
                        self.try_join(s);
                    }
                }
            }
            Frame::Data {
                request,
                chunk_index,
                payload,
            } => {
                let Some(sched) = &mut self.rx.sched else {
                    return;
                };
                let ok = self.entries.get(chunk_index as usize).is_some_and(|e| {
                    e.len as usize == payload.len()
                        && self.rx.hashes[chunk_index as usize] == ChunkHash::of(payload)
                });
                let verdict = if ok { Verdict::Ok } else { Verdict::Bad };
                self.report.bytes_from[s] += payload.len() as u64;
                match sched.handle_data(now, peer, request, chunk_index, verdict) {
                    DataOutcome::Violation(what) => {
                        self.log(format!(
                            "receiver: protocol violation by source {s}: {what}"
                        ));
                        self.close_source(s, CloseCode::PROTOCOL);
                    }
                    DataOutcome::Accepted
                    | DataOutcome::Duplicate
                    | DataOutcome::Stale
                    | DataOutcome::Banned => {}
                }
            }
            Frame::Reject { request, code } => {
                if let Some(sched) = &mut self.rx.sched {
                    sched.handle_reject(now, peer, request, code);
                }
            }
            Frame::Close { code, text } => {
                self.log(format!("receiver: source {s} closed ({code:?}: {text})"));
                self.rx.closed[s] = true;
                if let Some(sched) = &mut self.rx.sched {
                    sched.handle_peer_lost(now, peer);
                }
            }
            Frame::NotFound { .. } => {
                self.log(format!("receiver: source {s} does not hold the blob"))
            }
            _ => {}
        }
    }

    /// Once the manifest is whole, the scheduler starts with every source
    /// that has said hello.
    fn maybe_start(&mut self) {
        if self.rx.sched.is_some() || !self.rx.assembler.as_ref().is_some_and(|a| a.is_complete()) {
            return;
        }
        let assembler = self.rx.assembler.take().expect("checked above");
        let Some((manifest, lens)) = assembler.finish() else {
            return;
        };
        self.rx.hashes = manifest
            .entries()
            .expect("verified pages decode")
            .iter()
            .map(|e| e.hash)
            .collect();
        let n = lens.len() as u64;
        let sched = Scheduler::new(self.now, self.config.sched.clone(), self.blob, lens, 0..n)
            .expect("simulation config is valid");
        self.rx.sched = Some(sched);
        self.log(format!(
            "receiver: manifest complete ({n} chunks), fetching"
        ));
        for s in 0..self.sources.len() {
            self.try_join(s);
        }
    }

    fn try_join(&mut self, s: usize) {
        let now = self.now;
        let (Some(sched), Some(hello)) = (&mut self.rx.sched, self.rx.hellos[s]) else {
            return;
        };
        if self.rx.joined[s] || self.rx.closed[s] || self.rx.haves[s].is_empty() {
            return;
        }
        let peer = PeerId(s as u64);
        let haves = std::mem::take(&mut self.rx.haves[s]);
        let credit = PeerCredit::from_hello(&hello);
        if let Err(e) = sched.handle_peer_joined(now, peer, credit, &haves[0].as_map()) {
            self.log(format!("receiver: source {s} cannot join: {e}"));
            return;
        }
        for h in &haves[1..] {
            let _ = sched.handle_have_update(now, peer, &h.as_map());
        }
        self.rx.joined[s] = true;
    }

    /// Drains the scheduler's outputs onto the links.
    fn drive_receiver(&mut self) {
        let now = self.now;
        let Some(mut sched) = self.rx.sched.take() else {
            return;
        };
        while let Some((peer, request)) = sched.poll_cancel() {
            self.send_down(peer.0 as usize, &Frame::Cancel { request });
        }
        while let Some(ev) = sched.poll_event() {
            match ev {
                Event::Banned { peer, reason } => {
                    let s = peer.0 as usize;
                    self.report.banned.push(s);
                    self.log(format!("receiver: banned source {s}: {reason:?}"));
                    if let BanReason::BadChunk { chunk_index } = reason {
                        self.send_down(
                            s,
                            &Frame::BadChunk {
                                blob: self.blob,
                                chunk_index,
                            },
                        );
                    }
                }
                Event::PeerDropped { peer, reason } => {
                    self.report.dropped.push(peer.0 as usize);
                    self.log(format!("receiver: dropped source {}: {reason:?}", peer.0));
                }
                Event::Stalled { chunks_unavailable } => {
                    self.log(format!(
                        "receiver: stalled, {chunks_unavailable} chunks on no peer"
                    ));
                }
                Event::Complete => {
                    self.completed_at = Some(now);
                    self.log("receiver: complete".to_string());
                }
            }
        }
        // Cancels raised while handling events (bans) go out first.
        while let Some((peer, request)) = sched.poll_cancel() {
            self.send_down(peer.0 as usize, &Frame::Cancel { request });
        }
        while let Some((peer, request)) = sched.poll_request(now) {
            self.send_down(peer.0 as usize, &Frame::Request(request));
        }
        if self.config.check_invariants {
            sched.assert_invariants();
        }
        if let Some(t) = sched.next_timeout() {
            let t = t.max(now + Duration::from_micros(1));
            if self.rx.timer_at.is_none_or(|old| t < old) {
                self.rx.timer_at = Some(t);
                self.schedule(t, Ev::ReceiverTimer);
            }
        }
        self.report.stats = sched.stats();
        self.rx.sched = Some(sched);
    }

    fn finish(mut self) -> SimReport {
        self.report.completed = self.completed_at.is_some();
        self.report.elapsed = self
            .completed_at
            .unwrap_or(self.now)
            .saturating_duration_since(Timestamp::ZERO);
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn lan(rate: u64) -> SourceSpec {
        SourceSpec::honest(rate, Duration::from_micros(100))
    }

    #[test]
    fn three_sources_complete_and_share_the_work() {
        let mut config = SimConfig::new(
            1,
            24 << 20,
            vec![lan(100 * MB), lan(100 * MB), lan(100 * MB)],
        );
        config.check_invariants = true;
        let r = run(config);
        assert!(r.completed, "{:#?}", r.log);
        assert_eq!(r.stats.chunks_done, r.chunks);
        for (s, &b) in r.bytes_from.iter().enumerate() {
            assert!(b > (24 << 20) / 5, "source {s} sent only {b} bytes");
        }
        // 24 MiB at 300 MB/s is 84 ms; allow for the manifest round trips
        // and the tail.
        let ms = r.elapsed.as_secs_f64() * 1e3;
        assert!((84.0..110.0).contains(&ms), "took {ms:.1} ms");
        assert!(r.banned.is_empty() && r.dropped.is_empty());
    }

    #[test]
    fn same_seed_same_run() {
        let make = |seed| {
            let mut c = SimConfig::new(seed, 8 << 20, vec![lan(100 * MB), lan(40 * MB)]);
            c.sources[1].holds = Some(10..200);
            c
        };
        let a = run(make(7));
        let b = run(make(7));
        assert_eq!(a, b);
        let c = run(make(8));
        assert_ne!(a.log, c.log, "another seed, another blob and order");
    }

    #[test]
    fn a_corrupt_source_is_banned_and_the_fetch_completes() {
        let mut config = SimConfig::new(
            2,
            16 << 20,
            vec![lan(100 * MB), lan(100 * MB), lan(100 * MB)],
        );
        config.sources[1].behavior = Behavior::Corrupt;
        config.check_invariants = true;
        let r = run(config);
        assert!(r.completed, "{:#?}", r.log);
        assert_eq!(r.banned, vec![1]);
        assert!(
            r.log.iter().any(|l| l.contains("source 1: told chunk")),
            "BadChunk was sent"
        );
        // The corrupt source sent at most what was in flight when its first
        // chunk failed.
        assert!(r.bytes_from[1] <= SchedConfig::DEFAULT.peer_bytes_in_flight_max);
    }

    #[test]
    fn a_stalled_source_is_rescued_by_endgame_or_dropped() {
        let make = || {
            let mut c = SimConfig::new(3, 16 << 20, vec![lan(100 * MB), lan(100 * MB)]);
            c.sources[0].behavior = Behavior::StallAfter(Duration::from_millis(30));
            c.sched.peer_stall_timeout = Duration::from_millis(500);
            c
        };
        // Endgame: once source 1 runs out of work it splits source 0's
        // stuck runs, and the fetch ends before the stall timeout.
        let r = run(make());
        assert!(r.completed, "{:#?}", r.log);
        assert!(r.dropped.is_empty());
        assert!(r.elapsed < Duration::from_millis(300), "{:?}", r.elapsed);
        // Without endgame duplicates only the stall timeout moves the work:
        // source 0 is dropped at 500 ms and source 1 carries on alone.
        let mut config = make();
        config.sched.endgame_copies_max = 1;
        config.check_invariants = true;
        let r = run(config);
        assert!(r.completed, "{:#?}", r.log);
        assert_eq!(r.dropped, vec![0]);
        let s = r.elapsed.as_secs_f64();
        assert!(s > 0.5 && s < 0.75, "took {s} s");
    }

    #[test]
    fn partial_sources_together_complete_the_blob() {
        // Source 0 holds the first 120 chunks, source 1 the rest: each is
        // the only holder of its part, so both must be used.
        let mut config = SimConfig::new(4, 8 << 20, vec![lan(100 * MB), lan(100 * MB)]);
        config.sources[0].holds = Some(0..120);
        config.sources[1].holds = Some(120..u64::MAX);
        config.check_invariants = true;
        let r = run(config);
        assert!(r.completed, "{:#?}", r.log);
        assert!(r.bytes_from[0] > 0 && r.bytes_from[1] > 0);
        assert_eq!(r.stats.bytes_duplicate, 0);
    }

    #[test]
    fn three_capped_sources_match_one_uncapped() {
        // DESIGN/issue target: one uncapped source's time over the time of
        // three sources each capped at a third of that rate: >= 0.83.
        let size = 48 << 20;
        let one = run(SimConfig::new(5, size, vec![lan(300 * MB)]));
        let mut capped = lan(1000 * MB);
        capped.upload_bytes_per_s = Some(100 * MB);
        let mut three = SimConfig::new(5, size, vec![capped.clone(), capped.clone(), capped]);
        three.serve.upload_burst_bytes = 256 << 10;
        let three = run(three);
        assert!(one.completed && three.completed);
        let speedup = one.elapsed.as_secs_f64() / three.elapsed.as_secs_f64();
        assert!(speedup >= 0.83, "multi-source speedup {speedup:.3}");
        assert!(three.stats.bytes_duplicate < size / 10);
    }
}
