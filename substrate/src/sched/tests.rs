//! Deterministic scheduler tests on a fake clock, and a proptest over
//! random event sequences with the invariant checker.

use proptest::prelude::*;

use super::*;
use crate::wire::{HaveBuf, HaveMap};

const BLOB: BlobId = BlobId([5; 32]);
const KIB: u32 = 1024;

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn all(n: u64) -> HaveMap<'static> {
    HaveMap::all(BLOB, 0, n)
}

fn new_sched(lens: Vec<u32>, config: SchedConfig) -> Scheduler {
    let n = lens.len() as u64;
    Scheduler::new(t(0), config, BLOB, lens, 0..n).unwrap()
}

fn poll_all(s: &mut Scheduler, now: Timestamp) -> Vec<(PeerId, Request)> {
    let mut out = Vec::new();
    while let Some(r) = s.poll_request(now) {
        s.assert_invariants();
        out.push(r);
    }
    out
}

fn deliver(
    s: &mut Scheduler,
    now: Timestamp,
    peer: PeerId,
    r: &Request,
    verdict: impl Fn(u64) -> Verdict,
) -> Vec<DataOutcome> {
    r.chunks()
        .map(|c| {
            let o = s.handle_data(now, peer, r.id, c, verdict(c));
            s.assert_invariants();
            o
        })
        .collect()
}

fn events(s: &mut Scheduler) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn cancels(s: &mut Scheduler) -> Vec<(PeerId, RequestId)> {
    std::iter::from_fn(|| s.poll_cancel()).collect()
}

const A: PeerId = PeerId(1);
const B: PeerId = PeerId(2);
const C: PeerId = PeerId(3);

#[test]
fn single_peer_completes_in_runs() {
    let config = SchedConfig {
        run_bytes_target: 256 * 1024,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![32 * KIB; 100], config);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(100))
        .unwrap();
    let mut seen = vec![0u32; 100];
    let mut requests = 0;
    let mut now = t(0);
    while !s.is_complete() {
        let batch = poll_all(&mut s, now);
        assert!(!batch.is_empty());
        assert!(
            batch.len() <= SchedConfig::DEFAULT.peer_requests_in_flight_max as usize,
            "peer_requests_in_flight_max"
        );
        for (peer, r) in batch {
            assert_eq!(peer, A);
            assert!(
                r.chunk_count <= 8,
                "a run is at most 256 KiB of 32 KiB chunks"
            );
            for c in r.chunks() {
                seen[c as usize] += 1;
            }
            requests += 1;
            let outcomes = deliver(&mut s, now, A, &r, |_| Verdict::Ok);
            assert!(outcomes.iter().all(|o| *o == DataOutcome::Accepted));
        }
        now += Duration::from_millis(1);
    }
    assert_eq!(requests, 13, "100 chunks in runs of 8");
    assert!(seen.iter().all(|&n| n == 1), "each chunk asked for once");
    assert_eq!(events(&mut s), vec![Event::Complete]);
    assert_eq!(s.next_timeout(), None);
    assert_eq!(s.poll_request(now), None);
    let st = s.stats();
    assert_eq!((st.chunks_done, st.bytes_done), (100, 100 * 32 * 1024));
    assert_eq!(st.bytes_duplicate, 0);
}

#[test]
fn resume_asks_only_for_missing_chunks() {
    let mut s = Scheduler::new(
        t(0),
        SchedConfig::DEFAULT,
        BLOB,
        vec![32 * KIB; 20],
        [3, 4, 10],
    )
    .unwrap();
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(20))
        .unwrap();
    let batch = poll_all(&mut s, t(0));
    let asked: Vec<u64> = batch.iter().flat_map(|(_, r)| r.chunks()).collect();
    let mut sorted = asked.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![3, 4, 10]);
    for (_, r) in &batch {
        deliver(&mut s, t(0), A, r, |_| Verdict::Ok);
    }
    assert_eq!(events(&mut s), vec![Event::Complete]);

    let done = Scheduler::new(t(0), SchedConfig::DEFAULT, BLOB, vec![1; 5], []).unwrap();
    assert!(done.is_complete());
    assert!(matches!(
        Scheduler::new(t(0), SchedConfig::DEFAULT, BLOB, vec![1; 5], [5]),
        Err(SchedError::MissingOutOfRange { index: 5, .. })
    ));
}

#[test]
fn a_peer_sending_bad_chunks_is_banned_and_the_others_finish() {
    let config = SchedConfig {
        run_bytes_target: 128 * 1024,
        peer_requests_in_flight_max: 4,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![32 * KIB; 120], config);
    for p in [A, B, C] {
        s.handle_peer_joined(t(0), p, PeerCredit::UNLIMITED, &all(120))
            .unwrap();
    }
    let mut now = t(0);
    let mut b_requests = Vec::new();
    while !s.is_complete() {
        let batch = poll_all(&mut s, now);
        for (peer, r) in batch {
            if peer == B {
                let outcomes = deliver(&mut s, now, B, &r, |_| Verdict::Bad);
                if outcomes[0] == DataOutcome::Banned {
                    b_requests.push(r);
                }
                continue;
            }
            deliver(&mut s, now, peer, &r, |_| Verdict::Ok);
        }
        now += Duration::from_millis(1);
        assert!(now < t(10_000), "no progress");
    }
    let ev = events(&mut s);
    assert!(ev.contains(&Event::Banned {
        peer: B,
        reason: BanReason::BadChunk {
            chunk_index: b_requests[0].first_chunk
        }
    }));
    assert_eq!(ev.last(), Some(&Event::Complete));
    assert!(s.is_banned(B));
    // B's requests were canceled when it was banned (the first one still
    // had chunks to come).
    let b_cancels = cancels(&mut s).iter().filter(|(p, _)| *p == B).count();
    assert_eq!(b_cancels, 4);
    // Whatever B still sends is dropped without effect, and B cannot rejoin.
    let r = b_requests[0];
    assert_eq!(
        s.handle_data(now, B, r.id, r.first_chunk, Verdict::Ok),
        DataOutcome::Stale
    );
    assert_eq!(
        s.handle_peer_joined(now, B, PeerCredit::UNLIMITED, &all(120)),
        Err(JoinError::Banned)
    );
}

#[test]
fn a_stalled_peer_is_dropped_and_its_work_reissued() {
    // No endgame duplicates, so only the drop can move B's work to A.
    let config = SchedConfig {
        run_bytes_target: 256 * 1024,
        endgame_copies_max: 1,
        peer_requests_in_flight_max: 4,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![32 * KIB; 256], config);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(256))
        .unwrap();
    s.handle_peer_joined(t(0), B, PeerCredit::UNLIMITED, &all(256))
        .unwrap();
    let first = poll_all(&mut s, t(0));
    let b_chunks: Vec<u64> = first
        .iter()
        .filter(|(p, _)| *p == B)
        .flat_map(|(_, r)| r.chunks())
        .collect();
    assert!(!b_chunks.is_empty());
    // A serves everything it is asked, one request per second; B is silent.
    assert_eq!(s.next_timeout(), Some(t(10_000)), "B's stall deadline");
    let mut now = t(0);
    let mut pending: VecDeque<(PeerId, Request)> = first.into_iter().collect();
    let mut dropped_at = None;
    while !s.is_complete() {
        now += Duration::from_secs(1);
        s.handle_timeout(now);
        for e in events(&mut s) {
            if e == (Event::PeerDropped {
                peer: B,
                reason: DropReason::Stalled,
            }) {
                dropped_at = Some(now);
                let canceled: Vec<_> = cancels(&mut s);
                assert_eq!(canceled.len(), 4, "B's four requests are canceled");
            }
        }
        pending.extend(poll_all(&mut s, now));
        let mut still = VecDeque::new();
        while let Some((p, r)) = pending.pop_front() {
            if p == A {
                deliver(&mut s, now, A, &r, |_| Verdict::Ok);
            } else {
                still.push_back((p, r));
            }
        }
        pending = still;
        assert!(now < t(120_000));
    }
    assert_eq!(dropped_at, Some(t(10_000)));
    assert!(s.peer_in_flight(B).is_none());
    assert!(
        b_chunks.iter().all(|&c| s.is_done(c)),
        "B's work was done by A"
    );
    // B may come back; its old requests' late chunks are stale, not a violation.
    s.handle_peer_joined(now, B, PeerCredit::UNLIMITED, &all(256))
        .unwrap();
    let (_, old) = pending.iter().find(|(p, _)| *p == B).unwrap();
    assert_eq!(
        s.handle_data(now, B, old.id, old.first_chunk, Verdict::Ok),
        DataOutcome::Stale
    );
}

/// A source that leaves (its connection closed) and joins again over
/// another before the caller polls leaves no stall report behind; one that
/// stays away does, once.
#[test]
fn a_stall_resolved_before_it_is_polled_is_not_reported() {
    let mut s = new_sched(vec![32 * KIB; 64], SchedConfig::DEFAULT);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(64))
        .unwrap();
    assert!(!poll_all(&mut s, t(0)).is_empty());
    s.handle_peer_lost(t(1), A);
    s.handle_peer_joined(t(1), A, PeerCredit::UNLIMITED, &all(64))
        .unwrap();
    assert_eq!(
        events(&mut s),
        vec![],
        "the stall was over before it was polled"
    );
    s.assert_invariants();
    // The fetch goes on with A.
    let again = poll_all(&mut s, t(1));
    assert!(again.iter().all(|(p, _)| *p == A) && !again.is_empty());

    s.handle_peer_lost(t(2), A);
    assert_eq!(
        events(&mut s),
        vec![Event::Stalled {
            chunks_unavailable: 64
        }]
    );
    // Reported once: A joining and leaving again before any request is
    // issued does not report it twice.
    s.handle_peer_joined(t(3), A, PeerCredit::UNLIMITED, &all(64))
        .unwrap();
    s.handle_peer_lost(t(3), A);
    assert_eq!(events(&mut s), vec![]);
}

/// The order in which a single serving peer is asked for 12 one-chunk
/// pieces, with availability 1, 2 and 3 for chunks 8..12, 4..8, 0..4.
fn rarest_order(seed: u64, in_order: bool) -> Vec<u64> {
    let config = SchedConfig {
        run_bytes_target: 1024,
        peer_requests_in_flight_max: 1,
        seed,
        in_order,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![1024; 12], config);
    let silent = PeerCredit {
        bytes: u64::MAX,
        requests: 0,
    };
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(12))
        .unwrap();
    let b = HaveBuf::from_ranges(BLOB, 0, 12, std::iter::once(0..8));
    s.handle_peer_joined(t(0), B, silent, &b.as_map()).unwrap();
    let c = HaveBuf::from_ranges(BLOB, 0, 12, std::iter::once(0..4));
    s.handle_peer_joined(t(0), C, silent, &c.as_map()).unwrap();
    let mut order = Vec::new();
    while let Some((peer, r)) = s.poll_request(t(0)) {
        assert_eq!(peer, A);
        assert_eq!(r.chunk_count, 1);
        assert_eq!(s.poll_request(t(0)), None, "one request in flight");
        order.push(r.first_chunk);
        deliver(&mut s, t(0), A, &r, |_| Verdict::Ok);
    }
    assert!(s.is_complete());
    order
}

#[test]
fn rarest_chunks_are_fetched_first_with_seeded_ties() {
    let order = rarest_order(42, false);
    let class = |c: u64| c / 4;
    let classes: Vec<u64> = order.iter().map(|&c| class(c)).collect();
    assert_eq!(
        classes,
        vec![2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0],
        "{order:?}"
    );
    assert_eq!(rarest_order(42, false), order, "same seed, same order");
    assert!(
        (0..8).any(|seed| rarest_order(seed, false) != order),
        "ties are broken by the seed"
    );
}

#[test]
fn in_order_breaks_ties_by_blob_order_and_keeps_rarest_first() {
    for seed in 0..8 {
        assert_eq!(
            rarest_order(seed, true),
            vec![8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3],
            "seed {seed}"
        );
    }
}

/// The pieces one serving peer is asked for, in order, for a blob of `n`
/// one-chunk pieces all equally rare.
fn tie_order(seed: u64, n: usize) -> Vec<u64> {
    let config = SchedConfig {
        run_bytes_target: 1024,
        peer_requests_in_flight_max: 1,
        seed,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![1024; n], config);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(n as u64))
        .unwrap();
    let mut order = Vec::new();
    while let Some((_, r)) = s.poll_request(t(0)) {
        order.push(r.first_chunk);
        deliver(&mut s, t(0), A, &r, |_| Verdict::Ok);
    }
    order
}

/// Equally rare pieces come in random groups of consecutive pieces (index
/// order inside a group), so a receiver reads each manifest page for many
/// pieces at once; at least `LOCALITY_GROUPS_MIN` groups per blob, so
/// receivers of a small blob still spread.
#[test]
fn ties_are_drawn_per_group_of_consecutive_pieces() {
    let n = LOCALITY_GROUPS_MIN * LOCALITY_PIECES_MAX * 2;
    let order = tie_order(7, n);
    let group = LOCALITY_PIECES_MAX as u64;
    for g in order.chunks(LOCALITY_PIECES_MAX) {
        assert_eq!(g[0] % group, 0, "a group starts at its first piece: {g:?}");
        assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "in order: {g:?}");
    }
    let groups: Vec<u64> = order
        .iter()
        .step_by(LOCALITY_PIECES_MAX)
        .map(|c| c / group)
        .collect();
    assert!(
        groups.windows(2).any(|w| w[1] != w[0] + 1),
        "groups are shuffled"
    );
    assert_ne!(tie_order(8, n), order, "another seed, another order");

    let small = tie_order(7, LOCALITY_GROUPS_MIN);
    assert!(
        small.windows(2).filter(|w| w[1] == w[0] + 1).count() < LOCALITY_GROUPS_MIN / 4,
        "a blob of {LOCALITY_GROUPS_MIN} pieces is drawn piece by piece: {small:?}"
    );
}

#[test]
fn runs_are_consecutive_within_bounds() {
    let lens: Vec<u32> = (0..500)
        .map(|i| 16 * KIB + (i * 7919 % 112) * KIB)
        .collect();
    let config = SchedConfig {
        run_bytes_target: 1 << 20,
        request_chunks_max: 16,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(lens.clone(), config);
    // A holds a fragmented map: runs must stop at chunks it lacks.
    let held: Vec<_> = (0..500u64)
        .step_by(37)
        .map(|i| i..(i + 30).min(500))
        .collect();
    let map = HaveBuf::from_ranges(BLOB, 0, 500, held.clone());
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &map.as_map())
        .unwrap();
    let mut covered = 0;
    while let Some((_, r)) = s.poll_request(t(0)) {
        let bytes: u64 = r.chunks().map(|c| u64::from(lens[c as usize])).sum();
        assert!(r.chunk_count <= 16);
        assert!(bytes <= 1 << 20 || r.chunk_count == 1);
        assert!(r.chunks().all(|c| map.as_map().contains(c)));
        covered += r.chunk_count;
        deliver(&mut s, t(0), A, &r, |_| Verdict::Ok);
    }
    let held_count: u64 = held.iter().map(|r| r.end - r.start).sum();
    assert_eq!(u64::from(covered), held_count);
    assert!(matches!(events(&mut s).last(), Some(Event::Stalled { .. })));
}

#[test]
fn endgame_splits_outstanding_runs_then_cancels_them() {
    let config = SchedConfig {
        run_bytes_target: 128 * 1024,
        peer_requests_in_flight_max: 2,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![32 * KIB; 16], config);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(16))
        .unwrap();
    s.handle_peer_joined(t(0), B, PeerCredit::UNLIMITED, &all(16))
        .unwrap();
    let first = poll_all(&mut s, t(0));
    assert_eq!(first.len(), 4, "every chunk in flight, two requests each");
    let (a_reqs, b_reqs): (Vec<_>, Vec<_>) = first.into_iter().partition(|(p, _)| *p == A);
    assert_eq!(
        s.poll_request(t(0)),
        None,
        "peers with work of their own do not duplicate"
    );
    for (_, r) in &a_reqs {
        deliver(&mut s, t(1), A, r, |_| Verdict::Ok);
    }
    // A is idle, B has not sent anything: A takes the back half of B's
    // oldest run.
    let (b0, b1) = (b_reqs[0].1, b_reqs[1].1);
    let (p, dup) = s.poll_request(t(1)).unwrap();
    assert_eq!(p, A);
    assert_eq!(dup.chunks(), b0.first_chunk + 2..b0.first_chunk + 4);
    assert_eq!(s.poll_request(t(1)), None, "one duplicate at a time");
    // Meanwhile B serves the front half of that run.
    for c in b0.first_chunk..b0.first_chunk + 2 {
        assert_eq!(
            s.handle_data(t(2), B, b0.id, c, Verdict::Ok),
            DataOutcome::Accepted
        );
    }
    assert!(cancels(&mut s).is_empty());
    deliver(&mut s, t(2), A, &dup, |_| Verdict::Ok);
    // B's first run is now all done: canceled.
    assert_eq!(cancels(&mut s), vec![(B, b0.id)]);
    s.assert_invariants();
    // A, idle again, splits B's second run; then what is left of it.
    let (_, dup) = s.poll_request(t(3)).unwrap();
    assert_eq!(dup.chunks(), b1.first_chunk + 2..b1.first_chunk + 4);
    deliver(&mut s, t(3), A, &dup, |_| Verdict::Ok);
    let (_, dup) = s.poll_request(t(3)).unwrap();
    assert_eq!(dup.chunks(), b1.first_chunk + 1..b1.first_chunk + 2);
    deliver(&mut s, t(3), A, &dup, |_| Verdict::Ok);
    let (_, dup) = s.poll_request(t(3)).unwrap();
    assert_eq!(dup.chunks(), b1.first_chunk..b1.first_chunk + 1);
    deliver(&mut s, t(3), A, &dup, |_| Verdict::Ok);
    assert_eq!(cancels(&mut s), vec![(B, b1.id)]);
    assert_eq!(events(&mut s), vec![Event::Complete]);
    // B's chunks sent before it saw the cancel are duplicates, then it
    // acknowledges.
    assert_eq!(
        s.handle_data(t(4), B, b0.id, b0.first_chunk + 2, Verdict::Ok),
        DataOutcome::Duplicate
    );
    s.handle_reject(t(4), B, b0.id, RejectCode::CANCELED);
    s.handle_reject(t(4), B, b1.id, RejectCode::CANCELED);
    s.assert_invariants();
    assert_eq!(s.peer_in_flight(B), Some((0, 0)));
    assert_eq!(s.stats().bytes_duplicate, 32 * 1024);
}

#[test]
fn rejects_back_off_or_shrink_the_have_map() {
    let mut s = new_sched(vec![32 * KIB; 4], SchedConfig::DEFAULT);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(4))
        .unwrap();
    let (_, r) = s.poll_request(t(0)).unwrap();
    s.handle_reject(t(0), A, r.id, RejectCode::BUSY);
    assert_eq!(s.poll_request(t(100)), None, "backing off");
    assert_eq!(s.next_timeout(), Some(t(500)));
    s.handle_timeout(t(500));
    let (_, r) = s.poll_request(t(500)).unwrap();
    assert_eq!(r.chunks(), 0..4);
    // A turns out not to hold the run it announced: nobody has it now.
    s.handle_reject(t(600), A, r.id, RejectCode::NOT_HELD);
    assert_eq!(s.poll_request(t(600)), None);
    assert_eq!(
        events(&mut s),
        vec![Event::Stalled {
            chunks_unavailable: 4
        }]
    );
    // A reject for something unknown is ignored.
    s.handle_reject(t(600), A, RequestId(77), RejectCode::BUSY);
    s.assert_invariants();
    // A new holder ends the stall.
    s.handle_peer_joined(t(700), B, PeerCredit::UNLIMITED, &all(4))
        .unwrap();
    assert!(s.poll_request(t(700)).is_some());
}

#[test]
fn protocol_violations_ban_the_peer() {
    let mut s = new_sched(vec![32 * KIB; 16], SchedConfig::DEFAULT);
    for p in [A, B] {
        s.handle_peer_joined(t(0), p, PeerCredit::UNLIMITED, &all(16))
            .unwrap();
    }
    let batch = poll_all(&mut s, t(0));
    let (_, ra) = batch.iter().find(|(p, _)| *p == A).copied().unwrap();
    let (_, rb) = batch.iter().find(|(p, _)| *p == B).copied().unwrap();
    assert!(matches!(
        s.handle_data(t(0), A, RequestId(9999), 0, Verdict::Ok),
        DataOutcome::Violation(_)
    ));
    assert!(s.is_banned(A));
    // B sends a chunk of its run out of order.
    assert!(matches!(
        s.handle_data(t(0), B, rb.id, rb.first_chunk + 1, Verdict::Ok),
        DataOutcome::Violation(_)
    ));
    assert!(s.is_banned(B));
    let ev = events(&mut s);
    assert!(matches!(
        ev[0],
        Event::Banned {
            peer: A,
            reason: BanReason::Protocol(_)
        }
    ));
    assert!(matches!(
        ev[1],
        Event::Banned {
            peer: B,
            reason: BanReason::Protocol(_)
        }
    ));
    assert!(matches!(
        ev[2],
        Event::Stalled {
            chunks_unavailable: 16
        }
    ));
    s.assert_invariants();
    let _ = ra;
}

#[test]
fn have_maps_are_checked() {
    let config = SchedConfig {
        peers_max: 1,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![KIB; 10], config);
    assert!(matches!(
        s.handle_peer_joined(
            t(0),
            A,
            PeerCredit::UNLIMITED,
            &HaveMap::all(BlobId([0; 32]), 0, 10)
        ),
        Err(JoinError::Have(HaveError::WrongBlob))
    ));
    assert!(matches!(
        s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(11)),
        Err(JoinError::Have(HaveError::BeyondBlob { .. }))
    ));
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &HaveMap::all(BLOB, 0, 5))
        .unwrap();
    assert_eq!(
        s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(10)),
        Err(JoinError::AlreadyJoined)
    );
    assert_eq!(
        s.handle_peer_joined(t(0), B, PeerCredit::UNLIMITED, &all(10)),
        Err(JoinError::TooManyPeers(1))
    );
    assert_eq!(
        s.handle_have_update(t(0), B, &all(10)),
        Err(HaveError::UnknownPeer)
    );
    // An update replaces only its window.
    s.handle_have_update(t(0), A, &HaveMap::all(BLOB, 8, 2))
        .unwrap();
    let none = HaveBuf::from_ranges(BLOB, 0, 2, []);
    s.handle_have_update(t(0), A, &none.as_map()).unwrap();
    s.assert_invariants();
    let asked: Vec<u64> = poll_all(&mut s, t(0))
        .iter()
        .flat_map(|(_, r)| r.chunks())
        .collect();
    assert_eq!(asked, vec![2, 3, 4, 8, 9]);
}

#[test]
fn download_rate_paces_requests() {
    let config = SchedConfig {
        run_bytes_target: 64 * 1024,
        peer_download_bytes_per_s: Some(1_000_000),
        rate_burst_bytes: 64 * 1024,
        ..SchedConfig::DEFAULT
    };
    let mut s = new_sched(vec![32 * KIB; 64], config);
    s.handle_peer_joined(t(0), A, PeerCredit::UNLIMITED, &all(64))
        .unwrap();
    let mut now = t(0);
    while !s.is_complete() {
        match s.poll_request(now) {
            Some((_, r)) => {
                deliver(&mut s, now, A, &r, |_| Verdict::Ok);
            }
            None => {
                now = s.next_timeout().expect("waiting on the bucket");
                s.handle_timeout(now);
            }
        }
    }
    // 2 MiB at 1 MB/s with a 64 KiB burst, the last run admitted on credit:
    // (2 MiB - 64 KiB - 64 KiB) / 1 MB/s.
    let secs = now.as_micros() as f64 / 1e6;
    assert!((1.9..2.1).contains(&secs), "{secs}");
}

// ---- random event sequences -------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Join(u8, u8, u32),
    Lost(u8),
    Have(u8, u8),
    Poll,
    Deliver(prop::sample::Index, bool),
    Reject(prop::sample::Index, u8),
    Bogus(u8, u64, u64),
    Advance(u16),
    Timeout,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..5u8, 0..5u8, 8u32..96).prop_map(|(p, h, k)| Op::Join(p, h, k)),
        1 => (0..5u8).prop_map(Op::Lost),
        1 => (0..5u8, 0..5u8).prop_map(|(p, h)| Op::Have(p, h)),
        4 => Just(Op::Poll),
        8 => (any::<prop::sample::Index>(), prop::bool::weighted(0.97))
            .prop_map(|(i, ok)| Op::Deliver(i, ok)),
        1 => (any::<prop::sample::Index>(), 0..5u8).prop_map(|(i, c)| Op::Reject(i, c)),
        1 => (0..5u8, 0..200u64, 0..50u64).prop_map(|(p, r, c)| Op::Bogus(p, r, c)),
        2 => (1..3000u16).prop_map(Op::Advance),
        1 => Just(Op::Timeout),
    ]
}

fn pattern(n: u64, kind: u8) -> HaveBuf {
    let ranges: Vec<Range<u64>> = match kind {
        0 => std::iter::once(0..n).collect(),
        1 => std::iter::once(0..n / 2).collect(),
        2 => std::iter::once(n / 2..n).collect(),
        3 => (0..n).step_by(2).map(|c| c..c + 1).collect(),
        _ => std::iter::once(n - 1..n).collect(),
    };
    HaveBuf::from_ranges(BLOB, 0, n, ranges)
}

/// The model's view of one outstanding request.
#[derive(Clone, Debug)]
struct Live {
    peer: PeerId,
    id: RequestId,
    next: u64,
    end: u64,
}

struct Harness {
    s: Scheduler,
    live: Vec<Live>,
    now: Timestamp,
    n: u64,
}

impl Harness {
    fn settle(&mut self) {
        while let Some(e) = self.s.poll_event() {
            if let Event::Banned { peer, .. } | Event::PeerDropped { peer, .. } = e {
                self.live.retain(|l| l.peer != peer);
            }
        }
        // A canceled request is acknowledged at once by the model peer.
        while let Some((peer, id)) = self.s.poll_cancel() {
            if self.live.iter().any(|l| l.id == id) {
                self.s
                    .handle_reject(self.now, peer, id, RejectCode::CANCELED);
                self.live.retain(|l| l.id != id);
            }
        }
        self.s.assert_invariants();
    }

    fn deliver_first(&mut self) {
        let l = self.live[0].clone();
        let outcome = self
            .s
            .handle_data(self.now, l.peer, l.id, l.next, Verdict::Ok);
        assert!(
            matches!(outcome, DataOutcome::Accepted | DataOutcome::Duplicate),
            "{outcome:?}"
        );
        if l.next + 1 == l.end {
            self.live.remove(0);
        } else {
            self.live[0].next += 1;
        }
        self.settle();
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now;
        match *op {
            Op::Join(p, h, credit_kib) => {
                let credit = PeerCredit {
                    bytes: u64::from(credit_kib) * 1024,
                    requests: 3,
                };
                let _ = self.s.handle_peer_joined(
                    now,
                    PeerId(p.into()),
                    credit,
                    &pattern(self.n, h).as_map(),
                );
            }
            Op::Lost(p) => {
                self.s.handle_peer_lost(now, PeerId(p.into()));
                self.live.retain(|l| l.peer != PeerId(p.into()));
            }
            Op::Have(p, h) => {
                let _ =
                    self.s
                        .handle_have_update(now, PeerId(p.into()), &pattern(self.n, h).as_map());
            }
            Op::Poll => {
                while let Some((peer, r)) = self.s.poll_request(now) {
                    self.live.push(Live {
                        peer,
                        id: r.id,
                        next: r.first_chunk,
                        end: r.first_chunk + u64::from(r.chunk_count),
                    });
                }
            }
            Op::Deliver(i, ok) => {
                if self.live.is_empty() {
                    return;
                }
                let at = i.index(self.live.len());
                let l = self.live[at].clone();
                let verdict = if ok { Verdict::Ok } else { Verdict::Bad };
                let outcome = self.s.handle_data(now, l.peer, l.id, l.next, verdict);
                assert!(
                    !matches!(outcome, DataOutcome::Violation(_) | DataOutcome::Stale),
                    "a legitimate delivery was refused: {outcome:?}"
                );
                if l.next + 1 == l.end {
                    self.live.remove(at);
                } else {
                    self.live[at].next += 1;
                }
            }
            Op::Reject(i, code) => {
                if self.live.is_empty() {
                    return;
                }
                let l = self.live.remove(i.index(self.live.len()));
                self.s
                    .handle_reject(now, l.peer, l.id, RejectCode(u16::from(code)));
            }
            Op::Bogus(p, id, chunk) => {
                let peer = PeerId(p.into());
                if self
                    .live
                    .iter()
                    .any(|l| l.id == RequestId(id) && l.peer == peer && l.next == chunk)
                {
                    return; // that one would be legitimate
                }
                let _ = self
                    .s
                    .handle_data(now, peer, RequestId(id), chunk, Verdict::Ok);
            }
            Op::Advance(ms) => self.now += Duration::from_millis(ms.into()),
            Op::Timeout => self.s.handle_timeout(now),
        }
        self.settle();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random joins, losses, have updates, deliveries (some bad), rejects,
    /// bogus data and time: the invariants (in-flight bounds, copy counts,
    /// availability, rarity index) hold after every step, and a fresh honest
    /// peer can always finish the blob.
    #[test]
    fn invariants_hold_and_the_fetch_can_always_finish(
        lens in prop::collection::vec(1u32..=8 * KIB, 1..48),
        ops in prop::collection::vec(op(), 1..120),
        seed in any::<u64>(),
    ) {
        let n = lens.len() as u64;
        let config = SchedConfig {
            run_bytes_target: 16 * 1024,
            request_chunks_max: 4,
            peer_requests_in_flight_max: 3,
            peer_download_bytes_per_s: Some(200_000),
            rate_burst_bytes: 16 * 1024,
            peer_stall_timeout: Duration::from_secs(5),
            seed,
            ..SchedConfig::DEFAULT
        };
        let mut h = Harness { s: new_sched(lens, config), live: Vec::new(), now: t(0), n };
        for op in &ops {
            h.apply(op);
        }
        // Liveness: an honest peer joins; everyone delivers what they owe.
        let honest = PeerId(99);
        h.s.handle_peer_joined(h.now, honest, PeerCredit::UNLIMITED, &all(n)).unwrap();
        for _ in 0..10_000 {
            if h.s.is_complete() {
                break;
            }
            h.apply(&Op::Poll);
            if h.live.is_empty() {
                let next = h.s.next_timeout().expect("something to wait for");
                h.now = next.max(h.now);
                h.apply(&Op::Timeout);
                continue;
            }
            while !h.live.is_empty() {
                h.deliver_first();
            }
        }
        prop_assert!(h.s.is_complete());
        prop_assert_eq!(h.s.stats().chunks_done, n);
    }
}
