//! The local terminal and stdio of `shoji vm run` and `shoji console`: raw mode while a
//! guest tty is attached, the pumps between local stdio and the agent's streams, window
//! size forwarding, and the signals that interrupt a command.
use std::time::Duration;

use shoji_agent_api::stream;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    signal::unix::{signal, SignalKind},
};

use crate::agent_client::AgentClient;

/// How long output may keep flowing after the process exited (the agent closes the
/// streams once drained; this only bounds a broken guest).
pub(super) const DRAIN: Duration = Duration::from_secs(5);

/// Resolves on the first SIGINT or SIGTERM, naming it.
pub(super) async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Attaches a guest tty stream to the local terminal: its output goes to stdout, stdin
/// goes to it in frames, and the terminal (if stdin is one) is raw until the returned
/// guard drops. Returns the output pump, which ends once the guest closed the stream.
pub(super) fn attach_tty(
    conn: tokio::net::UnixStream,
) -> (tokio::task::JoinHandle<()>, Option<RawTerminal>) {
    let (r, w) = conn.into_split();
    let output = tokio::spawn(copy_out(r, tokio::io::stdout()));
    tokio::spawn(copy_in(w));
    (output, RawTerminal::enter())
}

/// Guest output → a local stream, raw, until the agent closes it.
pub(super) async fn copy_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut from: R, mut to: W) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
}

/// Local stdin → the guest in frames, then the end-of-input frame.
pub(super) async fn copy_in<W: AsyncWrite + Unpin>(mut to: W) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream::write_frame(&mut to, &buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream::write_frame(&mut to, b"").await;
    // Keep the write half open: closing it early could end the stream before the agent read EOF.
    std::future::pending::<()>().await;
}

/// Forwards the local terminal size to a process's tty, now and on every SIGWINCH.
pub(super) async fn forward_winch(agent: AgentClient, container_id: &'static str, exec_id: String) {
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    loop {
        if let Some((cols, rows)) = terminal_size() {
            let _ = agent.resize_tty(container_id, &exec_id, cols, rows).await;
        }
        if winch.recv().await.is_none() {
            return;
        }
    }
}

pub(super) fn terminal_size() -> Option<(u32, u32)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col as u32, ws.ws_row as u32))
}

/// The local terminal in raw mode while a tty container runs; restored on drop.
pub(super) struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    pub(super) fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
