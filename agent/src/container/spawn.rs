//! What a `create` and an `exec` helper share: a new process of a container, its stdio at
//! the fixed fds or a console socket, and its pid read back from libcontainer's pid file.
use std::{
    os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use serde::Serialize;

use super::{describe, run_helper, HelperError, FD_STDERR, FD_STDIN, FD_STDOUT, STATE_ROOT};
use crate::reaper::Reaper;

/// How long a `create` or `exec` helper may take (libcontainer sets up namespaces, mounts
/// and cgroups; seconds under TCG on a loaded host).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

/// How a new process gets its stdio and reports its pid: the part of a `create` or `exec`
/// helper request they share.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct NewProcess {
    id: String,
    pid_file: std::path::PathBuf,
    console_socket: Option<std::path::PathBuf>,
    /// Stdio fds are at FD_STDIN/FD_STDOUT/FD_STDERR (false with a console socket).
    stdio: bool,
}

impl NewProcess {
    /// Helper side: the libcontainer builder for this process (state root, pid file, stdio).
    pub(super) fn builder(
        &self,
    ) -> Result<libcontainer::container::builder::ContainerBuilder, String> {
        use libcontainer::{container::builder::ContainerBuilder, syscall::syscall::SyscallType};
        let e = |e: libcontainer::error::LibcontainerError| describe(&e);
        let mut builder = ContainerBuilder::new(self.id.clone(), SyscallType::default())
            .with_root_path(STATE_ROOT)
            .map_err(e)?
            .with_pid_file(Some(&self.pid_file))
            .map_err(e)?
            .with_console_socket(self.console_socket.as_ref());
        if self.stdio {
            builder = builder
                .with_stdin(inherited(FD_STDIN)?)
                .with_stdout(inherited(FD_STDOUT)?)
                .with_stderr(inherited(FD_STDERR)?);
        }
        Ok(builder)
    }
}

/// Agent side: runs helper `verb` for a new process of container `id` whose stdio are
/// `stdio` (None with a tty: the pty master then arrives on `console_socket`); returns the
/// process's pid. `request` builds the verb's request around the [`NewProcess`] part.
pub(super) async fn spawn_process<R: Serialize>(
    reaper: &Reaper,
    verb: &'static str,
    id: &str,
    dir: &Path,
    stdio: Option<[BorrowedFd<'_>; 3]>,
    console_socket: Option<&Path>,
    request: impl FnOnce(NewProcess) -> R,
) -> Result<i32, HelperError> {
    let pid_file = dir.join(format!("{verb}.pid"));
    let process = NewProcess {
        id: id.to_string(),
        pid_file: pid_file.clone(),
        console_socket: console_socket.map(Path::to_path_buf),
        stdio: stdio.is_some(),
    };
    let fds = match stdio {
        Some([i, o, e]) => vec![(FD_STDIN, i), (FD_STDOUT, o), (FD_STDERR, e)],
        None => vec![],
    };
    run_helper(reaper, verb, dir, &request(process), &fds, SPAWN_TIMEOUT).await?;
    read_pid_file(verb, &pid_file)
}

/// The pid libcontainer wrote for the process a helper made.
fn read_pid_file(verb: &'static str, path: &Path) -> Result<i32, HelperError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.trim().parse().map_err(|_| HelperError::Failed {
        verb,
        status: 0,
        message: format!(
            "helper {verb} succeeded but {} holds no pid ({text:?})",
            path.display()
        ),
    })
}

/// Helper side: takes ownership of an fd the agent placed at a fixed number.
fn inherited(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("fd {fd} was not passed to the helper"));
    }
    // SAFETY: the fd is open and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
