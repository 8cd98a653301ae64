//! Platform-specific pieces of the envoy (the only place in `agent` that
//! names a target OS or C library).

/// Keeps a long-running daemon's heap from ratcheting up: glibc gives each
/// thread that allocates its own arena (up to 8 per core) and keeps freed
/// memory in each. The daemon's large, short-lived allocations (a seal's
/// index batch, a removal) land on whichever blocking-pool thread runs
/// them, so the retained total grows with every thread used. Measured: the
/// receiving daemon's RssAnon after three 1 GiB fetch + remove cycles was
/// 56 MB with the default and 31 MB with one arena. Elsewhere a no-op.
pub fn limit_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called at startup.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns free heap memory to the OS after a large operation (glibc keeps
/// it otherwise). Elsewhere a no-op.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases unused memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
