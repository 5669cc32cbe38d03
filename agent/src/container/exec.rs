//! `exec`: runs an extra process (an OCI Process in `process.json`) inside a running container.
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

pub const VERB: &str = "exec";

#[derive(Serialize, Deserialize)]
pub struct Request {
    process: NewProcess,
    /// The OCI Process (JSON) to run.
    spec: PathBuf,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    req.process
        .builder()?
        .as_tenant()
        .with_process(Some(&req.spec))
        .with_detach(true)
        .build()
        .map_err(|e| describe(&e))?;
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
    let spec = dir.join("process.json");
    spawn_process(reaper, VERB, id, dir, stdio, console_socket, |process| {
        Request { process, spec }
    })
    .await
}
