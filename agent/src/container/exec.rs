//! `exec`: runs an extra process (an OCI Process in `process.json`) inside a running container.
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

pub const VERB: &str = "exec";
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: String,
    process: PathBuf,
    pid_file: PathBuf,
    console_socket: Option<PathBuf>,
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
        .as_tenant()
        .with_process(Some(&req.process))
        .with_detach(true)
        .build()
        .map_err(e)?;
    Ok(())
}

/// Runs the process described by `dir/process.json` in container `id`; returns its pid.
pub async fn exec(
    reaper: &Reaper,
    id: &str,
    dir: &Path,
    stdio: Option<[BorrowedFd<'_>; 3]>,
    console_socket: Option<&Path>,
) -> Result<i32, HelperError> {
    let pid_file = dir.join("exec.pid");
    let req = Request {
        id: id.to_string(),
        process: dir.join("process.json"),
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
