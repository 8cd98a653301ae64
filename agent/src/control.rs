//! The daemon's Unix control socket: how `envoy` commands reach a running
//! daemon (which then owns the store).
//!
//! # Framing
//! Both directions carry frames `[u32 LE body length][u8 kind][body]`:
//! - `R` (client → daemon, once): the request, JSON ([`Request`]).
//! - `O` / `E`: bytes for the client's stdout / stderr.
//! - `S`: the size of the file a `fetch --out` writes (u64 LE), before its
//!   first `D` frame: the client checks that it fits before the bytes come.
//! - `D`: bytes of the file a `fetch --out` writes, in order, as the fetch
//!   verifies and writes them (the export overlaps the fetch).
//! - `P`: progress, JSON `{"label","done","total"}`.
//! - `X`: the end; one byte, the command's exit code.
//!
//! The daemon learns who asks from the socket's peer credentials
//! (`SO_PEERCRED`), never from the request: blobs a user adds or fetches
//! are owned by that uid. Commands that name a path the daemon would open
//! (`store add`, `store assemble`) are served only for root or the daemon's
//! own user; `store export` and `fetch --out` are written by the client
//! itself from a verified stream (`O` or `D` frames), so the daemon never
//! writes a user's file.

use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use engine::io::SequentialFile;
use serde::{Deserialize, Serialize};

use crate::cli::{StoreCommand, exit};

/// Largest frame either side accepts (a request, or a slice of output).
pub const FRAME_BYTES_MAX: u32 = 1 << 20;
/// Output is sent in slices of at most this many bytes.
pub const OUTPUT_SLICE_BYTES: usize = 256 << 10;

pub const KIND_REQUEST: u8 = b'R';
pub const KIND_STDOUT: u8 = b'O';
pub const KIND_STDERR: u8 = b'E';
pub const KIND_DATA: u8 = b'D';
pub const KIND_SIZE: u8 = b'S';
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
    /// Stream the blob's bytes back as `D` frames while it is fetched
    /// (`fetch --out`): pieces are then fetched in blob order.
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

/// Where the client puts the bytes of `O` and `D` frames.
pub enum Sink {
    /// `O` to stdout; `D` is refused.
    Stdout,
    /// `O` to a file written atomically: a temp file beside it, fsync,
    /// rename, fsync of the directory, only after the daemon reported
    /// success.
    File(PathBuf),
    /// `O` to stdout, `D` to a file written as [`Sink::File`]'s.
    Data(PathBuf),
}

/// Sends `request` and relays the daemon's answer: stdout bytes to `sink`,
/// stderr bytes to stderr, progress as a bar on a terminal. Returns the
/// daemon's exit code.
pub fn call(mut stream: UnixStream, request: &Request, sink: Sink) -> Result<u8> {
    let body = serde_json::to_vec(request).context("cannot encode request")?;
    write_frame(&mut stream, KIND_REQUEST, &body).context("cannot send request to the daemon")?;
    // The temp file, and the kind of frame whose bytes go there.
    let (mut temp, file_kind) = match &sink {
        Sink::File(path) => (Some(TempOut::create(path)?), KIND_STDOUT),
        Sink::Data(path) => (Some(TempOut::create(path)?), KIND_DATA),
        Sink::Stdout => (None, KIND_DATA),
    };
    let mut stdout = io::stdout().lock();
    let bar = io::stderr().is_terminal().then(new_bar);
    let mut stderr = io::stderr();
    let mut reader = io::BufReader::with_capacity(OUTPUT_SLICE_BYTES + 8, &mut stream);
    let mut body = Vec::new();
    let code = loop {
        let Some(kind) =
            read_frame_into(&mut reader, &mut body).context("lost the daemon's answer")?
        else {
            bail!("the daemon closed the connection before answering (did it stop?)");
        };
        match kind {
            KIND_STDOUT | KIND_DATA => match match &mut temp {
                Some(t) if kind == file_kind => t.write_all(&body),
                _ if kind == KIND_STDOUT => stdout.write_all(&body),
                _ => bail!("the daemon sent file bytes where none were asked for"),
            } {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(exit::OK),
                Err(e) => return Err(e).context("cannot write output"),
            },
            KIND_SIZE => match (&temp, <[u8; 8]>::try_from(&body[..])) {
                (Some(t), Ok(len)) if file_kind == KIND_DATA => {
                    t.check_space(u64::from_le_bytes(len))?
                }
                _ => bail!("unexpected size frame from the daemon"),
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
    if let Some(t) = temp
        && code == exit::OK
    {
        t.commit()?;
    }
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
        self.file.as_mut().expect("not committed").write_all(bytes)
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
