//! The piece scheduler: fetching one blob from many peers, as a sans-IO
//! state machine.
//!
//! # Driving it
//! Inputs are `handle_*(now, …)`: peers joining with their have-maps
//! ([`Scheduler::handle_peer_joined`], [`Scheduler::handle_have_update`]),
//! leaving ([`Scheduler::handle_peer_lost`]), chunks arriving *already
//! verified by the caller* ([`Scheduler::handle_data`] with a [`Verdict`]),
//! early ends of requests ([`Scheduler::handle_reject`]) and the passage of
//! time ([`Scheduler::handle_timeout`]). Outputs are pulled:
//! [`Scheduler::poll_request`] (a `wire::Request` for a peer),
//! [`Scheduler::poll_cancel`], [`Scheduler::poll_event`] and
//! [`Scheduler::next_timeout`]. After any input the caller drains all polls,
//! then sleeps until the next frame or `next_timeout`.
//!
//! # Units of work
//! Chunks are small (8 KiB average by default) for identity and dedup; a peer is asked for
//! **runs of consecutive chunks** (DESIGN.md §3 item 5). At construction the
//! blob is cut into fixed *pieces*: consecutive chunks totalling about
//! `run_bytes_target` (4 MiB), at most `request_chunks_max` chunks. A request
//! is a run inside one piece: the longest stretch of still-needed chunks the
//! peer holds, starting at the first such chunk.
//!
//! # Rarest first
//! `avail[c]` counts the live, unbanned peers whose have-map holds chunk `c`.
//! A piece's rarity is the minimum availability over its needed,
//! available chunks; pieces sit in a `BTreeSet` ordered by (rarity,
//! tie-break, index), where the tie-break is drawn per piece from a
//! SplitMix64 seeded by `SchedConfig::seed`. Equal-rarity pieces are thus
//! fetched in a random but reproducible order, and receivers with different
//! seeds spread over different pieces (what makes a swarm share). The draw
//! is per group of up to [`LOCALITY_PIECES_MAX`] consecutive pieces (at
//! least [`LOCALITY_GROUPS_MIN`] groups per blob), taken in index order
//! within the group: the receiver verifies each chunk against its manifest
//! page (4096 chunks, ~40 MiB at the default chunk size) and keeps only a
//! few decoded, so a fully random order re-read and re-decoded a page for
//! nearly every piece (6% of a 4 GiB fetch's receiver CPU). With
//! `SchedConfig::in_order` the tie-break is the piece's index instead:
//! equally rare pieces come in blob order, so a fetch whose export overlaps
//! it (`envoy fetch --out`) finds a growing prefix to stream. A peer is
//! offered the rarest piece it can serve. Piece keys are recomputed only for
//! pieces whose chunks changed state or availability (O(piece) each).
//!
//! # Bounds per peer
//! A peer never has more than `min(peer_requests_in_flight_max, its Hello's
//! requests_in_flight_max)` requests nor more than
//! `min(peer_bytes_in_flight_max, its Hello's credit_bytes)` bytes requested
//! and not yet received. A canceled request keeps counting until the peer
//! acknowledges the cancel (`Reject { CANCELED }`) or sends its remaining
//! chunks, so we never exceed the peer's credit from its point of view.
//! Requests go to peers round robin; a fast peer frees its slots sooner and
//! so gets more work (pull-based balancing, no bandwidth estimates).
//!
//! # Endgame
//! When every needed, available chunk is in flight, a peer that has run out
//! of work of its own duplicates the back half of another peer's remaining
//! run (oldest request first), up to `endgame_copies_max` copies of a chunk.
//! The original is served front to back, so the two meet in the middle: the
//! tail is split between peers rather than raced, and duplicate bytes stay
//! around half a run per idle peer. When a chunk arrives, every other
//! request whose remaining chunks are now all done is canceled. Only idle
//! peers duplicate, so a small blob (fewer pieces than the peers could
//! pipeline) is not fetched twice from the start.
//!
//! # Misbehaviour
//! - A chunk the caller found bad bans the peer **for this blob**: its
//!   requests are canceled and their chunks return to "needed", an
//!   [`Event::Banned`] tells the caller to send `BadChunk` and log the key.
//! - Data that breaks the protocol (a request never sent to this peer, a
//!   chunk out of order or outside its run) bans it too ([`DataOutcome::Violation`]).
//! - A peer with outstanding requests and no progress (no chunk, no reject)
//!   for `peer_stall_timeout` is dropped ([`Event::PeerDropped`]); its work
//!   is reissued. It may join again later.
//! - `Reject { BUSY }` backs the peer off for `peer_busy_backoff`;
//!   `NOT_HELD` removes the rejected run from its have-map; `UNAVAILABLE`
//!   its whole map.
//!
//! # Rate limits
//! Optional token buckets (see `rate`) for the whole fetch and per peer,
//! charged with a run's bytes when it is requested. The upload side's
//! limits live in `serve::Uploader`.
//!
//! # Memory
//! Per chunk 12 bytes (length, state, availability) plus one bit per peer:
//! ~6.2 MiB for a 4 GiB blob of 8 KiB chunks (the engine's default average)
//! with 3 peers. Requests in flight are bounded by the per-peer caps, peers
//! by `peers_max`.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::{Bound, Range};
use std::time::Duration;

use engine::chunker::ChunkerParams;
use engine::hash::BlobId;

use crate::rate::TokenBucket;
use crate::rng::SplitMix64;
use crate::time::Timestamp;
use crate::wire::{HaveMap, Hello, RejectCode, Request, RequestId};

/// A peer as the caller numbers it (one per authenticated host key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

/// Scheduler policy and bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Bytes a request aims for (pieces are cut to about this size).
    /// Default 4 MiB: per-request overhead (a 60-byte frame, a round trip,
    /// one store write batch) becomes negligible, while a blob still has
    /// many pieces to spread over peers.
    pub run_bytes_target: u64,
    /// Most chunks in one request; at most the wire's
    /// `Limits::request_chunks_max`. Default 1024.
    pub request_chunks_max: u32,
    /// Most requests outstanding to one peer. Default 8 (pipelining: the
    /// next runs are queued at the peer while one is being sent).
    pub peer_requests_in_flight_max: u32,
    /// Most bytes requested from one peer and not yet received. Default
    /// 32 MiB: 8 runs; ~27 ms at 1.2 GB/s. A round trip here is not the
    /// network's but the whole pipeline's: a run completes when its last
    /// chunk is verified and written, behind a few MiB of intake batches.
    /// Measured (4 GiB, one source, 16-core machine): 16 MiB 6.85-7.22 s,
    /// 32 MiB 6.10-6.56 s. Within the default serving credit (32 MiB), and
    /// held by the sender and the sockets, not by the receiver's memory.
    /// At least the largest chunk (4 MiB), so every chunk can be asked for.
    pub peer_bytes_in_flight_max: u64,
    /// A peer with requests outstanding and no progress for this long is
    /// dropped. Default 10 s.
    pub peer_stall_timeout: Duration,
    /// How long a peer that answered `BUSY` gets no requests. Default 500 ms.
    pub peer_busy_backoff: Duration,
    /// Most peers asked for the same chunk at once in endgame. Default 2.
    pub endgame_copies_max: u16,
    /// Most peers taking part in this fetch. Default 64.
    pub peers_max: u32,
    /// Download limit for the whole fetch, bytes per second. Default none.
    pub download_bytes_per_s: Option<u64>,
    /// Download limit per peer, bytes per second. Default none.
    pub peer_download_bytes_per_s: Option<u64>,
    /// Burst of every download bucket, in bytes. Default 4 MiB.
    pub rate_burst_bytes: u64,
    /// Seed of the tie-breaking order among equally rare pieces.
    pub seed: u64,
    /// Break ties among equally rare pieces by blob order instead of the
    /// seeded random order (a receiver streaming the blob out as it
    /// arrives). Default false: receivers spread over different pieces.
    pub in_order: bool,
    /// Request ids are `request_id_base + n`: give schedulers sharing a
    /// connection disjoint ranges (e.g. `blob_sequence << 40`).
    pub request_id_base: u64,
}

impl SchedConfig {
    pub const DEFAULT: SchedConfig = SchedConfig {
        run_bytes_target: 4 << 20,
        request_chunks_max: 1024,
        peer_requests_in_flight_max: 8,
        peer_bytes_in_flight_max: 32 << 20,
        peer_stall_timeout: Duration::from_secs(10),
        peer_busy_backoff: Duration::from_millis(500),
        endgame_copies_max: 2,
        peers_max: 64,
        download_bytes_per_s: None,
        peer_download_bytes_per_s: None,
        rate_burst_bytes: 4 << 20,
        seed: 0,
        in_order: false,
        request_id_base: 0,
    };

    pub fn validate(&self) -> Result<(), &'static str> {
        if self.run_bytes_target == 0 {
            return Err("run_bytes_target must be positive");
        }
        if self.request_chunks_max == 0
            || self.request_chunks_max > crate::wire::Limits::DEFAULT.request_chunks_max
        {
            return Err("request_chunks_max must be in 1..=the wire's request_chunks_max");
        }
        if self.peer_requests_in_flight_max == 0 {
            return Err("peer_requests_in_flight_max must be positive");
        }
        if self.peer_bytes_in_flight_max < u64::from(ChunkerParams::MAX_CHUNK_BYTES_MAX) {
            return Err("peer_bytes_in_flight_max must hold the largest chunk (4 MiB)");
        }
        if self.endgame_copies_max == 0 {
            return Err("endgame_copies_max must be at least 1");
        }
        if self.peers_max == 0 {
            return Err("peers_max must be positive");
        }
        if self.download_bytes_per_s == Some(0) || self.peer_download_bytes_per_s == Some(0) {
            return Err("a download limit of 0 bytes/s would never finish; use None for no limit");
        }
        if self.rate_burst_bytes == 0 {
            return Err("rate_burst_bytes must be positive");
        }
        Ok(())
    }
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig::DEFAULT
    }
}

/// What a peer said it will serve us (its `Hello`), on top of our own caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredit {
    pub bytes: u64,
    pub requests: u32,
}

impl PeerCredit {
    pub const UNLIMITED: PeerCredit = PeerCredit {
        bytes: u64::MAX,
        requests: u32::MAX,
    };

    /// The credit a peer announced. If one connection carries several
    /// fetches, split it among them.
    pub fn from_hello(hello: &Hello) -> Self {
        PeerCredit {
            bytes: hello.credit_bytes,
            requests: hello.requests_in_flight_max,
        }
    }
}

/// The caller's verdict on a chunk's bytes (length and BLAKE3 against the
/// manifest entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Bad,
}

/// What the caller should do with a chunk it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// Newly done: the caller keeps (writes) it.
    Accepted,
    /// Already done (an endgame duplicate): drop it.
    Duplicate,
    /// For a peer or request no longer tracked (dropped, banned, from an
    /// earlier session of this peer): drop it, no penalty.
    Stale,
    /// The chunk was bad: the peer is now banned for this blob
    /// (an [`Event::Banned`] follows).
    Banned,
    /// The peer broke the protocol and is banned; close its connection.
    Violation(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanReason {
    BadChunk { chunk_index: u64 },
    Protocol(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Requests outstanding, no progress for `peer_stall_timeout`.
    Stalled,
}

/// Something the caller must act on or report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Banned for this blob: send `BadChunk` (for a bad chunk), log its key.
    Banned { peer: PeerId, reason: BanReason },
    /// Dropped from this fetch; its work was reissued.
    PeerDropped { peer: PeerId, reason: DropReason },
    /// Nothing is in flight and no known peer holds any missing chunk: find
    /// more peers (reported once per stall).
    Stalled { chunks_unavailable: u64 },
    /// Every chunk is done: seal the blob.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("invalid scheduler configuration: {0}")]
    Config(&'static str),
    #[error("missing chunk {index} is beyond the blob's {chunk_count} chunks")]
    MissingOutOfRange { index: u64, chunk_count: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("peer is banned for this blob")]
    Banned,
    #[error("peer has already joined")]
    AlreadyJoined,
    #[error("this fetch already has peers_max ({0}) peers")]
    TooManyPeers(u32),
    #[error(transparent)]
    Have(#[from] HaveError),
}

/// A have-map the scheduler cannot apply (peer input: log and ignore, or
/// close the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaveError {
    #[error("have-map is for another blob")]
    WrongBlob,
    #[error("have-map window {start}..{end} extends beyond the blob's {chunk_count} chunks")]
    BeyondBlob {
        start: u64,
        end: u64,
        chunk_count: u64,
    },
    #[error("peer is unknown or banned")]
    UnknownPeer,
}

/// Counters for progress reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Chunk bytes reported through `handle_data`, duplicates and bad ones
    /// included.
    pub bytes_received: u64,
    /// Bytes of chunks that were already done when they arrived.
    pub bytes_duplicate: u64,
    pub requests_issued: u64,
    pub cancels_issued: u64,
    pub peers: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Needed,
    /// Requested from this many peers (at least 1).
    InFlight(u16),
    Done,
}

#[derive(Clone, Debug)]
struct Piece {
    first: u64,
    end: u64,
    tiebreak: u64,
    /// The rarity it is filed under in `rarity`, if any chunk is requestable.
    key: Option<u32>,
}

/// Most consecutive pieces drawn as one (see "Rarest first"): 16 × 4 MiB
/// spans two or three manifest pages at the default chunk size.
pub const LOCALITY_PIECES_MAX: usize = 16;
/// Fewest groups a blob's pieces are drawn in, so that receivers of a small
/// blob still spread over it.
pub const LOCALITY_GROUPS_MIN: usize = 64;

#[derive(Clone, Debug)]
struct Peer {
    have: Vec<u64>,
    have_count: u64,
    credit: PeerCredit,
    requests: Vec<RequestId>,
    bytes_in_flight: u64,
    last_progress: Timestamp,
    busy_until: Option<Timestamp>,
    bucket: Option<TokenBucket>,
    /// `needed_gen` at which this peer had nothing to offer.
    exhausted_at: Option<u64>,
    /// Requests with smaller ids were sent before this peer (re)joined.
    first_request: RequestId,
}

impl Peer {
    fn has(&self, c: u64) -> bool {
        self.have[(c / 64) as usize] >> (c % 64) & 1 == 1
    }
}

#[derive(Clone, Debug)]
struct Outstanding {
    peer: PeerId,
    next: u64,
    end: u64,
    bytes_left: u64,
    canceled: bool,
}

enum Pick {
    Run { first: u64, count: u32, bytes: u64 },
    NoRoom,
    NoWork,
}

/// Fetches one blob from many peers; see the module docs.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedConfig,
    blob: BlobId,
    lens: Vec<u32>,
    state: Vec<ChunkState>,
    avail: Vec<u32>,
    pieces: Vec<Piece>,
    /// Rarity index: (rarity, tie-break, piece) for pieces with a needed,
    /// available chunk.
    rarity: BTreeSet<(u32, u64, usize)>,
    peers: BTreeMap<PeerId, Peer>,
    banned: BTreeSet<PeerId>,
    requests: BTreeMap<RequestId, Outstanding>,
    requests_sent: u64,
    chunks_in_flight: u64,
    /// Bumped whenever a chunk becomes needed again, so peers that had
    /// nothing to offer are asked again.
    needed_gen: u64,
    cursor: Option<PeerId>,
    download: Option<TokenBucket>,
    cancels: VecDeque<(PeerId, RequestId)>,
    events: VecDeque<Event>,
    complete: bool,
    stalled_reported: bool,
    stats: SchedStats,
}

impl Scheduler {
    /// A fetch of `blob` whose chunks have lengths `chunk_lens` (from the
    /// verified manifest) and of which the chunks in `missing` are still
    /// needed (`Store::missing_chunks`: resume and delta); all others are
    /// already held.
    pub fn new(
        now: Timestamp,
        config: SchedConfig,
        blob: BlobId,
        chunk_lens: Vec<u32>,
        missing: impl IntoIterator<Item = u64>,
    ) -> Result<Scheduler, SchedError> {
        config.validate().map_err(SchedError::Config)?;
        let n = chunk_lens.len() as u64;
        let mut state = vec![ChunkState::Done; chunk_lens.len()];
        for index in missing {
            let slot = state.get_mut(index as usize).filter(|_| index < n).ok_or(
                SchedError::MissingOutOfRange {
                    index,
                    chunk_count: n,
                },
            )?;
            *slot = ChunkState::Needed;
        }
        let mut rng = SplitMix64::new(config.seed);
        let mut pieces = Vec::new();
        let mut first = 0u64;
        while first < n {
            let mut end = first;
            let mut bytes = 0u64;
            while end < n {
                let len = u64::from(chunk_lens[end as usize]);
                let full = bytes + len > config.run_bytes_target
                    || end - first >= u64::from(config.request_chunks_max);
                if end > first && full {
                    break;
                }
                bytes += len;
                end += 1;
            }
            pieces.push(Piece {
                first,
                end,
                tiebreak: pieces.len() as u64,
                key: None,
            });
            first = end;
        }
        if !config.in_order {
            // One draw per group of consecutive pieces: within a group, index
            // order (the tie-break is equal, the index decides).
            let group = (pieces.len() / LOCALITY_GROUPS_MIN).clamp(1, LOCALITY_PIECES_MAX);
            let mut draw = 0;
            for (i, piece) in pieces.iter_mut().enumerate() {
                if i % group == 0 {
                    draw = rng.next_u64();
                }
                piece.tiebreak = draw;
            }
        }
        let bytes_total = chunk_lens.iter().map(|&l| u64::from(l)).sum();
        let mut stats = SchedStats {
            chunks_total: n,
            bytes_total,
            ..SchedStats::default()
        };
        for (c, s) in state.iter().enumerate() {
            if *s == ChunkState::Done {
                stats.chunks_done += 1;
                stats.bytes_done += u64::from(chunk_lens[c]);
            }
        }
        let download = config
            .download_bytes_per_s
            .map(|rate| TokenBucket::new(now, rate, config.rate_burst_bytes));
        let mut s = Scheduler {
            blob,
            avail: vec![0; chunk_lens.len()],
            lens: chunk_lens,
            state,
            pieces,
            rarity: BTreeSet::new(),
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            requests: BTreeMap::new(),
            requests_sent: 0,
            chunks_in_flight: 0,
            needed_gen: 0,
            cursor: None,
            download,
            cancels: VecDeque::new(),
            events: VecDeque::new(),
            complete: false,
            stalled_reported: false,
            stats,
            config,
        };
        s.check_complete();
        Ok(s)
    }

    pub fn blob(&self) -> BlobId {
        self.blob
    }

    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    pub fn stats(&self) -> SchedStats {
        SchedStats {
            peers: self.peers.len() as u32,
            ..self.stats
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The length of chunk `index`, as given to [`Scheduler::new`].
    pub fn chunk_len(&self, index: u64) -> Option<u32> {
        self.lens.get(usize::try_from(index).ok()?).copied()
    }

    /// Whether chunk `index` is done (a caller may skip writing a duplicate).
    pub fn is_done(&self, index: u64) -> bool {
        self.state.get(index as usize) == Some(&ChunkState::Done)
    }

    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// Requests and bytes outstanding to `peer`, if it takes part.
    pub fn peer_in_flight(&self, peer: PeerId) -> Option<(u32, u64)> {
        self.peers
            .get(&peer)
            .map(|p| (p.requests.len() as u32, p.bytes_in_flight))
    }

    // ---- inputs ------------------------------------------------------------

    /// A peer joins with its credit and the first window of its have-map
    /// (more windows through [`Scheduler::handle_have_update`]).
    pub fn handle_peer_joined(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        credit: PeerCredit,
        have: &HaveMap<'_>,
    ) -> Result<(), JoinError> {
        if self.banned.contains(&peer) {
            return Err(JoinError::Banned);
        }
        if self.peers.contains_key(&peer) {
            return Err(JoinError::AlreadyJoined);
        }
        if self.peers.len() as u64 >= u64::from(self.config.peers_max) {
            return Err(JoinError::TooManyPeers(self.config.peers_max));
        }
        self.check_have(have)?;
        let bucket = self
            .config
            .peer_download_bytes_per_s
            .map(|rate| TokenBucket::new(now, rate, self.config.rate_burst_bytes));
        self.peers.insert(
            peer,
            Peer {
                have: vec![0; self.lens.len().div_ceil(64)],
                have_count: 0,
                credit,
                requests: Vec::new(),
                bytes_in_flight: 0,
                last_progress: now,
                busy_until: None,
                bucket,
                exhausted_at: None,
                first_request: self.next_request_id(),
            },
        );
        self.apply_have(peer, have);
        self.check_stalled();
        Ok(())
    }

    /// Replaces what `peer` holds within the map's window.
    pub fn handle_have_update(
        &mut self,
        _now: Timestamp,
        peer: PeerId,
        have: &HaveMap<'_>,
    ) -> Result<(), HaveError> {
        if !self.peers.contains_key(&peer) {
            return Err(HaveError::UnknownPeer);
        }
        self.check_have(have)?;
        self.apply_have(peer, have);
        self.check_stalled();
        Ok(())
    }

    /// The peer's connection is gone: its requests are reissued elsewhere.
    pub fn handle_peer_lost(&mut self, _now: Timestamp, peer: PeerId) {
        self.remove_peer(peer, false);
        self.check_stalled();
    }

    /// A chunk of request `request` arrived from `peer` and the caller
    /// checked it against the manifest.
    pub fn handle_data(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        request: RequestId,
        chunk_index: u64,
        verdict: Verdict,
    ) -> DataOutcome {
        let Some(p) = self.peers.get(&peer) else {
            return DataOutcome::Stale;
        };
        let first_request = p.first_request;
        let Some(out) = self.requests.get_mut(&request) else {
            // Requests sent before this peer (re)joined were released when it
            // was dropped; their chunks may still be on the way.
            if self.sent_before(request, first_request) {
                return DataOutcome::Stale;
            }
            return self.violation(peer, "data for a request not outstanding to this peer");
        };
        if out.peer != peer {
            return self.violation(peer, "data for another peer's request");
        }
        if chunk_index != out.next {
            return self.violation(peer, "chunk out of order or outside its run");
        }
        let c = chunk_index as usize;
        let len = u64::from(self.lens[c]);
        out.next += 1;
        out.bytes_left -= len;
        let finished = out.next == out.end;
        let p = self.peers.get_mut(&peer).expect("checked above");
        p.bytes_in_flight -= len;
        p.last_progress = now;
        self.stats.bytes_received += len;
        if finished {
            self.requests.remove(&request);
            p.requests.retain(|&r| r != request);
        }
        let copies = match self.state[c] {
            ChunkState::InFlight(k) => k,
            _ => 0,
        };
        match verdict {
            Verdict::Bad => {
                if copies > 0 {
                    self.drop_copy(chunk_index);
                }
                self.ban(peer, BanReason::BadChunk { chunk_index });
                DataOutcome::Banned
            }
            Verdict::Ok if self.state[c] == ChunkState::Done => {
                self.stats.bytes_duplicate += len;
                DataOutcome::Duplicate
            }
            Verdict::Ok => {
                self.state[c] = ChunkState::Done;
                self.chunks_in_flight -= 1;
                self.stats.chunks_done += 1;
                self.stats.bytes_done += len;
                if copies > 1 {
                    self.cancel_redundant(chunk_index);
                }
                self.check_complete();
                if finished {
                    self.check_stalled();
                }
                DataOutcome::Accepted
            }
        }
    }

    /// The peer ended `request` early with `code`.
    pub fn handle_reject(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        request: RequestId,
        code: RejectCode,
    ) {
        match self.requests.get(&request) {
            Some(out) if out.peer == peer => {}
            // Benign: a late answer to something already settled.
            _ => return,
        }
        let out = self.release(request);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.last_progress = now;
        match code {
            RejectCode::BUSY => {
                p.busy_until = Some(now + self.config.peer_busy_backoff);
            }
            RejectCode::NOT_HELD if !out.canceled => {
                self.clear_have(peer, out.next..out.end);
            }
            RejectCode::UNAVAILABLE => {
                self.clear_have(peer, 0..self.lens.len() as u64);
            }
            _ => {}
        }
        self.check_stalled();
    }

    /// Time has passed: drops stalled peers, refills buckets, ends back-offs.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if let Some(b) = &mut self.download {
            b.refill(now);
        }
        let mut stalled = Vec::new();
        for (&id, p) in &mut self.peers {
            if let Some(b) = &mut p.bucket {
                b.refill(now);
            }
            if p.busy_until.is_some_and(|t| t <= now) {
                p.busy_until = None;
                p.exhausted_at = None;
            }
            if !p.requests.is_empty() && now >= p.last_progress + self.config.peer_stall_timeout {
                stalled.push(id);
            }
        }
        for id in stalled {
            self.remove_peer(id, true);
            self.events.push_back(Event::PeerDropped {
                peer: id,
                reason: DropReason::Stalled,
            });
        }
        self.check_stalled();
    }

    // ---- outputs -----------------------------------------------------------

    /// The next request to send, if any peer has room and work.
    pub fn poll_request(&mut self, now: Timestamp) -> Option<(PeerId, Request)> {
        if self.complete || self.peers.is_empty() {
            return None;
        }
        if let Some(b) = &mut self.download
            && !b.is_ready(now)
        {
            return None;
        }
        let endgame = self.rarity.is_empty();
        if endgame && self.chunks_in_flight == 0 {
            return None;
        }
        let start = self.cursor;
        let mut at = start;
        for _ in 0..self.peers.len() {
            let next = match at {
                Some(c) => self
                    .peers
                    .range((Bound::Excluded(c), Bound::Unbounded))
                    .next()
                    .or_else(|| self.peers.iter().next()),
                None => self.peers.iter().next(),
            };
            let (&id, _) = next?;
            at = Some(id);
            if let Some(r) = self.try_peer(now, id, endgame) {
                self.cursor = Some(id);
                return Some((id, r));
            }
        }
        None
    }

    /// A request to cancel (send `Cancel` to the peer).
    pub fn poll_cancel(&mut self) -> Option<(PeerId, RequestId)> {
        self.cancels.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Scheduler::handle_timeout`] should next be called.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        if self.complete {
            return None;
        }
        let mut next: Option<Timestamp> = self.download.as_ref().and_then(|b| b.ready_at());
        let mut consider = |t: Timestamp| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            if !p.requests.is_empty() {
                consider(p.last_progress + self.config.peer_stall_timeout);
            }
            if let Some(t) = p.busy_until {
                consider(t);
            }
            if let Some(t) = p.bucket.as_ref().and_then(|b| b.ready_at()) {
                consider(t);
            }
        }
        next
    }

    // ---- internals ---------------------------------------------------------

    fn next_request_id(&self) -> RequestId {
        RequestId(self.config.request_id_base.wrapping_add(self.requests_sent))
    }

    /// Whether `id` was sent by this scheduler before `mark` was the next id.
    fn sent_before(&self, id: RequestId, mark: RequestId) -> bool {
        let base = self.config.request_id_base;
        id.0.wrapping_sub(base) < mark.0.wrapping_sub(base)
    }

    fn violation(&mut self, peer: PeerId, what: &'static str) -> DataOutcome {
        self.ban(peer, BanReason::Protocol(what));
        DataOutcome::Violation(what)
    }

    fn piece_of(&self, c: u64) -> usize {
        self.pieces.partition_point(|p| p.first <= c) - 1
    }

    fn check_have(&self, have: &HaveMap<'_>) -> Result<(), HaveError> {
        if have.blob != self.blob {
            return Err(HaveError::WrongBlob);
        }
        let w = have.window();
        let n = self.lens.len() as u64;
        if w.end > n || have.first_chunk.checked_add(have.span_chunks).is_none() {
            return Err(HaveError::BeyondBlob {
                start: w.start,
                end: w.end,
                chunk_count: n,
            });
        }
        Ok(())
    }

    fn apply_have(&mut self, peer: PeerId, have: &HaveMap<'_>) {
        let window = have.window();
        let mut dirty = Vec::new();
        let mut at = window.start;
        for run in have.held_runs() {
            self.set_have(peer, at..run.start, false, &mut dirty);
            self.set_have(peer, run.clone(), true, &mut dirty);
            at = run.end;
        }
        self.set_have(peer, at..window.end, false, &mut dirty);
        self.recompute(dirty);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.exhausted_at = None;
        }
    }

    fn clear_have(&mut self, peer: PeerId, range: Range<u64>) {
        let mut dirty = Vec::new();
        self.set_have(peer, range, false, &mut dirty);
        self.recompute(dirty);
    }

    fn set_have(&mut self, peer: PeerId, range: Range<u64>, value: bool, dirty: &mut Vec<usize>) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        for c in range {
            if p.has(c) == value {
                continue;
            }
            p.have[(c / 64) as usize] ^= 1 << (c % 64);
            let a = &mut self.avail[c as usize];
            if value {
                *a += 1;
                p.have_count += 1;
            } else {
                *a -= 1;
                p.have_count -= 1;
            }
            if self.state[c as usize] == ChunkState::Needed {
                let piece = self.pieces.partition_point(|pc| pc.first <= c) - 1;
                if dirty.last() != Some(&piece) {
                    dirty.push(piece);
                }
            }
        }
    }

    /// Refiles pieces whose chunks changed state or availability.
    fn recompute(&mut self, mut dirty: Vec<usize>) {
        dirty.sort_unstable();
        dirty.dedup();
        for pi in dirty {
            let piece = &self.pieces[pi];
            let mut key: Option<u32> = None;
            for c in piece.first..piece.end {
                let a = self.avail[c as usize];
                if self.state[c as usize] == ChunkState::Needed && a > 0 {
                    key = Some(key.map_or(a, |k| k.min(a)));
                }
            }
            if key != piece.key {
                if let Some(old) = piece.key {
                    self.rarity.remove(&(old, piece.tiebreak, pi));
                }
                if let Some(new) = key {
                    self.rarity.insert((new, piece.tiebreak, pi));
                }
                self.pieces[pi].key = key;
            }
        }
    }

    fn caps(&self, p: &Peer) -> (u32, u64) {
        (
            self.config
                .peer_requests_in_flight_max
                .min(p.credit.requests),
            self.config.peer_bytes_in_flight_max.min(p.credit.bytes),
        )
    }

    fn try_peer(&mut self, now: Timestamp, id: PeerId, endgame: bool) -> Option<Request> {
        let gen_now = self.needed_gen;
        let p = self.peers.get_mut(&id)?;
        if p.busy_until.is_some_and(|t| t > now) || p.have_count == 0 {
            return None;
        }
        if !endgame && p.exhausted_at == Some(gen_now) {
            return None;
        }
        if let Some(b) = &mut p.bucket
            && !b.is_ready(now)
        {
            return None;
        }
        let p = &self.peers[&id];
        let (requests_cap, bytes_cap) = self.caps(p);
        if p.requests.len() as u64 >= u64::from(requests_cap) {
            return None;
        }
        let room = bytes_cap.saturating_sub(p.bytes_in_flight);
        let pick = if endgame {
            self.pick_endgame(id, room)
        } else {
            self.pick_rarest(id, room)
        };
        match pick {
            Pick::Run {
                first,
                count,
                bytes,
            } => Some(self.issue(now, id, first, count, bytes)),
            Pick::NoWork => {
                if !endgame && let Some(p) = self.peers.get_mut(&id) {
                    p.exhausted_at = Some(gen_now);
                }
                None
            }
            Pick::NoRoom => None,
        }
    }

    /// The first run of needed chunks `peer` holds in the rarest piece it
    /// can serve.
    fn pick_rarest(&self, peer: PeerId, room: u64) -> Pick {
        let p = &self.peers[&peer];
        let limit = room.min(self.config.run_bytes_target);
        for &(_, _, pi) in &self.rarity {
            let piece = &self.pieces[pi];
            let eligible = |c: u64| self.state[c as usize] == ChunkState::Needed && p.has(c);
            let Some(first) = (piece.first..piece.end).find(|&c| eligible(c)) else {
                continue;
            };
            return self.extend_run(first, piece.end, limit, room, eligible);
        }
        Pick::NoWork
    }

    /// Endgame, for a peer with nothing of its own outstanding: duplicate
    /// the back half of the last stretch of another peer's run (oldest
    /// request first) that still lacks a copy. The original is served front
    /// to back, so the two meet in the middle and the tail is split instead
    /// of raced; a second idle peer splits what is left the same way.
    fn pick_endgame(&self, peer: PeerId, room: u64) -> Pick {
        let p = &self.peers[&peer];
        if !p.requests.is_empty() {
            return Pick::NoWork;
        }
        let limit = room.min(self.config.run_bytes_target);
        let eligible = |c: u64| {
            matches!(self.state[c as usize], ChunkState::InFlight(k) if k < self.config.endgame_copies_max)
                && p.has(c)
        };
        for out in self.requests.values() {
            if out.peer == peer || out.canceled {
                continue;
            }
            let Some(last) = (out.next..out.end).rev().find(|&c| eligible(c)) else {
                continue;
            };
            let mut start = last;
            while start > out.next && eligible(start - 1) {
                start -= 1;
            }
            let first = start + (last + 1 - start) / 2;
            return self.extend_run(first, last + 1, limit, room, eligible);
        }
        Pick::NoWork
    }

    fn extend_run(
        &self,
        first: u64,
        end: u64,
        limit: u64,
        room: u64,
        eligible: impl Fn(u64) -> bool,
    ) -> Pick {
        let first_len = u64::from(self.lens[first as usize]);
        if first_len > room {
            return Pick::NoRoom;
        }
        let mut bytes = first_len;
        let mut c = first + 1;
        while c < end
            && c - first < u64::from(self.config.request_chunks_max)
            && eligible(c)
            && bytes + u64::from(self.lens[c as usize]) <= limit
        {
            bytes += u64::from(self.lens[c as usize]);
            c += 1;
        }
        Pick::Run {
            first,
            count: (c - first) as u32,
            bytes,
        }
    }

    fn issue(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        first: u64,
        count: u32,
        bytes: u64,
    ) -> Request {
        let id = self.next_request_id();
        self.requests_sent += 1;
        let end = first + u64::from(count);
        let mut dirty = Vec::new();
        for c in first..end {
            let s = &mut self.state[c as usize];
            *s = match *s {
                ChunkState::Needed => {
                    self.chunks_in_flight += 1;
                    if dirty.is_empty() {
                        dirty.push(self.pieces.partition_point(|pc| pc.first <= c) - 1);
                    }
                    ChunkState::InFlight(1)
                }
                ChunkState::InFlight(k) => ChunkState::InFlight(k + 1),
                ChunkState::Done => unreachable!("done chunks are never requested"),
            };
        }
        self.recompute(dirty);
        let p = self
            .peers
            .get_mut(&peer)
            .expect("caller picked a live peer");
        if p.requests.is_empty() {
            // The stall clock starts when a peer gets work, not when it joined.
            p.last_progress = now;
        }
        p.requests.push(id);
        p.bytes_in_flight += bytes;
        if let Some(b) = &mut p.bucket {
            b.charge(now, bytes);
        }
        if let Some(b) = &mut self.download {
            b.charge(now, bytes);
        }
        self.requests.insert(
            id,
            Outstanding {
                peer,
                next: first,
                end,
                bytes_left: bytes,
                canceled: false,
            },
        );
        self.stats.requests_issued += 1;
        self.stalled_reported = false;
        Request {
            id,
            blob: self.blob,
            first_chunk: first,
            chunk_count: count,
        }
    }

    /// One fewer request covers chunk `c`; it is needed again at zero.
    fn drop_copy(&mut self, c: u64) {
        let s = &mut self.state[c as usize];
        match *s {
            ChunkState::InFlight(1) => {
                *s = ChunkState::Needed;
                self.chunks_in_flight -= 1;
                self.needed_gen += 1;
                let pi = self.piece_of(c);
                self.recompute(vec![pi]);
            }
            ChunkState::InFlight(k) => *s = ChunkState::InFlight(k - 1),
            ChunkState::Needed | ChunkState::Done => {}
        }
    }

    /// Forgets a request; its unreceived chunks lose a copy.
    fn release(&mut self, id: RequestId) -> Outstanding {
        let out = self
            .requests
            .remove(&id)
            .expect("caller checked the request");
        if let Some(p) = self.peers.get_mut(&out.peer) {
            p.requests.retain(|&r| r != id);
            p.bytes_in_flight -= out.bytes_left;
        }
        for c in out.next..out.end {
            self.drop_copy(c);
        }
        out
    }

    /// Cancels other requests made redundant by chunk `c` arriving.
    fn cancel_redundant(&mut self, c: u64) {
        let mut redundant = Vec::new();
        for (&id, out) in &self.requests {
            if !out.canceled
                && out.next <= c
                && c < out.end
                && (out.next..out.end).all(|i| self.state[i as usize] == ChunkState::Done)
            {
                redundant.push((out.peer, id));
            }
        }
        for (peer, id) in redundant {
            self.cancel(peer, id);
        }
    }

    fn cancel(&mut self, peer: PeerId, id: RequestId) {
        if let Some(out) = self.requests.get_mut(&id) {
            out.canceled = true;
        }
        self.cancels.push_back((peer, id));
        self.stats.cancels_issued += 1;
    }

    fn ban(&mut self, peer: PeerId, reason: BanReason) {
        self.remove_peer(peer, true);
        self.banned.insert(peer);
        self.events.push_back(Event::Banned { peer, reason });
        self.check_stalled();
    }

    /// Removes a peer: its requests are released (and, if it is still
    /// connected, canceled) and its have-map no longer counts.
    fn remove_peer(&mut self, peer: PeerId, send_cancels: bool) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        for id in p.requests.clone() {
            if send_cancels && !self.requests[&id].canceled {
                self.cancel(peer, id);
            }
            self.release(id);
        }
        let n = self.lens.len() as u64;
        self.clear_have(peer, 0..n);
        self.peers.remove(&peer);
        if self.cursor == Some(peer) {
            self.cursor = None;
        }
    }

    fn check_complete(&mut self) {
        if self.complete || self.stats.chunks_done != self.stats.chunks_total {
            return;
        }
        self.complete = true;
        let leftovers: Vec<_> = self
            .requests
            .iter()
            .filter(|(_, o)| !o.canceled)
            .map(|(&id, o)| (o.peer, id))
            .collect();
        for (peer, id) in leftovers {
            self.cancel(peer, id);
        }
        self.events.push_back(Event::Complete);
    }

    /// Reports a stall once, and withdraws a report not yet polled that no
    /// longer holds: a source whose connection closed leaves (a stall, if it
    /// was the only one) and may join again over its other connections
    /// before the caller polls; the stale report then failed the fetch
    /// (seen under load with three connections to one source, one refused).
    fn check_stalled(&mut self) {
        if self.complete {
            return;
        }
        let stalled = self.requests.is_empty() && self.rarity.is_empty();
        if !stalled && self.stalled_reported {
            let queued = self.events.len();
            self.events.retain(|e| !matches!(e, Event::Stalled { .. }));
            if self.events.len() < queued {
                self.stalled_reported = false;
            }
        }
        if self.stalled_reported {
            return;
        }
        if stalled {
            let unavailable =
                self.stats.chunks_total - self.stats.chunks_done - self.chunks_in_flight;
            self.stalled_reported = true;
            self.events.push_back(Event::Stalled {
                chunks_unavailable: unavailable,
            });
        }
    }

    /// Checks every internal invariant (tests, simulations).
    #[cfg(any(test, feature = "sim"))]
    pub fn assert_invariants(&self) {
        let n = self.lens.len();
        let mut copies = vec![0u16; n];
        for (id, out) in &self.requests {
            let p = self.peers.get(&out.peer).expect("request of a live peer");
            assert!(p.requests.contains(id));
            assert!(out.next < out.end);
            let left: u64 = (out.next..out.end)
                .map(|c| u64::from(self.lens[c as usize]))
                .sum();
            assert_eq!(left, out.bytes_left, "{id:?}");
            for c in out.next..out.end {
                copies[c as usize] += 1;
            }
        }
        let mut in_flight = 0;
        let mut done = 0;
        for (c, &copies) in copies.iter().enumerate() {
            match self.state[c] {
                ChunkState::Needed => assert_eq!(copies, 0, "needed chunk {c} in flight"),
                ChunkState::InFlight(k) => {
                    assert_eq!(k, copies, "copies of chunk {c}");
                    assert!(k <= self.config.endgame_copies_max);
                    in_flight += 1;
                }
                ChunkState::Done => done += 1,
            }
            let avail = self.peers.values().filter(|p| p.has(c as u64)).count();
            assert_eq!(self.avail[c] as usize, avail, "availability of chunk {c}");
        }
        assert_eq!(in_flight, self.chunks_in_flight);
        assert_eq!(done, self.stats.chunks_done);
        for (id, p) in &self.peers {
            assert!(!self.banned.contains(id));
            let (requests_cap, bytes_cap) = self.caps(p);
            assert!(
                p.requests.len() as u64 <= u64::from(requests_cap),
                "{id:?} requests"
            );
            assert!(p.bytes_in_flight <= bytes_cap, "{id:?} bytes in flight");
            let bytes: u64 = p.requests.iter().map(|r| self.requests[r].bytes_left).sum();
            assert_eq!(bytes, p.bytes_in_flight);
            let held = (0..n as u64).filter(|&c| p.has(c)).count() as u64;
            assert_eq!(held, p.have_count);
        }
        let mut filed = BTreeSet::new();
        for (pi, piece) in self.pieces.iter().enumerate() {
            let key = (piece.first..piece.end)
                .filter(|&c| {
                    self.state[c as usize] == ChunkState::Needed && self.avail[c as usize] > 0
                })
                .map(|c| self.avail[c as usize])
                .min();
            assert_eq!(key, piece.key, "rarity of piece {pi}");
            if let Some(k) = key {
                filed.insert((k, piece.tiebreak, pi));
            }
        }
        assert_eq!(filed, self.rarity);
    }
}
