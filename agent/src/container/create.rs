//! `create`: makes the container from its bundle; its init waits for `start`.
use std::{
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    describe,
    spawn::{spawn_process, NewProcess},
    HelperError,
};
use crate::reaper::Reaper;

pub const VERB: &str = "create";

#[derive(Serialize, Deserialize)]
pub struct Request {
    process: NewProcess,
    bundle: PathBuf,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    req.process
        .builder()?
        .as_init(&req.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| describe(&e))?;
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
    let bundle = dir.to_path_buf();
    spawn_process(reaper, VERB, id, dir, stdio, console_socket, |process| {
        Request { process, bundle }
    })
    .await
}
