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
            SlabWriter::Uring(_) => unreachable!("no uring writer exists off Linux"),
            SlabWriter::Portable(w) => w.write(file, slab, len, offset),
        }
    }

    /// Writes queued and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.in_flight(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(_) => 0,
            SlabWriter::Portable(w) => w.in_flight,
        }
    }

    /// Waits for one queued write, releasing its slab to the pool.
    pub(crate) fn reap_one(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.reap_one(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(_) => Ok(()),
            SlabWriter::Portable(w) => w.reap_one(),
        }
    }

    pub(crate) fn drain(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.drain(),
            #[cfg(not(target_os = "linux"))]
            SlabWriter::Uring(_) => Ok(()),
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
    fn portable_is_always_available() {
        assert_eq!(
            select(IoMode::Portable).unwrap().backend,
            IoBackend::Portable
        );
    }
}
