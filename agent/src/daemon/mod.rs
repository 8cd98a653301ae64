//! `envoy run`: the long-running daemon. It owns the store, serves it to
//! peers over mTLS (port 1531 by default) and takes commands from local
//! users on a Unix control socket.
//!
//! # Shape
//! - [`Daemon`]: shared state (store, host key, TLS configs, limits, the
//!   cache of served blobs, connection counts).
//! - `conn`: one task pair per peer connection (reader: decode, verify and
//!   write received chunks, route answers to a fetch; writer: serve
//!   requests through `substrate::serve::Uploader`, send frames).
//! - `fetch`: one task per `envoy fetch`, driving `substrate::sched`.
//! - `control`: the control socket server (one task per client).
//!
//! - `intake`: received chunks, verified and written in batches on the
//!   blocking pool while the connection's reader decrypts the next ones.
//!
//! Store calls block (redb, fsync, hashing and writing received data): they
//! run on tokio's blocking pool.

mod conn;
mod control_server;
mod fetch;
mod intake;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use engine::hash::BlobId;
use engine::store::{BlobReader, Store, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::identity::{HostKey, PeerKey};
use crate::tls::{self, AllowList, PeerVerifier};

pub use fetch::FetchOutcome;

/// `store add` / `store assemble` requests the daemon runs at once; more
/// wait their turn (see `Daemon::inputs`).
const INPUT_COMMANDS_MAX: usize = 4;

/// Least default burst of the daemon-wide upload bucket (see
/// `rate.upload_burst_bytes`).
const UPLOAD_BURST_BYTES: u64 = 4 << 20;

/// Decoded manifest pages kept per served blob: admission (first and last
/// chunk of a run) and sending look chunks up in the same few pages.
const SERVED_PAGES_CACHED: usize = 4;

/// A sealed blob being served: its map and the manifest pages in use, shared
/// by every connection's admission and sending (each page is read from the
/// index and hash-checked once, not once per request and again per chunk).
pub(crate) struct Served {
    pub reader: BlobReader,
    pages: engine::store::PageCache,
}

impl Served {
    /// Manifest entry of chunk `index`; `None` beyond the blob or when its
    /// page cannot be read.
    pub(crate) fn entry(&self, store: &Store, index: u64) -> Option<engine::manifest::ChunkEntry> {
        let r = &self.reader;
        self.pages.entry(store, r.id(), r.root(), index).ok()?
    }
}

/// State shared by every task of the daemon.
pub struct Daemon {
    pub config: Config,
    pub store: Arc<Store>,
    pub host: PeerKey,
    pub listen: SocketAddr,
    server_tls: Arc<rustls::ServerConfig>,
    client_tls: Arc<rustls::ClientConfig>,
    /// Sealed blobs being served, mapped once and shared by connections.
    served: Mutex<HashMap<BlobId, Arc<Served>>>,
    conns_total: AtomicU32,
    conns_by_peer: Mutex<HashMap<PeerKey, u32>>,
    /// Blobs being fetched (one fetch per blob at a time).
    fetching: Mutex<std::collections::HashSet<BlobId>>,
    /// `store add` / `store assemble` requests running at once: each reads
    /// a file a client handed over on a blocking thread (a FUSE file can
    /// block that thread), so no client may take them all.
    pub(crate) inputs: tokio::sync::Semaphore,
    shutdown: watch::Receiver<bool>,
    /// `rate.upload_bytes_per_s`, shared by every connection.
    upload: Option<Mutex<substrate::rate::TokenBucket>>,
    /// The clock `upload` runs on.
    epoch: std::time::Instant,
    pub stats: Stats,
}

/// Counters reported by `envoy status`.
#[derive(Default)]
pub struct Stats {
    pub bytes_served: AtomicU64,
    pub chunks_served: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub fetches_started: AtomicU64,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Daemon({}, {})", self.host, self.listen)
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config, io: engine::io::IoMode) -> Result<()> {
    crate::sys::limit_heap_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("envoy")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(config, io))
}

async fn run_async(config: Config, io: engine::io::IoMode) -> Result<()> {
    let host_key = HostKey::load_or_create(&config.state_dir)?;
    let host = host_key.public();
    let store_dir = config.store_dir();
    let store = Store::open(
        &store_dir,
        StoreOptions {
            io,
            reserve_bytes: config.limits.reserve_bytes,
            ..StoreOptions::default()
        },
    )
    .with_context(|| format!("cannot open store at {}", store_dir.display()))?;
    let store = Arc::new(store);
    let verifier: Arc<dyn PeerVerifier> = Arc::new(AllowList::new(config.allowed_keys()?));
    let server_tls = tls::server_config(&host_key, verifier.clone())?;
    let client_tls = tls::client_config(&host_key, verifier)?;

    let socket_path = config.control_socket();
    let control = control_server::bind(&socket_path)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let listen = listener.local_addr()?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        store,
        host,
        listen,
        server_tls,
        client_tls,
        served: Mutex::new(HashMap::new()),
        conns_total: AtomicU32::new(0),
        conns_by_peer: Mutex::new(HashMap::new()),
        fetching: Mutex::new(Default::default()),
        inputs: tokio::sync::Semaphore::new(INPUT_COMMANDS_MAX),
        shutdown,
        upload: config.rate.upload_bytes_per_s.map(|rate| {
            Mutex::new(substrate::rate::TokenBucket::new(
                substrate::Timestamp::ZERO,
                rate,
                config
                    .rate
                    .upload_burst_bytes
                    .unwrap_or((rate / 2).max(UPLOAD_BURST_BYTES)),
            ))
        }),
        epoch: std::time::Instant::now(),
        stats: Stats::default(),
        config,
    });
    tracing::info!(
        "envoy {host} listening on {listen}, control socket {}, store {}, io {}",
        socket_path.display(),
        store_dir.display(),
        daemon.store.io_selection().backend
    );
    let peers = tokio::spawn(accept_loop(Arc::clone(&daemon), listener));
    let controls = tokio::spawn(control_server::serve(Arc::clone(&daemon), control));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    peers.abort();
    controls.abort();
    // Give connections a moment to send Close and fetches to commit what
    // they wrote; whatever is not committed is fetched again next time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn accept_loop(daemon: Arc<Daemon>, listener: TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            let Some(total) = daemon.reserve_total() else {
                tracing::warn!(
                    "refusing connection from {remote}: connections_total ({}) reached",
                    daemon.config.limits.connections_total
                );
                daemon
                    .stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                return;
            };
            let _ = tcp.set_nodelay(true);
            let accepted =
                tls::accept(&daemon.server_tls, tcp, daemon.config.handshake_timeout()).await;
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(_) => {
                    // `tls::accept` logged the reason with the address.
                    daemon
                        .stats
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let Some(slot) = daemon.reserve_peer(peer) else {
                tracing::warn!(
                    "refusing connection from {remote} ({peer}): connections_per_peer ({}) reached",
                    daemon.config.limits.connections_per_peer
                );
                daemon
                    .stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                return;
            };
            daemon
                .stats
                .connections_accepted
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!("peer {peer} connected from {remote}");
            let conn = conn::start(&daemon, stream, peer, remote, None);
            conn.closed().await;
            drop((slot, total));
        });
    }
}

/// A held place among the daemon's connections, given back on drop.
pub(crate) struct Slot {
    daemon: Arc<Daemon>,
    peer: Option<PeerKey>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self.peer {
            None => {
                self.daemon.conns_total.fetch_sub(1, Ordering::Relaxed);
            }
            Some(p) => {
                let mut by_peer = self.daemon.conns_by_peer.lock().expect("poisoned");
                if let Some(n) = by_peer.get_mut(&p) {
                    *n -= 1;
                    if *n == 0 {
                        by_peer.remove(&p);
                    }
                }
            }
        }
    }
}

impl Daemon {
    fn reserve_total(self: &Arc<Self>) -> Option<Slot> {
        let max = self.config.limits.connections_total;
        self.conns_total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            daemon: Arc::clone(self),
            peer: None,
        })
    }

    fn reserve_peer(self: &Arc<Self>, peer: PeerKey) -> Option<Slot> {
        let mut by_peer = self.conns_by_peer.lock().expect("poisoned");
        let n = by_peer.entry(peer).or_insert(0);
        if *n >= self.config.limits.connections_per_peer {
            return None;
        }
        *n += 1;
        Some(Slot {
            daemon: Arc::clone(self),
            peer: Some(peer),
        })
    }

    /// The mapped sealed blob `id`, opened once and shared.
    pub(crate) fn served_blob(&self, id: &BlobId) -> Option<Arc<Served>> {
        if let Some(r) = self.served.lock().expect("poisoned").get(id) {
            return Some(Arc::clone(r));
        }
        let served = Arc::new(Served {
            reader: self.store.open_blob(id).ok()?,
            pages: engine::store::PageCache::new(SERVED_PAGES_CACHED),
        });
        self.served
            .lock()
            .expect("poisoned")
            .insert(*id, Arc::clone(&served));
        Some(served)
    }

    /// When the daemon-wide upload limit allows the next chunk: `None` now.
    pub(crate) fn upload_wait(&self) -> Option<std::time::Instant> {
        let bucket = self.upload.as_ref()?;
        let mut b = bucket.lock().expect("poisoned");
        b.ready_at_from(now(self.epoch))
            .map(|t| instant(self.epoch, t))
    }

    /// Charges `bytes` sent to the daemon-wide upload limit.
    pub(crate) fn upload_sent(&self, bytes: u64) {
        if let Some(bucket) = &self.upload {
            bucket
                .lock()
                .expect("poisoned")
                .charge(now(self.epoch), bytes);
        }
    }

    /// Drops every mapped blob; each is opened (and its state checked)
    /// again on its next request.
    pub(crate) fn forget_all_served(&self) {
        self.served.lock().expect("poisoned").clear();
    }

    /// Stops serving `id` (removed or quarantined).
    pub(crate) fn forget_served(&self, id: &BlobId) {
        self.served.lock().expect("poisoned").remove(id);
    }

    pub(crate) fn shutting_down(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Opens an outbound connection to `addr` for a fetch.
    pub(crate) async fn dial(
        self: &Arc<Self>,
        addr: SocketAddr,
        expect: Option<PeerKey>,
        tap: conn::Tap,
    ) -> Result<conn::ConnHandle> {
        let total = self.reserve_total().with_context(|| {
            format!(
                "connections_total ({}) reached",
                self.config.limits.connections_total
            )
        })?;
        let timeout = self.config.handshake_timeout();
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out after {timeout:?}"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let (stream, peer) = tls::connect(&self.client_tls, tcp, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
        // Checked before the connection starts: nothing another host sends
        // reaches the fetch as if the expected one had sent it.
        if let Some(expected) = expect
            && peer != expected
        {
            bail!("{addr} answered as {peer}, not as {expected}");
        }
        let Some(slot) = self.reserve_peer(peer) else {
            bail!(
                "{addr} ({peer}): connections_per_peer ({}) reached",
                self.config.limits.connections_per_peer
            );
        };
        let handle = conn::start(self, stream, peer, addr, Some(tap));
        handle.hold((slot, total));
        Ok(handle)
    }
}

/// Where the host key and the control socket live by default.
pub fn describe_paths(config: &Config) -> (PathBuf, PathBuf) {
    (config.state_dir.join("host.key"), config.control_socket())
}

/// `envoy status` as the daemon sees itself.
pub(crate) fn status_report(daemon: &Daemon, json: bool) -> String {
    let blobs = daemon.store.list().map(|l| l.len()).unwrap_or(0);
    let s = &daemon.stats;
    let conns = daemon.conns_total.load(Ordering::Relaxed);
    if json {
        let v = serde_json::json!({
            "daemon": {
                "pid": std::process::id(),
                "host_key": daemon.host.to_string(),
                "listen": daemon.listen.to_string(),
                "store": daemon.store.dir().display().to_string(),
                "io_backend": daemon.store.io_selection().backend.to_string(),
                "blobs": blobs,
                "connections": conns,
                "connections_accepted": s.connections_accepted.load(Ordering::Relaxed),
                "connections_refused": s.connections_refused.load(Ordering::Relaxed),
                "chunks_served": s.chunks_served.load(Ordering::Relaxed),
                "bytes_served": s.bytes_served.load(Ordering::Relaxed),
                "fetches_started": s.fetches_started.load(Ordering::Relaxed),
            }
        });
        format!("{v}\n")
    } else {
        format!(
            "daemon\tpid {} running\nhost_key\t{}\nlisten\t{}\nstore\t{} ({} blobs, io {})\nconnections\t{conns} open, {} accepted, {} refused\nserved\t{} bytes in {} chunks\n",
            std::process::id(),
            daemon.host,
            daemon.listen,
            daemon.store.dir().display(),
            blobs,
            daemon.store.io_selection().backend,
            s.connections_accepted.load(Ordering::Relaxed),
            s.connections_refused.load(Ordering::Relaxed),
            s.bytes_served.load(Ordering::Relaxed),
            s.chunks_served.load(Ordering::Relaxed),
        )
    }
}

/// Time since `epoch` as the substrate's clock (its state machines take
/// `now` as input).
pub(crate) fn now(epoch: Instant) -> substrate::Timestamp {
    substrate::Timestamp::from_micros(epoch.elapsed().as_micros() as u64)
}

/// The instant substrate time `t`, counted from `epoch`, is.
pub(crate) fn instant(epoch: Instant, t: substrate::Timestamp) -> Instant {
    epoch + Duration::from_micros(t.as_micros())
}
