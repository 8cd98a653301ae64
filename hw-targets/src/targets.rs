//! The targets of the matrix and what each needs installed. The linkers,
//! runners and C compilers themselves are named in `.cargo/config.toml`,
//! so plain `cargo` commands work too; [`Target::runner`] repeats the runner
//! for the commands the matrix runs itself (a test checks the two agree).

use std::path::Path;

/// The host every other row is measured against.
pub const HOST: &str = "x86_64-unknown-linux-gnu";

/// How far a target can be taken on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Built and run natively.
    Native,
    /// Cross-built; run under qemu-user.
    Emulated,
    /// `cargo check` only: no linker or runner for it here.
    Check,
}

/// Something a target needs, how to tell it is there, and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub probe: Probe,
    /// Debian package that provides it.
    pub apt: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A command on `PATH`.
    Command(&'static str),
    /// A file (headers and libraries of a cross sysroot).
    File(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub triple: &'static str,
    pub reach: Reach,
    pub needs: &'static [Requirement],
    /// For emulated targets: the command test binaries run under.
    pub runner: Option<&'static str>,
}

const fn cmd(name: &'static str, apt: &'static str) -> Requirement {
    Requirement {
        probe: Probe::Command(name),
        apt,
    }
}

const fn file(path: &'static str, apt: &'static str) -> Requirement {
    Requirement {
        probe: Probe::File(path),
        apt,
    }
}

pub const TARGETS: &[Target] = &[
    Target {
        triple: HOST,
        reach: Reach::Native,
        needs: &[],
        runner: None,
    },
    Target {
        triple: "aarch64-unknown-linux-gnu",
        reach: Reach::Emulated,
        needs: &[
            cmd("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            file(
                "/usr/aarch64-linux-gnu/lib/libc.so.6",
                "libc6-dev-arm64-cross",
            ),
            file(
                "/usr/aarch64-linux-gnu/include/stdio.h",
                "libc6-dev-arm64-cross",
            ),
            cmd("qemu-aarch64", "qemu-user"),
        ],
        runner: Some("qemu-aarch64 -L /usr/aarch64-linux-gnu"),
    },
    Target {
        triple: "riscv64gc-unknown-linux-gnu",
        reach: Reach::Emulated,
        needs: &[
            cmd("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
            file(
                "/usr/riscv64-linux-gnu/lib/libc.so.6",
                "libc6-dev-riscv64-cross",
            ),
            file(
                "/usr/riscv64-linux-gnu/include/stdio.h",
                "libc6-dev-riscv64-cross",
            ),
            cmd("qemu-riscv64", "qemu-user"),
        ],
        runner: Some("qemu-riscv64 -L /usr/riscv64-linux-gnu"),
    },
    Target {
        triple: "x86_64-apple-darwin",
        reach: Reach::Check,
        // hw-targets/toolchain/darwin-x86_64-cc lends clang the host's glibc
        // headers (ring's C includes <stdint.h> and <string.h>).
        needs: &[
            cmd("clang", "clang"),
            file(
                "/usr/include/x86_64-linux-gnu/bits/libc-header-start.h",
                "libc6-dev",
            ),
        ],
        runner: None,
    },
    Target {
        triple: "aarch64-apple-darwin",
        reach: Reach::Check,
        // hw-targets/toolchain/darwin-arm64-cc lends clang these headers.
        needs: &[
            cmd("clang", "clang"),
            file(
                "/usr/aarch64-linux-gnu/include/stdio.h",
                "libc6-dev-arm64-cross",
            ),
        ],
        runner: None,
    },
    Target {
        triple: "x86_64-unknown-freebsd",
        reach: Reach::Check,
        // CFLAGS_x86_64_unknown_freebsd adds the host's glibc multiarch headers.
        needs: &[
            cmd("clang", "clang"),
            file(
                "/usr/include/x86_64-linux-gnu/bits/libc-header-start.h",
                "libc6-dev",
            ),
        ],
        runner: None,
    },
];

/// Targets `--quick` covers: what `.ci/run` affords.
pub const QUICK: &[&str] = &[
    HOST,
    "aarch64-unknown-linux-gnu",
    "x86_64-apple-darwin",
    "aarch64-apple-darwin",
    "x86_64-unknown-freebsd",
];

pub fn find(triple: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.triple == triple)
}

/// Whether `probe` finds its thing on this machine.
pub fn present(probe: Probe) -> bool {
    match probe {
        Probe::File(path) => Path::new(path).exists(),
        Probe::Command(name) => std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file())),
    }
}

/// The runner split the way cargo and `VIGO_TEST_RUNNER` split it.
pub fn runner_argv(runner: &str) -> Vec<String> {
    runner.split_whitespace().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_toml_names_the_same_runners() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cargo/config.toml");
        let config = std::fs::read_to_string(&config).expect("read .cargo/config.toml");
        for t in TARGETS.iter().filter(|t| t.reach == Reach::Emulated) {
            let section = format!("[target.{}]", t.triple);
            let at = config
                .find(&section)
                .unwrap_or_else(|| panic!("no {section}"));
            let body = &config[at + section.len()..];
            let body = &body[..body.find("\n[").unwrap_or(body.len())];
            let runner = format!("runner = \"{}\"", t.runner.unwrap());
            assert!(body.contains(&runner), "{section} lacks {runner}");
        }
    }

    #[test]
    fn quick_targets_exist_and_emulated_ones_have_runners() {
        for q in QUICK {
            assert!(find(q).is_some(), "{q}");
        }
        for t in TARGETS {
            assert_eq!(
                t.runner.is_some(),
                t.reach == Reach::Emulated,
                "{}",
                t.triple
            );
        }
        assert_eq!(
            runner_argv("qemu-aarch64 -L /usr/aarch64-linux-gnu"),
            ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
        );
    }

    #[test]
    fn probes() {
        assert!(present(Probe::File("/")));
        assert!(!present(Probe::File("/nonexistent/vigo")));
        assert!(present(Probe::Command("sh")));
        assert!(!present(Probe::Command("vigo-no-such-command")));
    }
}
