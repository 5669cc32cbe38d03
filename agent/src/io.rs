//! Process stdio: pipes or a pty per process, and the pumps that move it over an attached
//! stream (which stream goes where is [`crate::streams`]' job).
//!
//! Output is read only while its stream is attached, so nothing is lost before the host
//! attaches (the pipe or pty buffers it, and the process blocks when that is full). When
//! no stream attached within [`ATTACH_GRACE`] of the process's start, its unattached
//! output is drained and discarded so that a full pipe never blocks the process (or the
//! container's shutdown) forever. Output streams end when the pipe reaches EOF (the pty:
//! EIO once every slave is closed), so the bytes written just before exit arrive too.
//! WaitProcess waits for that, at most [`DRAIN_AFTER_EXIT`] past the exit (a grandchild
//! may keep the pipe open). A tty process's pty master arrives on libcontainer's console socket
//! ([`ConsoleSocket`]).
mod console_socket;

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    unistd::pipe2,
};
use shoji_agent_api::stream::{read_frame, StreamKind};
use slog::{debug, warn};
use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{oneshot, watch},
};

pub use self::console_socket::ConsoleSocket;
use crate::logger::log;

/// How long after StartProcess unattached output is kept for a stream to attach.
pub const ATTACH_GRACE: Duration = Duration::from_secs(5);
/// How long after the exit WaitProcess waits for output to be delivered.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long an output pump lets a writer of small pieces go on before sending what it read.
const COALESCE: Duration = Duration::from_millis(1);

/// A non-blocking pipe end or pty master driven by tokio.
struct AsyncFile(AsyncFd<OwnedFd>);

impl AsyncFile {
    fn new(fd: OwnedFd) -> io::Result<AsyncFile> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the OwnedFd stays open, unchanged, for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(AsyncFile(fd))
    }

    /// One read(2): 0 at EOF; a pty master reports EIO once all slaves are closed, which is
    /// EOF too. Nothing there yet is a `WouldBlock` error.
    fn read_once(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.0.get_ref(), buf) {
            Err(nix::errno::Errno::EIO) => Ok(0),
            r => r.map_err(io::Error::from),
        }
    }

    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|_| self.read_once(buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Appends to `buf[..len]` what is in the pipe now, without waiting; returns the new length
    /// and whether the end was reached.
    fn read_available(&self, buf: &mut [u8], mut len: usize) -> io::Result<(usize, bool)> {
        while len < buf.len() {
            match self.read_once(&mut buf[len..]) {
                Ok(0) => return Ok((len, true)),
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok((len, false))
    }

    async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// A process's output or input end held by the agent until a stream takes it.
enum Slot {
    Waiting(OwnedFd),
    /// A tty stream attached before the master exists (an exec's pty is made at start).
    Claimed(oneshot::Sender<OwnedFd>),
    Taken,
}

/// What attaching yields: the fd now, or (a tty attached early) the fd once it exists.
#[derive(Debug)]
pub enum Attached {
    Now(OwnedFd),
    Later(oneshot::Receiver<OwnedFd>),
}

/// The container's ends of a process's stdio, handed to the helper that creates it.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl ChildStdio {
    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        [self.stdin.as_fd(), self.stdout.as_fd(), self.stderr.as_fd()]
    }
}

/// The agent's side of one process's stdio.
pub struct ProcessIo {
    terminal: bool,
    slots: Mutex<HashMap<StreamKind, Slot>>,
    /// The pty master, kept for resizing.
    master: Mutex<Option<OwnedFd>>,
    /// One per output stream (stdout and stderr, or tty): true once its EOF was reached.
    drained: HashMap<StreamKind, watch::Sender<bool>>,
    /// Called when the tty's input stream ends (a debug console's reaction).
    on_input_end: Mutex<Option<InputEndHook>>,
}

/// How an input stream (stdin, or a tty's input) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEnd {
    /// The host sent the end-of-input frame.
    Eof,
    /// The connection broke (the host went away) or sent garbage.
    Broken,
}

/// What to do when a tty's input ends; gets the process's io and how it ended.
pub type InputEndHook = Box<dyn Fn(&ProcessIo, InputEnd) + Send + Sync>;

fn output_kinds(terminal: bool) -> &'static [StreamKind] {
    if terminal {
        &[StreamKind::Tty]
    } else {
        &[StreamKind::Stdout, StreamKind::Stderr]
    }
}

impl ProcessIo {
    fn empty(terminal: bool) -> ProcessIo {
        let drained = output_kinds(terminal)
            .iter()
            .map(|k| (*k, watch::channel(false).0))
            .collect();
        ProcessIo {
            terminal,
            slots: Mutex::new(HashMap::new()),
            master: Mutex::new(None),
            drained,
            on_input_end: Mutex::new(None),
        }
    }

    /// Sets what happens when the tty's input stream ends.
    pub fn on_input_end(&self, hook: InputEndHook) {
        *self.on_input_end.lock().unwrap() = Some(hook);
    }

    fn input_ended(&self, end: InputEnd) {
        if let Some(hook) = self.on_input_end.lock().unwrap().as_ref() {
            hook(self, end);
        }
    }

    /// Writes `bytes` as typed input into the tty (without blocking: a full input buffer
    /// loses them).
    pub fn type_into_tty(&self, bytes: &[u8]) -> io::Result<()> {
        let master = self.master.lock().unwrap();
        let master = master
            .as_ref()
            .ok_or_else(|| io::Error::other("the process has no tty"))?;
        nix::unistd::write(master, bytes)?;
        Ok(())
    }

    /// True once a stream took (or claimed) one of the process's stdio ends.
    pub fn is_attached(&self) -> bool {
        self.slots
            .lock()
            .unwrap()
            .values()
            .any(|s| matches!(s, Slot::Taken | Slot::Claimed(_)))
    }

    /// Pipes for a process without a tty; stdin is /dev/null unless `stdin`.
    pub fn pipes(stdin: bool) -> io::Result<(ProcessIo, ChildStdio)> {
        let pio = ProcessIo::empty(false);
        let mut slots = pio.slots.lock().unwrap();
        let child_stdin = if stdin {
            let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
            slots.insert(StreamKind::Stdin, Slot::Waiting(w));
            r
        } else {
            OwnedFd::from(OpenOptions::new().read(true).open("/dev/null")?)
        };
        let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC)?;
        slots.insert(StreamKind::Stdout, Slot::Waiting(out_r));
        slots.insert(StreamKind::Stderr, Slot::Waiting(err_r));
        drop(slots);
        Ok((
            pio,
            ChildStdio {
                stdin: child_stdin,
                stdout: out_w,
                stderr: err_w,
            },
        ))
    }

    /// A tty process: the master arrives later through [`ProcessIo::set_master`].
    pub fn tty() -> ProcessIo {
        ProcessIo::empty(true)
    }

    pub fn set_master(&self, master: OwnedFd) -> io::Result<()> {
        *self.master.lock().unwrap() = Some(master.try_clone()?);
        let mut slots = self.slots.lock().unwrap();
        let master = match slots.remove(&StreamKind::Tty) {
            Some(Slot::Claimed(tx)) => match tx.send(master) {
                Ok(()) => {
                    slots.insert(StreamKind::Tty, Slot::Taken);
                    return Ok(());
                }
                // The early stream went away: the master waits for the next one.
                Err(master) => master,
            },
            _ => master,
        };
        slots.insert(StreamKind::Tty, Slot::Waiting(master));
        Ok(())
    }

    /// Ends early tty streams when no master will come (the process never ran).
    pub fn abandon(&self) {
        let mut slots = self.slots.lock().unwrap();
        if matches!(slots.get(&StreamKind::Tty), Some(Slot::Claimed(_))) {
            slots.insert(StreamKind::Tty, Slot::Taken);
        }
    }

    /// Takes the fd a new stream of `kind` serves.
    pub fn attach(&self, kind: StreamKind) -> Result<Attached, String> {
        let mut slots = self.slots.lock().unwrap();
        match slots.get_mut(&kind) {
            Some(slot @ Slot::Waiting(_)) => match std::mem::replace(slot, Slot::Taken) {
                Slot::Waiting(fd) => Ok(Attached::Now(fd)),
                _ => unreachable!(),
            },
            Some(Slot::Taken | Slot::Claimed(_)) => {
                Err(format!("{kind} is already attached (or was discarded)"))
            }
            None if self.terminal && kind == StreamKind::Tty => {
                let (tx, rx) = oneshot::channel();
                slots.insert(kind, Slot::Claimed(tx));
                Ok(Attached::Later(rx))
            }
            None if self.terminal => {
                Err(format!("the process has a tty: attach `tty`, not {kind}"))
            }
            None if kind == StreamKind::Tty => Err("the process has no tty".into()),
            None => Err(format!("the process has no {kind}")),
        }
    }

    fn mark_drained(&self, kind: StreamKind) {
        if let Some(tx) = self.drained.get(&kind) {
            tx.send_replace(true);
        }
    }

    /// After [`ATTACH_GRACE`], drains and discards output no stream attached to.
    pub fn discard_unattached_later(self: &Arc<Self>) {
        let pio = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ATTACH_GRACE).await;
            for kind in output_kinds(pio.terminal) {
                if let Ok(Attached::Now(fd)) = pio.attach(*kind) {
                    debug!(log(), "discarding unattached output"; "stream" => %kind);
                    pump_output(&pio, *kind, fd, None::<tokio::io::Sink>).await;
                }
            }
        });
    }

    /// Waits until every output stream hit EOF, giving up at `deadline`.
    pub async fn drained(&self, deadline: tokio::time::Instant) {
        for tx in self.drained.values() {
            let mut rx = tx.subscribe();
            let _ = tokio::time::timeout_at(deadline, rx.wait_for(|d| *d)).await;
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> Result<(), String> {
        let master = self.master.lock().unwrap();
        let master = master.as_ref().ok_or("the process has no tty")?;
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(format!("resizing the tty: {}", io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Copies output to `conn` until EOF, then marks it drained. A broken connection does not
/// stop the draining (the process must never block on a full pipe).
async fn pump_output<W: AsyncWrite + Unpin>(
    pio: &ProcessIo,
    kind: StreamKind,
    fd: OwnedFd,
    mut conn: Option<W>,
) {
    match AsyncFile::new(fd) {
        Ok(file) => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut eof = false;
            while !eof {
                let mut n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        warn!(log(), "reading process output failed"; "stream" => %kind, "error" => %e);
                        break;
                    }
                };
                if n < buf.len() / 2 {
                    // A writer of small pieces wakes us for each one, and each would be a
                    // vsock send of its own (the costly part under emulation).
                    tokio::time::sleep(COALESCE).await;
                    match file.read_available(&mut buf, n) {
                        Ok((len, end)) => (n, eof) = (len, end),
                        Err(e) => {
                            warn!(log(), "reading process output failed"; "stream" => %kind, "error" => %e);
                            eof = true;
                        }
                    }
                }
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = c.write_all(&buf[..n]).await {
                        debug!(log(), "output stream broke, discarding the rest"; "stream" => %kind, "error" => %e);
                        conn = None;
                    }
                }
            }
        }
        Err(e) => warn!(log(), "process output unusable"; "stream" => %kind, "error" => %e),
    }
    if let Some(mut c) = conn {
        let _ = c.shutdown().await;
    }
    pio.mark_drained(kind);
}

/// Copies framed input from `conn` into the process until the EOF frame (or a broken
/// connection); then the process's stdin is closed (for a tty: input stops).
async fn pump_input<R: AsyncRead + Unpin>(kind: StreamKind, fd: OwnedFd, conn: &mut R) -> InputEnd {
    let file = match AsyncFile::new(fd) {
        Ok(f) => f,
        Err(e) => {
            warn!(log(), "process input unusable"; "stream" => %kind, "error" => %e);
            return InputEnd::Broken;
        }
    };
    let mut buf = Vec::new();
    loop {
        match read_frame(conn, &mut buf).await {
            Ok(true) => {
                if let Err(e) = file.write_all(&buf).await {
                    debug!(log(), "process input closed"; "stream" => %kind, "error" => %e);
                    return InputEnd::Eof;
                }
            }
            Ok(false) => return InputEnd::Eof,
            Err(e) => {
                debug!(log(), "input stream ended without EOF frame"; "stream" => %kind, "error" => %e);
                return InputEnd::Broken;
            }
        }
    }
}

/// Serves an attached stream: answers `OK`, then moves the data in its direction(s) until
/// the process's end closes. `attached` is what [`ProcessIo::attach`] gave for `kind`.
pub async fn serve_attached<S>(
    pio: Arc<ProcessIo>,
    kind: StreamKind,
    attached: Attached,
    mut conn: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = conn.write_all(b"OK\n").await.is_ok();
    let fd = match attached {
        Attached::Now(fd) => fd,
        Attached::Later(rx) => match rx.await {
            Ok(fd) => fd,
            // The process never ran.
            Err(_) => return,
        },
    };
    if !answered {
        // The host went away before the verdict: keep draining so the process cannot block.
        if kind != StreamKind::Stdin {
            pump_output(&pio, kind, fd, None::<S>).await;
        }
        return;
    }
    match kind {
        StreamKind::Stdin => drop(pump_input(kind, fd, &mut conn).await),
        StreamKind::Stdout | StreamKind::Stderr => pump_output(&pio, kind, fd, Some(conn)).await,
        StreamKind::Tty => {
            let input = match fd.try_clone() {
                Ok(i) => i,
                Err(e) => return warn!(log(), "duplicating the pty master failed"; "error" => %e),
            };
            let (mut rd, wr) = tokio::io::split(conn);
            let p = pio.clone();
            let input_task = tokio::spawn(async move {
                let end = pump_input(StreamKind::Tty, input, &mut rd).await;
                p.input_ended(end);
            });
            pump_output(&pio, kind, fd, Some(wr)).await;
            input_task.abort();
        }
    }
}

#[cfg(test)]
mod tests;
