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

    /// Bytes given to this file so far.
    pub fn len(&self) -> u64 {
        self.offset + self.filled as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the bytes `fill` puts straight into the buffer it is handed
    /// (the free part of the filling slab, at least one byte, aligned to
    /// [`crate::sys::DIRECT_ALIGN`] when what came before is) and returns
    /// the count of. No copy: a direct read can land where the direct write
    /// leaves from.
    fn append_with(
        &mut self,
        fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let lease = self.filling.as_mut().expect("a slab is always filling");
        let room = &mut lease.as_mut_slice()[self.filled..];
        let room_len = room.len();
        let n = fill(room)?.min(room_len);
        self.filled += n;
        if self.filled == SEQUENTIAL_SLAB_BYTES {
            self.submit(SEQUENTIAL_SLAB_BYTES)?;
            self.filling = Some(self.pool.lease());
        }
        Ok(n)
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

/// Copies a blob's file, which the daemon may still be writing, into a
/// [`SequentialFile`] front to back (`envoy fetch --out`: the client reads
/// the descriptor the daemon hands it). [`ExportCopy::advance`] copies as far
/// as the writer says the file is ready; every byte is hashed on the way,
/// and [`ExportCopy::finish`] gives the whole-content BLAKE3 for the caller
/// to check against the manifest's.
///
/// Each buffer is read from the source straight into the slab the
/// destination writes from: with direct IO on both sides the bytes are
/// touched once, by the hash. (Streaming them through the daemon's control
/// socket instead cost a read-back, a re-hash per chunk and four copies.)
/// Direct reads of a file another descriptor is writing are coherent: the
/// kernel writes dirty page-cache pages of the range out before the read.
pub struct ExportCopy {
    src: File,
    direct: bool,
    len: u64,
    hasher: blake3::Hasher,
}

impl ExportCopy {
    /// Copies `src` (`len` bytes when complete) from its start. Switches
    /// `src`'s open file description to direct reads where possible.
    pub fn new(src: File, len: u64) -> Self {
        let direct = crate::sys::set_direct(&src, true);
        ExportCopy {
            src,
            direct,
            len,
            hasher: blake3::Hasher::new(),
        }
    }

    /// Whether the source is read with direct IO (so far).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Copies into `out` what bytes `..ready` of the source allow: whole
    /// buffers while the file is being written, everything once `ready` is
    /// its length.
    pub fn advance(&mut self, out: &mut SequentialFile, ready: u64) -> io::Result<()> {
        let ready = ready.min(self.len);
        loop {
            let at = out.len();
            let slab_room = SEQUENTIAL_SLAB_BYTES - (at % SEQUENTIAL_SLAB_BYTES as u64) as usize;
            let want = ready.saturating_sub(at).min(slab_room as u64) as usize;
            if want == 0 || (want < slab_room && ready < self.len) {
                return Ok(());
            }
            let (src, hasher, direct) = (&self.src, &mut self.hasher, &mut self.direct);
            out.append_with(|buf| {
                let got = read_full(src, at, buf, want, direct)?;
                hasher.update(&buf[..got]);
                Ok(got)
            })?;
        }
    }

    /// Bytes copied so far and their BLAKE3 when that is the whole file;
    /// an error when the file is not complete.
    pub fn finish(self, out: &SequentialFile) -> io::Result<crate::hash::ContentHash> {
        if out.len() != self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} of {} bytes copied", out.len(), self.len),
            ));
        }
        Ok(crate::hash::ContentHash(*self.hasher.finalize().as_bytes()))
    }
}

/// Reads `want` bytes of `src` at `at` into `buf`, direct while `direct`
/// holds (the length rounded up to the block, which the end of the file
/// cuts short). A direct read the filesystem or the alignment refuses
/// (EINVAL) switches `src` to the page cache for good.
fn read_full(
    src: &File,
    at: u64,
    buf: &mut [u8],
    want: usize,
    direct: &mut bool,
) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let span = if *direct {
        want.next_multiple_of(crate::sys::DIRECT_ALIGN as usize)
            .min(buf.len())
    } else {
        want
    };
    let mut got = 0;
    while got < want {
        match src.read_at(&mut buf[got..span], at + got as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before byte {}", at + want as u64),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && *direct => {
                crate::sys::set_direct(src, false);
                *direct = false;
                return read_full(src, at, buf, want, direct);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;

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
