//! IO backend selection: `uring` (io_uring on dedicated engine threads,
//! registered buffers) or `portable` (positional reads and writes; the only
//! backend off Linux). Chosen at run time by probing; see [`select`].

use std::fmt;
use std::fs::File;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use crate::sys::pool::{Slab, SlabPool};
use crate::sys::uring::UringWriter;

/// What the operator asked for (`--io`, env `VIGO_IO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when it can run here, else portable (the reason is logged once).
    #[default]
    Auto,
    /// io_uring or an error: never a silent fallback.
    Uring,
    Portable,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "portable" => Ok(IoMode::Portable),
            other => Err(format!(
                "unknown IO backend {other:?}: expected auto, uring or portable"
            )),
        }
    }
}

/// The backend that actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    Uring,
    Portable,
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoBackend::Uring => "uring",
            IoBackend::Portable => "portable",
        })
    }
}

/// The outcome of probing: the backend and, when `auto` fell back, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoSelection {
    pub backend: IoBackend,
    pub fallback_reason: Option<String>,
}

/// `--io uring` was forced where io_uring cannot run.
#[derive(Debug, thiserror::Error)]
#[error("the uring IO backend cannot run here: {0}")]
pub struct BackendUnavailable(pub String);

/// Slabs per ingest: enough to keep the disk busy while two cores chunk
/// and hash, few enough that anonymous memory stays flat (32 MiB).
pub const INGEST_SLABS: usize = 8;
/// Bytes per slab: one direct write each. Must hold the largest chunk.
pub const SLAB_BYTES: usize = 4 << 20;
const _: () =
    // A full block after an undecided tail must cover a whole cut window.
    assert!(SLAB_BYTES >= crate::chunker::ChunkerParams::MAX_CHUNK_BYTES_MAX as usize);
const _: () = assert!(SLAB_BYTES.is_multiple_of(crate::sys::pool::SLAB_ALIGN));

/// Probes the backend `mode` allows by doing what an ingest will do: set up
/// a ring and register a full ingest pool.
pub fn select(mode: IoMode) -> Result<IoSelection, BackendUnavailable> {
    match mode {
        IoMode::Portable => Ok(IoSelection {
            backend: IoBackend::Portable,
            fallback_reason: None,
        }),
        IoMode::Uring | IoMode::Auto => {
            let pool = SlabPool::new(INGEST_SLABS, SLAB_BYTES);
            match UringWriter::new(&pool) {
                Ok(_) => Ok(IoSelection {
                    backend: IoBackend::Uring,
                    fallback_reason: None,
                }),
                Err(e) if mode == IoMode::Uring => {
                    Err(BackendUnavailable(describe_uring_error(&e)))
                }
                Err(e) => {
                    let reason = describe_uring_error(&e);
                    tracing::warn!("io_uring unavailable, using the portable IO backend: {reason}");
                    Ok(IoSelection {
                        backend: IoBackend::Portable,
                        fallback_reason: Some(reason),
                    })
                }
            }
        }
    }
}

fn describe_uring_error(e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => " (blocked by seccomp or kernel.io_uring_disabled)",
        Some(libc::ENOSYS) => " (kernel or emulator without io_uring)",
        Some(libc::ENOMEM) => " (buffer registration exceeds the memlock limit)",
        _ => "",
    };
    format!("{e}{hint}")
}

/// Positional writes the portable backend keeps in flight, one thread each.
/// One synchronous 4 MiB direct write at a time left the disk idle between
/// writes: a 4 GiB add took 16.4-16.5 s against 12.8-14.9 s on uring (8 in
/// flight), same minutes, loaded machine.
pub const PORTABLE_WRITES_IN_FLIGHT: usize = 4;

/// The writer stage of one ingest or assembly: sequential slab writes to one
/// file through the selected backend.
pub(crate) enum SlabWriter {
    Uring(Box<UringWriter>),
    Portable(PortableWriter),
}

impl SlabWriter {
    pub(crate) fn new(backend: IoBackend, pool: &Arc<SlabPool>) -> io::Result<Self> {
        Ok(match backend {
            IoBackend::Uring => SlabWriter::Uring(Box::new(UringWriter::new(pool)?)),
            IoBackend::Portable => SlabWriter::Portable(PortableWriter::new()?),
        })
    }

    /// Writes `slab.padded(len)` at `offset`. Completion may be deferred
    /// until [`SlabWriter::drain`].
    pub(crate) fn write(
        &mut self,
        file: &File,
        slab: Slab,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => {
                use std::os::fd::AsRawFd;
                w.write(file.as_raw_fd(), slab, len, offset)
            }
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(w) => match **w {},
            SlabWriter::Portable(w) => w.write(file, slab, len, offset),
        }
    }

    /// Writes queued and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.in_flight(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(w) => match **w {},
            SlabWriter::Portable(w) => w.in_flight,
        }
    }

    /// Waits for one queued write, releasing its slab to the pool.
    pub(crate) fn reap_one(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.reap_one(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(w) => match **w {},
            SlabWriter::Portable(w) => w.reap_one(),
        }
    }

    pub(crate) fn drain(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.drain(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(w) => match **w {},
            SlabWriter::Portable(w) => w.drain(),
        }
    }
}

/// One positional write for a [`PortableWriter`] thread: the slab goes back
/// to the pool when the thread drops it, after the write.
struct PortableJob {
    file: Arc<File>,
    slab: Slab,
    len: usize,
    offset: u64,
}

/// The portable backend's writer: `pwrite` on [`PORTABLE_WRITES_IN_FLIGHT`]
/// threads, so that many writes are in flight, as with io_uring.
pub(crate) struct PortableWriter {
    jobs: Option<crossbeam_channel::Sender<PortableJob>>,
    done: crossbeam_channel::Receiver<io::Result<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The file being written, shared with the threads (a duplicate of the
    /// caller's descriptor, taken on the first write).
    file: Option<(std::os::fd::RawFd, Arc<File>)>,
    in_flight: usize,
    error: Option<io::Error>,
}

impl PortableWriter {
    fn new() -> io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::bounded::<PortableJob>(PORTABLE_WRITES_IN_FLIGHT);
        let (report, done) = crossbeam_channel::bounded(PORTABLE_WRITES_IN_FLIGHT);
        let threads = (0..PORTABLE_WRITES_IN_FLIGHT)
            .map(|i| {
                let queue = queue.clone();
                let report: crossbeam_channel::Sender<io::Result<()>> = report.clone();
                std::thread::Builder::new()
                    .name(format!("pwrite-{i}"))
                    .spawn(move || {
                        use std::os::unix::fs::FileExt;
                        for job in queue.iter() {
                            let result =
                                job.file.write_all_at(job.slab.padded(job.len), job.offset);
                            drop(job);
                            if report.send(result).is_err() {
                                return;
                            }
                        }
                    })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(PortableWriter {
            jobs: Some(jobs),
            done,
            threads,
            file: None,
            in_flight: 0,
            error: None,
        })
    }

    fn write(&mut self, file: &File, slab: Slab, len: usize, offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        while self.in_flight >= PORTABLE_WRITES_IN_FLIGHT {
            self.reap()?;
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let shared = match &self.file {
            Some((fd, shared)) if *fd == file.as_raw_fd() => Arc::clone(shared),
            _ => {
                let shared = Arc::new(file.try_clone()?);
                self.file = Some((file.as_raw_fd(), Arc::clone(&shared)));
                shared
            }
        };
        let job = PortableJob {
            file: shared,
            slab,
            len,
            offset,
        };
        self.jobs
            .as_ref()
            .expect("open until dropped")
            .send(job)
            .map_err(|_| io::Error::other("portable writer threads are gone"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for one completion; remembers the first failure.
    fn reap(&mut self) -> io::Result<()> {
        let result = self
            .done
            .recv()
            .map_err(|_| io::Error::other("portable writer threads are gone"))?;
        self.in_flight -= 1;
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
        Ok(())
    }

    fn reap_one(&mut self) -> io::Result<()> {
        if self.in_flight > 0 {
            self.reap()?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            self.reap()?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for PortableWriter {
    fn drop(&mut self) {
        // Closing the queue ends the threads once queued writes are done.
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Bytes per buffer of a [`SequentialFile`] (one direct write each).
const SEQUENTIAL_SLAB_BYTES: usize = 2 << 20;

/// A new file written front to back, durably, without filling the page
/// cache: exports (a blob written out once and not read back here).
///
/// Through the page cache, the kernel's copy into fresh page-cache folios was
/// half of the exporting process's time on the reference VM (perf, 4 GiB
/// export) and the dirty data waited in memory for the final fsync. Here
/// buffers go to the disk with direct IO where the filesystem allows it,
/// [`PORTABLE_WRITES_IN_FLIGHT`] at a time while the next one fills; the
/// last, partial block is written padded and the file then cut to its exact
/// length. Where direct IO is refused (tmpfs, some FUSE, other platforms)
/// the same writes go through the page cache.
pub struct SequentialFile {
    file: File,
    pool: Arc<SlabPool>,
    writer: PortableWriter,
    filling: Option<crate::sys::pool::SlabLease>,
    filled: usize,
    /// Bytes handed to the writer so far (whole buffers).
    offset: u64,
}

impl SequentialFile {
    /// Creates `path`, which must not exist (mode 0644 less the umask).
    pub fn create(path: &std::path::Path) -> io::Result<Self> {
        let (file, _direct) = crate::sys::create_for_writing(path, true)?;
        let pool = SlabPool::new(PORTABLE_WRITES_IN_FLIGHT + 1, SEQUENTIAL_SLAB_BYTES);
        let filling = Some(pool.lease());
        Ok(SequentialFile {
            file,
            pool,
            writer: PortableWriter::new()?,
            filling,
            filled: 0,
            offset: 0,
        })
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let lease = self.filling.as_mut().expect("a slab is always filling");
            let n = bytes.len().min(SEQUENTIAL_SLAB_BYTES - self.filled);
            lease.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == SEQUENTIAL_SLAB_BYTES {
                self.submit(SEQUENTIAL_SLAB_BYTES)?;
                self.filling = Some(self.pool.lease());
            }
        }
        Ok(())
    }

    /// Hands the filling slab to the writer, padded to `padded` bytes.
    fn submit(&mut self, padded: usize) -> io::Result<()> {
        let slab = self
            .filling
            .take()
            .expect("a slab is filling")
            .freeze(self.filled);
        self.writer.write(&self.file, slab, padded, self.offset)?;
        self.offset += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is buffered, waits for every write, cuts the file to the
    /// bytes written and makes it durable (fsync). The caller renames it
    /// into place.
    pub fn finish(mut self) -> io::Result<File> {
        let len = self.offset + self.filled as u64;
        if self.filled > 0 {
            let padded = self
                .filled
                .next_multiple_of(crate::sys::DIRECT_ALIGN as usize);
            let lease = self.filling.as_mut().expect("a slab is filling");
            lease.as_mut_slice()[self.filled..padded].fill(0);
            self.submit(padded)?;
        }
        self.writer.drain()?;
        self.file.set_len(len)?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

/// Bytes of one slab of a [`RunWriter`]: a 1 MiB receive batch and its
/// edges, so a run is usually one direct write.
const RUN_SLAB_BYTES: usize = (4 << 20) + (64 << 10);
/// Slabs of a [`RunWriter`]: runs written at once (one per connection's
/// batch on the blocking pool); a further writer waits for one.
const RUN_SLABS: usize = 4;

/// Writes runs of bytes at arbitrary offsets of an existing, preallocated
/// file: a fetch's verified chunks, which start anywhere.
///
/// Buffered `pwrite`s into the page cache cost ~2 CPU-s per GiB of kernel
/// time on the reference VM (a 4 GiB fetch spent 9.5 s of its receiving
/// cores writing), against ~0.3 for direct IO from aligned memory. Direct IO
/// needs whole blocks, so each run's whole blocks are copied into an
/// aligned slab (one `memcpy`) and written directly, and the partial blocks
/// at its two ends go through the page cache. A partial block is never
/// written directly and a whole block of a run belongs to no other run, so
/// the two kinds of write never overlap. Where direct IO is refused
/// (tmpfs, some FUSE, other platforms) or unwanted, every write goes
/// through the page cache. An fsync of [`RunWriter::file`] covers both.
#[derive(Debug)]
pub struct RunWriter {
    file: File,
    direct: Option<(File, Arc<SlabPool>)>,
}

impl RunWriter {
    /// Opens `path` for writing, with direct IO when `direct` and the
    /// filesystem allows it.
    pub fn open(path: &std::path::Path, direct: bool) -> io::Result<Self> {
        let file = File::options().write(true).open(path)?;
        let direct = match direct {
            true => crate::sys::open_direct_writer(path)?
                .map(|f| (f, SlabPool::new(RUN_SLABS, RUN_SLAB_BYTES))),
            false => None,
        };
        Ok(RunWriter { file, direct })
    }

    /// The file, for syncing (and for writes that bypass this writer).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether whole blocks go out with direct IO.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes `parts`, back to back, at `offset` (at most
    /// [`crate::sys::IOV_MAX`] parts).
    pub fn write_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const BLOCK: u64 = crate::sys::DIRECT_ALIGN;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let end = offset + len;
        let (lo, hi) = (offset.next_multiple_of(BLOCK), end / BLOCK * BLOCK);
        let Some((direct, pool)) = self.direct.as_ref().filter(|_| lo < hi) else {
            return crate::sys::write_all_vectored_at(&self.file, offset, parts);
        };
        let mut from = Gather {
            parts,
            part: 0,
            at: 0,
        };
        let mut edge = [0u8; BLOCK as usize];
        let head = (lo - offset) as usize;
        if head > 0 {
            from.copy_to(&mut edge[..head]);
            self.file.write_all_at(&edge[..head], offset)?;
        }
        let mut slab = pool.lease();
        let mut at = lo;
        while at < hi {
            let n = (hi - at).min(RUN_SLAB_BYTES as u64) as usize;
            let buf = &mut slab.as_mut_slice()[..n];
            from.copy_to(buf);
            direct.write_all_at(buf, at)?;
            at += n as u64;
        }
        drop(slab);
        let tail = (end - hi) as usize;
        if tail > 0 {
            from.copy_to(&mut edge[..tail]);
            self.file.write_all_at(&edge[..tail], hi)?;
        }
        Ok(())
    }
}

/// A cursor over byte slices read back to back.
struct Gather<'a> {
    parts: &'a [&'a [u8]],
    part: usize,
    at: usize,
}

impl Gather<'_> {
    /// Copies the next `dst.len()` bytes into `dst`.
    fn copy_to(&mut self, dst: &mut [u8]) {
        let mut done = 0;
        while done < dst.len() {
            let rest = &self.parts[self.part][self.at..];
            let n = rest.len().min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&rest[..n]);
            done += n;
            self.at += n;
            if self.at == self.parts[self.part].len() {
                self.part += 1;
                self.at = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, RngCore, SeedableRng};

    #[test]
    fn run_writer_writes_runs_at_any_offset_in_any_order() {
        let mut rng = StdRng::seed_from_u64(3);
        let size = 3 * RUN_SLAB_BYTES + 12_345;
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        // Runs from one byte to well past a slab, in shuffled order.
        let mut runs = Vec::new();
        let mut at = 0;
        while at < size {
            let len = match rng.random_range(0..4) {
                0 => rng.random_range(1..100),
                1 => rng.random_range(1..9000),
                2 => rng.random_range(4096..70_000),
                _ => rng.random_range(RUN_SLAB_BYTES..2 * RUN_SLAB_BYTES),
            }
            .min(size - at);
            runs.push((at, len));
            at += len;
        }
        runs.shuffle(&mut rng);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for direct in [true, false] {
            File::create(&path).unwrap().set_len(size as u64).unwrap();
            let w = RunWriter::open(&path, direct).unwrap();
            if direct && !w.is_direct() {
                eprintln!(
                    "SKIPPED the direct half: {} refuses O_DIRECT",
                    dir.path().display()
                );
                continue;
            }
            assert_eq!(w.is_direct(), direct);
            for &(off, len) in &runs {
                // Split each run into up to three parts, some empty.
                let bytes = &data[off..off + len];
                let a = rng.random_range(0..=len);
                let b = rng.random_range(a..=len);
                w.write_at(off as u64, &[&bytes[..a], &bytes[a..b], &bytes[b..]])
                    .unwrap();
            }
            w.file().sync_all().unwrap();
            drop(w);
            assert!(std::fs::read(&path).unwrap() == data, "direct: {direct}");
        }
    }

    #[test]
    fn mode_parsing() {
        assert_eq!("auto".parse::<IoMode>(), Ok(IoMode::Auto));
        assert_eq!("portable".parse::<IoMode>(), Ok(IoMode::Portable));
        assert!(
            "fast"
                .parse::<IoMode>()
                .unwrap_err()
                .contains("auto, uring or portable")
        );
    }

    #[test]
    fn sequential_file_writes_exact_bytes_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * SEQUENTIAL_SLAB_BYTES + 12_345))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let s = SEQUENTIAL_SLAB_BYTES;
        for len in [0, 1, 4095, 4096, 4097, s - 1, s, s + 1, data.len()] {
            let path = dir.path().join(format!("f{len}"));
            let mut f = SequentialFile::create(&path).unwrap();
            // Uneven pieces, as a socket delivers them.
            for piece in data[..len].chunks(65_537) {
                f.write_all(piece).unwrap();
            }
            f.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data[..len], "length {len}");
        }
        assert!(
            SequentialFile::create(&dir.path().join("f0")).is_err(),
            "never replaces a file"
        );
    }

    #[test]
    fn portable_is_always_available() {
        assert_eq!(
            select(IoMode::Portable).unwrap().backend,
            IoBackend::Portable
        );
    }
}
