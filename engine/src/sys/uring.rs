//! The io_uring backend's writer, run on a dedicated engine thread.
//!
//! Creating a [`UringWriter`] is the probe: it sets up a ring *and registers
//! the slab pool's buffers*, the two steps that fail where io_uring cannot
//! serve us (EPERM from seccomp or `kernel.io_uring_disabled`, ENOSYS under
//! qemu-user or old kernels, ENOMEM under a small memlock limit).
//!
//! Every submitted write holds a clone of its [`Slab`] in `in_flight` until
//! its completion is reaped, so the kernel never reads a slab that has gone
//! back to the pool.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};

use super::pool::{Slab, SlabPool};

struct InFlight {
    slab: Slab,
    fd: RawFd,
    offset: u64,
    done: usize,
    total: usize,
}

pub struct UringWriter {
    ring: IoUring,
    _pool: Arc<SlabPool>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    error: Option<io::Error>,
}

impl std::fmt::Debug for UringWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UringWriter({} in flight)", self.in_flight())
    }
}

impl UringWriter {
    pub fn new(pool: &Arc<SlabPool>) -> io::Result<Self> {
        let entries = (pool.count() as u32).next_power_of_two().max(8);
        let ring = IoUring::new(entries)?;
        let iovecs: Vec<libc::iovec> = pool
            .regions()
            .into_iter()
            .map(|(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: the pool's buffers live until the pool is dropped, and the
        // writer holds an Arc to the pool, so they outlive the registration
        // (which ends when the ring is dropped, before `_pool`).
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        Ok(UringWriter {
            ring,
            _pool: Arc::clone(pool),
            slots: (0..pool.count()).map(|_| None).collect(),
            free: (0..pool.count()).rev().collect(),
            error: None,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a write of `slab.padded(len)` at `offset` of `fd`. `fd` must
    /// stay open until [`UringWriter::drain`] returns.
    pub fn write(&mut self, fd: RawFd, slab: Slab, len: usize, offset: u64) -> io::Result<()> {
        while self.free.is_empty() {
            self.reap(1)?;
        }
        let slot = self.free.pop().expect("checked non-empty");
        self.slots[slot] = Some(InFlight {
            slab,
            fd,
            offset,
            done: 0,
            total: len,
        });
        self.submit_slot(slot)?;
        self.take_error()
    }

    fn submit_slot(&mut self, slot: usize) -> io::Result<()> {
        let op = self.slots[slot].as_ref().expect("slot in use");
        let buf = op.slab.padded(op.total);
        let entry = opcode::WriteFixed::new(
            types::Fd(op.fd),
            buf[op.done..].as_ptr(),
            (op.total - op.done) as u32,
            op.slab.index() as u16,
        )
        .offset(op.offset + op.done as u64)
        .build()
        .user_data(slot as u64);
        // SAFETY: the buffer belongs to a registered slab kept alive by the
        // `Slab` clone in `slots[slot]` until the completion is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
        }
        self.ring.submit()?;
        Ok(())
    }

    fn reap(&mut self, want: usize) -> io::Result<()> {
        self.ring.submit_and_wait(want)?;
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in completions {
            let slot = slot as usize;
            let op = self.slots[slot]
                .as_mut()
                .expect("completion for a live slot");
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                if err.kind() == io::ErrorKind::Interrupted {
                    self.submit_slot(slot)?;
                    continue;
                }
                self.error.get_or_insert(err);
            } else if res == 0 && op.done < op.total {
                self.error
                    .get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
            } else {
                op.done += res as usize;
                if op.done < op.total {
                    self.submit_slot(slot)?;
                    continue;
                }
            }
            self.slots[slot] = None;
            self.free.push(slot);
        }
        Ok(())
    }

    /// Waits for at least one queued write to complete and releases its slab.
    pub fn reap_one(&mut self) -> io::Result<()> {
        if self.in_flight() > 0 {
            self.reap(1)?;
        }
        self.take_error()
    }

    fn take_error(&mut self) -> io::Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for every queued write; reports the first failure.
    pub fn drain(&mut self) -> io::Result<()> {
        while self.in_flight() > 0 {
            self.reap(1)?;
        }
        self.take_error()
    }
}

impl Drop for UringWriter {
    fn drop(&mut self) {
        // Buffers must not return to the pool while the kernel may read them.
        let _ = self.drain();
    }
}
