//! The upload side of one connection: which chunk to send next, within the
//! limits this envoy set for the peer.
//!
//! The daemon feeds an [`Uploader`] the peer's `Request` and `Cancel`
//! frames and pulls [`Transmit`]s: a chunk to send (the daemon reads it from
//! the sealed file and writes `data_header` + payload), or a `Reject` to
//! send. After writing a chunk it reports the bytes with
//! [`Uploader::handle_sent`] before handling the next input.
//!
//! # Limits ([`ServeLimits`], announced in our `Hello`)
//! - `credit_bytes`: bytes the peer may have requested and not yet received.
//!   A request that would exceed it is a protocol violation (the peer was
//!   told): [`ServeError::OverCredit`], close with `LIMIT`.
//! - `requests_in_flight_max`: requests queued or being served, plus replies
//!   not yet sent. Exceeding it is a violation too.
//! - `requests_per_s` (+ `requests_burst`): admission rate. A request over
//!   the rate is answered `Reject { BUSY }` and still charged, so a flood
//!   keeps itself in debt. Manifest requests are charged to the same rate
//!   and, having no id to refuse, answered late
//!   ([`Uploader::admit_manifest_request`]).
//! - `upload_bytes_per_s` (+ `upload_burst_bytes`): this connection's upload
//!   rate; a daemon-wide limit is one more [`TokenBucket`] the daemon checks
//!   before polling.
//!
//! # Why a cancel/re-request flood costs no more than it asks for
//! Each request costs us one admission (a manifest lookup in `resolve`),
//! bounded by `requests_per_s`; each admitted request reserves its bytes of
//! credit, and chunks are sent only as `upload_bytes_per_s` allows. A
//! `Cancel` releases only the bytes not yet sent, and is answered by one
//! 20-byte `Reject { CANCELED }` only if the request was live (a cancel of
//! an unknown id costs a map lookup and no reply). So per second a peer gets
//! at most `requests_per_s` lookups and acknowledgements (each reply smaller
//! than the 60-byte request that caused it) plus the chunk bytes it asked for
//! within its credit and rate: work it requested, never amplified. Memory is
//! bounded by `requests_in_flight_max` entries.

use std::collections::VecDeque;

use engine::hash::BlobId;

use crate::rate::TokenBucket;
use crate::time::Timestamp;
use crate::wire::{CloseCode, Hello, PROTOCOL_VERSION, RejectCode, Request, RequestId};

/// Limits this envoy applies to one peer's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Bytes a peer may have requested and not yet received. Default 32 MiB:
    /// twice the requester's default 16 MiB in flight, so two fetches can
    /// share a connection at full speed.
    pub credit_bytes: u64,
    /// Requests queued or in service, plus pending replies. Default 16.
    pub requests_in_flight_max: u32,
    /// Sustained request admissions per second. Default 2000 (8 GB/s of
    /// 4 MiB runs: never the bottleneck for a well-behaved peer).
    pub requests_per_s: u64,
    /// Admissions allowed in a burst. Default 64.
    pub requests_burst: u64,
    /// Upload limit for this connection, bytes per second. Default none.
    pub upload_bytes_per_s: Option<u64>,
    /// Burst of the upload bucket, in bytes. Default 4 MiB.
    pub upload_burst_bytes: u64,
}

impl ServeLimits {
    pub const DEFAULT: ServeLimits = ServeLimits {
        credit_bytes: 32 << 20,
        requests_in_flight_max: 16,
        requests_per_s: 2000,
        requests_burst: 64,
        upload_bytes_per_s: None,
        upload_burst_bytes: 4 << 20,
    };

    pub fn validate(&self) -> Result<(), &'static str> {
        if self.credit_bytes < u64::from(engine::chunker::ChunkerParams::MAX_CHUNK_BYTES_MAX) {
            return Err("credit_bytes must cover the largest chunk (4 MiB)");
        }
        if self.requests_in_flight_max == 0 || self.requests_per_s == 0 || self.requests_burst == 0
        {
            return Err("request limits must be positive");
        }
        if self.upload_bytes_per_s == Some(0) || self.upload_burst_bytes == 0 {
            return Err("upload limit and burst must be positive (None for no limit)");
        }
        Ok(())
    }
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits::DEFAULT
    }
}

/// A peer broke the limits it was told: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("request {0:?} reuses the id of an outstanding request")]
    DuplicateRequest(RequestId),
    #[error("more than requests_in_flight_max ({max}) requests outstanding")]
    TooManyRequests { max: u32 },
    #[error("request of {requested} bytes exceeds the remaining credit ({left} of {credit} bytes)")]
    OverCredit {
        requested: u64,
        left: u64,
        credit: u64,
    },
}

impl ServeError {
    pub fn close_code(&self) -> CloseCode {
        match self {
            ServeError::DuplicateRequest(_) => CloseCode::PROTOCOL,
            _ => CloseCode::LIMIT,
        }
    }
}

/// What the daemon should send next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Send chunk `chunk_index` of `blob` as a `Data` frame for `request`,
    /// then call [`Uploader::handle_sent`].
    Chunk {
        request: RequestId,
        blob: BlobId,
        chunk_index: u64,
    },
    /// Send `Reject { request, code }`.
    Reject {
        request: RequestId,
        code: RejectCode,
    },
}

#[derive(Clone, Debug)]
struct Serving {
    id: RequestId,
    blob: BlobId,
    next: u64,
    end: u64,
    bytes_left: u64,
}

/// Counters for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    pub requests_admitted: u64,
    pub requests_busy: u64,
    pub requests_refused: u64,
    pub cancels: u64,
    pub chunks_sent: u64,
    /// Chunk and manifest-reply bytes.
    pub bytes_sent: u64,
}

/// Upload-side state of one connection; see the module docs.
#[derive(Debug)]
pub struct Uploader {
    limits: ServeLimits,
    queue: VecDeque<Serving>,
    replies: VecDeque<(RequestId, RejectCode)>,
    owed_bytes: u64,
    admissions: TokenBucket,
    upload: Option<TokenBucket>,
    stats: ServeStats,
}

impl Uploader {
    /// `limits` must pass [`ServeLimits::validate`].
    pub fn new(now: Timestamp, limits: ServeLimits) -> Self {
        assert_eq!(limits.validate(), Ok(()), "invalid serve limits");
        Uploader {
            admissions: TokenBucket::new(now, limits.requests_per_s, limits.requests_burst),
            upload: limits
                .upload_bytes_per_s
                .map(|rate| TokenBucket::new(now, rate, limits.upload_burst_bytes)),
            limits,
            queue: VecDeque::new(),
            replies: VecDeque::new(),
            owed_bytes: 0,
            stats: ServeStats::default(),
        }
    }

    /// Our `Hello` for this connection: the limits the peer must respect.
    pub fn hello(&self, frame_bytes_max: u32) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            requests_in_flight_max: self.limits.requests_in_flight_max,
            frame_bytes_max,
            credit_bytes: self.limits.credit_bytes,
        }
    }

    pub fn stats(&self) -> ServeStats {
        self.stats
    }

    /// Bytes requested by the peer and not yet sent.
    pub fn owed_bytes(&self) -> u64 {
        self.owed_bytes
    }

    /// Admits a request. `resolve` is the daemon's lookup, called only once
    /// the request is within count and rate limits: the run's length in
    /// bytes, or why it cannot be served (`NOT_HELD`, `UNAVAILABLE`), which
    /// is answered with a `Reject`.
    pub fn handle_request(
        &mut self,
        now: Timestamp,
        request: &Request,
        resolve: impl FnOnce(&Request) -> Result<u64, RejectCode>,
    ) -> Result<(), ServeError> {
        if self.queue.iter().any(|s| s.id == request.id) {
            return Err(ServeError::DuplicateRequest(request.id));
        }
        let max = self.limits.requests_in_flight_max;
        if (self.queue.len() + self.replies.len()) as u64 >= u64::from(max) {
            return Err(ServeError::TooManyRequests { max });
        }
        let admitted = self.admissions.is_ready(now);
        self.admissions.charge(now, 1);
        if !admitted {
            self.stats.requests_busy += 1;
            self.replies.push_back((request.id, RejectCode::BUSY));
            return Ok(());
        }
        let bytes = match resolve(request) {
            Ok(bytes) => bytes,
            Err(code) => {
                self.stats.requests_refused += 1;
                self.replies.push_back((request.id, code));
                return Ok(());
            }
        };
        let left = self.limits.credit_bytes.saturating_sub(self.owed_bytes);
        if bytes > left {
            return Err(ServeError::OverCredit {
                requested: bytes,
                left,
                credit: self.limits.credit_bytes,
            });
        }
        self.owed_bytes += bytes;
        self.stats.requests_admitted += 1;
        self.queue.push_back(Serving {
            id: request.id,
            blob: request.blob,
            next: request.first_chunk,
            end: request.first_chunk + u64::from(request.chunk_count),
            bytes_left: bytes,
        });
        Ok(())
    }

    /// Admits a manifest request (`GetManifest`, `GetManifestPage`), charged
    /// to the same admission rate as chunk requests: each costs an index
    /// read and up to a page of reply. `None`: answer now; `Some(t)`: not
    /// before `t` (also while the upload rate is in debt: the reply is
    /// upload too, [`Uploader::handle_manifest_sent`]). Late answers pace a
    /// flood without refusing a fetcher that asks for a large blob's pages
    /// all at once.
    pub fn admit_manifest_request(&mut self, now: Timestamp) -> Option<Timestamp> {
        let ready = self.admissions.is_ready(now);
        self.admissions.charge(now, 1);
        let admitted = if ready {
            None
        } else {
            self.admissions.ready_at()
        };
        let uploadable = self.upload.as_mut().and_then(|b| b.ready_at_from(now));
        admitted.max(uploadable)
    }

    /// The daemon wrote a manifest reply of `bytes` bytes: charged to the
    /// upload rate like chunks.
    pub fn handle_manifest_sent(&mut self, now: Timestamp, bytes: u64) {
        if let Some(b) = &mut self.upload {
            b.charge(now, bytes);
        }
        self.stats.bytes_sent += bytes;
    }

    /// Stops serving `request` if it is live and queues the acknowledgement.
    pub fn handle_cancel(&mut self, _now: Timestamp, request: RequestId) {
        let Some(at) = self.queue.iter().position(|s| s.id == request) else {
            return;
        };
        let s = self.queue.remove(at).expect("position is in range");
        self.owed_bytes -= s.bytes_left;
        self.stats.cancels += 1;
        self.replies.push_back((request, RejectCode::CANCELED));
    }

    /// The next thing to send: replies first, then chunks of the oldest
    /// request (FIFO: a requester's runs complete in the order it asked),
    /// while the upload rate allows.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        if let Some((request, code)) = self.replies.pop_front() {
            return Some(Transmit::Reject { request, code });
        }
        let front = self.queue.front_mut()?;
        if let Some(b) = &mut self.upload
            && !b.is_ready(now)
        {
            return None;
        }
        let t = Transmit::Chunk {
            request: front.id,
            blob: front.blob,
            chunk_index: front.next,
        };
        front.next += 1;
        if front.next == front.end {
            self.owed_bytes -= front.bytes_left;
            self.queue.pop_front();
        }
        Some(t)
    }

    /// The daemon wrote a chunk of `bytes` bytes for `request`.
    pub fn handle_sent(&mut self, now: Timestamp, request: RequestId, bytes: u64) {
        if let Some(s) = self.queue.iter_mut().find(|s| s.id == request) {
            let paid = bytes.min(s.bytes_left);
            s.bytes_left -= paid;
            self.owed_bytes -= paid;
        }
        if let Some(b) = &mut self.upload {
            b.charge(now, bytes);
        }
        self.stats.chunks_sent += 1;
        self.stats.bytes_sent += bytes;
    }

    /// Refills the buckets.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.admissions.refill(now);
        if let Some(b) = &mut self.upload {
            b.refill(now);
        }
    }

    /// When sending may resume after an upload-rate pause.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        if self.queue.is_empty() {
            return None;
        }
        self.upload.as_ref().and_then(|b| b.ready_at())
    }

    /// Requests queued or in service.
    pub fn requests_in_flight(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: BlobId = BlobId([3; 32]);

    fn req(id: u64, first: u64, count: u32) -> Request {
        Request {
            id: RequestId(id),
            blob: BLOB,
            first_chunk: first,
            chunk_count: count,
        }
    }

    fn chunks(u: &mut Uploader, now: Timestamp, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while let Some(t) = u.poll_transmit(now) {
            if let Transmit::Chunk {
                request,
                chunk_index,
                ..
            } = t
            {
                u.handle_sent(now, request, len);
                out.push((request.0, chunk_index));
            }
        }
        out
    }

    #[test]
    fn serves_in_order_and_releases_credit() {
        let t = Timestamp::ZERO;
        let mut u = Uploader::new(t, ServeLimits::DEFAULT);
        u.handle_request(t, &req(1, 10, 3), |_| Ok(300)).unwrap();
        u.handle_request(t, &req(2, 0, 2), |_| Ok(200)).unwrap();
        assert_eq!(u.owed_bytes(), 500);
        assert_eq!(
            chunks(&mut u, t, 100),
            vec![(1, 10), (1, 11), (1, 12), (2, 0), (2, 1)]
        );
        assert_eq!(u.owed_bytes(), 0);
        assert_eq!(u.requests_in_flight(), 0);
    }

    #[test]
    fn cancel_releases_only_unsent_bytes_and_is_acknowledged_once() {
        let t = Timestamp::ZERO;
        let mut u = Uploader::new(t, ServeLimits::DEFAULT);
        u.handle_request(t, &req(1, 0, 4), |_| Ok(400)).unwrap();
        let Some(Transmit::Chunk { request, .. }) = u.poll_transmit(t) else {
            panic!("a chunk first");
        };
        u.handle_sent(t, request, 100);
        u.handle_cancel(t, RequestId(1));
        u.handle_cancel(t, RequestId(1));
        u.handle_cancel(t, RequestId(99));
        assert_eq!(u.owed_bytes(), 0);
        assert_eq!(
            u.poll_transmit(t),
            Some(Transmit::Reject {
                request: RequestId(1),
                code: RejectCode::CANCELED
            })
        );
        assert_eq!(u.poll_transmit(t), None, "one ack, nothing for unknown ids");
    }

    #[test]
    fn limits_the_peer_was_told_are_enforced() {
        let t = Timestamp::ZERO;
        let limits = ServeLimits {
            credit_bytes: 8 << 20,
            requests_in_flight_max: 2,
            ..ServeLimits::DEFAULT
        };
        let mut u = Uploader::new(t, limits);
        u.handle_request(t, &req(1, 0, 1), |_| Ok(6 << 20)).unwrap();
        assert_eq!(
            u.handle_request(t, &req(1, 5, 1), |_| Ok(1)),
            Err(ServeError::DuplicateRequest(RequestId(1)))
        );
        let e = u
            .handle_request(t, &req(2, 1, 1), |_| Ok(3 << 20))
            .unwrap_err();
        assert!(matches!(e, ServeError::OverCredit { .. }));
        assert_eq!(e.close_code(), CloseCode::LIMIT);
        u.handle_request(t, &req(3, 1, 1), |_| Err(RejectCode::NOT_HELD))
            .unwrap();
        assert_eq!(
            u.handle_request(t, &req(4, 1, 1), |_| Ok(1)),
            Err(ServeError::TooManyRequests { max: 2 })
        );
    }

    /// An uploader admitting 10 requests a second, 2 in a burst.
    fn slow_admissions(t: Timestamp) -> Uploader {
        let limits = ServeLimits {
            requests_per_s: 10,
            requests_burst: 2,
            ..ServeLimits::DEFAULT
        };
        Uploader::new(t, limits)
    }

    /// An uploader sending 1 MiB a second, 64 KiB in a burst.
    fn slow_upload(t: Timestamp) -> Uploader {
        let limits = ServeLimits {
            upload_bytes_per_s: Some(1 << 20),
            upload_burst_bytes: 64 << 10,
            ..ServeLimits::DEFAULT
        };
        Uploader::new(t, limits)
    }

    /// Manifest requests share the admission rate: past the burst each is
    /// answered one token's time after the one before, and they leave the
    /// bucket in debt for chunk requests too.
    #[test]
    fn manifest_requests_past_the_burst_are_paced() {
        let t = Timestamp::ZERO;
        let mut u = slow_admissions(t);
        assert_eq!(u.admit_manifest_request(t), None);
        assert_eq!(u.admit_manifest_request(t), None);
        let mut last = t;
        for _ in 0..5 {
            let at = u.admit_manifest_request(t).expect("past the burst");
            assert!(at > last, "{at:?} after {last:?}");
            last = at;
        }
        // Five tokens owed at 10/s: half a second.
        assert!(last >= Timestamp::from_millis(500), "{last:?}");
        u.handle_request(t, &req(1, 0, 1), |_| Ok(1)).unwrap();
        assert_eq!(
            u.poll_transmit(t),
            Some(Transmit::Reject {
                request: RequestId(1),
                code: RejectCode::BUSY
            })
        );
    }

    /// Manifest replies are upload: they spend the upload bucket (chunks
    /// wait for it), and while it is in debt the next manifest request
    /// waits too, however many admissions are left.
    #[test]
    fn manifest_replies_are_charged_to_the_upload_rate() {
        let t = Timestamp::ZERO;
        let mut u = slow_upload(t);
        assert_eq!(u.admit_manifest_request(t), None);
        // A 1 MiB answer (pages of a large blob): a second of the rate.
        u.handle_manifest_sent(t, 1 << 20);
        assert_eq!(u.stats().bytes_sent, 1 << 20);
        let at = u
            .admit_manifest_request(t)
            .expect("the upload rate is in debt");
        assert!(at >= Timestamp::from_millis(900), "{at:?}");
        u.handle_request(t, &req(1, 0, 1), |_| Ok(1000)).unwrap();
        assert_eq!(u.poll_transmit(t), None, "chunks wait for the debt too");
        assert_eq!(u.next_timeout(), Some(at));
        assert!(u.poll_transmit(at).is_some());
    }

    #[test]
    fn a_request_flood_is_answered_busy_and_costs_no_lookups() {
        let t = Timestamp::ZERO;
        let mut u = slow_admissions(t);
        let mut lookups = 0;
        let mut busy = 0;
        // Request, cancel, request, cancel… 100 times at the same instant.
        for i in 0..100 {
            u.handle_request(t, &req(i, 0, 1), |_| {
                lookups += 1;
                Ok(1000)
            })
            .unwrap();
            u.handle_cancel(t, RequestId(i));
            while let Some(x) = u.poll_transmit(t) {
                if let Transmit::Reject { code, .. } = x {
                    busy += u32::from(code == RejectCode::BUSY);
                }
            }
        }
        assert_eq!(lookups, 2, "only the burst was looked up");
        assert_eq!(busy, 98);
        // The flood left the bucket in debt: a second later, still refused.
        let later = Timestamp::from_millis(1000);
        u.handle_request(later, &req(500, 0, 1), |_| Ok(1)).unwrap();
        assert_eq!(
            u.poll_transmit(later),
            Some(Transmit::Reject {
                request: RequestId(500),
                code: RejectCode::BUSY
            })
        );
    }

    #[test]
    fn upload_rate_paces_chunks() {
        let t0 = Timestamp::ZERO;
        let mut u = slow_upload(t0);
        u.handle_request(t0, &req(1, 0, 64), |_| Ok(64 * 32768))
            .unwrap();
        let mut now = t0;
        let mut sent = 0u64;
        while sent < 64 {
            match u.poll_transmit(now) {
                Some(Transmit::Chunk { request, .. }) => {
                    u.handle_sent(now, request, 32768);
                    sent += 1;
                }
                _ => {
                    now = u.next_timeout().expect("paused by the rate");
                    u.handle_timeout(now);
                }
            }
        }
        // 2 MiB at 1 MiB/s with a 64 KiB burst: just under two seconds.
        let secs = now.as_micros() as f64 / 1e6;
        assert!((1.85..2.0).contains(&secs), "{secs}");
    }
}
