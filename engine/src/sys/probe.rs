//! What this platform offers the engine, as plain facts for `envoy status`
//! and (later) the envoy's traits. Probing never fails: an unreadable fact is
//! reported as unknown.

/// Facts found by [`platform`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformFacts {
    pub os: &'static str,
    pub arch: &'static str,
    /// Kernel release (`uname -r`), when readable.
    pub kernel: Option<String>,
    /// io_uring opcodes the engine uses that the kernel supports; `None`
    /// when no ring could be set up in this process.
    pub uring_opcodes: Option<Vec<&'static str>>,
    /// Why no ring could be set up, when it could not.
    pub uring_error: Option<String>,
    /// Whether the kernel TLS upper-layer protocol is available (it is
    /// reported only; no kTLS data path ships until a machine can test it).
    pub ktls: bool,
    /// The SIMD implementation BLAKE3 uses on this CPU.
    pub blake3_simd: &'static str,
}

pub fn platform() -> PlatformFacts {
    let kernel = nix::sys::utsname::uname()
        .ok()
        .map(|u| u.release().to_string_lossy().into_owned());
    let (uring_opcodes, uring_error) = uring_opcodes();
    PlatformFacts {
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        kernel,
        uring_opcodes,
        uring_error,
        ktls: ktls_available(),
        blake3_simd: blake3_simd(),
    }
}

/// Mirrors the blake3 crate's runtime dispatch (AVX-512 needs F and VL).
fn blake3_simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
        if std::arch::is_x86_feature_detected!("sse4.1") {
            return "sse41";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable"
    }
}

#[cfg(target_os = "linux")]
fn uring_opcodes() -> (Option<Vec<&'static str>>, Option<String>) {
    use io_uring::{IoUring, Probe, opcode};
    let ring = match IoUring::new(2) {
        Ok(r) => r,
        Err(e) => return (None, Some(e.to_string())),
    };
    let mut probe = Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return (None, Some(format!("opcode probe: {e}")));
    }
    let wanted: [(&'static str, u8); 7] = [
        ("READ_FIXED", opcode::ReadFixed::CODE),
        ("WRITE_FIXED", opcode::WriteFixed::CODE),
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("SPLICE", opcode::Splice::CODE),
        ("SEND_ZC", opcode::SendZc::CODE),
    ];
    let supported = wanted
        .iter()
        .filter(|(_, code)| probe.is_supported(*code))
        .map(|(name, _)| *name)
        .collect();
    (Some(supported), None)
}

#[cfg(not(target_os = "linux"))]
fn uring_opcodes() -> (Option<Vec<&'static str>>, Option<String>) {
    (None, Some(super::uring::UNAVAILABLE.to_string()))
}

fn ktls_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .map(|s| s.split_whitespace().any(|u| u == "tls"))
            .unwrap_or(false)
            || std::path::Path::new("/sys/module/tls").exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}
