//! containerd's stdio (FIFOs, or files) ↔ the agent's per-process stdio streams.
//!
//! Each process gets one agent stream per stdio stream (or one `tty` stream). Output is
//! copied as raw bytes until the agent closes the stream (it does so once the process's
//! pipe reached EOF), so the last bytes before exit arrive before the exit is reported.
//! stdin is forwarded in frames; end-of-input is sent when containerd's writer closes the
//! FIFO, or on CloseIO (whichever comes first).
use std::{path::Path, sync::Arc};

use shoji_agent_api::stream::{self, StreamKind};
use slog::{debug, Logger};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{unix::pipe, UnixStream},
    sync::Notify,
    task::JoinSet,
};

/// The stdio of a process as containerd gave it: FIFO (or file) paths, empty when unused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The agent streams this process needs. Output streams are always attached (unused ones
    /// are discarded here), so the agent never holds a process on a full pipe.
    pub fn stream_kinds(&self) -> Vec<StreamKind> {
        if self.terminal {
            return vec![StreamKind::Tty];
        }
        let mut kinds = vec![StreamKind::Stdout, StreamKind::Stderr];
        if !self.stdin.is_empty() {
            kinds.push(StreamKind::Stdin);
        }
        kinds
    }

    pub fn has_stdin(&self) -> bool {
        !self.stdin.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdio URI {0:?} is not supported (only FIFO or file paths)")]
    Unsupported(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running copies of one process's stdio.
pub struct ProcessIo {
    stdin_closed: Arc<Notify>,
    output: tokio::sync::Mutex<JoinSet<()>>,
}

impl ProcessIo {
    /// Starts copying between containerd's stdio paths and the agent streams (one per
    /// [`StdioPaths::stream_kinds`], in any order).
    pub async fn start(
        paths: &StdioPaths,
        streams: Vec<(StreamKind, UnixStream)>,
        log: &Logger,
    ) -> Result<ProcessIo, StdioError> {
        let stdin_closed = Arc::new(Notify::new());
        let mut output = JoinSet::new();
        for (kind, conn) in streams {
            match kind {
                StreamKind::Stdout | StreamKind::Stderr => {
                    let path = if kind == StreamKind::Stdout {
                        &paths.stdout
                    } else {
                        &paths.stderr
                    };
                    let sink = open_output(path).await?;
                    output.spawn(copy_out(
                        conn,
                        sink,
                        log.new(slog::o!("stream" => kind.as_str())),
                    ));
                }
                StreamKind::Stdin => {
                    let source = plain_path(&paths.stdin)?.to_string();
                    tokio::spawn(copy_in(source, conn, stdin_closed.clone(), log.clone()));
                }
                StreamKind::Tty => {
                    let sink = open_output(&paths.stdout).await?;
                    let (rd, wr) = conn.into_split();
                    output.spawn(copy_out(rd, sink, log.new(slog::o!("stream" => "tty"))));
                    if paths.has_stdin() {
                        let source = plain_path(&paths.stdin)?.to_string();
                        tokio::spawn(copy_in(source, wr, stdin_closed.clone(), log.clone()));
                    }
                }
            }
        }
        Ok(ProcessIo {
            stdin_closed,
            output: tokio::sync::Mutex::new(output),
        })
    }

    /// Delivers end-of-input after what containerd already wrote into the stdin FIFO.
    pub fn close_stdin(&self) {
        self.stdin_closed.notify_one();
    }

    /// Resolves once every output stream has been copied to the end.
    pub async fn wait_output(&self) {
        let mut set = self.output.lock().await;
        while set.join_next().await.is_some() {}
    }
}

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

async fn open_output(path: &str) -> Result<Sink, StdioError> {
    if path.is_empty() {
        return Ok(Box::new(tokio::io::sink()));
    }
    let path = plain_path(path)?;
    let open_err = |source| StdioError::Open {
        path: path.to_string(),
        source,
    };
    if is_fifo(path) {
        // Read-write open never blocks waiting for a reader, and keeps the FIFO usable
        // if containerd's reader reconnects (e.g. after a containerd restart).
        let tx = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(open_err)?;
        Ok(Box::new(tx))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(open_err)?;
        Ok(Box::new(f))
    }
}

/// Opens containerd's stdin FIFO for reading once its writer is there (a blocking open, as
/// containerd's own shims do), so EOF means the writer closed it. CloseIO before that
/// unblocks the open by briefly becoming a writer. Returns the FIFO and whether CloseIO
/// already came.
async fn open_input(path: &str, closed: &Notify) -> std::io::Result<(pipe::Receiver, bool)> {
    let owned = path.to_string();
    let mut opening = tokio::task::spawn_blocking(move || std::fs::File::open(owned));
    let opened = tokio::select! {
        biased;
        r = &mut opening => Some(r),
        _ = closed.notified() => None,
    };
    let (file, close_io) = match opened {
        Some(r) => (r, false),
        // CloseIO first: become a writer for a moment so the blocked open returns. That
        // only works once the open has begun (before, there is no reader: ENXIO), so retry.
        None => loop {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
            if let Ok(r) =
                tokio::time::timeout(std::time::Duration::from_millis(10), &mut opening).await
            {
                break (r, true);
            }
        },
    };
    let file = file.map_err(std::io::Error::other)??;
    Ok((pipe::Receiver::from_file(file)?, close_io))
}

fn plain_path(uri: &str) -> Result<&str, StdioError> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(p);
    }
    if uri.contains("://") {
        return Err(StdioError::Unsupported(uri.to_string()));
    }
    Ok(uri)
}

fn is_fifo(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(Path::new(path))
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

async fn copy_out<R: AsyncRead + Unpin>(mut from: R, mut to: Sink, log: Logger) {
    match tokio::io::copy(&mut from, &mut to).await {
        Ok(n) => debug!(log, "output stream ended"; "bytes" => n),
        Err(e) => debug!(log, "output stream failed"; "error" => %e),
    }
    let _ = to.flush().await;
}

async fn copy_in<W: AsyncWrite + Unpin>(path: String, mut to: W, closed: Arc<Notify>, log: Logger) {
    let mut buf = vec![0u8; 32 * 1024];
    let result: Result<(), stream::StreamError> = async {
        let (mut from, mut close_io) = open_input(&path, &closed).await?;
        while !close_io {
            tokio::select! {
                biased;
                n = from.read(&mut buf) => match n? {
                    0 => break,
                    n => stream::write_frame(&mut to, &buf[..n]).await?,
                },
                _ = closed.notified() => close_io = true,
            }
        }
        if close_io {
            // Forward whatever is still buffered in the FIFO. A raw non-blocking read: tokio's
            // try_read reports WouldBlock until its reactor has seen the FIFO readable.
            loop {
                match nix::unistd::read(&from, &mut buf) {
                    Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
                    Ok(n) => stream::write_frame(&mut to, &buf[..n]).await?,
                    Err(e) => return Err(std::io::Error::from(e).into()),
                }
            }
        }
        stream::write_frame(&mut to, b"").await
    }
    .await;
    if let Err(e) = result {
        debug!(log, "stdin stream ended early"; "error" => %e);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn stream_kinds_follow_the_paths() {
        let p = StdioPaths {
            stdout: "/o".into(),
            stderr: "/e".into(),
            ..Default::default()
        };
        assert_eq!(
            p.stream_kinds(),
            vec![StreamKind::Stdout, StreamKind::Stderr]
        );
        let p = StdioPaths {
            stdin: "/i".into(),
            ..Default::default()
        };
        assert_eq!(
            p.stream_kinds(),
            vec![StreamKind::Stdout, StreamKind::Stderr, StreamKind::Stdin]
        );
        let p = StdioPaths {
            stdin: "/i".into(),
            terminal: true,
            ..Default::default()
        };
        assert_eq!(p.stream_kinds(), vec![StreamKind::Tty]);
    }

    #[test]
    fn only_paths_are_supported() {
        assert_eq!(plain_path("/a/b").unwrap(), "/a/b");
        assert_eq!(plain_path("file:///a/b").unwrap(), "/a/b");
        assert!(matches!(
            plain_path("binary:///bin/logger"),
            Err(StdioError::Unsupported(_))
        ));
    }

    async fn stdin_frames(
        paths: &StdioPaths,
        write: Option<&'static [u8]>,
        close_io: bool,
    ) -> Vec<u8> {
        let (mut agent_side, shim_side) = UnixStream::pair().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let io = ProcessIo::start(paths, vec![(StreamKind::Stdin, shim_side)], &log)
            .await
            .unwrap();
        if let Some(data) = write {
            // A blocking open, as containerd's clients do: it waits for the shim's reader.
            let fifo = paths.stdin.clone();
            tokio::task::spawn_blocking(move || std::fs::write(fifo, data))
                .await
                .unwrap()
                .unwrap();
        }
        if close_io {
            io.close_stdin();
        }
        let (mut got, mut frame) = (Vec::new(), Vec::new());
        while stream::read_frame(&mut agent_side, &mut frame)
            .await
            .unwrap()
        {
            got.extend_from_slice(&frame);
        }
        got
    }

    #[tokio::test]
    async fn stdin_is_framed_and_ends_on_writer_close_or_close_io() {
        let dir = std::env::temp_dir().join(format!("shoji-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdin");
        let paths = StdioPaths {
            stdin: fifo.to_str().unwrap().into(),
            ..Default::default()
        };
        for (write, close_io, want) in [
            (Some(&b"hello"[..]), false, &b"hello"[..]),
            (Some(b"again"), true, b"again"),
            (None, true, b""),
        ] {
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                stdin_frames(&paths, write, close_io),
            )
            .await;
            assert_eq!(got.expect("end of input was not delivered"), want);
            std::fs::remove_file(&fifo).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
