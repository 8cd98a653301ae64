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
/// OS when freed. 256 KiB: the fetch's buffers (intake batches, decoder
/// and writer buffers) are at least that; below it, the manifest pages a
/// fetch loads over and over (redb's zero-filled copy of a page value,
/// ~180 KB, and the decoded page, ~200 KB) come from the heap. At 128 KiB
/// each of those was a fresh mapping, faulted in page by page and zeroed
/// by the kernel before redb zeroed it again: a 4 GiB fetch made ~2.7 k
/// `mmap` calls and ~150 k page faults (both envoys, `perf stat -a`);
/// with 256 KiB ~610 and ~61 k, and the bench's peak receiver RssAnon was
/// 56.0 MiB (goal 64; 53.7 before).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 256 << 10;

/// Returns free heap memory to the OS after a large operation (glibc keeps
/// it otherwise). Elsewhere a no-op.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases unused memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends `bytes` on the Unix stream socket `socket` with the descriptor
/// `file` attached (`SCM_RIGHTS`): the receiver gets its own descriptor of
/// the same open file. Returns the bytes sent (the descriptor goes with the
/// first of them); may be short, like `send`.
pub fn send_with_fd(
    socket: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    file: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let fds = [file.as_raw_fd()];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)
}

/// Room for descriptors in one read of the control socket: Linux's limit
/// per message (`SCM_MAX_FD`). With less room the kernel installs what fits
/// and sets `MSG_CTRUNC`, and those it installed could not be found to
/// close: a client could leak the daemon's descriptors that way.
const FDS_PER_READ: usize = 253;

/// Reads from the Unix stream socket `socket` into `buf` like `recv`,
/// keeping any descriptors that came with the bytes (`SCM_RIGHTS`, close on
/// exec) in `fds`. A plain read would discard them.
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_READ]);
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    let flags = MsgFlags::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    let flags = MsgFlags::empty();
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags)
        .map_err(std::io::Error::from)?;
    let mut received = Vec::new();
    let truncated = msg.cmsgs().is_err();
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors in our
                // table for this message; nothing else refers to them.
                received.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    let n = msg.bytes;
    fds.append(&mut received);
    if truncated {
        // Only when out of descriptors (EMFILE): none was installed.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "descriptors sent with the message could not be received",
        ));
    }
    Ok(n)
}

/// Runs the calling thread at a raised scheduling priority (nice
/// `nice`, negative) until dropped, then at its earlier one: a fetch's
/// chunk writers ([`crate::daemon`]'s intake), whose wake-up after each
/// direct write completes decides when a connection's reader gets its batch
/// back. At the default priority they waited for a time slice behind the
/// readers and senders while the disk had long finished, and the readers
/// waited on them with the CPU idle (see `ARCHITECTURE.md`, "Writer
/// priority"). Linux only: elsewhere a thread's priority is the process's.
/// A daemon without the right to raise priorities (not root, no
/// `CAP_SYS_NICE`) runs them as before.
pub struct Urgent {
    #[cfg(target_os = "linux")]
    previous: Option<libc::c_int>,
}

impl Urgent {
    pub fn raise(nice: i32) -> Urgent {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: gettid/getpriority/setpriority only read or change
            // this thread's scheduling priority.
            unsafe {
                let tid = libc::gettid() as libc::id_t;
                *libc::__errno_location() = 0;
                let previous = libc::getpriority(libc::PRIO_PROCESS, tid);
                let known = previous != -1 || *libc::__errno_location() == 0;
                let raised = known
                    && previous > nice
                    && libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0;
                Urgent {
                    previous: raised.then_some(previous),
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = nice;
            Urgent {}
        }
    }

    /// Whether the priority was raised.
    pub fn raised(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.previous.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(previous) = self.previous {
            // SAFETY: as in `raise`.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, previous);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the right to (root with `CAP_SYS_NICE`) the priority is raised
    /// for this thread only and given back; without it nothing changes.
    #[test]
    fn urgent_raises_this_thread_only_and_gives_it_back() {
        #[cfg(target_os = "linux")]
        std::thread::spawn(|| {
            use std::sync::{Arc, Barrier};
            // SAFETY: reading priorities only.
            let nice = |tid: libc::pid_t| unsafe {
                libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
            };
            let me = unsafe { libc::gettid() };
            let before = nice(me);
            let (raised, read) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
            let other = {
                let (raised, read) = (Arc::clone(&raised), Arc::clone(&read));
                std::thread::spawn(move || {
                    raised.wait();
                    let n = nice(unsafe { libc::gettid() });
                    read.wait();
                    n
                })
            };
            let urgent = Urgent::raise(-10);
            raised.wait();
            read.wait();
            if urgent.raised() {
                assert_eq!(nice(me), -10);
            } else {
                eprintln!(
                    "NOTE: this process may not raise priorities (no CAP_SYS_NICE): \
                     only the fallback ran, the raised path was NOT tested"
                );
                assert_eq!(nice(me), before);
            }
            assert_eq!(other.join().unwrap(), before, "other threads unchanged");
            drop(urgent);
            assert_eq!(nice(me), before);
        })
        .join()
        .unwrap();
    }
}
