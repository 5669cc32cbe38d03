//! Child daemons of the shim (VMM, virtiofsd, vhost-device-vsock): launch, exit watch, kill.
//!
//! Exit is observed through a pidfd, not `waitpid`: inside the containerd shim the
//! framework's SIGCHLD handler reaps every child, so a direct wait would race it and get
//! ECHILD. A pidfd turns readable when the process exits, whoever reaps it; the exit status
//! is collected when we win the race and reported as unknown otherwise.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokio::{io::unix::AsyncFd, sync::watch};

/// A running child process that is killed (SIGKILL) when dropped.
pub struct Daemon {
    name: &'static str,
    pid: u32,
    exit: watch::Receiver<Option<Option<i32>>>,
    _watcher: Arc<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`, in its own
    /// process group (so a signal to the shim's group does not reach it).
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> std::io::Result<Daemon> {
        use std::os::unix::process::CommandExt;
        let out = File::options().create(true).append(true).open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn()?;
        let pid = child.id();
        // The std Child is dropped without waiting: exit is observed through the pidfd.
        drop(child);
        let pidfd = pidfd_open(pid)?;
        let (tx, rx) = watch::channel(None);
        let watcher = tokio::spawn(async move {
            let status = wait_pidfd(pidfd, pid).await;
            let _ = tx.send(Some(status));
        });
        Ok(Daemon {
            name,
            pid,
            exit: rx,
            _watcher: Arc::new(watcher),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` once exited; status is the exit code or 128 + signal when known.
    pub fn exited(&self) -> Option<Option<i32>> {
        *self.exit.borrow()
    }

    /// Resolves when the process has exited.
    pub async fn wait(&self) -> Option<i32> {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return status;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is gone. Idempotent.
    pub async fn stop(&self, grace: Duration) -> Option<i32> {
        if let Some(status) = self.exited() {
            return status;
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => self.kill().await,
        }
    }

    /// SIGKILL and wait for the exit. Idempotent.
    pub async fn kill(&self) -> Option<i32> {
        self.signal(libc::SIGKILL);
        self.wait().await
    }

    fn signal(&self, sig: i32) {
        if self.exited().is_none() {
            // SAFETY: plain kill(2); the pid cannot be reused before it is reaped, and
            // exited() is checked first, so a reaped pid is not signalled by us.
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

async fn wait_pidfd(pidfd: OwnedFd, pid: u32) -> Option<i32> {
    match readable(pidfd).await {
        Some(fd) => reap(fd.as_raw_fd()),
        // Cannot poll the pidfd (not expected): fall back to polling the pid.
        None => {
            while unsafe { libc::kill(pid as i32, 0) } == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    }
}

/// Waits until the pidfd is readable (the process exited); `None` if it cannot be polled.
async fn readable(pidfd: OwnedFd) -> Option<OwnedFd> {
    // SAFETY: the AsyncFd owns `pidfd`, so the descriptor stays open and unchanged while registered.
    let fd = unsafe { AsyncFd::register(pidfd) }.ok()?;
    let _ = fd.readable().await;
    Some(fd.into_inner())
}

/// Resolves when process `pid` has exited, without reaping it (its parent still collects
/// the status). Returns at once if no such process exists.
pub async fn wait_pid_exit(pid: u32) {
    let Ok(pidfd) = pidfd_open(pid) else { return };
    if readable(pidfd).await.is_none() {
        while unsafe { libc::kill(pid as i32, 0) } == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Collects the exit status through the pidfd, if no other reaper took it first.
fn reap(pidfd: i32) -> Option<i32> {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(P_PIDFD) fills `info`; ECHILD (reaped elsewhere) leaves it zeroed.
    let rc = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, libc::WEXITED) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful waitid, si_status and si_code are valid.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    Some(if code == libc::CLD_EXITED {
        status
    } else {
        128 + status
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_exit_code_and_kill() {
        let dir = std::env::temp_dir();
        let log = dir.join(format!("shoji-daemon-test-{}.log", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let d = Daemon::spawn("sh", cmd, &log).unwrap();
        assert_eq!(d.wait().await, Some(7));

        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let d = Daemon::spawn("sleep", cmd, &log).unwrap();
        assert_eq!(d.exited(), None);
        assert_eq!(
            d.stop(Duration::from_secs(5)).await,
            Some(128 + libc::SIGTERM)
        );
        assert_eq!(
            d.stop(Duration::from_secs(5)).await,
            Some(128 + libc::SIGTERM)
        );
        let _ = std::fs::remove_file(log);
    }
}
