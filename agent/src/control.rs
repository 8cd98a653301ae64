//! The daemon's Unix control socket: how `envoy` commands reach a running
//! daemon (which then owns the store).
//!
//! # Framing
//! Both directions carry frames `[u32 LE body length][u8 kind][body]`:
//! - `R` (client → daemon, once): the request, JSON ([`Request`]); for
//!   `store add` and `store assemble` with the file to read attached
//!   (`SCM_RIGHTS`), opened by the client as the calling user.
//! - `O` / `E`: bytes for the client's stdout / stderr.
//! - `F` (with one descriptor attached, `SCM_RIGHTS`): the fetched blob's
//!   file, opened read-only for this client, for `fetch --out` to copy;
//!   the body is its length (u64 LE) and whole-content BLAKE3 (32 bytes).
//!   The client checks the length fits before copying.
//! - `W`: how many bytes from the start of the `F` file the fetch has
//!   verified and written (u64 LE); grows as the fetch goes on (the export
//!   overlaps the fetch). The client copies up to there, hashing as it
//!   goes, and keeps the file only if the daemon reports success and the
//!   hash is the manifest's.
//! - `P`: progress, JSON `{"label","done","total"}`.
//! - `X`: the end; one byte, the command's exit code.
//!
//! The daemon learns who asks from the socket's peer credentials
//! (`SO_PEERCRED`), never from the request: blobs a user adds or fetches
//! are owned by that uid. The daemon opens no path a client names: what
//! `store add` and `store assemble` read comes as a descriptor the client
//! opened, so any local user may add what they can read (and nothing
//! else); `store export` and `fetch --out` are written by the client
//! itself from a verified stream (`O` frames, or the `F` file checked
//! against its content hash), so the daemon never
//! writes a user's file.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use engine::hash::ContentHash;
use engine::io::{ExportCopy, SequentialFile};
use serde::{Deserialize, Serialize};

use crate::cli::{StoreCommand, exit};

/// Largest frame either side accepts (a request, or a slice of output).
pub const FRAME_BYTES_MAX: u32 = 1 << 20;
/// Output is sent in slices of at most this many bytes.
pub const OUTPUT_SLICE_BYTES: usize = 256 << 10;

pub const KIND_REQUEST: u8 = b'R';
pub const KIND_STDOUT: u8 = b'O';
pub const KIND_STDERR: u8 = b'E';
pub const KIND_FILE: u8 = b'F';
pub const KIND_READY: u8 = b'W';
pub const KIND_PROGRESS: u8 = b'P';
pub const KIND_EXIT: u8 = b'X';

/// What a client asks of the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Store { cmd: StoreCommand, json: bool },
    Status { json: bool },
    Fetch(FetchRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    pub id: String,
    pub from: Vec<String>,
    pub json: bool,
    /// Hand the blob's file over (`F`) and report its written prefix (`W`)
    /// while it is fetched (`fetch --out`): pieces are then fetched in blob
    /// order.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgressReport {
    pub label: String,
    pub done: u64,
    pub total: u64,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = kind;
    w.write_all(&head)?;
    w.write_all(body)
}

/// Reads one frame's body into `body` (reusing its allocation); returns its
/// kind, `None` at a clean end of stream.
pub fn read_frame_into(r: &mut impl Read, body: &mut Vec<u8>) -> io::Result<Option<u8>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control frame of {len} bytes exceeds {FRAME_BYTES_MAX}"),
        ));
    }
    body.resize(len as usize, 0);
    r.read_exact(body)?;
    Ok(Some(head[4]))
}

/// Connects to a running daemon; `Ok(None)` when none listens there (no
/// socket, or a stale one left by a daemon that died).
pub fn connect(socket: &Path) -> Result<Option<UnixStream>> {
    match UnixStream::connect(socket) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("cannot connect to {}", socket.display())),
    }
}

/// Where the client puts what the daemon sends.
pub enum Sink {
    /// `O` to stdout; a file (`F`) is refused.
    Stdout,
    /// `O` to stderr (a command run on the side of another, whose stdout
    /// it must not mix with); a file is refused.
    Stderr,
    /// `O` to a file written atomically: a temp file beside it, fsync,
    /// rename, fsync of the directory, only after the daemon reported
    /// success.
    File(PathBuf),
    /// `O` to stdout; the `F` file copied to a file written as
    /// [`Sink::File`]'s, kept only if its bytes hash to the content hash
    /// the daemon gave with it.
    Copy(PathBuf),
}

/// The control socket read with `recvmsg`, so that the descriptor an `F`
/// frame carries is kept (a plain read would discard it).
struct FdStream<'a> {
    stream: &'a UnixStream,
    fds: Vec<OwnedFd>,
}

impl Read for FdStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match crate::sys::recv_with_fds(self.stream.as_fd(), buf, &mut self.fds) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// `fetch --out`: the bytes copied out of the daemon's file do not hash to
/// the blob's content hash. Nothing was written at `path`; the daemon's
/// copy is likely damaged on its disk (every chunk verified when it was
/// received).
#[derive(Debug, thiserror::Error)]
#[error(
    "the copy for {} does not hash to the blob's content BLAKE3 ({got} instead of {expected}): not written",
    path.display()
)]
pub struct CopyMismatch {
    pub path: PathBuf,
    pub got: ContentHash,
    pub expected: ContentHash,
}

/// A `fetch --out` copy in progress: the daemon's file, and the hash its
/// bytes must have.
struct Copying {
    copy: ExportCopy,
    expected: ContentHash,
}

/// Sends `request`, with `input` attached (a file the command reads, opened
/// by this process: the daemon never opens a user's path), and relays the
/// daemon's answer: stdout bytes to `sink`, stderr bytes to stderr,
/// progress as a bar on a terminal. Returns the daemon's exit code.
pub fn call(
    mut stream: UnixStream,
    request: &Request,
    sink: Sink,
    input: Option<std::fs::File>,
) -> Result<u8> {
    let body = serde_json::to_vec(request).context("cannot encode request")?;
    let mut frame = Vec::with_capacity(5 + body.len());
    write_frame(&mut frame, KIND_REQUEST, &body)?;
    let sent = match &input {
        Some(f) => crate::sys::send_with_fd(stream.as_fd(), &frame, f.as_fd())
            .context("cannot send request to the daemon")?,
        None => 0,
    };
    drop(input);
    stream
        .write_all(&frame[sent..])
        .context("cannot send request to the daemon")?;
    let (mut temp, stdout_to_temp) = match &sink {
        Sink::File(path) => (Some(TempOut::create(path)?), true),
        Sink::Copy(path) => (Some(TempOut::create(path)?), false),
        Sink::Stdout | Sink::Stderr => (None, false),
    };
    let mut copying: Option<Copying> = None;
    let mut stdout = io::stdout().lock();
    let bar = io::stderr().is_terminal().then(new_bar);
    let mut stderr = io::stderr();
    let mut reader = io::BufReader::with_capacity(
        OUTPUT_SLICE_BYTES + 8,
        FdStream {
            stream: &stream,
            fds: Vec::new(),
        },
    );
    let mut body = Vec::new();
    let code = loop {
        let Some(kind) =
            read_frame_into(&mut reader, &mut body).context("lost the daemon's answer")?
        else {
            bail!("the daemon closed the connection before answering (did it stop?)");
        };
        match kind {
            KIND_STDOUT => match match &mut temp {
                Some(t) if stdout_to_temp => t.write_all(&body),
                _ if matches!(sink, Sink::Stderr) => stderr.write_all(&body),
                _ => stdout.write_all(&body),
            } {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(exit::OK),
                Err(e) => return Err(e).context("cannot write output"),
            },
            KIND_FILE => {
                let (Some(t), Sink::Copy(_), None) = (&temp, &sink, &copying) else {
                    bail!("the daemon handed over a file where none was asked for");
                };
                let (Ok(len), Ok(hash)) = (
                    <[u8; 8]>::try_from(body.get(..8).unwrap_or_default()),
                    <[u8; 32]>::try_from(body.get(8..).unwrap_or_default()),
                ) else {
                    bail!("malformed file frame from the daemon");
                };
                let fds = &mut reader.get_mut().fds;
                if fds.is_empty() {
                    bail!("the daemon's file frame came without a descriptor");
                }
                let file = std::fs::File::from(fds.remove(0));
                let len = u64::from_le_bytes(len);
                t.check_space(len)?;
                copying = Some(Copying {
                    copy: ExportCopy::new(file, len),
                    expected: ContentHash(hash),
                });
            }
            KIND_READY => match (&mut temp, &mut copying, <[u8; 8]>::try_from(&body[..])) {
                (Some(t), Some(c), Ok(ready)) => c
                    .copy
                    .advance(t.file_mut(), u64::from_le_bytes(ready))
                    .with_context(|| format!("cannot copy the blob to {}", t.temp.display()))?,
                _ => bail!("unexpected ready frame from the daemon"),
            },
            KIND_STDERR => {
                if let Some(b) = &bar {
                    b.suspend(|| stderr.write_all(&body))?;
                } else {
                    stderr.write_all(&body)?;
                }
            }
            KIND_PROGRESS => {
                if let (Some(b), Ok(p)) = (&bar, serde_json::from_slice::<ProgressReport>(&body)) {
                    b.set_message(p.label);
                    b.set_length(p.total);
                    b.set_position(p.done);
                }
            }
            KIND_EXIT => break body.first().copied().unwrap_or(exit::ERROR),
            other => bail!("unexpected control frame kind {other:#x} from the daemon"),
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    stdout.flush()?;
    let Some(mut t) = temp else {
        return Ok(code);
    };
    if code != exit::OK {
        return Ok(code);
    }
    if let Sink::Copy(path) = &sink {
        let Some(c) = copying else {
            bail!("the daemon reported success but handed over no file");
        };
        let got = c.copy.finish(t.file_mut()).with_context(|| {
            format!(
                "the daemon reported success but {} is incomplete",
                t.temp.display()
            )
        })?;
        if got != c.expected {
            return Err(CopyMismatch {
                path: path.clone(),
                got,
                expected: c.expected,
            }
            .into());
        }
    }
    t.commit()?;
    Ok(code)
}

/// The progress bar every `envoy` command draws on a terminal.
pub(crate) fn new_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// The temp file behind [`Sink::File`]: written front to back with direct
/// IO where the filesystem allows it (`engine::io::SequentialFile`), then fsync'd
/// and renamed into place by [`TempOut::commit`]; removed if dropped
/// uncommitted (an error, or the daemon reported failure).
struct TempOut {
    path: PathBuf,
    temp: PathBuf,
    file: Option<SequentialFile>,
}

impl TempOut {
    fn create(path: &Path) -> Result<TempOut> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = path.with_file_name(format!(".{name}.vigo-partial"));
        // Our own name: what an interrupted earlier export left.
        let _ = std::fs::remove_file(&temp);
        let file = SequentialFile::create(&temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        Ok(TempOut {
            path: path.to_owned(),
            temp,
            file: Some(file),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file_mut().write_all(bytes)
    }

    fn file_mut(&mut self) -> &mut SequentialFile {
        self.file.as_mut().expect("not committed")
    }

    /// The directory the file goes in.
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    /// Refuses, before anything is written, a file of `len` bytes that its
    /// filesystem has no room for. (Reserving the blocks with `fallocate`
    /// instead made the direct writes slower: each converts unwritten
    /// extents; 4 GiB `fetch --out`, three alternating rounds, 4.4-6.6 s
    /// from the end of the fetch to the end of the export against 3.1-3.5 s.)
    fn check_space(&self, len: u64) -> Result<()> {
        let dir = self.dir();
        let available = engine::sys::free_bytes(dir)
            .with_context(|| format!("cannot stat filesystem of {}", dir.display()))?;
        if available < len {
            bail!(
                "not enough space in {} for {}: {len} bytes needed, {available} available",
                dir.display(),
                self.path.display()
            );
        }
        Ok(())
    }

    /// Makes the temp file durable and renames it into place.
    fn commit(mut self) -> Result<()> {
        let (path, temp) = (&self.path, &self.temp);
        self.file
            .take()
            .expect("committed once")
            .finish()
            .with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(temp, path)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))?;
        let dir = self.dir();
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, KIND_STDOUT, b"hello").unwrap();
        write_frame(&mut buf, KIND_EXIT, &[3]).unwrap();
        let mut r = &buf[..];
        let mut body = Vec::new();
        assert_eq!(
            read_frame_into(&mut r, &mut body).unwrap(),
            Some(KIND_STDOUT)
        );
        assert_eq!(body, b"hello");
        assert_eq!(read_frame_into(&mut r, &mut body).unwrap(), Some(KIND_EXIT));
        assert_eq!(body, [3]);
        assert_eq!(read_frame_into(&mut r, &mut body).unwrap(), None);
        let mut big = (FRAME_BYTES_MAX + 1).to_le_bytes().to_vec();
        big.push(KIND_STDOUT);
        assert!(read_frame_into(&mut &big[..], &mut body).is_err());
    }
}
