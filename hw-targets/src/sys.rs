//! Platform code of the matrix (Linux only; elsewhere each item reports
//! that it is unsupported):
//!
//! - [`refuse_uring`]: a seccomp filter on this process (inherited by
//!   everything it execs or spawns) that fails the io_uring system calls
//!   with a chosen errno, as a container runtime's profile does.
//! - [`UringDisabled`]: the system-wide `kernel.io_uring_disabled` switch,
//!   held by a guard that restores the previous value when dropped (normal
//!   exit, error, panic) and notes SIGINT/SIGTERM/SIGHUP instead of dying
//!   from them, so the matrix can restore it and then exit. The previous
//!   value is also written to a file first, so a run killed by SIGKILL is
//!   repaired by the next one ([`restore_leftover`]).

/// The system calls io_uring adds; refusing all three refuses io_uring.
pub const URING_SYSCALLS: [&str; 3] = ["io_uring_setup", "io_uring_enter", "io_uring_register"];

#[cfg(target_os = "linux")]
pub use linux::*;
#[cfg(not(target_os = "linux"))]
pub use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::fs;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicI32, Ordering};

    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

    /// Makes the io_uring system calls fail with `errno` in this process and
    /// every process it starts from now on. Allows everything else.
    pub fn refuse_uring(errno: i32) -> Result<(), String> {
        let rules = [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ]
        .into_iter()
        .map(|nr| (nr, vec![]))
        .collect();
        let arch = if cfg!(target_arch = "x86_64") {
            TargetArch::x86_64
        } else if cfg!(target_arch = "aarch64") {
            TargetArch::aarch64
        } else if cfg!(target_arch = "riscv64") {
            TargetArch::riscv64
        } else {
            return Err(format!(
                "seccompiler has no filters for {}",
                std::env::consts::ARCH
            ));
        };
        let errno = u32::try_from(errno).map_err(|_| format!("bad errno {errno}"))?;
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(|e| format!("cannot build the seccomp filter: {e}"))?;
        let program: seccompiler::BpfProgram = filter
            .try_into()
            .map_err(|e| format!("cannot compile the seccomp filter: {e}"))?;
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| format!("cannot install the seccomp filter: {e}"))
    }

    const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
    const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

    /// The last of [`SIGNALS`] received while a guard was held; 0 for none.
    static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn note_signal(signal: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        INTERRUPTED.store(signal, Ordering::SeqCst);
    }

    /// A signal that asked the matrix to stop while the switch was set.
    pub fn interrupted() -> Option<i32> {
        match INTERRUPTED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// `kernel.io_uring_disabled` set to a value until this is dropped.
    #[derive(Debug)]
    pub struct UringDisabled {
        previous: String,
        saved: PathBuf,
        handlers: Vec<(libc::c_int, libc::sighandler_t)>,
    }

    impl UringDisabled {
        /// Records the current value in `saved`, then sets `value` (0 allows
        /// io_uring, 1 allows it to the io_uring_group, 2 refuses it to all).
        pub fn set(value: u8, saved: &Path) -> io::Result<Self> {
            let previous = fs::read_to_string(SYSCTL)?.trim().to_string();
            if let Some(dir) = saved.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(saved, &previous)?;
            let handlers = SIGNALS
                .iter()
                // SAFETY: `note_signal` only stores to an atomic, which is
                // async-signal-safe; the previous handler is kept to be put back.
                .map(|&s| {
                    (s, unsafe {
                        libc::signal(s, note_signal as *const () as libc::sighandler_t)
                    })
                })
                .collect();
            let guard = UringDisabled {
                previous,
                saved: saved.to_path_buf(),
                handlers,
            };
            fs::write(SYSCTL, value.to_string())?;
            Ok(guard)
        }

        pub fn previous(&self) -> &str {
            &self.previous
        }
    }

    impl Drop for UringDisabled {
        fn drop(&mut self) {
            match fs::write(SYSCTL, &self.previous) {
                Ok(()) => {
                    let _ = fs::remove_file(&self.saved);
                }
                Err(e) => eprintln!(
                    "hw-targets: could not restore {SYSCTL} to {}: {e}; \
                     the next matrix run restores it from {}",
                    self.previous,
                    self.saved.display()
                ),
            }
            for &(s, h) in &self.handlers {
                // SAFETY: puts back the handler `signal` returned in `set`.
                unsafe { libc::signal(s, h) };
            }
        }
    }

    /// Restores a value a killed run left in `saved`; returns it.
    pub fn restore_leftover(saved: &Path) -> io::Result<Option<String>> {
        let previous = match fs::read_to_string(saved) {
            Ok(p) => p.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        fs::write(SYSCTL, &previous)?;
        fs::remove_file(saved)?;
        Ok(Some(previous))
    }

    /// Whether this kernel has the switch (Linux 6.6+).
    pub fn uring_switch_exists() -> bool {
        Path::new(SYSCTL).exists()
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;
    use std::path::Path;

    const UNSUPPORTED: &str = "io_uring and its refusal exist only on Linux";

    pub fn refuse_uring(_errno: i32) -> Result<(), String> {
        Err(UNSUPPORTED.to_string())
    }

    pub fn interrupted() -> Option<i32> {
        None
    }

    #[derive(Debug)]
    pub struct UringDisabled;

    impl UringDisabled {
        pub fn set(_value: u8, _saved: &Path) -> io::Result<Self> {
            Err(io::Error::new(io::ErrorKind::Unsupported, UNSUPPORTED))
        }

        pub fn previous(&self) -> &str {
            ""
        }
    }

    pub fn restore_leftover(_saved: &Path) -> io::Result<Option<String>> {
        Ok(None)
    }

    pub fn uring_switch_exists() -> bool {
        false
    }
}

/// Parses an errno name the way `vigo-noring --errno` takes it.
pub fn errno_from_name(name: &str) -> Option<i32> {
    match name {
        "EPERM" => Some(libc::EPERM),
        "ENOSYS" => Some(libc::ENOSYS),
        "EACCES" => Some(libc::EACCES),
        "ENOMEM" => Some(libc::ENOMEM),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names() {
        assert_eq!(errno_from_name("EPERM"), Some(libc::EPERM));
        assert_eq!(errno_from_name("ENOSYS"), Some(libc::ENOSYS));
        assert_eq!(errno_from_name("eperm"), None);
        assert_eq!(errno_from_name("1"), None);
    }
}
