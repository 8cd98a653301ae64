//! mTLS between envoys: peers are identified by their Ed25519 host key, checked
//! during the handshake, before any request is served; never by hostname or IP.
//!
//! - rustls with the *ring* provider only, TLS 1.3 only, client authentication
//!   mandatory in both directions. Cipher suites in the order AES-128-GCM,
//!   AES-256-GCM, ChaCha20-Poly1305 (AES-GCM is faster than ChaCha20 on these
//!   machines, which have AES-NI); the server's order wins.
//! - ALPN: both sides offer only `substrate::wire::ALPN_V1`. rustls refuses a client
//!   that offers only other protocols; a client that offers *none* completes the
//!   rustls handshake, so [`accept`] (and [`connect`]) check the negotiated protocol.
//! - No session resumption and no tickets: a resumed session would skip the
//!   certificate check, and with it [`PeerVerifier::admit`] (which admission chains and
//!   revocation will sit behind). Every connection does a full handshake.
//! - [`KeyVerifier`] is both rustls verifiers. For the single certificate a peer
//!   presents (intermediates are refused) it checks, in order: that it parses; that
//!   its key is Ed25519; its self-signature; its validity window against rustls's
//!   clock with [`CLOCK_SKEW_TOLERANCE`]; that the key it claims (SAN
//!   `<hex>.<hex>.key.vigo`, see `identity.rs`) is the key it carries; then
//!   [`PeerVerifier::admit`]. The TLS 1.3 CertificateVerify signature (which proves
//!   the peer holds the private key) goes through `rustls::crypto::verify_tls13_signature`
//!   with the ring provider's algorithms and must be Ed25519; TLS 1.2 signatures are
//!   refused. We *advertise* every scheme ring verifies, Ed25519 first, so that a peer
//!   with, say, an ECDSA certificate gets far enough to present it and is refused
//!   with [`Refusal::NotEd25519`] instead of an opaque "no certificate".
//! - A refusal decided by our verifier travels through rustls inside
//!   `CertificateError::Other` and is recovered as the precise [`Refusal`] by
//!   [`accept`]/[`connect`]. The peer sees only a TLS alert ([`Refusal::Tls`]).
//!
//! In TLS 1.3 the client finishes its handshake before the server has judged the
//! client's certificate, so a client the server refuses sees [`connect`] succeed and
//! learns of the refusal from its first read (a fatal alert). The server never hands
//! out a stream for a refused client, so no application data reaches it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::UnbufferedClientConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::UnbufferedServerConnection;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, PeerIncompatible,
    SignatureScheme,
};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{HostKey, PeerKey};
use crate::record::{self, RecordReader, RecordWriter};

/// The ALPN protocol both sides offer, and the only one accepted.
pub const ALPN: &[u8] = substrate::wire::ALPN_V1;

/// The server name a client sends. Identity is the key, so the name is a constant
/// that no verifier looks at.
pub const SERVER_NAME: &str = "envoy.vigo";

/// How far a certificate's validity window is stretched at both ends when checked,
/// so that peers whose clocks differ by up to this much still talk. Fresh
/// certificates are also backdated by `identity::CERT_BACKDATE`.
pub const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(60);

/// Default for [`TlsSettings::handshake_timeout`].
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Settings of the TLS layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSettings {
    /// TCP accepted/connected to TLS handshake finished; a peer slower than this
    /// (or one that sends nothing) is dropped with [`Refusal::Timeout`].
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }
}

/// Decides whether an authenticated host key may talk to us. The trust issue will put
/// admission chains (key + hostname signed by an admin) behind this same trait.
pub trait PeerVerifier: Send + Sync + std::fmt::Debug {
    fn admit(&self, key: &PeerKey, now: SystemTime) -> Result<(), Refusal>;
}

/// A fixed set of admitted keys. Empty (the default) admits no one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    keys: std::collections::BTreeSet<PeerKey>,
}

impl AllowList {
    pub fn new(keys: impl IntoIterator<Item = PeerKey>) -> AllowList {
        AllowList {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn insert(&mut self, key: PeerKey) -> bool {
        self.keys.insert(key)
    }

    pub fn contains(&self, key: &PeerKey) -> bool {
        self.keys.contains(key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl FromIterator<PeerKey> for AllowList {
    fn from_iter<I: IntoIterator<Item = PeerKey>>(iter: I) -> Self {
        AllowList::new(iter)
    }
}

impl PeerVerifier for AllowList {
    fn admit(&self, key: &PeerKey, _now: SystemTime) -> Result<(), Refusal> {
        if self.keys.contains(key) {
            Ok(())
        } else {
            Err(Refusal::UnknownKey(*key))
        }
    }
}

/// Why a TLS peer was refused. `Display` is the log line's reason.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("peer key {0} is not admitted")]
    UnknownKey(PeerKey),
    #[error("peer presented no certificate")]
    NoClientCert,
    #[error(
        "certificate of {key} expired at {} (now {}, tolerance {}s)",
        unix_text(*not_after_unix_s), unix_text(*now_unix_s), CLOCK_SKEW_TOLERANCE.as_secs()
    )]
    Expired {
        key: PeerKey,
        not_after_unix_s: i64,
        now_unix_s: i64,
    },
    #[error(
        "certificate of {key} is not valid before {} (now {}, tolerance {}s)",
        unix_text(*not_before_unix_s), unix_text(*now_unix_s), CLOCK_SKEW_TOLERANCE.as_secs()
    )]
    NotYetValid {
        key: PeerKey,
        not_before_unix_s: i64,
        now_unix_s: i64,
    },
    #[error("certificate claims key {claimed} but carries key {actual}")]
    KeyMismatch { claimed: PeerKey, actual: PeerKey },
    #[error("certificate key is not Ed25519")]
    NotEd25519,
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    #[error(
        "no common ALPN protocol (we speak only {:?})",
        String::from_utf8_lossy(ALPN)
    )]
    NoCommonAlpn,
    #[error("TLS handshake did not finish in time")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("I/O during the TLS handshake: {0}")]
    Io(#[source] std::io::Error),
}

impl Refusal {
    /// A copy of a refusal our verifier stashed inside a rustls error (those never
    /// hold `Io`, the one variant that cannot be cloned).
    fn duplicate(&self) -> Refusal {
        match self {
            Refusal::UnknownKey(k) => Refusal::UnknownKey(*k),
            Refusal::NoClientCert => Refusal::NoClientCert,
            Refusal::Expired {
                key,
                not_after_unix_s,
                now_unix_s,
            } => Refusal::Expired {
                key: *key,
                not_after_unix_s: *not_after_unix_s,
                now_unix_s: *now_unix_s,
            },
            Refusal::NotYetValid {
                key,
                not_before_unix_s,
                now_unix_s,
            } => Refusal::NotYetValid {
                key: *key,
                not_before_unix_s: *not_before_unix_s,
                now_unix_s: *now_unix_s,
            },
            Refusal::KeyMismatch { claimed, actual } => Refusal::KeyMismatch {
                claimed: *claimed,
                actual: *actual,
            },
            Refusal::NotEd25519 => Refusal::NotEd25519,
            Refusal::BadCertificate(s) => Refusal::BadCertificate(s.clone()),
            Refusal::NoCommonAlpn => Refusal::NoCommonAlpn,
            Refusal::Timeout => Refusal::Timeout,
            Refusal::Tls(s) => Refusal::Tls(s.clone()),
            Refusal::Io(e) => Refusal::Tls(e.to_string()),
        }
    }
}

/// Unix seconds as an RFC 2822-ish UTC time for log lines, or the number when out
/// of range.
fn unix_text(s: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(s)
        .ok()
        .and_then(|t| t.to_rfc2822().ok())
        .unwrap_or_else(|| format!("{s} (unix s)"))
}

/// The ring provider with our cipher-suite order (TLS 1.3 suites only).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// The server side's config: TLS 1.3, client certificate mandatory and checked by
/// [`KeyVerifier`], ALPN [`ALPN`], a fresh certificate from `host`.
pub fn server_config(
    host: &HostKey,
    verifier: Arc<dyn PeerVerifier>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_with(host, host.certificate()?, verifier)
}

/// [`server_config`] presenting `cert` (which must carry `host`'s key), e.g. one from
/// `HostKey::certificate_with` in tests.
pub fn server_config_with(
    host: &HostKey,
    cert: CertificateDer<'static>,
    verifier: Arc<dyn PeerVerifier>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(KeyVerifier::with_provider(verifier, &provider)))
        .with_single_cert(vec![cert], host.private_key_der())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.ignore_client_order = true;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.max_early_data_size = 0;
    // The record layer (`record.rs`) takes the keys over after the handshake.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The client side's config: TLS 1.3, our certificate always presented, the
/// server's checked by [`KeyVerifier`], ALPN [`ALPN`], no resumption.
pub fn client_config(
    host: &HostKey,
    verifier: Arc<dyn PeerVerifier>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    client_config_with(host, host.certificate()?, verifier)
}

/// [`client_config`] presenting `cert` (which must carry `host`'s key).
pub fn client_config_with(
    host: &HostKey,
    cert: CertificateDer<'static>,
    verifier: Arc<dyn PeerVerifier>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KeyVerifier::with_provider(verifier, &provider)))
        .with_client_auth_cert(vec![cert], host.private_key_der())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A connection whose handshake is done: rustls agreed the keys and checked the
/// peer; its records are sealed and opened by [`crate::record`] (see there
/// for why). `AsyncRead`/`AsyncWrite` for any caller; the daemon splits it
/// ([`TlsStream::into_split`]) and reads records straight into its frame decoder.
pub struct TlsStream {
    reader: RecordReader<OwnedReadHalf>,
    writer: RecordWriter<OwnedWriteHalf>,
    protocol_version: Option<rustls::ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    suite: rustls::SupportedCipherSuite,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("protocol_version", &self.protocol_version)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// The receiving and the sending half, each usable on its own task.
    pub fn into_split(self) -> (RecordReader<OwnedReadHalf>, RecordWriter<OwnedWriteHalf>) {
        (self.reader, self.writer)
    }

    /// The TLS version negotiated (always 1.3).
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.protocol_version
    }

    /// The ALPN protocol negotiated (always [`ALPN`]).
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The cipher suite negotiated.
    pub fn negotiated_cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        Some(self.suite)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

/// Server side of a connection: the TLS handshake within `timeout`, the ALPN check,
/// the peer's key. On refusal logs one `warn` line naming the remote address and
/// the reason, and returns the reason.
pub async fn accept(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream, PeerKey), Refusal> {
    let remote = tcp.peer_addr().ok();
    let result = async {
        let conn = UnbufferedServerConnection::new(Arc::clone(config))
            .map_err(|e| Refusal::Tls(e.to_string()))?;
        tokio::time::timeout(timeout, handshake(conn, tcp))
            .await
            .unwrap_or(Err(Refusal::Timeout))
    }
    .await;
    if let Err(refusal) = &result {
        tracing::warn!("refused TLS peer {}: {refusal}", remote_text(remote));
    }
    result
}

/// Client side of a connection: the TLS handshake within `timeout`, the ALPN check,
/// the server's key. Does not log: the caller knows what it was connecting for.
/// See the module comment for why success does not yet mean the server admitted us.
pub async fn connect(
    config: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream, PeerKey), Refusal> {
    let name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name");
    let conn = UnbufferedClientConnection::new(Arc::clone(config), name)
        .map_err(|e| Refusal::Tls(e.to_string()))?;
    tokio::time::timeout(timeout, handshake(conn, tcp))
        .await
        .unwrap_or(Err(Refusal::Timeout))
}

/// Both sides of rustls's unbuffered API (`process_tls_records` is written once
/// per side, not behind a trait); `vigo-perf tls` drives it too.
pub trait Unbuffered:
    std::ops::Deref<Target = rustls::unbuffered::UnbufferedConnectionCommon<Self::Data>> + Send
{
    type Data: Send + 'static;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(
        self,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

/// A handshake flight is at most this big (rustls allows 64 KiB messages).
const HANDSHAKE_BUFFER_MAX: usize = 128 << 10;

/// Drives rustls through the handshake over `tcp`, checks ALPN and the peer's
/// key, and hands the connection's secrets to the record layer, with the bytes
/// that arrived after the handshake's last record.
///
/// rustls is given one complete record at a time and nothing once the
/// handshake is done: within one call it would go on past the peer's Finished
/// into what the record layer must see (a KeyUpdate there moves rustls's send
/// key and parks the reply where the hand-over does not look; a handshake
/// message split over records stays decrypted in its buffer). Plaintext it
/// opened anyway (not expected) goes to the reader first.
async fn handshake<C: Unbuffered>(
    mut conn: C,
    mut tcp: TcpStream,
) -> Result<(TlsStream, PeerKey), Refusal> {
    enum Next {
        Read,
        Transmit,
        Again,
        Done,
    }
    let mut incoming = vec![0u8; 16 << 10];
    let mut used = 0;
    let mut outgoing = vec![0u8; 16 << 10];
    let mut out_used = 0;
    let mut early_plain = Vec::new();
    let mut peer_closed = false;
    // What rustls has been given: the records in `incoming[..fed]`.
    let mut fed = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..fed]);
        let next = match state {
            Err(e) => {
                let refusal = refusal_from_rustls(&e);
                incoming.copy_within(discard..used, 0);
                send_alert(&mut conn, &mut incoming[..fed - discard], &mut tcp).await;
                return Err(refusal);
            }
            Ok(ConnectionState::EncodeTlsData(mut s)) => loop {
                match s.encode(&mut outgoing[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break Next::Again;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                        if out_used + required_size <= HANDSHAKE_BUFFER_MAX =>
                    {
                        outgoing.resize(out_used + required_size, 0);
                    }
                    Err(e) => return Err(Refusal::Tls(format!("encoding the handshake: {e}"))),
                }
            },
            Ok(ConnectionState::TransmitTlsData(s)) => {
                s.done();
                Next::Transmit
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            // A server may write before the client's flight arrives; the
            // handshake is done only when the peer is authenticated.
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(|e| refusal_from_rustls(&e))?;
                    discard += record.discard;
                    early_plain.extend_from_slice(record.payload);
                }
                Next::Again
            }
            // The peer wrote and closed as soon as its side was done: what
            // it wrote is in `early_plain`, and the reader ends after it.
            Ok(ConnectionState::PeerClosed) => {
                peer_closed = true;
                Next::Again
            }
            Ok(ConnectionState::Closed) => {
                return Err(Refusal::Tls(
                    "the peer closed the connection in the handshake".into(),
                ));
            }
            Ok(other) => return Err(Refusal::Tls(format!("unexpected TLS state {other:?}"))),
        };
        incoming.copy_within(discard..used, 0);
        used -= discard;
        fed -= discard;
        if peer_closed && conn.is_handshaking() {
            return Err(Refusal::Tls(
                "the peer closed the connection in the handshake".into(),
            ));
        }
        match next {
            Next::Done if !conn.is_handshaking() => break,
            Next::Read | Next::Done => {
                if let Some(len) = record_len(&incoming[fed..used]) {
                    fed += len;
                    continue;
                }
                if used == incoming.len() {
                    if incoming.len() >= HANDSHAKE_BUFFER_MAX {
                        return Err(Refusal::Tls("handshake messages too large".into()));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = tcp.read(&mut incoming[used..]).await.map_err(Refusal::Io)?;
                if n == 0 {
                    return Err(Refusal::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the TLS handshake",
                    )));
                }
                used += n;
            }
            Next::Transmit => {
                tcp.write_all(&outgoing[..out_used])
                    .await
                    .map_err(Refusal::Io)?;
                out_used = 0;
            }
            Next::Again => {}
        }
    }
    if fed != 0 {
        return Err(Refusal::Tls(format!(
            "{fed} bytes of the handshake's records were left unprocessed"
        )));
    }
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(Refusal::NoCommonAlpn);
    }
    let key = negotiated_key(conn.peer_certificates())?;
    let protocol_version = conn.protocol_version();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let (suite, limit) = match conn.negotiated_cipher_suite() {
        Some(suite @ rustls::SupportedCipherSuite::Tls13(tls13)) => {
            (suite, tls13.common.confidentiality_limit)
        }
        _ => return Err(Refusal::Tls("no TLS 1.3 cipher suite negotiated".into())),
    };
    let (secrets, kernel) = conn
        .into_kernel()
        .map_err(|e| Refusal::Tls(format!("handing the keys to the record layer: {e}")))?;
    let shared = record::Shared::new(Box::new(kernel), limit);
    let rx = record::RecordKey::new(secrets.rx).map_err(Refusal::Io)?;
    let tx = record::RecordKey::new(secrets.tx).map_err(Refusal::Io)?;
    let (read, write) = tcp.into_split();
    let stream = TlsStream {
        reader: RecordReader::new(
            read,
            rx,
            Arc::clone(&shared),
            early_plain,
            incoming[..used].to_vec(),
            peer_closed,
        ),
        writer: RecordWriter::new(write, tx, shared),
        protocol_version,
        alpn,
        suite,
    };
    Ok((stream, key))
}

/// The length of the complete TLS record `buf` starts with, if it holds one.
fn record_len(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..record::HEADER_BYTES)?;
    let len = record::HEADER_BYTES + usize::from(u16::from_be_bytes([head[3], head[4]]));
    (len <= buf.len()).then_some(len)
}

/// After a handshake error: sends the alert rustls queued, if any (best effort).
/// `incoming` is what is left of the buffer the error came from (rustls keeps
/// positions into it).
async fn send_alert<C: Unbuffered>(conn: &mut C, incoming: &mut [u8], tcp: &mut TcpStream) {
    let mut out = vec![0u8; 512];
    let mut n = 0;
    for _ in 0..4 {
        match conn.process(incoming).state {
            Ok(ConnectionState::EncodeTlsData(mut s)) => match s.encode(&mut out[n..]) {
                Ok(k) => n += k,
                Err(_) => break,
            },
            Ok(ConnectionState::TransmitTlsData(s)) => {
                s.done();
                break;
            }
            _ => break,
        }
    }
    let _ = tcp.write_all(&out[..n]).await;
}

fn remote_text(remote: Option<SocketAddr>) -> String {
    remote.map_or_else(|| "(unknown address)".to_string(), |a| a.to_string())
}

/// The key of a peer whose certificate the verifier already accepted.
fn negotiated_key(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerKey, Refusal> {
    match certs {
        Some([cert]) => parse(cert).map(|(_, key)| key),
        Some([]) | None => Err(Refusal::NoClientCert),
        Some(certs) => Err(Refusal::BadCertificate(format!(
            "expected one certificate, got {}",
            certs.len()
        ))),
    }
}

fn refusal_from_rustls(e: &rustls::Error) -> Refusal {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            match inner.downcast_ref::<Refusal>() {
                Some(refusal) => refusal.duplicate(),
                None => Refusal::BadCertificate(inner.to_string()),
            }
        }
        rustls::Error::NoCertificatesPresented => Refusal::NoClientCert,
        rustls::Error::NoApplicationProtocol => Refusal::NoCommonAlpn,
        rustls::Error::PeerIncompatible(
            why @ (PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig),
        ) => Refusal::Tls(format!(
            "peer does not speak TLS 1.3, the only version we accept ({why:?})"
        )),
        other => Refusal::Tls(other.to_string()),
    }
}

fn stash(refusal: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
}

/// Both rustls verifiers (server certificates for the client side, client
/// certificates for the server side) over one [`PeerVerifier`]. See the module
/// comment for what is checked.
#[derive(Debug)]
pub struct KeyVerifier {
    verifier: Arc<dyn PeerVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl KeyVerifier {
    /// Over the ring provider's signature algorithms.
    pub fn new(verifier: Arc<dyn PeerVerifier>) -> KeyVerifier {
        KeyVerifier::with_provider(verifier, &provider())
    }

    fn with_provider(verifier: Arc<dyn PeerVerifier>, provider: &CryptoProvider) -> KeyVerifier {
        KeyVerifier {
            verifier,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Every certificate check, then [`PeerVerifier::admit`]: the peer's key if it
    /// may talk to us.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<PeerKey, Refusal> {
        if !intermediates.is_empty() {
            return Err(Refusal::BadCertificate(format!(
                "expected exactly one certificate, got {}",
                1 + intermediates.len()
            )));
        }
        let (cert, key) = parse(end_entity)?;
        check_self_signature(&cert, &key)?;
        check_validity(&cert, &key, now)?;
        check_claim(&cert, &key)?;
        self.verifier.admit(&key, now)?;
        Ok(key)
    }

    fn check_rustls(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        self.check(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(stash)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::General(format!(
                "handshake signed with {:?}; only ED25519 is accepted",
                dss.scheme
            )));
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    /// Ed25519 first; the rest only so that other keys reach [`Refusal::NotEd25519`].
    fn schemes(&self) -> Vec<SignatureScheme> {
        let mut schemes = vec![SignatureScheme::ED25519];
        schemes.extend(
            self.algorithms
                .supported_schemes()
                .into_iter()
                .filter(|s| *s != SignatureScheme::ED25519),
        );
        schemes
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 handshake signatures are refused".into())
}

impl ServerCertVerifier for KeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_rustls(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for KeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_rustls(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Parses a DER certificate (nothing may follow it) and returns its Ed25519 key.
fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<(X509Certificate<'a>, PeerKey), Refusal> {
    let (rest, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| Refusal::BadCertificate(format!("cannot parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Refusal::BadCertificate(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(Refusal::NotEd25519);
    }
    // RFC 8410 §3: the parameters of id-Ed25519 MUST be absent.
    if spki.algorithm.parameters.is_some() {
        return Err(Refusal::BadCertificate(
            "Ed25519 key with algorithm parameters".into(),
        ));
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| {
            Refusal::BadCertificate(format!(
                "Ed25519 key of {} bytes, not 32",
                spki.subject_public_key.data.len()
            ))
        })?;
    Ok((cert, PeerKey(raw)))
}

fn check_self_signature(cert: &X509Certificate<'_>, key: &PeerKey) -> Result<(), Refusal> {
    let ed25519 = &x509_parser::oid_registry::OID_SIG_ED25519;
    if cert.signature_algorithm.algorithm != *ed25519
        || cert.tbs_certificate.signature.algorithm != *ed25519
    {
        return Err(Refusal::BadCertificate(format!(
            "certificate signed with {}, not Ed25519",
            cert.signature_algorithm.algorithm
        )));
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key.0)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| {
            Refusal::BadCertificate("its self-signature does not verify under its own key".into())
        })
}

fn check_validity(
    cert: &X509Certificate<'_>,
    key: &PeerKey,
    now: SystemTime,
) -> Result<(), Refusal> {
    let now_unix_s = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let tolerance_s = CLOCK_SKEW_TOLERANCE.as_secs() as i64;
    let validity = cert.validity();
    let not_before_unix_s = validity.not_before.timestamp();
    let not_after_unix_s = validity.not_after.timestamp();
    if now_unix_s.saturating_add(tolerance_s) < not_before_unix_s {
        return Err(Refusal::NotYetValid {
            key: *key,
            not_before_unix_s,
            now_unix_s,
        });
    }
    if now_unix_s.saturating_sub(tolerance_s) > not_after_unix_s {
        return Err(Refusal::Expired {
            key: *key,
            not_after_unix_s,
            now_unix_s,
        });
    }
    Ok(())
}

/// The certificate must claim exactly one key (SAN DNS `….key.vigo`), the one it carries.
fn check_claim(cert: &X509Certificate<'_>, key: &PeerKey) -> Result<(), Refusal> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Refusal::BadCertificate(format!("subjectAltName: {e}")))?
        .ok_or_else(|| Refusal::BadCertificate("no subjectAltName claiming a key".into()))?;
    let mut claims = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => PeerKey::from_claim_name(dns).map(|claim| (dns, claim)),
            _ => None,
        });
    let (name, claim) = claims
        .next()
        .ok_or_else(|| Refusal::BadCertificate("no subjectAltName claiming a key".into()))?;
    if claims.next().is_some() {
        return Err(Refusal::BadCertificate("more than one key claim".into()));
    }
    let claimed =
        claim.map_err(|_| Refusal::BadCertificate(format!("malformed key claim {name:?}")))?;
    if claimed != *key {
        return Err(Refusal::KeyMismatch {
            claimed,
            actual: *key,
        });
    }
    Ok(())
}
