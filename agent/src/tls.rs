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

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, PeerIncompatible,
    SignatureScheme,
};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{HostKey, PeerKey};

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
    Ok(Arc::new(config))
}

/// Server side of a connection: the TLS handshake within `timeout`, the ALPN check,
/// the peer's key. On refusal logs one `warn` line naming the remote address and
/// the reason, and returns the reason.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerKey), Refusal> {
    let remote = tcp.peer_addr().ok();
    let result = accept_checked(acceptor, tcp, timeout).await;
    if let Err(refusal) = &result {
        tracing::warn!("refused TLS peer {}: {refusal}", remote_text(remote));
    }
    result
}

async fn accept_checked(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerKey), Refusal> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_elapsed) => return Err(Refusal::Timeout),
        Ok(Err(e)) => return Err(refusal_from_io(e)),
        Ok(Ok(stream)) => stream,
    };
    let conn = stream.get_ref().1;
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(Refusal::NoCommonAlpn);
    }
    let key = negotiated_key(conn.peer_certificates())?;
    Ok((stream, key))
}

/// Client side of a connection: the TLS handshake within `timeout`, the ALPN check,
/// the server's key. Does not log: the caller knows what it was connecting for.
/// See the module comment for why success does not yet mean the server admitted us.
pub async fn connect(
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, PeerKey), Refusal> {
    let name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name");
    let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_elapsed) => return Err(Refusal::Timeout),
        Ok(Err(e)) => return Err(refusal_from_io(e)),
        Ok(Ok(stream)) => stream,
    };
    let conn = stream.get_ref().1;
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(Refusal::NoCommonAlpn);
    }
    let key = negotiated_key(conn.peer_certificates())?;
    Ok((stream, key))
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

/// The precise refusal behind a handshake error from tokio-rustls.
fn refusal_from_io(e: std::io::Error) -> Refusal {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return refusal_from_rustls(tls);
    }
    Refusal::Io(e)
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
