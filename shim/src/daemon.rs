//! Child daemons of the shim (VMM, virtiofsd, vhost-device-vsock): launch, readiness, exit
//! watch, kill.
//!
//! Exit is observed through a pidfd, not `waitpid`: inside the containerd shim the
//! framework's SIGCHLD handler reaps every child, so a direct wait would race it and get
//! ECHILD. A pidfd turns readable when the process exits, whoever reaps it; the exit status
//! is collected when we win the race and reported as unknown otherwise.
//!
//! Every launch is reported to a [`PidLedger`] before anything else happens, so the
//! sandbox's state file names the process even if the shim dies a moment later.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokio::{io::unix::AsyncFd, sync::watch};

use crate::logtail::last_line;

/// How long a SIGKILLed process may take to be gone before we stop waiting (a process in
/// uninterruptible sleep; it is logged, not waited for forever).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Records launched processes for crash cleanup (the sandbox's state file).
pub trait PidLedger: Send + Sync {
    fn record(&self, name: &'static str, pid: u32);
}

/// For daemons nobody needs to clean up after a crash (tests, probes).
pub struct NoLedger;

impl PidLedger for NoLedger {
    fn record(&self, _: &'static str, _: u32) {}
}

/// Why a daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what} not found at {path}")]
    Missing { what: &'static str, path: PathBuf },
    #[error("failed to launch {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status:?}): {detail}")]
    Died {
        what: &'static str,
        status: Option<i32>,
        detail: String,
    },
    #[error("{what} did not become ready within {timeout:?}: {detail}")]
    Timeout {
        what: String,
        timeout: Duration,
        detail: String,
    },
}

/// `Some(status)` once exited; the status is the exit code or 128 + signal when known.
pub type ExitWatch = watch::Receiver<Option<Option<i32>>>;

/// A running child process that is killed (SIGKILL) when dropped.
pub struct Daemon {
    name: &'static str,
    pid: u32,
    log: PathBuf,
    exit: ExitWatch,
    _watcher: Arc<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`, in its own
    /// process group (so a signal to the shim's group does not reach it), and records it
    /// in `ledger` at once.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
        ledger: &dyn PidLedger,
    ) -> Result<Daemon, DaemonError> {
        use std::os::unix::process::CommandExt;
        let program = PathBuf::from(cmd.get_program());
        if program.is_absolute() && !program.is_file() {
            return Err(DaemonError::Missing {
                what: name,
                path: program,
            });
        }
        let spawn_err = |source| DaemonError::Spawn { what: name, source };
        let out = crate::private_file::append(log).map_err(spawn_err)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().map_err(spawn_err)?)
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id();
        ledger.record(name, pid);
        // The std Child is dropped without waiting: exit is observed through the pidfd.
        drop(child);
        let pidfd = pidfd_open(pid).map_err(spawn_err)?;
        let (tx, rx) = watch::channel(None);
        let watcher = tokio::spawn(async move {
            let status = wait_pidfd(pidfd, pid).await;
            let _ = tx.send(Some(status));
        });
        Ok(Daemon {
            name,
            pid,
            log: log.to_path_buf(),
            exit: rx,
            _watcher: Arc::new(watcher),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` once exited; status is the exit code or 128 + signal when known.
    pub fn exited(&self) -> Option<Option<i32>> {
        *self.exit.borrow()
    }

    /// Its death as an error (status and the log's last line), once it exited.
    pub fn died(&self) -> Option<DaemonError> {
        self.exited().map(|status| DaemonError::Died {
            what: self.name,
            status,
            detail: last_line(&self.log),
        })
    }

    /// A receiver that sees the exit, for watchers that must not hold the daemon.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    /// Resolves when the process has exited.
    pub async fn wait(&self) -> Option<i32> {
        wait_exit(self.exit.clone()).await
    }

    /// Polls `ready` every few milliseconds until it holds; fails with the daemon's last
    /// log line if it exits first or `timeout` passes. `what` names what is awaited.
    pub async fn wait_ready(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<(), DaemonError> {
        let poll = async {
            loop {
                if let Some(died) = self.died() {
                    return Err(died);
                }
                if ready() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(timeout, poll)
            .await
            .unwrap_or_else(|_| {
                Err(DaemonError::Timeout {
                    what: format!("{} ({what})", self.name),
                    timeout,
                    detail: last_line(&self.log),
                })
            })
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

    /// SIGKILL and wait (at most [`KILL_WAIT`]) for the exit. Idempotent.
    pub async fn kill(&self) -> Option<i32> {
        self.signal(libc::SIGKILL);
        tokio::time::timeout(KILL_WAIT, self.wait())
            .await
            .unwrap_or(None)
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

/// Resolves with the status once `exit` reports one (None if the watcher is gone).
pub async fn wait_exit(mut exit: ExitWatch) -> Option<i32> {
    match exit.wait_for(Option::is_some).await {
        Ok(status) => status.flatten(),
        Err(_) => None,
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
    // SAFETY: the AsyncFd owns `pidfd`, so the descriptor stays open and unchanged while registered.
    match unsafe { AsyncFd::register(pidfd) } {
        Ok(fd) => {
            let _ = fd.readable().await;
            reap(fd.as_raw_fd())
        }
        // Cannot poll the pidfd (not expected): fall back to polling the pid.
        Err(_) => {
            // SAFETY: kill(2) with signal 0 only checks for existence.
            while unsafe { libc::kill(pid as i32, 0) } == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
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
    use std::sync::Mutex;

    use super::*;

    struct Recorded(Mutex<Vec<(&'static str, u32)>>);

    impl PidLedger for Recorded {
        fn record(&self, name: &'static str, pid: u32) {
            self.0.lock().unwrap().push((name, pid));
        }
    }

    #[tokio::test]
    async fn reports_exit_code_kill_and_records_the_launch() {
        let log =
            std::env::temp_dir().join(format!("shoji-daemon-test-{}.log", std::process::id()));
        let ledger = Recorded(Mutex::new(Vec::new()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye; exit 7"]);
        let d = Daemon::spawn("sh", cmd, &log, &ledger).unwrap();
        assert_eq!(d.wait().await, Some(7));
        assert_eq!(ledger.0.lock().unwrap()[0], ("sh", d.pid()));
        let err = d
            .wait_ready("never", Duration::from_secs(1), || false)
            .await;
        assert!(
            matches!(&err, Err(DaemonError::Died { detail, .. }) if detail == "bye"),
            "{err:?}"
        );

        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let d = Daemon::spawn("sleep", cmd, &log, &NoLedger).unwrap();
        assert_eq!(d.exited(), None);
        let err = d
            .wait_ready("never", Duration::from_millis(50), || false)
            .await;
        assert!(matches!(err, Err(DaemonError::Timeout { .. })), "{err:?}");
        assert_eq!(
            d.stop(Duration::from_secs(5)).await,
            Some(128 + libc::SIGTERM)
        );
        assert_eq!(
            d.stop(Duration::from_secs(5)).await,
            Some(128 + libc::SIGTERM)
        );
        let missing = Daemon::spawn("x", Command::new("/nonexistent/x"), &log, &NoLedger);
        assert!(matches!(missing, Err(DaemonError::Missing { .. })));
        let _ = std::fs::remove_file(log);
    }
}
