//! The daemon side of the control socket (framing in `crate::control`).

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use engine::manifest::ManifestRoot;
use engine::store::StoreError;

use super::Daemon;
use super::fetch::{self, FetchOutcome};
use crate::cli::{StoreCommand, exit};
use crate::control::{self, ProgressReport, Request};
use crate::store_cmd::{self, Ctx, ProgressFn, ProgressTo};

/// Output frames queued between a command and the socket.
const FRAME_QUEUE: usize = 16;

/// Binds the control socket. A socket file left by a daemon that died is
/// replaced; one a live daemon answers on is an error.
pub(super) fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another envoy daemon is already running (it answers on {})",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    // Any local user may ask; what each may do is decided per request from
    // its peer credentials.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

pub(super) async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            if let Err(e) = client(daemon, stream).await {
                tracing::debug!("control client: {e:#}");
            }
        });
    }
}

/// One frame for the client, with the descriptor an `F` frame carries.
struct Out {
    kind: u8,
    body: Vec<u8>,
    fd: Option<OwnedFd>,
}

/// Sends output frames from a command to the socket.
#[derive(Clone)]
struct Frames(mpsc::Sender<Out>);

impl Frames {
    fn out(kind: u8, body: Vec<u8>) -> Out {
        Out {
            kind,
            body,
            fd: None,
        }
    }

    fn send_blocking(&self, kind: u8, body: Vec<u8>) -> io::Result<()> {
        self.0
            .blocking_send(Frames::out(kind, body))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "control client went away"))
    }

    async fn send(&self, kind: u8, body: Vec<u8>) -> Result<()> {
        self.send_out(Frames::out(kind, body)).await
    }

    async fn send_out(&self, out: Out) -> Result<()> {
        self.0
            .send(out)
            .await
            .map_err(|_| anyhow::anyhow!("control client went away"))
    }
}

/// A `Write` that becomes frames of one kind.
struct FrameWriter {
    frames: Frames,
    kind: u8,
    buf: Vec<u8>,
}

impl FrameWriter {
    fn new(frames: Frames, kind: u8) -> Self {
        FrameWriter {
            frames,
            kind,
            buf: Vec::with_capacity(control::OUTPUT_SLICE_BYTES),
        }
    }
}

impl Write for FrameWriter {
    /// Small writes are gathered into one frame; large ones (a verified page
    /// of a blob is up to 32 MiB) go out in frame-sized slices as they are.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let slice = control::OUTPUT_SLICE_BYTES;
        let room = slice - self.buf.len();
        if bytes.len() < room {
            self.buf.extend_from_slice(bytes);
            return Ok(bytes.len());
        }
        let (head, rest) = bytes.split_at(room);
        self.buf.extend_from_slice(head);
        self.flush()?;
        let mut pieces = rest.chunks_exact(slice);
        for piece in &mut pieces {
            self.frames.send_blocking(self.kind, piece.to_vec())?;
        }
        self.buf.extend_from_slice(pieces.remainder());
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let body = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(control::OUTPUT_SLICE_BYTES),
        );
        self.frames.send_blocking(self.kind, body)
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

async fn client(daemon: Arc<Daemon>, mut stream: UnixStream) -> Result<()> {
    let uid = stream.peer_cred().context("no peer credentials")?.uid();
    // The request may come with a descriptor (the file `store add` reads).
    let mut fds = Vec::new();
    let mut head = [0u8; 5];
    read_exact_keeping_fds(&stream, &mut head, &mut fds).await?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if head[4] != control::KIND_REQUEST || len > control::FRAME_BYTES_MAX {
        bail!("bad request frame");
    }
    let mut body = vec![0u8; len as usize];
    read_exact_keeping_fds(&stream, &mut body, &mut fds).await?;
    let request: Request = serde_json::from_slice(&body).context("bad request")?;
    let input = fds.pop().map(std::fs::File::from);

    let (tx, mut rx) = mpsc::channel::<Out>(FRAME_QUEUE);
    let frames = Frames(tx);
    let work = {
        let daemon = Arc::clone(&daemon);
        let frames = frames.clone();
        tokio::spawn(async move { dispatch(daemon, uid, request, input, frames).await })
    };
    drop(frames);
    while let Some(out) = rx.recv().await {
        if write_out(&mut stream, out).await.is_err() {
            // The client went away: stop producing (senders see BrokenPipe).
            drop(rx);
            let _ = work.await;
            return Ok(());
        }
    }
    let code = work.await.unwrap_or(exit::ERROR);
    stream
        .write_all(&[1, 0, 0, 0, control::KIND_EXIT, code])
        .await?;
    stream.flush().await?;
    Ok(())
}

/// Fills `buf` from the socket, keeping descriptors that arrive with the
/// bytes in `fds` (a plain read would discard them).
async fn read_exact_keeping_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream
            .async_io(Interest::READABLE, || {
                crate::sys::recv_with_fds(stream.as_fd(), &mut buf[filled..], fds)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if fds.len() > 1 {
            // Refused at once: a client must not make the daemon hold
            // descriptors while it sends its request a byte at a time.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} descriptors came with one request", fds.len()),
            ));
        }
        filled += n;
    }
    Ok(())
}

/// Writes one frame; its descriptor, if any, goes with its first bytes.
async fn write_out(stream: &mut UnixStream, out: Out) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(out.body.len() as u32).to_le_bytes());
    head[4] = out.kind;
    let Some(fd) = out.fd else {
        stream.write_all(&head).await?;
        return stream.write_all(&out.body).await;
    };
    let frame = [&head[..], &out.body].concat();
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            crate::sys::send_with_fd(stream.as_fd(), &frame, fd.as_fd())
        })
        .await?;
    stream.write_all(&frame[sent..]).await
}

/// Progress reports as `P` frames (dropped when the client reads slowly).
fn progress_frames(frames: &Frames) -> ProgressFn {
    let frames = frames.clone();
    Arc::new(move |label: &str, done, total| {
        let report = ProgressReport {
            label: label.to_owned(),
            done,
            total,
        };
        if let Ok(body) = serde_json::to_vec(&report) {
            let _ = frames.0.try_send(Frames::out(control::KIND_PROGRESS, body));
        }
    })
}

async fn dispatch(
    daemon: Arc<Daemon>,
    uid: u32,
    request: Request,
    input: Option<std::fs::File>,
    frames: Frames,
) -> u8 {
    match request {
        Request::Store { cmd, json } => {
            // The daemon opens no path a client names (it may run as
            // root): what it reads comes as a descriptor the client opened,
            // and what is exported the client writes.
            let reads_input = matches!(
                cmd,
                StoreCommand::Add { .. } | StoreCommand::Assemble { .. }
            );
            let refused = match &cmd {
                _ if reads_input && input.is_none() => {
                    Some("the daemon reads only a file handed over with the request")
                }
                StoreCommand::Export { .. } => Some("the daemon writes no file for a client"),
                _ => None,
            };
            if let Some(why) = refused {
                let mut err = FrameWriter::new(frames, control::KIND_STDERR);
                let _ = writeln!(err, "envoy: {why}; run this with the envoy client");
                return exit::ERROR;
            }
            let _turn = match reads_input {
                true => daemon.inputs.acquire().await.ok(),
                false => None,
            };
            let store = Arc::clone(&daemon.store);
            let progress = ProgressTo::Remote(progress_frames(&frames));
            let code = tokio::task::spawn_blocking(move || {
                let mut out = FrameWriter::new(frames.clone(), control::KIND_STDOUT);
                let mut err = FrameWriter::new(frames, control::KIND_STDERR);
                let mut ctx = Ctx {
                    json,
                    uid,
                    out: &mut out,
                    err: &mut err,
                    progress,
                    input,
                };
                match store_cmd::execute(&store, &mut ctx, cmd) {
                    Ok(()) => exit::OK,
                    Err(code) => code,
                }
            })
            .await
            .unwrap_or(exit::ERROR);
            // A command may have removed, quarantined (verify) or cured
            // (add) blobs: map them afresh on the next request.
            daemon.forget_all_served();
            crate::sys::release_free_heap();
            code
        }
        Request::Status { json } => {
            let text = super::status_report(&daemon, json);
            let _ = frames.send(control::KIND_STDOUT, text.into_bytes()).await;
            exit::OK
        }
        Request::Fetch(req) => {
            let json = req.json;
            let report = progress_frames(&frames);
            let progress = move |label: &str, done, total| report(label, done, total);
            let (written, follower) = if req.stream {
                let (tx, rx) = watch::channel(fetch::Written::default());
                let follower = tokio::spawn(follow(rx, frames.clone()));
                (Some(tx), Some(follower))
            } else {
                (None, None)
            };
            let mut result = fetch::fetch(Arc::clone(&daemon), req, uid, progress, written).await;
            if let Some(follower) = follower {
                let streamed = follower
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("export task failed: {e}")));
                result = match (result, streamed) {
                    (Ok(outcome), Ok(sent)) => stream_rest(&daemon, &outcome, sent, &frames)
                        .await
                        .map(|()| outcome),
                    (Ok(_), Err(e)) => Err(e),
                    (Err(e), _) => Err(e),
                };
            }
            crate::sys::release_free_heap();
            match result {
                Ok(outcome) => {
                    let text = if json {
                        serde_json::to_string(&outcome).unwrap_or_default() + "\n"
                    } else {
                        format!("{}\n", outcome.id)
                    };
                    let _ = frames.send(control::KIND_STDOUT, text.into_bytes()).await;
                    if !json {
                        let summary = if outcome.already_complete {
                            format!("{}: already held here, nothing fetched\n", outcome.id)
                        } else {
                            format!(
                                "fetched {} bytes in {} chunks in {:.2} s ({:.3} GB/s); {} bytes from local blobs, {} resumed\n",
                                outcome.bytes_fetched,
                                outcome.chunks_fetched,
                                outcome.seconds,
                                outcome.bytes_fetched as f64 / outcome.seconds.max(1e-9) / 1e9,
                                outcome.bytes_local,
                                outcome.bytes_resumed
                            )
                        };
                        let _ = frames
                            .send(control::KIND_STDERR, summary.into_bytes())
                            .await;
                    }
                    exit::OK
                }
                Err(e) => {
                    tracing::warn!("fetch failed: {e:#}");
                    let text = format!("envoy: fetch failed: {e:#}\n");
                    let _ = frames.send(control::KIND_STDERR, text.into_bytes()).await;
                    match e.downcast_ref::<StoreError>() {
                        Some(StoreError::Corrupt { .. }) => exit::CORRUPT,
                        _ => exit::ERROR,
                    }
                }
            }
        }
    }
}

/// Hands a fetch's blob file to the client (`F`), then tells it how far the
/// fetch has written the file without a gap (`W`) as that grows, until the
/// fetch ends (drops its sender). Returns the chunks announced. The client
/// copies the file itself, verifying it against the manifest's content
/// hash: the bytes never pass through this process or the socket.
async fn follow(mut written: watch::Receiver<fetch::Written>, frames: Frames) -> Result<u64> {
    let mut announced = 0u64;
    let mut handed = false;
    loop {
        let w = written.borrow_and_update().clone();
        if let Some(writer) = w.writer {
            if !handed {
                // An open and two stats: off the runtime's workers, as every
                // store call that may touch the disk.
                let w = Arc::clone(&writer);
                let file = tokio::task::spawn_blocking(move || w.open_for_reading()).await??;
                send_file(&frames, file, writer.root()).await?;
                handed = true;
            }
            if w.prefix > announced {
                // The fetch counts the bytes as it counts the chunks: no
                // manifest lookup here.
                if w.prefix_bytes > writer.root().total_bytes {
                    bail!(
                        "the fetch reported {} bytes written of a {}-byte blob",
                        w.prefix_bytes,
                        writer.root().total_bytes
                    );
                }
                frames
                    .send(control::KIND_READY, w.prefix_bytes.to_le_bytes().to_vec())
                    .await?;
                announced = w.prefix;
                continue;
            }
        }
        if written.changed().await.is_err() {
            return Ok(announced);
        }
    }
}

/// What [`follow`] could not hand over: a blob that was complete here
/// before the fetch is handed over whole.
async fn stream_rest(
    daemon: &Arc<Daemon>,
    outcome: &FetchOutcome,
    announced: u64,
    frames: &Frames,
) -> Result<()> {
    if !outcome.already_complete {
        if announced != outcome.chunks {
            bail!(
                "the export stopped after {announced} of {} chunks of {}",
                outcome.chunks,
                outcome.id
            );
        }
        return Ok(());
    }
    let id = outcome.id.parse().context("fetched blob id")?;
    let d = Arc::clone(daemon);
    let (file, root) = tokio::task::spawn_blocking(move || d.store.open_blob_file(&id)).await??;
    send_file(frames, file, &root).await?;
    frames
        .send(control::KIND_READY, root.total_bytes.to_le_bytes().to_vec())
        .await
}

/// Hands the client `file`, the blob `root` describes (`F`: its length and
/// content hash, the descriptor attached).
async fn send_file(frames: &Frames, file: std::fs::File, root: &ManifestRoot) -> Result<()> {
    let mut body = root.total_bytes.to_le_bytes().to_vec();
    body.extend_from_slice(&root.content_hash.0);
    frames
        .send_out(Out {
            kind: control::KIND_FILE,
            body,
            fd: Some(OwnedFd::from(file)),
        })
        .await
}
