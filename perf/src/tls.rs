//! `vigo-perf tls`: the TLS layer of the data path alone, to choose how the
//! daemon drives rustls (issue 3: "rustls's unbuffered API driven by your own
//! IO loop, or tokio-rustls with its one extra copy — choose by measurement").
//!
//! One stream of `Data`-like frames (a 24-byte header, then a 2–14 KiB payload
//! from a 64 MiB buffer, like a chunk from a mapped sealed file) goes from a
//! TLS server thread to a TLS client thread over loopback, with the daemon's
//! own rustls configs (host keys, mutual auth, TLS 1.3, AES-128-GCM). Each
//! side counts its thread's CPU time from the end of the handshake; the wall
//! time is the receiver's, to the close_notify. Contenders, alternated within
//! each round after one warm-up round:
//!
//! - `buffered`: `rustls::StreamOwned`, which is what tokio-rustls drives. The
//!   sender writes frames through a 256 KiB `BufWriter` (the daemon's), rustls
//!   copies each record's plaintext into a record of its own and encrypts it
//!   there; the receiver reads at most 256 KiB at a time into a 1 MiB batch
//!   (the daemon's `READ_BYTES` and batch), and rustls copies each decrypted
//!   record into a buffer of its own before that read copies it again.
//! - `unbuffered`: rustls's unbuffered API over the same buffers. Its
//!   `encrypt` copies plaintext into the caller's buffer and encrypts it
//!   there; its `ReadTraffic` hands out records that rustls 0.23 still
//!   decrypts into an owned `Vec` each (the source marks in-place decryption
//!   as a TODO), copied from there into the batch.
//! - `record layer`: rustls does the handshake (unbuffered API) and hands over
//!   the traffic secrets (`dangerous_into_kernel_connection`, the kernel-TLS
//!   entry point); the records are then sealed and opened here with *ring*,
//!   as a kTLS socket would do it in the kernel. The sender builds each
//!   record's plaintext straight from the frames (one copy, then encryption
//!   in place); the receiver reads the socket straight into the batch and
//!   decrypts each record where it lies, shifted over the record framing
//!   (`open_within`: decryption and the move are one pass), so the plaintext
//!   is never copied. This is the bound on what owning the record layer
//!   could save; the daemon does not ship it.
//!
//! Figures: each contender's rate per CPU-second of both threads together
//! (`*_gb_per_cpu_s`) and the CPU ratios against `buffered` (bigger is
//! better: buffered CPU / contender CPU).

use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use agent::identity::HostKey;
use agent::tls::{self, AllowList};
use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use ring::aead;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};

use crate::harness::{self, CommonArgs, Report, ResultRow, size_label};

/// Bytes of the stand-in for a `Data` frame's header.
const FRAME_HEADER_BYTES: usize = 24;
/// Payload sizes, uniform between these: 8 KiB on average, like chunks.
const PAYLOAD_MIN: usize = 2 << 10;
const PAYLOAD_MAX: usize = 14 << 10;
/// The sender's payloads come from this much generated data, cycled.
const SOURCE_BYTES: usize = 64 << 20;
/// The daemon's `BufWriter` in front of the TLS stream.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// The daemon's limit on one read (`conn::READ_BYTES`).
const READ_BYTES: usize = 256 << 10;
/// The daemon's receive batch.
const BATCH_BYTES: usize = 1 << 20;
/// TLS 1.3 record sizes (RFC 8446 §5.1–5.2).
const RECORD_HEADER_BYTES: usize = 5;
const RECORD_PLAINTEXT_MAX: usize = 1 << 14;
const RECORD_CIPHERTEXT_MAX: usize = RECORD_PLAINTEXT_MAX + 256;
const TAG_BYTES: usize = 16;
const CONTENT_APPLICATION_DATA: u8 = 23;
const CONTENT_ALERT: u8 = 21;
/// Room for one whole record on the wire.
const RECORD_WIRE_MAX: usize = RECORD_HEADER_BYTES + RECORD_CIPHERTEXT_MAX;

#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Bytes sent per run (frames and payloads together).
    #[arg(long, default_value = "4G", value_parser = harness::size_arg)]
    pub size: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Buffered,
    BufferedBigReads,
    Unbuffered,
    RecordLayer,
}

impl Path {
    const ALL: [Path; 4] = [
        Path::Buffered,
        Path::BufferedBigReads,
        Path::Unbuffered,
        Path::RecordLayer,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Buffered => "buffered",
            Path::BufferedBigReads => "buffered_big_reads",
            Path::Unbuffered => "unbuffered",
            Path::RecordLayer => "record_layer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path::Buffered => "rustls buffered (tokio-rustls's path, the daemon's)",
            Path::BufferedBigReads => "rustls buffered over a 256 KiB read buffer",
            Path::Unbuffered => "rustls unbuffered API",
            Path::RecordLayer => "own record layer over rustls's secrets",
        }
    }
}

/// One run of one contender.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    wall_s: f64,
    sender_cpu_s: f64,
    receiver_cpu_s: f64,
    bytes: u64,
    /// BLAKE3 of what was received, when asked for (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    hash: Option<[u8; 32]>,
}

/// The daemon's TLS configs for a sender (server) and a receiver (client) that
/// admit each other; with secret extraction on, which the record layer needs
/// and the other paths ignore.
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Configs {
    fn new() -> Result<Configs> {
        let sender = HostKey::generate()?;
        let receiver = HostKey::generate()?;
        let mut server =
            (*tls::server_config(&sender, Arc::new(AllowList::new([receiver.public()])))?).clone();
        server.enable_secret_extraction = true;
        let mut client =
            (*tls::client_config(&receiver, Arc::new(AllowList::new([sender.public()])))?).clone();
        client.enable_secret_extraction = true;
        Ok(Configs {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

pub fn run(args: TlsArgs) -> Result<()> {
    ensure!(args.size > 0, "--size must be more than zero");
    let mut report = Report::new("tls");
    report.param("size_bytes", args.size);
    report.param("runs", args.common.runs);
    report.param("frame_header_bytes", FRAME_HEADER_BYTES);
    report.param("payload_bytes_min", PAYLOAD_MIN);
    report.param("payload_bytes_max", PAYLOAD_MAX);
    let configs = Configs::new()?;
    let source = Arc::new(source_data());
    let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); Path::ALL.len()];
    for round in 0..=args.common.runs {
        for (i, path) in Path::ALL.into_iter().enumerate() {
            let outcome = run_once(path, path, &configs, &source, args.size, false)
                .with_context(|| format!("{} run", path.name()))?;
            ensure!(
                outcome.bytes == args.size,
                "{} delivered {} bytes of {}",
                path.name(),
                outcome.bytes,
                args.size
            );
            eprintln!(
                "{} {:<13} {:6.3} s wall, CPU s sender {:6.3} receiver {:6.3}",
                if round == 0 { "warm-up" } else { "run    " },
                path.name(),
                outcome.wall_s,
                outcome.sender_cpu_s,
                outcome.receiver_cpu_s
            );
            if round > 0 {
                outcomes[i].push(outcome);
            }
        }
    }
    let mut cpu_medians = Vec::new();
    for (path, runs) in Path::ALL.into_iter().zip(&outcomes) {
        let walls: Vec<f64> = runs.iter().map(|o| o.wall_s).collect();
        let sender = median(runs.iter().map(|o| o.sender_cpu_s));
        let receiver = median(runs.iter().map(|o| o.receiver_cpu_s));
        let cpu = median(runs.iter().map(|o| o.sender_cpu_s + o.receiver_cpu_s));
        let mut row = ResultRow::new(path.label(), &walls).with_bytes(args.size);
        row.extra
            .insert("sender_cpu_s_median".into(), sender.into());
        row.extra
            .insert("receiver_cpu_s_median".into(), receiver.into());
        row.extra.insert("cpu_s_median".into(), cpu.into());
        report.results.push(row);
        report.ratios.insert(
            format!("tls_{}_gb_per_cpu_s", path.name()),
            Some(args.size as f64 / 1e9 / cpu),
        );
        cpu_medians.push((path, sender, receiver, cpu));
    }
    let (_, base_sender, base_receiver, base_cpu) = cpu_medians[0];
    for &(path, sender, receiver, cpu) in &cpu_medians[1..] {
        let name = path.name();
        report
            .ratios
            .insert(format!("tls_{name}_vs_buffered_cpu"), Some(base_cpu / cpu));
        report.ratios.insert(
            format!("tls_{name}_vs_buffered_sender_cpu"),
            Some(base_sender / sender),
        );
        report.ratios.insert(
            format!("tls_{name}_vs_buffered_receiver_cpu"),
            Some(base_receiver / receiver),
        );
    }
    report.notes.push(format!(
        "{} per run; CPU is each thread's (user + system, /proc/thread-self/schedstat) from the end of the handshake",
        size_label(args.size)
    ));
    report.emit(args.common.json)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let samples: Vec<f64> = values.collect();
    harness::Stats::of(&samples).map_or(f64::NAN, |s| s.median)
}

/// Generated payload bytes (xorshift; no compression anywhere, so any bytes do).
fn source_data() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(SOURCE_BYTES);
    while data.len() < SOURCE_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data
}

/// Calls `emit(header, payload)` for each frame of a `total`-byte stream: the
/// same frames for every contender. The last one is cut to end at `total`.
fn for_each_frame(
    source: &[u8],
    total: u64,
    mut emit: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut sent = 0u64;
    let mut at = 0usize;
    let mut draw = 0x2545_f491_4f6c_dd1du64;
    let mut index = 0u64;
    while sent < total {
        draw = draw
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let len = PAYLOAD_MIN + (draw >> 33) as usize % (PAYLOAD_MAX - PAYLOAD_MIN + 1);
        if at + len > source.len() {
            at = 0;
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header[..8].copy_from_slice(&index.to_le_bytes());
        header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let left = total - sent;
        let header_len = (FRAME_HEADER_BYTES as u64).min(left) as usize;
        let payload_len = (len as u64).min(left - header_len as u64) as usize;
        emit(&header[..header_len], &source[at..at + payload_len])?;
        sent += (header_len + payload_len) as u64;
        at += len;
        index += 1;
    }
    Ok(())
}

/// CPU time this thread has run, user and system (`/proc/thread-self/schedstat`).
fn thread_cpu_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("cannot read /proc/thread-self/schedstat")?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .context("unexpected /proc/thread-self/schedstat")?;
    Ok(ns as f64 / 1e9)
}

/// Where the receiver's batches go: counted, and hashed when `hash` (tests).
struct Sink {
    bytes: u64,
    hasher: Option<blake3::Hasher>,
}

impl Sink {
    fn new(hash: bool) -> Sink {
        Sink {
            bytes: 0,
            hasher: hash.then(blake3::Hasher::new),
        }
    }

    fn batch(&mut self, plain: &[u8]) {
        self.bytes += plain.len() as u64;
        if let Some(h) = &mut self.hasher {
            h.update(plain);
        }
    }
}

/// A 1 MiB batch the receiver copies plaintext into, handed to the sink when full.
struct Batch {
    buf: Vec<u8>,
    len: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0; BATCH_BYTES],
            len: 0,
        }
    }

    fn push(&mut self, mut plain: &[u8], sink: &mut Sink) {
        while !plain.is_empty() {
            let take = (BATCH_BYTES - self.len).min(plain.len());
            self.buf[self.len..self.len + take].copy_from_slice(&plain[..take]);
            self.len += take;
            plain = &plain[take..];
            if self.len == BATCH_BYTES {
                sink.batch(&self.buf);
                self.len = 0;
            }
        }
    }

    fn finish(&mut self, sink: &mut Sink) {
        sink.batch(&self.buf[..self.len]);
        self.len = 0;
    }
}

/// One stream from a sender driving rustls the `send` way to a receiver
/// driving it the `receive` way (the bench pairs like with like; the tests
/// pair every way with every other, so the record layer is checked against
/// rustls's own).
fn run_once(
    send: Path,
    receive: Path,
    configs: &Configs,
    source: &Arc<Vec<u8>>,
    total: u64,
    hash: bool,
) -> Result<Outcome> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| -> Result<f64> {
            let (tcp, _) = listener.accept().context("accept")?;
            tcp.set_nodelay(true)?;
            let server = configs.server.clone();
            match send {
                Path::Buffered | Path::BufferedBigReads => {
                    send_buffered(server, tcp, source, total)
                }
                Path::Unbuffered | Path::RecordLayer => send_unbuffered(
                    UnbufferedServerConnection::new(server)?,
                    tcp,
                    source,
                    total,
                    send == Path::RecordLayer,
                ),
            }
        });
        let receiver = scope.spawn(|| -> Result<(f64, f64, Sink)> {
            let tcp = TcpStream::connect(addr).context("connect")?;
            tcp.set_nodelay(true)?;
            let client = configs.client.clone();
            let mut sink = Sink::new(hash);
            let (wall, cpu) = match receive {
                Path::Buffered => receive_buffered(client, tcp, &mut sink)?,
                Path::BufferedBigReads => receive_buffered(client, BigReads::new(tcp)?, &mut sink)?,
                Path::Unbuffered | Path::RecordLayer => receive_unbuffered(
                    UnbufferedClientConnection::new(client, server_name())?,
                    tcp,
                    &mut sink,
                    receive == Path::RecordLayer,
                )?,
            };
            Ok((wall, cpu, sink))
        });
        let receiver = receiver
            .join()
            .map_err(|_| anyhow!("receiver thread panicked"))?;
        let sender = sender
            .join()
            .map_err(|_| anyhow!("sender thread panicked"))?;
        let (wall_s, receiver_cpu_s, sink) = receiver.context("receiver")?;
        let sender_cpu_s = sender.context("sender")?;
        Ok(Outcome {
            wall_s,
            sender_cpu_s,
            receiver_cpu_s,
            bytes: sink.bytes,
            hash: sink.hasher.map(|h| *h.finalize().as_bytes()),
        })
    })
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(tls::SERVER_NAME).expect("a valid DNS name")
}

/// After its close_notify: no more writes, then wait for the receiver to close
/// (so that the last bytes are read before either socket goes away).
fn finish_sending(mut tcp: &TcpStream) -> Result<()> {
    tcp.shutdown(Shutdown::Write)?;
    let mut scratch = [0u8; 4096];
    while tcp.read(&mut scratch)? > 0 {}
    Ok(())
}

// ------------------------------------------------------------ buffered

fn send_buffered(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    source: &[u8],
    total: u64,
) -> Result<f64> {
    let conn = rustls::ServerConnection::new(config)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let cpu = thread_cpu_seconds()?;
    {
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &mut tls);
        for_each_frame(source, total, |header, payload| {
            out.write_all(header)?;
            out.write_all(payload)?;
            Ok(())
        })?;
        out.flush()?;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    let cpu = thread_cpu_seconds()? - cpu;
    finish_sending(&tls.sock)?;
    Ok(cpu)
}

/// A socket read through a `READ_BYTES` buffer: rustls asks for at most one
/// record (~16 KiB) per read, this asks the kernel for up to 256 KiB.
struct BigReads {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl BigReads {
    fn new(tcp: TcpStream) -> Result<BigReads> {
        Ok(BigReads {
            writer: tcp.try_clone()?,
            reader: std::io::BufReader::with_capacity(READ_BYTES, tcp),
        })
    }
}

impl Read for BigReads {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for BigReads {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

fn receive_buffered<S: Read + Write>(
    config: Arc<ClientConfig>,
    tcp: S,
    sink: &mut Sink,
) -> Result<(f64, f64)> {
    let conn = rustls::ClientConnection::new(config, server_name())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let (started, cpu) = (Instant::now(), thread_cpu_seconds()?);
    let mut batch = Batch::new();
    loop {
        let end = (batch.len + READ_BYTES).min(BATCH_BYTES);
        let n = tls.read(&mut batch.buf[batch.len..end])?;
        if n == 0 {
            break;
        }
        batch.len += n;
        if batch.len == BATCH_BYTES {
            sink.batch(&batch.buf);
            batch.len = 0;
        }
    }
    batch.finish(sink);
    let measured = (started.elapsed().as_secs_f64(), thread_cpu_seconds()? - cpu);
    Ok(measured)
}

// ------------------------------------------------------------ unbuffered

/// Both sides of rustls's unbuffered API (its `process_tls_records` is written
/// once per side, not behind a trait).
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_secrets(self) -> Result<rustls::ExtractedSecrets>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_secrets(self) -> Result<rustls::ExtractedSecrets> {
        Ok(self.dangerous_into_kernel_connection()?.0)
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_secrets(self) -> Result<rustls::ExtractedSecrets> {
        Ok(self.dangerous_into_kernel_connection()?.0)
    }
}

/// The socket and the two buffers an unbuffered connection works on.
struct Io {
    tcp: TcpStream,
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
    out_used: usize,
}

impl Io {
    fn new(tcp: TcpStream) -> Io {
        Io {
            tcp,
            incoming: vec![0; READ_BYTES + RECORD_WIRE_MAX],
            used: 0,
            outgoing: vec![0; WRITE_BUFFER_BYTES + (64 << 10)],
            out_used: 0,
        }
    }

    fn discard(&mut self, n: usize) {
        self.incoming.copy_within(n..self.used, 0);
        self.used -= n;
    }

    /// Reads what has arrived, at most `READ_BYTES`.
    fn fill(&mut self) -> Result<()> {
        let end = (self.used + READ_BYTES).min(self.incoming.len());
        ensure!(end > self.used, "incoming TLS buffer full");
        let n = self.tcp.read(&mut self.incoming[self.used..end])?;
        ensure!(n > 0, "peer closed the connection without close_notify");
        self.used += n;
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> anyhow::Error {
    anyhow!("TLS: {e}")
}

/// Drives the handshake until application data may be written.
fn handshake<C: Unbuffered>(conn: &mut C, io: &mut Io) -> Result<()> {
    loop {
        let Io {
            tcp,
            incoming,
            used,
            outgoing,
            out_used,
        } = io;
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..*used]);
        let ready = match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut s) => {
                *out_used += s
                    .encode(&mut outgoing[*out_used..])
                    .map_err(|e| anyhow!("TLS encode: {e:?}"))?;
                None
            }
            ConnectionState::TransmitTlsData(s) => {
                tcp.write_all(&outgoing[..*out_used])?;
                *out_used = 0;
                s.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(false),
            ConnectionState::WriteTraffic(_) => Some(true),
            other => bail!("unexpected TLS state during the handshake: {other:?}"),
        };
        io.discard(discard);
        match ready {
            Some(true) => return Ok(()),
            Some(false) => io.fill()?,
            None => {}
        }
    }
}

fn send_unbuffered<C: Unbuffered>(
    mut conn: C,
    tcp: TcpStream,
    source: &[u8],
    total: u64,
    record_layer: bool,
) -> Result<f64> {
    let mut io = Io::new(tcp);
    handshake(&mut conn, &mut io)?;
    if record_layer {
        return send_records(conn.into_secrets()?.tx, io.tcp, source, total);
    }
    let cpu = thread_cpu_seconds()?;
    let mut staging = Vec::with_capacity(WRITE_BUFFER_BYTES);
    for_each_frame(source, total, |header, payload| {
        for mut part in [header, payload] {
            while !part.is_empty() {
                let take = (WRITE_BUFFER_BYTES - staging.len()).min(part.len());
                staging.extend_from_slice(&part[..take]);
                part = &part[take..];
                if staging.len() == WRITE_BUFFER_BYTES {
                    write_traffic(&mut conn, &mut io, Some(&staging))?;
                    staging.clear();
                }
            }
        }
        Ok(())
    })?;
    write_traffic(&mut conn, &mut io, Some(&staging))?;
    write_traffic(&mut conn, &mut io, None)?;
    let cpu = thread_cpu_seconds()? - cpu;
    finish_sending(&io.tcp)?;
    Ok(cpu)
}

/// Encrypts `plain` (a close_notify when `None`) and writes it out.
fn write_traffic<C: Unbuffered>(conn: &mut C, io: &mut Io, plain: Option<&[u8]>) -> Result<()> {
    loop {
        let Io {
            tcp,
            incoming,
            used,
            outgoing,
            out_used,
        } = io;
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..*used]);
        let written = match state.map_err(tls_error)? {
            ConnectionState::WriteTraffic(mut w) => {
                let n = match plain {
                    Some(plain) => w.encrypt(plain, outgoing),
                    None => w.queue_close_notify(outgoing),
                }
                .map_err(|e| anyhow!("TLS encrypt: {e:?}"))?;
                tcp.write_all(&outgoing[..n])?;
                true
            }
            ConnectionState::EncodeTlsData(mut s) => {
                *out_used += s
                    .encode(&mut outgoing[*out_used..])
                    .map_err(|e| anyhow!("TLS encode: {e:?}"))?;
                false
            }
            ConnectionState::TransmitTlsData(s) => {
                tcp.write_all(&outgoing[..*out_used])?;
                *out_used = 0;
                s.done();
                false
            }
            other => bail!("unexpected TLS state while sending: {other:?}"),
        };
        io.discard(discard);
        if written {
            return Ok(());
        }
    }
}

fn receive_unbuffered<C: Unbuffered>(
    mut conn: C,
    tcp: TcpStream,
    sink: &mut Sink,
    record_layer: bool,
) -> Result<(f64, f64)> {
    let mut io = Io::new(tcp);
    handshake(&mut conn, &mut io)?;
    if record_layer {
        return receive_records(conn.into_secrets()?.rx, io, sink);
    }
    let (started, cpu) = (Instant::now(), thread_cpu_seconds()?);
    let mut batch = Batch::new();
    loop {
        let Io {
            tcp,
            incoming,
            used,
            outgoing,
            out_used,
        } = &mut io;
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..*used]);
        let next = match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    batch.push(record.payload, sink);
                }
                Some(false)
            }
            // Every record that arrived is processed: read more.
            ConnectionState::WriteTraffic(_) => Some(true),
            ConnectionState::EncodeTlsData(mut s) => {
                *out_used += s
                    .encode(&mut outgoing[*out_used..])
                    .map_err(|e| anyhow!("TLS encode: {e:?}"))?;
                Some(false)
            }
            ConnectionState::TransmitTlsData(s) => {
                tcp.write_all(&outgoing[..*out_used])?;
                *out_used = 0;
                s.done();
                Some(false)
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => None,
            other => bail!("unexpected TLS state while receiving: {other:?}"),
        };
        io.discard(discard);
        match next {
            Some(true) => io.fill()?,
            Some(false) => {}
            None => break,
        }
    }
    batch.finish(sink);
    let measured = (started.elapsed().as_secs_f64(), thread_cpu_seconds()? - cpu);
    Ok(measured)
}

// ------------------------------------------------------------ record layer

/// One direction's AEAD key, static IV and record sequence number
/// (RFC 8446 §5.3: the nonce is the IV xor the sequence number).
struct RecordKey {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl RecordKey {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<RecordKey> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => bail!("a cipher suite this record layer does not know"),
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| anyhow!("a traffic key of the wrong length"))?;
        Ok(RecordKey {
            key: aead::LessSafeKey::new(key),
            iv: iv
                .as_ref()
                .try_into()
                .context("a traffic IV of the wrong length")?,
            seq,
        })
    }

    fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }
}

/// A TLS 1.3 record header: always application data on the wire (§5.2).
fn record_header(ciphertext_len: usize) -> [u8; RECORD_HEADER_BYTES] {
    let [hi, lo] = (ciphertext_len as u16).to_be_bytes();
    [CONTENT_APPLICATION_DATA, 3, 3, hi, lo]
}

/// Records built in place: each record's plaintext is copied once from the
/// frames into `out`, behind room for its header, and encrypted there.
struct RecordWriter {
    key: RecordKey,
    out: Vec<u8>,
    len: usize,
    /// Where the record being filled starts (its header).
    open: Option<usize>,
}

impl RecordWriter {
    fn push(&mut self, mut plain: &[u8], tcp: &mut TcpStream) -> Result<()> {
        while !plain.is_empty() {
            let start = *self.open.get_or_insert_with(|| {
                self.len += RECORD_HEADER_BYTES;
                self.len - RECORD_HEADER_BYTES
            });
            let room = RECORD_PLAINTEXT_MAX - (self.len - start - RECORD_HEADER_BYTES);
            let take = room.min(plain.len());
            self.out[self.len..self.len + take].copy_from_slice(&plain[..take]);
            self.len += take;
            plain = &plain[take..];
            if take == room {
                self.seal(CONTENT_APPLICATION_DATA)?;
                if self.len >= WRITE_BUFFER_BYTES {
                    self.flush(tcp)?;
                }
            }
        }
        Ok(())
    }

    /// Ends the open record: its inner content type, header and tag.
    fn seal(&mut self, content_type: u8) -> Result<()> {
        let Some(start) = self.open.take() else {
            return Ok(());
        };
        self.out[self.len] = content_type;
        self.len += 1;
        let body = start + RECORD_HEADER_BYTES;
        let header = record_header(self.len - body + TAG_BYTES);
        self.out[start..body].copy_from_slice(&header);
        let nonce = self.key.next_nonce();
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut self.out[body..self.len],
            )
            .map_err(|_| anyhow!("sealing a record failed"))?;
        self.out[self.len..self.len + TAG_BYTES].copy_from_slice(tag.as_ref());
        self.len += TAG_BYTES;
        Ok(())
    }

    fn flush(&mut self, tcp: &mut TcpStream) -> Result<()> {
        tcp.write_all(&self.out[..self.len])?;
        self.len = 0;
        Ok(())
    }

    /// The last partial record, then a close_notify alert (warning, 0).
    fn close(&mut self, tcp: &mut TcpStream) -> Result<()> {
        self.seal(CONTENT_APPLICATION_DATA)?;
        self.open = Some(self.len);
        self.len += RECORD_HEADER_BYTES;
        self.out[self.len..self.len + 2].copy_from_slice(&[1, 0]);
        self.len += 2;
        self.seal(CONTENT_ALERT)?;
        self.flush(tcp)
    }
}

fn send_records(
    tx: (u64, ConnectionTrafficSecrets),
    mut tcp: TcpStream,
    source: &[u8],
    total: u64,
) -> Result<f64> {
    let cpu = thread_cpu_seconds()?;
    let mut records = RecordWriter {
        key: RecordKey::new(tx)?,
        out: vec![0; WRITE_BUFFER_BYTES + 2 * RECORD_WIRE_MAX],
        len: 0,
        open: None,
    };
    for_each_frame(source, total, |header, payload| {
        records.push(header, &mut tcp)?;
        records.push(payload, &mut tcp)
    })?;
    records.close(&mut tcp)?;
    let cpu = thread_cpu_seconds()? - cpu;
    finish_sending(&tcp)?;
    Ok(cpu)
}

/// Reads the socket straight into the batch and opens each record where it
/// lies, its plaintext moved down over the framing of the records before it
/// (`open_within`), so the batch fills with plaintext and nothing is copied
/// but the partial record at a batch's end.
fn receive_records(
    rx: (u64, ConnectionTrafficSecrets),
    io: Io,
    sink: &mut Sink,
) -> Result<(f64, f64)> {
    let (started, cpu) = (Instant::now(), thread_cpu_seconds()?);
    let mut key = RecordKey::new(rx)?;
    let capacity = BATCH_BYTES + READ_BYTES + RECORD_WIRE_MAX;
    let mut buf = vec![0u8; capacity];
    // What arrived with the end of the handshake.
    buf[..io.used].copy_from_slice(&io.incoming[..io.used]);
    let (mut plain, mut raw_start, mut raw_end) = (0, 0, io.used);
    let mut tcp = io.tcp;
    loop {
        let mut closed = false;
        while raw_end - raw_start >= RECORD_HEADER_BYTES {
            let header: [u8; RECORD_HEADER_BYTES] = buf[raw_start..raw_start + RECORD_HEADER_BYTES]
                .try_into()
                .expect("five bytes");
            ensure!(
                header[..3] == [CONTENT_APPLICATION_DATA, 3, 3],
                "not a TLS 1.3 record header: {header:?}"
            );
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            ensure!(
                (TAG_BYTES + 1..=RECORD_CIPHERTEXT_MAX).contains(&len),
                "a record of {len} bytes"
            );
            let end = raw_start + RECORD_HEADER_BYTES + len;
            if end > raw_end {
                break;
            }
            let nonce = key.next_nonce();
            let opened = key
                .key
                .open_within(
                    nonce,
                    aead::Aad::from(header),
                    &mut buf[plain..end],
                    raw_start + RECORD_HEADER_BYTES - plain..,
                )
                .map_err(|_| anyhow!("a record failed authentication"))?;
            let inner = opened
                .iter()
                .rposition(|&b| b != 0)
                .context("a record with no content type")?;
            let content_type = opened[inner];
            match content_type {
                CONTENT_APPLICATION_DATA => plain += inner,
                CONTENT_ALERT if opened[..inner] == [1, 0] => closed = true,
                other => bail!(
                    "a record of content type {other} ({:?})",
                    &opened[..inner.min(8)]
                ),
            }
            raw_start = end;
            if closed {
                break;
            }
        }
        if closed {
            sink.batch(&buf[..plain]);
            break;
        }
        if capacity - raw_end < READ_BYTES {
            sink.batch(&buf[..plain]);
            buf.copy_within(raw_start..raw_end, 0);
            raw_end -= raw_start;
            (plain, raw_start) = (0, 0);
        }
        let n = tcp.read(&mut buf[raw_end..raw_end + READ_BYTES])?;
        ensure!(n > 0, "peer closed the connection without close_notify");
        raw_end += n;
    }
    let measured = (started.elapsed().as_secs_f64(), thread_cpu_seconds()? - cpu);
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every contender delivers exactly the bytes of the frame stream to
    /// every other (so the record layer talks to rustls both ways), also for
    /// a size that ends inside a frame header and a partial record.
    #[test]
    fn every_path_delivers_the_frames_sent_to_every_path() {
        let configs = Configs::new().unwrap();
        let source = Arc::new(source_data());
        for total in [(3 << 20) + 7, 5 << 20] {
            let mut expected = blake3::Hasher::new();
            for_each_frame(&source, total, |h, p| {
                expected.update(h);
                expected.update(p);
                Ok(())
            })
            .unwrap();
            let expected = *expected.finalize().as_bytes();
            for send in Path::ALL {
                for receive in Path::ALL {
                    let pair = format!("{} to {}, {total} bytes", send.name(), receive.name());
                    let outcome =
                        run_once(send, receive, &configs, &source, total, true).expect(&pair);
                    assert_eq!(outcome.bytes, total, "{pair}");
                    assert_eq!(outcome.hash, Some(expected), "{pair}");
                }
            }
        }
    }

    /// The record layer's nonces: the IV xor the big-endian sequence number
    /// in its last eight bytes, the sequence number counting up.
    #[test]
    fn nonces_follow_rfc_8446() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([0xf0; 12]),
        };
        let mut key = RecordKey::new((0x0102, secrets)).unwrap();
        assert_eq!(
            key.next_nonce().as_ref(),
            &[
                0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf1, 0xf2
            ]
        );
        assert_eq!(key.next_nonce().as_ref()[11], 0xf3);
    }
}
