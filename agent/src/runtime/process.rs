//! One process of a guest container: its stdio, its pid once it exists, and its exit as
//! the reaper reports it.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use nix::sys::signal::Signal;
use slog::warn;
use tokio::sync::watch;

use super::{guest_os::NewStdio, internal, GuestOs, RuntimeError};
use crate::{
    io::{ChildStdio, ConsoleSocket, ProcessIo},
    logger::log,
    reaper::Exit,
};

/// How long a tty process's pty master may take to arrive on its console socket.
const PTY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exec is remembered after WaitProcess reported its exit.
pub(super) const EXEC_RETENTION: Duration = Duration::from_secs(60);

/// One process: a container's init (exec_id "") or an exec.
pub(super) struct Process {
    pub(super) exec_id: String,
    /// Where its files live (the bundle for the init, `execs/<id>` for an exec).
    pub(super) dir: PathBuf,
    pub io: Arc<ProcessIo>,
    /// The container's ends of the stdio pipes until the process is created (None with a tty).
    pub(super) child_stdio: Mutex<Option<ChildStdio>>,
    /// Set once the process exists (the init: at create; an exec: at start).
    pub(super) pid: Mutex<Option<i32>>,
    pub(super) started: Mutex<bool>,
    pub(super) exit: watch::Sender<Option<Exit>>,
    /// Set once a WaitProcess call returned the exit.
    pub(super) reported: AtomicBool,
}

impl Process {
    pub(super) fn new(
        exec_id: &str,
        dir: PathBuf,
        io: ProcessIo,
        child_stdio: Option<ChildStdio>,
    ) -> Process {
        Process {
            exec_id: exec_id.to_string(),
            dir,
            io: Arc::new(io),
            child_stdio: Mutex::new(child_stdio),
            pid: Mutex::new(None),
            started: Mutex::new(false),
            exit: watch::channel(None).0,
            reported: AtomicBool::new(false),
        }
    }

    pub(super) fn pid(&self) -> Option<i32> {
        *self.pid.lock().unwrap()
    }

    pub(super) fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the pid and follows the process's exit through the reaper. `born`: a moment
    /// before the process was created. `dies_with_it`: a cgroup whose processes are killed
    /// when this one exits, before its exit is published (what it leaves would otherwise
    /// hold its output open).
    pub(super) fn set_pid(
        self: &Arc<Self>,
        os: &Arc<dyn GuestOs>,
        pid: i32,
        born: Instant,
        dies_with_it: Option<PathBuf>,
    ) {
        *self.pid.lock().unwrap() = Some(pid);
        let rx = os.reap(pid, born);
        let (p, os) = (self.clone(), os.clone());
        tokio::spawn(async move {
            if let Ok(exit) = rx.await {
                if let Some(cgroup) = dies_with_it {
                    if let Err(e) = os.signal_all(&cgroup, Signal::SIGKILL).await {
                        warn!(log(), "killing what the process left failed"; "cgroup" => %cgroup.display(), "error" => %e);
                    }
                }
                p.exit
                    .send_if_modified(|e| e.is_none() && e.replace(exit).is_none());
            }
        });
    }

    /// A process that never ran gets an exit too, so that nobody waits for it forever.
    pub(super) fn mark_gone(&self) {
        self.io.abandon();
        let gone = Exit {
            status: 128 + Signal::SIGKILL as i32,
            at: SystemTime::now(),
        };
        self.exit
            .send_if_modified(|e| e.is_none() && e.replace(gone).is_none());
    }
}

/// How a process being made gets its stdio: the container's ends of its pipes, or (a tty)
/// a console socket its pty master will arrive on.
pub(super) struct Launch {
    child: Option<ChildStdio>,
    console: Option<ConsoleSocket>,
}

impl Launch {
    /// For a process whose pipe ends are `child` (None: a tty, whose socket is bound in `console_dir`).
    pub(super) fn new(
        child: Option<ChildStdio>,
        console_dir: &Path,
    ) -> Result<Launch, RuntimeError> {
        let console = match child {
            Some(_) => None,
            None => Some(ConsoleSocket::bind(console_dir).map_err(internal("console socket"))?),
        };
        Ok(Launch { child, console })
    }

    pub(super) fn stdio(&self) -> NewStdio<'_> {
        match (&self.child, &self.console) {
            (Some(child), _) => NewStdio::Pipes(child.fds()),
            (None, Some(console)) => NewStdio::Console(console.path()),
            (None, None) => unreachable!("Launch::new binds a console socket without pipes"),
        }
    }

    /// Once the process exists: lets go of the pipe ends (the container holds its own, and
    /// EOF must be possible), and keeps a tty's pty master in `io`.
    pub(super) async fn finish(self, io: &ProcessIo) -> Result<(), RuntimeError> {
        drop(self.child);
        if let Some(console) = self.console {
            let master = console
                .receive(PTY_TIMEOUT)
                .await
                .map_err(internal("receiving the pty master"))?;
            io.set_master(master)
                .map_err(internal("keeping the pty master"))?;
        }
        Ok(())
    }
}

/// Forgets execs whose exit was reported long enough ago: there is no RPC to delete an
/// exec, and exec probes would otherwise pile up for the container's whole life.
pub(super) fn prune_reported_execs(execs: &mut HashMap<String, Arc<Process>>) {
    let now = SystemTime::now();
    execs.retain(|_, p| {
        let old = p
            .exited()
            .is_some_and(|e| now.duration_since(e.at).unwrap_or_default() > EXEC_RETENTION);
        let gone = old && p.reported.load(Ordering::Relaxed);
        if gone {
            let _ = fs::remove_dir_all(&p.dir);
        }
        !gone
    });
}
