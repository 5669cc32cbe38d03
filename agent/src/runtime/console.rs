//! Debug consoles (`shoji console` on the host): an interactive busybox shell on a pty in
//! the guest's root namespaces, outside every container.
//!
//! Allowed only when the host booted the VM with `shoji.debug_console=1` on the kernel
//! command line (the guest cannot change it, and a call on a VM booted without it is
//! refused). The shell is the host's static busybox, shared read-only at
//! `<share>/.shoji-debug/busybox`. Its process is `(DEBUG_CONSOLE_CONTAINER, console-<n>)`
//! for the tty stream, WaitProcess, ResizeTty and SignalProcess. Every console is logged
//! when it opens and when it ends. A console whose tty stream breaks, or that no stream
//! attaches to, is killed with everything it started.
use std::{
    collections::HashMap,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use nix::{
    pty::{openpty, Winsize},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use shoji_agent_api::{types::DebugConsoleRequest, DEBUG_SHELL_REL, GUEST_SHARE_DIR};
use slog::{info, warn};

use super::{internal, process::Process, Runtime, RuntimeError};
use crate::{
    io::{InputEnd, ProcessIo, ATTACH_GRACE},
    logger::log,
};

/// How long an ended console stays known (for a late WaitProcess).
const RETENTION: Duration = Duration::from_secs(60);
/// Most consoles at once: each is a shell the host asked for, but a loop must not fill the guest.
const MAX_CONSOLES: usize = 16;
const TERM_MAX: usize = 64;

/// The guest's debug consoles and whether the host allows them.
pub struct DebugConsoles {
    allowed: bool,
    next: AtomicU64,
    shells: Mutex<HashMap<String, Arc<Process>>>,
}

impl DebugConsoles {
    pub fn new(allowed: bool) -> DebugConsoles {
        DebugConsoles {
            allowed,
            next: AtomicU64::new(1),
            shells: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn process(&self, exec_id: &str) -> Result<Arc<Process>, RuntimeError> {
        self.shells
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(format!("no debug console {exec_id:?}")))
    }

    /// Sends `signal` to the console's shell.
    pub(super) fn signal(&self, exec_id: &str, signal: u32) -> Result<(), RuntimeError> {
        let p = self.process(exec_id)?;
        let sig = Signal::try_from(signal as i32).map_err(|_| {
            RuntimeError::InvalidArgument(format!("{signal} is not a signal number"))
        })?;
        match (p.pid(), p.exited()) {
            (Some(pid), None) => kill(Pid::from_raw(pid), sig).map_err(internal("kill")),
            _ => Err(RuntimeError::NotFound(format!(
                "debug console {exec_id:?} already exited"
            ))),
        }
    }
}

impl Runtime {
    /// Starts a debug shell on a new pty; returns its exec id and pid.
    pub async fn start_debug_console(
        &self,
        req: &DebugConsoleRequest,
    ) -> Result<(String, u32), RuntimeError> {
        let consoles = &self.consoles;
        if !consoles.allowed {
            return Err(RuntimeError::PermissionDenied(
                "the debug console is off: the host did not boot this VM with debug_console = true"
                    .into(),
            ));
        }
        let term = term(&req.term)?;
        let shell = Path::new(GUEST_SHARE_DIR).join(DEBUG_SHELL_REL);
        if !shell.is_file() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "the debug shell {} is missing (the host shares its static busybox, /bin/busybox)",
                shell.display()
            )));
        }
        {
            let mut shells = consoles.shells.lock().unwrap();
            let now = SystemTime::now();
            shells.retain(|_, p| {
                p.exited()
                    .is_none_or(|e| now.duration_since(e.at).unwrap_or_default() < RETENTION)
            });
            if shells.values().filter(|p| p.exited().is_none()).count() >= MAX_CONSOLES {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "{MAX_CONSOLES} debug consoles are open already"
                )));
            }
        }
        let exec_id = format!("console-{}", consoles.next.fetch_add(1, Ordering::Relaxed));
        let size = Winsize {
            ws_row: req.height.clamp(1, u16::MAX as u32) as u16,
            ws_col: req.width.clamp(1, u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).map_err(internal("opening a pty"))?;
        let stdio = || -> Result<Stdio, RuntimeError> {
            Ok(Stdio::from(
                pty.slave
                    .try_clone()
                    .map_err(internal("duplicating the pty"))?,
            ))
        };
        let mut cmd = Command::new(&shell);
        cmd.arg0("sh")
            .arg("-i")
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/")
            .env("TERM", term)
            .env("PS1", "[shoji debug \\h \\w]# ")
            .current_dir("/")
            .stdin(stdio()?)
            .stdout(stdio()?)
            .stderr(stdio()?);
        // SAFETY: only async-signal-safe calls (setsid, ioctl, signal) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent ignores SIGPIPE, and an ignored signal stays ignored across exec.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                Ok(())
            });
        }
        let born = Instant::now();
        let child = cmd.spawn().map_err(internal("starting the debug shell"))?;
        let pid = child.id() as i32;
        // The reaper collects the exit; never wait on `child`.
        drop(child);
        drop(pty.slave);
        let pio = ProcessIo::tty();
        // The end of the host's input is ^D (what a terminal sends); a broken stream means
        // nobody is at the terminal any more.
        pio.on_input_end(Box::new(move |pio, end| match end {
            InputEnd::Eof => drop(pio.type_into_tty(b"\x04")),
            InputEnd::Broken => hang_up(pid),
        }));
        pio.set_master(pty.master)
            .map_err(internal("keeping the pty master"))?;
        let process = Arc::new(Process::new(&exec_id, PathBuf::from("/"), pio, None));
        *process.started.lock().unwrap() = true;
        process.set_pid(&self.os, pid, born, None);
        consoles
            .shells
            .lock()
            .unwrap()
            .insert(exec_id.clone(), process.clone());
        info!(log(), "debug console opened"; "exec" => &exec_id, "pid" => pid, "term" => term);
        tokio::spawn(follow(exec_id.clone(), process));
        Ok((exec_id, pid as u32))
    }
}

/// Kills a console nobody attached to, and logs its end.
async fn follow(exec_id: String, process: Arc<Process>) {
    let mut exit = process.exit.subscribe();
    let ended = tokio::time::timeout(ATTACH_GRACE, exit.wait_for(|e| e.is_some()))
        .await
        .is_ok();
    if !ended && !process.io.is_attached() {
        warn!(log(), "no stream attached to the debug console, ending it"; "exec" => &exec_id);
        if let Some(pid) = process.pid() {
            hang_up(pid);
        }
    }
    let status = exit
        .wait_for(|e| e.is_some())
        .await
        .ok()
        .and_then(|e| e.as_ref().map(|e| e.status));
    info!(log(), "debug console ended"; "exec" => &exec_id, "status" => status);
}

/// Ends a console's shell and everything it started (its whole session: job control gives
/// each pipeline its own process group).
fn hang_up(session: i32) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        // SAFETY: getsid(2) has no preconditions.
        if unsafe { libc::getsid(pid) } == session {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// TERM as the host asked (a terminal name), or `linux`.
fn term(requested: &str) -> Result<&str, RuntimeError> {
    if requested.is_empty() {
        return Ok("linux");
    }
    let ok = requested.len() <= TERM_MAX
        && requested
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if ok {
        Ok(requested)
    } else {
        Err(RuntimeError::InvalidArgument(format!(
            "TERM {:?} is not a terminal name",
            requested.chars().take(TERM_MAX).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_names_are_checked() {
        assert_eq!(term("").unwrap(), "linux");
        assert_eq!(term("xterm-256color").unwrap(), "xterm-256color");
        for bad in ["a b", "x;rm", "\n", &"x".repeat(65)] {
            assert!(term(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn consoles_are_refused_unless_the_host_allowed_them() {
        let guest = super::super::tests::runtime(false);
        let runtime = &guest.rt;
        let err = runtime
            .start_debug_console(&DebugConsoleRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::PermissionDenied(_)), "{err}");
        assert!(runtime.consoles.process("console-1").is_err());
    }
}
