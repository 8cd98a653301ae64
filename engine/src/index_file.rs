//! The file under the index: redb's own file backend, with the fsync that
//! redb issues after growing the file deferred to where it matters.
//!
//! redb makes a larger file durable before anything can record the larger
//! layout: `grow()` extends the file and calls `sync_data` at once, because
//! a header carrying the new layout that reached the disk without the new
//! length would make every later open fail ("file truncated below stored
//! layout"). The layout reaches the disk only in the database header, which
//! redb writes at offset 0. So this backend skips a `sync_data` that comes
//! straight after an extension, with no write between, and syncs instead
//! before the next write that touches the header (any other `sync_data`
//! also makes the length durable): the header still never lands before the
//! length is durable, which is the ordering redb asks for.
//!
//! Why: on ext4 every `fdatasync` sends the device a cache flush, and while
//! an ingest's direct writes are in flight that flush waits for all of them
//! to be persisted. A 4 GiB add into a fresh store grows the index about ten
//! times (redb doubles a small file); each grow stalled the data writes for
//! up to 1.7 s here (`iostat`: `f_await` 1551-1739 ms with no writes done
//! meanwhile), while the unsynced row transactions that grow it need no
//! durability of their own until the seal's durable commit.

use std::ops::Bound;
use std::sync::Mutex;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The database header lives in the file's first bytes; any write below
/// this offset is treated as a header write (a wider range only costs an
/// earlier sync, never a missed one).
const HEADER_BYTES: u64 = 4096;

#[derive(Debug)]
pub(crate) struct IndexFile<B = FileBackend> {
    inner: B,
    state: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// The file was extended and that is not yet durable.
    grown: bool,
    /// The last call was that extension: a `sync_data` now is redb's sync
    /// after growing.
    just_grown: bool,
}

impl<B: StorageBackend> IndexFile<B> {
    pub(crate) fn new(inner: B) -> Self {
        IndexFile {
            inner,
            state: Mutex::new(Pending::default()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The state is two flags; a panic elsewhere cannot leave them torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sync_now(&self, pending: &mut Pending) -> Result<(), std::io::Error> {
        self.inner.sync_data()?;
        *pending = Pending::default();
        Ok(())
    }
}

impl<B: StorageBackend> StorageBackend for IndexFile<B> {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut pending = self.pending();
        let grows = len > self.inner.len()?;
        if !grows && pending.grown {
            // A shrink is made durable by redb after its smaller layout is;
            // keep the order simple: whatever grew is durable first.
            self.sync_now(&mut pending)?;
        }
        self.inner.set_len(len)?;
        pending.grown |= grows;
        pending.just_grown = grows;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut pending = self.pending();
        if pending.just_grown {
            // The sync right after a grow: deferred (module docs).
            return Ok(());
        }
        self.sync_now(&mut pending)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut pending = self.pending();
        if pending.grown && offset < HEADER_BYTES {
            self.sync_now(&mut pending)?;
        }
        pending.just_grown = false;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        let mut pending = self.pending();
        if pending.grown {
            self.sync_now(&mut pending)?;
        }
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory backend that logs what reaches it.
    #[derive(Debug, Default)]
    struct Logged {
        bytes: Mutex<Vec<u8>>,
        log: Mutex<Vec<String>>,
    }

    impl Logged {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.log.lock().unwrap())
        }
    }

    impl StorageBackend for Logged {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            let b = self.bytes.lock().unwrap();
            out.copy_from_slice(&b[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.bytes.lock().unwrap().resize(len as usize, 0);
            self.log.lock().unwrap().push(format!("set_len {len}"));
            Ok(())
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.log.lock().unwrap().push("sync".into());
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            let mut b = self.bytes.lock().unwrap();
            b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            self.log.lock().unwrap().push(format!("write {offset}"));
            Ok(())
        }
    }

    #[test]
    fn a_grow_is_durable_before_the_header_is_written() {
        let f = IndexFile::new(Logged::default());
        f.set_len(1 << 20).unwrap();
        f.sync_data().unwrap(); // redb's sync after growing: deferred
        f.write(1 << 16, &[1; 8]).unwrap();
        f.write(1 << 17, &[2; 8]).unwrap();
        assert_eq!(
            f.inner.take(),
            ["set_len 1048576", "write 65536", "write 131072"]
        );
        f.write(0, &[3; 8]).unwrap(); // the header: the length goes first
        assert_eq!(f.inner.take(), ["sync", "write 0"]);
        f.sync_data().unwrap(); // a commit's flush is never skipped
        assert_eq!(f.inner.take(), ["sync"]);
        f.write(0, &[4; 8]).unwrap(); // nothing pending: no extra sync
        assert_eq!(f.inner.take(), ["write 0"]);
    }

    #[test]
    fn every_grow_sync_is_deferred_until_the_header() {
        let f = IndexFile::new(Logged::default());
        for len in [1 << 20, 1 << 21] {
            f.set_len(len).unwrap();
            f.sync_data().unwrap();
            f.write(len / 2, &[1; 8]).unwrap();
        }
        assert_eq!(
            f.inner.take(),
            [
                "set_len 1048576",
                "write 524288",
                "set_len 2097152",
                "write 1048576"
            ]
        );
        f.write(100, &[2; 8]).unwrap();
        assert_eq!(f.inner.take(), ["sync", "write 100"]);
    }

    #[test]
    fn a_sync_after_writes_is_real_and_clears_the_grow() {
        let f = IndexFile::new(Logged::default());
        f.set_len(1 << 20).unwrap();
        f.write(8192, &[1; 8]).unwrap();
        f.sync_data().unwrap();
        f.write(0, &[2; 8]).unwrap();
        assert_eq!(
            f.inner.take(),
            ["set_len 1048576", "write 8192", "sync", "write 0"]
        );
    }

    #[test]
    fn a_shrink_or_close_makes_a_pending_grow_durable_first() {
        let f = IndexFile::new(Logged::default());
        f.set_len(1 << 20).unwrap();
        f.sync_data().unwrap();
        f.set_len(1 << 19).unwrap();
        assert_eq!(
            f.inner.take(),
            ["set_len 1048576", "sync", "set_len 524288"]
        );
        f.set_len(1 << 20).unwrap();
        f.sync_data().unwrap();
        f.close().unwrap();
        assert_eq!(f.inner.take(), ["set_len 1048576", "sync"]);
    }
}
