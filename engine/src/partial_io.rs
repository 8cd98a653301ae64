//! How the verified chunks of a partial blob reach its file, from several
//! writer threads at once ([`crate::store::PartialWriter`]).
//!
//! # Direct writes for the middle of each run
//! A run of consecutive chunks goes to the disk in three parts: the
//! block-aligned middle with direct IO, from an aligned slab
//! ([`RunWriter`]), and the two partial blocks at its ends through the page
//! cache (their other bytes belong to neighbouring runs, which may arrive
//! later, from another peer, or never in this process). Through the page
//! cache alone the kernel's side of writing was the costliest and least
//! predictable part of a fetch on the reference VM: `dd` of 4 GiB in 1 MiB
//! writes with `conv=fdatasync` used 3.6-11.3 CPU-s of system time and
//! 4.2-11.9 s buffered, 0.5-0.9 CPU-s and 1.7-2.3 s with `oflag=direct`
//! into a preallocated file (same minutes); a 4 GiB fetch's writers
//! sometimes spent 14-21 s (summed) blocked in buffered writes where they
//! usually spend 2-4. The fetch's receiver shares two cores with its
//! sender. Alternating old and new daemons (4 GiB, one source, five
//! rounds and earlier ones): median wall 6.62 -> 6.28 s, system-wide CPU
//! 11.1 -> 10.1 s, no run above 8 s (the old writer had one of 11 s in
//! sixteen). The copy into the slab replaces the kernel's copy
//! into the page cache; a direct write needs aligned memory, and received
//! payloads lie wherever TLS decrypted them.
//!
//! What this leaves: a direct write blocks its writer thread until the
//! device has the bytes (~2.5 ms per 1 MiB batch while both cores are busy,
//! 0.45 ms idle), so readers wait longer for a free batch (4-5 s summed
//! against 2-3). Four writers instead of two were slower (7.1-7.3 s): the
//! next step is completing the write asynchronously and reporting the
//! batch's verdicts then, with the batch's buffer already back with the
//! reader.
//!
//! # Direct writes through io_uring (session 18)
//! Where the store's IO backend is io_uring, the direct writes go through a
//! ring of the writer thread's own ([`sys::uring::write_all_at_waiting`]),
//! still waited for: ext4 holds the file's inode lock across a synchronous
//! (`pwrite`) direct write until the device completes it, and the buffered
//! writes of run ends take that lock exclusively, so each of them queued
//! behind every direct write in flight and every later direct write behind
//! it. An asynchronous direct write holds the lock only while it is
//! submitted. 4 GiB from one source, alternating with the `pwrite` build
//! (`perf/scripts/ab-fetch.sh 4096 6`, two-core VM): 3.69-4.88 s (median
//! 4.04) against 4.12-4.62 s (median 4.40); the writers' summed time
//! 5.7-8.2 s against 8.5-10.3 s, readers waited 1.5-2.7 s against 2.8-3.8.
//!
//! # Why each chunk is written once ([`Claims`])
//! The kernel keeps direct and buffered IO coherent only if they never
//! touch the same block at once: a direct write that cannot drop a cached
//! page it overwrote (one a buffered write is dirtying) logs "Page cache
//! invalidation failure on direct I/O" and fails the file's next `fsync`
//! with EIO. Runs of *different* chunks never share such a block: a block
//! in a run's aligned middle holds only that run's bytes, and every other
//! run touching a block at a run's end has an end there too. Only the same
//! chunk written twice (an endgame duplicate from a second peer) could; so
//! the first writer to claim a chunk writes it, and a later one waits until
//! it is written before reporting it (its verdict promises the bytes are in
//! the file: the fetch commits on it and the export reads them).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::sys::{self, pool::SlabPool};

/// Bytes per direct write: one slab, one transparent huge page (the device
/// then gets each write as one request, see [`SlabPool::new`]).
const DIRECT_SLAB_BYTES: usize = 2 << 20;
/// Slabs per writer: direct writes in flight at once. A writer thread holds
/// one only while copying into it and writing it, so more writer threads
/// than slabs wait their turn for the disk, not for each other's hashing.
const DIRECT_SLABS: usize = 4;

/// Writes runs of consecutive bytes of one file: the aligned middle with
/// direct IO where the filesystem allows it, the rest through the page
/// cache (see the module doc).
pub(crate) struct RunWriter {
    /// The file opened again with O_DIRECT; `None` where refused.
    direct: Option<File>,
    /// False once a direct write was refused (an alignment larger than
    /// [`sys::DIRECT_ALIGN`]): everything then goes through the page cache.
    direct_ok: AtomicBool,
    slabs: Option<Arc<SlabPool>>,
    direct_bytes: AtomicU64,
    /// Of `direct_bytes`, those written through io_uring.
    uring_bytes: AtomicU64,
    /// Direct writes go through io_uring ([`sys::uring::write_all_at_waiting`]:
    /// an asynchronous direct write does not hold ext4's inode lock while the
    /// device works, so the buffered writes of run ends do not queue behind it).
    uring: bool,
}

impl RunWriter {
    /// A writer for the file at `path` (already open for buffered writes);
    /// `uring`: the store's IO backend is io_uring.
    pub(crate) fn open(path: &std::path::Path, uring: bool) -> io::Result<Self> {
        let direct = sys::open_direct(path)?;
        let slabs = direct
            .is_some()
            .then(|| SlabPool::new(DIRECT_SLABS, DIRECT_SLAB_BYTES));
        Ok(RunWriter {
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            slabs,
            direct_bytes: AtomicU64::new(0),
            uring_bytes: AtomicU64::new(0),
            uring,
        })
    }

    /// Bytes written with direct IO so far.
    pub(crate) fn direct_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    /// Writes the concatenation of `parts` (at most [`sys::IOV_MAX`]) at
    /// `offset`; `file` takes the buffered writes. Returns the bytes that
    /// went through the page cache (the rest were written direct).
    pub(crate) fn write_run(&self, file: &File, offset: u64, parts: &[&[u8]]) -> io::Result<u64> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let end = offset + len;
        let align = sys::DIRECT_ALIGN;
        let (lo, hi) = (offset.next_multiple_of(align), end / align * align);
        let (Some(direct), Some(slabs)) = (&self.direct, &self.slabs) else {
            return sys::write_all_vectored_at(file, offset, parts).map(|()| len);
        };
        if hi <= lo || !self.direct_ok.load(Ordering::Relaxed) {
            return sys::write_all_vectored_at(file, offset, parts).map(|()| len);
        }
        if lo > offset {
            sys::write_all_vectored_at(file, offset, &sub_slices(parts, 0..lo - offset))?;
        }
        if end > hi {
            sys::write_all_vectored_at(file, hi, &sub_slices(parts, hi - offset..len))?;
        }
        let mut at = lo;
        while at < hi {
            let n = (hi - at).min(slabs.slab_bytes() as u64);
            let mut slab = slabs.lease();
            let buf = &mut slab.as_mut_slice()[..n as usize];
            let mut filled = 0;
            for part in sub_slices(parts, at - offset..at - offset + n) {
                buf[filled..filled + part.len()].copy_from_slice(part);
                filled += part.len();
            }
            let waiting = if self.uring {
                sys::uring::write_all_at_waiting(direct.as_raw_fd(), buf, at)
            } else {
                None
            };
            let written = match waiting {
                Some(Ok(())) => {
                    self.uring_bytes.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                }
                // What the ring refuses as invalid, `pwrite` decides: the
                // alignment, or the ring's own limits.
                Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    direct.write_all_at(buf, at)
                }
                Some(Err(e)) => Err(e),
                None => direct.write_all_at(buf, at),
            };
            match written {
                Ok(()) => {
                    self.direct_bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if self.direct_ok.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "direct writes refused ({e}); writing through the page cache instead"
                        );
                    }
                    drop(slab);
                    return sys::write_all_vectored_at(
                        file,
                        at,
                        &sub_slices(parts, at - offset..hi - offset),
                    )
                    .map(|()| len - (at - lo));
                }
                Err(e) => return Err(e),
            }
            at += n;
        }
        Ok(len - (hi - lo))
    }
}

/// The pieces of `parts` (concatenated) that lie in byte range `range`.
fn sub_slices<'a>(parts: &[&'a [u8]], range: std::ops::Range<u64>) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for part in parts {
        let end = start + part.len() as u64;
        if end > range.start && start < range.end {
            let from = range.start.saturating_sub(start) as usize;
            let to = (range.end.min(end) - start) as usize;
            out.push(&part[from..to]);
        }
        start = end;
        if start >= range.end {
            break;
        }
    }
    out
}

/// Which chunks of a blob some writer has taken on, and which of those are
/// in the file (see the module doc).
pub(crate) struct Claims {
    claimed: Vec<AtomicU64>,
    written: Vec<AtomicU64>,
    /// A writer failed: what it claimed will never be written.
    failed: AtomicBool,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// How often a waiting writer looks again even without a wake-up.
const CLAIM_RECHECK: Duration = Duration::from_millis(50);

impl Claims {
    pub(crate) fn new(chunks: u64) -> Self {
        let words = chunks.div_ceil(64) as usize;
        let bits = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Claims {
            claimed: bits(),
            written: bits(),
            failed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    fn bit(index: u64) -> (usize, u64) {
        ((index / 64) as usize, 1 << (index % 64))
    }

    /// Takes chunk `index` on; false when another writer already has.
    pub(crate) fn claim(&self, index: u64) -> bool {
        let (w, b) = Self::bit(index);
        self.claimed[w].fetch_or(b, Ordering::SeqCst) & b == 0
    }

    fn is_written(&self, index: u64) -> bool {
        let (w, b) = Self::bit(index);
        self.written[w].load(Ordering::SeqCst) & b != 0
    }

    /// Records the chunks `indices` (claimed by the caller) in the file.
    pub(crate) fn mark_written(&self, indices: impl IntoIterator<Item = u64>) {
        for index in indices {
            let (w, b) = Self::bit(index);
            self.written[w].fetch_or(b, Ordering::SeqCst);
        }
        self.wake_waiters();
    }

    /// A writer failed: waiters give up.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        // SeqCst against `wait_written`: either it sees the bits, or this
        // sees it waiting and takes the lock it checks them under.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            drop(self.lock.lock().expect("claims lock poisoned"));
            self.wake.notify_all();
        }
    }

    /// Waits until every chunk of `indices` (each claimed by another
    /// writer) is in the file; false if a writer failed first.
    pub(crate) fn wait_written(&self, indices: &[u64]) -> bool {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().expect("claims lock poisoned");
        let ok = loop {
            if indices.iter().all(|&i| self.is_written(i)) {
                break true;
            }
            if self.failed.load(Ordering::SeqCst) {
                break false;
            }
            guard = self
                .wake
                .wait_timeout(guard, CLAIM_RECHECK)
                .expect("claims lock poisoned")
                .0;
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sub_slices_cut_at_any_boundary() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let cat = |r: std::ops::Range<u64>| sub_slices(&parts, r).concat();
        assert_eq!(cat(0..8), b"abcdefgh");
        assert_eq!(cat(2..4), b"cd");
        assert_eq!(cat(3..3), b"");
        assert_eq!(cat(3..8), b"defgh");
        assert_eq!(cat(7..8), b"h");
    }

    /// Disjoint runs with arbitrary boundaries (inside one block, across
    /// blocks, longer than a slab, ending at an unaligned end of file),
    /// written in a random order from several threads at once, leave the
    /// file byte for byte, read back direct or not; on a disk that takes
    /// direct IO most bytes went that way. Both ways of writing direct:
    /// `pwrite` and io_uring.
    #[test]
    fn runs_in_any_order_make_the_file() {
        for uring in [false, true] {
            runs_in_any_order_make_the_file_with(uring);
        }
    }

    fn runs_in_any_order_make_the_file_with(uring: bool) {
        // Under the target directory: /tmp may be a tmpfs without O_DIRECT.
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(&base).unwrap();
        let path = dir.path().join("partial");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let len = 3 * DIRECT_SLAB_BYTES + 100_003;
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let file = File::create(&path).unwrap();
        sys::preallocate(&file, len as u64).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        // Cut points: some tiny runs, some inside a block, one run longer
        // than a slab, the rest random.
        let mut cuts = vec![0, 1, 100, 4095, 4096, 5000, 8191, 9000, 9001];
        cuts.push(9001 + DIRECT_SLAB_BYTES + 4096 * 3 + 17);
        while cuts.len() < 200 {
            cuts.push(rng.random_range(*cuts.last().unwrap()..len));
        }
        cuts.sort();
        cuts.push(len);
        cuts.dedup();
        let mut runs: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        runs.shuffle(&mut rng);
        let writer = RunWriter::open(&path, uring).unwrap();
        let next = AtomicUsize::new(0);
        let cached = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(a, b)) = runs.get(i) else { break };
                        // Uneven parts, as chunks are.
                        let parts: Vec<&[u8]> = data[a..b].chunks(7919).collect();
                        let mut at = a as u64;
                        for group in parts.chunks(sys::IOV_MAX) {
                            let c = writer.write_run(&file, at, group).unwrap();
                            cached.fetch_add(c, Ordering::Relaxed);
                            at += group.iter().map(|p| p.len() as u64).sum::<u64>();
                        }
                    }
                });
            }
        });
        // Before any sync the ends of runs are still dirty in the page
        // cache: a direct read of the file (what `fetch --out`'s export
        // does) must see them.
        let out_path = dir.path().join("copy");
        let mut out = crate::io::SequentialFile::create(&out_path).unwrap();
        let mut copy = crate::io::ExportCopy::new(File::open(&path).unwrap(), len as u64);
        copy.advance(&mut out, len as u64).unwrap();
        let direct_copy = copy.is_direct();
        let hash = copy.finish(&out).unwrap();
        out.finish().unwrap();
        assert_eq!(hash.0, *blake3::hash(&data).as_bytes());
        assert_eq!(
            direct_copy,
            writer.direct.is_some(),
            "read direct where written direct"
        );
        assert!(
            std::fs::read(&out_path).unwrap() == data,
            "the copy differs"
        );
        file.sync_data().unwrap();
        assert!(std::fs::read(&path).unwrap() == data, "file differs");
        // Every byte is counted once: direct or through the page cache (the
        // part the store's writeback accounting counts).
        assert_eq!(
            cached.load(Ordering::Relaxed) + writer.direct_bytes(),
            len as u64
        );
        if writer.direct.is_some() {
            assert!(
                writer.direct_bytes() > len as u64 / 2,
                "only {} of {len} bytes went direct",
                writer.direct_bytes()
            );
            let ring_here = crate::io::select(crate::io::IoMode::Auto)
                .is_ok_and(|s| s.backend == crate::io::IoBackend::Uring);
            let through_ring = writer.uring_bytes.load(Ordering::Relaxed);
            if uring && ring_here {
                assert_eq!(
                    through_ring,
                    writer.direct_bytes(),
                    "every direct write went through the ring"
                );
            } else if uring {
                eprintln!("NOTE: no io_uring here: the ring's direct writes were NOT exercised");
            } else {
                assert_eq!(through_ring, 0, "pwrite only");
            }
        } else {
            eprintln!(
                "NOTE: {} refuses O_DIRECT: only the page-cache path was exercised",
                base.display()
            );
        }
    }

    #[test]
    fn a_waiting_writer_wakes_when_the_claimed_chunks_are_written_or_fail() {
        let claims = Arc::new(Claims::new(200));
        assert!(claims.claim(3));
        assert!(claims.claim(130));
        assert!(!claims.claim(3), "claimed once");
        let waiter = {
            let c = Arc::clone(&claims);
            std::thread::spawn(move || c.wait_written(&[3, 130]))
        };
        std::thread::sleep(Duration::from_millis(20));
        claims.mark_written([3]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "130 is not written yet");
        claims.mark_written([130]);
        assert!(waiter.join().unwrap());

        assert!(claims.claim(5));
        let waiter = {
            let c = Arc::clone(&claims);
            std::thread::spawn(move || c.wait_written(&[5]))
        };
        claims.fail();
        assert!(
            !waiter.join().unwrap(),
            "a failed writer's chunk never comes"
        );
    }
}
