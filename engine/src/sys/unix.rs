//! Unix primitives the store needs, with the Linux fast paths behind `cfg`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// An exclusive, process-wide lock on a store directory. The kernel releases
/// it when the process dies (even by SIGKILL), so no stale lock survives.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; its PID when it wrote one.
    Held(Option<u32>),
    Io(io::Error),
}

/// Takes the lock file at `path` without waiting and records our PID in it.
pub fn lock_exclusive(path: &Path) -> Result<DirLock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(LockError::Io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0).map_err(LockError::Io)?;
            lock.seek(SeekFrom::Start(0)).map_err(LockError::Io)?;
            writeln!(lock, "{}", std::process::id()).map_err(LockError::Io)?;
            Ok(DirLock { _lock: lock })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(LockError::Held(text.trim().parse().ok()))
        }
        Err((_, errno)) => Err(LockError::Io(errno.into())),
    }
}

/// Opens a file to ingest without blocking: opening a FIFO for reading
/// would otherwise wait for a writer (while holding the store lock). The
/// caller checks the type of what it opened.
pub fn open_input(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Sizes `file` to `len` bytes and, where the platform can, reserves the
/// disk blocks (Linux `fallocate`, FreeBSD `posix_fallocate`), so writing
/// into it later cannot fail for lack of space. Returns whether blocks were
/// reserved; elsewhere (or on a filesystem without support) the file is only
/// sized, sparse.
pub fn preallocate(file: &File, len: u64) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    if len > 0 {
        use nix::fcntl::{FallocateFlags, fallocate};
        match fallocate(file, FallocateFlags::empty(), 0, len as libc::off_t) {
            Ok(()) => return Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    #[cfg(target_os = "freebsd")]
    if len > 0 {
        match nix::fcntl::posix_fallocate(file, 0, len as libc::off_t) {
            Ok(()) => return Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    file.set_len(len)?;
    Ok(false)
}

/// Allocates disk blocks for `[offset, offset + len)` of `file`, growing its
/// size to cover them (Linux `fallocate`, FreeBSD `posix_fallocate`), so
/// writes there neither extend the file nor fail for lack of space. A
/// platform or filesystem without it leaves the file alone: writes then
/// extend it as usual.
pub fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{FallocateFlags, fallocate};
        match fallocate(
            file,
            FallocateFlags::empty(),
            offset as libc::off_t,
            len as libc::off_t,
        ) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    #[cfg(target_os = "freebsd")]
    match nix::fcntl::posix_fallocate(file, offset as libc::off_t, len as libc::off_t) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let _ = (file, offset);
    Ok(())
}

/// Starts writing back the dirty pages of `[offset, offset + len)` (`len` 0:
/// to the end of the file) without waiting (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`). Not a durability
/// point: it keeps the disk busy while data streams in, instead of letting
/// the page cache collect it until the next `fdatasync` (or the kernel's
/// background threshold, gigabytes on a large machine) writes it in a burst.
/// Elsewhere a no-op; the next sync writes everything as before.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // Advisory: an error here changes nothing the next fsync reports.
        // SAFETY: plain syscall on a descriptor `file` keeps open.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    let _ = (file, offset, len);
}

/// Makes a rename or create inside `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Logical block size direct writes must be aligned to; slabs are aligned to it.
pub const DIRECT_ALIGN: u64 = 4096;

/// Creates a new file for the store's own writes. With `direct`, bypasses the
/// page cache where the platform and filesystem allow it (O_DIRECT on Linux
/// and FreeBSD); returns whether it did. A filesystem that refuses direct IO
/// (tmpfs before 6.6, some FUSE) gets buffered writes instead.
pub fn create_for_writing(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(flags)
            .mode(0o644)
            .open(path)
    };
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    if direct {
        match open(libc::O_DIRECT) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // O_DIRECT refused: the name may already exist; start clean.
                let _ = std::fs::remove_file(path);
            }
            Err(e) => return Err(e),
        }
    }
    let _ = direct;
    Ok((open(0)?, false))
}

/// Opens the existing file at `path` a second time for direct
/// (cache-bypassing) reads and writes; `None` where the platform or
/// filesystem refuses direct IO (see [`create_for_writing`]).
pub fn open_direct(path: &Path) -> io::Result<Option<File>> {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => return Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(e),
    }
    let _ = path;
    Ok(None)
}

/// Switches an open file's reads and writes to direct (cache-bypassing) IO
/// or back, where the platform allows it (O_DIRECT on Linux and FreeBSD);
/// returns whether the file is now as asked. The flag belongs to the open
/// file description: every descriptor sharing it changes. A filesystem may
/// still refuse direct reads themselves (EINVAL): callers fall back then.
pub fn set_direct(file: &File, on: bool) -> bool {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        if let Ok(bits) = fcntl(file, FcntlArg::F_GETFL) {
            let mut flags = OFlag::from_bits_truncate(bits);
            flags.set(OFlag::O_DIRECT, on);
            return fcntl(file, FcntlArg::F_SETFL(flags)).is_ok();
        }
    }
    let _ = file;
    !on
}

/// A read-only map of a sealed store file.
///
/// Mapping is safe here only because of how the store treats sealed files:
/// they are written once, renamed into place, and afterwards never written,
/// truncated or replaced in place — only unlinked whole — so no page of a
/// live mapping can disappear (the usual SIGBUS cause) or change under a
/// reader. The caller checks the file's length against the manifest before
/// mapping. A media error on a mapped page still raises SIGBUS; the async
/// network path reads into buffers instead (see ARCHITECTURE.md).
#[derive(Debug)]
pub struct SealedMap {
    map: Option<memmap2::Mmap>,
}

impl SealedMap {
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        if len == 0 {
            return Ok(SealedMap { map: None });
        }
        // SAFETY: see the type's documentation: sealed files are immutable
        // and never truncated while the store owns them.
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file)? };
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(SealedMap { map: Some(map) })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// `[offset, offset + len)` cut at the map's end; `None` when that
    /// leaves nothing.
    fn stretch(&self, offset: u64, len: u64) -> Option<(&memmap2::Mmap, usize, usize)> {
        let map = self.map.as_ref()?;
        let offset = usize::try_from(offset).ok().filter(|&o| o < map.len())?;
        let len = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(map.len() - offset);
        Some((map, offset, len))
    }

    /// Maps `[offset, offset + len)` (cut at the map's end) ahead of a pass
    /// over it, so the pass takes no page faults (`MADV_POPULATE_READ` on
    /// Linux 5.14+, else a read-ahead hint). Advisory: failures are ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        let Some((map, offset, len)) = self.stretch(offset, len) else {
            return;
        };
        #[cfg(target_os = "linux")]
        if map
            .advise_range(memmap2::Advice::PopulateRead, offset, len)
            .is_ok()
        {
            return;
        }
        let _ = map.advise_range(memmap2::Advice::WillNeed, offset, len);
    }

    /// Starts reading `[offset, offset + len)` (cut at the map's end) into
    /// the page cache without waiting for it (`MADV_WILLNEED`). Advisory:
    /// failures are ignored.
    pub fn read_ahead(&self, offset: u64, len: u64) {
        if let Some((map, offset, len)) = self.stretch(offset, len) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, offset, len);
        }
    }
}

/// The real user id of this process (the owner recorded for CLI adds).
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Most buffers one vectored write takes (POSIX guarantees at least 16,
/// Linux, the BSDs and macOS take 1024).
pub const IOV_MAX: usize = 1024;

/// Writes `bufs` back to back at `offset` with as few `pwritev` calls as the
/// kernel allows (at most [`IOV_MAX`] buffers).
pub fn write_all_vectored_at(file: &File, mut offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
    assert!(bufs.len() <= IOV_MAX, "at most IOV_MAX buffers");
    let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        match nix::sys::uio::pwritev(file, rest, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                io::IoSlice::advance_slices(&mut rest, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
