//! Everything platform-specific in the engine, and the only place `unsafe`
//! is allowed. Each item here has the same name and meaning on every
//! platform; the backend files are chosen by `cfg`:
//!
//! - `pool`: page-aligned slab buffers shared by the ingest pipeline and the
//!   io_uring backend (registered buffers must not move or be freed while the
//!   ring exists, so the pool owns them for its whole life).
//! - `unix`: store lock with owner PID (`flock`), free space (`statvfs`),
//!   opening a file for direct (cache-bypassing) writes, syncing a directory,
//!   vectored positional writes, starting writeback early,
//!   memory maps of sealed files.
//! - `uring` (Linux only): the io_uring writer and the probe that decides
//!   whether it can run in this process.
//! - `hash_batch`: many BLAKE3 hashes at once, one SIMD lane per message
//!   (the CPU's lanes come from `blake3`'s own dispatch).
//! - `probe`: what the platform offers (kernel version, io_uring opcodes,
//!   kernel TLS), for `envoy status` and the envoy's traits.

pub mod hash_batch;
pub mod pool;
pub mod probe;
mod unix;
#[cfg(target_os = "linux")]
pub mod uring;

pub use unix::*;

/// Stand-in for platforms without io_uring: it never starts, so `auto`
/// selects the portable backend and forcing `uring` fails with this reason.
#[cfg(not(target_os = "linux"))]
pub mod uring {
    use super::pool::SlabPool;
    use std::sync::Arc;

    pub const UNAVAILABLE: &str = "io_uring exists only on Linux";

    /// Uninhabited: no value exists, so code matching on it off Linux is
    /// proven unreachable by the compiler.
    #[derive(Debug)]
    pub enum UringWriter {}

    impl UringWriter {
        pub fn new(_pool: &Arc<SlabPool>) -> std::io::Result<Self> {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                UNAVAILABLE,
            ))
        }
    }

    /// No ring off Linux: the caller writes with `pwrite`.
    pub fn write_all_at_waiting(
        _fd: std::os::fd::RawFd,
        _buf: &[u8],
        _offset: u64,
    ) -> Option<std::io::Result<()>> {
        None
    }
}
