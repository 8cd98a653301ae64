//! `vigo-noring --errno EPERM|ENOSYS -- CMD ARGS...`: runs CMD with io_uring
//! refused to it and to everything it starts, the way a container's seccomp
//! profile (EPERM) or an old kernel or emulator (ENOSYS) refuses it. Every
//! other system call is allowed. Exits 125 when the filter cannot be
//! installed, 126/127 when CMD cannot be run, else CMD replaces this process.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use clap::Parser;
use hw_targets::sys;

#[derive(Parser, Debug)]
#[command(
    name = "vigo-noring",
    about = "Run a command with io_uring refused (seccomp: io_uring_setup, io_uring_enter and io_uring_register fail with ERRNO)"
)]
struct Args {
    /// The errno the io_uring system calls fail with: EPERM (seccomp
    /// profile, kernel.io_uring_disabled) or ENOSYS (old kernel, qemu-user).
    #[arg(long, value_parser = parse_errno)]
    errno: i32,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn parse_errno(s: &str) -> Result<i32, String> {
    sys::errno_from_name(s).ok_or_else(|| format!("unknown errno {s:?}: expected EPERM or ENOSYS"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = sys::refuse_uring(args.errno) {
        eprintln!("vigo-noring: {e}");
        return ExitCode::from(125);
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    // `exec` returns only on failure.
    let e = Command::new(program).args(rest).exec();
    eprintln!("vigo-noring: cannot run {}: {e}", program.to_string_lossy());
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
