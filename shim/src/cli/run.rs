//! `shoji vm run`: a throwaway VM running one container, its stdio on the terminal.
use std::{path::PathBuf, sync::Arc, time::Duration};

use shoji_agent_api::stream::{self, StreamKind};
use slog::{warn, Logger};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    signal::unix::{signal, SignalKind},
};

use super::{rootfs, run_spec, sandbox_config, throwaway_id, CliError};
use crate::{
    agent_client::AgentClient,
    config::Config,
    sandbox::{ContainerRequest, Mount, Sandbox},
};

/// The container's id inside a `vm run` VM.
const CONTAINER: &str = "main";
/// How long output may keep flowing after the process exited (the agent closes the
/// streams once drained; this only bounds a broken guest).
const DRAIN: Duration = Duration::from_secs(5);

/// What `shoji vm run` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The container's root filesystem (a host directory, not modified); default busybox.
    pub rootfs: Option<PathBuf>,
    pub tty: bool,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub args: Vec<String>,
}

/// Resolves on the first SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
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

/// Boots a VM, runs the command in a container on `rootfs` (guest overlay, so the
/// directory is untouched), streams its stdio, tears everything down, and returns the
/// command's exit status. A SIGINT/SIGTERM tears down at once.
pub async fn run_vm(config: Config, opts: RunOptions, log: Logger) -> Result<i32, CliError> {
    let rootfs = match &opts.rootfs {
        Some(dir) => dir.clone(),
        None => rootfs::default_rootfs().map_err(|source| CliError::Io {
            context: "building the default busybox rootfs".into(),
            source,
        })?,
    };
    let id = throwaway_id("vm");
    let cfg = sandbox_config(config, &id, opts.vcpus, opts.memory_mib);
    // Started on its own task: dropping a half-done start would leak what it created.
    let mut start = tokio::spawn(Sandbox::start(cfg, log.clone()));
    let sandbox = tokio::select! {
        started = &mut start => Arc::new(started.expect("sandbox start panicked")?),
        sig = interrupted() => {
            if let Ok(Ok(sandbox)) = start.await {
                let _ = sandbox.stop().await;
            }
            return Err(CliError::Interrupted(sig));
        }
    };
    let result = tokio::select! {
        r = run_container(&sandbox, &rootfs, &opts) => r,
        sig = interrupted() => Err(CliError::Interrupted(sig)),
    };
    if let Err(e) = sandbox.remove_container(CONTAINER).await {
        warn!(log, "removing the container failed"; "error" => %e);
    }
    let stopped = sandbox.stop().await;
    let status = result?;
    stopped?;
    Ok(status)
}

async fn run_container(
    sandbox: &Sandbox,
    rootfs: &std::path::Path,
    opts: &RunOptions,
) -> Result<i32, CliError> {
    sandbox
        .create_container(ContainerRequest {
            id: CONTAINER.into(),
            rootfs: vec![Mount::host_dir(rootfs, true)],
            spec: run_spec::container_spec(&opts.args, opts.tty, "shoji"),
            stdin: true,
            // The rootfs directory is never modified.
            guest_overlay: true,
        })
        .await?;
    let kinds: &[StreamKind] = if opts.tty {
        &[StreamKind::Tty]
    } else {
        &[StreamKind::Stdout, StreamKind::Stderr, StreamKind::Stdin]
    };
    let mut pumps = Vec::new();
    let mut raw = None;
    for (kind, conn) in sandbox.attach_stdio(CONTAINER, "", kinds).await? {
        match kind {
            StreamKind::Tty => {
                let (r, w) = conn.into_split();
                pumps.push(tokio::spawn(copy_out(r, tokio::io::stdout())));
                tokio::spawn(copy_in(w));
                raw = RawTerminal::enter();
            }
            StreamKind::Stdout => pumps.push(tokio::spawn(copy_out(conn, tokio::io::stdout()))),
            StreamKind::Stderr => pumps.push(tokio::spawn(copy_out(conn, tokio::io::stderr()))),
            StreamKind::Stdin => drop(tokio::spawn(copy_in(conn))),
        }
    }
    sandbox.start_process(CONTAINER, "").await?;
    if opts.tty {
        tokio::spawn(forward_winch(sandbox.agent().clone()));
    }
    let exit = sandbox.wait_process(CONTAINER, "").await?;
    let drained = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    let _ = tokio::time::timeout(DRAIN, drained).await;
    drop(raw);
    Ok(exit.exit_status)
}

/// Guest output → a local stream, raw, until the agent closes it.
async fn copy_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut from: R, mut to: W) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
}

/// Local stdin → the guest in frames, then the end-of-input frame.
async fn copy_in<W: AsyncWrite + Unpin>(mut to: W) {
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

/// Forwards the local terminal size to the container's tty, now and on every SIGWINCH.
async fn forward_winch(agent: AgentClient) {
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    loop {
        if let Some((cols, rows)) = terminal_size() {
            let _ = agent.resize_tty(CONTAINER, "", cols, rows).await;
        }
        if winch.recv().await.is_none() {
            return;
        }
    }
}

fn terminal_size() -> Option<(u32, u32)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col as u32, ws.ws_row as u32))
}

/// The local terminal in raw mode while a tty container runs; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
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
