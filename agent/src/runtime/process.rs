//! One process of a guest container: its stdio, its pid once it exists, and its exit as
//! the reaper reports it.
use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use nix::sys::signal::Signal;
use slog::warn;
use tokio::sync::watch;

use super::EXEC_RETENTION;
use crate::{
    cgroup,
    io::{ChildStdio, ProcessIo},
    logger::log,
    reaper::{Exit, Reaper},
};

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
        reaper: &Reaper,
        pid: i32,
        born: Instant,
        dies_with_it: Option<PathBuf>,
    ) {
        *self.pid.lock().unwrap() = Some(pid);
        let rx = reaper.watch(pid, born);
        let p = self.clone();
        tokio::spawn(async move {
            if let Ok(exit) = rx.await {
                if let Some(cgroup) = dies_with_it {
                    if let Err(e) = cgroup::kill_all(&cgroup) {
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
