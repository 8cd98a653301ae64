//! Platform-specific pieces of the envoy (the only place in `agent` that
//! names a target OS or C library).

/// Keeps a long-running daemon's heap from ratcheting up: glibc gives each
/// thread that allocates its own arena (up to 8 per core) and keeps freed
/// memory in each. The daemon's large, short-lived allocations (a seal's
/// index batch, a removal) land on whichever blocking-pool thread runs
/// them, so the retained total grows with every thread used. Measured: the
/// receiving daemon's RssAnon after three 1 GiB fetch + remove cycles was
/// 56 MB with the default and 31 MB with one arena.
///
/// Also pins the mmap threshold at [`MMAP_THRESHOLD_BYTES`]: glibc raises
/// it to the size of each mmapped block freed (up to 32 MiB), after which a
/// fetch's buffers (intake batches, decoder and writer buffers, all ≥ 256
/// KiB) come from the heap, their freed holes fill with small allocations,
/// and the peak grows with every fetch the daemon has served (measured, 2
/// GiB from three sources: first fetch in a process 37.7 MiB, the next
/// three 47.6-50.9). Elsewhere a no-op.
pub fn limit_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called at startup.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

/// Allocations from this size up get their own mapping, returned to the
/// OS when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 128 << 10;

/// Returns free heap memory to the OS after a large operation (glibc keeps
/// it otherwise). Elsewhere a no-op.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases unused memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
