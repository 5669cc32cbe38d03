//! `create`: makes the container from its bundle; its init waits for `start`.
use std::{
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use libcontainer::{container::builder::ContainerBuilder, syscall::syscall::SyscallType};
use serde::{Deserialize, Serialize};

use super::{
    helper, read_pid_file, run_helper, HelperError, FD_STDERR, FD_STDIN, FD_STDOUT, STATE_ROOT,
};
use crate::reaper::Reaper;

pub const VERB: &str = "create";
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: String,
    bundle: PathBuf,
    pid_file: PathBuf,
    console_socket: Option<PathBuf>,
    /// Stdio fds are at FD_STDIN/FD_STDOUT/FD_STDERR (false with a console socket).
    stdio: bool,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    let e = |e: libcontainer::error::LibcontainerError| helper::describe(&e);
    let mut builder = ContainerBuilder::new(req.id, SyscallType::default())
        .with_root_path(STATE_ROOT)
        .map_err(e)?
        .with_pid_file(Some(&req.pid_file))
        .map_err(e)?
        .with_console_socket(req.console_socket.as_ref());
    if req.stdio {
        builder = builder
            .with_stdin(helper::inherited(FD_STDIN)?)
            .with_stdout(helper::inherited(FD_STDOUT)?)
            .with_stderr(helper::inherited(FD_STDERR)?);
    }
    builder
        .as_init(&req.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(e)?;
    Ok(())
}

/// Creates container `id` from the bundle in `dir` (also the helper's work dir); returns
/// the pid of its init. `stdio` are the process's stdin/stdout/stderr, or None with a tty
/// (the pty master then arrives on `console_socket`).
pub async fn create(
    reaper: &Reaper,
    id: &str,
    dir: &Path,
    stdio: Option<[BorrowedFd<'_>; 3]>,
    console_socket: Option<&Path>,
) -> Result<i32, HelperError> {
    let pid_file = dir.join("init.pid");
    let req = Request {
        id: id.to_string(),
        bundle: dir.to_path_buf(),
        pid_file: pid_file.clone(),
        console_socket: console_socket.map(Path::to_path_buf),
        stdio: stdio.is_some(),
    };
    let fds = match stdio {
        Some([i, o, e]) => vec![(FD_STDIN, i), (FD_STDOUT, o), (FD_STDERR, e)],
        None => vec![],
    };
    run_helper(reaper, VERB, dir, &req, &fds, TIMEOUT).await?;
    read_pid_file(VERB, &pid_file)
}
