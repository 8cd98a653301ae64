//! TLS 1.3 records over the traffic secrets rustls hands over after the
//! handshake: what a kernel-TLS socket does in the kernel, done here in user
//! space so that received records are opened where they land.
//!
//! rustls does the handshake, the certificate checks and the key schedule
//! (`tls.rs`); `dangerous_into_kernel_connection` then gives each direction's
//! key, IV and sequence number, and keeps the state that derives the next keys
//! on a KeyUpdate. This module seals and opens the records (RFC 8446 §5) with
//! *ring*, the same AEAD rustls uses. Why (`vigo-perf tls`, 4 GiB over
//! loopback, receiver CPU): rustls's buffered path decrypts each record in its
//! own buffer, copies it into a `Vec` of its own and then into the reader's
//! buffer (2.96 CPU-s); its unbuffered API still makes the `Vec` copy (1.66);
//! records opened in place in the frame decoder's buffer make none (0.88).
//!
//! - Receiving ([`RecordReader::read_into`]): the socket is read straight into
//!   the `Decoder`'s buffer and every complete record is opened where it lies
//!   with `open_within`, which decrypts and moves the plaintext down over the
//!   framing of the records before it in one pass. What is not yet a complete
//!   record stays at the buffer's end as the decoder's transport tail
//!   (`Decoder::set_transport_held`), moved down over the framing of the
//!   records opened before it.
//! - Sending ([`RecordWriter`], an `AsyncWrite` that buffers like the
//!   `BufWriter` it replaces): bytes are copied once, straight into the open
//!   record's plaintext, and each full record is sealed in place.
//! - Only application data, a close_notify and KeyUpdate are accepted after
//!   the handshake; any other record (another alert, a handshake message, a
//!   record that fails authentication, a header that is not TLS 1.3's, a
//!   length over 2^14 + 256) ends the connection with the reason. A peer
//!   closing the socket without a close_notify is an error too (truncation).
//!   The plaintext of the records before the bad one is still handed out
//!   (the reader's error comes with the read after it; every read after an
//!   error fails, so the stream never resumes past a gap), and the writer then
//!   ends its direction with the fatal alert RFC 8446 names for the error
//!   (`bad_record_mac`, `record_overflow`, …) instead of a close_notify.
//! - Keys are replaced before the suite's confidentiality limit (AES-GCM: 2^24
//!   records, RFC 8446 §5.5): the writer sends a KeyUpdate and goes on under the
//!   next key; a KeyUpdate received is followed, and answered when it asks.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use ring::aead;
use rustls::ConnectionTrafficSecrets;
use substrate::wire::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A record header: content type, legacy version, length.
pub const HEADER_BYTES: usize = 5;
/// Plaintext bytes in one record at most (2^14).
pub const PLAINTEXT_MAX: usize = 1 << 14;
/// A record's ciphertext at most (2^14 + 256).
pub const CIPHERTEXT_MAX: usize = PLAINTEXT_MAX + 256;
/// One record on the wire at most.
pub const WIRE_MAX: usize = HEADER_BYTES + CIPHERTEXT_MAX;
const TAG_BYTES: usize = 16;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: [u8; 2] = [1, 0];
const ALERT_FATAL: u8 = 2;
// Fatal alert descriptions this end sends (RFC 8446 §6).
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_INTERNAL_ERROR: u8 = 80;
/// Sealed records the writer buffers before sending (the `BufWriter` it replaces had 256 KiB).
const OUT_BYTES: usize = 256 << 10;
/// Bytes the generic `AsyncRead` reads from the socket at a time.
const READ_BYTES: usize = 64 << 10;
/// Records sealed under one key: a KeyUpdate goes out this many records
/// before the suite's confidentiality limit.
const KEY_UPDATE_MARGIN: u64 = 1 << 12;
/// Records in a row without data (empty, KeyUpdate) a peer may send.
const EMPTY_RECORDS_MAX: u32 = 32;

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// What every read after a refused record (or the peer's alert) returns.
fn refused_earlier() -> io::Error {
    invalid("the TLS reader refused a record earlier")
}

/// The stream ended without the peer's close_notify (every read after too).
fn unclosed_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection without a TLS close_notify",
    )
}

/// What every read after error `e` returns: the EOF again, else
/// [`refused_earlier`].
fn repeat_of(e: &io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        unclosed_eof()
    } else {
        refused_earlier()
    }
}

/// Derives a direction's next traffic secret (rustls's `KernelConnection`).
pub(crate) trait Rekey: Send {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D: Send> Rekey for rustls::kernel::KernelConnection<D> {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }
}

/// What the two halves of a connection share: the key schedule, and the
/// reader's word to the writer that the peer asked for a KeyUpdate or that
/// the connection ends with a fatal alert.
pub(crate) struct Shared {
    rekey: Mutex<Box<dyn Rekey>>,
    update_requested: AtomicBool,
    /// The fatal alert the writer ends with instead of a close_notify (the
    /// description; 0 while the reader has found nothing wrong).
    alert: AtomicU8,
    /// The suite's confidentiality limit, in records per key.
    limit: u64,
}

impl Shared {
    pub(crate) fn new(rekey: Box<dyn Rekey>, limit: u64) -> Arc<Shared> {
        Arc::new(Shared {
            rekey: Mutex::new(rekey),
            update_requested: AtomicBool::new(false),
            alert: AtomicU8::new(0),
            limit,
        })
    }

    /// The reader's error `why`, for which the writer ends with fatal alert
    /// `description` (the first such error's, if there are several).
    fn fatal(&self, description: u8, why: impl Into<String>) -> io::Error {
        let _ = self
            .alert
            .compare_exchange(0, description, Ordering::AcqRel, Ordering::Acquire);
        invalid(why)
    }

    /// The next key of one direction (after a KeyUpdate sent or received).
    fn next_key(&self, transmit: bool) -> io::Result<RecordKey> {
        let mut rekey = self.rekey.lock().expect("poisoned");
        let next = if transmit {
            rekey.next_tx()
        } else {
            rekey.next_rx()
        };
        RecordKey::new(next.map_err(|e| invalid(format!("TLS KeyUpdate: {e}")))?)
    }
}

/// One direction's AEAD key, static IV and record sequence number
/// (RFC 8446 §5.3: the nonce is the IV xor the sequence number).
pub(crate) struct RecordKey {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl RecordKey {
    pub(crate) fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<RecordKey> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("a cipher suite the record layer does not know")),
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| invalid("a traffic key of the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("a traffic IV of the wrong length"))?;
        Ok(RecordKey {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    fn next_nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        // Never reached under a limit of 2^24; a wrapped counter would reuse nonces.
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("record sequence number exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// The header of a TLS 1.3 record: always application data on the wire (§5.2).
fn header(ciphertext_len: usize) -> [u8; HEADER_BYTES] {
    let [hi, lo] = (ciphertext_len as u16).to_be_bytes();
    [CONTENT_APPLICATION_DATA, 3, 3, hi, lo]
}

fn alert_text(alert: &[u8]) -> String {
    match alert {
        [level, description] => format!(
            "the peer sent a TLS alert ({}, description {description})",
            if *level == 2 { "fatal" } else { "warning" }
        ),
        _ => format!("a malformed TLS alert ({} bytes)", alert.len()),
    }
}

/// The receiving half: opens records in place.
pub struct RecordReader<R> {
    io: R,
    key: RecordKey,
    shared: Arc<Shared>,
    /// A close_notify was received.
    closed: bool,
    /// A record was refused after others of the same read were opened: the
    /// error, for the next read, once their plaintext is handed out.
    failed: Option<io::Error>,
    /// Records in a row that carried no data.
    empty_run: u32,
    /// What arrived with the end of the handshake: plaintext rustls had
    /// already opened, then ciphertext. Taken by the first read.
    early_plain: Vec<u8>,
    early_raw: Vec<u8>,
    /// The generic `AsyncRead`'s buffer: plaintext `[start, end)`, then the
    /// held tail up to `raw_end`.
    own: Vec<u8>,
    own_start: usize,
    own_end: usize,
    own_raw_end: usize,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub(crate) fn new(
        io: R,
        key: RecordKey,
        shared: Arc<Shared>,
        early_plain: Vec<u8>,
        early_raw: Vec<u8>,
        closed: bool,
    ) -> RecordReader<R> {
        RecordReader {
            io,
            key,
            shared,
            closed,
            failed: None,
            empty_run: 0,
            early_plain,
            early_raw,
            own: Vec::new(),
            own_start: 0,
            own_end: 0,
            own_raw_end: 0,
        }
    }

    /// Reads what has arrived (at most `max` bytes) into `decoder`'s buffer
    /// (`keeping`: [`Decoder::receive_buffer_keeping`]) and opens every record
    /// that is complete. `Ok(true)` when it read something, `Ok(false)` once
    /// the stream has ended with the peer's close_notify (the call after the
    /// one that opened it). Cancel-safe: the socket read is its only await.
    pub async fn read_into(
        &mut self,
        decoder: &mut Decoder,
        keeping: bool,
        max: usize,
    ) -> io::Result<bool> {
        self.take_failure()?;
        let early = self.early_plain.len() + self.early_raw.len();
        if self.closed && early == 0 {
            return Ok(false);
        }
        if decoder.error().is_some() {
            // Nothing fed to it is decoded any more (and it has dropped
            // what the transport held).
            return Err(invalid("the frame decoder refused the stream earlier"));
        }
        let held = decoder.transport_held();
        let buf = if keeping {
            decoder.receive_buffer_keeping(max.max(early))
        } else {
            decoder.receive_buffer(max.max(early))
        };
        let base = buf.len() - held;
        let mut plain = base;
        if early > 0 {
            // Only on the first read: nothing is held yet.
            buf.extend_from_slice(&self.early_plain);
            plain = buf.len();
            buf.extend_from_slice(&self.early_raw);
            self.early_plain = Vec::new();
            self.early_raw = Vec::new();
        } else {
            let mut limited = bytes::BufMut::limit(&mut *buf, max);
            if self.io.read_buf(&mut limited).await? == 0 {
                return Err(self.failing(unclosed_eof()));
            }
        }
        match self.open(buf, base, plain) {
            Ok((plain, end)) => {
                buf.truncate(end);
                decoder.set_transport_held(end - plain);
                Ok(true)
            }
            Err(e) => {
                // Nothing of this read reaches the decoder.
                buf.truncate(plain);
                decoder.set_transport_held(0);
                Err(e)
            }
        }
    }

    /// The error of a record refused after others were opened, once their
    /// plaintext is handed out; after any error, [`repeat_of`] it for every
    /// read.
    fn take_failure(&mut self) -> io::Result<()> {
        match self.failed.take() {
            None => Ok(()),
            Some(e) => {
                self.failed = Some(repeat_of(&e));
                Err(e)
            }
        }
    }

    /// Error `e` ends the stream: every read after it fails too.
    fn failing(&mut self, e: io::Error) -> io::Error {
        self.failed = Some(repeat_of(&e));
        e
    }

    /// Opens every complete record in `buf` after `plain` (where the
    /// plaintext ends; the partial record held from before follows it;
    /// `base..plain` is plaintext not handed out yet, `..base` was),
    /// moving each record's plaintext to the end of the plaintext, then the
    /// partial record left down behind it (less than one record: the framing
    /// of the records opened must not pile up in the held tail, which every
    /// batch handed over carries along). Returns where the plaintext ends and
    /// where the bytes that matter end. A record refused when plaintext
    /// is still to be handed out ends the plaintext there, and its error
    /// waits in `failed`; every read after an error fails.
    fn open(&mut self, buf: &mut [u8], base: usize, plain: usize) -> io::Result<(usize, usize)> {
        let mut opened = plain;
        match self.open_records(buf, &mut opened) {
            Ok(end) => Ok((opened, end)),
            Err(e) if opened > base => {
                self.failed = Some(e);
                Ok((opened, opened))
            }
            Err(e) => Err(self.failing(e)),
        }
    }

    /// [`Self::open`]'s loop: `plain` follows the plaintext's end, record by
    /// record; returns where the bytes that matter end.
    fn open_records(&mut self, buf: &mut [u8], plain: &mut usize) -> io::Result<usize> {
        let shared = Arc::clone(&self.shared);
        let mut raw = *plain;
        while !self.closed && buf.len() - raw >= HEADER_BYTES {
            let head: [u8; HEADER_BYTES] =
                buf[raw..raw + HEADER_BYTES].try_into().expect("five bytes");
            if head[..3] != [CONTENT_APPLICATION_DATA, 3, 3] {
                return Err(shared.fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    format!("not a TLS 1.3 record header: {head:02x?}"),
                ));
            }
            let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
            if len > CIPHERTEXT_MAX {
                return Err(shared.fatal(
                    ALERT_RECORD_OVERFLOW,
                    format!("a TLS record of {len} bytes"),
                ));
            }
            if len <= TAG_BYTES {
                return Err(
                    shared.fatal(ALERT_DECODE_ERROR, format!("a TLS record of {len} bytes"))
                );
            }
            let end = raw + HEADER_BYTES + len;
            if end > buf.len() {
                break;
            }
            let nonce = self
                .key
                .next_nonce()
                .map_err(|e| shared.fatal(ALERT_INTERNAL_ERROR, e.to_string()))?;
            let opened = self
                .key
                .key
                .open_within(
                    nonce,
                    aead::Aad::from(head),
                    &mut buf[*plain..end],
                    raw + HEADER_BYTES - *plain..,
                )
                .map_err(|_| {
                    shared.fatal(ALERT_BAD_RECORD_MAC, "a TLS record failed authentication")
                })?;
            // The inner content type is the last byte that is not padding.
            let inner = opened.iter().rposition(|&b| b != 0).ok_or_else(|| {
                shared.fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    "a TLS record with no content type",
                )
            })?;
            if inner > PLAINTEXT_MAX {
                return Err(shared.fatal(
                    ALERT_RECORD_OVERFLOW,
                    format!("a TLS record of {inner} plaintext bytes"),
                ));
            }
            // Records that carry no data (empty ones, KeyUpdates) cost work
            // for nothing: a run of them is cut short, as rustls does.
            if inner == 0 || opened[inner] == CONTENT_HANDSHAKE {
                self.empty_run += 1;
                if self.empty_run > EMPTY_RECORDS_MAX {
                    return Err(shared.fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        "too many TLS records in a row without data",
                    ));
                }
            } else {
                self.empty_run = 0;
            }
            match opened[inner] {
                CONTENT_APPLICATION_DATA => *plain += inner,
                CONTENT_ALERT if opened[..inner] == ALERT_CLOSE_NOTIFY => self.closed = true,
                // The peer has ended the connection: nothing to answer.
                CONTENT_ALERT => return Err(invalid(alert_text(&opened[..inner]))),
                CONTENT_HANDSHAKE => self.key_update(&opened[..inner])?,
                other => {
                    return Err(shared.fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        format!("a TLS record of content type {other}"),
                    ));
                }
            }
            raw = end;
        }
        if self.closed {
            return Ok(*plain);
        }
        buf.copy_within(raw.., *plain);
        Ok(*plain + buf.len() - raw)
    }

    /// A post-handshake message: only KeyUpdate (§4.6.3) is expected.
    fn key_update(&mut self, message: &[u8]) -> io::Result<()> {
        let request = match message {
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => *request,
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, other] => {
                return Err(self.shared.fatal(
                    ALERT_ILLEGAL_PARAMETER,
                    format!("a TLS KeyUpdate asking {other}"),
                ));
            }
            // A key change must end its record (RFC 8446 §5.1): not
            // followed by more in it, not cut across records.
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, _, _, ..] => {
                return Err(self.shared.fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    "a TLS KeyUpdate followed by more in its record",
                ));
            }
            [HANDSHAKE_KEY_UPDATE, rest @ ..] if rest.len() < 4 => {
                return Err(self.shared.fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    "a TLS KeyUpdate cut at the end of its record",
                ));
            }
            [HANDSHAKE_KEY_UPDATE, ..] => {
                return Err(self
                    .shared
                    .fatal(ALERT_DECODE_ERROR, "a malformed TLS KeyUpdate"));
            }
            [kind, ..] => {
                return Err(self.shared.fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    format!(
                        "an unexpected TLS handshake message (type {kind}) after the handshake"
                    ),
                ));
            }
            [] => {
                return Err(self
                    .shared
                    .fatal(ALERT_DECODE_ERROR, "an empty TLS handshake record"));
            }
        };
        self.key = self
            .shared
            .next_key(false)
            .map_err(|e| self.shared.fatal(ALERT_INTERNAL_ERROR, e.to_string()))?;
        if request == 1 {
            self.shared.update_requested.store(true, Ordering::Release);
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RecordReader<R> {
    /// Plaintext through a buffer of its own, for callers that are not a
    /// frame decoder (tests, tools). The daemon reads with `read_into`.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.own_start < this.own_end {
                let n = out.remaining().min(this.own_end - this.own_start);
                out.put_slice(&this.own[this.own_start..this.own_start + n]);
                this.own_start += n;
                return Poll::Ready(Ok(()));
            }
            this.take_failure()?;
            let early = !this.early_plain.is_empty() || !this.early_raw.is_empty();
            if (this.closed && !early) || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything handed out: move the held tail to the front.
            this.own.copy_within(this.own_end..this.own_raw_end, 0);
            this.own_raw_end -= this.own_end;
            (this.own_start, this.own_end) = (0, 0);
            let early = std::mem::take(&mut this.early_plain);
            let early_raw = std::mem::take(&mut this.early_raw);
            let want = this.own_raw_end + early.len() + early_raw.len() + READ_BYTES + WIRE_MAX;
            if this.own.len() < want {
                this.own.resize(want, 0);
            }
            if !early.is_empty() || !early_raw.is_empty() {
                this.own[..early.len()].copy_from_slice(&early);
                this.own_end = early.len();
                this.own_raw_end = early.len() + early_raw.len();
                this.own[this.own_end..this.own_raw_end].copy_from_slice(&early_raw);
            } else {
                let mut read = ReadBuf::new(&mut this.own[this.own_raw_end..]);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(this.failing(unclosed_eof())));
                }
                this.own_raw_end += n;
            }
            let mut own = std::mem::take(&mut this.own);
            // Everything before `own_end` (early plaintext) is still to be
            // handed out.
            let opened = this.open(&mut own[..this.own_raw_end], 0, this.own_end);
            this.own = own;
            match opened {
                Ok(ends) => (this.own_end, this.own_raw_end) = ends,
                Err(e) => {
                    (this.own_end, this.own_raw_end) = (0, 0);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

/// The sending half: an `AsyncWrite` that buffers sealed records.
pub struct RecordWriter<W> {
    io: W,
    key: RecordKey,
    shared: Arc<Shared>,
    /// Sealed records and the open one; `sent` of them written out.
    out: Vec<u8>,
    sent: usize,
    /// Where the record being filled starts (its header).
    open: Option<usize>,
    ending_sent: bool,
    /// Records sealed under one key before a KeyUpdate.
    rekey_at: u64,
    /// Sealing or a key update failed: nothing more goes out (what is
    /// buffered might not be what the peer can open).
    failed: bool,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub(crate) fn new(io: W, key: RecordKey, shared: Arc<Shared>) -> RecordWriter<W> {
        RecordWriter {
            io,
            key,
            out: Vec::with_capacity(OUT_BYTES + 2 * WIRE_MAX),
            sent: 0,
            open: None,
            ending_sent: false,
            failed: false,
            rekey_at: shared.limit.saturating_sub(KEY_UPDATE_MARGIN),
            shared,
        }
    }

    /// Replaces the key every `records` records (tests: the real limit is 2^24).
    #[cfg(test)]
    fn rekey_every(&mut self, records: u64) {
        self.rekey_at = records;
    }

    /// Marks the writer failed on an error, so nothing more is sent.
    fn guard<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(invalid("the TLS writer failed earlier"));
        }
        Ok(())
    }

    /// Copies what fits of `plain` into records (sealing each that fills);
    /// returns how much.
    fn push(&mut self, mut plain: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        while !plain.is_empty() && self.out.len() < OUT_BYTES {
            let start = match self.open {
                Some(start) => start,
                None => self.begin()?,
            };
            let room = PLAINTEXT_MAX - (self.out.len() - start - HEADER_BYTES);
            let take = room.min(plain.len());
            self.out.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
            taken += take;
            if take == room {
                self.seal(CONTENT_APPLICATION_DATA)?;
            }
        }
        Ok(taken)
    }

    /// Opens a record, first replacing the key if its time has come.
    fn begin(&mut self) -> io::Result<usize> {
        let due = self.key.seq >= self.rekey_at;
        if due || self.shared.update_requested.swap(false, Ordering::AcqRel) {
            // KeyUpdate, update_not_requested (§4.6.3), under the old key.
            self.open = Some(self.out.len());
            self.out.extend_from_slice(&[0; HEADER_BYTES]);
            self.out
                .extend_from_slice(&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0]);
            self.seal(CONTENT_HANDSHAKE)?;
            self.key = self.shared.next_key(true)?;
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEADER_BYTES]);
        self.open = Some(start);
        Ok(start)
    }

    /// Ends the open record: inner content type, header, tag.
    fn seal(&mut self, content_type: u8) -> io::Result<()> {
        let Some(start) = self.open.take() else {
            return Ok(());
        };
        let nonce = match self.key.next_nonce() {
            Ok(nonce) => nonce,
            Err(e) => {
                // The plaintext never leaves unsealed.
                self.out.truncate(start);
                return Err(e);
            }
        };
        self.out.push(content_type);
        let body = start + HEADER_BYTES;
        let head = header(self.out.len() - body + TAG_BYTES);
        self.out[start..body].copy_from_slice(&head);
        match self.key.key.seal_in_place_separate_tag(
            nonce,
            aead::Aad::from(head),
            &mut self.out[body..],
        ) {
            Ok(tag) => {
                self.out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                self.out.truncate(start);
                Err(invalid("sealing a TLS record failed"))
            }
        }
    }

    /// Writes out every sealed record.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let sealed = self.open.unwrap_or(self.out.len());
        while self.sent < sealed {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..sealed]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.drain(..self.sent);
        if let Some(open) = &mut self.open {
            *open -= self.sent;
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RecordWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        if this.ending_sent {
            return Poll::Ready(Err(invalid("write after the TLS close_notify")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.out.len() >= OUT_BYTES {
            ready!(this.poll_send(cx))?;
        }
        let pushed = this.push(data);
        Poll::Ready(this.guard(pushed))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let sealed = this.seal(CONTENT_APPLICATION_DATA);
        this.guard(sealed)?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        if !this.ending_sent {
            // The reader's fatal alert if it refused a record, else a close_notify.
            let alert = match this.shared.alert.load(Ordering::Acquire) {
                0 => ALERT_CLOSE_NOTIFY,
                description => [ALERT_FATAL, description],
            };
            let sealed = this.seal(CONTENT_APPLICATION_DATA).and_then(|()| {
                this.open = Some(this.out.len());
                this.out.extend_from_slice(&[0; HEADER_BYTES]);
                this.out.extend_from_slice(&alert);
                this.seal(CONTENT_ALERT)
            });
            this.guard(sealed)?;
            this.ending_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::HostKey;
    use crate::tls::{self, AllowList};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    struct Pair {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    }

    fn pair() -> Pair {
        let (s, c) = (HostKey::generate().unwrap(), HostKey::generate().unwrap());
        Pair {
            server: tls::server_config(&s, Arc::new(AllowList::new([c.public()]))).unwrap(),
            client: tls::client_config(&c, Arc::new(AllowList::new([s.public()]))).unwrap(),
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Our sending half, replacing its key every few records, to a plain rustls
    /// client (tokio-rustls), which follows each KeyUpdate; then rustls's own
    /// KeyUpdates to our receiving half.
    #[tokio::test]
    async fn key_updates_both_ways_against_rustls() {
        let pair = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = data(3 << 20);
        let server = {
            let (config, sent) = (pair.server.clone(), sent.clone());
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let (stream, _) = tls::accept(&config, tcp, TIMEOUT).await.unwrap();
                let (mut reader, mut writer) = stream.into_split();
                writer.rekey_every(5);
                for piece in sent.chunks(100_000) {
                    writer.write_all(piece).await.unwrap();
                }
                writer.shutdown().await.unwrap();
                let mut got = Vec::new();
                reader.read_to_end(&mut got).await.unwrap();
                (got, writer.key.seq)
            })
        };
        let connector = tokio_rustls::TlsConnector::from(pair.client.clone());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        let mut client = connector.connect(name, tcp).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == sent, "rustls read what our writer sent");
        for piece in sent.chunks(300_000) {
            client.write_all(piece).await.unwrap();
            client.get_mut().1.refresh_traffic_keys().unwrap();
        }
        client.shutdown().await.unwrap();
        let (back, seq) = server.await.unwrap();
        assert!(back == sent, "our reader followed rustls's KeyUpdates");
        // Every 5 records a new key: the last one has sealed at most 5.
        assert!(seq <= 5, "{seq}");
    }

    /// A byte changed on the wire after the handshake: the record fails
    /// authentication and the reader says so, after handing out what the
    /// records before it carried; nothing after it is read. The server's
    /// writer then ends with a `bad_record_mac` alert, which the client's
    /// reader reports.
    #[tokio::test]
    async fn a_tampered_record_is_refused() {
        let pair = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        // client -> proxy -> server, flipping one byte 40 KiB into the
        // client's stream (well past its handshake flight).
        tokio::spawn(async move {
            let (mut from, _) = proxy.accept().await.unwrap();
            let mut to = TcpStream::connect(addr).await.unwrap();
            let (mut from_r, mut from_w) = from.split();
            let (mut to_r, mut to_w) = to.split();
            let up = async {
                let mut seen = 0usize;
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = from_r.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let flip = 40 << 10;
                    if seen <= flip && flip < seen + n {
                        buf[flip - seen] ^= 0x20;
                    }
                    seen += n;
                    if to_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = to_w.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut to_r, &mut from_w).await;
            };
            tokio::join!(up, down);
        });
        let server = tokio::spawn({
            let config = pair.server.clone();
            async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let (mut stream, _) = tls::accept(&config, tcp, TIMEOUT).await.unwrap();
                let mut got = Vec::new();
                let err = stream.read_to_end(&mut got).await.unwrap_err();
                let again = stream.read_u8().await.unwrap_err();
                stream.shutdown().await.unwrap();
                (err.to_string(), again.to_string(), got)
            }
        });
        let tcp = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut client, _) = tls::connect(&pair.client, tcp, TIMEOUT).await.unwrap();
        let sent = data(1 << 20);
        let _ = client.write_all(&sent).await;
        let _ = client.shutdown().await;
        let (err, again, read) = server.await.unwrap();
        assert!(err.contains("failed authentication"), "{err}");
        assert!(again.contains("refused a record earlier"), "{again}");
        // The client's handshake flight is well under 8 KiB: at least one
        // whole 16 KiB record lies before the byte changed.
        assert!(
            (16 << 10..40 << 10).contains(&read.len()),
            "read {} bytes",
            read.len()
        );
        assert_eq!(
            read,
            sent[..read.len()],
            "what came before is the data sent"
        );
        let mut rest = Vec::new();
        let answer = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
            .await
            .expect("the server ends its direction")
            .unwrap_err()
            .to_string();
        assert!(
            answer.contains("fatal, description 20"),
            "a bad_record_mac alert, not: {answer}"
        );
    }

    /// A key schedule that is never asked for a next key.
    struct NoRekey;

    impl Rekey for NoRekey {
        fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
            Err(rustls::Error::General("no KeyUpdate in this test".into()))
        }

        fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
            self.next_tx()
        }
    }

    fn fixed_key() -> RecordKey {
        RecordKey::new((
            0,
            ConnectionTrafficSecrets::Aes256Gcm {
                key: [7u8; 32].into(),
                iv: [9u8; 12].into(),
            },
        ))
        .unwrap()
    }

    fn shared() -> Arc<Shared> {
        Shared::new(Box::new(NoRekey), 1 << 24)
    }

    /// Two records in one read, the second changed: the first one's
    /// plaintext is handed out, then the error; the writer of that
    /// connection then ends with `bad_record_mac`, not a close_notify.
    #[tokio::test]
    async fn a_refused_record_ends_the_plaintext_after_the_records_before_it() {
        let sent = data(PLAINTEXT_MAX + 100);
        let mut writer = RecordWriter::new(Vec::new(), fixed_key(), shared());
        writer.write_all(&sent).await.unwrap();
        writer.flush().await.unwrap();
        let mut wire = writer.io;
        *wire.last_mut().unwrap() ^= 1; // the second record's tag
        let mut r = reader(&wire[..], b"", b"");
        let reading = Arc::clone(&r.shared);
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        assert_eq!(got, sent[..PLAINTEXT_MAX], "the first record's plaintext");

        let mut answer = RecordWriter::new(Vec::new(), fixed_key(), reading);
        answer.shutdown().await.unwrap();
        let mut peer = reader(&answer.io[..], b"", b"");
        let err = peer.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(
            err.to_string().contains("fatal, description 20"),
            "a bad_record_mac alert, not: {err}"
        );
    }

    /// Seals `bodies` as consecutive records (content type, plaintext)
    /// under [`fixed_key`] from sequence number 0.
    fn records(bodies: &[(u8, &[u8])]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), fixed_key(), shared());
        for &(content_type, body) in bodies {
            w.open = Some(w.out.len());
            w.out.extend_from_slice(&[0; HEADER_BYTES]);
            w.out.extend_from_slice(body);
            w.seal(content_type).unwrap();
        }
        w.out
    }

    fn reader<R: AsyncRead + Unpin>(
        io: R,
        early_plain: &[u8],
        early_raw: &[u8],
    ) -> RecordReader<R> {
        RecordReader::new(
            io,
            fixed_key(),
            shared(),
            early_plain.to_vec(),
            early_raw.to_vec(),
            false,
        )
    }

    /// A record refused first in its read fails that read, and every read
    /// after it fails too, even when the next record would open (under the
    /// next sequence number): the stream never goes on past a gap.
    #[tokio::test]
    async fn after_a_refused_record_no_later_record_is_read() {
        use substrate::wire::{Decoder, Limits};
        let mut wire = records(&[
            (CONTENT_APPLICATION_DATA, b"first"),
            (CONTENT_APPLICATION_DATA, b"second"),
        ]);
        let first_len = HEADER_BYTES + b"first".len() + 1 + TAG_BYTES;
        wire[first_len - 1] ^= 1; // the first record's tag
        // The frame decoder's way.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = reader(rx, b"", b"");
        let mut decoder = Decoder::new(Limits::DEFAULT);
        tx.write_all(&wire[..first_len]).await.unwrap();
        let err = r.read_into(&mut decoder, false, 1 << 16).await.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        tx.write_all(&wire[first_len..]).await.unwrap();
        let again = r.read_into(&mut decoder, false, 1 << 16).await.unwrap_err();
        assert!(
            again.to_string().contains("refused a record earlier"),
            "{again}"
        );
        assert_eq!(
            decoder.buffered_bytes(),
            0,
            "no plaintext reached the decoder"
        );
        // The `AsyncRead` way.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = reader(rx, b"", b"");
        tx.write_all(&wire[..first_len]).await.unwrap();
        let mut byte = [0u8; 1];
        let err = r.read(&mut byte).await.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        tx.write_all(&wire[first_len..]).await.unwrap();
        let again = r.read(&mut byte).await.unwrap_err();
        assert!(
            again.to_string().contains("refused a record earlier"),
            "{again}"
        );
    }

    /// Plaintext rustls opened with the handshake is handed out before the
    /// error of a refused record right behind it, both ways of reading.
    #[tokio::test]
    async fn early_plaintext_comes_before_the_error_of_the_record_after_it() {
        use substrate::wire::{Decoder, Limits};
        let mut wire = records(&[(CONTENT_APPLICATION_DATA, b"late")]);
        *wire.last_mut().unwrap() ^= 1;
        let mut r = reader(&[][..], b"early", &wire);
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        assert_eq!(got, b"early");

        let mut r = reader(&[][..], b"early", &wire);
        let mut decoder = Decoder::new(Limits::DEFAULT);
        assert!(r.read_into(&mut decoder, false, 1 << 16).await.unwrap());
        assert_eq!(decoder.buffered_bytes(), b"early".len());
        let err = r.read_into(&mut decoder, false, 1 << 16).await.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    /// Once the frame decoder has refused the stream, reading into it is an
    /// error, not a read whose bytes the decoder drops.
    #[tokio::test]
    async fn reading_into_a_decoder_that_failed_is_an_error() {
        use substrate::wire::{Decoder, Limits};
        let wire = records(&[
            (CONTENT_APPLICATION_DATA, &[0xff; 64]),
            (CONTENT_APPLICATION_DATA, b"more"),
        ]);
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = reader(rx, b"", b"");
        let mut decoder = Decoder::new(Limits::DEFAULT);
        // The second record cut short: held for the next read.
        tx.write_all(&wire[..wire.len() - 3]).await.unwrap();
        assert!(r.read_into(&mut decoder, false, 1 << 16).await.unwrap());
        assert!(decoder.transport_held() > 0);
        assert!(decoder.poll_frame_at().is_err(), "not a frame");
        tx.write_all(&wire[wire.len() - 3..]).await.unwrap();
        let err = r.read_into(&mut decoder, false, 1 << 16).await.unwrap_err();
        assert!(err.to_string().contains("frame decoder refused"), "{err}");
    }

    /// A KeyUpdate must end its record (RFC 8446 §5.1): one followed by more
    /// bytes or cut short is an unexpected message; a wrong length is a
    /// decode error; asking neither 0 nor 1 an illegal parameter.
    #[tokio::test]
    async fn key_updates_are_refused_with_the_alert_for_their_fault() {
        let cases: [(&[u8], u8); 4] = [
            (
                &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0, HANDSHAKE_KEY_UPDATE],
                ALERT_UNEXPECTED_MESSAGE,
            ),
            (&[HANDSHAKE_KEY_UPDATE, 0, 0], ALERT_UNEXPECTED_MESSAGE),
            (&[HANDSHAKE_KEY_UPDATE, 0, 0, 2, 0, 0], ALERT_DECODE_ERROR),
            (&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 2], ALERT_ILLEGAL_PARAMETER),
        ];
        for (body, alert) in cases {
            let wire = records(&[(CONTENT_HANDSHAKE, body)]);
            let mut r = reader(&wire[..], b"", b"");
            let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
            assert_eq!(
                r.shared.alert.load(Ordering::Acquire),
                alert,
                "{body:?}: {err}"
            );
        }
    }

    /// What `read_into` puts in a decoder is the byte stream sent, whatever
    /// the read sizes, with partial records held at the buffer's end across
    /// batches handed out (`take_consumed`), as the daemon's reader does.
    #[tokio::test]
    async fn read_into_a_decoder_gives_the_stream_across_batches() {
        use substrate::wire::{Frame, Limits, RequestId, encode};
        let pair = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = data(3 << 20);
        let mut frames = Vec::new();
        let mut expected = Vec::new();
        for (i, chunk) in payload.chunks(9_000).enumerate() {
            let frame = Frame::Data {
                request: RequestId(7),
                chunk_index: i as u64,
                payload: chunk,
            };
            encode(&frame, &Limits::DEFAULT, &mut frames).unwrap();
            expected.push(chunk.to_vec());
        }
        let server = tokio::spawn({
            let config = pair.server.clone();
            async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let (stream, _) = tls::accept(&config, tcp, TIMEOUT).await.unwrap();
                let (mut reader, _writer) = stream.into_split();
                let mut decoder = Decoder::new(Limits::DEFAULT);
                let mut got = Vec::new();
                let mut reads = 0usize;
                // Odd read sizes; a batch handed out every few reads.
                while reader
                    .read_into(&mut decoder, true, 1000 + reads * 4099 % 70_000)
                    .await
                    .unwrap()
                {
                    while let Some((_, frame)) = decoder.poll_frame_at().unwrap() {
                        let Frame::Data { payload, .. } = frame else {
                            panic!("a Data frame")
                        };
                        got.push(payload.to_vec());
                    }
                    reads += 1;
                    // Never more than the one record not yet complete.
                    assert!(decoder.transport_held() < WIRE_MAX);
                    if reads.is_multiple_of(3) {
                        let _ = decoder.take_consumed(Vec::new());
                    }
                }
                (got, decoder.buffered_bytes())
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, _) = tls::connect(&pair.client, tcp, TIMEOUT).await.unwrap();
        for piece in frames.chunks(33_333) {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
        }
        client.shutdown().await.unwrap();
        let (got, left) = server.await.unwrap();
        assert_eq!(left, 0);
        assert!(got == expected, "every payload, in order");
    }
}
