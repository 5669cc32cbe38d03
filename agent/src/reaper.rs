//! The guest's only `waitpid(-1)`: reaps every child and orphan of PID 1 and hands out
//! exit statuses by pid.
//!
//! A process may exit before anybody asked for it (a helper that finishes quickly, a
//! container process that dies at once): its status waits in the `unclaimed` table until
//! [`Reaper::watch`] takes it. Orphans nobody ever asks for are evicted oldest first, and an
//! unclaimed exit older than the process being watched belongs to an earlier process with
//! the same (reused) pid: it is dropped, not handed out.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use slog::{debug, error};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

use crate::logger::log;

/// How many unclaimed exits are kept.
const UNCLAIMED_MAX: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    pub at: SystemTime,
}

/// Maps a wait status to the shell convention; None for stop/continue notifications.
fn exit_status(ws: WaitStatus) -> Option<(Pid, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

#[derive(Default)]
struct Tables {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits nobody waited for yet, with when they were reaped.
    unclaimed: HashMap<i32, (Exit, Instant)>,
    unclaimed_order: VecDeque<i32>,
}

#[derive(Default)]
pub struct Reaper {
    tables: Mutex<Tables>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Call before spawning any child.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    error!(
                        log(),
                        "SIGCHLD stream ended, no more children will be reaped"
                    );
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(ws) => {
                    if let Some((pid, status)) = exit_status(ws) {
                        self.record(
                            pid.as_raw(),
                            Exit {
                                status,
                                at: SystemTime::now(),
                            },
                        );
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!(log(), "waitpid failed"; "error" => %e);
                    return;
                }
            }
        }
    }

    fn record(&self, pid: i32, exit: Exit) {
        let mut t = self.tables.lock().unwrap();
        match t.waiters.remove(&pid) {
            // A dropped receiver means nobody cares any more.
            Some(tx) => drop(tx.send(exit)),
            None => {
                debug!(log(), "reaped unclaimed process"; "pid" => pid, "status" => exit.status);
                if t.unclaimed.insert(pid, (exit, Instant::now())).is_none() {
                    t.unclaimed_order.push_back(pid);
                }
                while t.unclaimed_order.len() > UNCLAIMED_MAX {
                    if let Some(old) = t.unclaimed_order.pop_front() {
                        t.unclaimed.remove(&old);
                    }
                }
            }
        }
    }

    /// Resolves with the exit of process `pid`, even if it was reaped before this call.
    /// `born`: a moment before the process was created; an exit reaped earlier was another
    /// process's.
    pub fn watch(&self, pid: i32, born: Instant) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.tables.lock().unwrap();
        if let Some((exit, reaped)) = t.unclaimed.remove(&pid) {
            t.unclaimed_order.retain(|p| *p != pid);
            if reaped >= born {
                let _ = tx.send(exit);
                return rx;
            }
            debug!(log(), "dropped the stale exit of a reused pid"; "pid" => pid);
        }
        t.waiters.insert(pid, tx);
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn statuses_follow_the_shell_convention() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 3)), Some((pid, 3)));
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((pid, 137))
        );
        assert_eq!(exit_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
    }

    #[test]
    fn exit_before_watch_is_kept_and_a_reused_pid_gets_no_stale_exit() {
        let r = Reaper::default();
        let exit = Exit {
            status: 1,
            at: SystemTime::now(),
        };
        let born = Instant::now();
        r.record(42, exit);
        assert_eq!(r.watch(42, born).try_recv().unwrap(), exit);
        // Claimed once only.
        let mut rx = r.watch(42, born);
        assert!(rx.try_recv().is_err());
        r.record(42, exit);
        assert_eq!(rx.try_recv().unwrap(), exit);
        // An orphan with pid 43 exits unclaimed; later a new process gets pid 43.
        r.record(43, exit);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut rx = r.watch(43, Instant::now());
        assert!(
            rx.try_recv().is_err(),
            "the old process's exit was handed out"
        );
        let second = Exit { status: 0, ..exit };
        r.record(43, second);
        assert_eq!(rx.try_recv().unwrap(), second);
    }
}
