//! mTLS between envoys over real TCP sockets on 127.0.0.1 (ephemeral ports).
//!
//! Each refusal test checks the precise `Refusal` on the side that decides it and
//! that no application data crosses: a refused server never hands out a stream, and
//! a client the server refused reads an error instead of the server's bytes.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent::identity::{HostKey, PeerKey};
use agent::tls::{self, AllowList, KeyVerifier, PeerVerifier, Refusal};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(10);
const FROM_CLIENT: &[u8] = b"hello from the client";
const FROM_SERVER: &[u8] = b"hello from the server";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn allow(keys: &[PeerKey]) -> Arc<dyn PeerVerifier> {
    Arc::new(AllowList::new(keys.iter().copied()))
}

/// What the server side saw: the client's key and every byte it sent, or the refusal.
type ServerSide = Result<(PeerKey, Vec<u8>), Refusal>;

/// What the client side saw.
#[derive(Debug)]
enum ClientSide {
    /// `tls::connect` or the raw handshake failed.
    Refused(Refusal),
    /// The handshake finished; then we sent `FROM_CLIENT`, and this is what reading the
    /// server's reply to EOF gave.
    Connected {
        server: Option<PeerKey>,
        reply: std::io::Result<Vec<u8>>,
    },
}

/// How the client connects.
enum Client {
    /// `tls::connect` with this config (all checks of ours).
    Ours(Arc<rustls::ClientConfig>),
    /// A bare tokio-rustls handshake: no ALPN or key check of ours on the client side,
    /// so the client goes on to send data whatever was negotiated.
    Raw(Arc<rustls::ClientConfig>),
}

/// One connection: the server accepts with `tls::accept`, reads what the client
/// sends until EOF, answers `FROM_SERVER`; the client sends `FROM_CLIENT`, shuts
/// down its write side and reads the reply until EOF.
async fn exchange(server: Arc<rustls::ServerConfig>, client: Client) -> (ServerSide, ClientSide) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server;
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, key) = tls::accept(&acceptor, tcp, TIMEOUT).await?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.map_err(Refusal::Io)?;
        stream.write_all(FROM_SERVER).await.map_err(Refusal::Io)?;
        stream.shutdown().await.map_err(Refusal::Io)?;
        Ok((key, got))
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_side = match client {
        Client::Ours(config) => match tls::connect(&config, tcp, TIMEOUT).await {
            Err(refusal) => ClientSide::Refused(refusal),
            Ok((stream, key)) => talk(stream, Some(key)).await,
        },
        Client::Raw(config) => {
            let connector = tokio_rustls::TlsConnector::from(config);
            let name = ServerName::try_from(tls::SERVER_NAME).unwrap();
            match connector.connect(name, tcp).await {
                Err(e) => ClientSide::Refused(Refusal::Io(e)),
                Ok(stream) => talk(stream, None).await,
            }
        }
    };
    let server_side = tokio::time::timeout(TIMEOUT * 2, server_task)
        .await
        .unwrap()
        .unwrap();
    (server_side, client_side)
}

async fn talk(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    server: Option<PeerKey>,
) -> ClientSide {
    let reply = async {
        // In TLS 1.3 a refused client may still write (the refusal is in flight);
        // whether the write fails does not matter, the read below must.
        let _ = stream.write_all(FROM_CLIENT).await;
        let _ = stream.shutdown().await;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.map(|_| reply)
    }
    .await;
    ClientSide::Connected { server, reply }
}

/// The client got no application data from the server, and learned that it was
/// refused: its handshake failed, or its first read failed (the server's alert, or
/// an EOF without close_notify when the server refused after the handshake).
fn assert_client_got_nothing(client: &ClientSide) {
    match client {
        ClientSide::Refused(_) => {}
        ClientSide::Connected { reply: Err(_), .. } => {}
        ClientSide::Connected {
            reply: Ok(bytes), ..
        } => {
            panic!("refused client read {bytes:?} and a clean end of stream")
        }
    }
}

struct Hosts {
    server: HostKey,
    client: HostKey,
}

impl Hosts {
    fn new() -> Hosts {
        Hosts {
            server: HostKey::generate().unwrap(),
            client: HostKey::generate().unwrap(),
        }
    }

    /// A server that admits the client.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        tls::server_config(&self.server, allow(&[self.client.public()])).unwrap()
    }

    /// A client that admits the server.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.client, allow(&[self.server.public()])).unwrap()
    }

    /// A client presenting `cert` (carrying the client key), admitting the server.
    fn client_config_with(&self, cert: CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
        tls::client_config_with(&self.client, cert, allow(&[self.server.public()])).unwrap()
    }
}

/// The client's refusal when the *server* refused it: either `connect` already saw
/// the alert, or its first read did.
fn assert_server_refused_client(server: ServerSide, client: &ClientSide) -> Refusal {
    assert_client_got_nothing(client);
    match server {
        Err(refusal) => refusal,
        Ok((key, got)) => panic!("server admitted {key} and received {got:?}"),
    }
}

fn assert_client_refused_server(server: ServerSide, client: ClientSide) -> Refusal {
    // The server never got a stream, so it received nothing and sent nothing.
    assert!(server.is_err(), "server side went on: {server:?}");
    match client {
        ClientSide::Refused(refusal) => refusal,
        other => panic!("client went on: {other:?}"),
    }
}

#[tokio::test]
async fn admitted_both_ways_exchange_bytes() {
    let hosts = Hosts::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = hosts.server_config();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, key) = tls::accept(&acceptor, tcp, TIMEOUT).await.unwrap();
        let conn = &stream;
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(conn.alpn_protocol(), Some(substrate::wire::ALPN_V1));
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        stream.write_all(FROM_SERVER).await.unwrap();
        stream.shutdown().await.unwrap();
        (key, got)
    });
    let connector = hosts.client_config();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut stream, server_key) = tls::connect(&connector, tcp, TIMEOUT).await.unwrap();
    let conn = &stream;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // Our order wins: AES-128-GCM first.
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    stream.write_all(FROM_CLIENT).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    let (client_key, got) = server.await.unwrap();

    assert_eq!(server_key, hosts.server.public());
    assert_eq!(client_key, hosts.client.public());
    assert_eq!(got, FROM_CLIENT);
    assert_eq!(reply, FROM_SERVER);
}

#[tokio::test]
async fn exchange_helper_sees_success() {
    // The helper the refusal tests rely on does report a success as one: otherwise
    // they could pass for the wrong reason.
    let hosts = Hosts::new();
    let (server, client) =
        exchange(hosts.server_config(), Client::Ours(hosts.client_config())).await;
    let (client_key, got) = server.unwrap();
    assert_eq!(client_key, hosts.client.public());
    assert_eq!(got, FROM_CLIENT);
    match client {
        ClientSide::Connected { server, reply } => {
            assert_eq!(server, Some(hosts.server.public()));
            assert_eq!(reply.unwrap(), FROM_SERVER);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_unknown_client_key() {
    let hosts = Hosts::new();
    let stranger = HostKey::generate().unwrap();
    let server = tls::server_config(&hosts.server, allow(&[stranger.public()])).unwrap();
    let (server, client) = exchange(server, Client::Ours(hosts.client_config())).await;
    match assert_server_refused_client(server, &client) {
        Refusal::UnknownKey(key) => assert_eq!(key, hosts.client.public()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn empty_allow_list_refuses_everyone() {
    let hosts = Hosts::new();
    let server = tls::server_config(&hosts.server, Arc::new(AllowList::default())).unwrap();
    let (server, client) = exchange(server, Client::Ours(hosts.client_config())).await;
    assert!(matches!(
        assert_server_refused_client(server, &client),
        Refusal::UnknownKey(_)
    ));
}

#[tokio::test]
async fn client_refuses_unknown_server_key() {
    let hosts = Hosts::new();
    let stranger = HostKey::generate().unwrap();
    let client = tls::client_config(&hosts.client, allow(&[stranger.public()])).unwrap();
    let (server, client) = exchange(hosts.server_config(), Client::Ours(client)).await;
    match assert_client_refused_server(server, client) {
        Refusal::UnknownKey(key) => assert_eq!(key, hosts.server.public()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    let hosts = Hosts::new();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(KeyVerifier::new(allow(&[hosts.server.public()]))))
    .with_no_client_auth();
    let mut client = client;
    client.alpn_protocols = vec![tls::ALPN.to_vec()];
    let (server, client) = exchange(hosts.server_config(), Client::Raw(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(matches!(refusal, Refusal::NoClientCert), "{refusal:?}");
}

#[tokio::test]
async fn server_refuses_expired_client_certificate() {
    let hosts = Hosts::new();
    let now = SystemTime::now();
    let cert = hosts
        .client
        .certificate_with(now - 2 * DAY, now - DAY, hosts.client.public())
        .unwrap();
    let (server, client) = exchange(
        hosts.server_config(),
        Client::Ours(hosts.client_config_with(cert)),
    )
    .await;
    match assert_server_refused_client(server, &client) {
        Refusal::Expired {
            key,
            not_after_unix_s,
            now_unix_s,
        } => {
            assert_eq!(key, hosts.client.public());
            assert!(not_after_unix_s < now_unix_s);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    let hosts = Hosts::new();
    let now = SystemTime::now();
    let cert = hosts
        .server
        .certificate_with(now - 2 * DAY, now - DAY, hosts.server.public())
        .unwrap();
    let server =
        tls::server_config_with(&hosts.server, cert, allow(&[hosts.client.public()])).unwrap();
    let (server, client) = exchange(server, Client::Ours(hosts.client_config())).await;
    let refusal = assert_client_refused_server(server, client);
    assert!(
        matches!(refusal, Refusal::Expired { key, .. } if key == hosts.server.public()),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn server_refuses_not_yet_valid_client_certificate() {
    let hosts = Hosts::new();
    let now = SystemTime::now();
    let cert = hosts
        .client
        .certificate_with(now + DAY, now + 2 * DAY, hosts.client.public())
        .unwrap();
    let (server, client) = exchange(
        hosts.server_config(),
        Client::Ours(hosts.client_config_with(cert)),
    )
    .await;
    match assert_server_refused_client(server, &client) {
        Refusal::NotYetValid {
            key,
            not_before_unix_s,
            now_unix_s,
        } => {
            assert_eq!(key, hosts.client.public());
            assert!(not_before_unix_s > now_unix_s);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn clock_skew_within_tolerance_is_accepted() {
    // Valid from 30 s in the future: inside the 60 s tolerance.
    let hosts = Hosts::new();
    let now = SystemTime::now();
    let cert = hosts
        .client
        .certificate_with(
            now + Duration::from_secs(30),
            now + DAY,
            hosts.client.public(),
        )
        .unwrap();
    let (server, _client) = exchange(
        hosts.server_config(),
        Client::Ours(hosts.client_config_with(cert)),
    )
    .await;
    assert_eq!(server.unwrap().0, hosts.client.public());
}

#[tokio::test]
async fn server_refuses_certificate_claiming_another_key() {
    let hosts = Hosts::new();
    let other = HostKey::generate().unwrap();
    let now = SystemTime::now();
    // The server admits both keys, so only the lie can be the reason.
    let server = tls::server_config(
        &hosts.server,
        allow(&[hosts.client.public(), other.public()]),
    )
    .unwrap();
    let cert = hosts
        .client
        .certificate_with(now - DAY, now + DAY, other.public())
        .unwrap();
    let (server, client) = exchange(server, Client::Ours(hosts.client_config_with(cert))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert_eq!(
        refusal.to_string(),
        format!(
            "certificate claims key {} but carries key {}",
            other.public(),
            hosts.client.public()
        )
    );
    assert!(
        matches!(refusal, Refusal::KeyMismatch { claimed, actual }
            if claimed == other.public() && actual == hosts.client.public()),
        "{refusal:?}"
    );
}

/// An rcgen ECDSA P-256 certificate and key, otherwise shaped like ours.
fn ecdsa_identity() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["envoy.vigo".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), der)
}

#[tokio::test]
async fn server_refuses_non_ed25519_client_certificate() {
    let hosts = Hosts::new();
    let (cert, key) = ecdsa_identity();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(KeyVerifier::new(allow(&[hosts.server.public()]))))
    .with_client_auth_cert(vec![cert], key)
    .unwrap();
    client.alpn_protocols = vec![tls::ALPN.to_vec()];
    let (server, client) = exchange(hosts.server_config(), Client::Raw(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(matches!(refusal, Refusal::NotEd25519), "{refusal:?}");
}

#[tokio::test]
async fn client_refuses_non_ed25519_server_certificate() {
    let hosts = Hosts::new();
    let (cert, key) = ecdsa_identity();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    server.alpn_protocols = vec![tls::ALPN.to_vec()];
    let (server, client) = exchange(Arc::new(server), Client::Ours(hosts.client_config())).await;
    let refusal = assert_client_refused_server(server, client);
    assert!(matches!(refusal, Refusal::NotEd25519), "{refusal:?}");
}

#[tokio::test]
async fn server_refuses_certificate_not_signed_by_its_own_key() {
    // Carries and claims the client's key, but is signed by another key: only the
    // self-signature check can catch it (the handshake signature is the client's).
    let hosts = Hosts::new();
    let pkcs8 = |host: &HostKey| match host.private_key_der() {
        PrivateKeyDer::Pkcs8(der) => {
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).unwrap()
        }
        _ => unreachable!("host keys are PKCS#8"),
    };
    let subject = pkcs8(&hosts.client);
    let signer = pkcs8(&HostKey::generate().unwrap());
    let params = rcgen::CertificateParams::new(vec![hosts.client.public().claim_name()]).unwrap();
    let issuer_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let issuer = rcgen::Issuer::from_params(&issuer_params, &signer);
    let cert = params.signed_by(&subject, &issuer).unwrap().der().clone();
    let (server, client) = exchange(
        hosts.server_config(),
        Client::Ours(hosts.client_config_with(cert)),
    )
    .await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(
        matches!(&refusal, Refusal::BadCertificate(why) if why.contains("self-signature")),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn server_refuses_certificate_chain() {
    let hosts = Hosts::new();
    let extra = HostKey::generate().unwrap().certificate().unwrap();
    let mut client = (*hosts.client_config()).clone();
    client.client_auth_cert_resolver = Arc::new(rustls::sign::SingleCertAndKey::from(
        rustls::sign::CertifiedKey::from_der(
            vec![hosts.client.certificate().unwrap(), extra],
            hosts.client.private_key_der(),
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap(),
    ));
    let (server, client) = exchange(hosts.server_config(), Client::Ours(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(
        matches!(&refusal, Refusal::BadCertificate(why) if why.contains("exactly one certificate")),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn server_refuses_tls12_only_client() {
    let hosts = Hosts::new();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(KeyVerifier::new(allow(&[hosts.server.public()]))))
    .with_client_auth_cert(
        vec![hosts.client.certificate().unwrap()],
        hosts.client.private_key_der(),
    )
    .unwrap();
    client.alpn_protocols = vec![tls::ALPN.to_vec()];
    let (server, client) = exchange(hosts.server_config(), Client::Raw(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(
        matches!(&refusal, Refusal::Tls(why) if why.contains("TLS 1.3")),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn server_refuses_client_offering_other_alpn() {
    let hosts = Hosts::new();
    let mut client = (*hosts.client_config()).clone();
    client.alpn_protocols = vec![b"other/9".to_vec()];
    let (server, client) = exchange(hosts.server_config(), Client::Raw(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(matches!(refusal, Refusal::NoCommonAlpn), "{refusal:?}");
}

#[tokio::test]
async fn server_refuses_client_offering_no_alpn() {
    // rustls completes this handshake; `accept` must refuse it.
    let hosts = Hosts::new();
    let mut client = (*hosts.client_config()).clone();
    client.alpn_protocols = Vec::new();
    let (server, client) = exchange(hosts.server_config(), Client::Raw(Arc::new(client))).await;
    let refusal = assert_server_refused_client(server, &client);
    assert!(matches!(refusal, Refusal::NoCommonAlpn), "{refusal:?}");
}

#[tokio::test]
async fn client_refuses_server_without_alpn() {
    let hosts = Hosts::new();
    let mut server = (*hosts.server_config()).clone();
    server.alpn_protocols = Vec::new();
    let (server, client) = exchange(Arc::new(server), Client::Ours(hosts.client_config())).await;
    let refusal = assert_client_refused_server(server, client);
    assert!(matches!(refusal, Refusal::NoCommonAlpn), "{refusal:?}");
}

#[tokio::test]
async fn silent_client_times_out() {
    let hosts = Hosts::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = hosts.server_config();
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let refusal = tls::accept(&acceptor, tcp, timeout).await.unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(refusal, Refusal::Timeout), "{refusal:?}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(5),
        "{elapsed:?}"
    );
}

thread_local! {
    /// What `tracing` logged on this thread while capturing.
    static CAPTURED: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// A `tracing` writer that appends to the calling thread's capture buffer,
/// if it has one.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing this thread's `warn` lines. The subscriber is this test
/// binary's global default (set once), not a scoped one: with a scoped
/// subscriber, a callsite first hit by another test's thread could keep the
/// interest computed without it, and the event was silently dropped (seen
/// under qemu-aarch64, where threads interleave differently).
fn capture_warnings() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThreadCapture)
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
}

/// What this thread logged since [`capture_warnings`].
fn captured_warnings() -> String {
    let bytes = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    String::from_utf8(bytes).expect("tracing writes UTF-8")
}

#[tokio::test(flavor = "current_thread")]
async fn refusal_logs_one_warning_with_address_and_reason() {
    // current_thread runtime: every task is polled on this thread.
    capture_warnings();

    let hosts = Hosts::new();
    let server = tls::server_config(&hosts.server, Arc::new(AllowList::default())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server;
    let connector = hosts.client_config();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let local = tcp.local_addr().unwrap();
        if let Ok((mut stream, _)) = tls::connect(&connector, tcp, TIMEOUT).await {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        }
        local
    });
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(tls::accept(&acceptor, tcp, TIMEOUT).await.is_err());
    let client_addr = client.await.unwrap();

    let log = captured_warnings();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("WARN"), "{log}");
    assert!(lines[0].contains(&client_addr.to_string()), "{log}");
    assert!(
        lines[0].contains(&format!(
            "peer key {} is not admitted",
            hosts.client.public()
        )),
        "{log}"
    );
}

// Host key file.

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn host_key_is_created_0600_and_reloaded_identical() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").join("nested");
    let created = HostKey::load_or_create(&state).unwrap();
    let path = state.join("host.key");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&state), 0o700);
    let bytes = std::fs::read(&path).unwrap();
    let reloaded = HostKey::load_or_create(&state).unwrap();
    assert_eq!(created.public(), reloaded.public());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "reloading rewrote the key file"
    );
    // Nothing but the key is left in the directory (no temp files).
    let names: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("host.key")]);
    // A different directory gets a different identity.
    let other = HostKey::load_or_create(&dir.path().join("other")).unwrap();
    assert_ne!(other.public(), created.public());
}

#[test]
fn host_key_readable_by_group_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let created = HostKey::load_or_create(dir.path()).unwrap();
    let path = dir.path().join("host.key");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = HostKey::load_or_create(dir.path()).unwrap_err().to_string();
    assert!(err.contains("0640") && err.contains("host.key"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "refusal touched the key"
    );
    // Fixed by the owner, it loads again as the same identity.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        HostKey::load_or_create(dir.path()).unwrap().public(),
        created.public()
    );
}

#[test]
fn garbage_host_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.write_all(b"this is not a PKCS#8 key\n").unwrap();
    drop(file);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = format!("{:#}", HostKey::load_or_create(dir.path()).unwrap_err());
    assert!(err.contains("not an Ed25519 PKCS#8 private key"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"this is not a PKCS#8 key\n",
        "refusal replaced the key"
    );
}

/// A plain rustls client on a blocking socket whose last handshake flight goes
/// out in one write with whatever `after_handshake` queues; then it reads to
/// the server's close_notify.
fn coalescing_client(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    after_handshake: impl FnOnce(&mut rustls::ClientConnection),
) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = ServerName::try_from(tls::SERVER_NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        if !conn.is_handshaking() {
            break;
        }
        conn.read_tls(&mut tcp).map_err(|e| e.to_string())?;
        conn.process_new_packets().map_err(|e| e.to_string())?;
    }
    after_handshake(&mut conn);
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    tcp.write_all(&flight).unwrap();
    let mut got = Vec::new();
    loop {
        if conn.read_tls(&mut tcp).map_err(|e| e.to_string())? == 0 {
            break;
        }
        let state = conn.process_new_packets().map_err(|e| e.to_string())?;
        let mut buf = vec![0; state.plaintext_bytes_to_read()];
        conn.reader().read_exact(&mut buf).unwrap();
        got.extend_from_slice(&buf);
        if state.peer_has_closed() {
            break;
        }
    }
    Ok(got)
}

/// Our server reads 5 bytes, answers `pong!` and closes; the client is
/// [`coalescing_client`].
async fn coalesced_exchange(
    after_handshake: impl FnOnce(&mut rustls::ClientConnection) + Send + 'static,
) -> (Result<Vec<u8>, String>, Result<Vec<u8>, String>) {
    let hosts = Hosts::new();
    let (server, client) = (hosts.server_config(), hosts.client_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, _) = tls::accept(&server, tcp, TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let mut got = vec![0u8; 5];
        stream
            .read_exact(&mut got)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"pong!")
            .await
            .map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(got)
    });
    let client_side =
        tokio::task::spawn_blocking(move || coalescing_client(addr, client, after_handshake))
            .await
            .unwrap();
    (server_side.await.unwrap(), client_side)
}

/// A KeyUpdate asking for ours, in the same write as the client's Finished:
/// rustls must not process it during the handshake (it would move its send key
/// and park the reply where the hand-over to the record layer does not look);
/// the record layer follows it and answers before its next record.
#[tokio::test]
async fn key_update_in_the_clients_last_flight_is_followed_and_answered() {
    let (server, client) = coalesced_exchange(|conn| {
        conn.refresh_traffic_keys().unwrap();
        conn.writer().write_all(b"hello").unwrap();
    })
    .await;
    assert_eq!(server.unwrap(), b"hello");
    assert_eq!(client.unwrap(), b"pong!");
}

/// Data and a close_notify in the same write as the client's Finished.
#[tokio::test]
async fn data_and_close_in_the_clients_last_flight_are_read() {
    let (server, client) = coalesced_exchange(|conn| {
        conn.writer().write_all(b"hello").unwrap();
        conn.send_close_notify();
    })
    .await;
    assert_eq!(server.unwrap(), b"hello");
    assert_eq!(client.unwrap(), b"pong!");
}
