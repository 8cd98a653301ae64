//! `vigo-perf tls`: the TLS layer of the data path alone, to choose how the
//! daemon drives rustls (issue 3: "rustls's unbuffered API driven by your own
//! IO loop, or tokio-rustls with its one extra copy — choose by measurement").
//!
//! One stream of `Data` frames (the wire's 24-byte header, then a 2–14 KiB
//! payload from a 64 MiB buffer, like a chunk from a mapped sealed file) goes
//! from a TLS server thread to a TLS client thread over loopback, with the
//! daemon's own rustls configs (host keys, mutual auth, TLS 1.3, AES-128-GCM). Each
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
//! - `buffered_big_reads`: `buffered` over a 256 KiB read buffer under
//!   rustls (which asks the socket for at most one record at a time).
//! - `record_layer`: the daemon's own path (`agent::tls`, `agent::record`):
//!   rustls does the handshake and hands over the traffic secrets
//!   (`dangerous_into_kernel_connection`, the kernel-TLS entry point); the
//!   sender copies frames once into each record and seals it in place, the
//!   receiver reads the socket straight into a frame decoder's buffer and
//!   opens each record where it lies (`open_within`: decryption and the move
//!   over the record framing are one pass), decodes the frames and hands the
//!   buffer over as a batch, as the daemon's reader does. On a
//!   current-thread tokio runtime per thread.
//!
//! Figures: each contender's rate per CPU-second of both threads together
//! (`*_gb_per_cpu_s`) and the CPU ratios against `buffered` (bigger is
//! better: buffered CPU / contender CPU).

use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use agent::identity::HostKey;
use agent::tls::{self, AllowList, Unbuffered};
use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use substrate::wire::{self, Decoder, Limits, RequestId};

use crate::harness::{self, CommonArgs, Report, ResultRow, size_label};

/// A `Data` frame's header.
const FRAME_HEADER_BYTES: usize = wire::DATA_HEADER_BYTES;
/// The record layer's handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Payload sizes, uniform between these: 8 KiB on average, like chunks.
const PAYLOAD_MIN: usize = 2 << 10;
const PAYLOAD_MAX: usize = 14 << 10;
/// The sender's payloads come from this much generated data, cycled.
const SOURCE_BYTES: usize = 64 << 20;
/// What the daemon buffered in front of rustls (a `BufWriter`) before it
/// owned its records: the rustls contenders' write buffer.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// The daemon's limit on one read (`conn::READ_BYTES`).
const READ_BYTES: usize = 256 << 10;
/// The daemon's receive batch.
const BATCH_BYTES: usize = 1 << 20;
/// Room for one whole record on the wire.
const RECORD_WIRE_MAX: usize = agent::record::WIRE_MAX;

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
            Path::Buffered => "rustls buffered (what tokio-rustls drives)",
            Path::BufferedBigReads => "rustls buffered over a 256 KiB read buffer",
            Path::Unbuffered => "rustls unbuffered API",
            Path::RecordLayer => "the daemon's: records opened in place (agent::record)",
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

/// The frames of a `total`-byte stream, the same for every contender: real
/// `Data` frames (`wire::data_header` and a payload), the last one sized to end
/// exactly at `total`.
fn frames(source: &[u8], total: u64) -> impl Iterator<Item = ([u8; FRAME_HEADER_BYTES], &[u8])> {
    let mut sent = 0u64;
    let mut at = 0usize;
    let mut draw = 0x2545_f491_4f6c_dd1du64;
    let mut index = 0u64;
    std::iter::from_fn(move || {
        let left = total - sent;
        if left == 0 {
            return None;
        }
        draw = draw
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let mut len = PAYLOAD_MIN + (draw >> 33) as usize % (PAYLOAD_MAX - PAYLOAD_MIN + 1);
        // What would be left after this frame could not hold another one
        // (a header and a byte): this frame takes it.
        if left < (FRAME_HEADER_BYTES + len + FRAME_HEADER_BYTES + 1) as u64 {
            len = (left as usize).saturating_sub(FRAME_HEADER_BYTES);
        }
        if at + len > source.len() {
            at = 0;
        }
        let header = wire::data_header(RequestId(1), index, len, &Limits::DEFAULT)
            .expect("payloads are far below the frame limit");
        let payload = &source[at..at + len];
        sent += (FRAME_HEADER_BYTES + len) as u64;
        at += len;
        index += 1;
        Some((header, payload))
    })
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
                Path::Unbuffered => {
                    send_unbuffered(UnbufferedServerConnection::new(server)?, tcp, source, total)
                }
                Path::RecordLayer => send_records(server, tcp, source, total),
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
                Path::Unbuffered => receive_unbuffered(
                    UnbufferedClientConnection::new(client, server_name())?,
                    tcp,
                    &mut sink,
                )?,
                Path::RecordLayer => receive_records(client, tcp, &mut sink)?,
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
        for (header, payload) in frames(source, total) {
            out.write_all(&header)?;
            out.write_all(payload)?;
        }
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

/// Handles the states that only move TLS bytes rustls made out (encode, then
/// transmit): `None` when it did, the state itself when it is the caller's.
fn move_handshake_bytes<'c, 'i, D>(
    state: Result<ConnectionState<'c, 'i, D>, rustls::Error>,
    tcp: &mut TcpStream,
    outgoing: &mut [u8],
    out_used: &mut usize,
) -> Result<Option<ConnectionState<'c, 'i, D>>> {
    match state.map_err(tls_error)? {
        ConnectionState::EncodeTlsData(mut s) => {
            *out_used += s
                .encode(&mut outgoing[*out_used..])
                .map_err(|e| anyhow!("TLS encode: {e:?}"))?;
            Ok(None)
        }
        ConnectionState::TransmitTlsData(s) => {
            tcp.write_all(&outgoing[..*out_used])?;
            *out_used = 0;
            s.done();
            Ok(None)
        }
        other => Ok(Some(other)),
    }
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
        let ready = match move_handshake_bytes(state, tcp, outgoing, out_used)? {
            None => None,
            Some(ConnectionState::BlockedHandshake) => Some(false),
            Some(ConnectionState::WriteTraffic(_)) => Some(true),
            Some(other) => bail!("unexpected TLS state during the handshake: {other:?}"),
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
) -> Result<f64> {
    let mut io = Io::new(tcp);
    handshake(&mut conn, &mut io)?;
    let cpu = thread_cpu_seconds()?;
    let mut staging = Vec::with_capacity(WRITE_BUFFER_BYTES);
    for (header, payload) in frames(source, total) {
        for mut part in [&header[..], payload] {
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
    }
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
        let written = match move_handshake_bytes(state, tcp, outgoing, out_used)? {
            None => false,
            Some(ConnectionState::WriteTraffic(mut w)) => {
                let n = match plain {
                    Some(plain) => w.encrypt(plain, outgoing),
                    None => w.queue_close_notify(outgoing),
                }
                .map_err(|e| anyhow!("TLS encrypt: {e:?}"))?;
                tcp.write_all(&outgoing[..n])?;
                true
            }
            Some(other) => bail!("unexpected TLS state while sending: {other:?}"),
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
) -> Result<(f64, f64)> {
    let mut io = Io::new(tcp);
    handshake(&mut conn, &mut io)?;
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
        let next = match move_handshake_bytes(state, tcp, outgoing, out_used)? {
            None => Some(false),
            Some(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    batch.push(record.payload, sink);
                }
                Some(false)
            }
            // Every record that arrived is processed: read more.
            Some(ConnectionState::WriteTraffic(_)) => Some(true),
            Some(ConnectionState::PeerClosed | ConnectionState::Closed) => None,
            Some(other) => bail!("unexpected TLS state while receiving: {other:?}"),
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

/// The daemon's own TLS layer (`agent::tls`, `agent::record`) on a
/// current-thread runtime: the sender writes frames into its `RecordWriter`,
/// the receiver reads records straight into a frame decoder, decodes the
/// frames and hands the decoder's buffer over as a batch once it holds
/// `BATCH_BYTES`, as the daemon's reader does.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn send_records(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    source: &[u8],
    total: u64,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.set_nonblocking(true)?;
    runtime()?.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let (stream, _) = tls::accept(&config, tcp, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let (mut reader, mut writer) = stream.into_split();
        let cpu = thread_cpu_seconds()?;
        for (header, payload) in frames(source, total) {
            writer.write_all(&header).await?;
            writer.write_all(payload).await?;
        }
        writer.shutdown().await?;
        let cpu = thread_cpu_seconds()? - cpu;
        // The receiver closes when it has everything.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        Ok(cpu)
    })
}

fn receive_records(
    config: Arc<ClientConfig>,
    tcp: TcpStream,
    sink: &mut Sink,
) -> Result<(f64, f64)> {
    tcp.set_nonblocking(true)?;
    runtime()?.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let (stream, _) = tls::connect(&config, tcp, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let (mut reader, writer) = stream.into_split();
        let (started, cpu) = (Instant::now(), thread_cpu_seconds()?);
        let mut decoder = Decoder::new(Limits::DEFAULT);
        let mut spare = Vec::with_capacity(BATCH_BYTES + READ_BYTES);
        while reader.read_into(&mut decoder, true, READ_BYTES).await? {
            let mut consumed = 0;
            while let Some((at, _)) = decoder.poll_frame_at()? {
                consumed = at.end;
            }
            if consumed >= BATCH_BYTES {
                let batch = decoder.take_consumed(std::mem::take(&mut spare));
                sink.batch(&batch);
                spare = batch;
            }
        }
        let batch = decoder.take_consumed(Vec::new());
        sink.batch(&batch);
        ensure!(
            decoder.buffered_bytes() == 0,
            "{} bytes after the last frame",
            decoder.buffered_bytes()
        );
        drop(writer);
        Ok((started.elapsed().as_secs_f64(), thread_cpu_seconds()? - cpu))
    })
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
            for (h, p) in frames(&source, total) {
                expected.update(&h);
                expected.update(p);
            }
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
}
