//! `envoy.yaml`: the daemon's configuration. Every field has a documented
//! default, so `envoy run` with no file starts a local try-out (listening on
//! port 1531, admitting no peer: default deny).
//!
//! ```yaml
//! state_dir: /var/lib/vigo          # host key, control socket, default store
//! store: /var/lib/vigo/store        # default: <state_dir>/store
//! listen: 0.0.0.0:1531              # envoy-to-envoy mTLS
//! control_socket: /var/lib/vigo/envoy.sock   # default: <state_dir>/envoy.sock
//! peers:
//!   allow: ["ed25519:<64 hex>"]     # host keys admitted (default: none)
//! limits:                           # all optional, defaults below
//!   credit_bytes: 33554432          # bytes a peer may have requested and not received
//!   requests_in_flight_max: 16
//!   requests_per_s: 2000
//!   connections_per_peer: 8          # per peer key, inbound and dialed together
//!   fetch_connections: 2             # a fetch's connections, spread over its sources (one each at least)
//!   connections_total: 256
//!   handshake_timeout_ms: 10000
//!   idle_timeout_ms: 120000
//!   reserve_bytes: 1073741824       # free space kept beyond a fetched blob or an added file
//! rate:
//!   upload_bytes_per_s: null        # token bucket over all peers; null = unlimited
//!   upload_burst_bytes: null        # its burst; null = half a second of the rate, at least 4 MiB
//!   download_bytes_per_s: null      # token bucket per fetch; null = unlimited
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::identity::PeerKey;

/// The default port of envoy-to-envoy traffic.
pub const DEFAULT_PORT: u16 = 1531;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub state_dir: PathBuf,
    pub store: Option<PathBuf>,
    pub listen: SocketAddr,
    pub control_socket: Option<PathBuf>,
    pub peers: Peers,
    pub limits: Limits,
    pub rate: Rate,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Peers {
    /// Host keys admitted, as `ed25519:<hex>`.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub credit_bytes: u64,
    pub requests_in_flight_max: u32,
    pub requests_per_s: u64,
    pub connections_per_peer: u32,
    /// Connections a fetch opens in all, spread over its sources (at least
    /// one each; requests to a source go round robin over its
    /// connections), so a transfer from one source is not bound to one TLS
    /// stream (one reader task, one sender task). Measured on a 16-core
    /// machine (4 GiB from one source): one stream ~0.7 GB/s with no thread
    /// busy more than ~55%, two 0.86-0.91 GB/s. Three sources are three
    /// streams already: more cost memory and CPU on a small receiver.
    pub fetch_connections: u32,
    pub connections_total: u32,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    /// Free space every new blob in the daemon's store must leave (a fetch,
    /// a `store add` through the daemon): `StoreOptions::reserve_bytes`.
    pub reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let serve = substrate::serve::ServeLimits::DEFAULT;
        Limits {
            credit_bytes: serve.credit_bytes,
            requests_in_flight_max: serve.requests_in_flight_max,
            requests_per_s: serve.requests_per_s,
            connections_per_peer: 8,
            fetch_connections: 2,
            connections_total: 256,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            reserve_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rate {
    pub upload_bytes_per_s: Option<u64>,
    /// Burst of the upload bucket: what a source may send at once after
    /// idling. Default half a second of the rate (at least 4 MiB): with
    /// 4 MiB (~43 ms at 96 MB/s) every pause of the receiver was capacity
    /// lost for good (three sources capped at 96 MB/s each, 4 GiB on two
    /// cores: 19.4-20.1 s, with half a second 18.7-19.1 s).
    pub upload_burst_bytes: Option<u64>,
    pub download_bytes_per_s: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            store: None,
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            control_socket: None,
            peers: Peers::default(),
            limits: Limits::default(),
            rate: Rate::default(),
        }
    }
}

/// `/var/lib/vigo` for root, else `$XDG_DATA_HOME/vigo` (`~/.local/share/vigo`).
pub fn default_state_dir() -> PathBuf {
    if engine::sys::current_uid() == 0 {
        return PathBuf::from("/var/lib/vigo");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vigo");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/vigo")
}

impl Config {
    /// Reads `path`; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config: Config = yaml_serde::from_str(&text)
            .with_context(|| format!("invalid config {}", path.display()))?;
        if config.state_dir.is_relative() {
            // Relative paths in a config file are relative to the file.
            let base = path.parent().unwrap_or(Path::new("."));
            config.state_dir = base.join(&config.state_dir);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.allowed_keys()?;
        self.serve_limits()?;
        if self.limits.connections_per_peer == 0 || self.limits.connections_total == 0 {
            bail!("limits.connections_per_peer and limits.connections_total must be positive");
        }
        if !(1..=16).contains(&self.limits.fetch_connections) {
            bail!("limits.fetch_connections must be 1 to 16");
        }
        if self.limits.handshake_timeout_ms == 0 || self.limits.idle_timeout_ms == 0 {
            bail!("limits.handshake_timeout_ms and limits.idle_timeout_ms must be positive");
        }
        if self.rate.upload_bytes_per_s == Some(0) || self.rate.download_bytes_per_s == Some(0) {
            bail!("a rate of 0 bytes/s would never finish; leave it out for no limit");
        }
        if self.rate.upload_burst_bytes == Some(0) {
            bail!("rate.upload_burst_bytes must be positive; leave it out for the default");
        }
        Ok(())
    }

    pub fn store_dir(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| self.state_dir.join("store"))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("envoy.sock"))
    }

    pub fn allowed_keys(&self) -> Result<Vec<PeerKey>> {
        self.peers
            .allow
            .iter()
            .map(|k| {
                k.parse::<PeerKey>()
                    .map_err(|e| anyhow::anyhow!("peers.allow: {k:?}: {e}"))
            })
            .collect()
    }

    pub fn serve_limits(&self) -> Result<substrate::serve::ServeLimits> {
        let limits = substrate::serve::ServeLimits {
            credit_bytes: self.limits.credit_bytes,
            requests_in_flight_max: self.limits.requests_in_flight_max,
            requests_per_s: self.limits.requests_per_s,
            // The daemon applies `rate.upload_bytes_per_s` to all
            // connections together (one bucket), not per connection.
            upload_bytes_per_s: None,
            ..substrate::serve::ServeLimits::DEFAULT
        };
        limits
            .validate()
            .map_err(|e| anyhow::anyhow!("limits: {e}"))?;
        Ok(limits)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.idle_timeout_ms)
    }
}
