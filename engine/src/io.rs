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

/// The writer stage of one ingest or assembly: sequential slab writes to one
/// file through the selected backend.
pub(crate) enum SlabWriter {
    Uring(Box<UringWriter>),
    Portable,
}

impl SlabWriter {
    pub(crate) fn new(backend: IoBackend, pool: &Arc<SlabPool>) -> io::Result<Self> {
        Ok(match backend {
            IoBackend::Uring => SlabWriter::Uring(Box::new(UringWriter::new(pool)?)),
            IoBackend::Portable => SlabWriter::Portable,
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
            SlabWriter::Portable => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(slab.padded(len), offset)
            }
        }
    }

    /// Writes queued and not yet completed (always 0 for portable).
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.in_flight(),
            _ => 0,
        }
    }

    /// Waits for one queued write, releasing its slab to the pool.
    pub(crate) fn reap_one(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.reap_one(),
            _ => Ok(()),
        }
    }

    pub(crate) fn drain(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            SlabWriter::Uring(w) => w.drain(),
            _ => Ok(()),
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
