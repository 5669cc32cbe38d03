//! Container lifecycle verbs. Those where libcontainer clones processes (`create`, `exec`)
//! each run in a short-lived single-threaded copy of the agent:
//! `shoji-agent helper <verb> <work-dir> <request-json>`; `start` and `kill` are done by the
//! agent itself, and the pod's `pause` process is spawned directly (see there).
//!
//! libcontainer clones raw processes and waits for its own intermediate child, which is
//! unsafe inside the multi-threaded PID 1 that reaps every child. So the agent spawns a
//! helper per verb and learns the outcome only from things that do not depend on the
//! helper's pipes (a created container keeps every fd the helper had):
//! * success or failure: the helper's exit status, delivered by the agent's reaper;
//! * the error text: `<work-dir>/<verb>.err`;
//! * the container/exec pid: a pid file written by libcontainer;
//! * libcontainer's tracing: `<work-dir>/<verb>.log` (close-on-exec, never the container's stderr).
//!
//! Stdio for the container's process is passed at fixed fds [`FD_STDIN`], [`FD_STDOUT`],
//! [`FD_STDERR`] (never 0–2, which are the helper's own /dev/null); a tty arrives as the pty
//! master over libcontainer's console socket, which the agent listens on.
pub mod create;
pub mod exec;
pub mod guest_spec;
pub mod helper;
pub mod kill;
pub mod pause;
pub mod rootfs;
pub mod spawn;
pub mod standby;
pub mod start;
pub mod volumes;

use std::{
    os::{
        fd::{AsRawFd, BorrowedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde::Serialize;

use slog::debug;

use crate::{logger::log, reaper::Reaper};

/// argv[1] that selects helper mode.
pub const HELPER_ARG: &str = "helper";
/// libcontainer's state directory.
pub const STATE_ROOT: &str = "/run/shoji/libcontainer";
pub const FD_STDIN: RawFd = 3;
pub const FD_STDOUT: RawFd = 4;
pub const FD_STDERR: RawFd = 5;

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("helper {verb}: spawning failed: {source}")]
    Spawn {
        verb: &'static str,
        source: std::io::Error,
    },
    #[error("helper {verb}: no result within {0:?}", timeout)]
    Timeout {
        verb: &'static str,
        timeout: Duration,
    },
    #[error("{message}")]
    Failed {
        verb: &'static str,
        status: i32,
        message: String,
    },
}

fn err_file(work_dir: &Path, verb: &str) -> PathBuf {
    work_dir.join(format!("{verb}.err"))
}

fn log_file(work_dir: &Path, verb: &str) -> PathBuf {
    work_dir.join(format!("{verb}.log"))
}

/// `/proc/self/exe <args>` as `shoji-agent`, empty environment, stdio /dev/null.
fn agent_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("shoji-agent")
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Starts a fresh helper ([`agent_command`]) with `fds` placed at their target numbers;
/// returns its pid and when it started. The reaper collects its exit: nothing may wait on
/// it otherwise.
fn spawn_agent_copy(
    args: &[&str],
    fds: &[(RawFd, BorrowedFd<'_>)],
) -> std::io::Result<(i32, std::time::Instant)> {
    let moves: Vec<(RawFd, RawFd)> = fds
        .iter()
        .map(|(target, fd)| (fd.as_raw_fd(), *target))
        .collect();
    let mut cmd = agent_command(args);
    // SAFETY: between fork and exec only fcntl and dup2, and the allocation of move_fds's
    // small result (glibc's malloc is usable in a forked child).
    unsafe {
        // The parked copies close at exec.
        cmd.pre_exec(move || move_fds(&moves).map(drop));
    }
    let born = std::time::Instant::now();
    let child = cmd.spawn()?;
    Ok((child.id() as i32, born))
}

/// Moves each `(source, target)` fd to its target number, without close-on-exec (as an
/// inherited fd). Every source is parked above the targets first so that no move clobbers
/// another source; the parked copies (close-on-exec) are returned for the caller to close.
/// Only fcntl and dup2, so it may run between fork and exec.
fn move_fds(moves: &[(RawFd, RawFd)]) -> std::io::Result<Vec<RawFd>> {
    let mut parked = Vec::with_capacity(moves.len());
    for (src, _) in moves {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd or -1.
        let high = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        parked.push(high);
    }
    for (high, (_, target)) in parked.iter().zip(moves) {
        // SAFETY: dup2 onto a fixed number the caller reserved for this fd.
        if unsafe { libc::dup2(*high, *target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(parked)
}

/// Runs helper `verb` (in the standby if one waits, else in a new `shoji-agent helper <verb>`)
/// with `fds` placed at their target numbers and waits (through the reaper) for its exit.
/// On timeout the helper is killed.
pub async fn run_helper(
    reaper: &Reaper,
    verb: &'static str,
    work_dir: &Path,
    request: &impl Serialize,
    fds: &[(RawFd, BorrowedFd<'_>)],
    timeout: Duration,
) -> Result<(), HelperError> {
    let request = serde_json::to_string(request).expect("helper requests serialize");
    let _ = std::fs::remove_file(err_file(work_dir, verb));
    let began = std::time::Instant::now();
    let handed = standby::hand_over(verb, work_dir, &request, fds);
    let standby = handed.is_some();
    let (pid, born) = match handed {
        Some(started) => started,
        None => spawn_agent_copy(
            &[HELPER_ARG, verb, &work_dir.to_string_lossy(), &request],
            fds,
        )
        .map_err(|source| HelperError::Spawn { verb, source })?,
    };
    let watched = tokio::time::timeout(timeout, reaper.watch(pid, born)).await;
    debug!(log(), "helper finished"; "verb" => verb, "standby" => standby,
        "ms" => began.elapsed().as_millis() as u64);
    // The next helper's start is paid now, beside this one's caller (the spawn waits for the
    // exec, ~100 ms under TCG, which the caller must not).
    tokio::task::spawn_blocking(standby::replenish);
    let exit = match watched {
        Ok(Ok(exit)) => exit,
        Ok(Err(_)) => unreachable!("the reaper never drops a waiter"),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(HelperError::Timeout { verb, timeout });
        }
    };
    if exit.status == 0 {
        return Ok(());
    }
    let message = std::fs::read_to_string(err_file(work_dir, verb))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            format!(
                "helper {verb} exited with status {} and left no error",
                exit.status
            )
        });
    Err(HelperError::Failed {
        verb,
        status: exit.status,
        message,
    })
}

/// An error and its sources, outermost first (libcontainer's top-level messages are terse).
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
